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

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::drain::Drain;

/// A whole response body, built in memory (every node-level answer is small or already encoded).
pub type Body = Full<Bytes>;

/// Accepts connections until `drain` starts and serves each with `handler`, one task per
/// connection under `drain` (a draining server closes its open connections too).
pub async fn serve<F, Fut>(listener: TcpListener, drain: Drain, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.draining() => return,
        };
        let Ok((stream, _peer)) = accepted else {
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
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::select! {
                _ = connection => {}
                _ = connection_drain.draining() => {}
            }
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
