//! What every data-plane connection of a workload proxy goes through before its bytes move
//! (layer L3): the accept loop of each listener, the accept setup of the redirect listeners
//! (15001, 15006), the local and source workload lookups on one snapshot, authorization with
//! live re-evaluation, the original-source choice, and the errors all three handlers share.
//!
//! The handlers (`outbound`, `inbound`, `inbound_plaintext`) keep only what is their own: the
//! route, the TLS and CONNECT exchange, the target check. Checks that apply to every accepted
//! connection of a listener (connection caps per pod or per source) belong in [`accept_loop`];
//! checks that apply to every inbound connection once its target is known belong in
//! [`WorkloadProxy::admit_inbound`]: the per-source inbound limits (`inbound_limits`), then
//! authorization.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream};

use super::connections::{self, Denied, Registration, Revoked};
use super::inbound_limits::{InboundSlot, LimitRefusal, SourceKey};
use super::limits::Refusal;
pub(super) use super::limits::{Admitted, ListenerKind};
use super::WorkloadProxy;
use crate::authz::ConnectionFacts;
use crate::hbone::TraceParent;
use crate::net::{ClientAddr, NetworkAddress, OriginalDst};
use crate::state::{Snapshot, Workload};
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

/// Why a connection was refused or ended, for the reasons every handler shares. Each handler's
/// own error wraps it.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdmissionError {
    /// The connection targets one of the agent's own ports (15001/15006/15008), which would
    /// loop through the agent.
    #[error("target port {0} is one of the agent's own ports")]
    AgentPort(u16),
    /// The workload this proxy serves left the model (its proxy is about to be drained).
    #[error("the local workload {0} is not in the current configuration")]
    UnknownWorkload(String),
    /// A per-source inbound limit of the workload refused the connection.
    #[error(transparent)]
    Limited(LimitRefusal),
    /// Authorization refused the connection.
    #[error(transparent)]
    Denied(Denied),
    /// A policy change closed the connection while it was open.
    #[error(transparent)]
    Revoked(Revoked),
    /// Copying between the two ends failed.
    #[error("copy: {0}")]
    Copy(#[source] std::io::Error),
}

impl AdmissionError {
    /// Istio's response flag for this failure.
    pub(super) fn flag(&self) -> ResponseFlag {
        match self {
            AdmissionError::Denied(_) | AdmissionError::Revoked(_) => ResponseFlag::Deny,
            AdmissionError::Limited(refusal) => refusal.flag(),
            _ => ResponseFlag::Connect,
        }
    }
}

/// Accepts on `listener` until drain starts, spawning `handle` per connection in the proxy's
/// drain scope on the calling runtime (the listener's shard: a connection stays on the thread
/// that accepted it). A connection over the pod's or its source's cap of unauthenticated
/// connections is reset before any work; the others get their slot, to hold while they are
/// unauthenticated.
pub(super) async fn accept_loop<F, Fut>(
    proxy: &Arc<WorkloadProxy>,
    listener: std::net::TcpListener,
    kind: ListenerKind,
    handle: F,
) where
    F: Fn(Arc<WorkloadProxy>, TcpStream, SocketAddr, Admitted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = kind.name();
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            // Dropping it closes it, so the kernel stops giving it connections; the other
            // copies of the listener carry on.
            tracing::error!(workload = %proxy.workload_uid, listener = name, %error,
                "cannot register a listener copy; closing it");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = proxy.drain.draining() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let peer = crate::sys::canonical(peer);
                let admitted =
                    match proxy
                        .unauthenticated
                        .admit(&proxy.inputs.sources, kind, peer.ip())
                    {
                        Ok(admitted) => admitted,
                        Err(refusal) => {
                            refuse(proxy, stream, peer, kind, refusal);
                            continue;
                        }
                    };
                spawn_connection(proxy, stream, peer, admitted, kind, &handle);
            }
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs `handle` for an accepted connection in the proxy's drain scope until it ends or force
/// is sent: on the calling shard, unless [`crate::shard::Shards::place`] finds this shard too
/// busy, then on the least loaded one; on the calling runtime when the shards are inline.
fn spawn_connection<F, Fut>(
    proxy: &Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    kind: ListenerKind,
    handle: &F,
) where
    F: Fn(Arc<WorkloadProxy>, TcpStream, SocketAddr, Admitted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    use futures_util::FutureExt as _;
    let Some(load) = proxy.inputs.shards.place(kind.placement_slack()) else {
        let connection = handle(proxy.clone(), stream, peer, admitted);
        proxy.drain.spawn_until_forced(connection);
        return;
    };
    if load.index() == crate::shard::current() {
        let connection = handle(proxy.clone(), stream, peer, admitted);
        proxy
            .drain
            .spawn_until_forced(connection.map(move |()| drop(load)));
        return;
    }
    // A socket is polled by the reactor it was registered with: move it from this shard's to
    // the other's (registering from here is fine; it is the other shard that polls it).
    let moved = stream.into_std().and_then(|stream| {
        let _shard_context = load.handle().enter();
        TcpStream::from_std(stream)
    });
    match moved {
        Ok(stream) => {
            let shard = load.handle().clone();
            let connection = handle(proxy.clone(), stream, peer, admitted);
            proxy
                .drain
                .spawn_until_forced_on(&shard, connection.map(move |()| drop(load)));
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "accepted connection lost moving to another shard");
        }
    }
}

/// Resets a connection over a cap (RST: the client learns at once, and no FIN handshake keeps
/// the fd), counts it, and warns once per burst.
fn refuse(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    refusal: Refusal,
) {
    proxy
        .inputs
        .metrics
        .connection_refused(kind.name(), refusal.reason());
    if proxy.unauthenticated.first_refusal() {
        tracing::warn!(workload = %proxy.workload_uid, listener = kind.name(), %peer, %refusal,
            "refusing connections over the unauthenticated connection cap");
    } else {
        tracing::debug!(listener = kind.name(), %peer, %refusal, "connection refused");
    }
    reset_on_close(&stream);
    drop(stream);
}

/// Makes the close of `stream` a reset (SO_LINGER 0), so that the client learns at once that
/// its connection was refused instead of reading an orderly, empty end of stream.
pub(super) fn reset_on_close(stream: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(%error, "cannot set SO_LINGER 0; the refusal closes normally");
    }
}

/// A connection the pod's redirection rules sent to 15001 or 15006: who dialled, what they
/// dialled, and the trace id its logs carry.
#[derive(Debug, Clone)]
pub(super) struct Redirected {
    /// The dialling socket.
    pub(super) client: ClientAddr,
    /// The address the client dialled, before redirection.
    pub(super) destination: OriginalDst,
    /// A fresh trace id (a redirected connection starts a trace).
    pub(super) trace: TraceParent,
}

impl Redirected {
    /// Recovers the original destination of `stream`, accepted from `peer`.
    pub(super) fn new(stream: &TcpStream, peer: SocketAddr) -> Self {
        let local = || stream.local_addr().unwrap_or(peer);
        Redirected {
            client: ClientAddr(peer),
            destination: OriginalDst(crate::sys::original_destination(stream, local)),
            trace: TraceParent::random(),
        }
    }

    /// The connection's access-log record, carrying the trace id.
    pub(super) fn record(&self, proxy: &WorkloadProxy, direction: Direction) -> ConnectionRecord {
        let mut record = ConnectionRecord::new(
            &proxy.inputs.metrics,
            direction,
            self.client,
            self.destination,
        );
        record.fields_mut().trace = Some(self.trace.clone());
        record
    }
}

impl WorkloadProxy {
    /// One snapshot and the workload this proxy serves in it; inbound connections decide their
    /// target and authorization on this same snapshot.
    pub(super) fn local_view(&self) -> Result<(Arc<Snapshot>, Arc<Workload>), AdmissionError> {
        let snapshot = self.inputs.state.snapshot();
        let local = snapshot
            .workload(&self.workload_uid)
            .cloned()
            .ok_or_else(|| AdmissionError::UnknownWorkload(self.workload_uid.clone()))?;
        Ok((snapshot, local))
    }

    /// Admits an inbound connection to `local` with `facts`, decided on `snapshot`: first the
    /// workload's per-source limits (a source is the peer's identity, else its IP), then
    /// authorization, which registers it for re-evaluation on every later policy change. The
    /// returned admission must live as long as the connection.
    pub(super) fn admit_inbound(
        &self,
        snapshot: &Arc<Snapshot>,
        local: &Workload,
        facts: ConnectionFacts,
    ) -> Result<InboundAdmission, AdmissionError> {
        let source = match &facts.source_identity {
            Some(identity) => SourceKey::Identity(identity.clone()),
            None => SourceKey::Ip(facts.source_ip),
        };
        let slot = match snapshot.inbound_limits().for_workload(local) {
            Some(rule) => {
                let now = tokio::time::Instant::now();
                let admitted = self.inbound_limiter.admit(&rule.per_source, source, now);
                Some(admitted.map_err(|refusal| {
                    let protection = self.inputs.metrics.protection();
                    protection.limit_refused(refusal.reason());
                    AdmissionError::Limited(refusal)
                })?)
            }
            None => None,
        };
        let registration = connections::admit_on(
            &self.connections,
            &self.inputs.state,
            snapshot,
            local,
            facts,
        )
        .map_err(AdmissionError::Denied)?;
        Ok(InboundAdmission {
            registration,
            _slot: slot,
        })
    }

    /// The source IP of the agent's connection to the app: the client's own (original source),
    /// unless the setting is off or client and app share the pod (then the kernel picks).
    pub(super) fn original_source(&self, client: IpAddr, target: IpAddr) -> Option<IpAddr> {
        (self.inputs.settings.proxy.original_source && client != target).then_some(client)
    }
}

/// The workload at `ip` in the local workload's network, if the model knows it (telemetry).
pub(super) fn source_workload(
    snapshot: &Snapshot,
    local: &Workload,
    ip: IpAddr,
) -> Option<Arc<Workload>> {
    snapshot
        .workload_by_address(&NetworkAddress {
            network: local.network.clone(),
            ip,
        })
        .cloned()
}

/// An admitted inbound connection: its authorization registration and its place under the
/// workload's per-source limits, both given back when it is dropped with the connection.
#[derive(Debug)]
pub(super) struct InboundAdmission {
    registration: Registration,
    _slot: Option<InboundSlot>,
}

/// Drives `copy` until it ends or a policy change revokes the connection. Dropping the copy on
/// revocation closes both ends (an HBONE stream is reset). A plain future rather than a
/// `select!` over `copy` and a revocation wait: the task then keeps the copy once and no
/// waiter beside it, for as long as the connection is open.
pub(super) fn copy_until_revoked<F>(
    copy: F,
    admission: &InboundAdmission,
) -> CopyUntilRevoked<'_, F>
where
    F: Future<Output = std::io::Result<()>>,
{
    CopyUntilRevoked {
        copy,
        registration: &admission.registration,
    }
}

pin_project_lite::pin_project! {
    /// See [`copy_until_revoked`].
    pub(super) struct CopyUntilRevoked<'a, F> {
        #[pin]
        copy: F,
        registration: &'a Registration,
    }
}

impl<F> Future for CopyUntilRevoked<'_, F>
where
    F: Future<Output = std::io::Result<()>>,
{
    type Output = Result<(), AdmissionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(revoked) = this.registration.poll_revoked(cx) {
            return Poll::Ready(Err(AdmissionError::Revoked(revoked)));
        }
        this.copy.poll(cx).map_err(AdmissionError::Copy)
    }
}
