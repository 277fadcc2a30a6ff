//! Network-namespace tests of the Istio control-plane integration (issue 6): real agents started
//! with Istio's environment learn workloads and policies from a fake istiod over delta xDS and
//! get every certificate from its fake Istio CA, impersonating their pods.
//!
//! Nodes `a` and `b` are linked; pod `client` is on `a`, `server` and `other` on `b`. The fake
//! istiod serves on 127.0.0.1:15012 in both nodes (see `support::fake_istiod`). What a user would
//! notice is checked: traffic through both agents (the server sees it, the agents' access logs
//! name the identities), refusals (nothing reaches the app), and what istiod was told (NACKs by
//! name, versions on reconnect, certificate requests).
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use nodetunnel::proto::{security, workload, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use support::agent::{binary, Agent};
use support::apps::{self, EchoServer, Reply};
use support::cluster::{Cluster, ClusterBuilder};
use support::fake_cni::{workload_info, FakeCni};
use support::fake_istiod::{self as istiod, CaMode, FakeIstiod};
use support::netns::Topology;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(20);

fn node_name(role: &str) -> String {
    format!("node-{role}")
}

/// Two nodes with agents, all fed by one fake istiod, and an echo server in `server`. Field
/// order is drop order: the app and istiod stop, then the agents and the namespaces go.
struct Istio {
    server: EchoServer,
    istiod: FakeIstiod,
    cluster: Cluster,
}

impl std::ops::Deref for Istio {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

/// The pods (`client` on `a`, `server` and `other` on `b`; the test installs rules in
/// `test_redirected`) and a fake istiod that pushed their three workloads. Agents are the
/// caller's to start.
fn prepare(test_redirected: &[&str]) -> (ClusterBuilder, FakeIstiod) {
    let builder = Cluster::build(&[("a", "client"), ("b", "server"), ("b", "other")])
        .test_redirected(test_redirected);
    let topology = builder.topology();
    let istiod = FakeIstiod::start(topology, &["a", "b"]).expect("fake istiod");
    let workloads = [("client", "a"), ("server", "b"), ("other", "b")]
        .into_iter()
        .map(|(pod, node)| {
            istiod::address(istiod::workload(
                pod,
                pod,
                topology.pod(pod).ip,
                &node_name(node),
            ))
        })
        .collect();
    istiod.set(ADDRESS_TYPE, workloads);
    (builder, istiod)
}

impl Istio {
    /// Agents with a small config file (pods are added through the admin API, rules installed
    /// by the agent) and Istio's environment for everything else; the CA answers in `ca_mode`
    /// from the start (agents fetch certificates for their pods as soon as they learn them).
    fn start(ca_mode: CaMode) -> Istio {
        Istio::start_with(ca_mode, "")
    }

    /// [`Istio::start`] with extra lines for the `agent.xds` section of the config file.
    fn start_with(ca_mode: CaMode, xds_settings: &str) -> Istio {
        let (builder, istiod) = prepare(&[]);
        istiod.set_ca_mode(ca_mode);
        let mut cluster = builder.spawn_with(|cluster, role| {
            let config = format!(
                "agent:\n  drainTimeout: 2s\n  xds:\n    reconnectMax: 500ms\n{xds_settings}"
            );
            let env = istiod.agent_env(&node_name(role));
            Agent::spawn_istio(&cluster.topology, role, Some(&config), &env).expect("agent spawns")
        });
        let server = EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo)
            .expect("server app");
        for agent in &mut cluster.agents {
            agent
                .wait_ready(&cluster.topology, WAIT)
                .expect("ready after the first push of each type");
        }
        let istio = Istio {
            server,
            istiod,
            cluster,
        };
        istio.capture("a", "client");
        istio.capture("b", "server");
        istio.capture("b", "other");
        istio
    }

    /// `nodetunnel pod add` on the node's agent, for an xDS workload.
    fn capture(&self, node: &str, pod: &str) {
        let netns = self.topology.netns_path(pod);
        let output = self
            .topology
            .exec(
                &self.topology.netns(node),
                &[
                    binary(),
                    "pod",
                    "add",
                    "--workload",
                    &istiod::uid(pod),
                    "--netns",
                    &netns.display().to_string(),
                ],
            )
            .expect("pod add runs");
        assert!(
            output.status.success(),
            "pod add {pod}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn exchange(&self, client: &str, marker: &[u8]) -> anyhow::Result<Vec<u8>> {
        exchange(&self.topology, client, marker)
    }

    /// Waits until an exchange from `client` to the server succeeds (the agents apply pushes
    /// asynchronously).
    fn wait_allowed(&self, client: &str, marker: &[u8]) {
        let result = support::wait_for("an allowed exchange", WAIT, || {
            self.exchange(client, marker).ok()
        });
        if let Err(error) = result {
            panic!("{error:#}\n{}", log_tails(&self.agents));
        }
    }

    /// Waits until an exchange from `client` fails (each attempt with its own marker), then
    /// checks that a fresh one is refused before anything reaches the app. (The first failure
    /// can be a connection the change closed mid-exchange, after its bytes got through.)
    fn wait_refused(&self, client: &str, marker: &[u8]) {
        let mut attempt = 0u32;
        let result = support::wait_for("a refused exchange", WAIT, || {
            attempt += 1;
            let tagged = [marker, format!("-{attempt}").as_bytes()].concat();
            self.exchange(client, &tagged).err().map(|_| ())
        });
        if let Err(error) = result {
            panic!("{error:#}\n{}", log_tails(&self.agents));
        }
        let confirm = [marker, b"-confirm"].concat();
        assert!(
            self.exchange(client, &confirm).is_err(),
            "refused once, then allowed again"
        );
        assert!(
            !self.server.received_contains(&confirm),
            "a refused connection must not reach the app"
        );
    }
}

/// The end of every agent's log, for a failure message.
fn log_tails(agents: &[Agent]) -> String {
    agents
        .iter()
        .map(|agent| format!("agent {}:\n{}", agent.node, agent.log().tail(25)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn exchange(topology: &Topology, client: &str, marker: &[u8]) -> anyhow::Result<Vec<u8>> {
    let target = SocketAddr::from((topology.pod("server").ip, APP_PORT));
    let payload = apps::payload(marker, 16 * 1024, 3);
    let response = apps::exchange(topology, client, target, payload.clone(), IO_TIMEOUT)?;
    anyhow::ensure!(response == payload, "echo differs");
    Ok(response)
}

fn deny(name: &str, principal: &str) -> (String, prost_types::Any) {
    istiod::authorization(istiod::principal_policy(
        name,
        security::Action::Deny,
        principal,
    ))
}

/// Workloads pushed over xDS carry real traffic between netns pods with certificates from the
/// Istio CA (impersonating each pod's identity, with the node token); a pushed DENY policy
/// closes the path; a push with a bad resource is NACKed by name while the good ones in it
/// apply.
#[test]
fn xds_workloads_and_policies_drive_traffic_with_istio_ca_certificates() {
    require_netns!("xds_workloads_and_policies_drive_traffic_with_istio_ca_certificates");
    let cluster = Istio::start(CaMode::Normal);
    cluster.wait_allowed("client", b"xds-allowed");
    cluster
        .agent("b")
        .wait_for_event("inbound access event with identities", WAIT, |event| {
            event.is_access()
                && event.field("direction").as_deref() == Some("inbound")
                && event.field("src.identity").as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/client")
                && event.field("dst.identity").as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/server")
        })
        .expect("the server's agent logged the mTLS connection");
    let calls = cluster.istiod.ca_calls();
    for identity in [
        "spiffe://cluster.local/ns/default/sa/client",
        "spiffe://cluster.local/ns/default/sa/server",
    ] {
        let call = calls
            .iter()
            .find(|call| call.impersonated == identity)
            .unwrap_or_else(|| panic!("no CA call impersonating {identity}: {calls:?}"));
        assert_eq!(call.authorization, format!("Bearer {}", istiod::TOKEN));
        assert_eq!(call.cluster_id, "Kubernetes");
    }

    // One push: a workload with a 5-byte address, and a DENY for the client. The bad one is
    // refused by name; the policy applies.
    let mut broken = istiod::workload("broken", "broken", "10.200.9.9".parse().unwrap(), "node-b");
    broken.addresses = vec![vec![10, 200, 9, 9, 9]];
    cluster
        .istiod
        .set(ADDRESS_TYPE, vec![istiod::address(broken)]);
    cluster.istiod.set(
        AUTHORIZATION_TYPE,
        vec![deny("deny-client", "cluster.local/ns/default/sa/client")],
    );
    support::wait_for("the NACK naming the broken workload", WAIT, || {
        cluster.istiod.nacks().into_iter().find(|message| {
            message.contains("Kubernetes//Pod/default/broken: workload.addresses[0]")
        })
    })
    .expect("NACK by name");
    cluster.wait_refused("client", b"xds-denied");
    cluster
        .agent("b")
        .wait_for_event("denial naming the pushed policy", WAIT, |event| {
            event.is_access()
                && event
                    .field("error")
                    .is_some_and(|error| error.contains("default/deny-client"))
        })
        .expect("denial logged with the policy");

    // Removing the policy over xDS opens the path again.
    cluster
        .istiod
        .remove(AUTHORIZATION_TYPE, &["default/deny-client"]);
    cluster.wait_allowed("client", b"xds-allowed-again");
}

/// istiod going away keeps traffic flowing on the last state; a change made while it was away
/// arrives after it comes back: the agent reconnects, tells istiod the versions it holds and
/// applies the difference.
#[test]
fn xds_server_restart_keeps_the_last_state_and_resyncs() {
    require_netns!("xds_server_restart_keeps_the_last_state_and_resyncs");
    let mut cluster = Istio::start(CaMode::Normal);
    cluster.wait_allowed("client", b"before-restart");
    cluster.istiod.stop();
    cluster
        .agent("a")
        .wait_for_event("the stream failure", WAIT, |event| {
            event
                .field("message")
                .is_some_and(|message| message.contains("serving the last known state"))
        })
        .expect("the agent noticed istiod is gone");
    cluster
        .exchange("client", b"while-istiod-is-down")
        .expect("traffic flows on the last known state");

    let requests_before = cluster.istiod.requests().len();
    cluster.istiod.set(
        AUTHORIZATION_TYPE,
        vec![deny(
            "deny-while-away",
            "cluster.local/ns/default/sa/client",
        )],
    );
    cluster
        .istiod
        .restart(&cluster.cluster.topology)
        .expect("restart");
    cluster.wait_refused("client", b"after-resync");
    let resubscribed = cluster.istiod.requests()[requests_before..]
        .iter()
        .any(|request| {
            request.type_url == ADDRESS_TYPE
                && request.response_nonce.is_empty()
                && request
                    .initial_resource_versions
                    .contains_key(&istiod::uid("server"))
        });
    assert!(
        resubscribed,
        "a reconnecting agent sends the versions it holds"
    );
}

/// A push bigger than the agent's message limit is refused: the stream is dropped (and retried
/// with backoff), nothing of that push is applied, and the last state keeps serving.
#[test]
fn xds_messages_over_the_size_limit_are_refused() {
    require_netns!("xds_messages_over_the_size_limit_are_refused");
    let cluster = Istio::start_with(CaMode::Normal, "    maxMessageSize: 65536\n");
    cluster.wait_allowed("client", b"under-the-limit");
    let mut big = istiod::workload("big", "big", "10.200.2.9".parse().unwrap(), "node-b");
    big.extensions = vec![workload::Extension {
        name: "padding".to_string(),
        config: Some(prost_types::Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".to_string(),
            value: vec![0; 128 * 1024],
        }),
    }];
    // The same message also puts the server behind a "waypoint" that is the `other` pod, which
    // runs no waypoint: applied, it would send the client's traffic there (and the server
    // would refuse peers that bypass its waypoint), so the exchange below fails if any of the
    // message got through.
    let mut behind_waypoint = istiod::workload(
        "server",
        "server",
        cluster.topology.pod("server").ip,
        &node_name("b"),
    );
    behind_waypoint.waypoint = Some(workload::GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Address(
            workload::NetworkAddress {
                network: String::new(),
                address: cluster.topology.pod("other").ip.octets().to_vec(),
                length: None,
            },
        )),
        hbone_mtls_port: 15008,
    });
    cluster.istiod.set(
        ADDRESS_TYPE,
        vec![istiod::address(big), istiod::address(behind_waypoint)],
    );
    cluster
        .agent("a")
        .wait_for_event("the oversized message refused", WAIT, |event| {
            event.field("message").as_deref()
                == Some("xDS stream failed; serving the last known state")
                && event
                    .field("error")
                    .is_some_and(|error| error.contains("too large"))
        })
        .expect("the agent refuses the message and says why");
    cluster
        .exchange("client", b"after-oversized-push")
        .expect("the last known state keeps serving");
}

/// The CA's answers are checked and its outages survived: a certificate for the wrong identity
/// is refused (no traffic); a CA outage while certificates are valid keeps traffic up; after
/// they expire new connections fail closed; when the CA returns, traffic recovers without a
/// restart.
#[test]
fn istio_ca_failures_are_refused_survived_and_recovered() {
    require_netns!("istio_ca_failures_are_refused_survived_and_recovered");
    let cluster = Istio::start(CaMode::WrongIdentity);
    cluster.wait_refused("client", b"wrong-identity");
    cluster
        .agent("a")
        .wait_for_event("the refused certificate", WAIT, |event| {
            event.raw.contains("asked for exactly")
        })
        .expect("the agent says why it refused the certificate");

    // Short-lived certificates so expiry comes within the test.
    let ttl = Duration::from_secs(8);
    cluster.istiod.set_ca_ttl(ttl);
    cluster.istiod.set_ca_mode(CaMode::Normal);
    cluster.wait_allowed("client", b"ca-back");
    let issued_at = std::time::Instant::now();

    cluster.istiod.set_ca_mode(CaMode::Down);
    cluster
        .exchange("client", b"ca-down-cert-valid")
        .expect("valid certificates keep traffic up while the CA is down");
    // After the certificates' expiry the agents hold nothing valid: fail closed.
    std::thread::sleep(ttl.saturating_sub(issued_at.elapsed()));
    cluster.wait_refused("client", b"ca-down-cert-expired");

    cluster.istiod.set_ca_mode(CaMode::Normal);
    cluster.istiod.set_ca_ttl(Duration::from_secs(3600));
    cluster.wait_allowed("client", b"ca-recovered");
}

/// The same scenario with no local config at all: `nodetunnel run` with Istio's environment
/// only, pods from istio-cni (the fake ZDS server), workloads, policies and certificates from
/// istiod.
#[test]
fn istio_mode_without_config_takes_pods_from_cni_and_model_from_istiod() {
    require_netns!("istio_mode_without_config_takes_pods_from_cni_and_model_from_istiod");
    // The test's rules stand in for istio-cni's.
    let (builder, istiod) = prepare(&["client", "server", "other"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = |role: &str| dir.path().join(format!("ztunnel-{role}.sock"));
    let cnis: Vec<(&str, FakeCni)> = ["a", "b"]
        .into_iter()
        .map(|role| {
            (
                role,
                FakeCni::listen(&socket(role)).expect("fake istio-cni"),
            )
        })
        .collect();
    let mut cluster = builder.spawn_with(|cluster, role| {
        let mut env = istiod.agent_env(&node_name(role));
        env.push(("INPOD_UDS".to_string(), socket(role).display().to_string()));
        env.push((
            "CONNECTION_TERMINATION_DEADLINE".to_string(),
            "2s".to_string(),
        ));
        // The test's rules, standing in for istio-cni's, have no return path for spoofed
        // sources.
        env.push(("ENABLE_ORIG_SRC".to_string(), "false".to_string()));
        Agent::spawn_istio(&cluster.topology, role, None, &env).expect("agent spawns")
    });
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let topology = &cluster.topology;
    let mut connections = Vec::new();
    for (role, cni) in &cnis {
        let mut connection = cni.accept().expect("the agent connects to istio-cni");
        let pods: &[&str] = if *role == "a" {
            &["client"]
        } else {
            &["server", "other"]
        };
        for pod in pods {
            let answer = connection
                .add(
                    &format!("k8s-uid-{pod}"),
                    &workload_info(pod, "default", pod),
                    &topology.netns_path(pod),
                )
                .expect("add answered");
            assert!(answer.is_ack(), "add {pod}: {answer:?}");
        }
        assert!(connection.snapshot_sent().expect("answered").is_ack());
        connections.push(connection);
    }
    for agent in &mut cluster.agents {
        agent.wait_ready(&cluster.topology, WAIT).expect("ready");
    }
    let result = support::wait_for("traffic from the istio-cni pods", WAIT, || {
        exchange(topology, "client", b"istio-mode").ok()
    });
    if let Err(error) = result {
        panic!("{error:#}\n{}", log_tails(&cluster.agents));
    }
    assert!(server.received_contains(b"istio-mode"));
    let dump = topology
        .exec(
            &topology.netns("a"),
            &["curl", "-s", "http://127.0.0.1:15000/config_dump"],
        )
        .expect("curl the admin API");
    let dump: serde_json::Value =
        serde_json::from_slice(&dump.stdout).expect("config_dump is JSON");
    let config = &dump["config"];
    assert_eq!(config["xdsAddress"], FakeIstiod::address(), "{config}");
    assert_eq!(config["caAddress"], FakeIstiod::address(), "{config}");
    assert_eq!(config["zdsEnabled"], true, "{config}");
    assert_eq!(
        config["installRules"], false,
        "istio-cni installs the rules"
    );
    cluster
        .agent("b")
        .wait_for_event("inbound with the client's identity", WAIT, |event| {
            event.is_access()
                && event.field("src.identity").as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/client")
        })
        .expect("mTLS with the CA's certificates");
    // Pushed policy applies to istio-cni pods too.
    istiod.set(
        AUTHORIZATION_TYPE,
        vec![deny("deny-client", "cluster.local/ns/default/sa/client")],
    );
    support::wait_for("the pushed denial", WAIT, || {
        exchange(topology, "client", b"istio-mode-denied").err()
    })
    .expect("denied after the push");
    drop(connections);
    drop(cluster);
}
