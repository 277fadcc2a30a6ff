//! HBONE client connections (layer L2): the h2 handshake over an established mTLS stream, PING
//! keepalive, and opening CONNECT streams. Pooling is the proxy's job (`proxy::pool`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::H2Stream;
use super::H2Settings;

/// Errors on the client side of HBONE.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
    /// The connection can take no more streams (GOAWAY, closed, broken).
    #[error("HBONE connection unusable: {0}")]
    Unusable(#[source] h2::Error),
    /// Sending the CONNECT or reading its response failed.
    #[error("HBONE stream: {0}")]
    Stream(#[source] h2::Error),
    /// The server answered something other than 200.
    #[error("HBONE CONNECT refused with status {0}")]
    Status(StatusCode),
    /// No stream slot or no response within the response timeout (a peer that answers PINGs
    /// but never the CONNECT would otherwise hold the app's connection forever).
    #[error("no HBONE CONNECT response within {0:?}")]
    ResponseTimeout(std::time::Duration),
}

/// A live HTTP/2 client connection. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ClientConnection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    response_timeout: std::time::Duration,
}

impl ClientConnection {
    /// Runs the h2 handshake on `io` and spawns the task that drives the connection and its
    /// keepalive. The task ends when every handle and stream is dropped or the peer goes away.
    pub async fn handshake<IO>(io: IO, settings: &H2Settings) -> Result<Self, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.frame_size)
            .max_header_list_size(settings.max_header_list_size)
            .max_send_buffer_size(settings.stream_window as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(ClientError::Handshake)?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong();
        let keepalive = settings.keepalive();
        let closed_flag = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "HBONE client connection ended");
                    }
                }
                error = super::keepalive(ping, keepalive) => {
                    tracing::info!(%error, "HBONE peer stopped answering PINGs; closing the connection");
                }
            }
            closed_flag.store(true, Ordering::Release);
        });
        Ok(ClientConnection {
            send,
            closed,
            response_timeout: settings.response_timeout,
        })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends a CONNECT and waits for the answer, at most the response timeout (dropping the
    /// stream then resets it); on 200 the tunnel is ready.
    pub async fn connect(&self, request: Request<()>) -> Result<H2Stream, ClientError> {
        tokio::time::timeout(self.response_timeout, self.connect_unbounded(request))
            .await
            .map_err(|_| ClientError::ResponseTimeout(self.response_timeout))?
    }

    async fn connect_unbounded(&self, request: Request<()>) -> Result<H2Stream, ClientError> {
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(ClientError::Unusable)?;
        let (response, send_stream) = send
            .send_request(request, false)
            .map_err(ClientError::Unusable)?;
        let response = response.await.map_err(ClientError::Stream)?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status(response.status()));
        }
        Ok(H2Stream::new(send_stream, response.into_body()))
    }
}
