use std::time::Duration;

use super::super::{AgentConfig, LocalConfig};
use super::*;

fn env(pairs: &[(&str, &str)]) -> Environment {
    Environment::from_pairs(pairs.iter().copied())
}

/// What Istio's chart (and its `env:` values) sets, with what it must change in the agent.
#[test]
fn chart_variables_are_applied() {
    type Check = fn(&AgentConfig) -> bool;
    let cases: &[(&[(&str, &str)], Check)] = &[
        (&[("NETWORK", "net-1")], |a| a.network == "net-1"),
        (&[("PACKET_MARK", "4242")], |a| a.proxy.packet_mark == 4242),
        (&[("POOL_MAX_STREAMS_PER_CONNECTION", "7")], |a| {
            a.pool.max_streams_per_connection == 7
        }),
        (&[("POOL_UNUSED_RELEASE_TIMEOUT", "90s")], |a| {
            a.pool.idle_timeout == Duration::from_secs(90)
        }),
        (&[("HTTP2_STREAM_WINDOW_SIZE", "65536")], |a| {
            a.proxy.stream_window == 65536
        }),
        (&[("HTTP2_CONNECTION_WINDOW_SIZE", "131072")], |a| {
            a.proxy.connection_window == 131072
        }),
        (&[("HTTP2_FRAME_SIZE", "32768")], |a| {
            a.proxy.frame_size == 32768
        }),
        (&[("NODETUNNEL_CONGESTION_CONTROL", "cubic")], |a| {
            a.proxy.congestion_control.as_deref() == Some("cubic")
        }),
        (&[("NODETUNNEL_CONGESTION_CONTROL", "")], |a| {
            a.proxy.congestion_control.is_none()
        }),
        (
            &[("CA_ADDRESS", "istiod:15012"), ("FAKE_CA", "true")],
            |a| a.ca.address.is_none(),
        ),
        (
            &[("CA_ADDRESS", "istiod:15012"), ("FAKE_CA", "false")],
            |a| a.ca.address.as_deref() == Some("istiod:15012"),
        ),
        (&[("IPV6_ENABLED", "false")], |a| {
            a.listen.metrics.is_ipv4() && a.listen.readiness.is_ipv4()
        }),
        (&[("IPV6_ENABLED", "true")], |a| {
            a.listen.metrics == AgentConfig::default().listen.metrics
        }),
        (
            &[(
                "PROXY_CONFIG",
                r#"{"discoveryAddress": "istiod-rev.istio-system:15012", "proxyAdminPort": 15099,
                    "statsPort": 15888, "proxyMetadata": {"ISTIO_META_FOO": "foo", "BAR": "bar"}}"#,
            )],
            |a| {
                a.xds.address.as_deref() == Some("istiod-rev.istio-system:15012")
                    && a.listen.admin.port() == 15099
                    && a.listen.metrics.port() == 15888
                    && a.istio.metadata.get("FOO") == Some(&serde_json::json!("foo"))
                    && a.istio.metadata.get("BAR") == Some(&serde_json::json!("bar"))
            },
        ),
        (
            &[
                ("PROXY_CONFIG", "discoveryAddress: from-proxy-config:15012"),
                ("XDS_ADDRESS", "from-env:15012"),
                ("ISTIO_META_FOO", "env"),
            ],
            |a| a.xds.address.as_deref() == Some("from-env:15012"),
        ),
        (
            &[
                ("PROXY_CONFIG", "proxyMetadata: {ISTIO_META_FOO: pc}"),
                ("ISTIO_META_FOO", "env"),
            ],
            |a| a.istio.metadata.get("FOO") == Some(&serde_json::json!("env")),
        ),
        (&[("PROXY_CONFIG", "")], |a| *a == AgentConfig::default()),
        (
            &[(
                "PROXY_CONFIG",
                "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"false\"}",
            )],
            |a| !a.dns.enabled,
        ),
        (
            &[
                ("PROXY_CONFIG", "proxyMetadata: {DNS_CAPTURE: \"false\"}"),
                ("ISTIO_META_DNS_CAPTURE", "true"),
            ],
            |a| a.dns.enabled,
        ),
    ];
    for (pairs, check) in cases {
        let mut agent = AgentConfig::default();
        let problems = env(pairs).apply(&mut agent);
        assert_eq!(problems, Vec::new(), "{pairs:?}");
        assert!(check(&agent), "{pairs:?}: {agent:?}");
    }
}

#[test]
fn bad_chart_values_name_their_variable() {
    let cases: &[(&str, &str)] = &[
        ("PACKET_MARK", "0x539x"),
        ("POOL_MAX_STREAMS_PER_CONNECTION", "many"),
        ("POOL_UNUSED_RELEASE_TIMEOUT", "soon"),
        ("HTTP2_FRAME_SIZE", "-1"),
        ("FAKE_CA", "yes"),
        ("IPV6_ENABLED", "maybe"),
        ("PROXY_CONFIG", "{not: [yaml"),
    ];
    for (name, value) in cases {
        let mut agent = AgentConfig::default();
        let problems = env(&[(name, value)]).apply(&mut agent);
        let named: Vec<&str> = problems.iter().map(|p| p.variable.as_str()).collect();
        assert_eq!(named, [*name], "{name}={value}");
    }
}

#[test]
fn unsupported_variables_are_reported_by_name_and_defaults_are_not() {
    let environment = env(&[
        // Defaults or honoured: not reported.
        ("INPOD_ENABLED", "true"),
        ("PROXY_MODE", "shared"),
        ("ENABLE_PROXY", "TRUE"),
        ("NETWORK", "n"),
        ("ISTIO_META_DNS_CAPTURE", "false"),
        ("CLUSTER_DOMAIN", "corp.example"),
        ("RUST_BACKTRACE", "1"),
        ("ZTUNNEL_CPU_LIMIT", "4"),
        ("XDS_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
        // Not supported.
        ("PROXY_MODE", "dedicated"),
        ("KEEPALIVE_TIME", "60s"),
        ("XDS_ON_DEMAND", "true"),
        ("CA_ROOT_CA", "SYSTEM"),
        (
            "PROXY_CONFIG",
            r#"{"concurrency": 2, "tracing": {"zipkin": {}}, "proxyMetadata": {"DNS_PROXY_ADDR": "127.0.0.1:15053"}}"#,
        ),
    ]);
    let reported: Vec<String> = environment
        .unsupported()
        .into_iter()
        .map(|unsupported| unsupported.variable)
        .collect();
    assert_eq!(
        reported,
        [
            "CA_ROOT_CA",
            "KEEPALIVE_TIME",
            "PROXY_CONFIG.proxyMetadata.DNS_PROXY_ADDR",
            "PROXY_CONFIG.tracing",
            "PROXY_MODE",
            "XDS_ON_DEMAND",
        ]
    );
    let line = environment.unsupported()[4].to_string();
    assert!(
        line.starts_with(r#"PROXY_MODE="dedicated" is not supported"#),
        "{line}"
    );
    assert!(env(&[]).unsupported().is_empty());
}

#[test]
fn the_table_names_each_variable_once_in_order() {
    let names: Vec<&str> = VARIABLES.iter().map(|(name, _)| *name).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted);
    // Every variable Istio's chart sets is in the table.
    for name in [
        "CA_ADDRESS",
        "XDS_ADDRESS",
        "LOG_FORMAT",
        "NETWORK",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "ISTIO_META_CLUSTER_ID",
        "INPOD_ENABLED",
        "TERMINATION_GRACE_PERIOD_SECONDS",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "INSTANCE_IP",
        "SERVICE_ACCOUNT",
        "ZTUNNEL_CPU_LIMIT",
    ] {
        assert!(names.contains(&name), "{name}");
    }
}

#[test]
fn worker_threads_follow_ztunnel() {
    type Vars = &'static [(&'static str, &'static str)];
    // (variables, CPUs the process may use, Istio mode, expected)
    let cases: &[(Vars, usize, bool, Option<usize>)] = &[
        (&[], 8, false, None),
        (&[], 8, true, Some(2)),
        (&[], 32, true, Some(8)),
        (&[("ZTUNNEL_WORKER_THREADS", "4")], 8, false, Some(4)),
        (&[("ZTUNNEL_WORKER_THREADS", "50%")], 8, true, Some(4)),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "50%"),
                ("ZTUNNEL_CPU_LIMIT", "8"),
            ],
            64,
            true,
            Some(4),
        ),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "30%"),
                ("ZTUNNEL_CPU_LIMIT", "16"),
            ],
            2,
            true,
            Some(5),
        ),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "10%"),
                ("ZTUNNEL_CPU_LIMIT", "4"),
            ],
            2,
            true,
            Some(1),
        ),
        // The CPU limit alone does not set the count (ztunnel reads it for percentages).
        (&[("ZTUNNEL_CPU_LIMIT", "6")], 64, false, None),
        (&[("PROXY_CONFIG", "concurrency: 3")], 8, true, Some(3)),
        (&[("PROXY_CONFIG", "concurrency: 0")], 8, true, Some(8)),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "5"),
                ("PROXY_CONFIG", "concurrency: 3"),
            ],
            8,
            true,
            Some(5),
        ),
        (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1")], 8, true, Some(2)),
        (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "6")], 64, false, Some(6)),
        (
            &[
                ("ZTUNNEL_RESOURCE_CPU_LIMIT", "3"),
                ("ZTUNNEL_RESOURCE_CPU_REQUEST", "4"),
            ],
            64,
            true,
            Some(4),
        ),
        (&[("ZTUNNEL_RESOURCE_CPU_REQUEST", "3")], 8, true, Some(3)),
        (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "2500m")], 8, true, Some(3)),
    ];
    for (pairs, cpus, istio, want) in cases {
        let got = env(pairs).worker_threads(*cpus, *istio).expect("valid");
        assert_eq!(got, *want, "{pairs:?} on {cpus} CPUs, Istio mode {istio}");
    }
}

#[test]
fn bad_worker_settings_name_their_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("ZTUNNEL_WORKER_THREADS", "0")], "ZTUNNEL_WORKER_THREADS"),
        (
            &[("ZTUNNEL_WORKER_THREADS", "lots")],
            "ZTUNNEL_WORKER_THREADS",
        ),
        (
            &[("ZTUNNEL_WORKER_THREADS", "150%")],
            "ZTUNNEL_WORKER_THREADS",
        ),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "50%"),
                ("ZTUNNEL_CPU_LIMIT", "x"),
            ],
            "ZTUNNEL_WORKER_THREADS",
        ),
        (
            &[("ZTUNNEL_RESOURCE_CPU_LIMIT", "0")],
            "ZTUNNEL_RESOURCE_CPU_LIMIT",
        ),
        (
            &[("ZTUNNEL_RESOURCE_CPU_REQUEST", "-2")],
            "ZTUNNEL_RESOURCE_CPU_REQUEST",
        ),
        (&[("PROXY_CONFIG", "concurrency: many")], "PROXY_CONFIG"),
    ];
    for (pairs, variable) in cases {
        let problem = env(pairs)
            .worker_threads(4, true)
            .expect_err("a bad value is refused");
        assert_eq!(problem.variable, *variable, "{pairs:?}");
    }
}

#[test]
fn local_config_comes_from_one_of_two_variables() {
    assert_eq!(env(&[]).local_config(), Ok(LocalConfig::None));
    assert_eq!(
        env(&[("LOCAL_XDS_PATH", "/etc/zt.yaml")]).local_config(),
        Ok(LocalConfig::File("/etc/zt.yaml".into()))
    );
    assert_eq!(
        env(&[("LOCAL_XDS", "workloads: []")]).local_config(),
        Ok(LocalConfig::Inline("workloads: []".into()))
    );
    let both = env(&[("LOCAL_XDS_PATH", "/a"), ("LOCAL_XDS", "workloads: []")]);
    assert_eq!(
        both.local_config().map_err(|p| p.variable),
        Err("LOCAL_XDS".into())
    );
}
