//! Client-side traffic policy (layer L1): Istio `DestinationRule`s, as far as they apply to L4
//! connections — `trafficPolicy.connectionPool.tcp` and `outlierDetection`.
//!
//! The source pod's agent looks up the rule of the service a connection addresses
//! ([`DestinationRules::for_service`]) and enforces it per source pod, as Istio's sidecar
//! enforces it per client proxy: at most `maxConnections` open connections to the service, and
//! endpoints that fail to connect `consecutiveGatewayErrors` times in a row are ejected from load
//! balancing (`proxy::circuit`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Service;

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Open connections allowed to the service from one source pod; more are refused at once.
    pub max_connections: Option<u32>,
    /// Replaces `agent.proxy.connectTimeout` for connections to the service.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// A connection to the service with no byte either way for this long is closed (`0s` in
    /// the resource: none).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on plain-TCP upstream sockets: idle time before probes.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive_time: Option<Duration>,
    /// TCP keepalive interval between probes.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive_interval: Option<Duration>,
    /// A connection to the service is closed after this long.
    #[serde(with = "humantime_serde")]
    pub max_connection_duration: Option<Duration>,
}

/// `outlierDetection`, with connect failures as the errors counted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive connect failures that eject an endpoint (`consecutiveGatewayErrors`, else
    /// `consecutive5xxErrors`; Istio's default 5).
    pub consecutive_errors: u32,
    /// How often ejections are re-examined: an ejected endpoint comes back at the first
    /// interval boundary after its ejection time (Istio's default 10 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Ejection time, multiplied by how many times the endpoint was ejected (default 30 s).
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// At most this share of a service's endpoints is ejected at once, but always at least one
    /// (Istio's default 10 %).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// A translated `networking.istio.io` DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.host`, fully qualified (a short name is completed in the rule's namespace).
    pub host: String,
    /// `trafficPolicy.connectionPool.tcp`.
    pub tcp: TcpPool,
    /// `trafficPolicy.outlierDetection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// `spec.exportTo`.
    pub export_to: ExportTo,
}

impl DestinationRule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every DestinationRule of the model, in configuration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationRules(pub Vec<Arc<DestinationRule>>);

impl DestinationRules {
    /// The rule for `service` as pods of `namespace` see it. Istio's precedence: a rule in the
    /// client's own namespace, then one in the service's namespace, then any other exported
    /// one; first in configuration order within each.
    pub fn for_service(&self, namespace: &str, service: &Service) -> Option<&Arc<DestinationRule>> {
        let candidates = || {
            self.0
                .iter()
                .filter(|rule| rule.host == service.hostname && rule.export_to.includes(namespace))
        };
        candidates()
            .find(|rule| rule.namespace == namespace)
            .or_else(|| candidates().find(|rule| rule.namespace == service.namespace))
            .or_else(|| candidates().next())
    }
}

/// Which namespaces see a resource (`exportTo`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ExportTo {
    /// `*` or no `exportTo`.
    #[default]
    All,
    /// These namespaces (`.` already replaced by the resource's own; `~` is the empty set).
    Namespaces(BTreeSet<String>),
}

impl ExportTo {
    /// Whether pods of `namespace` see the resource.
    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            ExportTo::All => true,
            ExportTo::Namespaces(namespaces) => namespaces.contains(namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(namespace: &str, name: &str, host: &str, export_to: ExportTo) -> Arc<DestinationRule> {
        Arc::new(DestinationRule {
            namespace: namespace.into(),
            name: name.into(),
            host: host.into(),
            tcp: TcpPool::default(),
            outlier_detection: None,
            export_to,
        })
    }

    #[test]
    fn the_client_namespace_wins_then_the_service_namespace_then_any() {
        let host = "echo.shop.svc.cluster.local";
        let service = Service {
            name: "echo".into(),
            namespace: "shop".into(),
            hostname: host.into(),
            vips: Vec::new(),
            ports: Default::default(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        };
        let own_only = ExportTo::Namespaces(["client".to_string()].into());
        let rules = DestinationRules(vec![
            rule("elsewhere", "any", host, ExportTo::All),
            rule("shop", "owner", host, ExportTo::All),
            rule("client", "mine", host, own_only),
            rule(
                "client",
                "other-host",
                "other.shop.svc.cluster.local",
                ExportTo::All,
            ),
        ]);
        let cases = [("client", "mine"), ("shop", "owner"), ("third", "owner")];
        for (namespace, expected) in cases {
            let found = rules
                .for_service(namespace, &service)
                .map(|rule| rule.name.clone());
            assert_eq!(
                found.as_deref(),
                Some(expected),
                "client namespace {namespace}"
            );
        }
        let only_elsewhere = DestinationRules(vec![rule("elsewhere", "any", host, ExportTo::All)]);
        let found = only_elsewhere.for_service("client", &service);
        assert_eq!(found.map(|rule| rule.name.as_str()), Some("any"));
        assert!(DestinationRules::default()
            .for_service("client", &service)
            .is_none());
    }
}
