//! A small L7 test waypoint (test code, not a product feature).
//!
//! It runs as the application of a captured waypoint pod whose workload has
//! `applicationTunnel: {protocol: PROXY, port}`: the pod's agent terminates HBONE with the
//! waypoint's identity and hands each tunnel over with a PROXY v2 header (Istio's "sandwich").
//! Per tunnel the waypoint reads the header (the destination the client asked for), then the
//! first HTTP/1.1 request line: `GET /public` is forwarded, anything else is answered `403`
//! by the waypoint itself. Forwarding dials the original destination from inside the waypoint
//! pod, so the agent re-originates HBONE with the waypoint's identity (and, since the source is
//! the waypoint, goes direct to the endpoint instead of looping back).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::netns::Topology;

/// What the waypoint decided, per tunnel.
#[derive(Debug, Default)]
pub struct Verdicts {
    /// Requests forwarded to their destination.
    pub allowed: AtomicUsize,
    /// Requests answered 403.
    pub denied: AtomicUsize,
}

/// The waypoint app, listening on `0.0.0.0:<port>` in its pod; stops on drop.
pub struct TestWaypoint {
    /// Counters.
    pub verdicts: Arc<Verdicts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl TestWaypoint {
    /// Starts the waypoint in `role`'s namespace; returns once it listens.
    pub fn start(topology: &Topology, role: &str, port: u16) -> Result<TestWaypoint> {
        let verdicts = Arc::new(Verdicts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (thread_verdicts, thread_stop) = (verdicts.clone(), stop.clone());
        let handle = topology.spawn_in(role, move || -> Result<()> {
            let listener = TcpListener::bind(("0.0.0.0", port))?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let verdicts = thread_verdicts.clone();
                        // Spawned threads inherit the namespace of this one.
                        std::thread::spawn(move || handle(stream, &verdicts));
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            Ok(())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("test waypoint did not start")?;
        Ok(TestWaypoint {
            verdicts,
            stop,
            thread: Some(handle),
        })
    }

    /// Requests forwarded so far.
    pub fn allowed(&self) -> usize {
        self.verdicts.allowed.load(Ordering::Relaxed)
    }

    /// Requests refused with 403 so far.
    pub fn denied(&self) -> usize {
        self.verdicts.denied.load(Ordering::Relaxed)
    }
}

impl Drop for TestWaypoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn handle(mut downstream: TcpStream, verdicts: &Verdicts) {
    let _ = downstream.set_nonblocking(false);
    let _ = downstream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(destination) = read_proxy_header(&mut downstream) else {
        return;
    };
    let Ok(request_line) = read_line(&mut downstream) else {
        return;
    };
    if !request_line.starts_with(b"GET /public ") {
        verdicts.denied.fetch_add(1, Ordering::Relaxed);
        let _ = downstream.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n");
        let _ = downstream.shutdown(Shutdown::Write);
        return;
    }
    verdicts.allowed.fetch_add(1, Ordering::Relaxed);
    let Ok(mut upstream) = TcpStream::connect_timeout(&destination, Duration::from_secs(5)) else {
        return;
    };
    if upstream.write_all(&request_line).is_err() {
        return;
    }
    let _ = downstream.set_read_timeout(None);
    let (Ok(mut down_reader), Ok(mut up_writer)) = (downstream.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut down_reader, &mut up_writer);
        let _ = up_writer.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut downstream);
    let _ = downstream.shutdown(Shutdown::Write);
    let _ = forward.join();
}

/// Reads a PROXY v2 header and returns its destination address.
fn read_proxy_header(stream: &mut TcpStream) -> Result<SocketAddr> {
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed)?;
    if &fixed[..12] != b"\r\n\r\n\0\r\nQUIT\n" || fixed[12] != 0x21 {
        bail!("not a PROXY v2 header");
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest)?;
    match fixed[13] {
        0x11 if len >= 12 => {
            let ip = Ipv4Addr::new(rest[4], rest[5], rest[6], rest[7]);
            Ok(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([rest[10], rest[11]]),
            ))
        }
        0x21 if len >= 36 => {
            let octets: [u8; 16] = rest[16..32].try_into()?;
            let port = u16::from_be_bytes([rest[34], rest[35]]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        family => bail!("unsupported PROXY family {family:#x}"),
    }
}

/// Reads up to and including the first `\n` (bounded).
fn read_line(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 8192 {
        stream.read_exact(&mut byte)?;
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
    }
    bail!("request line too long")
}
