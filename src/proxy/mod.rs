//! The data plane of one workload (layer L3): outbound (15001), inbound HBONE (15008) and
//! inbound plaintext (15006), plus the HBONE pool, the route decision and the byte copy.
//!
//! A [`WorkloadProxy`] serves exactly one local workload. Capture (L4) creates it with the
//! socket factory of the pod's network namespace and a drain scope of its own, binds its
//! listeners inside the pod, and drains it when the pod goes away. Each accept loop is short and
//! hands every connection to a named `handle` function in its own tracked task.

mod admission;
pub mod budget;
mod circuit;
mod connections;
pub mod copy;
pub mod explain;
mod inbound;
pub mod inbound_limits;
mod inbound_plaintext;
mod inbound_target;
pub mod limits;
mod outbound;
pub mod pool;
pub mod proxy_protocol;
pub mod route;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::config::agent::{PoolConfig, ProxyConfig};
use crate::drain::Drain;
use crate::hbone::H2Settings;
use crate::identity::CertificateManager;
use crate::net::{ports, ListenAddr};
use crate::socket::{Leg, SocketError, SocketFactory};
use crate::state::learned::LearnedDestinations;
use crate::state::StateStore;

/// Settings every workload proxy shares.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Data-plane section of the config.
    pub proxy: ProxyConfig,
    /// Pool section of the config.
    pub pool: PoolConfig,
}

/// What a workload proxy needs from the rest of the agent.
#[derive(Debug, Clone)]
pub struct ProxyInputs {
    /// The mesh model.
    pub state: Arc<StateStore>,
    /// Workload certificates.
    pub certificates: Arc<CertificateManager>,
    /// Shared settings.
    pub settings: Arc<ProxySettings>,
    /// Where connection records report their metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Node-wide counts of unauthenticated connections per source IP.
    pub sources: Arc<limits::SourceLimits>,
    /// The node-wide memory budget HBONE connections reserve their windows from.
    pub memory: Arc<budget::MemoryBudget>,
    /// The threads accepted connections are handed to.
    pub shards: Arc<crate::shard::Shards>,
}

/// The three listeners of a workload, bound inside its namespace, in as many copies as there
/// are data-plane shards.
///
/// Each shard accepts on its own copy (the copies of a port form a `SO_REUSEPORT` group, over
/// which the kernel spreads new connections), so a connection is mostly served on the thread
/// that accepted it: no wake-up of a second thread and no move of the socket between reactors
/// (two `epoll_ctl` calls), as with one accept loop handing every connection over. Only when
/// the accepting shard is busier than another does the connection move
/// ([`crate::shard::Shards::place`]).
#[derive(Debug)]
pub struct Listeners {
    copies: Vec<ListenerSet>,
}

/// One copy of a workload's listeners, not yet registered with the runtime that accepts on it.
#[derive(Debug)]
struct ListenerSet {
    /// 15001.
    outbound: std::net::TcpListener,
    /// 15006.
    inbound_plaintext: std::net::TcpListener,
    /// 15008.
    inbound: std::net::TcpListener,
}

impl Listeners {
    /// Binds `copies` (at least one) of the three listeners (wildcard, dual-stack where
    /// possible) with `sockets`: one per data-plane shard.
    pub fn bind(sockets: &SocketFactory, copies: usize) -> Result<Self, SocketError> {
        let wildcard = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let copies = (0..copies.max(1))
            .map(|_| {
                Ok(ListenerSet {
                    outbound: sockets.listen_std(wildcard(ports::OUTBOUND), true, Leg::InPod)?,
                    inbound_plaintext: sockets.listen_std(
                        wildcard(ports::INBOUND_PLAINTEXT),
                        true,
                        Leg::Network,
                    )?,
                    inbound: sockets.listen_std(wildcard(ports::HBONE), false, Leg::Network)?,
                })
            })
            .collect::<Result<_, SocketError>>()?;
        Ok(Listeners { copies })
    }
}

/// The proxy of one local workload.
#[derive(Debug)]
pub struct WorkloadProxy {
    inputs: ProxyInputs,
    workload_uid: String,
    sockets: SocketFactory,
    pool: pool::Pool,
    h2: H2Settings,
    drain: Drain,
    /// Open inbound connections, re-evaluated on every policy change.
    connections: Arc<connections::Connections>,
    /// This pod's unauthenticated connections, against `maxUnauthenticatedPerPod`.
    unauthenticated: Arc<limits::PodLimit>,
    /// DestinationRule limits and outlier detection for this pod's outbound connections.
    circuit: Arc<circuit::Circuit>,
    /// What the pod resolved through its DNS proxy under a ServiceEntry host (shared with the
    /// pod's DNS proxy, which fills it).
    learned: Arc<LearnedDestinations>,
    /// Per-source state of the `inboundLimits` rule for this workload.
    inbound_limiter: Arc<inbound_limits::InboundLimiter>,
}

impl WorkloadProxy {
    /// A proxy for the workload `workload_uid` whose sockets are made by `sockets` and whose
    /// tasks live in `drain`; `learned` is the pod's DNS-learned egress set.
    pub fn new(
        inputs: ProxyInputs,
        workload_uid: String,
        sockets: SocketFactory,
        drain: Drain,
        learned: Arc<LearnedDestinations>,
    ) -> Arc<Self> {
        let h2 = H2Settings::from(&inputs.settings.proxy);
        let pool = pool::Pool::budgeted(
            sockets.clone(),
            inputs.certificates.clone(),
            pool::PoolSettings {
                pool: inputs.settings.pool.clone(),
                h2: h2.clone(),
                connect_timeout: inputs.settings.proxy.connect_timeout,
                handshake_timeout: inputs.settings.proxy.handshake_timeout,
            },
            inputs.memory.clone(),
        );
        let connections = Arc::new(connections::Connections::new(inputs.metrics.clone()));
        let unauthenticated =
            limits::PodLimit::new(inputs.settings.proxy.max_unauthenticated_per_pod);
        Arc::new(WorkloadProxy {
            inputs,
            unauthenticated,
            workload_uid,
            sockets,
            pool,
            h2,
            drain,
            connections,
            circuit: Arc::default(),
            learned,
            inbound_limiter: Arc::default(),
        })
    }

    /// The pod's DNS-learned egress set (admin dump).
    pub fn learned(&self) -> &Arc<LearnedDestinations> {
        &self.learned
    }

    /// Starts the accept loops (each copy of the listeners on its own shard, see [`Listeners`])
    /// and the pool's idle release on the proxy's drain scope.
    pub fn spawn(self: &Arc<Self>, listeners: Listeners) {
        let drain = &self.drain;
        let local = |listener: &std::net::TcpListener| {
            listener
                .local_addr()
                .map(ListenAddr)
                .map(|addr| addr.to_string())
                .unwrap_or_default()
        };
        if let Some(first) = listeners.copies.first() {
            tracing::info!(
                workload = %self.workload_uid,
                outbound = %local(&first.outbound),
                inbound = %local(&first.inbound),
                inbound_plaintext = %local(&first.inbound_plaintext),
                copies = listeners.copies.len(),
                "workload proxy listening"
            );
        }
        // Subscribed before the first accept, so no change can slip past a new connection.
        drain.spawn(connections::run_reevaluation(
            self.connections.clone(),
            self.inputs.state.clone(),
            self.workload_uid.clone(),
            self.inputs.state.subscribe(),
            self.drain.clone(),
        ));
        let shards = self.inputs.shards.clone();
        for (index, copy) in listeners.copies.into_iter().enumerate() {
            let shard = shards.handles().get(index);
            spawn_on_shard(drain, shard, outbound::serve(self.clone(), copy.outbound));
            spawn_on_shard(drain, shard, inbound::serve(self.clone(), copy.inbound));
            spawn_on_shard(
                drain,
                shard,
                inbound_plaintext::serve(self.clone(), copy.inbound_plaintext),
            );
        }
        let pool = self.pool.clone();
        let stop = self.drain.clone();
        drain.spawn(async move { pool.run_idle_release(stop.draining()).await });
        drain.spawn(prune_learned(self.learned.clone(), self.drain.clone()));
    }

    /// The number of listener copies a proxy binds: one per data-plane shard.
    pub fn listener_copies(inputs: &ProxyInputs) -> usize {
        inputs.shards.handles().len().max(1)
    }

    /// Open inbound connections (HBONE streams and plaintext) under authorization (admin).
    pub fn inbound_connections(&self) -> usize {
        self.connections.len()
    }

    /// The pooled HBONE connections (admin, tests).
    pub fn pooled_connections(&self) -> usize {
        self.pool.connection_count()
    }
}

/// Drops the pod's expired learned addresses now and then, so that memory follows what is
/// still allowed even when the pod stops resolving (lookups never use an expired one anyway).
async fn prune_learned(learned: Arc<LearnedDestinations>, drain: Drain) {
    let period = learned
        .limits()
        .ttl_min
        .max(std::time::Duration::from_secs(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => learned.prune(tokio::time::Instant::now()),
            _ = drain.draining() => return,
        }
    }
}

/// Spawns `task` on `shard`, or on the caller's runtime when the shards are inline.
fn spawn_on_shard<F>(drain: &Drain, shard: Option<&Handle>, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match shard {
        Some(shard) => drain.spawn_on(shard, task),
        None => drain.spawn(task),
    };
}

#[cfg(test)]
mod task_size_tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, C, D, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle proxied connection costs what its task holds, for as long as it is open: this
    /// catches state that creeps into the long-lived part (setup state kept through the copy,
    /// arguments held twice). Debug-build sizes (552 and 360 B when written; release builds
    /// are about the same, and tokio's task cells around them 768 and 512 B), with a little room:
    /// past it, the task moves to a larger jemalloc class on every open connection.
    #[test]
    fn connection_tasks_stay_small() {
        let cases = [
            (
                "outbound connection",
                future_size(super::outbound::handle),
                640,
            ),
            (
                "inbound HBONE stream",
                future_size(super::inbound::handle_stream),
                448,
            ),
        ];
        for (task, size, limit) in cases {
            assert!(
                size <= limit,
                "the {task} task holds {size} B, more than {limit} B"
            );
        }
    }
}
