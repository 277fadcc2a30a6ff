//! The per-connection access record (layer L1).
//!
//! Every proxied connection owns one [`ConnectionRecord`]. It is filled in as the connection
//! learns who is talking to whom, logs a debug `connection opened` event and counts the
//! connection opened when [`ConnectionRecord::connected`] is called, and emits exactly one
//! `connection complete` access-log event and the closing metrics when dropped — on success,
//! failure, drain or panic alike — so no connection goes unreported.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::labels::Direction;
use super::metrics::ByteCounters;
use super::metrics::{ConnectionFields, LiveHandle, Metrics, Peer, ResponseFlag, TrafficLabels};
use crate::state::Workload;

/// One access-log event with every field of the record (target `access`).
macro_rules! access_event {
    ($level:expr, $record:expr, $fields:expr, $error:expr, $message:literal) => {
        tracing::event!(
            target: "access",
            $level,
            trace = %or_empty(&$record.fields.trace),
            src.addr = %$record.fields.src_addr,
            src.workload = %$fields.src_workload,
            src.namespace = %$fields.src_namespace,
            src.identity = %or_empty(&$record.fields.src_identity),
            dst.addr = %$record.fields.dst_addr,
            dst.hbone_addr = %or_empty(&$record.fields.dst_hbone_addr),
            dst.service = %$fields.dst_service,
            dst.workload = %$fields.dst_workload,
            dst.namespace = %$fields.dst_namespace,
            dst.identity = %or_empty(&$record.fields.dst_identity),
            direction = %$record.fields.direction,
            bytes_sent = $record.bytes.sent.load(Ordering::Relaxed),
            bytes_recv = $record.bytes.received.load(Ordering::Relaxed),
            duration = %format!("{}ms", $record.fields.started.elapsed().as_millis()),
            response_flags = $record.flag.as_str(),
            error = $error,
            $message
        )
    };
}

/// What is known about one proxied connection; logs itself once when dropped.
#[derive(Debug)]
pub struct ConnectionRecord {
    /// Behind an `Arc` from the start: the record is what an open connection's task keeps for
    /// its whole life, and once established the same allocation is the open-connection table's
    /// entry (see [`ConnectionFields`]).
    fields: Arc<ConnectionFields>,
    /// Byte counters.
    pub bytes: Arc<ByteCounters>,
    /// The failure, if the connection failed.
    pub error: Option<String>,
    /// Why it failed, as Istio's response flag.
    flag: ResponseFlag,
    metrics: Arc<Metrics>,
    live: Option<LiveHandle>,
}

impl ConnectionRecord {
    /// A record for a connection that just arrived, reporting to `metrics`.
    pub fn new(
        metrics: &Arc<Metrics>,
        direction: Direction,
        src_addr: impl ToString,
        dst_addr: impl ToString,
    ) -> Self {
        metrics.socket_opened(direction.reporter());
        let dst_addr: Box<str> = dst_addr.to_string().into();
        ConnectionRecord {
            fields: Arc::new(ConnectionFields {
                direction,
                started: Instant::now(),
                trace: None,
                src_addr: src_addr.to_string().into(),
                src_workload: None,
                src_identity: None,
                original_dst: dst_addr.clone(),
                dst_addr,
                dst_hbone_addr: None,
                dst_workload: None,
                dst_service: None,
                dst_identity: None,
            }),
            bytes: Arc::new(ByteCounters::default()),
            error: None,
            flag: ResponseFlag::None,
            metrics: metrics.clone(),
            live: None,
        }
    }

    /// Who and what the connection connects, as known now.
    pub fn fields(&self) -> &ConnectionFields {
        &self.fields
    }

    /// To fill in what the connection learns. Before [`ConnectionRecord::connected`] the
    /// fields are the record's alone; a change after it reaches the access log only (the
    /// record takes its own copy, and `/connections` keeps what was known when it opened).
    pub fn fields_mut(&mut self) -> &mut ConnectionFields {
        Arc::make_mut(&mut self.fields)
    }

    /// Records a failure (the first one wins: later errors are consequences).
    pub fn fail(&mut self, flag: ResponseFlag, error: impl fmt::Display) {
        if self.error.is_none() {
            self.error = Some(error.to_string());
            self.flag = flag;
        }
    }

    /// The connection is established (both ends known, bytes about to flow): logs `connection
    /// opened` at debug, counts it opened and reports its bytes while it stays open. Call once,
    /// after the labels are filled in; later calls do nothing. The metric labels are fixed
    /// here: later changes of the peers or the service reach the access log only, and the
    /// closing counters differ from the opening ones only by the response flag.
    pub fn connected(&mut self) {
        if self.live.is_some() {
            return;
        }
        // The fields are strings built per connection: only when the event is wanted.
        if tracing::enabled!(target: "access", tracing::Level::DEBUG) {
            let fields = AccessFields::of(self);
            access_event!(
                tracing::Level::DEBUG,
                self,
                fields,
                tracing::field::Empty,
                "connection opened"
            );
        }
        self.live = Some(
            self.metrics
                .open(self.labels(), self.fields.clone(), self.bytes.clone()),
        );
    }

    /// The Istio labels of this connection as known now.
    pub fn labels(&self) -> TrafficLabels {
        let fields = &self.fields;
        TrafficLabels::build(
            fields.direction.reporter(),
            Peer {
                workload: fields.src_workload.as_deref(),
                identity: fields.src_identity.as_ref(),
            },
            Peer {
                workload: fields.dst_workload.as_deref(),
                identity: fields.dst_identity.as_ref(),
            },
            fields.dst_service.as_deref(),
            self.flag,
        )
    }
}

/// Access-log fields derived from the record's workloads.
struct AccessFields {
    src_workload: String,
    src_namespace: String,
    dst_workload: String,
    dst_namespace: String,
    dst_service: String,
}

impl AccessFields {
    fn of(record: &ConnectionRecord) -> Self {
        let workload_field = |workload: &Option<Arc<Workload>>, pick: fn(&Workload) -> &str| {
            workload
                .as_deref()
                .map(|w| pick(w).to_string())
                .unwrap_or_default()
        };
        AccessFields {
            src_workload: workload_field(&record.fields.src_workload, |w| &w.name),
            src_namespace: workload_field(&record.fields.src_workload, |w| &w.namespace),
            dst_workload: workload_field(&record.fields.dst_workload, |w| &w.name),
            dst_namespace: workload_field(&record.fields.dst_workload, |w| &w.namespace),
            dst_service: record
                .fields
                .dst_service
                .as_deref()
                .map(|s| s.hostname.clone())
                .unwrap_or_default(),
        }
    }
}

fn or_empty<T: fmt::Display>(value: &Option<T>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_default()
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        if self.live.is_none() {
            // Failed before it was established: still counted opened, then closed.
            self.connected();
        }
        if let Some(live) = self.live.take() {
            self.metrics.close(live, self.flag, || self.labels());
        }
        self.metrics.socket_closed(self.fields.direction.reporter());
        // The fields are strings built per connection: only when the event is wanted.
        let wanted = match self.error {
            None => tracing::enabled!(target: "access", tracing::Level::INFO),
            Some(_) => tracing::enabled!(target: "access", tracing::Level::ERROR),
        };
        if !wanted {
            return;
        }
        let fields = AccessFields::of(self);
        match self.error.as_deref() {
            None => access_event!(
                tracing::Level::INFO,
                self,
                fields,
                tracing::field::Empty,
                "connection complete"
            ),
            Some(error) => access_event!(
                tracing::Level::ERROR,
                self,
                fields,
                tracing::field::display(error),
                "connection complete"
            ),
        }
    }
}
