//! Outbound (15001): connections an application in the pod made, redirected to us. Recovers the
//! original destination, decides the route, and sends the bytes over HBONE or plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::admission::{accept_loop, AdmissionError, Admitted, ListenerKind, Redirected};
use super::route::{self, HboneRoute, PassthroughRoute, Route};
use super::{copy, WorkloadProxy};
use crate::hbone::{self, Authority, ConnectRequest};
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: TcpListener) {
    accept_loop(&proxy, listener, ListenerKind::Outbound, handle).await
}

/// One outbound connection; it holds its slot of the pod's cap (`_admitted`) to the end.
async fn handle(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    _admitted: Admitted,
) {
    let redirected = Redirected::new(&stream, peer);
    let span = tracing::info_span!(
        "outbound",
        id = %redirected.trace,
        src = %redirected.client,
        dst = %redirected.destination
    );
    let mut record = redirected.record(&proxy, Direction::Outbound);
    // No inner `async move`: moving the record into one would keep its space twice in this
    // task (an async fn's moved-from locals keep their storage) for the connection's life.
    let result = proxy_connection(&proxy, stream, redirected, &mut record)
        .instrument(span.clone())
        .await;
    // The failure and the access log (the record's drop) are logged inside the span.
    let _in_span = span.enter();
    if let Err(error) = result {
        record.fail(error.flag(), error);
    }
    drop(record);
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
            _ => ResponseFlag::Connect,
        }
    }
}

async fn proxy_connection(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    Redirected {
        client,
        destination,
        trace,
    }: Redirected,
    record: &mut ConnectionRecord,
) -> Result<(), OutboundError> {
    let (snapshot, source) = proxy.local_view()?;
    record.src_workload = Some(source.clone());
    let hbone_port = proxy.inputs.settings.proxy.hbone_port;
    let decision = route::decide(&snapshot, &source, destination, hbone_port, rand::random());
    drop(snapshot);
    let decision = refuse_blocked(proxy, &stream, decision)?;
    match decision {
        Route::Hbone(route) => {
            let HboneRoute {
                peer,
                authority,
                destination: target,
                service,
                expected_identities,
            } = route;
            // Identities are logged only for mTLS; dst.addr is the L4 peer, as Istio logs it.
            record.src_identity = Some(source.identity.clone());
            record.dst_workload = Some(target.clone());
            record.dst_identity = Some(target.identity.clone());
            record.dst_addr = peer.to_string();
            record.dst_service = service.clone();
            record.dst_hbone_addr = Some(authority.to_string());
            // The request and key live in this block only, so that their space is not kept
            // through the copy.
            let tunnel = {
                let request = ConnectRequest {
                    authority: Authority::Address(authority),
                    client,
                    service_host: service.as_ref().map(|s| s.hostname.clone()),
                    baggage: hbone::baggage(&source),
                    traceparent: trace,
                };
                let key = super::pool::PoolKey {
                    source_identity: source.identity.clone(),
                    expected_identities,
                    peer,
                    source_ip: client.0.ip(),
                };
                // Boxed: the CONNECT exchange's state would otherwise stay in this
                // connection's task for its whole life.
                Box::pin(proxy.pool.connect(&key, &request)).await?
            };
            record.connected();
            copy::tunnel(stream, tunnel, &record.bytes.sent, &record.bytes.received)
                .await
                .map_err(|error| AdmissionError::Copy(error).into())
        }
        Route::Passthrough(PassthroughRoute {
            target,
            destination: known,
            service,
            service_entry: _,
        }) => {
            record.dst_workload = known;
            record.dst_service = service;
            let timeout = proxy.inputs.settings.proxy.connect_timeout;
            let upstream = proxy.sockets.connect(target.0, None, timeout).await?;
            record.connected();
            copy::bidirectional(stream, upstream, &record.bytes.sent, &record.bytes.received)
                .await
                .map_err(|error| AdmissionError::Copy(error).into())
        }
    }
}

/// Passes a route through; an egress refusal also resets the app's connection and is counted.
fn refuse_blocked(
    proxy: &WorkloadProxy,
    stream: &TcpStream,
    decision: Result<Route, route::RouteError>,
) -> Result<Route, route::RouteError> {
    if let Err(route::RouteError::EgressBlocked(_)) = &decision {
        refuse(stream);
        let protection = proxy.inputs.metrics.protection();
        protection.egress_refused("registry_only");
    }
    decision
}

/// Makes the close of `stream` a reset (SO_LINGER 0), so that the application learns at once
/// that its connection was refused instead of reading an orderly, empty end of stream.
fn refuse(stream: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(%error, "cannot set SO_LINGER 0; the refusal closes normally");
    }
}
