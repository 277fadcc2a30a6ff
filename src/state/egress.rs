//! Egress model (layer L1): the outbound traffic policy and Istio `ServiceEntry`s, and the pure
//! decision "may this pod reach this unknown destination, and where do the bytes go".
//!
//! `proxy::route::decide` asks [`Egress::decide`] only for destinations that are neither a
//! service VIP nor a workload of the mesh: those are always allowed (Istio's
//! `REGISTRY_ONLY` blocks only what is not in the registry). A destination matches a
//! ServiceEntry exported to the source's namespace when its IP is in the entry's `addresses`
//! (IPs or CIDRs) or is one of its STATIC endpoint IPs, and its port is one of the entry's
//! `ports`. A matched entry with `resolution: STATIC` and IP endpoints sends the connection to
//! one of those endpoints (its `ports` mapping, else the port's `targetPort`, else the port);
//! any other match passes the connection through to the address dialled. No match is allowed
//! under `ALLOW_ANY` and refused under `REGISTRY_ONLY`.
//!
//! Hostnames match through the pod's DNS-learned set (`state::learned`): when the pod resolved
//! a name one of the entry's `hosts` matches (Istio's matching: exact, or a `*.` wildcard for
//! any deeper name) through its DNS proxy, the answer's addresses match that entry for their
//! clamped TTL. The decision receives the lookup as an argument, so it stays pure.
//!
//! A matched entry bound to a waypoint (`istio.io/use-waypoint`) is an egress gateway: the route
//! sends the connection to that waypoint over HBONE instead of straight out.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::learned::{EntryRef, Grants};
pub use super::traffic_policy::ExportTo;
use super::GatewayAddress;

/// Istio's `meshConfig.outboundTrafficPolicy.mode`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, Hash,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Destinations outside the registry are passed through (Istio's default).
    #[default]
    AllowAny,
    /// Only workloads, services and ServiceEntry destinations may be reached.
    RegistryOnly,
}

impl OutboundMode {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundMode::AllowAny => "ALLOW_ANY",
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// The mesh-wide mode and the per-namespace exceptions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutboundTrafficPolicy {
    /// Mesh-wide.
    pub mode: OutboundMode,
    /// Namespace → mode, overriding `mode` for pods of that namespace.
    pub namespaces: BTreeMap<String, OutboundMode>,
}

impl OutboundTrafficPolicy {
    /// The mode that applies to pods of `namespace`.
    pub fn mode_for(&self, namespace: &str) -> OutboundMode {
        self.namespaces.get(namespace).copied().unwrap_or(self.mode)
    }
}

/// `ServiceEntry.spec.location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (Istio's default).
    #[default]
    MeshExternal,
    /// Part of the mesh, not in the registry otherwise.
    MeshInternal,
}

/// `ServiceEntry.spec.resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Connect to the address dialled (Istio's default).
    #[default]
    None,
    /// Load-balance over the entry's endpoints.
    Static,
    /// The application resolved the host itself; connect to the address dialled.
    Dns,
}

/// One `ServiceEntry.spec.ports[]` item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    /// The port the application dials.
    pub number: u16,
    /// The port's name (endpoint port maps refer to it).
    pub name: String,
    /// `TCP`, `HTTP`, `TLS`, ...: informational at L4.
    pub protocol: String,
    /// Where endpoints listen, if not `number`.
    pub target_port: Option<u16>,
}

/// One `ServiceEntry.spec.endpoints[]` item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryEndpoint {
    /// An IP (STATIC) or a hostname (DNS).
    pub address: String,
    /// Port name → the endpoint's port.
    pub ports: BTreeMap<String, u16>,
}

impl ServiceEntryEndpoint {
    fn ip(&self) -> Option<IpAddr> {
        self.address.parse().ok()
    }
}

/// A translated `networking.istio.io` ServiceEntry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.hosts`.
    pub hosts: Vec<String>,
    /// `spec.addresses`, IPs as /32 or /128.
    pub addresses: Vec<IpNet>,
    /// `spec.ports`.
    pub ports: Vec<ServiceEntryPort>,
    /// `spec.location`.
    pub location: Location,
    /// `spec.resolution`.
    pub resolution: Resolution,
    /// `spec.endpoints`.
    pub endpoints: Vec<ServiceEntryEndpoint>,
    /// `spec.exportTo`.
    pub export_to: ExportTo,
    /// The waypoint of the `istio.io/use-waypoint` label (an egress gateway): traffic the entry
    /// allows goes through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl ServiceEntry {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this is the entry `entry` names.
    pub fn is(&self, entry: &EntryRef) -> bool {
        *entry.namespace == *self.namespace && *entry.name == *self.name
    }

    /// The reference the learned set stores.
    pub fn reference(&self) -> EntryRef {
        EntryRef {
            namespace: Arc::from(self.namespace.as_str()),
            name: Arc::from(self.name.as_str()),
        }
    }

    /// The first of `hosts` that matches `name` (lower case, no trailing dot), as Istio matches
    /// a ServiceEntry host.
    pub fn host_matching(&self, name: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|host| host_matches(host, name))
            .map(String::as_str)
    }

    fn port(&self, number: u16) -> Option<&ServiceEntryPort> {
        self.ports.iter().find(|port| port.number == number)
    }

    /// Whether `ip` is one of the entry's destinations: in `addresses`, or a STATIC endpoint.
    fn covers(&self, ip: IpAddr) -> Option<MatchedBy> {
        if self.addresses.iter().any(|net| net.contains(&ip)) {
            return Some(MatchedBy::Address);
        }
        let is_endpoint = self.resolution == Resolution::Static
            && self
                .endpoints
                .iter()
                .any(|endpoint| endpoint.ip() == Some(ip));
        is_endpoint.then_some(MatchedBy::Endpoint)
    }
}

/// Everything the egress decision reads; part of the [`super::Snapshot`], so it changes with a
/// reload like policies do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Egress {
    /// The outbound traffic policy.
    pub policy: OutboundTrafficPolicy,
    /// ServiceEntries in configuration order (the first match wins).
    pub service_entries: Vec<Arc<ServiceEntry>>,
    /// DestinationRules (connection limits, outlier detection), in configuration order.
    pub destination_rules: super::traffic_policy::DestinationRules,
}

/// How a ServiceEntry matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchedBy {
    /// The IP is in `addresses`.
    Address,
    /// The IP is a STATIC endpoint of the entry.
    Endpoint,
    /// The pod resolved one of the entry's hosts to the IP through its DNS proxy.
    Learned {
        /// The name it resolved.
        host: Arc<str>,
    },
}

/// Whether a ServiceEntry `host` matches the DNS `name` (any case, trailing dots ignored), as
/// Istio matches hosts: equal, or `*.suffix` matching every name that ends with `.suffix`
/// (one label or more; not `suffix` itself), or `*` matching every name.
pub fn host_matches(host: &str, name: &str) -> bool {
    let host = host.trim_end_matches('.');
    let name = name.trim_end_matches('.');
    if host == "*" {
        return !name.is_empty();
    }
    match host.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1 && {
                let (head, tail) = name.split_at(name.len() - suffix.len());
                tail.eq_ignore_ascii_case(suffix) && head.ends_with('.')
            }
        }
        None => host.eq_ignore_ascii_case(name),
    }
}

/// The outcome of [`Egress::decide`].
#[derive(Debug, Clone, PartialEq)]
pub enum EgressDecision {
    /// A ServiceEntry allows it; connect to `target` (through the entry's waypoint, if any).
    ServiceEntry {
        /// The entry.
        entry: Arc<ServiceEntry>,
        /// Where to connect (a STATIC endpoint, or the address dialled).
        target: SocketAddr,
        /// How the entry matched.
        matched: MatchedBy,
    },
    /// No entry matched and the namespace's mode is `ALLOW_ANY`.
    AllowAny,
    /// No entry matched and the namespace's mode is `REGISTRY_ONLY`.
    Blocked(EgressBlocked),
}

/// A refusal by the outbound traffic policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EgressBlocked {
    /// The source pod's namespace.
    pub namespace: String,
    /// What it dialled.
    pub destination: SocketAddr,
    /// Why nothing matched.
    pub reason: BlockReason,
}

/// Why no ServiceEntry matched a refused destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// No entry covers the IP (by address, endpoint, or a name the pod resolved).
    NotRegistered,
    /// An entry covers the IP, but not on the port dialled.
    PortNotAllowed,
}

impl BlockReason {
    /// The `nodetunnel_egress_refusals_total` reason label.
    pub fn label(self) -> &'static str {
        match self {
            BlockReason::NotRegistered => "registry_only",
            BlockReason::PortNotAllowed => "port_not_allowed",
        }
    }
}

impl fmt::Display for EgressBlocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            BlockReason::NotRegistered => {
                "no workload, service or ServiceEntry matches, and the pod did not resolve it \
                 through its DNS proxy under an allowed host"
            }
            BlockReason::PortNotAllowed => "a ServiceEntry covers the address but not this port",
        };
        write!(
            f,
            "{} is not in the registry and outboundTrafficPolicy for namespace {} is \
             REGISTRY_ONLY ({why})",
            self.destination, self.namespace
        )
    }
}

/// The learned-set lookup [`Egress::decide`] uses: the grants of an IP still valid now.
pub type LearnedLookup<'a> = &'a dyn Fn(IpAddr) -> Option<Grants>;

/// A lookup for callers without a learned set (tools, tests): nothing was resolved.
pub fn nothing_learned(_: IpAddr) -> Option<Grants> {
    None
}

impl Egress {
    /// Decides a connection from a pod of `namespace` to `destination`, which is not a
    /// workload or service of the mesh. `pick` chooses among STATIC endpoints; `learned` gives
    /// what the pod resolved through its DNS proxy (asked only when no address matches).
    pub fn decide(
        &self,
        namespace: &str,
        destination: SocketAddr,
        pick: u64,
        learned: LearnedLookup<'_>,
    ) -> EgressDecision {
        let mut port_refused = false;
        let mut grants: Option<Option<Grants>> = None;
        for entry in &self.service_entries {
            if !entry.export_to.includes(namespace) {
                continue;
            }
            let matched = entry.covers(destination.ip()).or_else(|| {
                let grants = grants.get_or_insert_with(|| learned(destination.ip()));
                learned_match(entry, grants.as_deref()?)
            });
            let Some(matched) = matched else {
                continue;
            };
            let Some(port) = entry.port(destination.port()) else {
                port_refused = true;
                continue;
            };
            let target = match matched {
                MatchedBy::Address => static_target(entry, port, destination, pick),
                MatchedBy::Endpoint | MatchedBy::Learned { .. } => destination,
            };
            return EgressDecision::ServiceEntry {
                entry: entry.clone(),
                target,
                matched,
            };
        }
        match self.policy.mode_for(namespace) {
            OutboundMode::AllowAny => EgressDecision::AllowAny,
            OutboundMode::RegistryOnly => EgressDecision::Blocked(EgressBlocked {
                namespace: namespace.to_string(),
                destination,
                reason: if port_refused {
                    BlockReason::PortNotAllowed
                } else {
                    BlockReason::NotRegistered
                },
            }),
        }
    }

    /// The entries exported to `namespace` one of whose hosts matches `name` (lower case, no
    /// trailing dot): what an answer for `name` teaches a pod of `namespace`.
    pub fn entries_for_host(&self, namespace: &str, name: &str) -> Vec<EntryRef> {
        self.service_entries
            .iter()
            .filter(|entry| entry.export_to.includes(namespace))
            .filter(|entry| entry.host_matching(name).is_some())
            .map(|entry| entry.reference())
            .collect()
    }

    /// Whether any entry has a host that only DNS learning can make useful (no addresses and
    /// no STATIC endpoint IPs).
    pub fn has_hostname_only_entries(&self) -> bool {
        self.service_entries.iter().any(|entry| {
            entry.addresses.is_empty() && entry.endpoints.iter().all(|e| e.ip().is_none())
        })
    }
}

/// The learned grant of `entry`, if one of `grants` names it.
fn learned_match(entry: &ServiceEntry, grants: &[super::learned::Grant]) -> Option<MatchedBy> {
    grants
        .iter()
        .find(|grant| entry.is(&grant.entry))
        .map(|grant| MatchedBy::Learned {
            host: grant.host.clone(),
        })
}

/// A STATIC entry's endpoint for a connection to one of its addresses; else the address.
fn static_target(
    entry: &ServiceEntry,
    port: &ServiceEntryPort,
    dialled: SocketAddr,
    pick: u64,
) -> SocketAddr {
    if entry.resolution != Resolution::Static {
        return dialled;
    }
    let endpoints: Vec<(IpAddr, &ServiceEntryEndpoint)> = entry
        .endpoints
        .iter()
        .filter_map(|endpoint| endpoint.ip().map(|ip| (ip, endpoint)))
        .collect();
    if endpoints.is_empty() {
        return dialled;
    }
    let (ip, endpoint) = endpoints[(pick % endpoints.len() as u64) as usize];
    let target_port = endpoint
        .ports
        .get(&port.name)
        .copied()
        .or(port.target_port)
        .unwrap_or(port.number);
    SocketAddr::new(ip, target_port)
}

#[cfg(test)]
#[path = "egress_tests.rs"]
mod tests;
