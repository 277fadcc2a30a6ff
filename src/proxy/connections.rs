//! Authorization of inbound connections, first and live (layer L3).
//!
//! Every inbound connection of a workload proxy — an HBONE CONNECT stream once its target is
//! resolved, or a plaintext connection on 15006 — goes through [`admit`]: it is *registered*
//! with its [`ConnectionFacts`] first and only then decided on a fresh snapshot, so a policy
//! change that lands between the two can never be missed. While it lives, [`run_reevaluation`]
//! decides it again on every new snapshot (`StateStore::subscribe`) and cancels the ones now
//! denied; the connection's task sees [`Registration::revoked`] complete, stops copying, and
//! logs "policy changed" in its access-log record. Allowed connections are not touched.
//!
//! Decisions are `authz::decide` (pure); this file only registers, logs, counts
//! (`nodetunnel_authorization_decisions_total`: every first decision, and re-evaluations that
//! close a connection) and cancels.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::authz::{self, ConnectionFacts, Decision, DecisionReason, DryRunEffect, MtlsMode};
use crate::drain::Drain;
use crate::state::{Snapshot, StateStore, Workload};
use crate::telemetry::metrics::{DecisionAction, DecisionLabels, DecisionPhase};
use crate::telemetry::Metrics;

/// Why a connection is refused or was closed: the deciding policy, or the reason none decided.
/// Boxed: the decision with its trace is large, and it travels in `Err`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Denied(Box<Decision>);

impl Denied {
    /// The full decision, for logs.
    pub(super) fn decision(&self) -> &Decision {
        &self.0
    }

    /// Whether STRICT mTLS, not an authorization policy, refused a plaintext connection.
    fn is_strict_mtls(&self) -> bool {
        let strict = self
            .0
            .mtls
            .as_ref()
            .is_some_and(|mtls| mtls.mode == MtlsMode::Strict);
        let by_strict_policy = self.0.deciding_policy().is_some_and(|policy| {
            policy.ends_with("/istio_converted_static_strict")
                || policy.contains("/converted_peer_authentication_")
        });
        strict && by_strict_policy
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_strict_mtls() {
            if let Some(mtls) = &self.0.mtls {
                return write!(f, "plaintext refused: mTLS mode {mtls}");
            }
        }
        match &self.0.reason {
            DecisionReason::DeniedBy { policy, .. } => write!(f, "denied by policy {policy}"),
            other => write!(f, "denied: {}", other.summary()),
        }
    }
}

impl std::error::Error for Denied {}

/// A connection closed by re-evaluation; displayed `policy changed: <denial>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy changed: {0}")]
pub(super) struct Revoked(pub(super) Denied);

/// One registered connection: what the re-evaluator decides on, and how it tells the
/// connection it is closed (the reason, set once, and the waker of the connection's task).
/// One allocation per connection, shared by the table and the connection's [`Registration`];
/// the task polls it beside its copy and keeps no waiting future of its own (RSS per idle
/// connection).
#[derive(Debug)]
struct Entry {
    facts: ConnectionFacts,
    denied: OnceLock<Denied>,
    waker: AtomicWaker,
}

impl Entry {
    fn revoke(&self, denied: Denied) {
        if self.denied.set(denied).is_ok() {
            self.waker.wake();
        }
    }
}

/// The live inbound connections of one workload proxy.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    /// Entries behind a pointer: a hash table keeps room for up to twice its connections, and
    /// an entry is ~150 B, a pointer 8 (RSS per idle connection).
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    /// Where decisions are counted.
    metrics: Arc<Metrics>,
}

/// A connection's place in [`Connections`]; removed when dropped (with the connection's task).
#[derive(Debug)]
pub(super) struct Registration {
    id: u64,
    connections: Arc<Connections>,
    entry: Arc<Entry>,
}

impl Registration {
    /// Completes when a policy change denies this connection; never otherwise.
    #[cfg(test)]
    pub(super) async fn revoked(&self) -> Revoked {
        std::future::poll_fn(|cx| self.poll_revoked(cx)).await
    }

    /// Ready once a policy change denied this connection; the task is woken then.
    pub(super) fn poll_revoked(&self, cx: &mut Context<'_>) -> Poll<Revoked> {
        let denied = || self.entry.denied.get().map(|d| Revoked(d.clone()));
        if let Some(revoked) = denied() {
            return Poll::Ready(revoked);
        }
        self.entry.waker.register(cx.waker());
        // Checked again after registering: a revocation in between has woken nobody.
        denied().map_or(Poll::Pending, Poll::Ready)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.connections.lock();
        entries.remove(&self.id);
        // Give the table's memory back once most connections have closed (a burst of 10 000
        // would otherwise keep its table for the proxy's life); rare, so cheap overall.
        if entries.capacity() > MIN_CAPACITY && entries.len() * 4 < entries.capacity() {
            let keep = entries.len() * 2;
            entries.shrink_to(keep);
        }
    }
}

/// The table is not shrunk below this many entries.
const MIN_CAPACITY: usize = 64;

impl Connections {
    /// No connections yet; decisions are counted in `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Connections {
            entries: Mutex::default(),
            next_id: AtomicU64::new(0),
            metrics,
        }
    }

    /// Counts `decision` about a connection to `workload`.
    fn count(&self, decision: &Decision, phase: DecisionPhase, workload: &Workload) {
        let action = if decision.is_allowed() {
            DecisionAction::Allow
        } else {
            DecisionAction::Deny
        };
        let labels = DecisionLabels::new(
            action,
            decision.deciding_policy(),
            decision.reason.kind(),
            phase,
            workload,
        );
        self.metrics.authorization_decision(labels, &workload.uid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(self: &Arc<Self>, facts: ConnectionFacts) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            facts,
            denied: OnceLock::new(),
            waker: AtomicWaker::new(),
        });
        self.lock().insert(id, entry.clone());
        Registration {
            id,
            connections: self.clone(),
            entry,
        }
    }

    /// Open connections (admin, tests).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Decides every open connection again on `snapshot` and cancels those now denied. Returns
    /// how many were closed.
    fn reevaluate(&self, snapshot: &Snapshot, workload: &Workload) -> usize {
        let open: Vec<Arc<Entry>> = self
            .lock()
            .values()
            .filter(|entry| entry.denied.get().is_none())
            .cloned()
            .collect();
        let mut closed = 0;
        for entry in open {
            let facts = &entry.facts;
            let decision = authz::decide(snapshot, workload, facts);
            if decision.is_allowed() {
                continue;
            }
            self.count(&decision, DecisionPhase::Reevaluation, workload);
            let denied = Denied(Box::new(decision));
            tracing::info!(
                src.addr = %facts.source_ip,
                src.identity = %identity_text(facts),
                dst.port = facts.destination_port,
                reason = %denied,
                explain = %denied.decision(),
                "closing connection: policy changed"
            );
            entry.revoke(denied);
            closed += 1;
        }
        closed
    }
}

fn identity_text(facts: &ConnectionFacts) -> String {
    facts
        .source_identity
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Registers the connection, then decides it on the current snapshot. The returned
/// registration must live as long as the connection.
#[cfg(test)]
pub(super) fn admit(
    connections: &Arc<Connections>,
    state: &StateStore,
    local: &Workload,
    facts: ConnectionFacts,
) -> Result<Registration, Denied> {
    admit_on(connections, state, &state.snapshot(), local, facts)
}

/// Registers the connection, then decides it on `snapshot`, the one the caller looked its
/// target up in, unless `state` moved past it before the registration: a change the
/// re-evaluator handled before it could see this connection must not be missed, so the newer
/// snapshot decides then. The returned registration must live as long as the connection.
pub(super) fn admit_on(
    connections: &Arc<Connections>,
    state: &StateStore,
    snapshot: &Arc<Snapshot>,
    local: &Workload,
    facts: ConnectionFacts,
) -> Result<Registration, Denied> {
    let registration = connections.register(facts.clone());
    let current = state.snapshot();
    let snapshot = if Arc::ptr_eq(&current, snapshot) {
        snapshot
    } else {
        &current
    };
    let workload = snapshot.workload(&local.uid).map_or(local, |w| w.as_ref());
    let decision = authz::decide(snapshot, workload, &facts);
    log_decision(&decision, &facts);
    connections.count(&decision, DecisionPhase::Connect, workload);
    if decision.is_allowed() {
        Ok(registration)
    } else {
        Err(Denied(Box::new(decision)))
    }
}

/// One event per decision: deny at info, allow at debug (info when a dry-run policy would have
/// denied, so shadow policies are visible at the default level).
fn log_decision(decision: &Decision, facts: &ConnectionFacts) {
    let dry_run: Vec<String> = decision
        .dry_run
        .iter()
        .map(|result| {
            let effect = match result.effect {
                DryRunEffect::WouldAllow => "would allow",
                DryRunEffect::WouldDeny => "would deny",
            };
            format!("{}: {effect}", result.policy)
        })
        .collect();
    let would_deny = decision
        .dry_run
        .iter()
        .any(|result| result.effect == DryRunEffect::WouldDeny);
    macro_rules! decision_event {
        ($level:expr, $message:literal) => {
            tracing::event!(
                $level,
                verdict = %decision.verdict,
                policy = decision.deciding_policy().unwrap_or(""),
                reason = %decision.reason,
                dry_run = %dry_run.join(", "),
                src.addr = %facts.source_ip,
                src.identity = %identity_text(facts),
                dst.port = facts.destination_port,
                $message
            )
        };
    }
    if !decision.is_allowed() {
        decision_event!(tracing::Level::INFO, "connection denied by authorization");
    } else if would_deny {
        decision_event!(
            tracing::Level::INFO,
            "connection allowed (a dry-run policy would deny it)"
        );
    } else {
        decision_event!(tracing::Level::DEBUG, "connection allowed by authorization");
    }
}

/// Re-evaluates `connections` of workload `workload_uid` after every snapshot change until
/// `stop` drains. `changes` must be subscribed before the proxy accepts its first connection.
#[tracing::instrument(name = "policy_reevaluation", skip_all, fields(workload = %workload_uid))]
pub(super) async fn run_reevaluation(
    connections: Arc<Connections>,
    state: Arc<StateStore>,
    workload_uid: String,
    mut changes: tokio::sync::watch::Receiver<u64>,
    stop: Drain,
) {
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.draining() => return,
        }
        let snapshot = state.snapshot();
        // A workload that left the model is being removed with its whole proxy (drain).
        let Some(workload) = snapshot.workload(&workload_uid).cloned() else {
            continue;
        };
        let closed = connections.reevaluate(&snapshot, &workload);
        if closed > 0 {
            tracing::info!(workload = %workload_uid, closed, "policy change closed connections");
        }
    }
}

#[cfg(test)]
mod tests;
