//! `/config_dump` and `/connections` (layer L5): the documents of [`super::schema`], built
//! from the current snapshot, certificates, pods and open connections. The shapes and why they
//! are ztunnel's are in `schema`; this file only fills them in, as pure functions of their
//! inputs so that tests can build a dump from a model of their own.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;

use super::schema::{
    ApplicationTunnelDump, CertificateDump, CertificateInfo, ConfigDump, ConnectionDump,
    EffectiveConfig, EgressDump, EndpointDump, GatewayDump, LearnedAddressDump, LearnedGrantDump,
    PodInfo, PodState, PolicyDump, ServiceDump, VersionDump, WorkloadDump, WorkloadStateDump,
};
use super::AdminState;
use crate::capture::PodStatus;
use crate::identity::CertificateStatus;
use crate::net::NetworkAddress;
use crate::state::learned::LearnedDestinations;
use crate::state::{GatewayAddress, Service, Snapshot, Workload};
use crate::telemetry::metrics::OpenConnection;
use crate::telemetry::Direction;

/// Everything a dump is built from, taken once per request.
pub(super) struct DumpInputs<'a> {
    /// The model.
    pub snapshot: &'a Snapshot,
    /// Every identity's certificate state.
    pub certificates: Vec<CertificateStatus>,
    /// Captured pods by workload uid.
    pub pods: BTreeMap<String, PodStatus>,
    /// Open connections.
    pub connections: Vec<OpenConnection>,
    /// The effective configuration.
    pub config: &'a EffectiveConfig,
    /// Every captured pod's DNS-learned allow set, by workload uid.
    pub learned: BTreeMap<String, Vec<LearnedAddressDump>>,
}

/// `/config_dump` of the running agent.
pub(super) fn config_dump(admin: &AdminState) -> ConfigDump {
    let snapshot = admin.state.snapshot();
    build(DumpInputs {
        snapshot: &snapshot,
        certificates: admin.certificates.statuses(),
        pods: admin.pods.status(),
        connections: admin.metrics.connections(),
        config: &admin.config,
        learned: learned_dump(&admin.pods.learned(), tokio::time::Instant::now()),
    })
}

/// The learned sets as they stand at `now` (expired grants left out, empty pods too).
pub(super) fn learned_dump(
    sets: &BTreeMap<String, std::sync::Arc<LearnedDestinations>>,
    now: tokio::time::Instant,
) -> BTreeMap<String, Vec<LearnedAddressDump>> {
    sets.iter()
        .map(|(uid, set)| {
            let addresses: Vec<LearnedAddressDump> = set
                .entries(now)
                .into_iter()
                .map(|(address, grants)| LearnedAddressDump {
                    address: Some(address),
                    grants: grants
                        .iter()
                        .map(|grant| LearnedGrantDump {
                            service_entry: format!(
                                "{}/{}",
                                grant.entry.namespace, grant.entry.name
                            ),
                            host: grant.host.to_string(),
                            expires_in_seconds: grant
                                .expires
                                .saturating_duration_since(now)
                                .as_secs(),
                        })
                        .collect(),
                })
                .collect();
            (uid.clone(), addresses)
        })
        .filter(|(_, addresses)| !addresses.is_empty())
        .collect()
}

/// `/connections` of the running agent.
pub(super) fn connections(admin: &AdminState) -> Vec<ConnectionDump> {
    admin.metrics.connections().iter().map(connection).collect()
}

/// The dump of `inputs`, sorted (workloads by uid, services by key) so that two dumps of one
/// model are equal.
pub(super) fn build(inputs: DumpInputs<'_>) -> ConfigDump {
    let snapshot = inputs.snapshot;
    let mut workloads: Vec<&Workload> = snapshot.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = snapshot.services().map(|s| s.as_ref()).collect();
    services.sort_by_key(|service| service.key());
    let authorization = snapshot.authorization();
    ConfigDump {
        services: services
            .iter()
            .map(|service| service_dump(service, &workloads))
            .collect(),
        workloads: workloads
            .iter()
            .map(|workload| workload_dump(workload))
            .collect(),
        policies: authorization
            .policies
            .iter()
            .map(|entry| PolicyDump {
                policy: entry.policy.clone(),
                selector: entry.selector.clone(),
            })
            .collect(),
        peer_authentications: authorization.peer_authentications.clone(),
        certificates: inputs.certificates.iter().map(certificate_dump).collect(),
        workload_state: workload_state(snapshot, inputs.pods, &inputs.connections),
        egress: Some(egress_dump(snapshot.egress(), inputs.learned)),
        inbound_limits: snapshot
            .inbound_limits()
            .0
            .iter()
            .map(|limit| limit.as_ref().clone())
            .collect(),
        config: Some(inputs.config.clone()),
        version: Some(VersionDump {
            version: env!("CARGO_PKG_VERSION").to_string(),
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        }),
    }
}

/// The egress model; a value that cannot be serialized (none of its types can fail) would
/// show as `null` rather than hide the rest of the dump.
fn egress_dump(
    egress: &crate::state::egress::Egress,
    learned: BTreeMap<String, Vec<LearnedAddressDump>>,
) -> EgressDump {
    EgressDump {
        outbound_traffic_policy: json(&egress.policy),
        service_entries: egress
            .service_entries
            .iter()
            .map(|entry| json(entry.as_ref()))
            .collect(),
        destination_rules: egress
            .destination_rules
            .0
            .iter()
            .map(|rule| json(rule.as_ref()))
            .collect(),
        learned_destinations: learned,
    }
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn workload_dump(workload: &Workload) -> WorkloadDump {
    WorkloadDump {
        uid: workload.uid.clone(),
        workload_ips: workload.workload_ips.clone(),
        waypoint: workload.waypoint.as_ref().map(gateway_dump),
        protocol: workload.protocol,
        name: workload.name.clone(),
        namespace: workload.namespace.clone(),
        trust_domain: workload.trust_domain.clone(),
        service_account: workload.service_account.clone(),
        network: workload.network.clone(),
        workload_name: workload.workload_name.clone(),
        workload_type: workload.workload_type.clone(),
        canonical_name: workload.canonical_name.clone(),
        canonical_revision: workload.canonical_revision.clone(),
        hostname: workload.hostname.clone(),
        node: workload.node.clone(),
        application_tunnel: workload.application_tunnel.as_ref().map(|tunnel| {
            ApplicationTunnelDump {
                protocol: tunnel.protocol,
                port: tunnel.port,
            }
        }),
        authorization_policies: workload.authorization_policies.clone(),
        status: workload.status,
        cluster_id: workload.cluster_id.clone(),
        capacity: 1,
        services: workload.services.keys().cloned().collect(),
        identity: workload.identity.to_string(),
        labels: workload.labels.clone(),
    }
}

/// `network/IP` or `namespace/hostname`, the one string istioctl reads.
fn gateway_dump(gateway: &GatewayAddress) -> GatewayDump {
    GatewayDump {
        destination: gateway.destination.to_string(),
        hbone_mtls_port: gateway.hbone_mtls_port,
    }
}

/// A service with its endpoints: every workload (of `workloads`) that lists it.
fn service_dump(service: &Service, workloads: &[&Workload]) -> ServiceDump {
    let key = service.key();
    let endpoints = workloads
        .iter()
        .filter_map(|workload| {
            let ports = workload.services.get(&key)?;
            let endpoint = EndpointDump {
                workload_uid: workload.uid.clone(),
                service: key.clone(),
                address: workload.workload_ips.first().map(|ip| NetworkAddress {
                    network: workload.network.clone(),
                    ip: *ip,
                }),
                port: ports.clone(),
                status: workload.status,
            };
            Some((workload.uid.clone(), endpoint))
        })
        .collect();
    ServiceDump {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        hostname: service.hostname.clone(),
        vips: service.vips.clone(),
        ports: service.ports.clone(),
        endpoints,
        subject_alt_names: service
            .subject_alt_names
            .iter()
            .map(ToString::to_string)
            .collect(),
        waypoint: service.waypoint.as_ref().map(gateway_dump),
    }
}

fn certificate_dump(status: &CertificateStatus) -> CertificateDump {
    CertificateDump {
        identity: status.identity.to_string(),
        state: status.state.to_string(),
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
    }
}

/// One certificate as ztunnel dumps it.
fn certificate_info(der: &CertificateDer<'_>) -> CertificateInfo {
    let mut info = CertificateInfo {
        pem: BASE64.encode(pem(der)),
        ..CertificateInfo::default()
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

fn infos(certificates: &[CertificateDer<'_>]) -> Vec<CertificateInfo> {
    certificates.iter().map(certificate_info).collect()
}

/// The PEM text of a DER certificate (RFC 7468: 64-character lines).
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

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// One open connection with ztunnel's names and ours.
fn connection(open: &OpenConnection) -> ConnectionDump {
    let info = &open.info;
    ConnectionDump {
        src: info.src_addr.clone(),
        original_dst: Some(info.original_dst.clone()).filter(|dst| !dst.is_empty()),
        actual_dst: info.dst_addr.clone(),
        protocol: info.protocol,
        direction: info.direction.to_string(),
        src_workload: info.src_workload_uid().to_string(),
        dst_workload: info.dst_workload_uid().to_string(),
        src_identity: info
            .src_identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        dst_identity: info
            .dst_identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        bytes_sent: open.bytes_sent,
        bytes_received: open.bytes_received,
        age_seconds: open.age_seconds,
    }
}

/// Per captured pod: `Up` or `Pending`, who it is, and its open connections by direction.
fn workload_state(
    snapshot: &Snapshot,
    pods: BTreeMap<String, PodStatus>,
    connections: &[OpenConnection],
) -> BTreeMap<String, WorkloadStateDump> {
    let mut by_workload: BTreeMap<String, WorkloadStateDump> = pods
        .into_iter()
        .map(|(uid, status)| {
            let entry = WorkloadStateDump {
                state: match status {
                    PodStatus::Running { .. } => PodState::Up,
                    PodStatus::Failed { .. } => PodState::Pending,
                },
                info: pod_info(snapshot.workload(&uid).map(|w| w.as_ref()), status),
                connections: Default::default(),
            };
            (uid, entry)
        })
        .collect();
    for open in connections {
        let inbound = open.info.direction == Direction::Inbound;
        let owner = if inbound {
            open.info.dst_workload_uid()
        } else {
            open.info.src_workload_uid()
        };
        let Some(entry) = by_workload.get_mut(owner) else {
            continue;
        };
        let list = if inbound {
            &mut entry.connections.inbound
        } else {
            &mut entry.connections.outbound
        };
        list.push(connection(open));
    }
    by_workload
}

/// Who a pod is (from the model; empty if it left the model) and how it was captured.
fn pod_info(workload: Option<&Workload>, status: PodStatus) -> PodInfo {
    let (netns, source, reason) = match status {
        PodStatus::Running { netns, source } => (netns, source, None),
        PodStatus::Failed {
            netns,
            source,
            reason,
        } => (netns, source, Some(reason)),
    };
    let field = |pick: fn(&Workload) -> &String| workload.map(pick).cloned().unwrap_or_default();
    PodInfo {
        name: field(|w| &w.name),
        namespace: field(|w| &w.namespace),
        trust_domain: field(|w| &w.trust_domain),
        service_account: field(|w| &w.service_account),
        netns,
        source: Some(source),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::BuiltinCa;
    use crate::spiffe::Identity;

    #[test]
    fn certificates_are_dumped_as_base64_pem_with_serial_and_validity() {
        let (cert, key) = BuiltinCa::generate_root("dump test").expect("root");
        let ca = BuiltinCa::from_pem(&cert, &key, Duration::from_secs(3600)).expect("ca");
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b"
            .parse()
            .expect("identity");
        let leaf = ca.issue(&identity).expect("leaf");
        let der = &leaf.chain()[0];
        let info = certificate_info(der);

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

        let garbage = certificate_info(&CertificateDer::from(vec![1, 2, 3]));
        assert!(garbage.serial_number.is_empty() && garbage.valid_from.is_empty());
        assert!(!garbage.pem.is_empty(), "still shown, as it was given");
    }
}
