//! Test fixtures for the model, shared by the unit tests of every module.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{HealthStatus, TunnelProtocol, Workload};
use crate::spiffe::Identity;

/// A healthy HBONE workload `namespace/name` at `ip`, whose service account is its name, on
/// `node-a` in the default network; tests adjust fields with struct update syntax.
pub(crate) fn workload(namespace: &str, name: &str, ip: impl Into<IpAddr>) -> Workload {
    Workload {
        uid: format!("cluster//Pod/{namespace}/{name}"),
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        trust_domain: "cluster.local".to_string(),
        identity: Identity::new("cluster.local", namespace, name).expect("valid identity"),
        workload_ips: vec![ip.into()],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".to_string(),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        application_tunnel: None,
        services: BTreeMap::new(),
        labels: BTreeMap::new(),
        canonical_name: name.to_string(),
        canonical_revision: String::new(),
        workload_name: name.to_string(),
        workload_type: "deployment".to_string(),
        cluster_id: "Kubernetes".to_string(),
        authorization_policies: Vec::new(),
        status: HealthStatus::Healthy,
    }
}
