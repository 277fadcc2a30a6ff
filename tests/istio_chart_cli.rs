//! Istio's ztunnel Helm chart with only the image changed (issue 13): the chart starts the
//! container with `args: [proxy, ztunnel]` and ztunnel's environment variables. The agent must
//! run in Istio mode from them, report once and by name each variable it does not support,
//! write plain logs without colour codes to a pipe, and answer readiness and metrics on both
//! IPv4 and IPv6 (it listens on `[::]`).
//!
//! Runs the real binary in a fresh network namespace (needs root).

#[macro_use]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::agent::{binary, http_status};
use support::netns::Topology;

/// A `nodetunnel proxy ztunnel` process in a namespace; killed on drop.
struct ChartAgent {
    child: Child,
}

impl Drop for ChartAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent as the chart does, with nothing but `env` in its environment.
fn start(netns: &str, dir: &Path, env: &[(&str, String)]) -> ChartAgent {
    let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
    let child = Command::new("ip")
        .args(["netns", "exec", netns, binary(), "proxy", "ztunnel"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env_clear()
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn nodetunnel proxy ztunnel");
    ChartAgent { child }
}

#[test]
fn proxy_ztunnel_runs_istio_mode_and_names_what_it_does_not_support() {
    require_netns!("proxy_ztunnel_runs_istio_mode_and_names_what_it_does_not_support");
    let mut topology = Topology::new();
    let netns = topology.add_node("node").expect("node netns").netns.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ztunnel.sock").display().to_string();
    let env: Vec<(&str, String)> = vec![
        // What the chart sets (istiod switched off: no control plane in this test).
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("RUST_LOG", "info".into()),
        ("RUST_BACKTRACE", "1".into()),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes".into()),
        ("INPOD_ENABLED", "true".into()),
        ("INPOD_UDS", socket),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30".into()),
        ("POD_NAME", "ztunnel-abcde".into()),
        ("POD_NAMESPACE", "istio-system".into()),
        ("NODE_NAME", "node-a".into()),
        ("INSTANCE_IP", "10.0.0.9".into()),
        ("SERVICE_ACCOUNT", "ztunnel".into()),
        ("NETWORK", "network-1".into()),
        ("ZTUNNEL_CPU_LIMIT", "4".into()),
        ("ZTUNNEL_WORKER_THREADS", "50%".into()),
        // Set through the chart's `env:` values, and not supported.
        ("KEEPALIVE_TIME", "60s".into()),
        ("XDS_ON_DEMAND", "true".into()),
        ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:15053".into()),
    ];
    let mut agent = start(&netns, dir.path(), &env);
    let log_path = dir.path().join("agent.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Readiness answers (500 until istio-cni sends its snapshot) on both families.
    for address in ["127.0.0.1:15021", "[::1]:15021"] {
        let address = address.to_string();
        let status = support::wait_for(
            &format!("readiness on {address}"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = agent.child.try_wait() {
                    panic!("agent exited with {status}:\n{}", log());
                }
                let address = address.clone();
                topology
                    .run_in("node", move || http_status(&address, "/healthz/ready"))
                    .ok()?
                    .ok()
            },
        )
        .expect("readiness answers");
        assert_eq!(status, 500, "not ready before istio-cni's snapshot");
    }
    let metrics = topology
        .run_in("node", || http_status("[::1]:15020", "/metrics"))
        .expect("thread")
        .expect("metrics over IPv6");
    assert_eq!(metrics, 200);

    let text = log();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in plain logs written to a file:\n{text}"
    );
    let starting = text
        .lines()
        .find(|line| line.contains("starting"))
        .unwrap_or_else(|| panic!("no start-up line:\n{text}"));
    assert!(
        starting.contains("mode=\"istio\"") || starting.contains("mode=istio"),
        "{starting}"
    );
    assert!(
        starting.contains("workers=2"),
        "50% of ZTUNNEL_CPU_LIMIT=4: {starting}"
    );
    for variable in [
        "KEEPALIVE_TIME",
        "XDS_ON_DEMAND",
        "ISTIO_META_DNS_PROXY_ADDR",
    ] {
        let reports = text
            .lines()
            .filter(|line| line.contains(&format!("{variable}=")) && line.contains("not supported"))
            .count();
        assert_eq!(reports, 1, "{variable} reported once:\n{text}");
    }
    for honoured in [
        "NETWORK",
        "INPOD_ENABLED",
        "ZTUNNEL_WORKER_THREADS",
        "RUST_BACKTRACE",
    ] {
        assert!(
            !text.lines().any(
                |line| line.contains(&format!("{honoured}=")) && line.contains("not supported")
            ),
            "{honoured} is honoured, not reported:\n{text}"
        );
    }
    if std::env::var("NODETUNNEL_TEST_SHOW_LOG").is_ok() {
        eprintln!("{text}");
    }
    drop(agent);
    drop(topology);
}

#[test]
fn proxy_accepts_only_the_ztunnel_kind() {
    let output = Command::new(binary())
        .args(["proxy", "sidecar"])
        .output()
        .expect("run nodetunnel");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ztunnel"),
        "names the supported kind: {stderr}"
    );
}

#[test]
fn a_bad_worker_count_stops_start_up_naming_the_variable() {
    let output = Command::new(binary())
        .args(["proxy", "ztunnel"])
        .env_clear()
        .env("ZTUNNEL_WORKER_THREADS", "lots")
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .output()
        .expect("run nodetunnel");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ZTUNNEL_WORKER_THREADS"), "{stderr}");
}
