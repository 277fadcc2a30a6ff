//! PeerAuthentication mTLS modes (layer L2, pure): which mode applies to a workload's port, and
//! the DENY policy that enforces STRICT.
//!
//! Precedence is Istio's (`ComposePeerAuthentication`): mesh-wide (root namespace, no selector),
//! then namespace-wide, then workload (selector, same namespace), each overriding the previous
//! one unless its mode is UNSET; a workload policy's `portLevelMtls` entry overrides the
//! workload-level result for that target port (UNSET there inherits it). When several policies
//! compete at one level, the first in configuration order wins (Istio: the oldest).
//!
//! STRICT is enforced as istiod does for ztunnel: an enforced DENY policy whose only match is
//! `not_principals: [presence]`, which plaintext connections (no principal) match and mTLS ones
//! never do. PERMISSIVE and DISABLE both admit plaintext; HBONE is mTLS by construction, so
//! DISABLE cannot refuse it.

use std::fmt;

use crate::state::policy::{
    Match, MtlsMode, PeerAuthentication, PeerAuthenticationScope, Policy, PolicyAction,
    PolicyScope, StringMatch,
};
use crate::state::Workload;

/// Which setting decided the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsLevel {
    /// A mesh-wide policy's mode.
    Mesh,
    /// A namespace-wide policy's mode.
    Namespace,
    /// A workload policy's mode.
    Workload,
    /// A workload policy's `portLevelMtls` entry for this port.
    Port,
}

/// The PeerAuthentication that decided the mode, for explain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSource {
    /// `namespace/name` of the PeerAuthentication.
    pub peer_authentication: String,
    /// At which level it decided.
    pub level: MtlsLevel,
}

/// The effective mode for one workload port and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MtlsResolution {
    /// The effective mode.
    pub mode: MtlsMode,
    /// `None` when no PeerAuthentication set it (the PERMISSIVE default).
    pub source: Option<MtlsSource>,
}

impl fmt::Display for MtlsResolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            None => write!(f, "{} (default)", self.mode),
            Some(source) => write!(
                f,
                "{} (PeerAuthentication {}, {:?} level)",
                self.mode, source.peer_authentication, source.level
            ),
        }
    }
}

fn first(
    peer_authentications: &[PeerAuthentication],
    applies: impl Fn(&PeerAuthentication) -> bool,
) -> Option<&PeerAuthentication> {
    peer_authentications.iter().find(|pa| applies(pa))
}

/// The effective mode for `workload` at target `port`, with the policy that set it.
pub fn resolve_mtls(
    peer_authentications: &[PeerAuthentication],
    workload: &Workload,
    port: u16,
) -> MtlsResolution {
    let mesh = first(peer_authentications, |pa| {
        pa.scope == PeerAuthenticationScope::Mesh
    });
    let namespace = first(peer_authentications, |pa| {
        pa.scope == PeerAuthenticationScope::Namespace && pa.namespace == workload.namespace
    });
    let selected = first(peer_authentications, |pa| match &pa.scope {
        PeerAuthenticationScope::Workload { match_labels } => {
            pa.namespace == workload.namespace
                && match_labels
                    .iter()
                    .all(|(key, value)| workload.labels.get(key) == Some(value))
        }
        _ => false,
    });
    let mut resolution = MtlsResolution {
        mode: MtlsMode::Permissive,
        source: None,
    };
    let levels = [
        (mesh, MtlsLevel::Mesh),
        (namespace, MtlsLevel::Namespace),
        (selected, MtlsLevel::Workload),
    ];
    for (pa, level) in levels {
        let Some(pa) = pa else { continue };
        if let Some(mode) = pa.mode {
            resolution = MtlsResolution {
                mode,
                source: Some(MtlsSource {
                    peer_authentication: pa.key(),
                    level,
                }),
            };
        }
    }
    let port_mode = selected.and_then(|pa| Some((pa, (*pa.port_level.get(&port)?)?)));
    if let Some((pa, mode)) = port_mode {
        resolution = MtlsResolution {
            mode,
            source: Some(MtlsSource {
                peer_authentication: pa.key(),
                level: MtlsLevel::Port,
            }),
        };
    }
    resolution
}

/// The effective mode for `workload` at target `port` (see [`resolve_mtls`]).
pub fn mtls_mode(
    peer_authentications: &[PeerAuthentication],
    workload: &Workload,
    port: u16,
) -> MtlsMode {
    resolve_mtls(peer_authentications, workload, port).mode
}

/// The keys of the DENY policies that [`strict_policy`] can make from `peer_authentication`
/// (mesh/namespace/workload level, and port level), whatever port is asked.
pub(super) fn strict_policy_keys(peer_authentication: &PeerAuthentication) -> [String; 2] {
    let namespace = &peer_authentication.namespace;
    [
        format!("{namespace}/istio_converted_static_strict"),
        format!(
            "{namespace}/converted_peer_authentication_{}",
            peer_authentication.name
        ),
    ]
}

/// The DENY policy enforcing STRICT for this resolution, named as istiod names its converted
/// policies (`istio_converted_static_strict`, or `converted_peer_authentication_<name>` for a
/// port-level setting) in the deciding PeerAuthentication's namespace.
pub(super) fn strict_policy(resolution: &MtlsResolution) -> Option<Policy> {
    if resolution.mode != MtlsMode::Strict {
        return None;
    }
    let source = resolution.source.as_ref()?;
    let (namespace, name) = source
        .peer_authentication
        .split_once('/')
        .unwrap_or(("", source.peer_authentication.as_str()));
    let name = match source.level {
        MtlsLevel::Port => format!("converted_peer_authentication_{name}"),
        _ => "istio_converted_static_strict".to_string(),
    };
    let plaintext = Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    };
    Some(Policy {
        name,
        namespace: namespace.to_string(),
        scope: PolicyScope::Global,
        action: PolicyAction::Deny,
        dry_run: false,
        rules: vec![vec![vec![plaintext]]],
    })
}
