//! Reader for the agent's JSON logs (`--log-format json`, Istio's layout as ztunnel writes it):
//! one object per line, `{"level": "info", "time", "scope", "message", <fields>...}`.
//! Lines that are not JSON (a panic message, say) are kept as raw text for failure reports.

use std::path::Path;

use serde_json::{Map, Value};

/// One log event.
#[derive(Debug, Clone)]
pub struct LogEvent {
    /// `INFO`, `WARN`, ... (upper-cased from the line's `level`).
    pub level: String,
    /// The line's `scope`: the tracing target (`access` for access-log events).
    pub target: String,
    /// `message`.
    pub message: String,
    /// Every key but `level`, `time` and `scope`, including `message`.
    pub fields: Map<String, Value>,
    /// The whole line, for error messages.
    pub raw: String,
}

impl LogEvent {
    /// A field as text: strings as they are, numbers and booleans printed.
    pub fn field(&self, name: &str) -> Option<String> {
        match self.fields.get(name)? {
            Value::String(text) => Some(text.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// A field as a number (also when the agent logged it as a string).
    pub fn number(&self, name: &str) -> Option<u64> {
        match self.fields.get(name)? {
            Value::Number(number) => number.as_u64(),
            Value::String(text) => text.parse().ok(),
            _ => None,
        }
    }

    /// Whether this is an access-log "connection complete" event.
    pub fn is_access(&self) -> bool {
        self.target == "access" && self.message == "connection complete"
    }
}

/// All events of a log file so far, and the lines that were not JSON.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Parsed events in file order.
    pub events: Vec<LogEvent>,
    /// Non-JSON lines.
    pub other_lines: Vec<String>,
}

impl Log {
    /// Reads and parses `path`; a missing file is an empty log.
    pub fn read(path: &Path) -> Log {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Log::parse(&text)
    }

    /// Parses log text.
    pub fn parse(text: &str) -> Log {
        let mut log = Log::default();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            match parse_line(line) {
                Some(event) => log.events.push(event),
                None => log.other_lines.push(line.to_string()),
            }
        }
        log
    }

    /// Access-log events with `direction` (`inbound` / `outbound`).
    pub fn access(&self, direction: &str) -> Vec<&LogEvent> {
        self.events
            .iter()
            .filter(|event| event.is_access())
            .filter(|event| event.field("direction").as_deref() == Some(direction))
            .collect()
    }

    /// Events at WARN or ERROR level.
    pub fn problems(&self) -> Vec<&LogEvent> {
        self.events
            .iter()
            .filter(|event| event.level == "WARN" || event.level == "ERROR")
            .collect()
    }

    /// The last `count` lines, for failure messages.
    pub fn tail(&self, count: usize) -> String {
        let mut lines: Vec<&str> = self.events.iter().map(|event| event.raw.as_str()).collect();
        lines.extend(self.other_lines.iter().map(String::as_str));
        let start = lines.len().saturating_sub(count);
        lines[start..].join("\n")
    }
}

/// Istio's layout: `level`, `time`, `scope` and the event's fields at the top level, span fields
/// as objects under the span's name.
fn parse_line(line: &str) -> Option<LogEvent> {
    let value: Value = serde_json::from_str(line).ok()?;
    let mut fields = value.as_object()?.clone();
    let mut take = |key: &str| match fields.remove(key) {
        Some(Value::String(text)) => text,
        _ => String::new(),
    };
    let level = take("level").to_ascii_uppercase();
    let target = take("scope");
    take("time");
    let message = fields
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some(LogEvent {
        level,
        target,
        message,
        fields,
        raw: line.to_string(),
    })
}
