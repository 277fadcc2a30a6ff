//! Outbound (15001): connections an application in the pod made, redirected to us. Recovers the
//! original destination, decides the route, and sends the bytes over HBONE or plain TCP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::admission::{self, accept_loop, AdmissionError, Admitted, ListenerKind, Redirected};
use super::circuit::Breaker;
use super::pool::PooledTunnel;
use super::route::{self, HboneRoute, PassthroughRoute, Route};
use super::{copy, WorkloadProxy};
use crate::hbone::{self, Authority, ConnectRequest};
use crate::state::{Service, Workload};
use crate::telemetry::metrics::ByteCounters;
use crate::telemetry::protection::LimitReason;
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: std::net::TcpListener) {
    accept_loop(&proxy, listener, ListenerKind::Outbound, handle).await
}

/// One outbound connection; it holds its slot of the pod's cap (`admitted`) to the end.
///
/// Two phases, because an idle connection costs what its task holds: [`establish`] (route,
/// breaker, CONNECT exchange or upstream connect) runs boxed and its state is freed once the
/// connection stands; the task then keeps only the record and the copy ([`copy_established`]).
/// Not an `async fn`: an async fn keeps each argument twice in its state (as captured and as
/// moved into its body), for the connection's whole life; the block below uses its captures in
/// place.
pub(super) fn handle(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
) -> impl Future<Output = ()> + Send {
    let redirected = Redirected::new(&stream, peer);
    let span = tracing::info_span!(
        "outbound",
        id = %redirected.trace,
        src = %redirected.client,
        dst = %redirected.destination
    );
    let mut record = redirected.record(&proxy, Direction::Outbound);
    // Boxed until the connection stands: a capture moved out of keeps its space in the task.
    let setup = Box::new((stream, redirected));
    // One span around the whole task, so that the failure and the access log (the record's
    // drop) are logged inside it, and the task keeps it once.
    async move {
        // Moved into a local first: the box is freed here rather than with the task.
        let (stream, redirected) = {
            let setup = setup;
            *setup
        };
        let establish = Box::pin(establish(&proxy, stream, redirected, &mut record));
        // The copy is built in a block of its own and awaited after it: awaited inside the
        // `match`, the matched `Result` would keep its space (an `Established`) in the task
        // beside the copy's own for the connection's life.
        let copy = {
            let established = establish.await;
            match established {
                Ok(established) => {
                    record.connected();
                    Either::Left(copy_established(established, &record.bytes))
                }
                Err(error) => Either::Right(std::future::ready(Err(error))),
            }
        };
        let result = copy.await;
        if let Err(error) = result {
            record.fail(error.flag(), error);
        }
        drop(record);
        drop(admitted);
    }
    .instrument(span)
}

/// An outbound connection that stands: the app's socket, its other end, and the breaker slot
/// it holds while open.
enum Established {
    Hbone {
        stream: TcpStream,
        tunnel: PooledTunnel,
        breaker: Breaker,
    },
    Passthrough {
        stream: TcpStream,
        upstream: TcpStream,
        breaker: Breaker,
    },
}

/// Copies until both directions are done (or the DestinationRule's limits end it). The ends are
/// borrowed from `established`, which the future holds once (see [`handle`]).
// An async fn would keep its arguments twice (see above).
#[allow(clippy::manual_async_fn)]
fn copy_established(
    mut established: Established,
    bytes: &ByteCounters,
) -> impl Future<Output = Result<(), OutboundError>> + Send + '_ {
    async move {
        let copied = match &mut established {
            Established::Hbone {
                stream,
                tunnel,
                breaker,
            } => {
                let allowance = &tunnel.allowance;
                let (sent, received) = (&bytes.sent, &bytes.received);
                let copy = copy::tunnel(stream, &mut tunnel.stream, allowance, sent, received);
                breaker.bounded(copy, bytes).await
            }
            Established::Passthrough {
                stream,
                upstream,
                breaker,
            } => {
                // Boxed: its buffered copy is twice the tunnel's, and without the box every
                // HBONE connection's task would be as large as a passthrough one's.
                let copy = copy::bidirectional(stream, upstream, &bytes.sent, &bytes.received);
                breaker.bounded(Box::pin(copy), bytes).await
            }
        };
        copied.map_err(|error| AdmissionError::Copy(error).into())
    }
}

/// Why an outbound connection failed, beyond the reasons every handler shares.
#[derive(Debug, thiserror::Error)]
enum OutboundError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Route(#[from] route::RouteError),
    #[error(transparent)]
    Pool(#[from] super::pool::PoolError),
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
    #[error(transparent)]
    OverLimit(#[from] super::circuit::OverLimit),
    #[error("no connection within the DestinationRule's connectTimeout of {0:?}")]
    ConnectTimeout(std::time::Duration),
}

impl OutboundError {
    /// Istio's response flag for this failure.
    fn flag(&self) -> ResponseFlag {
        match self {
            OutboundError::Admission(error) => error.flag(),
            OutboundError::Pool(error) => error.flag(),
            OutboundError::Route(route::RouteError::EgressBlocked(_)) => {
                ResponseFlag::EgressBlocked
            }
            OutboundError::OverLimit(_) => ResponseFlag::Overflow,
            _ => ResponseFlag::Connect,
        }
    }
}

/// Decides the route and connects: the tunnel from the pool, or the upstream socket.
async fn establish(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    redirected: Redirected,
    record: &mut ConnectionRecord,
) -> Result<Established, OutboundError> {
    let (snapshot, source) = proxy.local_view()?;
    record.fields_mut().src_workload = Some(source.clone());
    let hbone_port = proxy.inputs.settings.proxy.hbone_port;
    let now = tokio::time::Instant::now();
    let circuit = &proxy.circuit;
    // The lookups live in this block only: they are not `Send`, and the task awaits below.
    let decision = {
        let ejected = |service: &Service, workload: &Workload| {
            circuit.is_ejected(&service.key(), &workload.uid, now)
        };
        let learned = |ip| proxy.learned.grants(ip, now);
        let context = route::RouteContext {
            ejected: &ejected,
            learned: &learned,
        };
        route::decide_avoiding(
            &snapshot,
            &source,
            redirected.destination,
            hbone_port,
            rand::random(),
            &context,
        )
    };
    let decision = refuse_blocked(proxy, &stream, decision)?;
    let port = redirected.destination.0.port();
    let breaker = Breaker::admit(&proxy.circuit, &snapshot, &source, &decision, port);
    drop(snapshot);
    let breaker = match breaker {
        Ok(breaker) => breaker,
        Err(over) => {
            admission::reset_on_close(&stream);
            let protection = proxy.inputs.metrics.protection();
            protection.limit_refused(LimitReason::MaxConnections);
            return Err(over.into());
        }
    };
    match decision {
        Route::Hbone(route) => {
            hbone_connection(proxy, stream, route, &source, redirected, record, breaker).await
        }
        Route::Passthrough(route) => {
            passthrough_connection(proxy, stream, route, record, breaker).await
        }
    }
}

async fn hbone_connection(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    route: HboneRoute,
    source: &Workload,
    Redirected { client, trace, .. }: Redirected,
    record: &mut ConnectionRecord,
    breaker: Breaker,
) -> Result<Established, OutboundError> {
    let HboneRoute {
        peer,
        authority,
        destination: target,
        service,
        expected_identities,
    } = route;
    // Identities are logged only for mTLS; dst.addr is the L4 peer, as Istio logs it.
    let fields = record.fields_mut();
    fields.src_identity = Some(source.identity.clone());
    fields.dst_workload = Some(target.clone());
    fields.dst_identity = Some(target.identity.clone());
    fields.dst_addr = peer.to_string().into();
    fields.dst_service = service.clone();
    fields.dst_hbone_addr = Some(authority.to_string().into());
    // The request and key live in this block only, so that their space is not kept through
    // the copy.
    let tunnel = {
        let request = ConnectRequest {
            authority: Authority::Address(authority),
            client,
            service_host: service.as_ref().map(|s| s.hostname.clone()),
            baggage: hbone::baggage(source),
            traceparent: trace,
        };
        let key = super::pool::PoolKey {
            source_identity: source.identity.clone(),
            expected_identities,
            peer,
            source_ip: client.0.ip(),
            shard: proxy.pool.shard(),
        };
        // Boxed: the CONNECT exchange's state would otherwise stay in this connection's task
        // for its whole life.
        let connect = Box::pin(proxy.pool.connect_tunnel(&key, &request));
        let result = match breaker.connect_timeout() {
            Some(limit) => match tokio::time::timeout(limit, connect).await {
                Ok(result) => result.map_err(OutboundError::from),
                Err(_) => Err(OutboundError::ConnectTimeout(limit)),
            },
            None => connect.await.map_err(OutboundError::from),
        };
        let reachable = match &result {
            Ok(_) => true,
            Err(OutboundError::Pool(error)) => error.refused_by_peer(),
            Err(_) => false,
        };
        breaker.report(&proxy.inputs.metrics, &target, reachable);
        result?
    };
    Ok(Established::Hbone {
        stream,
        tunnel,
        breaker,
    })
}

async fn passthrough_connection(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    PassthroughRoute {
        target,
        destination: known,
        service,
        service_entry: _,
    }: PassthroughRoute,
    record: &mut ConnectionRecord,
    breaker: Breaker,
) -> Result<Established, OutboundError> {
    let fields = record.fields_mut();
    fields.dst_workload = known.clone();
    fields.dst_service = service;
    let timeout = breaker
        .connect_timeout()
        .unwrap_or(proxy.inputs.settings.proxy.connect_timeout);
    let upstream = proxy
        .sockets
        .connect(target.0, None, crate::socket::Leg::Network, timeout)
        .await;
    if let Some(endpoint) = &known {
        breaker.report(&proxy.inputs.metrics, endpoint, upstream.is_ok());
    }
    let upstream = upstream?;
    breaker.keepalive(&upstream);
    Ok(Established::Passthrough {
        stream,
        upstream,
        breaker,
    })
}

/// Passes a route through; an egress refusal also resets the app's connection and is counted.
fn refuse_blocked(
    proxy: &WorkloadProxy,
    stream: &TcpStream,
    decision: Result<Route, route::RouteError>,
) -> Result<Route, route::RouteError> {
    if let Err(route::RouteError::EgressBlocked(blocked)) = &decision {
        admission::reset_on_close(stream);
        let protection = proxy.inputs.metrics.protection();
        protection.egress_refused(blocked.reason.label());
    }
    decision
}
