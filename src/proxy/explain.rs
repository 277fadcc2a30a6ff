//! Explain, outbound side (layer L3, pure): "where would this pod's connection to `host:port`
//! or `ip:port` go, and may it?" for people. The client agent's questions — the registry, the
//! outbound traffic policy, ServiceEntries (by address, or by a name the pod resolves through
//! its DNS proxy), egress gateways and waypoints, DestinationRule limits — answered with the
//! very route decision the outbound proxy runs ([`super::route::decide`]).
//!
//! `nodetunnel explain` uses it when `--to` is not a workload (the inbound question
//! `authz::explain` answers): a service VIP, an outside IP, or a hostname. It runs over a
//! config file, so no pod has resolved anything: for a hostname, it says which ServiceEntry
//! would allow the addresses the pod gets when it resolves the name through its DNS proxy.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::route::{self, Route, RouteError};
use crate::authz::explain::{find_workload, split_port, ExplainError};
use crate::net::{NetworkAddress, OriginalDst};
use crate::state::egress::{
    host_matches, nothing_learned, EgressDecision, OutboundMode, ServiceEntry,
};
use crate::state::traffic_policy::DestinationRule;
use crate::state::{Snapshot, Workload};

/// The answer to an outbound question.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundExplained {
    /// The source pod, `namespace/name`.
    pub source: String,
    /// The destination as given.
    pub destination: String,
    /// Whether the connection would be let out.
    pub allowed: bool,
    /// One line: what decides.
    pub decision: String,
    /// The ServiceEntry that allows it, `namespace/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_entry: Option<String>,
    /// The namespace's outbound traffic policy mode.
    pub outbound_traffic_policy: String,
    /// Where the bytes go: `HBONE to <peer> (authority ...)`, `TCP to <target>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The waypoint (or egress gateway) the connection goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
    /// The DestinationRule whose limits apply, with them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// Assumptions and caveats.
    pub notes: Vec<String>,
}

impl fmt::Display for OutboundExplained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "from: {} (outbound)", self.source)?;
        writeln!(f, "to:   {}", self.destination)?;
        writeln!(f, "outboundTrafficPolicy: {}", self.outbound_traffic_policy)?;
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        writeln!(f, "decision: {verdict} ({})", self.decision)?;
        let lines = [
            ("route", &self.route),
            ("via waypoint", &self.waypoint),
            ("destination rule", &self.destination_rule),
        ];
        for (label, value) in lines {
            if let Some(value) = value {
                writeln!(f, "{label}: {value}")?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Explains a connection from the workload `from` to `to` (`ip:port` or `host:port`) as the
/// source's agent would route it.
pub fn explain_outbound(
    snapshot: &Snapshot,
    from: &str,
    to: &str,
) -> Result<OutboundExplained, ExplainError> {
    let source = find_workload(snapshot, from)?;
    let (host, port) = split_port(to)?;
    let mode = snapshot.egress().policy.mode_for(&source.namespace);
    let mut explained = OutboundExplained {
        source: format!("{}/{}", source.namespace, source.name),
        destination: to.to_string(),
        allowed: false,
        decision: String::new(),
        service_entry: None,
        outbound_traffic_policy: mode.as_str().to_string(),
        route: None,
        waypoint: None,
        destination_rule: None,
        notes: Vec::new(),
    };
    let address = match host.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => registry_address(snapshot, &source, host, &mut explained.notes),
    };
    match address {
        Some(ip) => explain_address(snapshot, &source, SocketAddr::new(ip, port), &mut explained),
        None => explain_hostname(snapshot, &source, host, port, &mut explained),
    }
    Ok(explained)
}

/// The address a mesh hostname stands for (a service's first VIP in the source's network, or
/// a workload's IP), as the pod's DNS proxy would answer it.
fn registry_address(
    snapshot: &Snapshot,
    source: &Workload,
    host: &str,
    notes: &mut Vec<String>,
) -> Option<IpAddr> {
    let services = snapshot.services_by_hostname(host);
    let service = services
        .iter()
        .find(|service| service.namespace == source.namespace)
        .or(services.first());
    if let Some(vip) = service.and_then(|service| {
        service
            .vips
            .iter()
            .find(|vip| vip.network == source.network)
    }) {
        notes.push(format!("{host} is a mesh service; its VIP is {}", vip.ip));
        return Some(vip.ip);
    }
    let workload = snapshot.workloads_by_hostname(host).first()?;
    let ip = workload.workload_ips.first().copied()?;
    notes.push(format!(
        "{host} is the hostname of workload {}",
        workload.uid
    ));
    Some(ip)
}

fn explain_address(
    snapshot: &Snapshot,
    source: &Workload,
    destination: SocketAddr,
    explained: &mut OutboundExplained,
) {
    let hbone_port = crate::net::ports::HBONE;
    let decision = route::decide(snapshot, source, OriginalDst(destination), hbone_port, 0);
    match decision {
        Ok(route) => {
            explained.allowed = true;
            describe_route(snapshot, source, &route, destination, explained);
        }
        Err(error) => {
            explained.decision = error.to_string();
            if let RouteError::EgressBlocked(_) = error {
                explained.notes.push(
                    "an address a ServiceEntry host resolves to is allowed only once the pod \
                     resolved that name through its DNS proxy (ask with --to host:port)"
                        .to_string(),
                );
            }
        }
    }
}

fn describe_route(
    snapshot: &Snapshot,
    source: &Workload,
    route: &Route,
    destination: SocketAddr,
    explained: &mut OutboundExplained,
) {
    let service = match route {
        Route::Hbone(hbone) => {
            let reference = format!("{}/{}", hbone.destination.namespace, hbone.destination.name);
            explained.route = Some(format!(
                "HBONE to {reference} at {} (authority {})",
                hbone.peer, hbone.authority
            ));
            // Through a waypoint the authority stays what the app dialled, which is not an
            // address of the workload the tunnel reaches.
            let own_address = hbone.destination.workload_ips.contains(&destination.ip());
            if hbone.authority == destination && !own_address {
                explained.waypoint = Some(reference);
            }
            hbone.service.clone()
        }
        Route::Passthrough(passthrough) => {
            explained.route = Some(format!("TCP to {}", passthrough.target));
            passthrough.service.clone()
        }
    };
    let address = NetworkAddress {
        network: source.network.clone(),
        ip: destination.ip(),
    };
    let egress = snapshot.egress();
    explained.decision = if let Some(service) = snapshot.service_by_vip(&address) {
        format!("in the registry: service {}", service.key())
    } else if let Some(workload) = snapshot.workload_by_address(&address) {
        format!(
            "in the registry: workload {}/{}",
            workload.namespace, workload.name
        )
    } else {
        match egress.decide(&source.namespace, destination, 0, &nothing_learned) {
            EgressDecision::ServiceEntry { entry, .. } => {
                explained.service_entry = Some(entry.key());
                format!("allowed by ServiceEntry {}", entry.key())
            }
            EgressDecision::AllowAny => {
                "not in the registry; passed through under ALLOW_ANY".to_string()
            }
            EgressDecision::Blocked(blocked) => blocked.to_string(),
        }
    };
    if let Some(service) = service {
        explained.destination_rule = egress
            .destination_rules
            .for_service(&source.namespace, &service)
            .map(|rule| describe_rule(rule));
    }
}

/// A hostname that is not a mesh name: a ServiceEntry host, or nothing.
fn explain_hostname(
    snapshot: &Snapshot,
    source: &Workload,
    host: &str,
    port: u16,
    explained: &mut OutboundExplained,
) {
    let egress = snapshot.egress();
    let matching: Vec<&ServiceEntry> = egress
        .service_entries
        .iter()
        .map(AsRef::as_ref)
        .filter(|entry| entry.export_to.includes(&source.namespace))
        .filter(|entry| {
            entry
                .hosts
                .iter()
                .any(|pattern| host_matches(pattern, host))
        })
        .collect();
    if let Some(entry) = matching
        .iter()
        .find(|entry| entry.ports.iter().any(|p| p.number == port))
    {
        explained.allowed = true;
        explained.service_entry = Some(entry.key());
        explained.decision = format!(
            "allowed by ServiceEntry {} (host {}) for the addresses the pod resolves {host} to \
             through its DNS proxy, for the answer's TTL (clamped)",
            entry.key(),
            entry.host_matching(host).unwrap_or(host)
        );
        if let Some(gateway) = &entry.waypoint {
            explained.waypoint = Some(gateway.destination.to_string());
            explained.route =
                Some("HBONE to the egress gateway (authority: the address dialled)".into());
        } else {
            explained.route = Some(format!("TCP to the resolved address, port {port}"));
        }
        if entry.addresses.is_empty() {
            explained.notes.push(
                "a pod that resolves the name through another resolver (not the agent's DNS \
                 proxy) is refused under REGISTRY_ONLY"
                    .to_string(),
            );
        }
        return;
    }
    if let Some(entry) = matching.first() {
        let ports: Vec<String> = entry.ports.iter().map(|p| p.number.to_string()).collect();
        explained.notes.push(format!(
            "ServiceEntry {} matches {host} but allows only ports {}",
            entry.key(),
            ports.join(", ")
        ));
    }
    match egress.policy.mode_for(&source.namespace) {
        OutboundMode::AllowAny => {
            explained.allowed = true;
            explained.decision =
                "no ServiceEntry allows it; passed through under ALLOW_ANY".to_string();
            explained.route = Some(format!("TCP to the resolved address, port {port}"));
        }
        OutboundMode::RegistryOnly => {
            explained.decision = format!(
                "blocked by REGISTRY_ONLY: no service, workload or ServiceEntry exported to \
                 namespace {} has host {host} on port {port}",
                source.namespace
            );
        }
    }
}

fn describe_rule(rule: &DestinationRule) -> String {
    let mut limits = Vec::new();
    if let Some(max) = rule.tcp.max_connections {
        limits.push(format!("maxConnections {max} per pod"));
    }
    if let Some(timeout) = rule.tcp.connect_timeout {
        limits.push(format!("connectTimeout {timeout:?}"));
    }
    if let Some(duration) = rule.tcp.max_connection_duration {
        limits.push(format!("maxConnectionDuration {duration:?}"));
    }
    if let Some(outlier) = &rule.outlier_detection {
        limits.push(format!(
            "outlier detection after {} consecutive connect failures (maxEjectionPercent {})",
            outlier.consecutive_errors, outlier.max_ejection_percent
        ));
    }
    if limits.is_empty() {
        limits.push("no L4 limits".to_string());
    }
    format!("{}: {}", rule.key(), limits.join(", "))
}
