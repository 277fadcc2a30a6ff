//! Bulk transfer through both agents with every byte checked (issue 17): many concurrent
//! tunnels share one pooled HBONE connection, and each carries a different pseudo-random stream
//! in each direction at the same time. The receiving end of each direction regenerates the
//! stream it expects and compares length, digest and the first differing offset, so a byte
//! lost, duplicated, reordered or mixed up between streams (flow control, frame splitting, TLS
//! record batching, buffer reuse) fails the test with the tunnel and the offset named.
//!
//! Bounded: 32 tunnels x 2 MiB each way (128 MiB through both agents), every socket operation
//! under a timeout. Needs root, like every namespace test.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use support::cluster::Cluster;
use support::netns::Topology;

const APP_PORT: u16 = 8080;
/// Concurrent tunnels, all on one HBONE connection (the pool's default allows 100 streams).
const TUNNELS: usize = 32;
/// Bytes each tunnel carries in each direction.
const BYTES_EACH_WAY: u64 = 2 * 1024 * 1024;
/// Every socket read and write; generous, the test runs against debug builds on a busy CI.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Mixed into the client's seed for the server's stream, so the two directions differ.
const REPLY_SALT: u64 = 0x5eed_f00d_5eed_f00d;

/// A deterministic pseudo-random byte stream (xorshift64), generated in pieces so neither end
/// holds a whole stream in memory.
struct PseudoRandom {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl PseudoRandom {
    fn new(seed: u64) -> Self {
        PseudoRandom {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

/// FNV-1a over a byte stream: the digest both ends compare.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Digest(u64);

impl Digest {
    fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Writes `len` bytes of the stream for `seed`, then half-closes.
fn send_stream(mut socket: TcpStream, seed: u64, len: u64) -> std::io::Result<()> {
    let mut generator = PseudoRandom::new(seed);
    let mut chunk = vec![0u8; 61 * 1024]; // not a power of two: frames and records straddle it
    let mut left = len;
    while left > 0 {
        let size = chunk.len().min(left as usize);
        generator.fill(&mut chunk[..size]);
        socket.write_all(&chunk[..size])?;
        left -= size as u64;
    }
    socket.shutdown(Shutdown::Write)
}

/// Reads `socket` to EOF and checks it carried exactly the `len` bytes of the stream for
/// `seed`: length, digest, and the first offset that differs.
fn receive_stream(socket: &mut TcpStream, seed: u64, len: u64) -> Result<()> {
    let mut expected_stream = PseudoRandom::new(seed);
    let (mut received_digest, mut expected_digest) = (Digest::new(), Digest::new());
    let mut buffer = vec![0u8; 64 * 1024];
    let mut expected = vec![0u8; 64 * 1024];
    let mut first_difference = None;
    let mut total = 0u64;
    loop {
        let read = socket
            .read(&mut buffer)
            .with_context(|| format!("reading after {total} bytes"))?;
        if read == 0 {
            break;
        }
        received_digest.update(&buffer[..read]);
        let comparable = (len.saturating_sub(total) as usize).min(read);
        expected_stream.fill(&mut expected[..comparable]);
        expected_digest.update(&expected[..comparable]);
        if first_difference.is_none() {
            first_difference = (0..comparable)
                .find(|&i| buffer[i] != expected[i])
                .map(|i| total + i as u64);
        }
        total += read as u64;
    }
    if total != len {
        bail!("received {total} bytes, expected {len}");
    }
    if let Some(offset) = first_difference {
        bail!("bytes differ from offset {offset}");
    }
    if received_digest != expected_digest {
        bail!("digest {received_digest:?} differs from {expected_digest:?}");
    }
    Ok(())
}

/// The app in the server pod: per connection it reads the client's 8-byte seed, then at the same
/// time sends its own stream (seed ^ [`REPLY_SALT`]) and checks the client's stream (seed).
/// Verdicts are kept by seed.
/// Per tunnel (by seed): what the server found.
type Verdicts = Mutex<Vec<(u64, Result<(), String>)>>;

struct ChecksumServer {
    verdicts: Arc<Verdicts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl ChecksumServer {
    fn start(topology: &Topology, pod: &str) -> ChecksumServer {
        let verdicts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (thread_verdicts, thread_stop) = (verdicts.clone(), stop.clone());
        let thread = topology.spawn_in(pod, move || -> Result<()> {
            let listener = TcpListener::bind(("0.0.0.0", APP_PORT))?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            let mut handlers = Vec::new();
            while !thread_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((socket, _)) => {
                        let verdicts = thread_verdicts.clone();
                        handlers.push(std::thread::spawn(move || serve(socket, &verdicts)));
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            for handler in handlers {
                let _ = handler.join();
            }
            Ok(())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("checksum server listening");
        ChecksumServer {
            verdicts,
            stop,
            thread: Some(thread),
        }
    }

    fn verdicts(&self) -> Vec<(u64, Result<(), String>)> {
        self.verdicts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for ChecksumServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut socket: TcpStream, verdicts: &Verdicts) {
    let outcome = (|| -> Result<u64> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut seed = [0u8; 8];
        socket.read_exact(&mut seed).context("reading the seed")?;
        Ok(u64::from_le_bytes(seed))
    })();
    let seed = match outcome {
        Ok(seed) => seed,
        Err(error) => {
            let mut verdicts = verdicts.lock().unwrap_or_else(|p| p.into_inner());
            verdicts.push((0, Err(format!("{error:#}"))));
            return;
        }
    };
    let writer = socket.try_clone().map(|writer| {
        std::thread::spawn(move || send_stream(writer, seed ^ REPLY_SALT, BYTES_EACH_WAY))
    });
    let received = receive_stream(&mut socket, seed, BYTES_EACH_WAY)
        .map_err(|error| format!("client -> server: {error:#}"));
    let sent = match writer {
        Ok(writer) => match writer.join() {
            Ok(result) => result.map_err(|error| format!("server -> client write: {error}")),
            Err(_) => Err("server writer panicked".to_string()),
        },
        Err(error) => Err(format!("cloning the socket: {error}")),
    };
    let verdict = received.and(sent);
    let mut verdicts = verdicts.lock().unwrap_or_else(|p| p.into_inner());
    verdicts.push((seed, verdict));
}

/// One client tunnel: connects, sends its seed, and reads and checks the server's stream from
/// then on; once the server's first byte shows the tunnel is up end to end it meets the others
/// at `all_open`, then sends its own stream.
///
/// The reader starts before the meeting, not after: a tunnel whose app left the server's bytes
/// unread while waiting for the others would keep its share of the HBONE connection's receive
/// window, and a few such tunnels (connection window / stream window: 4 here) use all of it, so
/// the tunnels still opening would never see their first byte and the meeting would never come.
/// That is HTTP/2's flow control working as designed (Istio's ztunnel, with the same 4:1 ratio
/// of windows, behaves alike), not what this test is about.
fn client(target: SocketAddr, seed: u64, all_open: &Barrier) -> Result<()> {
    let open = || -> Result<(TcpStream, JoinHandle<Result<()>>)> {
        let socket = TcpStream::connect_timeout(&target, IO_TIMEOUT)
            .with_context(|| format!("connecting to {target}"))?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))?;
        (&socket).write_all(&seed.to_le_bytes())?;
        let (first_byte, seen) = std::sync::mpsc::channel();
        let mut reading = socket.try_clone()?;
        let receiver = std::thread::spawn(move || {
            let mut first = [0u8; 1];
            // Waits without consuming, so the check below sees the stream from its start.
            let peeked = reading.peek(&mut first);
            let _ = first_byte.send(());
            peeked.context("waiting for the server's first byte")?;
            receive_stream(&mut reading, seed ^ REPLY_SALT, BYTES_EACH_WAY)
                .context("server -> client")
        });
        // The receiver reports even when the peek fails, so this never outwaits it.
        let _ = seen.recv();
        Ok((socket, receiver))
    };
    let opened = open();
    // Met even on failure, so the test thread never waits for a tunnel that is not coming.
    all_open.wait();
    let (socket, receiver) = opened?;
    let sent = send_stream(socket, seed, BYTES_EACH_WAY);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("client reader panicked"))?;
    sent.context("client -> server write")?;
    received
}

/// Established TCP connections in `pod` whose `side` (`sport` or `dport`) is 15008.
fn hbone_connections(topology: &Topology, pod: &str, side: &str) -> usize {
    let filter = format!("( {side} = :15008 )");
    let output = topology
        .exec_role(pod, &["ss", "-Htn", "state", "established", &filter])
        .expect("ss");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count()
}

/// 32 tunnels on one pooled HBONE connection each carry 2 MiB of distinct pseudo-random bytes in
/// both directions at once; both ends of every direction check length, digest and content.
#[test]
fn concurrent_bulk_tunnels_on_one_connection_deliver_every_byte_both_ways() {
    require_netns!("concurrent_bulk_tunnels_on_one_connection_deliver_every_byte_both_ways");
    let cluster = Cluster::build(&[("a", "client"), ("b", "server")])
        .captured(&["client", "server"])
        .start_with(|cluster, node| {
            // One connection per peer, whatever the worker count: every tunnel shares it.
            cluster.render(node).replacen(
                "agent:\n",
                "agent:\n  pool: {spreadConnections: 1, maxStreamsPerConnection: 100}\n",
                1,
            )
        });
    let server = ChecksumServer::start(&cluster.topology, "server");
    let target = cluster.target("server", APP_PORT);

    let all_open = Arc::new(Barrier::new(TUNNELS + 1));
    let clients: Vec<_> = (0..TUNNELS as u64)
        .map(|index| {
            let all_open = all_open.clone();
            let seed = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(index + 1);
            cluster
                .topology
                .spawn_in("client", move || (seed, client(target, seed, &all_open)))
        })
        .collect();
    all_open.wait();
    let on_client = hbone_connections(&cluster.topology, "client", "dport");
    let on_server = hbone_connections(&cluster.topology, "server", "sport");

    let mut failures = Vec::new();
    for handle in clients {
        let (seed, outcome) = handle
            .join()
            .expect("client thread")
            .expect("client thread in the pod");
        if let Err(error) = outcome {
            failures.push(format!("tunnel {seed:#x}: {error:#}"));
        }
    }
    assert!(failures.is_empty(), "client side: {failures:#?}");
    assert_eq!(
        (on_client, on_server),
        (1, 1),
        "all {TUNNELS} tunnels share one HBONE connection (client pod, server pod)"
    );

    let verdicts = support::wait_for("every server verdict", IO_TIMEOUT, || {
        let verdicts = server.verdicts();
        (verdicts.len() >= TUNNELS).then_some(verdicts)
    })
    .expect("the server saw every tunnel");
    let server_failures: Vec<_> = verdicts
        .iter()
        .filter_map(|(seed, verdict)| verdict.as_ref().err().map(|e| format!("{seed:#x}: {e}")))
        .collect();
    assert!(
        server_failures.is_empty(),
        "server side: {server_failures:#?}"
    );
    assert_eq!(verdicts.len(), TUNNELS, "one app connection per tunnel");
}
