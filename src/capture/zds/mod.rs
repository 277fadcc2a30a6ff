//! The istio-cni pod source (layer L4): a ZDS client that connects to istio-cni's SEQPACKET
//! socket, receives the pods of this node with their network namespace fds, and feeds the
//! [`PodManager`]. It sits before the data path: it decides which pods get a workload proxy;
//! istio-cni owns the redirection rules, the agent only opens listeners.
//!
//! Per connection: send the hello; take the snapshot (`Add`/`Keep` per enrolled pod, then
//! `SnapshotSent`, after which every pod not re-announced since the connection started is
//! drained); then follow `Add`/`Del` at run time. An `Add` never waits for the model: a pod
//! istiod has not pushed yet is served under its istio-cni uid and moved to its workload on the
//! model change that names it. Every message is answered, ACK or NACK with
//! the reason; a bad message is NACKed and logged, never fatal. When istio-cni goes away the
//! running pods keep serving and the client reconnects with capped, jittered backoff; readiness
//! (see [`ZdsClient::subscribe_synced`]) is false until a connection's snapshot is complete.
//!
//! Split: [`proto`] decodes/encodes (pure, fuzzed), [`packet`] does the socket I/O,
//! [`backoff`] the reconnect schedule; this file is the session logic.

pub mod backoff;
pub mod packet;
pub mod proto;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use proto::{decode_request, encode_response, Request, WorkloadInfo, ZdsError};

use super::{CaptureError, PodManager};
use crate::config::agent::ZdsConfig;
use crate::state::{Snapshot, StateStore};
use crate::sys::Netns;
use backoff::Backoff;
use packet::Connection;

/// First reconnect delay (istio's ztunnel starts at 10 ms too).
const RECONNECT_INITIAL: Duration = Duration::from_millis(10);

/// How often pods whose start failed are retried (as istio's ztunnel).
const PENDING_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Why one request was NACKed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself was bad (protocol or decoding).
    #[error(transparent)]
    Protocol(#[from] ZdsError),
    /// The pod's proxy could not start; it stays pending and is retried.
    #[error("cannot start the proxy: {0}")]
    Capture(#[from] CaptureError),
}

/// Why a connection to istio-cni ended (the client then reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket could not be connected (istio-cni not up yet).
    #[error("connect {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Sending the hello failed.
    #[error("send hello: {0}")]
    Hello(std::io::Error),
    /// Reading a message failed.
    #[error("receive: {0}")]
    Receive(std::io::Error),
    /// Sending a response failed.
    #[error("send response: {0}")]
    Respond(std::io::Error),
    /// istio-cni closed the connection.
    #[error("istio-cni closed the connection")]
    Closed,
}

/// A pod this client started (or tried to), by istio-cni uid.
#[derive(Debug)]
struct KnownPod {
    /// The key of the pod in the model and in the [`PodManager`].
    workload_uid: String,
    /// A duplicate of the netns fd while the start failed, for retries.
    pending: Option<File>,
    /// While the model does not know the pod (istio-cni can be quicker than istiod's push), it
    /// is served under its istio-cni uid — refusing traffic, as it has no identity — and moved
    /// to its workload when a model change names it.
    unresolved: Option<Unresolved>,
}

/// What moving a not-yet-resolved pod to its workload needs.
#[derive(Debug)]
struct Unresolved {
    info: WorkloadInfo,
    netns: File,
}

/// The state of one connection's protocol.
#[derive(Debug, Default)]
struct Session {
    /// `SnapshotSent` was received.
    snapshot_done: bool,
    /// istio-cni uids named by `Add`/`Keep` since the connection started.
    announced: HashSet<String>,
}

/// The ZDS client. Owns nothing but its configuration; pods live in the [`PodManager`], so
/// they outlive a connection.
pub struct ZdsClient {
    config: ZdsConfig,
    node: String,
    pods: Arc<PodManager>,
    state: Arc<StateStore>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl ZdsClient {
    /// A client for `config`, starting pods of node `node` in `pods`, matching them against
    /// the model in `state`.
    pub fn new(
        config: ZdsConfig,
        node: String,
        pods: Arc<PodManager>,
        state: Arc<StateStore>,
    ) -> Self {
        ZdsClient {
            config,
            node,
            pods,
            state,
            synced: tokio::sync::watch::channel(false).0,
        }
    }

    /// Whether the current connection's snapshot has been applied (readiness).
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Follows [`ZdsClient::is_synced`]: false while disconnected or before `SnapshotSent`.
    pub fn subscribe_synced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Connects, serves, and reconnects with backoff until `stop` resolves. Pods stay running
    /// while disconnected; the next snapshot reconciles them.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let span = tracing::info_span!("zds", socket = %self.config.socket.display());
        async move {
            tokio::pin!(stop);
            let mut backoff = Backoff::new(RECONNECT_INITIAL, self.config.reconnect_max);
            let mut known = HashMap::new();
            let mut unreachable_logged = false;
            loop {
                let (handled, error) = tokio::select! {
                    ended = self.serve_connection(&mut known) => ended,
                    _ = &mut stop => return,
                };
                self.synced.send_replace(false);
                if handled > 0 {
                    backoff.reset();
                }
                let delay = backoff.next_delay(rand::random());
                let unreachable = matches!(error, ConnectionError::Connect { .. });
                if !unreachable {
                    tracing::warn!(%error, ?delay, "istio-cni connection lost; pods keep running, reconnecting");
                } else if !unreachable_logged {
                    tracing::warn!(%error, "istio-cni not reachable; retrying with backoff");
                } else {
                    tracing::debug!(%error, ?delay, "istio-cni still not reachable");
                }
                unreachable_logged = unreachable;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut stop => return,
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One connection: hello, then request/response until it ends. Returns how many requests
    /// were handled and why it ended.
    async fn serve_connection(
        &self,
        known: &mut HashMap<String, KnownPod>,
    ) -> (u64, ConnectionError) {
        let path = &self.config.socket;
        let connection = match Connection::connect(path) {
            Ok(connection) => connection,
            Err(source) => {
                let path = path.clone();
                return (0, ConnectionError::Connect { path, source });
            }
        };
        if let Err(error) = connection.send(&proto::encode_hello()).await {
            return (0, ConnectionError::Hello(error));
        }
        tracing::info!("connected to istio-cni; waiting for the snapshot");
        let mut session = Session::default();
        let mut retry = tokio::time::interval(PENDING_RETRY_INTERVAL);
        let mut model = self.state.subscribe();
        let mut handled = 0;
        loop {
            let received = tokio::select! {
                received = connection.recv() => received,
                _ = retry.tick() => {
                    self.retry_pending(known).await;
                    continue;
                }
                changed = model.changed(), if known.values().any(|pod| pod.unresolved.is_some()) => {
                    if changed.is_ok() {
                        self.resolve_unknown(known).await;
                    }
                    continue;
                }
            };
            let datagram = match received {
                Ok(Some(datagram)) => datagram,
                Ok(None) => return (handled, ConnectionError::Closed),
                Err(error) => return (handled, ConnectionError::Receive(error)),
            };
            handled += 1;
            let result = match datagram.decode() {
                Ok(request) => self.handle(request, &mut session, known).await,
                Err(error) => Err(error.into()),
            };
            let nack = result.err().map(|error| {
                tracing::warn!(%error, "NACK: istio-cni request refused");
                error.to_string()
            });
            let response = proto::encode_response(nack.as_deref());
            if let Err(error) = connection.send(&response).await {
                return (handled, ConnectionError::Respond(error));
            }
        }
    }

    /// Applies one request. `Ok` is answered with an ACK, `Err` with a NACK carrying its text.
    async fn handle(
        &self,
        request: Request,
        session: &mut Session,
        known: &mut HashMap<String, KnownPod>,
    ) -> Result<(), RequestError> {
        tracing::debug!(
            kind = request.kind(),
            uid = request.uid(),
            "istio-cni request"
        );
        match request {
            Request::Add {
                uid,
                workload,
                netns,
            } => {
                session.announced.insert(uid.clone());
                self.add(uid, &workload, netns, known).await
            }
            Request::Keep { uid } => {
                if session.snapshot_done {
                    return Err(ZdsError::KeepAfterSnapshot { uid }.into());
                }
                if !known.contains_key(&uid) {
                    tracing::warn!(%uid, "keep for a pod this agent does not run; nothing to keep");
                }
                session.announced.insert(uid);
                Ok(())
            }
            Request::Del { uid } => {
                session.announced.remove(&uid);
                match known.remove(&uid) {
                    Some(pod) => {
                        self.pods.remove(&pod.workload_uid).await;
                    }
                    None => tracing::debug!(%uid, "del for an unknown pod"),
                }
                Ok(())
            }
            Request::SnapshotSent => {
                if session.snapshot_done {
                    return Err(ZdsError::SecondSnapshot.into());
                }
                session.snapshot_done = true;
                self.reconcile(&session.announced, known).await;
                self.synced.send_replace(true);
                Ok(())
            }
        }
    }

    /// Starts (or keeps, or replaces) the proxy of istio-cni pod `uid`, at once: a pod the
    /// model does not know yet starts under its istio-cni uid and moves to its workload when
    /// the model learns it ([`Self::resolve_unknown`]), so no request waits for istiod.
    async fn add(
        &self,
        uid: String,
        workload: &WorkloadInfo,
        fd: OwnedFd,
        known: &mut HashMap<String, KnownPod>,
    ) -> Result<(), RequestError> {
        let (netns, spare) = netns_from_fd(&uid, fd)?;
        let resolved = resolve_workload_uid(&self.state.snapshot(), &self.node, &uid, workload);
        let unresolved = match &resolved {
            Some(_) => None,
            None => {
                tracing::warn!(%uid, name = %workload.name, namespace = %workload.namespace,
                    "no workload in the model for this pod yet; serving it under its istio-cni uid until one appears");
                let netns = spare.try_clone().map_err(|error| ZdsError::NotNetns {
                    uid: uid.clone(),
                    reason: format!("dup: {error}"),
                })?;
                Some(Unresolved {
                    info: workload.clone(),
                    netns,
                })
            }
        };
        let workload_uid = resolved.unwrap_or_else(|| uid.clone());
        if let Some(previous) = known.get(&uid) {
            if previous.workload_uid != workload_uid {
                self.pods.remove(&previous.workload_uid).await;
            }
        }
        // A recreated pod (same name, new Kubernetes uid) takes over the proxy of the old uid;
        // a late `Del` of the old uid must not stop it.
        known.retain(|other, pod| *other == uid || pod.workload_uid != workload_uid);
        let outcome = self.pods.add(&workload_uid, netns).await;
        let pending = outcome.is_err().then_some(spare);
        known.insert(
            uid.clone(),
            KnownPod {
                workload_uid: workload_uid.clone(),
                pending,
                unresolved,
            },
        );
        let outcome = outcome?;
        tracing::info!(%uid, workload = %workload_uid, ?outcome, "istio-cni pod added");
        Ok(())
    }

    /// After a model change: moves each pod served under its istio-cni uid to the workload the
    /// model now has for it. The new proxy binds beside the old one (same listener owner, port
    /// reuse) before the old one drains, so the pod's ports never go unanswered.
    async fn resolve_unknown(&self, known: &mut HashMap<String, KnownPod>) {
        let snapshot = self.state.snapshot();
        for (uid, pod) in known.iter_mut() {
            let Some(unresolved) = &pod.unresolved else {
                continue;
            };
            let Some(found) = resolve_workload_uid(&snapshot, &self.node, uid, &unresolved.info)
            else {
                continue;
            };
            let netns = unresolved
                .netns
                .try_clone()
                .and_then(|copy| Netns::from_file(copy, netns_path(uid)));
            let netns = match netns {
                Ok(netns) => netns,
                Err(error) => {
                    tracing::warn!(%uid, %error, "cannot reopen the pod's namespace to move it to its workload");
                    continue;
                }
            };
            let started = self.pods.add(&found, netns).await;
            if found != pod.workload_uid {
                self.pods.remove(&pod.workload_uid).await;
            }
            let Some(unresolved) = pod.unresolved.take() else {
                continue;
            };
            pod.pending = started.is_err().then_some(unresolved.netns);
            tracing::info!(%uid, workload = %found, ok = started.is_ok(), "istio-cni pod found in the model; serving it as its workload");
            pod.workload_uid = found;
        }
    }

    /// After `SnapshotSent`: drains every pod not announced on this connection. Only pods this
    /// client started are candidates (it knows all of them: pods do not outlive the process),
    /// so pods of other sources (config, admin API) are untouched.
    async fn reconcile(&self, announced: &HashSet<String>, known: &mut HashMap<String, KnownPod>) {
        let (kept, dropped): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(known)
            .into_iter()
            .partition(|(uid, _)| announced.contains(uid));
        *known = kept;
        let keep: HashSet<&str> = known
            .values()
            .map(|pod| pod.workload_uid.as_str())
            .collect();
        let stale: HashSet<String> = dropped
            .into_values()
            .map(|pod| pod.workload_uid)
            .filter(|workload_uid| !keep.contains(workload_uid.as_str()))
            .collect();
        let removed = self.pods.retain(|uid| !stale.contains(uid)).await;
        tracing::info!(
            pods = known.len(),
            drained = removed.len(),
            ?removed,
            "istio-cni snapshot applied"
        );
    }

    /// Retries the pods whose proxy failed to start.
    async fn retry_pending(&self, known: &mut HashMap<String, KnownPod>) {
        for (uid, pod) in known.iter_mut() {
            let Some(file) = &pod.pending else {
                continue;
            };
            let Ok(copy) = file.try_clone() else {
                continue;
            };
            let Ok(netns) = Netns::from_file(copy, netns_path(uid)) else {
                continue;
            };
            if self.pods.add(&pod.workload_uid, netns).await.is_ok() {
                tracing::info!(%uid, workload = %pod.workload_uid, "pending istio-cni pod started");
                pod.pending = None;
            }
        }
    }
}

/// The descriptive path of a received namespace, for logs and status.
fn netns_path(uid: &str) -> PathBuf {
    PathBuf::from(format!("zds:{uid}"))
}

/// Checks that a received fd is a namespace file (nsfs; procfs on old kernels) and wraps it.
/// Returns the handle and a file for keeping a duplicate.
fn netns_from_fd(uid: &str, fd: OwnedFd) -> Result<(Netns, File), ZdsError> {
    use nix::sys::statfs::{fstatfs, NSFS_MAGIC, PROC_SUPER_MAGIC};
    let not_netns = |reason: String| ZdsError::NotNetns {
        uid: uid.to_string(),
        reason,
    };
    let kind = fstatfs(&fd)
        .map_err(|error| not_netns(format!("fstatfs: {error}")))?
        .filesystem_type();
    if kind != NSFS_MAGIC && kind != PROC_SUPER_MAGIC {
        return Err(not_netns(format!("file system type {:#x}", kind.0)));
    }
    let file = File::from(fd);
    let spare = file
        .try_clone()
        .map_err(|error| not_netns(format!("dup: {error}")))?;
    let netns =
        Netns::from_file(file, netns_path(uid)).map_err(|error| not_netns(error.to_string()))?;
    Ok((netns, spare))
}

/// The model key for an istio-cni pod: the uid itself if the model knows it, else the workload
/// on this node with the same name, namespace and (if given) service account — how istio's
/// ztunnel matches ZDS pods to xDS workloads. `None` if the model has no such workload.
pub fn resolve_workload_uid(
    snapshot: &Snapshot,
    node: &str,
    uid: &str,
    info: &WorkloadInfo,
) -> Option<String> {
    if snapshot.workload(uid).is_some() {
        return Some(uid.to_string());
    }
    snapshot
        .workloads()
        .find(|workload| {
            (node.is_empty() || workload.node == node)
                && workload.name == info.name
                && workload.namespace == info.namespace
                && (info.service_account.is_empty()
                    || workload.service_account == info.service_account)
        })
        .map(|workload| workload.uid.clone())
}

#[cfg(test)]
mod tests;
