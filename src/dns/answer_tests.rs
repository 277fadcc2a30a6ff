use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::net::NetworkAddress;
use crate::state::tests::workload;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn service(namespace: &str, hostname: &str, vips: &[(&str, &str)]) -> Service {
    Service {
        name: hostname.split('.').next().unwrap_or_default().to_string(),
        namespace: namespace.to_string(),
        hostname: hostname.to_string(),
        vips: vips
            .iter()
            .map(|(network, address)| NetworkAddress {
                network: network.to_string(),
                ip: ip(address),
            })
            .collect(),
        ports: BTreeMap::from([(80, 8080)]),
        subject_alt_names: Vec::new(),
        waypoint: None,
    }
}

fn backs(mut workload: Workload, service: &Service) -> Workload {
    workload
        .services
        .insert(service.key(), BTreeMap::from([(80, 8080)]));
    workload
}

/// A model with: `echo` in `default` (v4 VIP, plus one in another network), `echo` in `other`
/// (another VIP), a dual-stack service, a v6-only one, a headless service with two healthy
/// endpoints and one unhealthy, an external wildcard service, a VIP-less external service with
/// no endpoints, and a workload with a hostname.
fn model() -> Snapshot {
    let echo = service(
        "default",
        "echo.default.svc.cluster.local",
        &[("", "10.96.0.10"), ("remote", "10.250.0.10")],
    );
    let echo_other = service(
        "other",
        "echo.other.svc.cluster.local",
        &[("", "10.96.1.10")],
    );
    let dual = service(
        "default",
        "dual.default.svc.cluster.local",
        &[("", "10.96.0.11"), ("", "fd00::11")],
    );
    let v6 = service(
        "default",
        "v6.default.svc.cluster.local",
        &[("", "fd00::12")],
    );
    let headless = service("default", "db.default.svc.cluster.local", &[]);
    let wildcard = service("default", "*.example.com", &[("", "10.96.0.13")]);
    let bare = service("default", "bare.example.org", &[]);
    let client = workload("default", "client", ip("10.200.1.2"));
    let db_0 = backs(workload("default", "db-0", ip("10.200.1.5")), &headless);
    let db_1 = backs(
        Workload {
            workload_ips: vec![ip("10.200.1.6"), ip("fd00::6")],
            ..workload("default", "db-1", ip("10.200.1.6"))
        },
        &headless,
    );
    let db_down = backs(
        Workload {
            status: crate::state::HealthStatus::Unhealthy,
            ..workload("default", "db-2", ip("10.200.1.7"))
        },
        &headless,
    );
    let vm = Workload {
        hostname: "vm.example.net".to_string(),
        ..workload("default", "vm", ip("10.200.9.9"))
    };
    Snapshot::new(
        vec![client, db_0, db_1, db_down, vm],
        vec![echo, echo_other, dual, v6, headless, wildcard, bare],
        Vec::new(),
    )
}

fn known(canonical: Option<&str>, addresses: &[&str]) -> Option<(Option<String>, Vec<IpAddr>)> {
    Some((
        canonical.map(str::to_string),
        addresses.iter().map(|a| ip(a)).collect(),
    ))
}

#[test]
fn names_resolve_as_a_pod_in_its_namespace_expects() {
    let snapshot = model();
    let domains = Domains::new("cluster.local");
    let client = snapshot
        .workload("cluster//Pod/default/client")
        .expect("client")
        .clone();
    let in_other = Workload {
        namespace: "other".to_string(),
        ..(*client).clone()
    };
    let cases: Vec<(&str, &Workload, &str, Family, _)> = vec![
        (
            "full name",
            &client,
            "echo.default.svc.cluster.local",
            Family::V4,
            known(None, &["10.96.0.10"]),
        ),
        (
            "short name",
            &client,
            "echo",
            Family::V4,
            known(None, &["10.96.0.10"]),
        ),
        (
            "short name from another namespace",
            &in_other,
            "echo",
            Family::V4,
            known(None, &["10.96.1.10"]),
        ),
        (
            "name.namespace",
            &in_other,
            "echo.default",
            Family::V4,
            known(None, &["10.96.0.10"]),
        ),
        (
            "name.namespace.svc",
            &client,
            "echo.other.svc",
            Family::V4,
            known(None, &["10.96.1.10"]),
        ),
        (
            "search domain appended by the client's resolver",
            &client,
            "echo.other.default.svc.cluster.local",
            Family::V4,
            known(Some("echo.other"), &["10.96.1.10"]),
        ),
        (
            "v4-only name asked AAAA: known, empty",
            &client,
            "echo",
            Family::V6,
            known(None, &[]),
        ),
        (
            "v6-only name asked A: known, empty",
            &client,
            "v6",
            Family::V4,
            known(None, &[]),
        ),
        (
            "v6-only name asked AAAA",
            &client,
            "v6",
            Family::V6,
            known(None, &["fd00::12"]),
        ),
        (
            "dual-stack, A",
            &client,
            "dual",
            Family::V4,
            known(None, &["10.96.0.11"]),
        ),
        (
            "dual-stack, AAAA",
            &client,
            "dual",
            Family::V6,
            known(None, &["fd00::11"]),
        ),
        (
            "headless: healthy endpoints",
            &client,
            "db",
            Family::V4,
            known(None, &["10.200.1.5", "10.200.1.6"]),
        ),
        (
            "headless, AAAA",
            &client,
            "db",
            Family::V6,
            known(None, &["fd00::6"]),
        ),
        (
            "wildcard service",
            &client,
            "api.example.com",
            Family::V4,
            known(None, &["10.96.0.13"]),
        ),
        (
            "workload hostname",
            &client,
            "vm.example.net",
            Family::V4,
            known(None, &["10.200.9.9"]),
        ),
        (
            "no VIP, no endpoint, not this cluster: upstream's",
            &client,
            "bare.example.org",
            Family::V4,
            None,
        ),
        ("unknown short name", &client, "nothing", Family::V4, None),
        (
            "short name of another namespace's service",
            &client,
            "echo.nowhere",
            Family::V4,
            None,
        ),
        ("external", &client, "www.example.org", Family::V4, None),
    ];
    for (case, client, name, family, expected) in cases {
        let got = match resolve(&snapshot, &domains, client, name, family) {
            Resolution::Unknown => None,
            Resolution::Known {
                canonical,
                addresses,
                ..
            } => Some((canonical, addresses)),
        };
        assert_eq!(got, expected, "{case}: {name}");
    }
}

#[test]
fn another_cluster_domain_is_honoured() {
    let echo = service(
        "default",
        "echo.default.svc.corp.example",
        &[("", "10.96.0.10")],
    );
    let client = workload("default", "client", ip("10.200.1.2"));
    let snapshot = Snapshot::new(vec![client.clone()], vec![echo], Vec::new());
    let domains = Domains::new("Corp.Example.");
    for name in [
        "echo",
        "echo.default",
        "echo.default.svc",
        "echo.default.svc.corp.example",
    ] {
        assert!(
            matches!(
                resolve(&snapshot, &domains, &client, name, Family::V4),
                Resolution::Known { .. }
            ),
            "{name}"
        );
    }
    assert_eq!(
        resolve(
            &snapshot,
            &domains,
            &client,
            "echo.default.svc.cluster.local",
            Family::V4
        ),
        Resolution::Unknown
    );
}

#[test]
fn wildcards_and_kubernetes_expansions() {
    assert_eq!(wildcards("a.b.c"), ["a.b.c", "*.b.c", "*.c"]);
    assert_eq!(wildcards("single"), ["single"]);
    let domains = Domains::new("cluster.local");
    assert_eq!(
        kubernetes_names(&domains, "ns", "svc1"),
        ["svc1.ns.svc.cluster.local"]
    );
    assert_eq!(
        kubernetes_names(&domains, "ns", "svc1.ns2"),
        ["svc1.ns2.svc.cluster.local"]
    );
    assert_eq!(
        kubernetes_names(&domains, "ns", "svc1.ns2.svc"),
        ["svc1.ns2.svc.cluster.local"]
    );
    assert!(kubernetes_names(&domains, "ns", "a.b.c.d").is_empty());
    assert!(kubernetes_names(&domains, "ns", "a.b.not-svc").is_empty());
}
