//! Logging, the per-connection access record and the metrics registry (layer L1).
//!
//! Every proxied connection owns one [`ConnectionRecord`] (`record.rs`): it emits exactly one
//! access-log event when dropped and records the Istio TCP metrics ([`metrics::Metrics`]), so
//! logs and metrics always agree. Logging goes through a bounded non-blocking writer so a slow
//! stderr never stalls the data path, and its filter can be changed at run time through
//! [`LogControl`] (the admin API's `/logging`).

pub mod dns;
mod json_format;
mod labels;
pub mod metrics;
pub mod protection;
mod record;
pub mod xds;

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt as tracing_fmt, reload, EnvFilter, Registry};

pub use labels::Direction;
pub use metrics::ByteCounters;
pub use metrics::ConnectionFields;
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
    /// One JSON object per line, in Istio's layout (`level`, `time`, `scope`, then the fields).
    Json,
}

/// Errors changing the log filter.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The level did not parse: each comma-separated clause must be a level (`off`, `error`,
    /// `warn`, `info`, `debug`, `trace`) or `target=level`, as ztunnel's `/logging` requires.
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
    /// The directives in effect, kept as text so that a change can replace clauses by target.
    directives: Arc<Mutex<String>>,
    dropped: ErrorCounter,
}

impl LogControl {
    /// The filter in effect, as directives (`info`, `access=debug,info`).
    pub fn current(&self) -> Result<String, LogLevelError> {
        self.filter
            .with_current(|filter| filter.to_string())
            .map_err(|error| LogLevelError::Unavailable(error.to_string()))
    }

    /// Adds `level` to the filter in effect, as ztunnel's `/logging?level=` does: `debug` changes
    /// the default level, `access=debug` one target's, and every other clause stays. On an
    /// invalid level nothing changes.
    pub fn set(&self, level: &str) -> Result<String, LogLevelError> {
        validate_level(level)?;
        let mut directives = self.lock_directives();
        let merged = merge_directives(&directives, level);
        self.apply(&merged)?;
        *directives = merged;
        drop(directives);
        self.current()
    }

    /// Restores the filter the process started with (`RUST_LOG`, or `info`), then adds `level`
    /// if one is given.
    pub fn reset(&self, level: Option<&str>) -> Result<String, LogLevelError> {
        let level = level.filter(|level| !level.is_empty());
        if let Some(level) = level {
            validate_level(level)?;
        }
        let mut directives = self.lock_directives();
        let merged = merge_directives(&self.default, level.unwrap_or(""));
        self.apply(&merged)?;
        *directives = merged;
        drop(directives);
        self.current()
    }

    /// Log lines dropped because the writer's buffer was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }

    fn lock_directives(&self) -> std::sync::MutexGuard<'_, String> {
        // The string is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.directives
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply(&self, directives: &str) -> Result<(), LogLevelError> {
        let filter = EnvFilter::try_new(directives).map_err(|error| LogLevelError::Invalid {
            directives: directives.to_string(),
            reason: error.to_string(),
        })?;
        self.filter
            .reload(filter)
            .map_err(|error| LogLevelError::Unavailable(error.to_string()))
    }
}

/// Level names `/logging` accepts on their own, as ztunnel's.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// ztunnel's `/logging` rule: every comma-separated clause is a level or `target=level`. A bare
/// target (which the filter syntax would read as "everything of that target, nothing else") and
/// typos like `access:debug` are refused.
fn validate_level(level: &str) -> Result<(), LogLevelError> {
    let invalid = |reason: String| LogLevelError::Invalid {
        directives: level.to_string(),
        reason,
    };
    if level.trim().is_empty() {
        return Err(invalid("empty level".to_string()));
    }
    for clause in level.split(',') {
        if LEVELS.contains(&clause) {
            continue;
        }
        let Some((target, target_level)) = clause.split_once('=') else {
            return Err(invalid(format!(
                "{clause:?} is neither a level ({}) nor target=level",
                LEVELS.join("|")
            )));
        };
        let target_ok = !target.is_empty()
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:-.".contains(c));
        if !target_ok {
            return Err(invalid(format!("{target:?} is not a target name")));
        }
        if !LEVELS.contains(&target_level) {
            return Err(invalid(format!(
                "{target_level:?} is not a level ({})",
                LEVELS.join("|")
            )));
        }
    }
    Ok(())
}

/// `base` with `added`'s clauses in place of base clauses for the same target (or the default
/// level). Commas inside `[...]` field filters do not split clauses.
fn merge_directives(base: &str, added: &str) -> String {
    let key = |clause: &str| -> String {
        match clause.split_once('=') {
            Some((target, _)) => target.to_string(),
            None if LEVELS.contains(&clause.to_ascii_lowercase().as_str()) => String::new(),
            None => clause.to_string(),
        }
    };
    let added = split_directives(added);
    let replaced: Vec<String> = added.iter().map(|clause| key(clause)).collect();
    let mut merged: Vec<&str> = split_directives(base)
        .into_iter()
        .filter(|clause| !replaced.contains(&key(clause)))
        .collect();
    merged.extend(added);
    merged.join(",")
}

fn split_directives(text: &str) -> Vec<&str> {
    let mut clauses = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (index, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                clauses.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    clauses.push(&text[start..]);
    clauses
        .into_iter()
        .map(str::trim)
        .filter(|clause| !clause.is_empty())
        .collect()
}

/// Keeps the log writer thread alive; dropping it flushes what is buffered. Hold it in `main`.
pub struct LoggingGuard {
    /// Run-time control, for the admin API and metrics.
    pub control: LogControl,
    _writer: WorkerGuard,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), output to stderr
/// through a bounded non-blocking writer that drops (and counts) lines rather than block. Plain
/// lines carry ANSI colours only when stderr is a terminal; JSON lines are Istio's layout
/// ([`json_format`]).
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
            .with(
                tracing_fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(json_format::IstioJson)
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
            directives: Arc::new(Mutex::new(default.clone())),
            default,
            dropped,
        },
        _writer: guard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logging_levels_are_checked_as_ztunnel_does() {
        let cases: &[(&str, bool)] = &[
            ("info", true),
            ("debug", true),
            ("off", true),
            ("access=debug", true),
            ("access=debug,info", true),
            ("nodetunnel::proxy=trace,warn", true),
            ("access:debug", false),
            ("access", false),
            ("verbose", false),
            ("access=loud", false),
            ("=debug", false),
            ("a=b=debug", false),
            ("", false),
            ("info,", false),
        ];
        for (level, valid) in cases {
            assert_eq!(validate_level(level).is_ok(), *valid, "{level:?}");
        }
    }

    #[test]
    fn log_control_refuses_bad_levels_and_keeps_the_filter() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
        let _subscriber = tracing_subscriber::registry().with(filter);
        let (writer, _guard) = NonBlockingBuilder::default().finish(std::io::sink());
        let control = LogControl {
            filter: handle,
            default: "info".to_string(),
            directives: Arc::new(Mutex::new("info".to_string())),
            dropped: writer.error_counter(),
        };
        assert!(matches!(
            control.set("access:debug"),
            Err(LogLevelError::Invalid { .. })
        ));
        assert_eq!(control.current().expect("current"), "info");
        let changed = control.set("access=debug").expect("valid level");
        assert!(
            changed.contains("access=debug") && changed.contains("info"),
            "{changed}"
        );
        assert_eq!(
            control.set("warn").expect("valid"),
            control.current().expect("current")
        );
        assert!(!control.current().expect("current").contains("info"));
        assert_eq!(control.reset(Some("debug")).expect("reset"), "debug");
        assert_eq!(control.reset(None).expect("reset"), "info");
    }

    #[test]
    fn a_new_level_replaces_only_the_clauses_it_names() {
        let cases: &[(&str, &str, &str)] = &[
            ("info", "debug", "debug"),
            ("info", "access=debug", "info,access=debug"),
            ("access=debug,info", "warn", "access=debug,warn"),
            ("access=debug,info", "access=off", "info,access=off"),
            ("h2[{id}]=debug,info", "debug", "h2[{id}]=debug,debug"),
            (
                "a[{x,y}]=trace,info",
                "b=debug",
                "a[{x,y}]=trace,info,b=debug",
            ),
            ("info", "", "info"),
        ];
        for (base, added, want) in cases {
            assert_eq!(merge_directives(base, added), *want, "{base} + {added}");
        }
    }
}
