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

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::labels::{Peer, Reporter, ResponseFlag, TrafficLabels};
use super::record::ByteCounters;
use crate::spiffe::Identity;

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
    /// Shared with every connection of the same series (interned in `Metrics::series`).
    labels: Arc<TrafficLabels>,
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
    /// Boxed: the table of a busy agent doubles in size, and holds only pointers then.
    live: Mutex<HashMap<u64, Box<LiveConnection>>>,
    /// Every traffic series and the workload uids it names, for stale-series eviction. Open
    /// connections share these labels instead of holding ~20 strings each.
    series: Mutex<HashMap<Arc<TrafficLabels>, [String; 2]>>,
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
        let labels = {
            let mut series = lock(&self.series);
            match series.get_key_value(&labels) {
                Some((shared, _)) => shared.clone(),
                None => {
                    let shared = Arc::new(labels);
                    series.insert(shared.clone(), info.workloads());
                    shared
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let live = LiveConnection {
            labels,
            info,
            bytes,
            reported_sent: 0,
            reported_received: 0,
        };
        lock(&self.live).insert(id, Box::new(live));
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
        let uids = live.info.workloads();
        let mut series = lock(&self.series);
        match series.get_mut(&labels) {
            Some(known) => *known = uids,
            None => {
                series.insert(Arc::new(labels), uids);
            }
        }
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
        let stale: Vec<Arc<TrafficLabels>> = series
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
