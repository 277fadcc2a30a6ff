//! The DNS proxy's listeners and forwarder over loopback (no namespaces, no root): a fake
//! upstream on 127.0.0.1 answers, truncates or stays silent, and clients query the proxy over
//! UDP and TCP.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::*;
use crate::net::NetworkAddress;
use crate::state::tests::workload;
use crate::state::{Service, Snapshot};

const CLIENT: &str = "cluster//Pod/default/client";
/// Bounds every wait so a broken proxy fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

/// A loopback upstream: `silent.*` gets nothing, `big.*` is truncated over UDP and answered
/// with 30 records over TCP, anything else one A record. Counts what it receives.
struct Upstream {
    address: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Upstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let address = udp.local_addr().expect("address");
        let tcp = TcpListener::bind(address)
            .await
            .expect("bind tcp on the same port");
        let udp_queries: Arc<AtomicUsize> = Arc::default();
        let tcp_queries: Arc<AtomicUsize> = Arc::default();
        let counter = Arc::clone(&udp_queries);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            while let Ok((length, peer)) = udp.recv_from(&mut buffer).await {
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(answer) = upstream_answer(&buffer[..length], false) {
                    let _ = udp.send_to(&answer, peer).await;
                }
            }
        });
        let counter = Arc::clone(&tcp_queries);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                let Ok(length) = stream.read_u16().await else {
                    continue;
                };
                let mut query = vec![0u8; usize::from(length)];
                if stream.read_exact(&mut query).await.is_err() {
                    continue;
                }
                if let Some(answer) = upstream_answer(&query, true) {
                    let prefix = u16::try_from(answer.len()).expect("fits");
                    let _ = stream.write_all(&prefix.to_be_bytes()).await;
                    let _ = stream.write_all(&answer).await;
                }
            }
        });
        Upstream {
            address,
            udp_queries,
            tcp_queries,
        }
    }
}

fn upstream_answer(query: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries().first()?.clone();
    let name = question.name().to_ascii();
    if name.starts_with("silent.") {
        return None;
    }
    let mut answer = Message::new();
    answer
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .add_query(question.clone());
    let count = if name.starts_with("big.") { 30 } else { 1 };
    if name.starts_with("big.") && !over_tcp {
        answer.set_truncated(true);
    } else {
        for index in 0..count {
            let ip = Ipv4Addr::new(192, 0, 2, index);
            answer.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(ip)),
            ));
        }
    }
    answer.to_vec().ok()
}

struct Proxy {
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: Arc<Metrics>,
    learned: Arc<crate::state::learned::LearnedDestinations>,
    _drain: Drain,
}

/// A hostname-only ServiceEntry for `*.partner.example`, port 443, exported everywhere.
fn partner_entry() -> crate::state::egress::Egress {
    use crate::state::egress::{
        Egress, ExportTo, Location, Resolution, ServiceEntry, ServiceEntryPort,
    };
    Egress {
        service_entries: vec![Arc::new(ServiceEntry {
            namespace: "egress".into(),
            name: "partner".into(),
            hosts: vec!["*.partner.example".into()],
            addresses: Vec::new(),
            ports: vec![ServiceEntryPort {
                number: 443,
                name: "tls".into(),
                protocol: "TLS".into(),
                target_port: None,
            }],
            location: Location::MeshExternal,
            resolution: Resolution::Dns,
            endpoints: Vec::new(),
            export_to: ExportTo::All,
            waypoint: None,
        })],
        ..Egress::default()
    }
}

async fn proxy(upstream: SocketAddr, max_forwards: usize, forward_timeout: Duration) -> Proxy {
    let echo = Service {
        name: "echo".to_string(),
        namespace: "default".to_string(),
        hostname: "echo.default.svc.cluster.local".to_string(),
        vips: vec![NetworkAddress {
            network: String::new(),
            ip: "10.96.0.10".parse().expect("vip"),
        }],
        ports: std::collections::BTreeMap::from([(80, 80)]),
        subject_alt_names: Vec::new(),
        waypoint: None,
    };
    let client = workload("default", "client", Ipv4Addr::new(10, 200, 1, 2));
    let snapshot = Snapshot::new(vec![client], vec![echo], Vec::new()).with_egress(partner_entry());
    let metrics = Arc::new(Metrics::new());
    let inputs = DnsInputs {
        state: Arc::new(StateStore::new(snapshot)),
        metrics: metrics.clone(),
        settings: Arc::new(DnsSettings {
            domains: Domains::new("cluster.local"),
            upstreams: vec![upstream].into(),
            forward_timeout,
            max_forwards_per_pod: max_forwards,
            max_tcp_connections_per_pod: 2,
            learned: crate::state::learned::LearnedLimits::default(),
        }),
    };
    let sockets = SocketFactory::node();
    let listeners = DnsListeners::bind_port(&sockets, 0).expect("bind");
    let udp = listeners.udp[0].local_addr().expect("udp address");
    let tcp = listeners.tcp[0].local_addr().expect("tcp address");
    let drain = Drain::new();
    let learned = Arc::new(crate::state::learned::LearnedDestinations::default());
    DnsProxy::new(
        inputs,
        CLIENT.to_string(),
        sockets,
        drain.clone(),
        learned.clone(),
    )
    .spawn(listeners);
    Proxy {
        udp,
        tcp,
        metrics,
        learned,
        _drain: drain,
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
    message.to_vec().expect("encode")
}

async fn ask_udp(proxy: SocketAddr, message: &[u8]) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(message, proxy).await.expect("send");
    let mut buffer = vec![0u8; 65535];
    let length = tokio::time::timeout(PATIENCE, socket.recv(&mut buffer))
        .await
        .expect("an answer in time")
        .expect("recv");
    Message::from_vec(&buffer[..length]).expect("answer decodes")
}

async fn ask_tcp(stream: &mut TcpStream, message: &[u8]) -> Message {
    let prefix = u16::try_from(message.len()).expect("fits");
    stream
        .write_all(&prefix.to_be_bytes())
        .await
        .expect("write");
    stream.write_all(message).await.expect("write");
    let read = async {
        let length = stream.read_u16().await?;
        let mut answer = vec![0u8; usize::from(length)];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("an answer in time")
        .expect("read");
    Message::from_vec(&answer).expect("answer decodes")
}

#[tokio::test]
async fn forwards_relays_retries_over_tcp_and_fails_with_servfail() {
    let upstream = Upstream::start().await;
    let proxy = proxy(upstream.address, 8, Duration::from_millis(500)).await;

    let mesh = ask_udp(proxy.udp, &query(1, "echo.")).await;
    assert_eq!(mesh.answers().len(), 1);
    assert_eq!(
        upstream.udp_queries.load(Ordering::Relaxed),
        0,
        "mesh names stay local"
    );

    let external = ask_udp(proxy.udp, &query(2, "www.example.org.")).await;
    assert_eq!(external.id(), 2);
    assert_eq!(external.answers()[0].data().to_string(), "192.0.2.0");

    let mut stream = TcpStream::connect(proxy.tcp).await.expect("connect");
    let big = ask_tcp(&mut stream, &query(3, "big.example.org.")).await;
    assert_eq!(big.answers().len(), 30, "TC over UDP is retried over TCP");
    assert_eq!(upstream.tcp_queries.load(Ordering::Relaxed), 1);
    let again = ask_tcp(&mut stream, &query(4, "echo.")).await;
    assert_eq!(again.id(), 4, "a TCP connection carries several queries");

    let silent = ask_udp(proxy.udp, &query(5, "silent.example.org.")).await;
    assert_eq!(silent.response_code(), ResponseCode::ServFail);
    assert_eq!(silent.id(), 5);

    let text = proxy
        .metrics
        .encode(&crate::telemetry::metrics::AgentSample::default(), false);
    for needle in [
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\",source_canonical_service=\"client\",source_canonical_revision=\"unknown\"} 3",
        "istio_dns_upstream_requests_total{request_query_type=\"a\",request_protocol=\"tcp\"",
        "istio_dns_upstream_failures_total{request_query_type=\"a\",request_protocol=\"udp\",source_canonical_service=\"client\",source_canonical_revision=\"unknown\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn a_flooding_pod_is_refused_beyond_its_forward_limit() {
    let upstream = Upstream::start().await;
    let proxy = proxy(upstream.address, 1, Duration::from_secs(3)).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    // The first takes the only permit and waits on a silent upstream.
    socket
        .send_to(&query(10, "silent.example.org."), proxy.udp)
        .await
        .expect("send");
    let mut buffer = vec![0u8; 4096];
    socket
        .send_to(&query(11, "www.example.org."), proxy.udp)
        .await
        .expect("send");
    let length = tokio::time::timeout(PATIENCE, socket.recv(&mut buffer))
        .await
        .expect("an answer in time")
        .expect("recv");
    let refused = Message::from_vec(&buffer[..length]).expect("decode");
    assert_eq!(refused.id(), 11);
    assert_eq!(refused.response_code(), ResponseCode::Refused);
    // Mesh names need no permit.
    let mesh = ask_udp(proxy.udp, &query(12, "echo.")).await;
    assert_eq!(mesh.response_code(), ResponseCode::NoError);
}

#[tokio::test]
async fn tcp_clients_are_bounded_and_oversized_prefixes_close_the_connection() {
    let upstream = Upstream::start().await;
    let first_proxy = proxy(upstream.address, 8, Duration::from_secs(1)).await;
    let mut oversized = TcpStream::connect(first_proxy.tcp).await.expect("connect");
    oversized.write_all(&[0xff, 0xff]).await.expect("write");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(PATIENCE, oversized.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    // Two connections are allowed; a third is closed without an answer. (Another proxy, so
    // the closed connection's permit is surely not still held.)
    let proxy = proxy(upstream.address, 8, Duration::from_secs(1)).await;
    let mut first = TcpStream::connect(proxy.tcp).await.expect("connect");
    let mut second = TcpStream::connect(proxy.tcp).await.expect("connect");
    assert_eq!(ask_tcp(&mut first, &query(1, "echo.")).await.id(), 1);
    assert_eq!(ask_tcp(&mut second, &query(2, "echo.")).await.id(), 2);
    let mut third = TcpStream::connect(proxy.tcp).await.expect("connect");
    let _ = third.write_all(&[0, 12]).await;
    let refused = tokio::time::timeout(PATIENCE, third.read(&mut byte)).await;
    assert!(matches!(refused, Ok(Ok(0)) | Ok(Err(_))), "{refused:?}");
}

/// Slowloris on the DNS proxy's TCP port: clients that send half a length prefix or half a
/// message and stall hold the pod's two TCP slots only until the idle timeout closes them; then
/// the next client is answered. (Paused clock: the timeout passes without waiting for it.)
#[tokio::test(start_paused = true)]
async fn stalled_tcp_queries_are_closed_and_free_their_slots() {
    let upstream = Upstream::start().await;
    let proxy = proxy(upstream.address, 8, Duration::from_secs(1)).await;
    let mut half_prefix = TcpStream::connect(proxy.tcp).await.expect("connect");
    half_prefix.write_all(&[0]).await.expect("write");
    let mut half_message = TcpStream::connect(proxy.tcp).await.expect("connect");
    half_message
        .write_all(&[0, 40, 0x12, 0x34, 0x01])
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    for (name, stalled) in [
        ("half a length prefix", &mut half_prefix),
        ("half a message", &mut half_message),
    ] {
        let closed =
            tokio::time::timeout(2 * server::TCP_IDLE_TIMEOUT, stalled.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "{name}: {closed:?}"
        );
    }
    let mut next = TcpStream::connect(proxy.tcp).await.expect("connect");
    assert_eq!(ask_tcp(&mut next, &query(3, "echo.")).await.id(), 3);
}

#[tokio::test]
async fn answers_for_allowed_hosts_teach_the_pods_egress_set() {
    let upstream = Upstream::start().await;
    let proxy = proxy(upstream.address, 8, Duration::from_secs(2)).await;
    let now = || tokio::time::Instant::now();
    let first: std::net::IpAddr = Ipv4Addr::new(192, 0, 2, 0).into();

    // A name no ServiceEntry allows teaches nothing.
    ask_udp(proxy.udp, &query(1, "api.other.example.")).await;
    assert!(proxy.learned.is_empty());
    // A mesh name answered locally teaches nothing either.
    ask_udp(proxy.udp, &query(2, "echo.default.svc.cluster.local.")).await;
    assert!(proxy.learned.is_empty());

    // An allowed name: the relayed answer's address is learned, with the entry and the name.
    let answer = ask_udp(proxy.udp, &query(3, "API.partner.example.")).await;
    assert_eq!(answer.answers().len(), 1);
    let grants = proxy.learned.grants(first, now()).expect("learned");
    assert_eq!(&*grants[0].entry.name, "partner");
    assert_eq!(&*grants[0].host, "api.partner.example");

    // A large answer fetched over TCP teaches every address in it (30 here), even though the
    // UDP client only got a truncated reply and must ask again over TCP.
    let truncated = ask_udp(proxy.udp, &query(4, "big.partner.example.")).await;
    assert!(truncated.truncated());
    assert_eq!(proxy.learned.len(), 30);
}
