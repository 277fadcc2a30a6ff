//! Table-driven checks of the proto → model conversion: what is accepted, defaulted, refused.

use super::*;
use crate::proto::workload as wl;

fn good_workload() -> wl::Workload {
    wl::Workload {
        uid: "Kubernetes//Pod/default/a".to_string(),
        name: "a".to_string(),
        namespace: "default".to_string(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        node: "node-1".to_string(),
        services: [(
            "default/echo.default.svc.cluster.local".to_string(),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        ..wl::Workload::default()
    }
}

#[test]
fn workload_defaults_follow_istio() {
    let workload = workload(good_workload()).expect("valid");
    assert_eq!(
        workload.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(workload.cluster_id, "Kubernetes");
    assert_eq!(workload.protocol, TunnelProtocol::Hbone);
    assert_eq!(
        workload.workload_ips,
        vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(workload.workload_type, "deployment");
    assert_eq!(
        workload.services["default/echo.default.svc.cluster.local"],
        BTreeMap::from([(80, 8080)])
    );
}

#[test]
fn bad_workloads_name_the_field() {
    type Edit = fn(&mut wl::Workload);
    let cases: &[(&str, Edit, &str)] = &[
        ("empty uid", |w| w.uid.clear(), "workload.uid"),
        (
            "empty namespace",
            |w| w.namespace.clear(),
            "workload.namespace",
        ),
        (
            "5-byte address",
            |w| w.addresses.push(vec![1, 2, 3, 4, 5]),
            "workload.addresses[1]",
        ),
        (
            "bad service account",
            |w| w.service_account = "a/b".to_string(),
            "workload.service_account",
        ),
        (
            "service key",
            |w| {
                w.services
                    .insert("nohost".to_string(), wl::PortList::default());
            },
            "workload.services[\"nohost\"]",
        ),
        (
            "port too large",
            |w| {
                w.services.insert(
                    "default/x".to_string(),
                    wl::PortList {
                        ports: vec![wl::Port {
                            service_port: 70000,
                            target_port: 1,
                            app_protocol: 0,
                        }],
                    },
                );
            },
            "workload.services[\"default/x\"].ports[0].service_port",
        ),
        (
            "waypoint without destination",
            |w| w.waypoint = Some(wl::GatewayAddress::default()),
            "workload.waypoint",
        ),
    ];
    for (what, edit, field) in cases {
        let mut raw = good_workload();
        edit(&mut raw);
        let error = workload(raw).expect_err(what);
        assert_eq!(error.field, *field, "{what}: {error}");
    }
}

#[test]
fn host_network_workloads_are_not_indexed_by_ip() {
    let mut raw = good_workload();
    raw.network_mode = wl::NetworkMode::HostNetwork as i32;
    assert!(workload(raw).expect("valid").workload_ips.is_empty());
}

#[test]
fn services_convert_with_waypoints_and_sans() {
    let raw = wl::Service {
        name: "echo".to_string(),
        namespace: "default".to_string(),
        hostname: "echo.default.svc.cluster.local".to_string(),
        addresses: vec![
            wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
                length: None,
            },
            // A CIDR VIP is left out, not widened.
            wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 97, 0, 0],
                length: Some(16),
            },
        ],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 0,
            app_protocol: 0,
        }],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".to_string()],
        waypoint: Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Hostname(
                wl::NamespacedHostname {
                    namespace: "default".to_string(),
                    hostname: "waypoint.default.svc.cluster.local".to_string(),
                },
            )),
            hbone_mtls_port: 0,
        }),
        ..wl::Service::default()
    };
    let service = service(raw.clone()).expect("valid");
    assert_eq!(service.key(), "default/echo.default.svc.cluster.local");
    assert_eq!(service.vips.len(), 1);
    assert_eq!(service.ports, BTreeMap::from([(80, 0)]));
    assert_eq!(service.waypoint.expect("waypoint").hbone_mtls_port, 15008);
    let mut bad_san = raw;
    bad_san.subject_alt_names = vec!["not-spiffe".to_string()];
    assert_eq!(
        super::service(bad_san).expect_err("bad san").field,
        "service.subject_alt_names[0]"
    );
}

#[test]
fn authorizations_convert_every_match_kind() {
    use crate::proto::security as sec;
    let exact = |value: &str| sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(value.to_string())),
    };
    let raw = sec::Authorization {
        name: "allow-a".to_string(),
        namespace: "default".to_string(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    namespaces: vec![exact("default")],
                    principals: vec![exact("cluster.local/ns/default/sa/a")],
                    source_ips: vec![sec::Address {
                        address: vec![10, 0, 0, 7],
                        length: 24,
                    }],
                    destination_ports: vec![8080],
                    service_accounts: vec![sec::ServiceAccountMatch {
                        namespace: "default".to_string(),
                        service_account: "a".to_string(),
                    }],
                    ..sec::Match::default()
                }],
            }],
        }],
        ..sec::Authorization::default()
    };
    let policy = authorization(raw.clone()).expect("valid");
    assert_eq!(policy.key(), "default/allow-a");
    assert_eq!(policy.scope, PolicyScope::WorkloadSelector);
    assert_eq!(policy.action, PolicyAction::Deny);
    let matched = &policy.rules[0][0][0];
    assert_eq!(
        matched.source_ips,
        vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(matched.destination_ports, vec![8080]);
    assert_eq!(matched.service_accounts[0].service_account, "a");

    type Edit = fn(&mut sec::Authorization);
    let cases: &[(Edit, &str)] = &[
        (|a| a.action = 7, "authorization.action"),
        (|a| a.scope = 9, "authorization.scope"),
        (
            |a| a.rules[0].clauses[0].matches[0].source_ips[0].length = 33,
            "authorization.rules[0].clauses[0].matches[0].source_ips[0].length",
        ),
        (
            |a| a.rules[0].clauses[0].matches[0].namespaces[0].match_type = None,
            "authorization.rules[0].clauses[0].matches[0].namespaces[0]",
        ),
        (
            |a| a.rules[0].clauses[0].matches[0].destination_ports[0] = 0,
            "authorization.rules[0].clauses[0].matches[0].destination_ports[0]",
        ),
    ];
    for (edit, field) in cases {
        let mut bad = raw.clone();
        edit(&mut bad);
        assert_eq!(authorization(bad).expect_err(field).field, *field);
    }
}

#[test]
fn resource_names_must_match_their_content() {
    let any = |workload: wl::Workload| prost_types::Any {
        type_url: ADDRESS_TYPE.to_string(),
        value: wl::Address {
            r#type: Some(wl::address::Type::Workload(workload)),
        }
        .encode_to_vec(),
    };
    let resource = any(good_workload());
    assert!(address_resource("Kubernetes//Pod/default/a", Some(&resource)).is_ok());
    assert_eq!(
        address_resource("other", Some(&resource))
            .expect_err("name")
            .field,
        "workload.uid"
    );
    let wrong_type = prost_types::Any {
        type_url: AUTHORIZATION_TYPE.to_string(),
        value: resource.value.clone(),
    };
    assert_eq!(
        address_resource("Kubernetes//Pod/default/a", Some(&wrong_type))
            .expect_err("type")
            .field,
        "resource.type_url"
    );
    let garbage = prost_types::Any {
        type_url: ADDRESS_TYPE.to_string(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert_eq!(
        address_resource("x", Some(&garbage))
            .expect_err("garbage")
            .field,
        "resource"
    );
}
