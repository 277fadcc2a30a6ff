//! The metrics registry (layer L1): Istio's TCP traffic metrics with Istio's label set, plus the
//! agent's own gauges (build, in-pod proxies, certificate expiry, process, dropped log lines).
//!
//! Traffic metrics are recorded by [`super::ConnectionRecord`]: opened when the connection is
//! established (or, if it never was, when it ends), closed and failed when it ends. Bytes of
//! open connections are flushed as deltas on every scrape ([`Metrics::encode`]), so a long
//! connection shows its bytes while it is still open and the totals are exact after it closes.
//! Series of workloads that left the model are removed by [`Metrics::retain_workloads`], which
//! keeps cardinality bounded on a busy node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::record::ByteCounters;
use crate::spiffe::Identity;
use crate::state::{Service, Workload};

/// Rendered for a label whose value is not known (Istio's convention).
const UNKNOWN: &str = "unknown";

/// Why a connection failed, as Istio's `response_flags` label and access-log field name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlag {
    /// No failure (`-`).
    #[default]
    None,
    /// Denied by authorization policy.
    Deny,
    /// The upstream could not be reached, or the tunnel broke.
    Connect,
    /// TLS handshake failed.
    TlsFailure,
    /// HTTP/2 handshake failed.
    H2HandshakeFailure,
    /// The peer presented the wrong identity, or none could be obtained.
    IdentityError,
}

impl ResponseFlag {
    /// The label value (`-`, `DENY`, `CONNECT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
            ResponseFlag::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlag::IdentityError => "IDENTITY_ERROR",
        }
    }
}

/// Which side reports a connection: the source's agent (outbound) or the destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The agent of the client workload.
    Source,
    /// The agent of the server workload.
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        })
    }
}

/// Istio's `CommonTrafficLabels`; every value is `unknown` when not known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficLabels {
    /// `source` or `destination`.
    pub reporter: Reporter,
    /// Owning controller of the source (deployment name), else the pod name.
    pub source_workload: String,
    /// Source canonical service.
    pub source_canonical_service: String,
    /// Source canonical revision.
    pub source_canonical_revision: String,
    /// Source namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE identity, only when proven by mTLS.
    pub source_principal: String,
    /// Source app (the canonical service).
    pub source_app: String,
    /// Source version (the canonical revision).
    pub source_version: String,
    /// Source cluster id.
    pub source_cluster: String,
    /// Destination service hostname.
    pub destination_service: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Owning controller of the destination, else the pod name.
    pub destination_workload: String,
    /// Destination canonical service.
    pub destination_canonical_service: String,
    /// Destination canonical revision.
    pub destination_canonical_revision: String,
    /// Destination namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE identity, only with mTLS.
    pub destination_principal: String,
    /// Destination app.
    pub destination_app: String,
    /// Destination version.
    pub destination_version: String,
    /// Destination cluster id.
    pub destination_cluster: String,
    /// Always `tcp`.
    pub request_protocol: String,
    /// `-` or the failure flag.
    pub response_flags: String,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: String,
}

/// One end of a connection, as the labels see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    /// The workload, if known from the model.
    pub workload: Option<&'a Workload>,
    /// The identity, if proven by mTLS.
    pub identity: Option<&'a Identity>,
}

fn known(value: &str) -> String {
    if value.is_empty() {
        UNKNOWN.to_string()
    } else {
        value.to_string()
    }
}

/// Labels taken from one workload: name, canonical service, revision, namespace, cluster.
struct WorkloadLabels {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    cluster: String,
}

impl WorkloadLabels {
    fn of(workload: Option<&Workload>) -> Self {
        let field = |pick: fn(&Workload) -> &str| known(workload.map(pick).unwrap_or_default());
        WorkloadLabels {
            workload: field(|w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            canonical_service: field(|w| &w.canonical_name),
            canonical_revision: field(|w| &w.canonical_revision),
            namespace: field(|w| &w.namespace),
            cluster: field(|w| &w.cluster_id),
        }
    }
}

impl TrafficLabels {
    /// The labels of a connection: pure, so tests can check every case in a table.
    pub fn build(
        reporter: Reporter,
        source: Peer<'_>,
        destination: Peer<'_>,
        service: Option<&Service>,
        flag: ResponseFlag,
    ) -> Self {
        let src = WorkloadLabels::of(source.workload);
        let dst = WorkloadLabels::of(destination.workload);
        let principal =
            |identity: Option<&Identity>| identity.map_or(UNKNOWN.to_string(), |i| i.to_string());
        let service_field =
            |pick: fn(&Service) -> &str| known(service.map(pick).unwrap_or_default());
        let mutual_tls = source.identity.is_some();
        TrafficLabels {
            reporter,
            source_app: src.canonical_service.clone(),
            source_version: src.canonical_revision.clone(),
            source_workload: src.workload,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: principal(source.identity),
            source_cluster: src.cluster,
            destination_service: service_field(|s| &s.hostname),
            destination_service_namespace: service_field(|s| &s.namespace),
            destination_service_name: service_field(|s| &s.name),
            destination_app: dst.canonical_service.clone(),
            destination_version: dst.canonical_revision.clone(),
            destination_workload: dst.workload,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: principal(destination.identity),
            destination_cluster: dst.cluster,
            request_protocol: "tcp".to_string(),
            response_flags: flag.as_str().to_string(),
            connection_security_policy: if mutual_tls { "mutual_tls" } else { UNKNOWN }.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReporterLabels {
    reporter: Reporter,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// The five Istio TCP counters, one family each.
#[derive(Debug, Default)]
struct TrafficCounters {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    received_bytes: Family<TrafficLabels, Counter>,
    sent_bytes: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
}

impl TrafficCounters {
    fn remove(&self, labels: &TrafficLabels) {
        self.opened.remove(labels);
        self.closed.remove(labels);
        self.received_bytes.remove(labels);
        self.sent_bytes.remove(labels);
        self.failed.remove(labels);
    }
}

/// Who an open connection connects, for the admin API's `/connections`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The client's address.
    pub src_addr: String,
    /// The destination address.
    pub dst_addr: String,
    /// Source workload uid, empty if unknown.
    pub src_workload: String,
    /// Destination workload uid, empty if unknown.
    pub dst_workload: String,
    /// Source identity (mTLS only), empty otherwise.
    pub src_identity: String,
    /// Destination identity (mTLS only), empty otherwise.
    pub dst_identity: String,
    /// When it was accepted.
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// An open connection as `/connections` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenConnection {
    /// Who it connects.
    #[serde(flatten)]
    pub info: ConnectionInfo,
    /// Bytes source → destination so far.
    pub bytes_sent: u64,
    /// Bytes destination → source so far.
    pub bytes_received: u64,
    /// Seconds since it was accepted.
    pub age_seconds: f64,
}

/// An established connection whose bytes are flushed on every scrape.
#[derive(Debug)]
struct LiveConnection {
    labels: TrafficLabels,
    info: ConnectionInfo,
    bytes: Arc<ByteCounters>,
    reported_sent: u64,
    reported_received: u64,
}

impl LiveConnection {
    /// Adds what was copied since the last flush; request bytes (source → destination) are
    /// Istio's "received", response bytes its "sent", for both reporters.
    fn flush(&mut self, counters: &TrafficCounters) {
        let sent = self.bytes.sent.load(Ordering::Relaxed);
        let received = self.bytes.received.load(Ordering::Relaxed);
        counters
            .received_bytes
            .get_or_create(&self.labels)
            .inc_by(sent.saturating_sub(self.reported_sent));
        counters
            .sent_bytes
            .get_or_create(&self.labels)
            .inc_by(received.saturating_sub(self.reported_received));
        self.reported_sent = sent;
        self.reported_received = received;
    }
}

/// Gauges filled in from the rest of the agent just before each scrape.
#[derive(Debug, Default)]
struct AgentGauges {
    active_proxies: Gauge,
    pending_proxies: Gauge,
    certificate_expiry: Family<IdentityLabels, Gauge>,
    open_fds: Gauge,
    max_fds: Gauge,
    resident_memory: Gauge,
    dropped_log_lines: Counter,
}

/// What the agent reports about its pods and certificates at scrape time.
#[derive(Debug, Clone, Default)]
pub struct AgentSample {
    /// Pods whose proxies are up.
    pub active_proxies: i64,
    /// Pods not yet (or no longer) serving.
    pub pending_proxies: i64,
    /// Each held certificate: identity and expiry.
    pub certificates: Vec<(Identity, SystemTime)>,
    /// Log lines dropped so far.
    pub dropped_log_lines: u64,
}

/// The agent's metrics. One per process, shared by every connection record.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    traffic: TrafficCounters,
    sockets_open: Family<ReporterLabels, Gauge>,
    agent: AgentGauges,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, LiveConnection>>,
    /// Every traffic series and the workload uids it names, for stale-series eviction.
    series: Mutex<HashMap<TrafficLabels, [String; 2]>>,
}

/// A connection registered for live byte reporting; give it back to [`Metrics::close`].
#[derive(Debug)]
pub struct LiveHandle(u64);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain counters behind: still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered and `istio_build` set.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let traffic = TrafficCounters::default();
        let sockets_open = Family::<ReporterLabels, Gauge>::default();
        let agent = AgentGauges::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel".to_string(),
                tag: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        {
            let istio = registry.sub_registry_with_prefix("istio");
            istio.register(
                "tcp_connections_opened",
                "The total number of TCP connections opened",
                traffic.opened.clone(),
            );
            istio.register(
                "tcp_connections_closed",
                "The total number of TCP connections closed",
                traffic.closed.clone(),
            );
            istio.register(
                "tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
                traffic.received_bytes.clone(),
            );
            istio.register(
                "tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
                traffic.sent_bytes.clone(),
            );
            istio.register(
                "tcp_connections_failed",
                "The total number of TCP connections that failed to establish",
                traffic.failed.clone(),
            );
            istio.register(
                "tcp_sockets_open",
                "The current number of open accepted sockets",
                sockets_open.clone(),
            );
            istio.register("build", "Istio component build info", build);
        }
        register_agent_gauges(&mut registry, &agent);
        Metrics {
            registry,
            traffic,
            sockets_open,
            agent,
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// A socket was accepted (or opened) for `reporter`.
    pub fn socket_opened(&self, reporter: Reporter) {
        self.sockets_open
            .get_or_create(&ReporterLabels { reporter })
            .inc();
    }

    /// The socket counted by [`Metrics::socket_opened`] closed.
    pub fn socket_closed(&self, reporter: Reporter) {
        self.sockets_open
            .get_or_create(&ReporterLabels { reporter })
            .dec();
    }

    /// Counts a connection opened and starts reporting its bytes while it is open.
    pub fn open(
        &self,
        labels: TrafficLabels,
        info: ConnectionInfo,
        bytes: Arc<ByteCounters>,
    ) -> LiveHandle {
        self.traffic.opened.get_or_create(&labels).inc();
        lock(&self.series).insert(labels.clone(), info.workloads());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let live = LiveConnection {
            labels,
            info,
            bytes,
            reported_sent: 0,
            reported_received: 0,
        };
        lock(&self.live).insert(id, live);
        LiveHandle(id)
    }

    /// Counts a connection closed: flushes its last bytes (on the labels it was opened with),
    /// and counts it closed, and failed if `failed`, on its final `labels` (the response flag
    /// is only known now).
    pub fn close(&self, handle: LiveHandle, labels: TrafficLabels, failed: bool) {
        let Some(mut live) = lock(&self.live).remove(&handle.0) else {
            return;
        };
        live.flush(&self.traffic);
        self.traffic.closed.get_or_create(&labels).inc();
        if failed {
            self.traffic.failed.get_or_create(&labels).inc();
        }
        lock(&self.series).insert(labels, live.info.workloads());
    }

    /// The connections open now, oldest first.
    pub fn connections(&self) -> Vec<OpenConnection> {
        let mut open: Vec<OpenConnection> = lock(&self.live)
            .values()
            .map(|live| OpenConnection {
                info: live.info.clone(),
                bytes_sent: live.bytes.sent.load(Ordering::Relaxed),
                bytes_received: live.bytes.received.load(Ordering::Relaxed),
                age_seconds: live
                    .info
                    .started
                    .map_or(0.0, |started| started.elapsed().as_secs_f64()),
            })
            .collect();
        open.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        open
    }

    /// Removes every traffic series naming a workload for which `alive` is false; returns how
    /// many series went. Series naming no known workload stay (they are bounded by the labels
    /// that are `unknown`).
    pub fn retain_workloads(&self, alive: impl Fn(&str) -> bool) -> usize {
        let mut series = lock(&self.series);
        let stale: Vec<TrafficLabels> = series
            .iter()
            .filter(|(_, uids)| uids.iter().any(|uid| !uid.is_empty() && !alive(uid)))
            .map(|(labels, _)| labels.clone())
            .collect();
        for labels in &stale {
            series.remove(labels);
            self.traffic.remove(labels);
        }
        stale.len()
    }

    /// Flushes the bytes of open connections, then renders every metric: OpenMetrics text if
    /// `openmetrics`, else the Prometheus text format (the same without the `# EOF` trailer).
    pub fn encode(&self, sample: &AgentSample, openmetrics: bool) -> String {
        for live in lock(&self.live).values_mut() {
            live.flush(&self.traffic);
        }
        self.record_sample(sample);
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return String::new();
        }
        if !openmetrics {
            if let Some(stripped) = text.strip_suffix("# EOF\n") {
                text.truncate(stripped.len());
            }
        }
        text
    }

    fn record_sample(&self, sample: &AgentSample) {
        let agent = &self.agent;
        agent.active_proxies.set(sample.active_proxies);
        agent.pending_proxies.set(sample.pending_proxies);
        agent.certificate_expiry.clear();
        for (identity, expires) in &sample.certificates {
            let seconds = expires
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            agent
                .certificate_expiry
                .get_or_create(&IdentityLabels {
                    identity: identity.to_string(),
                })
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        let dropped = sample
            .dropped_log_lines
            .saturating_sub(agent.dropped_log_lines.get());
        agent.dropped_log_lines.inc_by(dropped);
        let process = ProcessSample::read();
        agent.open_fds.set(process.open_fds);
        agent.max_fds.set(process.max_fds);
        agent.resident_memory.set(process.resident_bytes);
    }
}

fn register_agent_gauges(registry: &mut Registry, agent: &AgentGauges) {
    let manager = registry.sub_registry_with_prefix("workload_manager");
    manager.register(
        "active_proxy_count",
        "The number of active workload proxies",
        agent.active_proxies.clone(),
    );
    manager.register(
        "pending_proxy_count",
        "The number of pending workload proxies",
        agent.pending_proxies.clone(),
    );
    registry.register(
        "nodetunnel_certificate_expiration_timestamp_seconds",
        "When each workload certificate expires (unix seconds)",
        agent.certificate_expiry.clone(),
    );
    registry.register(
        "nodetunnel_log_dropped_lines",
        "Log lines dropped because the log writer was full",
        agent.dropped_log_lines.clone(),
    );
    registry.register(
        "process_open_fds",
        "Number of open file descriptors",
        agent.open_fds.clone(),
    );
    registry.register(
        "process_max_fds",
        "Maximum number of open file descriptors",
        agent.max_fds.clone(),
    );
    registry.register(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        agent.resident_memory.clone(),
    );
}

/// Process figures from `/proc/self` (0 where unreadable).
struct ProcessSample {
    open_fds: i64,
    max_fds: i64,
    resident_bytes: i64,
}

impl ProcessSample {
    fn read() -> Self {
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as i64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                limits
                    .lines()
                    .find(|line| line.starts_with("Max open files"))
                    .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
            })
            .unwrap_or(0);
        // statm's second field is resident pages; pages are 4 KiB on every target we build.
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<i64>().ok())
            .map_or(0, |pages| pages * 4096);
        ProcessSample {
            open_fds,
            max_fds,
            resident_bytes,
        }
    }
}

impl ConnectionInfo {
    fn workloads(&self) -> [String; 2] {
        [self.src_workload.clone(), self.dst_workload.clone()]
    }
}

#[cfg(test)]
mod tests;
