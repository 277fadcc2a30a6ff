use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::state::{HealthStatus, Service, Snapshot, TunnelProtocol, Workload};

fn workload(
    name: &str,
    ip: &str,
    protocol: TunnelProtocol,
    services: &[(&str, u16, u16)],
) -> Workload {
    let mut service_ports: BTreeMap<String, BTreeMap<u16, u16>> = BTreeMap::new();
    for (key, service_port, target_port) in services {
        service_ports
            .entry(key.to_string())
            .or_default()
            .insert(*service_port, *target_port);
    }
    Workload {
        protocol,
        services: service_ports,
        ..crate::state::tests::workload("default", name, ip.parse::<IpAddr>().unwrap())
    }
}

fn service(hostname: &str, vip: &str, ports: &[(u16, u16)], sans: &[&str]) -> Service {
    Service {
        name: hostname.split('.').next().unwrap().into(),
        namespace: "default".into(),
        hostname: hostname.into(),
        vips: vec![format!("/{vip}").parse().unwrap()],
        ports: ports.iter().copied().collect(),
        subject_alt_names: sans.iter().map(|s| s.parse().unwrap()).collect(),
        waypoint: None,
    }
}

const ECHO: &str = "default/echo.default.svc.cluster.local";

fn snapshot() -> (Snapshot, Workload) {
    let client = workload("client", "10.0.1.2", TunnelProtocol::Hbone, &[]);
    let mut unhealthy = workload(
        "sick",
        "10.0.2.9",
        TunnelProtocol::Hbone,
        &[(ECHO, 80, 8080)],
    );
    unhealthy.status = HealthStatus::Unhealthy;
    let mut remote = workload("remote", "10.9.0.1", TunnelProtocol::Hbone, &[]);
    remote.network = "other".into();
    let workloads = vec![
        client.clone(),
        workload(
            "echo-a",
            "10.0.2.2",
            TunnelProtocol::Hbone,
            &[(ECHO, 80, 8080)],
        ),
        workload(
            "echo-b",
            "10.0.3.2",
            TunnelProtocol::Hbone,
            &[(ECHO, 80, 9090)],
        ),
        workload("legacy", "10.0.2.3", TunnelProtocol::Tcp, &[]),
        unhealthy,
        remote,
    ];
    let services = vec![
        service(
            "echo.default.svc.cluster.local",
            "10.96.0.10",
            &[(80, 8080)],
            &["spiffe://cluster.local/ns/default/sa/echo-svc"],
        ),
        service(
            "empty.default.svc.cluster.local",
            "10.96.0.11",
            &[(80, 8080)],
            &[],
        ),
    ];
    (
        Snapshot::new(workloads, services, Default::default()),
        client,
    )
}

/// What a route decision should be, in a form a table can state.
#[derive(Debug, PartialEq)]
enum Want {
    Hbone {
        peer: &'static str,
        authority: &'static str,
        identities: &'static [&'static str],
    },
    Passthrough(&'static str),
    Error(&'static str),
}

impl Want {
    /// The same summary [`summarize`] makes of a decision.
    fn expected(&self) -> (String, String, Vec<String>) {
        match self {
            Want::Hbone {
                peer,
                authority,
                identities,
            } => (
                peer.to_string(),
                authority.to_string(),
                identities.iter().map(ToString::to_string).collect(),
            ),
            Want::Passthrough(target) => ("passthrough".into(), target.to_string(), vec![]),
            Want::Error(message) => ("error".into(), message.to_string(), vec![]),
        }
    }
}

fn summarize(result: Result<Route, RouteError>) -> (String, String, Vec<String>) {
    match result {
        Ok(Route::Hbone(route)) => (
            route.peer.to_string(),
            route.authority.to_string(),
            route
                .expected_identities
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
        Ok(Route::Passthrough(route)) => ("passthrough".into(), route.target.to_string(), vec![]),
        Err(error) => ("error".into(), error.to_string(), vec![]),
    }
}

#[test]
fn decide_table() {
    let (snapshot, client) = snapshot();
    let cases: &[(&str, u64, Want)] = &[
        (
            "10.0.2.2:8080",
            0,
            Want::Hbone { peer: "10.0.2.2:15008", authority: "10.0.2.2:8080", identities: &["spiffe://cluster.local/ns/default/sa/echo-a"] },
        ),
        (
            "10.96.0.10:80",
            0,
            Want::Hbone {
                peer: "10.0.2.2:15008",
                authority: "10.0.2.2:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/echo-a", "spiffe://cluster.local/ns/default/sa/echo-svc"],
            },
        ),
        (
            // The endpoint's own port map wins over the service's target port.
            "10.96.0.10:80",
            1,
            Want::Hbone {
                peer: "10.0.3.2:15008",
                authority: "10.0.3.2:9090",
                identities: &["spiffe://cluster.local/ns/default/sa/echo-b", "spiffe://cluster.local/ns/default/sa/echo-svc"],
            },
        ),
        ("10.96.0.10:80", 2, Want::Hbone { peer: "10.0.2.2:15008", authority: "10.0.2.2:8080", identities: &["spiffe://cluster.local/ns/default/sa/echo-a", "spiffe://cluster.local/ns/default/sa/echo-svc"] }),
        ("10.96.0.10:81", 0, Want::Error("service default/echo.default.svc.cluster.local has no healthy endpoint for port 81")),
        ("10.96.0.11:80", 0, Want::Error("service default/empty.default.svc.cluster.local has no healthy endpoint for port 80")),
        ("10.0.2.3:5432", 0, Want::Passthrough("10.0.2.3:5432")),
        ("192.0.2.1:443", 0, Want::Passthrough("192.0.2.1:443")),
        ("127.0.0.1:15001", 0, Want::Error("refusing to proxy to the agent's own port 15001 (would loop)")),
        ("10.0.1.2:15006", 0, Want::Error("refusing to proxy to the agent's own port 15006 (would loop)")),
        ("10.9.0.1:80", 0, Want::Passthrough("10.9.0.1:80")),
    ];
    for (dst, pick, want) in cases {
        let destination = OriginalDst(dst.parse().unwrap());
        let got = summarize(decide(&snapshot, &client, destination, 15008, *pick));
        let expected = want.expected();
        assert_eq!(got, expected, "dst {dst} pick {pick}");
    }
}

#[test]
fn unhealthy_endpoints_are_never_picked() {
    let (snapshot, client) = snapshot();
    let destination = OriginalDst("10.96.0.10:80".parse().unwrap());
    let picked: std::collections::BTreeSet<IpAddr> = (0..16)
        .filter_map(
            |pick| match decide(&snapshot, &client, destination, 15008, pick) {
                Ok(Route::Hbone(route)) => Some(route.authority.ip()),
                _ => None,
            },
        )
        .collect();
    let want: std::collections::BTreeSet<IpAddr> = ["10.0.2.2", "10.0.3.2"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    assert_eq!(picked, want);
}

#[test]
fn other_network_workload_by_service_is_refused() {
    let (_, client) = snapshot();
    let mut remote = workload(
        "remote",
        "10.9.0.1",
        TunnelProtocol::Hbone,
        &[(ECHO, 80, 8080)],
    );
    remote.network = "other".into();
    let snapshot = Snapshot::new(
        vec![client.clone(), remote],
        vec![service(
            "echo.default.svc.cluster.local",
            "10.96.0.10",
            &[(80, 8080)],
            &[],
        )],
        Default::default(),
    );
    let result = decide(
        &snapshot,
        &client,
        OriginalDst("10.96.0.10:80".parse().unwrap()),
        15008,
        0,
    );
    assert!(
        matches!(result, Err(RouteError::OtherNetwork { .. })),
        "{result:?}"
    );
}

const WAYPOINT_SVC: &str = "default/waypoint.default.svc.cluster.local";

fn gateway_at(ip: &str, port: u16) -> crate::state::GatewayAddress {
    crate::state::GatewayAddress {
        destination: crate::state::GatewayDestination::Address(format!("/{ip}").parse().unwrap()),
        hbone_mtls_port: port,
    }
}

fn gateway_named(hostname: &str) -> crate::state::GatewayAddress {
    crate::state::GatewayAddress {
        destination: crate::state::GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: hostname.into(),
        },
        hbone_mtls_port: 15008,
    }
}

/// A mesh with waypoints: `protected` (VIP 10.96.1.1) has a waypoint referenced by its service
/// hostname; pod `guarded` has a workload waypoint by address; `open` (VIP 10.96.1.2) has no
/// service waypoint but its endpoint `guarded` has one; `by-host` names a waypoint workload by
/// hostname; `lost` names a waypoint that does not exist.
fn waypoint_snapshot() -> (Snapshot, Workload, Workload, Workload) {
    let client = workload("client", "10.0.1.2", TunnelProtocol::Hbone, &[]);
    let waypoint = workload(
        "waypoint",
        "10.0.5.5",
        TunnelProtocol::Hbone,
        &[(WAYPOINT_SVC, 15008, 15008)],
    );
    let mut host_waypoint = workload("host-waypoint", "10.0.5.6", TunnelProtocol::Hbone, &[]);
    host_waypoint.hostname = "wp.example".into();
    let server = workload(
        "server",
        "10.0.2.2",
        TunnelProtocol::Hbone,
        &[("default/protected.default.svc.cluster.local", 80, 8080)],
    );
    let mut guarded = workload(
        "guarded",
        "10.0.2.3",
        TunnelProtocol::Hbone,
        &[("default/open.default.svc.cluster.local", 80, 8080)],
    );
    guarded.waypoint = Some(gateway_at("10.0.5.5", 15008));
    let mut by_host = workload("by-host", "10.0.2.4", TunnelProtocol::Hbone, &[]);
    by_host.waypoint = Some(gateway_named("wp.example"));
    let mut lost = workload("lost", "10.0.2.5", TunnelProtocol::Hbone, &[]);
    lost.waypoint = Some(gateway_at("10.0.9.9", 15008));
    let mut protected = service(
        "protected.default.svc.cluster.local",
        "10.96.1.1",
        &[(80, 8080)],
        &[],
    );
    protected.waypoint = Some(gateway_named("waypoint.default.svc.cluster.local"));
    let open = service(
        "open.default.svc.cluster.local",
        "10.96.1.2",
        &[(80, 8080)],
        &[],
    );
    let waypoint_service = service(
        "waypoint.default.svc.cluster.local",
        "10.96.5.5",
        &[(15008, 15008)],
        &["spiffe://cluster.local/ns/default/sa/waypoint-svc"],
    );
    let snapshot = Snapshot::new(
        vec![
            client.clone(),
            waypoint.clone(),
            host_waypoint,
            server,
            guarded.clone(),
            by_host,
            lost,
        ],
        vec![protected, open, waypoint_service],
        Default::default(),
    );
    (snapshot, client, waypoint, guarded)
}

#[test]
fn waypoint_table() {
    let (snapshot, client, waypoint, guarded) = waypoint_snapshot();
    let mut impostor = waypoint.clone();
    impostor.uid = "c//Pod/default/impostor".into();
    impostor.workload_ips = vec!["10.0.7.7".parse().unwrap()];
    const WAYPOINT_IDS: &[&str] = &[
        "spiffe://cluster.local/ns/default/sa/waypoint",
        "spiffe://cluster.local/ns/default/sa/waypoint-svc",
    ];
    let cases: &[(&str, &Workload, &str, Want)] = &[
        (
            "service with a waypoint: to the waypoint, authority untranslated",
            &client,
            "10.96.1.1:80",
            Want::Hbone {
                peer: "10.0.5.5:15008",
                authority: "10.96.1.1:80",
                identities: WAYPOINT_IDS,
            },
        ),
        (
            "the waypoint itself dialling the service goes to the endpoint",
            &waypoint,
            "10.96.1.1:80",
            Want::Hbone {
                peer: "10.0.2.2:15008",
                authority: "10.0.2.2:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/server"],
            },
        ),
        (
            "pod with a workload waypoint: to the waypoint, authority = pod IP:port",
            &client,
            "10.0.2.3:8080",
            Want::Hbone {
                peer: "10.0.5.5:15008",
                authority: "10.0.2.3:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/waypoint"],
            },
        ),
        (
            "the waypoint's own outbound to the pod goes direct",
            &waypoint,
            "10.0.2.3:8080",
            Want::Hbone {
                peer: "10.0.2.3:15008",
                authority: "10.0.2.3:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/guarded"],
            },
        ),
        (
            "a workload with the waypoint's identity but not its address is not the waypoint",
            &impostor,
            "10.0.2.3:8080",
            Want::Hbone {
                peer: "10.0.5.5:15008",
                authority: "10.0.2.3:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/waypoint"],
            },
        ),
        (
            "the protected workload calling itself by pod IP still goes via its waypoint",
            &guarded,
            "10.0.2.3:8080",
            Want::Hbone {
                peer: "10.0.5.5:15008",
                authority: "10.0.2.3:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/waypoint"],
            },
        ),
        (
            "service without a waypoint skips the endpoint's workload waypoint",
            &client,
            "10.96.1.2:80",
            Want::Hbone {
                peer: "10.0.2.3:15008",
                authority: "10.0.2.3:8080",
                identities: &["spiffe://cluster.local/ns/default/sa/guarded"],
            },
        ),
        (
            "waypoint named by a workload hostname",
            &client,
            "10.0.2.4:9000",
            Want::Hbone {
                peer: "10.0.5.6:15008",
                authority: "10.0.2.4:9000",
                identities: &["spiffe://cluster.local/ns/default/sa/host-waypoint"],
            },
        ),
        (
            "an unresolvable waypoint fails closed",
            &client,
            "10.0.2.5:80",
            Want::Error("waypoint /10.0.9.9 of the destination resolves to no reachable workload"),
        ),
    ];
    for (name, source, dst, want) in cases {
        let destination = OriginalDst(dst.parse().unwrap());
        let got = summarize(decide(&snapshot, source, destination, 15008, 0));
        let expected = want.expected();
        assert_eq!(got, expected, "{name}");
    }
}

fn entry(name: &str, hosts: &[&str], addresses: &[&str]) -> crate::state::egress::ServiceEntry {
    use crate::state::egress::{ExportTo, Location, Resolution, ServiceEntry, ServiceEntryPort};
    ServiceEntry {
        namespace: "default".into(),
        name: name.into(),
        hosts: hosts.iter().map(ToString::to_string).collect(),
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        ports: vec![ServiceEntryPort {
            number: 443,
            name: "tls".into(),
            protocol: "TLS".into(),
            target_port: None,
        }],
        location: Location::MeshExternal,
        resolution: Resolution::None,
        endpoints: Vec::new(),
        export_to: ExportTo::All,
        waypoint: None,
    }
}

fn registry_only(snapshot: Snapshot, entries: Vec<crate::state::egress::ServiceEntry>) -> Snapshot {
    use crate::state::egress::{Egress, OutboundMode, OutboundTrafficPolicy};
    snapshot.with_egress(Egress {
        policy: OutboundTrafficPolicy {
            mode: OutboundMode::RegistryOnly,
            namespaces: Default::default(),
        },
        service_entries: entries.into_iter().map(std::sync::Arc::new).collect(),
        ..Egress::default()
    })
}

/// The pod resolved `api.partner.example` (entry `api`) to 198.51.100.7.
fn resolved_api(ip: IpAddr) -> Option<crate::state::learned::Grants> {
    use crate::state::learned::{EntryRef, Grant};
    (ip == "198.51.100.7".parse::<IpAddr>().unwrap()).then(|| {
        std::sync::Arc::from(vec![Grant {
            entry: EntryRef {
                namespace: "default".into(),
                name: "api".into(),
            },
            host: "api.partner.example".into(),
            expires: tokio::time::Instant::now(),
        }])
    })
}

#[test]
fn registry_only_refuses_only_what_is_outside_the_registry() {
    let (snapshot, client) = snapshot();
    let snapshot = registry_only(
        snapshot,
        vec![
            entry("partner", &["partner.example"], &["192.0.2.0/28"]),
            entry("api", &["api.partner.example"], &[]),
        ],
    );
    let blocked = "192.0.2.99:443 is not in the registry and outboundTrafficPolicy for namespace \
                   default is REGISTRY_ONLY (no workload, service or ServiceEntry matches, and \
                   the pod did not resolve it through its DNS proxy under an allowed host)";
    let cases: &[(&str, Want)] = &[
        // Mesh workloads and services stay reachable.
        ("10.0.2.3:5432", Want::Passthrough("10.0.2.3:5432")),
        ("10.96.0.10:80", Want::Hbone { peer: "10.0.2.2:15008", authority: "10.0.2.2:8080", identities: &["spiffe://cluster.local/ns/default/sa/echo-a", "spiffe://cluster.local/ns/default/sa/echo-svc"] }),
        // The ServiceEntry's CIDR and port.
        ("192.0.2.1:443", Want::Passthrough("192.0.2.1:443")),
        ("192.0.2.1:80", Want::Error("192.0.2.1:80 is not in the registry and outboundTrafficPolicy for namespace default is REGISTRY_ONLY (a ServiceEntry covers the address but not this port)")),
        ("192.0.2.99:443", Want::Error(blocked)),
        // What the pod resolved through an allowed host, on the entry's port only.
        ("198.51.100.7:443", Want::Passthrough("198.51.100.7:443")),
        ("198.51.100.7:80", Want::Error("198.51.100.7:80 is not in the registry and outboundTrafficPolicy for namespace default is REGISTRY_ONLY (a ServiceEntry covers the address but not this port)")),
        ("198.51.100.8:443", Want::Error("198.51.100.8:443 is not in the registry and outboundTrafficPolicy for namespace default is REGISTRY_ONLY (no workload, service or ServiceEntry matches, and the pod did not resolve it through its DNS proxy under an allowed host)")),
    ];
    let not_ejected = |_: &Service, _: &Workload| false;
    let context = RouteContext {
        ejected: &not_ejected,
        learned: &resolved_api,
    };
    for (dst, want) in cases {
        let destination = OriginalDst(dst.parse().unwrap());
        let got = summarize(decide_avoiding(
            &snapshot,
            &client,
            destination,
            15008,
            0,
            &context,
        ));
        assert_eq!(got, want.expected(), "dst {dst}");
    }
}

#[test]
fn an_egress_gateway_entry_goes_through_its_waypoint() {
    let (snapshot, client, waypoint, _) = waypoint_snapshot();
    let mut gateway = entry("api", &["api.partner.example"], &["192.0.2.0/28"]);
    gateway.waypoint = Some(gateway_named("waypoint.default.svc.cluster.local"));
    let mut lost = entry("lost", &["lost.example"], &["192.0.2.64/28"]);
    lost.waypoint = Some(gateway_named("missing.default.svc.cluster.local"));
    let snapshot = registry_only(snapshot, vec![gateway, lost]);
    let waypoint_identities: &[&str] = &[
        "spiffe://cluster.local/ns/default/sa/waypoint",
        "spiffe://cluster.local/ns/default/sa/waypoint-svc",
    ];
    let not_ejected = |_: &Service, _: &Workload| false;
    let context = RouteContext {
        ejected: &not_ejected,
        learned: &resolved_api,
    };
    let cases: &[(&Workload, &str, Want)] = &[
        // By address and by a resolved name: to the waypoint, authority as dialled.
        (&client, "192.0.2.1:443", Want::Hbone { peer: "10.0.5.5:15008", authority: "192.0.2.1:443", identities: waypoint_identities }),
        (&client, "198.51.100.7:443", Want::Hbone { peer: "10.0.5.5:15008", authority: "198.51.100.7:443", identities: waypoint_identities }),
        // The gateway itself goes out directly.
        (&waypoint, "192.0.2.1:443", Want::Passthrough("192.0.2.1:443")),
        // A gateway that resolves to nothing fails rather than going around it.
        (&client, "192.0.2.65:443", Want::Error("waypoint default/missing.default.svc.cluster.local of the destination resolves to no reachable workload")),
        // Not covered: refused as before.
        (&client, "192.0.2.99:80", Want::Error("192.0.2.99:80 is not in the registry and outboundTrafficPolicy for namespace default is REGISTRY_ONLY (no workload, service or ServiceEntry matches, and the pod did not resolve it through its DNS proxy under an allowed host)")),
    ];
    for (source, dst, want) in cases {
        let destination = OriginalDst(dst.parse().unwrap());
        let got = summarize(decide_avoiding(
            &snapshot,
            source,
            destination,
            15008,
            0,
            &context,
        ));
        assert_eq!(got, want.expected(), "{} -> {dst}", source.name);
    }
}

#[test]
fn ejected_endpoints_are_skipped_until_all_are() {
    let (snapshot, client) = snapshot();
    let destination = OriginalDst("10.96.0.10:80".parse().unwrap());
    let picked = |ejected: &dyn Fn(&Service, &Workload) -> bool| {
        let context = RouteContext {
            ejected,
            learned: &crate::state::egress::nothing_learned,
        };
        (0..8)
            .filter_map(|pick| {
                match decide_avoiding(&snapshot, &client, destination, 15008, pick, &context) {
                    Ok(Route::Hbone(route)) => Some(route.destination.name.clone()),
                    _ => None,
                }
            })
            .collect::<std::collections::BTreeSet<String>>()
    };
    let names = |list: &[&str]| list.iter().map(ToString::to_string).collect();
    assert_eq!(picked(&|_, _| false), names(&["echo-a", "echo-b"]));
    assert_eq!(
        picked(&|_, workload| workload.name == "echo-a"),
        names(&["echo-b"])
    );
    // Every endpoint ejected: all are used again rather than none.
    assert_eq!(picked(&|_, _| true), names(&["echo-a", "echo-b"]));
}
