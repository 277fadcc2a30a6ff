//! Network-namespace tests of waypoints (issue 7): real agents on two "nodes", real TCP apps in
//! pod namespaces.
//!
//! Topology: node `a` with `client` (captured), `waypoint` (captured; the waypoint of `server`,
//! with `applicationTunnel: {protocol: PROXY, port: 15088}`) and `intruder` (not captured: it
//! speaks HBONE itself with a mesh certificate); node `b` with `server` (captured, its workload
//! waypoint is `waypoint`). What reached an app is read from the echo servers' counters.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::agent::ServiceSpec;
use support::apps::{self, EchoServer, Reply};
use support::cluster::Cluster;
use support::tls_probe::{self, Outcome};
use support::waypoint::TestWaypoint;

const APP_PORT: u16 = 8080;
const TUNNEL_PORT: u16 = 15088;
const SERVICE_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 7, 7);
const SERVICE_PORT: u16 = 80;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
const PROXY_V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// client, waypoint and the uncaptured intruder on node a, server on node b; the echo service
/// backed by server; server and the service behind the waypoint. The test installs its own
/// redirection rules in the captured pods too.
fn start() -> Cluster {
    let captured = ["client", "waypoint", "server"];
    Cluster::build(&[
        ("a", "client"),
        ("a", "waypoint"),
        ("a", "intruder"),
        ("b", "server"),
    ])
    .mesh(|_, mesh| {
        let service = ServiceSpec::new("echo", SERVICE_VIP, SERVICE_PORT, APP_PORT);
        mesh.workloads
            .retain(|workload| workload.name != "intruder");
        for workload in &mut mesh.workloads {
            if workload.name == "server" {
                workload.services = vec![(service.key(), SERVICE_PORT, APP_PORT)];
            }
        }
        mesh.services.push(service);
    })
    .test_redirected(&captured)
    .captured(&captured)
    .start_with(|cluster, node| config(cluster, node, true))
}

/// The config of `node`: the mesh plus `server`'s waypoint and the waypoint's application
/// tunnel; `enforce` is `agent.authorization.waypoint.enforce`.
fn config(cluster: &Cluster, node: &str, enforce: bool) -> String {
    let mut yaml = cluster.render(node);
    let server = "    name: server\n    namespace: default\n";
    let waypoint_ip = cluster.ip("waypoint");
    yaml = yaml.replacen(
        server,
        &format!("{server}    waypoint: {{destination: /{waypoint_ip}}}\n"),
        1,
    );
    let service = "    hostname: echo.default.svc.cluster.local\n";
    yaml = yaml.replacen(
        service,
        &format!("{service}    waypoint: {{destination: /{waypoint_ip}}}\n"),
        1,
    );
    let waypoint = "    name: waypoint\n    namespace: default\n";
    yaml = yaml.replacen(
        waypoint,
        &format!("{waypoint}    applicationTunnel: {{protocol: PROXY, port: {TUNNEL_PORT}}}\n"),
        1,
    );
    yaml.replacen(
        "agent:\n",
        &format!("agent:\n  authorization: {{waypoint: {{enforce: {enforce}}}}}\n"),
        1,
    )
}

/// What these tests do with the cluster.
trait Waypoints {
    /// A scrape of `node`'s metrics endpoint.
    fn metrics(&self, node: &str) -> String;
    /// The server app's address.
    fn server_target(&self) -> SocketAddr;
    /// A CONNECT to `server`'s 15008 from the uncaptured intruder pod, with a mesh certificate
    /// for `identity`, asking for `authority`.
    fn probe(&self, identity: &str, authority: String, marker: &[u8]) -> Outcome;
}

impl Waypoints for Cluster {
    fn metrics(&self, node: &str) -> String {
        self.topology
            .run_in(node, || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect("127.0.0.1:15020")?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok::<_, std::io::Error>(text)
            })
            .expect("run in node")
            .expect("scrape")
    }

    fn server_target(&self) -> SocketAddr {
        SocketAddr::from((self.ip("server"), APP_PORT))
    }

    fn probe(&self, identity: &str, authority: String, marker: &[u8]) -> Outcome {
        let cert = tls_probe::leaf_from_root(&self.ca, identity).expect("cert");
        let hbone = SocketAddr::from((self.ip("server"), 15008));
        let marker = marker.to_vec();
        self.topology
            .run_in("intruder", move || {
                tls_probe::probe(hbone, Some(cert), &authority, &marker)
            })
            .expect("probe thread")
    }
}

const ACCEPTED: Outcome = Outcome::Http2 {
    response: true,
    ok: true,
};

/// Traffic to a pod with a workload waypoint is delivered to the waypoint (PROXY v2 header with
/// the client's address and identity), the waypoint's own traffic goes direct and is admitted,
/// a client that CONNECTs straight to the protected pod is refused with nothing reaching the
/// app, and with `enforce: false` the same direct call succeeds.
#[test]
fn waypoint_routes_delivers_and_cannot_be_bypassed() {
    require_netns!("waypoint_routes_delivers_and_cannot_be_bypassed");
    let cluster = start();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let waypoint_app = EchoServer::start(&cluster.topology, "waypoint", TUNNEL_PORT, Reply::Echo)
        .expect("waypoint app");

    // client → agent a → waypoint pod (sandwich delivery to the application tunnel port).
    let payload = b"VIA-WAYPOINT".to_vec();
    let echoed = apps::exchange(
        &cluster.topology,
        "client",
        cluster.server_target(),
        payload.clone(),
        IO_TIMEOUT,
    )
    .expect("client exchange via the waypoint");
    assert!(echoed.starts_with(PROXY_V2_SIGNATURE), "{echoed:?}");
    assert!(echoed.ends_with(&payload), "{echoed:?}");
    let client_ip = cluster.ip("client").octets();
    let mut addresses = client_ip.to_vec();
    addresses.extend_from_slice(&cluster.ip("server").octets());
    assert_eq!(
        &echoed[16..24],
        &addresses[..],
        "PROXY v2 src/dst addresses"
    );
    assert_eq!(
        &echoed[26..28],
        &APP_PORT.to_be_bytes(),
        "PROXY v2 dst port"
    );
    let identity = cluster.mesh.workload("client").identity();
    assert!(
        apps::contains(
            &echoed,
            &[&[0xD0, 0x00, identity.len() as u8], identity.as_bytes()].concat()
        ),
        "TLV 0xD0 with the client identity in {echoed:?}"
    );
    assert!(waypoint_app.received_contains(&payload));
    assert!(
        !server.received_contains(&payload),
        "the server got bytes around the waypoint"
    );

    // The waypoint's own outbound to the server goes direct (no loop) and is admitted.
    let payload = b"FROM-WAYPOINT".to_vec();
    let echoed = apps::exchange(
        &cluster.topology,
        "waypoint",
        cluster.server_target(),
        payload.clone(),
        IO_TIMEOUT,
    )
    .expect("waypoint exchange");
    assert_eq!(echoed, payload);
    assert!(server.received_contains(&payload));

    // A client with a valid mesh identity that CONNECTs straight to the server is refused.
    let client_id = cluster.mesh.workload("client").identity();
    let authority = cluster.server_target().to_string();
    let outcome = cluster.probe(&client_id, authority.clone(), b"BYPASS-ATTEMPT");
    assert_eq!(
        outcome,
        Outcome::Http2 {
            response: true,
            ok: false
        }
    );
    cluster.agents[1]
        .wait_for_event("the bypass denial in the access log", IO_TIMEOUT, |event| {
            event
                .field("error")
                .is_some_and(|error| error.contains("waypoint bypass"))
        })
        .expect("access log names the reason");
    assert!(!server.received_contains(b"BYPASS-ATTEMPT"));
    // Counted once as a decision of no policy, under its own reason.
    let bypass = "nodetunnel_authorization_decisions_total{action=\"deny\",policy=\"none\",\
                  reason=\"waypoint_bypass\",phase=\"connect\",destination_workload=\"server\",\
                  destination_workload_namespace=\"default\"} 1";
    let metrics = cluster.metrics("b");
    assert!(
        metrics.lines().any(|line| line == bypass),
        "want {bypass}:\n{metrics}"
    );

    // With enforcement off the same direct call succeeds.
    cluster.agents[1]
        .write_config(&config(&cluster, "b", false))
        .expect("config edit");
    support::wait_for("the direct call to be admitted", RELOAD_TIMEOUT, || {
        (cluster.probe(&client_id, authority.clone(), b"DIRECT-OK") == ACCEPTED).then_some(())
    })
    .expect("direct call with enforcement off");
    support::wait_for("the app to get the direct bytes", IO_TIMEOUT, || {
        server.received_contains(b"DIRECT-OK").then_some(())
    })
    .expect("bytes reach the app");
}

/// An authority that is neither the pod nor something it is the waypoint of gets 400 and
/// nothing is forwarded; the pod's own address is accepted (control).
#[test]
fn authority_mismatch_is_refused() {
    require_netns!("authority_mismatch_is_refused");
    let cluster = start();
    let client_app =
        EchoServer::start(&cluster.topology, "client", APP_PORT, Reply::Echo).expect("client app");
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let identity = cluster.mesh.workload("waypoint").identity();
    let elsewhere = SocketAddr::from((cluster.ip("client"), APP_PORT)).to_string();
    let outcome = cluster.probe(&identity, elsewhere, b"MISMATCH");
    assert_eq!(
        outcome,
        Outcome::Http2 {
            response: true,
            ok: false
        }
    );
    cluster.agents[1]
        .wait_for_event("the ip mismatch in the access log", IO_TIMEOUT, |event| {
            event
                .field("error")
                .is_some_and(|error| error.contains("ip mismatch"))
        })
        .expect("access log names the mismatch");
    assert!(!client_app.received_contains(b"MISMATCH"));
    assert!(!server.received_contains(b"MISMATCH"));
    let outcome = cluster.probe(&identity, cluster.server_target().to_string(), b"CONTROL");
    assert_eq!(
        outcome, ACCEPTED,
        "the waypoint's identity to the pod's own address"
    );
}

/// With the test waypoint in the waypoint pod, service- and pod-addressed HTTP flows client →
/// agent → waypoint → agent → server: the allowed path passes, the denied path gets the
/// waypoint's own 403 and never reaches the server.
#[test]
fn l7_rule_is_applied_by_the_waypoint() {
    require_netns!("l7_rule_is_applied_by_the_waypoint");
    let cluster = start();
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let waypoint =
        TestWaypoint::start(&cluster.topology, "waypoint", TUNNEL_PORT).expect("test waypoint");
    let service = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    let pod = cluster.server_target();
    let cases = [
        (
            "service, allowed path",
            service,
            "GET /public HTTP/1.1\r\nx-case: 1\r\n\r\n",
            true,
        ),
        (
            "service, denied path",
            service,
            "GET /secret HTTP/1.1\r\nx-case: 2\r\n\r\n",
            false,
        ),
        (
            "pod, allowed path",
            pod,
            "GET /public HTTP/1.1\r\nx-case: 3\r\n\r\n",
            true,
        ),
        (
            "pod, denied method",
            pod,
            "POST /public HTTP/1.1\r\nx-case: 4\r\n\r\n",
            false,
        ),
    ];
    for (index, (case, target, request, allowed)) in cases.into_iter().enumerate() {
        let (allowed_before, denied_before) = (waypoint.allowed(), waypoint.denied());
        let response = apps::exchange(
            &cluster.topology,
            "client",
            target,
            request.as_bytes().to_vec(),
            IO_TIMEOUT,
        )
        .unwrap_or_else(|error| panic!("{case}: {error:#}"));
        let marker = format!("x-case: {}", index + 1);
        if allowed {
            assert_eq!(response, request.as_bytes(), "{case}: echoed by the server");
            assert_eq!(waypoint.allowed(), allowed_before + 1, "{case}");
            assert!(server.received_contains(marker.as_bytes()), "{case}");
        } else {
            assert!(
                response.starts_with(b"HTTP/1.1 403 "),
                "{case}: {response:?}"
            );
            assert_eq!(waypoint.denied(), denied_before + 1, "{case}");
            assert!(!server.received_contains(marker.as_bytes()), "{case}");
        }
    }
}
