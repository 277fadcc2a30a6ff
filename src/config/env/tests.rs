use super::*;

fn applied(pairs: &[(&str, &str)]) -> (AgentConfig, Vec<EnvProblem>) {
    let mut agent = AgentConfig::default();
    let problems = Environment::from_pairs(pairs.iter().copied()).apply(&mut agent);
    (agent, problems)
}

#[test]
fn compliance_policy_pqc_alone_changes_the_key_exchange_and_other_values_are_reported() {
    use crate::tls::KeyExchange;
    let env = |pairs: &[(&str, &str)]| Environment::from_pairs(pairs.iter().copied());
    assert_eq!(env(&[]).key_exchange(), KeyExchange::Classical);
    let pqc = env(&[("COMPLIANCE_POLICY", "pqc")]);
    assert_eq!(pqc.key_exchange(), KeyExchange::PostQuantumOnly);
    assert!(pqc.unsupported().is_empty());
    assert!(env(&[("COMPLIANCE_POLICY", "")]).unsupported().is_empty());
    for value in ["fips-140-2", "PQC"] {
        let other = env(&[("COMPLIANCE_POLICY", value)]);
        assert_eq!(other.key_exchange(), KeyExchange::Classical, "{value}");
        let reported = other.unsupported();
        assert_eq!(reported.len(), 1, "{value}: {reported:?}");
        assert_eq!(reported[0].variable, "COMPLIANCE_POLICY");
        assert_eq!(reported[0].value, value);
    }
}

#[test]
fn tls12_enabled_is_reported_because_only_tls13_is_offered() {
    let reported = |value: &str| {
        Environment::from_pairs([("TLS12_ENABLED", value)])
            .unsupported()
            .into_iter()
            .map(|unsupported| unsupported.variable)
            .collect::<Vec<_>>()
    };
    assert_eq!(reported("true"), vec!["TLS12_ENABLED".to_string()]);
    assert!(reported("false").is_empty());
}

#[test]
fn start_up_pages_are_released_unless_turned_off() {
    let release = |pairs: &[(&str, &str)]| {
        Environment::from_pairs(pairs.iter().copied()).release_startup_pages()
    };
    assert_eq!(release(&[]), Ok(true));
    assert_eq!(
        release(&[("NODETUNNEL_RELEASE_STARTUP_PAGES", "off")]),
        Ok(false)
    );
    let problem = release(&[("NODETUNNEL_RELEASE_STARTUP_PAGES", "1")]).expect_err("not on/off");
    assert_eq!(problem.variable, "NODETUNNEL_RELEASE_STARTUP_PAGES");
}

#[test]
fn data_plane_shards_are_on_unless_turned_off() {
    let shards =
        |pairs: &[(&str, &str)]| Environment::from_pairs(pairs.iter().copied()).data_plane_shards();
    assert_eq!(shards(&[]), Ok(true));
    assert_eq!(shards(&[("NODETUNNEL_SHARDS", "on")]), Ok(true));
    assert_eq!(shards(&[("NODETUNNEL_SHARDS", "off")]), Ok(false));
    let problem = shards(&[("NODETUNNEL_SHARDS", "no")]).expect_err("not on or off");
    assert_eq!(problem.variable, "NODETUNNEL_SHARDS");
    assert!(problem.message.contains("\"no\""), "{}", problem.message);
}

#[test]
fn istio_variables_map_to_agent_settings() {
    let (agent, problems) = applied(&[
        ("NODE_NAME", "node-1"),
        ("TRUST_DOMAIN", "example.org"),
        ("XDS_ADDRESS", "https://istiod:15012"),
        ("CA_ADDRESS", "istiod-ca:15012"),
        ("XDS_ROOT_CA", "/etc/root.pem"),
        ("CA_ROOT_CA", "/etc/ca-root.pem"),
        ("AUTH_TOKEN", "/tmp/token"),
        ("CLUSTER_ID", "c1"),
        ("ISTIO_META_CLUSTER_ID", "c2"),
        ("POD_NAME", "ztunnel-abc"),
        ("POD_NAMESPACE", "istio-system"),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("INSTANCE_IP", "10.0.0.9"),
        ("SECRET_TTL", "12h"),
        ("INPOD_UDS", "/run/zt.sock"),
        ("XDS_HEADER_X_TENANT", "a"),
        ("CA_HEADER_X_TENANT", "b"),
        ("ISTIO_METAJSON_LABELS", r#"{"app":"ztunnel"}"#),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("ENABLE_ORIG_SRC", "false"),
    ]);
    assert_eq!(problems, Vec::new());
    assert!(!agent.proxy.original_source);
    assert_eq!(agent.node, "node-1");
    assert_eq!(agent.trust_domain, "example.org");
    assert_eq!(agent.xds.address.as_deref(), Some("https://istiod:15012"));
    assert_eq!(agent.ca.address.as_deref(), Some("istiod-ca:15012"));
    assert_eq!(agent.xds.root_ca, "/etc/root.pem");
    assert_eq!(agent.ca.root_ca, "/etc/ca-root.pem");
    assert_eq!(agent.istio.token.as_deref(), Some("/tmp/token"));
    assert_eq!(agent.istio.cluster_id, "c2");
    assert_eq!(agent.istio.pod_name, "ztunnel-abc");
    assert_eq!(agent.istio.pod_namespace, "istio-system");
    assert_eq!(agent.istio.service_account, "ztunnel");
    assert_eq!(agent.istio.instance_ip, Some("10.0.0.9".parse().unwrap()));
    assert_eq!(agent.istio.certificate_ttl, Duration::from_secs(12 * 3600));
    assert!(agent.zds.enabled);
    assert_eq!(agent.zds.socket, std::path::PathBuf::from("/run/zt.sock"));
    assert_eq!(
        agent.xds.headers.get("x_tenant").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        agent.ca.headers.get("x_tenant").map(String::as_str),
        Some("b")
    );
    assert_eq!(
        agent.istio.metadata.get("CLUSTER_ID"),
        Some(&serde_json::json!("c2"))
    );
    assert_eq!(
        agent.istio.metadata.get("LABELS"),
        Some(&serde_json::json!({"app": "ztunnel"}))
    );
    assert_eq!(agent.drain_timeout, Duration::from_secs(25));
}

#[test]
fn dns_capture_follows_ztunnel() {
    let cases = [
        (None, true),
        (Some("true"), true),
        (Some("TRUE"), true),
        (Some("false"), false),
        (Some(""), false),
        (Some("yes"), false),
    ];
    for (value, enabled) in cases {
        let mut pairs = vec![("CLUSTER_DOMAIN", "corp.example")];
        pairs.extend(value.map(|value| ("ISTIO_META_DNS_CAPTURE", value)));
        let (agent, problems) = applied(&pairs);
        assert_eq!(problems, Vec::new());
        assert_eq!(agent.dns.enabled, enabled, "DNS_CAPTURE={value:?}");
        assert_eq!(agent.dns.cluster_domain, "corp.example");
    }
}

#[test]
fn bad_values_are_named() {
    let (_, problems) = applied(&[
        ("INSTANCE_IP", "ten"),
        ("SECRET_TTL", "forever"),
        ("ISTIO_METAJSON_X", "{"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "soon"),
    ]);
    let named: Vec<&str> = problems.iter().map(|p| p.variable.as_str()).collect();
    assert_eq!(
        named,
        [
            "INSTANCE_IP",
            "SECRET_TTL",
            "ISTIO_METAJSON_X",
            "TERMINATION_GRACE_PERIOD_SECONDS"
        ]
    );
}

#[test]
fn drain_deadline_follows_istio() {
    type Vars = &'static [(&'static str, &'static str)];
    let cases: &[(Vars, Option<u64>)] = &[
        (&[], None),
        (&[("TERMINATION_GRACE_PERIOD_SECONDS", "30")], Some(25)),
        (&[("TERMINATION_GRACE_PERIOD_SECONDS", "10")], Some(9)),
        (&[("TERMINATION_GRACE_PERIOD_SECONDS", "1")], Some(1)),
        (&[("TERMINATION_GRACE_PERIOD_SECONDS", "0")], Some(1)),
        (
            &[
                ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
                ("CONNECTION_TERMINATION_DEADLINE", "7s"),
            ],
            Some(7),
        ),
    ];
    for (pairs, want) in cases {
        let env = Environment::from_pairs(pairs.iter().copied());
        assert_eq!(
            drain_deadline(&env).expect("valid"),
            want.map(Duration::from_secs),
            "{pairs:?}"
        );
    }
}

#[test]
fn empty_address_disables_and_istio_defaults_pick_istiod() {
    let mut agent = AgentConfig::default();
    let env = Environment::from_pairs([("KUBERNETES_SERVICE_HOST", "10.96.0.1")]);
    env.apply_istio_defaults(&mut agent);
    assert_eq!(agent.xds.address.as_deref(), Some(ISTIOD_IN_CLUSTER));
    assert!(agent.zds.enabled && !agent.capture.install_rules);
    Environment::from_pairs([("XDS_ADDRESS", "")]).apply(&mut agent);
    assert_eq!(agent.xds.address, None);
    let mut local = AgentConfig::default();
    Environment::default().apply_istio_defaults(&mut local);
    assert_eq!(local.ca.address.as_deref(), Some(ISTIOD_LOCAL));
}
