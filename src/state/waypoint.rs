//! Waypoint resolution over a [`Snapshot`] (layer L1, pure).
//!
//! A service or workload names its waypoint with a [`GatewayAddress`]: an address (the
//! waypoint workload at that IP) or `namespace/hostname` (a service of that hostname, whose
//! endpoints are the waypoint's workloads, else a workload with that hostname). The outbound
//! route uses [`Snapshot::resolve_waypoint`] to pick where to tunnel; inbound authorization uses
//! [`Snapshot::waypoint_identities`] to know who may deliver traffic to a protected workload.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{GatewayAddress, GatewayDestination, HealthStatus, Service, Snapshot, Workload};
use crate::net::NetworkAddress;
use crate::spiffe::Identity;

/// A waypoint chosen for one connection.
#[derive(Debug, Clone)]
pub struct ResolvedWaypoint {
    /// The waypoint workload that will receive the tunnel.
    pub workload: Arc<Workload>,
    /// Its HBONE listener.
    pub address: SocketAddr,
    /// The waypoint's service, when it was referenced by hostname and that named a service.
    pub service: Option<Arc<Service>>,
    /// Identities the waypoint may present (sorted, deduplicated): the workload's own plus the
    /// waypoint service's `subjectAltNames`.
    pub identities: Vec<Identity>,
}

impl Snapshot {
    /// Every workload the reference can resolve to, with the waypoint service if it named one.
    /// Unhealthy workloads are left out only for services (a workload named directly is used
    /// as it is, as Istio does).
    pub fn waypoint_candidates(
        &self,
        gateway: &GatewayAddress,
    ) -> (Vec<Arc<Workload>>, Option<Arc<Service>>) {
        match &gateway.destination {
            GatewayDestination::Address(address) => (
                self.workload_by_address(address)
                    .cloned()
                    .into_iter()
                    .collect(),
                None,
            ),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                if let Some(service) = self.service(&format!("{namespace}/{hostname}")) {
                    let workloads = self
                        .endpoints
                        .get(&service.key())
                        .map(|all| {
                            all.iter()
                                .filter(|workload| workload.status == HealthStatus::Healthy)
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    return (workloads, Some(service.clone()));
                }
                let mut workloads: Vec<Arc<Workload>> = self
                    .workloads
                    .values()
                    .filter(|w| &w.namespace == namespace && &w.hostname == hostname)
                    .cloned()
                    .collect();
                workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
                (workloads, None)
            }
        }
    }

    /// Picks the waypoint for a connection from `network`; `pick` load-balances among a
    /// waypoint service's endpoints and `prefer_v4` chooses the address family. `None` when the
    /// reference names nothing reachable (no workload, or none in `network`).
    pub fn resolve_waypoint(
        &self,
        gateway: &GatewayAddress,
        network: &str,
        prefer_v4: bool,
        pick: u64,
    ) -> Option<ResolvedWaypoint> {
        let (candidates, service) = self.waypoint_candidates(gateway);
        let candidates: Vec<Arc<Workload>> = candidates
            .into_iter()
            .filter(|workload| workload.network == network)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let workload = candidates[(pick % candidates.len() as u64) as usize].clone();
        let ip = match &gateway.destination {
            GatewayDestination::Address(address) => address.ip,
            GatewayDestination::Hostname { .. } => preferred_ip(&workload, prefer_v4)?,
        };
        // A waypoint service may map its HBONE port to another target port.
        let port = service
            .as_ref()
            .and_then(|service| service.ports.get(&gateway.hbone_mtls_port).copied())
            .filter(|port| *port != 0)
            .unwrap_or(gateway.hbone_mtls_port);
        let mut identities = vec![workload.identity.clone()];
        if let Some(service) = &service {
            identities.extend(service.subject_alt_names.iter().cloned());
        }
        identities.sort();
        identities.dedup();
        Some(ResolvedWaypoint {
            workload,
            address: SocketAddr::new(ip, port),
            service,
            identities,
        })
    }

    /// Whether `source` is (one of the workloads of) the waypoint `gateway` names: same identity
    /// and a shared IP, so that a workload merely sharing the service account does not count.
    pub fn is_waypoint(&self, gateway: &GatewayAddress, source: &Workload) -> bool {
        let (candidates, _) = self.waypoint_candidates(gateway);
        candidates.iter().any(|candidate| {
            candidate.identity == source.identity
                && candidate
                    .workload_ips
                    .iter()
                    .any(|ip| source.workload_ips.contains(ip))
        })
    }

    /// The waypoints protecting `workload`: its own, then those of the services it backs.
    pub fn waypoints_of(&self, workload: &Workload) -> Vec<GatewayAddress> {
        let mut waypoints: Vec<GatewayAddress> = workload.waypoint.iter().cloned().collect();
        for key in workload.services.keys() {
            if let Some(waypoint) = self.service(key).and_then(|s| s.waypoint.clone()) {
                if !waypoints.contains(&waypoint) {
                    waypoints.push(waypoint);
                }
            }
        }
        waypoints
    }

    /// Identities allowed to deliver traffic to `workload` when bypass protection is on: those
    /// of every waypoint in [`Snapshot::waypoints_of`] (sorted, deduplicated). Empty when the
    /// workload has no waypoint, or when its waypoints resolve to nothing.
    pub fn waypoint_identities(&self, workload: &Workload) -> Vec<Identity> {
        let mut identities = Vec::new();
        for gateway in self.waypoints_of(workload) {
            let (candidates, service) = self.waypoint_candidates(&gateway);
            identities.extend(candidates.iter().map(|w| w.identity.clone()));
            if let Some(service) = service {
                identities.extend(service.subject_alt_names.iter().cloned());
            }
        }
        identities.sort();
        identities.dedup();
        identities
    }

    /// Whether `local` is the waypoint of the service or workload at `address` (the inbound
    /// "sandwich" case: a waypoint pod receives traffic addressed to what it fronts).
    pub fn is_waypoint_for_address(&self, address: &NetworkAddress, local: &Workload) -> bool {
        if let Some(service) = self.service_by_vip(address) {
            if let Some(gateway) = &service.waypoint {
                return self.is_waypoint(gateway, local);
            }
        }
        self.workload_by_address(address)
            .and_then(|workload| workload.waypoint.as_ref())
            .is_some_and(|gateway| self.is_waypoint(gateway, local))
    }
}

fn preferred_ip(workload: &Workload, prefer_v4: bool) -> Option<IpAddr> {
    workload
        .workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == prefer_v4)
        .or_else(|| workload.workload_ips.first())
        .copied()
}
