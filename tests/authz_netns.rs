//! Network-namespace tests of L4 authorization (issue 5): real agents on two "nodes", real TCP
//! apps in pod namespaces, policies written as Istio `AuthorizationPolicy` /
//! `PeerAuthentication` YAML in the config file's `istioResources`.
//!
//! Topology: node `a` with the clients (`client`, `other`: captured, HBONE, each its own service
//! account; `legacy`: not captured, sends plaintext), node `b` with `server` (captured, labelled
//! `app: server`). Whether something reached the app is read from the echo server's counters,
//! never from the agents' own word.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::apps::{self, EchoServer, Reply};
use support::cluster::Cluster;
use support::logs::LogEvent;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// What the server node's config adds to the rendered mesh.
#[derive(Debug, Clone, Default)]
struct Authz {
    /// `agent.authorization.defaultDeny`.
    default_deny: bool,
    /// Items of `istioResources`, as YAML list entries.
    resources: String,
}

/// client, other (HBONE, captured) and legacy (plain TCP, not captured) on node a; server
/// (HBONE, captured) on node b, whose agent gets `authz`. The test installs its own redirection
/// rules in the captured pods too.
fn start(authz: &Authz) -> Cluster {
    let captured = ["client", "other", "server"];
    Cluster::build(&[
        ("a", "client"),
        ("a", "other"),
        ("a", "legacy"),
        ("b", "server"),
    ])
    .plain_tcp(&["legacy"])
    .test_redirected(&captured)
    .captured(&captured)
    .start_with(|cluster, node| {
        let authz = if node == "b" {
            authz
        } else {
            &Authz::default()
        };
        config(cluster, node, authz)
    })
}

/// The config file of `node` with `authz` applied.
fn config(cluster: &Cluster, node: &str, authz: &Authz) -> String {
    let mut yaml = cluster.render(node);
    let labelled = "    name: server\n    namespace: default\n";
    yaml = yaml.replacen(
        labelled,
        &format!("{labelled}    labels: {{app: server}}\n"),
        1,
    );
    if authz.default_deny {
        yaml = yaml.replacen(
            "agent:\n",
            "agent:\n  authorization: {defaultDeny: true}\n",
            1,
        );
    }
    if !authz.resources.is_empty() {
        yaml.push_str("istioResources:\n");
        yaml.push_str(&authz.resources);
    }
    yaml
}

/// What these tests do with the cluster.
trait Authorization {
    /// Rewrites the server node's config with `authz`.
    fn set_server_authz(&self, authz: &Authz);
    /// The server app's address.
    fn server_target(&self) -> SocketAddr;
    /// One echo exchange from `pod` to the server: `true` if the echo came back whole.
    fn echo_works(&self, pod: &str, marker: &str) -> bool;
    /// A connection to the server opened from inside `pod`'s namespace and kept open. Retried
    /// briefly: with the working tree of this writing, readiness can answer 200 a moment before
    /// the last pod's listeners are bound (seen as ECONNREFUSED on 15001 under parallel tests).
    fn open(&self, pod: &str) -> TcpStream;
}

impl Authorization for Cluster {
    fn set_server_authz(&self, authz: &Authz) {
        let config = config(self, "b", authz);
        self.agent("b").write_config(&config).expect("config edit");
    }

    fn server_target(&self) -> SocketAddr {
        SocketAddr::from((self.topology.pod("server").ip, APP_PORT))
    }

    fn echo_works(&self, pod: &str, marker: &str) -> bool {
        let payload = marker.as_bytes().to_vec();
        let target = self.server_target();
        apps::exchange(&self.topology, pod, target, payload.clone(), IO_TIMEOUT)
            .is_ok_and(|response| response == payload)
    }

    fn open(&self, pod: &str) -> TcpStream {
        let target = self.server_target();
        let stream = support::wait_for("a connection to the server", IO_TIMEOUT, || {
            self.topology
                .run_in(pod, move || TcpStream::connect_timeout(&target, IO_TIMEOUT))
                .ok()?
                .ok()
        })
        .expect("connect");
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        stream
    }
}

/// Writes `text` and reads the echo back; `false` if the connection is closed or reset.
fn round_trip(stream: &mut TcpStream, text: &str) -> bool {
    if stream.write_all(text.as_bytes()).is_err() {
        return false;
    }
    let mut echoed = vec![0u8; text.len()];
    stream.read_exact(&mut echoed).is_ok() && echoed == text.as_bytes()
}

fn identity(sa: &str) -> String {
    format!("cluster.local/ns/default/sa/{sa}")
}

/// An AuthorizationPolicy list item.
fn policy(name: &str, action: &str, principal: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
         metadata: {{name: {name}, namespace: default}}\n    spec:\n      \
         selector: {{matchLabels: {{app: server}}}}\n      action: {action}\n      \
         rules: [{{from: [{{source: {{principals: [\"{principal}\"]}}}}]}}]\n"
    )
}

const STRICT: &str =
    "  - apiVersion: security.istio.io/v1beta1\n    kind: PeerAuthentication\n    \
                      metadata: {name: default, namespace: istio-system}\n    \
                      spec: {mtls: {mode: STRICT}}\n";

/// The inbound access events of the server's agent whose error contains `text`.
fn inbound_error(event: &LogEvent, text: &str) -> bool {
    event.is_access()
        && event.field("direction").as_deref() == Some("inbound")
        && event
            .field("error")
            .is_some_and(|error| error.contains(text))
}

/// How many connections the server's app accepted, once that equals the number of inbound
/// connections its agent connected to the app (access events without an error, or closed later
/// by a policy change): the app's accept loop can trail the agent's connect.
fn settled_accepts(cluster: &Cluster, server: &EchoServer) -> usize {
    support::wait_for(
        "the app to accept what its agent connected",
        LOG_TIMEOUT,
        || {
            let log = cluster.agent("b").log();
            let connected = log
                .access("inbound")
                .iter()
                .filter(|event| {
                    event.field("error").map_or(true, |error| {
                        error.is_empty() || error.starts_with("policy changed")
                    })
                })
                .count();
            (server.accepted() == connected).then_some(connected)
        },
    )
    .expect("the app's accepts match its agent's connects")
}

/// Plaintext from an uncaptured pod reaches the server while mTLS mode is the default
/// (PERMISSIVE); after a PeerAuthentication STRICT is added, plaintext is refused before
/// anything reaches the app, while HBONE from a mesh client still passes.
#[test]
fn strict_mtls_refuses_plaintext_while_hbone_passes() {
    require_netns!("strict_mtls_refuses_plaintext_while_hbone_passes");
    let cluster = start(&Authz::default());
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    assert!(
        cluster.echo_works("legacy", "plaintext while permissive"),
        "PERMISSIVE (the default) admits plaintext"
    );
    assert!(cluster.echo_works("client", "mtls while permissive"));
    assert_eq!(server.accepted(), 2);

    cluster.set_server_authz(&Authz {
        resources: STRICT.to_string(),
        ..Authz::default()
    });
    support::wait_for("STRICT to refuse plaintext", RELOAD_TIMEOUT, || {
        (!cluster.echo_works("legacy", "plaintext probe")).then_some(())
    })
    .expect("STRICT applied on reload");
    // Probes admitted before the reload reached the app, and its accept can trail the agent's
    // connect: count only once the app has accepted every connection the agent made to it.
    assert!(!cluster.echo_works("legacy", "plaintext settle"));
    let accepted = settled_accepts(&cluster, &server);
    assert!(!cluster.echo_works("legacy", "PLAINTEXT-AFTER-STRICT"));
    assert_eq!(
        server.accepted(),
        accepted,
        "refused plaintext reached the app"
    );
    assert!(!server.received_contains(b"PLAINTEXT-AFTER-STRICT"));
    assert!(
        cluster.echo_works("client", "mtls under strict"),
        "HBONE (mTLS) still passes under STRICT"
    );
    cluster
        .agent("b")
        .wait_for_event(
            "the plaintext refusal in the access log",
            LOG_TIMEOUT,
            |event| inbound_error(event, "plaintext refused: mTLS mode STRICT"),
        )
        .expect("access log names STRICT");
}

/// An ALLOW policy naming only `client` admits it and refuses `other` on the same destination:
/// `other`'s CONNECT is answered 401 (agent A's outbound log), nothing of it reaches the app,
/// and agent B logs the denial and the policy situation.
#[test]
fn allow_policy_admits_one_identity_and_refuses_another() {
    require_netns!("allow_policy_admits_one_identity_and_refuses_another");
    let cluster = start(&Authz {
        resources: policy("allow-client", "ALLOW", &identity("client")),
        ..Authz::default()
    });
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    assert!(cluster.echo_works("client", "allowed client"));
    assert_eq!(server.accepted(), 1);

    assert!(!cluster.echo_works("other", "OTHER-MARKER"));
    assert_eq!(server.accepted(), 1, "the refused client reached the app");
    assert!(!server.received_contains(b"OTHER-MARKER"));

    let other_id = format!("spiffe://{}", identity("other"));
    let outbound = cluster
        .agent("a")
        .wait_for_event(
            "other's refused outbound connection",
            LOG_TIMEOUT,
            |event| {
                event.is_access()
                    && event.field("direction").as_deref() == Some("outbound")
                    && event.field("src.identity").as_deref() == Some(other_id.as_str())
            },
        )
        .expect("outbound access log");
    let error = outbound.field("error").unwrap_or_default();
    assert!(error.contains("401"), "expected a 401: {}", outbound.raw);
    let inbound = cluster
        .agent("b")
        .wait_for_event("the denial in agent B's access log", LOG_TIMEOUT, |event| {
            inbound_error(event, "denied")
        })
        .expect("inbound access log");
    assert_eq!(
        inbound.field("src.identity"),
        Some(other_id),
        "{}",
        inbound.raw
    );
}

/// Two connections are open; a config edit adds a DENY for `other`. `other`'s connection is
/// closed promptly with "policy changed" in the access log, `client`'s keeps flowing.
#[test]
fn policy_edit_closes_the_denied_live_connection_only() {
    require_netns!("policy_edit_closes_the_denied_live_connection_only");
    let cluster = start(&Authz::default());
    let _server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let mut kept = cluster.open("client");
    let mut doomed = cluster.open("other");
    assert!(round_trip(&mut kept, "client before"));
    assert!(round_trip(&mut doomed, "other before"));

    let edited = Instant::now();
    cluster.set_server_authz(&Authz {
        resources: policy("deny-other", "DENY", &identity("other")),
        ..Authz::default()
    });
    let closed = cluster
        .agent("b")
        .wait_for_event(
            "the live connection to be closed",
            RELOAD_TIMEOUT,
            |event| inbound_error(event, "policy changed: denied by policy default/deny-other"),
        )
        .expect("policy change closes the denied connection");
    let took = edited.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}: {}",
        closed.raw
    );
    let mut rest = Vec::new();
    let still_open = match doomed.read_to_end(&mut rest) {
        Ok(_) => false,
        Err(error) => matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(
        !still_open,
        "the client side of the denied connection was not closed"
    );
    assert!(
        !round_trip(&mut doomed, "other after"),
        "the denied connection still carries data"
    );
    for round in 0..3 {
        assert!(
            round_trip(&mut kept, &format!("client after #{round}")),
            "the allowed connection was disturbed"
        );
    }
    assert!(
        !cluster.echo_works("other", "new other connection"),
        "new connections from other are denied too"
    );
}

/// With `defaultDeny` and no policy, nothing reaches the server — mTLS or plaintext; adding an
/// ALLOW for `client` (live) admits exactly that client.
#[test]
fn zero_trust_switch_denies_unknown_traffic() {
    require_netns!("zero_trust_switch_denies_unknown_traffic");
    let zero_trust = Authz {
        default_deny: true,
        ..Authz::default()
    };
    let cluster = start(&zero_trust);
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let client_id = format!("spiffe://{}", identity("client"));
    assert!(!cluster.echo_works("client", "mesh client, no policy"));
    assert!(!cluster.echo_works("legacy", "plaintext, no policy"));
    assert_eq!(server.accepted(), 0, "zero trust let something through");
    cluster
        .agent("b")
        .wait_for_event("the mesh client's default-deny", LOG_TIMEOUT, |event| {
            inbound_error(event, "default deny (zero-trust)")
                && event.field("src.identity").as_deref() == Some(client_id.as_str())
        })
        .expect("access log gives the reason");

    cluster.set_server_authz(&Authz {
        resources: policy("allow-client", "ALLOW", &identity("client")),
        ..zero_trust
    });
    support::wait_for("the ALLOW to apply", RELOAD_TIMEOUT, || {
        cluster.echo_works("client", "allowed now").then_some(())
    })
    .expect("ALLOW applied on reload");
    assert!(!cluster.echo_works("other", "still unknown"));
    assert_eq!(
        server.accepted(),
        1,
        "only the allowed client reached the app"
    );
}
