//! Network-namespace test of the DNS proxy (issue 14): unmodified clients in a captured pod
//! (glibc's resolver through `getent`, `dig`, `curl`), whose resolv.conf names a nameserver
//! IP that exists nowhere and Kubernetes search domains, get mesh names from the agent and
//! everything else from a test DNS server in another namespace, through the agent.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::Output;

use support::agent::{Agent, Ca, Mesh, Protocol, ServiceSpec, WorkloadSpec};
use support::apps::{EchoServer, Reply};
use support::dns_server::{DnsServer, BIG_ANSWER_RECORDS};
use support::netns::Topology;

const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The nameserver the pod's resolv.conf names: no namespace has it, only capture reaches it.
const POD_NAMESERVER: &str = "10.96.0.53";
const APP_PORT: u16 = 8080;

/// Gives a namespace its own resolv.conf the way `ip netns exec` looks for it
/// (`/etc/netns/<name>/resolv.conf`, bind-mounted over `/etc/resolv.conf`); removed on drop.
struct PodResolvConf(PathBuf);

impl PodResolvConf {
    fn write(netns: &str, text: &str) -> PodResolvConf {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<pod>");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        PodResolvConf(dir)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Field order is drop order: the agent stops before the namespaces go.
struct Setup {
    _agent: Agent,
    upstream: DnsServer,
    server: EchoServer,
    _resolv: PodResolvConf,
    _ca: Ca,
    topology: Topology,
}

/// Node `a` with a captured client and server, an uncaptured `dns` pod running the upstream,
/// the service `echo` (v4 VIP) in front of the server and `six` with only an IPv6 VIP.
fn setup() -> Setup {
    let mut topology = Topology::new();
    topology.add_node("a").expect("node");
    for pod in ["client", "server", "dns"] {
        topology.add_pod("a", pod).expect("pod");
    }
    let client_ip = topology.pod("client").ip;
    let server_ip = topology.pod("server").ip;
    let dns_ip = topology.pod("dns").ip;
    let echo = ServiceSpec::new("echo", ECHO_VIP, 80, APP_PORT);
    let mut server = WorkloadSpec::new("server", server_ip, "a", Protocol::Hbone);
    server.services.push((echo.key(), 80, APP_PORT));
    let mesh = Mesh {
        workloads: vec![
            WorkloadSpec::new("client", client_ip, "a", Protocol::Hbone),
            server,
        ],
        services: vec![echo],
    };
    let six = "  - name: six\n    namespace: default\n    hostname: six.default.svc.cluster.local\n    vips: [/fd00:96::16]\n    ports: {80: 8080}\n";
    let config = mesh
        .render(&topology, "a", &["client", "server"])
        .replacen(
            "agent:\n",
            &format!("agent:\n  dns:\n    upstreams: [\"{dns_ip}\"]\n    forwardTimeout: 2s\n"),
            1,
        )
        .replacen("policies: []\n", &format!("{six}policies: []\n"), 1);
    let upstream = DnsServer::start(&topology, "dns", &[("external.test", server_ip)])
        .expect("upstream DNS server");
    let resolv = PodResolvConf::write(
        &topology.netns("client"),
        &format!(
            "nameserver {POD_NAMESERVER}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:5 attempts:1\n"
        ),
    );
    let app = EchoServer::start(&topology, "server", APP_PORT, Reply::Named("server".into()))
        .expect("echo server");
    let ca = Ca::init().expect("ca");
    let agent = Agent::start(&topology, "a", &ca, &config).expect("agent ready");
    Setup {
        _agent: agent,
        upstream,
        server: app,
        _resolv: resolv,
        _ca: ca,
        topology,
    }
}

impl Setup {
    /// Runs a command in the client pod (with its resolv.conf), whatever its exit code.
    fn in_client(&self, args: &[&str]) -> Output {
        self.topology
            .exec_role("client", args)
            .expect("spawn in client pod")
    }

    /// `getent ahostsv4 <name>` in the client pod: glibc's resolver with the search list.
    fn getent(&self, name: &str) -> String {
        let output = self.in_client(&["getent", "ahostsv4", name]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `dig` against the pod's nameserver, one try, waiting long enough for the agent's
    /// SERVFAIL (its forward deadline is 2 s).
    fn dig(&self, extra: &[&str]) -> String {
        let mut args = vec!["dig", "+tries=1", "+time=10", "+nocookie"];
        let server = format!("@{POD_NAMESERVER}");
        args.push(&server);
        args.extend_from_slice(extra);
        let output = self.in_client(&args);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn metrics(&self) -> String {
        self.topology
            .run_in("a", || -> std::io::Result<String> {
                let mut stream = TcpStream::connect("127.0.0.1:15020")?;
                stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok(text)
            })
            .expect("enter node")
            .expect("scrape metrics")
    }
}

fn answer_count(dig: &str) -> usize {
    dig.split("ANSWER: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

#[test]
fn a_captured_pod_resolves_mesh_names_locally_and_the_rest_upstream() {
    require_netns!("dns_netns::a_captured_pod_resolves_mesh_names_locally_and_the_rest_upstream");
    let setup = setup();
    let vip = ECHO_VIP.to_string();

    // Full and short names, through glibc's search list: the agent answers, upstream never
    // hears of them.
    for name in ["echo.default.svc.cluster.local", "echo.default", "echo"] {
        let resolved = setup.getent(name);
        assert!(resolved.contains(&vip), "{name} resolved to {resolved:?}");
    }
    let asked = setup.upstream.questions();
    assert!(
        !asked.iter().any(|question| question.contains("echo")),
        "the upstream saw a mesh name: {asked:?}"
    );

    // Connecting by name goes through the mesh to the server behind the VIP.
    let curl = setup.in_client(&["curl", "-s", "--http0.9", "--max-time", "3", "http://echo/"]);
    assert!(
        String::from_utf8_lossy(&curl.stdout).starts_with("server"),
        "curl by name: {:?} {}",
        curl.status,
        String::from_utf8_lossy(&curl.stderr)
    );
    assert!(setup.server.received_contains(b"Host: echo"));

    // A name outside the mesh is forwarded to the upstream in the other namespace.
    let external = setup.getent("external.test");
    let server_ip = setup.topology.pod("server").ip.to_string();
    assert!(external.contains(&server_ip), "external.test: {external:?}");
    assert!(setup.upstream.was_asked("external.test"));

    // Over TCP too (port 53/tcp is redirected to the proxy's TCP listener).
    let over_tcp = setup.dig(&["+tcp", "echo.default.svc.cluster.local", "A"]);
    assert!(over_tcp.contains(&vip), "{over_tcp}");

    // An answer the upstream truncates over UDP is fetched over TCP and relayed whole.
    let big = setup.dig(&["big.example.test", "A"]);
    assert_eq!(answer_count(&big), usize::from(BIG_ANSWER_RECORDS), "{big}");
    assert!(setup
        .upstream
        .questions()
        .contains(&"tcp:big.example.test/A".to_string()));

    // An IPv6-only name: A is an empty NOERROR (not NXDOMAIN), AAAA has the VIP.
    let six_a = setup.dig(&["six.default.svc.cluster.local", "A"]);
    assert!(six_a.contains("status: NOERROR"), "{six_a}");
    assert_eq!(answer_count(&six_a), 0, "{six_a}");
    let six_aaaa = setup.dig(&["six.default.svc.cluster.local", "AAAA"]);
    assert!(six_aaaa.contains("fd00:96::16"), "{six_aaaa}");

    // An upstream that never answers: SERVFAIL from the agent, before dig gives up.
    let silent = setup.dig(&["silent.example.test", "A"]);
    assert!(silent.contains("status: SERVFAIL"), "{silent}");
    assert!(setup.upstream.was_asked("silent.example.test"));

    let metrics = setup.metrics();
    for needle in [
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\"",
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"tcp\"",
        "istio_dns_upstream_requests_total{request_query_type=\"a\"",
        "istio_dns_upstream_failures_total{request_query_type=\"a\"",
        "istio_dns_upstream_request_duration_seconds_bucket{",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}
