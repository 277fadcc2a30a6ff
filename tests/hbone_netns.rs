//! Network-namespace tests of the HBONE data path (issue 2): two "nodes" each running a real
//! `nodetunnel` process, "pods" with ordinary TCP apps, and the node-to-node link captured.
//!
//! Topology (see `support::netns`): node `a` (pods 10.200.1.x) and node `b` (pods 10.200.2.x)
//! joined by one veth pair. The agents install the redirection rules in the pods they capture;
//! the harness's own rules (`support::netns::redirect_rules`) only serve its self-tests.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{Agent, ServiceSpec, READY_TIMEOUT};
use support::apps::{self, EchoServer, Reply};
use support::capture::{self, Capture};
use support::cluster::Cluster;
use support::logs::Log;
use support::netns::Topology;
use support::tls_probe::{self, Outcome};

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Two linked nodes `a` and `b`, with pods given as (node, pod role).
fn topology(pods: &[(&str, &str)]) -> Topology {
    Topology::linked_pair(pods)
}

// ---------------------------------------------------------------------------------------------
// Harness self-tests: no agent involved.

/// The topology alone routes pod to pod across nodes, the capture sees that plaintext on the
/// link (so the encryption test below cannot pass vacuously), and dropping the topology leaves
/// no namespace behind.
#[test]
fn harness_routes_pods_across_nodes_and_cleans_up() {
    require_netns!("harness_routes_pods_across_nodes_and_cleans_up");
    let topology = topology(&[("a", "client"), ("b", "server")]);
    let prefix = topology.prefix().to_string();
    let server = EchoServer::start(&topology, "server", APP_PORT, Reply::EchoThenTrailer)
        .expect("echo server");
    let link = topology.link_interface("a", "b");
    let capture = Capture::start(&topology.netns("a"), &link).expect("capture");

    let marker = b"HARNESS-PLAINTEXT-MARKER".to_vec();
    let payload = apps::payload(&marker, 4096, 7);
    let target = addr(topology.pod("server").ip, APP_PORT);
    let response = apps::exchange(&topology, "client", target, payload.clone(), IO_TIMEOUT)
        .expect("echo across nodes");

    let mut expected = payload.clone();
    expected.extend_from_slice(format!("EOF {}\n", payload.len()).as_bytes());
    assert!(
        response == expected,
        "echo response differs ({} bytes)",
        response.len()
    );
    assert_eq!(server.accepted(), 1);
    assert_eq!(server.bytes_received(), payload.len() as u64);
    assert_eq!(
        server.peers()[0].ip(),
        topology.pod("client").ip,
        "no NAT in the harness"
    );

    let segments = capture.finish().expect("pcap");
    let findings = capture::examine(&segments, &marker, APP_PORT);
    assert!(
        findings.marker_seen,
        "capture must see unencrypted traffic: {findings:?}"
    );

    drop(server);
    drop(topology);
    let leftovers = Topology::leftover_namespaces(&prefix).expect("ip netns list");
    assert!(
        leftovers.is_empty(),
        "namespaces left behind: {leftovers:?}"
    );
}

/// Cleanup also happens when a test panics halfway, with a process still inside a namespace.
#[test]
fn harness_cleans_up_after_a_panic() {
    require_netns!("harness_cleans_up_after_a_panic");
    let prefix = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sleeper = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (seen, spawned) = (prefix.clone(), sleeper.clone());
    let outcome = std::panic::catch_unwind(move || {
        let topology = topology(&[("a", "pod")]);
        *seen.lock().expect("lock") = topology.prefix().to_string();
        topology.install_redirect("pod").expect("nft");
        // A long-lived process inside the namespace must not keep it alive.
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &topology.netns("pod"), "sleep", "600"])
            .spawn()
            .expect("sleep");
        *spawned.lock().expect("lock") = Some(child);
        panic!("deliberate");
    });
    assert!(outcome.is_err());
    let child = sleeper.lock().expect("lock").take();
    let status = child
        .expect("sleep was spawned")
        .wait()
        .expect("reap sleep");
    assert!(
        !status.success(),
        "the process inside the namespace was killed"
    );
    let prefix = prefix.lock().expect("lock").clone();
    assert!(!prefix.is_empty());
    let leftovers = Topology::leftover_namespaces(&prefix).expect("ip netns list");
    assert!(
        leftovers.is_empty(),
        "namespaces left behind: {leftovers:?}"
    );
}

/// The redirection rules the tests install are accepted by nft and really redirect: with the
/// rules in a pod, a connection to any outside address lands on the pod's own port 15001.
#[test]
fn harness_redirect_rules_send_outbound_tcp_to_15001() {
    require_netns!("harness_redirect_rules_send_outbound_tcp_to_15001");
    let topology = topology(&[("a", "client"), ("b", "server")]);
    topology.install_redirect("client").expect("nft");
    let ruleset = topology
        .exec_role("client", &["nft", "list", "ruleset"])
        .expect("nft list");
    let ruleset = String::from_utf8_lossy(&ruleset.stdout).to_string();
    assert!(ruleset.contains("redirect to :15001"), "{ruleset}");

    let fake_outbound =
        EchoServer::start(&topology, "client", 15001, Reply::Named("outbound".into()))
            .expect("stand-in for 15001");
    let real = EchoServer::start(&topology, "server", APP_PORT, Reply::Echo).expect("server");
    let target = addr(topology.pod("server").ip, APP_PORT);
    let response = apps::exchange(&topology, "client", target, b"hi".to_vec(), IO_TIMEOUT)
        .expect("redirected exchange");
    assert_eq!(response, b"outbound\nhi");
    assert_eq!(fake_outbound.accepted(), 1);
    assert_eq!(
        real.accepted(),
        0,
        "the redirected connection must not reach the server"
    );
}

#[test]
fn log_reader_finds_access_events_and_keeps_other_lines() {
    let text = concat!(
        r#"{"level":"info","time":"t","scope":"access","message":"connection complete","#,
        r#""direction":"inbound","src.identity":"spiffe://cluster.local/ns/a/sa/b","#,
        r#""bytes_sent":12}"#,
        "\n",
        "thread 'main' panicked at src/main.rs\n",
        r#"{"level":"warn","time":"t","scope":"nodetunnel","message":"reload rejected"}"#,
    );
    let log = Log::parse(text);
    let inbound = log.access("inbound");
    assert_eq!(inbound.len(), 1);
    assert_eq!(
        inbound[0].field("src.identity").as_deref(),
        Some("spiffe://cluster.local/ns/a/sa/b")
    );
    assert_eq!(inbound[0].number("bytes_sent"), Some(12));
    assert!(log.access("outbound").is_empty());
    assert_eq!(log.problems().len(), 1);
    assert_eq!(
        log.other_lines,
        vec!["thread 'main' panicked at src/main.rs"]
    );
}

// ---------------------------------------------------------------------------------------------
// Agent tests: two real agents.

/// client on node a, server on node b, both HBONE and captured.
fn client_server_cluster() -> Cluster {
    Cluster::build(&[("a", "client"), ("b", "server")])
        .captured(&["client", "server"])
        .start()
}

/// A large payload goes client → agent A → HBONE → agent B → server and back, and the
/// client's half-close reaches the server while the server can still answer: the trailer
/// `EOF <n>` is written by the server only after it read EOF.
#[test]
fn hbone_carries_bytes_both_ways_with_half_close() {
    require_netns!("hbone_carries_bytes_both_ways_with_half_close");
    let cluster = client_server_cluster();
    let server = EchoServer::start(
        &cluster.topology,
        "server",
        APP_PORT,
        Reply::EchoThenTrailer,
    )
    .expect("server app");
    let target = addr(cluster.ip("server"), APP_PORT);

    for (size, seed) in [(1usize, 1u64), (1024 * 1024 + 17, 2)] {
        let payload = apps::payload(b"", size, seed);
        let response = apps::exchange(
            &cluster.topology,
            "client",
            target,
            payload.clone(),
            IO_TIMEOUT,
        )
        .unwrap_or_else(|error| panic!("exchange of {size} bytes: {error:#}"));
        let trailer = format!("EOF {size}\n");
        assert!(
            response.ends_with(trailer.as_bytes()),
            "server never saw the client's half-close for {size} bytes (got {} bytes)",
            response.len()
        );
        assert!(
            response[..response.len() - trailer.len()] == payload[..],
            "echoed bytes differ from what was sent ({size} bytes)"
        );
    }
    assert_eq!(
        server.accepted(),
        2,
        "one app connection per client connection"
    );
}

/// While the app receives a plaintext marker, a capture of the node-to-node link shows only
/// TLS on 15008: the marker never appears and nothing goes to the app port in the clear.
#[test]
fn node_link_carries_only_tls() {
    require_netns!("node_link_carries_only_tls");
    let cluster = client_server_cluster();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let link = cluster.topology.link_interface("a", "b");
    let capture = Capture::start(&cluster.topology.netns("a"), &link).expect("capture");

    let marker = b"NODETUNNEL-PLAINTEXT-MARKER-5b2f".to_vec();
    let payload = apps::payload(&marker, 64 * 1024, 3);
    let target = addr(cluster.ip("server"), APP_PORT);
    let response = apps::exchange(
        &cluster.topology,
        "client",
        target,
        payload.clone(),
        IO_TIMEOUT,
    )
    .expect("exchange through the tunnel");
    assert!(response == payload, "echo through the tunnel differs");
    assert!(
        server.received_contains(&marker),
        "the app must see the plaintext marker"
    );

    let segments = capture.finish().expect("pcap");
    let findings = capture::examine(&segments, &marker, 15008);
    assert!(
        !findings.marker_seen,
        "plaintext marker crossed the node link: {findings:?}"
    );
    assert!(
        findings.payload_bytes_on_port >= payload.len(),
        "the payload should have crossed the link on 15008: {findings:?}"
    );
    assert!(
        findings.flows_on_port_start_with_tls,
        "15008 flows must be TLS: {findings:?}"
    );
    let clear: Vec<_> = segments
        .iter()
        .filter(|segment| {
            segment.destination.port() == APP_PORT || segment.source.port() == APP_PORT
        })
        .collect();
    assert!(
        clear.is_empty(),
        "app-port traffic on the link: {:?}",
        clear.first()
    );
}

/// Both agents write one access-log event for the connection: agent B names the client's
/// SPIFFE identity, agent A the server's, with the HBONE address and byte counts.
#[test]
fn access_logs_name_both_spiffe_identities() {
    require_netns!("access_logs_name_both_spiffe_identities");
    let cluster = client_server_cluster();
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let payload = apps::payload(b"identity-check", 10_000, 4);
    let target = addr(cluster.ip("server"), APP_PORT);
    apps::exchange(
        &cluster.topology,
        "client",
        target,
        payload.clone(),
        IO_TIMEOUT,
    )
    .expect("exchange");

    let client_id = cluster.mesh.workload("client").identity();
    let server_id = cluster.mesh.workload("server").identity();
    let inbound = cluster
        .agent("b")
        .wait_for_event("agent B's inbound access event", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("direction").as_deref() == Some("inbound")
        })
        .expect("inbound access log");
    assert_eq!(
        inbound.field("src.identity"),
        Some(client_id.clone()),
        "{}",
        inbound.raw
    );
    assert_eq!(
        inbound.field("dst.identity"),
        Some(server_id.clone()),
        "{}",
        inbound.raw
    );
    let no_error =
        |event: &support::logs::LogEvent| event.field("error").unwrap_or_default().is_empty();
    assert!(no_error(&inbound), "{}", inbound.raw);

    let outbound = cluster
        .agent("a")
        .wait_for_event("agent A's outbound access event", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("direction").as_deref() == Some("outbound")
        })
        .expect("outbound access log");
    assert_eq!(
        outbound.field("src.identity"),
        Some(client_id),
        "{}",
        outbound.raw
    );
    assert_eq!(
        outbound.field("dst.identity"),
        Some(server_id),
        "{}",
        outbound.raw
    );
    assert!(no_error(&outbound), "{}", outbound.raw);
    // Istio's meaning (reference/istio-compat.md, access log): `dst.addr` is the actual L4
    // destination (the peer's HBONE port), `dst.hbone_addr` the CONNECT authority.
    let hbone = addr(cluster.ip("server"), 15008).to_string();
    let fields = (outbound.field("dst.addr"), outbound.field("dst.hbone_addr"));
    let expected = (Some(hbone), Some(target.to_string()));
    assert_eq!(
        fields, expected,
        "(dst.addr, dst.hbone_addr): {}",
        outbound.raw
    );
    for event in [&inbound, &outbound] {
        for field in ["bytes_sent", "bytes_recv"] {
            let bytes = event.number(field).unwrap_or(0);
            assert!(
                bytes >= payload.len() as u64,
                "{field} = {bytes}: {}",
                event.raw
            );
        }
    }
    let log_a = cluster.agent("a").log();
    assert_eq!(
        log_a.access("outbound").len(),
        1,
        "exactly one event per connection"
    );
}

/// A client that reaches pod B's 15008 directly (from an uncaptured pod) is refused unless its
/// certificate chains to the mesh root and names our trust domain; when refused, nothing reaches
/// the app. The trusted case is the control that shows the probe itself works.
#[test]
fn hbone_port_refuses_untrusted_client_certificates() {
    require_netns!("hbone_port_refuses_untrusted_client_certificates");
    // The intruder pod is no workload of the mesh.
    let cluster = Cluster::build(&[("a", "client"), ("b", "server"), ("a", "intruder")])
        .mesh(|_, mesh| {
            mesh.workloads
                .retain(|workload| workload.name != "intruder")
        })
        .captured(&["client", "server"])
        .start();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let client_id = cluster.mesh.workload("client").identity();
    let hbone = addr(cluster.ip("server"), 15008);
    let authority = addr(cluster.ip("server"), APP_PORT).to_string();

    let cases: Vec<(&str, Option<tls_probe::ClientCert>, bool)> = vec![
        ("no client certificate", None, false),
        (
            "foreign root, mesh identity",
            Some(tls_probe::leaf_from_foreign_root(&client_id).expect("cert")),
            false,
        ),
        (
            "mesh root, foreign trust domain",
            Some(
                tls_probe::leaf_from_root(&cluster.ca, "spiffe://evil.local/ns/default/sa/client")
                    .expect("cert"),
            ),
            false,
        ),
        (
            "mesh root, mesh identity (control)",
            Some(tls_probe::leaf_from_root(&cluster.ca, &client_id).expect("cert")),
            true,
        ),
    ];
    for (index, (case, cert, accepted)) in cases.into_iter().enumerate() {
        let marker = format!("PROBE-MARKER-{index}").into_bytes();
        let before = server.accepted();
        let (auth, mark) = (authority.clone(), marker.clone());
        let outcome = cluster
            .topology
            .run_in("intruder", move || {
                tls_probe::probe(hbone, cert, &auth, &mark)
            })
            .expect("probe thread");
        if accepted {
            assert_eq!(
                outcome,
                Outcome::Http2 {
                    response: true,
                    ok: true
                },
                "{case}"
            );
            support::wait_for("the app to get the tunnelled marker", IO_TIMEOUT, || {
                server.received_contains(&marker).then_some(())
            })
            .unwrap_or_else(|error| panic!("{case}: {error}"));
        } else {
            assert!(
                matches!(outcome, Outcome::Refused(_)),
                "{case}: {outcome:?}"
            );
            assert_eq!(
                server.accepted(),
                before,
                "{case}: a connection reached the app"
            );
            assert!(
                !server.received_contains(&marker),
                "{case}: bytes reached the app"
            );
        }
    }
    assert_eq!(
        server.accepted(),
        1,
        "only the trusted probe may reach the app"
    );
}

/// `COMPLIANCE_POLICY=pqc` (Istio's setting for a post-quantum mesh) makes node b's agent take
/// only the X25519MLKEM768 hybrid on its pods' 15008, while node a's agent, with the default key
/// exchange, still carries traffic both ways: dialing b it is asked again for the hybrid, dialed
/// by b it takes the hybrid at once.
#[test]
fn compliance_policy_pqc_takes_only_the_hybrid_and_still_interoperates() {
    require_netns!("compliance_policy_pqc_takes_only_the_hybrid_and_still_interoperates");
    let cluster = Cluster::build(&[("a", "client"), ("b", "server"), ("a", "prober")])
        .mesh(|_, mesh| mesh.workloads.retain(|workload| workload.name != "prober"))
        .captured(&["client", "server"])
        .spawn_with(|cluster, node| {
            let env = match node {
                "b" => vec![("COMPLIANCE_POLICY".to_string(), "pqc".to_string())],
                _ => Vec::new(),
            };
            let config = cluster.render(node);
            let mut agent =
                Agent::spawn_with_env(&cluster.topology, node, &cluster.ca, &config, &env)
                    .expect("agent");
            agent
                .wait_ready(&cluster.topology, READY_TIMEOUT)
                .expect("agent ready");
            agent
        });
    let _on_server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let _on_client =
        EchoServer::start(&cluster.topology, "client", APP_PORT, Reply::Echo).expect("client app");
    for (from, to) in [("client", "server"), ("server", "client")] {
        let payload = apps::payload(b"", 64 * 1024, 7);
        let target = addr(cluster.ip(to), APP_PORT);
        let response = apps::exchange(&cluster.topology, from, target, payload.clone(), IO_TIMEOUT)
            .unwrap_or_else(|error| panic!("{from} -> {to}: {error:#}"));
        assert!(response == payload, "{from} -> {to}: echo differs");
    }

    let client_id = cluster.mesh.workload("client").identity();
    let classical = [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1];
    let hybrid = [rustls::NamedGroup::X25519MLKEM768];
    let cases = [
        ("server", &classical[..], None),
        (
            "server",
            &hybrid[..],
            Some(rustls::NamedGroup::X25519MLKEM768),
        ),
        ("client", &classical[..], Some(rustls::NamedGroup::X25519)),
        (
            "client",
            &hybrid[..],
            Some(rustls::NamedGroup::X25519MLKEM768),
        ),
    ];
    for (pod, groups, expected) in cases {
        let hbone = addr(cluster.ip(pod), 15008);
        let cert = tls_probe::leaf_from_root(&cluster.ca, &client_id).expect("cert");
        let offered = groups.to_vec();
        let chosen = cluster
            .topology
            .run_in("prober", move || {
                tls_probe::key_exchange(hbone, cert, &offered)
            })
            .expect("probe thread");
        match (expected, chosen) {
            (Some(expected), Ok(chosen)) => assert_eq!(chosen, expected, "{pod} {groups:?}"),
            (None, Err(_)) => {}
            (expected, chosen) => panic!("{pod} offered {groups:?}: {chosen:?}, want {expected:?}"),
        }
    }
}

/// A workload with `protocol: TCP` that is not captured is reached from a captured client by
/// plain passthrough: the bytes cross the link in the clear to the app port, nothing uses
/// 15008, and agent A logs the connection without a peer identity.
#[test]
fn tcp_workload_is_reached_in_plaintext() {
    require_netns!("tcp_workload_is_reached_in_plaintext");
    let cluster = Cluster::build(&[("a", "client"), ("b", "legacy")])
        .plain_tcp(&["legacy"])
        .captured(&["client"])
        .start();
    let legacy =
        EchoServer::start(&cluster.topology, "legacy", APP_PORT, Reply::Echo).expect("legacy app");
    let link = cluster.topology.link_interface("a", "b");
    let capture = Capture::start(&cluster.topology.netns("a"), &link).expect("capture");

    let marker = b"LEGACY-PLAINTEXT-MARKER".to_vec();
    let payload = apps::payload(&marker, 2048, 5);
    let target = addr(cluster.ip("legacy"), APP_PORT);
    let response = apps::exchange(
        &cluster.topology,
        "client",
        target,
        payload.clone(),
        IO_TIMEOUT,
    )
    .expect("exchange with the TCP workload");
    assert!(response == payload, "echo from the TCP workload differs");
    assert_eq!(legacy.accepted(), 1);

    let segments = capture.finish().expect("pcap");
    let findings = capture::examine(&segments, &marker, 15008);
    assert!(
        findings.marker_seen,
        "passthrough should be plaintext on the link: {findings:?}"
    );
    assert_eq!(
        findings.payload_bytes_on_port, 0,
        "no HBONE for a TCP workload: {findings:?}"
    );

    let outbound = cluster
        .agent("a")
        .wait_for_event("agent A's outbound access event", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("direction").as_deref() == Some("outbound")
        })
        .expect("outbound access log");
    assert_eq!(
        outbound.field("dst.addr"),
        Some(target.to_string()),
        "{}",
        outbound.raw
    );
    let no_value = |name: &str| outbound.field(name).is_none_or(|value| value.is_empty());
    assert!(no_value("dst.hbone_addr"), "{}", outbound.raw);
    assert!(no_value("dst.identity"), "{}", outbound.raw);
}

/// A service VIP with one endpoint on each node: connections to the VIP from node a reach both
/// endpoints (each answers with its name) within a bounded number of tries, and every answer
/// is a complete echo from one of them.
#[test]
fn service_vip_is_balanced_across_two_nodes() {
    require_netns!("service_vip_is_balanced_across_two_nodes");
    const TRIES: usize = 40;
    let service = ServiceSpec::new("echo", Ipv4Addr::new(10, 96, 0, 10), 80, APP_PORT);
    let cluster = Cluster::build(&[("a", "client"), ("a", "echo-a"), ("b", "echo-b")])
        .mesh(|_, mesh| {
            for workload in &mut mesh.workloads {
                if workload.name.starts_with("echo-") {
                    workload.service_account = "echo".to_string();
                    workload.services.push((service.key(), 80, APP_PORT));
                }
            }
            mesh.services.push(service.clone());
        })
        .captured(&["client", "echo-a", "echo-b"])
        .start();
    let servers: Vec<EchoServer> = ["echo-a", "echo-b"]
        .iter()
        .map(|name| {
            EchoServer::start(
                &cluster.topology,
                name,
                APP_PORT,
                Reply::Named(name.to_string()),
            )
            .expect("endpoint app")
        })
        .collect();

    let vip = addr(service.vip, 80);
    let mut seen = std::collections::BTreeSet::new();
    for attempt in 0..TRIES {
        let payload = format!("request {attempt}").into_bytes();
        let response = apps::exchange(
            &cluster.topology,
            "client",
            vip,
            payload.clone(),
            IO_TIMEOUT,
        )
        .unwrap_or_else(|error| panic!("try {attempt} to the VIP: {error:#}"));
        let text = String::from_utf8_lossy(&response).to_string();
        let (name, echoed) = text.split_once('\n').unwrap_or(("", ""));
        assert!(
            ["echo-a", "echo-b"].contains(&name),
            "unexpected answer {text:?}"
        );
        assert_eq!(echoed.as_bytes(), payload, "incomplete echo from {name}");
        seen.insert(name.to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "only {seen:?} answered in {TRIES} tries");
    assert!(servers.iter().all(|server| server.accepted() >= 1));
}

/// The config file is watched: adding a service makes its VIP work without a restart; an
/// invalid edit (which would also remove it) is rejected whole with a logged error naming the
/// bad field, and the VIP keeps working; a later valid edit still applies.
#[test]
fn live_config_edit_applies_and_invalid_edit_keeps_last_good() {
    require_netns!("live_config_edit_applies_and_invalid_edit_keeps_last_good");
    let cluster = client_server_cluster();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let service = ServiceSpec::new("late", Ipv4Addr::new(10, 96, 0, 20), 80, APP_PORT);
    let vip = addr(service.vip, 80);
    let works = |attempt: &str| {
        let payload = format!("via the VIP: {attempt}").into_bytes();
        apps::exchange(
            &cluster.topology,
            "client",
            vip,
            payload.clone(),
            Duration::from_secs(3),
        )
        .is_ok_and(|response| response == payload)
    };
    assert!(
        !works("before the edit"),
        "the VIP must not work before it is configured"
    );
    assert_eq!(server.accepted(), 0);

    let mut with_service = cluster.mesh.clone();
    with_service.services.push(service.clone());
    with_service.workloads[1]
        .services
        .push((service.key(), 80, APP_PORT));
    let agent = cluster.agent("a");
    agent
        .write_config(&with_service.render(&cluster.topology, "a", &["client"]))
        .expect("edit");
    support::wait_for("the new VIP to work", Duration::from_secs(15), || {
        works("after the edit").then_some(())
    })
    .expect("valid edit applied without restart");

    let problems_before = agent.log().problems().len();
    let invalid = cluster
        .mesh
        .render(&cluster.topology, "a", &["client"])
        .replacen("agent:\n", "agent:\n  bogusField: 1\n", 1);
    agent.write_config(&invalid).expect("invalid edit");
    let rejection = support::wait_for("the invalid edit to be rejected", LOG_TIMEOUT, || {
        agent
            .log()
            .problems()
            .get(problems_before..)?
            .iter()
            .find(|event| event.raw.contains("bogusField"))
            .map(|e| e.raw.clone())
    })
    .unwrap_or_else(|error| panic!("{error}; log:\n{}", agent.log().tail(20)));
    assert!(
        rejection.contains("config.yaml"),
        "the error should name the file: {rejection}"
    );
    for attempt in 0..3 {
        assert!(
            works(&format!("after the bad edit #{attempt}")),
            "last good config lost"
        );
    }

    agent
        .write_config(&cluster.mesh.render(&cluster.topology, "a", &["client"]))
        .expect("valid removal");
    support::wait_for(
        "the removed VIP to stop working",
        Duration::from_secs(15),
        || (!works("after removal")).then_some(()),
    )
    .expect("a valid edit after a rejected one still applies");
    let mut agent_a = cluster.agents.into_iter().next().expect("agent a");
    assert!(
        agent_a.exit_status().is_none(),
        "agent A must still be running"
    );
}

/// Opens a captured connection from `client` to `target` and checks it echoes `marker`; the
/// stream stays open for more.
fn open_echoing(
    cluster: &Cluster,
    target: SocketAddr,
    marker: &'static [u8],
) -> anyhow::Result<TcpStream> {
    cluster
        .topology
        .run_in("client", move || -> anyhow::Result<TcpStream> {
            let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            echo_on(&mut stream, marker)?;
            Ok(stream)
        })?
        .map_err(|error| error.context(format!("connection to {target}")))
}

/// Writes `marker` and reads until it came back.
fn echo_on(stream: &mut TcpStream, marker: &[u8]) -> anyhow::Result<()> {
    stream.write_all(marker)?;
    let mut echoed = vec![0; marker.len()];
    stream.read_exact(&mut echoed)?;
    anyhow::ensure!(echoed == marker, "echoed {echoed:?}");
    Ok(())
}

/// Whether the connection ended (EOF or reset) within `within`, rather than hanging.
fn ends_within(stream: &mut TcpStream, within: Duration) -> Result<(), String> {
    stream
        .set_read_timeout(Some(within))
        .map_err(|error| error.to_string())?;
    let mut buffer = [0u8; 64];
    match stream.read(&mut buffer) {
        Ok(0) => Ok(()),
        Ok(read) => Err(format!("{read} unexpected bytes")),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("still open after {within:?}"))
        }
        Err(_) => Ok(()),
    }
}

/// The peer agent frozen (SIGSTOP: it holds its sockets and answers nothing) and then killed
/// mid-stream. The client's agent PINGs its HBONE connections, so it notices the frozen peer
/// and ends the app's tunnel through it instead of leaving it hanging forever (TCP alone never
/// would: the peer's kernel still acknowledges). The app's other stream, to a pod of another
/// agent, keeps echoing through both faults, and new connections to that pod are served. Once
/// the peer thaws, new tunnels to it work again; a `kill -9` then ends the tunnel through it
/// at once, and the other stream survives that too.
#[test]
fn peer_agent_frozen_or_killed_mid_stream_ends_only_its_tunnels() {
    require_netns!("peer_agent_frozen_or_killed_mid_stream_ends_only_its_tunnels");
    use nix::sys::signal::{kill, Signal};
    let cluster = Cluster::build(&[("a", "client"), ("a", "near"), ("b", "far")])
        .captured(&["client", "near", "far"])
        .start_with(|cluster, node| {
            cluster.render(node).replacen(
                "agent:\n",
                "agent:\n  proxy:\n    keepaliveInterval: 1s\n    keepaliveTimeout: 1s\n",
                1,
            )
        });
    let _near_app =
        EchoServer::start(&cluster.topology, "near", APP_PORT, Reply::Echo).expect("near app");
    let _far_app =
        EchoServer::start(&cluster.topology, "far", APP_PORT, Reply::Echo).expect("far app");
    let (near, far) = (
        cluster.target("near", APP_PORT),
        cluster.target("far", APP_PORT),
    );
    let mut other = open_echoing(&cluster, near, b"NEAR-BEFORE").expect("stream to near");
    let mut doomed = open_echoing(&cluster, far, b"FAR-BEFORE").expect("stream to far");
    let peer = nix::unistd::Pid::from_raw(cluster.agent("b").pid().expect("agent b") as i32);

    kill(peer, Signal::SIGSTOP).expect("freeze agent b");
    let frozen_outcome = ends_within(&mut doomed, Duration::from_secs(30));
    let survived = echo_on(&mut other, b"NEAR-WHILE-FROZEN");
    let fresh = open_echoing(&cluster, near, b"NEAR-NEW");
    kill(peer, Signal::SIGCONT).expect("thaw agent b");
    frozen_outcome.unwrap_or_else(|error| {
        panic!("the tunnel through the frozen peer agent did not end: {error}")
    });
    survived.expect("the stream to the other agent's pod while the peer is frozen");
    drop(fresh.expect("a new connection to the other pod while the peer is frozen"));

    let mut doomed =
        open_echoing(&cluster, far, b"FAR-AFTER-THAW").expect("stream to far after the thaw");
    kill(peer, Signal::SIGKILL).expect("kill -9 agent b");
    ends_within(&mut doomed, Duration::from_secs(30))
        .unwrap_or_else(|error| panic!("the tunnel through the killed peer agent: {error}"));
    echo_on(&mut other, b"NEAR-AFTER-KILL").expect("the other stream after the kill");
}
