use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::*;
use crate::net::NetworkAddress;
use crate::state::tests::workload;
use crate::state::Service;

const CLIENT: &str = "cluster//Pod/default/client";

fn service(hostname: &str, vips: &[&str]) -> Service {
    Service {
        name: hostname.split('.').next().unwrap_or_default().to_string(),
        namespace: "default".to_string(),
        hostname: hostname.to_string(),
        vips: vips
            .iter()
            .map(|vip| NetworkAddress {
                network: String::new(),
                ip: vip.parse().expect("vip"),
            })
            .collect(),
        ports: BTreeMap::from([(80, 80)]),
        subject_alt_names: Vec::new(),
        waypoint: None,
    }
}

/// `echo` (one VIP), `pair` (two VIPs) and `big`, a headless service with 60 endpoints.
fn model() -> Snapshot {
    let big = service("big.default.svc.cluster.local", &[]);
    let mut workloads = vec![workload("default", "client", Ipv4Addr::new(10, 200, 1, 2))];
    for index in 0..60u8 {
        let mut member = workload(
            "default",
            &format!("big-{index}"),
            Ipv4Addr::new(10, 201, 0, index),
        );
        member
            .services
            .insert(big.key(), BTreeMap::from([(80, 80)]));
        workloads.push(member);
    }
    Snapshot::new(
        workloads,
        vec![
            service("echo.default.svc.cluster.local", &["10.96.0.10"]),
            service(
                "pair.default.svc.cluster.local",
                &["10.96.0.20", "10.96.0.21"],
            ),
            big,
        ],
        Vec::new(),
    )
}

fn query(id: u16, name: &str, record_type: RecordType) -> Message {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            record_type,
        ));
    message
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().expect("encode")
}

fn run(message: &[u8], client: Option<&str>, transport: Transport, rotation: usize) -> Handled {
    let snapshot = model();
    let domains = Domains::new("cluster.local");
    let client = client.and_then(|uid| snapshot.workload(uid)).cloned();
    let context = Context {
        snapshot: &snapshot,
        domains: &domains,
        client: client.as_deref(),
        transport,
        rotation,
    };
    handle(message, &context)
}

/// The answer to `message` from the test pod over UDP, decoded.
fn answer(message: &[u8]) -> Message {
    match run(message, Some(CLIENT), Transport::Udp, 0) {
        Handled::Reply { bytes, .. } => Message::from_vec(&bytes).expect("answer decodes"),
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn addresses(message: &Message) -> Vec<String> {
    message
        .answers()
        .iter()
        .map(|record| record.data().to_string())
        .collect()
}

#[test]
fn mesh_names_are_answered_authoritatively_with_ttl_30() {
    let response = answer(&bytes(&query(4242, "echo.", RecordType::A)));
    assert_eq!(response.id(), 4242);
    assert_eq!(response.message_type(), MessageType::Response);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert!(response.authoritative() && response.recursion_available());
    assert!(response.recursion_desired());
    assert_eq!(
        response.queries(),
        query(0, "echo.", RecordType::A).queries()
    );
    assert_eq!(addresses(&response), ["10.96.0.10"]);
    assert_eq!(response.answers()[0].ttl(), TTL);
    assert_eq!(response.answers()[0].name().to_string(), "echo.");
}

#[test]
fn the_other_family_gets_an_empty_noerror() {
    let response = answer(&bytes(&query(
        1,
        "echo.default.svc.cluster.local.",
        RecordType::AAAA,
    )));
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert!(response.answers().is_empty());
}

#[test]
fn a_name_found_through_a_search_domain_gets_a_cname() {
    let response = answer(&bytes(&query(
        1,
        "echo.default.default.svc.cluster.local.",
        RecordType::A,
    )));
    let records: Vec<String> = response.answers().iter().map(ToString::to_string).collect();
    assert_eq!(response.answers().len(), 2, "{records:?}");
    assert_eq!(response.answers()[0].record_type(), RecordType::CNAME);
    assert_eq!(response.answers()[0].data().to_string(), "echo.default.");
    assert_eq!(response.answers()[1].name().to_string(), "echo.default.");
    assert_eq!(addresses(&response)[1], "10.96.0.10");
}

#[test]
fn answers_rotate_between_queries() {
    let message = bytes(&query(1, "pair.", RecordType::A));
    let first = |rotation| match run(&message, Some(CLIENT), Transport::Udp, rotation) {
        Handled::Reply { bytes, .. } => {
            addresses(&Message::from_vec(&bytes).expect("decode"))[0].clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(first(0), "10.96.0.20");
    assert_eq!(first(1), "10.96.0.21");
}

#[test]
fn a_large_answer_is_truncated_for_udp_but_not_for_tcp_or_a_large_edns_size() {
    let plain = bytes(&query(9, "big.", RecordType::A));
    let response = answer(&plain);
    assert!(response.truncated());
    assert!(response.answers().is_empty());

    let Handled::Reply { bytes: tcp, .. } = run(&plain, Some(CLIENT), Transport::Tcp, 0) else {
        panic!("expected an answer");
    };
    let tcp = Message::from_vec(&tcp).expect("decode");
    assert!(!tcp.truncated());
    assert_eq!(tcp.answers().len(), 60);

    let mut with_edns = query(9, "big.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    with_edns.set_edns(edns);
    let response = answer(&bytes(&with_edns));
    assert!(!response.truncated());
    assert_eq!(response.answers().len(), 60);
    assert_eq!(response.max_payload(), ADVERTISED_PAYLOAD);
}

#[test]
fn other_names_and_types_are_forwarded_unchanged() {
    let cases = [
        ("www.example.org.", RecordType::A, Transport::Udp, None, 512),
        ("echo.", RecordType::MX, Transport::Udp, None, 512),
        ("echo.", RecordType::TXT, Transport::Tcp, None, 65535),
        (
            "www.example.org.",
            RecordType::AAAA,
            Transport::Udp,
            Some(1400),
            1400,
        ),
    ];
    for (name, record_type, transport, payload, limit) in cases {
        let mut message = query(77, name, record_type);
        if let Some(payload) = payload {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            message.set_edns(edns);
        }
        let encoded = bytes(&message);
        let Handled::Forward(forward) = run(&encoded, Some(CLIENT), transport, 0) else {
            panic!("{name} {record_type} should be forwarded");
        };
        assert_eq!(forward.message, encoded);
        assert_eq!(forward.id, 77);
        assert_eq!(forward.question, message.queries()[0]);
        assert_eq!(forward.response_limit, limit, "{name} {record_type}");
    }
}

#[test]
fn bad_messages_get_formerr_notimp_or_nothing() {
    let mut two_questions = query(5, "echo.", RecordType::A);
    two_questions.add_query(Query::query(
        Name::from_ascii("pair.").expect("name"),
        RecordType::A,
    ));
    let mut response_as_query = query(5, "echo.", RecordType::A);
    response_as_query.set_message_type(MessageType::Response);
    let mut notify = query(5, "echo.", RecordType::A);
    notify.set_op_code(OpCode::Notify);
    let mut no_question = Message::new();
    no_question.set_id(5);
    let mut cut = bytes(&query(5, "echo.default.svc.cluster.local.", RecordType::A));
    cut.truncate(20);

    let cases: Vec<(&str, Vec<u8>, Option<ResponseCode>)> = vec![
        ("empty", Vec::new(), None),
        ("shorter than a header", vec![0, 5, 1, 0, 0], None),
        ("a response", bytes(&response_as_query), None),
        (
            "two questions",
            bytes(&two_questions),
            Some(ResponseCode::FormErr),
        ),
        (
            "no question",
            bytes(&no_question),
            Some(ResponseCode::FormErr),
        ),
        ("question cut short", cut, Some(ResponseCode::FormErr)),
        ("NOTIFY", bytes(&notify), Some(ResponseCode::NotImp)),
    ];
    for (case, message, expected) in cases {
        match (run(&message, Some(CLIENT), Transport::Udp, 0), expected) {
            (Handled::Drop, None) => {}
            (
                Handled::Reply {
                    bytes, question, ..
                },
                Some(code),
            ) => {
                let response = Message::from_vec(&bytes).expect("decodes");
                assert_eq!(response.response_code(), code, "{case}");
                assert_eq!(response.id(), 5, "{case}");
                assert!(question.is_none(), "{case}");
            }
            (other, expected) => panic!("{case}: got {other:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn a_pod_the_model_does_not_know_gets_servfail() {
    let message = bytes(&query(3, "echo.", RecordType::A));
    let Handled::Reply { bytes, result, .. } = run(&message, None, Transport::Udp, 0) else {
        panic!("expected an answer");
    };
    assert_eq!(result, "unknown source");
    let response = Message::from_vec(&bytes).expect("decodes");
    assert_eq!(response.response_code(), ResponseCode::ServFail);
    assert_eq!(response.queries().len(), 1);
}

#[test]
fn relayed_answers_get_the_client_id_back_or_a_truncated_answer() {
    let message = bytes(&query(31, "www.example.org.", RecordType::A));
    let Handled::Forward(forward) = run(&message, Some(CLIENT), Transport::Udp, 0) else {
        panic!("expected a forward");
    };
    let mut upstream = query(0xbeef, "www.example.org.", RecordType::A);
    upstream
        .set_message_type(MessageType::Response)
        .add_answer(Record::from_rdata(
            Name::from_ascii("www.example.org.").expect("name"),
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
    let relayed = Message::from_vec(&forward.relay(bytes(&upstream))).expect("decode");
    assert_eq!(relayed.id(), 31);
    assert_eq!(addresses(&relayed), ["192.0.2.1"]);

    let oversized = vec![0u8; 600];
    let truncated = Message::from_vec(&forward.relay(oversized)).expect("decode");
    assert!(truncated.truncated());
    assert_eq!(truncated.id(), 31);
    assert_eq!(truncated.queries(), upstream.queries());

    let servfail = Message::from_vec(&forward.error(ResponseCode::ServFail)).expect("decode");
    assert_eq!(servfail.response_code(), ResponseCode::ServFail);
    assert_eq!(servfail.id(), 31);
}
