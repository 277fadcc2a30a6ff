//! The admin API (layer L5): HTTP/1.1 on the loopback address of the agent's own namespace.
//!
//! `GET /pods` lists captured pods; `POST /pods?workload=W&netns=PATH` captures a pod at run
//! time (for scripts and `nodetunnel pod add`); `DELETE /pods?workload=W` releases it. Pods
//! added here survive config reloads: each pod source reconciles only its own pods. The client
//! half, used by the CLI, is here too so both ends of the API live in one file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::capture::{AddOutcome, PodManager, PodSource};
use crate::drain::Drain;
use crate::state::StateStore;
use crate::sys::Netns;

/// What the admin handlers can reach.
#[derive(Clone)]
pub struct AdminState {
    /// Captured pods.
    pub pods: Arc<PodManager>,
    /// The model, to resolve workload names.
    pub state: Arc<StateStore>,
    /// This agent's node, to refuse capturing another node's workload.
    pub node: String,
}

/// Serves the admin API until drain.
pub async fn serve(listener: TcpListener, admin: AdminState, drain: Drain) {
    crate::app::serve_http(listener, drain, move |request| {
        let admin = admin.clone();
        async move { handle(admin, request).await }
    })
    .await
}

async fn handle(
    admin: AdminState,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/pods") => json(StatusCode::OK, &admin.pods.status()),
        (&Method::POST, "/pods") => add_pod(&admin, &query).await,
        (&Method::DELETE, "/pods") => remove_pod(&admin, &query).await,
        (_, "/pods") => message(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or DELETE"),
        _ => message(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Resolves `workload` (uid or `namespace/name`) to a uid of a workload on this node.
fn resolve_workload(admin: &AdminState, workload: &str) -> Result<String, String> {
    let snapshot = admin.state.snapshot();
    let found = snapshot.workloads().find(|candidate| {
        candidate.uid == workload
            || format!("{}/{}", candidate.namespace, candidate.name) == workload
    });
    match found {
        None => Err(format!("no workload {workload:?} in the configuration")),
        Some(found) if found.node != admin.node => Err(format!(
            "workload {workload:?} is on node {:?}, not this node {:?}",
            found.node, admin.node
        )),
        Some(found) => Ok(found.uid.clone()),
    }
}

async fn add_pod(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
    let (Some(workload), Some(netns)) = (query.get("workload"), query.get("netns")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "need ?workload=<uid|ns/name>&netns=<path>",
        );
    };
    let uid = match resolve_workload(admin, workload) {
        Ok(uid) => uid,
        Err(reason) => return message(StatusCode::NOT_FOUND, &reason),
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

async fn remove_pod(admin: &AdminState, query: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
    let Some(workload) = query.get("workload") else {
        return message(StatusCode::BAD_REQUEST, "need ?workload=<uid|ns/name>");
    };
    let uid = match resolve_workload(admin, workload) {
        Ok(uid) => uid,
        Err(reason) => return message(StatusCode::NOT_FOUND, &reason),
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

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn message(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": text }))
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error(
        "cannot reach the agent's admin API at {addr}: {source} (is it running? is --admin right?)"
    )]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("admin API request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("admin API request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Sends one request to the admin API and returns the status and body.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, String), ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `?key=value&...` with each value percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        serializer.append_pair(key, value);
    }
    serializer.finish()
}
