use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{parse, Overrides};

const MODEL: &str = r#"
workloads:
  - {name: server, namespace: default, serviceAccount: server, workloadIps: [10.0.0.2], protocol: HBONE, labels: {app: server}}
  - {name: good, namespace: default, serviceAccount: good, workloadIps: [10.0.0.3], protocol: HBONE}
  - {name: bad, namespace: default, serviceAccount: bad, workloadIps: [10.0.0.4], protocol: HBONE}
"#;

/// A snapshot of `MODEL` plus `extra` top-level YAML (policies, istioResources, agent).
fn snapshot(extra: &str) -> Snapshot {
    let text = format!("{MODEL}{extra}");
    match parse(Path::new("test.yaml"), &text, &Overrides::default()) {
        Ok(config) => config.snapshot(),
        Err(errors) => panic!("test config: {errors}"),
    }
}

fn facts(client: Option<&str>, ip: [u8; 4]) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: client.map(|sa| {
            format!("spiffe://cluster.local/ns/default/sa/{sa}")
                .parse()
                .expect("identity")
        }),
        source_ip: ip.into(),
        destination_ip: [10, 0, 0, 2].into(),
        destination_port: 8080,
    }
}

const ALLOW_GOOD: &str = r#"
istioResources:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-good, namespace: default}
    spec:
      selector: {matchLabels: {app: server}}
      rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/good]}}]}]
"#;

const DENY_GOOD: &str = r#"
istioResources:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-good, namespace: default}
    spec:
      action: DENY
      rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/good]}}]}]
"#;

fn store(extra: &str) -> (StateStore, Arc<Workload>) {
    let snapshot = snapshot(extra);
    let server = snapshot
        .workload("Kubernetes//Pod/default/server")
        .expect("server workload")
        .clone();
    (StateStore::new(snapshot), server)
}

#[test]
fn admit_registers_allowed_and_refuses_denied_with_the_deciding_policy() {
    let (state, server) = store(ALLOW_GOOD);
    let connections = Arc::new(Connections::default());
    let admitted = admit(
        &connections,
        &state,
        &server,
        facts(Some("good"), [10, 0, 0, 3]),
    );
    assert!(admitted.is_ok());
    assert_eq!(connections.len(), 1);
    let denied = admit(
        &connections,
        &state,
        &server,
        facts(Some("bad"), [10, 0, 0, 4]),
    )
    .expect_err("bad is not allowed");
    assert_eq!(
        denied.to_string(),
        "denied: allow policies exist, but none allowed"
    );
    assert_eq!(connections.len(), 1, "a refused connection is unregistered");
    drop(admitted);
    assert_eq!(
        connections.len(),
        0,
        "dropping the registration unregisters"
    );
}

#[test]
fn denial_texts_name_the_policy_or_the_mtls_mode() {
    let strict = r#"
istioResources:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
"#;
    let zero_trust = "agent: {authorization: {defaultDeny: true}}\n";
    let cases = [
        (DENY_GOOD, Some("good"), "denied by policy default/deny-good"),
        (
            strict,
            None,
            "plaintext refused: mTLS mode STRICT (PeerAuthentication istio-system/default, Mesh level)",
        ),
        (zero_trust, Some("good"), "denied: default deny (zero-trust)"),
    ];
    for (extra, client, expected) in cases {
        let (state, server) = store(extra);
        let connections = Arc::new(Connections::default());
        let denied =
            admit(&connections, &state, &server, facts(client, [10, 0, 0, 3])).expect_err(expected);
        assert_eq!(denied.to_string(), expected);
    }
}

#[tokio::test]
async fn a_policy_change_revokes_only_the_connections_it_denies() {
    let (state, server) = store("");
    let state = Arc::new(state);
    let connections = Arc::new(Connections::default());
    let changes = state.subscribe();
    let stop = Drain::new();
    let task = tokio::spawn(run_reevaluation(
        connections.clone(),
        state.clone(),
        server.uid.clone(),
        changes,
        stop.clone(),
    ));
    let good = admit(
        &connections,
        &state,
        &server,
        facts(Some("good"), [10, 0, 0, 3]),
    )
    .expect("no policies: allowed");
    let other = admit(
        &connections,
        &state,
        &server,
        facts(Some("bad"), [10, 0, 0, 4]),
    )
    .expect("no policies: allowed");

    state.replace(snapshot(DENY_GOOD));
    let revoked = tokio::time::timeout(Duration::from_secs(5), good.revoked())
        .await
        .expect("revoked promptly");
    assert_eq!(
        revoked.to_string(),
        "policy changed: denied by policy default/deny-good"
    );
    let untouched = tokio::time::timeout(Duration::from_millis(100), other.revoked()).await;
    assert!(untouched.is_err(), "an allowed connection is not touched");

    stop.terminate().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[test]
fn reevaluation_skips_connections_already_revoked() {
    let (state, server) = store("");
    let connections = Arc::new(Connections::default());
    let _good = admit(
        &connections,
        &state,
        &server,
        facts(Some("good"), [10, 0, 0, 3]),
    )
    .expect("allowed");
    let deny = snapshot(DENY_GOOD);
    assert_eq!(connections.reevaluate(&deny, &server), 1);
    assert_eq!(connections.reevaluate(&deny, &server), 0, "closed once");
}

/// The decision counter's value for the series whose labels contain every `labels` pair.
fn decisions(metrics: &crate::telemetry::Metrics, labels: &[(&str, &str)]) -> Option<u64> {
    let text = metrics.encode(&Default::default(), false);
    let matching: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("nodetunnel_authorization_decisions_total{"))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .collect();
    assert!(matching.len() <= 1, "several series match: {matching:#?}");
    matching.first()?.rsplit(' ').next()?.parse().ok()
}

#[test]
fn first_decisions_and_revocations_are_counted_by_policy_and_phase() {
    let strict = r#"
istioResources:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
"#;
    let (state, server) = store(ALLOW_GOOD);
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let connections = Arc::new(Connections::new(metrics.clone()));
    let good = admit(
        &connections,
        &state,
        &server,
        facts(Some("good"), [10, 0, 0, 3]),
    );
    let _second = admit(
        &connections,
        &state,
        &server,
        facts(Some("good"), [10, 0, 0, 3]),
    );
    let bad = admit(
        &connections,
        &state,
        &server,
        facts(Some("bad"), [10, 0, 0, 4]),
    );
    assert!(good.is_ok() && bad.is_err());
    let server_labels = [
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
    ];
    let with = |pairs: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        pairs.iter().chain(&server_labels).copied().collect()
    };
    let allowed = with(&[
        ("action", "allow"),
        ("policy", "default/allow-good"),
        ("reason", "allowed_by"),
        ("phase", "connect"),
    ]);
    let refused = with(&[
        ("action", "deny"),
        ("policy", "none"),
        ("reason", "no_allow_matched"),
        ("phase", "connect"),
    ]);
    assert_eq!(decisions(&metrics, &allowed), Some(2));
    assert_eq!(decisions(&metrics, &refused), Some(1));

    // STRICT lands: the open mTLS connections stay (not counted again); a plaintext one is
    // refused by the converted policy, named as istiod names it.
    assert_eq!(connections.reevaluate(&snapshot(strict), &server), 0);
    assert_eq!(decisions(&metrics, &allowed), Some(2));
    let (strict_state, _) = store(strict);
    admit(
        &connections,
        &strict_state,
        &server,
        facts(None, [10, 0, 0, 9]),
    )
    .expect_err("STRICT");
    let strict_denial = with(&[
        ("action", "deny"),
        ("policy", "istio-system/istio_converted_static_strict"),
        ("reason", "denied_by"),
        ("phase", "connect"),
    ]);
    assert_eq!(decisions(&metrics, &strict_denial), Some(1));

    // A deny policy closes both open connections: two re-evaluation denials.
    assert_eq!(connections.reevaluate(&snapshot(DENY_GOOD), &server), 2);
    let revoked = with(&[
        ("action", "deny"),
        ("policy", "default/deny-good"),
        ("reason", "denied_by"),
        ("phase", "reevaluation"),
    ]);
    assert_eq!(decisions(&metrics, &revoked), Some(2));
}

#[test]
fn the_table_gives_its_memory_back_after_a_burst_of_connections() {
    let (state, server) = store(ALLOW_GOOD);
    let connections = Arc::new(Connections::default());
    let burst: Vec<Registration> = (0..2000)
        .map(|_| {
            admit(
                &connections,
                &state,
                &server,
                facts(Some("good"), [10, 0, 0, 3]),
            )
            .expect("allowed")
        })
        .collect();
    let peak = connections.lock().capacity();
    assert!(peak >= 2000);
    let mut burst = burst.into_iter();
    let kept: Vec<Registration> = burst.by_ref().take(10).collect();
    drop(burst);
    assert_eq!(connections.len(), 10, "the rest stay registered");
    let after = connections.lock().capacity();
    assert!(
        after <= MIN_CAPACITY * 2,
        "10 open connections keep a table of {after} (peak {peak})"
    );
    drop(kept);
    assert_eq!(connections.len(), 0);
}
