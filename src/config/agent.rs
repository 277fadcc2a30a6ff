//! The agent's own configuration sections (layer L1): the `agent:` key of the config file.
//!
//! Each component receives only its section. Everything here is plain data with defaults that a
//! production node can run with; durations are written the humantime way (`5s`, `24h`).

mod check;
pub mod defaults;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

fn default_trust_domain() -> String {
    crate::state::rules::DEFAULT_TRUST_DOMAIN.to_string()
}

/// Settings of this agent, as opposed to the mesh model (workloads, services, policies).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// The node this agent runs on; workloads whose `node` equals it are served locally.
    /// May be left out of the file and given with `--node` instead.
    #[serde(default)]
    pub node: String,
    /// Trust domain of local identities; peers from another trust domain are refused.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The network this node is in (empty = default network).
    #[serde(default)]
    pub network: String,
    /// Certificate authority settings.
    #[serde(default)]
    pub ca: CaConfig,
    /// Local pods and the network namespaces they live in.
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    /// istio-cni (ZDS) as the pod source, instead of `pods`.
    #[serde(default)]
    pub zds: ZdsConfig,
    /// Data-plane settings.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// HBONE client pool settings.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Node-level listeners (admin, metrics, readiness).
    #[serde(default)]
    pub listen: ListenConfig,
    /// How pods are captured.
    #[serde(default)]
    pub capture: CaptureConfig,
    /// Authorization: zero-trust switch and Istio policy sources.
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Workload discovery from istiod (delta xDS); off unless `xds.address` is set.
    #[serde(default)]
    pub xds: XdsConfig,
    /// The DNS proxy in every captured pod.
    #[serde(default)]
    pub dns: super::dns::DnsConfig,
    /// Who this agent is toward istiod (node id, token, cluster), for xDS and the Istio CA.
    #[serde(default)]
    pub istio: IstioConfig,
    /// Istio's `meshConfig.outboundTrafficPolicy`: `mode` mesh-wide (`ALLOW_ANY` by default,
    /// or `REGISTRY_ONLY`), and `namespaces` with a mode per namespace.
    #[serde(default)]
    pub outbound_traffic_policy: crate::state::egress::OutboundTrafficPolicy,
    /// Limits per source on inbound connections, per destination workload (selected by
    /// namespace and labels; the first rule that selects a workload applies). Off when empty.
    #[serde(default)]
    pub inbound_limits: Vec<crate::state::inbound_limits::InboundLimit>,
    /// How long open connections may finish after a shutdown signal before they are cut.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    #[serde(default = "defaults::reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: String::new(),
            trust_domain: default_trust_domain(),
            network: String::new(),
            ca: CaConfig::default(),
            pods: Vec::new(),
            zds: ZdsConfig::default(),
            proxy: ProxyConfig::default(),
            pool: PoolConfig::default(),
            listen: ListenConfig::default(),
            capture: CaptureConfig::default(),
            authorization: AuthorizationConfig::default(),
            xds: XdsConfig::default(),
            dns: super::dns::DnsConfig::default(),
            istio: IstioConfig::default(),
            outbound_traffic_policy: Default::default(),
            inbound_limits: Vec::new(),
            drain_timeout: defaults::drain_timeout(),
            reload_interval: defaults::reload_interval(),
        }
    }
}

/// Largest `proxy.maxConcurrentStreams`: streams (and their handlers and buffers) one peer may
/// hold on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Largest `proxy.maxHeaderListSize`: a CONNECT needs a few hundred bytes; h2 holds a header
/// block up to this size while it arrives (CONTINUATION frames).
pub const MAX_HEADER_LIST_SIZE: u32 = 1024 * 1024;

/// Where workload certificates come from: the Istio CA when `address` is set, otherwise the
/// built-in CA (root from `certFile`/`keyFile` or the state directory).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaConfig {
    /// The Istio CA (`https://istiod.istio-system.svc:15012`); unset = built-in CA.
    #[serde(default)]
    pub address: Option<String>,
    /// Root that the Istio CA's serving certificate chains to: a PEM file, or PEM text.
    #[serde(default = "defaults::istio_root_ca")]
    pub root_ca: String,
    /// Name to verify the CA's certificate against instead of the address's host.
    #[serde(default)]
    pub alt_hostname: Option<String>,
    /// Extra gRPC headers on CA calls.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM root certificate to sign with (with `keyFile`); when unset a root is created in (and
    /// reloaded from) the state directory.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `certFile`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Lifetime of issued workload certificates; they are rotated at half-life.
    #[serde(default = "defaults::workload_cert_ttl", with = "humantime_serde")]
    pub workload_cert_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            address: None,
            root_ca: defaults::istio_root_ca(),
            alt_hostname: None,
            headers: BTreeMap::new(),
            cert_file: None,
            key_file: None,
            workload_cert_ttl: defaults::workload_cert_ttl(),
        }
    }
}

/// Delta xDS from istiod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct XdsConfig {
    /// istiod's address (`https://istiod.istio-system.svc:15012`); unset = no xDS.
    #[serde(default)]
    pub address: Option<String>,
    /// Root that istiod's serving certificate chains to: a PEM file, or PEM text.
    #[serde(default = "defaults::istio_root_ca")]
    pub root_ca: String,
    /// Name to verify istiod's certificate against instead of the address's host.
    #[serde(default)]
    pub alt_hostname: Option<String>,
    /// Extra gRPC headers on the xDS stream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Largest xDS message accepted, in bytes; a bigger one ends the stream (and is logged).
    #[serde(default = "defaults::xds_max_message_size")]
    pub max_message_size: usize,
    /// Cap of the reconnect backoff (10 ms doubling, with jitter).
    #[serde(default = "defaults::xds_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// TCP connect timeout to istiod.
    #[serde(default = "defaults::xds_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            address: None,
            root_ca: defaults::istio_root_ca(),
            alt_hostname: None,
            headers: BTreeMap::new(),
            max_message_size: defaults::xds_max_message_size(),
            reconnect_max: defaults::xds_reconnect_max(),
            connect_timeout: defaults::xds_connect_timeout(),
        }
    }
}

/// This agent's identity toward istiod, as Istio's ztunnel sends it (node id, metadata, token).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioConfig {
    /// Bearer token: a file (re-read per call) or the token itself; unset = the projected
    /// token at `/var/run/secrets/tokens/istio-token` if it exists.
    #[serde(default)]
    pub token: Option<String>,
    /// Cluster id, sent as the `clusterid` header.
    #[serde(default = "defaults::cluster_id")]
    pub cluster_id: String,
    /// The agent's own pod name (node id and metadata).
    #[serde(default)]
    pub pod_name: String,
    /// The agent's own namespace.
    #[serde(default)]
    pub pod_namespace: String,
    /// The agent pod's IP (node id; `1.1.1.1` when unknown, as Istio does).
    #[serde(default)]
    pub instance_ip: Option<IpAddr>,
    /// The agent's service account.
    #[serde(default)]
    pub service_account: String,
    /// Requested lifetime of certificates from the Istio CA.
    #[serde(default = "defaults::workload_cert_ttl", with = "humantime_serde")]
    pub certificate_ttl: Duration,
    /// Extra node metadata (Istio's `ISTIO_META_*` / `ISTIO_METAJSON_*`).
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl Default for IstioConfig {
    fn default() -> Self {
        IstioConfig {
            token: None,
            cluster_id: defaults::cluster_id(),
            pod_name: String::new(),
            pod_namespace: String::new(),
            instance_ip: None,
            service_account: String::new(),
            certificate_ttl: defaults::workload_cert_ttl(),
            metadata: BTreeMap::new(),
        }
    }
}

/// A local pod: which workload it is and where its network namespace is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodConfig {
    /// The workload's `uid`, or `namespace/name`.
    pub workload: String,
    /// Path of the pod's network namespace, e.g. `/run/netns/pod-a` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
}

/// The istio-cni hand-off (ZDS): whether pods come from istio-cni, where its socket is and how
/// eagerly to reconnect to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZdsConfig {
    /// Take pods from istio-cni; the `pods` list is then ignored.
    #[serde(default)]
    pub enabled: bool,
    /// istio-cni's SEQPACKET socket (istio's `INPOD_UDS`).
    #[serde(default = "defaults::zds_socket")]
    pub socket: PathBuf,
    /// Cap of the reconnect backoff (10 ms doubling, with jitter).
    #[serde(default = "defaults::zds_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for ZdsConfig {
    fn default() -> Self {
        ZdsConfig {
            enabled: false,
            socket: defaults::zds_socket(),
            reconnect_max: defaults::zds_reconnect_max(),
        }
    }
}

/// Data-plane settings shared by every workload proxy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Timeout for every outgoing TCP connect.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `SO_MARK` on every socket the agent creates in a pod, so capture rules skip them.
    #[serde(default = "defaults::packet_mark")]
    pub packet_mark: u32,
    /// HBONE port of peers.
    #[serde(default = "defaults::hbone_port")]
    pub hbone_port: u16,
    /// Upper bound on a CONNECT request's header block, in bytes.
    #[serde(default = "defaults::max_header_list_size")]
    pub max_header_list_size: u32,
    /// Maximum concurrent streams a peer may open on one inbound HBONE connection.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2 stream flow-control window.
    #[serde(default = "defaults::stream_window")]
    pub stream_window: u32,
    /// HTTP/2 connection flow-control window.
    #[serde(default = "defaults::connection_window")]
    pub connection_window: u32,
    /// HTTP/2 maximum frame size.
    #[serde(default = "defaults::frame_size")]
    pub frame_size: u32,
    /// Bytes the node's HBONE connections may reserve together for their receive windows and
    /// send buffers (each connection reserves twice its connection window; see
    /// `proxy::budget`). Under pressure new connections get smaller windows, never fewer
    /// than HTTP/2's default.
    #[serde(default = "defaults::memory_budget")]
    pub memory_budget: u64,
    /// Interval of HTTP/2 PINGs on idle HBONE connections.
    #[serde(default = "defaults::keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A PING not answered within this closes the connection.
    #[serde(default = "defaults::keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Inbound: time from accept to the first CONNECT stream (certificate, TLS handshake,
    /// HTTP/2 preface); outbound: time for a TLS handshake plus the HTTP/2 preface.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// An inbound HBONE connection with no open stream for this long is closed (GOAWAY).
    /// Longer than `pool.idleTimeout`, so clients normally release first. Streams have no idle
    /// timeout.
    #[serde(
        default = "defaults::connection_idle_timeout",
        with = "humantime_serde"
    )]
    pub connection_idle_timeout: Duration,
    /// How long a CONNECT waits for the peer's response (the peer connects to its app within
    /// its own `connectTimeout` first).
    #[serde(
        default = "defaults::connect_response_timeout",
        with = "humantime_serde"
    )]
    pub connect_response_timeout: Duration,
    /// Concurrent unauthenticated connections one pod may have on its three listeners
    /// together (15001, 15006, and 15008 until its TLS handshake ends); more are reset.
    #[serde(default = "defaults::max_unauthenticated_per_pod")]
    pub max_unauthenticated_per_pod: u32,
    /// Concurrent unauthenticated connections one source IP may have to this node's pods
    /// (15006, and 15008 until its TLS handshake ends); more are reset.
    #[serde(default = "defaults::max_unauthenticated_per_source")]
    pub max_unauthenticated_per_source: u32,
    /// Connect to local apps from the client's own IP (transparent + freebind), so apps see
    /// the real client address. Needs the connmark return-path rules in the pod (installed by
    /// the agent with `capture.installRules`, or by istio-cni).
    #[serde(default = "defaults::original_source")]
    pub original_source: bool,
    /// TCP congestion control of the agent's connections across the network (HBONE both
    /// ways, passthrough, DNS upstreams), e.g. `cubic`; unset, the pod namespace's default
    /// (`net.ipv4.tcp_congestion_control`, inherited from the node). Connections between the
    /// agent and the app in its pod always use cubic (`socket::Leg`). Checked at start-up.
    #[serde(default)]
    pub congestion_control: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: defaults::connect_timeout(),
            packet_mark: defaults::packet_mark(),
            hbone_port: defaults::hbone_port(),
            max_header_list_size: defaults::max_header_list_size(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            stream_window: defaults::stream_window(),
            connection_window: defaults::connection_window(),
            frame_size: defaults::frame_size(),
            memory_budget: defaults::memory_budget(),
            keepalive_interval: defaults::keepalive_interval(),
            keepalive_timeout: defaults::keepalive_timeout(),
            handshake_timeout: defaults::handshake_timeout(),
            connection_idle_timeout: defaults::connection_idle_timeout(),
            connect_response_timeout: defaults::connect_response_timeout(),
            max_unauthenticated_per_pod: defaults::max_unauthenticated_per_pod(),
            max_unauthenticated_per_source: defaults::max_unauthenticated_per_source(),
            original_source: defaults::original_source(),
            congestion_control: None,
        }
    }
}

/// HBONE client connection pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolConfig {
    /// Streams per pooled connection before another connection is opened.
    #[serde(default = "defaults::max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// A pooled connection unused for this long is released. `0s` keeps no idle connection:
    /// a connection closes as soon as its last tunnel ends (with `maxStreamsPerConnection: 1`,
    /// every tunnel gets a connection and a TLS handshake of its own).
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// When every connection to a peer already carries this many streams, the next tunnel opens
    /// another connection (up to `spreadConnections`) instead of joining them: one HTTP/2
    /// connection is driven by one task on one core, so many busy streams on it are limited
    /// to that core.
    #[serde(default = "defaults::spread_above")]
    pub spread_above: u32,
    /// How many connections per peer (and source identity) streams are spread over before
    /// they share. Unset: one per worker thread (with data-plane shards, each shard drives its
    /// own connections, so a tunnel and its HTTP/2 connection share a core). Set: at most this
    /// many for the whole node, shared by every thread; `1` turns spreading off.
    #[serde(default)]
    pub spread_connections: Option<u32>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: defaults::max_streams_per_connection(),
            idle_timeout: defaults::pool_idle_timeout(),
            spread_above: defaults::spread_above(),
            spread_connections: None,
        }
    }
}

/// Pod capture settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureConfig {
    /// Install the redirection rules (nftables) in the pods the agent captures from the config
    /// or the admin API. Turn off when something else (istio-cni) installs them.
    #[serde(default = "defaults::install_rules")]
    pub install_rules: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            install_rules: defaults::install_rules(),
        }
    }
}

/// Authorization settings; all of them apply on reload, to open connections too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Zero-trust posture: a workload no enforced ALLOW policy applies to admits nothing
    /// (Istio's default admits everything). DENY policies still come first.
    #[serde(default)]
    pub default_deny: bool,
    /// The mesh root namespace: Istio resources there without a selector apply mesh-wide.
    #[serde(default = "defaults::root_namespace")]
    pub root_namespace: String,
    /// Directories of Istio `AuthorizationPolicy` / `PeerAuthentication` YAML files (`*.yaml`,
    /// `*.yml`), relative to the config file's directory; re-read with the config file.
    #[serde(default)]
    pub policy_dirs: Vec<PathBuf>,
    /// Waypoint bypass protection (`enforce`, default true, with per-namespace and
    /// per-workload overrides).
    #[serde(default)]
    pub waypoint: crate::state::policy::WaypointEnforcement,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        AuthorizationConfig {
            default_deny: false,
            root_namespace: defaults::root_namespace(),
            policy_dirs: Vec::new(),
            waypoint: crate::state::policy::WaypointEnforcement::default(),
        }
    }
}

impl AgentConfig {
    /// The options Istio resources are translated with: the authorization section's, and the
    /// cluster domain (waypoint hostnames of `istio.io/use-waypoint`).
    pub fn istio_options(&self) -> super::istio_policy::IstioOptions {
        super::istio_policy::IstioOptions {
            cluster_domain: self.dns.cluster_domain.trim_end_matches('.').to_string(),
            ..self.authorization.istio_options()
        }
    }
}

impl AuthorizationConfig {
    /// The options `authz` evaluates with.
    pub fn options(&self) -> crate::state::policy::AuthzOptions {
        crate::state::policy::AuthzOptions {
            default_deny: self.default_deny,
        }
    }

    /// The options Istio resources are translated with.
    pub fn istio_options(&self) -> super::istio_policy::IstioOptions {
        super::istio_policy::IstioOptions {
            root_namespace: self.root_namespace.clone(),
            ..super::istio_policy::IstioOptions::default()
        }
    }
}

/// Node-level listeners in the agent's own network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// Admin API; must be a loopback address.
    #[serde(default = "defaults::admin_addr")]
    pub admin: SocketAddr,
    /// Prometheus metrics.
    #[serde(default = "defaults::metrics_addr")]
    pub metrics: SocketAddr,
    /// Readiness probe.
    #[serde(default = "defaults::readiness_addr")]
    pub readiness: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            admin: defaults::admin_addr(),
            metrics: defaults::metrics_addr(),
            readiness: defaults::readiness_addr(),
        }
    }
}
