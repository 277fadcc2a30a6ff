//! Hot reload of the config file (layer L1, part of `config`).
//!
//! [`run`] polls the file (and the policy directories it names) and publishes each new valid
//! [`Config`] on a `watch` channel; the app turns it into a state snapshot and a pod reconcile.
//! A bad edit is rejected whole: its errors are logged once and the last good config stays
//! published. Istio resources that are left out or changed ([`super::istio::PolicyFinding`])
//! are not errors: they are logged as warnings at start-up and whenever they change.
//!
//! Why poll instead of inotify: a Kubernetes ConfigMap volume updates by swapping a `..data`
//! symlink to a new directory, so a watch on the file itself never fires (and editors that
//! write-then-rename do the same). Reading the (small) file every interval and comparing a hash
//! of its content is simple and sees every kind of update. Size and mtime alone are not enough:
//! two writes of equal size inside one coarse mtime tick look identical.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::{parse, Config, Overrides};

/// What the watcher remembers between polls.
#[derive(Debug, Default)]
struct Seen {
    /// Hash of the last content that was handled (good or bad), so a `touch` or a rewrite with
    /// the same bytes neither republishes nor re-logs.
    content: Option<u64>,
    /// The file could not be read at the last poll (warned once, not every poll).
    unreadable: bool,
    /// The last valid parse of the file, without policy directories; `None` while the file is
    /// invalid.
    parsed: Option<Config>,
    /// Hash of the policy directories' files (paths and contents) last handled, or of the
    /// error reading them.
    policy_files: Option<u64>,
}

/// Polls `path` every `interval` until `shutdown` completes, publishing each valid config that
/// differs from the last one. `last` is the config already in use (loaded at start-up); a bad
/// edit leaves it in place.
#[tracing::instrument(name = "config_watch", skip_all, fields(path = %path.display()))]
pub async fn run(
    path: PathBuf,
    overrides: Overrides,
    interval: Duration,
    last: Arc<Config>,
    publish: tokio::sync::watch::Sender<Arc<Config>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut last = last;
    log_findings(&last, None);
    let mut seen = Seen::default();
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let Some(next) = poll(&path, &overrides, &mut seen).await else {
            continue;
        };
        // The first poll sees what start-up loaded, and an edit may only touch comments:
        // consumers hear about real changes only.
        if next == *last {
            continue;
        }
        log_changes(&last, &next);
        log_findings(&next, Some(&last));
        last = Arc::new(next);
        // No receivers left only means nobody listens any more; keep polling until shutdown.
        let _ = publish.send(last.clone());
    }
}

/// One poll: a new valid config if the file changed to one, otherwise `None` (after logging
/// whatever needs logging).
async fn poll(path: &Path, overrides: &Overrides, seen: &mut Seen) -> Option<Config> {
    // Reading and parsing a large file takes a while: off the runtime's workers, which carry
    // connections.
    let owned = path.to_path_buf();
    let read =
        tokio::task::spawn_blocking(move || super::read_capped(&owned, super::MAX_CONFIG_FILE))
            .await;
    let text = match read {
        Ok(Ok(text)) => text,
        Ok(Err(error)) => {
            if !seen.unreadable {
                // NotFound is the usual case: the file was deleted or a symlink swap is
                // half-way.
                warn!(path = %path.display(), %error, "cannot read config file; keeping the last good config");
                seen.unreadable = true;
            }
            return None;
        }
        Err(error) => {
            warn!(%error, "config read task failed; keeping the last good config");
            return None;
        }
    };
    if seen.unreadable {
        info!(path = %path.display(), "config file is readable again");
        seen.unreadable = false;
    }
    let content = hash(text.as_bytes());
    let file_changed = seen.content != Some(content);
    if file_changed {
        seen.content = Some(content);
        let (owned, overrides) = (path.to_path_buf(), overrides.clone());
        let parsed = tokio::task::spawn_blocking(move || parse(&owned, &text, &overrides)).await;
        seen.parsed = match parsed {
            Ok(Ok(config)) => Some(config),
            Ok(Err(errors)) => {
                reject(path, &errors);
                None
            }
            Err(error) => {
                warn!(%error, "config parse task failed; keeping the last good config");
                None
            }
        };
    }
    let parsed = seen.parsed.as_ref()?;
    let dirs = parsed.agent.authorization.policy_dirs.clone();
    let files = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || super::istio::read_policy_dirs(&path, &dirs))
            .await
            .ok()?
    };
    let files_hash = match &files {
        Ok(files) => hash_files(files),
        Err(errors) => hash(errors.to_string().as_bytes()),
    };
    if !file_changed && seen.policy_files == Some(files_hash) {
        return None;
    }
    seen.policy_files = Some(files_hash);
    match files {
        Ok(files) => {
            let mut config = parsed.clone();
            config.add_policy_files(&files);
            Some(config)
        }
        Err(errors) => {
            reject(path, &errors);
            None
        }
    }
}

fn reject(path: &Path, errors: &super::ConfigErrors) {
    for problem in &errors.0 {
        error!(error = %problem, "config error");
    }
    error!(
        path = %path.display(),
        errors = errors.0.len(),
        "config update rejected; keeping the last good config"
    );
}

fn hash_files(files: &[super::istio::PolicyFile]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for file in files {
        file.path.hash(&mut hasher);
        file.text.hash(&mut hasher);
    }
    hasher.finish()
}

/// Logs the Istio resources left out or changed, once per distinct set: everything at
/// start-up (`previous` is `None`), then only what a reload adds.
fn log_findings(config: &Config, previous: Option<&Config>) {
    for finding in &config.istio.findings {
        if previous.is_some_and(|previous| previous.istio.findings.contains(finding)) {
            continue;
        }
        warn!(
            location = %finding.location,
            kind = ?finding.kind,
            reason = %finding.message,
            "Istio resource not applied as written"
        );
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Logs what a reload changes: counts at info, and a warning for fields that are only read at
/// start-up (they stay in effect until a restart; the rest of the update applies).
fn log_changes(old: &Config, new: &Config) {
    info!(
        path = %new.path.display(),
        workloads.before = old.workloads.len(),
        workloads.after = new.workloads.len(),
        services.before = old.services.len(),
        services.after = new.services.len(),
        policies.before = old.policies.len(),
        policies.after = new.policies.len(),
        istio_policies.before = old.istio.policies.len(),
        istio_policies.after = new.istio.policies.len(),
        peer_authentications.before = old.istio.peer_authentications.len(),
        peer_authentications.after = new.istio.peer_authentications.len(),
        pods.before = old.agent.pods.len(),
        pods.after = new.agent.pods.len(),
        "config reloaded"
    );
    for field in restart_fields(old, new) {
        warn!(field, "config change needs a restart to take effect");
    }
}

/// Fields that differ between `old` and `new` and are only read at start-up.
pub(crate) fn restart_fields(old: &Config, new: &Config) -> Vec<&'static str> {
    let (old, new) = (&old.agent, &new.agent);
    let checks = [
        ("agent.listen.admin", old.listen.admin != new.listen.admin),
        (
            "agent.listen.metrics",
            old.listen.metrics != new.listen.metrics,
        ),
        (
            "agent.listen.readiness",
            old.listen.readiness != new.listen.readiness,
        ),
        ("agent.ca.certFile", old.ca.cert_file != new.ca.cert_file),
        ("agent.ca.keyFile", old.ca.key_file != new.ca.key_file),
        // Every pod's proxy and socket factory take these once, at start-up (`app::Agent`).
        ("agent.proxy", old.proxy != new.proxy),
        ("agent.pool", old.pool != new.pool),
    ];
    checks
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
}
