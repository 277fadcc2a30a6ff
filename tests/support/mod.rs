//! Test support for nodetunnel's integration tests: network-namespace topologies, in-netns apps,
//! agent processes, their JSON logs and packet captures of the node-to-node link.
//!
//! Everything a test creates here is named uniquely per process and per topology
//! (`nt<pid-hex><counter>-<role>`) and is removed by `Drop` guards, also when the test panics.
//! Traffic only ever goes to loopback or to addresses inside namespaces the test made itself.
//!
//! Each integration test file compiles this module on its own and uses a different subset of it.
#![allow(dead_code)]

/// Starts a network-namespace test: returns early (skipped, said loudly) only when the user
/// opted out outside CI; otherwise fails without root. See [`netns_tests_enabled`].
/// (Files without namespace tests compile this module too.)
#[allow(unused_macros)]
macro_rules! require_netns {
    ($name:literal) => {
        if !support::netns_tests_enabled($name) {
            return;
        }
    };
}

pub mod agent;
pub mod apps;
pub mod capture;
pub mod cluster;
pub mod dns_server;
pub mod fake_cni;
pub mod fake_istiod;
pub mod h2_raw;
pub mod logs;
pub mod netns;
pub mod tls_probe;
pub mod waypoint;

use std::time::{Duration, Instant};

/// Env var that lets a non-root developer skip the namespace tests explicitly.
pub const SKIP_ENV: &str = "NODETUNNEL_SKIP_NETNS_TESTS";

/// Decides whether a network-namespace test runs.
///
/// Returns `false` (after printing that the test is skipped) only when the user opted out with
/// `NODETUNNEL_SKIP_NETNS_TESTS=1` outside CI. Otherwise a missing privilege or tool is a test
/// failure, never a silent pass: under `CI=true` the tests always run.
pub fn netns_tests_enabled(test: &str) -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var(SKIP_ENV).is_ok_and(|value| value == "1");
    if opted_out && !in_ci {
        eprintln!("SKIPPED {test}: {SKIP_ENV}=1 is set (network-namespace tests need root)");
        return false;
    }
    assert!(
        effective_uid() == Some(0),
        "\n\n*** {test} needs root: it creates network namespaces, veth pairs and nftables rules.\n\
         *** Run the suite as root (sudo -E cargo test), or set {SKIP_ENV}=1 to skip these tests\n\
         *** (never honoured under CI=true).\n"
    );
    for tool in ["ip", "nft", "tcpdump", "ss"] {
        assert!(
            which(tool),
            "{test} needs `{tool}`: run scripts/test.sh (it installs nftables, tcpdump, iproute2)"
        );
    }
    true
}

/// The effective uid, from `/proc/self/status` (nix's `user` feature is not enabled here).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `tool` is an executable on `PATH`.
pub fn which(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// A name prefix unique to this process and call: `nt<pid-hex>n<counter-hex>`.
///
/// The `n` separates the pid, so `scripts/test.sh` can find namespaces of a test process that
/// was killed before its `Drop` guards ran and delete them when that pid is gone.
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("nt{:x}n{:x}", std::process::id(), counter)
}

/// Polls `condition` every 50 ms until it returns `Some`, or fails after `timeout`.
///
/// Every wait in the tests goes through here (or a socket timeout), so none can hang.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
