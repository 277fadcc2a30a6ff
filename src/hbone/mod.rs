//! hbone (placeholder until written).
