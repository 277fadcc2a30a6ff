//! The outbound route decision (layer L3): pure, over one state snapshot.
//!
//! Given the source workload and the destination the application dialled, decide where the
//! bytes go: an HBONE tunnel to a mesh workload, or plain TCP passthrough. Randomness for load
//! balancing comes in as an argument so the decision stays a pure function.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::net::{ports, NetworkAddress, OriginalDst, UpstreamAddr};
use crate::spiffe::Identity;
use crate::state::{Service, Snapshot, TunnelProtocol, Workload};

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
    /// The CONNECT `:authority`: destination pod IP and *target* port.
    pub authority: SocketAddr,
    /// The workload the tunnel reaches.
    pub destination: Arc<Workload>,
    /// The service the application addressed, if it dialled a VIP.
    pub service: Option<Arc<Service>>,
    /// Identities the peer may present (sorted, deduplicated): the workload's and the service's
    /// `subjectAltNames`.
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
}

/// Decides the route for `destination` dialled by `source`. `pick` chooses among endpoints.
pub fn decide(
    snapshot: &Snapshot,
    source: &Workload,
    destination: OriginalDst,
    hbone_port: u16,
    pick: u64,
) -> Result<Route, RouteError> {
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
        let endpoints = snapshot.endpoints(service, dst.port());
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
        return to_workload(workload, dst.port(), None, source, dst, hbone_port);
    }
    Ok(Route::Passthrough(PassthroughRoute {
        target: UpstreamAddr(dst),
        destination: None,
        service: None,
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
