//! Every environment variable Istio's ztunnel reads, and what nodetunnel does with it, so that
//! Istio's ztunnel Helm chart runs nodetunnel with only the image changed and nothing it sets is
//! ignored silently: a variable is either honoured (applied in [`super::Environment::apply`] or
//! where the comment says) or listed by [`super::Environment::unsupported`], which `main` logs
//! once at start-up.
//!
//! The list follows ztunnel's `src/config.rs` and `src/telemetry.rs`, and the chart's
//! `templates/daemonset.yaml` (Istio 1.27-1.31; the chart also sets `INPOD_ENABLED` and
//! `RUST_BACKTRACE`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{EnvProblem, Environment};

/// How nodetunnel treats one of ztunnel's variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Applied; the text says to what.
    Honoured(&'static str),
    /// Only ztunnel's default value is supported (compared case-insensitively); any other value
    /// is reported with the reason.
    DefaultOnly {
        /// ztunnel's default.
        default: &'static str,
        /// What nodetunnel cannot do.
        reason: &'static str,
    },
    /// Reported whenever set.
    Unsupported(&'static str),
}

use Treatment::{DefaultOnly, Honoured, Unsupported};

/// ztunnel's variables (full names; the prefixed families are in [`PREFIXES`]).
pub const VARIABLES: &[(&str, Treatment)] = &[
    (
        "ALT_CA_HOSTNAME",
        Honoured("name istiod's CA certificate is verified against"),
    ),
    (
        "ALT_XDS_HOSTNAME",
        Honoured("name istiod's xDS certificate is verified against"),
    ),
    (
        "AUTH_TOKEN",
        Honoured("path of the node's token sent to istiod"),
    ),
    (
        "CA_ADDRESS",
        Honoured("istiod's CA (empty: the built-in CA signs)"),
    ),
    (
        "CA_ROOT_CA",
        Honoured("path of istiod's root for the CA connection"),
    ),
    ("CLUSTER_DOMAIN", Honoured("agent.dns.clusterDomain")),
    (
        "CLUSTER_ID",
        Honoured("cluster id sent to istiod (ISTIO_META_CLUSTER_ID wins)"),
    ),
    (
        "COMPLIANCE_POLICY",
        Honoured("`pqc`: TLS key exchange X25519MLKEM768 only (other values: see below)"),
    ),
    (
        "CONNECTION_TERMINATION_DEADLINE",
        Honoured("drain deadline"),
    ),
    (
        "ENABLE_ORIG_SRC",
        Honoured("original source towards local apps"),
    ),
    (
        "ENABLE_PROXY",
        DefaultOnly {
            default: "true",
            reason: "the HBONE proxy always runs (a DNS-only agent is not supported)",
        },
    ),
    (
        "FAKE_CA",
        Honoured("true: the built-in CA signs instead of istiod"),
    ),
    (
        "HTTP2_CONNECTION_WINDOW_SIZE",
        Honoured("agent.proxy.connectionWindow"),
    ),
    ("HTTP2_FRAME_SIZE", Honoured("agent.proxy.frameSize")),
    (
        "HTTP2_STREAM_WINDOW_SIZE",
        Honoured("agent.proxy.streamWindow"),
    ),
    (
        "INPOD_ENABLED",
        DefaultOnly {
            default: "true",
            reason: "only in-pod redirection (istio-cni over ZDS) is supported",
        },
    ),
    (
        "INPOD_PORT_REUSE",
        DefaultOnly {
            default: "true",
            reason: "in-pod listeners always use SO_REUSEPORT",
        },
    ),
    ("INPOD_UDS", Honoured("istio-cni's ZDS socket")),
    (
        "INSTANCE_IP",
        Honoured("this agent's pod IP, sent to istiod"),
    ),
    (
        "IPV6_ENABLED",
        Honoured("false: metrics and readiness listen on 0.0.0.0 instead of [::]"),
    ),
    (
        "ISTIO_META_CLUSTER_ID",
        Honoured("cluster id sent to istiod"),
    ),
    (
        "ISTIO_META_DNS_CAPTURE",
        Honoured("agent.dns.enabled: the DNS proxy runs unless set to anything but true"),
    ),
    (
        "ISTIO_META_DNS_PROXY_ADDR",
        Unsupported("the DNS proxy listens on port 15053 of each pod"),
    ),
    (
        "KEEPALIVE_ENABLED",
        DefaultOnly {
            default: "true",
            reason: "TCP keepalive on proxied sockets is always on",
        },
    ),
    (
        "KEEPALIVE_INTERVAL",
        Unsupported("TCP keepalive on proxied sockets has fixed timings"),
    ),
    (
        "KEEPALIVE_RETRIES",
        Unsupported("TCP keepalive on proxied sockets has fixed timings"),
    ),
    (
        "KEEPALIVE_TIME",
        Unsupported("TCP keepalive on proxied sockets has fixed timings"),
    ),
    (
        "KUBERNETES_SERVICE_HOST",
        Honoured("istiod's default address is the in-cluster service"),
    ),
    (
        "LOCALHOST_APP_TUNNEL",
        DefaultOnly {
            default: "false",
            reason: "delivery to an application tunnel uses the pod IP, not localhost",
        },
    ),
    (
        "LOCAL_XDS",
        Honoured("inline local config (workloads, services, policies) merged with istiod's"),
    ),
    (
        "LOCAL_XDS_PATH",
        Honoured("local config file merged with istiod's, hot-reloaded"),
    ),
    (
        "LOG_FORMAT",
        Honoured("json: one JSON object per line, ztunnel's layout"),
    ),
    ("NETWORK", Honoured("agent.network")),
    ("NODE_NAME", Honoured("agent.node")),
    ("PACKET_MARK", Honoured("agent.proxy.packetMark")),
    ("POD_NAME", Honoured("this agent's pod, sent to istiod")),
    (
        "POD_NAMESPACE",
        Honoured("this agent's namespace, sent to istiod"),
    ),
    (
        "POOL_MAX_STREAMS_PER_CONNECTION",
        Honoured("agent.pool.maxStreamsPerConnection"),
    ),
    (
        "POOL_UNUSED_RELEASE_TIMEOUT",
        Honoured("agent.pool.idleTimeout"),
    ),
    (
        "PREFERED_SERVICE_NAMESPACE",
        Unsupported("service endpoints are picked without a namespace preference"),
    ),
    (
        "PROXY_CONFIG",
        Honoured("discoveryAddress, proxyAdminPort, statsPort, concurrency, proxyMetadata"),
    ),
    (
        "PROXY_MODE",
        DefaultOnly {
            default: "shared",
            reason: "only the node-level (shared) mode is supported",
        },
    ),
    (
        "PROXY_WORKLOAD_INFO",
        Unsupported("only the node-level (shared) mode is supported"),
    ),
    (
        "RUST_BACKTRACE",
        Honoured("backtraces on panic (Rust runtime)"),
    ),
    ("RUST_LOG", Honoured("log filter")),
    (
        "SECRET_TTL",
        Honoured("certificate lifetime asked of istiod"),
    ),
    (
        "SERVICE_ACCOUNT",
        Honoured("this agent's service account, sent to istiod"),
    ),
    (
        "TERMINATION_GRACE_PERIOD_SECONDS",
        Honoured("drain deadline"),
    ),
    (
        "TLS12_ENABLED",
        DefaultOnly {
            default: "false",
            reason: "TLS 1.2 is not offered: HBONE and istiod connections are TLS 1.3 only",
        },
    ),
    (
        "TRANSPARENT_NETWORK_POLICIES",
        DefaultOnly {
            default: "false",
            reason: "HBONE always carries traffic to the destination's 15008",
        },
    ),
    ("TRUST_DOMAIN", Honoured("agent.trustDomain")),
    (
        "UNSTABLE_ENABLE_SOCKS5",
        DefaultOnly {
            default: "false",
            reason: "there is no SOCKS5 listener",
        },
    ),
    (
        "USER_TIMEOUT_ENABLED",
        DefaultOnly {
            default: "false",
            reason: "TCP_USER_TIMEOUT is not set on proxied sockets",
        },
    ),
    ("XDS_ADDRESS", Honoured("istiod's xDS (empty: no xDS)")),
    (
        "XDS_ON_DEMAND",
        DefaultOnly {
            default: "false",
            reason: "the agent subscribes to every workload and service (no on-demand xDS)",
        },
    ),
    (
        "XDS_ROOT_CA",
        Honoured("path of istiod's root for the xDS connection"),
    ),
    (
        "ZTUNNEL_CPU_LIMIT",
        Honoured("CPU count behind a ZTUNNEL_WORKER_THREADS percentage"),
    ),
    (
        "ZTUNNEL_RESOURCE_CPU_LIMIT",
        Honoured("worker threads when nothing else sets them"),
    ),
    (
        "ZTUNNEL_RESOURCE_CPU_REQUEST",
        Honoured("lowest worker thread count when nothing else sets them"),
    ),
    (
        "ZTUNNEL_WORKER_THREADS",
        Honoured("worker threads: a count or a percentage of the CPUs"),
    ),
];

/// Prefixed variable families ztunnel reads, all honoured.
pub const PREFIXES: &[(&str, &str)] = &[
    ("CA_HEADER_", "gRPC headers on CA requests"),
    ("ISTIO_META_", "node metadata sent to istiod"),
    ("XDS_HEADER_", "gRPC headers on xDS requests"),
];

/// A variable that is set to something nodetunnel does not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedVariable {
    /// The variable (or `PROXY_CONFIG.<field>`).
    pub variable: String,
    /// Its value.
    pub value: String,
    /// Why it has no effect.
    pub reason: String,
}

impl std::fmt::Display for UnsupportedVariable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={:?} is not supported and has no effect: {}",
            self.variable, self.value, self.reason
        )
    }
}

/// The fields of Istio's `ProxyConfig` (the `PROXY_CONFIG` variable, JSON or YAML) ztunnel
/// reads; any other field is reported.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProxyConfig {
    pub discovery_address: Option<String>,
    pub proxy_admin_port: Option<u16>,
    pub stats_port: Option<u16>,
    pub concurrency: Option<u16>,
    #[serde(default)]
    pub proxy_metadata: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

impl Environment {
    /// `PROXY_CONFIG`, parsed; `None` when unset or empty.
    pub(crate) fn proxy_config(&self) -> Result<Option<ProxyConfig>, EnvProblem> {
        let Some(text) = self
            .get("PROXY_CONFIG")
            .filter(|text| !text.trim().is_empty())
        else {
            return Ok(None);
        };
        serde_yaml::from_str(text)
            .map(Some)
            .map_err(|error| EnvProblem {
                variable: "PROXY_CONFIG".to_string(),
                message: format!("not a ProxyConfig in JSON or YAML: {error}"),
            })
    }

    /// Every set variable of ztunnel's that nodetunnel does not do, with the reason, in name
    /// order. Pure: logged by the caller.
    pub fn unsupported(&self) -> Vec<UnsupportedVariable> {
        let mut found = Vec::new();
        for (name, treatment) in VARIABLES {
            let Some(value) = self.get(name) else {
                continue;
            };
            let reason = match treatment {
                Honoured(_) => continue,
                DefaultOnly { default, .. } if value.eq_ignore_ascii_case(default) => continue,
                DefaultOnly { reason, .. } | Unsupported(reason) => reason,
            };
            found.push(UnsupportedVariable {
                variable: name.to_string(),
                value: value.to_string(),
                reason: reason.to_string(),
            });
        }
        for name in ["XDS_ROOT_CA", "CA_ROOT_CA"] {
            let Some(value) = self.get(name) else {
                continue;
            };
            let reason = if value == "SYSTEM" {
                "the system's roots are not used for istiod; give the path of istiod's root"
            } else if value.contains("-----BEGIN") {
                "an inline PEM is not read; give the path of istiod's root"
            } else {
                continue;
            };
            found.push(UnsupportedVariable {
                variable: name.to_string(),
                value: value.to_string(),
                reason: reason.to_string(),
            });
        }
        // ztunnel acts on `pqc` alone (compared exactly) and passes over Istio's other policy
        // (`fips-140-2`) in silence; we say so.
        if let Some(value) = self
            .get("COMPLIANCE_POLICY")
            .filter(|value| !value.is_empty() && *value != "pqc")
        {
            found.push(UnsupportedVariable {
                variable: "COMPLIANCE_POLICY".to_string(),
                value: value.to_string(),
                reason: "only `pqc` changes anything (as in ztunnel): the suites are already \
                         TLS 1.3 AES-GCM, and this build's crypto is not FIPS-validated"
                    .to_string(),
            });
        }
        if let Ok(Some(proxy_config)) = self.proxy_config() {
            found.extend(proxy_config_unsupported(&proxy_config));
        }
        found.sort_by(|a, b| a.variable.cmp(&b.variable));
        found
    }
}

fn proxy_config_unsupported(proxy_config: &ProxyConfig) -> Vec<UnsupportedVariable> {
    let mut found: Vec<UnsupportedVariable> = proxy_config
        .other
        .iter()
        .map(|(field, value)| UnsupportedVariable {
            variable: format!("PROXY_CONFIG.{field}"),
            value: serde_yaml::to_string(value)
                .unwrap_or_default()
                .trim()
                .to_string(),
            reason: "ztunnel reads only discoveryAddress, proxyAdminPort, statsPort, concurrency and proxyMetadata".to_string(),
        })
        .collect();
    for (key, value) in &proxy_config.proxy_metadata {
        if key.strip_prefix("ISTIO_META_").unwrap_or(key) == "DNS_PROXY_ADDR" {
            found.push(UnsupportedVariable {
                variable: format!("PROXY_CONFIG.proxyMetadata.{key}"),
                value: value.clone(),
                reason: "the DNS proxy listens on port 15053 of each pod".to_string(),
            });
        }
    }
    found
}

/// ztunnel's fallback worker count when nothing sets it: a quarter of the CPUs, at least 2
/// (Istio 1.31; before, always 2).
const DEFAULT_WORKER_SHARE_PERCENT: f64 = 25.0;
const MIN_DEFAULT_WORKERS: usize = 2;

impl Environment {
    /// Worker threads as ztunnel picks them: `ZTUNNEL_WORKER_THREADS` (`4`, or `50%` of
    /// `ZTUNNEL_CPU_LIMIT`, else of `available_cpus`, rounded up, at least 1); else
    /// `PROXY_CONFIG`'s `concurrency` (0: every CPU); else `ZTUNNEL_RESOURCE_CPU_LIMIT` (at least
    /// 2, raised to `ZTUNNEL_RESOURCE_CPU_REQUEST`). When none is set: with `ztunnel_defaults`
    /// (Istio mode) a quarter of the CPUs, at least 2 and at least the CPU request; otherwise
    /// `None` (one per CPU, tokio's default).
    pub fn worker_threads(
        &self,
        available_cpus: usize,
        ztunnel_defaults: bool,
    ) -> Result<Option<usize>, EnvProblem> {
        let problem = |variable: &str, message: String| EnvProblem {
            variable: variable.to_string(),
            message,
        };
        if let Some(value) = self.get("ZTUNNEL_WORKER_THREADS") {
            return worker_count(value, || self.cpu_limit(available_cpus))
                .map(Some)
                .map_err(|error| problem("ZTUNNEL_WORKER_THREADS", error.to_string()));
        }
        if let Some(concurrency) = self.proxy_config()?.and_then(|config| config.concurrency) {
            let threads = if concurrency == 0 {
                available_cpus
            } else {
                usize::from(concurrency)
            };
            return Ok(Some(threads.max(1)));
        }
        let request = self.cpu_quantity("ZTUNNEL_RESOURCE_CPU_REQUEST")?;
        if let Some(limit) = self.cpu_quantity("ZTUNNEL_RESOURCE_CPU_LIMIT")? {
            let threads = limit.max(MIN_DEFAULT_WORKERS).max(request.unwrap_or(0));
            return Ok(Some(threads));
        }
        if !ztunnel_defaults && request.is_none() {
            return Ok(None);
        }
        let share = (available_cpus as f64 * DEFAULT_WORKER_SHARE_PERCENT / 100.0).ceil() as usize;
        Ok(Some(
            share.max(MIN_DEFAULT_WORKERS).max(request.unwrap_or(0)),
        ))
    }

    fn cpu_limit(&self, available_cpus: usize) -> Result<usize, CpuValueError> {
        match self.get("ZTUNNEL_CPU_LIMIT") {
            None => Ok(available_cpus),
            Some(value) => {
                parse_cpus(value).map_err(|error| CpuValueError::CpuLimit(Box::new(error)))
            }
        }
    }

    fn cpu_quantity(&self, name: &str) -> Result<Option<usize>, EnvProblem> {
        self.get(name)
            .map(|value| {
                parse_cpus(value).map_err(|error| EnvProblem {
                    variable: name.to_string(),
                    message: error.to_string(),
                })
            })
            .transpose()
    }
}

/// Why a CPU count or worker count was refused. The messages end up in [`EnvProblem`], in front
/// of operators, so they quote the value as it was given.
#[derive(Debug, thiserror::Error)]
enum CpuValueError {
    /// Neither whole cores nor millicores, or zero.
    #[error("{0:?} is not a CPU count like 2 or 1500m")]
    NotCpuCount(String),
    /// `ZTUNNEL_CPU_LIMIT` is invalid; a worker percentage needs it.
    #[error("ZTUNNEL_CPU_LIMIT: {0}")]
    CpuLimit(Box<CpuValueError>),
    /// A `%` suffix after something that is not a number.
    #[error("{0:?} is not a percentage like 50%")]
    NotPercentage(String),
    /// A percentage of 0 or below, or above 100.
    #[error("{0:?}: the percentage must be above 0 and at most 100")]
    PercentageOutOfRange(String),
    /// Neither a whole number from 1 nor a percentage.
    #[error("{0:?} is not a worker count (a whole number from 1, or a percentage like 50%)")]
    NotWorkerCount(String),
}

/// `ZTUNNEL_WORKER_THREADS`: a whole number, or a percentage of the CPU count.
fn worker_count(
    value: &str,
    cpus: impl FnOnce() -> Result<usize, CpuValueError>,
) -> Result<usize, CpuValueError> {
    if let Some(percent) = value.strip_suffix('%') {
        let percent: f64 = percent
            .trim()
            .parse()
            .map_err(|_| CpuValueError::NotPercentage(value.to_string()))?;
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(CpuValueError::PercentageOutOfRange(value.to_string()));
        }
        let threads = (cpus()? as f64 * percent / 100.0).ceil() as usize;
        return Ok(threads.max(1));
    }
    match value.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(CpuValueError::NotWorkerCount(value.to_string())),
        Ok(threads) => Ok(threads),
    }
}

/// A CPU count as the downward API writes it: whole cores (`2`), or millicores (`1500m`, rounded
/// up to whole cores).
fn parse_cpus(value: &str) -> Result<usize, CpuValueError> {
    let value = value.trim();
    let cores = match value.strip_suffix('m') {
        Some(millis) => millis
            .parse::<usize>()
            .ok()
            .map(|millis| millis.div_ceil(1000)),
        None => value.parse::<usize>().ok(),
    };
    match cores {
        Some(cores) if cores > 0 => Ok(cores),
        _ => Err(CpuValueError::NotCpuCount(value.to_string())),
    }
}

#[cfg(test)]
#[path = "ztunnel_tests.rs"]
mod tests;
