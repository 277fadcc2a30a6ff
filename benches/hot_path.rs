//! Criterion micro-benchmarks for the per-connection hot pieces: the route decision, the
//! authorization evaluation over many policies, CONNECT build and parse, the copy loop, and
//! the mTLS handshake of a cold HBONE connection (both sides, in memory) and its parts.
//!
//! These measure the pure cores (and the copy loop over in-memory duplex pipes), not the
//! network; `scripts/bench` measures the real path. Run with `cargo bench --bench hot_path`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use nodetunnel::authz::{evaluate, AuthzOptions, ConnectionFacts};
use nodetunnel::hbone::{baggage, parse_connect, Authority, ConnectRequest, TraceParent};
use nodetunnel::net::{ClientAddr, OriginalDst};
use nodetunnel::proxy::copy::bidirectional;
use nodetunnel::proxy::route::decide;
use nodetunnel::spiffe::Identity;
use nodetunnel::state::policy::{Match, Policy, PolicyAction, PolicyScope, StringMatch};
use nodetunnel::state::{HealthStatus, Service, Snapshot, TunnelProtocol, Workload};

fn workload(name: &str, ip: Ipv4Addr, services: &[(&str, u16, u16)]) -> Workload {
    let mut service_ports: BTreeMap<String, BTreeMap<u16, u16>> = BTreeMap::new();
    for (key, port, target) in services {
        service_ports
            .entry(key.to_string())
            .or_default()
            .insert(*port, *target);
    }
    Workload {
        uid: format!("cluster1//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        trust_domain: "cluster.local".into(),
        identity: Identity::new("cluster.local", "default", name).expect("identity"),
        workload_ips: vec![IpAddr::V4(ip)],
        protocol: TunnelProtocol::Hbone,
        node: "node-b".into(),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        application_tunnel: None,
        services: service_ports,
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        canonical_name: name.into(),
        canonical_revision: "latest".into(),
        workload_name: name.into(),
        workload_type: "deployment".into(),
        cluster_id: "Kubernetes".into(),
        authorization_policies: Vec::new(),
        status: HealthStatus::Healthy,
    }
}

/// 1 000 workloads, 100 services with 10 endpoints each; the client is workload 0.
fn snapshot() -> (Snapshot, Workload) {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for service in 0..100u16 {
        let hostname = format!("svc{service}.default.svc.cluster.local");
        services.push(Service {
            name: format!("svc{service}"),
            namespace: "default".into(),
            hostname: hostname.clone(),
            vips: vec![format!("/10.96.0.{}", service + 1).parse().expect("vip")],
            ports: [(80u16, 8080u16)].into_iter().collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        });
        let key = format!("default/{hostname}");
        for endpoint in 0..10u16 {
            let index = service * 10 + endpoint;
            let ip = Ipv4Addr::new(10, 1, (index / 250) as u8, (index % 250) as u8 + 2);
            workloads.push(workload(&format!("w{index}"), ip, &[(&key, 80, 8080)]));
        }
    }
    let client = workloads[0].clone();
    (Snapshot::new(workloads, services, Vec::new()), client)
}

fn route(criterion: &mut Criterion) {
    let (snapshot, client) = snapshot();
    let mut group = criterion.benchmark_group("route_decide");
    let cases = [
        ("service_vip", SocketAddr::from(([10, 96, 0, 50], 80))),
        ("workload_ip", SocketAddr::from(([10, 1, 2, 7], 8080))),
        ("passthrough", SocketAddr::from(([192, 0, 2, 1], 443))),
    ];
    for (name, destination) in cases {
        let mut pick = 0u64;
        group.bench_function(name, |bench| {
            bench.iter(|| {
                pick = pick.wrapping_add(1);
                decide(&snapshot, &client, OriginalDst(destination), 15008, pick)
            })
        });
    }
    group.finish();
}

fn policy(index: usize) -> Policy {
    let principal = format!("cluster.local/ns/ns{index}/sa/client{index}");
    Policy {
        name: format!("allow-{index}"),
        namespace: "default".into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Allow,
        dry_run: false,
        rules: vec![vec![
            vec![Match {
                principals: vec![StringMatch::Exact(principal)],
                ..Match::default()
            }],
            vec![Match {
                destination_ports: vec![8080, 9090],
                ..Match::default()
            }],
        ]],
    }
}

fn authorization(criterion: &mut Criterion) {
    let destination = workload("server", Ipv4Addr::new(10, 1, 0, 2), &[]);
    let mut group = criterion.benchmark_group("authz_evaluate");
    for count in [10usize, 100, 1000] {
        let policies: Vec<Policy> = (0..count).map(policy).collect();
        // The last policy allows, so every candidate is looked at.
        let last = count - 1;
        let facts = ConnectionFacts {
            source_identity: Some(
                Identity::new(
                    "cluster.local",
                    &format!("ns{last}"),
                    &format!("client{last}"),
                )
                .expect("identity"),
            ),
            source_ip: IpAddr::from([10, 1, 0, 9]),
            destination_ip: IpAddr::from([10, 1, 0, 2]),
            destination_port: 8080,
        };
        let options = AuthzOptions::default();
        group.throughput(Throughput::Elements(count as u64));
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |bench, _| {
            bench.iter(|| evaluate(&policies, &destination, &facts, &options))
        });
    }
    group.finish();
}

fn connect(criterion: &mut Criterion) {
    let client = workload("client", Ipv4Addr::new(10, 1, 0, 2), &[]);
    let request = ConnectRequest {
        authority: Authority::Address(SocketAddr::from(([10, 1, 0, 3], 8080))),
        client: ClientAddr(SocketAddr::from(([10, 1, 0, 2], 41234))),
        service_host: Some("svc1.default.svc.cluster.local".into()),
        baggage: baggage(&client),
        traceparent: TraceParent::random(),
    };
    let built = request.build().expect("build");
    let mut group = criterion.benchmark_group("hbone_connect");
    group.bench_function("build", |bench| bench.iter(|| request.build()));
    group.bench_function("parse", |bench| bench.iter(|| parse_connect(&built)));
    group.finish();
}

/// Pushes `total` bytes in `chunk`-sized writes through `bidirectional` between two duplex
/// pipes and reads them at the far end.
async fn copy_through(total: usize, chunk: usize) {
    let (mut client, proxy_down) = tokio::io::duplex(256 * 1024);
    let (proxy_up, mut server) = tokio::io::duplex(256 * 1024);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let proxy = bidirectional(proxy_down, proxy_up, &sent, &received);
    let peers = async move {
        let data = vec![1u8; chunk];
        let writer = async {
            let mut left = total;
            while left > 0 {
                let size = left.min(chunk);
                client.write_all(&data[..size]).await.expect("write");
                left -= size;
            }
            client.shutdown().await.expect("shutdown");
            client
        };
        let reader = async {
            let mut buffer = vec![0u8; 256 * 1024];
            let mut seen = 0;
            while seen < total {
                seen += server.read(&mut buffer).await.expect("read");
            }
            server.shutdown().await.expect("shutdown");
        };
        let (_client, ()) = tokio::join!(writer, reader);
    };
    let (result, ()) = tokio::join!(proxy, peers);
    result.expect("copy");
}

fn copy(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = criterion.benchmark_group("copy_bidirectional");
    let total = 16 * 1024 * 1024;
    group.throughput(Throughput::Bytes(total as u64));
    for chunk in [1024usize, 16 * 1024, 256 * 1024] {
        group.bench_with_input(BenchmarkId::new("16MiB", chunk), &chunk, |bench, &chunk| {
            bench.iter(|| runtime.block_on(copy_through(total, chunk)))
        });
    }
    group.finish();
}

/// One mTLS handshake between two workloads of the built-in CA, both sides in this thread
/// over an in-memory pipe, with what the agents do right after it (the peer's identity and
/// the connection's validity): the CPU a cold HBONE connection spends in TLS, without the
/// network.
fn handshake(criterion: &mut Criterion) {
    use nodetunnel::identity::ca::BuiltinCa;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::danger::ClientCertVerifier;
    let (root, key) = BuiltinCa::generate_root("bench root").expect("root");
    let ca = BuiltinCa::from_pem(&root, &key, std::time::Duration::from_secs(3600)).expect("ca");
    let client_id: Identity = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .expect("id");
    let server_id: Identity = "spiffe://cluster.local/ns/default/sa/server"
        .parse()
        .expect("id");
    let client = ca.issue(&client_id).expect("client certificate");
    let server = ca.issue(&server_id).expect("server certificate");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let expected = [server_id];
    let mut group = criterion.benchmark_group("mtls");
    group.bench_function("handshake", |bench| {
        bench.iter(|| {
            runtime.block_on(async {
                let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                let connector = tokio_rustls::TlsConnector::from(client.client_config(&expected));
                let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
                let name = nodetunnel::tls::dummy_server_name();
                let (dialled, accepted) = tokio::join!(
                    connector.connect(name, client_io),
                    acceptor.accept(server_io)
                );
                let (dialled, accepted) = (dialled.expect("client"), accepted.expect("server"));
                let peer = accepted.get_ref().1;
                let identity = nodetunnel::tls::peer_identity(peer).expect("identity");
                let until =
                    nodetunnel::identity::connection_valid_until(&server, peer.peer_certificates());
                let client_until = nodetunnel::identity::connection_valid_until(
                    &client,
                    dialled.get_ref().1.peer_certificates(),
                );
                (identity, until, client_until)
            })
        })
    });
    let verifier =
        nodetunnel::tls::ServerIdentityVerifier::new(client.roots().clone(), expected.to_vec());
    let now = rustls::pki_types::UnixTime::now();
    let verify_server = |verifier: &nodetunnel::tls::ServerIdentityVerifier| {
        verifier
            .verify_server_cert(
                &server.chain()[0],
                &server.chain()[1..],
                &nodetunnel::tls::dummy_server_name(),
                &[],
                now,
            )
            .expect("verified")
    };
    group.bench_function("verify_server_chain", |bench| {
        bench.iter(|| verify_server(&verifier))
    });
    group.bench_function("verify_server_chain_first_time", |bench| {
        bench.iter(|| {
            verify_server(&nodetunnel::tls::ServerIdentityVerifier::new(
                client.roots().clone(),
                expected.to_vec(),
            ))
        })
    });
    let verifier =
        nodetunnel::tls::TrustDomainVerifier::new(server.roots().clone(), "cluster.local")
            .expect("verifier");
    group.bench_function("verify_client_chain", |bench| {
        bench.iter(|| {
            verifier
                .verify_client_cert(&client.chain()[0], &client.chain()[1..], now)
                .expect("verified")
        })
    });
    group.bench_function("client_config", |bench| {
        bench.iter(|| client.client_config(&expected))
    });
    group.finish();
}

criterion_group!(benches, route, authorization, connect, copy, handshake);
criterion_main!(benches);
