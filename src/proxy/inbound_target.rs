//! The inbound target check (layer L3, pure): whether a CONNECT's authority may be served by
//! this pod, and where inside the pod its bytes go.
//!
//! The HBONE handler (`proxy::inbound`) calls [`decide`] with the snapshot it also authorizes
//! on, after parsing the CONNECT and before authorization. An authority is served when it is:
//! - one of the pod's own addresses (delivered as asked);
//! - the VIP of a service, or the address of a workload, whose waypoint is this pod (the
//!   "sandwich": delivered to the pod's own IP at the same port);
//! - anything at all when the pod has an application tunnel (it terminates tunnels itself);
//! - a hostname of a service the pod backs (delivered to the pod's IP at the target port).
//!
//! Delivery never leaves the pod: an address that is none of the above (another pod's IP,
//! loopback, a VIP not fronted here) is an "ip mismatch", and a delivery port that is one of the
//! agent's own ports is refused so a tunnel can never loop into the agent.

use std::net::SocketAddr;

use crate::hbone::Authority;
use crate::net::{ports, NetworkAddress};
use crate::state::{ApplicationTunnelProtocol, Snapshot, Workload};

/// Where an admitted CONNECT's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delivery {
    /// The address the client asked for (the destination a PROXY header carries).
    pub(super) requested: SocketAddr,
    /// The address the agent connects to: always one of the local pod's own.
    pub(super) address: SocketAddr,
    /// Whether a PROXY v2 header precedes the bytes (application tunnel speaking PROXY).
    pub(super) proxy_header: bool,
}

/// Why a CONNECT's authority is not served by this pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum TargetError {
    /// The address is not the pod's, nor fronted by it as a waypoint (HTTP 400).
    #[error("ip mismatch: {requested} is not an address of {workload}")]
    IpMismatch {
        /// The IP the client asked for.
        requested: String,
        /// The local workload's uid.
        workload: String,
    },
    /// The hostname names no service this pod backs on that port (HTTP 503).
    #[error("hostname authority {0} does not name a service of this workload")]
    UnknownHostname(String),
    /// The local workload has no IP to deliver to (HTTP 503).
    #[error("the local workload {0} has no address to deliver to")]
    NoAddress(String),
    /// Delivery would reach one of the agent's own ports (HTTP 503). Carries the delivery
    /// address, which the access log still reports.
    #[error("target port {} is one of the agent's own ports", .0.port())]
    AgentPort(SocketAddr),
}

/// Decides whether `local` serves `authority` on `snapshot`, and where the bytes go.
pub(super) fn decide(
    snapshot: &Snapshot,
    local: &Workload,
    authority: &Authority,
) -> Result<Delivery, TargetError> {
    let requested = match authority {
        Authority::Address(address) => requested_address(snapshot, local, *address)?,
        Authority::Hostname { host, port } => requested_hostname(snapshot, local, host, *port)?,
    };
    let address = delivery_address(local, requested)?;
    if ports::is_agent_port(address.port()) {
        return Err(TargetError::AgentPort(address));
    }
    let proxy_header = local
        .application_tunnel
        .as_ref()
        .is_some_and(|tunnel| tunnel.protocol == ApplicationTunnelProtocol::Proxy);
    Ok(Delivery {
        requested,
        address,
        proxy_header,
    })
}

/// An address authority is served when it is the pod's own, when the pod terminates tunnels
/// itself, or when the pod is the waypoint of the service or workload at that address.
fn requested_address(
    snapshot: &Snapshot,
    local: &Workload,
    address: SocketAddr,
) -> Result<SocketAddr, TargetError> {
    let fronted = || {
        let network_address = NetworkAddress {
            network: local.network.clone(),
            ip: address.ip(),
        };
        snapshot.is_waypoint_for_address(&network_address, local)
    };
    if local.workload_ips.contains(&address.ip()) || local.application_tunnel.is_some() || fronted()
    {
        return Ok(address);
    }
    Err(TargetError::IpMismatch {
        requested: address.ip().to_string(),
        workload: local.uid.clone(),
    })
}

/// A hostname authority names a service the pod backs: the pod's first IP at the target port
/// (the pod's own mapping first, else the service's).
fn requested_hostname(
    snapshot: &Snapshot,
    local: &Workload,
    host: &str,
    port: u16,
) -> Result<SocketAddr, TargetError> {
    let target_port = local
        .services
        .iter()
        .filter_map(|(key, ports)| Some((snapshot.service(key)?, ports)))
        .filter(|(service, _)| service.hostname == host)
        .find_map(|(service, ports)| {
            let own = ports.get(&port).copied().filter(|p| *p != 0);
            own.or_else(|| service.ports.get(&port).copied().filter(|p| *p != 0))
        })
        .ok_or_else(|| TargetError::UnknownHostname(format!("{host}:{port}")))?;
    let ip = local
        .workload_ips
        .first()
        .copied()
        .ok_or_else(|| TargetError::NoAddress(local.uid.clone()))?;
    Ok(SocketAddr::new(ip, target_port))
}

/// Where the bytes go inside the pod: the requested address when it is the pod's own; for a
/// workload with an application tunnel (or a waypoint addressed for what it fronts), the pod's
/// own IP of the same family at the tunnel port, else at the requested port.
fn delivery_address(local: &Workload, requested: SocketAddr) -> Result<SocketAddr, TargetError> {
    let tunnel_port = local.application_tunnel.as_ref().and_then(|t| t.port);
    if tunnel_port.is_none() && local.workload_ips.contains(&requested.ip()) {
        return Ok(requested);
    }
    let ip = local
        .workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == requested.is_ipv4())
        .or_else(|| local.workload_ips.first())
        .copied()
        .ok_or_else(|| TargetError::NoAddress(local.uid.clone()))?;
    Ok(SocketAddr::new(ip, tunnel_port.unwrap_or(requested.port())))
}

#[cfg(test)]
mod tests;
