//! L4 authorization: may this inbound connection reach this pod? (layer L2, pure).
//!
//! Sits at the destination agent, after the HBONE CONNECT is parsed (or a plaintext connection is
//! accepted on 15006) and before the agent connects to the application. It implements Istio
//! ztunnel's semantics (shared/reference/istio-compat.md §4.2, §5) over the policy model in
//! [`crate::state::policy`], plus PeerAuthentication mTLS modes and a zero-trust default-deny
//! switch. Every function here is a pure decision: no I/O, no clock, no `.await`. Callers take a
//! state snapshot, build [`ConnectionFacts`], call [`authorize`] and act on the [`Decision`]
//! (401 / close), logging it and showing it through `nodetunnel explain`.
//!
//! - [`evaluate`]: policy selection and the §5 evaluation order, with an explain trace.
//! - [`authorize`]: [`evaluate`] plus the PeerAuthentication STRICT check; what enforcement uses.
//! - [`decide`]: [`authorize`] over a state snapshot; [`explain`] resolves people's names for
//!   the source and destination first (CLI and admin API).
//!
//! Istio's `AuthorizationPolicy` / `PeerAuthentication` YAML is translated into these policies
//! by `config::istio_policy` (layer L1), where the config loader reads it.

mod decision;
mod evaluate;
pub mod explain;
mod mtls;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::spiffe::Identity;
use crate::state::policy::{Authorization, Policy, PolicyScope};
use crate::state::{Snapshot, Workload};

pub use crate::state::policy::{
    AuthzOptions, MtlsMode, PeerAuthentication, PeerAuthenticationScope, SelectorPolicy,
    WorkloadSelector,
};

pub use decision::{
    Decision, DecisionReason, DryRunEffect, DryRunResult, PolicyOutcome, PolicyTrace, Verdict,
};
pub use explain::{explain, ExplainError, Explained};
pub use mtls::{mtls_mode, resolve_mtls, MtlsLevel, MtlsResolution, MtlsSource};

/// What the destination agent knows about an inbound connection when it decides.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionFacts {
    /// The peer's SPIFFE identity from the mTLS handshake; `None` for plaintext (15006).
    pub source_identity: Option<Identity>,
    /// The TCP peer address of the connection (client pod, waypoint or gateway).
    pub source_ip: IpAddr,
    /// The destination pod IP.
    pub destination_ip: IpAddr,
    /// The resolved target port on the pod (never 15008).
    pub destination_port: u16,
}

/// A borrowed view of one candidate policy: what [`evaluate`] iterates over. Built from
/// `&Arc<Policy>` (the state snapshot), `&Policy` or `&SelectorPolicy` (Istio YAML), so both
/// sources can be chained into one evaluation.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRef<'a> {
    /// The policy.
    pub policy: &'a Policy,
    /// Its label selector, if it came with one.
    pub selector: Option<&'a WorkloadSelector>,
}

impl<'a> From<&'a Policy> for PolicyRef<'a> {
    fn from(policy: &'a Policy) -> Self {
        PolicyRef {
            policy,
            selector: None,
        }
    }
}

impl<'a> From<&'a Arc<Policy>> for PolicyRef<'a> {
    fn from(policy: &'a Arc<Policy>) -> Self {
        PolicyRef::from(policy.as_ref())
    }
}

impl<'a> From<&'a SelectorPolicy> for PolicyRef<'a> {
    fn from(policy: &'a SelectorPolicy) -> Self {
        PolicyRef {
            policy: &policy.policy,
            selector: policy.selector.as_ref(),
        }
    }
}

impl PolicyRef<'_> {
    /// Whether this policy applies to `workload` (§5 selection): Global always; Namespace in the
    /// workload's namespace; WorkloadSelector when listed by the workload or selected by labels.
    fn applies_to(&self, workload: &Workload, key: &str) -> bool {
        if workload
            .authorization_policies
            .iter()
            .any(|listed| listed == key)
        {
            return true;
        }
        match self.policy.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => self.policy.namespace == workload.namespace,
            PolicyScope::WorkloadSelector => self
                .selector
                .is_some_and(|selector| selector.selects(&self.policy.namespace, workload)),
        }
    }
}

/// Decides a connection against L4 authorization policies only (§5): selects the policies that
/// apply to `destination`, then evaluates dry-run DENY (logged), enforced DENY, dry-run ALLOW
/// (logged), "no enforced ALLOW" (allow, or deny under `default_deny`), any ALLOW (allow), else
/// deny. Does not apply PeerAuthentication; enforcement should call [`authorize`].
pub fn evaluate<'a, P>(
    policies: impl IntoIterator<Item = P>,
    destination: &Workload,
    facts: &ConnectionFacts,
    options: &AuthzOptions,
) -> Decision
where
    P: Into<PolicyRef<'a>>,
{
    let selected = evaluate::select(policies.into_iter().map(Into::into), destination);
    evaluate::decide(selected, facts, options)
}

/// The full inbound decision: the PeerAuthentication mode for `destination` at the target port,
/// then [`evaluate`]. STRICT is enforced the way istiod does it for ztunnel: an enforced DENY
/// policy `not_principals: [presence]` (so plaintext, which has no principal, matches) is put
/// first among the candidates; it appears in the explain trace under istiod's converted name.
pub fn authorize<'a, P>(
    policies: impl IntoIterator<Item = P>,
    peer_authentications: &[PeerAuthentication],
    destination: &Workload,
    facts: &ConnectionFacts,
    options: &AuthzOptions,
) -> Decision
where
    P: Into<PolicyRef<'a>>,
{
    let resolution = resolve_mtls(peer_authentications, destination, facts.destination_port);
    let strict = mtls::strict_policy(&resolution);
    let given: Vec<PolicyRef<'a>> = policies.into_iter().map(Into::into).collect();
    let candidates = strict.iter().map(PolicyRef::from).chain(given);
    let selected = evaluate::select(candidates, destination);
    let mut decision = evaluate::decide(selected, facts, options);
    decision.mtls = Some(resolution);
    decision
}

/// [`authorize`] with the policies, PeerAuthentications and options of one `snapshot`, then
/// waypoint bypass protection ([`crate::state::policy::WaypointEnforcement`]): what enforcement
/// (first check and re-evaluation) and explain call, so they cannot disagree.
pub fn decide(snapshot: &Snapshot, destination: &Workload, facts: &ConnectionFacts) -> Decision {
    let authorization = snapshot.authorization();
    let mut decision = authorize(
        &authorization.policies,
        &authorization.peer_authentications,
        destination,
        facts,
        &authorization.options,
    );
    if decision.is_allowed() && authorization.waypoint.applies_to(destination) {
        if let Some(reason) = waypoint_bypass(snapshot, destination, facts) {
            decision.verdict = Verdict::Deny;
            decision.reason = reason;
        }
    }
    decision
}

/// Every policy key a [`Decision`] under `authorization` can name: the policies, and the STRICT
/// policies istiod converts each PeerAuthentication into. Decision metrics keep series only for
/// these, so a removed policy's series go.
pub fn policy_keys(authorization: &Authorization) -> HashSet<String> {
    let policies = authorization
        .policies
        .iter()
        .map(|selector_policy| selector_policy.policy.key());
    let strict = authorization
        .peer_authentications
        .iter()
        .flat_map(mtls::strict_policy_keys);
    policies.chain(strict).collect()
}

/// The denial reason when `destination` has a waypoint and the peer is not it; `None` when the
/// destination has no waypoint or the peer is its waypoint.
fn waypoint_bypass(
    snapshot: &Snapshot,
    destination: &Workload,
    facts: &ConnectionFacts,
) -> Option<DecisionReason> {
    if snapshot.waypoints_of(destination).is_empty() {
        return None;
    }
    let allowed = snapshot.waypoint_identities(destination);
    let from_waypoint = facts
        .source_identity
        .as_ref()
        .is_some_and(|identity| allowed.contains(identity));
    (!from_waypoint).then(|| DecisionReason::WaypointBypass {
        allowed: allowed.iter().map(ToString::to_string).collect(),
    })
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod waypoint_tests;
