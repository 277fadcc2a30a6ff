//! The inbound target table: which CONNECT authorities a pod serves, and where they land.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::state::{
    ApplicationTunnel, GatewayAddress, GatewayDestination, Service, Snapshot, Workload,
};

const ECHO: &str = "default/echo.default.svc.cluster.local";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test IP")
}

fn address(text: &str) -> Authority {
    Authority::Address(text.parse().expect("test socket address"))
}

fn hostname(host: &str, port: u16) -> Authority {
    Authority::Hostname {
        host: host.to_string(),
        port,
    }
}

fn via_waypoint() -> Option<GatewayAddress> {
    Some(GatewayAddress {
        destination: GatewayDestination::Address("/10.0.5.5".parse().expect("address")),
        hbone_mtls_port: 15008,
    })
}

fn service(hostname: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
    Service {
        name: hostname.split('.').next().unwrap_or_default().into(),
        namespace: "default".into(),
        hostname: hostname.into(),
        vips: vec![format!("/{vip}").parse().expect("VIP")],
        ports: ports.iter().copied().collect(),
        subject_alt_names: Vec::new(),
        waypoint: None,
    }
}

/// The server pod (dual-stack, backs echo: 80 → 8080 and 81 → the service's mapping), the
/// waypoint pod at 10.0.5.5 (fronting the `fronted` service and the `behind` pod), and a
/// neighbour pod.
fn snapshot() -> Snapshot {
    let mut server = crate::state::tests::workload("default", "server", ip("10.0.2.7"));
    server.workload_ips.push(ip("fd00::2:7"));
    server.services = BTreeMap::from([(ECHO.to_string(), BTreeMap::from([(80, 8080), (81, 0)]))]);
    let waypoint = crate::state::tests::workload("default", "waypoint", ip("10.0.5.5"));
    let neighbour = crate::state::tests::workload("default", "neighbour", ip("10.0.2.8"));
    let behind = Workload {
        waypoint: via_waypoint(),
        ..crate::state::tests::workload("default", "behind", ip("10.0.2.9"))
    };
    let echo = service(
        "echo.default.svc.cluster.local",
        "10.96.0.10",
        &[(80, 8080), (81, 9090)],
    );
    let fronted = Service {
        waypoint: via_waypoint(),
        ..service(
            "fronted.default.svc.cluster.local",
            "10.96.0.20",
            &[(80, 8080)],
        )
    };
    Snapshot::new(
        vec![server, waypoint, neighbour, behind],
        vec![echo, fronted],
        Vec::new(),
    )
}

fn local(snapshot: &Snapshot, name: &str) -> Workload {
    let uid = format!("cluster//Pod/default/{name}");
    snapshot
        .workload(&uid)
        .expect("local workload")
        .as_ref()
        .clone()
}

fn tunnel(protocol: ApplicationTunnelProtocol, port: Option<u16>) -> Option<ApplicationTunnel> {
    Some(ApplicationTunnel { protocol, port })
}

fn delivered(requested: &str, address: &str, proxy_header: bool) -> Result<Delivery, TargetError> {
    Ok(Delivery {
        requested: requested.parse().expect("requested"),
        address: address.parse().expect("delivery"),
        proxy_header,
    })
}

fn mismatch(requested: &str, workload: &str) -> Result<Delivery, TargetError> {
    Err(TargetError::IpMismatch {
        requested: requested.into(),
        workload: format!("cluster//Pod/default/{workload}"),
    })
}

fn agent_port(address: &str) -> Result<Delivery, TargetError> {
    Err(TargetError::AgentPort(address.parse().expect("address")))
}

#[test]
fn decides_every_kind_of_authority() {
    let snapshot = snapshot();
    let server = local(&snapshot, "server");
    let waypoint = local(&snapshot, "waypoint");
    let tunnelled = Workload {
        application_tunnel: tunnel(ApplicationTunnelProtocol::None, None),
        ..server.clone()
    };
    let proxy_tunnel = Workload {
        application_tunnel: tunnel(ApplicationTunnelProtocol::Proxy, Some(15088)),
        ..waypoint.clone()
    };
    let tunnel_to_agent = Workload {
        application_tunnel: tunnel(ApplicationTunnelProtocol::None, Some(15006)),
        ..server.clone()
    };
    let no_address = Workload {
        workload_ips: Vec::new(),
        ..server.clone()
    };
    let cases: Vec<(&str, &Workload, Authority, Result<Delivery, TargetError>)> = vec![
        (
            "own IPv4 address",
            &server,
            address("10.0.2.7:8080"),
            delivered("10.0.2.7:8080", "10.0.2.7:8080", false),
        ),
        (
            "own IPv6 address",
            &server,
            address("[fd00::2:7]:8080"),
            delivered("[fd00::2:7]:8080", "[fd00::2:7]:8080", false),
        ),
        (
            "another pod's IP",
            &server,
            address("10.0.2.8:8080"),
            mismatch("10.0.2.8", "server"),
        ),
        (
            "an IPv6 address that is not the pod's",
            &server,
            address("[fd00::2:8]:8080"),
            mismatch("fd00::2:8", "server"),
        ),
        (
            "IPv4 loopback",
            &server,
            address("127.0.0.1:8080"),
            mismatch("127.0.0.1", "server"),
        ),
        (
            "IPv6 loopback",
            &server,
            address("[::1]:8080"),
            mismatch("::1", "server"),
        ),
        (
            "HBONE port on the pod's own IP",
            &server,
            address("10.0.2.7:15008"),
            agent_port("10.0.2.7:15008"),
        ),
        (
            "outbound port on the pod's own IPv6",
            &server,
            address("[fd00::2:7]:15001"),
            agent_port("[fd00::2:7]:15001"),
        ),
        (
            "a service VIP the pod backs but does not front",
            &server,
            address("10.96.0.10:80"),
            mismatch("10.96.0.10", "server"),
        ),
        (
            "a service VIP fronted by this waypoint",
            &waypoint,
            address("10.96.0.20:80"),
            delivered("10.96.0.20:80", "10.0.5.5:80", false),
        ),
        (
            "a service VIP fronted by another waypoint",
            &server,
            address("10.96.0.20:80"),
            mismatch("10.96.0.20", "server"),
        ),
        (
            "a workload behind this waypoint",
            &waypoint,
            address("10.0.2.9:8080"),
            delivered("10.0.2.9:8080", "10.0.5.5:8080", false),
        ),
        (
            "a workload without a waypoint, asked of a waypoint",
            &waypoint,
            address("10.0.2.8:8080"),
            mismatch("10.0.2.8", "waypoint"),
        ),
        (
            "the waypoint's agent port, for a workload behind it",
            &waypoint,
            address("10.0.2.9:15006"),
            agent_port("10.0.5.5:15006"),
        ),
        (
            "application tunnel: any address, delivered at the pod's IP and the asked port",
            &tunnelled,
            address("10.0.2.8:9000"),
            delivered("10.0.2.8:9000", "10.0.2.7:9000", false),
        ),
        (
            "application tunnel: an IPv6 address lands on the pod's IPv6",
            &tunnelled,
            address("[fd00::9]:9000"),
            delivered("[fd00::9]:9000", "[fd00::2:7]:9000", false),
        ),
        (
            "application tunnel with PROXY: the tunnel port, behind a header",
            &proxy_tunnel,
            address("10.96.0.20:80"),
            delivered("10.96.0.20:80", "10.0.5.5:15088", true),
        ),
        (
            "application tunnel whose port is an agent port",
            &tunnel_to_agent,
            address("10.0.2.7:8080"),
            agent_port("10.0.2.7:15006"),
        ),
        (
            "hostname of a service the pod backs: the pod's target port",
            &server,
            hostname("echo.default.svc.cluster.local", 80),
            delivered("10.0.2.7:8080", "10.0.2.7:8080", false),
        ),
        (
            "hostname whose pod mapping is 0: the service's target port",
            &server,
            hostname("echo.default.svc.cluster.local", 81),
            delivered("10.0.2.7:9090", "10.0.2.7:9090", false),
        ),
        (
            "hostname on a port the service does not have",
            &server,
            hostname("echo.default.svc.cluster.local", 82),
            Err(TargetError::UnknownHostname(
                "echo.default.svc.cluster.local:82".into(),
            )),
        ),
        (
            "hostname of a service the pod does not back",
            &server,
            hostname("fronted.default.svc.cluster.local", 80),
            Err(TargetError::UnknownHostname(
                "fronted.default.svc.cluster.local:80".into(),
            )),
        ),
        (
            "hostname, but the pod has no address",
            &no_address,
            hostname("echo.default.svc.cluster.local", 80),
            Err(TargetError::NoAddress("cluster//Pod/default/server".into())),
        ),
    ];
    for (case, workload, authority, expected) in cases {
        assert_eq!(decide(&snapshot, workload, &authority), expected, "{case}");
    }
}

#[test]
fn delivery_never_leaves_the_pod() {
    let snapshot = snapshot();
    let waypoint = local(&snapshot, "waypoint");
    let tunnelled = Workload {
        application_tunnel: tunnel(ApplicationTunnelProtocol::None, None),
        ..local(&snapshot, "server")
    };
    for (workload, authority) in [
        (&waypoint, "10.96.0.20:80"),
        (&waypoint, "10.0.2.9:8080"),
        (&tunnelled, "10.0.2.8:8080"),
        (&tunnelled, "192.0.2.1:443"),
    ] {
        let delivery = decide(&snapshot, workload, &address(authority)).expect(authority);
        let delivered_to: SocketAddr = delivery.address;
        assert!(
            workload.workload_ips.contains(&delivered_to.ip()),
            "{authority} delivered to {delivered_to}, outside the pod"
        );
    }
}
