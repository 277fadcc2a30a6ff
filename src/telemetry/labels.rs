//! Istio's traffic labels (layer L1): who reports, who talks to whom, and how it ended, built
//! purely from what a connection record knows, with `unknown` for anything not known.

use std::fmt::{self, Write as _};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

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
    /// Refused by the outbound traffic policy (`REGISTRY_ONLY`, no ServiceEntry matched).
    EgressBlocked,
    /// Refused by a connection limit or because every endpoint is ejected.
    Overflow,
    /// Refused by a new-connection rate limit (Envoy's `RATE_LIMITED`).
    RateLimited,
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
            ResponseFlag::EgressBlocked => "EGRESS_BLOCKED",
            ResponseFlag::Overflow => "UPSTREAM_OVERFLOW",
            ResponseFlag::RateLimited => "RATE_LIMITED",
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

/// Which way a connection goes relative to the workload this agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a local workload to somewhere else.
    Outbound,
    /// To a local workload.
    Inbound,
}

impl Direction {
    /// Outbound connections are reported by the source, inbound ones by the destination.
    pub fn reporter(self) -> Reporter {
        match self {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_reads_the_same_in_json_logs_and_reporter() {
        for (direction, word, reporter) in [
            (Direction::Inbound, "inbound", Reporter::Destination),
            (Direction::Outbound, "outbound", Reporter::Source),
        ] {
            assert_eq!(serde_json::to_value(direction).ok(), Some(word.into()));
            assert_eq!(direction.to_string(), word);
            assert_eq!(direction.reporter(), reporter);
        }
    }
}
