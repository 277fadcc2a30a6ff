//! Runs the conformance table in `conformance.yaml`: each case is a policy set (local-config
//! policies and/or Istio resources), a destination workload and one connection, with the
//! expected verdict and what decided it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml::Value;

use super::tests::workload;
use super::{authorize, AuthzOptions, ConnectionFacts, DryRunEffect, SelectorPolicy, Verdict};
use crate::config::istio_policy::{self as istio, IstioOptions};
use crate::state::policy::Policy;

const TABLE: &str = include_str!("conformance.yaml");

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    name: String,
    /// Local-config policies, read as the config loader reads them (string matches as tags,
    /// `!Exact ..`, or single-key maps, `{Exact: ..}`).
    #[serde(default)]
    policies: Vec<Policy>,
    #[serde(default)]
    istio: Vec<Value>,
    #[serde(default)]
    workload: WorkloadSpec,
    #[serde(default = "default_from")]
    from: Option<String>,
    #[serde(default = "default_src")]
    src: IpAddr,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default)]
    default_deny: bool,
    expect: String,
    by: String,
    #[serde(default)]
    dry_run: Vec<String>,
    #[serde(default)]
    warnings: usize,
    #[serde(default)]
    errors: usize,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct WorkloadSpec {
    namespace: String,
    labels: BTreeMap<String, String>,
    policies: Vec<String>,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            namespace: "default".to_string(),
            labels: BTreeMap::from([("app".to_string(), "server".to_string())]),
            policies: Vec::new(),
        }
    }
}

fn default_from() -> Option<String> {
    Some("spiffe://cluster.local/ns/client/sa/client".to_string())
}

fn default_src() -> IpAddr {
    IpAddr::from([10, 0, 1, 5])
}

fn default_port() -> u16 {
    8080
}

/// Fills in `apiVersion: security.istio.io/v1` and `kind: AuthorizationPolicy` when absent.
fn with_defaults(mut resource: Value) -> Value {
    if let Value::Mapping(mapping) = &mut resource {
        for (key, value) in [
            ("apiVersion", "security.istio.io/v1"),
            ("kind", "AuthorizationPolicy"),
        ] {
            if !mapping.contains_key(key) {
                mapping.insert(Value::from(key), Value::from(value));
            }
        }
    }
    resource
}

fn dry_run_label(effect: DryRunEffect) -> &'static str {
    match effect {
        DryRunEffect::WouldAllow => "would_allow",
        DryRunEffect::WouldDeny => "would_deny",
    }
}

/// Runs one case; `Err` describes the first mismatch.
fn run(case: Case) -> Result<(), String> {
    let istio_yaml = serde_yaml::to_string(
        &case
            .istio
            .into_iter()
            .map(with_defaults)
            .collect::<Vec<_>>(),
    )
    .map_err(|error| error.to_string())?;
    let translation = istio::parse(&istio_yaml, &IstioOptions::default());
    if translation.warnings.len() != case.warnings || translation.errors.len() != case.errors {
        return Err(format!(
            "warnings {:?}, errors {:?}",
            translation.warnings, translation.errors
        ));
    }
    let mut policies: Vec<SelectorPolicy> =
        case.policies.into_iter().map(SelectorPolicy::new).collect();
    policies.extend(translation.policies);
    let mut destination = workload(&case.workload.namespace, "server", [10, 0, 2, 7]);
    destination.labels = case.workload.labels;
    destination.authorization_policies = case.workload.policies;
    let source_identity = match case.from {
        Some(text) => Some(text.parse().map_err(|error| format!("{error}"))?),
        None => None,
    };
    let facts = ConnectionFacts {
        source_identity,
        source_ip: case.src,
        destination_ip: IpAddr::from([10, 0, 2, 7]),
        destination_port: case.port,
    };
    let options = AuthzOptions {
        default_deny: case.default_deny,
    };
    let decision = authorize(
        &policies,
        &translation.peer_authentications,
        &destination,
        &facts,
        &options,
    );
    let verdict = match decision.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    let dry_run: Vec<String> = decision
        .dry_run
        .iter()
        .map(|result| format!("{} {}", result.policy, dry_run_label(result.effect)))
        .collect();
    if verdict != case.expect || decision.reason.summary() != case.by || dry_run != case.dry_run {
        return Err(format!(
            "expected {} by {:?} dry-run {:?}, got:\n{decision}",
            case.expect, case.by, case.dry_run
        ));
    }
    Ok(())
}

#[test]
fn conformance_table() {
    let cases: Vec<Case> = serde_yaml::from_str(TABLE).expect("conformance.yaml parses");
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let total = cases.len();
    let failures: Vec<String> = cases
        .into_iter()
        .filter_map(|case| {
            let name = case.name.clone();
            run(case).err().map(|error| format!("- {name}: {error}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {total} conformance cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
