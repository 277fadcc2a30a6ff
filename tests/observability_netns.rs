//! Network-namespace tests of observability (issue 8): Istio TCP metrics scraped from real
//! agents during and after real traffic (both reporters, mTLS and plaintext), the admin API's
//! `/config_dump` shape, `/logging` changing the level live, the admin port unreachable from a
//! pod, and the inspection CLI.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;
use support::agent::{self, Agent, Ca, Mesh, Protocol, WorkloadSpec};
use support::apps::{EchoServer, Reply};
use support::netns::Topology;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(10);

macro_rules! require_netns {
    ($name:literal) => {
        if !support::netns_tests_enabled($name) {
            return;
        }
    };
}

/// Field order is drop order: agents stop before the namespaces go.
struct Cluster {
    agents: Vec<Agent>,
    _ca: Ca,
    mesh: Mesh,
    topology: Topology,
}

impl Cluster {
    /// client (HBONE, captured) and legacy (plain TCP, not captured) on node a; server (HBONE,
    /// captured) on node b.
    fn start() -> Cluster {
        let mut topology = Topology::new();
        topology.add_node("a").expect("node a");
        topology.add_node("b").expect("node b");
        topology.link("a", "b").expect("link");
        for (node, pod) in [("a", "client"), ("a", "legacy"), ("b", "server")] {
            topology.add_pod(node, pod).expect("pod");
        }
        let ip = |pod: &str| topology.pod(pod).ip;
        let mesh = Mesh {
            workloads: vec![
                WorkloadSpec::new("client", ip("client"), "a", Protocol::Hbone),
                WorkloadSpec::new("legacy", ip("legacy"), "a", Protocol::Tcp),
                WorkloadSpec::new("server", ip("server"), "b", Protocol::Hbone),
            ],
            services: Vec::new(),
        };
        let ca = Ca::init().expect("ca");
        let mut agents = Vec::new();
        for (node, captured) in [("a", &["client"][..]), ("b", &["server"][..])] {
            let config = mesh.render(&topology, node, captured);
            agents.push(Agent::start(&topology, node, &ca, &config).expect("agent ready"));
        }
        Cluster {
            agents,
            _ca: ca,
            mesh,
            topology,
        }
    }

    fn agent(&self, node: &str) -> &Agent {
        &self.agents[usize::from(node != "a")]
    }

    /// One HTTP/1.0 request to `address` from inside `role`'s namespace.
    fn http(&self, role: &str, method: &str, address: &str, path: &str) -> (u16, String) {
        let (method, address, path) = (method.to_string(), address.to_string(), path.to_string());
        self.topology
            .run_in(role, move || http(&method, &address, &path))
            .expect("run in namespace")
            .expect("http request")
    }

    fn metrics(&self, node: &str) -> String {
        let (status, body) = self.http(node, "GET", "127.0.0.1:15020", "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A TCP connection from inside `pod` (the socket stays in that namespace).
    fn connect(&self, pod: &str, target: SocketAddr) -> TcpStream {
        let stream = self
            .topology
            .run_in(pod, move || TcpStream::connect_timeout(&target, IO_TIMEOUT))
            .expect("run in pod")
            .expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream
    }

    /// `nodetunnel <args>` inside `node`'s namespace: (exit success, stdout).
    fn cli(&self, node: &str, args: &[&str]) -> (bool, String) {
        let mut command = vec![agent::binary()];
        command.extend_from_slice(args);
        let output = self
            .topology
            .exec_role(node, &command)
            .expect("run nodetunnel");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }
}

fn http(method: &str, address: &str, path: &str) -> Result<(u16, String)> {
    let address: SocketAddr = address.parse()?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Ok((status, body))
}

/// The value of the one sample of `metric` whose labels include every `labels` pair.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let matching: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .collect();
    assert!(matching.len() <= 1, "several series match: {matching:#?}");
    matching.first()?.rsplit(' ').next()?.parse().ok()
}

/// Echoes `payload` over `stream` and returns what came back.
fn echo(stream: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).expect("write");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).expect("read echo");
    back
}

fn close(mut stream: TcpStream) {
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// An allowed mTLS connection (client → server over HBONE) and a plaintext one (uncaptured
/// legacy → server) give exact counters with Istio's labels on both reporters: bytes are
/// visible while the connection is open, and opened/closed/bytes are exact after it closes.
#[test]
fn metrics_count_mtls_and_plaintext_connections_on_both_reporters() {
    require_netns!("metrics_count_mtls_and_plaintext_connections_on_both_reporters");
    let cluster = Cluster::start();
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let target = SocketAddr::from((cluster.topology.pod("server").ip, APP_PORT));
    let client_id = cluster.mesh.workload("client").identity();
    let server_id = cluster.mesh.workload("server").identity();

    let mut stream = cluster.connect("client", target);
    let payload = vec![b'x'; 1000];
    assert_eq!(echo(&mut stream, &payload), payload);
    let mtls = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
    ];
    for (node, reporter) in [("a", "source"), ("b", "destination")] {
        let labels: Vec<(&str, &str)> = mtls
            .iter()
            .copied()
            .chain([("reporter", reporter)])
            .collect();
        let text = support::wait_for("bytes of the open connection", WAIT, || {
            let text = cluster.metrics(node);
            (sample(&text, "istio_tcp_received_bytes_total", &labels) == Some(1000)).then_some(text)
        })
        .unwrap_or_else(|_| panic!("{reporter}: no live bytes:\n{}", cluster.metrics(node)));
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", &labels),
            Some(1),
            "{reporter}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &labels),
            None,
            "{reporter}: still open"
        );
    }
    close(stream);

    let mut plain = cluster.connect("legacy", target);
    assert_eq!(echo(&mut plain, &payload[..300]), &payload[..300]);
    close(plain);

    for (node, reporter) in [("a", "source"), ("b", "destination")] {
        let labels: Vec<(&str, &str)> = mtls
            .iter()
            .copied()
            .chain([("reporter", reporter)])
            .collect();
        let text = support::wait_for("the mTLS connection closed", WAIT, || {
            let text = cluster.metrics(node);
            sample(&text, "istio_tcp_connections_closed_total", &labels).map(|_| text)
        })
        .unwrap_or_else(|_| panic!("{reporter}: not closed:\n{}", cluster.metrics(node)));
        for (metric, value) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 1000),
            ("istio_tcp_sent_bytes_total", 1000),
        ] {
            assert_eq!(
                sample(&text, metric, &labels),
                Some(value),
                "{reporter} {metric}"
            );
        }
        assert_eq!(
            sample(&text, "istio_tcp_connections_failed_total", &labels),
            None
        );
    }

    let plaintext = [
        ("reporter", "destination"),
        ("source_workload", "legacy"),
        ("destination_workload", "server"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "unknown"),
        ("response_flags", "-"),
    ];
    let text = support::wait_for("the plaintext connection closed", WAIT, || {
        let text = cluster.metrics("b");
        sample(&text, "istio_tcp_connections_closed_total", &plaintext).map(|_| text)
    })
    .unwrap_or_else(|_| panic!("plaintext not reported:\n{}", cluster.metrics("b")));
    for (metric, value) in [
        ("istio_tcp_connections_opened_total", 1),
        ("istio_tcp_connections_closed_total", 1),
        ("istio_tcp_received_bytes_total", 300),
        ("istio_tcp_sent_bytes_total", 300),
    ] {
        assert_eq!(
            sample(&text, metric, &plaintext),
            Some(value),
            "plaintext {metric}"
        );
    }
    assert!(text.contains("istio_build{component=\"ztunnel\""), "{text}");
    assert!(
        text.contains("workload_manager_active_proxy_count 1"),
        "{text}"
    );
    assert!(
        text.contains("nodetunnel_certificate_expiration_timestamp_seconds{identity=\"spiffe://")
    );
    assert!(!text.contains("# EOF"), "Prometheus text by default");

    let openmetrics = cluster
        .topology
        .run_in("b", || {
            let mut stream = TcpStream::connect("127.0.0.1:15020")?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.write_all(
                b"GET /stats/prometheus HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n",
            )?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok::<_, std::io::Error>(text)
        })
        .expect("run in b")
        .expect("scrape");
    assert!(
        openmetrics.contains("application/openmetrics-text"),
        "{openmetrics}"
    );
    assert!(openmetrics.trim_end().ends_with("# EOF"), "{openmetrics}");
}

/// The admin API answers on loopback only: `/config_dump` has Istio's top-level names and the
/// model, `/logging` changes the level live (a debug `connection opened` event appears), and a
/// pod cannot reach 15000 on its node although it can reach 15020; the CLI prints tables.
#[test]
fn admin_api_dump_logging_loopback_and_cli() {
    require_netns!("admin_api_dump_logging_loopback_and_cli");
    let cluster = Cluster::start();
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");

    let (status, body) = cluster.http("a", "GET", "127.0.0.1:15000", "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("dump is JSON");
    for key in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "workloadState",
        "config",
        "version",
    ] {
        assert!(dump.get(key).is_some(), "config_dump lacks {key}: {body}");
    }
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .expect("workloads array")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let client_uid = dump["workloads"]
        .as_array()
        .and_then(|all| all.iter().find(|w| w["name"] == "client"))
        .and_then(|w| w["uid"].as_str())
        .expect("client uid")
        .to_string();
    assert_eq!(dump["workloadState"][&client_uid]["state"], "Up", "{body}");

    let (status, level) = cluster.http("a", "POST", "127.0.0.1:15000", "/logging");
    assert_eq!((status, level.trim()), (200, "current log level is info"));
    let (status, _) = cluster.http("a", "GET", "127.0.0.1:15000", "/logging");
    assert_eq!(status, 405, "GET must not change or read the level");
    let (status, _) = cluster.http("a", "POST", "127.0.0.1:15000", "/logging?level=nonsense=[");
    assert_eq!(status, 400);
    let (status, level) = cluster.http(
        "a",
        "POST",
        "127.0.0.1:15000",
        "/logging?level=access=debug,info",
    );
    assert_eq!(status, 200, "{level}");
    assert!(level.contains("access=debug"), "{level}");

    let target = SocketAddr::from((cluster.topology.pod("server").ip, APP_PORT));
    let mut stream = cluster.connect("client", target);
    assert_eq!(echo(&mut stream, b"ping"), b"ping");
    let opened = cluster
        .agent("a")
        .wait_for_event("debug connection opened", WAIT, |event| {
            event.target == "access" && event.message == "connection opened"
        })
        .expect("debug event after /logging change");
    assert_eq!(opened.field("direction").as_deref(), Some("outbound"));
    let (status, connections) = cluster.http("a", "GET", "127.0.0.1:15000", "/connections");
    assert_eq!(status, 200);
    let connections: serde_json::Value = serde_json::from_str(&connections).expect("json");
    assert_eq!(
        connections.as_array().map(Vec::len),
        Some(1),
        "{connections}"
    );
    assert_eq!(connections[0]["bytesSent"], 4);
    let (ok, table) = cluster.cli("a", &["connections"]);
    assert!(ok && table.lines().count() == 2, "{table}");
    close(stream);
    let (_, level) = cluster.http("a", "POST", "127.0.0.1:15000", "/logging?reset");
    assert_eq!(level.trim(), "current log level is info");

    // From a pod, the node is its default gateway: metrics answer there, admin does not. The
    // pod is not captured, so its connections reach the node itself, not our outbound port.
    let route = cluster
        .topology
        .exec_role("legacy", &["ip", "-4", "route", "show", "default"])
        .expect("ip route");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    let gateway: Ipv4Addr = route
        .split_whitespace()
        .skip_while(|word| *word != "via")
        .nth(1)
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no default route in the pod: {route}"));
    let reach = |port: u16| {
        let address = SocketAddr::from((gateway, port));
        cluster
            .topology
            .run_in("legacy", move || {
                TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
            })
            .expect("run in pod")
    };
    assert!(
        reach(15020),
        "metrics are served on the node address (control)"
    );
    assert!(!reach(15000), "admin must be loopback only");

    let (ok, workloads) = cluster.cli("a", &["workloads"]);
    assert!(ok, "{workloads}");
    let header = workloads.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAMESPACE") && header.contains("IDENTITY"),
        "{workloads}"
    );
    assert_eq!(workloads.lines().count(), 4, "{workloads}");
    let (ok, status) = cluster.cli("a", &["status"]);
    assert!(
        ok && status.contains("pods:         1 up, 0 pending"),
        "{status}"
    );
    let (ok, certificates) = cluster.cli("a", &["certificates", "--json"]);
    assert!(ok, "{certificates}");
    let certificates: serde_json::Value = serde_json::from_str(&certificates).expect("json");
    assert!(
        certificates[0]["certChain"][0]["expirationTime"].is_string(),
        "{certificates}"
    );
    let (ok, _) = cluster.cli("b", &["status", "--admin", "127.0.0.1:1"]);
    assert!(!ok, "an unreachable agent is an error");
}

/// A failed connection (no app on the port) and a denied one (default deny on the server's
/// node) are counted failed with `CONNECT` and `DENY` by both reporters; the series of a
/// workload removed from the model disappear; `/explain` answers from the live model; and
/// `/quitquitquit` drains the agent, which then exits cleanly.
#[test]
fn failures_denials_stale_series_explain_and_quit() {
    require_netns!("failures_denials_stale_series_explain_and_quit");
    let mut cluster = Cluster::start();
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let server_ip = cluster.topology.pod("server").ip;
    let failed = |node: &str, reporter: &str, flag: &str| {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("response_flags", flag),
        ];
        support::wait_for("a failed connection", WAIT, || {
            sample(
                &cluster.metrics(node),
                "istio_tcp_connections_failed_total",
                &labels,
            )
        })
        .unwrap_or_else(|_| panic!("{reporter} {flag}:\n{}", cluster.metrics(node)))
    };

    let closed_port = SocketAddr::from((server_ip, 9));
    let mut refused = cluster.connect("client", closed_port);
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing listens on the port");
    assert_eq!(failed("a", "source", "CONNECT"), 1);
    assert_eq!(failed("b", "destination", "CONNECT"), 1);

    let target = SocketAddr::from((server_ip, APP_PORT));
    let mut plain = cluster.connect("legacy", target);
    assert_eq!(echo(&mut plain, b"hello"), b"hello");
    close(plain);
    let legacy = [("source_workload", "legacy"), ("reporter", "destination")];
    support::wait_for("legacy series", WAIT, || {
        sample(
            &cluster.metrics("b"),
            "istio_tcp_connections_closed_total",
            &legacy,
        )
    })
    .expect("legacy connection counted");

    let mut mesh = cluster.mesh.clone();
    mesh.workloads.retain(|workload| workload.name != "legacy");
    let config = mesh.render(&cluster.topology, "b", &["server"]).replacen(
        "agent:\n",
        "agent:\n  authorization: {defaultDeny: true}\n",
        1,
    );
    cluster
        .agent("b")
        .write_config(&config)
        .expect("config edit");
    support::wait_for("legacy series evicted", WAIT, || {
        (!cluster.metrics("b").contains("source_workload=\"legacy\"")).then_some(())
    })
    .unwrap_or_else(|_| panic!("stale series stayed:\n{}", cluster.metrics("b")));

    let mut denied = cluster.connect("client", target);
    let _ = denied.write_all(b"let me in");
    let mut rest = Vec::new();
    let _ = denied.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a denied connection gets nothing back");
    assert_eq!(failed("a", "source", "DENY"), 1);
    assert_eq!(failed("b", "destination", "DENY"), 1);
    let denial = cluster
        .agent("b")
        .wait_for_event("denied access event", WAIT, |event| {
            event.is_access() && event.field("response_flags").as_deref() == Some("DENY")
        })
        .expect("denial logged");
    assert!(
        denial.field("error").is_some_and(|e| !e.is_empty()),
        "{}",
        denial.raw
    );

    let client_ip = cluster.topology.pod("client").ip;
    let path = format!("/explain?from={client_ip}&to={server_ip}:{APP_PORT}");
    let (status, explained) = cluster.http("b", "GET", "127.0.0.1:15000", &path);
    assert_eq!(status, 200, "{explained}");
    let explained: serde_json::Value = serde_json::from_str(&explained).expect("json");
    assert!(explained.get("decision").is_some(), "{explained}");
    let (status, _) = cluster.http("b", "GET", "127.0.0.1:15000", "/explain?from=x");
    assert_eq!(status, 400);

    let (status, body) = cluster.http("a", "GET", "127.0.0.1:15000", "/quitquitquit");
    assert_eq!(status, 405, "{body}");
    let (status, body) = cluster.http("a", "POST", "127.0.0.1:15000", "/quitquitquit");
    assert_eq!((status, body.as_str()), (200, "shutdown now\n"));
    let exited = support::wait_for("agent a to exit", WAIT, || cluster.agents[0].exit_status())
        .expect("agent a exits after /quitquitquit");
    assert!(exited.success(), "{exited}");
}
