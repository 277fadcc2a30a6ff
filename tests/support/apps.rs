//! In-process apps for the tests: a counting TCP echo server living in a pod's namespace, and a
//! client that connects from inside a pod's namespace.
//!
//! The server counts accepted connections and received bytes and keeps what it received, so a
//! test can assert that something did — or did not — reach the application.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use super::netns::Topology;

/// Keep at most this much received data per server (enough for marker searches).
const KEEP_LIMIT: usize = 8 * 1024 * 1024;

/// How the echo server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Echo every byte back; at EOF shut down the write side.
    Echo,
    /// Echo, and after EOF from the client write `EOF <n>\n` (n = bytes received) before
    /// shutting down: the trailer can only arrive if the client's half-close got through.
    EchoThenTrailer,
    /// Write `<name>\n` first, then echo (tells load-balanced endpoints apart).
    Named(String),
    /// Write this many bytes at once (without waiting for the client to read), then echo: an
    /// app that answers at length.
    Flood(usize),
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub accepted: AtomicUsize,
    /// Bytes received over all connections.
    pub bytes_received: AtomicU64,
    /// Peer addresses of accepted connections, in order.
    pub peers: Mutex<Vec<SocketAddr>>,
    /// Received bytes of all connections (up to a limit), in arrival order.
    pub received: Mutex<Vec<u8>>,
}

/// A TCP echo server bound to `[::]:<port>` (IPv4 and IPv6) inside a pod namespace; stops on
/// drop. Peers are recorded in their plain form (`10.0.0.1`, not `::ffff:10.0.0.1`).
pub struct EchoServer {
    /// Shared counters.
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl EchoServer {
    /// Starts the server in `role`'s namespace; returns once it is listening.
    pub fn start(topology: &Topology, role: &str, port: u16, reply: Reply) -> Result<EchoServer> {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (thread_counters, thread_stop) = (counters.clone(), stop.clone());
        let handle = topology.spawn_in(role, move || -> Result<()> {
            // `[::]` is dual-stack: IPv4 and IPv6 clients (IPv4 ones as mapped addresses).
            let listener = match TcpListener::bind(("::", port)) {
                Ok(listener) => listener,
                Err(error) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("bind :{port}: {error}")));
                    return Ok(());
                }
            };
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(Ok(()));
            serve(listener, reply, thread_counters, thread_stop)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("echo server did not start")??;
        Ok(EchoServer {
            counters,
            stop,
            thread: Some(handle),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.counters.bytes_received.load(Ordering::SeqCst)
    }

    /// Whether the received data contains `needle`.
    pub fn received_contains(&self, needle: &[u8]) -> bool {
        let received = self
            .counters
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        contains(&received, needle)
    }

    /// Peer addresses seen so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.counters
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accept loop: non-blocking accept polled every 10 ms so the stop flag is seen.
fn serve(
    listener: TcpListener,
    reply: Reply,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                counters.accepted.fetch_add(1, Ordering::SeqCst);
                counters
                    .peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(SocketAddr::new(canonical(peer.ip()), peer.port()));
                let (reply, counters) = (reply.clone(), counters.clone());
                handlers.push(std::thread::spawn(move || handle(stream, reply, counters)));
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(error.into()),
        }
        handlers.retain(|handler: &JoinHandle<_>| !handler.is_finished());
    }
    Ok(())
}

/// One connection: echo (per `reply`) until EOF, then shut down the write side.
fn handle(mut stream: TcpStream, reply: Reply, counters: Arc<Counters>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    if let Reply::Named(name) = &reply {
        if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
    }
    if let Reply::Flood(len) = &reply {
        if stream.write_all(&payload(b"", *len, *len as u64)).is_err() {
            return;
        }
    }
    let mut total = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        total += read as u64;
        counters
            .bytes_received
            .fetch_add(read as u64, Ordering::SeqCst);
        {
            let mut received = counters.received.lock().unwrap_or_else(|e| e.into_inner());
            let room = KEEP_LIMIT.saturating_sub(received.len()).min(read);
            received.extend_from_slice(&buffer[..room]);
        }
        if stream.write_all(&buffer[..read]).is_err() {
            return;
        }
    }
    if reply == Reply::EchoThenTrailer {
        let _ = stream.write_all(format!("EOF {total}\n").as_bytes());
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Connects from inside `role`'s namespace to `target`, writes `payload`, half-closes, and reads
/// until EOF. Writing and reading run concurrently, so large payloads cannot deadlock.
/// Every step is bounded by `timeout`.
pub fn exchange(
    topology: &Topology,
    role: &str,
    target: SocketAddr,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    topology.run_in(role, move || exchange_here(target, &payload, timeout))?
}

/// [`exchange`] from the calling thread's current namespace.
pub fn exchange_here(target: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let payload = payload.to_vec();
    let write = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let written = write
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    written.with_context(|| format!("writing to {target}"))?;
    read.with_context(|| format!("reading from {target} ({} bytes so far)", response.len()))?;
    Ok(response)
}

/// Whether `haystack` contains `needle` (non-empty).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// A payload of `len` pseudo-random bytes (deterministic per seed) with `marker` at the start.
pub fn payload(marker: &[u8], len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = marker.to_vec();
    while data.len() < len {
        // xorshift64: fast, no dependency, good enough to defeat compression and accidental
        // matches.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len.max(marker.len()));
    data
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: how a dual-stack listener reports an IPv4 peer.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}
