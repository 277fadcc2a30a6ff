//! xDS client metrics with Istio's names (`istio_xds_*`), so dashboards built for ztunnel show
//! this agent's control-plane health the same way.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why an xDS stream ended, as Istio labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum TerminationReason {
    /// The stream could not be opened (connect, TLS, auth).
    ConnectionError,
    /// The stream failed after it was open.
    Error,
    /// We ended it to reconnect (e.g. a message over the size limit).
    Reconnect,
    /// The server ended it cleanly.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: TerminationReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

/// Counters of the xDS client.
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    terminations: Family<ReasonLabels, Counter>,
    messages: Family<UrlLabels, Counter>,
    message_bytes: Family<UrlLabels, Counter>,
}

impl XdsMetrics {
    /// Registers the counters under the `istio` prefix of `registry`.
    pub(crate) fn register(&self, istio: &mut Registry) {
        istio.register(
            "xds_connection_terminations",
            "The total number of completed connections to xds server",
            self.terminations.clone(),
        );
        istio.register(
            "xds_message",
            "Total number of messages received",
            self.messages.clone(),
        );
        istio.register(
            "xds_message_bytes",
            "Total number of bytes received",
            self.message_bytes.clone(),
        );
    }

    /// An xDS stream ended.
    pub fn terminated(&self, reason: TerminationReason) {
        self.terminations
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A response of `type_url` and `bytes` encoded bytes was received.
    pub fn received(&self, type_url: &str, bytes: usize) {
        let labels = UrlLabels {
            url: type_url.to_string(),
        };
        self.messages.get_or_create(&labels).inc();
        self.message_bytes
            .get_or_create(&labels)
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }
}
