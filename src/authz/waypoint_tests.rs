//! Waypoint bypass protection in [`super::decide`]: who may reach a protected workload.

use std::net::IpAddr;

use super::{ConnectionFacts, DecisionReason, Verdict};
use crate::state::Workload;

const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/client";

fn workload(namespace: &str, name: &str, ip: [u8; 4]) -> Workload {
    crate::state::tests::workload(namespace, name, ip)
}

fn facts(identity: Option<&str>, port: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: identity.map(|text| text.parse().expect("identity")),
        source_ip: IpAddr::from([10, 0, 1, 5]),
        destination_ip: IpAddr::from([10, 0, 2, 7]),
        destination_port: port,
    }
}

/// Waypoint bypass protection: who may reach a protected workload, per switch and override.
#[test]
fn waypoint_bypass_table() {
    use crate::state::policy::{Authorization, WaypointEnforcement};
    use crate::state::{GatewayAddress, GatewayDestination, Snapshot};
    const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
    let waypoint = workload("default", "waypoint", [10, 0, 5, 5]);
    let mut server = workload("default", "server", [10, 0, 2, 7]);
    server.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Address("/10.0.5.5".parse().expect("address")),
        hbone_mtls_port: 15008,
    });
    let mut lost = workload("default", "lost", [10, 0, 2, 8]);
    lost.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "nowhere".into(),
        },
        hbone_mtls_port: 15008,
    });
    let plain = workload("default", "plain", [10, 0, 2, 9]);
    let off = WaypointEnforcement {
        enforce: false,
        ..WaypointEnforcement::default()
    };
    let namespace_off = WaypointEnforcement {
        namespaces: [("default".to_string(), false)].into(),
        ..WaypointEnforcement::default()
    };
    let workload_on = WaypointEnforcement {
        enforce: false,
        namespaces: [("default".to_string(), false)].into(),
        workloads: [("default/server".to_string(), true)].into(),
    };
    let on = WaypointEnforcement::default();
    let cases: &[(&str, &WaypointEnforcement, &Workload, Option<&str>, Verdict)] = &[
        (
            "direct client refused",
            &on,
            &server,
            Some(CLIENT),
            Verdict::Deny,
        ),
        ("plaintext refused", &on, &server, None, Verdict::Deny),
        (
            "the waypoint admitted",
            &on,
            &server,
            Some(WAYPOINT),
            Verdict::Allow,
        ),
        (
            "unresolvable waypoint refuses all",
            &on,
            &lost,
            Some(WAYPOINT),
            Verdict::Deny,
        ),
        (
            "no waypoint: untouched",
            &on,
            &plain,
            Some(CLIENT),
            Verdict::Allow,
        ),
        ("switch off", &off, &server, Some(CLIENT), Verdict::Allow),
        (
            "namespace off",
            &namespace_off,
            &server,
            Some(CLIENT),
            Verdict::Allow,
        ),
        (
            "workload override on",
            &workload_on,
            &server,
            Some(CLIENT),
            Verdict::Deny,
        ),
    ];
    for (name, enforcement, destination, identity, want) in cases {
        let authorization = Authorization {
            waypoint: (*enforcement).clone(),
            ..Authorization::default()
        };
        let snapshot = Snapshot::with_authorization(
            vec![
                waypoint.clone(),
                server.clone(),
                lost.clone(),
                plain.clone(),
            ],
            vec![],
            authorization,
        );
        let decision = super::decide(&snapshot, destination, &facts(*identity, 8080));
        assert_eq!(decision.verdict, *want, "{name}: {decision}");
        if *want == Verdict::Deny {
            assert!(
                matches!(decision.reason, DecisionReason::WaypointBypass { .. }),
                "{name}: {decision}"
            );
        }
    }
    let snapshot = Snapshot::with_authorization(
        vec![waypoint.clone(), server.clone()],
        vec![],
        Authorization::default(),
    );
    let decision = super::decide(&snapshot, &server, &facts(Some(CLIENT), 8080));
    assert_eq!(
        decision.reason.to_string(),
        format!(
            "waypoint bypass: the destination only accepts traffic from its waypoint (allowed: [{WAYPOINT}])"
        )
    );
}
