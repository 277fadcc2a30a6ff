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
        ("client", "10.9.9.9:80", "no workload has IP 10.9.9.9"),
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
