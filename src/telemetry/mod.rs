//! Logging, the per-connection access record and the metrics registry (layer L1).
//!
//! Every proxied connection owns one [`ConnectionRecord`] (`record.rs`): it emits exactly one
//! access-log event when dropped and records the Istio TCP metrics ([`metrics::Metrics`]), so
//! logs and metrics always agree. Logging goes through a bounded non-blocking writer so a slow
//! stderr never stalls the data path, and its filter can be changed at run time through
//! [`LogControl`] (the admin API's `/logging`).

pub mod dns;
mod labels;
pub mod metrics;
pub mod protection;
mod record;
pub mod xds;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt as tracing_fmt, reload, EnvFilter, Registry};

pub use labels::Direction;
pub use metrics::ByteCounters;
pub use metrics::{Metrics, ResponseFlag};
pub use record::ConnectionRecord;

/// Log lines buffered before the writer starts dropping (Istio buffers 10 000 too).
const LOG_BUFFER_LINES: usize = 10_000;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Errors changing the log filter.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The directive string did not parse (`info`, `access=debug,warn`, ...).
    #[error("invalid log level {directives:?}: {reason}")]
    Invalid {
        /// What was asked for.
        directives: String,
        /// Why it was refused.
        reason: String,
    },
    /// The subscriber is gone (logging was never installed by this process).
    #[error("logging is not controllable: {0}")]
    Unavailable(String),
}

/// Run-time control of logging: the current filter and how many lines were dropped. Cheap to
/// clone; every clone controls the same subscriber.
#[derive(Debug, Clone)]
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    default: String,
    dropped: ErrorCounter,
}

impl LogControl {
    /// The filter in effect, as directives (`info`, `access=debug,info`).
    pub fn current(&self) -> Result<String, LogLevelError> {
        self.filter
            .with_current(|filter| filter.to_string())
            .map_err(|error| LogLevelError::Unavailable(error.to_string()))
    }

    /// Replaces the filter with `directives`; on a parse error the old filter stays.
    pub fn set(&self, directives: &str) -> Result<String, LogLevelError> {
        let filter = EnvFilter::try_new(directives).map_err(|error| LogLevelError::Invalid {
            directives: directives.to_string(),
            reason: error.to_string(),
        })?;
        self.filter
            .reload(filter)
            .map_err(|error| LogLevelError::Unavailable(error.to_string()))?;
        self.current()
    }

    /// Restores the filter the process started with (`RUST_LOG`, or `info`).
    pub fn reset(&self) -> Result<String, LogLevelError> {
        self.set(&self.default.clone())
    }

    /// Log lines dropped because the writer's buffer was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }
}

/// Keeps the log writer thread alive; dropping it flushes what is buffered. Hold it in `main`.
pub struct LoggingGuard {
    /// Run-time control, for the admin API and metrics.
    pub control: LogControl,
    _writer: WorkerGuard,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), output to stderr
/// through a bounded non-blocking writer that drops (and counts) lines rather than block.
pub fn init_logging(format: LogFormat) -> LoggingGuard {
    let default = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|value| EnvFilter::try_new(value).is_ok())
        .unwrap_or_else(|| "info".to_string());
    let filter = EnvFilter::try_new(&default).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Plain => registry
            .with(tracing_fmt::layer().with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_fmt::layer()
                    .json()
                    .flatten_event(false)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
    LoggingGuard {
        control: LogControl {
            filter: handle,
            default,
            dropped,
        },
        _writer: guard,
    }
}
