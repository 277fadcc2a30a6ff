//! An HBONE tunnel stream as `AsyncRead + AsyncWrite` (layer L2).
//!
//! h2 exposes a stream as a `SendStream` with explicit flow-control capacity and a `RecvStream`
//! of `Bytes` chunks whose capacity must be released. This adapter hides both so the proxy can
//! copy bytes the same way for TCP and tunnels. Shutting down the write side sends END_STREAM
//! (a TCP FIN travels as END_STREAM, keeping half-close); a peer's RST_STREAM with NO_ERROR or
//! CANCEL reads as a clean end of stream, as Istio's agents treat it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 per write; bounds per-stream buffering.
const MAX_WRITE_CHUNK: usize = 256 * 1024;

/// One direction pair of an HBONE tunnel.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Bytes received but not yet read by the caller.
    pending: Bytes,
    /// Set once the write side sent END_STREAM.
    write_closed: bool,
    /// An optional guard released when the stream is dropped (pool stream accounting).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    /// Wraps a stream pair.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the stream.
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

fn is_clean_reset(error: &h2::Error) -> bool {
    matches!(
        error.reason(),
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL)
    ) && error.is_remote()
}

fn to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, error)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut chunk) = ready!(self.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let take = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..take]);
        chunk.advance(take);
        // An empty view would still pin h2's whole read buffer: keep only a rest.
        if !chunk.is_empty() {
            self.pending = chunk;
        }
        // Give the window back only for what the caller consumed, so a slow reader slows the peer.
        self.release(take);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(poll_capacity(&mut self.send, cx, buf.len()))?;
        let chunk = Bytes::copy_from_slice(&buf[..granted]);
        self.send.send_data(chunk, false).map_err(to_io)?;
        Poll::Ready(Ok(granted))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 flushes from its connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

impl H2Stream {
    /// The next received chunk as h2 received it, or `None` at the end of the stream
    /// (END_STREAM, or a reset with NO_ERROR/CANCEL), for a copy loop that writes `Bytes`
    /// without an intermediate buffer ([`crate::proxy::copy::tunnel`]). The chunk's
    /// flow-control window stays taken until [`Self::release`].
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            let chunk = match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Err(error)) if is_clean_reset(&error) => return Poll::Ready(Ok(None)),
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
                Some(Ok(chunk)) => chunk,
            };
            if !chunk.is_empty() {
                return Poll::Ready(Ok(Some(chunk)));
            }
        }
    }

    /// Gives the peer back the window of `len` bytes the caller has delivered, so a slow
    /// receiver slows the sender.
    pub fn release(&mut self, len: usize) {
        let _ = self.recv.flow_control().release_capacity(len);
    }

    /// Sends all of `data` as owned `Bytes` (no copy), in as many DATA frames as flow control
    /// allows; what is not sent yet stays in `data` while this waits for window.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let granted = ready!(poll_capacity(&mut self.send, cx, data.len()))?;
            self.send
                .send_data(data.split_to(granted), false)
                .map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the send side (END_STREAM): the FIN of the connection being tunnelled.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Ok(())
    }
}

/// Waits for send window for up to `want` bytes (at most [`MAX_WRITE_CHUNK`]); returns how
/// much may be sent now (at least 1).
fn poll_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    let want = want.min(MAX_WRITE_CHUNK);
    send.reserve_capacity(want);
    loop {
        let available = send.capacity();
        if available > 0 {
            return Poll::Ready(Ok(available.min(want)));
        }
        match ready!(send.poll_capacity(cx)) {
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
            Some(Ok(_)) => {}
        }
    }
}
