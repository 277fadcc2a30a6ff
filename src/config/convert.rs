//! Conversion of the file into the model, with every cross-field check (layer L1, part of
//! `config`).
//!
//! [`convert`] checks identities, addresses, duplicates and references, and collects every
//! problem instead of stopping at the first, each tied to the [`FieldPath`] it is about; `mod.rs`
//! then turns paths into lines and columns.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::agent::AgentConfig;
use super::local::{
    LocalApplicationTunnel, LocalFile, LocalGateway, LocalHealth, LocalProtocol, LocalService,
    LocalTunnelProtocol, LocalWorkload, NetworkMode, Port, PortMap,
};
use super::locate::FieldPath;
use crate::net::{NetworkAddress, NetworkAddressError};
use crate::spiffe::{Identity, IdentityError};
use crate::state::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    Policy, Service, TunnelProtocol, Workload,
};

/// Istio's default cluster id, used in derived uids and as the workload's `clusterId`.
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Istio's default service account.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A semantic problem in the file; its `Display` is the message users read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A DNS domain that is not dot-separated labels of letters, digits and hyphens.
    #[error("invalid DNS domain {0:?}: expected labels of a-z, 0-9 and '-' separated by dots")]
    DnsName(String),
    /// A string that should be an IP address is not one.
    #[error("invalid IP address {0:?}")]
    Ip(String),
    /// A `network/IP` string that is malformed.
    #[error("invalid network address: {0}")]
    NetworkAddress(#[from] NetworkAddressError),
    /// A waypoint or gateway destination that is neither `network/IP` nor `namespace/hostname`.
    #[error("invalid destination {0:?}: expected \"network/IP\" or \"namespace/hostname\"")]
    Destination(String),
    /// A SPIFFE identity string that does not parse.
    #[error("invalid identity: {0}")]
    Identity(#[from] IdentityError),
    /// One part of a workload's identity (trust domain, namespace, service account) is invalid.
    #[error("{0:?} cannot be part of a SPIFFE identity (allowed: A-Z a-z 0-9 . - _, at most 253)")]
    IdentityPart(String),
    /// Two workloads share a uid, the key of the model.
    #[error("duplicate uid {uid:?} (also used by {first})")]
    DuplicateUid {
        /// The uid.
        uid: String,
        /// Where it was first used.
        first: FieldPath,
    },
    /// Two workloads in one network claim one IP, so traffic to it would be ambiguous.
    #[error("address {address} is already claimed by {first}")]
    AddressClaimed {
        /// The `network/IP`.
        address: NetworkAddress,
        /// The workload that claimed it first.
        first: FieldPath,
    },
    /// A workload of this node without an address cannot be captured or reached.
    #[error("workload runs on this node ({0:?}) but has no workloadIps")]
    LocalWithoutIps(String),
    /// A key of a workload's `services` map that is not `namespace/hostname`.
    #[error("service reference {0:?} is not \"namespace/hostname\"")]
    ServiceReference(String),
    /// Port 0 where a real port is needed.
    #[error("port 0 is not a usable port here")]
    PortZero,
    /// A number outside the range the setting allows.
    #[error("{value} is out of range ({min}..={max})")]
    OutOfRange {
        /// The value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A required string is empty.
    #[error("must not be empty")]
    Empty,
    /// A workload with neither `uid` nor `name`: nothing could refer to it.
    #[error("a workload needs a uid or a name")]
    Unnamed,
    /// Two services share `namespace/hostname`.
    #[error("duplicate service {key:?} (also defined by {first})")]
    DuplicateService {
        /// `namespace/hostname`.
        key: String,
        /// Where it was first defined.
        first: FieldPath,
    },
    /// Two services (or one twice) claim one VIP.
    #[error("VIP {vip} is already claimed by {first}")]
    DuplicateVip {
        /// The VIP.
        vip: NetworkAddress,
        /// Where it was first claimed.
        first: FieldPath,
    },
    /// Two policies share `namespace/name`.
    #[error("duplicate policy {key:?} (also defined by {first})")]
    DuplicatePolicy {
        /// `namespace/name`.
        key: String,
        /// Where it was first defined.
        first: FieldPath,
    },
    /// A pod entry names a workload that is not in the file.
    #[error("no workload has uid or namespace/name {0:?}")]
    UnknownPodWorkload(String),
    /// A pod entry names a workload that runs on another node.
    #[error("workload {workload:?} runs on node {node:?}, not on this node {agent_node:?}")]
    PodNotLocal {
        /// The pod's workload reference.
        workload: String,
        /// The workload's node.
        node: String,
        /// This agent's node.
        agent_node: String,
    },
    /// Two pod entries for one workload or one network namespace.
    #[error("duplicate pod entry {value:?} (also listed by {first})")]
    DuplicatePod {
        /// The repeated workload or netns.
        value: String,
        /// The first entry.
        first: FieldPath,
    },
    /// Pods are listed, but without a node name no workload can be matched to this node.
    #[error("pods are listed but the node name is empty (set agent.node or --node)")]
    NodeMissing,
    /// Half of a CA key pair.
    #[error("{present} is set but {missing} is not; both are needed")]
    CaPairIncomplete {
        /// The field that is set.
        present: &'static str,
        /// The field that is missing.
        missing: &'static str,
    },
    /// The admin API is unauthenticated, so it must not be reachable from the network.
    #[error("admin address {0} is not a loopback address")]
    AdminNotLoopback(std::net::SocketAddr),
    /// An istiod (xDS or CA) address that cannot be used.
    #[error("control plane address {address:?}: {reason}")]
    ControlPlaneAddress {
        /// The address as written.
        address: String,
        /// What is wrong with it.
        reason: crate::net::HttpsAddressError,
    },
    /// A size limit of zero would refuse everything.
    #[error("must be greater than 0")]
    ZeroSize,
    /// A duration of zero that breaks what it times (a zero keepalive timeout closes every
    /// HBONE connection; a zero interval spins).
    #[error("must be longer than 0s")]
    ZeroDuration,
}

/// A problem and the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field.
    pub path: FieldPath,
    /// The problem is the mapping key at the end of `path`, not its value.
    pub at_key: bool,
    /// What is wrong.
    pub invalid: Invalid,
}

/// Problems collected during conversion, in the order found.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records `invalid` at `path`.
    pub fn push(&mut self, path: FieldPath, invalid: Invalid) {
        self.0.push(Problem {
            path,
            at_key: false,
            invalid,
        });
    }

    /// Records `invalid` about the mapping key at the end of `path`.
    pub fn push_key(&mut self, path: FieldPath, invalid: Invalid) {
        self.0.push(Problem {
            path,
            at_key: true,
            invalid,
        });
    }
}

/// The model converted from a file, and every problem found on the way. The model parts are
/// only meaningful when there are no problems.
#[derive(Debug, Default)]
pub struct Converted {
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Services.
    pub services: Vec<Service>,
    /// Policies.
    pub policies: Vec<Policy>,
}

/// Converts and checks the mesh part of `file` (the agent section must already carry the
/// command-line overrides).
pub fn convert(file: &LocalFile, problems: &mut Problems) -> Converted {
    let root = FieldPath::default();
    let workloads_path = root.key("workloads");
    let mut converted = Converted::default();
    for (index, raw) in file.workloads.iter().enumerate() {
        let path = workloads_path.index(index);
        if let Some(workload) = workload(&path, raw, &file.agent, problems) {
            converted.workloads.push(workload);
        }
    }
    check_workload_uniqueness(file, &workloads_path, problems);
    for (index, raw) in file.services.iter().enumerate() {
        converted
            .services
            .push(service(&root.key("services").index(index), raw, problems));
    }
    check_service_uniqueness(&converted.services, &root.key("services"), problems);
    add_service_endpoints(
        file,
        &mut converted.workloads,
        &root.key("services"),
        problems,
    );
    check_policies(&file.policies, &root.key("policies"), problems);
    converted.policies = file.policies.clone();
    check_pods(file, &root.key("agent").key("pods"), problems);
    converted
}

/// The uid Istio would give this pod: `<clusterId>//Pod/<namespace>/<name>`.
fn derived_uid(raw: &LocalWorkload) -> String {
    format!("{}//Pod/{}/{}", cluster_id(raw), raw.namespace, raw.name)
}

fn cluster_id(raw: &LocalWorkload) -> &str {
    if raw.cluster_id.is_empty() {
        DEFAULT_CLUSTER_ID
    } else {
        &raw.cluster_id
    }
}

fn uid(raw: &LocalWorkload) -> String {
    if raw.uid.is_empty() {
        derived_uid(raw)
    } else {
        raw.uid.clone()
    }
}

fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() {
        default
    } else {
        value
    }
}

/// Whether `part` may be a component of a SPIFFE identity. `Identity::new` is the one place
/// that knows the rule, so ask it with known-good other parts.
fn identity_part_ok(part: &str) -> bool {
    Identity::new(part, "namespace", "account").is_ok()
}

fn workload(
    path: &FieldPath,
    raw: &LocalWorkload,
    agent: &AgentConfig,
    problems: &mut Problems,
) -> Option<Workload> {
    let trust_domain = or_default(&raw.trust_domain, &agent.trust_domain);
    let service_account = or_default(&raw.service_account, DEFAULT_SERVICE_ACCOUNT);
    for (field, part) in [
        ("trustDomain", trust_domain),
        ("namespace", raw.namespace.as_str()),
        ("serviceAccount", service_account),
    ] {
        if !identity_part_ok(part) {
            problems.push(path.key(field), Invalid::IdentityPart(part.to_string()));
        }
    }
    if raw.uid.is_empty() && raw.name.is_empty() {
        problems.push(path.key("name"), Invalid::Unnamed);
    }
    let identity = Identity::new(trust_domain, &raw.namespace, service_account).ok();
    let workload_ips = ips(&path.key("workloadIps"), &raw.workload_ips, problems);
    if !agent.node.is_empty() && raw.node == agent.node && raw.workload_ips.is_empty() {
        problems.push(
            path.key("workloadIps"),
            Invalid::LocalWithoutIps(raw.node.clone()),
        );
    }
    let waypoint = raw
        .waypoint
        .as_ref()
        .and_then(|gateway| gateway_address(&path.key("waypoint"), gateway, problems));
    if let Some(gateway) = &raw.network_gateway {
        gateway_address(&path.key("networkGateway"), gateway, problems);
    }
    let mut services = BTreeMap::new();
    for (key, ports) in &raw.services {
        let key_path = path.key("services").key(key.as_str());
        if !matches!(key.split_once('/'), Some((namespace, host)) if !namespace.is_empty() && !host.is_empty())
        {
            problems.push_key(key_path.clone(), Invalid::ServiceReference(key.clone()));
        }
        services.insert(key.clone(), port_map(&key_path, ports, problems));
    }
    Some(Workload {
        uid: uid(raw),
        name: raw.name.clone(),
        namespace: raw.namespace.clone(),
        service_account: service_account.to_string(),
        trust_domain: trust_domain.to_string(),
        identity: identity?,
        workload_ips,
        protocol: match raw.protocol {
            LocalProtocol::Tcp => TunnelProtocol::Tcp,
            LocalProtocol::Hbone => TunnelProtocol::Hbone,
        },
        node: raw.node.clone(),
        network: raw.network.clone(),
        hostname: raw.hostname.clone(),
        waypoint,
        application_tunnel: raw.application_tunnel.as_ref().map(application_tunnel),
        services,
        labels: raw.labels.clone(),
        canonical_name: raw.canonical_name.clone(),
        canonical_revision: raw.canonical_revision.clone(),
        workload_name: raw.workload_name.clone(),
        workload_type: raw.workload_type.clone(),
        cluster_id: cluster_id(raw).to_string(),
        authorization_policies: raw.authorization_policies.clone(),
        status: match raw.status {
            LocalHealth::Healthy => HealthStatus::Healthy,
            LocalHealth::Unhealthy => HealthStatus::Unhealthy,
        },
    })
}

fn application_tunnel(raw: &LocalApplicationTunnel) -> ApplicationTunnel {
    ApplicationTunnel {
        protocol: match raw.protocol {
            LocalTunnelProtocol::None => ApplicationTunnelProtocol::None,
            LocalTunnelProtocol::Proxy => ApplicationTunnelProtocol::Proxy,
        },
        port: raw.port.filter(|port| *port != 0),
    }
}

fn ips(path: &FieldPath, raw: &[String], problems: &mut Problems) -> Vec<IpAddr> {
    let mut parsed = Vec::with_capacity(raw.len());
    for (index, text) in raw.iter().enumerate() {
        match text.parse() {
            Ok(ip) => parsed.push(ip),
            Err(_) => problems.push(path.index(index), Invalid::Ip(text.clone())),
        }
    }
    parsed
}

/// Service ports must be real; a target port of 0 means "the endpoint's own mapping".
fn port_map(path: &FieldPath, raw: &PortMap, problems: &mut Problems) -> BTreeMap<u16, u16> {
    if raw.contains_key(&Port(0)) {
        problems.push_key(path.key("0"), Invalid::PortZero);
    }
    raw.iter().map(|(from, to)| (from.0, to.0)).collect()
}

fn gateway_address(
    path: &FieldPath,
    raw: &LocalGateway,
    problems: &mut Problems,
) -> Option<GatewayAddress> {
    if raw.hbone_mtls_port == 0 {
        problems.push(path.key("hboneMtlsPort"), Invalid::PortZero);
    }
    let destination = if let Ok(address) = raw.destination.parse::<NetworkAddress>() {
        GatewayDestination::Address(address)
    } else {
        match raw.destination.split_once('/') {
            Some((namespace, hostname))
                if !namespace.is_empty()
                    && !hostname.is_empty()
                    && !hostname.contains('/')
                    && hostname.parse::<IpAddr>().is_err() =>
            {
                GatewayDestination::Hostname {
                    namespace: namespace.to_string(),
                    hostname: hostname.to_string(),
                }
            }
            _ => {
                problems.push(
                    path.key("destination"),
                    Invalid::Destination(raw.destination.clone()),
                );
                return None;
            }
        }
    };
    Some(GatewayAddress {
        destination,
        hbone_mtls_port: raw.hbone_mtls_port,
    })
}

/// Unique uids, and unique addresses per network (host-network workloads share the node's IPs,
/// so they are exempt, as Istio does not index them by IP).
fn check_workload_uniqueness(file: &LocalFile, path: &FieldPath, problems: &mut Problems) {
    let mut uids: HashMap<String, FieldPath> = HashMap::new();
    let mut addresses: HashMap<NetworkAddress, FieldPath> = HashMap::new();
    for (index, raw) in file.workloads.iter().enumerate() {
        let workload_path = path.index(index);
        let uid = uid(raw);
        if let Some(first) = uids.get(&uid) {
            problems.push(
                workload_path.key("uid"),
                Invalid::DuplicateUid {
                    uid,
                    first: first.clone(),
                },
            );
        } else {
            uids.insert(uid, workload_path.clone());
        }
        if raw.network_mode == NetworkMode::HostNetwork {
            continue;
        }
        for (ip_index, text) in raw.workload_ips.iter().enumerate() {
            let Ok(ip) = text.parse() else { continue };
            let address = NetworkAddress {
                network: raw.network.clone(),
                ip,
            };
            match addresses.get(&address) {
                Some(first) if *first != workload_path => problems.push(
                    workload_path.key("workloadIps").index(ip_index),
                    Invalid::AddressClaimed {
                        address,
                        first: first.clone(),
                    },
                ),
                Some(_) => {}
                None => {
                    addresses.insert(address, workload_path.clone());
                }
            }
        }
    }
}

fn service(path: &FieldPath, raw: &LocalService, problems: &mut Problems) -> Service {
    for (field, value) in [
        ("name", &raw.name),
        ("namespace", &raw.namespace),
        ("hostname", &raw.hostname),
    ] {
        if value.is_empty() {
            problems.push(path.key(field), Invalid::Empty);
        }
    }
    let mut vips = Vec::with_capacity(raw.vips.len());
    for (index, text) in raw.vips.iter().enumerate() {
        match text.parse::<NetworkAddress>() {
            Ok(vip) => vips.push(vip),
            Err(error) => problems.push(path.key("vips").index(index), error.into()),
        }
    }
    let mut subject_alt_names = Vec::with_capacity(raw.subject_alt_names.len());
    for (index, text) in raw.subject_alt_names.iter().enumerate() {
        match text.parse::<Identity>() {
            Ok(identity) => subject_alt_names.push(identity),
            Err(error) => problems.push(path.key("subjectAltNames").index(index), error.into()),
        }
    }
    Service {
        name: raw.name.clone(),
        namespace: raw.namespace.clone(),
        hostname: raw.hostname.clone(),
        vips,
        ports: port_map(&path.key("ports"), &raw.ports, problems),
        subject_alt_names,
        waypoint: raw
            .waypoint
            .as_ref()
            .and_then(|gateway| gateway_address(&path.key("waypoint"), gateway, problems)),
    }
}

/// A service's `endpoints` (ztunnel's local config may list a service's backends there
/// instead of, or beside, the workloads' own `services`): each makes its workload back the
/// service. A workload's own entry for the service wins, as ztunnel inserts workloads' endpoints
/// after the services'. An endpoint naming no workload of the file is kept out, as ztunnel never
/// picks it either.
fn add_service_endpoints(
    file: &LocalFile,
    workloads: &mut [Workload],
    path: &FieldPath,
    problems: &mut Problems,
) {
    for (index, raw) in file.services.iter().enumerate() {
        let key = format!("{}/{}", raw.namespace, raw.hostname);
        for (name, endpoint) in &raw.endpoints {
            let ports_path = path
                .index(index)
                .key("endpoints")
                .key(name.as_str())
                .key("port");
            let ports = port_map(&ports_path, &endpoint.port, problems);
            let Some(workload) = workloads
                .iter_mut()
                .find(|workload| workload.uid == endpoint.workload_uid)
            else {
                continue;
            };
            workload.services.entry(key.clone()).or_insert(ports);
        }
    }
}

/// Unique `namespace/hostname` and unique VIPs. Works on converted services, whose `vips` only
/// hold the addresses that parsed; the index into the file is recovered by matching text.
fn check_service_uniqueness(services: &[Service], path: &FieldPath, problems: &mut Problems) {
    let mut keys: HashMap<String, FieldPath> = HashMap::new();
    let mut vips: HashMap<NetworkAddress, FieldPath> = HashMap::new();
    for (index, service) in services.iter().enumerate() {
        let service_path = path.index(index);
        let key = service.key();
        if let Some(first) = keys.get(&key) {
            problems.push(
                service_path.key("hostname"),
                Invalid::DuplicateService {
                    key,
                    first: first.clone(),
                },
            );
        } else {
            keys.insert(key, service_path.clone());
        }
        for (vip_index, vip) in service.vips.iter().enumerate() {
            let vip_path = service_path.key("vips").index(vip_index);
            if let Some(first) = vips.get(vip) {
                problems.push(
                    vip_path,
                    Invalid::DuplicateVip {
                        vip: vip.clone(),
                        first: first.clone(),
                    },
                );
            } else {
                vips.insert(vip.clone(), vip_path);
            }
        }
    }
}

fn check_policies(policies: &[Policy], path: &FieldPath, problems: &mut Problems) {
    let mut keys: HashMap<String, FieldPath> = HashMap::new();
    for (index, policy) in policies.iter().enumerate() {
        let policy_path = path.index(index);
        for (field, value) in [("name", &policy.name), ("namespace", &policy.namespace)] {
            if value.is_empty() {
                problems.push(policy_path.key(field), Invalid::Empty);
            }
        }
        let key = policy.key();
        if let Some(first) = keys.get(&key) {
            problems.push(
                policy_path.key("name"),
                Invalid::DuplicatePolicy {
                    key,
                    first: first.clone(),
                },
            );
        } else {
            keys.insert(key, policy_path);
        }
    }
}

/// Each pod names a distinct workload of this node and a distinct netns.
fn check_pods(file: &LocalFile, path: &FieldPath, problems: &mut Problems) {
    let agent = &file.agent;
    if agent.pods.is_empty() {
        return;
    }
    if agent.node.is_empty() {
        problems.push(path.clone(), Invalid::NodeMissing);
    }
    let mut seen: HashMap<String, FieldPath> = HashMap::new();
    for (index, pod) in agent.pods.iter().enumerate() {
        let pod_path = path.index(index);
        let found = file.workloads.iter().find(|raw| {
            uid(raw) == pod.workload || format!("{}/{}", raw.namespace, raw.name) == pod.workload
        });
        match found {
            None => problems.push(
                pod_path.key("workload"),
                Invalid::UnknownPodWorkload(pod.workload.clone()),
            ),
            Some(raw) if !agent.node.is_empty() && raw.node != agent.node => problems.push(
                pod_path.key("workload"),
                Invalid::PodNotLocal {
                    workload: pod.workload.clone(),
                    node: raw.node.clone(),
                    agent_node: agent.node.clone(),
                },
            ),
            Some(_) => {}
        }
        // `ns/name` and the uid name one workload: compare what they resolve to.
        let workload_key = found.map(uid).unwrap_or_else(|| pod.workload.clone());
        let netns = pod.netns.display().to_string();
        for (field, key, written) in [
            ("workload", workload_key, pod.workload.clone()),
            ("netns", netns.clone(), netns),
        ] {
            let entry_key = format!("{field}:{key}");
            if let Some(first) = seen.get(&entry_key) {
                problems.push(
                    pod_path.key(field),
                    Invalid::DuplicatePod {
                        value: written,
                        first: first.clone(),
                    },
                );
            } else {
                seen.insert(entry_key, pod_path.clone());
            }
        }
    }
}
