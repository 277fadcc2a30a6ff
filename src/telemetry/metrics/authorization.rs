//! Authorization decision counters (layer L1): `nodetunnel_authorization_decisions_total`, one
//! series per (action, deciding policy, reason, phase, destination workload).
//!
//! Istio's ztunnel has no such counter (it only logs decisions), so the name is ours; the
//! destination labels use Istio's traffic label names so dashboards can join the two. Every
//! label value comes from a bounded set: two actions, the policies of the model (or `none`), six
//! reasons, two phases and the node's own workloads. Series naming a policy or a workload that
//! left the model are removed ([`super::Metrics::retain_policies`],
//! [`super::Metrics::retain_workloads`]), as the traffic series of departed workloads are.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::state::Workload;

/// The `policy` label when no policy decided (Istio's default allow, "no allow policy
/// matched", default deny, waypoint bypass protection).
pub const NO_POLICY: &str = "none";

/// Admitted or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionAction {
    /// The connection may reach the workload.
    Allow,
    /// Refused (HBONE 401, plaintext closed) or, on re-evaluation, closed.
    Deny,
}

impl EncodeLabelValue for DecisionAction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            DecisionAction::Allow => "allow",
            DecisionAction::Deny => "deny",
        })
    }
}

/// When the decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionPhase {
    /// When the connection arrived, before anything reached the application.
    Connect,
    /// A policy change re-decided an open connection and closed it. Re-evaluations that keep
    /// a connection open change nothing and are not counted, so `rate()` of `connect` stays a
    /// rate of connections.
    Reevaluation,
}

impl EncodeLabelValue for DecisionPhase {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            DecisionPhase::Connect => "connect",
            DecisionPhase::Reevaluation => "reevaluation",
        })
    }
}

/// The labels of one decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub action: DecisionAction,
    /// `namespace/name` of the deciding policy (including istiod's converted STRICT policies),
    /// or [`NO_POLICY`].
    pub policy: String,
    /// The decision's reason kind: `allowed_by`, `denied_by`, `no_allow_policies`,
    /// `no_allow_matched`, `default_deny`, `waypoint_bypass`.
    pub reason: &'static str,
    /// `connect` or `reevaluation`.
    pub phase: DecisionPhase,
    /// The destination's owning workload name (else its pod name), as Istio labels it.
    pub destination_workload: String,
    /// The destination's namespace.
    pub destination_workload_namespace: String,
}

impl DecisionLabels {
    /// Labels for a decision about a connection to `destination`.
    pub fn new(
        action: DecisionAction,
        policy: Option<&str>,
        reason: &'static str,
        phase: DecisionPhase,
        destination: &Workload,
    ) -> Self {
        let workload = if destination.workload_name.is_empty() {
            &destination.name
        } else {
            &destination.workload_name
        };
        DecisionLabels {
            action,
            policy: policy.unwrap_or(NO_POLICY).to_string(),
            reason,
            phase,
            destination_workload: workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
        }
    }
}

/// The decision counter and, per series, the destination uid it belongs to (for eviction).
#[derive(Debug, Default)]
pub(super) struct DecisionCounters {
    pub(super) decisions: Family<DecisionLabels, Counter>,
    series: Mutex<HashMap<DecisionLabels, String>>,
}

impl DecisionCounters {
    pub(super) fn record(&self, labels: DecisionLabels, destination_uid: &str) {
        self.decisions.get_or_create(&labels).inc();
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels)
            .or_insert_with(|| destination_uid.to_string());
    }

    /// Removes the series for which `stale(labels, destination uid)` holds; returns how many.
    pub(super) fn remove_where(&self, stale: impl Fn(&DecisionLabels, &str) -> bool) -> usize {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let before = series.len();
        series.retain(|labels, uid| {
            let remove = stale(labels, uid);
            if remove {
                self.decisions.remove(labels);
            }
            !remove
        });
        before - series.len()
    }
}
