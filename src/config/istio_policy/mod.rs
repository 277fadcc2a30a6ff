//! Istio `AuthorizationPolicy` and `PeerAuthentication` resources → our model (layer L1, pure).
//!
//! Standalone users keep writing the `security.istio.io/v1` / `v1beta1` YAML they already have;
//! this module translates it the way istiod translates it for ztunnel
//! (`pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`), so the agent enforces
//! the same L4 meaning. The config loader calls [`parse`] (or [`translate`] on already parsed
//! values) and merges the result into its snapshot; nothing here reads files.
//!
//! Translation, per resource:
//! - scope: `selector` → WorkloadSelector (the selector is kept in [`SelectorPolicy`] and matched
//!   against workload labels at evaluation); no selector in the root namespace → Global; else
//!   Namespace. `targetRef(s)` policies are for waypoints and are skipped with a warning.
//! - `action` ALLOW / DENY; AUDIT and CUSTOM are rejected (they need a waypoint).
//! - each Istio rule becomes one rule whose clauses are: the `to` operations (OR), the `from`
//!   sources (OR), then one clause per `when` condition.
//! - L7 attributes fail closed. In an ALLOW policy a rule using one is dropped (the policy still
//!   exists, so it still denies what nothing else allows). In a DENY policy the rule is enforced
//!   on its L4 part alone: an L7-only operation, source or condition stops constraining its
//!   clause, so the DENY covers more, never less. Both cases produce an [`IstioWarning`].
//!   (istiod keeps an empty match there, which ztunnel skips, making such a DENY rule match
//!   nothing; we deliberately fail closed instead, as istiod's own warning text promises.)
//! - Malformed values (ports, CIDRs, misplaced `*`, unknown fields or `when` keys) reject the
//!   whole resource with [`IstioError`]; the other resources still apply.

mod resource;
mod translate;

use std::fmt;

use serde::Deserialize;
use serde_yaml::Value;

use crate::state::policy::{PeerAuthentication, SelectorPolicy};

/// Translation settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IstioOptions {
    /// The mesh root namespace: its selector-less policies are mesh-wide.
    pub root_namespace: String,
    /// The cluster's DNS domain: a ServiceEntry's `istio.io/use-waypoint` names the waypoint
    /// service `<name>.<namespace>.svc.<clusterDomain>`.
    pub cluster_domain: String,
}

impl Default for IstioOptions {
    fn default() -> Self {
        IstioOptions {
            root_namespace: "istio-system".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

/// Names a resource in errors and warnings, displayed `Kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResourceId {
    /// `AuthorizationPolicy`, `PeerAuthentication`, or whatever `kind` said.
    pub kind: String,
    /// `metadata.namespace` (`default` when absent, as kubectl does).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Why a resource, or a whole YAML document, was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IstioError {
    /// The YAML text could not be parsed; documents after this one are not read.
    #[error("YAML document {document}: {message}")]
    Yaml {
        /// 0-based index of the `---`-separated document.
        document: usize,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One resource was rejected; the others still apply.
    #[error("{resource}: {reason}")]
    Rejected {
        /// Which resource.
        resource: ResourceId,
        /// Why.
        reason: RejectReason,
    },
}

/// Why a resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The document is not a mapping with `apiVersion` and `kind`.
    #[error("not a Kubernetes resource (a mapping with apiVersion and kind)")]
    NotAResource,
    /// Not `security.istio.io/v1` or `v1beta1`.
    #[error(
        "unsupported apiVersion {0:?} (expected security.istio.io/v1 or security.istio.io/v1beta1)"
    )]
    ApiVersion(String),
    /// Not AuthorizationPolicy or PeerAuthentication.
    #[error("unsupported kind (expected AuthorizationPolicy or PeerAuthentication)")]
    Kind,
    /// `metadata.name` is missing or empty.
    #[error("metadata.name is missing")]
    MissingName,
    /// The spec does not have Istio's shape (unknown field, wrong type).
    #[error("invalid spec: {0}")]
    Spec(String),
    /// AUDIT or CUSTOM: valid Istio, but not enforceable by the node agent.
    #[error("action {0} is not supported: the node agent enforces only ALLOW and DENY ({0} needs a waypoint)")]
    UnsupportedAction(String),
    /// An action Istio does not define.
    #[error("unknown action {0:?} (expected ALLOW or DENY)")]
    UnknownAction(String),
    /// The `istio.io/dry-run` annotation is not a boolean.
    #[error("annotation istio.io/dry-run must be \"true\" or \"false\", got {0:?}")]
    DryRun(String),
    /// A rule has an invalid value.
    #[error("rules[{rule}]: {problem}")]
    Rule {
        /// Index of the rule in `spec.rules`.
        rule: usize,
        /// What is wrong with it.
        problem: RuleProblem,
    },
    /// An mTLS mode other than UNSET, DISABLE, PERMISSIVE, STRICT.
    #[error("unknown mTLS mode {0:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)")]
    MtlsMode(String),
    /// A `portLevelMtls` key that is not a port.
    #[error("portLevelMtls key {0:?} is not a port number 1-65535")]
    PortLevelPort(String),
    /// `portLevelMtls` on a mesh- or namespace-wide PeerAuthentication.
    #[error("portLevelMtls requires a workload selector")]
    PortLevelWithoutSelector,
}

/// An invalid value inside an AuthorizationPolicy rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// `from[i]` without a source, or with an empty one.
    #[error("from[{0}].source must be set and not empty")]
    EmptySource(usize),
    /// `to[i]` without an operation, or with an empty one.
    #[error("to[{0}].operation must be set and not empty")]
    EmptyOperation(usize),
    /// Not a port number.
    #[error("{field}: {value:?} is not a port number 1-65535")]
    Port {
        /// Where.
        field: String,
        /// The offending value.
        value: String,
    },
    /// Not an IP address or CIDR.
    #[error("{field}: {value:?} is not an IP address or CIDR")]
    Cidr {
        /// Where.
        field: String,
        /// The offending value.
        value: String,
    },
    /// `*` somewhere else than the whole value, its start or its end.
    #[error("{field}: {value:?} may use '*' only as the whole value, a prefix or a suffix")]
    Wildcard {
        /// Where.
        field: String,
        /// The offending value.
        value: String,
    },
    /// An empty string.
    #[error("{field}: empty value")]
    EmptyValue {
        /// Where.
        field: String,
    },
    /// Not `name` or `namespace/name`.
    #[error("{field}: {value:?} is not a service account (\"name\" or \"namespace/name\")")]
    ServiceAccount {
        /// Where.
        field: String,
        /// The offending value.
        value: String,
    },
    /// A `when` key Istio does not define.
    #[error("when key {0:?} is not an Istio attribute")]
    UnknownCondition(String),
    /// A `when` condition with neither `values` nor `notValues`.
    #[error("when key {0:?} needs values or notValues")]
    ConditionWithoutValues(String),
}

/// Something applied, but not exactly as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IstioWarning {
    /// Which resource.
    pub resource: ResourceId,
    /// What happened.
    pub kind: WarningKind,
}

/// The kinds of [`IstioWarning`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WarningKind {
    /// An ALLOW rule with L7 attributes was dropped: it allows nothing.
    L7AllowRuleDropped {
        /// Index of the rule.
        rule: usize,
        /// The L7 attributes found.
        attributes: Vec<String>,
    },
    /// A DENY rule with L7 attributes is enforced on its L4 part alone (denies more).
    L7DenyRuleNarrowed {
        /// Index of the rule.
        rule: usize,
        /// The L7 attributes found.
        attributes: Vec<String>,
    },
    /// `targetRef(s)` binds the policy to a waypoint; the node agent ignores it.
    WaypointPolicySkipped,
    /// A PeerAuthentication with a selector in the root namespace (Istio ignores those).
    RootSelectorIgnored,
}

impl fmt::Display for IstioWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resource = &self.resource;
        match &self.kind {
            WarningKind::L7AllowRuleDropped { rule, attributes } => write!(
                f,
                "{resource}: rules[{rule}] uses HTTP attributes ({}) that cannot be enforced at \
                 L4; this ALLOW rule is dropped and allows nothing (fails closed). L7 rules \
                 belong on a waypoint.",
                attributes.join(", ")
            ),
            WarningKind::L7DenyRuleNarrowed { rule, attributes } => write!(
                f,
                "{resource}: rules[{rule}] uses HTTP attributes ({}) that cannot be enforced at \
                 L4; this DENY rule is enforced on its L4 conditions alone and denies more than \
                 written (fails closed). L7 rules belong on a waypoint.",
                attributes.join(", ")
            ),
            WarningKind::WaypointPolicySkipped => write!(
                f,
                "{resource}: targetRef(s) bind this policy to a waypoint; the node agent skips it"
            ),
            WarningKind::RootSelectorIgnored => write!(
                f,
                "{resource}: a selector in the root namespace is ignored, as in Istio"
            ),
        }
    }
}

/// Everything a set of Istio resources translated to; errors name the resources left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// Translated authorization policies, in input order.
    pub policies: Vec<SelectorPolicy>,
    /// Translated PeerAuthentications, in input order (first wins on conflicts).
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Resources applied with a changed meaning (L7 rules, waypoint policies).
    pub warnings: Vec<IstioWarning>,
    /// Resources not applied.
    pub errors: Vec<IstioError>,
}

/// Parses YAML text: `---`-separated documents, each a resource, a list of resources, or a
/// Kubernetes `List` with `items`. Empty documents are skipped.
pub fn parse(yaml: &str, options: &IstioOptions) -> Translation {
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for (document, deserializer) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        match Value::deserialize(deserializer) {
            Ok(value) => values.push(value),
            Err(error) => {
                errors.push(IstioError::Yaml {
                    document,
                    message: error.to_string(),
                });
                break;
            }
        }
    }
    let mut translation = translate(values, options);
    translation.errors.splice(0..0, errors);
    translation
}

/// Translates already-parsed documents (for config files that embed Istio resources).
pub fn translate(
    documents: impl IntoIterator<Item = Value>,
    options: &IstioOptions,
) -> Translation {
    let mut translation = Translation::default();
    for document in documents {
        for resource in expand(document) {
            // ServiceEntry and DestinationRule are read by `config::istio_networking`.
            if is_networking(&resource) {
                continue;
            }
            translate::resource(resource, options, &mut translation);
        }
    }
    translation
}

/// Whether `resource` is a `networking.istio.io` resource (any version) that is not one of the
/// security kinds (whose wrong apiVersion the security reader reports).
pub fn is_networking(resource: &Value) -> bool {
    let security_kind = matches!(
        resource.get("kind").and_then(Value::as_str),
        Some("AuthorizationPolicy" | "PeerAuthentication")
    );
    !security_kind
        && resource
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|version| version.starts_with("networking.istio.io/"))
}

/// A document's resources: none (null), the items of a list, or the document itself.
pub fn expand(document: Value) -> Vec<Value> {
    match document {
        Value::Null => Vec::new(),
        Value::Sequence(items) => items.into_iter().flat_map(expand).collect(),
        Value::Mapping(mut mapping) => {
            let is_list = mapping
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|kind| kind.ends_with("List"));
            match mapping.remove("items") {
                Some(Value::Sequence(items)) if is_list => {
                    items.into_iter().flat_map(expand).collect()
                }
                Some(items) => {
                    mapping.insert(Value::from("items"), items);
                    vec![Value::Mapping(mapping)]
                }
                None => vec![Value::Mapping(mapping)],
            }
        }
        other => vec![other],
    }
}
