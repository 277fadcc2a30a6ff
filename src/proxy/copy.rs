//! Bidirectional byte copy (layer L3) with half-close and live byte counters.
//!
//! Each direction copies until EOF and then shuts down the write side of the other end, so a FIN
//! in one direction travels on while the other direction keeps flowing. Counters are atomics the
//! access-log record reads, so long connections report bytes while still open.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::budget::SendAllowance;
use crate::hbone::stream::H2Stream;

/// Start small: most proxied connections are short request/response exchanges.
const INITIAL_BUFFER: usize = 1024;
/// After this many bytes in one direction, switch to a buffer for bulk transfer.
const BULK_THRESHOLD: u64 = 128 * 1024;
/// Bulk buffer size.
const BULK_BUFFER: usize = 64 * 1024;

/// Copies `downstream` ⇄ `upstream` until both directions are done. `sent` counts bytes that
/// went downstream → upstream, `received` upstream → downstream.
pub async fn bidirectional<D, U>(
    downstream: D,
    upstream: U,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Send,
    U: AsyncRead + AsyncWrite + Send,
{
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let forward = one_way(&mut down_read, &mut up_write, sent);
    let backward = one_way(&mut up_read, &mut down_write, received);
    tokio::try_join!(forward, backward).map(|_| ())
}

async fn one_way<R, W>(reader: &mut R, writer: &mut W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; INITIAL_BUFFER];
    let mut total = 0u64;
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            // Half-close: pass the FIN on; the other direction carries on.
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buffer[..read]).await?;
        total += read as u64;
        counter.fetch_add(read as u64, Ordering::Relaxed);
        if total >= BULK_THRESHOLD && buffer.len() < BULK_BUFFER {
            buffer.resize(BULK_BUFFER, 0);
        }
    }
}

/// First read size of a tunnel direction; doubled each time a read fills it.
const TUNNEL_INITIAL_READ: usize = 16 * 1024;
/// Largest read of a tunnel direction.
const TUNNEL_MAX_READ: usize = 256 * 1024;
/// A read waits for the connection's send allowance only when less than this is left.
const TUNNEL_MIN_READ: usize = 4 * 1024;

/// Copies `tcp` ⇄ `tunnel` like [`bidirectional`], without copy buffers: bytes read from TCP
/// go to h2 as owned `Bytes` (read into a fresh buffer only once the socket is readable), and
/// chunks h2 received are written to TCP as they are. An idle tunnel holds no buffer at all.
/// Every buffer read from TCP is charged to `allowance` (the connection's share of the node's
/// memory budget) until h2 has sent it, so a peer that stops reading holds at most that much.
/// `from_tcp` counts bytes TCP → tunnel, `to_tcp` tunnel → TCP. Both ends are borrowed, so that
/// the caller's task keeps them once rather than once more inside this future (an async fn's
/// arguments stay in its state for its whole life, which is what an idle tunnel costs).
pub async fn tunnel(
    tcp: &mut TcpStream,
    tunnel: &mut H2Stream,
    allowance: &SendAllowance,
    from_tcp: &AtomicU64,
    to_tcp: &AtomicU64,
) -> io::Result<()> {
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let (mut tunnel_read, mut tunnel_write) = tunnel.halves();
    let forward = async {
        let mut size = TUNNEL_INITIAL_READ;
        loop {
            tcp_read.readable().await?;
            let mut buffer = allowance.buffer(size, TUNNEL_MIN_READ).await;
            // `read_buf` rather than `try_read_buf`: a short read then tells tokio the socket is
            // drained, which saves the `recv` that would only answer EAGAIN.
            let read = tcp_read.read_buf(&mut buffer.data).await?;
            if read == 0 {
                return tunnel_write.finish();
            }
            if read == size {
                size = (size * 2).min(TUNNEL_MAX_READ);
            }
            tunnel_write.send(buffer.seal()).await?;
            from_tcp.fetch_add(read as u64, Ordering::Relaxed);
        }
    };
    let backward = async {
        while let Some(chunk) = tunnel_read.chunk().await? {
            tcp_write.write_all(&chunk).await?;
            tunnel_read.release(chunk.len());
            to_tcp.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        tcp_write.shutdown().await
    };
    tokio::try_join!(forward, backward).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn half_close_keeps_other_direction_and_counts_bytes() {
        let (client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, server) = tokio::io::duplex(64);
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let proxy = bidirectional(proxy_down, proxy_up, &sent, &received);
        let answer = vec![7u8; 300_000];
        let expected = answer.clone();
        let peers = async move {
            let (mut client_read, mut client_write) = tokio::io::split(client);
            let (mut server_read, mut server_write) = tokio::io::split(server);
            let server = async move {
                let mut request = Vec::new();
                server_read.read_to_end(&mut request).await.unwrap();
                assert_eq!(request, b"request", "server sees the client's FIN");
                // After the client's FIN the server can still answer at length.
                server_write.write_all(&answer).await.unwrap();
                server_write.shutdown().await.unwrap();
            };
            let client = async move {
                client_write.write_all(b"request").await.unwrap();
                client_write.shutdown().await.unwrap();
                let mut response = Vec::new();
                client_read.read_to_end(&mut response).await.unwrap();
                response
            };
            let ((), response) = tokio::join!(server, client);
            assert_eq!(response, expected);
        };
        let (result, ()) = tokio::join!(proxy, peers);
        result.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 7);
        assert_eq!(received.load(Ordering::Relaxed), 300_000);
    }
}
