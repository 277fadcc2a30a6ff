//! The metrics server (layer L5): `/metrics` and `/stats/prometheus` on 15020, Prometheus text
//! by default and OpenMetrics when the scraper asks for `application/openmetrics-text`. Each
//! scrape first samples the pods, certificates, log writer and data-plane runtime into the
//! registry. Also the task that evicts series of workloads and policies that left the model.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::capture::{PodManager, PodStatus};
use crate::drain::Drain;
use crate::identity::CertificateManager;
use crate::node_http::{self, text, with_content_type, Body};
use crate::proxy::budget::MemoryBudget;
use crate::state::StateStore;
use crate::telemetry::metrics::{AgentSample, MemoryBudgetSample, RuntimeSample};
use crate::telemetry::{LogControl, Metrics};

const OPENMETRICS: &str = "application/openmetrics-text";
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape reads besides the registry.
#[derive(Clone)]
pub struct MetricsSources {
    /// The registry.
    pub metrics: Arc<Metrics>,
    /// Pods, for the in-pod proxy gauges.
    pub pods: Arc<PodManager>,
    /// Certificates, for expiry per identity.
    pub certificates: Arc<CertificateManager>,
    /// The log writer, for dropped lines.
    pub logging: Option<LogControl>,
    /// The data-plane runtimes (each shard's, or the one runtime when connections run on its
    /// workers), for the tokio metrics.
    pub runtimes: Vec<tokio::runtime::Handle>,
    /// The node's HBONE memory budget.
    pub memory: Arc<MemoryBudget>,
}

/// Serves the metrics endpoints until drain.
pub async fn serve(listener: TcpListener, sources: MetricsSources, drain: Drain) {
    node_http::serve(
        listener,
        drain,
        node_http::ServerLimits::PROBES,
        move |request| {
            let sources = sources.clone();
            async move { handle(&sources, &request) }
        },
    )
    .await
}

fn handle(sources: &MetricsSources, request: &Request<hyper::body::Incoming>) -> Response<Body> {
    if !matches!(request.uri().path(), "/metrics" | "/stats/prometheus") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let openmetrics = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains(OPENMETRICS));
    let body = sources.metrics.encode(&sample(sources), openmetrics);
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        PROMETHEUS_CONTENT_TYPE
    };
    with_content_type(StatusCode::OK, body, content_type)
}

fn sample(sources: &MetricsSources) -> AgentSample {
    let status = sources.pods.status();
    let active = status
        .values()
        .filter(|status| matches!(status, PodStatus::Running { .. }))
        .count();
    AgentSample {
        active_proxies: i64::try_from(active).unwrap_or(i64::MAX),
        pending_proxies: i64::try_from(status.len() - active).unwrap_or(i64::MAX),
        certificates: sources
            .certificates
            .certificates()
            .into_iter()
            .map(|(identity, _, not_after)| (identity, not_after))
            .collect(),
        dropped_log_lines: sources
            .logging
            .as_ref()
            .map_or(0, LogControl::dropped_lines),
        runtime: Some(RuntimeSample::of_all(&sources.runtimes)),
        memory_budget: Some(MemoryBudgetSample {
            limit: sources.memory.limit(),
            reserved: sources.memory.reserved(),
            reduced_connections: sources.memory.reduced_connections() as u64,
        }),
    }
}

/// Until drain: after every model change, removes the traffic and decision series of workloads
/// that are gone, and the decision series of policies that are gone.
pub async fn evict_stale_series(state: Arc<StateStore>, metrics: Arc<Metrics>, drain: Drain) {
    let mut changes = state.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = drain.draining() => return,
        }
        let snapshot = state.snapshot();
        let policies = crate::authz::policy_keys(snapshot.authorization());
        let removed = metrics.retain_workloads(|uid| snapshot.workload(uid).is_some())
            + metrics.retain_policies(|policy| policies.contains(policy));
        if removed > 0 {
            tracing::debug!(
                removed,
                "removed metric series of departed workloads and policies"
            );
        }
    }
}
