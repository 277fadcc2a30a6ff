//! L4 authorization policies in the model (layer L1): the shape Istio's ztunnel receives from
//! istiod (`istio.security.Authorization`) and reads from its local config file. Evaluation lives
//! in `authz`; this file is only the data: policies (with the label selector Istio YAML gives
//! them), PeerAuthentications and the agent-wide authorization options, so that a [`super::Snapshot`]
//! holds everything `authz::authorize` reads.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;

use super::Workload;

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
///
/// Read in both of the forms Istio's local config is written in: ztunnel's own (serde_yaml 0.9
/// YAML tags: `!Exact value`, `!Prefix value`, `!Suffix value`, `!Presence []`) and single-key
/// maps (`{Exact: value}`, `{Presence: []}`), which is also the JSON form. Written as ztunnel's
/// `/config_dump` writes it: `{"Exact": "value"}`, `{"Presence": []}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal byte for byte.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Non-empty.
    Presence,
}

impl StringMatch {
    /// Whether `value` satisfies this match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(want) => value == want,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl serde::Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (index, variant, value) = match self {
            StringMatch::Exact(value) => (0, "Exact", value.as_str()),
            StringMatch::Prefix(value) => (1, "Prefix", value.as_str()),
            StringMatch::Suffix(value) => (2, "Suffix", value.as_str()),
            // ztunnel's `Presence()`: an empty list.
            StringMatch::Presence => {
                return serializer.serialize_newtype_variant("StringMatch", 3, "Presence", &[(); 0])
            }
        };
        serializer.serialize_newtype_variant("StringMatch", index, variant, value)
    }
}

/// The variant names of [`StringMatch`], as written.
#[derive(serde::Deserialize)]
enum StringMatchKind {
    Exact,
    Prefix,
    Suffix,
    Presence,
}

impl StringMatchKind {
    fn with(self, value: String) -> StringMatch {
        match self {
            StringMatchKind::Exact => StringMatch::Exact(value),
            StringMatchKind::Prefix => StringMatch::Prefix(value),
            StringMatchKind::Suffix => StringMatch::Suffix(value),
            StringMatchKind::Presence => StringMatch::Presence,
        }
    }
}

struct StringMatchVisitor;

impl<'de> serde::de::Visitor<'de> for StringMatchVisitor {
    type Value = StringMatch;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a string match: `!Exact value`, `!Prefix value`, `!Suffix value` or `!Presence []` \
             (or a single-key map such as `{Exact: value}`)",
        )
    }

    /// The tag form (`!Exact value`), as ztunnel's serde_yaml reads and writes enums.
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
        use serde::de::VariantAccess as _;
        let (kind, variant) = data.variant::<StringMatchKind>()?;
        match kind {
            // `!Presence []`, `!Presence {}` or a bare `!Presence`: the content carries nothing.
            StringMatchKind::Presence => {
                variant.newtype_variant::<serde::de::IgnoredAny>()?;
                Ok(StringMatch::Presence)
            }
            kind => Ok(kind.with(variant.newtype_variant::<String>()?)),
        }
    }

    /// The single-key map form (`{Exact: value}`), also JSON's.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
        let Some(kind) = map.next_key::<StringMatchKind>()? else {
            return Err(serde::de::Error::invalid_length(0, &self));
        };
        let found = match kind {
            StringMatchKind::Presence => {
                map.next_value::<serde::de::IgnoredAny>()?;
                StringMatch::Presence
            }
            kind => kind.with(map.next_value::<String>()?),
        };
        if map.next_key::<serde::de::IgnoredAny>()?.is_some() {
            return Err(serde::de::Error::custom(
                "a string match has exactly one key (Exact, Prefix, Suffix or Presence)",
            ));
        }
        Ok(found)
    }
}

impl<'de> serde::Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StringMatchVisitor)
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

/// Agent-wide authorization settings (the agent config's `authorization.defaultDeny`), carried in
/// the snapshot so that a reload changes them together with the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthzOptions {
    /// Zero-trust posture: a workload with no enforced ALLOW policy admits nothing, instead of
    /// Istio's default of admitting everything. DENY policies still apply first.
    pub default_deny: bool,
}

/// `selector.matchLabels` of an Istio policy, kept so that selection can happen against the
/// destination's labels at evaluation time (standalone mode has no istiod to fill
/// `Workload::authorization_policies`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Every label here must be on the workload with the same value; empty selects every
    /// workload in scope.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set for policies in the mesh root namespace: Istio applies their selector to workloads of
    /// every namespace, not only the policy's own.
    #[serde(default)]
    pub all_namespaces: bool,
}

impl WorkloadSelector {
    /// Whether a policy living in `policy_namespace` with this selector selects `workload`.
    pub fn selects(&self, policy_namespace: &str, workload: &Workload) -> bool {
        (self.all_namespaces || policy_namespace == workload.namespace)
            && self
                .match_labels
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
    }
}

/// A policy together with the workload selector it was written with (Istio YAML input).
/// A `WorkloadSelector`-scoped policy applies to a workload that lists its key in
/// `authorization_policies` (xDS / local config) *or* that its selector selects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorPolicy {
    /// The translated L4 policy.
    pub policy: Policy,
    /// Its selector; `None` when the scope is not `WorkloadSelector`.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
}

impl SelectorPolicy {
    /// A policy without selector (selection by scope and workload-listed keys only).
    pub fn new(policy: Policy) -> Self {
        SelectorPolicy {
            policy,
            selector: None,
        }
    }
}

/// How a workload accepts inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE): plaintext inbound is refused.
    Strict,
    /// Both mTLS and plaintext (Istio's default).
    #[default]
    Permissive,
    /// Plaintext allowed; HBONE still works (it cannot be refused at L4 by the agent).
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// Which workloads a PeerAuthentication applies to; resolved at translation time from the
/// resource's namespace (root or not) and selector.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PeerAuthenticationScope {
    /// Root namespace, no selector: the whole mesh.
    Mesh,
    /// No selector: workloads of its namespace.
    Namespace,
    /// Workloads of its namespace carrying all these labels.
    Workload {
        /// Labels the workload must carry (non-empty).
        match_labels: BTreeMap<String, String>,
    },
}

/// A PeerAuthentication in model form. `None` modes are Istio's UNSET (inherit).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// Resource name.
    pub name: String,
    /// Resource namespace.
    pub namespace: String,
    /// Mesh, namespace or workload.
    pub scope: PeerAuthenticationScope,
    /// The workload-level mode; `None` inherits.
    #[serde(default)]
    pub mode: Option<MtlsMode>,
    /// Per target port overrides (workload scope only); `None` inherits the workload-level mode.
    #[serde(default)]
    pub port_level: BTreeMap<u16, Option<MtlsMode>>,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Bypass protection for waypoint-protected workloads (the agent config's
/// `authorization.waypoint`): when it applies to a workload that has a waypoint (its own or one
/// of a service it backs), only that waypoint's identity may connect to it; plaintext and every
/// other peer are refused like a policy denial. Istio's ztunnel leaves this to hand-written
/// ALLOW policies, which are easy to forget; here it is on unless switched off.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WaypointEnforcement {
    /// The default for every workload (true).
    pub enforce: bool,
    /// Per-namespace overrides of `enforce`: namespace → on/off.
    pub namespaces: BTreeMap<String, bool>,
    /// Per-workload overrides, keyed `namespace/name`; win over the namespace's.
    pub workloads: BTreeMap<String, bool>,
}

impl Default for WaypointEnforcement {
    fn default() -> Self {
        WaypointEnforcement {
            enforce: true,
            namespaces: BTreeMap::new(),
            workloads: BTreeMap::new(),
        }
    }
}

impl WaypointEnforcement {
    /// Whether the protection is on for `workload`: its own override, else its namespace's,
    /// else the default.
    pub fn applies_to(&self, workload: &Workload) -> bool {
        let key = format!("{}/{}", workload.namespace, workload.name);
        self.workloads
            .get(&key)
            .or_else(|| self.namespaces.get(&workload.namespace))
            .copied()
            .unwrap_or(self.enforce)
    }
}

/// Everything authorization reads from a snapshot, from every source, in configuration order
/// (the local config's `policies` first, then Istio resources).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    /// L4 authorization policies, each with its label selector if it came with one.
    pub policies: Vec<SelectorPolicy>,
    /// PeerAuthentications (first wins on conflicts at one level, as in Istio).
    pub peer_authentications: Vec<PeerAuthentication>,
    /// The zero-trust switch.
    pub options: AuthzOptions,
    /// Waypoint bypass protection.
    pub waypoint: WaypointEnforcement,
}
