//! Network-namespace tests of pod capture (issue 3): the agent installs its own redirection
//! rules in each pod, unmodified apps are captured, the server app sees the client pod's IP,
//! pods come and go at run time without disturbing the others, and nothing of ours is left
//! behind. No test here installs rules itself.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{self, Agent};
use support::apps::{self, EchoServer, Reply};
use support::cluster::Cluster;
use support::logs::LogEvent;
use support::netns::Topology;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Nodes `a` and `b` with `pods` (node, pod), HBONE workloads for every pod, agents capturing
/// `captured` and installing their rules.
fn start(pods: &[(&str, &str)], captured: &[&str]) -> Cluster {
    Cluster::build(pods).captured(captured).start()
}

/// What these tests read from pods, and the config edits they make.
trait Capture {
    /// `nft list ruleset` in `pod`.
    fn ruleset(&self, pod: &str) -> String;
    /// Our `ip rule` entries (priority 32764) in a pod.
    fn return_path_rules(&self, pod: &str) -> usize;
    /// The return path in a pod as iproute2 shows it: our rules (priority 32764) and the
    /// routes of table 100, both families, one per line.
    fn return_path(&self, pod: &str) -> Vec<String>;
    /// Rewrites `node`'s config so that its agent captures `captured`.
    fn rewrite_config(&self, node: &str, captured: &[&str]);
}

impl Capture for Cluster {
    fn ruleset(&self, pod: &str) -> String {
        let output = self
            .topology
            .exec_role(pod, &["nft", "list", "ruleset"])
            .expect("nft");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn return_path_rules(&self, pod: &str) -> usize {
        let output = self
            .topology
            .exec_role(pod, &["ip", "rule", "show"])
            .expect("ip rule");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.starts_with("32764:"))
            .count()
    }

    fn return_path(&self, pod: &str) -> Vec<String> {
        let mut shown = Vec::new();
        for command in [
            &["ip", "-4", "rule", "show"][..],
            &["ip", "-6", "rule", "show"],
            &["ip", "-4", "route", "show", "table", "100"],
            &["ip", "-6", "route", "show", "table", "100"],
        ] {
            let output = self.topology.exec_role(pod, command).expect("ip");
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            shown.extend(
                text.lines()
                    .filter(|line| command[2] == "route" || line.starts_with("32764:"))
                    .map(|line| {
                        format!(
                            "{} {}",
                            command[1],
                            line.split_whitespace().collect::<Vec<_>>().join(" ")
                        )
                    }),
            );
        }
        shown
    }

    fn rewrite_config(&self, node: &str, captured: &[&str]) {
        let config = self.mesh.render(&self.topology, node, captured);
        self.agent(node)
            .write_config(&config)
            .expect("write config");
    }
}

/// Our table appears exactly once, with exactly one outbound redirect.
fn rules_installed_once(ruleset: &str) -> bool {
    ruleset.matches("table inet nodetunnel {").count() == 1
        && ruleset.matches("redirect to :15001").count() == 1
}

fn wait(what: &str, mut condition: impl FnMut() -> bool) {
    support::wait_for(what, CHANGE_TIMEOUT, || condition().then_some(()))
        .unwrap_or_else(|error| panic!("{error:#}"));
}

/// A connection opened from inside `pod` (so it is captured), kept open by the test.
fn open_connection(topology: &Topology, pod: &str, target: SocketAddr) -> TcpStream {
    let stream = topology
        .run_in(pod, move || TcpStream::connect_timeout(&target, IO_TIMEOUT))
        .expect("enter pod")
        .expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

fn echo_once(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message)?;
    let mut buffer = vec![0u8; message.len()];
    stream.read_exact(&mut buffer)?;
    Ok(buffer)
}

/// With no rules of the test's own, the agent's rules capture an unmodified client that dials
/// the server pod's IP directly; the server app sees the client pod's IP (original source),
/// and the agent's own HBONE connection is not recaptured (else the tunnel would loop).
#[test]
fn agent_rules_capture_unmodified_apps_with_original_source() {
    require_netns!("agent_rules_capture_unmodified_apps_with_original_source");
    let cluster = start(&[("a", "client"), ("b", "server")], &["client", "server"]);
    for pod in ["client", "server"] {
        let ruleset = cluster.ruleset(pod);
        assert!(rules_installed_once(&ruleset), "{pod}: {ruleset}");
        assert_eq!(
            cluster.return_path_rules(pod),
            1,
            "{pod}: one return-path rule"
        );
    }
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let target = addr(cluster.ip("server"), APP_PORT);
    let response = apps::exchange(
        &cluster.topology,
        "client",
        target,
        b"captured".to_vec(),
        IO_TIMEOUT,
    )
    .expect("exchange through the agents");
    assert_eq!(response, b"captured");
    let peers = server.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].ip(),
        std::net::IpAddr::V4(cluster.ip("client")),
        "app sees the client pod IP"
    );
    let inbound = cluster.agents[1]
        .wait_for_event("inbound access log", IO_TIMEOUT, |event: &LogEvent| {
            event.is_access() && event.field("direction").as_deref() == Some("inbound")
        })
        .expect("inbound access log");
    assert_eq!(
        inbound.field("src.identity").as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/client"),
        "the connection went through HBONE"
    );
}

/// The congestion control of each TCP connection in `pod` with `port` as its local (`Local`)
/// or remote (`Peer`) port, as `ss -ti` shows them.
fn congestion_controls(cluster: &Cluster, pod: &str, port: PortSide) -> Vec<String> {
    let output = cluster
        .topology
        .exec_role(pod, &["ss", "-tinH", "state", "established"])
        .expect("ss");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(socket) = lines.next() {
        let Some(details) = lines.next() else { break };
        let fields: Vec<&str> = socket.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer
        let (local, peer) = (fields[2], fields[3]);
        let (address, wanted) = match port {
            PortSide::Local(wanted) => (local, wanted),
            PortSide::Peer(wanted) => (peer, wanted),
        };
        if address.rsplit(':').next() == Some(wanted.to_string().as_str()) {
            found.push(
                details
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    found
}

#[derive(Debug, Clone, Copy)]
enum PortSide {
    Local(u16),
    Peer(u16),
}

/// Whatever congestion control the pods' namespaces default to (here reno), the agents'
/// connections to the apps in their own pods run cubic (BBR's pacing would only cost on
/// loopback), while the HBONE connection between the nodes keeps the namespace's default.
#[test]
fn in_pod_legs_run_cubic_and_the_tunnel_keeps_the_namespace_default() {
    require_netns!("in_pod_legs_run_cubic_and_the_tunnel_keeps_the_namespace_default");
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .expect("available congestion controls");
    let in_pod = if available.split_whitespace().any(|name| name == "cubic") {
        "cubic"
    } else {
        "reno"
    };
    let cluster = start(&[("a", "client"), ("b", "server")], &["client", "server"]);
    for pod in ["client", "server"] {
        let output = cluster
            .topology
            .exec_role(
                pod,
                &["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"],
            )
            .expect("sysctl");
        assert!(output.status.success(), "{pod}: {output:?}");
    }
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let mut stream = open_connection(
        &cluster.topology,
        "client",
        addr(cluster.ip("server"), APP_PORT),
    );
    assert_eq!(echo_once(&mut stream, b"legs").expect("echo"), b"legs");
    let expectations = [
        (
            "client",
            PortSide::Local(15001),
            in_pod,
            "captured app connection",
        ),
        (
            "client",
            PortSide::Peer(15008),
            "reno",
            "HBONE to the server's node",
        ),
        (
            "server",
            PortSide::Local(15008),
            "reno",
            "HBONE from the client's node",
        ),
        (
            "server",
            PortSide::Peer(APP_PORT),
            in_pod,
            "delivery to the app",
        ),
    ];
    for (pod, port, expected, what) in expectations {
        let found = congestion_controls(&cluster, pod, port);
        assert!(
            !found.is_empty() && found.iter().all(|name| name == expected),
            "{pod}, {what} ({port:?}): expected {expected}, found {found:?}"
        );
    }
    drop(stream);
}

/// Connections from a captured pod to the agent's own ports are refused and logged, whichever
/// way they arrive: to loopback (straight into the outbound listener) or to the pod's own IP
/// (redirected to the plaintext inbound listener). Nothing is proxied to the agent itself.
#[test]
fn captured_calls_to_agent_ports_are_refused() {
    require_netns!("captured_calls_to_agent_ports_are_refused");
    let cluster = start(&[("a", "client"), ("b", "server")], &["client"]);
    let cases = [
        (addr(Ipv4Addr::LOCALHOST, 15001), "outbound", "would loop"),
        (
            addr(cluster.ip("client"), 15006),
            "inbound",
            "one of the agent's own ports",
        ),
    ];
    for (target, direction, reason) in cases {
        let result = apps::exchange(
            &cluster.topology,
            "client",
            target,
            b"loop?".to_vec(),
            IO_TIMEOUT,
        );
        assert!(
            result.as_ref().map_or(true, |bytes| bytes.is_empty()),
            "{target}: no bytes may come back from a self-call: {result:?}"
        );
        let event = cluster.agents[0]
            .wait_for_event("the self-call refusal", IO_TIMEOUT, |event: &LogEvent| {
                event.is_access()
                    && event.field("dst.addr").as_deref() == Some(target.to_string().as_str())
            })
            .expect("the refusal is logged");
        assert_eq!(
            event.field("direction").as_deref(),
            Some(direction),
            "{target}"
        );
        let error = event.field("error").unwrap_or_default();
        assert!(error.contains(reason), "{target}: {error}");
    }
}

/// Removing one pod from the config closes its listeners, removes its rules and cuts its open
/// connection, while another pod on the same node keeps a connection flowing.
#[test]
fn removed_pod_loses_listeners_rules_and_connections_others_carry_on() {
    require_netns!("removed_pod_loses_listeners_rules_and_connections_others_carry_on");
    let cluster = start(
        &[("a", "leaving"), ("a", "staying"), ("b", "server")],
        &["leaving", "staying", "server"],
    );
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let target = addr(cluster.ip("server"), APP_PORT);
    let mut leaving = open_connection(&cluster.topology, "leaving", target);
    let mut staying = open_connection(&cluster.topology, "staying", target);
    assert_eq!(
        echo_once(&mut leaving, b"one").expect("leaving works"),
        b"one"
    );
    assert_eq!(
        echo_once(&mut staying, b"one").expect("staying works"),
        b"one"
    );

    cluster.rewrite_config("a", &["staying"]);
    wait("rules removed from the leaving pod", || {
        !cluster.ruleset("leaving").contains("table inet nodetunnel")
    });
    assert_eq!(
        cluster.return_path_rules("leaving"),
        0,
        "return path removed too"
    );
    let cut = echo_once(&mut leaving, b"two");
    assert!(
        cut.as_ref().map_or(true, |bytes| bytes.is_empty()),
        "leaving pod's connection was cut: {cut:?}"
    );
    let listener = cluster
        .topology
        .run_in("leaving", || {
            TcpStream::connect_timeout(&"127.0.0.1:15001".parse().expect("addr"), IO_TIMEOUT)
        })
        .expect("enter pod");
    assert!(
        listener.is_err(),
        "no listener left on 15001 in the removed pod"
    );

    assert_eq!(
        echo_once(&mut staying, b"two").expect("staying still works"),
        b"two"
    );
    assert!(rules_installed_once(&cluster.ruleset("staying")));
}

/// Adding the same pod again through the admin API, and restarting the agent, leave exactly one
/// copy of the rules; a clean shutdown leaves none.
#[test]
fn readding_and_restarting_keep_one_copy_of_rules_and_shutdown_removes_them() {
    require_netns!("readding_and_restarting_keep_one_copy_of_rules_and_shutdown_removes_them");
    let mut cluster = start(&[("a", "client"), ("b", "server")], &["client"]);
    let netns = cluster.topology.netns_path("client");
    let node_netns = cluster.agents[0].netns().to_string();
    for expected in ["unchanged", "unchanged"] {
        let output = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node_netns,
                agent::binary(),
                "pod",
                "add",
                "--workload",
                "default/client",
                "--netns",
            ])
            .arg(&netns)
            .output()
            .expect("pod add");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "pod add: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(expected), "{stdout}");
    }
    assert!(rules_installed_once(&cluster.ruleset("client")));

    let list = std::process::Command::new("ip")
        .args(["netns", "exec", &node_netns, agent::binary(), "pod", "list"])
        .output()
        .expect("pod list");
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table.contains("cluster1//Pod/default/client") && table.contains("running"),
        "{table}"
    );

    let config = cluster.mesh.render(&cluster.topology, "a", &["client"]);
    cluster.agent_mut("a").stop(Duration::from_secs(10));
    let restarted = Agent::start(&cluster.topology, "a", &cluster.ca, &config).expect("restart");
    cluster.agents[0] = restarted;
    assert!(rules_installed_once(&cluster.ruleset("client")));
    assert_eq!(cluster.return_path_rules("client"), 1);
    assert_eq!(
        cluster.return_path("client"),
        [
            "-4 32764: from all fwmark 0x111/0xfff lookup 100",
            "-6 32764: from all fwmark 0x111/0xfff lookup 100",
            "-4 local default dev lo scope host",
            "-6 local default dev lo metric 1024 pref medium",
        ],
        "the return path, once per family"
    );

    let status = cluster.agent_mut("a").stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}"
    );
    assert!(
        !cluster.ruleset("client").contains("nodetunnel"),
        "{}",
        cluster.ruleset("client")
    );
    assert_eq!(cluster.return_path_rules("client"), 0);
    assert_eq!(cluster.return_path("client"), Vec::<String>::new());
}

/// When a pod's namespace is deleted under the agent, the agent releases its handle on it (and
/// with it the listeners), instead of keeping a dead namespace alive.
#[test]
fn vanished_netns_is_released() {
    require_netns!("vanished_netns_is_released");
    let cluster = start(
        &[("a", "client"), ("a", "doomed"), ("b", "server")],
        &["client", "doomed", "server"],
    );
    let path = cluster.topology.netns_path("doomed");
    let identity = |m: std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    let inode = std::fs::metadata(&path).map(identity).expect("stat netns");
    let pid = agent_process(cluster.agents[0].pid().expect("agent pid"));
    let holds_netns = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| {
                // Compare the namespace itself (dev + inode), however the fd was opened.
                entries
                    .flatten()
                    .any(|entry| std::fs::metadata(entry.path()).map(identity).ok() == Some(inode))
            })
            .unwrap_or(false)
    };
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .map(|target| target.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        holds_netns(),
        "the agent (pid {pid}) holds the pod's namespace {inode:?} while it serves it: {links:?}"
    );
    let deleted = std::process::Command::new("ip")
        .args(["netns", "del", &cluster.topology.netns("doomed")])
        .status()
        .expect("ip netns del");
    assert!(deleted.success());
    wait("the agent to release the deleted namespace", || {
        !holds_netns()
    });
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let response = apps::exchange(
        &cluster.topology,
        "client",
        addr(cluster.ip("server"), APP_PORT),
        b"still".to_vec(),
        IO_TIMEOUT,
    )
    .expect("other pods keep working");
    assert_eq!(response, b"still");
}

/// `ip netns exec` may fork: the agent is then its only child.
fn agent_process(pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|child| child.parse().ok())
        .unwrap_or(pid)
}

/// SIGTERM stops new connections at once while an open one keeps flowing; the agent exits as
/// soon as that connection closes (well before the drain deadline) and leaves no rules behind.
/// With a short deadline, a connection that stays open is cut when the deadline passes.
#[test]
fn graceful_shutdown_drains_then_forces() {
    require_netns!("graceful_shutdown_drains_then_forces");
    for (deadline, client_closes) in [("60s", true), ("1s", false)] {
        let mut cluster = Cluster::build(&[("a", "client"), ("b", "server")])
            .captured(&["client", "server"])
            .start_with(|cluster, node| {
                cluster
                    .render(node)
                    .replace("drainTimeout: 2s", &format!("drainTimeout: {deadline}"))
            });
        let _server =
            EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
        let target = addr(cluster.ip("server"), APP_PORT);
        let mut open = open_connection(&cluster.topology, "client", target);
        assert_eq!(echo_once(&mut open, b"before").expect("before"), b"before");

        cluster.agent("a").terminate();
        let wait_refused = || {
            apps::exchange(
                &cluster.topology,
                "client",
                target,
                b"new".to_vec(),
                IO_TIMEOUT,
            )
            .map_or(true, |bytes| bytes.is_empty())
        };
        wait("new connections to be refused while draining", wait_refused);
        if client_closes {
            assert_eq!(
                echo_once(&mut open, b"during").expect("open connection keeps flowing"),
                b"during"
            );
            drop(open);
            let status = cluster.agent_mut("a").stop(Duration::from_secs(30));
            assert!(
                status.is_some_and(|s| s.success()),
                "exits once the last connection closed: {status:?}"
            );
        } else {
            let status = cluster.agent_mut("a").stop(Duration::from_secs(30));
            assert!(
                status.is_some_and(|s| s.success()),
                "exits after the deadline: {status:?}"
            );
            let cut = echo_once(&mut open, b"after");
            assert!(
                cut.as_ref().map_or(true, |bytes| bytes.is_empty()),
                "connection cut after the deadline: {cut:?}"
            );
        }
        assert!(
            !cluster.ruleset("client").contains("nodetunnel"),
            "rules removed on clean shutdown"
        );
    }
}
