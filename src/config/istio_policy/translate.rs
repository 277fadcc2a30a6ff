//! One Istio resource → model types, following istiod's ambient conversion (see the parent
//! module for the rules and where we deliberately differ).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_yaml::Value;

use crate::state::policy::{
    Clause, Match, MtlsMode, PeerAuthentication, PeerAuthenticationScope, Policy, PolicyAction,
    PolicyScope, Rule, SelectorPolicy, ServiceAccountMatch, StringMatch, WorkloadSelector,
};

use super::resource::{
    AuthorizationPolicySpec, Condition, MutualTls, Operation, PeerAuthenticationSpec, RuleSpec,
    Source,
};
use super::{
    IstioError, IstioOptions, IstioWarning, RejectReason, ResourceId, RuleProblem, Translation,
    WarningKind,
};

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `when` keys that ztunnel can evaluate (istiod's `l4WhenAttributes`).
fn l4_condition(key: &str) -> bool {
    matches!(
        key,
        "source.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.ip"
            | "destination.port"
    )
}

/// Istio attributes that exist but need HTTP (or a waypoint) to evaluate.
fn l7_condition(key: &str) -> bool {
    matches!(
        key,
        "remote.ip"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "connection.sni"
    ) || key.starts_with("request.headers[")
        || key.starts_with("request.auth.claims[")
        || key.starts_with("experimental.envoy.filters.")
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(key))
        .and_then(Value::as_str)
}

/// Translates one resource into `out` (policy, PeerAuthentication, warning or error).
pub(super) fn resource(value: Value, options: &IstioOptions, out: &mut Translation) {
    let id = ResourceId {
        kind: text(&value, &["kind"]).unwrap_or("<no kind>").to_string(),
        namespace: text(&value, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string(),
        name: text(&value, &["metadata", "name"])
            .unwrap_or("<unnamed>")
            .to_string(),
    };
    let reject = |reason| IstioError::Rejected {
        resource: id.clone(),
        reason,
    };
    let result = check_header(&value, &id).and_then(|()| {
        let spec = value.get("spec").cloned().unwrap_or(Value::Null);
        match id.kind.as_str() {
            "AuthorizationPolicy" => authorization_policy(&id, &value, spec, options, out)
                .map(|policy| out.policies.extend(policy)),
            _ => peer_authentication(&id, spec, options, out)
                .map(|pa| out.peer_authentications.extend(pa)),
        }
    });
    if let Err(reason) = result {
        out.errors.push(reject(reason));
    }
}

fn check_header(value: &Value, id: &ResourceId) -> Result<(), RejectReason> {
    let (Some(api_version), Some(_)) = (text(value, &["apiVersion"]), text(value, &["kind"]))
    else {
        return Err(RejectReason::NotAResource);
    };
    if !API_VERSIONS.contains(&api_version) {
        return Err(RejectReason::ApiVersion(api_version.to_string()));
    }
    if !matches!(
        id.kind.as_str(),
        "AuthorizationPolicy" | "PeerAuthentication"
    ) {
        return Err(RejectReason::Kind);
    }
    if !matches!(text(value, &["metadata", "name"]), Some(name) if !name.is_empty()) {
        return Err(RejectReason::MissingName);
    }
    Ok(())
}

fn spec_of<T: serde::de::DeserializeOwned + Default>(spec: Value) -> Result<T, RejectReason> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(spec).map_err(|error| RejectReason::Spec(error.to_string()))
}

fn dry_run(resource: &Value) -> Result<bool, RejectReason> {
    match text(resource, &["metadata", "annotations", "istio.io/dry-run"]) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(RejectReason::DryRun(other.to_string())),
    }
}

fn authorization_policy(
    id: &ResourceId,
    resource: &Value,
    spec: Value,
    options: &IstioOptions,
    out: &mut Translation,
) -> Result<Option<SelectorPolicy>, RejectReason> {
    let spec: AuthorizationPolicySpec = spec_of(spec)?;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        out.warnings.push(IstioWarning {
            resource: id.clone(),
            kind: WarningKind::WaypointPolicySkipped,
        });
        return Ok(None);
    }
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => PolicyAction::Allow,
        Some("DENY") => PolicyAction::Deny,
        Some(other @ ("AUDIT" | "CUSTOM")) => {
            return Err(RejectReason::UnsupportedAction(other.to_string()))
        }
        Some(other) => return Err(RejectReason::UnknownAction(other.to_string())),
    };
    if spec.provider.is_some() {
        return Err(RejectReason::Spec(
            "provider is only valid with action CUSTOM".to_string(),
        ));
    }
    let dry_run = dry_run(resource)?;
    let root = id.namespace == options.root_namespace;
    let (scope, selector) = match spec.selector {
        Some(selector) => (
            PolicyScope::WorkloadSelector,
            Some(WorkloadSelector {
                match_labels: selector.match_labels,
                all_namespaces: root,
            }),
        ),
        None if root => (PolicyScope::Global, None),
        None => (PolicyScope::Namespace, None),
    };
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (index, rule) in spec.rules.iter().enumerate() {
        let translated =
            translate_rule(rule, action, &id.namespace).map_err(|problem| RejectReason::Rule {
                rule: index,
                problem,
            })?;
        if !translated.l7.is_empty() {
            let attributes = translated.l7.into_iter().collect();
            let kind = match action {
                PolicyAction::Allow => WarningKind::L7AllowRuleDropped {
                    rule: index,
                    attributes,
                },
                PolicyAction::Deny => WarningKind::L7DenyRuleNarrowed {
                    rule: index,
                    attributes,
                },
            };
            out.warnings.push(IstioWarning {
                resource: id.clone(),
                kind,
            });
        }
        rules.extend(translated.rule);
    }
    let policy = Policy {
        name: id.name.clone(),
        namespace: id.namespace.clone(),
        scope,
        action,
        dry_run,
        rules,
    };
    Ok(Some(SelectorPolicy { policy, selector }))
}

/// One translated Istio rule: `None` when an ALLOW rule was dropped for L7 attributes.
struct RuleTranslation {
    rule: Option<Rule>,
    l7: BTreeSet<String>,
}

fn match_is_empty(m: &Match) -> bool {
    *m == Match::default()
}

/// Collects one OR-clause; an entry whose L4 part is empty constrains nothing (it was L7-only),
/// which makes the whole clause hold, so the clause is left out.
fn push_clause(clauses: &mut Rule, matches: Vec<Match>) {
    if !matches.is_empty() && !matches.iter().any(match_is_empty) {
        clauses.push(matches);
    }
}

fn translate_rule(
    rule: &RuleSpec,
    action: PolicyAction,
    namespace: &str,
) -> Result<RuleTranslation, RuleProblem> {
    let mut l7 = BTreeSet::new();
    let mut clauses: Rule = Vec::new();
    let mut to_clause: Clause = Vec::new();
    for (index, to) in rule.to.iter().enumerate() {
        let operation = to
            .operation
            .as_ref()
            .filter(|operation| !operation_is_empty(operation))
            .ok_or(RuleProblem::EmptyOperation(index))?;
        l7.extend(http_operations(operation));
        to_clause.push(operation_match(operation, index)?);
    }
    push_clause(&mut clauses, to_clause);
    let mut from_clause: Clause = Vec::new();
    for (index, from) in rule.from.iter().enumerate() {
        let source = from
            .source
            .as_ref()
            .filter(|source| !source_is_empty(source))
            .ok_or(RuleProblem::EmptySource(index))?;
        l7.extend(http_sources(source));
        from_clause.push(source_match(source, index, namespace)?);
    }
    push_clause(&mut clauses, from_clause);
    for (index, condition) in rule.when.iter().enumerate() {
        match condition_match(condition, index)? {
            Some(m) => clauses.push(vec![m]),
            None => {
                l7.insert(condition.key.clone());
            }
        }
    }
    let rule = (action == PolicyAction::Deny || l7.is_empty()).then_some(clauses);
    Ok(RuleTranslation { rule, l7 })
}

fn operation_is_empty(operation: &Operation) -> bool {
    [
        &operation.hosts,
        &operation.not_hosts,
        &operation.ports,
        &operation.not_ports,
        &operation.methods,
        &operation.not_methods,
        &operation.paths,
        &operation.not_paths,
    ]
    .iter()
    .all(|list| list.is_empty())
}

fn source_is_empty(source: &Source) -> bool {
    [
        &source.principals,
        &source.not_principals,
        &source.request_principals,
        &source.not_request_principals,
        &source.namespaces,
        &source.not_namespaces,
        &source.service_accounts,
        &source.not_service_accounts,
        &source.ip_blocks,
        &source.not_ip_blocks,
        &source.remote_ip_blocks,
        &source.not_remote_ip_blocks,
    ]
    .iter()
    .all(|list| list.is_empty())
}

fn named_nonempty(fields: &[(&str, &Vec<String>)]) -> Vec<String> {
    fields
        .iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, _)| (*name).to_string())
        .collect()
}

fn http_operations(operation: &Operation) -> Vec<String> {
    named_nonempty(&[
        ("hosts", &operation.hosts),
        ("notHosts", &operation.not_hosts),
        ("methods", &operation.methods),
        ("notMethods", &operation.not_methods),
        ("paths", &operation.paths),
        ("notPaths", &operation.not_paths),
    ])
}

fn http_sources(source: &Source) -> Vec<String> {
    named_nonempty(&[
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
    ])
}

fn operation_match(operation: &Operation, index: usize) -> Result<Match, RuleProblem> {
    let field = |name: &str| format!("to[{index}].operation.{name}");
    Ok(Match {
        destination_ports: ports(&field("ports"), &operation.ports)?,
        not_destination_ports: ports(&field("notPorts"), &operation.not_ports)?,
        ..Match::default()
    })
}

fn source_match(source: &Source, index: usize, namespace: &str) -> Result<Match, RuleProblem> {
    let field = |name: &str| format!("from[{index}].source.{name}");
    Ok(Match {
        principals: string_matches(&field("principals"), &source.principals)?,
        not_principals: string_matches(&field("notPrincipals"), &source.not_principals)?,
        namespaces: string_matches(&field("namespaces"), &source.namespaces)?,
        not_namespaces: string_matches(&field("notNamespaces"), &source.not_namespaces)?,
        service_accounts: service_accounts(
            &field("serviceAccounts"),
            &source.service_accounts,
            namespace,
        )?,
        not_service_accounts: service_accounts(
            &field("notServiceAccounts"),
            &source.not_service_accounts,
            namespace,
        )?,
        source_ips: cidrs(&field("ipBlocks"), &source.ip_blocks)?,
        not_source_ips: cidrs(&field("notIpBlocks"), &source.not_ip_blocks)?,
        ..Match::default()
    })
}

/// A `when` condition as one match, or `None` for an L7 attribute.
fn condition_match(condition: &Condition, index: usize) -> Result<Option<Match>, RuleProblem> {
    let key = condition.key.as_str();
    if !l4_condition(key) && !l7_condition(key) {
        return Err(RuleProblem::UnknownCondition(key.to_string()));
    }
    if condition.values.is_empty() && condition.not_values.is_empty() {
        return Err(RuleProblem::ConditionWithoutValues(key.to_string()));
    }
    let values = format!("when[{index}].values");
    let not_values = format!("when[{index}].notValues");
    let (positive, negative) = (&condition.values, &condition.not_values);
    let m = match key {
        "source.ip" => Match {
            source_ips: cidrs(&values, positive)?,
            not_source_ips: cidrs(&not_values, negative)?,
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: cidrs(&values, positive)?,
            not_destination_ips: cidrs(&not_values, negative)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: string_matches(&values, positive)?,
            not_namespaces: string_matches(&not_values, negative)?,
            ..Match::default()
        },
        "source.principal" => Match {
            principals: string_matches(&values, positive)?,
            not_principals: string_matches(&not_values, negative)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(&values, positive)?,
            not_destination_ports: ports(&not_values, negative)?,
            ..Match::default()
        },
        _ => return Ok(None),
    };
    Ok(Some(m))
}

/// Istio's wildcard strings: `*` presence, `*x` suffix, `x*` prefix, else exact.
fn string_matches(field: &str, values: &[String]) -> Result<Vec<StringMatch>, RuleProblem> {
    values
        .iter()
        .map(|value| {
            let wildcard = || RuleProblem::Wildcard {
                field: field.to_string(),
                value: value.clone(),
            };
            if value.is_empty() {
                return Err(RuleProblem::EmptyValue {
                    field: field.to_string(),
                });
            }
            if value == "*" {
                return Ok(StringMatch::Presence);
            }
            let (kind, rest): (fn(String) -> StringMatch, &str) =
                if let Some(rest) = value.strip_prefix('*') {
                    (StringMatch::Suffix, rest)
                } else if let Some(rest) = value.strip_suffix('*') {
                    (StringMatch::Prefix, rest)
                } else {
                    (StringMatch::Exact, value.as_str())
                };
            if rest.contains('*') {
                return Err(wildcard());
            }
            Ok(kind(rest.to_string()))
        })
        .collect()
}

fn ports(field: &str, values: &[String]) -> Result<Vec<u16>, RuleProblem> {
    values
        .iter()
        .map(|value| {
            value
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| RuleProblem::Port {
                    field: field.to_string(),
                    value: value.clone(),
                })
        })
        .collect()
}

fn cidrs(field: &str, values: &[String]) -> Result<Vec<IpNet>, RuleProblem> {
    values
        .iter()
        .map(|value| {
            let parsed = if value.contains('/') {
                value.parse::<IpNet>().ok()
            } else {
                value.parse::<IpAddr>().ok().map(IpNet::from)
            };
            parsed.ok_or_else(|| RuleProblem::Cidr {
                field: field.to_string(),
                value: value.clone(),
            })
        })
        .collect()
}

/// `namespace/name`, or `name` in the policy's namespace (istiod's rule).
fn service_accounts(
    field: &str,
    values: &[String],
    namespace: &str,
) -> Result<Vec<ServiceAccountMatch>, RuleProblem> {
    values
        .iter()
        .map(|value| {
            let (account_namespace, name) = value.split_once('/').unwrap_or((namespace, value));
            if account_namespace.is_empty() || name.is_empty() || name.contains('/') {
                return Err(RuleProblem::ServiceAccount {
                    field: field.to_string(),
                    value: value.clone(),
                });
            }
            Ok(ServiceAccountMatch {
                namespace: account_namespace.to_string(),
                service_account: name.to_string(),
            })
        })
        .collect()
}

fn mtls_mode(mtls: Option<&MutualTls>) -> Result<Option<MtlsMode>, RejectReason> {
    match mtls.and_then(|mtls| mtls.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err(RejectReason::MtlsMode(other.to_string())),
    }
}

fn peer_authentication(
    id: &ResourceId,
    spec: Value,
    options: &IstioOptions,
    out: &mut Translation,
) -> Result<Option<PeerAuthentication>, RejectReason> {
    let spec: PeerAuthenticationSpec = spec_of(spec)?;
    let mode = mtls_mode(spec.mtls.as_ref())?;
    let mut port_level = BTreeMap::new();
    for (port, mtls) in &spec.port_level_mtls {
        let number = port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| RejectReason::PortLevelPort(port.clone()))?;
        port_level.insert(number, mtls_mode(Some(mtls))?);
    }
    let labels = spec
        .selector
        .map(|selector| selector.match_labels)
        .filter(|labels| !labels.is_empty());
    let root = id.namespace == options.root_namespace;
    let scope = match labels {
        Some(_) if root => {
            out.warnings.push(IstioWarning {
                resource: id.clone(),
                kind: WarningKind::RootSelectorIgnored,
            });
            return Ok(None);
        }
        Some(match_labels) => PeerAuthenticationScope::Workload { match_labels },
        None if !port_level.is_empty() => return Err(RejectReason::PortLevelWithoutSelector),
        None if root => PeerAuthenticationScope::Mesh,
        None => PeerAuthenticationScope::Namespace,
    };
    Ok(Some(PeerAuthentication {
        name: id.name.clone(),
        namespace: id.namespace.clone(),
        scope,
        mode,
        port_level,
    }))
}
