//! A tiny authoritative DNS server for tests, run in a namespace the test made: the "upstream"
//! the agent forwards names outside the mesh to. It records every question it is asked, so a
//! test can prove a mesh name was answered by the agent (the upstream never saw it).
//!
//! Names it knows get their A record; `silent.*` names get no answer at all (a dead upstream);
//! `big.*` names are truncated over UDP and answered in full (40 records) over TCP; anything
//! else is NXDOMAIN. Answers use hickory-proto, the codec the agent uses.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use super::netns::Topology;

/// Records in `big.*` answers over TCP (well over 512 bytes).
pub const BIG_ANSWER_RECORDS: u8 = 40;

/// A running test DNS server; stops on drop.
pub struct DnsServer {
    /// Where it listens (UDP and TCP).
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server on port 53 of `role`'s namespace (all its addresses) answering `names`
    /// (lower case, no trailing dot) with their addresses.
    pub fn start(topology: &Topology, role: &str, names: &[(&str, Ipv4Addr)]) -> Result<DnsServer> {
        let (udp, tcp) = topology.run_in(role, || -> Result<(UdpSocket, TcpListener)> {
            let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53));
            Ok((UdpSocket::bind(any)?, TcpListener::bind(any)?))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let ip = topology.pod(role).ip;
        let names: Arc<BTreeMap<String, Ipv4Addr>> = Arc::new(
            names
                .iter()
                .map(|(name, ip)| (name.to_string(), *ip))
                .collect(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let udp_thread = {
            let (names, seen, stop) = (names.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || serve_udp(udp, &names, &seen, &stop))
        };
        let tcp_thread = {
            let (names, seen, stop) = (names.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || serve_tcp(tcp, &names, &seen, &stop))
        };
        Ok(DnsServer {
            address: SocketAddr::from((ip, 53)),
            seen,
            stop,
            threads: vec![udp_thread, tcp_thread],
        })
    }

    /// Every question asked so far, as `name/TYPE` (lower case, no trailing dot), with the
    /// transport: `udp:name/A`.
    pub fn questions(&self) -> Vec<String> {
        self.seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }

    /// Whether any question named `name` (any type, any transport).
    pub fn was_asked(&self, name: &str) -> bool {
        self.questions().iter().any(|question| {
            question
                .split_once(':')
                .is_some_and(|(_, rest)| rest.starts_with(&format!("{name}/")))
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_udp(
    socket: UdpSocket,
    names: &BTreeMap<String, Ipv4Addr>,
    seen: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((length, peer)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        if let Some(answer) = answer(&buffer[..length], names, seen, "udp") {
            let _ = socket.send_to(&answer, peer);
        }
    }
}

fn serve_tcp(
    listener: TcpListener,
    names: &BTreeMap<String, Ipv4Addr>,
    seen: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = serve_connection(stream, names, seen);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve_connection(
    mut stream: TcpStream,
    names: &BTreeMap<String, Ipv4Addr>,
    seen: &Mutex<Vec<String>>,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix)?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut message)?;
    let answer = answer(&message, names, seen, "tcp").context("no answer")?;
    let length = u16::try_from(answer.len())?;
    stream.write_all(&length.to_be_bytes())?;
    stream.write_all(&answer)?;
    Ok(())
}

/// The answer to `message`, or `None` to stay silent.
fn answer(
    message: &[u8],
    names: &BTreeMap<String, Ipv4Addr>,
    seen: &Mutex<Vec<String>>,
    transport: &str,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(message).ok()?;
    let question = query.queries().first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_string();
    if let Ok(mut seen) = seen.lock() {
        seen.push(format!("{transport}:{name}/{}", question.query_type()));
    }
    if name.starts_with("silent.") {
        return None;
    }
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .add_query(question.clone());
    let record = |ip: Ipv4Addr| Record::from_rdata(question.name().clone(), 60, RData::A(A(ip)));
    if name.starts_with("big.") {
        if transport == "udp" {
            response.set_truncated(true);
        } else if question.query_type() == RecordType::A {
            for index in 0..BIG_ANSWER_RECORDS {
                response.add_answer(record(Ipv4Addr::new(10, 203, 0, index)));
            }
        }
    } else if let Some(ip) = names.get(&name) {
        if question.query_type() == RecordType::A {
            response.add_answer(record(*ip));
        }
    } else {
        response.set_response_code(ResponseCode::NXDomain);
    }
    response.to_vec().ok()
}
