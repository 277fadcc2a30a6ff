//! Label building, live byte flushing, opened/closed/failed accounting and stale-series eviction.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::spiffe::Identity;
use crate::state::{HealthStatus, Service, TunnelProtocol, Workload};
use std::time::UNIX_EPOCH;

fn workload(namespace: &str, name: &str, owner: &str) -> Workload {
    Workload {
        uid: format!("cluster//Pod/{namespace}/{name}"),
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        trust_domain: "cluster.local".to_string(),
        identity: Identity::new("cluster.local", namespace, name).expect("valid identity"),
        workload_ips: vec![IpAddr::from([10, 0, 0, 1])],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".to_string(),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        application_tunnel: None,
        services: BTreeMap::new(),
        labels: BTreeMap::new(),
        canonical_name: format!("{name}-app"),
        canonical_revision: "v1".to_string(),
        workload_name: owner.to_string(),
        workload_type: "deployment".to_string(),
        cluster_id: "Kubernetes".to_string(),
        authorization_policies: Vec::new(),
        status: HealthStatus::Healthy,
    }
}

fn service() -> Service {
    Service {
        name: "echo".to_string(),
        namespace: "default".to_string(),
        hostname: "echo.default.svc.cluster.local".to_string(),
        vips: Vec::new(),
        ports: BTreeMap::new(),
        subject_alt_names: Vec::new(),
        waypoint: None,
    }
}

#[test]
fn labels_follow_istio_naming_and_render_unknowns() {
    let client = workload("team", "client-7f9", "client");
    let server = workload("default", "server-abc", "");
    let echo = service();
    struct Case {
        name: &'static str,
        labels: TrafficLabels,
        expect: &'static [(&'static str, &'static str)],
    }
    let cases = [
        Case {
            name: "mTLS outbound with service",
            labels: TrafficLabels::build(
                Reporter::Source,
                Peer {
                    workload: Some(&client),
                    identity: Some(&client.identity),
                },
                Peer {
                    workload: Some(&server),
                    identity: Some(&server.identity),
                },
                Some(&echo),
                ResponseFlag::None,
            ),
            expect: &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("source_canonical_service", "client-7f9-app"),
                ("source_app", "client-7f9-app"),
                ("source_version", "v1"),
                ("source_workload_namespace", "team"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/team/sa/client-7f9",
                ),
                ("source_cluster", "Kubernetes"),
                // No owner name: the pod name stands in.
                ("destination_workload", "server-abc"),
                ("destination_service", "echo.default.svc.cluster.local"),
                ("destination_service_name", "echo"),
                ("destination_service_namespace", "default"),
                ("request_protocol", "tcp"),
                ("response_flags", "-"),
                ("connection_security_policy", "mutual_tls"),
            ],
        },
        Case {
            name: "plaintext inbound from an unknown client, denied",
            labels: TrafficLabels::build(
                Reporter::Destination,
                Peer::default(),
                Peer {
                    workload: Some(&server),
                    identity: None,
                },
                None,
                ResponseFlag::Deny,
            ),
            expect: &[
                ("reporter", "destination"),
                ("source_workload", "unknown"),
                ("source_workload_namespace", "unknown"),
                ("source_principal", "unknown"),
                ("source_cluster", "unknown"),
                ("destination_principal", "unknown"),
                ("destination_service", "unknown"),
                ("destination_workload_namespace", "default"),
                ("response_flags", "DENY"),
                ("connection_security_policy", "unknown"),
            ],
        },
    ];
    for case in cases {
        let mut text = String::new();
        let family = Family::<TrafficLabels, Counter>::default();
        family.get_or_create(&case.labels).inc();
        let mut registry = Registry::default();
        registry.register("probe", "probe", family);
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for (key, value) in case.expect {
            assert!(
                text.contains(&format!("{key}=\"{value}\"")),
                "{}: want {key}={value:?} in {text}",
                case.name
            );
        }
    }
}

fn sample_value(text: &str, metric: &str, must_contain: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(metric) && line.contains(must_contain))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

fn info(source: &Workload) -> Arc<ConnectionFields> {
    Arc::new(ConnectionFields {
        direction: Direction::Outbound,
        started: Instant::now(),
        trace: None,
        src_addr: "10.0.0.1:40000".into(),
        src_workload: Some(Arc::new(source.clone())),
        src_identity: None,
        dst_addr: "10.0.0.2:8080".into(),
        original_dst: "10.0.0.2:8080".into(),
        dst_hbone_addr: None,
        dst_workload: None,
        dst_service: None,
        dst_identity: None,
    })
}

/// The source agent's labels for a connection from `source` to nothing known, without mTLS.
fn outbound_labels(source: &Workload) -> TrafficLabels {
    TrafficLabels::build(
        Reporter::Source,
        Peer {
            workload: Some(source),
            identity: None,
        },
        Peer::default(),
        None,
        ResponseFlag::None,
    )
}

#[test]
fn bytes_are_reported_while_open_and_exactly_once_after_close() {
    let metrics = Metrics::new();
    let client = workload("team", "client", "client");
    let labels = outbound_labels(&client);
    let bytes = Arc::new(ByteCounters::default());
    let live = metrics.open(labels.clone(), info(&client), bytes.clone());
    bytes.sent.fetch_add(100, Ordering::Relaxed);
    bytes.received.fetch_add(7, Ordering::Relaxed);
    let open = metrics.connections();
    assert_eq!((open.len(), open[0].bytes_sent), (1, 100));
    let text = metrics.encode(&AgentSample::default(), false);
    assert_eq!(
        sample_value(
            &text,
            "istio_tcp_received_bytes_total",
            "source_workload=\"client\""
        ),
        Some(100)
    );
    assert_eq!(
        sample_value(
            &text,
            "istio_tcp_sent_bytes_total",
            "source_workload=\"client\""
        ),
        Some(7)
    );
    assert_eq!(
        sample_value(&text, "istio_tcp_connections_opened_total", "client"),
        Some(1)
    );
    assert_eq!(
        sample_value(&text, "istio_tcp_connections_closed_total", "client"),
        None
    );
    assert!(
        !text.contains("# EOF"),
        "Prometheus text has no EOF trailer"
    );

    bytes.sent.fetch_add(50, Ordering::Relaxed);
    let mut failed = labels.clone();
    failed.response_flags = ResponseFlag::Connect.as_str().to_string();
    metrics.close(live, ResponseFlag::Connect, || failed);
    let text = metrics.encode(&AgentSample::default(), true);
    assert_eq!(
        sample_value(&text, "istio_tcp_received_bytes_total", "client"),
        Some(150)
    );
    assert_eq!(
        sample_value(
            &text,
            "istio_tcp_connections_closed_total",
            "response_flags=\"CONNECT\""
        ),
        Some(1)
    );
    assert_eq!(
        sample_value(
            &text,
            "istio_tcp_connections_failed_total",
            "response_flags=\"CONNECT\""
        ),
        Some(1)
    );
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
}

#[test]
fn series_of_removed_workloads_are_evicted_and_others_stay() {
    let metrics = Metrics::new();
    let gone = workload("team", "gone", "gone");
    let stays = workload("team", "stays", "stays");
    for source in [&gone, &stays] {
        let labels = outbound_labels(source);
        let live = metrics.open(
            labels.clone(),
            info(source),
            Arc::new(ByteCounters::default()),
        );
        metrics.close(live, ResponseFlag::None, || {
            unreachable!("the flag did not change")
        });
    }
    let removed = metrics.retain_workloads(|uid| uid == stays.uid);
    assert_eq!(removed, 1);
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(!text.contains("source_workload=\"gone\""), "{text}");
    assert!(text.contains("source_workload=\"stays\""), "{text}");
    assert_eq!(metrics.retain_workloads(|uid| uid == stays.uid), 0);
}

#[test]
fn agent_sample_sets_gauges_and_replaces_certificates() {
    let metrics = Metrics::new();
    let identity = Identity::new("cluster.local", "team", "client").expect("identity");
    let sample = AgentSample {
        active_proxies: 2,
        pending_proxies: 1,
        certificates: vec![(identity, UNIX_EPOCH + std::time::Duration::from_secs(1_000))],
        dropped_log_lines: 3,
        runtime: None,
        memory_budget: Some(MemoryBudgetSample {
            limit: 256,
            reserved: 128,
            reduced_connections: 4,
        }),
    };
    let text = metrics.encode(&sample, false);
    for line in [
        "nodetunnel_memory_budget_limit_bytes 256",
        "nodetunnel_memory_budget_reserved_bytes 128",
        "nodetunnel_memory_budget_reduced_connections_total 4",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    assert!(
        text.contains("workload_manager_active_proxy_count 2"),
        "{text}"
    );
    assert!(
        text.contains("workload_manager_pending_proxy_count 1"),
        "{text}"
    );
    assert!(
        text.contains("nodetunnel_log_dropped_lines_total 3"),
        "{text}"
    );
    assert!(text.contains("istio_build{component=\"ztunnel\""), "{text}");
    assert_eq!(
        sample_value(
            &text,
            "nodetunnel_certificate_expiration_timestamp_seconds",
            "sa/client"
        ),
        Some(1_000)
    );
    assert!(sample_value(&text, "process_open_fds", "").is_some_and(|fds| fds > 0));
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(
        !text.contains("sa/client"),
        "expired identities leave: {text}"
    );
}

/// The exact sample line `line` (name, labels in order, value) is in `text`.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|candidate| candidate == line)
}

#[test]
fn decisions_are_counted_by_policy_and_evicted_with_their_policy_or_workload() {
    let metrics = Metrics::new();
    let server = workload("default", "server-abc", "server");
    let other = workload("default", "other", "");
    let decision = |action, policy, reason, phase, workload: &Workload| {
        metrics.authorization_decision(
            DecisionLabels::new(action, policy, reason, phase, workload),
            &workload.uid,
        );
    };
    use DecisionAction::{Allow, Deny};
    use DecisionPhase::{Connect, Reevaluation};
    for _ in 0..2 {
        decision(
            Allow,
            Some("default/allow-good"),
            "allowed_by",
            Connect,
            &server,
        );
    }
    decision(
        Deny,
        Some("default/deny-bad"),
        "denied_by",
        Reevaluation,
        &server,
    );
    decision(Deny, None, "default_deny", Connect, &other);
    let name = "nodetunnel_authorization_decisions_total";
    let allowed = format!(
        "{name}{{action=\"allow\",policy=\"default/allow-good\",reason=\"allowed_by\",phase=\"connect\",destination_workload=\"server\",destination_workload_namespace=\"default\"}} 2"
    );
    let revoked = format!(
        "{name}{{action=\"deny\",policy=\"default/deny-bad\",reason=\"denied_by\",phase=\"reevaluation\",destination_workload=\"server\",destination_workload_namespace=\"default\"}} 1"
    );
    let default_deny = format!(
        "{name}{{action=\"deny\",policy=\"none\",reason=\"default_deny\",phase=\"connect\",destination_workload=\"other\",destination_workload_namespace=\"default\"}} 1"
    );
    let text = metrics.encode(&AgentSample::default(), false);
    for line in [&allowed, &revoked, &default_deny] {
        assert!(has_line(&text, line), "want {line} in {text}");
    }

    // The deny policy left the model; decisions without a policy are never policy-stale.
    assert_eq!(
        metrics.retain_policies(|key| key == "default/allow-good"),
        1
    );
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(!text.contains("default/deny-bad"), "{text}");
    assert!(
        has_line(&text, &allowed) && has_line(&text, &default_deny),
        "{text}"
    );

    // The other workload left the model.
    assert_eq!(metrics.retain_workloads(|uid| uid == server.uid), 1);
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(!text.contains("destination_workload=\"other\""), "{text}");
    assert!(has_line(&text, &allowed), "{text}");
}

#[test]
fn proxy_lifecycle_and_certificate_failures_are_counted() {
    let metrics = Metrics::new();
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(
        has_line(&text, "workload_manager_proxies_started_total 0"),
        "{text}"
    );
    metrics.proxy_started();
    metrics.proxy_started();
    metrics.proxy_stopped();
    metrics.certificate_fetch_failed("source_error");
    metrics.certificate_fetch_failed("source_error");
    metrics.certificate_fetch_failed("identity_mismatch");
    let text = metrics.encode(&AgentSample::default(), false);
    for line in [
        "workload_manager_proxies_started_total 2",
        "workload_manager_proxies_stopped_total 1",
        "nodetunnel_certificate_fetch_failures_total{reason=\"source_error\"} 2",
        "nodetunnel_certificate_fetch_failures_total{reason=\"identity_mismatch\"} 1",
    ] {
        assert!(has_line(&text, line), "want {line} in {text}");
    }
}

#[test]
fn runtime_worker_counters_follow_tokio_totals() {
    let metrics = Metrics::new();
    let runtime = |busy_ms: u64, parks: u64| RuntimeSample {
        workers: 1,
        alive_tasks: 5,
        global_queue_depth: 2,
        per_worker: vec![WorkerSample {
            busy: std::time::Duration::from_millis(busy_ms),
            parks,
            park_unparks: parks * 2,
        }],
    };
    let sample = |runtime| AgentSample {
        runtime: Some(runtime),
        ..AgentSample::default()
    };
    metrics.encode(&sample(runtime(1500, 4)), false);
    let text = metrics.encode(&sample(runtime(2500, 6)), false);
    for line in [
        "tokio_num_workers 1",
        "tokio_num_alive_tasks 5",
        "tokio_global_queue_depth 2",
        "tokio_worker_total_busy_duration_seconds_total{worker=\"0\"} 2.5",
        "tokio_worker_park_count_total{worker=\"0\"} 6",
        "tokio_worker_park_unpark_count_total{worker=\"0\"} 12",
    ] {
        assert!(has_line(&text, line), "want {line} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn runtime_sample_reads_the_live_runtime() {
    let (release, wait) = tokio::sync::watch::channel(false);
    let parked: Vec<_> = (0..2)
        .map(|_| {
            let mut wait = wait.clone();
            tokio::spawn(async move { while wait.changed().await.is_ok() && !*wait.borrow() {} })
        })
        .collect();
    let sample = RuntimeSample::of(&tokio::runtime::Handle::current());
    assert_eq!(sample.workers, 3);
    assert_eq!(sample.per_worker.len(), 3);
    assert_eq!(sample.alive_tasks, 2, "the two waiting tasks");
    release.send(true).expect("tasks waiting");
    for task in parked {
        task.await.expect("task");
    }
}

#[tokio::test]
async fn data_plane_shards_read_as_one_runtime_with_a_worker_each() {
    let shards = crate::shard::Shards::start(2).expect("shards");
    let (release, wait) = tokio::sync::oneshot::channel::<()>();
    let waiting = shards.handles()[1].spawn(async move {
        let _ = wait.await;
    });
    let sample = RuntimeSample::of_all(shards.handles());
    assert_eq!(sample.workers, 2);
    assert_eq!(sample.per_worker.len(), 2);
    assert_eq!(sample.alive_tasks, 1, "the waiting task, on one of them");
    release.send(()).expect("task waiting");
    waiting.await.expect("task");
}

#[test]
fn connections_of_one_series_share_its_labels_and_the_series_table_follows_them() {
    let metrics = Metrics::new();
    let client = workload("team", "client", "client");
    let labels = || outbound_labels(&client);
    let first = metrics.open(labels(), info(&client), Arc::new(ByteCounters::default()));
    let second = metrics.open(labels(), info(&client), Arc::new(ByteCounters::default()));
    {
        let live = lock(&metrics.live);
        let [a, b] = [&live[&first.0].labels, &live[&second.0].labels];
        assert!(Arc::ptr_eq(&a.labels, &b.labels), "built twice, kept once");
    }
    assert_eq!(lock(&metrics.series).len(), 1);
    let different = Series::new(TrafficLabels {
        source_workload: "other".to_string(),
        ..labels()
    });
    assert_ne!(Series::new(labels()), different);

    // Evicted while both connections are open: closing them records the series again, so it
    // can be evicted once more when its workload leaves for good.
    assert_eq!(metrics.retain_workloads(|_| false), 1);
    assert!(lock(&metrics.series).is_empty());
    metrics.close(first, ResponseFlag::None, || unreachable!("same flag"));
    metrics.close(second, ResponseFlag::None, || unreachable!("same flag"));
    let text = metrics.encode(&AgentSample::default(), false);
    assert_eq!(
        sample_value(&text, "istio_tcp_connections_closed_total", "client"),
        Some(2)
    );
    assert_eq!(metrics.retain_workloads(|_| false), 1);
    let text = metrics.encode(&AgentSample::default(), false);
    assert!(!text.contains("source_workload=\"client\""), "{text}");
}
