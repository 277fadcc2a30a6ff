//! app (placeholder until written).
