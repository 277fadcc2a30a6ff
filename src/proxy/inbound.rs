//! Inbound HBONE (15008): mTLS with the pod's own certificate, then one CONNECT stream per
//! tunnelled connection. A stream is answered 200 only after the upstream connect to the app
//! succeeded; 400 for a malformed request or an authority that is not this pod; 401 when
//! authorization denies it (decided after the target is resolved, before connecting to the app);
//! 503 when the target is an agent port or the app cannot be reached. Errors stay inside their
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
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::connections::{self, Denied, Revoked};
use super::{accept_loop, copy, WorkloadProxy};
use crate::authz::ConnectionFacts;
use crate::hbone::stream::H2Stream;
use crate::hbone::{self, Authority, TraceParent};
use crate::net::{ports, ClientAddr};
use crate::spiffe::Identity;
use crate::state::{ApplicationTunnelProtocol, Workload};
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: TcpListener) {
    accept_loop(&proxy, listener, "inbound", handle).await
}

/// Why an HBONE connection (as a whole) could not be served.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("the local workload {0} is not in the current configuration")]
    UnknownWorkload(String),
    #[error("no certificate for {identity}: {source}")]
    Certificate {
        identity: Identity,
        source: crate::identity::CertificateError,
    },
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("no certificate, TLS handshake or HTTP/2 preface before the connection's deadline")]
    HandshakeTimeout,
    #[error(transparent)]
    Server(#[from] hbone::server::ServerError),
}

async fn handle(proxy: Arc<WorkloadProxy>, stream: TcpStream, peer: SocketAddr) {
    let span = tracing::debug_span!("inbound_hbone", peer = %peer);
    if let Err(error) = serve_connection(proxy, stream, ClientAddr(peer))
        .instrument(span)
        .await
    {
        // Refused handshakes are routine (scanners, wrong roots); the peer address says who.
        tracing::warn!(peer = %peer, %error, "HBONE connection refused");
    }
}

async fn serve_connection(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: ClientAddr,
) -> Result<(), ConnectionError> {
    // One deadline from accept to the first stream: certificate, TLS and HTTP/2 preface share
    // it, so a client that sends nothing holds its fds for this long at most, whatever the
    // certificate source is doing.
    let deadline = tokio::time::Instant::now() + proxy.inputs.settings.proxy.handshake_timeout;
    let local = proxy
        .workload()
        .ok_or_else(|| ConnectionError::UnknownWorkload(proxy.workload_uid.clone()))?;
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
    let tls = tokio::time::timeout_at(deadline, acceptor.accept(transport))
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)?
        .map_err(ConnectionError::Tls)?;
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
        &proxy.h2,
        &proxy.drain,
        limits,
        move |request, respond| {
            handle_stream(
                stream_proxy.clone(),
                peer,
                peer_identity.clone(),
                request,
                respond,
            )
        },
    )
    .await?;
    Ok(())
}

/// Why a CONNECT stream was refused; each maps to the HTTP status Istio's agents use.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    BadRequest(#[from] hbone::RequestError),
    #[error("ip mismatch: {requested} is not an address of {workload}")]
    IpMismatch { requested: String, workload: String },
    #[error("hostname authority {0} does not name a service of this workload")]
    UnknownHostname(String),
    #[error("target port {0} is one of the agent's own ports")]
    AgentPort(u16),
    #[error("the local workload is no longer configured")]
    UnknownWorkload,
    #[error(transparent)]
    Denied(Denied),
    #[error(transparent)]
    Revoked(Revoked),
    #[error("connect to the application: {0}")]
    Upstream(#[source] crate::socket::SocketError),
    #[error("the client reset the stream ({0}) before it was answered")]
    Reset(h2::Reason),
    #[error("sending the response: {0}")]
    Respond(#[source] h2::Error),
    #[error("copy: {0}")]
    Copy(#[source] std::io::Error),
}

impl StreamError {
    /// Istio's response flag for this failure.
    fn flag(&self) -> ResponseFlag {
        match self {
            StreamError::Denied(_) | StreamError::Revoked(_) => ResponseFlag::Deny,
            _ => ResponseFlag::Connect,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            StreamError::BadRequest(error) => error.status(),
            StreamError::IpMismatch { .. } => StatusCode::BAD_REQUEST,
            StreamError::UnknownHostname(_)
            | StreamError::AgentPort(_)
            | StreamError::UnknownWorkload
            | StreamError::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            StreamError::Denied(_) => StatusCode::UNAUTHORIZED,
            StreamError::Reset(_)
            | StreamError::Respond(_)
            | StreamError::Copy(_)
            | StreamError::Revoked(_) => StatusCode::OK,
        }
    }
}

/// One CONNECT stream. Not an `async fn`: everything taken from the request happens before the
/// task's first poll, so the task keeps neither the request head nor a second copy of the record
/// (an async fn's arguments and moved-from locals keep their space for the task's whole life,
/// which is what an idle tunnel costs).
fn handle_stream(
    proxy: Arc<WorkloadProxy>,
    peer: ClientAddr,
    peer_identity: Option<Identity>,
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
    record.trace = trace.to_string();
    record.src_identity = peer_identity.clone();
    record.dst_hbone_addr = Some(authority);
    let target = parsed.map(|parsed| parsed.authority);
    let body = request.into_body();
    async move {
        let mut respond = Some(respond);
        let result = match target {
            Ok(target) => {
                let client = (peer, peer_identity);
                tunnel(&proxy, client, target, body, &mut respond, &mut record).await
            }
            Err(error) => Err(StreamError::from(error)),
        };
        if let Err(error) = result {
            if let Some(respond) = respond
                .take()
                .filter(|_| !matches!(error, StreamError::Reset(_)))
            {
                hbone::server::reject(respond, error.status());
            }
            record.fail(error.flag(), error);
        }
    }
    .instrument(span)
}

/// Checks the target, authorizes, connects to the app, answers 200 and copies until done or
/// until a policy change revokes the stream. A reset from the client before the answer
/// abandons the checks and the connect (rapid reset must not turn into work for the agent).
async fn tunnel(
    proxy: &WorkloadProxy,
    client: (ClientAddr, Option<Identity>),
    authority: Authority,
    body: RecvStream,
    respond: &mut Option<SendResponse<Bytes>>,
    record: &mut ConnectionRecord,
) -> Result<(), StreamError> {
    let Some(pending) = respond.as_mut() else {
        return Ok(());
    };
    let (upstream, registration) =
        hbone::server::until_reset(pending, prepare(proxy, client, authority, record))
            .await
            .map_err(StreamError::Reset)??;
    let Some(mut respond) = respond.take() else {
        return Ok(());
    };
    let send = respond
        .send_response(Response::new(()), false)
        .map_err(StreamError::Respond)?;
    let tunnel = H2Stream::new(send, body);
    record.connected();
    // Downstream is the tunnel here: bytes from the app's socket are the ones received. Boxed,
    // so that the copy's state is not held twice (here and inside the select).
    let copy = Box::pin(copy::tunnel(
        upstream,
        tunnel,
        &record.bytes.received,
        &record.bytes.sent,
    ));
    // Dropping the copy on revocation resets the stream (h2 CANCEL) and closes the app socket.
    tokio::select! {
        copied = copy => copied.map_err(StreamError::Copy),
        revoked = registration.revoked() => Err(StreamError::Revoked(revoked)),
    }
}

/// Everything before the answer: the target check, authorization (registering the stream for
/// re-evaluation), the connect to the app and its PROXY header.
async fn prepare(
    proxy: &WorkloadProxy,
    (peer, peer_identity): (ClientAddr, Option<Identity>),
    authority: Authority,
    record: &mut ConnectionRecord,
) -> Result<(TcpStream, connections::Registration), StreamError> {
    let local = proxy.workload().ok_or(StreamError::UnknownWorkload)?;
    record.dst_workload = Some(local.clone());
    record.dst_identity = Some(local.identity.clone());
    let snapshot = proxy.inputs.state.snapshot();
    if let Some(source) = snapshot.workload_by_address(&crate::net::NetworkAddress {
        network: local.network.clone(),
        ip: peer.0.ip(),
    }) {
        record.src_workload = Some(source.clone());
    }
    drop(snapshot);
    let requested = resolve_target(proxy, &local, &authority)?;
    let target = delivery_address(&local, requested)?;
    record.dst_addr = target.to_string();
    if ports::is_agent_port(target.port()) {
        return Err(StreamError::AgentPort(target.port()));
    }
    let facts = ConnectionFacts {
        source_identity: peer_identity.clone(),
        source_ip: peer.0.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let registration = connections::admit(&proxy.connections, &proxy.inputs.state, &local, facts)
        .map_err(StreamError::Denied)?;
    // Original source: the app sees the HBONE peer's IP (proven by the connection, unlike the
    // client-supplied `forwarded` header), unless client and app share the pod.
    let source_ip = (proxy.inputs.settings.proxy.original_source && peer.0.ip() != target.ip())
        .then_some(peer.0.ip());
    let timeout = proxy.inputs.settings.proxy.connect_timeout;
    let mut upstream = proxy
        .sockets
        .connect(target, source_ip, timeout)
        .await
        .map_err(StreamError::Upstream)?;
    if let Some(tunnel) = &local.application_tunnel {
        if tunnel.protocol == ApplicationTunnelProtocol::Proxy {
            let header =
                super::proxy_protocol::encode_v2(peer.0, requested, peer_identity.as_ref());
            upstream
                .write_all(&header)
                .await
                .map_err(StreamError::Copy)?;
        }
    }
    Ok((upstream, registration))
}

/// Where the bytes go inside the pod: the requested address when it is the pod's own; for a
/// workload with an application tunnel (or a waypoint addressed for what it fronts), the pod's
/// own IP at the tunnel port, else at the requested port. Never an address outside the pod.
fn delivery_address(local: &Workload, requested: SocketAddr) -> Result<SocketAddr, StreamError> {
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
        .ok_or(StreamError::UnknownWorkload)?;
    Ok(SocketAddr::new(ip, tunnel_port.unwrap_or(requested.port())))
}

/// Maps the CONNECT authority to the address the client asked for: one of the local workload's
/// own, or (for a waypoint) an address of what it fronts.
fn resolve_target(
    proxy: &WorkloadProxy,
    local: &Workload,
    authority: &Authority,
) -> Result<SocketAddr, StreamError> {
    match authority {
        Authority::Address(address) => {
            let fronted = || {
                let network_address = crate::net::NetworkAddress {
                    network: local.network.clone(),
                    ip: address.ip(),
                };
                let snapshot = proxy.inputs.state.snapshot();
                snapshot.is_waypoint_for_address(&network_address, local)
            };
            if local.workload_ips.contains(&address.ip())
                || local.application_tunnel.is_some()
                || fronted()
            {
                Ok(*address)
            } else {
                Err(StreamError::IpMismatch {
                    requested: address.ip().to_string(),
                    workload: local.uid.clone(),
                })
            }
        }
        Authority::Hostname { host, port } => {
            let snapshot = proxy.inputs.state.snapshot();
            let target_port = local
                .services
                .iter()
                .filter(|(key, _)| {
                    snapshot
                        .service(key)
                        .is_some_and(|service| &service.hostname == host)
                })
                .find_map(|(key, ports)| {
                    let own = ports.get(port).copied().filter(|p| *p != 0);
                    own.or_else(|| {
                        snapshot
                            .service(key)
                            .and_then(|s| s.ports.get(port).copied())
                            .filter(|p| *p != 0)
                    })
                })
                .ok_or_else(|| StreamError::UnknownHostname(format!("{host}:{port}")))?;
            let ip = local
                .workload_ips
                .first()
                .copied()
                .ok_or(StreamError::UnknownWorkload)?;
            Ok(SocketAddr::new(ip, target_port))
        }
    }
}
