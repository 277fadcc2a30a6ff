//! Network-namespace tests of egress control (issue 16): `outboundTrafficPolicy` and
//! ServiceEntry enforced by the client's agent.
//!
//! Topology: node `a` runs the agent and `client` (captured, HBONE, namespace `default`); node
//! `b` has no agent and four pods: `partner` and `stranger` run echo servers, `dead` runs
//! nothing (connections to it are refused), `dns` runs a test DNS server when a test wants
//! one (the agent's upstream). For the egress tests none of them is in the mesh model, so to
//! the client's agent they are outside destinations (addresses of namespaces this test made,
//! never outside ones). For the DestinationRule tests `partner` and `dead` are plain TCP
//! workloads behind services. The egress-gateway test adds a captured waypoint pod on node
//! `a`. Whether something reached a server is read from the server's own counters.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{Agent, Ca, Mesh, Protocol, ServiceSpec, WorkloadSpec};
use support::apps::{self, EchoServer, Reply};
use support::dns_server::DnsServer;
use support::netns::Topology;
use support::waypoint::TestWaypoint;

const APP_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// The VIP of the `index`th service (never routed: the agent translates it).
fn vip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 16, 10 + index as u8)
}
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// The client's agent, the outside servers and the namespaces; fields in drop order.
struct Egress {
    agent: Agent,
    partner: EchoServer,
    stranger: EchoServer,
    _ca: Ca,
    mesh: Mesh,
    topology: Topology,
}

impl Egress {
    /// Starts everything; `extra` gives the config additions for the topology's addresses,
    /// `services` the services of the model (their endpoints join the model as TCP workloads).
    fn start(services: &[(&str, &[&str])], extra: impl Fn(&Topology) -> String) -> Egress {
        let topology = Topology::linked_pair(&[
            ("a", "client"),
            ("b", "partner"),
            ("b", "stranger"),
            ("b", "dead"),
            ("b", "dns"),
        ]);
        let mut mesh = Mesh {
            workloads: vec![WorkloadSpec::new(
                "client",
                topology.pod("client").ip,
                "a",
                Protocol::Hbone,
            )],
            services: Vec::new(),
        };
        for (index, (name, endpoints)) in services.iter().enumerate() {
            let service = ServiceSpec::new(name, vip(index), SERVICE_PORT, APP_PORT);
            for endpoint in *endpoints {
                let ip = topology.pod(endpoint).ip;
                let mut workload = WorkloadSpec::new(endpoint, ip, "b", Protocol::Tcp);
                workload
                    .services
                    .push((service.key(), SERVICE_PORT, APP_PORT));
                mesh.workloads.push(workload);
            }
            mesh.services.push(service);
        }
        topology
            .install_redirect("client")
            .expect("redirection rules");
        let partner = EchoServer::start(&topology, "partner", APP_PORT, Reply::Echo).expect("echo");
        let stranger =
            EchoServer::start(&topology, "stranger", APP_PORT, Reply::Echo).expect("echo");
        let ca = Ca::init().expect("nodetunnel ca init");
        let config = config(&mesh, &topology, &extra(&topology));
        let agent = Agent::start(&topology, "a", &ca, &config).expect("agent ready");
        Egress {
            agent,
            partner,
            stranger,
            _ca: ca,
            mesh,
            topology,
        }
    }

    /// Opens a connection from the client to `target` and proves it reached a server by one
    /// echo round trip; the connection stays open.
    fn open(&self, target: SocketAddr) -> anyhow::Result<TcpStream> {
        self.topology
            .run_in("client", move || -> anyhow::Result<TcpStream> {
                let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.write_all(b"ping")?;
                let mut reply = [0u8; 4];
                stream.read_exact(&mut reply)?;
                anyhow::ensure!(&reply == b"ping", "unexpected reply {reply:?}");
                Ok(stream)
            })?
    }

    fn target(&self, pod: &str) -> SocketAddr {
        SocketAddr::from((self.topology.pod(pod).ip, APP_PORT))
    }

    /// One echo exchange from the client to `pod`.
    fn exchange(&self, pod: &str, marker: &str) -> anyhow::Result<Vec<u8>> {
        apps::exchange(
            &self.topology,
            "client",
            self.target(pod),
            marker.as_bytes().to_vec(),
            IO_TIMEOUT,
        )
    }

    fn echo_works(&self, pod: &str, marker: &str) -> bool {
        self.exchange(pod, marker)
            .is_ok_and(|reply| reply == marker.as_bytes())
    }

    fn reconfigure(&self, extra: &str) {
        let config = config(&self.mesh, &self.topology, extra);
        self.agent.write_config(&config).expect("config edit");
    }

    fn metrics(&self) -> String {
        self.get("127.0.0.1:15020", "/metrics")
    }

    /// A GET from node a's namespace (metrics, or the loopback-only admin API).
    fn get(&self, address: &'static str, path: &'static str) -> String {
        self.topology
            .run_in("a", move || {
                let mut stream = std::net::TcpStream::connect(address)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok::<_, std::io::Error>(text)
            })
            .expect("run in node")
            .expect("scrape")
    }
}

/// The agent config of node a: the rendered mesh, with `extra` agent keys and trailing
/// top-level YAML (`istioResources`).
fn config(mesh: &Mesh, topology: &Topology, extra: &str) -> String {
    config_capturing(mesh, topology, &["client"], extra)
}

/// [`config`] capturing the `captured` pods.
fn config_capturing(mesh: &Mesh, topology: &Topology, captured: &[&str], extra: &str) -> String {
    let (agent_keys, top_level) = extra.split_once("---\n").unwrap_or((extra, ""));
    let yaml = mesh.render(topology, "a", captured);
    let mut yaml = yaml.replacen("agent:\n", &format!("agent:\n{agent_keys}"), 1);
    yaml.push_str(top_level);
    yaml
}

/// A ServiceEntry for `ip:8080`.
fn service_entry(name: &str, ip: std::net::Ipv4Addr) -> String {
    format!(
        "istioResources:\n\
         - apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n  \
         metadata: {{name: {name}, namespace: default}}\n  \
         spec:\n    hosts: [{name}.example]\n    addresses: [{ip}/32]\n    \
         ports: [{{number: {APP_PORT}, name: tcp, protocol: TCP}}]\n    location: MESH_EXTERNAL\n"
    )
}

#[test]
fn registry_only_refuses_unknown_destinations_and_allows_service_entries() {
    require_netns!("registry_only_refuses_unknown_destinations_and_allows_service_entries");
    let egress = Egress::start(&[], |topology| {
        format!(
            "  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n---\n{}",
            service_entry("partner", topology.pod("partner").ip)
        )
    });
    let partner_ip = egress.topology.pod("partner").ip;

    assert!(
        egress.echo_works("partner", "through the service entry"),
        "the ServiceEntry address must be reachable under REGISTRY_ONLY"
    );
    let refused = egress
        .exchange("stranger", "blocked")
        .expect_err("an unknown destination must be refused");
    assert_refused(&refused);
    assert_eq!(
        egress.stranger.accepted(),
        0,
        "nothing may reach the stranger"
    );

    let log = egress
        .agent
        .wait_for_event("the egress refusal's access log", LOG_TIMEOUT, |event| {
            event.is_access() && event.field("response_flags").as_deref() == Some("EGRESS_BLOCKED")
        })
        .expect("access log");
    assert!(
        log.field("error")
            .is_some_and(|error| error.contains("REGISTRY_ONLY")),
        "{}",
        log.raw
    );
    let metrics = egress.metrics();
    assert!(
        metrics.contains("nodetunnel_egress_refusals_total{reason=\"registry_only\"} 1"),
        "{metrics}"
    );

    let dump = egress.get("127.0.0.1:15000", "/config_dump");
    assert!(
        dump.contains("\"serviceEntries\"") && dump.contains("partner.example"),
        "{dump}"
    );
    assert!(dump.contains("REGISTRY_ONLY"), "{dump}");

    // A namespace exception applies live, like a policy change.
    egress.reconfigure(&format!(
        "  outboundTrafficPolicy: {{mode: REGISTRY_ONLY, namespaces: {{default: ALLOW_ANY}}}}\n---\n{}",
        service_entry("partner", partner_ip)
    ));
    support::wait_for("ALLOW_ANY for namespace default", RELOAD_TIMEOUT, || {
        egress.echo_works("stranger", "allowed now").then_some(())
    })
    .expect("the namespace's ALLOW_ANY applies on reload");
    assert!(egress.partner.accepted() >= 1);
}

/// The app saw a reset or refusal: not a hang (a timeout) and not an orderly empty answer.
fn assert_refused(error: &anyhow::Error) {
    let kind = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    // When the reset lands after the app's write and its reader takes the ECONNRESET first,
    // the writer's half-close finds the socket closed: ENOTCONN, the same reset seen later.
    assert!(
        matches!(
            kind,
            Some(
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::BrokenPipe
                    | ErrorKind::NotConnected
            )
        ),
        "the app must see a reset, not a hang or an empty answer: {error:#}"
    );
}

/// A DestinationRule for service `name` of namespace default.
fn destination_rule(name: &str, traffic_policy: &str) -> String {
    format!(
        "istioResources:\n\
         - apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  \
         metadata: {{name: {name}, namespace: default}}\n  \
         spec:\n    host: {name}\n    trafficPolicy: {traffic_policy}\n"
    )
}

#[test]
fn max_connections_refuses_the_third_connection_until_one_closes() {
    require_netns!("max_connections_refuses_the_third_connection_until_one_closes");
    let egress = Egress::start(&[("limited", &["partner"])], |_| {
        format!(
            "---\n{}",
            destination_rule("limited", "{connectionPool: {tcp: {maxConnections: 2}}}")
        )
    });
    let service = SocketAddr::from((vip(0), SERVICE_PORT));
    let first = egress.open(service).expect("first connection");
    let _second = egress.open(service).expect("second connection");
    let accepted = egress.partner.accepted();
    let refused = egress
        .open(service)
        .expect_err("the third connection is over the limit");
    assert_refused(&refused);
    assert_eq!(
        egress.partner.accepted(),
        accepted,
        "the refused one never reached the server"
    );
    egress
        .agent
        .wait_for_event("the overflow access log", LOG_TIMEOUT, |event| {
            event.is_access()
                && event.field("response_flags").as_deref() == Some("UPSTREAM_OVERFLOW")
                && event
                    .field("error")
                    .is_some_and(|error| error.contains("maxConnections"))
        })
        .expect("access log");
    assert!(egress
        .metrics()
        .contains("nodetunnel_connection_limit_refusals_total{reason=\"max_connections\"} 1"));

    drop(first);
    support::wait_for("a slot after one connection closed", IO_TIMEOUT, || {
        egress.open(service).ok()
    })
    .expect("a connection is admitted again once one closed");
}

#[test]
fn an_endpoint_that_refuses_connections_is_ejected() {
    require_netns!("an_endpoint_that_refuses_connections_is_ejected");
    let egress = Egress::start(&[("flaky", &["partner", "dead"])], |_| {
        format!(
            "---\n{}",
            destination_rule(
                "flaky",
                "{outlierDetection: {consecutiveGatewayErrors: 1, interval: 1s, \
                 baseEjectionTime: 5m, maxEjectionPercent: 50}}"
            )
        )
    });
    let service = SocketAddr::from((vip(0), SERVICE_PORT));
    // Load balancing is random: keep connecting until the dead endpoint was picked once and
    // ejected (each pick has even odds, so 40 tries leave ~1e-12 to chance).
    let mut failures = 0;
    for _ in 0..40 {
        if egress.open(service).is_err() {
            failures += 1;
        }
        if egress.metrics().contains(
            "nodetunnel_outlier_ejections_total{reason=\"consecutive_connect_failures\"} 1",
        ) {
            break;
        }
    }
    assert_eq!(failures, 1, "one failed connect ejects the dead endpoint");
    // From now on every connection goes to the healthy endpoint.
    let before = egress.partner.accepted();
    for round in 0..10 {
        egress
            .open(service)
            .unwrap_or_else(|error| panic!("connection {round} after the ejection: {error:#}"));
    }
    assert_eq!(egress.partner.accepted(), before + 10);
    egress
        .agent
        .wait_for_event("the ejection warning", LOG_TIMEOUT, |event| {
            event.message.contains("ejected by outlier detection")
                && event
                    .field("endpoint")
                    .is_some_and(|uid| uid.ends_with("/dead"))
        })
        .expect("ejection logged");
}

/// A hostname-only ServiceEntry for `host`:8080 (resolution DNS), with `labels`.
fn hostname_entry(name: &str, host: &str, labels: &str) -> String {
    format!(
        "- apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n  \
         metadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\n  \
         spec:\n    hosts: [\"{host}\"]\n    \
         ports: [{{number: {APP_PORT}, name: tcp, protocol: TCP}}]\n    resolution: DNS\n"
    )
}

/// Asks the client pod's nameserver (any address: port 53 is redirected to the agent's DNS
/// proxy) for `name`'s A records with `dig`; the addresses answered.
fn resolve(topology: &Topology, server: std::net::Ipv4Addr, name: &str) -> Vec<String> {
    let at = format!("@{server}");
    let output = topology
        .exec_role(
            "client",
            &["dig", "+short", "+tries=1", "+time=5", &at, name, "A"],
        )
        .expect("dig in the client pod");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().to_string())
        .filter(|line| line.parse::<std::net::Ipv4Addr>().is_ok())
        .collect()
}

#[test]
fn a_hostname_entry_allows_only_the_address_the_pod_resolved_until_it_expires() {
    require_netns!("a_hostname_entry_allows_only_the_address_the_pod_resolved_until_it_expires");
    let egress = Egress::start(&[], |topology| {
        // Learned addresses last 2 s here (the DNS server's TTL is 60 s), so expiry shows soon.
        format!(
            "  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n  \
             dns: {{upstreams: [\"{}\"], forwardTimeout: 2s, learnedTtlMin: 1s, learnedTtlMax: 2s}}\n\
             ---\nistioResources:\n{}",
            topology.pod("dns").ip,
            hostname_entry("partner-api", "*.partner.example", "")
        )
    });
    let topology = &egress.topology;
    let partner_ip = topology.pod("partner").ip;
    // The same server's second address: nobody ever resolves a name to it.
    let other_ip = topology
        .add_pod_address("partner", 200)
        .expect("second partner address");
    let dns_ip = topology.pod("dns").ip;
    let _upstream = DnsServer::start(topology, "dns", &[("api.partner.example", partner_ip)])
        .expect("test DNS server");
    let partner = SocketAddr::from((partner_ip, APP_PORT));
    let other = SocketAddr::from((other_ip, APP_PORT));

    // Never resolved: refused, like any address outside the registry.
    assert_refused(&egress.open(partner).expect_err("not resolved yet"));
    assert_eq!(egress.partner.accepted(), 0);

    // Resolved through the DNS proxy under the allowed wildcard host: that address passes.
    // (Resolved right before each try: the learned entry lasts only 2 s.)
    support::wait_for("the resolved address is allowed", RELOAD_TIMEOUT, || {
        let answered = resolve(topology, dns_ip, "api.partner.example");
        (answered == [partner_ip.to_string()] && egress.open(partner).is_ok()).then_some(())
    })
    .expect("the address the pod resolved is allowed");
    assert!(egress.partner.accepted() >= 1);

    // The same server's other address was never answered: refused, and nothing reached it.
    let accepted = egress.partner.accepted();
    resolve(topology, dns_ip, "api.partner.example");
    assert_refused(&egress.open(other).expect_err("never resolved"));
    assert_eq!(
        egress.partner.accepted(),
        accepted,
        "the other address is refused"
    );
    let metrics = egress.metrics();
    assert!(
        metrics.contains("nodetunnel_egress_refusals_total{reason=\"registry_only\"}"),
        "{metrics}"
    );

    // The live learned set is in the dump, under the client pod (resolved again right before:
    // the entry lasts only 2 s).
    let shows_learned = |dump: &str| {
        dump.contains("\"learnedDestinations\"")
            && dump.contains(&format!("\"address\": \"{partner_ip}\""))
            && dump.contains("\"serviceEntry\": \"default/partner-api\"")
            && dump.contains("\"host\": \"api.partner.example\"")
    };
    support::wait_for(
        "the learned address in /config_dump",
        RELOAD_TIMEOUT,
        || {
            resolve(topology, dns_ip, "api.partner.example");
            let dump = egress.get("127.0.0.1:15000", "/config_dump");
            shows_learned(&dump).then_some(())
        },
    )
    .expect("/config_dump shows the pod's learned address");

    // Once the learned entry expires (the 2 s cap), the address is refused again.
    support::wait_for("the learned address expires", RELOAD_TIMEOUT, || {
        egress.open(partner).is_err().then_some(())
    })
    .expect("a learned address expires");
}

#[test]
fn an_egress_gateway_entry_sends_its_traffic_through_the_waypoint() {
    require_netns!("an_egress_gateway_entry_sends_its_traffic_through_the_waypoint");
    const TUNNEL_PORT: u16 = 15088;
    let topology = Topology::linked_pair(&[
        ("a", "client"),
        ("a", "egress-gw"),
        ("b", "partner"),
        ("b", "stranger"),
    ]);
    let gateway = ServiceSpec::new("egress-gw", vip(5), 15008, 15008);
    let mut waypoint = WorkloadSpec::new(
        "egress-gw",
        topology.pod("egress-gw").ip,
        "a",
        Protocol::Hbone,
    );
    waypoint.services.push((gateway.key(), 15008, 15008));
    let mesh = Mesh {
        workloads: vec![
            WorkloadSpec::new("client", topology.pod("client").ip, "a", Protocol::Hbone),
            waypoint,
        ],
        services: vec![gateway],
    };
    for pod in ["client", "egress-gw"] {
        topology.install_redirect(pod).expect("redirection rules");
    }
    let partner = EchoServer::start(&topology, "partner", APP_PORT, Reply::Echo).expect("echo");
    let stranger = EchoServer::start(&topology, "stranger", APP_PORT, Reply::Echo).expect("echo");
    let test_waypoint =
        TestWaypoint::start(&topology, "egress-gw", TUNNEL_PORT).expect("test waypoint");
    let partner_ip = topology.pod("partner").ip;
    let entry = service_entry("partner", partner_ip).replacen(
        "metadata: {name: partner, namespace: default}",
        "metadata: {name: partner, namespace: default, labels: {istio.io/use-waypoint: egress-gw}}",
        1,
    );
    let mut config = config_capturing(
        &mesh,
        &topology,
        &["client", "egress-gw"],
        &format!("  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n---\n{entry}"),
    );
    let waypoint_workload = "    name: egress-gw\n    namespace: default\n";
    config = config.replacen(
        waypoint_workload,
        &format!(
            "{waypoint_workload}    applicationTunnel: {{protocol: PROXY, port: {TUNNEL_PORT}}}\n"
        ),
        1,
    );
    let ca = Ca::init().expect("nodetunnel ca init");
    let agent = Agent::start(&topology, "a", &ca, &config).expect("agent ready");

    // The client dials the partner's address; the bytes reach it from the gateway.
    let request = "GET /public HTTP/1.1\r\nhost: partner.example\r\n\r\n";
    let reply = apps::exchange(
        &topology,
        "client",
        SocketAddr::from((partner_ip, APP_PORT)),
        request.as_bytes().to_vec(),
        IO_TIMEOUT,
    )
    .expect("through the egress gateway");
    assert_eq!(reply, request.as_bytes(), "the partner echoes the request");
    assert_eq!(test_waypoint.allowed(), 1, "the gateway forwarded it");
    let gateway_ip = std::net::IpAddr::V4(topology.pod("egress-gw").ip);
    let peers: Vec<std::net::IpAddr> = partner
        .peers()
        .iter()
        .map(|peer| match peer.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        })
        .collect();
    assert_eq!(
        peers,
        [gateway_ip],
        "the partner only ever sees the gateway"
    );
    agent
        .wait_for_event("the client's tunnel to the gateway", LOG_TIMEOUT, |event| {
            event.is_access()
                && event.field("dst.hbone_addr").as_deref()
                    == Some(&*format!("{partner_ip}:{APP_PORT}"))
        })
        .expect("the client's access log names the gateway tunnel");

    // Anything the entry does not cover stays refused: the gateway is the only way out.
    let refused = apps::exchange(
        &topology,
        "client",
        SocketAddr::from((topology.pod("stranger").ip, APP_PORT)),
        b"bypass".to_vec(),
        IO_TIMEOUT,
    )
    .expect_err("an address no entry covers is refused");
    assert_refused(&refused);
    assert_eq!(stranger.accepted(), 0);
    drop(agent);
}

/// `idleTimeout` closes a proxied connection on which no byte moved for that long, and leaves
/// alone one that keeps talking for longer than the timeout. The close is awaited with a
/// generous bound; nothing asserts how fast it came.
#[test]
fn idle_timeout_closes_an_idle_connection_but_not_an_active_one() {
    require_netns!("idle_timeout_closes_an_idle_connection_but_not_an_active_one");
    let egress = Egress::start(&[("sleepy", &["partner"])], |_| {
        format!(
            "---\n{}",
            destination_rule("sleepy", "{connectionPool: {tcp: {idleTimeout: 2s}}}")
        )
    });
    let service = SocketAddr::from((vip(0), SERVICE_PORT));
    let mut idle = egress.open(service).expect("idle connection");
    let mut active = egress.open(service).expect("active connection");
    // The active one talks every 200 ms for three idle timeouts.
    for round in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        active
            .write_all(b"tick")
            .unwrap_or_else(|error| panic!("active write {round}: {error}"));
        let mut echoed = [0u8; 4];
        active
            .read_exact(&mut echoed)
            .unwrap_or_else(|error| panic!("active read {round}: {error}"));
    }
    // Meanwhile the idle one was closed: its read ends (EOF or reset) instead of timing out.
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match idle.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("the idle connection received bytes"),
        Err(error) => assert!(
            !matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the idle connection was not closed: {error}"
        ),
    }
    let mut echoed = [0u8; 4];
    active.write_all(b"last").expect("active still open");
    active.read_exact(&mut echoed).expect("active still echoes");
}
