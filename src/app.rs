//! The composition root (layer L5): builds every component from the loaded configuration,
//! starts the node-level servers, the pod manager and the config watcher, and runs until a
//! shutdown signal, then drains.
//!
//! Start-up order matters: the configuration was fully validated before we get here (bad
//! config binds nothing); the CA and certificate manager come up before any listener so the
//! first connection can get a certificate; readiness reports pending pods until every pod is
//! captured.

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
use crate::drain::Drain;
use crate::identity::ca::BuiltinCa;
use crate::identity::CertificateManager;
use crate::proxy::{ProxyInputs, ProxySettings};
use crate::state::StateStore;
use crate::sys::Netns;
use crate::telemetry::Metrics;

/// How often config pods are re-checked: failed ones retried, vanished namespaces released.
const POD_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Everything `run` needs besides the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
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
    let ca = BuiltinCa::load_or_create(&options.state_dir, &agent.ca)
        .context("start the built-in CA")?;
    let metrics = Arc::new(Metrics::new());
    let failures = metrics.clone();
    let certificates = Arc::new(
        CertificateManager::new(Arc::new(ca))
            .on_failure(move |error| failures.certificate_fetch_failed(error.reason())),
    );
    let state = Arc::new(StateStore::new(config.snapshot()));
    let drain = Drain::new();
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
    let readiness = TcpListener::bind(agent.listen.readiness)
        .await
        .with_context(|| format!("bind readiness {}", agent.listen.readiness))?;
    let admin = TcpListener::bind(agent.listen.admin)
        .await
        .with_context(|| format!("bind admin {}", agent.listen.admin))?;
    let metrics_listener = TcpListener::bind(agent.listen.metrics)
        .await
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
    let zds_synced = agent.zds.enabled.then(|| {
        let client = Arc::new(ZdsClient::new(
            agent.zds.clone(),
            agent.node.clone(),
            pods.clone(),
            state.clone(),
        ));
        let synced = client.subscribe_synced();
        let stop = control.clone();
        control.spawn(client.run(async move { stop.draining().await }));
        synced
    });
    control.spawn(serve_readiness(
        readiness,
        pods.clone(),
        zds_synced,
        control.clone(),
    ));

    let config = Arc::new(config);
    let (publish, updates) = tokio::sync::watch::channel(config.clone());
    let watch_stop = control.clone();
    control.spawn(config::watch::run(
        config.path.clone(),
        options.overrides.clone(),
        agent.reload_interval,
        config.clone(),
        publish,
        async move { watch_stop.draining().await },
    ));
    control.spawn(apply_updates(updates, state, pods.clone(), control.clone()));
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

/// Applies each published config: model first (new connections see it), then pods. Retries
/// failed pods periodically.
async fn apply_updates(
    mut updates: tokio::sync::watch::Receiver<Arc<Config>>,
    state: Arc<StateStore>,
    pods: Arc<PodManager>,
    drain: Drain,
) {
    let mut current = updates.borrow_and_update().clone();
    let mut failures = pods.reconcile(&desired_pods(&current)).await;
    let mut retry = tokio::time::interval(POD_RETRY_INTERVAL);
    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                current = updates.borrow_and_update().clone();
                state.replace(current.snapshot());
                failures = pods.reconcile(&desired_pods(&current)).await;
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

/// `GET /healthz/ready`: 200 when every pod is captured; 500 listing what is pending (as
/// Istio's agent answers, so existing probes and dashboards read it the same way). With
/// istio-cni, not ready until the current connection's snapshot is applied.
async fn serve_readiness(
    listener: TcpListener,
    pods: Arc<PodManager>,
    zds_synced: Option<tokio::sync::watch::Receiver<bool>>,
    drain: Drain,
) {
    serve_http(listener, drain, move |request| {
        let pods = pods.clone();
        let zds_synced = zds_synced.clone();
        async move {
            if request.uri().path() != "/healthz/ready" {
                return text(StatusCode::NOT_FOUND, "not found\n".to_string());
            }
            let mut pending = pods.pending();
            if zds_synced.is_some_and(|synced| !*synced.borrow()) {
                pending.insert(0, "workload proxy manager".to_string());
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
