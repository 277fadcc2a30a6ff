//! The HBONE client connection pool (layer L3), one per workload proxy.
//!
//! Connections are keyed by (source identity, expected destination identities, peer address,
//! source IP) and never shared across keys, so a tunnel always carries exactly the identity it
//! was authenticated with. Concurrent first requests for a key share one handshake (a per-key
//! async lock), a connection carries at most `maxStreamsPerConnection` streams before another is
//! opened, and connections idle past `idleTimeout` are released.

use crate::telemetry::ResponseFlag;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::config::agent::PoolConfig;
use crate::hbone::client::{ClientConnection, ClientError};
use crate::hbone::stream::H2Stream;
use crate::hbone::{ConnectRequest, H2Settings};
use crate::identity::{CertificateError, CertificateManager};
use crate::net::UpstreamAddr;
use crate::socket::{SocketError, SocketFactory};
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
}

/// Holds one stream slot of a pooled connection for as long as the tunnel lives. When the last
/// tunnel of a connection ends and the pool keeps no idle connections (`idleTimeout: 0s`), the
/// connection leaves the pool at once, so it closes.
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
        if left == 0 && !self.keep_idle {
            connections.retain(|pooled| !Arc::ptr_eq(pooled, &self.pooled));
        }
    }
}

/// A pool of HBONE client connections. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    sockets: SocketFactory,
    certificates: Arc<CertificateManager>,
    settings: PoolSettings,
}

impl Pool {
    /// A pool whose connections are made with `sockets` (the source pod's namespace).
    pub fn new(
        sockets: SocketFactory,
        certificates: Arc<CertificateManager>,
        settings: PoolSettings,
    ) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                keys: Mutex::new(HashMap::new()),
                sockets,
                certificates,
                settings,
            }),
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
        let entry = self.entry(key);
        let mut fresh_attempted = false;
        loop {
            let guard = match self.checkout(&entry) {
                Some(guard) => guard,
                None => {
                    fresh_attempted = true;
                    // Boxed: the handshake's state is large and would otherwise stay in the
                    // future of every tunnel for its whole life, idle or not.
                    Box::pin(self.checkout_or_create(key, &entry)).await?
                }
            };
            let connection = guard.pooled.connection.clone();
            match connection.connect(request.build()?).await {
                Ok(stream) => return Ok(stream.with_guard(guard)),
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

    /// A stream slot on a live connection for the key, if one has a free slot. The slot is
    /// taken under the key's lock, so it cannot race with an idle release.
    fn checkout(&self, entry: &Arc<KeyEntry>) -> Option<StreamGuard> {
        let max = self.inner.settings.pool.max_streams_per_connection as usize;
        let mut connections = entry.connections.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        connections.retain(|pooled| !pooled.connection.is_closed() && now < pooled.valid_until);
        let pooled = connections
            .iter()
            .filter(|pooled| pooled.streams.load(Ordering::Acquire) < max)
            .min_by_key(|pooled| pooled.streams.load(Ordering::Acquire))?
            .clone();
        *pooled.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Some(self.take_slot(entry, pooled))
    }

    fn take_slot(&self, entry: &Arc<KeyEntry>, pooled: Arc<Pooled>) -> StreamGuard {
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
            if let Some(guard) = self.checkout(entry) {
                return Ok(guard);
            }
            Some(connecting)
        } else {
            None
        };
        let (connection, valid_until) = self.handshake(key).await?;
        let pooled = Arc::new(Pooled {
            connection,
            streams: Arc::new(AtomicUsize::new(0)),
            last_used: Mutex::new(Instant::now()),
            valid_until,
        });
        let mut connections = entry.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.push(pooled.clone());
        Ok(self.take_slot(entry, pooled))
    }

    async fn handshake(
        &self,
        key: &PoolKey,
    ) -> Result<(ClientConnection, std::time::SystemTime), PoolError> {
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
            .connect(key.peer.0, None, settings.connect_timeout)
            .await?;
        let connector = TlsConnector::from(certificate.client_config(&key.expected_identities));
        let handshake = async {
            let tls = connector
                .connect(
                    crate::tls::dummy_server_name(),
                    crate::tls::BatchedReads::new(tcp),
                )
                .await
                .map_err(|source| PoolError::Tls {
                    peer: key.peer,
                    source,
                })?;
            let valid_until = crate::identity::connection_valid_until(
                &certificate,
                tls.get_ref().1.peer_certificates(),
            );
            let connection = ClientConnection::handshake(tls, &settings.h2).await?;
            Ok::<_, PoolError>((connection, valid_until))
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
