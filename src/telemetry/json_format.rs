//! Istio's JSON log layout (layer L1), as ztunnel writes it with `LOG_FORMAT=json`: one object
//! per line with `level` (lower case), `time` (RFC 3339, UTC), `scope` (the tracing target),
//! then the event's own fields at the top level under their own names (`message`, `src.addr`,
//! `bytes_sent`, ...), then the fields of each enclosing span as an object under the span's name.
//! Log pipelines written for ztunnel read it unchanged.
//!
//! Written by hand because tracing-subscriber's JSON layer names the keys differently
//! (`timestamp`, `target`, upper-case levels) and, even flattened, is not this layout.

use std::fmt;

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter; pair it with [`JsonFields`] so that span fields are stored as JSON.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IstioJson;

impl<S> FormatEvent<S, JsonFields> for IstioJson
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let line = render(context, event).map_err(|_| fmt::Error)?;
        writer.write_str(&line)?;
        writeln!(writer)
    }
}

fn render<S>(
    context: &FmtContext<'_, S, JsonFields>,
    event: &Event<'_>,
) -> Result<String, serde_json::Error>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    // Events bridged from the `log` crate (rustls) carry their real target in `log.*` fields.
    let normalized = event.normalized_metadata();
    let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
    let mut time = String::with_capacity(32);
    // Formatting the clock into a String cannot fail.
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::new(&mut out);
    let mut map = serializer.serialize_map(None)?;
    map.serialize_entry("level", &metadata.level().as_str().to_ascii_lowercase())?;
    map.serialize_entry("time", &time)?;
    map.serialize_entry("scope", metadata.target())?;
    let mut visitor = FieldVisitor {
        map: &mut map,
        result: Ok(()),
    };
    event.record(&mut visitor);
    visitor.result?;
    if let Some(scope) = context.event_scope() {
        for span in scope.from_root() {
            let extensions = span.extensions();
            let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                continue;
            };
            // A span without fields is stored as an empty string, not `{}`.
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(fields) {
                map.serialize_entry(span.metadata().name(), &value)?;
            }
        }
    }
    map.end()?;
    // serde_json writes only valid UTF-8.
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// Writes each event field as a top-level entry: numbers and booleans as JSON values, anything
/// else as its text (`%` fields by `Display`, `?` fields by `Debug`).
struct FieldVisitor<'a, M: SerializeMap> {
    map: &'a mut M,
    result: Result<(), M::Error>,
}

impl<M: SerializeMap> FieldVisitor<'_, M> {
    fn entry(&mut self, field: &Field, value: serde_json::Value) {
        if self.result.is_ok() && !field.name().starts_with("log.") {
            self.result = self.map.serialize_entry(field.name(), &value);
        }
    }
}

impl<M: SerializeMap> Visit for FieldVisitor<'_, M> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn logged(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(IstioJson)
            .with_writer(buffer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("utf-8");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("every line is one JSON object"))
            .collect()
    }

    #[test]
    fn access_events_are_flat_with_istio_key_names() {
        let lines = logged(|| {
            let span = tracing::info_span!("connection", id = 7u64);
            let _entered = span.enter();
            tracing::event!(
                target: "access",
                tracing::Level::INFO,
                src.addr = %"10.0.0.1:4000",
                dst.hbone_addr = %"10.0.0.2:8080",
                direction = "inbound",
                bytes_sent = 12u64,
                error = tracing::field::Empty,
                "connection complete"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = lines[0].as_object().expect("object");
        assert_eq!(line["level"], "info");
        assert_eq!(line["scope"], "access");
        assert_eq!(line["message"], "connection complete");
        assert_eq!(line["src.addr"], "10.0.0.1:4000");
        assert_eq!(line["dst.hbone_addr"], "10.0.0.2:8080");
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["bytes_sent"], 12);
        assert_eq!(line["connection"], serde_json::json!({"id": 7}));
        let time = line["time"].as_str().expect("time is text");
        assert!(
            humantime::parse_rfc3339(time).is_ok(),
            "time {time:?} is RFC 3339 in UTC"
        );
        for absent in ["fields", "target", "timestamp", "error", "span", "spans"] {
            assert!(!line.contains_key(absent), "{absent} in {line:?}");
        }
    }

    #[test]
    fn levels_are_lower_case_and_plain_events_have_no_span_keys() {
        let lines = logged(|| {
            tracing::warn!(target: "nodetunnel::config", file = "a.yaml", "reload rejected");
            tracing::error!(ready = false, "readiness failed");
        });
        assert_eq!(lines[0]["level"], "warn");
        assert_eq!(lines[0]["scope"], "nodetunnel::config");
        assert_eq!(lines[0]["file"], "a.yaml");
        assert_eq!(lines[1]["level"], "error");
        assert_eq!(lines[1]["ready"], false);
        assert_eq!(lines[1].as_object().map(|object| object.len()), Some(5));
    }
}
