//! Network-namespace tests of inbound protection (issue 16): `agent.inboundLimits` enforced by
//! the destination's agent, per source identity (HBONE) and per source IP (plaintext).
//!
//! Topology: node `a` with the clients (`client`, `other`: captured, HBONE, each its own service
//! account; `outsider`: not captured, sends plaintext), node `b` with `server` (captured), whose
//! agent has the limits. Whether something reached the app is read from the echo server's
//! counters, never from the agents' own word.
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
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// A token bucket that refills one connection per 1000 s: within the test, exactly `burst`
/// connections of one source pass.
const RATE_LIMIT: &str =
    "  inboundLimits:\n  - namespace: default\n    perSource: {connectionsPerSecond: 0.001, burst: 3}\n";
/// At most two open connections per source.
const CONCURRENCY_LIMIT: &str = "  inboundLimits:\n  - perSource: {maxConnections: 2}\n";

/// client, other (HBONE, captured) and outsider (plain TCP, not captured) on node a; server
/// (HBONE, captured) on node b, whose agent gets `limits` (agent keys).
fn start(limits: &str) -> Cluster {
    let captured = ["client", "other", "server"];
    Cluster::build(&[
        ("a", "client"),
        ("a", "other"),
        ("a", "outsider"),
        ("b", "server"),
    ])
    .plain_tcp(&["outsider"])
    .test_redirected(&captured)
    .captured(&captured)
    .start_with(|cluster, node| config(cluster, node, if node == "b" { limits } else { "" }))
}

fn config(cluster: &Cluster, node: &str, limits: &str) -> String {
    cluster
        .render(node)
        .replacen("agent:\n", &format!("agent:\n{limits}"), 1)
}

/// A connection from `pod` to the server app, proven by one echo round trip, kept open; or
/// the error that ended it.
fn open(cluster: &Cluster, pod: &str) -> std::io::Result<TcpStream> {
    let target = SocketAddr::from((cluster.ip("server"), APP_PORT));
    cluster
        .topology
        .run_in(pod, move || -> std::io::Result<TcpStream> {
            let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            round_trip(&mut stream, "hello")?;
            Ok(stream)
        })
        .expect("run in pod")
}

/// Writes `text` and reads the same text back; an orderly close before that is an error too.
fn round_trip(stream: &mut TcpStream, text: &str) -> std::io::Result<()> {
    stream.write_all(text.as_bytes())?;
    let mut echoed = vec![0u8; text.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != text.as_bytes() {
        return Err(std::io::Error::other(format!("echo {echoed:?}")));
    }
    Ok(())
}

/// A GET to `path` on the loopback of node `node` (metrics at 15020, admin API at 15000).
fn get(cluster: &Cluster, node: &str, address: &'static str, path: &'static str) -> String {
    cluster
        .topology
        .run_in(node, move || {
            let mut stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok::<_, std::io::Error>(text)
        })
        .expect("run in node")
        .expect("GET")
}

/// With a burst of 3 and a rate of ~0, exactly three connections of `client` pass; the
/// fourth and fifth get 429 on their CONNECT while the three open streams on the same HBONE
/// connection carry on, and `other` (another identity) is unaffected. A reload that replaces
/// the rule lifts it at once.
#[test]
fn an_inbound_rate_limit_refuses_a_burst_from_one_identity_while_another_passes() {
    require_netns!("an_inbound_rate_limit_refuses_a_burst_from_one_identity_while_another_passes");
    let cluster = start(RATE_LIMIT);
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let mut held: Vec<TcpStream> = (0..3)
        .map(|index| {
            support::wait_for("a connection within the burst", IO_TIMEOUT, || {
                open(&cluster, "client").ok()
            })
            .unwrap_or_else(|_| panic!("connection {index} of the burst"))
        })
        .collect();
    assert_eq!(server.accepted(), 3);
    for attempt in 0..2 {
        let refused = open(&cluster, "client");
        assert!(
            refused.is_err(),
            "connection {attempt} over the burst passed"
        );
    }
    assert_eq!(
        server.accepted(),
        3,
        "nothing over the burst reached the app"
    );
    for (index, stream) in held.iter_mut().enumerate() {
        round_trip(stream, "still here")
            .unwrap_or_else(|error| panic!("open stream {index} after the refusals: {error}"));
    }
    open(&cluster, "other").expect("another identity has a bucket of its own");

    let server_agent = cluster.agent("b");
    let refusal = server_agent
        .wait_for_event("the rate refusal's access log", LOG_TIMEOUT, |event| {
            event.is_access()
                && event.field("direction").as_deref() == Some("inbound")
                && event.field("response_flags").as_deref() == Some("RATE_LIMITED")
        })
        .expect("access log");
    let error = refusal.field("error").unwrap_or_default();
    assert!(
        error.contains("inboundLimits") && error.contains("/sa/client"),
        "{}",
        refusal.raw
    );
    cluster
        .agent("a")
        .wait_for_event("the client's view of the 429", LOG_TIMEOUT, |event| {
            event.is_access()
                && event
                    .field("error")
                    .is_some_and(|error| error.contains("429"))
        })
        .expect("the client's agent logs the 429");
    let metrics = get(&cluster, "b", "127.0.0.1:15020", "/metrics");
    assert!(
        metrics.contains("nodetunnel_connection_limit_refusals_total{reason=\"inbound_rate\"} 2"),
        "{metrics}"
    );
    let dump = get(&cluster, "b", "127.0.0.1:15000", "/config_dump");
    assert!(
        dump.contains("\"inboundLimits\"") && dump.contains("\"connectionsPerSecond\": 0.001"),
        "{dump}"
    );

    // Live reload: the rate rule goes, a concurrency rule comes; the client passes again
    // (its three streams closed first: the new rule allows two open per source).
    drop(held);
    let config = config(&cluster, "b", CONCURRENCY_LIMIT);
    server_agent.write_config(&config).expect("config edit");
    support::wait_for("the reloaded limits", RELOAD_TIMEOUT, || {
        open(&cluster, "client").ok()
    })
    .expect("the rate limit is lifted on reload");
}

/// Plaintext (15006) is limited per source IP: with `maxConnections: 2` the third concurrent
/// connection from the same IP is reset at once, before anything reaches the app, and is
/// admitted again once one of the two closes. A mesh client is limited per identity, with a
/// 429 on its third stream.
#[test]
fn an_inbound_concurrency_cap_resets_the_third_plaintext_connection_of_a_source() {
    require_netns!("an_inbound_concurrency_cap_resets_the_third_plaintext_connection_of_a_source");
    let cluster = start(CONCURRENCY_LIMIT);
    let server =
        EchoServer::start(&cluster.topology, "server", APP_PORT, Reply::Echo).expect("server app");
    let first = support::wait_for("the first plaintext connection", IO_TIMEOUT, || {
        open(&cluster, "outsider").ok()
    })
    .expect("first connection");
    let _second = open(&cluster, "outsider").expect("second connection");
    let accepted = server.accepted();
    let refused = open(&cluster, "outsider").expect_err("the third is over the cap");
    assert!(
        matches!(
            refused.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "the app must see a reset, not a hang or an empty answer: {refused}"
    );
    assert_eq!(
        server.accepted(),
        accepted,
        "the refused one never reached the app"
    );
    // A mesh identity is another source, with a cap of its own: two streams pass, the third
    // gets 429 while the two carry on.
    let mut streams: Vec<TcpStream> = (0..2)
        .map(|index| {
            open(&cluster, "client")
                .unwrap_or_else(|error| panic!("HBONE stream {index} of the client: {error}"))
        })
        .collect();
    open(&cluster, "client").expect_err("the client's third open stream is over the cap");
    for stream in &mut streams {
        round_trip(stream, "carry on").expect("the open streams carry on");
    }

    cluster
        .agent("b")
        .wait_for_event("the overflow access log", LOG_TIMEOUT, |event| {
            event.is_access()
                && event.field("response_flags").as_deref() == Some("UPSTREAM_OVERFLOW")
                && event
                    .field("error")
                    .is_some_and(|error| error.contains("maxConnections"))
        })
        .expect("access log");
    let metrics = get(&cluster, "b", "127.0.0.1:15020", "/metrics");
    assert!(
        metrics.contains(
            "nodetunnel_connection_limit_refusals_total{reason=\"inbound_concurrency\"} 2"
        ),
        "{metrics}"
    );

    drop(first);
    support::wait_for("a slot after one connection closed", IO_TIMEOUT, || {
        open(&cluster, "outsider").ok()
    })
    .expect("admitted again once one closed");
}
