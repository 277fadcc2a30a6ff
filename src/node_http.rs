//! HTTP/1.1 for the node-level servers (layer L0): the one accept loop that the admin API
//! (15000), the metrics server (15020) and readiness (15021) run on, and the small response
//! builders they share.
//!
//! These servers answer operators and probes in the agent's own namespace, never pod traffic,
//! so they need no TLS and no HTTP/2. Limits that protect them (header-read timeout, a cap on
//! open connections, backing off after accept errors) belong in [`serve`], the one place every
//! node-level server passes through.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::drain::Drain;

/// A whole response body, built in memory (every node-level answer is small or already encoded).
pub type Body = Full<Bytes>;

/// What one node-level server allows a client.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more are reset at accept.
    pub max_connections: usize,
    /// Time to send a request's headers (hyper's timer; without one hyper silently waits).
    pub header_read_timeout: Duration,
    /// Longest a connection may live, response included: a client that asks and then never
    /// reads holds its slot this long at most.
    pub connection_deadline: Duration,
}

impl ServerLimits {
    /// Metrics (15020) and readiness (15021): reachable from pods, answered at once. The cap is
    /// well above what a slowloris can hold within the header timeout from a few sources
    /// while probes keep getting through; it bounds fds and hyper's buffers (~16 KiB each).
    pub const PROBES: ServerLimits = ServerLimits {
        max_connections: 1024,
        header_read_timeout: Duration::from_secs(10),
        connection_deadline: Duration::from_secs(30),
    };

    /// Admin (15000, loopback only): a CPU profile takes up to 300 s before it answers.
    pub const ADMIN: ServerLimits = ServerLimits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        connection_deadline: Duration::from_secs(330),
    };
}

/// First pause after a failed accept (EMFILE and friends); doubled per consecutive failure.
const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Longest pause between failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The pause after the `failures`-th consecutive failed accept (≥ 1): an accept that fails at
/// once (EMFILE) would otherwise spin a core and flood the log.
fn accept_backoff(failures: u32) -> Duration {
    ACCEPT_BACKOFF_INITIAL
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(ACCEPT_BACKOFF_MAX)
}

/// Accepts connections until `drain` starts and serves each with `handler`, one task per
/// connection under `drain` (a draining server closes its open connections too), within
/// `limits`. One request per connection (no keep-alive), so an idle client holds no slot.
pub async fn serve<F, Fut>(listener: TcpListener, drain: Drain, limits: ServerLimits, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.draining() => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                failures = 0;
                stream
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                if failures == 1 {
                    tracing::warn!(%error, "node server accept failed; backing off");
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max = limits.max_connections,
                "node server full; resetting a connection"
            );
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            continue;
        };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        let connection_drain = drain.clone();
        drain.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(false)
                .serve_connection(io, service);
            tokio::select! {
                _ = connection => {}
                _ = connection_drain.draining() => {}
                _ = tokio::time::sleep(limits.connection_deadline) => {}
            }
            drop(slot);
        });
    }
}

/// A plain-text answer (no content type: probes and `curl` read it as it is).
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response
}

/// `value` as pretty JSON. A value that cannot be serialized is the server's fault: 500 naming
/// why, never an empty 200 that a client would read as "nothing there".
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => with_content_type(status, body, "application/json"),
        Err(error) => error_message(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot serialize the response: {error}"),
        ),
    }
}

/// `{"error": "<message>"}` with `status`: the admin API's shape for every refusal.
pub fn error_message(status: StatusCode, message: &str) -> Response<Body> {
    // A map of one string always serializes; the fallback only keeps this free of unwraps.
    let body = serde_json::to_vec_pretty(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| b"{\"error\": \"unprintable error\"}".to_vec());
    with_content_type(status, body, "application/json")
}

/// `body` with `status` and a `content-type` header.
pub fn with_content_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A value whose serialization fails, as a map with a non-string key does in JSON.
    fn unserializable() -> std::collections::HashMap<(u8, u8), u8> {
        [((1, 2), 3)].into_iter().collect()
    }

    async fn body(response: Response<Body>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("in-memory body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8 body")
    }

    /// A server on loopback answering 200 "ok" within `limits`.
    async fn server(limits: ServerLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, Drain::new(), limits, |_request| async {
            text(StatusCode::OK, "ok\n")
        }));
        address
    }

    /// Reads until the server closes; what it sent.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        // A reset also ends the conversation.
        let _ = stream.read_to_end(&mut received).await;
        String::from_utf8_lossy(&received).into_owned()
    }

    /// Slowloris: a client that never finishes its headers is closed by the header-read
    /// timeout (hyper needs a timer for it; without one it waits forever).
    #[tokio::test(start_paused = true)]
    async fn a_request_whose_headers_never_end_is_closed() {
        use tokio::io::AsyncWriteExt;
        let address = server(ServerLimits::PROBES).await;
        let mut slow = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a request");
        let closed = tokio::time::timeout(Duration::from_secs(3600), until_closed(&mut slow)).await;
        let reply = closed.expect("the server closes a connection stuck in its headers");
        assert!(!reply.contains("200 OK"), "{reply}");
    }

    /// Past the connection cap a client is reset at once; a slot coming back admits the next,
    /// which is answered.
    #[tokio::test]
    async fn connections_over_the_cap_are_refused_until_one_ends() {
        use tokio::io::AsyncWriteExt;
        let limits = ServerLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(3600),
            connection_deadline: Duration::from_secs(3600),
        };
        let address = server(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut idle = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            idle.write_all(b"GET").await.expect("a partial request");
            held.push(idle);
        }
        let mut refused = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let _ = refused
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        assert_eq!(
            until_closed(&mut refused).await,
            "",
            "refused without an answer"
        );

        drop(held.pop());
        let mut answered = String::new();
        for _ in 0..100 {
            let mut next = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            let _ = next
                .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            answered = until_closed(&mut next).await;
            if !answered.is_empty() {
                break;
            }
            // The server notices the closed connection on its own schedule.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
    }

    #[test]
    fn accept_failures_back_off_doubling_to_a_cap() {
        let pauses: Vec<Duration> = [1, 2, 3, 8, 40, u32::MAX]
            .into_iter()
            .map(accept_backoff)
            .collect();
        assert_eq!(
            pauses,
            [10, 20, 40, 1000, 1000, 1000].map(Duration::from_millis)
        );
    }

    #[tokio::test]
    async fn a_value_that_cannot_be_serialized_is_a_500_naming_why() {
        let response = json(StatusCode::OK, &unserializable());
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let text = body(response).await;
        assert!(
            text.contains("cannot serialize the response: key must be a string"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn json_and_errors_carry_their_status_and_content_type() {
        let response = json(StatusCode::CREATED, &serde_json::json!({ "a": 1 }));
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(body(response).await, "{\n  \"a\": 1\n}");

        let response = error_message(StatusCode::NOT_FOUND, "no such pod");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(body(response).await, "{\n  \"error\": \"no such pod\"\n}");

        let response = text(StatusCode::OK, "ready\n");
        assert!(response.headers().get(CONTENT_TYPE).is_none());
        assert_eq!(body(response).await, "ready\n");
    }
}
