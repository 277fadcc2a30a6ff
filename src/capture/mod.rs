//! Pod capture (layer L4): the set of local pods and, for each, a workload proxy whose
//! listeners live inside the pod's network namespace.
//!
//! The desired set comes from a pod source (the `agent.pods` list of the local config today;
//! istio-cni's ZDS later) and is reconciled here: new pods get their namespace opened, their
//! listeners bound on a thread inside that namespace and their proxy started in a drain scope
//! of their own; pods that left are terminated (their listeners and connections cut, nothing
//! else touched); a pod whose namespace changed is replaced. A pod that fails to start is
//! reported with the reason and retried on the next reconcile; the others carry on.

pub mod rules;
pub mod zds;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::dns::{DnsInputs, DnsListeners, DnsProxy};
use crate::drain::Drain;
use crate::proxy::{Listeners, ProxyInputs, WorkloadProxy};
use crate::socket::{SocketError, SocketFactory};
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
    source: PodSource,
    netns: Arc<Netns>,
    netns_id: NetnsId,
    netns_path: PathBuf,
    proxy: Arc<WorkloadProxy>,
    drain: Drain,
    /// Whether we installed redirection rules in the pod (and must remove them).
    rules_installed: bool,
}

/// Who asked for a pod. Each source reconciles only its own pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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

/// The status of one pod, for readiness and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// Owns every captured pod's proxy.
pub struct PodManager {
    inputs: ProxyInputs,
    home: Arc<Netns>,
    mark: u32,
    /// Rules installed in config/API pods when the agent owns redirection (standalone).
    rules: Option<rules::RedirectRules>,
    /// Every pod's DNS proxy (15053), unless DNS is off.
    dns: Option<DnsInputs>,
    drain: Drain,
    running: tokio::sync::Mutex<HashMap<String, RunningPod>>,
    status: Mutex<BTreeMap<String, PodStatus>>,
    /// Set once the config's pod list has been reconciled for the first time: until then the
    /// agent is not ready, even though no pod has failed yet.
    config_synced: std::sync::atomic::AtomicBool,
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
            running: tokio::sync::Mutex::new(HashMap::new()),
            status: Mutex::new(BTreeMap::new()),
            config_synced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Gives every pod started from now on a DNS proxy on 15053 (in its listener set, drain
    /// scope and socket factory).
    pub fn with_dns(mut self, dns: DnsInputs) -> Self {
        self.dns = Some(dns);
        self
    }

    /// Brings the config-sourced pods in line with `desired`: pods not listed are removed, listed
    /// ones started (or replaced if their namespace changed). Returns how many pods failed; they
    /// stay listed as failed (readiness reports them) until a later reconcile succeeds.
    pub async fn reconcile(&self, desired: &[DesiredPod]) -> usize {
        let wanted: std::collections::HashSet<&str> =
            desired.iter().map(|pod| pod.uid.as_str()).collect();
        self.retain_source(PodSource::Config, |uid| wanted.contains(uid))
            .await;
        let mut failures = 0;
        for pod in desired {
            let opened = Netns::open(&pod.netns).map_err(|source| CaptureError::OpenNetns {
                path: pod.netns.clone(),
                source,
            });
            if opened.is_err() {
                // The namespace is gone (pod deleted): release our fd and listeners now.
                self.remove(&pod.uid).await;
            }
            let added = match opened {
                Ok(netns) => self.add_from(PodSource::Config, &pod.uid, netns).await,
                Err(error) => {
                    self.set_status(&pod.uid, PodSource::Config, &pod.netns, Some(&error));
                    Err(error)
                }
            };
            if added.is_err() {
                failures += 1;
            }
        }
        self.config_synced
            .store(true, std::sync::atomic::Ordering::Release);
        failures
    }

    /// Starts the proxy of `uid` in `netns`. Idempotent for the same namespace (dev + inode);
    /// a different namespace for a running uid means the pod was recreated: the old proxy is
    /// terminated and a new one started.
    /// Used by istio-cni (ZDS), which owns the pod's redirection rules.
    pub async fn add(&self, uid: &str, netns: Netns) -> Result<AddOutcome, CaptureError> {
        self.add_from(PodSource::Cni, uid, netns).await
    }

    /// [`PodManager::add`] for a given source; config and API pods get redirection rules when
    /// the agent owns them.
    pub async fn add_from(
        &self,
        source: PodSource,
        uid: &str,
        netns: Netns,
    ) -> Result<AddOutcome, CaptureError> {
        let path = netns.path().to_path_buf();
        let mut running = self.running.lock().await;
        let result = self.start(&mut running, source, uid, netns).await;
        drop(running);
        self.set_status(uid, source, &path, result.as_ref().err());
        if let Err(error) = &result {
            tracing::error!(workload = %uid, %error, "cannot capture pod");
        }
        result
    }

    /// Stops the proxy of `uid`: its listeners close and its connections are cut at once.
    /// Returns whether it was running.
    pub async fn remove(&self, uid: &str) -> bool {
        let removed = self.running.lock().await.remove(uid);
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        let Some(pod) = removed else {
            return false;
        };
        tracing::info!(workload = %uid, netns = %pod.netns_path.display(), "pod removed; draining its proxy");
        stop(pod, &self.inputs.metrics).await;
        true
    }

    /// Removes every pod (clean shutdown: our rules must not outlive us).
    pub async fn remove_all(&self) {
        let pods: Vec<RunningPod> = self
            .running
            .lock()
            .await
            .drain()
            .map(|(_, pod)| pod)
            .collect();
        for pod in pods {
            stop(pod, &self.inputs.metrics).await;
        }
    }

    /// Like [`PodManager::retain`], limited to the pods of one source.
    pub async fn retain_source(
        &self,
        source: PodSource,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let of_source: std::collections::HashSet<String> = {
            let running = self.running.lock().await;
            let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            running
                .iter()
                .filter(|(_, pod)| pod.source == source)
                .map(|(uid, _)| uid.clone())
                .chain(
                    status
                        .iter()
                        .filter(|(_, state)| state.source() == source)
                        .map(|(uid, _)| uid.clone()),
                )
                .collect()
        };
        self.retain(|uid| !of_source.contains(uid) || keep(uid))
            .await
    }

    /// Removes every pod for which `keep` is false (snapshot reconciliation). Returns the uids
    /// removed.
    pub async fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let known: Vec<String> = {
            let running = self.running.lock().await;
            let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            running.keys().chain(status.keys()).cloned().collect()
        };
        let mut removed = Vec::new();
        for uid in known {
            if !keep(&uid) && !removed.contains(&uid) {
                self.remove(&uid).await;
                removed.push(uid);
            }
        }
        removed
    }

    async fn start(
        &self,
        running: &mut HashMap<String, RunningPod>,
        source: PodSource,
        uid: &str,
        netns: Netns,
    ) -> Result<AddOutcome, CaptureError> {
        let mut outcome = AddOutcome::Started;
        if let Some(current) = running.get(uid) {
            if current.netns_id == netns.id() {
                return Ok(AddOutcome::Unchanged);
            }
            tracing::info!(workload = %uid, "pod network namespace changed; replacing its proxy");
            if let Some(old) = running.remove(uid) {
                stop(old, &self.inputs.metrics).await;
            }
            outcome = AddOutcome::Replaced;
        }
        let path = netns.path().to_path_buf();
        let netns = Arc::new(netns);
        let sockets = SocketFactory::pod(netns.clone(), self.home.clone(), self.mark);
        // Registering the sockets with tokio needs the runtime context on that thread too.
        let runtime = tokio::runtime::Handle::current();
        let with_dns = self.dns.is_some();
        let (listeners, dns_listeners) = netns
            .run_on_thread(|| {
                let _context = runtime.enter();
                let listeners = Listeners::bind(&sockets)?;
                let dns = with_dns.then(|| DnsListeners::bind(&sockets)).transpose()?;
                Ok::<_, SocketError>((listeners, dns))
            })
            .map_err(|source| CaptureError::Thread {
                path: path.clone(),
                source,
            })?
            .map_err(|source| CaptureError::Listen {
                path: path.clone(),
                source,
            })?;
        let drain = self.drain.child();
        let proxy = WorkloadProxy::new(
            self.inputs.clone(),
            uid.to_string(),
            sockets.clone(),
            drain.clone(),
        );
        proxy.spawn(listeners);
        if let (Some(inputs), Some(dns_listeners)) = (&self.dns, dns_listeners) {
            DnsProxy::new(
                inputs.clone(),
                uid.to_string(),
                sockets.clone(),
                drain.clone(),
            )
            .spawn(dns_listeners);
        }
        self.inputs.metrics.proxy_started();
        let rules = self.rules.clone().filter(|_| source != PodSource::Cni);
        let pod = RunningPod {
            source,
            netns: netns.clone(),
            netns_id: netns.id(),
            netns_path: path.clone(),
            proxy,
            drain,
            rules_installed: rules.is_some(),
        };
        if let Some(rules) = rules {
            let target = netns.clone();
            let installed = tokio::task::spawn_blocking(move || rules.install(&target))
                .await
                .unwrap_or_else(|join| Err(rules::RulesError::Netns(std::io::Error::other(join))));
            if let Err(source) = installed {
                stop(pod, &self.inputs.metrics).await;
                return Err(CaptureError::Rules { path, source });
            }
        }
        running.insert(uid.to_string(), pod);
        Ok(outcome)
    }

    fn set_status(
        &self,
        uid: &str,
        source: PodSource,
        netns: &std::path::Path,
        error: Option<&CaptureError>,
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
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), status);
    }

    /// Status of every known pod.
    pub fn status(&self) -> BTreeMap<String, PodStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        let running = self.running.lock().await;
        running
            .iter()
            .map(|(uid, pod)| (uid.clone(), pod.proxy.pooled_connections()))
            .collect()
    }
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
    if pod.rules_installed {
        let netns = pod.netns.clone();
        let removed =
            tokio::task::spawn_blocking(move || rules::RedirectRules::remove(&netns)).await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(netns = %pod.netns_path.display(), %error, "could not remove redirection rules");
        }
    }
}
