//! Istio `networking.istio.io` resources → the egress model (layer L1, pure): `ServiceEntry`
//! and `DestinationRule` (v1, v1beta1, v1alpha3 share the shape). Of a DestinationRule only
//! what applies at L4 is read (`trafficPolicy.connectionPool.tcp`, `outlierDetection`); its
//! HTTP, TLS, load-balancer, subset and port-level settings are accepted and ignored.
//!
//! They come from the same places as the security resources (`istioResources` and the files of
//! `agent.authorization.policyDirs`) and follow the same rule: a resource that cannot be
//! applied is left out with an error naming it and the field, and every other resource applies.
//! Specs reject unknown fields, as a misspelt field in an egress rule must not silently widen or
//! narrow what is allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::Value;

use super::istio_policy::{expand, is_networking, IstioOptions, ResourceId};
use std::time::Duration;

use crate::state::egress::{
    ExportTo, Location, Resolution, ServiceEntry, ServiceEntryEndpoint, ServiceEntryPort,
};
use crate::state::traffic_policy::{DestinationRule, OutlierDetection, TcpPool};

mod waypoint;

const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// A networking resource that was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NetworkingError {
    /// Which resource.
    pub resource: ResourceId,
    /// The field at fault (`spec.addresses[1]`), or `.` for the resource as a whole.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for NetworkingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.resource, self.field, self.problem)
    }
}

/// What a set of networking resources translated to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkingTranslation {
    /// ServiceEntries, in input order.
    pub service_entries: Vec<ServiceEntry>,
    /// DestinationRules, in input order.
    pub destination_rules: Vec<DestinationRule>,
    /// Resources left out.
    pub errors: Vec<NetworkingError>,
}

/// Reads the networking resources of YAML text (documents, lists, `List` kinds), ignoring every
/// other resource. A YAML syntax error ends the reading silently: the security reader of the same
/// text reports it.
pub fn parse(yaml: &str, options: &IstioOptions) -> NetworkingTranslation {
    let mut values = Vec::new();
    for deserializer in serde_yaml::Deserializer::from_str(yaml) {
        match Value::deserialize(deserializer) {
            Ok(value) => values.push(value),
            Err(_) => break,
        }
    }
    translate(values, options)
}

/// Translates the networking resources among already parsed documents.
pub fn translate(
    documents: impl IntoIterator<Item = Value>,
    options: &IstioOptions,
) -> NetworkingTranslation {
    let mut translation = NetworkingTranslation::default();
    for resource in documents.into_iter().flat_map(expand) {
        if !is_networking(&resource) {
            continue;
        }
        let result = match text(&resource, &["kind"]) {
            Some("DestinationRule") => {
                destination_rule(&resource).map(|rule| translation.destination_rules.push(rule))
            }
            _ => service_entry(&resource, options)
                .map(|entry| translation.service_entries.push(entry)),
        };
        if let Err(error) = result {
            translation.errors.push(error);
        }
    }
    translation
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(key))
        .and_then(Value::as_str)
}

/// `ServiceEntry.spec`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct ServiceEntrySpec {
    hosts: Vec<String>,
    addresses: Vec<String>,
    ports: Vec<PortSpec>,
    location: Option<String>,
    resolution: Option<String>,
    endpoints: Vec<EndpointSpec>,
    workload_selector: Option<Value>,
    export_to: Vec<String>,
    subject_alt_names: Vec<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct PortSpec {
    number: u32,
    protocol: Option<String>,
    name: Option<String>,
    target_port: Option<u32>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct EndpointSpec {
    address: Option<String>,
    ports: BTreeMap<String, u32>,
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

/// Names the resource and checks what every networking resource needs; returns its spec.
fn header(resource: &Value) -> Result<(ResourceId, Value), NetworkingError> {
    let id = ResourceId {
        kind: text(resource, &["kind"]).unwrap_or("<no kind>").to_string(),
        namespace: text(resource, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string(),
        name: text(resource, &["metadata", "name"])
            .unwrap_or("<unnamed>")
            .to_string(),
    };
    let fail = |field: &str, problem: String| NetworkingError {
        resource: id.clone(),
        field: field.to_string(),
        problem,
    };
    let api_version = text(resource, &["apiVersion"]).unwrap_or_default();
    if !API_VERSIONS.contains(&api_version) {
        return Err(fail(
            "apiVersion",
            format!("unsupported {api_version:?} (expected networking.istio.io/v1, v1beta1 or v1alpha3)"),
        ));
    }
    if !matches!(id.kind.as_str(), "ServiceEntry" | "DestinationRule") {
        return Err(fail(
            "kind",
            "unsupported networking kind (expected ServiceEntry or DestinationRule)".to_string(),
        ));
    }
    if !text(resource, &["metadata", "name"]).is_some_and(|name| !name.is_empty()) {
        return Err(fail("metadata.name", "missing".to_string()));
    }
    let spec = resource.get("spec").cloned().unwrap_or(Value::Null);
    Ok((id, spec))
}

fn spec_of<T: serde::de::DeserializeOwned + Default>(spec: Value) -> Result<T, Problem> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(spec).map_err(|error| ("spec".to_string(), error.to_string()))
}

fn rejected(id: &ResourceId) -> impl Fn(Problem) -> NetworkingError + '_ {
    move |(field, problem)| NetworkingError {
        resource: id.clone(),
        field,
        problem,
    }
}

fn service_entry(
    resource: &Value,
    options: &IstioOptions,
) -> Result<ServiceEntry, NetworkingError> {
    let (id, spec) = header(resource)?;
    let waypoint = waypoint::use_waypoint(resource, &id, options).map_err(rejected(&id))?;
    spec_of(spec)
        .and_then(|spec| check_service_entry(&id, spec))
        .map(|entry| ServiceEntry { waypoint, ..entry })
        .map_err(rejected(&id))
}

fn destination_rule(resource: &Value) -> Result<DestinationRule, NetworkingError> {
    let (id, spec) = header(resource)?;
    spec_of(spec)
        .and_then(|spec| check_destination_rule(&id, spec))
        .map_err(rejected(&id))
}

type Problem = (String, String);

fn check_service_entry(id: &ResourceId, spec: ServiceEntrySpec) -> Result<ServiceEntry, Problem> {
    if spec.hosts.is_empty() {
        return Err(("spec.hosts".into(), "at least one host is required".into()));
    }
    if let Some(index) = spec.hosts.iter().position(String::is_empty) {
        return Err((format!("spec.hosts[{index}]"), "empty host".into()));
    }
    if spec.workload_selector.is_some() {
        return Err((
            "spec.workloadSelector".into(),
            "selecting mesh workloads is not supported by the node agent (list endpoints instead)"
                .into(),
        ));
    }
    let addresses = spec
        .addresses
        .iter()
        .enumerate()
        .map(|(index, address)| {
            parse_net(address).ok_or_else(|| {
                (
                    format!("spec.addresses[{index}]"),
                    format!("{address:?} is not an IP address or CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = check_ports(&spec.ports)?;
    let location = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => Location::MeshExternal,
        Some("MESH_INTERNAL") => Location::MeshInternal,
        Some(other) => {
            return Err((
                "spec.location".into(),
                format!("{other:?} (expected MESH_EXTERNAL or MESH_INTERNAL)"),
            ))
        }
    };
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS") | Some("DNS_ROUND_ROBIN") => Resolution::Dns,
        Some(other) => {
            return Err((
                "spec.resolution".into(),
                format!("{other:?} (expected NONE, STATIC, DNS or DNS_ROUND_ROBIN)"),
            ))
        }
    };
    let endpoints = check_endpoints(&spec.endpoints, resolution, &ports)?;
    Ok(ServiceEntry {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        hosts: spec.hosts,
        addresses,
        ports,
        location,
        resolution,
        endpoints,
        export_to: export_to(&id.namespace, &spec.export_to)?,
        waypoint: None,
    })
}

fn parse_net(text: &str) -> Option<IpNet> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    text.parse::<IpNet>().ok()
}

fn port_number(value: u32, field: String) -> Result<u16, Problem> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or((field, format!("{value} is not a port number 1-65535")))
}

fn check_ports(specs: &[PortSpec]) -> Result<Vec<ServiceEntryPort>, Problem> {
    if specs.is_empty() {
        return Err(("spec.ports".into(), "at least one port is required".into()));
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut ports = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let field = format!("spec.ports[{index}]");
        let number = port_number(spec.number, format!("{field}.number"))?;
        if !numbers.insert(number) {
            return Err((
                format!("{field}.number"),
                format!("port {number} is listed twice"),
            ));
        }
        let name = spec.name.clone().unwrap_or_default();
        if !name.is_empty() && !names.insert(name.clone()) {
            return Err((
                format!("{field}.name"),
                format!("name {name:?} is used twice"),
            ));
        }
        let target_port = spec
            .target_port
            .map(|port| port_number(port, format!("{field}.targetPort")))
            .transpose()?;
        ports.push(ServiceEntryPort {
            number,
            name,
            protocol: spec.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
            target_port,
        });
    }
    Ok(ports)
}

fn check_endpoints(
    specs: &[EndpointSpec],
    resolution: Resolution,
    ports: &[ServiceEntryPort],
) -> Result<Vec<ServiceEntryEndpoint>, Problem> {
    if resolution == Resolution::None && !specs.is_empty() {
        return Err((
            "spec.endpoints".into(),
            "endpoints need resolution STATIC or DNS".into(),
        ));
    }
    let mut endpoints = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let field = format!("spec.endpoints[{index}]");
        let Some(address) = spec.address.clone().filter(|address| !address.is_empty()) else {
            return Err((format!("{field}.address"), "missing".into()));
        };
        if resolution == Resolution::Static && address.parse::<IpAddr>().is_err() {
            return Err((
                format!("{field}.address"),
                format!("{address:?} is not an IP address (resolution STATIC)"),
            ));
        }
        let mut endpoint_ports = BTreeMap::new();
        for (name, port) in &spec.ports {
            if !ports.iter().any(|declared| &declared.name == name) {
                return Err((
                    format!("{field}.ports.{name}"),
                    "names no port of spec.ports".into(),
                ));
            }
            let number = port_number(*port, format!("{field}.ports.{name}"))?;
            endpoint_ports.insert(name.clone(), number);
        }
        endpoints.push(ServiceEntryEndpoint {
            address,
            ports: endpoint_ports,
        });
    }
    Ok(endpoints)
}

/// `exportTo`: none or `*` → everyone; `.` → the resource's namespace; `~` → no one.
fn export_to(namespace: &str, values: &[String]) -> Result<ExportTo, Problem> {
    if values.is_empty() || values.iter().any(|value| value == "*") {
        return Ok(ExportTo::All);
    }
    let mut namespaces = BTreeSet::new();
    for (index, value) in values.iter().enumerate() {
        match value.as_str() {
            "." => {
                namespaces.insert(namespace.to_string());
            }
            "~" => {}
            "" => return Err((format!("spec.exportTo[{index}]"), "empty value".into())),
            other => {
                namespaces.insert(other.to_string());
            }
        }
    }
    Ok(ExportTo::Namespaces(namespaces))
}

/// `DestinationRule.spec`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct DestinationRuleSpec {
    host: String,
    traffic_policy: Option<TrafficPolicySpec>,
    subsets: Vec<Value>,
    export_to: Vec<String>,
    workload_selector: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct TrafficPolicySpec {
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    load_balancer: Option<Value>,
    tls: Option<Value>,
    port_level_settings: Vec<Value>,
    tunnel: Option<Value>,
    proxy_protocol: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct ConnectionPoolSpec {
    tcp: Option<TcpSpec>,
    http: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct TcpSpec {
    max_connections: Option<i64>,
    #[serde(with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    tcp_keepalive: Option<KeepaliveSpec>,
    #[serde(with = "humantime_serde")]
    max_connection_duration: Option<Duration>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct KeepaliveSpec {
    probes: Option<u32>,
    #[serde(with = "humantime_serde")]
    time: Option<Duration>,
    #[serde(with = "humantime_serde")]
    interval: Option<Duration>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct OutlierDetectionSpec {
    consecutive_gateway_errors: Option<i64>,
    consecutive_5xx_errors: Option<i64>,
    consecutive_local_origin_failures: Option<i64>,
    split_external_local_origin_errors: Option<bool>,
    #[serde(with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    base_ejection_time: Option<Duration>,
    max_ejection_percent: Option<i64>,
    min_health_percent: Option<i64>,
}

fn check_destination_rule(
    id: &ResourceId,
    spec: DestinationRuleSpec,
) -> Result<DestinationRule, Problem> {
    if spec.host.is_empty() {
        return Err(("spec.host".into(), "required".into()));
    }
    if spec.workload_selector.is_some() {
        return Err((
            "spec.workloadSelector".into(),
            "client-selecting DestinationRules are not supported by the node agent".into(),
        ));
    }
    let policy = spec.traffic_policy.unwrap_or_default();
    let tcp = check_tcp(policy.connection_pool.and_then(|pool| pool.tcp))?;
    let outlier_detection = policy.outlier_detection.map(check_outlier).transpose()?;
    // Istio completes a short host in the rule's namespace.
    let host = if spec.host.contains('.') || spec.host == "*" {
        spec.host
    } else {
        format!("{}.{}.svc.cluster.local", spec.host, id.namespace)
    };
    Ok(DestinationRule {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        host,
        tcp,
        outlier_detection,
        export_to: export_to(&id.namespace, &spec.export_to)?,
    })
}

fn positive_duration(value: Option<Duration>, field: &str) -> Result<Option<Duration>, Problem> {
    match value {
        Some(duration) if duration.is_zero() => {
            Err((field.to_string(), "must be longer than 0".into()))
        }
        other => Ok(other),
    }
}

fn check_tcp(spec: Option<TcpSpec>) -> Result<TcpPool, Problem> {
    let Some(spec) = spec else {
        return Ok(TcpPool::default());
    };
    let field = "spec.trafficPolicy.connectionPool.tcp";
    let max_connections = spec
        .max_connections
        .map(|value| {
            u32::try_from(value).ok().filter(|value| *value > 0).ok_or((
                format!("{field}.maxConnections"),
                format!("{value} is not 1 or more"),
            ))
        })
        .transpose()?;
    let keepalive = spec.tcp_keepalive.unwrap_or_default();
    Ok(TcpPool {
        max_connections,
        connect_timeout: positive_duration(
            spec.connect_timeout,
            &format!("{field}.connectTimeout"),
        )?,
        // Istio: `0s` turns the idle timeout off.
        idle_timeout: spec.idle_timeout.filter(|timeout| !timeout.is_zero()),
        tcp_keepalive_time: positive_duration(
            keepalive.time,
            &format!("{field}.tcpKeepalive.time"),
        )?,
        tcp_keepalive_interval: positive_duration(
            keepalive.interval,
            &format!("{field}.tcpKeepalive.interval"),
        )?,
        max_connection_duration: positive_duration(
            spec.max_connection_duration,
            &format!("{field}.maxConnectionDuration"),
        )?,
    })
}

fn check_outlier(spec: OutlierDetectionSpec) -> Result<OutlierDetection, Problem> {
    let field = "spec.trafficPolicy.outlierDetection";
    let defaults = OutlierDetection::default();
    let count = |value: i64, name: &str| {
        u32::try_from(value).ok().filter(|value| *value > 0).ok_or((
            format!("{field}.{name}"),
            format!("{value} is not 1 or more"),
        ))
    };
    let consecutive_errors = match (spec.consecutive_gateway_errors, spec.consecutive_5xx_errors) {
        (Some(value), _) => count(value, "consecutiveGatewayErrors")?,
        (None, Some(value)) => count(value, "consecutive5xxErrors")?,
        (None, None) => defaults.consecutive_errors,
    };
    let max_ejection_percent = match spec.max_ejection_percent {
        None => defaults.max_ejection_percent,
        Some(value @ 0..=100) => value as u32,
        Some(value) => {
            return Err((
                format!("{field}.maxEjectionPercent"),
                format!("{value} is not 0-100"),
            ))
        }
    };
    Ok(OutlierDetection {
        consecutive_errors,
        interval: positive_duration(spec.interval, &format!("{field}.interval"))?
            .unwrap_or(defaults.interval),
        base_ejection_time: positive_duration(
            spec.base_ejection_time,
            &format!("{field}.baseEjectionTime"),
        )?
        .unwrap_or(defaults.base_ejection_time),
        max_ejection_percent,
    })
}

#[cfg(test)]
mod tests;
