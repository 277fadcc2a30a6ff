//! `/config_dump` read as `istioctl ztunnel-config` reads it.
//!
//! The structs below mirror istioctl's Go types field for field: istio/istio
//! `istioctl/pkg/writer/ztunnel/configdump/api.go` at commit
//! d929cf5b80ce5267361fbe184136ed70b809a8ef (the version with `capacity`, `rootCerts` and the
//! connections' `protocol`), with the JSON names of its tags and the Rust type of each Go type.
//! They decode as Go's `encoding/json` does: unknown fields are ignored and `null` or a missing
//! field leaves the zero value (hence `Option` everywhere), but a value of another type fails
//! the whole decode, as it fails the whole istioctl command. The dump is built from a model
//! with every kind of object in it; then every field istioctl prints is checked to be there,
//! since Go leaves a renamed field blank instead of failing.
#![allow(clippy::unwrap_used)]
// a failed unwrap is a failed test
// The mirror keeps every field of istioctl's types, read or not: each one's type is checked.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::dump::{build, DumpInputs};
use super::schema::EffectiveConfig;
use crate::capture::{PodSource, PodStatus};
use crate::identity::ca::BuiltinCa;
use crate::identity::{CertificateState, CertificateStatus};
use crate::state::{TunnelProtocol, Workload};
use crate::telemetry::metrics::{ConnectionInfo, OpenConnection};
use crate::telemetry::Direction;

/// A Go `string`: `null` or missing decodes to the zero value.
type GoString = Option<String>;
/// A Go slice: `null` or missing decodes to nil.
type GoSlice<T> = Option<Vec<T>>;
/// `[]*PolicyMatch`: one clause.
type Clause = GoSlice<Option<PolicyMatch>>;

/// `ZtunnelDump` as `ConfigWriter.Prime` fills it (lists or maps of the same items).
#[derive(Debug, Clone, Deserialize)]
struct ZtunnelDump {
    workloads: Option<Vec<ZtunnelWorkload>>,
    services: Option<Vec<ZtunnelService>>,
    policies: Option<Vec<ZtunnelPolicy>>,
    certificates: Option<Vec<CertsDump>>,
    // Go's field matching is case-insensitive: `workloadstate` in Prime's rawDump.
    #[serde(rename = "workloadState")]
    workload_state: Option<BTreeMap<String, WorkloadState>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Locality {
    region: GoString,
    zone: GoString,
    subzone: GoString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ZtunnelWorkload {
    uid: GoString,
    #[serde(rename = "workloadIps")]
    workload_ips: Option<Vec<String>>,
    waypoint: Option<GatewayAddress>,
    network_gateway: Option<GatewayAddress>,
    protocol: GoString,
    name: GoString,
    namespace: GoString,
    service_account: GoString,
    workload_name: GoString,
    workload_type: GoString,
    canonical_name: GoString,
    canonical_revision: GoString,
    cluster_id: GoString,
    trust_domain: GoString,
    locality: Option<Locality>,
    node: GoString,
    network: GoString,
    status: GoString,
    hostname: GoString,
    capacity: Option<u32>,
    application_tunnel: Option<ApplicationTunnel>,
    authorization_policies: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct ApplicationTunnel {
    protocol: GoString,
    port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
struct GatewayAddress {
    destination: GoString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancer {
    mode: GoString,
    routing_preferences: Option<Vec<String>>,
    health_policy: GoString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ZtunnelEndpoint {
    workload_uid: GoString,
    service: GoString,
    address: GoString,
    port: Option<BTreeMap<u16, u16>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ZtunnelService {
    name: GoString,
    namespace: GoString,
    hostname: GoString,
    #[serde(rename = "vips")]
    addresses: Option<Vec<String>>,
    ports: Option<BTreeMap<String, i64>>,
    load_balancer: Option<LoadBalancer>,
    waypoint: Option<GatewayAddress>,
    endpoints: Option<BTreeMap<String, Option<ZtunnelEndpoint>>>,
    subject_alt_names: Option<Vec<String>>,
    ip_families: GoString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyMatch {
    namespaces: Option<Vec<StringMatch>>,
    not_namespaces: Option<Vec<StringMatch>>,
    principals: Option<Vec<StringMatch>>,
    not_principals: Option<Vec<StringMatch>>,
    source_ips: Option<Vec<String>>,
    not_source_ips: Option<Vec<String>>,
    destination_ips: Option<Vec<String>>,
    not_destination_ips: Option<Vec<String>>,
    destination_ports: Option<Vec<u16>>,
    not_destination_ports: Option<Vec<u16>>,
    service_accounts: Option<Vec<ServiceAccountMatch>>,
    not_service_accounts: Option<Vec<ServiceAccountMatch>>,
}

#[derive(Debug, Clone, Deserialize)]
struct StringMatch {
    #[serde(rename = "Exact")]
    exact: GoString,
    #[serde(rename = "Suffix")]
    suffix: GoString,
    #[serde(rename = "Prefix")]
    prefix: GoString,
    /// Go's `any`: every JSON value decodes.
    #[serde(rename = "Presence")]
    presence: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccountMatch {
    namespace: GoString,
    service_account: GoString,
}

#[derive(Debug, Clone, Deserialize)]
struct ZtunnelPolicy {
    name: GoString,
    namespace: GoString,
    scope: GoString,
    action: GoString,
    rules: GoSlice<GoSlice<Clause>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertsDump {
    identity: GoString,
    state: GoString,
    cert_chain: Option<Vec<Option<Cert>>>,
    #[serde(rename = "rootCerts")]
    root_cert: Option<Vec<Option<Cert>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cert {
    pem: GoString,
    serial_number: GoString,
    valid_from: GoString,
    expiration_time: GoString,
}

#[derive(Debug, Clone, Deserialize)]
struct WorkloadState {
    state: GoString,
    connections: Option<WorkloadConnections>,
    info: Option<WorkloadInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct WorkloadConnections {
    inbound: Option<Vec<Connection>>,
    outbound: Option<Vec<Connection>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadInfo {
    name: GoString,
    namespace: GoString,
    trust_domain: GoString,
    service_account: GoString,
}

/// `InboundConnection` and `OutboundConnection` have the same fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Connection {
    src: GoString,
    original_dst: GoString,
    actual_dst: GoString,
    protocol: GoString,
}

/// A model with a waypoint by address and by hostname, an application tunnel, services with
/// endpoints, a policy with every match kind (written in ztunnel's tag form) and an Istio
/// resource with a selector.
const MODEL: &str = "workloads:
- uid: Kubernetes//Pod/app/client
  name: client
  namespace: app
  serviceAccount: client
  workloadIps: [10.0.1.2]
  protocol: HBONE
  node: node-a
  waypoint: {destination: app/waypoint.app.svc.cluster.local, hboneMtlsPort: 15008}
  labels: {app: client}
- uid: Kubernetes//Pod/app/server
  name: server
  namespace: app
  serviceAccount: server
  workloadIps: [10.0.2.7]
  protocol: HBONE
  node: node-b
  network: net1
  waypoint: {destination: /10.96.0.9}
  workloadName: server
  workloadType: deployment
  canonicalName: server
  canonicalRevision: v1
  authorizationPolicies: [app/allow-client]
  services:
    app/echo.app.svc.cluster.local: {80: 8080}
  labels: {app: server}
- uid: Kubernetes//Pod/app/waypoint
  name: waypoint
  namespace: app
  serviceAccount: waypoint
  workloadIps: [10.0.3.9]
  protocol: HBONE
  node: node-b
  applicationTunnel: {protocol: PROXY, port: 15088}
  services:
    app/waypoint.app.svc.cluster.local: {15008: 15008}
services:
- name: echo
  namespace: app
  hostname: echo.app.svc.cluster.local
  vips: [net1/10.96.0.10]
  ports: {80: 8080}
  subjectAltNames: [spiffe://cluster.local/ns/app/sa/server]
  waypoint: {destination: app/waypoint.app.svc.cluster.local}
- name: waypoint
  namespace: app
  hostname: waypoint.app.svc.cluster.local
  vips: [/10.96.0.9]
  ports: {15008: 15008}
policies:
- name: allow-client
  namespace: app
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/app/sa/client, !Prefix cluster.local/ns/ops-]
        notPrincipals: [!Suffix /sa/legacy]
        namespaces: [!Presence []]
        serviceAccounts: [{namespace: app, serviceAccount: client}]
        sourceIps: [10.0.0.0/8]
        notDestinationIps: [10.9.0.0/16]
        destinationPorts: [8080]
        notDestinationPorts: [9999]
istioResources:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-legacy, namespace: app}
  spec:
    selector: {matchLabels: {app: server}}
    action: DENY
    rules:
    - from: [{source: {namespaces: [legacy]}}]
";

fn effective_config() -> EffectiveConfig {
    EffectiveConfig {
        node: "node-b".to_string(),
        config_path: PathBuf::from("/etc/nodetunnel/config.yaml"),
        admin_addr: "127.0.0.1:15000".parse().unwrap(),
        metrics_addr: "[::]:15020".parse().unwrap(),
        readiness_addr: "[::]:15021".parse().unwrap(),
        drain_timeout: Duration::from_secs(5),
        reload_interval: Duration::from_secs(1),
        zds_enabled: false,
        install_rules: true,
        xds_address: None,
        ca_address: None,
        cluster_id: "Kubernetes".to_string(),
        dns_proxy: true,
        dns_proxy_addr: "localhost:15053".to_string(),
        cluster_domain: "cluster.local".to_string(),
        dns_upstreams: vec!["10.96.0.10:53".parse().unwrap()],
        dns_forward_timeout: Duration::from_secs(4),
    }
}

/// An open connection of `workload` (`direction` from its point of view).
fn open(
    direction: Direction,
    src: &str,
    original: &str,
    actual: &str,
    workloads: [Option<&Arc<Workload>>; 2],
) -> OpenConnection {
    OpenConnection {
        info: ConnectionInfo {
            direction,
            src_addr: src.to_string(),
            dst_addr: actual.to_string(),
            original_dst: original.to_string(),
            protocol: TunnelProtocol::Hbone,
            src_workload: workloads[0].cloned(),
            dst_workload: workloads[1].cloned(),
            src_identity: "spiffe://cluster.local/ns/app/sa/client".parse().ok(),
            dst_identity: "spiffe://cluster.local/ns/app/sa/server".parse().ok(),
        },
        bytes_sent: 4,
        bytes_received: 4,
        age_seconds: 1.0,
    }
}

/// The dump of [`MODEL`] with one issued certificate, one pending, two pods (one up, one
/// failed) and an inbound and an outbound connection, as JSON text.
fn dump_text() -> String {
    let config = crate::config::parse(
        Path::new("model.yaml"),
        MODEL,
        &crate::config::Overrides::default(),
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    let snapshot = config.snapshot();
    let (cert, key) = BuiltinCa::generate_root("istioctl test").unwrap();
    let ca = BuiltinCa::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
    let server = "spiffe://cluster.local/ns/app/sa/server".parse().unwrap();
    let certificates = vec![
        CertificateStatus {
            certificate: Some(std::sync::Arc::new(ca.issue(&server).unwrap())),
            identity: server,
            state: CertificateState::Available,
        },
        CertificateStatus {
            identity: "spiffe://cluster.local/ns/app/sa/waypoint".parse().unwrap(),
            certificate: None,
            state: CertificateState::Unavailable("CA unreachable".to_string()),
        },
    ];
    let pods = BTreeMap::from([
        (
            "Kubernetes//Pod/app/server".to_string(),
            PodStatus::Running {
                netns: PathBuf::from("/run/netns/server"),
                source: PodSource::Cni,
            },
        ),
        (
            "Kubernetes//Pod/app/waypoint".to_string(),
            PodStatus::Failed {
                netns: PathBuf::from("/run/netns/waypoint"),
                source: PodSource::Api,
                reason: "nft failed".to_string(),
            },
        ),
    ]);
    let server_uid = "Kubernetes//Pod/app/server";
    let client_uid = "Kubernetes//Pod/app/client";
    let connections = vec![
        open(
            Direction::Inbound,
            "10.0.1.2:40000",
            "echo.app.svc.cluster.local",
            "10.0.2.7:8080",
            [snapshot.workload(client_uid), snapshot.workload(server_uid)],
        ),
        open(
            Direction::Outbound,
            "10.0.2.7:41000",
            "10.96.0.10:80",
            "10.0.3.9:15008",
            [snapshot.workload(server_uid), None],
        ),
    ];
    let effective = effective_config();
    let dump = build(DumpInputs {
        snapshot: &snapshot,
        certificates,
        pods,
        connections,
        config: &effective,
        learned: BTreeMap::new(),
    });
    serde_json::to_string_pretty(&dump).unwrap()
}

fn text(value: &GoString) -> &str {
    value.as_deref().unwrap_or_default()
}

/// istioctl's `waypointName`: the service whose `namespace/hostname` or a VIP is the
/// destination, `None` without a waypoint, `NA` when nothing matches.
fn waypoint_name(waypoint: Option<&GatewayAddress>, services: &[ZtunnelService]) -> String {
    let Some(waypoint) = waypoint else {
        return "None".to_string();
    };
    let destination = text(&waypoint.destination);
    services
        .iter()
        .find(|service| {
            format!("{}/{}", text(&service.namespace), text(&service.hostname)) == destination
                || service
                    .addresses
                    .iter()
                    .flatten()
                    .any(|address| address == destination)
        })
        .map_or_else(
            || "NA".to_string(),
            |service| text(&service.name).to_string(),
        )
}

#[test]
fn istioctl_decodes_the_dump_and_finds_every_column() {
    let text_dump = dump_text();
    let dump: ZtunnelDump = serde_json::from_str(&text_dump)
        .unwrap_or_else(|error| panic!("istioctl would fail: {error}\n{text_dump}"));

    // `ztunnel-config workloads`: NAMESPACE, POD NAME, ADDRESS, NODE, WAYPOINT, PROTOCOL.
    let workloads = dump.workloads.unwrap();
    let services = dump.services.unwrap();
    let rows: Vec<[String; 6]> = workloads
        .iter()
        .map(|workload| {
            [
                text(&workload.namespace).to_string(),
                text(&workload.name).to_string(),
                workload.workload_ips.clone().unwrap_or_default().join(","),
                text(&workload.node).to_string(),
                waypoint_name(workload.waypoint.as_ref(), &services),
                text(&workload.protocol).to_string(),
            ]
        })
        .collect();
    assert_eq!(
        rows,
        [
            ["app", "client", "10.0.1.2", "node-a", "waypoint", "HBONE"],
            ["app", "server", "10.0.2.7", "node-b", "waypoint", "HBONE"],
            ["app", "waypoint", "10.0.3.9", "node-b", "None", "HBONE"],
        ]
        .map(|row| row.map(str::to_string))
    );
    let server = &workloads[1];
    for (field, value) in [
        ("uid", &server.uid),
        ("serviceAccount", &server.service_account),
        ("trustDomain", &server.trust_domain),
        ("workloadName", &server.workload_name),
        ("workloadType", &server.workload_type),
        ("canonicalName", &server.canonical_name),
        ("canonicalRevision", &server.canonical_revision),
        ("clusterId", &server.cluster_id),
        ("network", &server.network),
        ("status", &server.status),
    ] {
        assert!(!text(value).is_empty(), "workload {field} is blank");
    }
    assert_eq!(text(&server.status), "Healthy");
    assert_eq!(server.capacity, Some(1));
    assert_eq!(
        server.authorization_policies.as_deref(),
        Some(["app/allow-client".to_string()].as_slice())
    );
    let tunnel = workloads[2].application_tunnel.as_ref().unwrap();
    assert_eq!(
        (text(&tunnel.protocol), tunnel.port),
        ("PROXY", Some(15088))
    );

    // `ztunnel-config services`: NAMESPACE, SERVICE NAME, SERVICE VIP, WAYPOINT, ENDPOINTS
    // (healthy/all, healthy by the endpoint's workload uid).
    let rows: Vec<[String; 5]> = services
        .iter()
        .map(|service| {
            let endpoints = service.endpoints.clone().unwrap_or_default();
            let healthy = endpoints
                .values()
                .flatten()
                .filter(|endpoint| {
                    workloads.iter().any(|workload| {
                        workload.uid == endpoint.workload_uid && text(&workload.status) == "Healthy"
                    })
                })
                .count();
            let vips: Vec<&str> = service
                .addresses
                .iter()
                .flatten()
                .map(|address| address.split_once('/').map_or("", |(_, ip)| ip))
                .collect();
            [
                text(&service.namespace).to_string(),
                text(&service.name).to_string(),
                vips.join(","),
                waypoint_name(service.waypoint.as_ref(), &services),
                format!("{healthy}/{}", endpoints.len()),
            ]
        })
        .collect();
    assert_eq!(
        rows,
        [
            ["app", "echo", "10.96.0.10", "waypoint", "1/1"],
            ["app", "waypoint", "10.96.0.9", "None", "1/1"],
        ]
        .map(|row| row.map(str::to_string))
    );
    let echo = &services[0];
    let endpoint = echo.endpoints.as_ref().unwrap()["Kubernetes//Pod/app/server"]
        .as_ref()
        .unwrap();
    assert_eq!(text(&endpoint.service), "app/echo.app.svc.cluster.local");
    assert_eq!(text(&endpoint.address), "net1/10.0.2.7");
    assert_eq!(endpoint.port, Some(BTreeMap::from([(80, 8080)])));
    assert_eq!(echo.ports, Some(BTreeMap::from([("80".to_string(), 8080)])));
    assert_eq!(
        echo.subject_alt_names.as_deref(),
        Some(["spiffe://cluster.local/ns/app/sa/server".to_string()].as_slice())
    );

    // `ztunnel-config policies`: NAMESPACE, POLICY NAME, ACTION, SCOPE, and the rules.
    let policies = dump.policies.unwrap();
    let rows: Vec<[&str; 4]> = policies
        .iter()
        .map(|policy| {
            [
                text(&policy.namespace),
                text(&policy.name),
                text(&policy.action),
                text(&policy.scope),
            ]
        })
        .collect();
    assert_eq!(
        rows,
        [
            ["app", "allow-client", "Allow", "WorkloadSelector"],
            ["app", "deny-legacy", "Deny", "WorkloadSelector"],
        ]
    );
    let rules = policies[0].rules.as_ref().unwrap();
    let matched = rules[0].as_ref().unwrap()[0].as_ref().unwrap()[0]
        .as_ref()
        .unwrap();
    let principals = matched.principals.as_ref().unwrap();
    assert_eq!(text(&principals[0].exact), "cluster.local/ns/app/sa/client");
    assert_eq!(text(&principals[1].prefix), "cluster.local/ns/ops-");
    assert_eq!(
        text(&matched.not_principals.as_ref().unwrap()[0].suffix),
        "/sa/legacy"
    );
    assert!(matched.namespaces.as_ref().unwrap()[0].presence.is_some());
    assert_eq!(
        text(&matched.service_accounts.as_ref().unwrap()[0].service_account),
        "client"
    );
    assert_eq!(
        matched.source_ips.as_deref(),
        Some(["10.0.0.0/8".to_string()].as_slice())
    );
    assert_eq!(
        matched.destination_ports.as_deref(),
        Some([8080].as_slice())
    );
    assert_eq!(
        matched.not_destination_ports.as_deref(),
        Some([9999].as_slice())
    );

    // `ztunnel-config certificates`.
    let certificates = dump.certificates.unwrap();
    let issued = &certificates[0];
    assert_eq!(
        (text(&issued.identity), text(&issued.state)),
        ("spiffe://cluster.local/ns/app/sa/server", "Available")
    );
    let leaf = issued.cert_chain.as_ref().unwrap()[0].as_ref().unwrap();
    for value in [
        &leaf.pem,
        &leaf.serial_number,
        &leaf.valid_from,
        &leaf.expiration_time,
    ] {
        assert!(!text(value).is_empty(), "{leaf:?}");
    }
    assert_eq!(issued.root_cert.as_ref().map(Vec::len), Some(1));
    assert_eq!(text(&certificates[1].state), "Unavailable: CA unreachable");

    // `ztunnel-config connections`: WORKLOAD (info name.namespace), DIRECTION, LOCAL, REMOTE,
    // REMOTE TARGET, PROTOCOL.
    let states = dump.workload_state.unwrap();
    let server_state = &states["Kubernetes//Pod/app/server"];
    assert_eq!(text(&server_state.state), "Up");
    let info = server_state.info.as_ref().unwrap();
    assert_eq!(
        [
            text(&info.name),
            text(&info.namespace),
            text(&info.trust_domain),
            text(&info.service_account)
        ],
        ["server", "app", "cluster.local", "server"]
    );
    let connections = server_state.connections.as_ref().unwrap();
    let row = |connection: &Connection| {
        [
            text(&connection.src).to_string(),
            text(&connection.original_dst).to_string(),
            text(&connection.actual_dst).to_string(),
            text(&connection.protocol).to_string(),
        ]
    };
    assert_eq!(
        connections
            .inbound
            .as_ref()
            .unwrap()
            .iter()
            .map(row)
            .collect::<Vec<_>>(),
        [[
            "10.0.1.2:40000",
            "echo.app.svc.cluster.local",
            "10.0.2.7:8080",
            "HBONE"
        ]
        .map(str::to_string)]
    );
    assert_eq!(
        connections
            .outbound
            .as_ref()
            .unwrap()
            .iter()
            .map(row)
            .collect::<Vec<_>>(),
        [["10.0.2.7:41000", "10.96.0.10:80", "10.0.3.9:15008", "HBONE"].map(str::to_string)]
    );
    assert_eq!(
        text(&states["Kubernetes//Pod/app/waypoint"].state),
        "Pending"
    );
}

#[test]
fn a_type_istioctl_does_not_expect_fails_the_decode() {
    // The shapes this dump had before it matched ztunnel's: each fails istioctl's decode, which
    // is what the test above would catch if one came back.
    let cases = [
        (
            "waypoint as an object",
            r#"{"workloads": [{"waypoint": {"destination": {"Address": "/10.0.0.1"}}}]}"#,
        ),
        (
            "VIP as an object",
            r#"{"services": [{"vips": [{"network": "", "ip": "10.0.0.1"}]}]}"#,
        ),
        (
            "endpoint ports as strings",
            r#"{"services": [{"endpoints": {"u": {"port": {"80": "8080"}}}}]}"#,
        ),
        (
            "a string match as a string",
            r#"{"policies": [{"rules": [[[{"principals": ["a"]}]]]}]}"#,
        ),
        (
            "info as a string",
            r#"{"workloadState": {"u": {"info": "running"}}}"#,
        ),
    ];
    for (case, json) in cases {
        assert!(
            serde_json::from_str::<ZtunnelDump>(json).is_err(),
            "{case}: decoded"
        );
    }
    // Unknown fields and nulls are fine for Go, and for the mirror.
    let lenient = r#"{"workloads": [{"uid": null, "identity": "x", "labels": {}}], "peerAuthentications": []}"#;
    assert!(serde_json::from_str::<ZtunnelDump>(lenient).is_ok());
}

/// The typed reader of our own CLI reads the same dump, so the two cannot drift apart.
#[test]
fn the_cli_reads_the_dump_it_writes() {
    let value: Value = serde_json::from_str(&dump_text()).unwrap();
    let workloads = super::tables::View::Workloads.render(&value).unwrap();
    assert!(
        workloads.contains("app        server    10.0.2.7  node-b  HBONE     spiffe://cluster.local/ns/app/sa/server"),
        "{workloads}"
    );
    let status = super::tables::View::Status.render(&value).unwrap();
    assert!(status.contains("pods:         1 up, 1 pending"), "{status}");
    assert!(status.contains("policies:     2"), "{status}");
}
