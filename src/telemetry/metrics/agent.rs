//! The agent's own metrics (layer L1): in-pod proxy gauges and counters, certificate expiry and
//! fetch failures, process figures, dropped log lines and the tokio runtime.
//!
//! Gauges (and counters whose source keeps its own total: dropped log lines, tokio's worker
//! counters) are filled from an [`AgentSample`] just before each scrape. Events the registry
//! sees as they happen (proxies started/stopped, certificate fetch failures) are counted by
//! [`super::Metrics`] methods.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::spiffe::Identity;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RefusalLabels {
    pub(super) listener: &'static str,
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

/// What the agent reports about its pods, certificates, log writer and runtime at scrape time.
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
    /// The data-plane runtime, if sampled.
    pub runtime: Option<RuntimeSample>,
    /// The node's HBONE memory budget, if sampled.
    pub memory_budget: Option<MemoryBudgetSample>,
}

/// The node-wide HBONE memory budget (`proxy.memoryBudget`) at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryBudgetSample {
    /// The configured limit, bytes.
    pub limit: u64,
    /// Reserved by open connections, bytes.
    pub reserved: u64,
    /// Connections so far that got a smaller window than configured.
    pub reduced_connections: u64,
}

/// What stable tokio (no `--cfg tokio_unstable`) tells about a runtime.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeSample {
    /// Worker threads.
    pub workers: usize,
    /// Tasks spawned and not yet finished.
    pub alive_tasks: usize,
    /// Tasks waiting in the shared (injection) queue.
    pub global_queue_depth: usize,
    /// Per worker, in worker index order.
    pub per_worker: Vec<WorkerSample>,
}

/// One worker's totals since the runtime started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerSample {
    /// Time spent running tasks.
    pub busy: Duration,
    /// Times the worker parked (went idle).
    pub parks: u64,
    /// Times it parked or unparked.
    pub park_unparks: u64,
}

impl RuntimeSample {
    /// Reads several runtimes as one: the data-plane shards, each a single-worker runtime,
    /// whose workers are numbered in order.
    pub fn of_all(handles: &[tokio::runtime::Handle]) -> Self {
        let mut total = RuntimeSample {
            workers: 0,
            alive_tasks: 0,
            global_queue_depth: 0,
            per_worker: Vec::new(),
        };
        for sample in handles.iter().map(Self::of) {
            total.workers += sample.workers;
            total.alive_tasks += sample.alive_tasks;
            total.global_queue_depth += sample.global_queue_depth;
            total.per_worker.extend(sample.per_worker);
        }
        total
    }

    /// Reads the runtime of `handle`.
    pub fn of(handle: &tokio::runtime::Handle) -> Self {
        let metrics = handle.metrics();
        let workers = metrics.num_workers();
        RuntimeSample {
            workers,
            alive_tasks: metrics.num_alive_tasks(),
            global_queue_depth: metrics.global_queue_depth(),
            per_worker: (0..workers)
                .map(|worker| WorkerSample {
                    busy: metrics.worker_total_busy_duration(worker),
                    parks: metrics.worker_park_count(worker),
                    park_unparks: metrics.worker_park_unpark_count(worker),
                })
                .collect(),
        }
    }
}

/// The agent's metrics, registered once.
#[derive(Debug, Default)]
pub(super) struct AgentMetrics {
    active_proxies: Gauge,
    pending_proxies: Gauge,
    pub(super) proxies_started: Counter,
    pub(super) proxies_stopped: Counter,
    certificate_expiry: Family<IdentityLabels, Gauge>,
    pub(super) certificate_fetch_failures: Family<ReasonLabels, Counter>,
    pub(super) connections_refused: Family<RefusalLabels, Counter>,
    open_fds: Gauge,
    max_fds: Gauge,
    resident_memory: Gauge,
    dropped_log_lines: Counter,
    memory_budget_limit: Gauge,
    memory_budget_reserved: Gauge,
    memory_budget_reduced: Counter,
    runtime_workers: Gauge,
    runtime_alive_tasks: Gauge,
    runtime_global_queue_depth: Gauge,
    worker_busy_seconds: Family<WorkerLabels, Counter<f64, AtomicU64>>,
    worker_parks: Family<WorkerLabels, Counter>,
    worker_park_unparks: Family<WorkerLabels, Counter>,
}

impl AgentMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        let manager = registry.sub_registry_with_prefix("workload_manager");
        manager.register(
            "active_proxy_count",
            "The number of active workload proxies",
            self.active_proxies.clone(),
        );
        manager.register(
            "pending_proxy_count",
            "The number of pending workload proxies",
            self.pending_proxies.clone(),
        );
        manager.register(
            "proxies_started",
            "The total number of workload proxies started",
            self.proxies_started.clone(),
        );
        manager.register(
            "proxies_stopped",
            "The total number of workload proxies stopped",
            self.proxies_stopped.clone(),
        );
        registry.register(
            "nodetunnel_certificate_expiration_timestamp_seconds",
            "When each workload certificate expires (unix seconds)",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "nodetunnel_certificate_fetch_failures",
            "Workload certificate fetches that failed, by reason",
            self.certificate_fetch_failures.clone(),
        );
        registry.register(
            "nodetunnel_connections_refused",
            "Connections refused at accept by a per-pod or per-source cap, by listener and reason",
            self.connections_refused.clone(),
        );
        registry.register(
            "nodetunnel_log_dropped_lines",
            "Log lines dropped because the log writer was full",
            self.dropped_log_lines.clone(),
        );
        self.register_process(registry);
        self.register_memory_budget(registry);
        self.register_runtime(registry.sub_registry_with_prefix("tokio"));
    }

    fn register_memory_budget(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "nodetunnel_memory_budget_limit",
            "Bytes the node's HBONE connections may reserve for windows and send buffers",
            Unit::Bytes,
            self.memory_budget_limit.clone(),
        );
        registry.register_with_unit(
            "nodetunnel_memory_budget_reserved",
            "Bytes reserved by open HBONE connections (receive windows and send allowances)",
            Unit::Bytes,
            self.memory_budget_reserved.clone(),
        );
        registry.register(
            "nodetunnel_memory_budget_reduced_connections",
            "HBONE connections that got a smaller window than configured because the budget ran low",
            self.memory_budget_reduced.clone(),
        );
    }

    fn register_process(&self, registry: &mut Registry) {
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            self.max_fds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_memory.clone(),
        );
    }

    fn register_runtime(&self, tokio: &mut Registry) {
        tokio.register(
            "num_workers",
            "Worker threads of the data-plane runtime",
            self.runtime_workers.clone(),
        );
        tokio.register(
            "num_alive_tasks",
            "Tasks alive in the data-plane runtime",
            self.runtime_alive_tasks.clone(),
        );
        tokio.register(
            "global_queue_depth",
            "Tasks waiting in the data-plane runtime's global queue",
            self.runtime_global_queue_depth.clone(),
        );
        tokio.register_with_unit(
            "worker_total_busy_duration",
            "Time each worker spent running tasks",
            Unit::Seconds,
            self.worker_busy_seconds.clone(),
        );
        tokio.register(
            "worker_park_count",
            "Times each worker parked",
            self.worker_parks.clone(),
        );
        tokio.register(
            "worker_park_unpark_count",
            "Times each worker parked or unparked",
            self.worker_park_unparks.clone(),
        );
    }

    pub(super) fn record(&self, sample: &AgentSample) {
        self.active_proxies.set(sample.active_proxies);
        self.pending_proxies.set(sample.pending_proxies);
        self.certificate_expiry.clear();
        for (identity, expires) in &sample.certificates {
            let seconds = expires
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.certificate_expiry
                .get_or_create(&IdentityLabels {
                    identity: identity.to_string(),
                })
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        advance(&self.dropped_log_lines, sample.dropped_log_lines);
        let process = ProcessSample::read();
        self.open_fds.set(process.open_fds);
        self.max_fds.set(process.max_fds);
        self.resident_memory.set(process.resident_bytes);
        if let Some(runtime) = &sample.runtime {
            self.record_runtime(runtime);
        }
        if let Some(budget) = &sample.memory_budget {
            let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
            self.memory_budget_limit.set(gauge(budget.limit));
            self.memory_budget_reserved.set(gauge(budget.reserved));
            advance(&self.memory_budget_reduced, budget.reduced_connections);
        }
    }

    fn record_runtime(&self, runtime: &RuntimeSample) {
        let gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        self.runtime_workers.set(gauge(runtime.workers));
        self.runtime_alive_tasks.set(gauge(runtime.alive_tasks));
        self.runtime_global_queue_depth
            .set(gauge(runtime.global_queue_depth));
        for (index, worker) in runtime.per_worker.iter().enumerate() {
            let labels = WorkerLabels {
                worker: index.to_string(),
            };
            let busy = self.worker_busy_seconds.get_or_create(&labels);
            let seconds = worker.busy.as_secs_f64();
            if seconds > busy.get() {
                busy.inc_by(seconds - busy.get());
            }
            advance(&self.worker_parks.get_or_create(&labels), worker.parks);
            advance(
                &self.worker_park_unparks.get_or_create(&labels),
                worker.park_unparks,
            );
        }
    }
}

/// Brings a counter mirroring an external running total up to `total` (never down).
fn advance(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
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
