//! Pod capture (layer L4): the set of local pods and, for each, a workload proxy whose
//! listeners live inside the pod's network namespace.
//!
//! The desired set comes from a pod source (the `agent.pods` list of the local config today;
//! istio-cni's ZDS later) and is reconciled here: new pods get their namespace opened, their
//! listeners bound on a thread inside that namespace and their proxy started in a drain scope
//! of their own; pods that left are terminated (their listeners and connections cut, nothing
//! else touched); a pod whose namespace changed is replaced. A pod that fails to start is
//! reported with the reason and retried on the next reconcile; the others carry on.
//!
//! Pods are independent: each has an entry in one map, with a lock of its own that its start
//! and stop hold. The map's lock is only taken for lookups and summaries, never across a start,
//! so one slow pod (a replaced proxy draining, the listener thread, `nft`) delays nothing else.

mod return_path;
pub mod rules;
pub mod zds;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::dns::{DnsInputs, DnsListeners, DnsProxy};
use crate::drain::Drain;
use crate::proxy::{Listeners, ProxyInputs, WorkloadProxy};
use crate::socket::{SocketError, SocketFactory};
use crate::state::learned::LearnedDestinations;
use crate::sys::{Netns, NetnsId};
use crate::telemetry::Metrics;

/// A pod the agent should capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPod {
    /// The workload uid in the model.
    pub uid: String,
    /// Where the pod's network namespace is.
    pub netns: PathBuf,
}

/// Why a pod could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The redirection rules could not be installed.
    #[error("redirection rules in {path}: {source}")]
    Rules {
        /// The path.
        path: PathBuf,
        /// Why.
        source: rules::RulesError,
    },
    /// The namespace path could not be opened.
    #[error("open network namespace {path}: {source}")]
    OpenNetns {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listeners could not be created in the namespace.
    #[error("listeners in {path}: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        source: SocketError,
    },
    /// The namespace thread failed.
    #[error("entering {path}: {source}")]
    Thread {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

struct RunningPod {
    netns: Arc<Netns>,
    netns_id: NetnsId,
    netns_path: PathBuf,
    proxy: Arc<WorkloadProxy>,
    drain: Drain,
    /// The redirection rules we installed in the pod (and must remove, unless another agent
    /// has taken them over).
    rules: Option<rules::InstalledTable>,
}

/// A pod's slot in the manager's one map.
///
/// `lifecycle` serializes the starts and stops of this pod only: it is held across the slow
/// parts of a start (draining a replaced proxy, the listener thread, `nft`), while the map's
/// own lock is only held to look an entry up or update its summary, never across an `.await`.
struct PodEntry {
    /// Who asked for the pod last.
    source: PodSource,
    /// The running pod, if any; locked by whoever starts or stops it.
    lifecycle: Arc<tokio::sync::Mutex<Option<RunningPod>>>,
    /// The running pod's proxy, for readers that must not wait for a start (admin).
    proxy: Option<Arc<WorkloadProxy>>,
    /// The outcome of the last start attempt; `None` while the first one runs.
    status: Option<PodStatus>,
}

/// Lets a test hold one pod's start at its beginning (inside its lifecycle lock).
#[cfg(test)]
type StartHook = Arc<
    dyn Fn(&str) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// Who asked for a pod. Each source reconciles only its own pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PodSource {
    /// `agent.pods` in the config file.
    Config,
    /// Added at run time through the admin API (`nodetunnel pod add`).
    Api,
    /// istio-cni over ZDS; the CNI owns the redirection rules.
    Cni,
}

/// What [`PodManager::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new proxy was started.
    Started,
    /// The pod already ran in the same namespace; nothing changed.
    Unchanged,
    /// The pod ran in another namespace; its old proxy was replaced.
    Replaced,
}

/// The status of one pod, for readiness and the admin API (`/pods`, which `nodetunnel pod list`
/// reads back into this type).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum PodStatus {
    /// Listeners are up.
    Running {
        /// The namespace path.
        netns: PathBuf,
        /// Who added it.
        source: PodSource,
    },
    /// The last attempt failed; it will be retried.
    Failed {
        /// The namespace path.
        netns: PathBuf,
        /// Who added it.
        source: PodSource,
        /// Why.
        reason: String,
    },
}

/// Owns every captured pod's proxy. Pods start and stop independently: one pod's slow start
/// never holds up another pod's add or remove.
pub struct PodManager {
    inputs: ProxyInputs,
    home: Arc<Netns>,
    mark: u32,
    /// Rules installed in config/API pods when the agent owns redirection (standalone).
    rules: Option<rules::RedirectRules>,
    /// Every pod's DNS proxy (15053), unless DNS is off.
    dns: Option<DnsInputs>,
    drain: Drain,
    /// Every known pod (running, starting or failed), by workload uid.
    pods: Mutex<HashMap<String, PodEntry>>,
    /// Set once the config's pod list has been reconciled for the first time: until then the
    /// agent is not ready, even though no pod has failed yet.
    config_synced: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    start_hook: Option<StartHook>,
}

impl PodManager {
    /// A manager whose pods' drain scopes are children of `drain`. `home` is the agent's own
    /// namespace; `mark` goes on every socket made in a pod.
    /// With `rules` set, the agent installs redirection rules in the pods it captures from the
    /// config or the admin API (never in CNI pods, whose rules istio-cni owns).
    pub fn new(
        inputs: ProxyInputs,
        home: Arc<Netns>,
        mark: u32,
        rules: Option<rules::RedirectRules>,
        drain: Drain,
    ) -> Self {
        PodManager {
            inputs,
            home,
            mark,
            rules,
            dns: None,
            drain,
            pods: Mutex::new(HashMap::new()),
            config_synced: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            start_hook: None,
        }
    }

    /// Gives every pod started from now on a DNS proxy on 15053 (in its listener set, drain
    /// scope and socket factory).
    pub fn with_dns(mut self, dns: DnsInputs) -> Self {
        self.dns = Some(dns);
        self
    }

    /// Brings the config-sourced pods in line with `desired`: pods not listed are removed, listed
    /// ones started (or replaced if their namespace changed), all at once. Returns how many pods
    /// failed; they stay listed as failed (readiness reports them) until a later reconcile
    /// succeeds.
    pub async fn reconcile(&self, desired: &[DesiredPod]) -> usize {
        let wanted: std::collections::HashSet<&str> =
            desired.iter().map(|pod| pod.uid.as_str()).collect();
        self.retain_source(PodSource::Config, |uid| wanted.contains(uid))
            .await;
        let added =
            futures_util::future::join_all(desired.iter().map(|pod| self.reconcile_one(pod)));
        let failures = added.await.into_iter().filter(Result::is_err).count();
        self.config_synced
            .store(true, std::sync::atomic::Ordering::Release);
        failures
    }

    async fn reconcile_one(&self, pod: &DesiredPod) -> Result<AddOutcome, CaptureError> {
        match Netns::open(&pod.netns) {
            Ok(netns) => self.add_from(PodSource::Config, &pod.uid, netns).await,
            Err(source) => {
                // The namespace is gone (pod deleted): release our fd and listeners now.
                self.remove(&pod.uid).await;
                let error = CaptureError::OpenNetns {
                    path: pod.netns.clone(),
                    source,
                };
                self.set_status(&pod.uid, PodSource::Config, &pod.netns, Some(&error), None);
                Err(error)
            }
        }
    }

    /// Starts the proxy of `uid` in `netns`. Idempotent for the same namespace (dev + inode);
    /// a different namespace for a running uid means the pod was recreated: the old proxy is
    /// terminated and a new one started.
    /// Used by istio-cni (ZDS), which owns the pod's redirection rules.
    pub async fn add(&self, uid: &str, netns: Netns) -> Result<AddOutcome, CaptureError> {
        self.add_from(PodSource::Cni, uid, netns).await
    }

    /// [`PodManager::add`] for a given source; config and API pods get redirection rules when
    /// the agent owns them. Waits only for an earlier start or stop of the same pod.
    pub async fn add_from(
        &self,
        source: PodSource,
        uid: &str,
        netns: Netns,
    ) -> Result<AddOutcome, CaptureError> {
        let path = netns.path().to_path_buf();
        loop {
            let lifecycle = self.entry(uid, source);
            let mut running = lifecycle.lock().await;
            if !self.is_current(uid, &lifecycle) {
                // Removed while we waited: start over in a fresh entry.
                continue;
            }
            let result = self.start(&mut running, source, uid, netns).await;
            let proxy = running.as_ref().map(|pod| pod.proxy.clone());
            self.set_status(uid, source, &path, result.as_ref().err(), proxy);
            drop(running);
            if let Err(error) = &result {
                tracing::error!(workload = %uid, %error, "cannot capture pod");
            }
            return result;
        }
    }

    /// Stops the proxy of `uid`: its listeners close and its connections are cut at once.
    /// Returns whether it was running.
    pub async fn remove(&self, uid: &str) -> bool {
        let Some(pod) = self.take(uid).await else {
            return false;
        };
        tracing::info!(workload = %uid, netns = %pod.netns_path.display(), "pod removed; draining its proxy");
        stop(pod, &self.inputs.metrics).await;
        true
    }

    /// Removes every pod (clean shutdown: our rules must not outlive us).
    pub async fn remove_all(&self) {
        let uids: Vec<String> = self.lock().keys().cloned().collect();
        for uid in uids {
            if let Some(pod) = self.take(&uid).await {
                stop(pod, &self.inputs.metrics).await;
            }
        }
    }

    /// Takes `uid` out of the map once no start or stop of it runs, and returns its running pod.
    async fn take(&self, uid: &str) -> Option<RunningPod> {
        let lifecycle = self.lock().get(uid)?.lifecycle.clone();
        let mut running = lifecycle.lock().await;
        if self.is_current(uid, &lifecycle) {
            self.lock().remove(uid);
        }
        running.take()
    }

    /// Like [`PodManager::retain`], limited to the pods of one source.
    pub async fn retain_source(
        &self,
        source: PodSource,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let of_source: std::collections::HashSet<String> = self
            .lock()
            .iter()
            .filter(|(_, entry)| entry.source == source)
            .map(|(uid, _)| uid.clone())
            .collect();
        self.retain(|uid| !of_source.contains(uid) || keep(uid))
            .await
    }

    /// Removes every pod for which `keep` is false (snapshot reconciliation). Returns the uids
    /// removed.
    pub async fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let known: Vec<String> = self.lock().keys().cloned().collect();
        let mut removed = Vec::new();
        for uid in known {
            if !keep(&uid) {
                self.remove(&uid).await;
                removed.push(uid);
            }
        }
        removed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodEntry>> {
        // Every critical section is a single lookup or update, so a poisoned map is consistent.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lifecycle lock of `uid`, creating its entry if it is new.
    fn entry(&self, uid: &str, source: PodSource) -> Arc<tokio::sync::Mutex<Option<RunningPod>>> {
        let mut pods = self.lock();
        let entry = pods.entry(uid.to_string()).or_insert_with(|| PodEntry {
            source,
            lifecycle: Arc::default(),
            proxy: None,
            status: None,
        });
        entry.source = source;
        entry.lifecycle.clone()
    }

    /// Whether `lifecycle` is still the entry of `uid` (not removed while someone waited on it).
    fn is_current(
        &self,
        uid: &str,
        lifecycle: &Arc<tokio::sync::Mutex<Option<RunningPod>>>,
    ) -> bool {
        self.lock()
            .get(uid)
            .is_some_and(|entry| Arc::ptr_eq(&entry.lifecycle, lifecycle))
    }

    async fn start(
        &self,
        running: &mut Option<RunningPod>,
        source: PodSource,
        uid: &str,
        netns: Netns,
    ) -> Result<AddOutcome, CaptureError> {
        #[cfg(test)]
        if let Some(hook) = &self.start_hook {
            hook(uid).await;
        }
        let mut outcome = AddOutcome::Started;
        if let Some(current) = running.as_ref() {
            if current.netns_id == netns.id() {
                return Ok(AddOutcome::Unchanged);
            }
            tracing::info!(workload = %uid, "pod network namespace changed; replacing its proxy");
            if let Some(old) = running.take() {
                stop(old, &self.inputs.metrics).await;
            }
            outcome = AddOutcome::Replaced;
        }
        let path = netns.path().to_path_buf();
        let netns = Arc::new(netns);
        let sockets = SocketFactory::pod(netns.clone(), self.home.clone(), self.mark)
            .with_network_congestion(self.inputs.settings.proxy.congestion_control.as_deref());
        let copies = WorkloadProxy::listener_copies(&self.inputs);
        let (listeners, dns_listeners) =
            bind_listeners(netns.clone(), sockets.clone(), self.dns.is_some(), copies).await?;
        let drain = self.drain.child();
        // One learned set per pod, shared by its DNS proxy (writer) and its workload proxy
        // (reader); it goes with them when the pod goes. Without DNS it stays empty.
        let limits = self
            .dns
            .as_ref()
            .map(|dns| dns.settings.learned)
            .unwrap_or_default();
        let learned = Arc::new(LearnedDestinations::new(limits));
        let proxy = WorkloadProxy::new(
            self.inputs.clone(),
            uid.to_string(),
            sockets.clone(),
            drain.clone(),
            learned.clone(),
        );
        proxy.spawn(listeners);
        if let (Some(inputs), Some(dns_listeners)) = (&self.dns, dns_listeners) {
            DnsProxy::new(
                inputs.clone(),
                uid.to_string(),
                sockets.clone(),
                drain.clone(),
                learned,
            )
            .spawn(dns_listeners);
        }
        self.inputs.metrics.proxy_started();
        let rules = self.rules.clone().filter(|_| source != PodSource::Cni);
        let mut pod = RunningPod {
            netns: netns.clone(),
            netns_id: netns.id(),
            netns_path: path.clone(),
            proxy,
            drain,
            rules: None,
        };
        if let Some(rules) = rules {
            let installed = tokio::task::spawn_blocking(move || rules.install(&netns))
                .await
                .unwrap_or_else(|join| Err(rules::RulesError::Netns(std::io::Error::other(join))));
            match installed {
                Ok(table) => pod.rules = Some(table),
                Err(source) => {
                    stop(pod, &self.inputs.metrics).await;
                    return Err(CaptureError::Rules { path, source });
                }
            }
        }
        *running = Some(pod);
        Ok(outcome)
    }

    /// Records the outcome of a start attempt (and the proxy now running, if any).
    fn set_status(
        &self,
        uid: &str,
        source: PodSource,
        netns: &std::path::Path,
        error: Option<&CaptureError>,
        proxy: Option<Arc<WorkloadProxy>>,
    ) {
        let status = match error {
            None => PodStatus::Running {
                netns: netns.to_path_buf(),
                source,
            },
            Some(error) => PodStatus::Failed {
                netns: netns.to_path_buf(),
                source,
                reason: error.to_string(),
            },
        };
        let mut pods = self.lock();
        let entry = pods.entry(uid.to_string()).or_insert_with(|| PodEntry {
            source,
            lifecycle: Arc::default(),
            proxy: None,
            status: None,
        });
        entry.status = Some(status);
        entry.proxy = proxy;
    }

    /// Status of every known pod whose first start attempt has ended.
    pub fn status(&self) -> BTreeMap<String, PodStatus> {
        self.lock()
            .iter()
            .filter_map(|(uid, entry)| Some((uid.clone(), entry.status.clone()?)))
            .collect()
    }

    /// Every running pod's DNS-learned egress set, by workload uid (admin dump).
    pub fn learned(&self) -> BTreeMap<String, Arc<LearnedDestinations>> {
        self.lock()
            .iter()
            .filter_map(|(uid, entry)| Some((uid.clone(), entry.proxy.as_ref()?.learned().clone())))
            .collect()
    }

    /// What readiness still waits for: the initial config pod set, and pods that failed.
    pub fn pending(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self
            .config_synced
            .load(std::sync::atomic::Ordering::Acquire)
        {
            pending.push("initial pod set".to_string());
        }
        pending.extend(
            self.status()
                .into_iter()
                .filter(|(_, status)| matches!(status, PodStatus::Failed { .. }))
                .map(|(uid, _)| uid),
        );
        pending
    }

    /// Pooled HBONE connections per running pod.
    pub async fn pooled_connections(&self) -> BTreeMap<String, usize> {
        self.lock()
            .iter()
            .filter_map(|(uid, entry)| {
                Some((uid.clone(), entry.proxy.as_ref()?.pooled_connections()))
            })
            .collect()
    }
}

/// Binds `copies` of the pod's listeners (and its DNS listeners with `with_dns`) on a thread
/// inside its namespace, off the runtime's workers.
async fn bind_listeners(
    netns: Arc<Netns>,
    sockets: SocketFactory,
    with_dns: bool,
    copies: usize,
) -> Result<(Listeners, Option<DnsListeners>), CaptureError> {
    let path = netns.path().to_path_buf();
    // A blocking-pool thread has the runtime context that registering the sockets with tokio
    // needs; the namespace thread below enters it too.
    let runtime = tokio::runtime::Handle::current();
    let bound = tokio::task::spawn_blocking(move || {
        netns.run_on_thread(|| {
            if let Err(error) = crate::sys::enable_listener_migration() {
                // Only a hand-over between agents needs it; without it, the few connections
                // queued on the old agent's listeners when it closes them are reset.
                tracing::debug!(%error, "cannot set net.ipv4.tcp_migrate_req in the pod");
            }
            let _context = runtime.enter();
            let listeners = Listeners::bind(&sockets, copies)?;
            let dns = with_dns.then(|| DnsListeners::bind(&sockets)).transpose()?;
            Ok::<_, SocketError>((listeners, dns))
        })
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    bound
        .map_err(|source| CaptureError::Thread {
            path: path.clone(),
            source,
        })?
        .map_err(|source| CaptureError::Listen { path, source })
}

impl PodStatus {
    /// Who added the pod.
    pub fn source(&self) -> PodSource {
        match self {
            PodStatus::Running { source, .. } | PodStatus::Failed { source, .. } => *source,
        }
    }
}

/// Cuts a pod's connections, closes its listeners and removes the rules we installed.
async fn stop(pod: RunningPod, metrics: &Metrics) {
    pod.drain.terminate().await;
    metrics.proxy_stopped();
    if let Some(table) = pod.rules {
        let netns = pod.netns.clone();
        let removed =
            tokio::task::spawn_blocking(move || rules::RedirectRules::remove(&netns, table)).await;
        match removed {
            Ok(Ok(rules::Removal::TakenOver)) => {
                tracing::info!(netns = %pod.netns_path.display(), "another agent took over the pod's redirection rules; leaving them");
            }
            Ok(Ok(rules::Removal::Removed)) => {}
            Ok(Err(error)) => {
                tracing::warn!(netns = %pod.netns_path.display(), %error, "could not remove redirection rules");
            }
            Err(error) => {
                tracing::warn!(netns = %pod.netns_path.display(), %error, "could not remove redirection rules");
            }
        }
    }
}

#[cfg(test)]
mod tests;
