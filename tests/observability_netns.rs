//! Network-namespace tests of observability (issue 8): Istio TCP metrics scraped from real
//! agents during and after real traffic (both reporters, mTLS and plaintext), authorization
//! decision counters, in-pod proxy counters and tokio runtime gauges, the admin API's
//! `/config_dump` shape (certificate chains), `/logging` changing the level live, CPU and heap
//! profiles, the admin port unreachable from a pod, and the inspection CLI.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;
use support::agent;
use support::apps::{EchoServer, Reply};
use support::cluster::Cluster;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(10);

/// client (HBONE, captured) and legacy (plain TCP, not captured) on node a; server (HBONE,
/// captured, running an echo server on `APP_PORT`) on node b.
fn start() -> (Cluster, EchoServer) {
    let cluster = Cluster::build(&[("a", "client"), ("a", "legacy"), ("b", "server")])
        .plain_tcp(&["legacy"])
        .captured(&["client", "server"])
        .start();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    (cluster, server)
}

/// What these tests ask of a cluster: HTTP to the node servers, scrapes, connections from pods
/// and the CLI.
trait Observe {
    /// One HTTP/1.0 request to `address` from inside `role`'s namespace.
    fn http(&self, role: &str, method: &str, address: &str, path: &str) -> (u16, String);
    /// [`Observe::http`] with the body as bytes (profiles are binary).
    fn http_bytes(&self, role: &str, method: &str, address: &str, path: &str) -> (u16, Vec<u8>);
    /// An admin API request to `node`'s agent.
    fn admin(&self, node: &str, method: &str, path: &str) -> (u16, String);
    /// A scrape of `node`'s metrics endpoint.
    fn metrics(&self, node: &str) -> String;
    /// A TCP connection from inside `pod` (the socket stays in that namespace).
    fn connect(&self, pod: &str, target: SocketAddr) -> TcpStream;
    /// `nodetunnel <args>` inside `node`'s namespace: (exit success, stdout).
    fn cli(&self, node: &str, args: &[&str]) -> (bool, String);
}

impl Observe for Cluster {
    fn http(&self, role: &str, method: &str, address: &str, path: &str) -> (u16, String) {
        let (status, body) = self.http_bytes(role, method, address, path);
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn http_bytes(&self, role: &str, method: &str, address: &str, path: &str) -> (u16, Vec<u8>) {
        let (method, address, path) = (method.to_string(), address.to_string(), path.to_string());
        self.topology
            .run_in(role, move || http(&method, &address, &path))
            .expect("run in namespace")
            .expect("http request")
    }

    fn admin(&self, node: &str, method: &str, path: &str) -> (u16, String) {
        self.http(node, method, "127.0.0.1:15000", path)
    }

    fn metrics(&self, node: &str) -> String {
        let (status, body) = self.http(node, "GET", "127.0.0.1:15020", "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    fn connect(&self, pod: &str, target: SocketAddr) -> TcpStream {
        let stream = self
            .topology
            .run_in(pod, move || TcpStream::connect_timeout(&target, IO_TIMEOUT))
            .expect("run in pod")
            .expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream
    }

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

fn http(method: &str, address: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    let address: SocketAddr = address.parse()?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    // A CPU profile takes its `seconds` before answering.
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(response.len(), |at| at + 4);
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, response[head_end..].to_vec()))
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

/// The Istio labels of the client → server mTLS connection, as `reporter` counts it.
fn mtls_labels<'a>(
    client_id: &'a str,
    server_id: &'a str,
    reporter: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("source_principal", client_id),
        ("destination_principal", server_id),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("reporter", reporter),
    ]
}

/// An allowed mTLS connection (client → server over HBONE) is counted with Istio's labels by
/// both reporters: its bytes are visible while it is open, and opened/closed/bytes are exact
/// after it closes.
#[test]
fn metrics_count_an_mtls_connection_on_both_reporters() {
    require_netns!("metrics_count_an_mtls_connection_on_both_reporters");
    let (cluster, _server) = start();
    let target = cluster.target("server", APP_PORT);
    let client_id = cluster.mesh.workload("client").identity();
    let server_id = cluster.mesh.workload("server").identity();

    let mut stream = cluster.connect("client", target);
    let payload = vec![b'x'; 1000];
    assert_eq!(echo(&mut stream, &payload), payload);
    for (node, reporter) in [("a", "source"), ("b", "destination")] {
        let labels = mtls_labels(&client_id, &server_id, reporter);
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

    for (node, reporter) in [("a", "source"), ("b", "destination")] {
        let labels = mtls_labels(&client_id, &server_id, reporter);
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
}

/// A plaintext connection (uncaptured legacy → server) is counted by the destination with no
/// principal and no security policy.
/// Once ready, each agent gives back the pages of its own code that start-up left resident,
/// and carries traffic afterwards as before (the data path's code faults back in).
#[test]
fn once_ready_agents_give_back_start_up_pages_and_still_carry_traffic() {
    require_netns!("once_ready_agents_give_back_start_up_pages_and_still_carry_traffic");
    let (cluster, _server) = start();
    for node in ["a", "b"] {
        let released = cluster
            .agent(node)
            .wait_for_event("start-up pages given back", WAIT, |event| {
                event.field("message").as_deref()
                    == Some("ready: start-up code pages given back to the kernel")
            })
            .expect("the agent releases its start-up pages once ready");
        assert!(
            released.number("advised_kib").unwrap_or(0) > 0,
            "the executable's mappings were advised: {released:?}"
        );
    }
    let payload = vec![b'y'; 4096];
    let mut tunnelled = cluster.connect("client", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut tunnelled, &payload), payload);
    close(tunnelled);
}

#[test]
fn metrics_count_a_plaintext_connection_at_the_destination() {
    require_netns!("metrics_count_a_plaintext_connection_at_the_destination");
    let (cluster, _server) = start();
    let payload = vec![b'x'; 300];
    let mut plain = cluster.connect("legacy", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut plain, &payload), payload);
    close(plain);

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
}

/// The metrics endpoint answers Prometheus text by default, with the build, proxy and
/// certificate gauges, and OpenMetrics (ending in `# EOF`) when asked for it.
#[test]
fn metrics_endpoint_speaks_prometheus_text_and_openmetrics() {
    require_netns!("metrics_endpoint_speaks_prometheus_text_and_openmetrics");
    let (cluster, _server) = start();
    // One connection, so the server's certificate has been issued.
    let mut stream = cluster.connect("client", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut stream, b"certified"), b"certified");
    close(stream);
    let text = support::wait_for("the server's certificate gauge", WAIT, || {
        let text = cluster.metrics("b");
        text.contains("nodetunnel_certificate_expiration_timestamp_seconds{identity=\"spiffe://")
            .then_some(text)
    })
    .unwrap_or_else(|_| panic!("no certificate gauge:\n{}", cluster.metrics("b")));
    assert!(text.contains("istio_build{component=\"ztunnel\""), "{text}");
    assert!(
        text.contains("workload_manager_active_proxy_count 1"),
        "{text}"
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

/// `/config_dump` has Istio's top-level names and the model, with each local workload's state.
#[test]
fn config_dump_has_istios_names_and_the_model() {
    require_netns!("config_dump_has_istios_names_and_the_model");
    let (cluster, _server) = start();
    let (status, body) = cluster.admin("a", "GET", "/config_dump");
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

    // With a connection open, the running agents' dumps have the shapes istioctl decodes
    // (ztunnel's names and JSON types) and our own CLI's types read them.
    let target = cluster.target("server", APP_PORT);
    let mut stream = cluster.connect("client", target);
    assert_eq!(echo(&mut stream, b"dump"), b"dump");
    let client_ip = cluster.topology.pod("client").ip.to_string();
    // (node, pod, direction, src IP, originalDst, actualDst)
    let server_uid = client_uid.replace("client", "server");
    let expected = [
        (
            "a",
            client_uid.as_str(),
            "outbound",
            target.to_string(),
            format!("{}:15008", target.ip()),
        ),
        (
            "b",
            server_uid.as_str(),
            "inbound",
            target.to_string(),
            target.to_string(),
        ),
    ];
    for (node, uid, direction, original, actual) in expected {
        let (_, body) = cluster.admin(node, "GET", "/config_dump");
        let typed: nodetunnel::admin::schema::ConfigDump =
            serde_json::from_str(&body).expect("the CLI's types read the dump");
        assert_eq!(typed.workloads.len(), 3, "{body}");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("dump is JSON");
        let protocols: Vec<(&str, &str)> = dump["workloads"]
            .as_array()
            .expect("workloads")
            .iter()
            .map(|w| {
                (
                    w["name"].as_str().unwrap_or(""),
                    w["protocol"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert!(protocols.contains(&("client", "HBONE")), "{protocols:?}");
        assert!(protocols.contains(&("legacy", "TCP")), "{protocols:?}");
        let pod = &dump["workloadState"][uid];
        let info = &pod["info"];
        assert_eq!(info["namespace"], "default", "{pod}");
        assert_eq!(info["trustDomain"], "cluster.local", "{pod}");
        assert!(
            info["name"].is_string() && info["serviceAccount"].is_string(),
            "{pod}"
        );
        let connection = &pod["connections"][direction][0];
        assert!(
            connection["src"]
                .as_str()
                .is_some_and(|src| src.starts_with(&format!("{client_ip}:"))),
            "{node} {direction}: {connection}"
        );
        assert_eq!(connection["originalDst"], original.as_str(), "{connection}");
        assert_eq!(connection["actualDst"], actual.as_str(), "{connection}");
        assert_eq!(connection["protocol"], "HBONE", "{connection}");
    }
    close(stream);
}

/// `/logging` reads and changes the level only on POST, refuses a bad filter, and a change is
/// live: a debug `connection opened` event appears, while `/connections` (and the CLI's table)
/// list the open connection; a reset goes back to the start-up level.
#[test]
fn logging_changes_the_level_live_and_connections_are_listed() {
    require_netns!("logging_changes_the_level_live_and_connections_are_listed");
    let (cluster, _server) = start();
    let (status, level) = cluster.admin("a", "POST", "/logging");
    assert_eq!((status, level.trim()), (200, "current log level is info"));
    let (status, _) = cluster.admin("a", "GET", "/logging");
    assert_eq!(status, 405, "GET must not change or read the level");
    for bad in ["nonsense=[", "access:debug", "access"] {
        let (status, _) = cluster.admin("a", "POST", &format!("/logging?level={bad}"));
        assert_eq!(status, 400, "{bad}");
    }
    let (_, level) = cluster.admin("a", "POST", "/logging");
    assert_eq!(
        level.trim(),
        "current log level is info",
        "a refused level changes nothing"
    );
    let (status, level) = cluster.admin("a", "POST", "/logging?level=access=debug,info");
    assert_eq!(status, 200, "{level}");
    assert!(level.contains("access=debug"), "{level}");

    let mut stream = cluster.connect("client", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut stream, b"ping"), b"ping");
    let opened = cluster
        .agent("a")
        .wait_for_event("debug connection opened", WAIT, |event| {
            event.target == "access" && event.message == "connection opened"
        })
        .expect("debug event after /logging change");
    assert_eq!(opened.field("direction").as_deref(), Some("outbound"));
    let (status, connections) = cluster.admin("a", "GET", "/connections");
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
    let (_, level) = cluster.admin("a", "POST", "/logging?reset");
    assert_eq!(level.trim(), "current log level is info");
}

/// From a pod, the node is its default gateway: metrics answer there, the admin API does not
/// (it is bound to loopback only).
#[test]
fn admin_is_loopback_only_while_metrics_answer_on_the_node_address() {
    require_netns!("admin_is_loopback_only_while_metrics_answer_on_the_node_address");
    let (cluster, _server) = start();
    // The pod is not captured, so its connections reach the node itself, not our outbound
    // port.
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
}

/// The inspection CLI prints the agent's workloads, status and certificates as tables (or
/// JSON), and an agent it cannot reach is an error.
#[test]
fn cli_prints_tables_and_an_unreachable_agent_is_an_error() {
    require_netns!("cli_prints_tables_and_an_unreachable_agent_is_an_error");
    let (cluster, _server) = start();
    let mut stream = cluster.connect("client", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut stream, b"certified"), b"certified");
    close(stream);
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

/// How many connections `reporter` on `node` counted failed with `flag`, once there is one.
fn failed(cluster: &Cluster, node: &str, reporter: &str, flag: &str) -> u64 {
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
}

/// A connection to a port where no app listens is counted failed with `CONNECT` by both
/// reporters, and the client gets nothing back.
#[test]
fn a_failed_connection_is_counted_with_connect_by_both_reporters() {
    require_netns!("a_failed_connection_is_counted_with_connect_by_both_reporters");
    let (cluster, _server) = start();
    let mut refused = cluster.connect("client", cluster.target("server", 9));
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing listens on the port");
    assert_eq!(failed(&cluster, "a", "source", "CONNECT"), 1);
    assert_eq!(failed(&cluster, "b", "destination", "CONNECT"), 1);
}

/// The series of a workload removed from the model disappear from the metrics.
#[test]
fn series_of_a_workload_removed_from_the_model_disappear() {
    require_netns!("series_of_a_workload_removed_from_the_model_disappear");
    let (cluster, _server) = start();
    let mut plain = cluster.connect("legacy", cluster.target("server", APP_PORT));
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
    let config = mesh.render(&cluster.topology, "b", &["server"]);
    cluster
        .agent("b")
        .write_config(&config)
        .expect("config edit");
    support::wait_for("legacy series evicted", WAIT, || {
        (!cluster.metrics("b").contains("source_workload=\"legacy\"")).then_some(())
    })
    .unwrap_or_else(|_| panic!("stale series stayed:\n{}", cluster.metrics("b")));
}

/// With default deny on the server's node, a connection is counted failed with `DENY` by both
/// reporters, gets nothing back, and its access log says why.
#[test]
fn a_denied_connection_is_counted_with_deny_by_both_reporters_and_logged() {
    require_netns!("a_denied_connection_is_counted_with_deny_by_both_reporters_and_logged");
    let (cluster, _server) = start();
    let config = cluster.render("b").replacen(
        "agent:\n",
        "agent:\n  authorization: {defaultDeny: true}\n",
        1,
    );
    cluster
        .agent("b")
        .write_config(&config)
        .expect("config edit");
    let (client_ip, server_ip) = (cluster.ip("client"), cluster.ip("server"));
    let explain = format!("/explain?from={client_ip}&to={server_ip}:{APP_PORT}");
    support::wait_for("the default deny in the live model", WAIT, || {
        let (_, explained) = cluster.admin("b", "GET", &explain);
        let explained: serde_json::Value = serde_json::from_str(&explained).ok()?;
        (explained["decision"]["verdict"] == "deny").then_some(())
    })
    .expect("the config edit applied");

    let mut denied = cluster.connect("client", cluster.target("server", APP_PORT));
    let _ = denied.write_all(b"let me in");
    let mut rest = Vec::new();
    let _ = denied.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a denied connection gets nothing back");
    assert_eq!(failed(&cluster, "a", "source", "DENY"), 1);
    assert_eq!(failed(&cluster, "b", "destination", "DENY"), 1);
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
}

/// `/explain` answers a decision from the live model, and 400 for a malformed question.
#[test]
fn explain_answers_from_the_live_model() {
    require_netns!("explain_answers_from_the_live_model");
    let (cluster, _server) = start();
    let client_ip = cluster.ip("client");
    let server_ip = cluster.ip("server");
    let path = format!("/explain?from={client_ip}&to={server_ip}:{APP_PORT}");
    let (status, explained) = cluster.admin("b", "GET", &path);
    assert_eq!(status, 200, "{explained}");
    let explained: serde_json::Value = serde_json::from_str(&explained).expect("json");
    assert!(explained.get("decision").is_some(), "{explained}");
    let (status, _) = cluster.admin("b", "GET", "/explain?from=x");
    assert_eq!(status, 400);
}

/// `/quitquitquit` needs POST, then drains the agent, which exits cleanly.
#[test]
fn quitquitquit_needs_post_and_drains_the_agent() {
    require_netns!("quitquitquit_needs_post_and_drains_the_agent");
    let (mut cluster, _server) = start();
    let (status, body) = cluster.admin("a", "GET", "/quitquitquit");
    assert_eq!(status, 405, "{body}");
    let (status, body) = cluster.admin("a", "POST", "/quitquitquit");
    assert_eq!((status, body.as_str()), (200, "shutdown now\n"));
    let exited = support::wait_for("agent a to exit", WAIT, || {
        cluster.agent_mut("a").exit_status()
    })
    .expect("agent a exits after /quitquitquit");
    assert!(exited.success(), "{exited}");
}

/// An AuthorizationPolicy in `default` (all its workloads) with one `from.source` clause.
fn policy(name: &str, action: &str, source: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
         metadata: {{name: {name}, namespace: default}}\n    spec:\n      action: {action}\n      \
         rules: [{{from: [{{source: {source}}}]}}]\n"
    )
}

/// Decisions on the server's agent: an allowed mTLS connection and a denied plaintext one are
/// counted under the policies that decided them; a policy change closes the open connection
/// (counted as a re-evaluation denial) and the series of the removed policies disappear.
#[test]
fn decision_counters_follow_policies() {
    require_netns!("decision_counters_follow_policies");
    let (cluster, _server) = start();
    let client = format!(
        "[\"{}\"]",
        &cluster.mesh.workload("client").identity()["spiffe://".len()..]
    );
    let server_config = |resources: &[String]| {
        let mut yaml = cluster.render("b");
        yaml.push_str("istioResources:\n");
        yaml.push_str(&resources.concat());
        yaml
    };
    let set_policies = |resources: &[String], present: &str, absent: &str| {
        cluster
            .agent("b")
            .write_config(&server_config(resources))
            .expect("config edit");
        support::wait_for("the new policies", WAIT, || {
            let (_, dump) = cluster.admin("b", "GET", "/config_dump");
            (dump.contains(present) && !dump.contains(absent)).then_some(())
        })
        .expect("policies applied");
    };
    set_policies(
        &[
            policy(
                "allow-client",
                "ALLOW",
                &format!("{{principals: {client}}}"),
            ),
            policy(
                "deny-others",
                "DENY",
                &format!("{{notPrincipals: {client}}}"),
            ),
        ],
        "deny-others",
        "deny-client",
    );
    let target = cluster.target("server", APP_PORT);
    let mut open = cluster.connect("client", target);
    assert_eq!(echo(&mut open, b"allowed"), b"allowed");
    let mut refused = cluster.connect("legacy", target);
    let _ = refused.write_all(b"let me in");
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the plaintext connection is refused");

    let decisions = "nodetunnel_authorization_decisions_total";
    let server = [
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
    ];
    let series = |pairs: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        pairs.iter().chain(&server).copied().collect()
    };
    let allowed = series(&[
        ("action", "allow"),
        ("policy", "default/allow-client"),
        ("reason", "allowed_by"),
        ("phase", "connect"),
    ]);
    let denied = series(&[
        ("action", "deny"),
        ("policy", "default/deny-others"),
        ("reason", "denied_by"),
        ("phase", "connect"),
    ]);
    let text = support::wait_for("both decisions", WAIT, || {
        let text = cluster.metrics("b");
        sample(&text, decisions, &denied).map(|_| text)
    })
    .unwrap_or_else(|_| panic!("no denial counted:\n{}", cluster.metrics("b")));
    assert_eq!(sample(&text, decisions, &allowed), Some(1), "{text}");
    assert_eq!(sample(&text, decisions, &denied), Some(1), "{text}");

    // Replacing both policies by one that denies the client closes the open connection.
    set_policies(
        &[policy(
            "deny-client",
            "DENY",
            &format!("{{principals: {client}}}"),
        )],
        "deny-client",
        "allow-client",
    );
    let revoked = series(&[
        ("action", "deny"),
        ("policy", "default/deny-client"),
        ("reason", "denied_by"),
        ("phase", "reevaluation"),
    ]);
    let text = support::wait_for("the revocation counted", WAIT, || {
        let text = cluster.metrics("b");
        sample(&text, decisions, &revoked).map(|_| text)
    })
    .unwrap_or_else(|_| panic!("no revocation counted:\n{}", cluster.metrics("b")));
    assert_eq!(sample(&text, decisions, &revoked), Some(1), "{text}");
    let _ = open.read_to_end(&mut rest);
    let text = support::wait_for("removed policies' series evicted", WAIT, || {
        let text = cluster.metrics("b");
        (!text.contains("default/allow-client") && !text.contains("default/deny-others"))
            .then_some(text)
    })
    .unwrap_or_else(|_| panic!("stale decision series:\n{}", cluster.metrics("b")));
    assert!(text.contains(decisions), "{text}");
}

/// In-pod proxies are counted as they start and stop (the config's client, then legacy captured
/// and released through the admin API), and the tokio gauges describe the agent's runtime.
#[test]
fn proxy_lifecycle_and_runtime_gauges_are_reported() {
    require_netns!("proxy_lifecycle_and_runtime_gauges_are_reported");
    let (cluster, _server) = start();
    let metrics_a = cluster.metrics("a");
    assert!(
        metrics_a.contains("\nworkload_manager_proxies_started_total 1\n"),
        "{metrics_a}"
    );
    let netns = cluster.topology.netns_path("legacy");
    let add = format!("/pods?workload=default/legacy&netns={}", netns.display());
    let (status, body) = cluster.admin("a", "POST", &add);
    assert_eq!(status, 200, "{body}");
    let (status, body) = cluster.admin("a", "DELETE", "/pods?workload=default/legacy");
    assert_eq!(status, 200, "{body}");
    let metrics_a = cluster.metrics("a");
    for line in [
        "workload_manager_proxies_started_total 2",
        "workload_manager_proxies_stopped_total 1",
        "workload_manager_active_proxy_count 1",
    ] {
        assert!(
            metrics_a.lines().any(|l| l == line),
            "want {line}:\n{metrics_a}"
        );
    }

    // The data plane has as many workers as CPUs it may use (tokio's default).
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = format!("tokio_num_workers {cpus}");
    assert!(
        metrics_a.lines().any(|l| l == workers),
        "want {workers}:\n{metrics_a}"
    );
    assert!(
        metrics_a.contains("tokio_worker_park_count_total{worker=\"0\"}"),
        "{metrics_a}"
    );
}

/// Decodes a pprof protobuf and returns it with its sample types as (type, unit) strings.
fn pprof_profile(bytes: &[u8]) -> (pprof::protos::Profile, Vec<(String, String)>) {
    use pprof::protos::Message as _;
    let profile = pprof::protos::Profile::decode(bytes).expect("a pprof protobuf");
    let string = |index: i64| {
        usize::try_from(index)
            .ok()
            .and_then(|index| profile.string_table.get(index))
            .cloned()
            .unwrap_or_default()
    };
    let types = profile
        .sample_type
        .iter()
        .map(|value| (string(value.ty), string(value.unit)))
        .collect();
    (profile, types)
}

/// `/debug/pprof/profile` answers a CPU profile of the requested rate, with the runtime's
/// worker stacks symbolized, while traffic flows; bad parameters are 400.
#[test]
fn cpu_profile_samples_the_runtime_at_the_asked_rate() {
    require_netns!("cpu_profile_samples_the_runtime_at_the_asked_rate");
    let (cluster, _server) = start();
    let target = cluster.target("server", APP_PORT);
    // Traffic through agent a for as long as the profile runs (bounded: at most 10 s).
    let mut stream = cluster.connect("client", target);
    let profiling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let running = profiling.clone();
    let traffic = std::thread::spawn(move || {
        let payload = vec![b'p'; 16 * 1024];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            assert_eq!(echo(&mut stream, &payload), payload);
        }
        close(stream);
    });
    let (status, body) = cluster.http_bytes(
        "a",
        "GET",
        "127.0.0.1:15000",
        "/debug/pprof/profile?seconds=1&frequency=99",
    );
    profiling.store(false, std::sync::atomic::Ordering::Relaxed);
    traffic.join().expect("traffic");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (profile, types) = pprof_profile(&body);
    let expected = [("samples", "count"), ("cpu", "nanoseconds")];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(kind, unit)| (kind.to_string(), unit.to_string()))
        .collect();
    assert_eq!(types, expected);
    assert!(!profile.sample.is_empty(), "the copy loop was sampled");
    assert!(
        profile
            .string_table
            .iter()
            .any(|name| name.contains("tokio::runtime::scheduler::")),
        "stacks of the runtime's worker threads, symbolized: {:?}",
        profile.string_table
    );
    assert_eq!(
        profile.period,
        1_000_000_000 / 99,
        "sampled at the asked rate"
    );
    for bad in ["seconds=0", "seconds=301", "frequency=5000", "seconds=x"] {
        let (status, _) = cluster.admin("a", "GET", &format!("/debug/pprof/profile?{bad}"));
        assert_eq!(status, 400, "{bad}");
    }
}

/// `/debug/pprof/heap` refuses until heap profiling is switched on (by POST), then answers a
/// gzipped heap profile of the agent's process; it can be switched off again.
#[test]
fn heap_profile_is_off_until_switched_on() {
    require_netns!("heap_profile_is_off_until_switched_on");
    let (cluster, _server) = start();
    let target = cluster.target("server", APP_PORT);
    let (status, body) = cluster.admin("a", "GET", "/debug/pprof/heap");
    assert_eq!(status, 409, "inactive until switched on: {body}");
    let (status, _) = cluster.admin("a", "GET", "/debug/pprof/heap/profiling?activate=true");
    assert_eq!(status, 405, "switching needs POST");
    let (status, state) = cluster.admin("a", "POST", "/debug/pprof/heap/profiling?activate=true");
    assert_eq!(
        (status, state.contains("\"active\": true")),
        (200, true),
        "{state}"
    );
    let mut stream = cluster.connect("client", target);
    assert_eq!(echo(&mut stream, &[b'h'; 4096]), [b'h'; 4096]);
    close(stream);
    let (status, body) = cluster.http_bytes("a", "GET", "127.0.0.1:15000", "/debug/pprof/heap");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut unzipped)
        .expect("gzip");
    let (heap, types) = pprof_profile(&unzipped);
    assert_eq!(types, [("inuse_space".to_string(), "bytes".to_string())]);
    // Samples are statistical (one per 512 KiB allocated, on average); the mappings are not:
    // the profile is of this agent's process, so pprof can symbolize it with the binary.
    let binary = agent::binary().rsplit('/').next().unwrap_or_default();
    assert!(
        heap.mapping.iter().any(|mapping| {
            usize::try_from(mapping.filename)
                .ok()
                .and_then(|index| heap.string_table.get(index))
                .is_some_and(|path| path.ends_with(&format!("/{binary}")))
        }),
        "mappings name the agent binary: {:?}",
        heap.string_table
    );
    let (status, state) = cluster.admin("a", "POST", "/debug/pprof/heap/profiling?activate=false");
    assert_eq!(
        (status, state.contains("\"active\": false")),
        (200, true),
        "{state}"
    );
}

/// `/config_dump` carries each certificate's chain and roots as ztunnel does (base64 PEM that
/// parses, serial number, validity).
#[test]
fn config_dump_carries_certificate_chains_as_ztunnel_does() {
    require_netns!("config_dump_carries_certificate_chains_as_ztunnel_does");
    let (cluster, _server) = start();
    // One connection, so the client's certificate has been issued.
    let mut stream = cluster.connect("client", cluster.target("server", APP_PORT));
    assert_eq!(echo(&mut stream, b"certified"), b"certified");
    close(stream);
    let (status, dump) = cluster.admin("a", "GET", "/config_dump");
    assert_eq!(status, 200, "{dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let certificates = dump["certificates"].as_array().expect("certificates");
    let client_id = cluster.mesh.workload("client").identity();
    let entry = certificates
        .iter()
        .find(|entry| entry["identity"] == client_id.as_str())
        .unwrap_or_else(|| panic!("no certificate for {client_id}: {certificates:#?}"));
    assert_eq!(entry["state"], "Available");
    let parse = |certificate: &serde_json::Value| {
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(certificate["pem"].as_str().expect("pem"))
            .expect("base64");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
        let parsed = pem.parse_x509().expect("X.509").tbs_certificate;
        assert_eq!(
            certificate["serialNumber"].as_str(),
            Some(parsed.serial.to_string().as_str())
        );
        assert!(certificate["validFrom"].is_string() && certificate["expirationTime"].is_string());
        (
            parsed.is_ca(),
            parsed
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|san| format!("{:?}", san.value)),
        )
    };
    let chain = entry["certChain"].as_array().expect("certChain");
    assert_eq!(chain.len(), 1, "the built-in CA signs leaves directly");
    let (leaf_is_ca, san) = parse(&chain[0]);
    assert!(!leaf_is_ca);
    assert!(
        san.is_some_and(|san| san.contains(&client_id)),
        "leaf names the identity"
    );
    let roots = entry["rootCerts"].as_array().expect("rootCerts");
    assert_eq!(roots.len(), 1);
    assert!(parse(&roots[0]).0, "the root is a CA");
}
