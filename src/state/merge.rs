//! Merging the model's sources (layer L1): the local file's model with the one a control plane
//! (istiod) pushes, into the one [`Snapshot`] every reader sees. Pure: the app calls it on each
//! config reload and each push.

use std::collections::{BTreeMap, HashSet};

use crate::spiffe::Identity;

use super::egress::Egress;
use super::inbound_limits::InboundLimits;
use super::policy::SelectorPolicy;
use super::{Authorization, Policy, Service, Snapshot, TunnelProtocol, Workload};

/// The local file's model, in file order.
#[derive(Debug, Clone, Default)]
pub struct LocalModel {
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Services.
    pub services: Vec<Service>,
    /// Every local policy source, with the agent-wide authorization settings.
    pub authorization: Authorization,
    /// The outbound traffic policy and ServiceEntries (only the file has them).
    pub egress: Egress,
    /// The agent's inbound limits (only the file has them).
    pub inbound_limits: InboundLimits,
}

/// A control plane's model, keyed as it names its resources.
#[derive(Debug, Clone, Copy)]
pub struct PushedModel<'a> {
    /// Workloads by uid.
    pub workloads: &'a BTreeMap<String, Workload>,
    /// Services by `namespace/hostname`.
    pub services: &'a BTreeMap<String, Service>,
    /// Authorization policies by `namespace/name`.
    pub policies: &'a BTreeMap<String, Policy>,
}

/// The file's model with the pushed one added. The file wins where both name the same workload
/// uid, service or policy: a local entry is an operator's deliberate override.
pub fn merge(local: LocalModel, pushed: Option<PushedModel<'_>>) -> Snapshot {
    let LocalModel {
        mut workloads,
        mut services,
        mut authorization,
        egress,
        inbound_limits,
    } = local;
    let Some(pushed) = pushed else {
        return Snapshot::with_authorization(workloads, services, authorization)
            .with_egress(egress)
            .with_inbound_limits(inbound_limits);
    };
    let local_uids: HashSet<String> = workloads.iter().map(|w| w.uid.clone()).collect();
    let local_services: HashSet<String> = services.iter().map(Service::key).collect();
    let local_policies: HashSet<String> = authorization
        .policies
        .iter()
        .map(|selector| selector.policy.key())
        .collect();
    workloads.extend(
        pushed
            .workloads
            .values()
            .filter(|workload| !local_uids.contains(&workload.uid))
            .cloned(),
    );
    services.extend(
        pushed
            .services
            .values()
            .filter(|service| !local_services.contains(&service.key()))
            .cloned(),
    );
    authorization.policies.extend(
        pushed
            .policies
            .values()
            .filter(|policy| !local_policies.contains(&policy.key()))
            .cloned()
            .map(SelectorPolicy::new),
    );
    Snapshot::with_authorization(workloads, services, authorization)
        .with_egress(egress)
        .with_inbound_limits(inbound_limits)
}

impl Snapshot {
    /// The identities of the HBONE workloads on `node`: the certificates this node's agent
    /// will be asked for, worth fetching ahead of the first connection.
    pub fn mesh_identities_on(&self, node: &str) -> HashSet<Identity> {
        self.workloads()
            .filter(|workload| workload.node == node && workload.protocol == TunnelProtocol::Hbone)
            .map(|workload| workload.identity.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::policy::{PolicyAction, PolicyScope};
    use crate::state::tests::workload;

    fn policy(name: &str, action: PolicyAction) -> Policy {
        Policy {
            name: name.to_string(),
            namespace: "default".to_string(),
            scope: PolicyScope::default(),
            action,
            dry_run: false,
            rules: Vec::new(),
        }
    }

    #[test]
    fn istiod_model_is_merged_and_the_file_wins_on_conflicts() {
        let local = LocalModel {
            workloads: vec![Workload {
                uid: "local-a".to_string(),
                ..workload("default", "a", [10, 0, 0, 1])
            }],
            services: Vec::new(),
            authorization: Authorization {
                policies: vec![SelectorPolicy::new(policy("p", PolicyAction::Deny))],
                ..Authorization::default()
            },
            egress: crate::state::egress::Egress {
                policy: crate::state::egress::OutboundTrafficPolicy {
                    mode: crate::state::egress::OutboundMode::RegistryOnly,
                    namespaces: BTreeMap::new(),
                },
                ..crate::state::egress::Egress::default()
            },
            inbound_limits: InboundLimits::default(),
        };
        let shadowed = Workload {
            uid: "local-a".to_string(),
            ..workload("default", "a-from-istiod", [10, 0, 0, 9])
        };
        let workloads = BTreeMap::from([
            ("local-a".to_string(), shadowed),
            (
                "istiod-b".to_string(),
                Workload {
                    uid: "istiod-b".to_string(),
                    ..workload("default", "b", [10, 0, 0, 2])
                },
            ),
        ]);
        let policies = BTreeMap::from([
            ("default/p".to_string(), policy("p", PolicyAction::Allow)),
            ("default/q".to_string(), policy("q", PolicyAction::Allow)),
        ]);
        let services = BTreeMap::new();
        let pushed = PushedModel {
            workloads: &workloads,
            services: &services,
            policies: &policies,
        };

        let merged = merge(local.clone(), Some(pushed));
        assert_eq!(
            merged.workload("local-a").map(|w| w.name.as_str()),
            Some("a")
        );
        assert!(merged.workload("istiod-b").is_some());
        let policies: Vec<(String, PolicyAction)> = merged
            .authorization()
            .policies
            .iter()
            .map(|selector| (selector.policy.key(), selector.policy.action))
            .collect();
        assert_eq!(
            policies,
            [
                ("default/p".to_string(), PolicyAction::Deny),
                ("default/q".to_string(), PolicyAction::Allow),
            ]
        );
        // The outbound traffic policy comes from the file, with or without istiod.
        let registry_only = crate::state::egress::OutboundMode::RegistryOnly;
        assert_eq!(merged.egress().policy.mode, registry_only);
        assert_eq!(
            merge(local.clone(), None).egress().policy.mode,
            registry_only
        );
        // Without istiod the file alone is the model.
        assert!(merge(local, None).workload("istiod-b").is_none());
    }

    #[test]
    fn mesh_identities_are_the_hbone_workloads_of_the_node() {
        let tcp = Workload {
            uid: "tcp".to_string(),
            protocol: TunnelProtocol::Tcp,
            ..workload("default", "tcp", [10, 0, 0, 3])
        };
        let elsewhere = Workload {
            uid: "elsewhere".to_string(),
            node: "node-b".to_string(),
            ..workload("default", "elsewhere", [10, 0, 0, 4])
        };
        let mesh = workload("default", "mesh", [10, 0, 0, 5]);
        let snapshot = Snapshot::new(vec![tcp, elsewhere, mesh.clone()], Vec::new(), Vec::new());
        assert_eq!(
            snapshot.mesh_identities_on("node-a"),
            HashSet::from([mesh.identity])
        );
    }
}
