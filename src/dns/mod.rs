//! The DNS proxy of one captured pod (layer L3, beside `proxy`): UDP and TCP on port 15053
//! inside the pod's network namespace, on loopback (the pod's port-53 traffic is redirected
//! there by the agent's nftables rules in standalone mode, by istio-cni in Istio mode).
//!
//! A query for a mesh name (a service, a headless service's endpoints, a workload hostname) is
//! answered from the current `state::Snapshot`, relative to the pod the listener belongs to
//! (`answer`); anything else is forwarded to the upstream resolvers from inside the pod
//! (`forward`). The message-level decision is pure (`handler`, also the fuzz target's entry);
//! `server` runs the listeners in the pod's drain scope with per-pod bounds on forwarded
//! queries and TCP connections, so one flooding pod cannot starve the others.
//!
//! A relayed answer for a name that a ServiceEntry exported to the pod's namespace allows also
//! teaches the pod's egress check (`learn`, into `state::learned`): its addresses become
//! allowed destinations of that pod for the answer's clamped TTL.

mod answer;
mod forward;
mod handler;
pub mod learn;
mod server;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

pub use answer::Domains;
pub use forward::{check_answer, ForwardError};
pub use handler::{handle, Context, Forward, Handled, Transport, TTL};

use crate::config::dns::{DnsConfig, UpstreamsError};
use crate::drain::Drain;
use crate::socket::{Leg, SocketError, SocketFactory};
use crate::state::learned::{LearnedDestinations, LearnedLimits};
use crate::state::StateStore;
use crate::telemetry::Metrics;

/// The port of the DNS proxy in every pod.
pub const PORT: u16 = 15053;

/// Settings every pod's DNS proxy shares.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The cluster domain.
    pub domains: Domains,
    /// Where names outside the mesh go.
    pub upstreams: Arc<[SocketAddr]>,
    /// Deadline of one forwarded query.
    pub forward_timeout: Duration,
    /// Forwarded queries in flight per pod.
    pub max_forwards_per_pod: usize,
    /// Open TCP connections per pod.
    pub max_tcp_connections_per_pod: usize,
    /// Bounds of every pod's DNS-learned egress set.
    pub learned: LearnedLimits,
}

impl DnsSettings {
    /// Settings from the `agent.dns` section; reads resolv.conf when no upstream is listed.
    /// Without upstreams (an unreadable resolv.conf) mesh names still resolve and the rest
    /// get SERVFAIL, which beats taking every pod's DNS down: the problem is logged.
    pub fn from_config(config: &DnsConfig) -> Self {
        let upstreams = config
            .resolved_upstreams()
            .unwrap_or_else(|error: UpstreamsError| {
                tracing::error!(target: "dns", %error, "no upstream resolvers: names outside the mesh will fail");
                Vec::new()
            });
        DnsSettings {
            domains: Domains::new(&config.cluster_domain),
            upstreams: upstreams.into(),
            forward_timeout: config.forward_timeout,
            max_forwards_per_pod: usize::try_from(config.max_forwards_per_pod).unwrap_or(64),
            max_tcp_connections_per_pod: usize::try_from(config.max_tcp_connections_per_pod)
                .unwrap_or(32),
            learned: config.learned_limits(),
        }
    }
}

/// What a pod's DNS proxy needs from the rest of the agent.
#[derive(Debug, Clone)]
pub struct DnsInputs {
    /// The mesh model.
    pub state: Arc<StateStore>,
    /// Where the `istio_dns_*` metrics go.
    pub metrics: Arc<Metrics>,
    /// Shared settings.
    pub settings: Arc<DnsSettings>,
}

/// The sockets of one pod's DNS proxy: 127.0.0.1:15053 and, where the pod has IPv6 loopback,
/// [::1]:15053, each UDP and TCP. Loopback only: the proxy must not be an open resolver on
/// the pod's own address.
#[derive(Debug)]
pub struct DnsListeners {
    /// One UDP socket per loopback address.
    pub udp: Vec<UdpSocket>,
    /// One TCP listener per loopback address.
    pub tcp: Vec<TcpListener>,
}

impl DnsListeners {
    /// Binds the listeners with `sockets` (call on a thread inside the pod's namespace).
    pub fn bind(sockets: &SocketFactory) -> Result<Self, SocketError> {
        Self::bind_port(sockets, PORT)
    }

    /// [`DnsListeners::bind`] on another port (tests bind port 0).
    pub fn bind_port(sockets: &SocketFactory, port: u16) -> Result<Self, SocketError> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let mut listeners = DnsListeners {
            udp: vec![sockets.udp_bind(v4)?],
            tcp: vec![sockets.listen(v4, false, Leg::InPod)?],
        };
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        // A pod without IPv6 (disabled, or no ::1 on lo) simply has no v6 listener.
        match (sockets.udp_bind(v6), sockets.listen(v6, false, Leg::InPod)) {
            (Ok(udp), Ok(tcp)) => {
                listeners.udp.push(udp);
                listeners.tcp.push(tcp);
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(target: "dns", %error, "no IPv6 loopback DNS listener");
            }
        }
        Ok(listeners)
    }

    /// The bound addresses, UDP first (logs, tests).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let udp = self
            .udp
            .iter()
            .filter_map(|socket| socket.local_addr().ok());
        let tcp = self
            .tcp
            .iter()
            .filter_map(|listener| listener.local_addr().ok());
        udp.chain(tcp).collect()
    }
}

/// The DNS proxy of one pod.
#[derive(Debug)]
pub struct DnsProxy {
    inputs: DnsInputs,
    workload_uid: String,
    forwarder: forward::Forwarder,
    /// Permits for forwarded queries in flight.
    forwards: Arc<Semaphore>,
    /// Permits for open TCP connections.
    tcp_connections: Arc<Semaphore>,
    drain: Drain,
    rotation: AtomicUsize,
    /// The pod's DNS-learned egress set, shared with its workload proxy.
    learned: Arc<LearnedDestinations>,
}

impl DnsProxy {
    /// The proxy of workload `workload_uid`, forwarding with `sockets` (the pod's factory), its
    /// tasks in `drain` (the pod's scope), teaching `learned` (the pod's egress set).
    pub fn new(
        inputs: DnsInputs,
        workload_uid: String,
        sockets: SocketFactory,
        drain: Drain,
        learned: Arc<LearnedDestinations>,
    ) -> Arc<Self> {
        let settings = &inputs.settings;
        let forwarder = forward::Forwarder::new(
            sockets,
            settings.upstreams.clone(),
            settings.forward_timeout,
        );
        Arc::new(DnsProxy {
            forwards: Arc::new(Semaphore::new(settings.max_forwards_per_pod)),
            tcp_connections: Arc::new(Semaphore::new(settings.max_tcp_connections_per_pod)),
            forwarder,
            workload_uid,
            inputs,
            drain,
            rotation: AtomicUsize::new(0),
            learned,
        })
    }

    /// Starts serving `listeners` in the proxy's drain scope.
    pub fn spawn(self: &Arc<Self>, listeners: DnsListeners) {
        tracing::info!(
            target: "dns",
            workload = %self.workload_uid,
            addresses = ?listeners.addresses(),
            "DNS proxy listening"
        );
        for socket in listeners.udp {
            self.drain
                .spawn(server::serve_udp(self.clone(), Arc::new(socket)));
        }
        for listener in listeners.tcp {
            self.drain.spawn(server::serve_tcp(self.clone(), listener));
        }
    }
}

#[cfg(test)]
mod tests;
