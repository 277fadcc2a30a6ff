//! Network-namespace tests of the istio-cni (ZDS) pod source (issue 3): a real `nodetunnel`
//! agent in node `a` takes its pods from the fake istio-cni of `support::fake_cni`, which hands
//! over each pod's namespace fd by SCM_RIGHTS, as istio-cni does.
//!
//! What a user would notice is checked from inside the pods: whether the agent's listeners
//! (15001, 15006, 15008) exist in a pod's namespace (`ss`), whether traffic between captured
//! pods goes through the agent (its access log), and the ACK/NACK answers istio-cni gets.
//! The redirection rules are the test's own (`support::netns::redirect_rules`), as istio-cni
//! would install them.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::agent::{http_status, Agent, Ca, Mesh, Protocol, WorkloadSpec};
use support::apps::{self, EchoServer, Reply};
use support::fake_cni::{encode_add, workload_info, Answer, CniConnection, FakeCni};
use support::netns::Topology;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(15);
const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];

/// One node with an agent in ZDS mode and a fake istio-cni. Field order is drop order: the
/// agent stops before the CNI socket and the namespaces go.
struct Node {
    agent: Agent,
    cni: Option<FakeCni>,
    socket: PathBuf,
    mesh: Mesh,
    _ca: Ca,
    topology: Topology,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Node `a` with `pods` (each a workload of the same name in the model), the test's
    /// redirection rules in `redirected`, a listening fake istio-cni and a started agent (not
    /// ready yet: it waits for the snapshot) that also captures `configured` from its config.
    fn start(pods: &[&str], redirected: &[&str], configured: &[&str]) -> Node {
        Node::start_modelled(pods, pods, redirected, configured)
    }

    /// [`Node::start`] with only `modelled` of the pods in the model.
    fn start_modelled(
        pods: &[&str],
        modelled: &[&str],
        redirected: &[&str],
        configured: &[&str],
    ) -> Node {
        let mut topology = Topology::new();
        topology.add_node("a").expect("node a");
        for pod in pods {
            topology.add_pod("a", pod).expect("pod");
        }
        for pod in redirected {
            topology.install_redirect(pod).expect("redirection rules");
        }
        let mesh = mesh(&topology, modelled);
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ztunnel.sock");
        let cni = FakeCni::listen(&socket).expect("fake istio-cni listens");
        let ca = Ca::init().expect("nodetunnel ca init");
        let agent = Agent::spawn(
            &topology,
            "a",
            &ca,
            &render(&topology, &mesh, &socket, configured),
        )
        .expect("agent spawns");
        Node {
            agent,
            cni: Some(cni),
            socket,
            mesh,
            _ca: ca,
            topology,
            _dir: dir,
        }
    }

    fn accept(&self) -> CniConnection {
        let cni = self.cni.as_ref().expect("the fake istio-cni is running");
        cni.accept().expect("the agent connects and says hello")
    }

    fn netns(&self, pod: &str) -> PathBuf {
        self.topology.netns_path(pod)
    }

    /// `GET /healthz/ready` on the agent's node.
    fn readiness(&self) -> u16 {
        self.topology
            .run_in("a", || http_status("127.0.0.1:15021", "/healthz/ready"))
            .expect("thread in node a")
            .expect("readiness answers")
    }

    /// Ports listening inside `pod`'s namespace, one entry per listening socket.
    fn listening(&self, pod: &str) -> Vec<u16> {
        let output = self
            .topology
            .exec_role(pod, &["ss", "-Hltn"])
            .expect("ss runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .filter_map(|local| local.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// Waits until the agent's listeners in `pod` are all up (`true`) or all gone (`false`).
    fn wait_captured(&self, pod: &str, captured: bool) {
        let what = format!(
            "{pod} to be {}",
            if captured { "captured" } else { "released" }
        );
        let result = support::wait_for(&what, WAIT, || {
            let ports = self.listening(pod);
            let up = PROXY_PORTS
                .iter()
                .filter(|port| ports.contains(port))
                .count();
            let done = if captured {
                up == PROXY_PORTS.len()
            } else {
                up == 0
            };
            done.then_some(())
        });
        if let Err(error) = result {
            panic!(
                "{error:#}; listening in {pod}: {:?}\nagent log:\n{}",
                self.listening(pod),
                self.agent.log().tail(30)
            );
        }
    }

    /// client → server:8080 through both pods' listeners; returns once the agent logged the
    /// inbound connection with the client's identity.
    fn assert_traffic(&self, client: &str, server: &str) {
        let target = SocketAddr::from((self.topology.pod(server).ip, APP_PORT));
        let payload = apps::payload(b"zds-traffic", 32 * 1024, 9);
        let response = apps::exchange(&self.topology, client, target, payload.clone(), IO_TIMEOUT)
            .unwrap_or_else(|error| panic!("exchange {client} → {server}: {error:#}"));
        assert!(response == payload, "echo through the agent differs");
        let identity = self.mesh.workload(client).identity();
        self.agent
            .wait_for_event("inbound access event", WAIT, |event| {
                event.is_access()
                    && event.field("direction").as_deref() == Some("inbound")
                    && event.field("src.identity").as_deref() == Some(identity.as_str())
            })
            .expect("the connection went through the agent");
    }
}

/// A model of `pods` (HBONE workloads of node `a`, named as their pods).
fn mesh(topology: &Topology, pods: &[&str]) -> Mesh {
    Mesh {
        workloads: pods
            .iter()
            .map(|pod| WorkloadSpec::new(pod, topology.pod(pod).ip, "a", Protocol::Hbone))
            .collect(),
        services: Vec::new(),
    }
}

/// The agent config: ZDS on, quick reconnects, `configured` pods from the config as well.
/// Original-source connects are off: the test's redirection rules (standing in for
/// istio-cni's) have no return path.
fn render(topology: &Topology, mesh: &Mesh, socket: &Path, configured: &[&str]) -> String {
    let mut pods = String::from("  pods: []\n");
    if !configured.is_empty() {
        pods = String::from("  pods:\n");
    }
    for pod in configured {
        let netns = topology.netns_path(pod);
        pods.push_str(&format!(
            "    - workload: default/{pod}\n      netns: {}\n",
            netns.display()
        ));
    }
    format!(
        "agent:\n  node: node-a\n  trustDomain: cluster.local\n  drainTimeout: 2s\n  \
         reloadInterval: 200ms\n{pods}  proxy:\n    originalSource: false\n  zds:\n    \
         enabled: true\n    socket: {}\n    reconnectMax: 500ms\n{}",
        socket.display(),
        mesh.render_model()
    )
}

/// istio-cni knows pods by their Kubernetes uid, not by the model's key.
fn uid(pod: &str) -> String {
    format!("5f0c9a1e-{pod}")
}

fn info(pod: &str) -> nodetunnel::capture::zds::WorkloadInfo {
    workload_info(pod, "default", pod)
}

fn add(node: &Node, connection: &mut CniConnection, pod: &str) -> Answer {
    connection
        .add(&uid(pod), &info(pod), &node.netns(pod))
        .expect("add answered")
}

/// A snapshot of three pods: the agent is not ready before `SnapshotSent`, listens in every
/// pod after it, traffic between two of them goes through it, and a repeated `Add` of the same
/// namespace is an idempotent ACK that leaves exactly one listener per port.
#[test]
fn snapshot_pods_are_captured_and_carry_traffic() {
    require_netns!("snapshot_pods_are_captured_and_carry_traffic");
    let mut node = Node::start(&["client", "server", "idle"], &["client", "server"], &[]);
    let _server = EchoServer::start(&node.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let mut connection = node.accept();
    for pod in ["client", "server", "idle"] {
        assert_eq!(add(&node, &mut connection, pod), Answer::Ack, "add {pod}");
    }
    assert_eq!(
        node.readiness(),
        500,
        "not ready before the snapshot is complete"
    );
    assert_eq!(connection.snapshot_sent().expect("snapshot"), Answer::Ack);
    node.agent
        .wait_ready(&node.topology, WAIT)
        .expect("ready after SnapshotSent");
    for pod in ["client", "server", "idle"] {
        node.wait_captured(pod, true);
    }
    node.assert_traffic("client", "server");

    // One 15008 listener per data-plane thread; a second proxy would add as many again.
    let hbone_listeners = || {
        node.listening("client")
            .iter()
            .filter(|port| **port == 15008)
            .count()
    };
    let before = hbone_listeners();
    assert!(before >= 1, "client is captured");
    assert_eq!(add(&node, &mut connection, "client"), Answer::Ack, "re-add");
    assert_eq!(
        hbone_listeners(),
        before,
        "same uid + same netns must not start a second proxy"
    );
    node.assert_traffic("client", "server");
}

/// istio-cni restarts: pods keep their listeners while it is away; the agent reconnects on its
/// own, and the new snapshot keeps the re-added and the kept pod and drains the one it omits.
/// A pod from the agent's own config is not istio-cni's to drain.
#[test]
fn cni_restart_reconciles_and_drops_the_stale_pod() {
    require_netns!("cni_restart_reconciles_and_drops_the_stale_pod");
    let mut node = Node::start(&["readded", "kept", "stale", "static"], &[], &["static"]);
    let mut connection = node.accept();
    for pod in ["readded", "kept", "stale"] {
        assert_eq!(add(&node, &mut connection, pod), Answer::Ack, "add {pod}");
    }
    assert_eq!(connection.snapshot_sent().expect("snapshot"), Answer::Ack);
    node.agent.wait_ready(&node.topology, WAIT).expect("ready");

    drop(connection);
    if let Some(cni) = node.cni.take() {
        cni.stop();
    }
    // The agent noticed, and has already failed to reconnect once, before we look at it.
    node.agent
        .wait_for_event("a failed reconnect to istio-cni", WAIT, |event| {
            event
                .field("message")
                .is_some_and(|message| message.contains("istio-cni not reachable"))
        })
        .expect("the agent retries istio-cni");
    assert!(
        node.agent.exit_status().is_none(),
        "the agent survives istio-cni going away"
    );
    for pod in ["readded", "kept", "stale", "static"] {
        node.wait_captured(pod, true);
    }

    node.cni = Some(FakeCni::listen(&node.socket).expect("istio-cni restarts on the same path"));
    let mut connection = node.accept();
    assert_eq!(add(&node, &mut connection, "readded"), Answer::Ack);
    assert_eq!(connection.keep(&uid("kept")).expect("keep"), Answer::Ack);
    assert_eq!(connection.snapshot_sent().expect("snapshot"), Answer::Ack);
    node.wait_captured("stale", false);
    node.wait_captured("readded", true);
    node.wait_captured("kept", true);
    node.wait_captured("static", true);
    node.agent
        .wait_ready(&node.topology, WAIT)
        .expect("ready again after the new snapshot");
}

/// After the snapshot, pods come and go: `Add` captures, `Del` releases exactly that pod, and
/// an `Add` of a known uid with another namespace (sandbox recreated) moves the proxy there.
#[test]
fn runtime_add_delete_and_replacement() {
    require_netns!("runtime_add_delete_and_replacement");
    let mut node = Node::start(&["first", "second", "recreated"], &[], &[]);
    let mut connection = node.accept();
    assert_eq!(
        connection.snapshot_sent().expect("empty snapshot"),
        Answer::Ack
    );
    node.agent
        .wait_ready(&node.topology, WAIT)
        .expect("ready with no pods");

    assert_eq!(add(&node, &mut connection, "first"), Answer::Ack);
    assert_eq!(add(&node, &mut connection, "second"), Answer::Ack);
    node.wait_captured("first", true);
    node.wait_captured("second", true);

    assert_eq!(connection.del(&uid("first")).expect("del"), Answer::Ack);
    node.wait_captured("first", false);
    node.wait_captured("second", true);

    let moved = connection
        .add(&uid("second"), &info("second"), &node.netns("recreated"))
        .expect("add with a new netns");
    assert_eq!(moved, Answer::Ack);
    node.wait_captured("second", false);
    node.wait_captured("recreated", true);

    // Recreated with a new Kubernetes uid: the Add of the new uid comes before the Del of the
    // old one, which must not stop the new proxy.
    let recreated = connection
        .add("5f0c9a1e-second-v2", &info("second"), &node.netns("second"))
        .expect("add of the new uid");
    assert_eq!(recreated, Answer::Ack);
    node.wait_captured("second", true);
    node.wait_captured("recreated", false);
    assert_eq!(
        connection.del(&uid("second")).expect("late del"),
        Answer::Ack
    );
    // The ACK comes after the request was applied, so the listeners are checked right away.
    node.wait_captured("second", true);

    assert_eq!(
        connection.del("never-added").expect("del unknown"),
        Answer::Ack,
        "deleting an unknown pod is not an error"
    );
}

/// Bad requests get a NACK naming the problem and a log line; the connection, the agent and
/// the captured pods carry on, and the next good request is ACKed.
#[test]
fn bad_requests_are_nacked_and_other_pods_keep_serving() {
    require_netns!("bad_requests_are_nacked_and_other_pods_keep_serving");
    let mut node = Node::start(&["client", "server", "later"], &["client", "server"], &[]);
    let _server = EchoServer::start(&node.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let mut connection = node.accept();
    assert_eq!(add(&node, &mut connection, "client"), Answer::Ack);
    assert_eq!(add(&node, &mut connection, "server"), Answer::Ack);
    assert_eq!(connection.snapshot_sent().expect("snapshot"), Answer::Ack);
    node.agent.wait_ready(&node.topology, WAIT).expect("ready");

    let regular = tempfile::tempfile().expect("regular file");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    use std::os::fd::AsFd;
    let add_bytes = encode_add("bogus", &info("later"));
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "regular file as netns",
            connection
                .add_fd("bogus", &info("later"), regular.as_fd())
                .expect("answered"),
            "not a network namespace",
        ),
        (
            "add without fd",
            connection
                .send_raw("add without fd", &add_bytes, &[])
                .expect("answered"),
            "carries 0 file descriptors",
        ),
        (
            "add with two fds",
            connection
                .send_raw(
                    "add with two fds",
                    &add_bytes,
                    &[null.as_fd(), null.as_fd()],
                )
                .expect("answered"),
            "carries 2 file descriptors",
        ),
        (
            "garbage",
            connection
                .send_raw("garbage", &[0xff, 0xff, 0xff, 0xff], &[])
                .expect("answered"),
            "malformed WorkloadRequest",
        ),
        (
            "unknown message type",
            connection
                .send_raw("unknown", &[0x4a, 0x00], &[])
                .expect("answered"),
            "unknown or empty WorkloadRequest payload",
        ),
        (
            "oversized",
            connection
                .send_raw("oversized", &vec![0x0a; 4000], &[])
                .expect("answered"),
            "larger than 1024 bytes",
        ),
        (
            "keep after the snapshot",
            connection.keep(&uid("client")).expect("answered"),
            "after the snapshot was sent",
        ),
        (
            "second snapshot",
            connection.snapshot_sent().expect("answered"),
            "snapshot already sent",
        ),
    ];
    for (name, answer, expected) in cases {
        let reason = answer.nack_reason();
        assert!(reason.contains(expected), "{name}: NACK reason {reason:?}");
    }
    assert!(
        node.agent.exit_status().is_none(),
        "the agent is still running"
    );
    node.agent
        .wait_for_event("a NACK log line", WAIT, |event| {
            event.raw.contains("NACK") && event.raw.contains("not a network namespace")
        })
        .expect("NACKs are logged with the reason");
    node.wait_captured("client", true);
    node.assert_traffic("client", "server");
    assert_eq!(
        add(&node, &mut connection, "later"),
        Answer::Ack,
        "still usable"
    );
    node.wait_captured("later", true);
    assert_eq!(
        node.readiness(),
        200,
        "refused requests leave nothing pending"
    );
}

/// istio-cni can announce a pod before istiod's push names it. The `Add` is answered at once
/// (no wait holding up the session), the pod's ports are taken, and when the model learns the
/// pod the proxy moves to its workload and carries traffic — it is not left refusing all
/// traffic under its Kubernetes uid.
#[test]
fn a_pod_announced_before_the_model_knows_it_serves_once_the_model_does() {
    require_netns!("a_pod_announced_before_the_model_knows_it_serves_once_the_model_does");
    let mut node = Node::start_modelled(
        &["client", "server"],
        &["client"],
        &["client", "server"],
        &[],
    );
    let _server = EchoServer::start(&node.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let mut connection = node.accept();
    assert_eq!(
        add(&node, &mut connection, "server"),
        Answer::Ack,
        "unknown pod"
    );
    assert_eq!(
        add(&node, &mut connection, "client"),
        Answer::Ack,
        "known pod"
    );
    assert_eq!(connection.snapshot_sent().expect("snapshot"), Answer::Ack);
    node.agent.wait_ready(&node.topology, WAIT).expect("ready");
    node.wait_captured("server", true);

    node.mesh = mesh(&node.topology, &["client", "server"]);
    let config = render(&node.topology, &node.mesh, &node.socket, &[]);
    node.agent
        .write_config(&config)
        .expect("the model learns the pod");
    let target = SocketAddr::from((node.topology.pod("server").ip, APP_PORT));
    let payload = apps::payload(b"late-model", 4096, 3);
    support::wait_for("traffic to the late pod", WAIT, || {
        apps::exchange(
            &node.topology,
            "client",
            target,
            payload.clone(),
            IO_TIMEOUT,
        )
        .ok()
        .filter(|response| *response == payload)
    })
    .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", node.agent.log().tail(30)));
    node.assert_traffic("client", "server");
    node.wait_captured("server", true);
}
