//! The file's shape (layer L1, part of `config`).
//!
//! These structs mirror Istio's local ztunnel config (`LOCAL_XDS_PATH`) field for field, so a
//! user's existing file loads unchanged; `agent:` is our own section. Deserialising checks
//! types and rejects unknown keys; everything that needs more than one field is checked in
//! `convert`. Strings that could be malformed (IPs, `network/IP`, identities) stay strings
//! here, so that `convert` can report every bad one instead of serde stopping at the first.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

use super::agent::AgentConfig;
use crate::state::Policy;

/// A port written as a YAML integer or a string (`80` or `"80"`): map keys arrive either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl serde::de::Visitor<'_> for PortVisitor {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (0-65535)")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Port, E> {
                u16::try_from(value)
                    .map(Port)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Port, E> {
                u16::try_from(value)
                    .map(Port)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Port, E> {
                value
                    .trim()
                    .parse()
                    .map(Port)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(value), &self))
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// Service port → target port.
pub type PortMap = BTreeMap<Port, Port>;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalFile {
    /// Our own section.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Istio's `workloads`.
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    /// Istio's `services`.
    #[serde(default)]
    pub services: Vec<LocalService>,
    /// Istio's `policies`, already in the model's shape. String matches are read in ztunnel's
    /// own form, YAML tags (`!Exact ns`, `!Presence []`, as serde_yaml 0.9 writes enums), and as
    /// single-key maps (`{Exact: ns}`); see [`crate::state::policy::StringMatch`].
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Our extension: Istio `AuthorizationPolicy` / `PeerAuthentication` resources
    /// (`security.istio.io/v1` or `v1beta1`), kept untyped so that one bad resource is reported
    /// by name and left out instead of failing the whole file.
    #[serde(default)]
    pub istio_resources: Vec<serde_yaml::Value>,
}

/// Istio's tunnel protocols as written in the local config.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub enum LocalProtocol {
    /// Plain TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// HBONE.
    #[serde(rename = "HBONE")]
    Hbone,
}

/// Istio's network modes; host-network workloads share the node's IPs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum NetworkMode {
    /// The pod has its own IPs.
    #[default]
    Standard,
    /// The pod uses the node's network namespace.
    HostNetwork,
}

/// `{destination, hboneMtlsPort}` of a waypoint or network gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalGateway {
    /// `network/IP` (tried first) or `namespace/hostname`.
    pub destination: String,
    /// HBONE port of the gateway.
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    crate::net::ports::HBONE
}

/// `applicationTunnel` of a workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalApplicationTunnel {
    /// `NONE` or `PROXY`.
    #[serde(default)]
    pub protocol: LocalTunnelProtocol,
    /// Port to deliver to; 0, `null` or absent means the original target port (as in Istio's
    /// proto and ztunnel's `Option<u16>`).
    #[serde(default)]
    pub port: Option<u16>,
}

/// Application tunnel protocols.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub enum LocalTunnelProtocol {
    /// Raw bytes.
    #[default]
    #[serde(rename = "NONE")]
    None,
    /// PROXY protocol v2.
    #[serde(rename = "PROXY")]
    Proxy,
}

/// Accepted for compatibility, not used.
#[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    /// Region.
    #[serde(default)]
    pub region: String,
    /// Zone.
    #[serde(default)]
    pub zone: String,
    /// Subzone.
    #[serde(default)]
    pub subzone: String,
}

/// One entry of `workloads`: Istio's fields plus our `labels`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    /// Defaults to `<clusterId>//Pod/<namespace>/<name>`, the form istiod gives pods.
    #[serde(default)]
    pub uid: String,
    /// Pod name. Optional, as in ztunnel; a workload needs a `uid` or a `name`.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Defaults to `default`.
    #[serde(default)]
    pub service_account: String,
    /// Defaults to `agent.trustDomain`.
    #[serde(default)]
    pub trust_domain: String,
    /// IP strings; parsed in [`convert`] so that every bad one is reported.
    #[serde(default)]
    pub workload_ips: Vec<String>,
    /// `TCP` (default) or `HBONE`.
    #[serde(default)]
    pub protocol: LocalProtocol,
    /// `Standard` or `HostNetwork`.
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// Node name.
    #[serde(default)]
    pub node: String,
    /// Network name.
    #[serde(default)]
    pub network: String,
    /// Hostname.
    #[serde(default)]
    pub hostname: String,
    /// Waypoint.
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    /// Accepted, not used yet (multi-network).
    #[serde(default)]
    pub network_gateway: Option<LocalGateway>,
    /// Accepted, not used (Istio uses it only for certificate prefetch).
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub native_tunnel: bool,
    /// Application tunnel.
    #[serde(default)]
    pub application_tunnel: Option<LocalApplicationTunnel>,
    /// Selector policies (`namespace/name`).
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// `Healthy` (default) or `Unhealthy`.
    #[serde(default)]
    pub status: LocalHealth,
    /// Defaults to `Kubernetes`.
    #[serde(default)]
    pub cluster_id: String,
    /// Accepted, not used.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub locality: Locality,
    /// Owning controller's name.
    #[serde(default)]
    pub workload_name: String,
    /// Owning controller's kind.
    #[serde(default)]
    pub workload_type: String,
    /// Canonical service name.
    #[serde(default)]
    pub canonical_name: String,
    /// Canonical revision.
    #[serde(default)]
    pub canonical_revision: String,
    /// Accepted, not used (load-balancing weight).
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub capacity: Option<u32>,
    /// `namespace/hostname` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, PortMap>,
    /// Our extension: Kubernetes labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Workload health as written.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub enum LocalHealth {
    /// Eligible endpoint.
    #[default]
    Healthy,
    /// Never picked.
    Unhealthy,
}

/// One entry of `services`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Hostname.
    pub hostname: String,
    /// `network/IP` strings.
    #[serde(default)]
    pub vips: Vec<String>,
    /// Accepted, not used yet.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub cidr_vips: Vec<String>,
    /// Service port → target port.
    #[serde(default)]
    pub ports: PortMap,
    /// SPIFFE identities.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Waypoint.
    #[serde(default)]
    pub waypoint: Option<LocalGateway>,
    /// Accepted, not used; kept untyped since we do not interpret it.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub weighted_waypoints: Option<serde_yaml::Value>,
    /// Istio's `endpoints`: key (ztunnel uses the workload uid) → endpoint. As in ztunnel, each
    /// makes the workload with that uid back this service with the endpoint's port map, beside
    /// the workloads that name the service in their own `services`.
    #[serde(default)]
    pub endpoints: BTreeMap<String, LocalEndpoint>,
    /// Accepted, not used.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub load_balancer: Option<LoadBalancer>,
    /// Accepted, not used.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub ip_families: Option<IpFamilies>,
    /// Accepted, not used.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub canonical: bool,
    /// Accepted, not used.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub visibility: Option<Visibility>,
}

/// One entry of a service's `endpoints`, in the shapes ztunnel has read and dumped.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalEndpoint {
    /// The backing workload's uid.
    pub workload_uid: String,
    /// Service port → target port; an empty map takes the service's `ports`.
    #[serde(default)]
    pub port: PortMap,
    /// Accepted, not used: health is the workload's own `status`.
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub status: Option<LocalHealth>,
    /// Accepted, not used (older ztunnel: `namespace/hostname`, implied by the service).
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub service: Option<String>,
    /// Accepted, not used (older ztunnel: `network/IP`, implied by the workload).
    #[serde(default)]
    #[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
    pub address: Option<String>,
}

/// Istio's `loadBalancer` (accepted, not used).
#[allow(dead_code)] // accepted so Istio's files load unchanged; not interpreted
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Scopes.
    #[serde(default)]
    pub routing_preferences: Vec<LoadBalancerScope>,
    /// Mode.
    #[serde(default)]
    pub mode: Option<LoadBalancerMode>,
    /// Health policy.
    #[serde(default)]
    pub health_policy: Option<LoadBalancerHealthPolicy>,
}

/// Load-balancing scopes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[allow(missing_docs)]
pub enum LoadBalancerScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// Load-balancing modes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[allow(missing_docs)]
pub enum LoadBalancerMode {
    Standard,
    Strict,
    Failover,
    Passthrough,
}

/// Load-balancing health policies.
#[derive(Debug, Clone, Copy, Deserialize)]
#[allow(missing_docs)]
pub enum LoadBalancerHealthPolicy {
    OnlyHealthy,
    AllowAll,
}

/// IP families.
#[derive(Debug, Clone, Copy, Deserialize)]
#[allow(missing_docs)]
pub enum IpFamilies {
    Dual,
    IPv4,
    IPv6,
}

/// Service visibility.
#[derive(Debug, Clone, Copy, Deserialize)]
#[allow(missing_docs)]
pub enum Visibility {
    Public,
    Namespace,
}
