//! L4 authorization policies in the model (layer L1): the shape Istio's ztunnel receives from
//! istiod (`istio.security.Authorization`) and reads from its local config file. Evaluation lives
//! in `authz`; this file is only the data.

use ipnet::IpNet;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PolicyScope {
    /// Every workload (policies in the mesh root namespace).
    Global,
    /// Workloads in the policy's namespace.
    #[default]
    Namespace,
    /// Workloads that list this policy in `authorizationPolicies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PolicyAction {
    /// Admit the connection.
    #[default]
    Allow,
    /// Refuse the connection.
    Deny,
}

/// A literal string comparison. No regex, no case folding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StringMatch {
    /// Equal byte for byte.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Non-empty. Written `{Presence: []}` or `{Presence: {}}` in Istio's local config.
    Presence(#[serde(default, skip_serializing)] serde_yaml::Value),
}

impl StringMatch {
    /// Whether `value` satisfies this match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(want) => value == want,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence(_) => !value.is_empty(),
        }
    }
}

/// A `namespace` + `serviceAccount` pair; matches the identity's namespace and service account
/// (trust domain ignored, as in Istio).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
}

/// One match: every populated field must match (AND); inside a positive field any value may
/// match (OR); inside a `not_*` field none may. A match with every field empty never matches.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Match {
    /// Source identity namespace.
    pub namespaces: Vec<StringMatch>,
    /// Negated `namespaces`.
    pub not_namespaces: Vec<StringMatch>,
    /// Source identity without the `spiffe://` prefix.
    pub principals: Vec<StringMatch>,
    /// Negated `principals`.
    pub not_principals: Vec<StringMatch>,
    /// Source identity namespace + service account.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Negated `service_accounts`.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source IP in any of these CIDRs.
    pub source_ips: Vec<IpNet>,
    /// Negated `source_ips`.
    pub not_source_ips: Vec<IpNet>,
    /// Destination pod IP in any of these CIDRs.
    pub destination_ips: Vec<IpNet>,
    /// Negated `destination_ips`.
    pub not_destination_ips: Vec<IpNet>,
    /// Resolved destination (target) port.
    pub destination_ports: Vec<u16>,
    /// Negated `destination_ports`.
    pub not_destination_ports: Vec<u16>,
}

/// A clause matches if any of its matches does (an empty clause matches).
pub type Clause = Vec<Match>;
/// A rule matches if all its clauses do (a rule with no clauses matches everything).
pub type Rule = Vec<Clause>;

/// An L4 authorization policy. It matches a connection if any rule matches; no rules, no match.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Policy namespace (the root namespace for mesh-wide ones).
    pub namespace: String,
    /// Which workloads it applies to.
    #[serde(default)]
    pub scope: PolicyScope,
    /// Allow or deny.
    #[serde(default)]
    pub action: PolicyAction,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// Rules → clauses → matches.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The policy's key, `namespace/name`, as workloads reference it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
