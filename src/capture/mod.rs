//! Pod capture (layer L4): the set of local pods and, for each, a workload proxy whose
//! listeners live inside the pod's network namespace.
//!
//! The desired set comes from a pod source (the `agent.pods` list of the local config today;
//! istio-cni's ZDS later) and is reconciled here: new pods get their namespace opened, their
//! listeners bound on a thread inside that namespace and their proxy started in a drain scope
//! of their own; pods that left are terminated (their listeners and connections cut, nothing
//! else touched); a pod whose namespace changed is replaced. A pod that fails to start is
//! reported with the reason and retried on the next reconcile; the others carry on.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::drain::Drain;
use crate::proxy::{Listeners, ProxyInputs, WorkloadProxy};
use crate::socket::{SocketError, SocketFactory};
use crate::sys::{Netns, NetnsId};

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
    netns_id: NetnsId,
    netns_path: PathBuf,
    proxy: Arc<WorkloadProxy>,
    drain: Drain,
}

/// The status of one pod, for readiness and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum PodStatus {
    /// Listeners are up.
    Running {
        /// The namespace path.
        netns: PathBuf,
    },
    /// The last attempt failed; it will be retried.
    Failed {
        /// The namespace path.
        netns: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Owns every captured pod's proxy.
pub struct PodManager {
    inputs: ProxyInputs,
    home: Arc<Netns>,
    mark: u32,
    drain: Drain,
    running: tokio::sync::Mutex<HashMap<String, RunningPod>>,
    status: Mutex<BTreeMap<String, PodStatus>>,
}

impl PodManager {
    /// A manager whose pods' drain scopes are children of `drain`. `home` is the agent's own
    /// namespace; `mark` goes on every socket made in a pod.
    pub fn new(inputs: ProxyInputs, home: Arc<Netns>, mark: u32, drain: Drain) -> Self {
        PodManager {
            inputs,
            home,
            mark,
            drain,
            running: tokio::sync::Mutex::new(HashMap::new()),
            status: Mutex::new(BTreeMap::new()),
        }
    }

    /// Brings the running set in line with `desired`. Returns how many pods failed.
    pub async fn reconcile(&self, desired: &[DesiredPod]) -> usize {
        let mut running = self.running.lock().await;
        let wanted: HashMap<&str, &DesiredPod> =
            desired.iter().map(|pod| (pod.uid.as_str(), pod)).collect();
        let gone: Vec<String> = running
            .keys()
            .filter(|uid| !wanted.contains_key(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = running.remove(&uid) {
                tracing::info!(workload = %uid, netns = %pod.netns_path.display(), "pod removed; draining its proxy");
                pod.drain.terminate().await;
            }
        }
        let mut status = BTreeMap::new();
        let mut failures = 0;
        for pod in desired {
            match self.ensure(&mut running, pod).await {
                Ok(()) => {
                    status.insert(
                        pod.uid.clone(),
                        PodStatus::Running {
                            netns: pod.netns.clone(),
                        },
                    );
                }
                Err(error) => {
                    failures += 1;
                    tracing::error!(workload = %pod.uid, %error, "cannot capture pod; will retry");
                    status.insert(
                        pod.uid.clone(),
                        PodStatus::Failed {
                            netns: pod.netns.clone(),
                            reason: error.to_string(),
                        },
                    );
                }
            }
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
        failures
    }

    /// Starts `pod` unless it already runs in the same namespace; replaces it if the namespace
    /// changed (same uid, new netns: the pod was recreated).
    async fn ensure(
        &self,
        running: &mut HashMap<String, RunningPod>,
        pod: &DesiredPod,
    ) -> Result<(), CaptureError> {
        let netns = Netns::open(&pod.netns).map_err(|source| CaptureError::OpenNetns {
            path: pod.netns.clone(),
            source,
        })?;
        if let Some(current) = running.get(&pod.uid) {
            if current.netns_id == netns.id() {
                return Ok(());
            }
            tracing::info!(workload = %pod.uid, "pod network namespace changed; replacing its proxy");
            if let Some(old) = running.remove(&pod.uid) {
                old.drain.terminate().await;
            }
        }
        let netns = Arc::new(netns);
        let sockets = SocketFactory::pod(netns.clone(), self.home.clone(), self.mark);
        // Registering the sockets with tokio needs the runtime context on that thread too.
        let runtime = tokio::runtime::Handle::current();
        let listeners = netns
            .run_on_thread(|| {
                let _context = runtime.enter();
                Listeners::bind(&sockets)
            })
            .map_err(|source| CaptureError::Thread {
                path: pod.netns.clone(),
                source,
            })?
            .map_err(|source| CaptureError::Listen {
                path: pod.netns.clone(),
                source,
            })?;
        let drain = self.drain.child();
        let proxy =
            WorkloadProxy::new(self.inputs.clone(), pod.uid.clone(), sockets, drain.clone());
        proxy.spawn(listeners);
        running.insert(
            pod.uid.clone(),
            RunningPod {
                netns_id: netns.id(),
                netns_path: pod.netns.clone(),
                proxy,
                drain,
            },
        );
        Ok(())
    }

    /// Status of every desired pod as of the last reconcile.
    pub fn status(&self) -> BTreeMap<String, PodStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pods not yet running (failed or not attempted), for readiness.
    pub fn pending(&self) -> Vec<String> {
        self.status()
            .into_iter()
            .filter(|(_, status)| matches!(status, PodStatus::Failed { .. }))
            .map(|(uid, _)| uid)
            .collect()
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
