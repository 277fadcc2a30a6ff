use super::*;

fn entry(name: &str, addresses: &[&str], ports: &[u16]) -> ServiceEntry {
    ServiceEntry {
        namespace: "egress".into(),
        name: name.into(),
        hosts: vec![format!("{name}.example")],
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        ports: ports
            .iter()
            .map(|number| ServiceEntryPort {
                number: *number,
                name: format!("tcp-{number}"),
                protocol: "TCP".into(),
                target_port: None,
            })
            .collect(),
        location: Location::MeshExternal,
        resolution: Resolution::None,
        endpoints: Vec::new(),
        export_to: ExportTo::All,
        waypoint: None,
    }
}

fn egress(mode: OutboundMode) -> Egress {
    let mut static_entry = entry("static", &["192.0.2.10/32"], &[80]);
    static_entry.resolution = Resolution::Static;
    static_entry.ports[0].target_port = Some(8080);
    static_entry.endpoints = vec![
        ServiceEntryEndpoint {
            address: "10.1.0.1".into(),
            ports: BTreeMap::new(),
        },
        ServiceEntryEndpoint {
            address: "10.1.0.2".into(),
            ports: [("tcp-80".to_string(), 9090)].into(),
        },
    ];
    let mut private = entry("private", &["198.51.100.0/24"], &[443]);
    private.export_to = ExportTo::Namespaces(["egress".to_string()].into());
    Egress {
        policy: OutboundTrafficPolicy {
            mode,
            namespaces: [("open".to_string(), OutboundMode::AllowAny)].into(),
        },
        service_entries: vec![
            Arc::new(entry(
                "cidr",
                &["203.0.113.0/24", "2001:db8::/64"],
                &[443, 8443],
            )),
            Arc::new(static_entry),
            Arc::new(private),
        ],
        ..Egress::default()
    }
}

/// What the decision came to, flattened for the table.
fn outcome(decision: EgressDecision) -> String {
    match decision {
        EgressDecision::ServiceEntry { entry, target, .. } => {
            format!("{} {target}", entry.name)
        }
        EgressDecision::AllowAny => "allow-any".into(),
        EgressDecision::Blocked(blocked) => format!("blocked {}", blocked.destination),
    }
}

#[test]
fn decision_table() {
    use OutboundMode::{AllowAny, RegistryOnly};
    let cases: &[(OutboundMode, &str, &str, u64, &str)] = &[
        // mode, source namespace, destination, pick, outcome
        (
            RegistryOnly,
            "app",
            "203.0.113.7:443",
            0,
            "cidr 203.0.113.7:443",
        ),
        (
            RegistryOnly,
            "app",
            "[2001:db8::5]:8443",
            0,
            "cidr [2001:db8::5]:8443",
        ),
        (
            RegistryOnly,
            "app",
            "203.0.113.7:80",
            0,
            "blocked 203.0.113.7:80",
        ),
        (
            RegistryOnly,
            "app",
            "203.0.114.1:443",
            0,
            "blocked 203.0.114.1:443",
        ),
        (RegistryOnly, "open", "203.0.114.1:443", 0, "allow-any"),
        (AllowAny, "app", "203.0.114.1:443", 0, "allow-any"),
        (
            AllowAny,
            "app",
            "203.0.113.7:443",
            0,
            "cidr 203.0.113.7:443",
        ),
        // STATIC: the VIP goes to an endpoint, by targetPort or the endpoint's port map.
        (
            RegistryOnly,
            "app",
            "192.0.2.10:80",
            0,
            "static 10.1.0.1:8080",
        ),
        (
            RegistryOnly,
            "app",
            "192.0.2.10:80",
            1,
            "static 10.1.0.2:9090",
        ),
        (
            RegistryOnly,
            "app",
            "192.0.2.10:81",
            0,
            "blocked 192.0.2.10:81",
        ),
        // A STATIC endpoint dialled directly is registered too.
        (RegistryOnly, "app", "10.1.0.2:80", 0, "static 10.1.0.2:80"),
        (RegistryOnly, "app", "10.1.0.3:80", 0, "blocked 10.1.0.3:80"),
        // exportTo: only its own namespace sees `private`.
        (
            RegistryOnly,
            "egress",
            "198.51.100.9:443",
            0,
            "private 198.51.100.9:443",
        ),
        (
            RegistryOnly,
            "app",
            "198.51.100.9:443",
            0,
            "blocked 198.51.100.9:443",
        ),
    ];
    for (mode, namespace, destination, pick, expected) in cases {
        let decision = egress(*mode).decide(
            namespace,
            destination.parse().unwrap(),
            *pick,
            &nothing_learned,
        );
        assert_eq!(
            outcome(decision),
            *expected,
            "{mode:?} {namespace} -> {destination}"
        );
    }
}

#[test]
fn hosts_match_as_istio_matches_them() {
    let cases = [
        // host, name, matches
        ("api.example.com", "api.example.com", true),
        ("api.example.com", "API.Example.com.", true),
        ("api.example.com", "x.api.example.com", false),
        ("*.example.com", "a.example.com", true),
        ("*.example.com", "a.b.example.com", true),
        ("*.example.com", "example.com", false),
        ("*.example.com", "badexample.com", false),
        ("*.example.com", ".example.com", false),
        ("*.example.com", "a.example.org", false),
        ("*", "anything.at.all", true),
        ("*", "", false),
    ];
    for (host, name, expected) in cases {
        assert_eq!(host_matches(host, name), expected, "{host} vs {name}");
    }
}

/// What the pod resolved: `api.example.com` (entry `api`) to 203.0.113.7.
fn learned_api(ip: IpAddr) -> Option<Grants> {
    (ip == "203.0.113.7".parse::<IpAddr>().unwrap()).then(|| {
        Arc::from(vec![super::super::learned::Grant {
            entry: EntryRef {
                namespace: Arc::from("egress"),
                name: Arc::from("api"),
            },
            host: Arc::from("api.example.com"),
            expires: tokio::time::Instant::now(),
        }])
    })
}

#[test]
fn a_hostname_entry_matches_only_what_the_pod_resolved() {
    let mut hostname_only = entry("api", &[], &[443]);
    hostname_only.resolution = Resolution::Dns;
    hostname_only.hosts = vec!["*.example.com".into()];
    let mut private = entry("private", &[], &[443]);
    private.hosts = vec!["private.example.net".into()];
    private.export_to = ExportTo::Namespaces(["egress".to_string()].into());
    let egress = Egress {
        policy: OutboundTrafficPolicy {
            mode: OutboundMode::RegistryOnly,
            namespaces: BTreeMap::new(),
        },
        service_entries: vec![Arc::new(hostname_only), Arc::new(private)],
        ..Egress::default()
    };
    let decide = |destination: &str, learned: LearnedLookup<'_>| {
        egress.decide("app", destination.parse().unwrap(), 0, learned)
    };
    // Never resolved: nothing matches an IP by name alone.
    assert_eq!(
        outcome(decide("203.0.113.7:443", &nothing_learned)),
        "blocked 203.0.113.7:443"
    );
    let allowed = decide("203.0.113.7:443", &learned_api);
    assert_eq!(outcome(allowed.clone()), "api 203.0.113.7:443");
    let EgressDecision::ServiceEntry { matched, .. } = allowed else {
        unreachable!()
    };
    assert_eq!(
        matched,
        MatchedBy::Learned {
            host: Arc::from("api.example.com")
        }
    );
    // The same server's other address, never resolved, is refused; so is another port.
    assert_eq!(
        outcome(decide("203.0.113.8:443", &learned_api)),
        "blocked 203.0.113.8:443"
    );
    let EgressDecision::Blocked(blocked) = decide("203.0.113.7:80", &learned_api) else {
        panic!("another port must be refused");
    };
    assert_eq!(blocked.reason, BlockReason::PortNotAllowed);

    // What an answer teaches depends on the name and the asking pod's namespace.
    let names = |namespace: &str, name: &str| -> Vec<String> {
        egress
            .entries_for_host(namespace, name)
            .iter()
            .map(|entry| entry.name.to_string())
            .collect()
    };
    assert_eq!(names("app", "api.example.com"), ["api"]);
    assert_eq!(names("app", "example.com"), Vec::<String>::new());
    assert_eq!(names("app", "private.example.net"), Vec::<String>::new());
    assert_eq!(names("egress", "private.example.net"), ["private"]);
    assert!(egress.has_hostname_only_entries());
}
