//! istiod's resources → the model (layer L2). The only place a proto type becomes a model type.
//!
//! Pure functions, no I/O: every check a resource must pass before it may reach the state store
//! is here, each failure naming the field and what is wrong with it, so that a NACK tells the
//! operator exactly which part of which resource was refused. Fuzzed by `fuzz/xds_resource`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use prost::Message;

use crate::net::NetworkAddress;
use crate::proto::{security, workload as wl, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::spiffe::Identity;
use crate::state::policy::{
    Match, Policy, PolicyAction, PolicyScope, ServiceAccountMatch, StringMatch,
};
use crate::state::rules::{
    check_service_key, or_default, HostnameError, DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
};
use crate::state::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    Service, TunnelProtocol, Workload,
};

/// Why one resource was refused: the field (a path inside the resource) and the reason. Shown
/// in the NACK as `<resource name>: <field>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the offending field, e.g. `workload.addresses[1]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// An `istio.workload.Address` resource after conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    /// A workload, keyed by its uid.
    Workload(Box<Workload>),
    /// A service, keyed `namespace/hostname`.
    Service(Service),
}

/// Decodes and converts one Address resource named `name`; the name must be the key istiod
/// uses for it (the workload uid, or `namespace/hostname` for a service).
pub fn address_resource(
    name: &str,
    resource: Option<&prost_types::Any>,
) -> Result<AddressResource, FieldError> {
    let bytes = payload(resource, ADDRESS_TYPE)?;
    let address = wl::Address::decode(bytes).map_err(|error| {
        invalid(
            "resource",
            format!("not an istio.workload.Address: {error}"),
        )
    })?;
    match address.r#type {
        Some(wl::address::Type::Workload(raw)) => {
            let workload = Workload::try_from(raw)?;
            if workload.uid != name {
                return Err(invalid(
                    "workload.uid",
                    format!("{:?} differs from the resource name", workload.uid),
                ));
            }
            Ok(AddressResource::Workload(Box::new(workload)))
        }
        Some(wl::address::Type::Service(raw)) => {
            let service = Service::try_from(raw)?;
            if service.key() != name {
                return Err(invalid(
                    "service",
                    format!(
                        "namespace/hostname {:?} differs from the resource name",
                        service.key()
                    ),
                ));
            }
            Ok(AddressResource::Service(service))
        }
        None => Err(invalid("type", "neither a workload nor a service")),
    }
}

/// Decodes and converts one Authorization resource named `name` (`namespace/name`).
pub fn authorization_resource(
    name: &str,
    resource: Option<&prost_types::Any>,
) -> Result<Policy, FieldError> {
    let bytes = payload(resource, AUTHORIZATION_TYPE)?;
    let raw = security::Authorization::decode(bytes).map_err(|error| {
        invalid(
            "resource",
            format!("not an istio.security.Authorization: {error}"),
        )
    })?;
    let policy = Policy::try_from(raw)?;
    if policy.key() != name {
        return Err(invalid(
            "authorization",
            format!(
                "namespace/name {:?} differs from the resource name",
                policy.key()
            ),
        ));
    }
    Ok(policy)
}

fn payload<'a>(
    resource: Option<&'a prost_types::Any>,
    type_url: &str,
) -> Result<&'a [u8], FieldError> {
    let any = resource.ok_or_else(|| invalid("resource", "missing"))?;
    if any.type_url != type_url {
        return Err(invalid(
            "resource.type_url",
            format!("{:?}, expected {type_url:?}", any.type_url),
        ));
    }
    Ok(&any.value)
}

fn required(field: &str, value: String) -> Result<String, FieldError> {
    if value.is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn ip(field: &str, bytes: &[u8]) -> Result<IpAddr, FieldError> {
    if let Ok(octets) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    if let Ok(octets) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(octets)));
    }
    Err(invalid(
        field,
        format!("{} bytes is not an IPv4 or IPv6 address", bytes.len()),
    ))
}

fn port(field: &str, value: u32) -> Result<u16, FieldError> {
    u16::try_from(value).map_err(|_| invalid(field, format!("{value} is not a port")))
}

fn nonzero_port(field: &str, value: u32) -> Result<u16, FieldError> {
    match port(field, value)? {
        0 => Err(invalid(field, "must not be 0")),
        port => Ok(port),
    }
}

/// Converts a workload. Public for the fuzz target and tests.
pub fn workload(raw: wl::Workload) -> Result<Workload, FieldError> {
    let uid = required("workload.uid", raw.uid)?;
    let name = required("workload.name", raw.name)?;
    let namespace = required("workload.namespace", raw.namespace)?;
    let trust_domain = or_default(&raw.trust_domain, DEFAULT_TRUST_DOMAIN).to_string();
    let service_account = or_default(&raw.service_account, DEFAULT_SERVICE_ACCOUNT).to_string();
    let identity = Identity::new(&trust_domain, &namespace, &service_account)
        .map_err(|error| invalid("workload.service_account", error.to_string()))?;
    let workload_ips = workload_ips(&raw.addresses, raw.network_mode)?;
    let protocol = if raw.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
        TunnelProtocol::Hbone
    } else {
        // NONE, and the sidecar-era LEGACY_ISTIO_MTLS that this agent does not originate: send
        // plaintext, which a STRICT peer refuses (fails closed rather than open).
        TunnelProtocol::Tcp
    };
    let waypoint = raw
        .waypoint
        .map(|gateway| gateway_address("workload.waypoint", gateway))
        .transpose()?;
    let application_tunnel = raw.application_tunnel.map(application_tunnel).transpose()?;
    let services = workload_services(raw.services)?;
    let workload_type = wl::WorkloadType::try_from(raw.workload_type)
        .map(|kind| kind.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".to_string());
    Ok(Workload {
        uid,
        name,
        namespace,
        service_account,
        trust_domain,
        identity,
        workload_ips,
        protocol,
        node: raw.node,
        network: raw.network,
        hostname: raw.hostname,
        waypoint,
        application_tunnel,
        services,
        labels: BTreeMap::new(),
        canonical_name: raw.canonical_name,
        canonical_revision: raw.canonical_revision,
        workload_name: raw.workload_name,
        workload_type,
        cluster_id: or_default(&raw.cluster_id, DEFAULT_CLUSTER_ID).to_string(),
        authorization_policies: raw.authorization_policies,
        status: if raw.status == wl::WorkloadStatus::Unhealthy as i32 {
            HealthStatus::Unhealthy
        } else {
            HealthStatus::Healthy
        },
    })
}

fn workload_ips(addresses: &[Vec<u8>], network_mode: i32) -> Result<Vec<IpAddr>, FieldError> {
    let mut workload_ips = Vec::with_capacity(addresses.len());
    for (index, bytes) in addresses.iter().enumerate() {
        workload_ips.push(ip(&format!("workload.addresses[{index}]"), bytes)?);
    }
    // Host-network workloads share the node's IP with every other host-network pod; indexing
    // them by it would send traffic for the node to one of them.
    if network_mode == wl::NetworkMode::HostNetwork as i32 {
        workload_ips.clear();
    }
    Ok(workload_ips)
}

fn application_tunnel(tunnel: wl::ApplicationTunnel) -> Result<ApplicationTunnel, FieldError> {
    let protocol = match wl::application_tunnel::Protocol::try_from(tunnel.protocol) {
        Ok(wl::application_tunnel::Protocol::None) => ApplicationTunnelProtocol::None,
        Ok(wl::application_tunnel::Protocol::Proxy) => ApplicationTunnelProtocol::Proxy,
        Err(_) => {
            return Err(invalid(
                "workload.application_tunnel.protocol",
                format!("unknown protocol {}", tunnel.protocol),
            ))
        }
    };
    let port = port("workload.application_tunnel.port", tunnel.port)?;
    Ok(ApplicationTunnel {
        protocol,
        port: Some(port).filter(|port| *port != 0),
    })
}

fn workload_services(
    raw: std::collections::HashMap<String, wl::PortList>,
) -> Result<BTreeMap<String, BTreeMap<u16, u16>>, FieldError> {
    let mut services = BTreeMap::new();
    for (key, list) in raw {
        let field = format!("workload.services[{key:?}]");
        check_service_key(&key).map_err(|error| invalid(&field, error.to_string()))?;
        let mut ports = BTreeMap::new();
        for (index, entry) in list.ports.iter().enumerate() {
            let service_port = nonzero_port(
                &format!("{field}.ports[{index}].service_port"),
                entry.service_port,
            )?;
            let target_port = port(
                &format!("{field}.ports[{index}].target_port"),
                entry.target_port,
            )?;
            ports.insert(service_port, target_port);
        }
        services.insert(key, ports);
    }
    Ok(services)
}

fn network_address(field: &str, raw: wl::NetworkAddress) -> Result<NetworkAddress, FieldError> {
    Ok(NetworkAddress {
        network: raw.network,
        ip: ip(&format!("{field}.address"), &raw.address)?,
    })
}

fn gateway_address(field: &str, raw: wl::GatewayAddress) -> Result<GatewayAddress, FieldError> {
    let destination = match raw.destination {
        Some(wl::gateway_address::Destination::Address(address)) => {
            GatewayDestination::Address(network_address(field, address)?)
        }
        Some(wl::gateway_address::Destination::Hostname(named)) => {
            GatewayDestination::hostname(named.namespace, named.hostname).map_err(|error| {
                let part = match error {
                    HostnameError::NoNamespace => "namespace",
                    HostnameError::NoHostname => "hostname",
                };
                invalid(format!("{field}.hostname.{part}"), "must not be empty")
            })?
        }
        None => return Err(invalid(field, "has no destination")),
    };
    // istiod always sets it; 0 would be an unreachable waypoint, so take HBONE's port.
    let hbone_mtls_port = match port(&format!("{field}.hbone_mtls_port"), raw.hbone_mtls_port)? {
        0 => crate::net::ports::HBONE,
        port => port,
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

/// Converts a service. Public for the fuzz target and tests.
pub fn service(raw: wl::Service) -> Result<Service, FieldError> {
    let name = required("service.name", raw.name)?;
    let namespace = required("service.namespace", raw.namespace)?;
    let hostname = required("service.hostname", raw.hostname)?;
    let mut vips = Vec::with_capacity(raw.addresses.len());
    for (index, address) in raw.addresses.into_iter().enumerate() {
        let field = format!("service.addresses[{index}]");
        let full = |ip: &IpAddr| if ip.is_ipv4() { 32 } else { 128 };
        let length = address.length;
        let vip = network_address(&field, address)?;
        if let Some(length) = length.filter(|length| *length != full(&vip.ip)) {
            // A CIDR VIP (ServiceEntry with a range): this agent matches exact VIPs only, so
            // the range is left out rather than widened to one address.
            tracing::warn!(service = %hostname, vip = %vip, length,
                "CIDR VIP not supported; left out");
            continue;
        }
        vips.push(vip);
    }
    let mut ports = BTreeMap::new();
    for (index, entry) in raw.ports.iter().enumerate() {
        let service_port = nonzero_port(
            &format!("service.ports[{index}].service_port"),
            entry.service_port,
        )?;
        let target_port = port(
            &format!("service.ports[{index}].target_port"),
            entry.target_port,
        )?;
        ports.insert(service_port, target_port);
    }
    let mut subject_alt_names = Vec::with_capacity(raw.subject_alt_names.len());
    for (index, san) in raw.subject_alt_names.iter().enumerate() {
        let identity = san.parse::<Identity>().map_err(|error| {
            invalid(
                format!("service.subject_alt_names[{index}]"),
                error.to_string(),
            )
        })?;
        subject_alt_names.push(identity);
    }
    let waypoint = raw
        .waypoint
        .map(|gateway| gateway_address("service.waypoint", gateway))
        .transpose()?;
    Ok(Service {
        name,
        namespace,
        hostname,
        vips,
        ports,
        subject_alt_names,
        waypoint,
    })
}

/// Converts an authorization policy. Public for the fuzz target and tests.
pub fn authorization(raw: security::Authorization) -> Result<Policy, FieldError> {
    let name = required("authorization.name", raw.name)?;
    let namespace = required("authorization.namespace", raw.namespace)?;
    let scope = match security::Scope::try_from(raw.scope) {
        Ok(security::Scope::Global) => PolicyScope::Global,
        Ok(security::Scope::Namespace) => PolicyScope::Namespace,
        Ok(security::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => {
            return Err(invalid(
                "authorization.scope",
                format!("unknown scope {}", raw.scope),
            ))
        }
    };
    // An action we do not know cannot be enforced safely either way: refuse the policy so the
    // operator sees it, instead of guessing allow or deny.
    let action = match security::Action::try_from(raw.action) {
        Ok(security::Action::Allow) => PolicyAction::Allow,
        Ok(security::Action::Deny) => PolicyAction::Deny,
        Err(_) => {
            return Err(invalid(
                "authorization.action",
                format!("unknown action {}", raw.action),
            ))
        }
    };
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (r, rule) in raw.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, raw_match) in clause.matches.into_iter().enumerate() {
                let field = format!("authorization.rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(policy_match(&field, raw_match)?);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Policy {
        name,
        namespace,
        scope,
        action,
        dry_run: raw.dry_run,
        rules,
    })
}

fn policy_match(field: &str, raw: security::Match) -> Result<Match, FieldError> {
    let strings = |name: &str, list: Vec<security::StringMatch>| -> Result<_, FieldError> {
        list.into_iter()
            .enumerate()
            .map(|(index, item)| string_match(&format!("{field}.{name}[{index}]"), item))
            .collect::<Result<Vec<_>, _>>()
    };
    let nets = |name: &str, list: Vec<security::Address>| -> Result<_, FieldError> {
        list.into_iter()
            .enumerate()
            .map(|(index, item)| cidr(&format!("{field}.{name}[{index}]"), item))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |name: &str, list: Vec<u32>| -> Result<_, FieldError> {
        list.into_iter()
            .enumerate()
            .map(|(index, item)| nonzero_port(&format!("{field}.{name}[{index}]"), item))
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |list: Vec<security::ServiceAccountMatch>| {
        list.into_iter()
            .map(|item| ServiceAccountMatch {
                namespace: item.namespace,
                service_account: item.service_account,
            })
            .collect::<Vec<_>>()
    };
    Ok(Match {
        namespaces: strings("namespaces", raw.namespaces)?,
        not_namespaces: strings("not_namespaces", raw.not_namespaces)?,
        principals: strings("principals", raw.principals)?,
        not_principals: strings("not_principals", raw.not_principals)?,
        service_accounts: accounts(raw.service_accounts),
        not_service_accounts: accounts(raw.not_service_accounts),
        source_ips: nets("source_ips", raw.source_ips)?,
        not_source_ips: nets("not_source_ips", raw.not_source_ips)?,
        destination_ips: nets("destination_ips", raw.destination_ips)?,
        not_destination_ips: nets("not_destination_ips", raw.not_destination_ips)?,
        destination_ports: ports("destination_ports", raw.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", raw.not_destination_ports)?,
    })
}

fn string_match(field: &str, raw: security::StringMatch) -> Result<StringMatch, FieldError> {
    use security::string_match::MatchType;
    match raw.match_type {
        Some(MatchType::Exact(value)) => Ok(StringMatch::Exact(value)),
        Some(MatchType::Prefix(value)) => Ok(StringMatch::Prefix(value)),
        Some(MatchType::Suffix(value)) => Ok(StringMatch::Suffix(value)),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
        // An empty match would silently match nothing (or everything, in a `not_` list).
        None => Err(invalid(
            field,
            "string match has no exact, prefix, suffix or presence",
        )),
    }
}

fn cidr(field: &str, raw: security::Address) -> Result<IpNet, FieldError> {
    let address = ip(&format!("{field}.address"), &raw.address)?;
    let length = u8::try_from(raw.length).ok();
    length
        .and_then(|length| IpNet::new(address, length).ok())
        .map(|net| net.trunc())
        .ok_or_else(|| {
            invalid(
                format!("{field}.length"),
                format!("{} is not a prefix length for {address}", raw.length),
            )
        })
}

impl TryFrom<wl::Workload> for Workload {
    type Error = FieldError;
    fn try_from(raw: wl::Workload) -> Result<Self, FieldError> {
        workload(raw)
    }
}

impl TryFrom<wl::Service> for Service {
    type Error = FieldError;
    fn try_from(raw: wl::Service) -> Result<Self, FieldError> {
        service(raw)
    }
}

impl TryFrom<security::Authorization> for Policy {
    type Error = FieldError;
    fn try_from(raw: security::Authorization) -> Result<Self, FieldError> {
        authorization(raw)
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
