//! Serde shapes of the Istio `security.istio.io` resources we read (v1 and v1beta1 share them).
//!
//! Specs reject unknown fields: a misspelt field in a security policy must be an error, not a
//! rule that silently means something else. Metadata is read leniently (Kubernetes adds much).

use std::collections::BTreeMap;

/// `spec.selector`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub provider: Option<serde_yaml::Value>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// `spec.rules[]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `rules[].from[]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct FromSpec {
    #[serde(default)]
    pub source: Option<Source>,
}

/// `rules[].from[].source`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// `rules[].to[]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ToSpec {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// `spec.mtls` / `spec.portLevelMtls.<port>`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct MutualTls {
    #[serde(default)]
    pub mode: Option<String>,
}
