//! IPv6 and dual stack through the whole path (issue 13): pods with only IPv6 addresses on two
//! nodes linked over IPv6, captured by real agents (their nftables rules and `ip -6` return
//! path), HBONE between the pods' IPv6 addresses, an L4 policy matching an IPv6 CIDR and a
//! port, original source (the app sees the client pod's IPv6 address), and a dual-stack pod
//! reaching an IPv6-only and an IPv4-only server.
//!
//! Topology: node `a` with `client6` (IPv6 only) and `dual` (IPv4 and IPv6); node `b` with
//! `server6` (IPv6 only, labelled `app: server6`) and `server4` (IPv4 only). Needs root.

#[macro_use]
mod support;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::agent::{node_name, Agent, Ca};
use support::apps::{self, EchoServer, Reply};
use support::netns::Topology;

const APP_PORT: u16 = 8080;
/// A port the policy does not allow.
const DENIED_PORT: u16 = 9090;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Agents first: they stop before the namespaces go.
struct Cluster {
    agents: Vec<Agent>,
    _ca: Ca,
    topology: Topology,
}

/// (pod, node, service account) of every workload.
const WORKLOADS: [(&str, &str); 4] = [
    ("client6", "a"),
    ("dual", "a"),
    ("server6", "b"),
    ("server4", "b"),
];

fn addresses(topology: &Topology, pod: &str) -> Vec<IpAddr> {
    let pod = topology.pod(pod);
    let mut ips = Vec::new();
    if pod.ipv4 {
        ips.push(IpAddr::V4(pod.ip));
    }
    ips.extend(pod.ip6.map(IpAddr::V6));
    ips
}

/// The config of `node`: its pods captured, the mesh, and the policy on `server6`: only
/// node `a`'s IPv6 pod range, only on the app port.
fn config(topology: &Topology, node: &str) -> String {
    let mut yaml = format!(
        "agent:\n  node: {}\n  trustDomain: cluster.local\n  drainTimeout: 2s\n  pods:\n",
        node_name(node)
    );
    for (pod, _) in WORKLOADS.iter().filter(|(_, on)| *on == node) {
        let netns = topology.netns_path(pod);
        let _ = writeln!(
            yaml,
            "    - workload: default/{pod}\n      netns: {}",
            netns.display()
        );
    }
    yaml.push_str("workloads:\n");
    for (pod, on) in WORKLOADS {
        let ips: Vec<String> = addresses(topology, pod)
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = write!(
            yaml,
            "  - uid: cluster1//Pod/default/{pod}\n    name: {pod}\n    namespace: default\n    \
             serviceAccount: {pod}\n    workloadIps: [{}]\n    protocol: HBONE\n    node: {}\n    \
             labels: {{app: {pod}}}\n",
            ips.join(", "),
            node_name(on)
        );
    }
    let client_range = format!("fd00:200:{}::/64", topology.node("a").index);
    let _ = write!(
        yaml,
        "services: []\npolicies: []\nistioResources:\n  - apiVersion: security.istio.io/v1\n    \
         kind: AuthorizationPolicy\n    metadata: {{name: server6-v6-clients, namespace: default}}\n    \
         spec:\n      selector: {{matchLabels: {{app: server6}}}}\n      action: ALLOW\n      \
         rules:\n        - from: [{{source: {{ipBlocks: [\"{client_range}\"]}}}}]\n          \
         to: [{{operation: {{ports: [\"{APP_PORT}\"]}}}}]\n"
    );
    yaml
}

fn start() -> Cluster {
    let mut topology = Topology::new();
    topology.add_node("a").expect("node a");
    topology.add_node("b").expect("node b");
    topology.link("a", "b").expect("link");
    topology.enable_ipv6().expect("IPv6 between the nodes");
    topology
        .add_pod_ipv6("a", "client6", false)
        .expect("client6");
    topology.add_pod_ipv6("a", "dual", true).expect("dual");
    topology
        .add_pod_ipv6("b", "server6", false)
        .expect("server6");
    topology.add_pod("b", "server4").expect("server4");
    let ca = Ca::init().expect("ca");
    let agents = ["a", "b"]
        .into_iter()
        .map(|node| Agent::start(&topology, node, &ca, &config(&topology, node)).expect("agent"))
        .collect();
    Cluster {
        agents,
        _ca: ca,
        topology,
    }
}

impl Cluster {
    fn agent(&self, node: &str) -> &Agent {
        self.agents
            .iter()
            .find(|agent| agent.node == node)
            .expect("agent")
    }

    /// One echo exchange from `pod`; retried briefly, as readiness can answer a moment before
    /// the last pod's listeners are bound.
    fn echo(&self, pod: &str, target: SocketAddr, marker: &str) -> anyhow::Result<Vec<u8>> {
        let mut last = Err(anyhow::anyhow!("not tried"));
        for _ in 0..20 {
            last = apps::exchange(
                &self.topology,
                pod,
                target,
                marker.as_bytes().to_vec(),
                IO_TIMEOUT,
            );
            if matches!(&last, Ok(reply) if !reply.is_empty()) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        last
    }
}

fn v6(topology: &Topology, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((topology.pod(pod).ip6.expect("IPv6 address"), port))
}

#[test]
fn ipv6_only_pods_talk_over_hbone_with_policy_and_original_source() {
    require_netns!("ipv6_only_pods_talk_over_hbone_with_policy_and_original_source");
    let cluster = start();
    let topology = &cluster.topology;
    let server = EchoServer::start(topology, "server6", APP_PORT, Reply::Echo).expect("server6");
    let other_port =
        EchoServer::start(topology, "server6", DENIED_PORT, Reply::Echo).expect("server6 :9090");
    let client = topology.pod("client6").ip6.expect("v6");

    let reply = cluster
        .echo("client6", v6(topology, "server6", APP_PORT), "over-ipv6")
        .expect("IPv6 exchange");
    assert_eq!(reply, b"over-ipv6");
    assert_eq!(
        server.peers().first().map(SocketAddr::ip),
        Some(IpAddr::V6(client)),
        "original source: the app sees the client pod's IPv6 address"
    );

    let inbound = cluster
        .agent("b")
        .wait_for_event("inbound access event", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("direction").as_deref() == Some("inbound")
        })
        .expect("server agent logged the connection");
    assert_eq!(
        inbound.field("src.identity").as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/client6"),
        "mTLS identity over IPv6: {}",
        inbound.raw
    );
    let outbound = cluster
        .agent("a")
        .wait_for_event("outbound access event", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("direction").as_deref() == Some("outbound")
        })
        .expect("client agent logged the connection");
    assert_eq!(
        outbound.field("dst.addr"),
        Some(v6(topology, "server6", 15008).to_string()),
        "HBONE to the server pod's IPv6 address: {}",
        outbound.raw
    );
    assert_eq!(
        outbound.field("dst.hbone_addr"),
        Some(v6(topology, "server6", APP_PORT).to_string()),
        "{}",
        outbound.raw
    );

    // The policy allows the IPv6 range on the app port only.
    let denied = apps::exchange(
        topology,
        "client6",
        v6(topology, "server6", DENIED_PORT),
        b"not-allowed".to_vec(),
        IO_TIMEOUT,
    );
    assert!(
        !matches!(&denied, Ok(reply) if !reply.is_empty()),
        "a port the policy does not allow: {denied:?}"
    );
    assert_eq!(
        other_port.accepted(),
        0,
        "nothing reached the app on {DENIED_PORT}"
    );
}

#[test]
fn a_dual_stack_pod_reaches_both_families() {
    require_netns!("a_dual_stack_pod_reaches_both_families");
    let cluster = start();
    let topology = &cluster.topology;
    let server6 = EchoServer::start(topology, "server6", APP_PORT, Reply::Echo).expect("server6");
    let server4 = EchoServer::start(topology, "server4", APP_PORT, Reply::Echo).expect("server4");
    let dual = topology.pod("dual");
    let (dual4, dual6) = (dual.ip, dual.ip6.expect("v6"));

    let reply = cluster
        .echo("dual", v6(topology, "server6", APP_PORT), "dual-to-v6")
        .expect("dual-stack pod to the IPv6 server");
    assert_eq!(reply, b"dual-to-v6");
    let target4 = SocketAddr::from((topology.pod("server4").ip, APP_PORT));
    let reply = cluster
        .echo("dual", target4, "dual-to-v4")
        .expect("dual-stack pod to the IPv4 server");
    assert_eq!(reply, b"dual-to-v4");

    assert_eq!(
        server6.peers().first().map(SocketAddr::ip),
        Some(IpAddr::V6(dual6))
    );
    assert_eq!(
        server4.peers().first().map(SocketAddr::ip),
        Some(IpAddr::V4(dual4))
    );
    let identity = "spiffe://cluster.local/ns/default/sa/dual".to_string();
    for target in [v6(topology, "server6", APP_PORT), target4] {
        // The server's agent logs a connection once it has closed its side, which may come
        // after the client has its reply.
        cluster
            .agent("b")
            .wait_for_event(
                &format!("{target} over HBONE with the dual pod's identity"),
                LOG_TIMEOUT,
                |event| {
                    event.is_access()
                        && event.field("direction").as_deref() == Some("inbound")
                        && event.field("error").is_none()
                        && event.field("dst.hbone_addr") == Some(target.to_string())
                        && event.field("src.identity").as_deref() == Some(identity.as_str())
                },
            )
            .expect("inbound access event");
    }
}
