//! proxy (placeholder until written).
