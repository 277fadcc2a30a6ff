//! Profiles on the admin API (layer L5), at Istio ztunnel's paths:
//!
//! - `/debug/pprof/profile?seconds=N&frequency=HZ`: samples the CPU of every thread of the
//!   process for `seconds` (1–300, default 10) at `frequency` Hz (1–1000, default 100) and answers
//!   a pprof protobuf (`go tool pprof`, `pprof -http`). One at a time: a second request meanwhile
//!   gets 409.
//! - `/debug/pprof/heap`: jemalloc's sampled heap profile of live allocations, gzipped pprof
//!   protobuf, once heap profiling is active; 409 while it is not, 501 in a build whose jemalloc
//!   cannot profile.
//! - `/debug/pprof/heap/profiling`: `GET` tells whether heap profiling is active; `POST
//!   ?activate=true|false` switches it (deactivating resets the samples).
//!
//! Both are off until asked: the CPU sampler's SIGPROF timer only runs during a request, and
//! jemalloc starts with sampling inactive (`.cargo/config.toml`), so an unprofiled agent's data
//! path takes no backtraces.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use hyper::{Method, Response, StatusCode};

use crate::node_http::{error_message as message, json, with_content_type, Body};

/// Libraries whose frames the CPU sampler must not unwind through from its signal handler
/// (unwinding while one of them holds a lock deadlocks), as the pprof crate advises.
const UNWIND_BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// Why a CPU profile could not be taken.
#[derive(Debug, thiserror::Error)]
enum ProfileError {
    /// Another CPU profile is being taken (the sampler is process-wide).
    #[error("a CPU profile is already being taken; try again when it is done")]
    Busy,
    /// The request went away before the profile was done.
    #[error("the request was cancelled")]
    Cancelled,
    /// The sampler could not start, or its report could not be built.
    #[error("profiler: {0}")]
    Profiler(#[source] pprof::Error),
}

/// A query parameter that is not an integer in its range.
#[derive(Debug, thiserror::Error)]
#[error("{name} must be an integer from {min} to {max}, not {value:?}")]
struct BadParameter {
    name: String,
    min: u32,
    max: u32,
    value: String,
}

/// A query parameter that must be an integer in `range`; `default` when absent.
fn bounded(
    query: &BTreeMap<String, String>,
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, BadParameter> {
    let Some(value) = query.get(name) else {
        return Ok(default);
    };
    value
        .parse::<u32>()
        .ok()
        .filter(|parsed| range.contains(parsed))
        .ok_or_else(|| BadParameter {
            name: name.to_string(),
            min: *range.start(),
            max: *range.end(),
            value: value.clone(),
        })
}

/// `/debug/pprof/profile`.
pub(super) async fn cpu(query: &BTreeMap<String, String>) -> Response<Body> {
    let parsed = bounded(query, "seconds", 10, 1..=300)
        .and_then(|seconds| Ok((seconds, bounded(query, "frequency", 100, 1..=1000)?)));
    let (seconds, frequency) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => return message(StatusCode::BAD_REQUEST, &reason.to_string()),
    };
    // The sampler's guard is not Send and symbolizing takes a while: both stay on a blocking
    // thread. It waits on `stop`, whose sender lives in this future, so a client that goes away
    // (or a forced admin shutdown) ends the sampling at once instead of after `seconds`.
    let (_keep_running, stop) = mpsc::channel::<()>();
    let duration = Duration::from_secs(u64::from(seconds));
    let frequency = i32::try_from(frequency).unwrap_or(100);
    let taken = tokio::task::spawn_blocking(move || profile_cpu(duration, frequency, &stop)).await;
    match taken {
        Ok(Ok(profile)) => binary(profile),
        Ok(Err(error @ ProfileError::Busy)) => message(StatusCode::CONFLICT, &error.to_string()),
        Ok(Err(error)) => message(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        Err(join) => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("profiler thread failed: {join}"),
        ),
    }
}

/// Samples for `duration` (or until `stop`'s sender is dropped), then encodes the report.
fn profile_cpu(
    duration: Duration,
    frequency: i32,
    stop: &mpsc::Receiver<()>,
) -> Result<Vec<u8>, ProfileError> {
    use pprof::protos::Message as _;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(frequency)
        .blocklist(&UNWIND_BLOCKLIST)
        .build()
        .map_err(|error| match error {
            pprof::Error::Running => ProfileError::Busy,
            other => ProfileError::Profiler(other),
        })?;
    if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(duration) {
        return Err(ProfileError::Cancelled);
    }
    let report = guard.report().build().map_err(ProfileError::Profiler)?;
    let profile = report.pprof().map_err(ProfileError::Profiler)?;
    Ok(profile.encode_to_vec())
}

/// `/debug/pprof/heap`.
pub(super) async fn heap() -> Response<Body> {
    let Some(control) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return message(StatusCode::NOT_IMPLEMENTED, NO_HEAP_PROFILING);
    };
    let mut control = control.clone().lock_owned().await;
    if !control.activated() {
        return message(
            StatusCode::CONFLICT,
            "heap profiling is not active: POST /debug/pprof/heap/profiling?activate=true, \
             let the agent work, then ask again",
        );
    }
    // jemalloc writes the profile to a file that is then parsed and gzipped: off the workers.
    let dumped = tokio::task::spawn_blocking(move || control.dump_pprof()).await;
    match dumped {
        Ok(Ok(profile)) => binary(profile),
        Ok(Err(error)) => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("heap profile: {error:#}"),
        ),
        Err(join) => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("heap profile thread failed: {join}"),
        ),
    }
}

/// `/debug/pprof/heap/profiling`.
pub(super) async fn heap_profiling(
    method: &Method,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let Some(control) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return message(StatusCode::NOT_IMPLEMENTED, NO_HEAP_PROFILING);
    };
    let mut control = control.lock().await;
    if let Some(activate) = query.get("activate") {
        if method != Method::POST {
            return message(StatusCode::METHOD_NOT_ALLOWED, "use POST to change it");
        }
        let switched = match activate.as_str() {
            "true" => control.activate(),
            "false" => control.deactivate(),
            other => {
                return message(
                    StatusCode::BAD_REQUEST,
                    &format!("activate must be true or false, not {other:?}"),
                )
            }
        };
        if let Err(error) = switched {
            return message(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string());
        }
        tracing::info!(
            active = control.activated(),
            "heap profiling switched through the admin API"
        );
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "active": control.activated() }),
    )
}

const NO_HEAP_PROFILING: &str = "heap profiling is unavailable: jemalloc was not started with \
     prof:true (the agent's build sets it in .cargo/config.toml; _RJEM_MALLOC_CONF overrides it)";

fn binary(body: Vec<u8>) -> Response<Body> {
    with_content_type(StatusCode::OK, body, "application/octet-stream")
}
