//! `/config_dump` (layer L5): everything the agent acts on, in one JSON document whose top-level
//! names follow Istio's ztunnel dump where they overlap (`workloads`, `services`, `policies`,
//! `certificates`, `workloadState`, `config`, `version`).
//!
//! Certificates are dumped as ztunnel dumps them, so `istioctl ztunnel-config certificates`-style
//! tools read ours: per identity `certChain` (leaf first, then intermediates) and `rootCerts`,
//! each certificate with `pem` (the PEM text, base64-encoded as ztunnel does), `serialNumber`
//! (decimal), `validFrom` and `expirationTime` (RFC 3339).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use super::AdminState;
use crate::capture::PodStatus;
use crate::spiffe::Identity;
use crate::state::{Service, Workload};
use crate::telemetry::metrics::OpenConnection;

/// The effective agent configuration as the dump shows it (after overrides and defaults).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveConfig {
    /// This node's name.
    pub node: String,
    /// The config file being watched.
    pub config_path: PathBuf,
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Readiness address.
    pub readiness_addr: SocketAddr,
    /// How long shutdown waits for connections.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often the config file is checked.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Whether pods come from istio-cni over ZDS.
    pub zds_enabled: bool,
    /// Whether the agent installs redirection rules itself.
    pub install_rules: bool,
    /// istiod's xDS address, when workloads come from istiod.
    pub xds_address: Option<String>,
    /// The Istio CA's address; `None` means the built-in CA signs.
    pub ca_address: Option<String>,
    /// The cluster id sent to istiod.
    pub cluster_id: String,
    /// Whether every captured pod gets the DNS proxy (ztunnel's field).
    pub dns_proxy: bool,
    /// Where the DNS proxy listens inside each pod (ztunnel's field and form).
    pub dns_proxy_addr: String,
    /// The cluster's DNS domain (ztunnel's field).
    pub cluster_domain: String,
    /// Where names outside the mesh are forwarded.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Deadline of one forwarded query.
    #[serde(with = "humantime_serde")]
    pub dns_forward_timeout: Duration,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateDump {
    identity: Identity,
    /// `Available`, `Initializing`, `Unavailable: <why>` or `Expired`.
    state: String,
    cert_chain: Vec<CertificateInfo>,
    root_certs: Vec<CertificateInfo>,
}

/// One certificate; the fields other than `pem` are empty if it does not parse as X.509.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateInfo {
    pem: String,
    serial_number: String,
    valid_from: String,
    expiration_time: String,
}

impl CertificateInfo {
    fn of(der: &CertificateDer<'_>) -> Self {
        let mut info = CertificateInfo {
            pem: BASE64.encode(pem(der)),
            serial_number: String::new(),
            valid_from: String::new(),
            expiration_time: String::new(),
        };
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der.as_ref()) {
            let time = |t: x509_parser::time::ASN1Time| {
                let seconds = u64::try_from(t.timestamp()).unwrap_or(0);
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
            };
            info.serial_number = parsed.tbs_certificate.serial.to_string();
            info.valid_from = time(parsed.validity().not_before);
            info.expiration_time = time(parsed.validity().not_after);
        }
        info
    }
}

/// The PEM text of a DER certificate (RFC 7468: 64-character lines).
fn infos(certificates: &[CertificateDer<'_>]) -> Vec<CertificateInfo> {
    certificates.iter().map(CertificateInfo::of).collect()
}

fn pem(der: &CertificateDer<'_>) -> String {
    let body = BASE64.encode(der.as_ref());
    let mut text = String::from("-----BEGIN CERTIFICATE-----\n");
    let mut rest = body.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        text.push_str(line);
        text.push('\n');
        rest = tail;
    }
    text.push_str("-----END CERTIFICATE-----\n");
    text
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadState {
    state: &'static str,
    info: PodStatus,
    connections: Connections,
}

#[derive(Serialize, Default)]
struct Connections {
    inbound: Vec<OpenConnection>,
    outbound: Vec<OpenConnection>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Version {
    version: &'static str,
    build_profile: &'static str,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Builds the dump from the current snapshot, certificates, pods and open connections.
pub(super) fn config_dump(admin: &AdminState) -> serde_json::Value {
    let snapshot = admin.state.snapshot();
    let mut workloads: Vec<&Workload> = snapshot.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = snapshot.services().map(|s| s.as_ref()).collect();
    services.sort_by_key(|service| service.key());
    let authorization = snapshot.authorization();
    let certificates: Vec<CertificateDump> = admin
        .certificates
        .statuses()
        .into_iter()
        .map(|status| CertificateDump {
            state: status.state.to_string(),
            identity: status.identity,
            cert_chain: status
                .certificate
                .as_ref()
                .map_or_else(Vec::new, |certificate| infos(certificate.chain())),
            root_certs: status
                .certificate
                .as_ref()
                .map_or_else(Vec::new, |certificate| {
                    infos(certificate.root_certificates())
                }),
        })
        .collect();
    serde_json::json!({
        "workloads": workloads,
        "services": services,
        "policies": authorization.policies,
        "peerAuthentications": authorization.peer_authentications,
        "certificates": certificates,
        "workloadState": workload_state(admin),
        "config": admin.config,
        "version": Version {
            version: env!("CARGO_PKG_VERSION"),
            build_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        },
    })
}

/// Per captured pod: `Up` or `Pending`, its status, and its open connections by direction.
fn workload_state(admin: &AdminState) -> BTreeMap<String, WorkloadState> {
    let mut by_workload: BTreeMap<String, WorkloadState> = admin
        .pods
        .status()
        .into_iter()
        .map(|(uid, info)| {
            let state = match info {
                PodStatus::Running { .. } => "Up",
                PodStatus::Failed { .. } => "Pending",
            };
            let entry = WorkloadState {
                state,
                info,
                connections: Connections::default(),
            };
            (uid, entry)
        })
        .collect();
    for connection in admin.metrics.connections() {
        let inbound = connection.info.direction == "inbound";
        let owner = if inbound {
            &connection.info.dst_workload
        } else {
            &connection.info.src_workload
        };
        let Some(entry) = by_workload.get_mut(owner) else {
            continue;
        };
        if inbound {
            entry.connections.inbound.push(connection);
        } else {
            entry.connections.outbound.push(connection);
        }
    }
    by_workload
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::BuiltinCa;

    #[test]
    fn certificates_are_dumped_as_base64_pem_with_serial_and_validity() {
        let (cert, key) = BuiltinCa::generate_root("dump test").expect("root");
        let ca = BuiltinCa::from_pem(&cert, &key, Duration::from_secs(3600)).expect("ca");
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b"
            .parse()
            .expect("identity");
        let leaf = ca.issue(&identity).expect("leaf");
        let der = &leaf.chain()[0];
        let info = CertificateInfo::of(der);

        let text = String::from_utf8(BASE64.decode(&info.pem).expect("base64")).expect("utf-8");
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"), "{text}");
        assert!(text.ends_with("\n-----END CERTIFICATE-----\n"), "{text}");
        assert!(text.lines().all(|line| line.len() <= 64), "{text}");
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes()).expect("PEM");
        assert_eq!(pem.contents, der.as_ref(), "the PEM holds the same DER");
        let parsed = pem.parse_x509().expect("X.509");
        assert_eq!(
            info.serial_number,
            parsed.tbs_certificate.serial.to_string()
        );
        assert_eq!(info.valid_from, rfc3339(leaf.not_before()));
        assert_eq!(info.expiration_time, rfc3339(leaf.expires_at()));

        let garbage = CertificateInfo::of(&CertificateDer::from(vec![1, 2, 3]));
        assert!(garbage.serial_number.is_empty() && garbage.valid_from.is_empty());
        assert!(!garbage.pem.is_empty(), "still shown, as it was given");
    }
}
