//! Unit tests for evaluation, explain output, mTLS resolution and Istio translation details
//! that the conformance table does not show.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::spiffe::Identity;
use crate::state::{HealthStatus, TunnelProtocol, Workload};

/// A destination workload `name` in `namespace` at `ip`, labelled `app: server`.
pub(super) fn workload(namespace: &str, name: &str, ip: [u8; 4]) -> Workload {
    Workload {
        uid: format!("cluster//Pod/{namespace}/{name}"),
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        trust_domain: "cluster.local".to_string(),
        identity: Identity::new("cluster.local", namespace, name).expect("valid identity"),
        workload_ips: vec![IpAddr::from(ip)],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".to_string(),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        application_tunnel: None,
        services: BTreeMap::new(),
        labels: BTreeMap::from([("app".to_string(), "server".to_string())]),
        canonical_name: name.to_string(),
        canonical_revision: "latest".to_string(),
        workload_name: name.to_string(),
        workload_type: "deployment".to_string(),
        cluster_id: "Kubernetes".to_string(),
        authorization_policies: Vec::new(),
        status: HealthStatus::Healthy,
    }
}
