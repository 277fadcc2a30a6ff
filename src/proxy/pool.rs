//! The HBONE client connection pool (layer L3), one per workload proxy.
//!
//! Connections are keyed by (source identity, expected destination identities, peer address,
//! source IP, data-plane shard) and never shared across keys, so a tunnel always carries
//! exactly the identity it was authenticated with. Concurrent first requests for a key share one
//! handshake (a per-key async lock), a connection carries at most `maxStreamsPerConnection`
//! streams before another is opened, and connections idle past `idleTimeout` are released.
//!
//! Streams are spread: one HTTP/2 connection is driven by one task, so however many streams it
//! carries, their bytes are framed, encrypted and decrypted on one core at a time. Unless
//! `spreadConnections` is set, each data-plane shard ([`crate::shard`]) keeps its own
//! connections, so a tunnel and the connection it rides on run on one thread and the shards
//! share the cores. Within a key, once every connection carries `spreadAbove` streams, the next
//! tunnel opens another connection (up to `spreadConnections`, or one per worker thread of the
//! pool's runtime) and new tunnels go to the least loaded. Only one such extra handshake runs
//! per key at a time, and tunnels never wait for it while an existing connection has room: it
//! is an optimisation, and a failed one falls back to sharing.

use crate::telemetry::ResponseFlag;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use super::budget::{ConnectionMemory, MemoryBudget, SendAllowance};
use crate::config::agent::PoolConfig;
use crate::hbone::client::{ClientConnection, ClientError};
use crate::hbone::stream::H2Stream;
use crate::hbone::{ConnectRequest, H2Settings};
use crate::identity::{CertificateError, CertificateManager};
use crate::net::UpstreamAddr;
use crate::socket::{Leg, SocketError, SocketFactory};
use crate::spiffe::Identity;

/// What makes two tunnels shareable on one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity our side presents.
    pub source_identity: Identity,
    /// Identities the peer may present; sorted and deduplicated by the caller.
    pub expected_identities: Vec<Identity>,
    /// The peer's HBONE address.
    pub peer: UpstreamAddr,
    /// The pod IP the connection originates from.
    pub source_ip: IpAddr,
    /// The data-plane shard of the tunnel ([`crate::shard::current`]): each shard drives its
    /// own connections, so a tunnel and its HTTP/2 connection run on one thread.
    pub shard: usize,
}

/// Errors getting a tunnel from the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// TCP connect to the peer failed.
    #[error("connect to HBONE peer: {0}")]
    Connect(#[from] SocketError),
    /// No certificate for the source identity.
    #[error("certificate for {identity}: {source}")]
    Certificate {
        /// The source identity.
        identity: Identity,
        /// Why.
        source: CertificateError,
    },
    /// TLS handshake failed (wrong peer identity, untrusted chain...).
    #[error("TLS handshake with {peer}: {source}")]
    Tls {
        /// The peer.
        peer: UpstreamAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS + HTTP/2 handshake did not finish in time.
    #[error("handshake with {0} timed out")]
    HandshakeTimeout(UpstreamAddr),
    /// The CONNECT request could not be built.
    #[error(transparent)]
    Request(#[from] crate::hbone::BuildError),
    /// HTTP/2 or the CONNECT exchange failed.
    #[error(transparent)]
    Hbone(#[from] ClientError),
}

impl PoolError {
    /// Istio's response flag for this failure (a 401 from the peer is its policy's denial).
    pub fn flag(&self) -> ResponseFlag {
        match self {
            PoolError::Connect(_) | PoolError::Request(_) => ResponseFlag::Connect,
            PoolError::Certificate { .. } => ResponseFlag::IdentityError,
            PoolError::Tls { .. } | PoolError::HandshakeTimeout(_) => ResponseFlag::TlsFailure,
            PoolError::Hbone(ClientError::Handshake(_)) => ResponseFlag::H2HandshakeFailure,
            PoolError::Hbone(ClientError::Status(status))
                if *status == http::StatusCode::UNAUTHORIZED =>
            {
                ResponseFlag::Deny
            }
            PoolError::Hbone(_) => ResponseFlag::Connect,
        }
    }

    /// Whether the peer answered the CONNECT with a refusal of its own (4xx: malformed,
    /// denied, rate limited): the endpoint is up, so outlier detection must not count this as
    /// a failed connect.
    pub fn refused_by_peer(&self) -> bool {
        matches!(self, PoolError::Hbone(ClientError::Status(status)) if status.is_client_error())
    }
}

/// Settings the pool needs.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Limits and idle timeout.
    pub pool: PoolConfig,
    /// HTTP/2 settings.
    pub h2: H2Settings,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// TLS + h2 handshake timeout.
    pub handshake_timeout: Duration,
}

#[derive(Debug)]
struct Pooled {
    connection: ClientConnection,
    /// The connection's share of the node's memory budget.
    memory: ConnectionMemory,
    streams: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
    /// The earlier expiry of our certificate and the peer's: after it the connection takes no
    /// new streams, so an expired certificate (a CA outage) fails closed instead of living on
    /// in the pool.
    valid_until: std::time::SystemTime,
}

#[derive(Debug, Default)]
struct KeyEntry {
    /// Serialises connection creation for the key.
    connecting: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Arc<Pooled>>>,
    /// After an extra connection failed, the key shares its connections until then instead of
    /// paying a failing connect per tunnel.
    spread_paused_until: Mutex<Option<Instant>>,
}

/// A connection just made, before it is pooled.
struct Established {
    connection: ClientConnection,
    memory: ConnectionMemory,
    valid_until: std::time::SystemTime,
}

/// How long a key shares its connections after an extra connection for it failed.
const SPREAD_PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(10);

impl KeyEntry {
    fn spread_paused(&self) -> bool {
        let paused = self
            .spread_paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        paused.is_some_and(|until| Instant::now() < until)
    }

    fn pause_spreading(&self) {
        *self
            .spread_paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + SPREAD_PAUSE_AFTER_FAILURE);
    }
}

/// Holds one stream slot of a pooled connection for as long as the tunnel lives. When the last
/// tunnel of a connection ends, the connection leaves the pool at once (so it closes) if the
/// pool keeps no idle connections (`idleTimeout: 0s`) or if its key already has another idle
/// one: a key keeps one idle connection for the next tunnel, and the extra connections a burst
/// opened do not sit for `idleTimeout` holding their TLS and HTTP/2 state (and the peer's) at
/// the burst's size.
struct StreamGuard {
    entry: Arc<KeyEntry>,
    pooled: Arc<Pooled>,
    keep_idle: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut connections = self
            .entry
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let left = self.pooled.streams.fetch_sub(1, Ordering::AcqRel) - 1;
        if left > 0 {
            return;
        }
        let another_idle = || {
            connections.iter().any(|pooled| {
                !Arc::ptr_eq(pooled, &self.pooled)
                    && pooled.streams.load(Ordering::Acquire) == 0
                    && !pooled.connection.is_closed()
            })
        };
        if !self.keep_idle || another_idle() {
            connections.retain(|pooled| !Arc::ptr_eq(pooled, &self.pooled));
        }
    }
}

/// A pool of HBONE client connections. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// What a key's connections offer a new tunnel.
enum Offer {
    /// A slot on a connection, taken.
    Slot(StreamGuard),
    /// A connection has room, but the key's connections are busy enough that the tunnel should
    /// go on a new one.
    Spread,
    /// No connection has room.
    Full,
}

#[derive(Debug)]
struct PoolInner {
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    /// `pool.spreadConnections`, resolved.
    spread_connections: usize,
    sockets: SocketFactory,
    certificates: Arc<CertificateManager>,
    settings: PoolSettings,
    budget: Arc<MemoryBudget>,
}

/// A tunnel from the pool, with the send allowance of the connection it runs on.
pub struct PooledTunnel {
    /// The CONNECT stream.
    pub stream: H2Stream,
    /// What the tunnel's reads from its app are charged to (see [`super::budget`]).
    pub allowance: SendAllowance,
}

impl Pool {
    /// A pool whose connections are made with `sockets` (the source pod's namespace), with no
    /// memory budget.
    pub fn new(
        sockets: SocketFactory,
        certificates: Arc<CertificateManager>,
        settings: PoolSettings,
    ) -> Self {
        Self::budgeted(sockets, certificates, settings, MemoryBudget::unlimited())
    }

    /// [`Pool::new`] whose connections reserve their windows from `budget`.
    pub fn budgeted(
        sockets: SocketFactory,
        certificates: Arc<CertificateManager>,
        settings: PoolSettings,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        let worker_threads = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or(1);
        let spread_connections = settings
            .pool
            .spread_connections
            .map_or(worker_threads, |connections| connections as usize);
        Pool {
            inner: Arc::new(PoolInner {
                keys: Mutex::new(HashMap::new()),
                spread_connections,
                sockets,
                certificates,
                settings,
                budget,
            }),
        }
    }

    /// The [`PoolKey::shard`] for a tunnel opened on this thread: its data-plane shard, unless
    /// `spreadConnections` is set, which bounds the connections per peer for the whole node.
    pub fn shard(&self) -> usize {
        if self.inner.settings.pool.spread_connections.is_some() {
            0
        } else {
            crate::shard::current()
        }
    }

    /// Opens a tunnel for `request` on a pooled connection for `key`, creating one if needed.
    /// A pooled connection that turns out to be unusable (GOAWAY, broken) is discarded and the
    /// request retried once on a fresh connection.
    pub async fn connect(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
    ) -> Result<H2Stream, PoolError> {
        Ok(self.connect_tunnel(key, request).await?.stream)
    }

    /// [`Pool::connect`], also giving the connection's send allowance.
    pub async fn connect_tunnel(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
    ) -> Result<PooledTunnel, PoolError> {
        let entry = self.entry(key);
        let mut fresh_attempted = false;
        loop {
            // Boxed: the handshake's state is large and would otherwise stay in the future of
            // every tunnel for its whole life, idle or not.
            let guard = match self.checkout(&entry, true) {
                Offer::Slot(guard) => guard,
                Offer::Spread => {
                    let (guard, fresh) = Box::pin(self.spread(key, &entry)).await?;
                    fresh_attempted |= fresh;
                    guard
                }
                Offer::Full => {
                    fresh_attempted = true;
                    Box::pin(self.checkout_or_create(key, &entry)).await?
                }
            };
            let connection = guard.pooled.connection.clone();
            match connection.connect(request.build()?).await {
                Ok(stream) => {
                    let allowance = guard.pooled.memory.send_allowance();
                    let stream = stream.with_guard(guard);
                    return Ok(PooledTunnel { stream, allowance });
                }
                Err(ClientError::Unusable(error)) if !fresh_attempted => {
                    tracing::debug!(%error, peer = %key.peer, "pooled HBONE connection unusable; retrying on a new one");
                    self.remove(&entry, &guard.pooled);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn entry(&self, key: &PoolKey) -> Arc<KeyEntry> {
        let mut keys = self.inner.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.entry(key.clone()).or_default().clone()
    }

    /// A stream slot on the least loaded live connection for the key, unless none has room or
    /// (with `spread`) the key should get another connection first. The slot is taken under the
    /// key's lock, so it cannot race with an idle release.
    fn checkout(&self, entry: &Arc<KeyEntry>, spread: bool) -> Offer {
        let settings = &self.inner.settings.pool;
        let max = settings.max_streams_per_connection as usize;
        let mut connections = entry.connections.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        connections.retain(|pooled| !pooled.connection.is_closed() && now < pooled.valid_until);
        let Some((pooled, streams)) = connections
            .iter()
            .map(|pooled| (pooled, pooled.streams.load(Ordering::Acquire)))
            .filter(|(_, streams)| *streams < max)
            .min_by_key(|(_, streams)| *streams)
        else {
            return Offer::Full;
        };
        if spread
            && streams >= settings.spread_above as usize
            && connections.len() < self.inner.spread_connections
            && !entry.spread_paused()
        {
            return Offer::Spread;
        }
        Offer::Slot(self.take_slot(entry, pooled.clone()))
    }

    /// A slot on a new connection for the key, or on an existing one when another connection
    /// is already being made for the key or the handshake fails. Says whether the connection is
    /// fresh.
    async fn spread(
        &self,
        key: &PoolKey,
        entry: &Arc<KeyEntry>,
    ) -> Result<(StreamGuard, bool), PoolError> {
        let Ok(_connecting) = entry.connecting.try_lock() else {
            return match self.checkout(entry, false) {
                Offer::Slot(guard) => Ok((guard, false)),
                // The existing connections filled up or closed meanwhile.
                Offer::Spread | Offer::Full => {
                    Ok((self.checkout_or_create(key, entry).await?, true))
                }
            };
        };
        // Another spread may have finished while we were getting here.
        if let Offer::Slot(guard) = self.checkout(entry, true) {
            return Ok((guard, false));
        }
        let error = match self.handshake(key).await {
            Ok(established) => return Ok((self.add(entry, established), true)),
            Err(error) => error,
        };
        entry.pause_spreading();
        match self.checkout(entry, false) {
            Offer::Slot(guard) => {
                tracing::debug!(%error, peer = %key.peer, "extra HBONE connection failed; sharing an existing one");
                Ok((guard, false))
            }
            Offer::Spread | Offer::Full => Err(error),
        }
    }

    fn take_slot(&self, entry: &Arc<KeyEntry>, pooled: Arc<Pooled>) -> StreamGuard {
        *pooled.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        pooled.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard {
            entry: entry.clone(),
            pooled,
            keep_idle: !self.inner.settings.pool.idle_timeout.is_zero(),
        }
    }

    /// Creates a connection for the key, unless one appeared meanwhile. Creation is serialised
    /// per key so that concurrent first requests share one handshake — except when connections
    /// carry one stream each, where nothing can be shared and waiting would only queue
    /// handshakes behind each other.
    async fn checkout_or_create(
        &self,
        key: &PoolKey,
        entry: &Arc<KeyEntry>,
    ) -> Result<StreamGuard, PoolError> {
        let _connecting = if self.inner.settings.pool.max_streams_per_connection > 1 {
            let connecting = entry.connecting.lock().await;
            // Someone may have created one while we waited for the lock.
            if let Offer::Slot(guard) = self.checkout(entry, false) {
                return Ok(guard);
            }
            Some(connecting)
        } else {
            None
        };
        let established = self.handshake(key).await?;
        Ok(self.add(entry, established))
    }

    /// Pools a new connection for the key and takes its first slot.
    fn add(&self, entry: &Arc<KeyEntry>, established: Established) -> StreamGuard {
        let Established {
            connection,
            memory,
            valid_until,
        } = established;
        let pooled = Arc::new(Pooled {
            connection,
            memory,
            streams: Arc::new(AtomicUsize::new(0)),
            last_used: Mutex::new(Instant::now()),
            valid_until,
        });
        let mut connections = entry.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.push(pooled.clone());
        self.take_slot(entry, pooled)
    }

    async fn handshake(&self, key: &PoolKey) -> Result<Established, PoolError> {
        let settings = &self.inner.settings;
        let certificate = self
            .inner
            .certificates
            .fetch(&key.source_identity)
            .await
            .map_err(|source| PoolError::Certificate {
                identity: key.source_identity.clone(),
                source,
            })?;
        let tcp = self
            .inner
            .sockets
            .connect(key.peer.0, None, Leg::Network, settings.connect_timeout)
            .await?;
        let connector = TlsConnector::from(certificate.client_config(&key.expected_identities));
        let handshake = async {
            let mut tls = connector
                .connect(
                    crate::tls::dummy_server_name(),
                    crate::tls::BatchedReads::new(tcp),
                )
                .await
                .map_err(|source| PoolError::Tls {
                    peer: key.peer,
                    source,
                })?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(crate::tls::SEND_BUFFER_LIMIT));
            let valid_until = crate::identity::connection_valid_until(
                &certificate,
                tls.get_ref().1.peer_certificates(),
            );
            // Reserved once the peer is proven, for the connection's whole life.
            let memory = self.inner.budget.reserve(settings.h2.connection_window);
            let connection =
                ClientConnection::handshake(tls, &memory.h2_settings(&settings.h2)).await?;
            Ok::<_, PoolError>(Established {
                connection,
                memory,
                valid_until,
            })
        };
        tokio::time::timeout(settings.handshake_timeout, handshake)
            .await
            .map_err(|_| PoolError::HandshakeTimeout(key.peer))?
    }

    fn remove(&self, entry: &KeyEntry, stale: &Arc<Pooled>) {
        entry
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|pooled| !Arc::ptr_eq(pooled, stale));
    }

    /// Drops connections that are closed, or idle (no streams) for longer than the idle timeout,
    /// and keys left with no connections. Returns how many connections were released.
    pub fn release_idle(&self) -> usize {
        let idle_timeout = self.inner.settings.pool.idle_timeout;
        let mut released = 0;
        let mut keys = self.inner.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|_, entry| {
            let mut connections = entry.connections.lock().unwrap_or_else(|p| p.into_inner());
            let before = connections.len();
            connections.retain(|pooled| {
                let idle = pooled.streams.load(Ordering::Acquire) == 0
                    && pooled
                        .last_used
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .elapsed()
                        >= idle_timeout;
                !(idle || pooled.connection.is_closed())
            });
            released += before - connections.len();
            // Keep an entry whose lock is held: a handshake for it is in progress.
            !connections.is_empty() || entry.connecting.try_lock().is_err()
        });
        released
    }

    /// Number of pooled connections (for the admin API and tests).
    pub fn connection_count(&self) -> usize {
        let keys = self.inner.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.values()
            .map(|entry| {
                entry
                    .connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len()
            })
            .sum()
    }

    /// Runs [`Pool::release_idle`] periodically until `stop` resolves.
    pub async fn run_idle_release(&self, stop: impl std::future::Future<Output = ()>) {
        let period = (self.inner.settings.pool.idle_timeout / 2).max(Duration::from_secs(1));
        let mut ticks = tokio::time::interval(period);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let released = self.release_idle();
                    if released > 0 {
                        tracing::debug!(released, "released idle HBONE connections");
                    }
                }
                _ = &mut stop => return,
            }
        }
    }
}
