//! Inbound protection (layer L1): the agent config's `inboundLimits`, per destination workload,
//! as part of the snapshot so that a reload changes them for new connections like policies.
//!
//! Istio has nothing for this at L4 (its local rate limit is an Envoy filter a sidecar or
//! gateway runs), so the shape is ours: a list of rules, each selecting destination workloads by
//! namespace and labels, with limits that apply to every source separately — a source is the
//! peer's SPIFFE identity on HBONE (15008) and the peer's IP on plaintext (15006). The first
//! rule that selects a workload is the one in force for it. `proxy::inbound_limits` keeps the
//! per-source counters and token buckets.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Workload;

/// Largest `connectionsPerSecond`: beyond this a limit would never refuse anything real.
pub const MAX_CONNECTIONS_PER_SECOND: f64 = 1_000_000.0;

/// `selector` of an inbound limit: Kubernetes `matchLabels`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Every label here must be on the workload with the same value; empty selects all.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `perSource`: what one source may do to one destination workload.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerSourceLimits {
    /// Open connections (HBONE streams or plaintext connections) from one source at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// New connections per second from one source, on average (the token bucket's refill
    /// rate; fractions allowed, e.g. `0.5` is one every two seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<f64>,
    /// New connections one source may open at once after a quiet period (the bucket's size);
    /// default: `connectionsPerSecond` rounded up, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl PerSourceLimits {
    /// The token bucket, if a rate is set: (tokens per second, size).
    pub fn rate(&self) -> Option<(f64, u32)> {
        let rate = self.connections_per_second?;
        let default_burst = || (rate.ceil() as u32).max(1);
        Some((rate, self.burst.unwrap_or_else(default_burst)))
    }
}

/// One `agent.inboundLimits[]` rule.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundLimit {
    /// Destination workloads of this namespace; absent: of every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Destination workloads with these labels; absent: every workload in `namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The limits each source gets.
    pub per_source: PerSourceLimits,
}

impl InboundLimit {
    /// Whether this rule applies to connections to `workload`.
    pub fn selects(&self, workload: &Workload) -> bool {
        let namespace_matches = self
            .namespace
            .as_ref()
            .map_or(true, |namespace| *namespace == workload.namespace);
        let labels_match = self.selector.as_ref().map_or(true, |selector| {
            selector
                .match_labels
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
        });
        namespace_matches && labels_match
    }
}

/// Every rule, in configuration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundLimits(pub Vec<Arc<InboundLimit>>);

impl InboundLimits {
    /// The rule in force for connections to `workload`: the first that selects it.
    pub fn for_workload(&self, workload: &Workload) -> Option<&Arc<InboundLimit>> {
        self.0.iter().find(|limit| limit.selects(workload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::workload;

    fn limit(namespace: Option<&str>, labels: &[(&str, &str)], max: u32) -> Arc<InboundLimit> {
        Arc::new(InboundLimit {
            namespace: namespace.map(str::to_string),
            selector: (!labels.is_empty()).then(|| LabelSelector {
                match_labels: labels
                    .iter()
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .collect(),
            }),
            per_source: PerSourceLimits {
                max_connections: Some(max),
                ..PerSourceLimits::default()
            },
        })
    }

    #[test]
    fn the_first_rule_selecting_the_workload_by_namespace_and_labels_applies() {
        let limits = InboundLimits(vec![
            limit(Some("shop"), &[("app", "api"), ("tier", "gold")], 1),
            limit(Some("shop"), &[("app", "api")], 2),
            limit(None, &[], 3),
        ]);
        let mut api = workload("shop", "api", [10, 0, 0, 1]);
        api.labels.insert("app".into(), "api".into());
        let mut gold = api.clone();
        gold.labels.insert("tier".into(), "gold".into());
        let mut elsewhere = api.clone();
        elsewhere.namespace = "other".into();
        let cases = [(&gold, 1), (&api, 2), (&elsewhere, 3)];
        for (workload, expected) in cases {
            let found = limits.for_workload(workload).expect("a rule");
            assert_eq!(found.per_source.max_connections, Some(expected));
        }
        assert!(InboundLimits::default().for_workload(&api).is_none());
    }

    #[test]
    fn burst_defaults_to_the_rate_rounded_up_and_at_least_one() {
        let rate = |connections_per_second, burst| PerSourceLimits {
            connections_per_second,
            burst,
            ..PerSourceLimits::default()
        };
        assert_eq!(rate(Some(2.5), None).rate(), Some((2.5, 3)));
        assert_eq!(rate(Some(0.1), None).rate(), Some((0.1, 1)));
        assert_eq!(rate(Some(0.1), Some(7)).rate(), Some((0.1, 7)));
        assert_eq!(rate(None, None).rate(), None);
    }
}
