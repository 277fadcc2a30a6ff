//! The certificate cache (layer L2): one certificate per identity, issued on first use, shared
//! by every connection of that identity, rotated at half-life by a background task.
//!
//! Invariants: at most one issue per identity is in flight, and every caller waiting for that
//! identity shares it; after a failure, callers get that failure at once until its retry time
//! (only the retry starts a new issue); a certificate past half-life is still served while its replacement is
//! issued; an expired certificate is never served (fail closed). Times are tracked on tokio's
//! clock (so paused-clock tests drive rotation) and checked against the wall clock as well.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::Instrument;

use super::{CaError, CertificateSource, WorkloadCertificate};
use crate::spiffe::Identity;

/// First retry delay after a failed issue; doubled per consecutive failure.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest delay between retries.
const RETRY_CAP: Duration = Duration::from_secs(150);

/// What the manager has for one identity.
#[derive(Debug, Clone)]
pub struct CertificateStatus {
    /// The identity.
    pub identity: Identity,
    /// The certificate held, expired or not.
    pub certificate: Option<Arc<WorkloadCertificate>>,
    /// Whether it can be served, and if not, why.
    pub state: CertificateState,
}

/// The state of an identity's certificate, as ztunnel's dump names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateState {
    /// A valid certificate is served.
    Available,
    /// No certificate yet and no failure: the first issue is under way.
    Initializing,
    /// No valid certificate, because the last issue failed (with this error).
    Unavailable(String),
    /// The certificate held has expired and no issue has failed since.
    Expired,
}

impl std::fmt::Display for CertificateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateState::Available => f.write_str("Available"),
            CertificateState::Initializing => f.write_str("Initializing"),
            CertificateState::Unavailable(error) => write!(f, "Unavailable: {error}"),
            CertificateState::Expired => f.write_str("Expired"),
        }
    }
}

/// Why the manager has no certificate to give for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertificateError {
    /// The source failed and no unexpired certificate is cached.
    #[error("no certificate for {identity}: {source}")]
    Issue {
        /// The identity asked for.
        identity: Identity,
        /// The source's error, shared by every caller that waited on the issue.
        source: Arc<CaError>,
    },
    /// The source returned a certificate for another identity; it is refused.
    #[error("certificate source returned {got} when asked for {identity}")]
    IdentityMismatch {
        /// The identity asked for.
        identity: Identity,
        /// The identity in the returned leaf.
        got: Identity,
    },
    /// The source returned a certificate that is already expired.
    #[error("certificate source returned an expired certificate for {identity}")]
    AlreadyExpired {
        /// The identity asked for.
        identity: Identity,
    },
    /// The issue was stopped (identity forgotten or manager dropped) before it finished.
    #[error("certificate issue for {identity} was cancelled")]
    Cancelled {
        /// The identity asked for.
        identity: Identity,
    },
}

impl CertificateError {
    /// The kind of failure, as a metric label: a fixed set of values, never the identity or
    /// the source's message (those go to the log).
    pub fn reason(&self) -> &'static str {
        match self {
            CertificateError::Issue { .. } => "source_error",
            CertificateError::IdentityMismatch { .. } => "identity_mismatch",
            CertificateError::AlreadyExpired { .. } => "already_expired",
            CertificateError::Cancelled { .. } => "cancelled",
        }
    }
}

/// Told about every failed issue, whichever [`CertificateSource`] failed (the app counts them
/// in the metrics); a hook so that this layer needs no registry.
type FailureHook = Arc<dyn Fn(&CertificateError) + Send + Sync>;

type IssueResult = Result<Arc<WorkloadCertificate>, CertificateError>;
type SharedIssue = Shared<BoxFuture<'static, IssueResult>>;

/// Cache of workload certificates in front of a [`CertificateSource`].
pub struct CertificateManager {
    source: Arc<dyn CertificateSource>,
    /// Where issues run: the runtime `new` was called on (the control runtime), whichever
    /// runtime the waiting caller is on.
    runtime: tokio::runtime::Handle,
    entries: Arc<Mutex<HashMap<Identity, Entry>>>,
    /// Wakes the rotation task when an issue finishes or an identity is added.
    changed: Arc<Notify>,
    next_issue: AtomicU64,
    on_failure: FailureHook,
    /// Identities kept by [`CertificateManager::prefetch_only`], so that a later call forgets
    /// only what it prefetched, never an identity fetched on demand.
    prefetched: Mutex<HashSet<Identity>>,
}

struct Entry {
    current: Option<Current>,
    inflight: Option<Inflight>,
    /// Consecutive failed issues, for backoff.
    failures: u32,
    /// Background issues wait until then after a failure.
    retry_at: Option<Instant>,
    /// Why the last issue failed; cleared by a success.
    last_error: Option<CertificateError>,
}

struct Current {
    certificate: Arc<WorkloadCertificate>,
    /// Rotation time on tokio's clock and on the wall clock.
    refresh_at: Instant,
    refresh_wall: SystemTime,
    expires_at: Instant,
}

struct Inflight {
    id: u64,
    result: SharedIssue,
    abort: AbortHandle,
}

impl Current {
    /// Schedules rotation at half-life, but no earlier than half of the remaining lifetime: a
    /// certificate that arrives already past half-life (skewed CA clock, long-lived CA cache)
    /// must not turn rotation into a tight loop against the CA.
    fn new(certificate: Arc<WorkloadCertificate>) -> Self {
        let now = Instant::now();
        let wall = SystemTime::now();
        let remaining = certificate
            .expires_at()
            .duration_since(wall)
            .unwrap_or_default();
        let refresh_wall = certificate.refresh_at().max(wall + remaining / 2);
        let until = |at: SystemTime| now + at.duration_since(wall).unwrap_or_default();
        Current {
            refresh_at: until(refresh_wall),
            refresh_wall,
            expires_at: now + remaining,
            certificate,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        now >= self.expires_at || SystemTime::now() >= self.certificate.expires_at()
    }

    fn stale(&self, now: Instant) -> bool {
        now >= self.refresh_at || SystemTime::now() >= self.refresh_wall
    }
}

impl Entry {
    fn new() -> Self {
        Entry {
            current: None,
            inflight: None,
            failures: 0,
            retry_at: None,
            last_error: None,
        }
    }

    /// The unexpired certificate, if any.
    fn valid(&self, now: Instant) -> Option<&Current> {
        self.current
            .as_ref()
            .filter(|current| !current.expired(now))
    }

    /// The last failure, while no valid certificate is held, nothing is in flight and its retry
    /// time has not come: callers get it at once instead of each starting an issue (key
    /// generation and a CA call per unauthenticated connect would let anyone drive the CA).
    fn backing_off(&self, now: Instant) -> Option<&CertificateError> {
        if self.inflight.is_some() || self.valid(now).is_some() {
            return None;
        }
        match (self.retry_at, &self.last_error) {
            (Some(retry_at), Some(error)) if now < retry_at => Some(error),
            _ => None,
        }
    }

    /// When a background issue should start (`None`: one is running).
    fn due_at(&self, now: Instant) -> Option<Instant> {
        if self.inflight.is_some() {
            return None;
        }
        let wanted = match self.valid(now) {
            Some(current) if !current.stale(now) => current.refresh_at,
            _ => now,
        };
        Some(wanted.max(self.retry_at.unwrap_or(now)))
    }
}

impl CertificateManager {
    /// A manager with an empty cache. Issues run as tasks on the current runtime, so call it
    /// from the control runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(source: Arc<dyn CertificateSource>) -> Self {
        CertificateManager {
            source,
            runtime: tokio::runtime::Handle::current(),
            entries: Arc::new(Mutex::new(HashMap::new())),
            changed: Arc::new(Notify::new()),
            next_issue: AtomicU64::new(0),
            on_failure: Arc::new(|_| {}),
            prefetched: Mutex::new(HashSet::new()),
        }
    }

    /// Calls `hook` with the error of every issue that fails (a source error, a certificate for
    /// another identity, an expired one); not for issues cancelled by [`Self::forget`].
    pub fn on_failure(mut self, hook: impl Fn(&CertificateError) + Send + Sync + 'static) -> Self {
        self.on_failure = Arc::new(hook);
        self
    }

    /// The certificate of `identity`: the cached one if unexpired (starting a re-issue in the
    /// background once past half-life), otherwise waits for an issue, shared with every other
    /// caller waiting for the same identity. Cancel-safe: dropping the future does not stop the
    /// issue.
    pub async fn fetch(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let issue = {
            let mut entries = self.lock();
            let entry = entries.entry(identity.clone()).or_insert_with(Entry::new);
            let now = Instant::now();
            if let Some(current) = entry.valid(now) {
                let certificate = current.certificate.clone();
                if entry.due_at(now).is_some_and(|due| due <= now) {
                    self.start_issue(identity, entry);
                }
                return Ok(certificate);
            }
            if let Some(error) = entry.backing_off(now) {
                return Err(error.clone());
            }
            match &entry.inflight {
                Some(inflight) => inflight.result.clone(),
                None => self.start_issue(identity, entry).result.clone(),
            }
        };
        issue.await
    }

    /// Starts issuing a certificate for `identity` unless one is cached or in flight, without
    /// waiting, and keeps the identity under rotation from then on.
    pub fn prefetch(&self, identity: &Identity) {
        let mut entries = self.lock();
        let entry = entries.entry(identity.clone()).or_insert_with(Entry::new);
        let now = Instant::now();
        if entry.valid(now).is_none()
            && entry.inflight.is_none()
            && entry.backing_off(now).is_none()
        {
            self.start_issue(identity, entry);
        }
    }

    /// Keeps exactly `identities` prefetched and under rotation (the mesh workloads of this
    /// node, as Istio's node agent does): prefetches each, and forgets those an earlier call
    /// prefetched that are no longer in the set.
    pub fn prefetch_only(&self, identities: HashSet<Identity>) {
        let mut prefetched = self
            .prefetched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for gone in prefetched.difference(&identities) {
            self.forget(gone);
        }
        for identity in &identities {
            self.prefetch(identity);
        }
        *prefetched = identities;
    }

    /// Drops the cached certificate of `identity` and stops its rotation and any issue in
    /// flight. Open connections keep the config they hold.
    pub fn forget(&self, identity: &Identity) {
        let removed = self.lock().remove(identity);
        if let Some(inflight) = removed.and_then(|entry| entry.inflight) {
            inflight.abort.abort();
        }
    }

    /// `(identity, not_before, not_after)` of every cached certificate, sorted by identity,
    /// for the admin config dump.
    pub fn certificates(&self) -> Vec<(Identity, SystemTime, SystemTime)> {
        let mut certificates: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(identity, entry)| {
                let certificate = &entry.current.as_ref()?.certificate;
                Some((
                    identity.clone(),
                    certificate.not_before(),
                    certificate.expires_at(),
                ))
            })
            .collect();
        certificates.sort_by(|a, b| a.0.cmp(&b.0));
        certificates
    }

    /// Every identity the manager looks after, sorted, with its certificate (if it holds one)
    /// and its state, for the admin dump.
    pub fn statuses(&self) -> Vec<CertificateStatus> {
        let now = SystemTime::now();
        let mut statuses: Vec<CertificateStatus> = self
            .lock()
            .iter()
            .map(|(identity, entry)| {
                let certificate = entry
                    .current
                    .as_ref()
                    .map(|current| current.certificate.clone());
                let valid = certificate
                    .as_ref()
                    .is_some_and(|certificate| now < certificate.expires_at());
                let state = match (&certificate, &entry.last_error) {
                    _ if valid => CertificateState::Available,
                    (_, Some(error)) => CertificateState::Unavailable(error.to_string()),
                    (Some(_), None) => CertificateState::Expired,
                    (None, None) => CertificateState::Initializing,
                };
                CertificateStatus {
                    identity: identity.clone(),
                    certificate,
                    state,
                }
            })
            .collect();
        statuses.sort_by(|a, b| a.identity.cmp(&b.identity));
        statuses
    }

    /// Runs rotation until `shutdown` completes: re-issues each cached identity at half-life,
    /// and after a failure retries with capped exponential backoff and jitter, the old
    /// certificate staying in service while it is valid.
    pub fn spawn_rotation<F>(self: Arc<Self>, shutdown: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let span = tracing::info_span!("certificate_rotation");
        let runtime = self.runtime.clone();
        runtime.spawn(async move { self.rotate(shutdown).await }.instrument(span))
    }

    async fn rotate<F: Future<Output = ()>>(&self, shutdown: F) {
        tokio::pin!(shutdown);
        loop {
            let next = self.start_due_issues();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = self.changed.notified() => {}
                () = sleep => {}
            }
        }
        tracing::debug!("certificate rotation stopped");
    }

    /// Starts every issue that is due; returns when the next one will be.
    fn start_due_issues(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut entries = self.lock();
        let mut next: Option<Instant> = None;
        for (identity, entry) in entries.iter_mut() {
            let Some(due) = entry.due_at(now) else {
                continue;
            };
            if due <= now {
                tracing::debug!(%identity, "rotating certificate");
                self.start_issue(identity, entry);
            } else {
                next = Some(next.map_or(due, |next| next.min(due)));
            }
        }
        next
    }

    /// Spawns the issue task and records it in `entry` as the one in flight.
    fn start_issue<'e>(&self, identity: &Identity, entry: &'e mut Entry) -> &'e Inflight {
        let id = self.next_issue.fetch_add(1, Ordering::Relaxed);
        let source = self.source.clone();
        let entries = Arc::downgrade(&self.entries);
        let changed = self.changed.clone();
        let on_failure = self.on_failure.clone();
        let owned = identity.clone();
        let span = tracing::info_span!("certificate_issue", identity = %identity);
        let task = self.runtime.spawn(
            async move {
                let result = issue(source.as_ref(), &owned).await;
                if let Err(error) = &result {
                    on_failure(error);
                }
                record(&entries, &owned, id, &result);
                changed.notify_one();
                result
            }
            .instrument(span),
        );
        let abort = task.abort_handle();
        let identity = identity.clone();
        let result = async move {
            task.await
                .unwrap_or(Err(CertificateError::Cancelled { identity }))
        }
        .boxed()
        .shared();
        entry.inflight.insert(Inflight { id, result, abort })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        lock(&self.entries)
    }
}

impl Drop for CertificateManager {
    fn drop(&mut self) {
        for entry in self.lock().values() {
            if let Some(inflight) = &entry.inflight {
                inflight.abort.abort();
            }
        }
    }
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("source", &self.source)
            .field("identities", &self.lock().len())
            .finish()
    }
}

// A panic while holding the lock leaves the map consistent (every update is one assignment).
fn lock(entries: &Mutex<HashMap<Identity, Entry>>) -> MutexGuard<'_, HashMap<Identity, Entry>> {
    entries.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks the source and checks the answer is for `identity` and still valid.
async fn issue(source: &dyn CertificateSource, identity: &Identity) -> IssueResult {
    let certificate = source
        .fetch(identity)
        .await
        .map_err(|error| CertificateError::Issue {
            identity: identity.clone(),
            source: Arc::new(error),
        })?;
    if certificate.identity() != identity {
        return Err(CertificateError::IdentityMismatch {
            identity: identity.clone(),
            got: certificate.identity().clone(),
        });
    }
    if SystemTime::now() >= certificate.expires_at() {
        return Err(CertificateError::AlreadyExpired {
            identity: identity.clone(),
        });
    }
    Ok(Arc::new(certificate))
}

/// Stores the outcome of issue `id`, unless the identity was forgotten or a newer issue
/// replaced it meanwhile.
fn record(
    entries: &Weak<Mutex<HashMap<Identity, Entry>>>,
    identity: &Identity,
    id: u64,
    result: &IssueResult,
) {
    let Some(entries) = entries.upgrade() else {
        return;
    };
    let mut entries = lock(&entries);
    let Some(entry) = entries.get_mut(identity) else {
        return;
    };
    if entry.inflight.as_ref().map(|inflight| inflight.id) != Some(id) {
        return;
    }
    entry.inflight = None;
    let now = Instant::now();
    match result {
        Ok(certificate) => {
            tracing::info!(expires_at = ?certificate.expires_at(), "certificate issued");
            entry.current = Some(Current::new(certificate.clone()));
            entry.failures = 0;
            entry.retry_at = None;
            entry.last_error = None;
        }
        Err(error) => {
            entry.failures = entry.failures.saturating_add(1);
            let delay = retry_delay(entry.failures, rand::random::<f64>());
            // Retry before the old certificate runs out; once it has, drop it (fail closed).
            let mut retry_at = now + delay;
            match &entry.current {
                Some(current) if current.expired(now) => entry.current = None,
                Some(current) => retry_at = retry_at.min(current.expires_at),
                None => {}
            }
            entry.retry_at = Some(retry_at);
            entry.last_error = Some(error.clone());
            tracing::warn!(%error, failures = entry.failures, retry_in = ?delay, "certificate issue failed");
        }
    }
}

/// Backoff before retry number `failures` (≥ 1): 1 s doubling up to 150 s, then spread by ±20%
/// using `jitter` in `[0, 1)` so agents that failed together do not retry together.
fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base = RETRY_BASE.saturating_mul(1 << exponent).min(RETRY_CAP);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_caps_and_jitters() {
        let cases: &[(u32, f64, Duration)] = &[
            (1, 0.5, Duration::from_secs(1)),
            (2, 0.5, Duration::from_secs(2)),
            (5, 0.5, Duration::from_secs(16)),
            (8, 0.5, Duration::from_secs(128)),
            (9, 0.5, Duration::from_secs(150)),
            (u32::MAX, 0.5, Duration::from_secs(150)),
            (1, 0.0, Duration::from_millis(800)),
            (9, 1.0, Duration::from_secs(180)),
        ];
        for (failures, jitter, expected) in cases {
            assert_eq!(
                retry_delay(*failures, *jitter),
                *expected,
                "failure {failures}, jitter {jitter}"
            );
        }
    }
}
