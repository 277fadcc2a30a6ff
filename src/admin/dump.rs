//! `/config_dump` (layer L5): everything the agent acts on, in one JSON document whose top-level
//! names follow Istio's ztunnel dump where they overlap (`workloads`, `services`, `policies`,
//! `certificates` with `validFrom`/`expirationTime`, `workloadState`, `config`, `version`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::AdminState;
use crate::capture::PodStatus;
use crate::spiffe::Identity;
use crate::state::{Service, Workload};
use crate::telemetry::metrics::OpenConnection;

/// The effective agent configuration as the dump shows it (after overrides and defaults).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    /// This node's name.
    pub node: String,
    /// The config file being watched.
    pub config_path: PathBuf,
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Readiness address.
    pub readiness_addr: SocketAddr,
    /// How long shutdown waits for connections.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often the config file is checked.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Whether pods come from istio-cni over ZDS.
    pub zds_enabled: bool,
    /// Whether the agent installs redirection rules itself.
    pub install_rules: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateDump {
    identity: Identity,
    state: &'static str,
    cert_chain: Vec<CertificateValidity>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateValidity {
    valid_from: String,
    expiration_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadState {
    state: &'static str,
    info: PodStatus,
    connections: Connections,
}

#[derive(Serialize, Default)]
struct Connections {
    inbound: Vec<OpenConnection>,
    outbound: Vec<OpenConnection>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Version {
    version: &'static str,
    build_profile: &'static str,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Builds the dump from the current snapshot, certificates, pods and open connections.
pub(super) fn config_dump(admin: &AdminState) -> serde_json::Value {
    let snapshot = admin.state.snapshot();
    let mut workloads: Vec<&Workload> = snapshot.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = snapshot.services().map(|s| s.as_ref()).collect();
    services.sort_by_key(|service| service.key());
    let authorization = snapshot.authorization();
    let certificates: Vec<CertificateDump> = admin
        .certificates
        .certificates()
        .into_iter()
        .map(|(identity, not_before, not_after)| CertificateDump {
            state: if not_after > SystemTime::now() {
                "Available"
            } else {
                "Expired"
            },
            identity,
            cert_chain: vec![CertificateValidity {
                valid_from: rfc3339(not_before),
                expiration_time: rfc3339(not_after),
            }],
        })
        .collect();
    serde_json::json!({
        "workloads": workloads,
        "services": services,
        "policies": authorization.policies,
        "peerAuthentications": authorization.peer_authentications,
        "certificates": certificates,
        "workloadState": workload_state(admin),
        "config": admin.config,
        "version": Version {
            version: env!("CARGO_PKG_VERSION"),
            build_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        },
    })
}

/// Per captured pod: `Up` or `Pending`, its status, and its open connections by direction.
fn workload_state(admin: &AdminState) -> BTreeMap<String, WorkloadState> {
    let mut by_workload: BTreeMap<String, WorkloadState> = admin
        .pods
        .status()
        .into_iter()
        .map(|(uid, info)| {
            let state = match info {
                PodStatus::Running { .. } => "Up",
                PodStatus::Failed { .. } => "Pending",
            };
            let entry = WorkloadState {
                state,
                info,
                connections: Connections::default(),
            };
            (uid, entry)
        })
        .collect();
    for connection in admin.metrics.connections() {
        let inbound = connection.info.direction == "inbound";
        let owner = if inbound {
            &connection.info.dst_workload
        } else {
            &connection.info.src_workload
        };
        let Some(entry) = by_workload.get_mut(owner) else {
            continue;
        };
        if inbound {
            entry.connections.inbound.push(connection);
        } else {
            entry.connections.outbound.push(connection);
        }
    }
    by_workload
}
