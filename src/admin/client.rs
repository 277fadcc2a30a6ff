//! The admin API client (layer L5), used by the CLI: one HTTP/1.1 request per call.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error(
        "cannot reach the agent's admin API at {addr}: {source} (is it running? is --admin right?)"
    )]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("admin API request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("admin API request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Sends one request to the admin API and returns the status and body.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, String), ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `?key=value&...` with each value percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        serializer.append_pair(key, value);
    }
    serializer.finish()
}
