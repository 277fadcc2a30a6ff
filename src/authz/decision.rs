//! The result of an authorization decision and its explain trace (layer L2, pure data).
//!
//! A [`Decision`] is what enforcement acts on (401 / close), what the single log line per decision
//! records, and what `nodetunnel explain` prints: serializable for the admin API, with a
//! multi-line `Display` for people.

use std::fmt;

use crate::state::policy::{PolicyAction, PolicyScope};

use super::MtlsResolution;

/// Admit or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The connection may reach the workload.
    Allow,
    /// Refused: HBONE answers 401, plaintext is closed.
    Deny,
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecisionReason {
    /// An enforced DENY policy matched (the first one, in evaluation order).
    DeniedBy {
        /// `namespace/name` of the policy.
        policy: String,
        /// Index of the rule that matched.
        rule: usize,
    },
    /// An enforced ALLOW policy matched (the first one, in evaluation order).
    AllowedBy {
        /// `namespace/name` of the policy.
        policy: String,
        /// Index of the rule that matched.
        rule: usize,
    },
    /// No enforced ALLOW policy applies to the workload, so Istio's default (allow) holds.
    NoAllowPolicies,
    /// Enforced ALLOW policies apply, but none matched.
    NoAllowMatched,
    /// No enforced ALLOW policy applies and the zero-trust switch is on.
    DefaultDeny,
    /// Policies allowed it, but the destination has a waypoint, bypass protection is on for it,
    /// and the peer is not that waypoint (or the connection is plaintext).
    WaypointBypass {
        /// The identities that may connect (the waypoint's); empty when the waypoint resolves
        /// to nothing, which refuses everyone.
        allowed: Vec<String>,
    },
}

impl DecisionReason {
    /// The deciding policy's key, if a policy decided.
    pub fn policy(&self) -> Option<&str> {
        match self {
            DecisionReason::DeniedBy { policy, .. } | DecisionReason::AllowedBy { policy, .. } => {
                Some(policy)
            }
            _ => None,
        }
    }

    /// The reason's kind, as serialized (`denied_by`, `allowed_by`, `no_allow_policies`,
    /// `no_allow_matched`, `default_deny`, `waypoint_bypass`): a fixed set, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            DecisionReason::DeniedBy { .. } => "denied_by",
            DecisionReason::AllowedBy { .. } => "allowed_by",
            DecisionReason::NoAllowPolicies => "no_allow_policies",
            DecisionReason::NoAllowMatched => "no_allow_matched",
            DecisionReason::DefaultDeny => "default_deny",
            DecisionReason::WaypointBypass { .. } => "waypoint_bypass",
        }
    }

    /// The deciding policy key, or the fixed reason text when no policy decided; short enough
    /// for a log field.
    pub fn summary(&self) -> &str {
        match self {
            DecisionReason::DeniedBy { policy, .. } | DecisionReason::AllowedBy { policy, .. } => {
                policy
            }
            DecisionReason::NoAllowPolicies => "no allow policies",
            DecisionReason::NoAllowMatched => "allow policies exist, but none allowed",
            DecisionReason::DefaultDeny => "default deny (zero-trust)",
            DecisionReason::WaypointBypass { .. } => {
                "waypoint bypass: the destination only accepts traffic from its waypoint"
            }
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecisionReason::DeniedBy { policy, rule } => {
                write!(f, "explicitly denied by: {policy} (rules[{rule}])")
            }
            DecisionReason::AllowedBy { policy, rule } => {
                write!(f, "allowed by: {policy} (rules[{rule}])")
            }
            DecisionReason::WaypointBypass { allowed } => {
                write!(f, "{} (allowed: [{}])", self.summary(), allowed.join(", "))
            }
            other => f.write_str(other.summary()),
        }
    }
}

/// What one policy did during evaluation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PolicyOutcome {
    /// The policy matched through this rule (the first matching one).
    Matched {
        /// Index into the policy's rules.
        rule: usize,
    },
    /// No rule matched. One entry per rule: the index of the first clause that failed. Empty
    /// when the policy has no rules (which never matches).
    NotMatched {
        /// Per rule, its first failing clause.
        failed_clauses: Vec<usize>,
    },
    /// Not evaluated: the decision was already made by an earlier policy.
    NotReached,
}

/// One policy considered for the connection, in evaluation order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTrace {
    /// `namespace/name`.
    pub policy: String,
    /// Allow or deny.
    pub action: PolicyAction,
    /// Whether it is dry-run (evaluated, never enforced).
    pub dry_run: bool,
    /// How it was selected for the workload.
    pub scope: PolicyScope,
    /// What happened.
    pub outcome: PolicyOutcome,
}

/// What a dry-run policy would have done on its own (Istio's shadow semantics: an ALLOW that
/// does not match would deny, a DENY that does not match would allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DryRunEffect {
    /// Enforced alone, it would admit the connection.
    WouldAllow,
    /// Enforced alone, it would refuse the connection.
    WouldDeny,
}

/// A dry-run policy's result, for the decision log ("dry-run: would deny").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunResult {
    /// `namespace/name`.
    pub policy: String,
    /// Whether the policy matched.
    pub matched: bool,
    /// What it would have done if enforced.
    pub effect: DryRunEffect,
}

/// An authorization decision with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Admit or refuse.
    pub verdict: Verdict,
    /// The deciding policy or the reason.
    pub reason: DecisionReason,
    /// Dry-run policies evaluated, in evaluation order; never affect the verdict.
    pub dry_run: Vec<DryRunResult>,
    /// Every policy that applies to the workload, in evaluation order.
    pub explain: Vec<PolicyTrace>,
    /// The PeerAuthentication mode at the target port, when decided by [`super::authorize`].
    pub mtls: Option<MtlsResolution>,
    /// Keys listed in the workload's `authorizationPolicies` that name no known policy (skipped,
    /// to be logged as a warning).
    pub unknown_policies: Vec<String>,
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The key of the policy that decided, if one did.
    pub fn deciding_policy(&self) -> Option<&str> {
        self.reason.policy()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        })
    }
}

impl fmt::Display for PolicyOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyOutcome::Matched { rule } => write!(f, "matched rules[{rule}]"),
            PolicyOutcome::NotMatched { failed_clauses } if failed_clauses.is_empty() => {
                f.write_str("not matched (no rules: never matches)")
            }
            PolicyOutcome::NotMatched { failed_clauses } => {
                f.write_str("not matched (")?;
                for (rule, clause) in failed_clauses.iter().enumerate() {
                    let separator = if rule == 0 { "" } else { "; " };
                    write!(f, "{separator}rules[{rule}] failed at clause {clause}")?;
                }
                f.write_str(")")
            }
            PolicyOutcome::NotReached => f.write_str("not evaluated (already decided)"),
        }
    }
}

impl fmt::Display for PolicyTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            PolicyAction::Allow => "ALLOW",
            PolicyAction::Deny => "DENY",
        };
        let dry_run = if self.dry_run { "dry-run " } else { "" };
        write!(
            f,
            "[{dry_run}{action}] {} ({:?}): {}",
            self.policy, self.scope, self.outcome
        )
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "decision: {} ({})", self.verdict, self.reason)?;
        if let Some(mtls) = &self.mtls {
            writeln!(f, "mTLS mode: {mtls}")?;
        }
        if self.explain.is_empty() {
            writeln!(f, "policies considered: none")?;
        } else {
            writeln!(f, "policies considered, in evaluation order:")?;
            for (index, trace) in self.explain.iter().enumerate() {
                writeln!(f, "  {}. {trace}", index + 1)?;
            }
        }
        for result in &self.dry_run {
            let effect = match result.effect {
                DryRunEffect::WouldAllow => "would allow",
                DryRunEffect::WouldDeny => "would deny",
            };
            let matched = if result.matched {
                "matched"
            } else {
                "not matched"
            };
            writeln!(f, "dry-run: {} {matched}, {effect}", result.policy)?;
        }
        for key in &self.unknown_policies {
            writeln!(f, "warning: workload lists unknown policy {key} (skipped)")?;
        }
        match &self.reason {
            DecisionReason::DeniedBy { policy, rule }
            | DecisionReason::AllowedBy { policy, rule } => {
                write!(f, "decided by: {policy} rules[{rule}]")
            }
            other => write!(f, "decided by: {other}"),
        }
    }
}
