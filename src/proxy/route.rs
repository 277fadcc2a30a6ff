//! The outbound route decision (layer L3): pure, over one state snapshot.
//!
//! Given the source workload and the destination the application dialled, decide where the
//! bytes go: an HBONE tunnel to a mesh workload or to the waypoint in front of it, or plain TCP
//! passthrough. Randomness for load balancing comes in as an argument so the decision stays a
//! pure function.
//!
//! Waypoints (Istio's order): a service VIP whose service has a waypoint goes to that waypoint
//! with the original `VIP:port` as authority; otherwise a service goes straight to an endpoint,
//! even one with a workload waypoint. A pod address whose workload has a waypoint goes to that
//! waypoint with the original `IP:port` as authority. Traffic from the waypoint itself goes
//! direct, so a waypoint never loops back to itself.
//!
//! A destination that is neither a service VIP nor a workload is an egress question
//! (`state::egress`): a matching ServiceEntry allows it (by address, or by a name the pod
//! resolved through its DNS proxy, looked up in the pod's learned set) and may pick a STATIC
//! endpoint, else the source namespace's outbound traffic policy passes it through
//! (`ALLOW_ANY`) or refuses it (`REGISTRY_ONLY`). An entry bound to a waypoint (an egress
//! gateway) sends what it allows to that waypoint over HBONE, like a service with a waypoint;
//! the waypoint's own traffic goes straight out.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::net::{ports, NetworkAddress, OriginalDst, UpstreamAddr};
use crate::spiffe::Identity;
use crate::state::egress::{self, EgressBlocked, EgressDecision, LearnedLookup, ServiceEntry};
use crate::state::{GatewayAddress, Service, Snapshot, TunnelProtocol, Workload};

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// Through an HBONE tunnel.
    Hbone(HboneRoute),
    /// Plain TCP to the target (not in the mesh, or not known).
    Passthrough(PassthroughRoute),
}

/// An HBONE tunnel target.
#[derive(Debug, Clone)]
pub struct HboneRoute {
    /// The peer's HBONE listener.
    pub peer: UpstreamAddr,
    /// The CONNECT `:authority`: destination pod IP and *target* port; through a waypoint, the
    /// address the application dialled (service VIP or pod IP, port untranslated).
    pub authority: SocketAddr,
    /// The workload the tunnel reaches (the waypoint, when going through one).
    pub destination: Arc<Workload>,
    /// The service the application addressed, if it dialled a VIP.
    pub service: Option<Arc<Service>>,
    /// Identities the peer may present (sorted, deduplicated): the workload's and the service's
    /// `subjectAltNames`; through a waypoint, the waypoint's and its service's.
    pub expected_identities: Vec<Identity>,
}

/// A plain TCP target.
#[derive(Debug, Clone)]
pub struct PassthroughRoute {
    /// Where to connect.
    pub target: UpstreamAddr,
    /// The workload there, if known (a non-HBONE mesh workload).
    pub destination: Option<Arc<Workload>>,
    /// The service addressed, if any.
    pub service: Option<Arc<Service>>,
    /// The ServiceEntry that allowed an outside destination, if one did.
    pub service_entry: Option<Arc<ServiceEntry>>,
}

/// Why no route exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The app dialled one of the agent's own ports on a local address.
    #[error("refusing to proxy to the agent's own port {0} (would loop)")]
    SelfCall(u16),
    /// The service has no healthy endpoint serving the port.
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyUpstream {
        /// `namespace/hostname`.
        service: String,
        /// The service port dialled.
        port: u16,
    },
    /// The chosen workload is on another network; multi-network is not supported yet.
    #[error("workload {uid} is on network {network:?}, which this agent cannot reach")]
    OtherNetwork {
        /// The workload.
        uid: String,
        /// Its network.
        network: String,
    },
    /// The workload has no address of the family needed.
    #[error("workload {0} has no IP address")]
    NoAddress(String),
    /// The destination names a waypoint that resolves to no workload in the source's network;
    /// refused rather than sent around the waypoint.
    #[error("waypoint {0} of the destination resolves to no reachable workload")]
    NoWaypoint(String),
    /// Outside the registry, and the source's namespace is `REGISTRY_ONLY`.
    #[error(transparent)]
    EgressBlocked(#[from] EgressBlocked),
}

/// Decides the route for `destination` dialled by `source`. `pick` chooses among endpoints.
pub fn decide(
    snapshot: &Snapshot,
    source: &Workload,
    destination: OriginalDst,
    hbone_port: u16,
    pick: u64,
) -> Result<Route, RouteError> {
    let not_ejected = |_: &Service, _: &Workload| false;
    let context = RouteContext {
        ejected: &not_ejected,
        learned: &egress::nothing_learned,
    };
    decide_avoiding(snapshot, source, destination, hbone_port, pick, &context)
}

/// What a route decision reads besides the snapshot: per-pod state that changes between
/// connections, handed in as lookups so that the decision stays pure.
pub struct RouteContext<'a> {
    /// Whether outlier detection ejected this endpoint of this service.
    pub ejected: &'a dyn Fn(&Service, &Workload) -> bool,
    /// The source pod's DNS-learned egress grants of an IP.
    pub learned: LearnedLookup<'a>,
}

/// [`decide`], with load balancing skipping the endpoints `context.ejected` names (outlier
/// detection: service, endpoint; when every endpoint is ejected, all are candidates again, as
/// in Envoy), and the egress decision seeing what the pod resolved (`context.learned`).
pub fn decide_avoiding(
    snapshot: &Snapshot,
    source: &Workload,
    destination: OriginalDst,
    hbone_port: u16,
    pick: u64,
    context: &RouteContext<'_>,
) -> Result<Route, RouteError> {
    let ejected = context.ejected;
    let dst = destination.0;
    let is_own_address = dst.ip().is_loopback() || source.workload_ips.contains(&dst.ip());
    if is_own_address && ports::is_agent_port(dst.port()) {
        return Err(RouteError::SelfCall(dst.port()));
    }
    let address = NetworkAddress {
        network: source.network.clone(),
        ip: dst.ip(),
    };
    if let Some(service) = snapshot.service_by_vip(&address) {
        if let Some(gateway) = waypoint_to_use(snapshot, service.waypoint.as_ref(), source) {
            let via = Via {
                service: Some(service.clone()),
                pick,
            };
            return to_waypoint(snapshot, gateway, source, dst, via);
        }
        let mut endpoints = snapshot.endpoints(service, dst.port());
        if endpoints
            .iter()
            .any(|endpoint| !ejected(service, &endpoint.workload))
        {
            endpoints.retain(|endpoint| !ejected(service, &endpoint.workload));
        }
        if endpoints.is_empty() {
            return Err(RouteError::NoHealthyUpstream {
                service: service.key(),
                port: dst.port(),
            });
        }
        let endpoint = &endpoints[(pick % endpoints.len() as u64) as usize];
        return to_workload(
            &endpoint.workload,
            endpoint.target_port,
            Some(service.clone()),
            source,
            dst,
            hbone_port,
        );
    }
    if let Some(workload) = snapshot.workload_by_address(&address) {
        if let Some(gateway) = waypoint_to_use(snapshot, workload.waypoint.as_ref(), source) {
            let via = Via {
                service: None,
                pick,
            };
            return to_waypoint(snapshot, gateway, source, dst, via);
        }
        return to_workload(workload, dst.port(), None, source, dst, hbone_port);
    }
    // Not in the registry: the outbound traffic policy and ServiceEntries decide.
    outside(snapshot, source, dst, pick, context)
}

/// A destination outside the registry: allowed by a ServiceEntry (straight out, to a STATIC
/// endpoint, or through the entry's egress gateway), passed through, or refused.
fn outside(
    snapshot: &Snapshot,
    source: &Workload,
    dst: SocketAddr,
    pick: u64,
    context: &RouteContext<'_>,
) -> Result<Route, RouteError> {
    let egress = snapshot.egress();
    let (target, service_entry) = match egress.decide(&source.namespace, dst, pick, context.learned)
    {
        EgressDecision::ServiceEntry { entry, target, .. } => (target, Some(entry)),
        EgressDecision::AllowAny => (dst, None),
        EgressDecision::Blocked(blocked) => return Err(blocked.into()),
    };
    let gateway = service_entry
        .as_ref()
        .and_then(|entry| waypoint_to_use(snapshot, entry.waypoint.as_ref(), source));
    if let Some(gateway) = gateway {
        let via = Via {
            service: None,
            pick,
        };
        return to_waypoint(snapshot, gateway, source, dst, via);
    }
    Ok(Route::Passthrough(PassthroughRoute {
        target: UpstreamAddr(target),
        destination: None,
        service: None,
        service_entry,
    }))
}

/// The waypoint to go through, unless there is none or `source` is that waypoint.
fn waypoint_to_use<'a>(
    snapshot: &Snapshot,
    waypoint: Option<&'a GatewayAddress>,
    source: &Workload,
) -> Option<&'a GatewayAddress> {
    waypoint.filter(|gateway| !snapshot.is_waypoint(gateway, source))
}

/// What the application addressed, for a tunnel through a waypoint.
struct Via {
    service: Option<Arc<Service>>,
    pick: u64,
}

fn to_waypoint(
    snapshot: &Snapshot,
    gateway: &GatewayAddress,
    source: &Workload,
    dialled: SocketAddr,
    via: Via,
) -> Result<Route, RouteError> {
    let waypoint = snapshot
        .resolve_waypoint(gateway, &source.network, dialled.is_ipv4(), via.pick)
        .ok_or_else(|| RouteError::NoWaypoint(gateway.destination.to_string()))?;
    Ok(Route::Hbone(HboneRoute {
        peer: UpstreamAddr(waypoint.address),
        authority: dialled,
        destination: waypoint.workload,
        service: via.service,
        expected_identities: waypoint.identities,
    }))
}

fn to_workload(
    workload: &Arc<Workload>,
    target_port: u16,
    service: Option<Arc<Service>>,
    source: &Workload,
    dialled: SocketAddr,
    hbone_port: u16,
) -> Result<Route, RouteError> {
    if workload.network != source.network {
        return Err(RouteError::OtherNetwork {
            uid: workload.uid.clone(),
            network: workload.network.clone(),
        });
    }
    // Prefer the address family the app used; a dual-stack pod is reachable either way.
    let ip = workload
        .workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == dialled.is_ipv4())
        .or_else(|| workload.workload_ips.first())
        .copied()
        .ok_or_else(|| RouteError::NoAddress(workload.uid.clone()))?;
    if workload.protocol == TunnelProtocol::Tcp {
        return Ok(Route::Passthrough(PassthroughRoute {
            target: UpstreamAddr(SocketAddr::new(ip, target_port)),
            destination: Some(workload.clone()),
            service,
            service_entry: None,
        }));
    }
    let mut expected_identities = vec![workload.identity.clone()];
    if let Some(service) = &service {
        expected_identities.extend(service.subject_alt_names.iter().cloned());
    }
    expected_identities.sort();
    expected_identities.dedup();
    Ok(Route::Hbone(HboneRoute {
        peer: UpstreamAddr(SocketAddr::new(ip, hbone_port)),
        authority: SocketAddr::new(ip, target_port),
        destination: workload.clone(),
        service,
        expected_identities,
    }))
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
