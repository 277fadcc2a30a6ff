//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS (layer L2).
//!
//! This file is the pure part — building the CONNECT request a client sends and parsing the one
//! a server receives — with no I/O so it can be fuzzed and tested by tables. [`stream`] adapts an
//! h2 stream pair to `AsyncRead`/`AsyncWrite`; [`client`] and [`server`] do the h2 handshakes
//! with the settings Istio's ztunnel and Envoy waypoints use.
//!
//! Wire form (must match Istio): classic CONNECT (no `:protocol`, `:scheme` or `:path`),
//! `:authority` = target `ip:port` (IPv6 bracketed) or `hostname:port`, headers `forwarded`,
//! `baggage`, `traceparent`.

pub mod client;
pub mod server;
pub mod stream;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Method, Request, StatusCode};

use crate::net::ClientAddr;
use crate::state::Workload;

/// Header carrying the downstream client's address (`for="ip:port"`) and service host.
pub const FORWARDED: &str = "forwarded";
/// Header carrying the source workload's metadata.
pub const BAGGAGE: &str = "baggage";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Where a CONNECT tunnel goes: an address, or a service hostname (multi-network, later).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `ip:port`.
    Address(SocketAddr),
    /// `hostname:port`.
    Hostname {
        /// DNS-style hostname.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Authority {
    /// The port of the target.
    pub fn port(&self) -> u16 {
        match self {
            Authority::Address(addr) => addr.port(),
            Authority::Hostname { port, .. } => *port,
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authority::Address(addr) => addr.fmt(f),
            Authority::Hostname { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A W3C `traceparent` value: `00-<32 hex trace id>-<16 hex span id>-00`. The agent makes one per
/// downstream connection and uses it as the connection id in logs on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The 128-bit trace id as its high and low halves: a `u128` would align every connection
    /// record that keeps one to 16 bytes (RSS per idle connection).
    trace_id: [u64; 2],
    span_id: u64,
}

impl TraceParent {
    /// A fresh random trace id (non-zero, as W3C requires).
    pub fn random() -> Self {
        TraceParent {
            trace_id: [rand::random::<u64>(), rand::random::<u64>() | 1],
            span_id: rand::random::<u64>() | 1,
        }
    }

    /// Parses a header value; anything but the exact 55-character version-00 form is refused.
    pub fn parse(value: &str) -> Option<Self> {
        let bytes = value.as_bytes();
        if bytes.len() != 55 || !value.starts_with("00-") || bytes[35] != b'-' || bytes[52] != b'-'
        {
            return None;
        }
        let is_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let (trace, span, flags) = (&value[3..35], &value[36..52], &value[53..55]);
        if !(is_hex(trace) && is_hex(span) && is_hex(flags)) {
            return None;
        }
        Some(TraceParent {
            trace_id: [
                u64::from_str_radix(&trace[..16], 16).ok()?,
                u64::from_str_radix(&trace[16..], 16).ok()?,
            ],
            span_id: u64::from_str_radix(span, 16).ok()?,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [high, low] = self.trace_id;
        write!(f, "00-{high:016x}{low:016x}-{:016x}-00", self.span_id)
    }
}

/// Everything a client puts in a CONNECT request.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The tunnel's target.
    pub authority: Authority,
    /// The downstream application's address, sent as `forwarded: for="…"`.
    pub client: ClientAddr,
    /// The service hostname the app addressed, if any, sent as `forwarded: …;host=…`.
    pub service_host: Option<String>,
    /// Source workload metadata; see [`baggage`].
    pub baggage: String,
    /// Connection id shared by both agents' logs.
    pub traceparent: TraceParent,
}

/// Errors building a request (a header value we were given is not valid HTTP).
#[derive(Debug, thiserror::Error)]
#[error("invalid HBONE request header {name}: {source}")]
pub struct BuildError {
    name: &'static str,
    source: http::Error,
}

impl ConnectRequest {
    /// The HTTP/2 request, exactly as Istio's agents send it.
    pub fn build(&self) -> Result<Request<()>, BuildError> {
        let mut forwarded = format!("for=\"{}\"", self.client);
        // Only a plain host name travels: anything else would need RFC 7239 quoting and would
        // not read back as the same name on the peer (see `forwarded_host_token`).
        if let Some(host) = self
            .service_host
            .as_deref()
            .filter(|h| forwarded_host_token(h))
        {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        }
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.to_string())
            .header(FORWARDED, forwarded)
            .header(TRACEPARENT, self.traceparent.to_string());
        if !self.baggage.is_empty() {
            builder = builder.header(BAGGAGE, &self.baggage);
        }
        builder.body(()).map_err(|source| BuildError {
            name: ":authority",
            source,
        })
    }
}

/// `baggage` for a workload: `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<type>.name`,
/// `service.name`, `service.version`, only the non-empty ones, in Istio's order.
pub fn baggage(workload: &Workload) -> String {
    let workload_type = if workload.workload_type.is_empty() {
        "pod".to_string()
    } else {
        workload.workload_type.to_ascii_lowercase()
    };
    let workload_name = if workload.workload_name.is_empty() {
        &workload.name
    } else {
        &workload.workload_name
    };
    let pairs = [
        ("k8s.cluster.name".to_string(), &workload.cluster_id),
        ("k8s.namespace.name".to_string(), &workload.namespace),
        (format!("k8s.{workload_type}.name"), workload_name),
        ("service.name".to_string(), &workload.canonical_name),
        ("service.version".to_string(), &workload.canonical_revision),
    ];
    pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A CONNECT request as the server understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConnect {
    /// The tunnel's target.
    pub authority: Authority,
    /// `forwarded: for=` — the original client address, if given and parsable.
    pub forwarded_for: Option<SocketAddr>,
    /// `forwarded: host=` — the service the client addressed.
    pub forwarded_host: Option<String>,
    /// The client's trace id, or `None` if absent/malformed (the server makes its own).
    pub traceparent: Option<TraceParent>,
    /// Raw `baggage`.
    pub baggage: Option<String>,
}

/// Why a CONNECT request was refused; [`RequestError::status`] is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a CONNECT.
    #[error("method {0} is not CONNECT")]
    Method(String),
    /// No `:authority`, or not `host:port`.
    #[error("authority {0:?} is not host:port")]
    Authority(String),
    /// Extended CONNECT (`:protocol`) or a path/scheme was sent; HBONE uses classic CONNECT.
    #[error("unexpected {0} in a classic CONNECT")]
    NotClassic(&'static str),
}

impl RequestError {
    /// The response status for this error: always 400, the request itself is malformed.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Parses a received CONNECT request head. Never panics on any input.
pub fn parse_connect<B>(request: &Request<B>) -> Result<ParsedConnect, RequestError> {
    if request.method() != Method::CONNECT {
        return Err(RequestError::Method(request.method().to_string()));
    }
    if request.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err(RequestError::NotClassic(":protocol"));
    }
    let uri = request.uri();
    if uri.scheme().is_some() {
        return Err(RequestError::NotClassic(":scheme"));
    }
    let raw_authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let authority = parse_authority(raw_authority)?;
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let (forwarded_for, forwarded_host) =
        header(FORWARDED).map(parse_forwarded).unwrap_or_default();
    Ok(ParsedConnect {
        authority,
        forwarded_for,
        forwarded_host,
        traceparent: header(TRACEPARENT).and_then(TraceParent::parse),
        baggage: header(BAGGAGE).map(str::to_string),
    })
}

/// `ip:port`, `[v6]:port` or `hostname:port`; the port must be 1..=65535.
pub fn parse_authority(raw: &str) -> Result<Authority, RequestError> {
    let bad = || RequestError::Authority(raw.to_string());
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad());
        }
        return Ok(Authority::Address(addr));
    }
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    if !is_dns_name(host) || host.parse::<IpAddr>().is_ok() {
        return Err(bad());
    }
    Ok(Authority::Hostname {
        host: host.to_string(),
        port,
    })
}

/// Letters, digits, `.` and `-`, at most 253 bytes: a DNS name as it may appear in an authority.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
}

/// A `forwarded` `host=` value we send and accept: a DNS name, or a ServiceEntry wildcard
/// (`*.example.com`). A peer's value with quotes, separators or spaces is dropped rather than
/// kept half-parsed (found by the `hbone_connect` fuzz target: such a host did not read back
/// as itself once forwarded).
fn forwarded_host_token(host: &str) -> bool {
    is_dns_name(host.strip_prefix("*.").unwrap_or(host)) || host == "*"
}

/// Reads the first `forwarded` element's `for` and `host` parameters (RFC 7239).
fn parse_forwarded(value: &str) -> (Option<SocketAddr>, Option<String>) {
    let first = value.split(',').next().unwrap_or_default();
    let mut client = None;
    let mut host = None;
    for pair in first.split(';') {
        let Some((key, val)) = pair.trim().split_once('=') else {
            continue;
        };
        let val = val.trim().trim_matches('"');
        if key.trim().eq_ignore_ascii_case("for") {
            client = val.parse::<SocketAddr>().ok();
        } else if key.trim().eq_ignore_ascii_case("host") && forwarded_host_token(val) {
            host = Some(val.to_string());
        }
    }
    (client, host)
}

#[cfg(test)]
mod tests;

/// HTTP/2 settings shared by HBONE clients and servers; see `config::agent::ProxyConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Settings {
    /// Per-stream flow-control window.
    pub stream_window: u32,
    /// Connection flow-control window.
    pub connection_window: u32,
    /// Maximum frame size.
    pub frame_size: u32,
    /// Maximum header block a peer may send us.
    pub max_header_list_size: u32,
    /// Maximum concurrent streams a client may open (server side).
    pub max_concurrent_streams: u32,
    /// Interval between PINGs.
    pub keepalive_interval: std::time::Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: std::time::Duration,
    /// Server: a connection with no open stream for this long is closed (GOAWAY).
    pub idle_timeout: std::time::Duration,
    /// Client: how long a CONNECT may wait for a stream slot and its response.
    pub response_timeout: std::time::Duration,
}

impl From<&crate::config::agent::ProxyConfig> for H2Settings {
    fn from(config: &crate::config::agent::ProxyConfig) -> Self {
        H2Settings {
            stream_window: config.stream_window,
            connection_window: config.connection_window,
            frame_size: config.frame_size,
            max_header_list_size: config.max_header_list_size,
            max_concurrent_streams: config.max_concurrent_streams,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            idle_timeout: config.connection_idle_timeout,
            response_timeout: config.connect_response_timeout,
        }
    }
}

impl H2Settings {
    fn keepalive(&self) -> (std::time::Duration, std::time::Duration) {
        (self.keepalive_interval, self.keepalive_timeout)
    }
}

/// Why keepalive gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// h2 would not give us a ping handle (should not happen on a fresh connection).
    #[error("PING unavailable on this connection")]
    Unavailable,
    /// The PING could not be sent or its answer failed.
    #[error("PING failed: {0}")]
    Failed(#[source] h2::Error),
    /// No PONG arrived in time.
    #[error("no PONG within {0:?}")]
    Timeout(std::time::Duration),
}

/// PINGs the peer every `interval` and resolves only when one is not answered within `timeout`.
async fn keepalive(
    ping: Option<h2::PingPong>,
    (interval, timeout): (std::time::Duration, std::time::Duration),
) -> KeepaliveError {
    let Some(mut ping) = ping else {
        // Never resolve: a connection without a ping handle still works, just without keepalive.
        std::future::pending::<()>().await;
        return KeepaliveError::Unavailable;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return KeepaliveError::Failed(error),
            Err(_) => return KeepaliveError::Timeout(timeout),
        }
    }
}
