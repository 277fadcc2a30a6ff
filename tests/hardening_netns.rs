//! Network-namespace tests of the agent's limits against a hostile pod or peer (issue 15,
//! part A): caps on unauthenticated connections, checked with real agents, real capture and
//! unmodified sockets, as a user would notice them (resets, the refusal metric, recovery).
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::apps::{EchoServer, Reply};
use support::cluster::Cluster;

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const SOURCE_CAP: usize = 2;

/// Node `b`'s agent captures `server` with at most [`SOURCE_CAP`] unauthenticated connections
/// per source; `client` on node `a` is not captured, so it reaches `server` in plaintext
/// (15006, PERMISSIVE).
fn cluster() -> Cluster {
    Cluster::build(&[("a", "client"), ("b", "server")])
        .captured(&["server"])
        .start_with(|cluster, node| {
            cluster.render(node).replacen(
                "  reloadInterval: 200ms\n",
                &format!(
                    "  reloadInterval: 200ms\n  proxy:\n    maxUnauthenticatedPerSource: {SOURCE_CAP}\n"
                ),
                1,
            )
        })
}

/// Connects from `pod` and proves the connection reaches the echo app.
fn echoing(cluster: &Cluster, pod: &str, target: SocketAddr) -> std::io::Result<TcpStream> {
    cluster
        .topology
        .run_in(pod, move || -> std::io::Result<TcpStream> {
            let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.write_all(b"ping")?;
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply)?;
            if &reply != b"ping" {
                return Err(std::io::Error::other("echo differs"));
            }
            Ok(stream)
        })
        .expect("thread in the pod")
}

/// `GET /metrics` on node `node`'s agent.
fn metrics(cluster: &Cluster, node: &str) -> String {
    cluster
        .topology
        .run_in(node, || -> std::io::Result<String> {
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 15020)), IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .expect("thread in the node")
        .expect("metrics answer")
}

/// One source past its cap of plaintext connections to a pod gets a reset before anything
/// reaches the app, the refusal is counted by listener and reason, the connections it holds
/// keep working, and a new connection is admitted once one of them closes.
#[test]
fn plaintext_connections_over_the_source_cap_are_reset_and_counted() {
    require_netns!("plaintext_connections_over_the_source_cap_are_reset_and_counted");
    let cluster = cluster();
    let _app = EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("app");
    let target = cluster.target("server", APP_PORT);
    let mut held: Vec<TcpStream> = (0..SOURCE_CAP)
        .map(|index| {
            echoing(&cluster, "client", target)
                .unwrap_or_else(|error| panic!("connection {index} under the cap: {error}"))
        })
        .collect();

    let refused = echoing(&cluster, "client", target).expect_err("over the cap");
    assert!(
        matches!(
            refused.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "a refusal the client notices at once, got {refused}"
    );
    let text = metrics(&cluster, "b");
    let refusals = text
        .lines()
        .find(|line| {
            line.starts_with("nodetunnel_connections_refused_total{")
                && line.contains("listener=\"inbound_plaintext\"")
                && line.contains("reason=\"source_limit\"")
        })
        .unwrap_or_else(|| panic!("no refusal counted:\n{text}"));
    assert!(refusals.ends_with(" 1"), "{refusals}");

    for stream in &mut held {
        stream
            .write_all(b"pong")
            .expect("held connections keep working");
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).expect("echo");
        assert_eq!(&reply, b"pong");
    }
    drop(held.pop());
    support::wait_for("a slot to come back", IO_TIMEOUT, || {
        echoing(&cluster, "client", target).ok()
    })
    .expect("admitted again once a connection closed");
}
