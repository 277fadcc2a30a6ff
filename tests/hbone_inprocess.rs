//! In-process HBONE tests on loopback: the client pool and the server connection handling,
//! with real TLS from the built-in CA, but no namespaces (so no root needed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nodetunnel::config::agent::{PoolConfig, ProxyConfig};
use nodetunnel::drain::Drain;
use nodetunnel::hbone::stream::H2Stream;
use nodetunnel::hbone::{self, Authority, ConnectRequest, H2Settings, TraceParent};
use nodetunnel::identity::ca::BuiltinCa;
use nodetunnel::identity::CertificateManager;
use nodetunnel::net::{ClientAddr, UpstreamAddr};
use nodetunnel::proxy::pool::{Pool, PoolError, PoolKey, PoolSettings};
use nodetunnel::socket::SocketFactory;
use nodetunnel::spiffe::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const REJECTED_PORT: u16 = 9;

fn identity(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .expect("identity")
}

fn certificates() -> Arc<CertificateManager> {
    let (cert, key) = BuiltinCa::generate_root("test root").expect("root");
    let ca = BuiltinCa::from_pem(&cert, &key, Duration::from_secs(3600)).expect("ca");
    Arc::new(CertificateManager::new(Arc::new(ca)))
}

/// An HBONE server for `server` on loopback: answers 400 for port 9, otherwise 200 and echoes.
/// Returns its address and the number of TCP connections it accepted.
async fn server(certificates: Arc<CertificateManager>) -> (SocketAddr, Arc<AtomicUsize>) {
    server_accepting(certificates, usize::MAX).await
}

/// [`server`], but its listener closes after `limit` connections, so later connects are refused.
async fn server_accepting(
    certificates: Arc<CertificateManager>,
    limit: usize,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let certificate = certificates.fetch(&identity("server")).await.expect("cert");
    let acceptor = TlsAcceptor::from(certificate.server_config());
    let settings = H2Settings::from(&ProxyConfig::default());
    tokio::spawn(async move {
        let drain = Drain::new();
        while let Ok((tcp, _)) = listener.accept().await {
            serve_one(tcp, acceptor.clone(), settings.clone(), drain.clone());
            if count.fetch_add(1, Ordering::SeqCst) + 1 >= limit {
                return;
            }
        }
    });
    (address, accepted)
}

fn serve_one(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    settings: H2Settings,
    drain: Drain,
) {
    tokio::spawn(async move {
        let Ok(tls) = acceptor.accept(tcp).await else {
            return;
        };
        let _ = hbone::server::serve(tls, &settings, &drain, |request, mut respond| async move {
            match hbone::parse_connect(&request) {
                Ok(parsed) if parsed.authority.port() != REJECTED_PORT => {
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .expect("respond");
                    let stream = H2Stream::new(send, request.into_body());
                    let (mut read, mut write) = tokio::io::split(stream);
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                }
                _ => hbone::server::reject(respond, http::StatusCode::BAD_REQUEST),
            }
        })
        .await;
    });
}

fn pool(certificates: Arc<CertificateManager>, max_streams: u32) -> Pool {
    pool_with(
        certificates,
        PoolConfig {
            max_streams_per_connection: max_streams,
            ..PoolConfig::default()
        },
    )
}

fn pool_with(certificates: Arc<CertificateManager>, pool: PoolConfig) -> Pool {
    Pool::new(
        SocketFactory::node(),
        certificates,
        PoolSettings {
            pool,
            h2: H2Settings::from(&ProxyConfig::default()),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
        },
    )
}

fn key(peer: SocketAddr, expected: &str) -> PoolKey {
    PoolKey {
        shard: 0,
        source_identity: identity("client"),
        expected_identities: vec![identity(expected)],
        peer: UpstreamAddr(peer),
        source_ip: "127.0.0.1".parse().expect("ip"),
    }
}

fn request(port: u16) -> ConnectRequest {
    ConnectRequest {
        authority: Authority::Address(SocketAddr::from(([127, 0, 0, 1], port))),
        client: ClientAddr("127.0.0.1:40000".parse().expect("addr")),
        service_host: None,
        baggage: String::new(),
        traceparent: TraceParent::random(),
    }
}

async fn echo(stream: &mut H2Stream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut buffer = vec![0u8; message.len()];
    stream.read_exact(&mut buffer).await.expect("read");
    buffer
}

/// Opens `count` tunnels at once, each echoing its own message, and returns them open.
async fn concurrent_tunnels(pool: &Pool, key: &PoolKey, count: usize) -> Vec<H2Stream> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move {
                let mut stream = pool.connect(&key, &request(8080)).await.expect("tunnel");
                let message = format!("hello {i}");
                assert_eq!(
                    echo(&mut stream, message.as_bytes()).await,
                    message.as_bytes()
                );
                stream
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in tasks {
        held.push(task.await.expect("task"));
    }
    held
}

/// Opens tunnels one after the other until `held` has `count`.
async fn open_until(pool: &Pool, key: &PoolKey, held: &mut Vec<H2Stream>, count: usize) {
    while held.len() < count {
        held.push(pool.connect(key, &request(8080)).await.expect("tunnel"));
    }
}

#[tokio::test]
async fn concurrent_first_requests_share_one_handshake() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = pool(certificates, 100);
    let key = key(address, "server");
    concurrent_tunnels(&pool, &key, 20).await;
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one TCP+TLS connection for all 20 tunnels"
    );
}

#[tokio::test]
async fn streams_beyond_the_limit_open_a_second_connection() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = pool(certificates, 2);
    let key = key(address, "server");
    let mut held = Vec::new();
    open_until(&pool, &key, &mut held, 3).await;
    assert_eq!(pool.connection_count(), 2);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    for stream in &mut held {
        assert_eq!(echo(stream, b"still fine").await, b"still fine");
    }
}

#[tokio::test]
async fn a_refused_stream_leaves_its_siblings_flowing() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = pool(certificates, 100);
    let key = key(address, "server");
    let mut good = pool.connect(&key, &request(8080)).await.expect("tunnel");
    for _ in 0..3 {
        let refused = pool.connect(&key, &request(REJECTED_PORT)).await;
        let error = refused.err().expect("port 9 is refused");
        assert!(
            matches!(&error, PoolError::Hbone(hbone::client::ClientError::Status(status)) if *status == 400),
            "{error}"
        );
        assert_eq!(
            echo(&mut good, b"ping").await,
            b"ping",
            "sibling stream unharmed"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "still the same connection"
    );
}

#[tokio::test]
async fn a_peer_with_an_unexpected_identity_is_refused_and_not_pooled() {
    let certificates = certificates();
    let (address, _) = server(certificates.clone()).await;
    let pool = pool(certificates, 100);
    let result = pool
        .connect(&key(address, "someone-else"), &request(8080))
        .await;
    let error = result.err().expect("must be refused").to_string();
    assert!(error.contains("TLS handshake"), "{error}");
    assert_eq!(pool.connection_count(), 0);
}

/// A TLS server on loopback presenting a leaf for `sa/server` signed by the mesh root
/// (`root_cert`, `root_key`) but valid from `starts` hours from now for 2 hours; it accepts one
/// connection, so a refused handshake is the only thing it does.
async fn server_with_validity(root_cert: &str, root_key: &str, starts: i64) -> SocketAddr {
    let issuer_key = rcgen::KeyPair::from_pem(root_key).expect("root key");
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(root_cert)
        .expect("root cert")
        .self_signed(&issuer_key)
        .expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    let san = identity("server").to_string();
    params.subject_alt_names = vec![rcgen::SanType::URI(san.as_str().try_into().expect("uri"))];
    let start = time::OffsetDateTime::now_utc() + time::Duration::hours(starts);
    params.not_before = start;
    params.not_after = start + time::Duration::hours(2);
    let leaf = params.signed_by(&key, &issuer, &issuer_key).expect("leaf");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    address
}

#[tokio::test]
async fn a_peer_whose_certificate_is_expired_or_not_yet_valid_is_refused() {
    let (root_cert, root_key) = BuiltinCa::generate_root("test root").expect("root");
    let ca = BuiltinCa::from_pem(&root_cert, &root_key, Duration::from_secs(3600)).expect("ca");
    let certificates = Arc::new(CertificateManager::new(Arc::new(ca)));
    for (case, starts) in [("expired", -3), ("not yet valid", 1)] {
        let address = server_with_validity(&root_cert, &root_key, starts).await;
        let pool = pool(certificates.clone(), 100);
        let result = pool.connect(&key(address, "server"), &request(8080)).await;
        let error = result
            .err()
            .unwrap_or_else(|| panic!("{case}: must be refused"));
        assert!(
            error.to_string().contains("TLS handshake"),
            "{case}: {error}"
        );
        assert_eq!(pool.connection_count(), 0, "{case}");
    }
    // Control: the same server with a current certificate gets past TLS (it then fails only
    // because it speaks no HTTP/2), so the refusals above are about validity.
    let address = server_with_validity(&root_cert, &root_key, -1).await;
    let pool = pool(certificates, 100);
    let result = pool.connect(&key(address, "server"), &request(8080)).await;
    let error = result.err().expect("no HTTP/2 behind the TLS").to_string();
    assert!(
        !error.contains("TLS handshake"),
        "current certificate refused: {error}"
    );
}

#[tokio::test]
async fn idle_connections_are_kept_unless_the_idle_timeout_is_zero() {
    // (idle timeout, streams per connection, handshakes for 3 tunnels one after the other,
    //  pooled connections once they ended)
    let cases = [
        (Duration::from_secs(300), 100, 1, 1),
        (Duration::from_secs(300), 1, 1, 1),
        (Duration::ZERO, 100, 3, 0),
        (Duration::ZERO, 1, 3, 0),
    ];
    for (idle_timeout, max_streams, handshakes, pooled) in cases {
        let certificates = certificates();
        let (address, accepted) = server(certificates.clone()).await;
        let pool = pool_with(
            certificates,
            PoolConfig {
                max_streams_per_connection: max_streams,
                idle_timeout,
                ..PoolConfig::default()
            },
        );
        let key = key(address, "server");
        for _ in 0..3 {
            let mut stream = pool.connect(&key, &request(8080)).await.expect("tunnel");
            assert_eq!(echo(&mut stream, b"ping").await, b"ping");
        }
        let case = format!("idle {idle_timeout:?}, {max_streams} streams per connection");
        assert_eq!(accepted.load(Ordering::SeqCst), handshakes, "{case}");
        assert_eq!(pool.connection_count(), pooled, "{case}");
    }
}

#[tokio::test]
async fn after_a_burst_a_key_keeps_one_idle_connection() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = pool(certificates, 2);
    let key = key(address, "server");
    let mut held = Vec::new();
    open_until(&pool, &key, &mut held, 6).await;
    assert_eq!(
        pool.connection_count(),
        3,
        "a burst of 6 tunnels, 2 per connection"
    );
    held.clear();
    assert_eq!(
        pool.connection_count(),
        1,
        "the burst's extra connections closed with their last tunnel"
    );
    let mut stream = pool.connect(&key, &request(8080)).await.expect("tunnel");
    assert_eq!(echo(&mut stream, b"warm").await, b"warm");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "the next tunnel used the idle connection"
    );
}

#[tokio::test]
async fn one_stream_per_connection_opens_concurrent_tunnels_on_their_own_connections() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = pool_with(
        certificates,
        PoolConfig {
            max_streams_per_connection: 1,
            idle_timeout: Duration::ZERO,
            ..PoolConfig::default()
        },
    );
    let key = key(address, "server");
    let held = concurrent_tunnels(&pool, &key, 4).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    assert_eq!(pool.connection_count(), 4);
    drop(held);
    assert_eq!(pool.connection_count(), 0, "closed with their last tunnel");
}

fn spreading_pool(certificates: Arc<CertificateManager>, above: u32, connections: u32) -> Pool {
    pool_with(
        certificates,
        PoolConfig {
            spread_above: above,
            spread_connections: Some(connections),
            ..PoolConfig::default()
        },
    )
}

#[tokio::test]
async fn busy_connections_spread_new_streams_up_to_the_cap() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = spreading_pool(certificates, 2, 3);
    let key = key(address, "server");
    let mut held = Vec::new();
    // (tunnels held, connections expected): the 3rd and 5th tunnel find every connection at
    // 2 streams and open another; the 2nd, 4th and 6th join the least loaded; past 3
    // connections everything shares.
    for (tunnels, connections) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (12, 3)] {
        open_until(&pool, &key, &mut held, tunnels).await;
        assert_eq!(pool.connection_count(), connections, "{tunnels} tunnels");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    for (i, stream) in held.iter_mut().enumerate() {
        let message = format!("tunnel {i}");
        assert_eq!(echo(stream, message.as_bytes()).await, message.as_bytes());
    }
}

#[tokio::test]
async fn one_spread_connection_keeps_every_stream_on_one_connection() {
    let certificates = certificates();
    let (address, accepted) = server(certificates.clone()).await;
    let pool = spreading_pool(certificates, 1, 1);
    let key = key(address, "server");
    let mut held = Vec::new();
    open_until(&pool, &key, &mut held, 5).await;
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_extra_connection_falls_back_to_sharing() {
    let certificates = certificates();
    // The peer takes one connection and then refuses: spreading must not cost the tunnel.
    let (address, accepted) = server_accepting(certificates.clone(), 1).await;
    let pool = spreading_pool(certificates, 1, 4);
    let key = key(address, "server");
    let mut held = Vec::new();
    open_until(&pool, &key, &mut held, 3).await;
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    for stream in &mut held {
        assert_eq!(echo(stream, b"shared").await, b"shared");
    }
}
