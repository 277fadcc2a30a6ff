//! capture (placeholder until written).
