//! Network-namespace tests of the HBONE data path (issue 2): two "nodes" each running a real
//! `nodetunnel` process, "pods" with ordinary TCP apps, and the node-to-node link captured.
//!
//! Topology (see `support::netns`): node `a` (pods 10.200.1.x) and node `b` (pods 10.200.2.x)
//! joined by one veth pair. Captured pods get the test's nftables redirection rules
//! (`support::netns::redirect_rules`) until the agent installs its own (issue 3).
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::agent::{Agent, Ca, Mesh, Protocol, ServiceSpec, WorkloadSpec};
use support::apps::{self, EchoServer, Reply};
use support::capture::{self, Capture};
use support::logs::Log;
use support::netns::Topology;
use support::tls_probe::{self, Outcome};

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

macro_rules! require_netns {
    ($name:literal) => {
        if !support::netns_tests_enabled($name) {
            return;
        }
    };
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Two linked nodes `a` and `b`, with pods given as (node, pod role).
fn topology(pods: &[(&str, &str)]) -> Topology {
    let mut topology = Topology::new();
    topology.add_node("a").expect("node a");
    topology.add_node("b").expect("node b");
    topology.link("a", "b").expect("link a-b");
    for (node, pod) in pods {
        topology.add_pod(node, pod).expect("pod");
    }
    topology
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
    let seen = prefix.clone();
    let outcome = std::panic::catch_unwind(move || {
        let topology = topology(&[("a", "pod")]);
        *seen.lock().expect("lock") = topology.prefix().to_string();
        // A long-lived process inside the namespace must not keep it alive.
        topology.install_redirect("pod").expect("nft");
        std::process::Command::new("ip")
            .args(["netns", "exec", &topology.netns("pod"), "sleep", "600"])
            .spawn()
            .expect("sleep");
        panic!("deliberate");
    });
    assert!(outcome.is_err());
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
        r#"{"timestamp":"t","level":"INFO","fields":{"message":"connection complete","#,
        r#""direction":"inbound","src.identity":"spiffe://cluster.local/ns/a/sa/b","#,
        r#""bytes_sent":12},"target":"access"}"#,
        "\n",
        "thread 'main' panicked at src/main.rs\n",
        r#"{"level":"WARN","fields":{"message":"reload rejected"},"target":"nodetunnel"}"#,
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
