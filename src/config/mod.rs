//! Configuration (layer L1). (placeholder until written)
pub mod agent;
