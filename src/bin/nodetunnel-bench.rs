//! Load generators for `scripts/bench`: the small TCP programs Debian has no package for.
//!
//! It sits outside the agent entirely: the bench script runs it inside the client and server pod
//! namespaces, once with no agent (the direct baseline) and once with the pods captured, so the
//! same client produces both figures. Each client mode prints one JSON object on stdout.
//!
//! - `serve`: an echo server (every byte read is written back) on one port.
//! - `conn-rate`: new connections per second, each echoing one byte, from a few workers.
//! - `latency`: 1 KiB request/response at a fixed rate over one connection; p50/p90/p99.
//! - `idle`: opens N connections (each echoes one byte, so the proxied path is set up end to
//!   end), writes a ready file, holds until a release file exists, then closes them all.
//! - `dns-serve`: a UDP DNS server answering every A query with one address at once (the
//!   upstream of the DNS rows; dnsperf is the client).
//! - `relay`: the least a tunnel can do (`scripts/bench-bound`): relays each accepted connection
//!   to one target, one copy per direction, in plain TCP, over TLS 1.3 with the agent's
//!   provider and suites (server authentication only), or over the agents' own mutual TLS
//!   (their configs, verifiers and read batching, SPIFFE certificates from a built-in CA), but
//!   no HTTP/2, so its cost bounds what the agents can reach.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Load generators for scripts/bench")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo server.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
    },
    /// Connections per second, one byte echoed on each.
    ConnRate {
        /// Echo server address.
        #[arg(long)]
        target: SocketAddr,
        /// How long to run.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Request/response latency at a fixed rate over one connection.
    Latency {
        /// Echo server address.
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// How long to run.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Request (and response) size in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Opens and holds idle connections.
    Idle {
        /// Echo server address.
        #[arg(long)]
        target: SocketAddr,
        /// How many connections.
        #[arg(long)]
        count: usize,
        /// Written once every connection is open.
        #[arg(long)]
        ready_file: PathBuf,
        /// Connections are closed once this file exists.
        #[arg(long)]
        release_file: PathBuf,
    },
    /// A UDP DNS server that answers every A query with `answer` (TTL 30), others empty.
    DnsServe {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:53")]
        listen: SocketAddr,
        /// The address every A answer carries.
        #[arg(long, default_value = "10.96.9.9")]
        answer: std::net::Ipv4Addr,
    },
    /// Relays every connection accepted on `listen` to `target` (the bound of scripts/bench-bound).
    Relay {
        /// What the relay speaks on each side.
        #[arg(long, value_enum)]
        kind: RelayKind,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Where each connection goes.
        #[arg(long)]
        target: SocketAddr,
        /// `tls-server` writes its self-signed certificate (PEM) here and `tls-client` trusts it;
        /// `mtls-server` writes its CA here (certificate, and the key in `<path>.key`) and
        /// `mtls-client` has the same CA issue its own certificate.
        #[arg(long)]
        certificate: Option<PathBuf>,
    },
}

/// The two sides of a relay.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RelayKind {
    /// TCP in, TCP out.
    Plain,
    /// TCP in, TLS out (as the client's agent).
    TlsClient,
    /// TLS in, TCP out (as the server's agent).
    TlsServer,
    /// TCP in, the agents' mutual TLS out: their client config, expecting the server's identity.
    MtlsClient,
    /// The agents' mutual TLS in (their server config: a client certificate of the trust
    /// domain required), TCP out.
    MtlsServer,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The relay stands in for an agent, so it gets the agent's runtime (a worker per core).
    let runtime = match cli.mode {
        Mode::Relay { .. } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(async move {
        match cli.mode {
            Mode::Serve { listen } => serve(listen).await,
            Mode::ConnRate {
                target,
                duration,
                concurrency,
            } => conn_rate(target, duration, concurrency).await,
            Mode::Latency {
                target,
                rate,
                duration,
                size,
            } => latency(target, rate, duration, size).await,
            Mode::Idle {
                target,
                count,
                ready_file,
                release_file,
            } => idle(target, count, &ready_file, &release_file).await,
            Mode::DnsServe { listen, answer } => dns_serve(listen, answer).await,
            Mode::Relay {
                kind,
                listen,
                target,
                certificate,
            } => relay(kind, listen, target, certificate.as_deref()).await,
        }
    })
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(4096)?;
    echo_each(TcpListener::from_std(socket.into())?).await
}

/// Echoes every connection `listener` accepts.
async fn echo_each(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(echo(stream));
    }
}

async fn dns_serve(listen: SocketAddr, answer: std::net::Ipv4Addr) -> Result<()> {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let socket = tokio::net::UdpSocket::bind(listen).await?;
    let mut buffer = vec![0u8; 4096];
    loop {
        let (length, peer) = socket.recv_from(&mut buffer).await?;
        let Ok(query) = Message::from_vec(&buffer[..length]) else {
            continue;
        };
        let mut response = Message::new();
        response
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .add_queries(query.queries().iter().cloned());
        for question in query.queries() {
            if question.query_type() == RecordType::A {
                let record = Record::from_rdata(question.name().clone(), 30, RData::A(A(answer)));
                response.add_answer(record);
            }
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if stream.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

async fn one_echo(target: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}

async fn conn_rate(target: SocketAddr, duration: Duration, concurrency: usize) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(5), one_echo(target)).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let connections = done.load(Ordering::Relaxed);
    for worker in workers {
        worker.await?;
    }
    let report = serde_json::json!({
        "connections": connections,
        "errors": errors.load(Ordering::Relaxed),
        "seconds": elapsed,
        "per_second": connections as f64 / elapsed,
    });
    println!("{report}");
    Ok(())
}

async fn latency(target: SocketAddr, rate: u64, duration: Duration, size: usize) -> Result<()> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let request = vec![0x5au8; size];
    let mut response = vec![0u8; size];
    // Warm up the path (pool, windows) before measuring.
    for _ in 0..100 {
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
    }
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let total = (duration.as_secs_f64() * rate as f64) as usize;
    let mut samples = Vec::with_capacity(total);
    let start = tokio::time::Instant::now();
    for index in 0..total {
        // Paced on a fixed schedule, but measured from the actual send: tokio's timer has 1 ms
        // granularity, so measuring from the scheduled instant would add timer lateness.
        let scheduled = start + interval * index as u32;
        tokio::time::sleep_until(scheduled).await;
        let sent = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    if samples.is_empty() {
        bail!("no samples");
    }
    samples.sort_by(f64::total_cmp);
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let report = serde_json::json!({
        "requests": samples.len(),
        "p50_us": percentile(0.50),
        "p90_us": percentile(0.90),
        "p99_us": percentile(0.99),
        "max_us": samples[samples.len() - 1],
    });
    println!("{report}");
    Ok(())
}

async fn idle(
    target: SocketAddr,
    count: usize,
    ready_file: &std::path::Path,
    release_file: &std::path::Path,
) -> Result<()> {
    let mut streams = Vec::with_capacity(count);
    let start = Instant::now();
    for _ in 0..count {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        stream.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        streams.push(stream);
    }
    let report = serde_json::json!({
        "open": streams.len(),
        "seconds": start.elapsed().as_secs_f64(),
    });
    std::fs::write(ready_file, report.to_string())?;
    while !release_file.exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(streams);
    println!("{report}");
    Ok(())
}

/// Copy buffer per direction of a relay: a few TLS records.
const RELAY_BUFFER: usize = 64 * 1024;
/// The name the TLS relays' certificate carries and the client side checks.
const RELAY_NAME: &str = "relay.bench.invalid";
/// The identities of the mutual-TLS relays' certificates.
const RELAY_SERVER_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/relay-server";
const RELAY_CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/relay-client";
/// Lifetime of the mutual-TLS relays' certificates: longer than any bench run.
const RELAY_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// How a relay wraps its connections.
#[derive(Clone)]
enum RelayTls {
    Plain,
    Connect(tokio_rustls::TlsConnector),
    Accept(tokio_rustls::TlsAcceptor),
    /// As the agents dial and accept: reads batched under TLS (`tls::BatchedReads`).
    MutualConnect(tokio_rustls::TlsConnector),
    MutualAccept(tokio_rustls::TlsAcceptor),
}

async fn relay(
    kind: RelayKind,
    listen: SocketAddr,
    target: SocketAddr,
    certificate: Option<&std::path::Path>,
) -> Result<()> {
    let tls = relay_tls(kind, certificate)?;
    relay_each(TcpListener::bind(listen).await?, tls, target).await
}

/// Relays every connection `listener` accepts to `target`, wrapped as `tls` says.
async fn relay_each(listener: TcpListener, tls: RelayTls, target: SocketAddr) -> Result<()> {
    loop {
        let (inbound, _) = listener.accept().await?;
        let tls = tls.clone();
        // iperf3 ends its streams with resets, so a relay's errors carry no news: the figure
        // that matters is iperf3's.
        tokio::spawn(async move { relay_one(&tls, inbound, target).await });
    }
}

fn relay_tls(kind: RelayKind, certificate: Option<&std::path::Path>) -> Result<RelayTls> {
    let path = || certificate.context("--certificate is required for a TLS relay");
    let provider = nodetunnel::tls::provider();
    match kind {
        RelayKind::Plain => Ok(RelayTls::Plain),
        RelayKind::TlsServer => {
            let generated = rcgen::generate_simple_self_signed(vec![RELAY_NAME.to_string()])?;
            std::fs::write(path()?, generated.cert.pem())?;
            let key =
                rustls::pki_types::PrivateKeyDer::Pkcs8(generated.key_pair.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(vec![generated.cert.der().clone()], key)?;
            Ok(RelayTls::Accept(Arc::new(config).into()))
        }
        RelayKind::TlsClient => {
            let pem = std::fs::read_to_string(path()?)?;
            let mut roots = rustls::RootCertStore::empty();
            for certificate in nodetunnel::tls::pem_certificates(&pem)? {
                roots.add(certificate)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(RelayTls::Connect(Arc::new(config).into()))
        }
        RelayKind::MtlsServer => {
            let (cert_pem, key_pem) =
                nodetunnel::identity::ca::BuiltinCa::generate_root("bench relay CA")?;
            std::fs::write(path()?, &cert_pem)?;
            std::fs::write(key_path(path()?), &key_pem)?;
            let certificate = relay_certificate(&cert_pem, &key_pem, RELAY_SERVER_IDENTITY)?;
            Ok(RelayTls::MutualAccept(certificate.server_config().into()))
        }
        RelayKind::MtlsClient => {
            let cert_pem = std::fs::read_to_string(path()?)?;
            let key_pem = std::fs::read_to_string(key_path(path()?))?;
            let certificate = relay_certificate(&cert_pem, &key_pem, RELAY_CLIENT_IDENTITY)?;
            let expected = [RELAY_SERVER_IDENTITY.parse()?];
            Ok(RelayTls::MutualConnect(
                certificate.client_config(&expected).into(),
            ))
        }
    }
}

fn key_path(certificate: &std::path::Path) -> PathBuf {
    let mut path = certificate.as_os_str().to_owned();
    path.push(".key");
    path.into()
}

/// A workload certificate for `identity` from the relays' CA, as an agent holds one.
fn relay_certificate(
    cert_pem: &str,
    key_pem: &str,
    identity: &str,
) -> Result<nodetunnel::identity::WorkloadCertificate> {
    let ca =
        nodetunnel::identity::ca::BuiltinCa::from_pem(cert_pem, key_pem, RELAY_CERTIFICATE_TTL)?;
    Ok(ca.issue(&identity.parse()?)?)
}

async fn relay_one(tls: &RelayTls, inbound: TcpStream, target: SocketAddr) -> Result<()> {
    let outbound = TcpStream::connect(target).await?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    match tls {
        RelayTls::Plain => copy_both(inbound, outbound).await,
        RelayTls::Connect(connector) => {
            let name = rustls::pki_types::ServerName::try_from(RELAY_NAME)?;
            copy_both(inbound, connector.connect(name, outbound).await?).await
        }
        RelayTls::Accept(acceptor) => copy_both(acceptor.accept(inbound).await?, outbound).await,
        RelayTls::MutualConnect(connector) => {
            let tls = connector
                .connect(
                    nodetunnel::tls::dummy_server_name(),
                    nodetunnel::tls::BatchedReads::new(outbound),
                )
                .await?;
            copy_both(inbound, tls).await
        }
        RelayTls::MutualAccept(acceptor) => {
            let tls = acceptor
                .accept(nodetunnel::tls::BatchedReads::new(inbound))
                .await?;
            copy_both(tls, outbound).await
        }
    }
}

async fn copy_both<A, B>(mut first: A, mut second: B) -> Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut first, &mut second, RELAY_BUFFER, RELAY_BUFFER)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mutual_tls_relays_carry_bytes_both_ways_to_the_echo_server() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let ca = directory.path().join("relay.pem");
        let echo_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_address = echo_listener.local_addr().expect("address");
        tokio::spawn(echo_each(echo_listener));
        // The server's relay writes the CA that the client's relay then has issue its certificate.
        let server_tls = relay_tls(RelayKind::MtlsServer, Some(&ca)).expect("server relay");
        let client_tls = relay_tls(RelayKind::MtlsClient, Some(&ca)).expect("client relay");
        let server_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_address = server_listener.local_addr().expect("address");
        tokio::spawn(relay_each(server_listener, server_tls, echo_address));
        let client_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client_address = client_listener.local_addr().expect("address");
        tokio::spawn(relay_each(client_listener, client_tls, server_address));

        let mut app = TcpStream::connect(client_address).await.expect("connect");
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&sent).await.expect("write");
        let mut received = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut received))
            .await
            .expect("echo within 10 s")
            .expect("read");
        assert!(received == sent, "the echo differs from what was sent");
    }
}
