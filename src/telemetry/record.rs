//! Logging and the per-connection access record (layer L1).
//!
//! Every proxied connection owns one [`ConnectionRecord`]. It is filled in as the connection
//! learns who is talking to whom and emits exactly one access-log event when dropped — on
//! success, failure, drain or panic alike — so no connection goes unreported.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt as tracing_fmt, EnvFilter};

use crate::spiffe::Identity;
use crate::state::{Service, Workload};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), output to stderr.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Plain => registry
            .with(tracing_fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_fmt::layer()
                    .json()
                    .flatten_event(false)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
}

/// Which way a connection goes relative to the workload this agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local workload to somewhere else.
    Outbound,
    /// To a local workload.
    Inbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

/// Live byte counters of one connection, shared with the copy loop.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Bytes from the source towards the destination.
    pub sent: AtomicU64,
    /// Bytes from the destination back to the source.
    pub received: AtomicU64,
}

/// What is known about one proxied connection; logs itself once when dropped.
#[derive(Debug)]
pub struct ConnectionRecord {
    direction: Direction,
    started: Instant,
    /// Connection id shared by both agents (the HBONE `traceparent`).
    pub trace: String,
    /// The source's address.
    pub src_addr: String,
    /// The source workload, if known.
    pub src_workload: Option<Arc<Workload>>,
    /// The source identity proven by mTLS (inbound) or presented by us (outbound).
    pub src_identity: Option<Identity>,
    /// The destination address (the app's original destination, or the pod target).
    pub dst_addr: String,
    /// The HBONE tunnel target (`:authority`), when tunnelled.
    pub dst_hbone_addr: Option<String>,
    /// The destination workload, if known.
    pub dst_workload: Option<Arc<Workload>>,
    /// The service addressed, if any.
    pub dst_service: Option<Arc<Service>>,
    /// The destination identity.
    pub dst_identity: Option<Identity>,
    /// Byte counters.
    pub bytes: Arc<ByteCounters>,
    /// The failure, if the connection failed.
    pub error: Option<String>,
}

impl ConnectionRecord {
    /// A record for a connection that just arrived.
    pub fn new(direction: Direction, src_addr: impl ToString, dst_addr: impl ToString) -> Self {
        ConnectionRecord {
            direction,
            started: Instant::now(),
            trace: String::new(),
            src_addr: src_addr.to_string(),
            src_workload: None,
            src_identity: None,
            dst_addr: dst_addr.to_string(),
            dst_hbone_addr: None,
            dst_workload: None,
            dst_service: None,
            dst_identity: None,
            bytes: Arc::new(ByteCounters::default()),
            error: None,
        }
    }

    /// Records a failure (the first one wins: later errors are consequences).
    pub fn fail(&mut self, error: impl fmt::Display) {
        if self.error.is_none() {
            self.error = Some(error.to_string());
        }
    }
}

fn or_empty<T: fmt::Display>(value: &Option<T>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_default()
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        let workload_field = |workload: &Option<Arc<Workload>>, pick: fn(&Workload) -> &str| {
            workload
                .as_deref()
                .map(|w| pick(w).to_string())
                .unwrap_or_default()
        };
        let src_workload = workload_field(&self.src_workload, |w| &w.name);
        let src_namespace = workload_field(&self.src_workload, |w| &w.namespace);
        let dst_workload = workload_field(&self.dst_workload, |w| &w.name);
        let dst_namespace = workload_field(&self.dst_workload, |w| &w.namespace);
        let dst_service = self
            .dst_service
            .as_deref()
            .map(|s| s.hostname.clone())
            .unwrap_or_default();
        let duration = format!("{}ms", self.started.elapsed().as_millis());
        let bytes_sent = self.bytes.sent.load(Ordering::Relaxed);
        let bytes_recv = self.bytes.received.load(Ordering::Relaxed);
        macro_rules! access_event {
            ($level:expr, $error:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    trace = %self.trace,
                    src.addr = %self.src_addr,
                    src.workload = %src_workload,
                    src.namespace = %src_namespace,
                    src.identity = %or_empty(&self.src_identity),
                    dst.addr = %self.dst_addr,
                    dst.hbone_addr = %or_empty(&self.dst_hbone_addr),
                    dst.service = %dst_service,
                    dst.workload = %dst_workload,
                    dst.namespace = %dst_namespace,
                    dst.identity = %or_empty(&self.dst_identity),
                    direction = %self.direction,
                    bytes_sent,
                    bytes_recv,
                    duration = %duration,
                    error = $error,
                    "connection complete"
                )
            };
        }
        match self.error.as_deref() {
            None => access_event!(tracing::Level::INFO, tracing::field::Empty),
            Some(error) => access_event!(tracing::Level::ERROR, tracing::field::display(error)),
        }
    }
}
