//! Istio's environment variables (layer L1), so the agent runs in an Istio ambient install with
//! ztunnel's environment unchanged. Precedence: config file < environment < command-line flags.
//!
//! The environment is captured once ([`Environment::capture`]) and then treated as data, so
//! parsing stays pure and tests pass their own variables. Every variable Istio's ztunnel reads
//! is either applied here (or, for the worker count, by [`Environment::worker_threads`]) or
//! reported by [`Environment::unsupported`]: the table is in `env/ztunnel.rs`.

mod ztunnel;

pub use ztunnel::{Treatment, UnsupportedVariable, PREFIXES, VARIABLES};

use std::collections::BTreeMap;
use std::time::Duration;

use super::agent::AgentConfig;

/// Where Istio's node agent finds istiod when nothing is configured.
const ISTIOD_IN_CLUSTER: &str = "https://istiod.istio-system.svc:15012";
const ISTIOD_LOCAL: &str = "https://localhost:15012";

/// The process environment, captured at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment(BTreeMap<String, String>);

/// A variable whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvProblem {
    /// The variable.
    pub variable: String,
    /// What is wrong with its value.
    pub message: String,
}

impl Environment {
    /// The current process environment (only variables with UTF-8 names and values).
    pub fn capture() -> Self {
        Environment(std::env::vars().collect())
    }

    /// An environment with exactly these variables (tests, and tools that must ignore the
    /// process environment).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Environment(
            pairs
                .into_iter()
                .map(|(key, value)| (key.into(), value.into()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0.iter().filter_map(move |(key, value)| {
            key.strip_prefix(prefix)
                .filter(|rest| !rest.is_empty())
                .map(|rest| (rest, value.as_str()))
        })
    }

    /// Istio-mode defaults, for an agent started without a config file: istiod for discovery
    /// and certificates, istio-cni for pods (which also installs the rules).
    pub(crate) fn apply_istio_defaults(&self, agent: &mut AgentConfig) {
        let istiod = if self.get("KUBERNETES_SERVICE_HOST").is_some() {
            ISTIOD_IN_CLUSTER
        } else {
            ISTIOD_LOCAL
        };
        agent.xds.address = Some(istiod.to_string());
        agent.ca.address = Some(istiod.to_string());
        agent.zds.enabled = true;
        agent.capture.install_rules = false;
    }

    /// Applies every variable it knows to `agent`, returning the ones whose values are bad.
    pub(crate) fn apply(&self, agent: &mut AgentConfig) -> Vec<EnvProblem> {
        let mut problems = Vec::new();
        let mut problem = |variable: &str, message: String| {
            problems.push(EnvProblem {
                variable: variable.to_string(),
                message,
            })
        };
        self.apply_names(agent);
        self.apply_pod_settings(agent, &mut problem);
        self.apply_proxy_settings(agent, &mut problem);
        self.apply_proxy_config(agent, &mut problem);
        self.apply_headers_and_metadata(agent, &mut problem);
        self.apply_dns_and_drain(agent, &mut problem);
        problems
    }

    fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_string)
    }

    /// Variables taken as they are, so no value of theirs is a problem.
    fn apply_names(&self, agent: &mut AgentConfig) {
        let text = |name: &str| self.text(name);
        if let Some(node) = text("NODE_NAME") {
            agent.node = node;
        }
        if let Some(network) = text("NETWORK") {
            agent.network = network;
        }
        if let Some(domain) = text("TRUST_DOMAIN") {
            agent.trust_domain = domain;
        }
        // An empty address switches the service off, as in Istio.
        if let Some(address) = text("XDS_ADDRESS") {
            agent.xds.address = Some(address).filter(|address| !address.is_empty());
        }
        if let Some(address) = text("CA_ADDRESS") {
            agent.ca.address = Some(address).filter(|address| !address.is_empty());
        }
        if let Some(root) = text("XDS_ROOT_CA") {
            agent.xds.root_ca = root;
        }
        if let Some(root) = text("CA_ROOT_CA") {
            agent.ca.root_ca = root;
        }
        if let Some(name) = text("ALT_XDS_HOSTNAME") {
            agent.xds.alt_hostname = Some(name);
        }
        if let Some(name) = text("ALT_CA_HOSTNAME") {
            agent.ca.alt_hostname = Some(name);
        }
        if let Some(token) = text("AUTH_TOKEN") {
            agent.istio.token = Some(token);
        }
        // The metadata form wins, as in Istio.
        if let Some(cluster) = text("ISTIO_META_CLUSTER_ID").or_else(|| text("CLUSTER_ID")) {
            agent.istio.cluster_id = cluster;
        }
        if let Some(name) = text("POD_NAME") {
            agent.istio.pod_name = name;
        }
        if let Some(namespace) = text("POD_NAMESPACE") {
            agent.istio.pod_namespace = namespace;
        }
        if let Some(account) = text("SERVICE_ACCOUNT") {
            agent.istio.service_account = account;
        }
    }

    fn apply_pod_settings(&self, agent: &mut AgentConfig, problem: &mut impl FnMut(&str, String)) {
        if let Some(ip) = self.get("INSTANCE_IP").filter(|ip| !ip.is_empty()) {
            match ip.parse() {
                Ok(ip) => agent.istio.instance_ip = Some(ip),
                Err(_) => problem("INSTANCE_IP", format!("{ip:?} is not an IP address")),
            }
        }
        if let Some(ttl) = self.get("SECRET_TTL") {
            match humantime::parse_duration(ttl) {
                Ok(ttl) if !ttl.is_zero() => agent.istio.certificate_ttl = ttl,
                _ => problem("SECRET_TTL", format!("{ttl:?} is not a duration like 24h")),
            }
        }
        if let Some(socket) = self.get("INPOD_UDS").filter(|socket| !socket.is_empty()) {
            agent.zds.socket = socket.into();
            agent.zds.enabled = true;
        }
        if let Some(value) = self
            .get("ENABLE_ORIG_SRC")
            .filter(|value| !value.is_empty())
        {
            match value.to_ascii_lowercase().as_str() {
                "true" | "1" => agent.proxy.original_source = true,
                "false" | "0" => agent.proxy.original_source = false,
                _ => problem("ENABLE_ORIG_SRC", format!("{value:?} is not true or false")),
            }
        }
    }

    fn apply_headers_and_metadata(
        &self,
        agent: &mut AgentConfig,
        problem: &mut impl FnMut(&str, String),
    ) {
        for (name, value) in self.with_prefix("XDS_HEADER_") {
            agent
                .xds
                .headers
                .insert(name.to_ascii_lowercase(), value.to_string());
        }
        for (name, value) in self.with_prefix("CA_HEADER_") {
            agent
                .ca
                .headers
                .insert(name.to_ascii_lowercase(), value.to_string());
        }
        for (name, value) in self.with_prefix("ISTIO_META_") {
            agent.istio.metadata.insert(
                name.to_string(),
                serde_json::Value::String(value.to_string()),
            );
        }
        for (name, value) in self.with_prefix("ISTIO_METAJSON_") {
            match serde_json::from_str(value) {
                Ok(json) => {
                    agent.istio.metadata.insert(name.to_string(), json);
                }
                Err(error) => problem(
                    &format!("ISTIO_METAJSON_{name}"),
                    format!("not JSON: {error}"),
                ),
            }
        }
    }

    fn apply_dns_and_drain(&self, agent: &mut AgentConfig, problem: &mut impl FnMut(&str, String)) {
        let text = |name: &str| self.text(name);
        // As ztunnel: the DNS proxy runs unless DNS_CAPTURE is set to anything but "true".
        if let Some(capture) = self.get("ISTIO_META_DNS_CAPTURE") {
            agent.dns.enabled = capture.eq_ignore_ascii_case("true");
        }
        if let Some(domain) = text("CLUSTER_DOMAIN").filter(|domain| !domain.is_empty()) {
            agent.dns.cluster_domain = domain;
        }
        match drain_deadline(self) {
            Ok(Some(deadline)) => agent.drain_timeout = deadline,
            Ok(None) => {}
            Err((variable, message)) => problem(variable, message),
        }
    }
}

impl Environment {
    /// ztunnel's data-path variables: mark, pool, HTTP/2 windows, the CA and IPv6 switches.
    fn apply_proxy_settings(
        &self,
        agent: &mut AgentConfig,
        problem: &mut impl FnMut(&str, String),
    ) {
        if let Some(mark) = self.parsed::<u32>("PACKET_MARK", "a mark like 1337", problem) {
            agent.proxy.packet_mark = mark;
        }
        let pool_streams = "a stream count from 1";
        if let Some(streams) =
            self.parsed::<u32>("POOL_MAX_STREAMS_PER_CONNECTION", pool_streams, problem)
        {
            agent.pool.max_streams_per_connection = streams;
        }
        if let Some(timeout) = self.get("POOL_UNUSED_RELEASE_TIMEOUT") {
            match humantime::parse_duration(timeout) {
                Ok(timeout) => agent.pool.idle_timeout = timeout,
                Err(_) => problem(
                    "POOL_UNUSED_RELEASE_TIMEOUT",
                    format!("{timeout:?} is not a duration like 5m"),
                ),
            }
        }
        let bytes = "a size in bytes";
        if let Some(size) = self.parsed::<u32>("HTTP2_STREAM_WINDOW_SIZE", bytes, problem) {
            agent.proxy.stream_window = size;
        }
        if let Some(size) = self.parsed::<u32>("HTTP2_CONNECTION_WINDOW_SIZE", bytes, problem) {
            agent.proxy.connection_window = size;
        }
        if let Some(size) = self.parsed::<u32>("HTTP2_FRAME_SIZE", bytes, problem) {
            agent.proxy.frame_size = size;
        }
        // Ours, not ztunnel's: Istio's Helm chart sets only the container's environment.
        if let Some(algorithm) = self.get("NODETUNNEL_CONGESTION_CONTROL") {
            agent.proxy.congestion_control = (!algorithm.is_empty()).then(|| algorithm.into());
        }
        // ztunnel's FAKE_CA makes its own self-signed CA; ours is the built-in CA.
        if self.flag("FAKE_CA", problem) == Some(true) {
            agent.ca.address = None;
        }
        if self.flag("IPV6_ENABLED", problem) == Some(false) {
            for listen in [&mut agent.listen.metrics, &mut agent.listen.readiness] {
                if listen.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
                    listen.set_ip(std::net::Ipv4Addr::UNSPECIFIED.into());
                }
            }
        }
    }

    /// The parts of `PROXY_CONFIG` ztunnel reads. `XDS_ADDRESS` wins over `discoveryAddress`,
    /// and `ISTIO_META_*` variables over `proxyMetadata` (applied after).
    fn apply_proxy_config(&self, agent: &mut AgentConfig, problem: &mut impl FnMut(&str, String)) {
        let proxy_config = match self.proxy_config() {
            Ok(Some(proxy_config)) => proxy_config,
            Ok(None) => return,
            Err(error) => return problem(&error.variable, error.message),
        };
        if let (Some(address), None) = (&proxy_config.discovery_address, self.get("XDS_ADDRESS")) {
            agent.xds.address = Some(address.clone()).filter(|address| !address.is_empty());
        }
        if let Some(port) = proxy_config.proxy_admin_port {
            agent.listen.admin.set_port(port);
        }
        if let Some(port) = proxy_config.stats_port {
            agent.listen.metrics.set_port(port);
        }
        for (key, value) in &proxy_config.proxy_metadata {
            let key = key.strip_prefix("ISTIO_META_").unwrap_or(key);
            // ztunnel reads DNS_CAPTURE from the merged metadata; the variable wins.
            if key == "DNS_CAPTURE" && self.get("ISTIO_META_DNS_CAPTURE").is_none() {
                agent.dns.enabled = value.eq_ignore_ascii_case("true");
            }
            agent
                .istio
                .metadata
                .insert(key.to_string(), serde_json::Value::String(value.clone()));
        }
    }

    /// A variable parsed with `FromStr`; a bad value is a problem naming `expected`.
    fn parsed<T: std::str::FromStr>(
        &self,
        name: &str,
        expected: &str,
        problem: &mut impl FnMut(&str, String),
    ) -> Option<T> {
        let value = self.get(name)?;
        match value.trim().parse() {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                problem(name, format!("{value:?} is not {expected}"));
                None
            }
        }
    }

    /// A boolean variable (`true`/`false`/`1`/`0`); unset or empty is `None`.
    fn flag(&self, name: &str, problem: &mut impl FnMut(&str, String)) -> Option<bool> {
        let value = self.get(name).filter(|value| !value.is_empty())?;
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => {
                problem(name, format!("{value:?} is not true or false"));
                None
            }
        }
    }

    /// The TLS key exchange `COMPLIANCE_POLICY` asks for: `pqc` (compared exactly, as ztunnel
    /// does) is X25519MLKEM768 only; any other value leaves the default and is reported by
    /// [`Environment::unsupported`].
    pub fn key_exchange(&self) -> crate::tls::KeyExchange {
        match self.get("COMPLIANCE_POLICY") {
            Some("pqc") => crate::tls::KeyExchange::PostQuantumOnly,
            _ => crate::tls::KeyExchange::Classical,
        }
    }

    /// Whether connections run on the data-plane shards (`NODETUNNEL_SHARDS`: `on`, the
    /// default, or `off` for one multi-thread runtime with work stealing).
    pub fn data_plane_shards(&self) -> Result<bool, EnvProblem> {
        on_or_off(self.get("NODETUNNEL_SHARDS"), "NODETUNNEL_SHARDS")
    }

    /// Whether the agent gives back its start-up code's pages once ready
    /// (`NODETUNNEL_RELEASE_STARTUP_PAGES`: `on`, the default, or `off`).
    pub fn release_startup_pages(&self) -> Result<bool, EnvProblem> {
        on_or_off(
            self.get("NODETUNNEL_RELEASE_STARTUP_PAGES"),
            "NODETUNNEL_RELEASE_STARTUP_PAGES",
        )
    }

    /// The local config file of Istio mode (`LOCAL_XDS_PATH`), which the agent watches.
    pub fn local_config_file(&self) -> Option<std::path::PathBuf> {
        match self.local_config() {
            Ok(LocalConfig::File(path)) => Some(path),
            _ => None,
        }
    }

    /// Where the Istio-mode local config comes from (`LOCAL_XDS_PATH` or `LOCAL_XDS`, as in
    /// ztunnel; both at once is a problem).
    pub(crate) fn local_config(&self) -> Result<LocalConfig, EnvProblem> {
        let path = self.get("LOCAL_XDS_PATH").filter(|path| !path.is_empty());
        let inline = self.get("LOCAL_XDS").filter(|text| !text.is_empty());
        match (path, inline) {
            (Some(_), Some(_)) => Err(EnvProblem {
                variable: "LOCAL_XDS".to_string(),
                message: "only one of LOCAL_XDS_PATH or LOCAL_XDS may be set".to_string(),
            }),
            (Some(path), None) => Ok(LocalConfig::File(path.into())),
            (None, Some(text)) => Ok(LocalConfig::Inline(text.to_string())),
            (None, None) => Ok(LocalConfig::None),
        }
    }
}

/// The local config (workloads, services, policies) of an agent started without `--config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LocalConfig {
    /// Only istiod's.
    None,
    /// `LOCAL_XDS_PATH`: a file, watched like `--config`.
    File(std::path::PathBuf),
    /// `LOCAL_XDS`: the text itself.
    Inline(String),
}

/// Istio's drain deadline rule: `CONNECTION_TERMINATION_DEADLINE` if set; else from
/// `TERMINATION_GRACE_PERIOD_SECONDS` (secs − 5 above 10 s, else secs − 1, at least 1 s), so
/// that the agent finishes draining before the kubelet kills it.
fn drain_deadline(env: &Environment) -> Result<Option<Duration>, (&'static str, String)> {
    if let Some(deadline) = env.get("CONNECTION_TERMINATION_DEADLINE") {
        return humantime::parse_duration(deadline).map(Some).map_err(|_| {
            (
                "CONNECTION_TERMINATION_DEADLINE",
                format!("{deadline:?} is not a duration like 5s"),
            )
        });
    }
    let Some(grace) = env.get("TERMINATION_GRACE_PERIOD_SECONDS") else {
        return Ok(None);
    };
    let seconds: u64 = grace.parse().map_err(|_| {
        (
            "TERMINATION_GRACE_PERIOD_SECONDS",
            format!("{grace:?} is not a whole number of seconds"),
        )
    })?;
    let deadline = if seconds > 10 {
        seconds - 5
    } else {
        seconds.saturating_sub(1)
    };
    Ok(Some(Duration::from_secs(deadline.max(1))))
}

/// A switch that is on unless set to `off`; anything but `on` or `off` is a problem.
fn on_or_off(value: Option<&str>, variable: &str) -> Result<bool, EnvProblem> {
    match value {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(EnvProblem {
            variable: variable.to_string(),
            message: format!("expected on or off, got {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests;
