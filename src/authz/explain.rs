//! Explain (layer L2, pure): "may X reach Y, and why?" for people. Resolves the names a person
//! types (a workload name, `namespace/name` or uid, an IP, a SPIFFE id; `ip:port` or
//! `workload:port`) against a snapshot into [`ConnectionFacts`], then decides with [`super::decide`]
//! — the very function enforcement calls, so the answer is what the agent would do.
//!
//! Used by `nodetunnel explain` (over a config file) and by the admin API (over the live state).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::spiffe::Identity;
use crate::state::{Snapshot, TunnelProtocol, Workload};

use super::{ConnectionFacts, Decision};

/// Why a question could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// `--from` starts with `spiffe://` but is not a valid SPIFFE identity.
    #[error("--from {input:?} is not a SPIFFE identity: {reason}")]
    BadIdentity {
        /// What was given.
        input: String,
        /// Why it does not parse.
        reason: String,
    },
    /// No workload has this uid, `namespace/name` or name.
    #[error("no workload named {0:?} (give a name, namespace/name, uid, IP or SPIFFE id)")]
    UnknownWorkload(String),
    /// A bare name matches workloads in several namespaces.
    #[error("workload name {name:?} is ambiguous; use one of: {}", candidates.join(", "))]
    AmbiguousWorkload {
        /// The name given.
        name: String,
        /// `namespace/name` of each match.
        candidates: Vec<String>,
    },
    /// `--to` names an IP no workload has.
    #[error("no workload has IP {0} (explain needs the destination pod, not a service VIP)")]
    UnknownDestination(IpAddr),
    /// `--to` has no port.
    #[error("--to {0:?} needs a port: ip:port or workload:port")]
    MissingPort(String),
    /// `--to` has a port that is not 1-65535.
    #[error("--to {0:?}: the port must be a number 1-65535")]
    BadPort(String),
}

/// A resolved question and its answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explained {
    /// The source as resolved: `namespace/name` of the workload, or the input.
    pub source: String,
    /// The destination workload, `namespace/name`.
    pub destination: String,
    /// The facts the decision was made on.
    pub facts: ConnectionFacts,
    /// The decision with its trace.
    pub decision: Decision,
    /// Assumptions made while resolving (an unknown source IP, a plaintext source).
    pub notes: Vec<String>,
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity = self
            .facts
            .source_identity
            .as_ref()
            .map_or("no identity (plaintext)".to_string(), ToString::to_string);
        writeln!(
            f,
            "from: {} ({identity}, {})",
            self.source, self.facts.source_ip
        )?;
        let target = SocketAddr::new(self.facts.destination_ip, self.facts.destination_port);
        writeln!(f, "to:   {} ({target})", self.destination)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        write!(f, "{}", self.decision)
    }
}

/// Resolves `from` and `to` in `snapshot` and decides as the destination's agent would.
///
/// `from`: a SPIFFE id (mTLS from that identity; the source IP is that of a workload with the
/// identity, if any), an IP (the workload there, mTLS if it is HBONE, otherwise plaintext; an IP
/// no workload has is a plaintext client), or a workload (uid, `namespace/name`, or a name unique
/// across namespaces). `to`: `ip:port` of a workload, or `workload:port`.
pub fn explain(snapshot: &Snapshot, from: &str, to: &str) -> Result<Explained, ExplainError> {
    let mut notes = Vec::new();
    let (source, source_identity, source_ip) = resolve_source(snapshot, from, &mut notes)?;
    let (destination, target) = resolve_destination(snapshot, to)?;
    let facts = ConnectionFacts {
        source_identity,
        source_ip,
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let decision = super::decide(snapshot, &destination, &facts);
    Ok(Explained {
        source,
        destination: reference(&destination),
        facts,
        decision,
        notes,
    })
}

fn reference(workload: &Workload) -> String {
    format!("{}/{}", workload.namespace, workload.name)
}

/// The identity a workload's traffic carries: its own over HBONE, none when it is not meshed.
fn mesh_identity(workload: &Workload, notes: &mut Vec<String>) -> Option<Identity> {
    match workload.protocol {
        TunnelProtocol::Hbone => Some(workload.identity.clone()),
        TunnelProtocol::Tcp => {
            notes.push(format!(
                "{} is not in the mesh (protocol TCP): its traffic arrives as plaintext",
                reference(workload)
            ));
            None
        }
    }
}

fn first_ip(workload: &Workload, notes: &mut Vec<String>) -> IpAddr {
    workload.workload_ips.first().copied().unwrap_or_else(|| {
        notes.push(format!(
            "{} has no IP; source IP rules see 0.0.0.0",
            reference(workload)
        ));
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    })
}

type Source = (String, Option<Identity>, IpAddr);

fn resolve_source(
    snapshot: &Snapshot,
    from: &str,
    notes: &mut Vec<String>,
) -> Result<Source, ExplainError> {
    if from.starts_with("spiffe://") {
        let identity: Identity = from
            .parse()
            .map_err(
                |error: crate::spiffe::IdentityError| ExplainError::BadIdentity {
                    input: from.to_string(),
                    reason: error.to_string(),
                },
            )?;
        let mut owners: Vec<&Arc<Workload>> = snapshot
            .workloads()
            .filter(|workload| workload.identity == identity)
            .collect();
        owners.sort_by(|a, b| a.uid.cmp(&b.uid));
        let ip = match owners.first() {
            Some(workload) => first_ip(workload, notes),
            None => {
                notes.push(format!(
                    "no workload has identity {identity}; source IP rules see 0.0.0.0"
                ));
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }
        };
        return Ok((from.to_string(), Some(identity), ip));
    }
    if let Ok(ip) = from.parse::<IpAddr>() {
        return Ok(match snapshot.workload_by_ip(ip) {
            Some(workload) => (reference(workload), mesh_identity(workload, notes), ip),
            None => {
                notes.push(format!(
                    "no workload has IP {ip}: treated as a plaintext client outside the mesh"
                ));
                (from.to_string(), None, ip)
            }
        });
    }
    let workload = find_workload(snapshot, from)?;
    let identity = mesh_identity(&workload, notes);
    let ip = first_ip(&workload, notes);
    Ok((reference(&workload), identity, ip))
}

/// Whether `to` (`ip:port` or `name:port`) names a workload: the inbound question
/// [`explain`] answers. Anything else (a service VIP, an outside IP, a hostname) is an
/// outbound question for the source's agent.
pub fn names_workload(snapshot: &Snapshot, to: &str) -> bool {
    if let Ok(address) = to.parse::<SocketAddr>() {
        return snapshot.workload_by_ip(address.ip()).is_some();
    }
    match to.rsplit_once(':') {
        Some((name, _)) => {
            name.parse::<IpAddr>().is_err()
                && !matches!(
                    find_workload(snapshot, name),
                    Err(ExplainError::UnknownWorkload(_))
                )
        }
        None => true,
    }
}

/// `host:port`, `ip:port` or `[v6]:port` split into its host (without brackets) and a port
/// in 1..=65535.
pub(crate) fn split_port(to: &str) -> Result<(&str, u16), ExplainError> {
    if let Ok(address) = to.parse::<SocketAddr>() {
        // `[v6]:port`: the host part without brackets is taken below as an IP.
        let host = to.rsplit_once(':').map_or(to, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        return Ok((host, address.port()));
    }
    let Some((host, port)) = to.rsplit_once(':') else {
        return Err(ExplainError::MissingPort(to.to_string()));
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| ExplainError::BadPort(to.to_string()))?;
    Ok((host, port))
}

fn resolve_destination(
    snapshot: &Snapshot,
    to: &str,
) -> Result<(Arc<Workload>, SocketAddr), ExplainError> {
    if let Ok(address) = to.parse::<SocketAddr>() {
        let workload = snapshot
            .workload_by_ip(address.ip())
            .ok_or(ExplainError::UnknownDestination(address.ip()))?;
        return Ok((workload.clone(), address));
    }
    if to.parse::<IpAddr>().is_ok() {
        return Err(ExplainError::MissingPort(to.to_string()));
    }
    let (name, port) = split_port(to)?;
    let workload = find_workload(snapshot, name)?;
    let ip = workload
        .workload_ips
        .first()
        .copied()
        .ok_or_else(|| ExplainError::UnknownWorkload(name.to_string()))?;
    Ok((workload, SocketAddr::new(ip, port)))
}

/// By uid, then `namespace/name`, then a name unique across namespaces.
pub fn find_workload(snapshot: &Snapshot, name: &str) -> Result<Arc<Workload>, ExplainError> {
    if let Some(workload) = snapshot.workload(name) {
        return Ok(workload.clone());
    }
    if let Some((namespace, short)) = name.split_once('/') {
        return snapshot
            .workloads()
            .find(|workload| workload.namespace == namespace && workload.name == short)
            .cloned()
            .ok_or_else(|| ExplainError::UnknownWorkload(name.to_string()));
    }
    let mut matches: Vec<&Arc<Workload>> = snapshot
        .workloads()
        .filter(|workload| workload.name == name)
        .collect();
    matches.sort_by(|a, b| a.uid.cmp(&b.uid));
    match matches.as_slice() {
        [] => Err(ExplainError::UnknownWorkload(name.to_string())),
        [only] => Ok((*only).clone()),
        several => Err(ExplainError::AmbiguousWorkload {
            name: name.to_string(),
            candidates: several.iter().map(|workload| reference(workload)).collect(),
        }),
    }
}
