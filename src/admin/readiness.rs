//! Readiness (layer L5): `GET /healthz/ready` on 15021, beside the admin and metrics servers.
//! 200 when every pod is captured; 500 listing what is pending (as Istio's agent answers, so
//! existing probes and dashboards read it the same way). With istiod, not ready until the first
//! push of each type; with istio-cni, until the current connection's snapshot is applied.
//! Once first ready, the agent gives back its start-up code's pages
//! ([`release_startup_pages_once_ready`]).

use std::sync::Arc;

use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::capture::PodManager;
use crate::drain::Drain;
use crate::node_http::{self, text};

/// The sources readiness waits for besides the pods themselves.
#[derive(Clone, Default)]
pub struct Pending {
    /// istio-cni's snapshot applied.
    pub zds: Option<watch::Receiver<bool>>,
    /// istiod's first push of each type received.
    pub xds: Option<watch::Receiver<crate::xds::Synced>>,
}

/// Serves `/healthz/ready` until drain.
pub async fn serve(listener: TcpListener, pods: Arc<PodManager>, sources: Pending, drain: Drain) {
    node_http::serve(
        listener,
        drain,
        node_http::ServerLimits::PROBES,
        move |request| {
            let pods = pods.clone();
            let sources = sources.clone();
            async move {
                if request.uri().path() != "/healthz/ready" {
                    return text(StatusCode::NOT_FOUND, "not found\n");
                }
                let pending = pending(&pods, &sources);
                if pending.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("not ready, pending: {}\n", pending.join(", ")),
                    )
                }
            }
        },
    )
    .await
}

/// Once the agent is first ready, gives the kernel back the resident pages of its own
/// executable ([`crate::sys::release_executable_pages`]). Start-up runs a lot of code that is
/// not run again (config parsing, the CA and first certificates, listener and rule set-up), and
/// the kernel maps code in 64 KiB runs around each page touched: about 10 MB of the binary stay
/// resident, of an idle working set near 5 MB. What the data path runs faults back in on its
/// first use, a one-time cost of a few milliseconds of page faults spread over the first
/// connections. `NODETUNNEL_RELEASE_STARTUP_PAGES=off` keeps them.
pub async fn release_startup_pages_once_ready(
    pods: Arc<PodManager>,
    sources: Pending,
    drain: Drain,
) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = drain.draining() => return,
        }
        if is_ready(&pods, &sources) {
            break;
        }
    }
    let before = crate::sys::resident_kib();
    match tokio::task::spawn_blocking(crate::sys::release_executable_pages).await {
        Ok(Ok(advised)) => tracing::info!(
            advised_kib = advised / 1024,
            rss_before_kib = before.unwrap_or(0),
            rss_after_kib = crate::sys::resident_kib().unwrap_or(0),
            "ready: start-up code pages given back to the kernel"
        ),
        Ok(Err(error)) => {
            tracing::info!(%error, "start-up code pages not given back (kernel without MADV_PAGEOUT?)")
        }
        Err(error) => tracing::warn!(%error, "releasing start-up code pages failed"),
    }
}

/// Whether `/healthz/ready` would answer 200 now.
pub fn is_ready(pods: &PodManager, sources: &Pending) -> bool {
    pending(pods, sources).is_empty()
}

/// What readiness still waits for, sources first, then pods.
fn pending(pods: &PodManager, sources: &Pending) -> Vec<String> {
    let mut pending = pods.pending();
    if sources.zds.as_ref().is_some_and(|synced| !*synced.borrow()) {
        pending.insert(0, "workload proxy manager".to_string());
    }
    if let Some(xds) = &sources.xds {
        let missing = xds.borrow().pending();
        pending.splice(0..0, missing);
    }
    pending
}
