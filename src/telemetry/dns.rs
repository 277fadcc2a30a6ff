//! DNS proxy metrics with ztunnel's names and labels (`istio_dns_*`), so dashboards built for
//! ztunnel's DNS proxy read this agent's the same way.
//!
//! Label values come from bounded sets: the query type (a 16-bit code, in practice a handful),
//! `udp`/`tcp`, and the canonical service and revision of the node's own workloads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::state::Workload;

/// ztunnel's buckets for the upstream duration, in seconds (its first bucket reads 0.005 in
/// the source but is meant as half a millisecond; we keep the ascending intent).
const UPSTREAM_BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

/// The labels of every DNS series, as ztunnel sets them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// The query type in lower case (`a`, `aaaa`, `srv`...).
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    /// The querying workload's canonical service, `unknown` if not known.
    pub source_canonical_service: String,
    /// The querying workload's canonical revision, `unknown` if not known.
    pub source_canonical_revision: String,
}

impl DnsLabels {
    /// Labels of a query of `query_type` over `protocol` from `source` (if known).
    pub fn new(query_type: &str, protocol: &'static str, source: Option<&Workload>) -> Self {
        let or_unknown = |value: Option<&String>| {
            value
                .filter(|value| !value.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".to_string())
        };
        DnsLabels {
            request_query_type: query_type.to_ascii_lowercase(),
            request_protocol: protocol,
            source_canonical_service: or_unknown(source.map(|w| &w.canonical_name)),
            source_canonical_revision: or_unknown(source.map(|w| &w.canonical_revision)),
        }
    }
}

/// The DNS proxy's counters and histogram.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new(UPSTREAM_BUCKETS.into_iter())
            }),
        }
    }
}

impl DnsMetrics {
    /// Registers the series under the `istio` prefix of `registry`.
    pub(crate) fn register(&self, istio: &mut Registry) {
        istio.register(
            "dns_requests",
            "Total number of DNS requests (unstable)",
            self.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            self.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            self.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
    }

    /// A query was handled (answered locally or forwarded).
    pub fn request(&self, labels: &DnsLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// A query was forwarded upstream; it took `seconds` and failed unless `succeeded`.
    pub fn forwarded(&self, labels: &DnsLabels, seconds: f64, succeeded: bool) {
        self.upstream_requests.get_or_create(labels).inc();
        self.upstream_duration
            .get_or_create(labels)
            .observe(seconds);
        if !succeeded {
            self.upstream_failures.get_or_create(labels).inc();
        }
    }
}
