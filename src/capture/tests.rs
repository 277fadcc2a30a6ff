//! The pod manager starts and stops pods independently: one pod's slow start holds up nothing
//! but itself. Needs root (it makes two network namespaces), like the netns integration tests.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

use super::*;
use crate::config::agent::{PoolConfig, ProxyConfig};
use crate::identity::ca::BuiltinCa;
use crate::identity::CertificateManager;
use crate::proxy::ProxySettings;
use crate::state::{Snapshot, StateStore};

/// Only a guard against hanging the suite if the pods were serialized again; never reached
/// when they are not.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Whether this test may run: as the netns integration tests decide (`tests/support`), root is
/// required unless a non-CI user opted out with `NODETUNNEL_SKIP_NETNS_TESTS=1`.
fn netns_tests_enabled(test: &str) -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var("NODETUNNEL_SKIP_NETNS_TESTS").is_ok_and(|value| value == "1");
    if opted_out && !in_ci {
        eprintln!("SKIPPED {test}: NODETUNNEL_SKIP_NETNS_TESTS=1 is set (it needs root)");
        return false;
    }
    true
}

/// A new, empty network namespace, alive as long as the returned handle.
fn fresh_netns(name: &str) -> Netns {
    let name = name.to_string();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare a network namespace (needs root)");
        let file = std::fs::File::open("/proc/thread-self/ns/net").expect("open the namespace");
        Netns::from_file(file, PathBuf::from(format!("test:{name}"))).expect("namespace id")
    })
    .join()
    .expect("namespace thread")
}

fn manager() -> PodManager {
    manager_on(crate::shard::Shards::inline())
}

fn manager_on(shards: Arc<crate::shard::Shards>) -> PodManager {
    let (root, key) = BuiltinCa::generate_root("test root").expect("root");
    let ca = BuiltinCa::from_pem(&root, &key, Duration::from_secs(3600)).expect("CA");
    let inputs = ProxyInputs {
        state: Arc::new(StateStore::new(Snapshot::default())),
        certificates: Arc::new(CertificateManager::new(Arc::new(ca))),
        settings: Arc::new(ProxySettings {
            proxy: ProxyConfig::default(),
            pool: PoolConfig::default(),
        }),
        metrics: Arc::new(Metrics::new()),
        sources: crate::proxy::limits::SourceLimits::new(u32::MAX),
        memory: crate::proxy::budget::MemoryBudget::unlimited(),
        shards,
    };
    let home = Arc::new(Netns::current().expect("own namespace"));
    PodManager::new(inputs, home, 0x539, None, Drain::new())
}

fn is_running(manager: &PodManager, uid: &str) -> bool {
    matches!(manager.status().get(uid), Some(PodStatus::Running { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pod_start_delays_no_other_pod() {
    if !netns_tests_enabled("a_slow_pod_start_delays_no_other_pod") {
        return;
    }
    let (entered, mut slow_entered) = mpsc::unbounded_channel::<()>();
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(AsyncMutex::new(Some(released)));
    let mut manager = manager();
    manager.start_hook = Some(Arc::new(move |uid: &str| {
        let slow = uid == "slow";
        let entered = entered.clone();
        let released = released.clone();
        Box::pin(async move {
            if !slow {
                return;
            }
            let _ = entered.send(());
            if let Some(released) = released.lock().await.take() {
                let _ = released.await;
            }
        })
    }));
    let manager = Arc::new(manager);
    let slow = tokio::spawn({
        let manager = manager.clone();
        let netns = fresh_netns("slow");
        async move { manager.add("slow", netns).await }
    });
    slow_entered
        .recv()
        .await
        .expect("the slow pod's start began");

    // The slow pod is mid-start, holding its own lock: another pod comes and goes regardless.
    let added = tokio::time::timeout(HANG_GUARD, manager.add("fast", fresh_netns("fast")))
        .await
        .expect("another pod's add waited for the slow pod's start");
    assert_eq!(added.expect("fast pod starts"), AddOutcome::Started);
    assert!(is_running(&manager, "fast"));
    assert!(
        !manager.status().contains_key("slow"),
        "slow pod is still starting"
    );
    assert_eq!(
        manager
            .pooled_connections()
            .await
            .keys()
            .collect::<Vec<_>>(),
        vec!["fast"]
    );
    let removed = tokio::time::timeout(HANG_GUARD, manager.remove("fast"))
        .await
        .expect("another pod's remove waited for the slow pod's start");
    assert!(removed);

    release.send(()).expect("the slow start still waits");
    let outcome = slow.await.expect("slow add task");
    assert_eq!(outcome.expect("slow pod starts"), AddOutcome::Started);
    assert!(is_running(&manager, "slow"));
    manager.remove_all().await;
    assert!(manager.pooled_connections().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_during_a_start_stops_the_started_pod() {
    if !netns_tests_enabled("a_remove_during_a_start_stops_the_started_pod") {
        return;
    }
    let (entered, mut slow_entered) = mpsc::unbounded_channel::<()>();
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(AsyncMutex::new(Some(released)));
    let mut manager = manager();
    manager.start_hook = Some(Arc::new(move |_: &str| {
        let entered = entered.clone();
        let released = released.clone();
        Box::pin(async move {
            if let Some(released) = released.lock().await.take() {
                let _ = entered.send(());
                let _ = released.await;
            }
        })
    }));
    let manager = Arc::new(manager);
    let start = tokio::spawn({
        let manager = manager.clone();
        let netns = fresh_netns("pod");
        async move { manager.add("pod", netns).await }
    });
    slow_entered.recv().await.expect("the start began");
    let remove = tokio::spawn({
        let manager = manager.clone();
        async move { manager.remove("pod").await }
    });
    release.send(()).expect("the start still waits");
    assert_eq!(
        start.await.expect("add task").expect("pod starts"),
        AddOutcome::Started
    );
    // The remove ran after the start it waited for, so it found the pod running.
    assert!(remove.await.expect("remove task"), "remove saw the pod");
    assert!(manager.status().is_empty());
    assert!(manager.pooled_connections().await.is_empty());
}

/// Two agents' listeners on one pod port (one owner, so one `SO_REUSEPORT` group), as in a
/// hand-over: when the old agent closes its listener, the connections the kernel had already
/// queued on it (the client's handshake done, not yet accepted) go to the new agent's listener
/// instead of being reset. Without `tcp_migrate_req` about half of them would be reset.
#[tokio::test(flavor = "current_thread")]
async fn a_closing_listener_hands_its_queued_connections_to_the_other_agent() {
    const CLIENTS: usize = 64;
    if !netns_tests_enabled("a_closing_listener_hands_its_queued_connections_to_the_other_agent") {
        return;
    }
    let pod = Arc::new(fresh_netns("migration"));
    let migration = pod
        .run_on_thread(|| {
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|status| status.success()), "ip link set lo up");
            crate::sys::enable_listener_migration()
        })
        .expect("thread in the pod");
    if let Err(error) = migration {
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
        eprintln!("SKIPPED: the kernel has no net.ipv4.tcp_migrate_req (before 5.14)");
        return;
    }
    let home = Arc::new(Netns::current().expect("own namespace"));
    let sockets = SocketFactory::pod(pod.clone(), home, 0x539);
    let port: std::net::SocketAddr = "127.0.0.1:15008".parse().expect("address");
    let old = sockets
        .listen(port, false, crate::socket::Leg::Network)
        .expect("the old agent's listener");
    let new = sockets
        .listen(port, false, crate::socket::Leg::Network)
        .expect("the new agent's listener beside it");
    let clients = pod
        .run_on_thread(|| {
            (0..CLIENTS)
                .map(|index| {
                    let mut client = std::net::TcpStream::connect(port).expect("connect");
                    std::io::Write::write_all(&mut client, &[index as u8]).expect("write");
                    client
                })
                .collect::<Vec<_>>()
        })
        .expect("thread in the pod");
    drop(old);
    let mut seen = Vec::new();
    while seen.len() < CLIENTS {
        let accepted = tokio::time::timeout(HANG_GUARD, new.accept()).await;
        let (mut stream, _) = accepted
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {CLIENTS} connections reached the new listener",
                    seen.len()
                )
            })
            .expect("accept");
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte)
            .await
            .expect("the client's byte on a migrated connection");
        seen.push(byte[0]);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..CLIENTS as u8).collect::<Vec<_>>());
    drop(clients);
}

/// Listening TCP sockets on `port` in the calling thread's network namespace.
fn listening_on(port: u16) -> usize {
    const LISTEN: &str = "0A";
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/thread-self/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields
                        .get(1)
                        .and_then(|local| local.rsplit(':').next())
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    local_port == Some(port) && fields.get(3) == Some(&LISTEN)
                })
                .map(|_| ())
                .collect::<Vec<_>>()
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_accepts_on_its_own_copy_of_the_pod_listeners() {
    const CONNECTIONS: usize = 32;
    if !netns_tests_enabled("each_shard_accepts_on_its_own_copy_of_the_pod_listeners") {
        return;
    }
    let shards = crate::shard::Shards::start(2).expect("shards");
    let manager = manager_on(shards.clone());
    let metrics = manager.inputs.metrics.clone();
    let pod = fresh_netns("copies");
    pod.run_on_thread(|| {
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|status| status.success()), "ip link set lo up");
    })
    .expect("thread in the pod");
    let handle = pod
        .run_on_thread(Netns::current)
        .expect("thread in the pod")
        .expect("a second handle on the pod's namespace");
    let added = manager.add("pod", handle);
    assert_eq!(added.await.expect("pod starts"), AddOutcome::Started);

    let counts = pod
        .run_on_thread(|| [15001, 15006, 15008].map(listening_on))
        .expect("thread in the pod");
    assert_eq!(
        counts,
        [2, 2, 2],
        "one listener per shard on 15001, 15006, 15008"
    );
    for (index, shard) in shards.handles().iter().enumerate() {
        let alive = shard.metrics().num_alive_tasks();
        assert!(
            alive >= 3,
            "shard {index} runs {alive} tasks, not its three accept loops"
        );
    }

    // Connections to 15006 itself are refused after accept (it is one of the agent's ports):
    // the kernel spreads them over both copies, and every one is accepted and closed.
    let closed = pod
        .run_on_thread(|| {
            (0..CONNECTIONS)
                .filter(|_| {
                    let mut client =
                        std::net::TcpStream::connect("127.0.0.1:15006").expect("connect");
                    client.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
                    let mut byte = [0u8; 1];
                    matches!(std::io::Read::read(&mut client, &mut byte), Ok(0) | Err(_))
                })
                .count()
        })
        .expect("thread in the pod");
    assert_eq!(closed, CONNECTIONS);
    // A connection is counted when its record drops, just after its socket closed: the client
    // can see the close first, so the count is read until it settles (bounded by HANG_GUARD).
    let failed_count = || {
        let text = metrics.encode(&Default::default(), false);
        let failed: u64 = text
            .lines()
            .filter(|line| line.starts_with("istio_tcp_connections_failed_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        (failed, text)
    };
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let (mut failed, mut text) = failed_count();
    while failed < CONNECTIONS as u64 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        (failed, text) = failed_count();
    }
    assert_eq!(failed, CONNECTIONS as u64, "{text}");
    manager.remove("pod").await;
}
