//! identity (placeholder until written).
