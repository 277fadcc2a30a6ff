//! Inbound HBONE (15008): mTLS with the pod's own certificate, then one CONNECT stream per
//! tunnelled connection. A stream is answered 200 only after the upstream connect to the app
//! succeeded; 400 for a malformed request or an authority that is not this pod; 429 when the
//! workload's per-source inbound limits refuse it; 401 when authorization denies it (both
//! decided after the target is resolved, before connecting to the app); 503 when the target is
//! an agent port or the app cannot be reached. Errors stay inside their
//! stream. A stream that a policy change denies later is reset ("policy changed").
//!
//! Waypoints: a local workload that is the waypoint of a service or workload also accepts
//! authorities naming them ("sandwich"), and so does a workload with an `applicationTunnel`.
//! Delivery always stays inside the pod: to the tunnel port (or the target port) on the pod's
//! own IP, prefixed with a PROXY v2 header when the tunnel protocol is PROXY. A workload behind
//! a waypoint refuses peers other than its waypoint (authorization, `WaypointBypass`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::admission::{
    self, accept_loop, AdmissionError, Admitted, InboundAdmission, ListenerKind,
};
use super::budget::SendAllowance;
use super::inbound_target::{self, TargetError};
use super::{copy, WorkloadProxy};
use crate::authz::ConnectionFacts;
use crate::hbone::stream::H2Stream;
use crate::hbone::{self, Authority, TraceParent};
use crate::net::ClientAddr;
use crate::spiffe::Identity;
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: std::net::TcpListener) {
    accept_loop(&proxy, listener, ListenerKind::Hbone, handle).await
}

/// Why an HBONE connection (as a whole) could not be served.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("no certificate for {identity}: {source}")]
    Certificate {
        identity: Identity,
        source: crate::identity::CertificateError,
    },
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Server(#[from] hbone::server::ServerError),
}

async fn handle(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
) {
    let span = tracing::debug_span!("inbound_hbone", peer = %peer);
    if let Err(error) = serve_connection(proxy, stream, ClientAddr(peer), admitted)
        .instrument(span)
        .await
    {
        // Refused handshakes are routine (scanners, wrong roots); the peer address says who.
        tracing::warn!(peer = %peer, %error, "HBONE connection refused");
    }
}

/// One HBONE connection. It counts against the unauthenticated caps (`admitted`) until its
/// TLS handshake has proved the peer.
async fn serve_connection(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: ClientAddr,
    admitted: Admitted,
) -> Result<(), ConnectionError> {
    // One deadline from accept to the first stream: certificate, TLS and HTTP/2 preface share
    // it, so a client that sends nothing holds its fds for this long at most, whatever the
    // certificate source is doing.
    let deadline = tokio::time::Instant::now() + proxy.inputs.settings.proxy.handshake_timeout;
    let (_, local) = proxy.local_view()?;
    let certificate =
        tokio::time::timeout_at(deadline, proxy.inputs.certificates.fetch(&local.identity))
            .await
            .map_err(|_| ConnectionError::HandshakeTimeout)?
            .map_err(|source| ConnectionError::Certificate {
                identity: local.identity.clone(),
                source,
            })?;
    let acceptor = TlsAcceptor::from(certificate.server_config());
    let transport = crate::tls::BatchedReads::new(stream);
    let mut tls = tokio::time::timeout_at(deadline, acceptor.accept(transport))
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)?
        .map_err(ConnectionError::Tls)?;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(crate::tls::SEND_BUFFER_LIMIT));
    drop(admitted);
    // Reserved once the peer is proven, for the connection's whole life.
    let memory = proxy.inputs.memory.reserve(proxy.h2.connection_window);
    let allowance = memory.send_allowance();
    let peer_identity = crate::tls::peer_identity(tls.get_ref().1);
    let valid_until =
        crate::identity::connection_valid_until(&certificate, tls.get_ref().1.peer_certificates());
    tracing::debug!(peer_identity = ?peer_identity.as_ref().map(ToString::to_string), "HBONE connection established");
    let stream_proxy = proxy.clone();
    let limits = hbone::server::ConnectionLimits {
        first_stream_by: deadline,
        valid_until: Some(valid_until),
    };
    hbone::server::serve_until(
        tls,
        &memory.h2_settings(&proxy.h2),
        &proxy.drain,
        limits,
        move |request, respond| {
            let client = (peer, peer_identity.clone(), allowance.clone());
            handle_stream(stream_proxy.clone(), client, request, respond)
        },
    )
    .await?;
    // Held until here: stream tasks outliving the connection keep only their allowance.
    drop(memory);
    Ok(())
}

/// Why a CONNECT stream was refused; each maps to the HTTP status Istio's agents use.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    BadRequest(#[from] hbone::RequestError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("connect to the application: {0}")]
    Upstream(#[source] crate::socket::SocketError),
    #[error("the client reset the stream ({0}) before it was answered")]
    Reset(h2::Reason),
    #[error("sending the response: {0}")]
    Respond(#[source] h2::Error),
}

impl StreamError {
    /// Istio's response flag for this failure.
    fn flag(&self) -> ResponseFlag {
        match self {
            StreamError::Admission(error) => error.flag(),
            _ => ResponseFlag::Connect,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            StreamError::BadRequest(error) => error.status(),
            StreamError::Target(TargetError::IpMismatch { .. }) => StatusCode::BAD_REQUEST,
            StreamError::Target(_)
            | StreamError::Admission(
                AdmissionError::AgentPort(_) | AdmissionError::UnknownWorkload(_),
            )
            | StreamError::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            StreamError::Admission(AdmissionError::Denied(_)) => StatusCode::UNAUTHORIZED,
            StreamError::Admission(AdmissionError::Limited(_)) => StatusCode::TOO_MANY_REQUESTS,
            StreamError::Reset(_)
            | StreamError::Respond(_)
            | StreamError::Admission(AdmissionError::Copy(_) | AdmissionError::Revoked(_)) => {
                StatusCode::OK
            }
        }
    }
}

/// One CONNECT stream. Not an `async fn`: everything taken from the request happens before the
/// task's first poll, so the task keeps neither the request head nor a second copy of the record
/// (an async fn's arguments and moved-from locals keep their space for the task's whole life,
/// which is what an idle tunnel costs). What only the checks and the answer need (the peer, the
/// target, the request body before it becomes the tunnel, the `SendResponse`) is boxed and goes
/// with [`open`]'s future once the stream is answered: an open tunnel's task keeps its record,
/// the app's socket, its admission and the tunnel's two halves.
pub(super) fn handle_stream(
    proxy: Arc<WorkloadProxy>,
    (peer, peer_identity, allowance): (ClientAddr, Option<Identity>, SendAllowance),
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> impl std::future::Future<Output = ()> + Send {
    let parsed = hbone::parse_connect(&request);
    let trace = parsed
        .as_ref()
        .ok()
        .and_then(|p| p.traceparent.clone())
        .unwrap_or_else(TraceParent::random);
    let authority = request.uri().to_string();
    let span = tracing::info_span!("inbound", id = %trace, peer = %peer);
    let mut record =
        ConnectionRecord::new(&proxy.inputs.metrics, Direction::Inbound, peer, &authority);
    let fields = record.fields_mut();
    fields.trace = Some(trace);
    fields.src_identity = peer_identity.clone();
    fields.dst_hbone_addr = Some(authority.into());
    let stream = Box::new(Stream {
        peer,
        peer_identity,
        target: parsed.map(|parsed| parsed.authority),
        body: request.into_body(),
        respond,
    });
    async move {
        // Matched in the `let`: the `Result` is a temporary, so its space is not kept in the
        // task beside the parts taken out of it.
        let (mut upstream, admission, mut tunnel) =
            match Box::pin(open(&proxy, stream, &mut record)).await {
                Ok(opened) => opened,
                Err(error) => return record.fail(error.flag(), error),
            };
        record.connected();
        // Downstream is the tunnel here: bytes from the app's socket are the ones received.
        // Boxed: inline, it would take the stream's task to the next jemalloc class, which
        // costs more than the box (128 B).
        let copy = Box::pin(copy::tunnel(
            &mut upstream,
            &mut tunnel,
            &allowance,
            &record.bytes.received,
            &record.bytes.sent,
        ));
        // Dropping the copy on revocation resets the stream (h2 CANCEL) and closes the app
        // socket.
        if let Err(error) = admission::copy_until_revoked(copy, &admission).await {
            let error = StreamError::from(error);
            record.fail(error.flag(), error);
        }
    }
    .instrument(span)
}

/// What a CONNECT stream's checks and answer need, and nothing after.
struct Stream {
    peer: ClientAddr,
    peer_identity: Option<Identity>,
    target: Result<Authority, hbone::RequestError>,
    body: RecvStream,
    respond: SendResponse<Bytes>,
}

/// Checks the target, authorizes, connects to the app and answers 200; answers the failure
/// instead when one of these fails (a reset from the client is not answered). A reset from the
/// client before the answer abandons the checks and the connect (rapid reset must not turn into
/// work for the agent). Returns what the copy needs: the app's socket, the admission (its
/// registration for re-evaluation) and the tunnel.
async fn open(
    proxy: &WorkloadProxy,
    stream: Box<Stream>,
    record: &mut ConnectionRecord,
) -> Result<(TcpStream, InboundAdmission, H2Stream), StreamError> {
    let Stream {
        peer,
        peer_identity,
        target,
        body,
        mut respond,
    } = *stream;
    let checked = match &target {
        Ok(authority) => {
            let client = (&peer, &peer_identity);
            let prepare = prepare(proxy, client, authority, record);
            hbone::server::until_reset(&mut respond, prepare)
                .await
                .map_err(StreamError::Reset)
                .and_then(|prepared| prepared)
        }
        Err(error) => Err(StreamError::from(error.clone())),
    };
    let answered = checked.and_then(|(upstream, admission)| {
        let send = respond
            .send_response(Response::new(()), false)
            .map_err(StreamError::Respond)?;
        Ok((upstream, admission, H2Stream::new(send, body)))
    });
    if let Err(error) = &answered {
        if !matches!(error, StreamError::Reset(_) | StreamError::Respond(_)) {
            hbone::server::reject(respond, error.status());
        }
    }
    answered
}

/// Everything before the answer: the target check, the per-source limits and authorization
/// (registering the stream for re-evaluation), the connect to the app and its PROXY header.
async fn prepare(
    proxy: &WorkloadProxy,
    (peer, peer_identity): (&ClientAddr, &Option<Identity>),
    authority: &Authority,
    record: &mut ConnectionRecord,
) -> Result<(TcpStream, InboundAdmission), StreamError> {
    let (snapshot, local) = proxy.local_view()?;
    let fields = record.fields_mut();
    fields.dst_workload = Some(local.clone());
    fields.dst_identity = Some(local.identity.clone());
    fields.src_workload = admission::source_workload(&snapshot, &local, peer.0.ip());
    let delivery = inbound_target::decide(&snapshot, &local, authority).inspect_err(|error| {
        if let TargetError::AgentPort(address) = error {
            record.fields_mut().dst_addr = address.to_string().into();
        }
    })?;
    let target = delivery.address;
    record.fields_mut().dst_addr = target.to_string().into();
    let facts = ConnectionFacts {
        source_identity: peer_identity.clone(),
        source_ip: peer.0.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let admission = proxy.admit_inbound(&snapshot, &local, facts)?;
    drop(snapshot);
    // Original source: the app sees the HBONE peer's IP (proven by the connection, unlike the
    // client-supplied `forwarded` header), unless client and app share the pod.
    let source_ip = proxy.original_source(peer.0.ip(), target.ip());
    let timeout = proxy.inputs.settings.proxy.connect_timeout;
    let mut upstream = proxy
        .sockets
        .connect(target, source_ip, crate::socket::Leg::InPod, timeout)
        .await
        .map_err(StreamError::Upstream)?;
    if delivery.proxy_header {
        let header =
            super::proxy_protocol::encode_v2(peer.0, delivery.requested, peer_identity.as_ref());
        upstream
            .write_all(&header)
            .await
            .map_err(AdmissionError::Copy)?;
    }
    Ok((upstream, admission))
}
