//! Egress and overload-protection counters (layer L1): connections refused by the outbound
//! traffic policy, connections refused by a connection limit, and outlier ejections.
//!
//! Istio's ztunnel enforces none of these, so the names are ours. Every label value comes from a
//! fixed set of reasons chosen in code, so the series stay bounded whatever the traffic.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a connection limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitReason {
    /// A destination service's `connectionPool.tcp.maxConnections` (client side).
    MaxConnections,
    /// A destination workload's concurrent-connection limit per source (server side).
    InboundConcurrency,
    /// A destination workload's new-connection rate per source (server side).
    InboundRate,
    /// A destination workload already tracks its maximum of sources, each with a connection
    /// open (server side).
    InboundSources,
}

impl LimitReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReason::MaxConnections => "max_connections",
            LimitReason::InboundConcurrency => "inbound_concurrency",
            LimitReason::InboundRate => "inbound_rate",
            LimitReason::InboundSources => "inbound_sources",
        }
    }
}

/// The counters, registered once in [`super::Metrics`].
#[derive(Debug, Clone, Default)]
pub struct ProtectionMetrics {
    egress_refusals: Family<ReasonLabels, Counter>,
    limit_refusals: Family<ReasonLabels, Counter>,
    ejections: Family<ReasonLabels, Counter>,
}

impl ProtectionMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "nodetunnel_egress_refusals",
            "Outbound connections refused by the outbound traffic policy, by reason",
            self.egress_refusals.clone(),
        );
        registry.register(
            "nodetunnel_connection_limit_refusals",
            "Connections refused by a connection limit, by reason",
            self.limit_refusals.clone(),
        );
        registry.register(
            "nodetunnel_outlier_ejections",
            "Endpoints ejected from load balancing by outlier detection, by reason",
            self.ejections.clone(),
        );
    }

    /// A connection to a destination outside the registry was refused (`registry_only`).
    pub fn egress_refused(&self, reason: &'static str) {
        self.egress_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A connection limit refused a connection.
    pub fn limit_refused(&self, reason: LimitReason) {
        self.limit_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Outlier detection ejected an endpoint (`consecutive_connect_failures`).
    pub fn ejected(&self, reason: &'static str) {
        self.ejections.get_or_create(&ReasonLabels { reason }).inc();
    }
}
