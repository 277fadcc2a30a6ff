//! The metrics registry (layer L1): Istio's TCP traffic metrics with Istio's label set, plus the
//! agent's own metrics (build, in-pod proxies, certificates, process, dropped log lines, tokio
//! runtime: `agent.rs`) and authorization decision counters (`authorization.rs`).
//!
//! Traffic metrics are recorded by [`super::ConnectionRecord`]: opened when the connection is
//! established (or, if it never was, when it ends), closed and failed when it ends. Bytes of
//! open connections are flushed as deltas on every scrape ([`Metrics::encode`]), so a long
//! connection shows its bytes while it is still open and the totals are exact after it closes.
//! Series of workloads that left the model are removed by [`Metrics::retain_workloads`], and
//! decision series of policies that left it by [`Metrics::retain_policies`], which keeps
//! cardinality bounded on a busy node.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::labels::{Direction, Peer, Reporter, ResponseFlag, TrafficLabels};
use crate::hbone::TraceParent;
use crate::spiffe::Identity;
use crate::state::{Service, TunnelProtocol, Workload};
use agent::{AgentMetrics, ReasonLabels, RefusalLabels};
pub use agent::{AgentSample, MemoryBudgetSample, RuntimeSample, WorkerSample};
use authorization::DecisionCounters;
pub use authorization::{DecisionAction, DecisionLabels, DecisionPhase, NO_POLICY};
use series::Series;

mod agent;
mod authorization;
mod series;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReporterLabels {
    reporter: Reporter,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// The five Istio TCP counters, one family each.
#[derive(Debug, Default)]
struct TrafficCounters {
    opened: Family<Series, Counter>,
    closed: Family<Series, Counter>,
    received_bytes: Family<Series, Counter>,
    sent_bytes: Family<Series, Counter>,
    failed: Family<Series, Counter>,
}

impl TrafficCounters {
    fn remove(&self, labels: &Series) {
        self.opened.remove(labels);
        self.closed.remove(labels);
        self.received_bytes.remove(labels);
        self.sent_bytes.remove(labels);
        self.failed.remove(labels);
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

/// Who an open connection connects, for the admin API's `/connections`. Workloads and
/// identities are shared with the model and the connection's record, not copied: this is kept
/// for every open connection (RSS per idle connection).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// Which way it goes (`inbound` or `outbound` in JSON).
    pub direction: Direction,
    /// The client's address.
    pub src_addr: String,
    /// The destination address.
    pub dst_addr: String,
    /// What the client asked for: outbound, the app's original destination; inbound, the
    /// service addressed if known, else the CONNECT authority or the original destination.
    pub original_dst: String,
    /// `Hbone` when the connection is tunnelled, else `Tcp`.
    pub protocol: TunnelProtocol,
    /// Source workload, if known (its uid in JSON, empty if unknown).
    #[serde(serialize_with = "uid_or_empty")]
    pub src_workload: Option<Arc<Workload>>,
    /// Destination workload, if known (its uid in JSON, empty if unknown).
    #[serde(serialize_with = "uid_or_empty")]
    pub dst_workload: Option<Arc<Workload>>,
    /// Source identity (mTLS only; empty in JSON otherwise).
    #[serde(serialize_with = "identity_or_empty")]
    pub src_identity: Option<Identity>,
    /// Destination identity (mTLS only; empty in JSON otherwise).
    #[serde(serialize_with = "identity_or_empty")]
    pub dst_identity: Option<Identity>,
}

/// Who and what one proxied connection connects, as its record learns it. Shared with the
/// table of open connections once established (`/connections` and the metrics' series read it
/// there), so an open connection keeps these fields once, in one allocation, rather than in its
/// task and again in the table.
#[derive(Debug, Clone)]
pub struct ConnectionFields {
    /// Which way the connection goes.
    pub direction: Direction,
    /// When it was accepted.
    pub started: Instant,
    /// Connection id shared by both agents (the HBONE `traceparent`). Kept as the value, not
    /// its text: formatted only when an access-log line is written.
    pub trace: Option<TraceParent>,
    /// The source's address.
    pub src_addr: Box<str>,
    /// The source workload, if known.
    pub src_workload: Option<Arc<Workload>>,
    /// The source identity proven by mTLS (inbound) or presented by us (outbound).
    pub src_identity: Option<Identity>,
    /// The destination address (the app's original destination, or the pod target).
    pub dst_addr: Box<str>,
    /// The destination the connection arrived with (outbound: what the app dialled; inbound:
    /// the CONNECT authority or the original destination), kept when `dst_addr` is replaced.
    pub original_dst: Box<str>,
    /// The HBONE tunnel target (`:authority`), when tunnelled.
    pub dst_hbone_addr: Option<Box<str>>,
    /// The destination workload, if known.
    pub dst_workload: Option<Arc<Workload>>,
    /// The service addressed, if any.
    pub dst_service: Option<Arc<Service>>,
    /// The destination identity.
    pub dst_identity: Option<Identity>,
}

impl ConnectionFields {
    /// The connection as `/connections` shows it.
    pub fn info(&self) -> ConnectionInfo {
        let original_dst = match (self.direction, &self.dst_service) {
            (Direction::Inbound, Some(service)) => service.hostname.clone(),
            _ => self.original_dst.to_string(),
        };
        ConnectionInfo {
            direction: self.direction,
            src_addr: self.src_addr.to_string(),
            dst_addr: self.dst_addr.to_string(),
            original_dst,
            protocol: if self.dst_hbone_addr.is_some() {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::Tcp
            },
            src_workload: self.src_workload.clone(),
            dst_workload: self.dst_workload.clone(),
            src_identity: self.src_identity.clone(),
            dst_identity: self.dst_identity.clone(),
        }
    }
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
    labels: Series,
    /// Shared with the connection's record: what it connects is kept once per connection.
    fields: Arc<ConnectionFields>,
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

/// The agent's metrics. One per process, shared by every connection record.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    traffic: TrafficCounters,
    sockets_open: Family<ReporterLabels, Gauge>,
    agent: AgentMetrics,
    decisions: DecisionCounters,
    next_id: AtomicU64,
    /// Boxed: the table of a busy agent doubles in size, and holds only pointers then.
    live: Mutex<HashMap<u64, Box<LiveConnection>>>,
    /// Every traffic series and the workload uids it names, for stale-series eviction. Open
    /// connections share these labels instead of holding ~20 strings each.
    series: Mutex<HashMap<Series, [String; 2]>>,
    xds: super::xds::XdsMetrics,
    dns: super::dns::DnsMetrics,
    protection: super::protection::ProtectionMetrics,
}

/// A connection registered for live byte reporting; give it back to [`Metrics::close`].
#[derive(Debug)]
pub struct LiveHandle(u64);

/// The table of open connections is not shrunk below this many entries.
const LIVE_MIN_CAPACITY: usize = 64;

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
        let agent = AgentMetrics::default();
        let decisions = DecisionCounters::default();
        let build = Family::<BuildLabels, Gauge>::default();
        let xds = super::xds::XdsMetrics::default();
        let dns = super::dns::DnsMetrics::default();
        let protection = super::protection::ProtectionMetrics::default();
        protection.register(&mut registry);
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
            xds.register(istio);
            dns.register(istio);
        }
        agent.register(&mut registry);
        registry.register(
            "nodetunnel_authorization_decisions",
            "Inbound authorization decisions, by action, deciding policy, reason and phase",
            decisions.decisions.clone(),
        );
        Metrics {
            registry,
            traffic,
            sockets_open,
            agent,
            decisions,
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
            xds,
            dns,
            protection,
        }
    }

    /// The DNS proxy's metrics.
    pub fn dns(&self) -> &super::dns::DnsMetrics {
        &self.dns
    }

    /// Egress refusals, connection-limit refusals and outlier ejections.
    pub fn protection(&self) -> &super::protection::ProtectionMetrics {
        &self.protection
    }

    /// The xDS client's counters.
    pub fn xds(&self) -> &super::xds::XdsMetrics {
        &self.xds
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
        fields: Arc<ConnectionFields>,
        bytes: Arc<ByteCounters>,
    ) -> LiveHandle {
        let labels = self.intern(Series::new(labels), &fields);
        self.traffic.opened.get_or_create(&labels).inc();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let live = LiveConnection {
            labels,
            fields,
            bytes,
            reported_sent: 0,
            reported_received: 0,
        };
        lock(&self.live).insert(id, Box::new(live));
        LiveHandle(id)
    }

    /// Counts a connection closed: flushes its last bytes (on the labels it was opened with),
    /// and counts it closed, and failed unless `flag` is none, on its final labels: those it
    /// was opened with when the response flag is still the same, else `labels()` (the response
    /// flag is only known now). Most connections close as they opened, and building the labels
    /// is some twenty strings, so they are built only when the flag changed.
    pub fn close(
        &self,
        handle: LiveHandle,
        flag: ResponseFlag,
        labels: impl FnOnce() -> TrafficLabels,
    ) {
        let removed = {
            let mut open = lock(&self.live);
            let removed = open.remove(&handle.0);
            // Give the table's memory back once most connections have closed.
            if open.capacity() > LIVE_MIN_CAPACITY && open.len() * 4 < open.capacity() {
                let keep = open.len() * 2;
                open.shrink_to(keep);
            }
            removed
        };
        let Some(mut live) = removed else {
            return;
        };
        live.flush(&self.traffic);
        // Interned again: the series may have been evicted while the connection was open.
        let labels = if live.labels.labels.response_flags == flag.as_str() {
            self.intern(live.labels.clone(), &live.fields)
        } else {
            self.intern(Series::new(labels()), &live.fields)
        };
        self.traffic.closed.get_or_create(&labels).inc();
        if flag != ResponseFlag::None {
            self.traffic.failed.get_or_create(&labels).inc();
        }
    }

    /// The shared copy of `labels` from the series table, entered there if new; the table
    /// remembers the workloads the series was last recorded for (a series whose workloads left
    /// the model is evicted by [`Metrics::retain_workloads`]).
    fn intern(&self, labels: Series, fields: &ConnectionFields) -> Series {
        let [src, dst] = [uid(&fields.src_workload), uid(&fields.dst_workload)];
        let mut series = lock(&self.series);
        match series.entry(labels) {
            Entry::Occupied(mut known) => {
                let uids = known.get_mut();
                if uids[0] != src || uids[1] != dst {
                    *uids = [src.to_string(), dst.to_string()];
                }
                known.key().clone()
            }
            Entry::Vacant(new) => {
                let shared = new.key().clone();
                new.insert([src.to_string(), dst.to_string()]);
                shared
            }
        }
    }

    /// The connections open now, oldest first.
    pub fn connections(&self) -> Vec<OpenConnection> {
        let mut open: Vec<OpenConnection> = lock(&self.live)
            .values()
            .map(|live| OpenConnection {
                info: live.fields.info(),
                bytes_sent: live.bytes.sent.load(Ordering::Relaxed),
                bytes_received: live.bytes.received.load(Ordering::Relaxed),
                age_seconds: live.fields.started.elapsed().as_secs_f64(),
            })
            .collect();
        open.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        open
    }

    /// Removes every traffic and decision series naming a workload for which `alive` is false;
    /// returns how many series went. Traffic series naming no known workload stay (they are
    /// bounded by the labels that are `unknown`).
    pub fn retain_workloads(&self, alive: impl Fn(&str) -> bool) -> usize {
        let mut series = lock(&self.series);
        let stale: Vec<Series> = series
            .iter()
            .filter(|(_, uids)| uids.iter().any(|uid| !uid.is_empty() && !alive(uid)))
            .map(|(labels, _)| labels.clone())
            .collect();
        for labels in &stale {
            series.remove(labels);
            self.traffic.remove(labels);
        }
        drop(series);
        let decisions = self.decisions.remove_where(|_, uid| !alive(uid));
        stale.len() + decisions
    }

    /// Flushes the bytes of open connections, then renders every metric: OpenMetrics text if
    /// `openmetrics`, else the Prometheus text format (the same without the `# EOF` trailer).
    pub fn encode(&self, sample: &AgentSample, openmetrics: bool) -> String {
        for live in lock(&self.live).values_mut() {
            live.flush(&self.traffic);
        }
        self.agent.record(sample);
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

    /// Counts one authorization decision about a connection to the workload `destination_uid`.
    pub fn authorization_decision(&self, labels: DecisionLabels, destination_uid: &str) {
        self.decisions.record(labels, destination_uid);
    }

    /// Removes the decision series naming a policy for which `known` is false (the policy left
    /// the model); series without a policy stay. Returns how many series went.
    pub fn retain_policies(&self, known: impl Fn(&str) -> bool) -> usize {
        self.decisions
            .remove_where(|labels, _| labels.policy != NO_POLICY && !known(&labels.policy))
    }

    /// A workload proxy started serving (its listeners accept).
    pub fn proxy_started(&self) {
        self.agent.proxies_started.inc();
    }

    /// A workload proxy stopped (its pod was removed or replaced, or it failed to start).
    pub fn proxy_stopped(&self) {
        self.agent.proxies_stopped.inc();
    }

    /// A connection was refused at accept on `listener` (15001/15006/15008 by name) for `reason`
    /// (`pod_limit`, `source_limit`).
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.agent
            .connections_refused
            .get_or_create(&RefusalLabels { listener, reason })
            .inc();
    }

    /// A certificate fetch failed; `reason` is one of a fixed few (the manager's error kinds).
    pub fn certificate_fetch_failed(&self, reason: &'static str) {
        self.agent
            .certificate_fetch_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

impl ConnectionInfo {
    /// The source workload's uid, empty if unknown.
    pub fn src_workload_uid(&self) -> &str {
        uid(&self.src_workload)
    }

    /// The destination workload's uid, empty if unknown.
    pub fn dst_workload_uid(&self) -> &str {
        uid(&self.dst_workload)
    }
}

fn uid(workload: &Option<Arc<Workload>>) -> &str {
    workload
        .as_deref()
        .map_or("", |workload| workload.uid.as_str())
}

fn uid_or_empty<S: serde::Serializer>(
    workload: &Option<Arc<Workload>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(uid(workload))
}

fn identity_or_empty<S: serde::Serializer>(
    identity: &Option<Identity>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(identity.as_ref().map_or("", Identity::as_str))
}

#[cfg(test)]
mod tests;
