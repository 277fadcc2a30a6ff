//! socket (placeholder until written).
