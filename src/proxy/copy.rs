//! Bidirectional byte copy (layer L3) with half-close and live byte counters.
//!
//! Each direction copies until EOF and then shuts down the write side of the other end, so a FIN
//! in one direction travels on while the other direction keeps flowing. Counters are atomics the
//! access-log record reads, so long connections report bytes while still open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::budget::{BufferWait, SendAllowance};
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
const TUNNEL_INITIAL_READ: u32 = 16 * 1024;
/// Largest read of a tunnel direction.
const TUNNEL_MAX_READ: u32 = 256 * 1024;
/// A read waits for the connection's send allowance only when less than this is left.
const TUNNEL_MIN_READ: usize = 4 * 1024;

/// Copies `tcp` ⇄ `tunnel` like [`bidirectional`], without copy buffers: bytes read from TCP
/// go to h2 as owned `Bytes` (read into a fresh buffer only once the socket is readable), and
/// chunks h2 received are written to TCP as they are. An idle tunnel holds no buffer at all.
/// Every buffer read from TCP is charged to `allowance` (the connection's share of the node's
/// memory budget) until h2 has sent it, so a peer that stops reading holds at most that much.
/// `from_tcp` counts bytes TCP → tunnel, `to_tcp` tunnel → TCP. Both ends are borrowed, so that
/// the caller's task keeps them once rather than once more inside this future.
pub fn tunnel<'a>(
    tcp: &'a mut TcpStream,
    tunnel: &'a mut H2Stream,
    allowance: &'a SendAllowance,
    from_tcp: &'a AtomicU64,
    to_tcp: &'a AtomicU64,
) -> Tunnel<'a> {
    Tunnel {
        tcp,
        tunnel,
        allowance,
        from_tcp,
        to_tcp,
        forward_rest: Bytes::new(),
        backward_rest: Bytes::new(),
        read_size: TUNNEL_INITIAL_READ,
        forward: Forward::Reading,
        backward: Backward::Receiving,
        allowance_wait: BufferWait::default(),
    }
}

/// The copy of one tunnel ([`tunnel`]), written out as a state machine instead of two async
/// blocks joined: an idle tunnel then holds these few fields (128 B, boxed in jemalloc's 128 B
/// class) rather than the blocks' suspended futures with their waiter nodes (~640 B), for as
/// long as it is open (RSS per idle connection). Each direction is a phase plus the bytes it
/// still has to pass on: as enums carrying the `Bytes`, each would take a tag word of its own.
/// Ends at the first error, or once both directions are done.
pub struct Tunnel<'a> {
    tcp: &'a mut TcpStream,
    tunnel: &'a mut H2Stream,
    allowance: &'a SendAllowance,
    from_tcp: &'a AtomicU64,
    to_tcp: &'a AtomicU64,
    /// Read from TCP, not taken by h2 yet (in [`Forward::Sending`]).
    forward_rest: Bytes,
    /// Received from h2, not written to TCP yet (in [`Backward::Writing`]).
    backward_rest: Bytes,
    /// The size of the next read from TCP: doubled each time a read fills it.
    read_size: u32,
    forward: Forward,
    backward: Backward,
    allowance_wait: BufferWait,
}

/// TCP → tunnel.
#[derive(Clone, Copy)]
enum Forward {
    /// Waiting for the socket to be readable, then for allowance, then reading.
    Reading,
    /// Handing `forward_rest` to h2 (counted as h2 takes it).
    Sending,
    /// EOF passed on as END_STREAM.
    Done,
}

/// Tunnel → TCP.
#[derive(Clone, Copy)]
enum Backward {
    /// Waiting for h2's next chunk.
    Receiving,
    /// Writing `backward_rest` to TCP (counted, and its flow-control window given back, as it
    /// is written).
    Writing,
    /// END_STREAM came: passing it on as FIN.
    ShuttingDown,
    Done,
}

impl Tunnel<'_> {
    fn poll_forward(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.forward {
                Forward::Done => return Poll::Ready(Ok(())),
                Forward::Sending => {
                    let rest = &mut self.forward_rest;
                    let before = rest.len();
                    let sent = self.tunnel.poll_send(cx, rest);
                    let taken = (before - rest.len()) as u64;
                    self.from_tcp.fetch_add(taken, Ordering::Relaxed);
                    ready!(sent)?;
                    self.forward = Forward::Reading;
                }
                Forward::Reading => {
                    ready!(self.tcp.poll_read_ready(cx))?;
                    let size = self.read_size as usize;
                    let wait = &mut self.allowance_wait;
                    let mut buffer =
                        ready!(self.allowance.poll_buffer(cx, size, TUNNEL_MIN_READ, wait));
                    // `poll_read` rather than `try_read`: a short read then tells tokio the
                    // socket is drained, which saves the `recv` that would only answer EAGAIN.
                    // Should the readiness have been stale, the buffer goes back at once.
                    let tcp = Pin::new(&mut *self.tcp);
                    let read = ready!(tokio_util::io::poll_read_buf(tcp, cx, &mut buffer.data))?;
                    if read == 0 {
                        self.tunnel.finish()?;
                        self.forward = Forward::Done;
                        return Poll::Ready(Ok(()));
                    }
                    if read == size {
                        self.read_size = (self.read_size * 2).min(TUNNEL_MAX_READ);
                    }
                    self.forward_rest = buffer.seal();
                    self.forward = Forward::Sending;
                }
            }
        }
    }

    fn poll_backward(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.backward {
                Backward::Done => return Poll::Ready(Ok(())),
                Backward::Receiving => match ready!(self.tunnel.poll_chunk(cx))? {
                    Some(chunk) => {
                        self.backward_rest = chunk;
                        self.backward = Backward::Writing;
                    }
                    None => self.backward = Backward::ShuttingDown,
                },
                Backward::Writing => {
                    let rest = &mut self.backward_rest;
                    while !rest.is_empty() {
                        let tcp = Pin::new(&mut *self.tcp);
                        let wrote = ready!(tcp.poll_write(cx, rest))?;
                        if wrote == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        rest.advance(wrote);
                        self.tunnel.release(wrote);
                        self.to_tcp.fetch_add(wrote as u64, Ordering::Relaxed);
                    }
                    self.backward = Backward::Receiving;
                }
                Backward::ShuttingDown => {
                    ready!(Pin::new(&mut *self.tcp).poll_shutdown(cx))?;
                    self.backward = Backward::Done;
                }
            }
        }
    }
}

impl Future for Tunnel<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Both directions every time, as a join would: either may have been woken.
        let forward = this.poll_forward(cx)?;
        let backward = this.poll_backward(cx)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HBONE-like stream pair over memory: the client's end as the proxy's [`H2Stream`], the
    /// server's as the peer's send and receive halves.
    async fn h2_pair() -> (H2Stream, h2::SendStream<Bytes>, h2::RecvStream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.expect("server");
            let (request, mut respond) = connection.accept().await.expect("stream").expect("ok");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("respond");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            (send, request.into_body())
        });
        let (client, connection) = h2::client::handshake(client_io).await.expect("client");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = client.send_request(request, false).expect("send");
        let (peer_send, peer_recv) = server.await.expect("server task");
        let response = response.await.expect("response");
        (
            H2Stream::new(send, response.into_body()),
            peer_send,
            peer_recv,
        )
    }

    #[tokio::test]
    async fn tunnel_copies_both_ways_under_a_small_allowance_and_passes_each_end_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut app = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let (mut stream, mut peer_send, mut peer_recv) = h2_pair().await;
        // Far less than what crosses: reads wait for h2 to send what the last ones read.
        let allowance = SendAllowance::new(8 * 1024);
        let (from_tcp, to_tcp) = (AtomicU64::new(0), AtomicU64::new(0));
        let upload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let download: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
        let (expected_up, expected_down) = (upload.clone(), download.clone());
        let copy = tunnel(&mut tcp, &mut stream, &allowance, &from_tcp, &to_tcp);
        let app_side = async move {
            let (mut read, mut write) = app.split();
            let writing = async {
                write.write_all(&upload).await.expect("app write");
                write.shutdown().await.expect("app FIN");
            };
            let mut received = Vec::new();
            let reading = read.read_to_end(&mut received);
            let ((), read) = tokio::join!(writing, reading);
            read.expect("app read");
            received
        };
        let peer_side = async move {
            let receiving = async {
                let mut received = Vec::new();
                while let Some(chunk) = peer_recv.data().await {
                    let chunk = chunk.expect("peer data");
                    received.extend_from_slice(&chunk);
                    let _ = peer_recv.flow_control().release_capacity(chunk.len());
                }
                received
            };
            let sending = async {
                let mut rest = Bytes::from(download);
                while !rest.is_empty() {
                    peer_send.reserve_capacity(rest.len());
                    let granted = std::future::poll_fn(|cx| peer_send.poll_capacity(cx))
                        .await
                        .expect("open")
                        .expect("capacity");
                    peer_send
                        .send_data(rest.split_to(granted.min(rest.len())), false)
                        .expect("peer send");
                }
                peer_send
                    .send_data(Bytes::new(), true)
                    .expect("peer END_STREAM");
            };
            tokio::join!(receiving, sending).0
        };
        let (copied, at_app, at_peer) = tokio::join!(copy, app_side, peer_side);
        copied.expect("copy");
        assert!(at_peer == expected_up, "every byte app -> peer, in order");
        assert!(at_app == expected_down, "every byte peer -> app, in order");
        assert_eq!(from_tcp.load(Ordering::Relaxed), 1_000_000);
        assert_eq!(to_tcp.load(Ordering::Relaxed), 700_000);
        assert_eq!(allowance.available(), 8 * 1024, "all allowance back");
    }

    #[test]
    fn an_idle_tunnel_copy_stays_small() {
        // The copy is part of every open tunnel's task, on both agents.
        assert!(std::mem::size_of::<Tunnel<'_>>() <= 128);
    }

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
