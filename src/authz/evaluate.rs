//! Policy selection, matching and the §5 evaluation order (layer L2, pure).
//!
//! Matching follows ztunnel's `rbac.rs` literally: a policy matches if any rule does (no rules,
//! no match); a rule if all its clauses do (no clauses, match); a clause if any of its matches
//! does (no matches, match); a match with every field empty never matches; inside a match every
//! populated field must hold, a positive list if any value holds, a `not_*` list if none does.

use std::collections::HashSet;

use crate::spiffe::Identity;
use crate::state::policy::{Match, Policy, PolicyAction, Rule, ServiceAccountMatch};
use crate::state::Workload;

use super::decision::{
    Decision, DecisionReason, DryRunEffect, DryRunResult, PolicyOutcome, PolicyTrace, Verdict,
};
use super::{AuthzOptions, ConnectionFacts, PolicyRef};

/// The policies that apply to one workload, in input order, each once.
pub(super) struct Selected<'a> {
    policies: Vec<(String, &'a Policy)>,
    unknown_keys: Vec<String>,
}

/// Keeps the candidates that apply to `destination` (§5) and notes the workload-listed keys
/// that name no candidate.
pub(super) fn select<'a>(
    candidates: impl Iterator<Item = PolicyRef<'a>>,
    destination: &Workload,
) -> Selected<'a> {
    let mut seen = HashSet::new();
    let mut policies = Vec::new();
    for candidate in candidates {
        let key = candidate.policy.key();
        seen.insert(key.clone());
        if candidate.applies_to(destination, &key) {
            policies.push((key, candidate.policy));
        }
    }
    let unknown_keys = destination
        .authorization_policies
        .iter()
        .filter(|key| !seen.contains(key.as_str()))
        .cloned()
        .collect();
    Selected {
        policies,
        unknown_keys,
    }
}

/// The connection attributes policies look at, derived once per decision.
struct Subject<'a> {
    identity: Option<&'a Identity>,
    /// The identity without `spiffe://`; `None` for plaintext, which matches no principal.
    principal: Option<String>,
    /// The identity's namespace; empty for plaintext (so `Exact("")` matches, presence not).
    namespace: &'a str,
    facts: &'a ConnectionFacts,
}

impl<'a> Subject<'a> {
    fn new(facts: &'a ConnectionFacts) -> Self {
        let identity = facts.source_identity.as_ref();
        Subject {
            identity,
            principal: identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            namespace: identity.map(Identity::namespace).unwrap_or(""),
            facts,
        }
    }

    fn service_account_matches(&self, wanted: &ServiceAccountMatch) -> bool {
        self.identity.is_some_and(|id| {
            id.namespace() == wanted.namespace && id.service_account() == wanted.service_account
        })
    }
}

/// Positive list: empty or any holds. Negative list: none holds.
fn field<T>(positive: &[T], negative: &[T], holds: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&holds)) && !negative.iter().any(&holds)
}

fn is_empty(m: &Match) -> bool {
    m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.service_accounts.is_empty()
        && m.not_service_accounts.is_empty()
        && m.source_ips.is_empty()
        && m.not_source_ips.is_empty()
        && m.destination_ips.is_empty()
        && m.not_destination_ips.is_empty()
        && m.destination_ports.is_empty()
        && m.not_destination_ports.is_empty()
}

fn match_holds(m: &Match, subject: &Subject<'_>) -> bool {
    if is_empty(m) {
        return false;
    }
    // IPv4-mapped IPv6 peers (dual-stack sockets) are compared as IPv4 so that an IPv4 CIDR in
    // a DENY rule cannot be sidestepped.
    let source_ip = subject.facts.source_ip.to_canonical();
    let destination_ip = subject.facts.destination_ip.to_canonical();
    let port = subject.facts.destination_port;
    field(&m.destination_ips, &m.not_destination_ips, |net| {
        net_contains(net, destination_ip)
    }) && field(&m.source_ips, &m.not_source_ips, |net| {
        net_contains(net, source_ip)
    }) && field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == port
    }) && field(&m.service_accounts, &m.not_service_accounts, |sa| {
        subject.service_account_matches(sa)
    }) && field(&m.principals, &m.not_principals, |want| {
        subject
            .principal
            .as_deref()
            .is_some_and(|principal| want.matches(principal))
    }) && field(&m.namespaces, &m.not_namespaces, |want| {
        want.matches(subject.namespace)
    })
}

/// Whether `net` contains the canonical address `ip`. A CIDR written in IPv4-mapped IPv6 form
/// (`::ffff:a.b.c.d/96+n`) names IPv4 addresses, so it is compared as the IPv4 CIDR `/n`, as
/// peers are: otherwise a DENY written that way would match no one.
fn net_contains(net: &ipnet::IpNet, ip: std::net::IpAddr) -> bool {
    if net.contains(&ip) {
        return true;
    }
    match (net, ip) {
        (ipnet::IpNet::V6(v6), std::net::IpAddr::V4(v4)) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|mapped| ipnet::Ipv4Net::new(mapped, v6.prefix_len() - 96).ok())
            .is_some_and(|as_v4| as_v4.contains(&v4)),
        _ => false,
    }
}

/// The first failing clause of `rule`, or `None` if the rule matches.
fn failing_clause(rule: &Rule, subject: &Subject<'_>) -> Option<usize> {
    rule.iter()
        .position(|clause| !clause.is_empty() && !clause.iter().any(|m| match_holds(m, subject)))
}

fn policy_outcome(policy: &Policy, subject: &Subject<'_>) -> PolicyOutcome {
    let mut failed_clauses = Vec::with_capacity(policy.rules.len());
    for (index, rule) in policy.rules.iter().enumerate() {
        match failing_clause(rule, subject) {
            None => return PolicyOutcome::Matched { rule: index },
            Some(clause) => failed_clauses.push(clause),
        }
    }
    PolicyOutcome::NotMatched { failed_clauses }
}

fn trace(key: &str, policy: &Policy, outcome: PolicyOutcome) -> PolicyTrace {
    PolicyTrace {
        policy: key.to_string(),
        action: policy.action,
        dry_run: policy.dry_run,
        scope: policy.scope,
        outcome,
    }
}

fn dry_run_result(key: &str, action: PolicyAction, outcome: &PolicyOutcome) -> DryRunResult {
    let matched = matches!(outcome, PolicyOutcome::Matched { .. });
    let effect = match (action, matched) {
        (PolicyAction::Allow, true) | (PolicyAction::Deny, false) => DryRunEffect::WouldAllow,
        (PolicyAction::Allow, false) | (PolicyAction::Deny, true) => DryRunEffect::WouldDeny,
    };
    DryRunResult {
        policy: key.to_string(),
        matched,
        effect,
    }
}

/// Evaluation phases in §5 order.
const PHASES: [(PolicyAction, bool); 4] = [
    (PolicyAction::Deny, true),
    (PolicyAction::Deny, false),
    (PolicyAction::Allow, true),
    (PolicyAction::Allow, false),
];

/// Runs the §5 evaluation order over the selected policies.
pub(super) fn decide(
    selected: Selected<'_>,
    facts: &ConnectionFacts,
    options: &AuthzOptions,
) -> Decision {
    let subject = Subject::new(facts);
    let mut explain = Vec::with_capacity(selected.policies.len());
    let mut dry_run = Vec::new();
    let mut reason: Option<DecisionReason> = None;
    for (action, is_dry_run) in PHASES {
        let phase = selected
            .policies
            .iter()
            .filter(|(_, policy)| policy.action == action && policy.dry_run == is_dry_run);
        if action == PolicyAction::Allow && !is_dry_run && reason.is_none() {
            let has_enforced_allow = phase.clone().next().is_some();
            if !has_enforced_allow {
                reason = Some(if options.default_deny {
                    DecisionReason::DefaultDeny
                } else {
                    DecisionReason::NoAllowPolicies
                });
            }
        }
        for (key, policy) in phase {
            if reason.is_some() {
                explain.push(trace(key, policy, PolicyOutcome::NotReached));
                continue;
            }
            let outcome = policy_outcome(policy, &subject);
            if is_dry_run {
                dry_run.push(dry_run_result(key, action, &outcome));
            } else if let PolicyOutcome::Matched { rule } = outcome {
                reason = Some(match action {
                    PolicyAction::Deny => DecisionReason::DeniedBy {
                        policy: key.clone(),
                        rule,
                    },
                    PolicyAction::Allow => DecisionReason::AllowedBy {
                        policy: key.clone(),
                        rule,
                    },
                });
            }
            explain.push(trace(key, policy, outcome));
        }
    }
    let reason = reason.unwrap_or(DecisionReason::NoAllowMatched);
    let verdict = match reason {
        DecisionReason::AllowedBy { .. } | DecisionReason::NoAllowPolicies => Verdict::Allow,
        _ => Verdict::Deny,
    };
    Decision {
        verdict,
        reason,
        dry_run,
        explain,
        mtls: None,
        unknown_policies: selected.unknown_keys,
    }
}
