//! Unit tests for evaluation, explain output, mTLS resolution and Istio translation details
//! that the conformance table does not show.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::state::Workload;

/// A destination workload `name` in `namespace` at `ip`, labelled `app: server`.
pub(super) fn workload(namespace: &str, name: &str, ip: [u8; 4]) -> Workload {
    Workload {
        labels: BTreeMap::from([("app".to_string(), "server".to_string())]),
        canonical_revision: "latest".to_string(),
        ..crate::state::tests::workload(namespace, name, ip)
    }
}

use crate::authz::{
    authorize, evaluate, mtls_mode, resolve_mtls, AuthzOptions, ConnectionFacts, DecisionReason,
    MtlsLevel, MtlsMode, PolicyOutcome, SelectorPolicy, Verdict,
};
use crate::config::istio_policy::{
    self as istio, IstioError, IstioOptions, RejectReason, RuleProblem, WarningKind,
};
use crate::state::policy::{Match, Policy, PolicyAction, PolicyScope, StringMatch};

fn facts(identity: Option<&str>, port: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: identity.map(|text| text.parse().expect("identity")),
        source_ip: IpAddr::from([10, 0, 1, 5]),
        destination_ip: IpAddr::from([10, 0, 2, 7]),
        destination_port: port,
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/client";

fn policy(name: &str, action: PolicyAction, dry_run: bool, rules: Vec<Vec<Vec<Match>>>) -> Policy {
    Policy {
        name: name.to_string(),
        namespace: "default".to_string(),
        scope: PolicyScope::Namespace,
        action,
        dry_run,
        rules,
    }
}

fn port_match(port: u16) -> Match {
    Match {
        destination_ports: vec![port],
        ..Match::default()
    }
}

fn translate(yaml: &str) -> istio::Translation {
    istio::parse(yaml, &IstioOptions::default())
}

#[test]
fn explain_lists_policies_in_evaluation_order_and_marks_unreached() {
    let policies = vec![
        policy("allow", PolicyAction::Allow, false, vec![vec![]]),
        policy("shadow-allow", PolicyAction::Allow, true, vec![vec![]]),
        policy(
            "deny-other-port",
            PolicyAction::Deny,
            false,
            vec![vec![vec![port_match(1)]], vec![vec![], vec![port_match(2)]]],
        ),
        policy(
            "deny-8080",
            PolicyAction::Deny,
            false,
            vec![vec![vec![port_match(8080)]]],
        ),
        policy("shadow-deny", PolicyAction::Deny, true, vec![]),
    ];
    let decision = evaluate(
        &policies,
        &workload("default", "server", [10, 0, 2, 7]),
        &facts(Some(CLIENT), 8080),
        &AuthzOptions::default(),
    );
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(
        decision.reason,
        DecisionReason::DeniedBy {
            policy: "default/deny-8080".to_string(),
            rule: 0
        }
    );
    let order: Vec<(&str, &PolicyOutcome)> = decision
        .explain
        .iter()
        .map(|trace| (trace.policy.as_str(), &trace.outcome))
        .collect();
    assert_eq!(
        order,
        vec![
            (
                "default/shadow-deny",
                &PolicyOutcome::NotMatched {
                    failed_clauses: vec![]
                }
            ),
            (
                "default/deny-other-port",
                &PolicyOutcome::NotMatched {
                    failed_clauses: vec![0, 1]
                }
            ),
            ("default/deny-8080", &PolicyOutcome::Matched { rule: 0 }),
            ("default/shadow-allow", &PolicyOutcome::NotReached),
            ("default/allow", &PolicyOutcome::NotReached),
        ]
    );
    let text = decision.to_string();
    for expected in [
        "decision: DENY (explicitly denied by: default/deny-8080 (rules[0]))",
        "1. [dry-run DENY] default/shadow-deny (Namespace): not matched (no rules: never matches)",
        "2. [DENY] default/deny-other-port (Namespace): not matched (rules[0] failed at clause 0; rules[1] failed at clause 1)",
        "5. [ALLOW] default/allow (Namespace): not evaluated (already decided)",
        "dry-run: default/shadow-deny not matched, would allow",
        "decided by: default/deny-8080 rules[0]",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn decision_serializes_for_the_admin_api() {
    let policies = vec![policy("allow", PolicyAction::Allow, false, vec![vec![]])];
    let mut destination = workload("default", "server", [10, 0, 2, 7]);
    destination.authorization_policies = vec!["default/gone".to_string()];
    let decision = authorize(
        &policies,
        &[],
        &destination,
        &facts(None, 8080),
        &AuthzOptions::default(),
    );
    let json = serde_json::to_value(&decision).expect("serializes");
    assert_eq!(json["verdict"], "allow");
    assert_eq!(json["reason"]["kind"], "allowed_by");
    assert_eq!(json["reason"]["policy"], "default/allow");
    assert_eq!(json["explain"][0]["outcome"]["result"], "matched");
    assert_eq!(json["mtls"]["mode"], "PERMISSIVE");
    assert_eq!(json["unknownPolicies"][0], "default/gone");
    assert!(decision.to_string().contains("unknown policy default/gone"));
}

#[test]
fn evaluate_ignores_peer_authentication_and_authorize_applies_it() {
    let translation = translate(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let destination = workload("default", "server", [10, 0, 2, 7]);
    let plaintext = facts(None, 8080);
    let options = AuthzOptions::default();
    let none: &[Policy] = &[];
    assert!(evaluate(none, &destination, &plaintext, &options).is_allowed());
    let decision = authorize(
        none,
        &translation.peer_authentications,
        &destination,
        &plaintext,
        &options,
    );
    assert!(!decision.is_allowed());
    assert_eq!(
        decision.deciding_policy(),
        Some("istio-system/istio_converted_static_strict")
    );
    assert!(decision
        .to_string()
        .contains("mTLS mode: STRICT (PeerAuthentication istio-system/default, Mesh level)"));
}

#[test]
fn selector_policy_is_evaluated_once_even_when_also_listed() {
    let translation = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: sel, namespace: default}\nspec: {selector: {matchLabels: {app: server}}, rules: [{}]}\n",
    );
    let mut destination = workload("default", "server", [10, 0, 2, 7]);
    destination.authorization_policies = vec!["default/sel".to_string()];
    let decision = evaluate(
        &translation.policies,
        &destination,
        &facts(Some(CLIENT), 8080),
        &AuthzOptions::default(),
    );
    assert_eq!(decision.explain.len(), 1);
    assert!(decision.unknown_policies.is_empty());
    assert_eq!(decision.deciding_policy(), Some("default/sel"));
}

#[test]
fn mtls_resolution_table() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns, namespace: prod}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-later, namespace: prod}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: prod}
spec:
  selector: {matchLabels: {app: db}}
  portLevelMtls:
    "5432": {mode: STRICT}
    "9000": {mode: DISABLE}
    "9100": {}
"#;
    let translation = translate(yaml);
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let peer_authentications = &translation.peer_authentications;
    let server = workload("default", "server", [10, 0, 2, 7]);
    let prod_server = workload("prod", "server", [10, 0, 2, 8]);
    let mut db = workload("prod", "db", [10, 0, 2, 9]);
    db.labels.insert("app".to_string(), "db".to_string());
    let cases = [
        (
            &server,
            8080,
            MtlsMode::Strict,
            Some(("istio-system/mesh", MtlsLevel::Mesh)),
        ),
        // First namespace policy wins over the later one (Istio: oldest).
        (
            &prod_server,
            8080,
            MtlsMode::Permissive,
            Some(("prod/ns", MtlsLevel::Namespace)),
        ),
        (
            &db,
            8080,
            MtlsMode::Permissive,
            Some(("prod/ns", MtlsLevel::Namespace)),
        ),
        (
            &db,
            5432,
            MtlsMode::Strict,
            Some(("prod/db", MtlsLevel::Port)),
        ),
        (
            &db,
            9000,
            MtlsMode::Disable,
            Some(("prod/db", MtlsLevel::Port)),
        ),
        (
            &db,
            9100,
            MtlsMode::Permissive,
            Some(("prod/ns", MtlsLevel::Namespace)),
        ),
    ];
    for (workload, port, mode, source) in cases {
        let resolution = resolve_mtls(peer_authentications, workload, port);
        let got = resolution
            .source
            .as_ref()
            .map(|source| (source.peer_authentication.as_str(), source.level));
        assert_eq!(
            (resolution.mode, got),
            (mode, source),
            "{} port {port}",
            workload.uid
        );
        assert_eq!(mtls_mode(peer_authentications, workload, port), mode);
    }
    assert_eq!(mtls_mode(&[], &server, 80), MtlsMode::Permissive);
}

#[test]
fn istio_rule_translates_to_to_from_when_clauses() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: default}
spec:
  rules:
  - to: [{operation: {ports: ["80"], notPorts: ["81"]}}]
    from:
    - source: {principals: ["*", "td/ns/a/*", "*/sa/b", "td/ns/c/sa/d"], serviceAccounts: [x, other/y]}
    when: [{key: destination.ip, values: [10.0.0.0/8], notValues: ["fd00::1"]}]
"#;
    let translation = translate(yaml);
    assert!(translation.errors.is_empty() && translation.warnings.is_empty());
    let policy = &translation.policies[0].policy;
    assert_eq!(policy.scope, PolicyScope::Namespace);
    let [rule] = policy.rules.as_slice() else {
        panic!("one rule expected: {:?}", policy.rules);
    };
    assert_eq!(rule.len(), 3, "to, from, when clauses");
    assert_eq!(rule[0][0].destination_ports, vec![80]);
    assert_eq!(rule[0][0].not_destination_ports, vec![81]);
    assert_eq!(
        rule[1][0].principals,
        vec![
            StringMatch::Presence,
            StringMatch::Prefix("td/ns/a/".to_string()),
            StringMatch::Suffix("/sa/b".to_string()),
            StringMatch::Exact("td/ns/c/sa/d".to_string()),
        ]
    );
    let accounts: Vec<(&str, &str)> = rule[1][0]
        .service_accounts
        .iter()
        .map(|sa| (sa.namespace.as_str(), sa.service_account.as_str()))
        .collect();
    assert_eq!(accounts, vec![("default", "x"), ("other", "y")]);
    assert_eq!(
        rule[2][0].destination_ips,
        vec!["10.0.0.0/8".parse().expect("cidr")]
    );
    assert_eq!(
        rule[2][0].not_destination_ips,
        vec!["fd00::1/128".parse().expect("cidr")]
    );
}

#[test]
fn istio_documents_lists_and_sequences() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: a, namespace: ns}, spec: {}}
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: b, namespace: ns}, spec: {}}
---
---
- {apiVersion: security.istio.io/v1beta1, kind: AuthorizationPolicy, metadata: {name: c}}
"#;
    let translation = translate(yaml);
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let keys: Vec<String> = translation
        .policies
        .iter()
        .map(|p| p.policy.key())
        .collect();
    assert_eq!(keys, vec!["ns/a", "ns/b", "default/c"]);
}

#[test]
fn istio_rejections_name_the_resource_and_reason() {
    let header = |kind: &str, name: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: app}}\n")
    };
    let rule = |body: &str| {
        format!(
            "{}spec: {{rules: [{body}]}}\n",
            header("AuthorizationPolicy", "p")
        )
    };
    let field = |name: &str, value: &str| (name.to_string(), value.to_string());
    let cases: Vec<(String, RejectReason)> = vec![
        (
            "apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\n".to_string(),
            RejectReason::ApiVersion("networking.istio.io/v1".to_string()),
        ),
        (header("RequestAuthentication", "p"), RejectReason::Kind),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: app}\n".to_string(),
            RejectReason::MissingName,
        ),
        (
            format!("{}spec: {{action: CUSTOM, provider: {{name: x}}}}\n", header("AuthorizationPolicy", "p")),
            RejectReason::UnsupportedAction("CUSTOM".to_string()),
        ),
        (
            format!("{}spec: {{action: allow}}\n", header("AuthorizationPolicy", "p")),
            RejectReason::UnknownAction("allow".to_string()),
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app, annotations: {istio.io/dry-run: \"yes\"}}\n".to_string(),
            RejectReason::DryRun("yes".to_string()),
        ),
        (
            rule("{from: [{source: {}}]}"),
            RejectReason::Rule { rule: 0, problem: RuleProblem::EmptySource(0) },
        ),
        (
            rule("{to: [{}]}"),
            RejectReason::Rule { rule: 0, problem: RuleProblem::EmptyOperation(0) },
        ),
        (
            rule("{}, {to: [{operation: {ports: [\"0\"]}}]}"),
            RejectReason::Rule {
                rule: 1,
                problem: { let (field, value) = field("to[0].operation.ports", "0"); RuleProblem::Port { field, value } },
            },
        ),
        (
            rule("{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}"),
            RejectReason::Rule {
                rule: 0,
                problem: { let (field, value) = field("from[0].source.ipBlocks", "10.0.0.0/33"); RuleProblem::Cidr { field, value } },
            },
        ),
        (
            rule("{from: [{source: {principals: [\"td/ns/*/sa/x\"]}}]}"),
            RejectReason::Rule {
                rule: 0,
                problem: { let (field, value) = field("from[0].source.principals", "td/ns/*/sa/x"); RuleProblem::Wildcard { field, value } },
            },
        ),
        (
            rule("{from: [{source: {namespaces: [\"\"]}}]}"),
            RejectReason::Rule {
                rule: 0,
                problem: RuleProblem::EmptyValue { field: "from[0].source.namespaces".to_string() },
            },
        ),
        (
            rule("{from: [{source: {serviceAccounts: [a/b/c]}}]}"),
            RejectReason::Rule {
                rule: 0,
                problem: { let (field, value) = field("from[0].source.serviceAccounts", "a/b/c"); RuleProblem::ServiceAccount { field, value } },
            },
        ),
        (
            rule("{when: [{key: source.port, values: [\"1\"]}]}"),
            RejectReason::Rule { rule: 0, problem: RuleProblem::UnknownCondition("source.port".to_string()) },
        ),
        (
            rule("{when: [{key: source.ip}]}"),
            RejectReason::Rule { rule: 0, problem: RuleProblem::ConditionWithoutValues("source.ip".to_string()) },
        ),
        (
            format!("{}spec: {{mtls: {{mode: strict}}}}\n", header("PeerAuthentication", "p")),
            RejectReason::MtlsMode("strict".to_string()),
        ),
        (
            format!("{}spec: {{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{http: {{mode: STRICT}}}}}}\n", header("PeerAuthentication", "p")),
            RejectReason::PortLevelPort("http".to_string()),
        ),
    ];
    for (yaml, reason) in cases {
        let translation = translate(&yaml);
        let [IstioError::Rejected {
            resource,
            reason: got,
        }] = translation.errors.as_slice()
        else {
            panic!(
                "one rejection expected for {yaml}: {:?}",
                translation.errors
            );
        };
        assert_eq!(got, &reason, "{yaml}");
        assert!(translation.policies.is_empty() && translation.peer_authentications.is_empty());
        let message = translation.errors[0].to_string();
        assert!(
            message.starts_with(&format!(
                "{} {}/{}: ",
                resource.kind, resource.namespace, resource.name
            )),
            "{message}"
        );
    }
}

#[test]
fn istio_spec_typo_and_yaml_syntax_errors() {
    let translation = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {rulez: []}\n",
    );
    let message = translation.errors[0].to_string();
    assert!(
        message.starts_with("AuthorizationPolicy app/p: invalid spec:")
            && message.contains("rulez"),
        "{message}"
    );

    let translation = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: app}\n---\nspec: [unclosed\n",
    );
    assert_eq!(
        translation.policies.len(),
        1,
        "documents before the bad one apply"
    );
    assert!(matches!(
        translation.errors.as_slice(),
        [IstioError::Yaml { document: 1, .. }]
    ));
}

#[test]
fn l7_warnings_name_the_policy_and_point_to_a_waypoint() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
    when: [{key: "request.auth.claims[iss]", values: [me]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
"#;
    let translation = translate(yaml);
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let kinds: Vec<&WarningKind> = translation.warnings.iter().map(|w| &w.kind).collect();
    assert_eq!(
        kinds,
        vec![
            &WarningKind::L7AllowRuleDropped {
                rule: 0,
                attributes: vec![
                    "methods".to_string(),
                    "paths".to_string(),
                    "request.auth.claims[iss]".to_string()
                ],
            },
            &WarningKind::L7DenyRuleNarrowed {
                rule: 0,
                attributes: vec!["notRequestPrincipals".to_string()],
            },
        ]
    );
    let web = &translation.policies[0].policy;
    assert!(
        web.rules.is_empty(),
        "the ALLOW rule is dropped, the policy stays"
    );
    let block = &translation.policies[1].policy;
    assert_eq!(
        block.rules,
        vec![Vec::<Vec<Match>>::new()],
        "DENY rule with no L4 part matches all"
    );
    for (warning, name) in translation.warnings.iter().zip(["shop/web", "shop/block"]) {
        let text = warning.to_string();
        assert!(text.contains(name) && text.contains("waypoint"), "{text}");
    }
}

#[test]
fn selector_policies_and_scopes_from_istio() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: server}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: global, namespace: istio-system}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ignored, namespace: istio-system}
spec: {selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}}
"#;
    let translation = translate(yaml);
    let scopes: Vec<(PolicyScope, Option<bool>)> = translation
        .policies
        .iter()
        .map(|p: &SelectorPolicy| {
            (
                p.policy.scope,
                p.selector.as_ref().map(|s| s.all_namespaces),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        vec![
            (PolicyScope::WorkloadSelector, Some(true)),
            (PolicyScope::Global, None)
        ]
    );
    assert!(translation.peer_authentications.is_empty());
    assert_eq!(
        translation.warnings[0].kind,
        WarningKind::RootSelectorIgnored
    );
    let elsewhere = workload("other", "server", [10, 0, 3, 1]);
    assert!(translation.policies[0]
        .selector
        .as_ref()
        .is_some_and(|selector| selector.selects("istio-system", &elsewhere)));
}

/// One ALLOW and one DENY policy using every string match, in the form Istio's ztunnel reads
/// (serde_yaml 0.9 YAML tags) or in the single-key map form; `{MATCH}` placeholders are
/// filled per form.
const TWO_POLICIES: &str = "workloads:
- uid: u-server
  name: server
  namespace: app
  workloadIps: [10.0.2.7]
  protocol: HBONE
policies:
- name: allow-team
  namespace: app
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [EXACT, PREFIX]
        namespaces: [PRESENCE]
- name: deny-test
  namespace: app
  scope: Namespace
  action: Deny
  rules:
  - - - namespaces: [SUFFIX]
";

fn two_policies(exact: &str, prefix: &str, suffix: &str, presence: &str) -> String {
    TWO_POLICIES
        .replace("EXACT", exact)
        .replace("PREFIX", prefix)
        .replace("SUFFIX", suffix)
        .replace("PRESENCE", presence)
}

#[test]
fn ztunnel_tag_form_and_map_form_read_the_same_policies_and_decide_the_same() {
    let tags = parse_config(&two_policies(
        "!Exact cluster.local/ns/client/sa/client",
        "!Prefix \"cluster.local/ns/team-\"",
        "!Suffix -test",
        "!Presence []",
    ));
    let maps = parse_config(&two_policies(
        "{Exact: cluster.local/ns/client/sa/client}",
        "{Prefix: \"cluster.local/ns/team-\"}",
        "{Suffix: -test}",
        "{Presence: []}",
    ));
    assert_eq!(tags.policies, maps.policies, "both forms read the same");
    let matched = &tags.policies[0].rules[0][0][0];
    assert_eq!(
        matched.principals,
        [
            StringMatch::Exact("cluster.local/ns/client/sa/client".to_string()),
            StringMatch::Prefix("cluster.local/ns/team-".to_string()),
        ]
    );
    assert_eq!(matched.namespaces, [StringMatch::Presence]);

    let server = &tags.workloads[0];
    // (client identity, verdict): allowed by exact or prefix principal, denied by the suffix
    // DENY, and nothing else matches the ALLOW.
    let cases = [
        ("spiffe://cluster.local/ns/client/sa/client", Verdict::Allow),
        ("spiffe://cluster.local/ns/team-a/sa/x", Verdict::Allow),
        ("spiffe://cluster.local/ns/team-test/sa/x", Verdict::Deny),
        ("spiffe://cluster.local/ns/other/sa/x", Verdict::Deny),
    ];
    for (identity, want) in cases {
        let facts = ConnectionFacts {
            source_identity: Some(identity.parse().expect("identity")),
            source_ip: IpAddr::from([10, 0, 1, 5]),
            destination_ip: IpAddr::from([10, 0, 2, 7]),
            destination_port: 8080,
        };
        for (form, config) in [("tags", &tags), ("maps", &maps)] {
            let decision = authorize(
                &config.policies,
                &[],
                server,
                &facts,
                &AuthzOptions::default(),
            );
            assert_eq!(decision.verdict, want, "{form}: {identity}");
        }
    }
}

/// A local config file's model, as the agent loads it.
fn parse_config(text: &str) -> crate::config::Config {
    crate::config::parse(
        std::path::Path::new("config.yaml"),
        text,
        &crate::config::Overrides::default(),
    )
    .unwrap_or_else(|errors| panic!("{errors}"))
}
