use super::*;
use crate::state::GatewayDestination;

fn parse(yaml: &str) -> NetworkingTranslation {
    super::parse(yaml, &IstioOptions::default())
}

const ENTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: [api.partner.example]
  addresses: [192.0.2.7, 198.51.100.0/24]
  ports:
  - {number: 443, name: https, protocol: TLS}
  - {number: 80, name: http, targetPort: 8080}
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 10.1.0.1
  - address: 10.1.0.2
    ports: {https: 8443}
  exportTo: [".", frontend]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ignored-here}
spec: {}
"#;

#[test]
fn a_service_entry_translates_field_for_field() {
    let translation = parse(ENTRY);
    assert_eq!(translation.errors, vec![]);
    let [entry] = translation.service_entries.as_slice() else {
        panic!("one entry expected: {translation:?}");
    };
    assert_eq!(entry.key(), "shop/partner");
    assert_eq!(entry.hosts, vec!["api.partner.example"]);
    assert_eq!(
        entry.addresses,
        vec![
            "192.0.2.7/32".parse::<IpNet>().unwrap(),
            "198.51.100.0/24".parse().unwrap()
        ]
    );
    assert_eq!(entry.ports[1].target_port, Some(8080));
    assert_eq!(entry.ports[0].protocol, "TLS");
    assert_eq!(entry.resolution, Resolution::Static);
    assert_eq!(entry.endpoints[1].ports.get("https"), Some(&8443));
    assert!(entry.export_to.includes("shop"));
    assert!(entry.export_to.includes("frontend"));
    assert!(!entry.export_to.includes("other"));
}

#[test]
fn export_to_forms() {
    let cases: &[(&[&str], &[&str], &[&str])] = &[
        // exportTo, namespaces that see it, namespaces that do not
        (&[], &["shop", "any"], &[]),
        (&["*"], &["shop", "any"], &[]),
        (&["."], &["shop"], &["any"]),
        (&["~"], &[], &["shop", "any"]),
        (&["other"], &["other"], &["shop"]),
    ];
    for (values, visible, hidden) in cases {
        let values: Vec<String> = values.iter().map(ToString::to_string).collect();
        let export = export_to("shop", &values).unwrap();
        for namespace in *visible {
            assert!(export.includes(namespace), "{values:?} hides {namespace}");
        }
        for namespace in *hidden {
            assert!(!export.includes(namespace), "{values:?} shows {namespace}");
        }
    }
}

#[test]
fn bad_resources_are_rejected_by_field_and_the_others_apply() {
    let cases: &[(&str, &str)] = &[
        ("hosts: []\nports: [{number: 443}]", "ServiceEntry default/se: spec.hosts: at least one host is required"),
        ("hosts: [a.example]", "ServiceEntry default/se: spec.ports: at least one port is required"),
        ("hosts: [a.example]\naddresses: [192.0.2.1, nope]\nports: [{number: 443}]", "ServiceEntry default/se: spec.addresses[1]: \"nope\" is not an IP address or CIDR"),
        ("hosts: [a.example]\nports: [{number: 70000}]", "ServiceEntry default/se: spec.ports[0].number: 70000 is not a port number 1-65535"),
        ("hosts: [a.example]\nports: [{number: 443}, {number: 443}]", "ServiceEntry default/se: spec.ports[1].number: port 443 is listed twice"),
        ("hosts: [a.example]\nports: [{number: 443, targetPort: 0}]", "ServiceEntry default/se: spec.ports[0].targetPort: 0 is not a port number 1-65535"),
        ("hosts: [a.example]\nports: [{number: 443}]\nlocation: OUTSIDE", "ServiceEntry default/se: spec.location: \"OUTSIDE\" (expected MESH_EXTERNAL or MESH_INTERNAL)"),
        ("hosts: [a.example]\nports: [{number: 443}]\nresolution: MAGIC", "ServiceEntry default/se: spec.resolution: \"MAGIC\" (expected NONE, STATIC, DNS or DNS_ROUND_ROBIN)"),
        ("hosts: [a.example]\nports: [{number: 443}]\nresolution: STATIC\nendpoints: [{address: a.example}]", "ServiceEntry default/se: spec.endpoints[0].address: \"a.example\" is not an IP address (resolution STATIC)"),
        ("hosts: [a.example]\nports: [{number: 443}]\nendpoints: [{address: 10.0.0.1}]", "ServiceEntry default/se: spec.endpoints: endpoints need resolution STATIC or DNS"),
        ("hosts: [a.example]\nports: [{number: 443, name: tls}]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1, ports: {http: 80}}]", "ServiceEntry default/se: spec.endpoints[0].ports.http: names no port of spec.ports"),
        ("hosts: [a.example]\nports: [{number: 443}]\nworkloadSelector: {labels: {app: a}}", "ServiceEntry default/se: spec.workloadSelector: selecting mesh workloads is not supported by the node agent (list endpoints instead)"),
        ("hosts: [a.example]\nports: [{number: 443}]\nexportTo: ['']", "ServiceEntry default/se: spec.exportTo[0]: empty value"),
    ];
    for (spec, expected) in cases {
        let indented: String = spec.lines().map(|line| format!("  {line}\n")).collect();
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se}}\nspec:\n{indented}---\n{ENTRY}"
        );
        let translation = parse(&yaml);
        let errors: Vec<String> = translation.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors, vec![expected.to_string()], "{spec}");
        assert_eq!(translation.service_entries.len(), 1, "{spec}");
    }
}

#[test]
fn unknown_fields_kinds_and_versions_are_named() {
    let cases: &[(&str, &str)] = &[
        ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a], ports: [{number: 1}], adresses: []}", "ServiceEntry default/se: spec: unknown field `adresses`"),
        ("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: se}", "Sidecar default/se: kind: unsupported networking kind (expected ServiceEntry or DestinationRule)"),
        ("apiVersion: networking.istio.io/v2\nkind: ServiceEntry\nmetadata: {name: se}", "ServiceEntry default/se: apiVersion: unsupported \"networking.istio.io/v2\" (expected networking.istio.io/v1, v1beta1 or v1alpha3)"),
        ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {namespace: x}", "ServiceEntry x/<unnamed>: metadata.name: missing"),
    ];
    for (yaml, expected) in cases {
        let errors: Vec<String> = parse(yaml).errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
        assert!(errors[0].starts_with(expected), "{yaml}: {errors:?}");
    }
}

const RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-limits, namespace: shop}
spec:
  host: echo
  exportTo: ["."]
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp:
        maxConnections: 2
        connectTimeout: 250ms
        idleTimeout: 1h
        tcpKeepalive: {time: 30s, interval: 5s, probes: 3}
        maxConnectionDuration: 10m
      http: {http1MaxPendingRequests: 1}
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 2
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 50
"#;

#[test]
fn a_destination_rule_keeps_its_l4_settings() {
    let translation = parse(RULE);
    assert_eq!(translation.errors, vec![]);
    let [rule] = translation.destination_rules.as_slice() else {
        panic!("one rule expected: {translation:?}");
    };
    assert_eq!(rule.key(), "shop/echo-limits");
    assert_eq!(rule.host, "echo.shop.svc.cluster.local");
    assert_eq!(rule.tcp.max_connections, Some(2));
    assert_eq!(rule.tcp.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(rule.tcp.tcp_keepalive_time, Some(Duration::from_secs(30)));
    assert_eq!(
        rule.tcp.max_connection_duration,
        Some(Duration::from_secs(600))
    );
    let outlier = rule.outlier_detection.clone().unwrap();
    // consecutiveGatewayErrors wins over consecutive5xxErrors: both count connect failures.
    assert_eq!(outlier.consecutive_errors, 2);
    assert_eq!(outlier.interval, Duration::from_secs(5));
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(60));
    assert_eq!(outlier.max_ejection_percent, 50);
    assert!(!rule.export_to.includes("other"));

    let defaults = parse(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n\
         spec: {host: echo.shop.svc.cluster.local, trafficPolicy: {outlierDetection: {}}}",
    );
    let rule = &defaults.destination_rules[0];
    assert_eq!(rule.outlier_detection, Some(OutlierDetection::default()));
    assert_eq!(rule.tcp, TcpPool::default());
}

#[test]
fn bad_destination_rules_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("trafficPolicy: {}", "DestinationRule default/dr: spec.host: required"),
        ("host: a\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}", "DestinationRule default/dr: spec.trafficPolicy.connectionPool.tcp.maxConnections: 0 is not 1 or more"),
        ("host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}", "DestinationRule default/dr: spec.trafficPolicy.connectionPool.tcp.connectTimeout: must be longer than 0"),
        ("host: a\ntrafficPolicy: {outlierDetection: {consecutiveGatewayErrors: -1}}", "DestinationRule default/dr: spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors: -1 is not 1 or more"),
        ("host: a\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}", "DestinationRule default/dr: spec.trafficPolicy.outlierDetection.maxEjectionPercent: 101 is not 0-100"),
        ("host: a\ntrafficPolicy: {outlierDetection: {interval: 0s}}", "DestinationRule default/dr: spec.trafficPolicy.outlierDetection.interval: must be longer than 0"),
        ("host: a\nworkloadSelector: {matchLabels: {app: a}}", "DestinationRule default/dr: spec.workloadSelector: client-selecting DestinationRules are not supported by the node agent"),
    ];
    for (spec, expected) in cases {
        let indented: String = spec.lines().map(|line| format!("  {line}\n")).collect();
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr}}\nspec:\n{indented}---\n{RULE}"
        );
        let translation = parse(&yaml);
        let errors: Vec<String> = translation.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors, vec![expected.to_string()], "{spec}");
        assert_eq!(translation.destination_rules.len(), 1, "{spec}");
    }
    let typo = parse("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\nspec: {host: a, trafficPolicy: {connectionPool: {tcp: {maxConection: 1}}}}");
    assert!(
        typo.errors[0]
            .to_string()
            .contains("unknown field `maxConection`"),
        "{typo:?}"
    );
}

#[test]
fn use_waypoint_labels_bind_an_entry_to_its_egress_gateway() {
    let entry = |labels: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: api, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{hosts: [api.example.com], ports: [{{number: 443, name: tls}}]}}\n"
        )
    };
    let options = IstioOptions {
        cluster_domain: "example.internal".to_string(),
        ..IstioOptions::default()
    };
    let cases = [
        // labels, waypoint hostname or the error
        ("", Ok(None)),
        ("istio.io/use-waypoint: none", Ok(None)),
        (
            "istio.io/use-waypoint: egress-gw",
            Ok(Some("shop/egress-gw.shop.svc.example.internal")),
        ),
        (
            "istio.io/use-waypoint: egress-gw, istio.io/use-waypoint-namespace: istio-egress",
            Ok(Some("istio-egress/egress-gw.istio-egress.svc.example.internal")),
        ),
        (
            "istio.io/use-waypoint: a.b",
            Err("ServiceEntry shop/api: metadata.labels[istio.io/use-waypoint]: \"a.b\" is not a Kubernetes name"),
        ),
    ];
    for (labels, expected) in cases {
        let translation = super::parse(&entry(labels), &options);
        let got =
            match translation.errors.first() {
                Some(error) => Err(error.to_string()),
                None => Ok(translation.service_entries[0]
                    .waypoint
                    .as_ref()
                    .map(|gateway| match &gateway.destination {
                        GatewayDestination::Hostname {
                            namespace,
                            hostname,
                        } => format!("{namespace}/{hostname}"),
                        GatewayDestination::Address(address) => address.ip.to_string(),
                    })),
            };
        let expected = expected
            .map(|hostname| hostname.map(str::to_string))
            .map_err(str::to_string);
        assert_eq!(got, expected, "{labels}");
    }
}
