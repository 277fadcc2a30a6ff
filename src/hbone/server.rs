//! HBONE server connections (layer L2): the h2 server over an accepted mTLS stream. Each CONNECT
//! stream is handed to a caller-provided handler in its own task, so one bad stream never harms
//! the others; drain sends GOAWAY and lets open streams finish.
//!
//! Limits a hostile peer meets here: the first stream must arrive by a deadline the caller
//! starts at accept (so TLS, the HTTP/2 preface and the first CONNECT share one budget); a
//! connection with no open stream is closed after [`H2Settings::idle_timeout`] (streams
//! themselves have no idle timeout: apps keep connections for hours); and at most
//! `max_concurrent_streams` handlers run per connection, counting streams the peer already
//! reset (h2 frees a reset stream's slot at once, while its handler may still be working), so
//! a rapid-reset loop is refused with `REFUSED_STREAM` instead of starting unbounded work.
//! [`until_reset`] lets a handler abandon its work when its stream is reset.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::H2Settings;
use crate::drain::Drain;

/// The h2 send buffer per stream on the server (Istio uses 400 KiB).
const SERVER_SEND_BUFFER: usize = 400 * 1024;

/// How long a connection closed for idleness (or for a missed first-stream deadline) may take
/// to flush its GOAWAY and finish streams that crossed it, before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Errors of a server connection as a whole (per-stream errors go to the handler).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The client did not complete the HTTP/2 preface.
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
    /// The client opened no stream by the connection's deadline (counted from accept).
    #[error("no HTTP/2 stream before the connection's deadline")]
    FirstStreamTimeout,
}

/// Serves CONNECT streams on `io` until the client goes away, keepalive fails, or `drain`
/// forces. `handle` runs once per stream, in a task tracked by `drain`. The first stream must
/// arrive within [`H2Settings::keepalive_timeout`]; callers that did work since accept use
/// [`serve_until`] with their own deadline.
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
    let limits = ConnectionLimits {
        first_stream_by: Instant::now() + settings.keepalive_timeout,
        valid_until: None,
    };
    serve_until(io, settings, drain, limits, handle).await
}

/// When a server connection must have done what.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The first stream must have arrived by then (the HTTP/2 preface included); the caller
    /// starts it at accept, so the time its own TLS handshake took counts too.
    pub first_stream_by: Instant,
    /// From then on new streams are refused (GOAWAY; open streams finish): the time either
    /// side's certificate expires, after which the connection's authentication no longer holds
    /// and the client must reconnect with a fresh certificate.
    pub valid_until: Option<std::time::SystemTime>,
}

/// [`serve`] with the caller's [`ConnectionLimits`].
pub async fn serve_until<IO, H, F>(
    io: IO,
    settings: &H2Settings,
    drain: &Drain,
    limits: ConnectionLimits,
    handle: H,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let expiry = expiry(limits.valid_until);
    tokio::pin!(expiry);
    let mut connection = handshake(io, settings, limits.first_stream_by).await?;
    let keepalive = super::keepalive(connection.ping_pong(), settings.keepalive());
    tokio::pin!(keepalive);
    let handlers = Handlers::new(settings.max_concurrent_streams);
    // Armed while no stream is open: first with the first-stream deadline, later with the
    // idle timeout. A second firing (after the GOAWAY's grace) cuts the connection.
    let idle = tokio::time::sleep_until(limits.first_stream_by);
    tokio::pin!(idle);
    let mut idle_armed = true;
    let mut any_stream = false;
    let mut closing_idle = false;
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    any_stream = true;
                    idle_armed = false;
                    dispatch(&handlers, drain, &handle, request, respond);
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "HBONE server connection error");
                    break;
                }
                None => break,
            },
            () = handlers.finished.notified() => {
                if handlers.running() == 0 && !idle_armed {
                    idle.as_mut().reset(Instant::now() + settings.idle_timeout);
                    idle_armed = true;
                }
            }
            () = &mut idle, if idle_armed => {
                if closing_idle {
                    break;
                }
                goaway_sent = true;
                closing_idle = true;
                close_idle(&mut connection, idle.as_mut(), any_stream, settings.idle_timeout).await?;
            }
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
                let _ = tokio::time::timeout(CLOSE_GRACE, connection.accept()).await;
                break;
            }
            _ = drain.forced() => break,
        }
    }
    Ok(())
}

/// Completes once `valid_until` has passed; never without one.
async fn expiry(valid_until: Option<std::time::SystemTime>) {
    match valid_until {
        Some(at) => {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// The HTTP/2 preface counts against the first-stream deadline.
async fn handshake<IO>(
    io: IO,
    settings: &H2Settings,
    first_stream_by: Instant,
) -> Result<h2::server::Connection<IO, Bytes>, ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.frame_size)
        .max_header_list_size(settings.max_header_list_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_send_buffer_size(SERVER_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    tokio::time::timeout_at(first_stream_by, handshake)
        .await
        .map_err(|_| ServerError::FirstStreamTimeout)?
        .map_err(ServerError::Handshake)
}

fn dispatch<H, F>(
    handlers: &Handlers,
    drain: &Drain,
    handle: &H,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) where
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    match handlers.slot() {
        Some(slot) => {
            // A combinator, not an async block, which would hold the handler
            // twice (see `Drain::spawn`).
            drain.spawn(handle(request, respond).map(move |()| drop(slot)));
        }
        // REFUSED_STREAM tells the client nothing was done, so it may retry
        // (RFC 9113 §8.7).
        None => respond.send_reset(h2::Reason::REFUSED_STREAM),
    }
}

/// Sends GOAWAY and re-arms `idle` for the grace period. A connection that never had a stream
/// ends here, with [`ServerError::FirstStreamTimeout`], so the caller learns why.
async fn close_idle<IO>(
    connection: &mut h2::server::Connection<IO, Bytes>,
    idle: std::pin::Pin<&mut tokio::time::Sleep>,
    any_stream: bool,
    idle_timeout: Duration,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if any_stream {
        tracing::debug!(timeout = ?idle_timeout, "HBONE connection idle; closing it");
    } else {
        tracing::debug!("no HBONE stream before the connection's deadline; closing it");
    }
    connection.graceful_shutdown();
    idle.reset(Instant::now() + CLOSE_GRACE);
    if !any_stream {
        // Let h2 write the GOAWAY, then report why the connection ended.
        let _ = tokio::time::timeout(CLOSE_GRACE, connection.accept()).await;
        return Err(ServerError::FirstStreamTimeout);
    }
    Ok(())
}

/// The stream handlers of one connection: how many run, and a wake-up when one ends.
struct Handlers {
    slots: Arc<Semaphore>,
    capacity: usize,
    finished: Arc<Notify>,
}

/// A running handler's place; gives it back (and wakes the connection) when dropped, also when
/// drain cancels the handler.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    finished: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Given back before the wake-up, so the woken connection counts it as ended.
        drop(self.permit.take());
        self.finished.notify_one();
    }
}

impl Handlers {
    fn new(max: u32) -> Self {
        let capacity = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        Handlers {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            finished: Arc::new(Notify::new()),
        }
    }

    fn running(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// A place for one more handler, or `None` when `capacity` already run.
    fn slot(&self) -> Option<Slot> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(
                running = self.capacity,
                "too many stream handlers on this HBONE connection; refusing the stream"
            );
            return None;
        };
        Some(Slot {
            permit: Some(permit),
            finished: self.finished.clone(),
        })
    }
}

/// Runs `work` until it completes or the peer resets the stream `respond` answers, whichever
/// comes first; on a reset `work` is dropped (its connects and checks abandoned) and the reset's
/// reason returned. The reset is looked at first, every time: a stream already reset when its
/// handler first runs (rapid reset: HEADERS and RST_STREAM together) never starts its work,
/// where an unbiased `select!` would start it half of the time.
pub async fn until_reset<F: Future>(
    respond: &mut SendResponse<Bytes>,
    work: F,
) -> Result<F::Output, h2::Reason> {
    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
    tokio::select! {
        biased;
        reason = reset => Err(reason.unwrap_or(h2::Reason::CANCEL)),
        output = work => Ok(output),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

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
