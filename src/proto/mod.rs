//! Wire types of Istio's control plane (layer L2): workload discovery, authorization, the Istio
//! CA and delta xDS, generated at build time from the `.proto` files beside this module.
//!
//! Nothing outside `xds` and the Istio CA client should use these types: they are converted
//! into the model at that boundary (`TryFrom`), so the rest of the agent never sees a proto.

#![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]

/// `istio.workload`: workloads and services.
pub mod workload {
    tonic::include_proto!("istio.workload");
}

/// `istio.security`: L4 authorization policies.
pub mod security {
    tonic::include_proto!("istio.security");
}

/// `istio.v1.auth`: the certificate service.
pub mod citadel {
    tonic::include_proto!("istio.v1.auth");
}

/// `envoy.service.discovery.v3`: delta ADS.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// Type URL of workload discovery resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
