//! `nodetunnel explain --config FILE --from X --to Y` as a user meets it: the decision, the
//! policies considered and the deciding one on stdout; exit 0 allow, 1 deny, 64 for a config
//! error or a source/destination that cannot be resolved. Policies come from the file's
//! `istioResources` and from a policy directory, in Istio's own YAML. No root needed.

mod support;

use std::path::{Path, PathBuf};

use support::agent::run_cli;

const ALLOW: i32 = 0;
const DENY: i32 = 1;
const BAD_INPUT: i32 = 64;

const CONFIG: &str = r#"agent:
  node: node-b
  authorization:
    policyDirs: [policies]
workloads:
  - {name: client, namespace: default, serviceAccount: client, workloadIps: [10.0.0.1], protocol: HBONE}
  - {name: other, namespace: default, serviceAccount: other, workloadIps: [10.0.0.3], protocol: HBONE}
  - {name: legacy, namespace: default, serviceAccount: legacy, workloadIps: [10.0.0.4], protocol: TCP}
  - {name: server, namespace: default, serviceAccount: server, workloadIps: [10.0.0.2], protocol: HBONE, labels: {app: server}}
  - {name: server, namespace: staging, serviceAccount: server, workloadIps: [10.1.0.2], protocol: HBONE}
istioResources:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-client, namespace: default}
    spec:
      selector: {matchLabels: {app: server}}
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
          to: [{operation: {ports: ["8080"]}}]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: audit-everything, namespace: default}
    spec: {action: AUDIT}
"#;

const POLICY_DIR_FILE: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: default}
spec:
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/default/sa/other"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

/// A config file with a `policies/` directory beside it.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(config: &str) -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.yaml"), config).expect("config");
        std::fs::create_dir(dir.path().join("policies")).expect("policy dir");
        std::fs::write(
            dir.path().join("policies/10-policies.yaml"),
            POLICY_DIR_FILE,
        )
        .expect("policy file");
        Files { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }
}

struct Answer {
    code: i32,
    stdout: String,
    stderr: String,
}

fn explain(config: &Path, from: &str, to: &str, extra: &[&str]) -> Answer {
    let config = config.to_string_lossy().to_string();
    let mut args = vec!["explain", "--config", &config, "--from", from, "--to", to];
    args.extend_from_slice(extra);
    let output = run_cli(&args).expect("nodetunnel explain");
    Answer {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
    }
}

#[test]
fn explain_answers_with_the_deciding_policy_and_exit_code() {
    let files = Files::new(CONFIG);
    // (from, to, exit code, lines stdout must contain)
    let cases: &[(&str, &str, i32, &[&str])] = &[
        (
            "client",
            "default/server:8080",
            ALLOW,
            &[
                "decision: ALLOW (allowed by: default/allow-client (rules[0]))",
                "[ALLOW] default/allow-client (WorkloadSelector): matched rules[0]",
                "decided by: default/allow-client rules[0]",
            ],
        ),
        (
            "spiffe://cluster.local/ns/default/sa/client",
            "10.0.0.2:8080",
            ALLOW,
            &["from: spiffe://cluster.local/ns/default/sa/client (spiffe://cluster.local/ns/default/sa/client, 10.0.0.1)"],
        ),
        (
            "client",
            "default/server:9090",
            DENY,
            &[
                "decision: DENY (allow policies exist, but none allowed)",
                "default/allow-client (WorkloadSelector): not matched",
            ],
        ),
        (
            "default/other",
            "default/server:8080",
            DENY,
            &[
                "decision: DENY (explicitly denied by: default/deny-other (rules[0]))",
                "decided by: default/deny-other rules[0]",
                "[ALLOW] default/allow-client (WorkloadSelector): not evaluated (already decided)",
            ],
        ),
        (
            "10.0.0.4",
            "default/server:8080",
            DENY,
            &[
                "from: default/legacy (no identity (plaintext), 10.0.0.4)",
                "mTLS mode: STRICT (PeerAuthentication istio-system/default, Mesh level)",
                "decided by: istio-system/istio_converted_static_strict rules[0]",
            ],
        ),
        (
            "client",
            "staging/server:8080",
            ALLOW,
            &["decision: ALLOW (no allow policies)"],
        ),
    ];
    for (from, to, code, expected) in cases {
        let answer = explain(&files.config(), from, to, &[]);
        assert_eq!(
            answer.code, *code,
            "--from {from} --to {to}\nstdout:\n{}\nstderr:\n{}",
            answer.stdout, answer.stderr
        );
        for line in *expected {
            assert!(
                answer.stdout.contains(line),
                "--from {from} --to {to}: missing {line:?} in\n{}",
                answer.stdout
            );
        }
        assert!(
            answer
                .stderr
                .contains("istioResources[1]: rejected: AuthorizationPolicy default/audit-everything: action AUDIT is not supported"),
            "the rejected resource is named with its reason:\n{}",
            answer.stderr
        );
    }
}

#[test]
fn explain_json_has_the_admin_api_shape() {
    let files = Files::new(CONFIG);
    let answer = explain(&files.config(), "other", "10.0.0.2:8080", &["--json"]);
    assert_eq!(answer.code, DENY, "{}", answer.stderr);
    let value: serde_json::Value = serde_json::from_str(&answer.stdout).expect("JSON");
    assert_eq!(value["decision"]["verdict"], "deny");
    assert_eq!(value["decision"]["reason"]["policy"], "default/deny-other");
    assert_eq!(value["facts"]["destinationPort"], 8080);
    assert_eq!(
        value["facts"]["sourceIdentity"],
        "spiffe://cluster.local/ns/default/sa/other"
    );
}

#[test]
fn explain_refuses_what_it_cannot_resolve() {
    let files = Files::new(CONFIG);
    let cases = [
        (
            "nobody",
            "default/server:8080",
            "no workload named \"nobody\"",
        ),
        ("client", "server", "needs a port"),
        ("client", "10.0.0.2", "needs a port"),
        ("client", "server:http", "the port must be a number"),
        (
            "client",
            "server:80",
            "workload name \"server\" is ambiguous; use one of: default/server, staging/server",
        ),
        (
            "spiffe://cluster.local/ns/x",
            "default/server:80",
            "is not a SPIFFE identity",
        ),
    ];
    for (from, to, message) in cases {
        let answer = explain(&files.config(), from, to, &[]);
        assert_eq!(
            answer.code, BAD_INPUT,
            "--from {from} --to {to}: {}",
            answer.stderr
        );
        assert!(
            answer.stderr.contains(message),
            "--from {from} --to {to}: {message:?} not in\n{}",
            answer.stderr
        );
        assert!(
            answer.stdout.is_empty(),
            "no decision printed: {}",
            answer.stdout
        );
    }
}

#[test]
fn explain_with_a_bad_config_exits_64_naming_the_problem() {
    let bad_field = Files::new(&CONFIG.replace("policyDirs:", "policyDir:"));
    let answer = explain(&bad_field.config(), "client", "server:8080", &[]);
    assert_eq!(answer.code, BAD_INPUT);
    assert!(
        answer
            .stderr
            .contains("config.yaml:4:5: agent.authorization.policyDir"),
        "{}",
        answer.stderr
    );

    let missing_dir = Files::new(&CONFIG.replace("[policies]", "[does-not-exist]"));
    let answer = explain(&missing_dir.config(), "client", "server:8080", &[]);
    assert_eq!(answer.code, BAD_INPUT);
    assert!(
        answer.stderr.contains("cannot read policy directory"),
        "{}",
        answer.stderr
    );
}

const EGRESS_CONFIG: &str = r#"agent:
  node: node-a
  outboundTrafficPolicy: {mode: REGISTRY_ONLY, namespaces: {open: ALLOW_ANY}}
workloads:
  - {name: client, namespace: default, serviceAccount: client, workloadIps: [10.0.0.1], protocol: HBONE}
  - {name: free, namespace: open, serviceAccount: free, workloadIps: [10.0.0.5], protocol: HBONE}
  - {name: echo-0, namespace: default, serviceAccount: echo, workloadIps: [10.0.0.2], protocol: HBONE,
     services: {default/echo.default.svc.cluster.local: {80: 8080}}}
  - {name: egress-gw, namespace: default, serviceAccount: egress-gw, workloadIps: [10.0.0.9], protocol: HBONE,
     services: {default/egress-gw.default.svc.cluster.local: {15008: 15008}}}
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [/10.96.0.10], ports: {80: 8080}}
  - {name: egress-gw, namespace: default, hostname: egress-gw.default.svc.cluster.local, vips: [/10.96.0.9], ports: {15008: 15008}}
istioResources:
  - apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: partner, namespace: default}
    spec: {hosts: ["*.partner.example"], ports: [{number: 443, name: tls}], resolution: DNS}
  - apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: payments, namespace: default, labels: {istio.io/use-waypoint: egress-gw}}
    spec: {hosts: [pay.example], addresses: [203.0.113.0/24], ports: [{number: 443, name: tls}]}
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: echo, namespace: default}
    spec: {host: echo, trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}}}
"#;

#[test]
fn explain_answers_outbound_questions_about_egress() {
    let files = Files::new(EGRESS_CONFIG);
    // (from, to, exit code, lines stdout must contain)
    let cases: &[(&str, &str, i32, &[&str])] = &[
        (
            "client",
            "api.partner.example:443",
            ALLOW,
            &[
                "outboundTrafficPolicy: REGISTRY_ONLY",
                "decision: ALLOW (allowed by ServiceEntry default/partner (host *.partner.example) for the addresses the pod resolves api.partner.example to through its DNS proxy",
            ],
        ),
        (
            "client",
            "api.partner.example:80",
            DENY,
            &[
                "decision: DENY (blocked by REGISTRY_ONLY: no service, workload or ServiceEntry exported to namespace default has host api.partner.example on port 80)",
                "note: ServiceEntry default/partner matches api.partner.example but allows only ports 443",
            ],
        ),
        (
            "client",
            "198.51.100.1:443",
            DENY,
            &["decision: DENY (198.51.100.1:443 is not in the registry and outboundTrafficPolicy for namespace default is REGISTRY_ONLY"],
        ),
        (
            "free",
            "198.51.100.1:443",
            ALLOW,
            &["decision: ALLOW (not in the registry; passed through under ALLOW_ANY)", "route: TCP to 198.51.100.1:443"],
        ),
        (
            "client",
            "203.0.113.5:443",
            ALLOW,
            &[
                "decision: ALLOW (allowed by ServiceEntry default/payments)",
                "route: HBONE to default/egress-gw at 10.0.0.9:15008 (authority 203.0.113.5:443)",
                "via waypoint: default/egress-gw",
            ],
        ),
        (
            "client",
            "echo.default.svc.cluster.local:80",
            ALLOW,
            &[
                "decision: ALLOW (in the registry: service default/echo.default.svc.cluster.local)",
                "destination rule: default/echo: maxConnections 10 per pod",
            ],
        ),
        (
            "client",
            "10.96.0.10:80",
            ALLOW,
            &["destination rule: default/echo: maxConnections 10 per pod"],
        ),
    ];
    for (from, to, code, lines) in cases {
        let answer = explain(&files.config(), from, to, &[]);
        assert_eq!(
            answer.code, *code,
            "--from {from} --to {to}: {}{}",
            answer.stdout, answer.stderr
        );
        for line in *lines {
            assert!(
                answer.stdout.contains(line),
                "--from {from} --to {to}: {line:?} not in\n{}",
                answer.stdout
            );
        }
    }
    let json = explain(
        &files.config(),
        "client",
        "api.partner.example:443",
        &["--json"],
    );
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(value["allowed"], true);
    assert_eq!(value["serviceEntry"], "default/partner");
    assert_eq!(value["outboundTrafficPolicy"], "REGISTRY_ONLY");
}
