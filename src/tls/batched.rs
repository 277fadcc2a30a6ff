//! Batched reads under TLS (layer L2): the TCP stream an HBONE connection's TLS runs over.
//!
//! rustls pulls ciphertext in reads of about 4 KiB, so a 16 KiB record costs four or five
//! `recv` calls. [`BatchedReads`] reads the socket in 64 KiB batches and serves rustls from
//! memory, trading a copy of each byte for most of the system calls. The batch buffer exists
//! only while data is waiting: it is dropped whenever the socket runs dry, so an idle connection
//! holds none. Writes go straight through (vectored, as h2 and rustls send them).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How much one `recv` may take from the socket.
const BATCH: usize = 64 * 1024;

/// A TCP stream whose reads are batched; see the module documentation.
#[derive(Debug)]
pub struct BatchedReads {
    tcp: TcpStream,
    /// Bytes read from the socket and not yet handed out; no allocation when empty and idle.
    buffer: BytesMut,
}

impl BatchedReads {
    /// Wraps a connected stream.
    pub fn new(tcp: TcpStream) -> Self {
        BatchedReads {
            tcp,
            buffer: BytesMut::new(),
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
            if buf.remaining() >= BATCH {
                return Pin::new(&mut this.tcp).poll_read(cx, buf);
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            // Reuses the previous batch's allocation when there is one.
            this.buffer.reserve(BATCH);
            match this.tcp.try_read_buf(&mut this.buffer) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // Dry: give the memory back until the peer sends again.
                    this.buffer = BytesMut::new();
                }
                Err(error) => return Poll::Ready(Err(error)),
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
