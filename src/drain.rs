//! drain (placeholder until written).
