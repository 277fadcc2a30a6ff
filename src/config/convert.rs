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
use super::problem::{Problems, SemanticError};
use crate::net::NetworkAddress;
use crate::spiffe::Identity;
use crate::state::rules::{
    check_service_key, derived_uid, or_default, DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT,
};
use crate::state::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    Policy, Service, TunnelProtocol, Workload,
};

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

fn cluster_id(raw: &LocalWorkload) -> &str {
    or_default(&raw.cluster_id, DEFAULT_CLUSTER_ID)
}

/// The uid as written, else the one Istio would give this pod.
fn uid(raw: &LocalWorkload) -> String {
    if raw.uid.is_empty() {
        derived_uid(cluster_id(raw), &raw.namespace, &raw.name)
    } else {
        raw.uid.clone()
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
            problems.push(
                path.key(field),
                SemanticError::IdentityPart(part.to_string()),
            );
        }
    }
    if raw.uid.is_empty() && raw.name.is_empty() {
        problems.push(path.key("name"), SemanticError::Unnamed);
    }
    let identity = Identity::new(trust_domain, &raw.namespace, service_account).ok();
    let workload_ips = ips(&path.key("workloadIps"), &raw.workload_ips, problems);
    if !agent.node.is_empty() && raw.node == agent.node && raw.workload_ips.is_empty() {
        problems.push(
            path.key("workloadIps"),
            SemanticError::LocalWithoutIps(raw.node.clone()),
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
        if let Err(error) = check_service_key(key) {
            problems.push_key(key_path.clone(), error.into());
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
            Err(_) => problems.push(path.index(index), SemanticError::Ip(text.clone())),
        }
    }
    parsed
}

/// Service ports must be real; a target port of 0 means "the endpoint's own mapping".
fn port_map(path: &FieldPath, raw: &PortMap, problems: &mut Problems) -> BTreeMap<u16, u16> {
    if raw.contains_key(&Port(0)) {
        problems.push_key(path.key("0"), SemanticError::PortZero);
    }
    raw.iter().map(|(from, to)| (from.0, to.0)).collect()
}

fn gateway_address(
    path: &FieldPath,
    raw: &LocalGateway,
    problems: &mut Problems,
) -> Option<GatewayAddress> {
    if raw.hbone_mtls_port == 0 {
        problems.push(path.key("hboneMtlsPort"), SemanticError::PortZero);
    }
    let destination = match raw.destination.parse::<GatewayDestination>() {
        Ok(destination) => destination,
        Err(error) => {
            problems.push(path.key("destination"), error.into());
            return None;
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
                SemanticError::DuplicateUid {
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
                    SemanticError::AddressClaimed {
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
            problems.push(path.key(field), SemanticError::Empty);
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
                SemanticError::DuplicateService {
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
                    SemanticError::DuplicateVip {
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
                problems.push(policy_path.key(field), SemanticError::Empty);
            }
        }
        let key = policy.key();
        if let Some(first) = keys.get(&key) {
            problems.push(
                policy_path.key("name"),
                SemanticError::DuplicatePolicy {
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
        problems.push(path.clone(), SemanticError::NodeMissing);
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
                SemanticError::UnknownPodWorkload(pod.workload.clone()),
            ),
            Some(raw) if !agent.node.is_empty() && raw.node != agent.node => problems.push(
                pod_path.key("workload"),
                SemanticError::PodNotLocal {
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
                    SemanticError::DuplicatePod {
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
