//! Network-namespace tests of egress control (issue 16): `outboundTrafficPolicy` and
//! ServiceEntry enforced by the client's agent.
//!
//! Topology: node `a` runs the agent and `client` (captured, HBONE, namespace `default`); node
//! `b` has no agent and two pods that are not in the mesh model, `partner` and `stranger`, each
//! running an echo server. To the client's agent both are outside destinations; they are
//! addresses of namespaces this test made, never outside ones. Whether something reached a
//! server is read from the server's own counters.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use support::agent::{Agent, Ca, Mesh, Protocol, WorkloadSpec};
use support::apps::{self, EchoServer, Reply};
use support::netns::Topology;

const APP_PORT: u16 = 8080;
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
    /// Starts everything; `extra` gives the config additions for the topology's addresses.
    fn start(extra: impl Fn(&Topology) -> String) -> Egress {
        let topology =
            Topology::linked_pair(&[("a", "client"), ("b", "partner"), ("b", "stranger")]);
        let mesh = Mesh {
            workloads: vec![WorkloadSpec::new(
                "client",
                topology.pod("client").ip,
                "a",
                Protocol::Hbone,
            )],
            services: Vec::new(),
        };
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
        self.topology
            .run_in("a", || {
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
}

/// The agent config of node a: the rendered mesh, with `extra` agent keys and trailing
/// top-level YAML (`istioResources`).
fn config(mesh: &Mesh, topology: &Topology, extra: &str) -> String {
    let (agent_keys, top_level) = extra.split_once("---\n").unwrap_or((extra, ""));
    let yaml = mesh.render(topology, "a", &["client"]);
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
    let egress = Egress::start(|topology| {
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
    let kind = refused
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    assert!(
        matches!(
            kind,
            Some(ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused | ErrorKind::BrokenPipe)
        ),
        "the app must see a reset, not a hang or an empty answer: {refused:#}"
    );
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
