//! The admin API (layer L5): HTTP/1.1 on the loopback address of the agent's own namespace.
//!
//! Operators' view into the agent (Istio's ztunnel admin names where they overlap):
//! `/config_dump` (model, certificates, pods, effective config), `/connections` (open
//! connections with bytes and age), `/logging` (read or change the log filter at run time),
//! `/explain?from=..&to=..` (the policy decision for a source and destination),
//! `/quitquitquit` (graceful drain) and `/pods` (`GET` lists captured pods; `POST
//! /pods?workload=W&netns=PATH` captures one at run time; `DELETE /pods?workload=W` releases it;
//! pods added here survive config reloads), and CPU and heap profiles under `/debug/pprof/`
//! (`profiles.rs`). The metrics server (15020) lives in [`metrics`] and the CLI's client in
//! [`client`].

mod client;
mod dump;
#[cfg(test)]
mod istioctl_tests;
pub mod metrics;
mod profiles;
pub mod readiness;
pub mod schema;
pub mod tables;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::capture::{AddOutcome, PodManager, PodSource};
use crate::drain::Drain;
use crate::identity::CertificateManager;
use crate::node_http::{self, error_message as message, json, text, Body};
use crate::state::StateStore;
use crate::sys::Netns;
use crate::telemetry::{LogControl, Metrics};

pub use client::{call, query, ClientError};
pub use schema::EffectiveConfig;

/// What the admin handlers can reach.
#[derive(Clone)]
pub struct AdminState {
    /// Captured pods.
    pub pods: Arc<PodManager>,
    /// The model, to resolve workload names.
    pub state: Arc<StateStore>,
    /// This agent's node, to refuse capturing another node's workload.
    pub node: String,
    /// Workload certificates, for the dump.
    pub certificates: Arc<CertificateManager>,
    /// Open connections.
    pub metrics: Arc<Metrics>,
    /// The log filter; `None` when this process did not install logging (embedded use).
    pub logging: Option<LogControl>,
    /// The effective configuration, for the dump.
    pub config: EffectiveConfig,
    /// Notified by `/quitquitquit`; the app drains as on SIGTERM.
    pub shutdown: Arc<Notify>,
}

/// Serves the admin API until drain.
pub async fn serve(listener: TcpListener, admin: AdminState, drain: Drain) {
    node_http::serve(
        listener,
        drain,
        node_http::ServerLimits::ADMIN,
        move |request| {
            let admin = admin.clone();
            async move { handle(admin, request).await }
        },
    )
    .await
}

async fn handle(admin: AdminState, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match (request.method(), request.uri().path()) {
        (_, "/") => index(),
        (_, "/config_dump") => json(StatusCode::OK, &dump::config_dump(&admin)),
        (_, "/connections") => json(StatusCode::OK, &dump::connections(&admin)),
        (&Method::POST, "/logging") => logging(&admin, &query),
        (_, "/logging") => message(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /logging (current level), ?level=<level> or ?level=<target>=<level>,... (e.g. debug or access=debug), or ?reset",
        ),
        (_, "/explain") => explain(&admin, &query),
        (&Method::POST, "/quitquitquit") => {
            tracing::info!("shutdown requested through the admin API");
            admin.shutdown.notify_one();
            text(StatusCode::OK, "shutdown now\n")
        }
        (_, "/quitquitquit") => message(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::GET, "/pods") => json(StatusCode::OK, &admin.pods.status()),
        (&Method::POST, "/pods") => add_pod(&admin, &query).await,
        (&Method::DELETE, "/pods") => remove_pod(&admin, &query).await,
        (_, "/pods") => message(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or DELETE"),
        (_, "/debug/pprof/profile") => profiles::cpu(&query).await,
        (_, "/debug/pprof/heap") => profiles::heap().await,
        (method, "/debug/pprof/heap/profiling") => profiles::heap_profiling(method, &query).await,
        _ => message(StatusCode::NOT_FOUND, "not found"),
    }
}

fn index() -> Response<Body> {
    text(
        StatusCode::OK,
        "nodetunnel admin\n\
         /config_dump      workloads, services, policies, certificates, pods, config\n\
         /connections      open connections\n\
         /logging          POST: read or change the log filter (?level=debug, ?level=access=debug, ?reset)\n\
         /explain          ?from=<source>&to=<destination>: the policy decision\n\
         /pods             GET list, POST ?workload=&netns= capture, DELETE ?workload= release\n\
         /quitquitquit     POST: drain and exit\n\
         /debug/pprof/profile         CPU profile (pprof): ?seconds=1-300 (10), ?frequency=1-1000 (100)\n\
         /debug/pprof/heap            heap profile (gzipped pprof) while heap profiling is active\n\
         /debug/pprof/heap/profiling  GET state, POST ?activate=true|false\n",
    )
}

/// `POST /logging`, as ztunnel's: no parameter reads the filter; `?level=` adds a level or
/// `target=level` clauses to it (400 if one does not parse); `?reset` restores the start-up
/// filter first.
fn logging(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Body> {
    let Some(logging) = &admin.logging else {
        return message(
            StatusCode::NOT_IMPLEMENTED,
            "logging is not controllable here",
        );
    };
    let level = query.get("level").map(String::as_str);
    let result = match (query.contains_key("reset"), level) {
        (true, level) => logging.reset(level),
        (false, Some(level)) if !level.is_empty() => logging.set(level),
        (false, _) => logging.current(),
    };
    match result {
        Ok(level) => {
            if query.contains_key("reset") || query.contains_key("level") {
                tracing::info!(%level, "log level changed through the admin API");
            }
            text(StatusCode::OK, format!("current log level is {level}\n"))
        }
        Err(crate::telemetry::LogLevelError::Invalid { directives, reason }) => message(
            StatusCode::BAD_REQUEST,
            &format!("invalid level {directives:?}: {reason}"),
        ),
        Err(error) => message(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

/// `/explain?from=<source>&to=<destination>`: the decision the current model would make.
fn explain(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Body> {
    let (Some(from), Some(to)) = (query.get("from"), query.get("to")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "need ?from=<workload|ip|spiffe id>&to=<ip:port|workload:port>",
        );
    };
    match crate::authz::explain(&admin.state.snapshot(), from, to) {
        Ok(explained) => json(StatusCode::OK, &explained),
        Err(error) => message(StatusCode::BAD_REQUEST, &error.to_string()),
    }
}

/// Why a workload named in a request cannot be captured or released here.
#[derive(Debug, thiserror::Error)]
enum WorkloadLookupError {
    /// No workload has that uid or `namespace/name`.
    #[error("no workload {0:?} in the configuration")]
    Unknown(String),
    /// The workload runs on another node.
    #[error("workload {workload:?} is on node {node:?}, not this node {this_node:?}")]
    Elsewhere {
        workload: String,
        node: String,
        this_node: String,
    },
}

/// Resolves `workload` (uid or `namespace/name`) to a uid of a workload on this node.
fn resolve_workload(admin: &AdminState, workload: &str) -> Result<String, WorkloadLookupError> {
    let snapshot = admin.state.snapshot();
    let found = snapshot.workloads().find(|candidate| {
        candidate.uid == workload
            || format!("{}/{}", candidate.namespace, candidate.name) == workload
    });
    match found {
        None => Err(WorkloadLookupError::Unknown(workload.to_string())),
        Some(found) if found.node != admin.node => Err(WorkloadLookupError::Elsewhere {
            workload: workload.to_string(),
            node: found.node.clone(),
            this_node: admin.node.clone(),
        }),
        Some(found) => Ok(found.uid.clone()),
    }
}

async fn add_pod(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Body> {
    let (Some(workload), Some(netns)) = (query.get("workload"), query.get("netns")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "need ?workload=<uid|ns/name>&netns=<path>",
        );
    };
    let uid = match resolve_workload(admin, workload) {
        Ok(uid) => uid,
        Err(reason) => return message(StatusCode::NOT_FOUND, &reason.to_string()),
    };
    let path = PathBuf::from(netns);
    let netns = match Netns::open(&path) {
        Ok(netns) => netns,
        Err(error) => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("cannot open network namespace {}: {error}", path.display()),
            )
        }
    };
    match admin.pods.add_from(PodSource::Api, &uid, netns).await {
        Ok(outcome) => {
            let outcome = match outcome {
                AddOutcome::Started => "started",
                AddOutcome::Unchanged => "unchanged",
                AddOutcome::Replaced => "replaced",
            };
            json(
                StatusCode::OK,
                &serde_json::json!({ "workload": uid, "outcome": outcome }),
            )
        }
        Err(error) => message(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

async fn remove_pod(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Body> {
    let Some(workload) = query.get("workload") else {
        return message(StatusCode::BAD_REQUEST, "need ?workload=<uid|ns/name>");
    };
    let uid = match resolve_workload(admin, workload) {
        Ok(uid) => uid,
        Err(reason) => return message(StatusCode::NOT_FOUND, &reason.to_string()),
    };
    if admin.pods.remove(&uid).await {
        json(
            StatusCode::OK,
            &serde_json::json!({ "workload": uid, "outcome": "removed" }),
        )
    } else {
        message(
            StatusCode::NOT_FOUND,
            &format!("workload {uid:?} is not captured"),
        )
    }
}
