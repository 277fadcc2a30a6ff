//! The JSON documents of the admin API (layer L5): `/config_dump` and `/connections`, as typed
//! structs that both the server that writes them ([`super::dump`]) and the CLI that reads them
//! ([`super::tables`]) use, so a renamed field is a compile error, not a blank column.
//!
//! `/config_dump` follows Istio's ztunnel dump field for field, because `istioctl
//! ztunnel-config` decodes it into Go structs (istio/istio
//! `istioctl/pkg/writer/ztunnel/configdump/api.go`): Go's decoder fails the whole command on a
//! type mismatch and leaves a column blank on a renamed field. Hence `protocol: "HBONE"`, a
//! waypoint `destination` that is one string (`network/IP` or `namespace/hostname`), services
//! with an `endpoints` map, flat policies, and per-pod `info` and `connections` with ztunnel's
//! names. Our own extra fields (`identity`, `labels`, a policy's `selector`,
//! `peerAuthentications`, `config`, per-connection bytes) are ignored by istioctl.
//!
//! Every field has a default when read, so a CLI of one version reads an agent of another.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::capture::PodSource;
use crate::net::NetworkAddress;
use crate::state::policy::{PeerAuthentication, Policy, WorkloadSelector};
use crate::state::{ApplicationTunnelProtocol, HealthStatus, TunnelProtocol};

/// `/config_dump`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigDump {
    /// Every workload of the model, by uid.
    pub workloads: Vec<WorkloadDump>,
    /// Every service of the model, by `namespace/hostname`.
    pub services: Vec<ServiceDump>,
    /// Authorization policies in evaluation order.
    pub policies: Vec<PolicyDump>,
    /// PeerAuthentications (ours; ztunnel receives them translated into policies).
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Per identity the agent looks after, its certificate.
    pub certificates: Vec<CertificateDump>,
    /// Per captured pod (by workload uid): its state, who it is, its open connections.
    pub workload_state: BTreeMap<String, WorkloadStateDump>,
    /// The outbound traffic policy, ServiceEntries and DestinationRules in force, and what each
    /// pod resolved under ServiceEntry hosts (ours: ztunnel enforces none of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressDump>,
    /// `agent.inboundLimits` in force, in order (ours: ztunnel has no inbound limits).
    pub inbound_limits: Vec<crate::state::inbound_limits::InboundLimit>,
    /// The effective agent configuration.
    pub config: Option<EffectiveConfig>,
    /// This agent's version.
    pub version: Option<VersionDump>,
}

/// The egress model in force and the live DNS-learned allow sets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressDump {
    /// `mode` and per-namespace `namespaces`, as configured.
    pub outbound_traffic_policy: serde_json::Value,
    /// The ServiceEntries, in matching order, as translated.
    pub service_entries: Vec<serde_json::Value>,
    /// The DestinationRules, as translated.
    pub destination_rules: Vec<serde_json::Value>,
    /// Per captured pod (workload uid): the addresses it resolved through its DNS proxy under
    /// an allowed host, still allowed now, by address.
    pub learned_destinations: BTreeMap<String, Vec<LearnedAddressDump>>,
}

/// One address in a pod's learned set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LearnedAddressDump {
    /// The address.
    pub address: Option<IpAddr>,
    /// Why it is allowed (one per ServiceEntry and name).
    pub grants: Vec<LearnedGrantDump>,
}

/// One reason a learned address is allowed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LearnedGrantDump {
    /// `namespace/name` of the ServiceEntry whose host matched.
    pub service_entry: String,
    /// The name the pod resolved.
    pub host: String,
    /// Seconds until it expires.
    pub expires_in_seconds: u64,
}

/// A workload as ztunnel dumps it, plus our `identity` and `labels`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadDump {
    /// Unique id.
    pub uid: String,
    /// The workload's IPs.
    pub workload_ips: Vec<IpAddr>,
    /// Its own waypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayDump>,
    /// `HBONE` or `TCP`.
    pub protocol: TunnelProtocol,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Trust domain of its identity.
    pub trust_domain: String,
    /// Service account.
    pub service_account: String,
    /// Network; empty for the default one.
    pub network: String,
    /// Owning controller's name.
    pub workload_name: String,
    /// Owning controller's kind, lower case.
    pub workload_type: String,
    /// Canonical service name.
    pub canonical_name: String,
    /// Canonical revision.
    pub canonical_revision: String,
    /// Hostname, for workloads addressed by name.
    pub hostname: String,
    /// Node it runs on.
    pub node: String,
    /// Set when it terminates tunnels itself (waypoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_tunnel: Option<ApplicationTunnelDump>,
    /// `namespace/name` of the WorkloadSelector policies that select it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// `Healthy` or `Unhealthy`.
    pub status: HealthStatus,
    /// Cluster id.
    pub cluster_id: String,
    /// Load-balancing weight; ztunnel's default, as the model does not carry one.
    pub capacity: u32,
    /// `namespace/hostname` of each service it backs (the port maps are in the services'
    /// `endpoints`, as ztunnel dumps them).
    pub services: Vec<String>,
    /// Ours: its SPIFFE identity.
    pub identity: String,
    /// Ours: its Kubernetes labels (what policy selectors match).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A waypoint reference as ztunnel dumps it: one string, as istioctl reads it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayDump {
    /// `network/IP` or `namespace/hostname`.
    pub destination: String,
    /// The waypoint's HBONE port.
    pub hbone_mtls_port: u16,
}

/// A workload's application tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationTunnelDump {
    /// `NONE` or `PROXY`.
    pub protocol: ApplicationTunnelProtocol,
    /// The port traffic is delivered to, when not the original target port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A service as ztunnel dumps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceDump {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Fully qualified hostname.
    pub hostname: String,
    /// Virtual IPs, `network/IP`.
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port (0: the endpoint's own mapping).
    pub ports: BTreeMap<u16, u16>,
    /// The workloads backing it, by workload uid.
    pub endpoints: BTreeMap<String, EndpointDump>,
    /// Extra identities its endpoints may present.
    pub subject_alt_names: Vec<String>,
    /// Its waypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayDump>,
}

/// One backend of a service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointDump {
    /// The backing workload.
    pub workload_uid: String,
    /// The service, `namespace/hostname`.
    pub service: String,
    /// The workload's first address, `network/IP`; absent for a workload without IPs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<NetworkAddress>,
    /// Service port → target port on this workload.
    pub port: BTreeMap<u16, u16>,
    /// The workload's health.
    pub status: HealthStatus,
}

/// A policy, flat as ztunnel dumps it (`name`, `namespace`, `scope`, `action`, `rules`,
/// `dryRun`), plus the label selector Istio YAML gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDump {
    /// The policy.
    #[serde(flatten)]
    pub policy: Policy,
    /// Ours: `selector.matchLabels` of an Istio resource, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
}

/// One identity's certificate, as ztunnel dumps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateDump {
    /// The SPIFFE identity.
    pub identity: String,
    /// `Available`, `Initializing`, `Unavailable: <why>` or `Expired`.
    pub state: String,
    /// Leaf first, then intermediates; empty until issued.
    pub cert_chain: Vec<CertificateInfo>,
    /// The roots the chain is verified against.
    pub root_certs: Vec<CertificateInfo>,
}

/// One certificate; the fields other than `pem` are empty if it does not parse as X.509.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateInfo {
    /// The PEM text, base64-encoded (as ztunnel dumps it).
    pub pem: String,
    /// Serial number, decimal.
    pub serial_number: String,
    /// RFC 3339.
    pub valid_from: String,
    /// RFC 3339.
    pub expiration_time: String,
}

/// Whether a captured pod's listeners are up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// Listeners are up.
    Up,
    /// The last attempt failed; it is retried.
    #[default]
    Pending,
}

/// One captured pod, as ztunnel's `workloadState` entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadStateDump {
    /// `Up` or `Pending`.
    pub state: PodState,
    /// Who the pod is.
    pub info: PodInfo,
    /// Its open connections.
    pub connections: ConnectionsDump,
}

/// Who a captured pod is (ztunnel's `WorkloadInfo`), and where it came from (ours).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Trust domain of its identity.
    pub trust_domain: String,
    /// Service account.
    pub service_account: String,
    /// Ours: the network namespace path.
    pub netns: PathBuf,
    /// Ours: who asked for it.
    pub source: Option<PodSource>,
    /// Ours: why the last attempt failed, while `Pending`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A pod's open connections by direction.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionsDump {
    /// Connections to the pod.
    pub inbound: Vec<ConnectionDump>,
    /// Connections from the pod.
    pub outbound: Vec<ConnectionDump>,
}

/// One open connection: ztunnel's `src`, `originalDst`, `actualDst`, `protocol`, plus ours.
/// Also the items of `/connections`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionDump {
    /// The client's address.
    pub src: String,
    /// Outbound: what the app dialled. Inbound: the service addressed, else the CONNECT
    /// authority (HBONE) or the original destination (plaintext).
    pub original_dst: Option<String>,
    /// Where the bytes go: the HBONE peer (`ip:15008`), the passthrough target, or the app.
    pub actual_dst: String,
    /// `HBONE` when tunnelled, else `TCP`.
    pub protocol: TunnelProtocol,
    /// Ours: `inbound` or `outbound`.
    pub direction: String,
    /// Ours: source workload uid, empty if unknown.
    pub src_workload: String,
    /// Ours: destination workload uid, empty if unknown.
    pub dst_workload: String,
    /// Ours: source identity (mTLS only).
    pub src_identity: String,
    /// Ours: destination identity (mTLS only).
    pub dst_identity: String,
    /// Ours: bytes source → destination so far.
    pub bytes_sent: u64,
    /// Ours: bytes destination → source so far.
    pub bytes_received: u64,
    /// Ours: seconds since it was accepted.
    pub age_seconds: f64,
}

/// This agent's version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VersionDump {
    /// Crate version.
    pub version: String,
    /// `debug` or `release`.
    pub build_profile: String,
}

/// The effective agent configuration as the dump shows it (after overrides and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// istiod's xDS address, when workloads come from istiod.
    pub xds_address: Option<String>,
    /// The Istio CA's address; `None` means the built-in CA signs.
    pub ca_address: Option<String>,
    /// The cluster id sent to istiod.
    pub cluster_id: String,
    /// Whether every captured pod gets the DNS proxy (ztunnel's field). The DNS fields
    /// default when absent, so the CLI still reads an agent from before the DNS proxy.
    #[serde(default)]
    pub dns_proxy: bool,
    /// Where the DNS proxy listens inside each pod (ztunnel's field and form).
    #[serde(default)]
    pub dns_proxy_addr: String,
    /// The cluster's DNS domain (ztunnel's field).
    #[serde(default)]
    pub cluster_domain: String,
    /// Where names outside the mesh are forwarded.
    #[serde(default)]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Deadline of one forwarded query.
    #[serde(default, with = "humantime_serde")]
    pub dns_forward_timeout: Duration,
}
