//! HBONE server connections (layer L2): the h2 server over an accepted mTLS stream. Each CONNECT
//! stream is handed to a caller-provided handler in its own task, so one bad stream never harms
//! the others; drain sends GOAWAY and lets open streams finish.

use std::future::Future;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::H2Settings;
use crate::drain::Drain;

/// The h2 send buffer per stream on the server (Istio uses 400 KiB).
const SERVER_SEND_BUFFER: usize = 400 * 1024;

/// Errors of a server connection as a whole (per-stream errors go to the handler).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The client did not complete the HTTP/2 preface.
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
}

/// Serves CONNECT streams on `io` until the client goes away, keepalive fails, or `drain`
/// forces. `handle` runs once per stream, in a task tracked by `drain`.
pub async fn serve<IO, H, F>(
    io: IO,
    settings: &H2Settings,
    drain: &Drain,
    handle: H,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    serve_until(io, settings, drain, None, handle).await
}

/// [`serve`], refusing new streams (GOAWAY; open streams finish) from `valid_until` on: the
/// time either side's certificate expires, after which the connection's authentication no
/// longer holds and the client must reconnect with a fresh certificate.
pub async fn serve_until<IO, H, F>(
    io: IO,
    settings: &H2Settings,
    drain: &Drain,
    valid_until: Option<std::time::SystemTime>,
    handle: H,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let expiry = async {
        match valid_until {
            Some(at) => {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let mut connection = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.frame_size)
        .max_header_list_size(settings.max_header_list_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_send_buffer_size(SERVER_SEND_BUFFER)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(ServerError::Handshake)?;
    let keepalive = super::keepalive(connection.ping_pong(), settings.keepalive());
    tokio::pin!(keepalive);
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    drain.spawn(handle(request, respond));
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "HBONE server connection error");
                    break;
                }
                None => break,
            },
            _ = drain.draining(), if !goaway_sent => {
                connection.graceful_shutdown();
                goaway_sent = true;
            }
            _ = &mut expiry, if !goaway_sent => {
                tracing::info!("a certificate of this HBONE connection expired; no new streams");
                connection.graceful_shutdown();
                goaway_sent = true;
            }
            error = &mut keepalive => {
                tracing::info!(%error, "HBONE client stopped answering PINGs; closing the connection");
                connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Let h2 flush the GOAWAY; the next accept returns None or an error.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), connection.accept()).await;
                break;
            }
            _ = drain.forced() => break,
        }
    }
    Ok(())
}

/// Answers a stream with an error status and no body.
pub fn reject(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_else(|_| Response::new(()));
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, "could not send HBONE error response");
    }
}
