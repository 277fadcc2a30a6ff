//! telemetry (placeholder until written).
