//! Checks of the agent section that need no other part of the config: names, addresses,
//! durations and numeric bounds.

use super::super::locate::FieldPath;
use super::super::problem::{Problems, SemanticError};
use super::{AgentConfig, MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE};

/// A kernel congestion control name (`TCP_CA_NAME_MAX` is 16 with the NUL): whether it exists
/// is checked when the agent starts (`socket::check_congestion_control`).
fn valid_congestion_control(algorithm: &str) -> bool {
    (1..16).contains(&algorithm.len())
        && algorithm
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

/// A bounded number: section, field, value, smallest and largest allowed.
type Range = (&'static str, &'static str, u32, u32, u32);

impl AgentConfig {
    /// Checks what this section can check on its own (pods are checked against the workloads in
    /// `local`), recording problems under `path` (the `agent` key).
    pub(crate) fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if crate::spiffe::Identity::new(&self.trust_domain, "namespace", "account").is_err() {
            problems.push(
                path.key("trustDomain"),
                SemanticError::IdentityPart(self.trust_domain.clone()),
            );
        }
        self.check_ca_pair(path, problems);
        self.check_control_plane_addresses(path, problems);
        self.check_single_fields(path, problems);
        self.check_durations(path, problems);
        self.check_ranges(path, problems);
        self.check_inbound_limits(path, problems);
    }

    /// Each `inboundLimits[]` rule must limit something, with numbers that can be enforced.
    fn check_inbound_limits(&self, path: &FieldPath, problems: &mut Problems) {
        use crate::state::inbound_limits::MAX_CONNECTIONS_PER_SECOND;
        for (index, limit) in self.inbound_limits.iter().enumerate() {
            let at = path.key("inboundLimits").index(index);
            if limit.namespace.as_deref() == Some("") {
                problems.push(at.key("namespace"), SemanticError::Empty);
            }
            let per_source = &limit.per_source;
            let at = at.key("perSource");
            if per_source.max_connections.is_none() && per_source.connections_per_second.is_none() {
                problems.push(at.clone(), SemanticError::NoInboundLimit);
            }
            let at_least_one = [
                ("maxConnections", per_source.max_connections),
                ("burst", per_source.burst),
            ];
            for (field, value) in at_least_one {
                if value == Some(0) {
                    let invalid = SemanticError::OutOfRange {
                        value: 0,
                        min: 1,
                        max: u32::MAX.into(),
                    };
                    problems.push(at.key(field), invalid);
                }
            }
            match per_source.connections_per_second {
                Some(rate) if !(rate > 0.0 && rate <= MAX_CONNECTIONS_PER_SECOND) => {
                    let invalid = SemanticError::Rate(rate.to_string());
                    problems.push(at.key("connectionsPerSecond"), invalid);
                }
                None if per_source.burst.is_some() => {
                    problems.push(at.key("burst"), SemanticError::BurstWithoutRate);
                }
                _ => {}
            }
        }
    }

    fn check_ca_pair(&self, path: &FieldPath, problems: &mut Problems) {
        let ca = path.key("ca");
        match (&self.ca.cert_file, &self.ca.key_file) {
            (Some(_), None) => problems.push(
                ca.key("certFile"),
                SemanticError::CaPairIncomplete {
                    present: "certFile",
                    missing: "keyFile",
                },
            ),
            (None, Some(_)) => problems.push(
                ca.key("keyFile"),
                SemanticError::CaPairIncomplete {
                    present: "keyFile",
                    missing: "certFile",
                },
            ),
            _ => {}
        }
    }

    fn check_control_plane_addresses(&self, path: &FieldPath, problems: &mut Problems) {
        for (section, address) in [("xds", &self.xds.address), ("ca", &self.ca.address)] {
            if let Some(address) = address {
                if let Err(reason) = address.parse::<crate::net::HttpsAddress>() {
                    problems.push(
                        path.key(section).key("address"),
                        SemanticError::ControlPlaneAddress {
                            address: address.clone(),
                            reason,
                        },
                    );
                }
            }
        }
    }

    fn check_single_fields(&self, path: &FieldPath, problems: &mut Problems) {
        if !super::super::dns::valid_domain(&self.dns.cluster_domain) {
            problems.push(
                path.key("dns").key("clusterDomain"),
                SemanticError::DnsName(self.dns.cluster_domain.clone()),
            );
        }
        if self.xds.max_message_size == 0 {
            problems.push(
                path.key("xds").key("maxMessageSize"),
                SemanticError::ZeroSize,
            );
        }
        if !self.listen.admin.ip().is_loopback() {
            problems.push(
                path.key("listen").key("admin"),
                SemanticError::AdminNotLoopback(self.listen.admin),
            );
        }
        if self.proxy.hbone_port == 0 {
            problems.push(path.key("proxy").key("hbonePort"), SemanticError::PortZero);
        }
        if let Some(algorithm) = &self.proxy.congestion_control {
            if !valid_congestion_control(algorithm) {
                problems.push(
                    path.key("proxy").key("congestionControl"),
                    SemanticError::CongestionControl(algorithm.clone()),
                );
            }
        }
    }

    /// Durations where 0 would break things: a zero keepalive timeout closes every HBONE
    /// connection, a zero interval or backoff cap spins, a zero connect timeout fails every
    /// connect, a zero certificate lifetime gives expired certificates.
    fn check_durations(&self, path: &FieldPath, problems: &mut Problems) {
        let durations = [
            (Some("proxy"), "connectTimeout", self.proxy.connect_timeout),
            (
                Some("proxy"),
                "keepaliveInterval",
                self.proxy.keepalive_interval,
            ),
            (
                Some("proxy"),
                "keepaliveTimeout",
                self.proxy.keepalive_timeout,
            ),
            (
                Some("proxy"),
                "handshakeTimeout",
                self.proxy.handshake_timeout,
            ),
            (
                Some("proxy"),
                "connectionIdleTimeout",
                self.proxy.connection_idle_timeout,
            ),
            (
                Some("proxy"),
                "connectResponseTimeout",
                self.proxy.connect_response_timeout,
            ),
            (Some("xds"), "reconnectMax", self.xds.reconnect_max),
            (Some("xds"), "connectTimeout", self.xds.connect_timeout),
            (Some("zds"), "reconnectMax", self.zds.reconnect_max),
            (Some("dns"), "forwardTimeout", self.dns.forward_timeout),
            (Some("dns"), "learnedTtlMin", self.dns.learned_ttl_min),
            (Some("dns"), "learnedTtlMax", self.dns.learned_ttl_max),
            (Some("ca"), "workloadCertTtl", self.ca.workload_cert_ttl),
            (Some("istio"), "certificateTtl", self.istio.certificate_ttl),
            (None, "reloadInterval", self.reload_interval),
        ];
        for (section, field, value) in durations {
            if value.is_zero() {
                let at = match section {
                    Some(section) => path.key(section).key(field),
                    None => path.key(field),
                };
                problems.push(at, SemanticError::ZeroDuration);
            }
        }
    }

    /// Numbers whose bounds come from HTTP/2 or from what one peer may make the agent hold.
    fn check_ranges(&self, path: &FieldPath, problems: &mut Problems) {
        let ranges = self.proxy_ranges().into_iter().chain(self.limit_ranges());
        for (section, field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                let invalid = SemanticError::OutOfRange {
                    value: value.into(),
                    min: min.into(),
                    max: max.into(),
                };
                problems.push(path.key(section).key(field), invalid);
            }
        }
    }

    // HTTP/2 bounds (RFC 9113 §6.5.2); h2 would panic on a frame size outside them. Streams
    // and header blocks are bounded above too: they size what one peer can make the agent
    // hold (see `ProxyConfig`).
    fn proxy_ranges(&self) -> [Range; 7] {
        [
            (
                "proxy",
                "frameSize",
                self.proxy.frame_size,
                16_384,
                16_777_215,
            ),
            (
                "proxy",
                "streamWindow",
                self.proxy.stream_window,
                1,
                2_147_483_647,
            ),
            (
                "proxy",
                "connectionWindow",
                self.proxy.connection_window,
                1,
                2_147_483_647,
            ),
            (
                "proxy",
                "maxConcurrentStreams",
                self.proxy.max_concurrent_streams,
                1,
                MAX_CONCURRENT_STREAMS,
            ),
            (
                "proxy",
                "maxHeaderListSize",
                self.proxy.max_header_list_size,
                1024,
                MAX_HEADER_LIST_SIZE,
            ),
            (
                "proxy",
                "maxUnauthenticatedPerPod",
                self.proxy.max_unauthenticated_per_pod,
                1,
                u32::MAX,
            ),
            (
                "proxy",
                "maxUnauthenticatedPerSource",
                self.proxy.max_unauthenticated_per_source,
                1,
                u32::MAX,
            ),
        ]
    }

    fn limit_ranges(&self) -> [Range; 6] {
        [
            (
                "pool",
                "maxStreamsPerConnection",
                self.pool.max_streams_per_connection,
                1,
                u32::MAX,
            ),
            ("pool", "spreadAbove", self.pool.spread_above, 1, u32::MAX),
            (
                "dns",
                "maxForwardsPerPod",
                self.dns.max_forwards_per_pod,
                1,
                65_535,
            ),
            (
                "dns",
                "maxTcpConnectionsPerPod",
                self.dns.max_tcp_connections_per_pod,
                1,
                65_535,
            ),
            (
                "dns",
                "maxLearnedPerPod",
                self.dns.max_learned_per_pod,
                1,
                1_000_000,
            ),
            (
                "pool",
                "spreadConnections",
                self.pool.spread_connections.unwrap_or(1),
                1,
                u32::MAX,
            ),
        ]
    }
}
