//! sys (placeholder until written).
