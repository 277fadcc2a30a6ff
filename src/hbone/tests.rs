use super::*;

fn request(method: Method, authority: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::builder().method(method).uri(authority);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("test request")
}

#[test]
fn build_matches_istio_wire_form() {
    let request = ConnectRequest {
        authority: Authority::Address("10.0.2.7:8080".parse().unwrap()),
        client: ClientAddr("10.0.1.2:41000".parse().unwrap()),
        service_host: Some("echo.default.svc.cluster.local".into()),
        baggage: "k8s.namespace.name=default".into(),
        traceparent: TraceParent::parse("00-0123456789abcdef0123456789abcdef-0123456789abcdef-00")
            .unwrap(),
    }
    .build()
    .unwrap();
    assert_eq!(request.method(), Method::CONNECT);
    assert_eq!(request.uri().to_string(), "10.0.2.7:8080");
    assert!(request.uri().scheme().is_none() && request.uri().path_and_query().is_none());
    let header = |name| request.headers()[name].to_str().unwrap();
    assert_eq!(
        header(FORWARDED),
        "for=\"10.0.1.2:41000\";host=echo.default.svc.cluster.local"
    );
    assert_eq!(header(BAGGAGE), "k8s.namespace.name=default");
    assert_eq!(
        header(TRACEPARENT),
        "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
    );
    let parsed = parse_connect(&request).unwrap();
    assert_eq!(
        parsed.forwarded_for,
        Some("10.0.1.2:41000".parse().unwrap())
    );
    assert_eq!(
        parsed.forwarded_host.as_deref(),
        Some("echo.default.svc.cluster.local")
    );
}

#[test]
fn ipv6_authority_is_bracketed_and_round_trips() {
    let request = ConnectRequest {
        authority: Authority::Address("[fd00::7]:80".parse().unwrap()),
        client: ClientAddr("[fd00::1]:1234".parse().unwrap()),
        service_host: None,
        baggage: String::new(),
        traceparent: TraceParent::random(),
    }
    .build()
    .unwrap();
    assert_eq!(request.uri().to_string(), "[fd00::7]:80");
    assert!(
        request.headers().get(BAGGAGE).is_none(),
        "empty baggage omitted"
    );
    let parsed = parse_connect(&request).unwrap();
    assert_eq!(
        parsed.authority,
        Authority::Address("[fd00::7]:80".parse().unwrap())
    );
    assert_eq!(
        parsed.forwarded_for,
        Some("[fd00::1]:1234".parse().unwrap())
    );
}

#[test]
fn parse_table() {
    type Want = Result<Authority, RequestError>;
    let addr = |s: &str| Ok(Authority::Address(s.parse().unwrap()));
    let cases: Vec<(Method, &str, Want)> = vec![
        (Method::CONNECT, "10.0.0.1:80", addr("10.0.0.1:80")),
        (Method::CONNECT, "[::1]:443", addr("[::1]:443")),
        (
            Method::CONNECT,
            "echo.default.svc.cluster.local:80",
            Ok(Authority::Hostname {
                host: "echo.default.svc.cluster.local".into(),
                port: 80,
            }),
        ),
        (
            Method::GET,
            "10.0.0.1:80",
            Err(RequestError::Method("GET".into())),
        ),
        (
            Method::POST,
            "10.0.0.1:80",
            Err(RequestError::Method("POST".into())),
        ),
        (
            Method::CONNECT,
            "10.0.0.1:0",
            Err(RequestError::Authority("10.0.0.1:0".into())),
        ),
        (
            Method::CONNECT,
            "10.0.0.1:99999",
            Err(RequestError::Authority("10.0.0.1:99999".into())),
        ),
        (
            Method::CONNECT,
            "host_with_underscore:80",
            Err(RequestError::Authority("host_with_underscore:80".into())),
        ),
        (
            Method::CONNECT,
            "10.0.0.1",
            Err(RequestError::Authority("10.0.0.1".into())),
        ),
        (
            Method::CONNECT,
            "10.0.0.1:http",
            Err(RequestError::Authority("10.0.0.1:http".into())),
        ),
    ];
    for (method, authority, want) in cases {
        let got = parse_connect(&request(method.clone(), authority, &[])).map(|p| p.authority);
        assert_eq!(got, want, "{method} {authority}");
        if let Err(error) = &got {
            assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        }
    }
}

#[test]
fn absolute_uri_is_not_classic_connect() {
    let got = parse_connect(&request(Method::CONNECT, "https://10.0.0.1:80", &[]));
    assert_eq!(got, Err(RequestError::NotClassic(":scheme")));
}

#[test]
fn forwarded_and_traceparent_variants() {
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        ("for=\"10.0.0.1:1\"", Some("10.0.0.1:1"), None),
        ("for=10.0.0.1:1;host=a.b", Some("10.0.0.1:1"), Some("a.b")),
        ("FOR=\"[fd00::1]:5\"", Some("[fd00::1]:5"), None),
        ("for=\"unknown\"", None, None),
        ("host=x, for=\"10.0.0.9:9\"", None, Some("x")),
        ("garbage;;==", None, None),
        (
            "for=\"10.0.0.1:1\";host=\"*.example.com\"",
            Some("10.0.0.1:1"),
            Some("*.example.com"),
        ),
        // A host that is not a name is dropped, not kept half-parsed (fuzz finding).
        ("for=\"[fd00::00\";host=e#ho.d   \"", None, None),
        ("host=\"a b\"", None, None),
        ("host=\"\"", None, None),
    ];
    for (value, client, host) in cases {
        let parsed = parse_connect(&request(
            Method::CONNECT,
            "10.0.0.1:80",
            &[(FORWARDED, value)],
        ))
        .unwrap();
        assert_eq!(
            parsed.forwarded_for,
            client.map(|c| c.parse().unwrap()),
            "{value}"
        );
        assert_eq!(parsed.forwarded_host.as_deref(), *host, "{value}");
    }
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let traces: &[(&str, bool)] = &[
        (good, true),
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
            false,
        ),
        (
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            false,
        ),
        (
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            false,
        ),
        (
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            false,
        ),
    ];
    for (value, ok) in traces {
        let parsed = parse_connect(&request(
            Method::CONNECT,
            "10.0.0.1:80",
            &[(TRACEPARENT, value)],
        ))
        .unwrap();
        assert_eq!(parsed.traceparent.is_some(), *ok, "{value}");
    }
    let random = TraceParent::random().to_string();
    assert_eq!(
        TraceParent::parse(&random).map(|t| t.to_string()),
        Some(random)
    );
}

#[test]
fn baggage_follows_istio_order_and_skips_empty() {
    let workload = Workload {
        name: "client-abc".into(),
        canonical_name: "client".into(),
        workload_name: "client".into(),
        workload_type: "Deployment".into(),
        ..crate::state::tests::workload("default", "client", [10, 0, 1, 2])
    };
    assert_eq!(
        baggage(&workload),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client"
    );
}
