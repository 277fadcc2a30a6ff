//! The composition root (layer L5): builds every component from the loaded configuration,
//! starts the node-level servers, the pod manager and the config watcher, and runs until a
//! shutdown signal, then drains.
//!
//! Start-up order matters: the configuration was fully validated before we get here (bad
//! config binds nothing); the CA and certificate manager come up before any listener so the
//! first connection can get a certificate; readiness reports pending pods until every pod is
//! captured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::admin::readiness::{self, Pending};
use crate::capture::rules::RedirectRules;
use crate::capture::zds::ZdsClient;
use crate::capture::{DesiredPod, PodManager};
use crate::config::agent::{AgentConfig, ListenConfig};
use crate::config::{self, Config, Overrides};
use crate::control_plane::{ControlPlane, ControlPlaneSettings, RootSource, TokenSource};
use crate::drain::Drain;
use crate::identity::ca::BuiltinCa;
use crate::identity::istio_ca::IstioCa;
use crate::identity::{CertificateManager, CertificateSource};
use crate::proxy::{ProxyInputs, ProxySettings};
use crate::state::merge::merge;
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
    /// The data plane's threads ([`crate::shard::Shards::inline`]: the caller's runtime).
    pub shards: Arc<crate::shard::Shards>,
}

/// Runs the agent until SIGTERM/SIGINT (graceful drain) or a second SIGINT (immediate exit).
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let agent = Agent::build(&config, &options)?;
    let listeners = NodeListeners::bind(&config.agent.listen).await?;
    agent.spawn(config, &options, listeners);
    agent.wait_for_shutdown().await;
    agent.shut_down().await;
    Ok(())
}

/// The long-lived components, built before anything is bound or spawned.
struct Agent {
    settings: AgentConfig,
    state: Arc<StateStore>,
    metrics: Arc<Metrics>,
    certificates: Arc<CertificateManager>,
    /// The node-wide HBONE memory budget every pod's proxy reserves from.
    memory: Arc<crate::proxy::budget::MemoryBudget>,
    /// The istiod client when `xds.address` is set.
    xds: Option<Arc<XdsClient>>,
    pods: Arc<PodManager>,
    /// The pods' DNS proxy settings, unless DNS is off.
    dns: Option<Arc<crate::dns::DnsSettings>>,
    /// The whole agent: pods' scopes and the control tasks' scope are its children.
    drain: Drain,
    /// Servers, discovery clients, the config watcher and rotation.
    control: Drain,
    /// Notified by the admin API's `/quitquitquit`.
    shutdown_requested: Arc<Notify>,
}

/// The node-level servers' sockets, bound before any task starts so that a taken port fails
/// start-up.
struct NodeListeners {
    readiness: TcpListener,
    admin: TcpListener,
    metrics: TcpListener,
}

impl NodeListeners {
    /// Readiness and metrics through [`crate::socket::bind_node_listener`] (`[::]` is
    /// dual-stack, with an IPv4 fallback on nodes without IPv6); admin on its loopback address.
    async fn bind(listen: &ListenConfig) -> anyhow::Result<Self> {
        let node = |name: &'static str, address: SocketAddr| {
            crate::socket::bind_node_listener(address)
                .with_context(|| format!("bind {name} {address}"))
        };
        Ok(NodeListeners {
            readiness: node("readiness", listen.readiness)?,
            admin: TcpListener::bind(listen.admin)
                .await
                .with_context(|| format!("bind admin {}", listen.admin))?,
            metrics: node("metrics", listen.metrics)?,
        })
    }
}

impl Agent {
    /// The certificate source and manager, the model, the xDS client and the pod manager.
    fn build(config: &Config, options: &RunOptions) -> anyhow::Result<Self> {
        let settings = config.agent.clone();
        if let Some(algorithm) = &settings.proxy.congestion_control {
            crate::socket::check_congestion_control(algorithm)
                .map_err(|problem| anyhow::anyhow!("agent.proxy.congestionControl: {problem}"))?;
        }
        let home = Arc::new(Netns::current().context("open the agent's own network namespace")?);
        let metrics = Arc::new(Metrics::new());
        let failures = metrics.clone();
        let certificates = Arc::new(
            CertificateManager::new(certificate_source(&settings, options)?)
                .on_failure(move |error| failures.certificate_fetch_failed(error.reason())),
        );
        let state = Arc::new(StateStore::new(config.snapshot()));
        let drain = Drain::new();
        let xds = xds_client(&settings, &metrics)?;
        let memory = crate::proxy::budget::MemoryBudget::new(settings.proxy.memory_budget);
        let inputs = ProxyInputs {
            state: state.clone(),
            certificates: certificates.clone(),
            settings: Arc::new(ProxySettings {
                proxy: settings.proxy.clone(),
                pool: settings.pool.clone(),
            }),
            metrics: metrics.clone(),
            sources: crate::proxy::limits::SourceLimits::new(
                settings.proxy.max_unauthenticated_per_source,
            ),
            memory: memory.clone(),
            shards: options.shards.clone(),
        };
        let rules = settings.capture.install_rules.then_some(RedirectRules {
            mark: settings.proxy.packet_mark,
            outbound_port: crate::net::ports::OUTBOUND,
            inbound_plaintext_port: crate::net::ports::INBOUND_PLAINTEXT,
            hbone_port: crate::net::ports::HBONE,
            dns_port: settings.dns.enabled.then_some(crate::dns::PORT),
        });
        let dns = settings
            .dns
            .enabled
            .then(|| Arc::new(crate::dns::DnsSettings::from_config(&settings.dns)));
        let pods = PodManager::new(
            inputs,
            home,
            settings.proxy.packet_mark,
            rules,
            drain.child(),
        );
        let pods = Arc::new(match &dns {
            Some(dns) => pods.with_dns(crate::dns::DnsInputs {
                state: state.clone(),
                metrics: metrics.clone(),
                settings: dns.clone(),
            }),
            None => pods,
        });
        Ok(Agent {
            dns,
            control: drain.child(),
            settings,
            state,
            metrics,
            certificates,
            memory,
            xds,
            pods,
            drain,
            shutdown_requested: Arc::new(Notify::new()),
        })
    }

    /// Starts every control task: rotation, the node-level servers, discovery, the config
    /// watcher and the task that applies config and model updates.
    fn spawn(&self, config: Config, options: &RunOptions, listeners: NodeListeners) {
        let rotation_stop = self.control.clone();
        self.certificates
            .clone()
            .spawn_rotation(async move { rotation_stop.draining().await });
        self.spawn_admin_and_metrics(&config, options, listeners.admin, listeners.metrics);
        let pending = self.spawn_discovery();
        // Validated at start (main); an unreadable value there stopped the agent.
        if options
            .overrides
            .env
            .release_startup_pages()
            .unwrap_or(true)
        {
            self.control
                .spawn(readiness::release_startup_pages_once_ready(
                    self.pods.clone(),
                    pending.clone(),
                    self.control.clone(),
                ));
        }
        self.control.spawn(readiness::serve(
            listeners.readiness,
            self.pods.clone(),
            pending,
            self.control.clone(),
        ));
        self.spawn_config_updates(config, options);
    }

    fn spawn_admin_and_metrics(
        &self,
        config: &Config,
        options: &RunOptions,
        admin: TcpListener,
        metrics: TcpListener,
    ) {
        let control = &self.control;
        control.spawn(crate::admin::serve(
            admin,
            crate::admin::AdminState {
                pods: self.pods.clone(),
                state: self.state.clone(),
                node: self.settings.node.clone(),
                certificates: self.certificates.clone(),
                metrics: self.metrics.clone(),
                logging: options.logging.clone(),
                config: effective_config(config, self.dns.as_deref()),
                shutdown: self.shutdown_requested.clone(),
            },
            control.clone(),
        ));
        control.spawn(crate::admin::metrics::serve(
            metrics,
            crate::admin::metrics::MetricsSources {
                metrics: self.metrics.clone(),
                pods: self.pods.clone(),
                certificates: self.certificates.clone(),
                logging: options.logging.clone(),
                runtimes: if options.shards.is_empty() {
                    vec![tokio::runtime::Handle::current()]
                } else {
                    options.shards.handles().to_vec()
                },
                memory: self.memory.clone(),
            },
            control.clone(),
        ));
        control.spawn(crate::admin::metrics::evict_stale_series(
            self.state.clone(),
            self.metrics.clone(),
            control.clone(),
        ));
    }

    /// Starts the istiod and istio-cni clients; returns what readiness waits for from them.
    fn spawn_discovery(&self) -> Pending {
        let control = &self.control;
        let xds_synced = self.xds.as_ref().map(|client| {
            let synced = client.subscribe_synced();
            let stop = control.clone();
            control.spawn(client.clone().run(async move { stop.draining().await }));
            synced
        });
        let zds_synced = self.settings.zds.enabled.then(|| {
            let client = Arc::new(ZdsClient::new(
                self.settings.zds.clone(),
                self.settings.node.clone(),
                self.pods.clone(),
                self.state.clone(),
            ));
            let synced = client.subscribe_synced();
            let stop = control.clone();
            let mut model_ready = xds_synced.clone();
            control.spawn(async move {
                // istio-cni names pods by Kubernetes uid and name; the workload (identity,
                // addresses) comes from istiod. Taking pods before the first workload push
                // would start proxies that know nothing about themselves.
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
        Pending {
            zds: zds_synced,
            xds: xds_synced,
        }
    }

    /// Starts the config watcher (when there is a file to watch) and [`apply_updates`].
    fn spawn_config_updates(&self, config: Config, options: &RunOptions) {
        let control = &self.control;
        let config = Arc::new(config);
        let (publish, updates) = tokio::sync::watch::channel(config.clone());
        if options.watch_config {
            let watch_stop = control.clone();
            control.spawn(config::watch::run(
                config.path.clone(),
                options.overrides.clone(),
                self.settings.reload_interval,
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
            self.xds.as_ref().map(|client| client.subscribe_model()),
            ModelPublisher {
                state: self.state.clone(),
                certificates: self.certificates.clone(),
                node: self.settings.node.clone(),
                dns_enabled: self.dns.is_some(),
                warned_dns_off: std::sync::atomic::AtomicBool::new(false),
            },
            self.pods.clone(),
            control.clone(),
        ));
        tracing::info!(node = %self.settings.node, config = %config.path.display(), "nodetunnel started");
    }

    /// Until SIGTERM, SIGINT or `/quitquitquit`.
    async fn wait_for_shutdown(&self) {
        tokio::select! {
            _ = wait_for_shutdown_signal() => {}
            _ = self.shutdown_requested.notified() => {}
        }
    }

    /// Drains everything within `drainTimeout` (a second SIGINT cuts it short), forces the
    /// rest, then removes every pod's rules.
    async fn shut_down(self) {
        let deadline = self.settings.drain_timeout;
        tracing::info!(?deadline, "shutting down: draining connections");
        let shutdown = self.drain.shutdown(deadline);
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
        self.pods.remove_all().await;
        tracing::info!("nodetunnel stopped");
    }
}

/// The istiod client when `xds.address` is set.
fn xds_client(agent: &AgentConfig, metrics: &Metrics) -> anyhow::Result<Option<Arc<XdsClient>>> {
    let Some(address) = &agent.xds.address else {
        return Ok(None);
    };
    let control_plane = control_plane(
        agent,
        address,
        &agent.xds.root_ca,
        &agent.xds.alt_hostname,
        &agent.xds.headers,
    )
    .context("xDS settings")?;
    Ok(Some(Arc::new(XdsClient::new(
        XdsSettings {
            control_plane,
            node: crate::xds::node(agent),
            max_message_size: agent.xds.max_message_size,
            reconnect_max: agent.xds.reconnect_max,
        },
        metrics.xds().clone(),
    ))))
}

/// The Istio CA when `ca.address` is set, else the built-in CA.
fn certificate_source(
    agent: &AgentConfig,
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
    agent: &AgentConfig,
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
fn effective_config(
    config: &Config,
    dns: Option<&crate::dns::DnsSettings>,
) -> crate::admin::EffectiveConfig {
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
        dns_proxy: dns.is_some(),
        dns_proxy_addr: format!("localhost:{}", crate::dns::PORT),
        cluster_domain: agent.dns.cluster_domain.clone(),
        dns_upstreams: dns.map_or_else(Vec::new, |dns| dns.upstreams.to_vec()),
        dns_forward_timeout: agent.dns.forward_timeout,
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
struct ModelPublisher {
    state: Arc<StateStore>,
    certificates: Arc<CertificateManager>,
    node: String,
    /// Whether pods have a DNS proxy, the only way a ServiceEntry host allows anything.
    dns_enabled: bool,
    /// Set once the "hostnames allow nothing without the DNS proxy" warning was logged.
    warned_dns_off: std::sync::atomic::AtomicBool,
}

impl ModelPublisher {
    /// Replaces the state with the file's model merged with istiod's. With istiod, fetches the
    /// certificates of this node's mesh workloads ahead of their first connection (as Istio's
    /// node agent does), and stops rotating those whose last local workload left.
    fn publish(&self, config: &Config, xds: Option<&XdsModel>) {
        let snapshot = merge(config.local_model(), xds.map(XdsModel::pushed));
        if xds.is_some() && !self.node.is_empty() {
            self.certificates
                .prefetch_only(snapshot.mesh_identities_on(&self.node));
        }
        if !self.dns_enabled
            && snapshot.egress().has_hostname_only_entries()
            && !self
                .warned_dns_off
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "the DNS proxy is off (agent.dns.enabled false or ISTIO_META_DNS_CAPTURE not \
                 true): ServiceEntry hosts allow no address, so under REGISTRY_ONLY a \
                 hostname-only ServiceEntry allows nothing"
            );
        }
        self.state.replace(snapshot);
    }
}

/// Applies each published config and istiod push: model first (new connections see it), then
/// pods. Retries failed pods periodically.
async fn apply_updates(
    mut updates: tokio::sync::watch::Receiver<Arc<Config>>,
    mut xds: Option<tokio::sync::watch::Receiver<Arc<XdsModel>>>,
    model: ModelPublisher,
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
