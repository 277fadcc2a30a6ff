//! The mesh model: workloads, services and policies (layer L1).
//!
//! Both configuration sources (the local file now, xDS later) convert into these types at their
//! boundary; nothing downstream knows which source is in use. Readers take an immutable
//! [`Snapshot`] from the [`StateStore`] once per decision, so one connection sees one consistent
//! view even while a reload swaps in the next snapshot.

pub mod egress;
pub mod inbound_limits;
pub mod learned;
pub mod merge;
pub mod policy;
pub mod rules;
pub mod traffic_policy;
pub mod waypoint;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::net::NetworkAddress;
use crate::spiffe::Identity;

pub use policy::{Authorization, Policy};
pub use waypoint::ResolvedWaypoint;

/// How a workload accepts mesh traffic. Written `TCP` / `HBONE`, as Istio writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is not in the mesh; traffic to it is passed through.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// HBONE: mTLS + HTTP/2 CONNECT to the workload's port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
}

/// Where a waypoint or gateway is: an address, or a service/workload hostname to resolve.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum GatewayDestination {
    /// A concrete address in a network.
    Address(NetworkAddress),
    /// `namespace/hostname`: resolved as a service first, then as a workload hostname.
    Hostname {
        /// Namespace of the service or workload.
        namespace: String,
        /// Its hostname.
        hostname: String,
    },
}

/// `network/IP` or `namespace/hostname`: the one string istioctl reads, and what errors and
/// `explain` name.
impl std::fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayDestination::Address(address) => address.fmt(f),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}"),
        }
    }
}

/// A reference to a waypoint (or network gateway) and the port its HBONE listener uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayAddress {
    /// Where the waypoint is.
    pub destination: GatewayDestination,
    /// Its HBONE port (15008 unless configured otherwise).
    pub hbone_mtls_port: u16,
}

/// How inbound traffic is handed to a workload that terminates tunnels itself (a waypoint).
/// Written `NONE` / `PROXY`, as Istio writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ApplicationTunnelProtocol {
    /// Deliver the raw bytes.
    #[serde(rename = "NONE")]
    None,
    /// Prefix a PROXY protocol v2 header.
    #[serde(rename = "PROXY")]
    Proxy,
}

/// Application tunnel settings of a workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplicationTunnel {
    /// How to hand the traffic over.
    pub protocol: ApplicationTunnelProtocol,
    /// The port to deliver to, if not the original target port.
    pub port: Option<u16>,
}

/// Whether a workload may receive new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum HealthStatus {
    /// Eligible as a load-balancing endpoint.
    #[default]
    Healthy,
    /// Never picked as an endpoint.
    Unhealthy,
}

/// One workload (a pod or VM) of the mesh.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique id (e.g. `cluster//Pod/ns/name`); the key of the model.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
    /// Trust domain of the workload's identity.
    pub trust_domain: String,
    /// The SPIFFE identity derived from trust domain, namespace and service account; computed
    /// once at conversion so the data path never re-derives or re-validates it.
    pub identity: Identity,
    /// The workload's IPs (in `network`).
    pub workload_ips: Vec<IpAddr>,
    /// HBONE or plain TCP.
    pub protocol: TunnelProtocol,
    /// Name of the node the workload runs on.
    pub node: String,
    /// Network name; empty for the default network.
    pub network: String,
    /// Hostname, for workloads addressable by name (waypoints referenced by hostname).
    pub hostname: String,
    /// Waypoint for traffic addressed to this workload directly.
    pub waypoint: Option<GatewayAddress>,
    /// Set when the workload terminates tunnels itself (waypoints).
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Services this workload backs: `namespace/hostname` → service port → target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Kubernetes labels, for policy workload selectors.
    pub labels: BTreeMap<String, String>,
    /// Canonical service name (telemetry, baggage).
    pub canonical_name: String,
    /// Canonical revision (telemetry, baggage).
    pub canonical_revision: String,
    /// Owning controller's name (deployment, job...).
    pub workload_name: String,
    /// Owning controller's kind, lower case (`deployment`, `pod`, ...).
    pub workload_type: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Names (`namespace/name`) of WorkloadSelector policies selecting this workload.
    pub authorization_policies: Vec<String>,
    /// Health.
    pub status: HealthStatus,
}

/// One service: a set of VIPs and ports load-balanced over the workloads that back it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Fully qualified hostname, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs, each in a network.
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port (0 = resolve from the endpoint's own port map).
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities a server of this service may present.
    pub subject_alt_names: Vec<Identity>,
    /// Waypoint that handles traffic addressed to this service.
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The key workloads use to reference this service: `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// An immutable, indexed view of the whole model. Built once per update; cheap to share.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_address: HashMap<NetworkAddress, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<NetworkAddress, Arc<Service>>,
    /// Service key → the workloads backing it, in uid order (deterministic load balancing input).
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    /// Lower-case hostname → services with it (one per namespace at most), for DNS.
    services_by_hostname: HashMap<String, Vec<Arc<Service>>>,
    /// Lower-case hostname → workloads that carry it, for DNS.
    workloads_by_hostname: HashMap<String, Vec<Arc<Workload>>>,
    authorization: Authorization,
    egress: egress::Egress,
    inbound_limits: inbound_limits::InboundLimits,
}

/// A service endpoint chosen for a connection.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The backing workload.
    pub workload: Arc<Workload>,
    /// The port on the workload that the service port maps to.
    pub target_port: u16,
}

impl Snapshot {
    /// Indexes the given model with local-config policies only (no selectors, no
    /// PeerAuthentications, default options). See [`Snapshot::with_authorization`].
    pub fn new(workloads: Vec<Workload>, services: Vec<Service>, policies: Vec<Policy>) -> Self {
        let authorization = Authorization {
            policies: policies
                .into_iter()
                .map(policy::SelectorPolicy::new)
                .collect(),
            ..Authorization::default()
        };
        Snapshot::with_authorization(workloads, services, authorization)
    }

    /// Indexes the given model. The inputs must already be validated (unique uids and
    /// addresses); on a duplicate the later entry wins, which validation makes unreachable.
    pub fn with_authorization(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        authorization: Authorization,
    ) -> Self {
        let mut snapshot = Snapshot::default();
        let mut sorted = workloads;
        sorted.sort_by(|a, b| a.uid.cmp(&b.uid));
        for workload in sorted {
            let workload = Arc::new(workload);
            for ip in &workload.workload_ips {
                let address = NetworkAddress {
                    network: workload.network.clone(),
                    ip: *ip,
                };
                snapshot
                    .workload_by_address
                    .insert(address, workload.clone());
            }
            for service_key in workload.services.keys() {
                snapshot
                    .endpoints
                    .entry(service_key.clone())
                    .or_default()
                    .push(workload.clone());
            }
            if !workload.hostname.is_empty() {
                snapshot
                    .workloads_by_hostname
                    .entry(hostname_key(&workload.hostname))
                    .or_default()
                    .push(workload.clone());
            }
            snapshot.workloads.insert(workload.uid.clone(), workload);
        }
        for service in services {
            let service = Arc::new(service);
            for vip in &service.vips {
                snapshot.service_by_vip.insert(vip.clone(), service.clone());
            }
            snapshot
                .services_by_hostname
                .entry(hostname_key(&service.hostname))
                .or_default()
                .push(service.clone());
            snapshot.services.insert(service.key(), service);
        }
        snapshot.authorization = authorization;
        snapshot
    }

    /// The same model with this outbound traffic policy and these ServiceEntries.
    pub fn with_egress(mut self, egress: egress::Egress) -> Self {
        self.egress = egress;
        self
    }

    /// The outbound traffic policy and ServiceEntries.
    pub fn egress(&self) -> &egress::Egress {
        &self.egress
    }

    /// The same model with these inbound limits (`agent.inboundLimits`).
    pub fn with_inbound_limits(mut self, limits: inbound_limits::InboundLimits) -> Self {
        self.inbound_limits = limits;
        self
    }

    /// The inbound limits per destination workload.
    pub fn inbound_limits(&self) -> &inbound_limits::InboundLimits {
        &self.inbound_limits
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload that owns this address.
    pub fn workload_by_address(&self, address: &NetworkAddress) -> Option<&Arc<Workload>> {
        self.workload_by_address.get(address)
    }

    /// The service with this VIP.
    pub fn service_by_vip(&self, address: &NetworkAddress) -> Option<&Arc<Service>> {
        self.service_by_vip.get(address)
    }

    /// The service with this `namespace/hostname` key.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The services named `hostname` (any case, with or without the trailing dot), one per
    /// namespace that defines it.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<Service>] {
        self.services_by_hostname
            .get(&hostname_key(hostname))
            .map_or(&[], Vec::as_slice)
    }

    /// The workloads whose `hostname` is `hostname` (any case, with or without the trailing
    /// dot), in uid order.
    pub fn workloads_by_hostname(&self, hostname: &str) -> &[Arc<Workload>] {
        self.workloads_by_hostname
            .get(&hostname_key(hostname))
            .map_or(&[], Vec::as_slice)
    }

    /// Every workload backing `service` (healthy or not), in uid order.
    pub fn service_workloads(&self, service: &Service) -> &[Arc<Workload>] {
        self.endpoints
            .get(&service.key())
            .map_or(&[], Vec::as_slice)
    }

    /// All workloads, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// All services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Authorization policies, PeerAuthentications and options: what `authz` decides with.
    pub fn authorization(&self) -> &Authorization {
        &self.authorization
    }

    /// The first workload (in uid order) with `ip` in any network; for tools that take a bare
    /// IP from a person (explain), never for the data path, which knows its network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let mut found: Vec<&Arc<Workload>> = self
            .workloads
            .values()
            .filter(|workload| workload.workload_ips.contains(&ip))
            .collect();
        found.sort_by(|a, b| a.uid.cmp(&b.uid));
        found.into_iter().next()
    }

    /// Healthy endpoints of `service` that serve `service_port`, with their target ports.
    /// A service target port of 0 means "use the endpoint's own mapping for that port".
    pub fn endpoints(&self, service: &Service, service_port: u16) -> Vec<Endpoint> {
        let Some(service_target) = service.ports.get(&service_port).copied() else {
            return Vec::new();
        };
        let key = service.key();
        let Some(workloads) = self.endpoints.get(&key) else {
            return Vec::new();
        };
        workloads
            .iter()
            .filter(|workload| workload.status == HealthStatus::Healthy)
            .filter_map(|workload| {
                let own_port = workload
                    .services
                    .get(&key)
                    .and_then(|ports| ports.get(&service_port))
                    .copied();
                let target_port = own_port
                    .filter(|port| *port != 0)
                    .or(Some(service_target).filter(|port| *port != 0))?;
                Some(Endpoint {
                    workload: workload.clone(),
                    target_port,
                })
            })
            .collect()
    }
}

/// DNS names compare case-insensitively and a trailing dot names the same host.
fn hostname_key(hostname: &str) -> String {
    hostname.trim_end_matches('.').to_ascii_lowercase()
}

/// Holds the current snapshot. Readers are lock-free; a writer swaps the whole snapshot so a
/// bad update can never leave a half-applied model behind.
#[derive(Debug)]
pub struct StateStore {
    current: ArcSwap<Snapshot>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl StateStore {
    /// A store holding `initial`.
    pub fn new(initial: Snapshot) -> Self {
        let (changes, _) = tokio::sync::watch::channel(0);
        StateStore {
            current: ArcSwap::from_pointee(initial),
            changes,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot and wakes every subscriber (policy re-evaluation, pod reconcile).
    pub fn replace(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// A receiver that is notified after every replacement.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
pub(crate) mod tests;
