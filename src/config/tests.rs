//! Unit tests of config parsing, validation, locating and reloading.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::locate::{FieldPath, Locator, Position};
use super::*;
use crate::net::NetworkAddress;
use crate::state::policy::{PolicyAction, PolicyScope};
use crate::state::{GatewayDestination, HealthStatus, TunnelProtocol};

const ISTIO_EXAMPLE: &str = include_str!("../../tests/fixtures/config/istio-localhost.yaml");

fn path() -> &'static Path {
    Path::new("nodetunnel.yaml")
}

fn parse_ok(text: &str) -> Config {
    match parse(path(), text, &Overrides::default()) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn error_lines(text: &str, overrides: &Overrides) -> Vec<String> {
    match parse(path(), text, overrides) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn istio_example_loads_unchanged() {
    let config = parse_ok(ISTIO_EXAMPLE);
    assert_eq!(config.workloads.len(), 2);
    let [hbone, tcp] = config.workloads.as_slice() else {
        unreachable!()
    };
    assert_eq!(hbone.uid, "cluster1//v1/Pod/default/local");
    assert_eq!(hbone.protocol, TunnelProtocol::Hbone);
    assert_eq!(
        hbone.workload_ips,
        vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        hbone.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(tcp.protocol, TunnelProtocol::Tcp);
    assert_eq!(tcp.services["default/example.com"][&80], 8080);
    assert_eq!(tcp.cluster_id, "Kubernetes");

    let [policy] = config.policies.as_slice() else {
        panic!("one policy")
    };
    assert_eq!(policy.key(), "default/deny-9999");
    assert_eq!(policy.scope, PolicyScope::Namespace);
    assert_eq!(policy.action, PolicyAction::Allow);
    assert_eq!(policy.rules[0][0][0].not_destination_ports, vec![9999]);

    let snapshot = config.snapshot();
    let vip = |text: &str| text.parse::<NetworkAddress>().unwrap();
    let example = snapshot.service_by_vip(&vip("/127.10.0.1")).unwrap();
    assert_eq!(example.hostname, "example.com");
    assert_eq!(
        example.subject_alt_names[0].to_string(),
        "spiffe://cluster.local/ns/default/sa/local"
    );
    let remote = snapshot.service_by_vip(&vip("remote/127.10.0.2")).unwrap();
    assert_eq!(remote.hostname, "example2.com");
    assert_eq!(snapshot.endpoints(example, 80).len(), 2);
    assert!(snapshot.workload_by_address(&vip("/127.0.0.2")).is_some());
}

#[test]
fn empty_file_is_an_empty_config() {
    for text in ["", "# nothing yet\n", "agent:\n  node: n1\n"] {
        let config = parse_ok(text);
        assert!(config.workloads.is_empty() && config.services.is_empty());
        assert_eq!(config.agent.trust_domain, "cluster.local");
    }
}

#[test]
fn defaults_follow_istio() {
    let text = "
agent:
  trustDomain: td.example
workloads:
- name: a
  namespace: ns1
  workloadIps: [10.0.0.1]
  waypoint: {destination: ns1/waypoint.ns1.svc}
- name: b
  namespace: ns1
  clusterId: east
  trustDomain: other.td
  serviceAccount: sa-b
  status: Unhealthy
  applicationTunnel: {protocol: PROXY}
  waypoint: {destination: net1/10.9.0.1, hboneMtlsPort: 15009}
  labels: {app: b}
services:
- name: s
  namespace: ns1
  hostname: s.ns1.svc
  ports: {\"80\": 8080, 443: \"8443\", 9000: 0}
";
    let config = parse_ok(text);
    let [a, b] = config.workloads.as_slice() else {
        unreachable!()
    };
    assert_eq!(a.uid, "Kubernetes//Pod/ns1/a");
    assert_eq!(
        a.identity.to_string(),
        "spiffe://td.example/ns/ns1/sa/default"
    );
    assert_eq!(a.protocol, TunnelProtocol::Tcp);
    let waypoint = a.waypoint.as_ref().unwrap();
    assert_eq!(waypoint.hbone_mtls_port, 15008);
    assert_eq!(
        waypoint.destination,
        GatewayDestination::Hostname {
            namespace: "ns1".into(),
            hostname: "waypoint.ns1.svc".into()
        }
    );
    assert_eq!(b.uid, "east//Pod/ns1/b");
    assert_eq!(b.identity.to_string(), "spiffe://other.td/ns/ns1/sa/sa-b");
    assert_eq!(b.status, HealthStatus::Unhealthy);
    assert_eq!(b.application_tunnel.as_ref().unwrap().port, None);
    assert_eq!(b.labels["app"], "b");
    assert_eq!(
        b.waypoint.as_ref().unwrap().destination,
        GatewayDestination::Address("net1/10.9.0.1".parse().unwrap())
    );
    let ports = &config.services[0].ports;
    assert_eq!(
        ports.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
        [(80, 8080), (443, 8443), (9000, 0)]
    );
}

#[test]
fn every_istio_field_is_accepted() {
    let text = "
workloads:
- uid: u1
  name: a
  namespace: ns
  serviceAccount: sa
  trustDomain: cluster.local
  workloadIps: [10.0.0.1, \"fd00::1\"]
  protocol: HBONE
  networkMode: Standard
  node: n1
  network: net1
  hostname: a.example
  waypoint: {destination: /10.0.0.9, hboneMtlsPort: 15008}
  networkGateway: {destination: net2/192.168.0.1, hboneMtlsPort: 15008}
  nativeTunnel: true
  applicationTunnel: {protocol: NONE, port: 8081}
  authorizationPolicies: [ns/p1]
  status: Healthy
  clusterId: c1
  locality: {region: r, zone: z, subzone: s}
  workloadName: a
  workloadType: deployment
  canonicalName: a
  canonicalRevision: v1
  capacity: 2
  services: {}
services:
- name: s
  namespace: ns
  hostname: s.ns.svc
  vips: [/10.1.0.1]
  cidrVips: [/10.2.0.0/16]
  ports: {80: 8080}
  subjectAltNames: []
  waypoint: {destination: ns/wp}
  weightedWaypoints: []
  endpoints: {}
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: Dual
  canonical: true
  visibility: Public
policies:
- name: p
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [{Exact: ns}, {Prefix: team-}]
        notNamespaces: [{Suffix: -test}]
        principals: [{Presence: []}]
        notPrincipals: [{Presence: {}}]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}]
        notServiceAccounts: []
        sourceIps: [10.0.0.0/8]
        notSourceIps: [\"fd00::/8\"]
        destinationIps: [10.1.0.1/32]
        notDestinationIps: []
        destinationPorts: [80]
        notDestinationPorts: [9999]
";
    let config = parse_ok(text);
    let matched = &config.policies[0].rules[0][0][0];
    assert!(matched.principals[0].matches("anyone") && !matched.principals[0].matches(""));
    assert!(matched.namespaces[1].matches("team-a"));
    assert_eq!(config.workloads[0].workload_ips.len(), 2);
    assert_eq!(
        config.workloads[0]
            .application_tunnel
            .as_ref()
            .unwrap()
            .port,
        Some(8081)
    );
}

/// A workload block reused by the error cases: uid `u-a`, 10.0.0.1, on node `n1`.
const WORKLOAD_A: &str = "- uid: u-a
  name: a
  namespace: ns
  node: n1
  workloadIps: [10.0.0.1]
";

/// One file per error class; each must give exactly these `file:line:col: field: message`.
fn error_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        ("unknown top-level key", "workload: []\n".into(), vec![
                "nodetunnel.yaml:1:1: workload: unknown field `workload`, expected one of `agent`, `workloads`, `services`, `policies`, `istioResources`",
            ]),
        (
            "unknown workload field, case slip",
            "workloads:\n- name: a\n  namespace: ns\n  workloadIPs: [10.0.0.1]\n".into(),
            vec![
                "nodetunnel.yaml:4:3: workloads[0].workloadIPs: unknown field `workloadIPs`, did you mean `workloadIps`?",
            ],
        ),
        (
            "unknown agent field",
            "agent:\n  node: n1\n  nodes: [n2]\n".into(),
            vec![
                "nodetunnel.yaml:3:3: agent.nodes: unknown field `nodes`, expected one of `node`, `trustDomain`, `network`, `ca`, `pods`, `zds`, `proxy`, `pool`, `listen`, `capture`, `authorization`, `xds`, `dns`, `istio`, `outboundTrafficPolicy`, `inboundLimits`, `drainTimeout`, `reloadInterval`",
            ],
        ),
        (
            "bad workload IP",
            format!("workloads:\n{WORKLOAD_A}- name: b\n  namespace: ns\n  workloadIps:\n  - 10.0.0.2\n  - 10.0.0.300\n"),
            vec![
                "nodetunnel.yaml:11:5: workloads[1].workloadIps[1]: invalid IP address \"10.0.0.300\"",
            ],
        ),
        (
            "wrong enum value",
            "workloads:\n- name: a\n  namespace: ns\n  protocol: UDP\n".into(),
            vec![
                "nodetunnel.yaml:4:13: workloads[0].protocol: unknown variant `UDP`, expected `TCP` or `HBONE`",
            ],
        ),
        ("yaml syntax", "workloads: [\n".into(), vec![
                "nodetunnel.yaml:2:1: .: did not find expected node content, while parsing a flow node",
            ]),
        (
            "duplicate uid",
            format!("workloads:\n{WORKLOAD_A}- uid: u-a\n  name: b\n  namespace: ns\n"),
            vec![
                "nodetunnel.yaml:7:8: workloads[1].uid: duplicate uid \"u-a\" (also used by workloads[0])",
            ],
        ),
        (
            "duplicate derived uid",
            "workloads:\n- name: a\n  namespace: ns\n- name: a\n  namespace: ns\n".into(),
            vec![
                "nodetunnel.yaml:4:3: workloads[1].uid: duplicate uid \"Kubernetes//Pod/ns/a\" (also used by workloads[0])",
            ],
        ),
        (
            "IP claimed twice in one network",
            format!("workloads:\n{WORKLOAD_A}- name: b\n  namespace: ns\n  workloadIps: [10.0.0.9, 10.0.0.1]\n- name: c\n  namespace: ns\n  network: other\n  workloadIps: [10.0.0.1]\n"),
            vec![
                "nodetunnel.yaml:9:27: workloads[1].workloadIps[1]: address /10.0.0.1 is already claimed by workloads[0]",
            ],
        ),
        (
            "local workload without IPs",
            "agent:\n  node: n1\nworkloads:\n- name: a\n  namespace: ns\n  node: n1\n".into(),
            vec![
                "nodetunnel.yaml:4:3: workloads[0].workloadIps: workload runs on this node (\"n1\") but has no workloadIps",
            ],
        ),
        (
            "invalid identity part",
            "workloads:\n- name: a\n  namespace: ns\n  serviceAccount: sa/evil\n".into(),
            vec![
                "nodetunnel.yaml:4:19: workloads[0].serviceAccount: \"sa/evil\" cannot be part of a SPIFFE identity (allowed: A-Z a-z 0-9 . - _, at most 253)",
            ],
        ),
        (
            "bad subjectAltName",
            "services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  subjectAltNames:\n  - spiffe://cluster.local/ns/ns/sa/ok\n  - spiffe://cluster.local/sa/x\n".into(),
            vec![
                "nodetunnel.yaml:7:5: services[0].subjectAltNames[1]: invalid identity: identity \"spiffe://cluster.local/sa/x\" is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            ],
        ),
        (
            "bad VIP",
            "services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  vips: [10.1.0.1, /10.1.0.300]\n".into(),
            vec![
                "nodetunnel.yaml:5:10: services[0].vips[0]: invalid network address: expected \"network/IP\" (e.g. \"/10.0.0.1\"), got \"10.1.0.1\"",
                "nodetunnel.yaml:5:20: services[0].vips[1]: invalid network address: \"10.1.0.300\" is not a valid IP address",
            ],
        ),
        (
            "duplicate service and VIP",
            "services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  vips: [/10.1.0.1]\n- name: s2\n  namespace: ns\n  hostname: s.ns\n  vips: [/10.1.0.1]\n".into(),
            vec![
                "nodetunnel.yaml:8:13: services[1].hostname: duplicate service \"ns/s.ns\" (also defined by services[0])",
                "nodetunnel.yaml:9:10: services[1].vips[0]: VIP /10.1.0.1 is already claimed by services[0].vips[0]",
            ],
        ),
        (
            "waypoint destination and port",
            "services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  waypoint:\n    destination: waypoint\n    hboneMtlsPort: 0\n".into(),
            vec![
                "nodetunnel.yaml:6:18: services[0].waypoint.destination: invalid destination \"waypoint\": expected \"network/IP\" or \"namespace/hostname\"",
                "nodetunnel.yaml:7:20: services[0].waypoint.hboneMtlsPort: port 0 is not a usable port here",
            ],
        ),
        (
            "port 0",
            "services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  ports:\n    80: 8080\n    0: 9090\n".into(),
            vec![
                "nodetunnel.yaml:7:5: services[0].ports.0: port 0 is not a usable port here",
            ],
        ),
        (
            "bad service reference",
            "workloads:\n- name: a\n  namespace: ns\n  services:\n    example.com: {80: 8080}\n".into(),
            vec![
                "nodetunnel.yaml:5:5: workloads[0].services.example.com: service reference \"example.com\" is not \"namespace/hostname\"",
            ],
        ),
        (
            "pod naming no workload, another node's workload, twice",
            format!("agent:\n  node: n1\n  pods:\n  - workload: ns/nope\n    netns: /run/netns/a\n  - workload: ns/b\n    netns: /run/netns/b\n  - workload: u-a\n    netns: /run/netns/c\n  - workload: ns/a\n    netns: /run/netns/c\nworkloads:\n{WORKLOAD_A}- name: b\n  namespace: ns\n  node: n2\n"),
            vec![
                "nodetunnel.yaml:4:15: agent.pods[0].workload: no workload has uid or namespace/name \"ns/nope\"",
                "nodetunnel.yaml:6:15: agent.pods[1].workload: workload \"ns/b\" runs on node \"n2\", not on this node \"n1\"",
                "nodetunnel.yaml:10:15: agent.pods[3].workload: duplicate pod entry \"ns/a\" (also listed by agent.pods[2])",
                "nodetunnel.yaml:11:12: agent.pods[3].netns: duplicate pod entry \"/run/netns/c\" (also listed by agent.pods[2])",
            ],
        ),
        (
            "pods without a node",
            "agent:\n  pods:\n  - {workload: ns/a, netns: /run/netns/a}\nworkloads:\n- name: a\n  namespace: ns\n".into(),
            vec![
                "nodetunnel.yaml:2:3: agent.pods: pods are listed but the node name is empty (set agent.node or --node)",
            ],
        ),
        (
            "CA cert without key, admin not loopback, hbone port 0",
            "agent:\n  ca:\n    certFile: /etc/ca.pem\n  listen:\n    admin: 0.0.0.0:15000\n  proxy:\n    hbonePort: 0\n".into(),
            vec![
                "nodetunnel.yaml:3:15: agent.ca.certFile: certFile is set but keyFile is not; both are needed",
                "nodetunnel.yaml:5:12: agent.listen.admin: admin address 0.0.0.0:15000 is not a loopback address",
                "nodetunnel.yaml:7:16: agent.proxy.hbonePort: port 0 is not a usable port here",
            ],
        ),
        (
            "frame size below the HTTP/2 minimum, pool with zero streams per connection",
            "agent:\n  proxy:\n    frameSize: 1024\n  pool:\n    maxStreamsPerConnection: 0\n    spreadAbove: 0\n    spreadConnections: 0\n".into(),
            vec![
                "nodetunnel.yaml:3:16: agent.proxy.frameSize: 1024 is out of range (16384..=16777215)",
                "nodetunnel.yaml:5:30: agent.pool.maxStreamsPerConnection: 0 is out of range (1..=4294967295)",
                "nodetunnel.yaml:6:18: agent.pool.spreadAbove: 0 is out of range (1..=4294967295)",
                "nodetunnel.yaml:7:24: agent.pool.spreadConnections: 0 is out of range (1..=4294967295)",
            ],
        ),
        (
            "DNS cluster domain that is not a domain, no forwards allowed",
            "agent:\n  dns:\n    clusterDomain: \"a..b\"\n    maxForwardsPerPod: 0\n".into(),
            vec![
                "nodetunnel.yaml:3:20: agent.dns.clusterDomain: invalid DNS domain \"a..b\": expected labels of a-z, 0-9 and '-' separated by dots",
                "nodetunnel.yaml:4:24: agent.dns.maxForwardsPerPod: 0 is out of range (1..=65535)",
            ],
        ),
        (
            "a learned egress set that holds nothing or lasts no time",
            "agent:\n  dns:\n    maxLearnedPerPod: 0\n    learnedTtlMin: 0s\n    learnedTtlMax: 0s\n".into(),
            vec![
                "nodetunnel.yaml:3:23: agent.dns.maxLearnedPerPod: 0 is out of range (1..=1000000)",
                "nodetunnel.yaml:4:20: agent.dns.learnedTtlMin: must be longer than 0s",
                "nodetunnel.yaml:5:20: agent.dns.learnedTtlMax: must be longer than 0s",
            ],
        ),
        (
            "congestion control that no kernel could have",
            "agent:\n  proxy:\n    congestionControl: \"BBR v2\"\n".into(),
            vec![
                "nodetunnel.yaml:3:24: agent.proxy.congestionControl: invalid TCP congestion control \"BBR v2\": expected a kernel algorithm name such as cubic or bbr (a-z, 0-9, '_', at most 15)",
            ],
        ),
        (
            "DNS upstream that is not an address",
            "agent:\n  dns:\n    upstreams: [dns.example]\n".into(),
            vec![
                "nodetunnel.yaml:3:16: agent.dns.upstreams: invalid upstream \"dns.example\": expected IP, IP:port or [IPv6]:port",
            ],
        ),
        (
            "zero durations that break what they time",
            "agent:\n  reloadInterval: 0s\n  proxy:\n    keepaliveTimeout: 0s\n    keepaliveInterval: 0s\n    \
             handshakeTimeout: 0s\n    connectTimeout: 0s\n    connectionIdleTimeout: 0s\n    \
             connectResponseTimeout: 0s\n  xds:\n    reconnectMax: 0s\n  zds:\n    reconnectMax: 0s\n  \
             dns:\n    forwardTimeout: 0s\n  ca:\n    workloadCertTtl: 0s\n".into(),
            vec![
                "nodetunnel.yaml:2:19: agent.reloadInterval: must be longer than 0s",
                "nodetunnel.yaml:4:23: agent.proxy.keepaliveTimeout: must be longer than 0s",
                "nodetunnel.yaml:5:24: agent.proxy.keepaliveInterval: must be longer than 0s",
                "nodetunnel.yaml:6:23: agent.proxy.handshakeTimeout: must be longer than 0s",
                "nodetunnel.yaml:7:21: agent.proxy.connectTimeout: must be longer than 0s",
                "nodetunnel.yaml:8:28: agent.proxy.connectionIdleTimeout: must be longer than 0s",
                "nodetunnel.yaml:9:29: agent.proxy.connectResponseTimeout: must be longer than 0s",
                "nodetunnel.yaml:11:19: agent.xds.reconnectMax: must be longer than 0s",
                "nodetunnel.yaml:13:19: agent.zds.reconnectMax: must be longer than 0s",
                "nodetunnel.yaml:15:21: agent.dns.forwardTimeout: must be longer than 0s",
                "nodetunnel.yaml:17:22: agent.ca.workloadCertTtl: must be longer than 0s",
            ],
        ),
        (
            "stream and header limits outside their bounds",
            "agent:\n  proxy:\n    maxConcurrentStreams: 0\n    maxHeaderListSize: 16\n".into(),
            vec![
                "nodetunnel.yaml:3:27: agent.proxy.maxConcurrentStreams: 0 is out of range (1..=1000)",
                "nodetunnel.yaml:4:24: agent.proxy.maxHeaderListSize: 16 is out of range (1024..=1048576)",
            ],
        ),
        (
            "stream and header limits above their bounds",
            "agent:\n  proxy:\n    maxConcurrentStreams: 5000\n    maxHeaderListSize: 2097152\n".into(),
            vec![
                "nodetunnel.yaml:3:27: agent.proxy.maxConcurrentStreams: 5000 is out of range (1..=1000)",
                "nodetunnel.yaml:4:24: agent.proxy.maxHeaderListSize: 2097152 is out of range (1024..=1048576)",
            ],
        ),
        (
            "policy without name, duplicate policy",
            "policies:\n- name: \"\"\n  namespace: ns\n- name: p\n  namespace: ns\n- name: p\n  namespace: ns\n".into(),
            vec![
                "nodetunnel.yaml:2:9: policies[0].name: must not be empty",
                "nodetunnel.yaml:6:9: policies[2].name: duplicate policy \"ns/p\" (also defined by policies[1])",
            ],
        ),
        (
            "inbound limits that limit nothing or cannot be enforced",
            "agent:\n  inboundLimits:\n  - namespace: \"\"\n    perSource: {}\n  - perSource: {maxConnections: 0, burst: 2}\n  - perSource: {connectionsPerSecond: 0, burst: 0}\n  - perSource: {connectionsPerSecond: .nan}\n".into(),
            vec![
                "nodetunnel.yaml:3:16: agent.inboundLimits[0].namespace: must not be empty",
                "nodetunnel.yaml:4:5: agent.inboundLimits[0].perSource: sets no limit: give maxConnections, connectionsPerSecond or both",
                "nodetunnel.yaml:5:33: agent.inboundLimits[1].perSource.maxConnections: 0 is out of range (1..=4294967295)",
                "nodetunnel.yaml:5:43: agent.inboundLimits[1].perSource.burst: burst needs connectionsPerSecond",
                "nodetunnel.yaml:6:39: agent.inboundLimits[2].perSource.connectionsPerSecond: 0 is not a rate above 0 and at most 1000000 per second",
                "nodetunnel.yaml:6:49: agent.inboundLimits[2].perSource.burst: 0 is out of range (1..=4294967295)",
                "nodetunnel.yaml:7:39: agent.inboundLimits[3].perSource.connectionsPerSecond: NaN is not a rate above 0 and at most 1000000 per second",
            ],
        ),
        (
            "inbound limit with a misspelt field",
            "agent:\n  inboundLimits:\n  - perSource: {maxConnection: 3}\n".into(),
            vec![
                "nodetunnel.yaml:3:17: agent.inboundLimits[0].perSource.maxConnection: unknown field `maxConnection`, expected one of `maxConnections`, `connectionsPerSecond`, `burst`",
            ],
        ),
        (
            "bad policy CIDR",
            "policies:\n- name: p\n  namespace: ns\n  rules: [[[{sourceIps: [10.0.0.0/33]}]]]\n".into(),
            vec![
                "nodetunnel.yaml:4:26: policies[0].rules[0][0][0].sourceIps[0]: invalid IP address",
            ],
        ),
    ]
}

#[test]
fn each_error_names_file_line_and_field() {
    for (name, text, want) in error_cases() {
        let got = error_lines(&text, &Overrides::default());
        assert_eq!(got, want, "case {name}:\n{text}");
    }
}

#[test]
fn all_semantic_errors_in_one_file_are_reported_in_file_order() {
    let text = "
agent:
  node: n1
  pods:
  - {workload: ns/ghost, netns: /run/netns/ghost}
workloads:
- name: a
  namespace: ns
  node: n1
  workloadIps: [10.0.0.1, nonsense]
services:
- name: s
  namespace: ns
  hostname: s.ns
  vips: [/10.1.0.1, /10.1.0.1]
  subjectAltNames: [not-an-identity]
";
    let got = error_lines(text, &Overrides::default());
    assert_eq!(
        got,
        [
            "nodetunnel.yaml:5:16: agent.pods[0].workload: no workload has uid or namespace/name \"ns/ghost\"",
            "nodetunnel.yaml:10:27: workloads[0].workloadIps[1]: invalid IP address \"nonsense\"",
            "nodetunnel.yaml:15:21: services[0].vips[1]: VIP /10.1.0.1 is already claimed by services[0].vips[0]",
            "nodetunnel.yaml:16:21: services[0].subjectAltNames[0]: invalid identity: identity \"not-an-identity\" does not start with \"spiffe://\"",
        ]
    );
    let errors = parse(path(), text, &Overrides::default()).unwrap_err();
    assert_eq!(errors.to_string().lines().count(), 4, "one error per line");
}

#[test]
fn overrides_win_over_the_file() {
    let text = "
agent:
  node: from-file
  ca:
    certFile: /file/ca.pem
    keyFile: /file/ca.key
  pods:
  - {workload: ns/a, netns: /run/netns/a}
workloads:
- name: a
  namespace: ns
  node: n1
  workloadIps: [10.0.0.1]
";
    // The file's node does not run `ns/a`; the flag's does.
    assert_eq!(
        error_lines(text, &Overrides::default()),
        ["nodetunnel.yaml:8:16: agent.pods[0].workload: workload \"ns/a\" runs on node \"n1\", not on this node \"from-file\""]
    );
    let overrides = Overrides {
        node: Some("n1".into()),
        ca_cert: Some("/flag/ca.pem".into()),
        ca_key: Some("/flag/ca.key".into()),
        ..Overrides::default()
    };
    let config = parse(path(), text, &overrides).unwrap();
    assert_eq!(config.agent.node, "n1");
    assert_eq!(
        config.agent.ca.cert_file,
        Some(PathBuf::from("/flag/ca.pem"))
    );
    assert_eq!(
        config.agent.ca.key_file,
        Some(PathBuf::from("/flag/ca.key"))
    );

    // A flag can also be what makes a config incomplete.
    let only_cert = Overrides {
        ca_cert: Some("/flag/ca.pem".into()),
        ..Overrides::default()
    };
    assert_eq!(
        error_lines("workloads: []\n", &only_cert),
        ["nodetunnel.yaml:1:1: agent.ca.certFile: certFile is set but keyFile is not; both are needed"]
    );
}

#[test]
fn precedence_is_file_then_environment_then_flags() {
    let text = "agent:\n  node: from-file\n  trustDomain: file.example\n  drainTimeout: 3s\n";
    let env = crate::config::env::Environment::from_pairs([
        ("NODE_NAME", "from-env"),
        ("TRUST_DOMAIN", "env.example"),
    ]);
    let with_env = Overrides {
        env: env.clone(),
        ..Overrides::default()
    };
    let config = parse(path(), text, &with_env).unwrap();
    assert_eq!(config.agent.node, "from-env");
    assert_eq!(config.agent.trust_domain, "env.example");
    // Untouched by the environment: the file's value stays.
    assert_eq!(
        config.agent.drain_timeout,
        std::time::Duration::from_secs(3)
    );
    let with_flag = Overrides {
        env,
        node: Some("from-flag".into()),
        ..Overrides::default()
    };
    assert_eq!(
        parse(path(), text, &with_flag).unwrap().agent.node,
        "from-flag"
    );
    // A bad variable is reported by name, not as a file position.
    let bad = Overrides {
        env: crate::config::env::Environment::from_pairs([("INSTANCE_IP", "nope")]),
        ..Overrides::default()
    };
    assert_eq!(
        error_lines(text, &bad),
        ["environment: INSTANCE_IP: \"nope\" is not an IP address"]
    );
}

#[test]
fn without_a_file_the_agent_is_in_istio_mode() {
    let overrides = Overrides {
        env: crate::config::env::Environment::from_pairs([
            ("NODE_NAME", "node-a"),
            ("XDS_ADDRESS", "https://10.0.0.2:15012"),
        ]),
        ..Overrides::default()
    };
    let config = crate::config::from_environment(&overrides).unwrap();
    assert_eq!(config.agent.node, "node-a");
    assert_eq!(
        config.agent.xds.address.as_deref(),
        Some("https://10.0.0.2:15012")
    );
    assert_eq!(
        config.agent.ca.address.as_deref(),
        Some("https://localhost:15012")
    );
    assert!(config.agent.zds.enabled);
    assert!(!config.agent.capture.install_rules);
    assert!(config.workloads.is_empty());
}

/// A runaway config or policy file is refused by size, naming the file, before it is read
/// into memory whole; a valid file just under the policy cap still loads.
#[test]
fn oversized_config_and_policy_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("nodetunnel.yaml");
    let huge = std::fs::File::create(&config_path).expect("create");
    huge.set_len(MAX_CONFIG_FILE + 1).expect("sparse file");
    let text = load(&config_path, &Overrides::default())
        .expect_err("oversized config")
        .to_string();
    assert!(
        text.ends_with(&format!(
            "nodetunnel.yaml: cannot read config file: larger than {MAX_CONFIG_FILE} bytes"
        )),
        "{text}"
    );

    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policy dir");
    std::fs::write(
        &config_path,
        "agent:\n  authorization:\n    policyDirs: [policies]\n",
    )
    .expect("config");
    let policy = policies.join("big.yaml");
    let padding = "#".repeat(usize::try_from(istio::MAX_POLICY_FILE).expect("fits") - 1);
    std::fs::write(&policy, format!("{padding}\n")).expect("policy at the cap");
    load(&config_path, &Overrides::default()).expect("a file at the cap loads");
    std::fs::write(&policy, format!("{padding}\n\n")).expect("policy over the cap");
    let text = load(&config_path, &Overrides::default())
        .expect_err("oversized policy file")
        .to_string();
    assert!(
        text.contains(&format!(
            "cannot read policy file {}: larger than {} bytes",
            policy.display(),
            istio::MAX_POLICY_FILE
        )),
        "{text}"
    );
}

#[test]
fn load_reports_an_unreadable_file() {
    let missing = Path::new("/nonexistent/nodetunnel.yaml");
    let errors = load(missing, &Overrides::default()).unwrap_err();
    let text = errors.to_string();
    assert!(
        text.starts_with("/nonexistent/nodetunnel.yaml: cannot read config file:"),
        "{text}"
    );
}

#[test]
fn locator_finds_nodes_and_falls_back_to_parents() {
    let text = "\
agent:
  node: n1
workloads:
- name: a
  workloadIps: [10.0.0.1, \"10.0.0.2\"]
  services:
    \"default/x\": {80: 8080}
- {name: b, namespace: ns}
";
    let locator = Locator::new(text);
    let root = FieldPath::default();
    let workloads = root.key("workloads");
    let cases = [
        (root.key("agent").key("node"), (2, 9)),
        (workloads.index(0), (4, 3)),
        (workloads.index(0).key("workloadIps").index(1), (5, 27)),
        (workloads.index(0).key("services").key("default/x"), (7, 5)),
        (workloads.index(1).key("namespace"), (8, 24)),
        // Absent fields point at the nearest parent that exists.
        (workloads.index(1).key("uid"), (8, 4)),
        (workloads.index(7).key("uid"), (3, 1)),
        (root.key("services"), (1, 1)),
    ];
    for (path, (line, column)) in cases {
        assert_eq!(locator.locate(&path), Position { line, column }, "{path}");
    }
    let port = workloads
        .index(0)
        .key("services")
        .key("default/x")
        .key("80");
    assert_eq!(
        locator.locate(&port),
        Position {
            line: 7,
            column: 23
        }
    );
    assert_eq!(
        locator.locate_key(&port),
        Position {
            line: 7,
            column: 19
        }
    );
    assert_eq!(
        Locator::new("workloads: [").locate(&workloads.index(0)),
        Position { line: 1, column: 1 },
        "unparsable text still answers"
    );
}

#[test]
fn restart_fields_are_named() {
    let old = parse_ok(ISTIO_EXAMPLE);
    let mut new = old.clone();
    assert!(watch::restart_fields(&old, &new).is_empty());
    new.agent.listen.admin = "127.0.0.1:16000".parse().unwrap();
    new.agent.ca.cert_file = Some("/ca.pem".into());
    new.agent.proxy.congestion_control = Some("cubic".into());
    new.agent.pool.max_streams_per_connection += 1;
    new.workloads.pop();
    assert_eq!(
        watch::restart_fields(&old, &new),
        [
            "agent.listen.admin",
            "agent.ca.certFile",
            "agent.proxy",
            "agent.pool"
        ]
    );
}

/// Waits until the watcher publishes a config for which `done` holds.
async fn published(
    receiver: &mut tokio::sync::watch::Receiver<Arc<Config>>,
    done: impl Fn(&Config) -> bool,
) -> Arc<Config> {
    let wait = receiver.wait_for(|config| done(config));
    match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(Ok(config)) => config.clone(),
        Ok(Err(_)) => panic!("watcher stopped"),
        Err(_) => panic!("no matching config published in 20s"),
    }
}

#[tokio::test]
async fn watch_publishes_valid_edits_and_keeps_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nodetunnel.yaml");
    std::fs::write(&file, ISTIO_EXAMPLE).unwrap();
    let first = Arc::new(load(&file, &Overrides::default()).unwrap());
    let (publish, mut receiver) = tokio::sync::watch::channel(first.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(watch::run(
        file.clone(),
        Overrides::default(),
        Duration::from_millis(10),
        first,
        publish,
        async move {
            let _ = stopped.await;
        },
    ));

    // A valid edit: a workload moves to another IP.
    let moved = ISTIO_EXAMPLE.replacen("127.0.0.2", "127.0.0.3", 1);
    replace(&file, &moved);
    let edited = published(&mut receiver, |config| {
        config.workloads[1].workload_ips[0].to_string() == "127.0.0.3"
    })
    .await;
    assert_eq!(edited.workloads.len(), 2);

    // An invalid edit, then the file disappears, then a valid edit: only the valid one is
    // ever published, and the invalid one never replaced the last good config.
    replace(
        &file,
        "workloads:\n- name: a\n  namespace: ns\n  workloadIps: [x]\n",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!receiver.has_changed().unwrap(), "nothing published");
    assert_eq!(
        receiver.borrow().workloads[1].workload_ips[0].to_string(),
        "127.0.0.3"
    );
    replace(&file, "workloads: []\n");
    let emptied = published(&mut receiver, |config| config.workloads.is_empty()).await;
    assert!(emptied.services.is_empty());

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), watcher)
        .await
        .expect("watcher stops on shutdown")
        .unwrap();
}

/// Replaces `file` whole (write + rename), as editors and ConfigMaps do: a plain write can be
/// read half-way, and an empty file is a valid (empty) config.
fn replace(file: &Path, text: &str) {
    let temporary = file.with_extension("yaml.new");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, file).unwrap();
}

#[test]
fn policy_errors_keep_their_position() {
    let text =
        "policies:\n- name: p\n  namespace: ns\n  rules:\n  - - - namespaces: [{Regex: x}]\n";
    assert_eq!(
        error_lines(text, &Overrides::default()),
        ["nodetunnel.yaml:5:23: policies[0].rules[0][0][0].namespaces[0]: unknown variant `Regex`, expected one of `Exact`, `Prefix`, `Suffix`, `Presence`"]
    );
}

/// Found by the `config_parse` fuzz target: an empty top-level key must still name a field.
#[test]
fn empty_unknown_key_names_the_document() {
    let errors = parse(Path::new("x.yaml"), "\"\": 1\n", &Overrides::default())
        .expect_err("an empty key is an unknown field");
    assert_eq!(errors.0[0].field, ".");
    assert!(
        errors.0[0].message.contains("unknown field"),
        "{}",
        errors.0[0].message
    );
}

#[test]
fn ztunnel_tag_form_errors_keep_their_position() {
    // (file, the one error it must give)
    let cases = [
        (
            "policies:\n- name: p\n  namespace: ns\n  rules:\n  - - - namespaces: [!Regex x]\n",
            "nodetunnel.yaml:5:22: policies[0].rules[0][0][0].namespaces[0]: unknown variant `Regex`, expected one of `Exact`, `Prefix`, `Suffix`, `Presence`",
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  rules:\n  - - - principals:\n        - !Exact [a]\n",
            "nodetunnel.yaml:6:11: policies[0].rules[0][0][0].principals[0]: invalid type: sequence, expected a string",
        ),
        (
            "policies:\n- name: p\n  namespace: ns\n  rules:\n  - - - principals: [{Exact: a, Prefix: b}]\n",
            "nodetunnel.yaml:5:22: policies[0].rules[0][0][0].principals[0]: a string match has exactly one key (Exact, Prefix, Suffix or Presence)",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(error_lines(text, &Overrides::default()), [want], "{text}");
    }
    // The locator walks tagged nodes like untagged ones.
    let text = "policies:\n- name: p\n  namespace: ns\n  rules:\n  - - - principals: [!Exact a, !Presence []]\n    - - notPrincipals: [!Suffix b]\n";
    let locator = Locator::new(text);
    let rules = FieldPath::default().key("policies").index(0).key("rules");
    assert_eq!(
        locator.locate(
            &rules
                .index(0)
                .index(1)
                .index(0)
                .key("notPrincipals")
                .index(0)
        ),
        Position {
            line: 6,
            column: 25
        }
    );
    assert_eq!(
        locator.locate(&rules.index(0).index(0).index(0).key("principals").index(1)),
        Position {
            line: 5,
            column: 32
        }
    );
}

#[test]
fn ztunnel_service_endpoints_and_nameless_workloads_read_as_ztunnel_reads_them() {
    let text = "workloads:
- uid: cluster1//v1/Pod/default/only-uid
  namespace: default
  workloadIps: [10.0.0.1]
  protocol: HBONE
  applicationTunnel: {protocol: PROXY, port: null}
- uid: cluster1//v1/Pod/default/both
  name: both
  namespace: default
  workloadIps: [10.0.0.2]
  services:
    default/echo.default.svc.cluster.local: {80: 9090}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: [/10.96.0.1]
  ports: {80: 8080}
  endpoints:
    cluster1//v1/Pod/default/only-uid:
      workloadUid: cluster1//v1/Pod/default/only-uid
      port: {80: 8181}
      status: Healthy
    cluster1//v1/Pod/default/both:
      workloadUid: cluster1//v1/Pod/default/both
      port: {80: 8282}
    unknown:
      workloadUid: cluster1//v1/Pod/default/gone
      service: default/echo.default.svc.cluster.local
      address: /10.0.0.9
      port: {}
";
    let config = parse_ok(text);
    let [only_uid, both] = config.workloads.as_slice() else {
        panic!("two workloads")
    };
    assert_eq!(only_uid.name, "");
    let tunnel = only_uid.application_tunnel.as_ref().unwrap();
    assert_eq!(tunnel.port, None, "ztunnel's `port: null`");
    let key = "default/echo.default.svc.cluster.local";
    assert_eq!(only_uid.services[key][&80], 8181, "the service's endpoint");
    assert_eq!(
        both.services[key][&80], 9090,
        "the workload's own entry wins"
    );
    let snapshot = config.snapshot();
    let backing: Vec<&str> = snapshot
        .workloads()
        .filter(|workload| workload.services.contains_key(key))
        .map(|workload| workload.uid.as_str())
        .collect();
    assert_eq!(backing.len(), 2, "{backing:?}");

    assert_eq!(
        error_lines(
            "workloads:\n- namespace: default\n  workloadIps: [10.0.0.1]\n",
            &Overrides::default()
        ),
        ["nodetunnel.yaml:2:3: workloads[0].name: a workload needs a uid or a name"]
    );
}

#[test]
fn inbound_limits_reach_the_snapshot_in_order() {
    let config = parse_ok(
        "agent:
  inboundLimits:
  - namespace: shop
    selector: {matchLabels: {app: api}}
    perSource: {maxConnections: 10, connectionsPerSecond: 0.5}
  - perSource: {connectionsPerSecond: 100, burst: 200}
",
    );
    let snapshot = config.snapshot();
    let limits = &snapshot.inbound_limits().0;
    assert_eq!(limits.len(), 2);
    assert_eq!(limits[0].namespace.as_deref(), Some("shop"));
    assert_eq!(limits[0].per_source.max_connections, Some(10));
    // The burst defaults to the rate rounded up, at least 1.
    assert_eq!(limits[0].per_source.rate(), Some((0.5, 1)));
    assert_eq!(limits[1].namespace, None);
    assert_eq!(limits[1].per_source.rate(), Some((100.0, 200)));
    assert!(parse_ok("agent: {}\n")
        .snapshot()
        .inbound_limits()
        .0
        .is_empty());
}

/// A tag with `/` in it once made the error position underflow (config_parse fuzz finding):
/// the file is refused with a located error instead.
#[test]
fn a_tag_that_reads_as_a_handle_is_refused_without_panicking() {
    let text = include_str!("../../fuzz/seeds/config_parse/regression-tag-before-line-start");
    let lines = error_lines(text, &Overrides::default());
    assert!(!lines.is_empty(), "a tagged namespace must be refused");
    assert!(
        lines
            .iter()
            .all(|line| line.starts_with("nodetunnel.yaml:")),
        "{lines:?}"
    );
}
