//! authz (placeholder until written).
