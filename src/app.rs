//! The composition root (layer L5): builds every component from the loaded configuration,
//! starts the node-level servers, the pod manager and the config watcher, and runs until a
//! shutdown signal, then drains.
//!
//! Start-up order matters: the configuration was fully validated before we get here (bad
//! config binds nothing); the CA and certificate manager come up before any listener so the
//! first connection can get a certificate; readiness reports pending pods until every pod is
//! captured.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::capture::rules::RedirectRules;
use crate::capture::zds::ZdsClient;
use crate::capture::{DesiredPod, PodManager};
use crate::config::{self, Config, Overrides};
use crate::control_plane::{ControlPlane, ControlPlaneSettings, RootSource, TokenSource};
use crate::drain::Drain;
use crate::identity::ca::BuiltinCa;
use crate::identity::istio_ca::IstioCa;
use crate::identity::{CertificateManager, CertificateSource};
use crate::proxy::{ProxyInputs, ProxySettings};
use crate::state::policy::SelectorPolicy;
use crate::state::StateStore;
use crate::sys::Netns;
use crate::telemetry::Metrics;
use crate::xds::{XdsClient, XdsModel, XdsSettings};

/// How often config pods are re-checked: failed ones retried, vanished namespaces released.
const POD_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Where Istio's node agent finds its projected service-account token.
const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";

/// Everything `run` needs besides the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Re-read the config file on change (false when there is no file: Istio mode).
    pub watch_config: bool,
    /// Where the built-in CA keeps its root.
    pub state_dir: PathBuf,
    /// Command-line overrides, re-applied on every reload.
    pub overrides: Overrides,
    /// Run-time control of the log filter, for the admin API (`None`: not ours to change).
    pub logging: Option<crate::telemetry::LogControl>,
}

/// Runs the agent until SIGTERM/SIGINT (graceful drain) or a second SIGINT (immediate exit).
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let agent = config.agent.clone();
    let home = Arc::new(Netns::current().context("open the agent's own network namespace")?);
    let metrics = Arc::new(Metrics::new());
    let failures = metrics.clone();
    let certificates = Arc::new(
        CertificateManager::new(certificate_source(&agent, &options)?)
            .on_failure(move |error| failures.certificate_fetch_failed(error.reason())),
    );
    let state = Arc::new(StateStore::new(config.snapshot()));
    let drain = Drain::new();
    let xds = match &agent.xds.address {
        Some(address) => {
            let control_plane = control_plane(
                &agent,
                address,
                &agent.xds.root_ca,
                &agent.xds.alt_hostname,
                &agent.xds.headers,
            )
            .context("xDS settings")?;
            Some(Arc::new(XdsClient::new(
                XdsSettings {
                    control_plane,
                    node: crate::xds::node(&agent),
                    max_message_size: agent.xds.max_message_size,
                    reconnect_max: agent.xds.reconnect_max,
                },
                metrics.xds().clone(),
            )))
        }
        None => None,
    };
    let inputs = ProxyInputs {
        state: state.clone(),
        certificates: certificates.clone(),
        settings: Arc::new(ProxySettings {
            proxy: agent.proxy.clone(),
            pool: agent.pool.clone(),
        }),
        metrics: metrics.clone(),
    };
    let pods = Arc::new(PodManager::new(
        inputs,
        home,
        agent.proxy.packet_mark,
        agent.capture.install_rules.then_some(RedirectRules {
            mark: agent.proxy.packet_mark,
            outbound_port: crate::net::ports::OUTBOUND,
            inbound_plaintext_port: crate::net::ports::INBOUND_PLAINTEXT,
            hbone_port: crate::net::ports::HBONE,
        }),
        drain.child(),
    ));
    let control = drain.child();
    let rotation_stop = control.clone();
    certificates
        .clone()
        .spawn_rotation(async move { rotation_stop.draining().await });
    let readiness = crate::socket::bind_node_listener(agent.listen.readiness)
        .with_context(|| format!("bind readiness {}", agent.listen.readiness))?;
    let admin = TcpListener::bind(agent.listen.admin)
        .await
        .with_context(|| format!("bind admin {}", agent.listen.admin))?;
    let metrics_listener = crate::socket::bind_node_listener(agent.listen.metrics)
        .with_context(|| format!("bind metrics {}", agent.listen.metrics))?;
    let shutdown_requested = Arc::new(tokio::sync::Notify::new());
    control.spawn(crate::admin::serve(
        admin,
        crate::admin::AdminState {
            pods: pods.clone(),
            state: state.clone(),
            node: agent.node.clone(),
            certificates: certificates.clone(),
            metrics: metrics.clone(),
            logging: options.logging.clone(),
            config: effective_config(&config),
            shutdown: shutdown_requested.clone(),
        },
        control.clone(),
    ));
    control.spawn(crate::admin::metrics::serve(
        metrics_listener,
        crate::admin::metrics::MetricsSources {
            metrics: metrics.clone(),
            pods: pods.clone(),
            certificates: certificates.clone(),
            logging: options.logging.clone(),
            runtime: tokio::runtime::Handle::current(),
        },
        control.clone(),
    ));
    control.spawn(crate::admin::metrics::evict_stale_series(
        state.clone(),
        metrics.clone(),
        control.clone(),
    ));
    let xds_synced = xds.as_ref().map(|client| {
        let synced = client.subscribe_synced();
        let stop = control.clone();
        control.spawn(client.clone().run(async move { stop.draining().await }));
        synced
    });
    let zds_synced = agent.zds.enabled.then(|| {
        let client = Arc::new(ZdsClient::new(
            agent.zds.clone(),
            agent.node.clone(),
            pods.clone(),
            state.clone(),
        ));
        let synced = client.subscribe_synced();
        let stop = control.clone();
        let mut model_ready = xds_synced.clone();
        control.spawn(async move {
            // istio-cni names pods by Kubernetes uid and name; the workload (identity,
            // addresses) comes from istiod. Taking pods before the first workload push would
            // start proxies that know nothing about themselves.
            if let Some(model_ready) = model_ready.as_mut() {
                tokio::select! {
                    _ = model_ready.wait_for(|synced| synced.addresses) => {}
                    _ = stop.draining() => return,
                }
            }
            client.run(async move { stop.draining().await }).await;
        });
        synced
    });
    control.spawn(serve_readiness(
        readiness,
        pods.clone(),
        Pending {
            zds: zds_synced,
            xds: xds_synced,
        },
        control.clone(),
    ));

    let config = Arc::new(config);
    let (publish, updates) = tokio::sync::watch::channel(config.clone());
    if options.watch_config {
        let watch_stop = control.clone();
        control.spawn(config::watch::run(
            config.path.clone(),
            options.overrides.clone(),
            agent.reload_interval,
            config.clone(),
            publish,
            async move { watch_stop.draining().await },
        ));
    } else {
        // Nothing will publish; keeping the sender open keeps `apply_updates` running.
        control.spawn(async move {
            publish.closed().await;
        });
    }
    control.spawn(apply_updates(
        updates,
        xds.as_ref().map(|client| client.subscribe_model()),
        Model::new(state, certificates.clone(), agent.node.clone()),
        pods.clone(),
        control.clone(),
    ));
    tracing::info!(node = %agent.node, config = %config.path.display(), "nodetunnel started");

    tokio::select! {
        _ = wait_for_shutdown_signal() => {}
        _ = shutdown_requested.notified() => {}
    }
    tracing::info!(deadline = ?agent.drain_timeout, "shutting down: draining connections");
    let shutdown = drain.shutdown(agent.drain_timeout);
    tokio::select! {
        forced = shutdown => {
            if forced > 0 {
                tracing::warn!(forced, "drain deadline passed; closed remaining connections");
            }
        }
        _ = second_interrupt() => {
            tracing::warn!("second interrupt: exiting now");
        }
    }
    pods.remove_all().await;
    tracing::info!("nodetunnel stopped");
    Ok(())
}

/// The Istio CA when `ca.address` is set, else the built-in CA.
fn certificate_source(
    agent: &config::agent::AgentConfig,
    options: &RunOptions,
) -> anyhow::Result<Arc<dyn CertificateSource>> {
    match &agent.ca.address {
        Some(address) => {
            let control_plane = control_plane(
                agent,
                address,
                &agent.ca.root_ca,
                &agent.ca.alt_hostname,
                &agent.ca.headers,
            )
            .context("Istio CA settings")?;
            Ok(Arc::new(IstioCa::new(
                control_plane,
                agent.istio.certificate_ttl,
            )))
        }
        None => Ok(Arc::new(
            BuiltinCa::load_or_create(&options.state_dir, &agent.ca)
                .context("start the built-in CA")?,
        )),
    }
}

/// The channel settings for one istiod service, with the node's token and cluster id.
fn control_plane(
    agent: &config::agent::AgentConfig,
    address: &str,
    root: &str,
    alt_hostname: &Option<String>,
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<ControlPlane, crate::control_plane::ControlPlaneError> {
    ControlPlane::new(ControlPlaneSettings {
        address: address.to_string(),
        root: RootSource::from_setting(root),
        alt_hostname: alt_hostname.clone(),
        token: TokenSource::from_setting(
            agent.istio.token.as_deref(),
            std::path::Path::new(DEFAULT_TOKEN_PATH),
        ),
        cluster_id: agent.istio.cluster_id.clone(),
        headers: headers.clone(),
        connect_timeout: agent.xds.connect_timeout,
    })
}

/// The configuration as `/config_dump` shows it.
fn effective_config(config: &Config) -> crate::admin::EffectiveConfig {
    let agent = &config.agent;
    crate::admin::EffectiveConfig {
        node: agent.node.clone(),
        config_path: config.path.clone(),
        admin_addr: agent.listen.admin,
        metrics_addr: agent.listen.metrics,
        readiness_addr: agent.listen.readiness,
        drain_timeout: agent.drain_timeout,
        reload_interval: agent.reload_interval,
        zds_enabled: agent.zds.enabled,
        install_rules: agent.capture.install_rules,
        xds_address: agent.xds.address.clone(),
        ca_address: agent.ca.address.clone(),
        cluster_id: agent.istio.cluster_id.clone(),
    }
}

/// The pods of this node listed in the config, with their uids resolved.
fn desired_pods(config: &Config) -> Vec<DesiredPod> {
    config
        .agent
        .pods
        .iter()
        .filter_map(|pod| {
            let workload = config.workloads.iter().find(|workload| {
                workload.uid == pod.workload
                    || format!("{}/{}", workload.namespace, workload.name) == pod.workload
            })?;
            Some(DesiredPod {
                uid: workload.uid.clone(),
                netns: pod.netns.clone(),
            })
        })
        .collect()
}

/// Where the model goes, and what follows from it.
struct Model {
    state: Arc<StateStore>,
    certificates: Arc<CertificateManager>,
    node: String,
    /// Identities prefetched because a workload of this node had them.
    prefetched: std::sync::Mutex<HashSet<crate::spiffe::Identity>>,
}

impl Model {
    fn new(state: Arc<StateStore>, certificates: Arc<CertificateManager>, node: String) -> Self {
        Model {
            state,
            certificates,
            node,
            prefetched: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Replaces the state with the file's model merged with istiod's. With istiod, fetches the
    /// certificates of this node's mesh workloads ahead of their first connection (as Istio's
    /// node agent does), and stops rotating those whose last local workload left.
    fn publish(&self, config: &Config, xds: Option<&XdsModel>) {
        let snapshot = merged_snapshot(config, xds);
        if xds.is_some() && !self.node.is_empty() {
            let local: HashSet<crate::spiffe::Identity> = snapshot
                .workloads()
                .filter(|workload| {
                    workload.node == self.node
                        && workload.protocol == crate::state::TunnelProtocol::Hbone
                })
                .map(|workload| workload.identity.clone())
                .collect();
            let mut prefetched = self
                .prefetched
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for gone in prefetched.difference(&local) {
                self.certificates.forget(gone);
            }
            for identity in &local {
                self.certificates.prefetch(identity);
            }
            *prefetched = local;
        }
        self.state.replace(snapshot);
    }
}

/// The file's model with istiod's added. The file wins where both name the same workload uid,
/// service or policy: a local entry is an operator's deliberate override.
fn merged_snapshot(config: &Config, xds: Option<&XdsModel>) -> crate::state::Snapshot {
    let Some(xds) = xds else {
        return config.snapshot();
    };
    let local_uids: HashSet<&str> = config.workloads.iter().map(|w| w.uid.as_str()).collect();
    let local_services: HashSet<String> = config.services.iter().map(|s| s.key()).collect();
    let mut authorization = config.authorization();
    let local_policies: HashSet<String> = authorization
        .policies
        .iter()
        .map(|selector| selector.policy.key())
        .collect();
    let mut workloads = config.workloads.clone();
    workloads.extend(
        xds.workloads
            .values()
            .filter(|workload| !local_uids.contains(workload.uid.as_str()))
            .cloned(),
    );
    let mut services = config.services.clone();
    services.extend(
        xds.services
            .values()
            .filter(|service| !local_services.contains(&service.key()))
            .cloned(),
    );
    authorization.policies.extend(
        xds.policies
            .values()
            .filter(|policy| !local_policies.contains(&policy.key()))
            .cloned()
            .map(SelectorPolicy::new),
    );
    crate::state::Snapshot::with_authorization(workloads, services, authorization)
}

/// Applies each published config and istiod push: model first (new connections see it), then
/// pods. Retries failed pods periodically.
async fn apply_updates(
    mut updates: tokio::sync::watch::Receiver<Arc<Config>>,
    mut xds: Option<tokio::sync::watch::Receiver<Arc<XdsModel>>>,
    model: Model,
    pods: Arc<PodManager>,
    drain: Drain,
) {
    let mut current = updates.borrow_and_update().clone();
    let mut pushed = xds.as_mut().map(|xds| xds.borrow_and_update().clone());
    model.publish(&current, pushed.as_deref());
    let mut failures = pods.reconcile(&desired_pods(&current)).await;
    let mut retry = tokio::time::interval(POD_RETRY_INTERVAL);
    loop {
        let xds_changed = async {
            match xds.as_mut() {
                Some(xds) => xds.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                current = updates.borrow_and_update().clone();
                model.publish(&current, pushed.as_deref());
                failures = pods.reconcile(&desired_pods(&current)).await;
            }
            changed = xds_changed => {
                if changed.is_err() {
                    return;
                }
                pushed = xds.as_mut().map(|xds| xds.borrow_and_update().clone());
                model.publish(&current, pushed.as_deref());
            }
            // Periodic even without failures: a pod's namespace can vanish under us (pod
            // deleted), and re-opening each path is how we notice and release it.
            _ = retry.tick() => {
                let failed = pods.reconcile(&desired_pods(&current)).await;
                if failed != failures {
                    tracing::info!(failed, "pods still failing after retry");
                }
                failures = failed;
            }
            _ = drain.draining() => return,
        }
    }
}

/// The sources readiness waits for besides the pods themselves.
#[derive(Clone)]
struct Pending {
    /// istio-cni's snapshot applied.
    zds: Option<tokio::sync::watch::Receiver<bool>>,
    /// istiod's first push of each type received.
    xds: Option<tokio::sync::watch::Receiver<crate::xds::Synced>>,
}

/// `GET /healthz/ready`: 200 when every pod is captured; 500 listing what is pending (as
/// Istio's agent answers, so existing probes and dashboards read it the same way). With
/// istiod, not ready until the first push of each type; with istio-cni, until the current
/// connection's snapshot is applied.
async fn serve_readiness(
    listener: TcpListener,
    pods: Arc<PodManager>,
    sources: Pending,
    drain: Drain,
) {
    serve_http(listener, drain, move |request| {
        let pods = pods.clone();
        let sources = sources.clone();
        async move {
            if request.uri().path() != "/healthz/ready" {
                return text(StatusCode::NOT_FOUND, "not found\n".to_string());
            }
            let mut pending = pods.pending();
            if sources.zds.is_some_and(|synced| !*synced.borrow()) {
                pending.insert(0, "workload proxy manager".to_string());
            }
            if let Some(xds) = &sources.xds {
                let missing = xds.borrow().pending();
                pending.splice(0..0, missing);
            }
            if pending.is_empty() {
                text(StatusCode::OK, "ready\n".to_string())
            } else {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("not ready, pending: {}\n", pending.join(", ")),
                )
            }
        }
    })
    .await
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// A minimal HTTP/1.1 accept loop for the node-level servers.
pub(crate) async fn serve_http<F, Fut>(listener: TcpListener, drain: Drain, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.draining() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        let connection_drain = drain.clone();
        drain.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::select! {
                _ = connection => {}
                _ = connection_drain.draining() => {}
            }
        });
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; only a kill will stop the agent");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("received SIGTERM"),
        _ = interrupt.recv() => tracing::info!("received SIGINT"),
    }
}

async fn second_interrupt() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
        Ok(mut interrupt) => {
            interrupt.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::workload;

    fn local_config(text: &str) -> Config {
        config::parse(
            std::path::Path::new("local.yaml"),
            text,
            &Overrides::default(),
        )
        .expect("valid config")
    }

    #[test]
    fn istiod_model_is_merged_and_the_file_wins_on_conflicts() {
        let config = local_config(
            "workloads:\n  - uid: local-a\n    name: a\n    namespace: default\n    \
             workloadIps: [10.0.0.1]\npolicies:\n  - name: p\n    namespace: default\n    \
             action: Deny\n",
        );
        let mut xds = XdsModel::default();
        let mut shadowed = workload("default", "a-from-istiod", [10, 0, 0, 9]);
        shadowed.uid = "local-a".to_string();
        xds.workloads.insert("local-a".to_string(), shadowed);
        xds.workloads.insert(
            "istiod-b".to_string(),
            crate::state::Workload {
                uid: "istiod-b".to_string(),
                ..workload("default", "b", [10, 0, 0, 2])
            },
        );
        let mut policy = config.policies[0].clone();
        policy.action = crate::state::policy::PolicyAction::Allow;
        xds.policies.insert(policy.key(), policy.clone());
        policy.name = "q".to_string();
        xds.policies.insert(policy.key(), policy);

        let merged = merged_snapshot(&config, Some(&xds));
        assert_eq!(
            merged.workload("local-a").map(|w| w.name.as_str()),
            Some("a")
        );
        assert!(merged.workload("istiod-b").is_some());
        let policies: Vec<(String, crate::state::policy::PolicyAction)> = merged
            .authorization()
            .policies
            .iter()
            .map(|selector| (selector.policy.key(), selector.policy.action))
            .collect();
        assert_eq!(
            policies,
            [
                (
                    "default/p".to_string(),
                    crate::state::policy::PolicyAction::Deny
                ),
                (
                    "default/q".to_string(),
                    crate::state::policy::PolicyAction::Allow
                ),
            ]
        );
        // Without istiod the file alone is the model.
        assert!(merged_snapshot(&config, None)
            .workload("istiod-b")
            .is_none());
    }
}
