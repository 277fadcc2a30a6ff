//! The DNS proxy's configuration section (layer L1): `agent.dns`.
//!
//! Plain data with production defaults: on, `cluster.local`, the node's resolvers from
//! `/etc/resolv.conf`, and per-pod bounds that keep one flooding pod from taking memory or tasks
//! from the others.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The DNS proxy every captured pod gets on port 15053.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Run the DNS proxy in every captured pod (and, when the agent installs the redirection
    /// rules, redirect the pod's port 53 to it). In Istio mode `ISTIO_META_DNS_CAPTURE`
    /// decides, as it does for ztunnel.
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// The cluster's DNS domain: services are `name.namespace.svc.<clusterDomain>`.
    #[serde(default = "defaults::cluster_domain")]
    pub cluster_domain: String,
    /// Resolvers that names outside the mesh are forwarded to (`IP` or `IP:port`, `[v6]:port`).
    /// Empty: the `nameserver` lines of `resolvConf`.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Where the node's resolvers are read from when `upstreams` is empty.
    #[serde(default = "defaults::resolv_conf")]
    pub resolv_conf: PathBuf,
    /// Time a forwarded query may take (all upstreams, UDP and a TCP retry together) before
    /// the pod gets SERVFAIL. Below the 5 s a glibc client waits per try, so the client sees
    /// the SERVFAIL rather than its own timeout.
    #[serde(default = "defaults::forward_timeout", with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// Forwarded queries one pod may have in flight; more are answered REFUSED.
    #[serde(default = "defaults::max_forwards_per_pod")]
    pub max_forwards_per_pod: u32,
    /// TCP connections one pod may hold open to its DNS proxy; more are closed at once.
    #[serde(default = "defaults::max_tcp_connections_per_pod")]
    pub max_tcp_connections_per_pod: u32,
    /// The shortest time an address a pod resolved under a ServiceEntry host stays allowed,
    /// whatever TTL the answer gave (applications cache answers a little longer than told).
    #[serde(default = "defaults::learned_ttl_min", with = "humantime_serde")]
    pub learned_ttl_min: Duration,
    /// The longest time such an address stays allowed (a huge TTL is cut to this).
    #[serde(default = "defaults::learned_ttl_max", with = "humantime_serde")]
    pub learned_ttl_max: Duration,
    /// Addresses one pod's learned set holds; when full, the one expiring first makes room.
    #[serde(default = "defaults::max_learned_per_pod")]
    pub max_learned_per_pod: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: defaults::enabled(),
            cluster_domain: defaults::cluster_domain(),
            upstreams: Vec::new(),
            resolv_conf: defaults::resolv_conf(),
            forward_timeout: defaults::forward_timeout(),
            max_forwards_per_pod: defaults::max_forwards_per_pod(),
            max_tcp_connections_per_pod: defaults::max_tcp_connections_per_pod(),
            learned_ttl_min: defaults::learned_ttl_min(),
            learned_ttl_max: defaults::learned_ttl_max(),
            max_learned_per_pod: defaults::max_learned_per_pod(),
        }
    }
}

impl DnsConfig {
    /// The bounds of every pod's DNS-learned egress set.
    pub fn learned_limits(&self) -> crate::state::learned::LearnedLimits {
        crate::state::learned::LearnedLimits {
            ttl_min: self.learned_ttl_min,
            ttl_max: self.learned_ttl_max,
            max_per_pod: usize::try_from(self.max_learned_per_pod).unwrap_or(usize::MAX),
        }
    }

    /// The upstream resolvers: `upstreams`, or else the nameservers of `resolv_conf`.
    /// An unreadable or empty file is an error naming it: without an upstream every name
    /// outside the mesh would fail.
    pub fn resolved_upstreams(&self) -> Result<Vec<SocketAddr>, UpstreamsError> {
        if !self.upstreams.is_empty() {
            return Ok(self.upstreams.iter().map(|upstream| upstream.0).collect());
        }
        let text = std::fs::read(&self.resolv_conf).map_err(|source| UpstreamsError::Read {
            path: self.resolv_conf.clone(),
            source,
        })?;
        let parsed = resolv_conf::Config::parse(&text).map_err(|error| UpstreamsError::Parse {
            path: self.resolv_conf.clone(),
            reason: error.to_string(),
        })?;
        let upstreams: Vec<SocketAddr> = parsed
            .nameservers
            .into_iter()
            .map(|nameserver| SocketAddr::new(IpAddr::from(nameserver), DNS_PORT))
            .collect();
        if upstreams.is_empty() {
            return Err(UpstreamsError::NoNameserver(self.resolv_conf.clone()));
        }
        Ok(upstreams)
    }
}

/// Why the upstream resolvers are not known.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamsError {
    /// The resolv.conf file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a resolv.conf.
    #[error("parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file names no nameserver.
    #[error("{0} has no nameserver line; set agent.dns.upstreams")]
    NoNameserver(PathBuf),
}

/// The standard DNS port, assumed when an upstream names none.
pub const DNS_PORT: u16 = 53;

/// One upstream resolver: `IP`, `IP:port` or `[IPv6]:port` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, DNS_PORT)));
        }
        text.parse::<SocketAddr>()
            .map(Upstream)
            .map_err(|_| format!("invalid upstream {text:?}: expected IP, IP:port or [IPv6]:port"))
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Upstream {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Whether `domain` can be a cluster domain: dot-separated labels of letters, digits and
/// hyphens, 1-63 characters each, 253 in all.
pub fn valid_domain(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Defaults, one function per field so serde and `Default` agree.
pub mod defaults {
    use super::*;

    pub(crate) fn enabled() -> bool {
        true
    }
    pub(crate) fn cluster_domain() -> String {
        "cluster.local".to_string()
    }
    pub(crate) fn resolv_conf() -> PathBuf {
        PathBuf::from("/etc/resolv.conf")
    }
    pub(crate) fn forward_timeout() -> Duration {
        Duration::from_secs(4)
    }
    pub(crate) fn max_forwards_per_pod() -> u32 {
        // Pods resolve in bursts (A + AAAA per name, times the search list); 64 in flight
        // covers that many times over while bounding buffers to a few MiB per pod.
        64
    }
    pub(crate) fn max_tcp_connections_per_pod() -> u32 {
        32
    }
    pub(crate) fn learned_ttl_min() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn learned_ttl_max() -> Duration {
        Duration::from_secs(3600)
    }
    pub(crate) fn max_learned_per_pod() -> u32 {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_take_ip_or_ip_and_port() {
        let cases = [
            ("10.0.0.10", Some("10.0.0.10:53")),
            ("10.0.0.10:5353", Some("10.0.0.10:5353")),
            ("fd00::10", Some("[fd00::10]:53")),
            ("[fd00::10]:5353", Some("[fd00::10]:5353")),
            ("dns.example", None),
            ("10.0.0.10:99999", None),
        ];
        for (text, expected) in cases {
            let parsed = text.parse::<Upstream>().ok().map(|u| u.to_string());
            assert_eq!(parsed.as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn resolv_conf_nameservers_become_upstreams() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n",
        )
        .expect("write");
        let config = DnsConfig {
            resolv_conf: path.clone(),
            ..DnsConfig::default()
        };
        let upstreams: Vec<String> = config
            .resolved_upstreams()
            .expect("upstreams")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(upstreams, ["10.96.0.10:53", "[fd00::a]:53"]);

        std::fs::write(&path, "search example.com\n").expect("write");
        let error = config.resolved_upstreams().expect_err("no nameserver");
        assert!(error.to_string().contains("no nameserver"), "{error}");
    }

    #[test]
    fn cluster_domains_are_checked() {
        for good in ["cluster.local", "cluster.local.", "k8s", "a-b.example"] {
            assert!(valid_domain(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "cluster..local",
            "-a.local",
            "a_b.local",
            "clu ster",
        ] {
            assert!(!valid_domain(bad), "{bad}");
        }
    }
}
