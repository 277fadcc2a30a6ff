//! Batched reads under TLS (layer L2): the TCP stream an HBONE connection's TLS runs over.
//!
//! rustls pulls ciphertext in reads of about 4 KiB, so a 16 KiB record costs four or five
//! `recv` calls. [`BatchedReads`] reads the socket in batches of up to 64 KiB and serves rustls
//! from memory, trading a copy of each byte for most of the system calls. The batch size adapts:
//! it doubles while batches come back full (bulk transfer) and halves, down to 8 KiB, while they
//! come back mostly empty (request/response traffic, where a 64 KiB buffer per message would be
//! an allocation outside the allocator's thread cache). The batch buffer exists only while data
//! is waiting: it is dropped whenever the socket runs dry, so an idle connection holds none.
//! Reads go through `poll_read`, so a short read tells tokio the socket is drained and no `recv`
//! is spent learning it. Writes go straight through (vectored, as h2 and rustls send them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest batch one `recv` may take from the socket.
const MAX_BATCH: usize = 64 * 1024;
/// The smallest batch: about half a full TLS record.
const MIN_BATCH: usize = 8 * 1024;

/// A TCP stream whose reads are batched; see the module documentation.
#[derive(Debug)]
pub struct BatchedReads {
    tcp: TcpStream,
    /// Bytes read from the socket and not yet handed out; no allocation when empty and idle.
    buffer: BytesMut,
    /// The size of the next batch.
    batch: usize,
}

impl BatchedReads {
    /// Wraps a connected stream.
    pub fn new(tcp: TcpStream) -> Self {
        BatchedReads {
            tcp,
            buffer: BytesMut::new(),
            batch: MIN_BATCH,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsyncRead for BatchedReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.buffer.is_empty() {
                let take = this.buffer.len().min(buf.remaining());
                buf.put_slice(&this.buffer[..take]);
                this.buffer.advance(take);
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() >= this.batch {
                return Pin::new(&mut this.tcp).poll_read(cx, buf);
            }
            if this.tcp.poll_read_ready(cx).is_pending() {
                // Dry: give the memory back until the peer sends again.
                this.buffer = BytesMut::new();
                return Poll::Pending;
            }
            // Reuses the previous batch's allocation when there is one.
            this.buffer.reserve(this.batch);
            let mut limited = (&mut this.buffer).limit(this.batch);
            let read =
                match tokio_util::io::poll_read_buf(Pin::new(&mut this.tcp), cx, &mut limited) {
                    Poll::Pending => {
                        this.buffer = BytesMut::new();
                        return Poll::Pending;
                    }
                    Poll::Ready(read) => read?,
                };
            if read == 0 {
                return Poll::Ready(Ok(()));
            }
            if read == this.batch {
                this.batch = (this.batch * 2).min(MAX_BATCH);
            } else if read < this.batch / 4 {
                this.batch = (this.batch / 2).max(MIN_BATCH);
            }
        }
    }
}

impl AsyncWrite for BatchedReads {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_then_eof_and_writes_pass_through() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let peer = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            tcp.write_all(&sent).await.expect("write");
            tcp.shutdown().await.expect("shutdown");
            let mut answer = Vec::new();
            tcp.read_to_end(&mut answer).await.expect("read");
            answer
        });
        let mut stream = BatchedReads::new(TcpStream::connect(address).await.expect("connect"));
        let mut received = Vec::new();
        // Reads smaller than a TLS record, as rustls makes them.
        let mut chunk = [0u8; 4096];
        loop {
            let read = stream.read(&mut chunk).await.expect("read");
            if read == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..read]);
        }
        assert_eq!(received, expected);
        stream.write_all(b"done").await.expect("write back");
        stream.shutdown().await.expect("shutdown");
        assert_eq!(peer.await.expect("peer"), b"done");
    }
}
