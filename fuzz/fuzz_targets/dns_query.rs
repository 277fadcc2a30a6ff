//! Fuzzes the DNS proxy's query handler: `dns::handle` (message in, decision out, no network)
//! over a small fixed model, for UDP and TCP and for a known and an unknown pod, plus
//! `Forward::relay`, `dns::check_answer` and `dns::learn::answered_addresses` (what an
//! answer teaches the pod's egress check) fed the same bytes as an upstream answer.
//!
//! Input: one raw DNS message (the bytes of a UDP datagram or of a TCP message without its
//! length prefix); seeds are queries `dig` would send and broken variants.
//!
//! Properties: nothing panics; every reply decodes as a DNS response carrying the input's
//! transaction id, and fits the transport (a UDP reply never exceeds the client's EDNS size,
//! or 512 bytes without EDNS); a forward carries the input unchanged with its id; `relay` of
//! any bytes carries the client's id and fits the client's limit; `error` decodes; an answer
//! teaches at most `MAX_ADDRESSES_PER_ANSWER` distinct addresses, and learning them keeps a
//! pod's set within its cap and every TTL within the floor and the cap.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;
use nodetunnel::config::{parse, Overrides};
use nodetunnel::dns::{check_answer, handle, Context, Domains, Handled, Transport};
use nodetunnel::dns::learn::answered_addresses;
use nodetunnel::state::learned::{
    EntryRef, LearnedDestinations, LearnedLimits, MAX_ADDRESSES_PER_ANSWER,
};
use nodetunnel::state::Snapshot;
use std::time::Duration;
use tokio::time::Instant;

const MODEL: &str = r#"
agent: {node: node-a}
workloads:
  - {uid: c//Pod/default/client, name: client, namespace: default, serviceAccount: client,
     workloadIps: [10.0.1.2], protocol: HBONE, node: node-a}
  - {uid: c//Pod/default/db-0, name: db-0, namespace: default, serviceAccount: db,
     workloadIps: [10.0.1.5, "fd00::5"], node: node-a,
     services: {default/db.default.svc.cluster.local: {5432: 5432}}}
  - {uid: c//Pod/default/vm, name: vm, namespace: default, serviceAccount: vm,
     workloadIps: [10.0.1.9], hostname: vm.example.net, node: node-b}
services:
  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local,
     vips: [/10.96.0.10, "/fd00::10"], ports: {80: 8080}}
  - {name: db, namespace: default, hostname: db.default.svc.cluster.local, vips: [],
     ports: {5432: 5432}}
  - {name: wild, namespace: other, hostname: "*.example.com", vips: [/10.96.0.20],
     ports: {443: 443}}
policies: []
"#;

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        parse(Path::new("fuzz.yaml"), MODEL, &Overrides::default())
            .expect("the fuzz model parses")
            .snapshot()
    })
}

fuzz_target!(|data: &[u8]| {
    let snapshot = snapshot();
    let domains = Domains::new("cluster.local");
    let client = snapshot.workload("c//Pod/default/client").cloned();
    for transport in [Transport::Udp, Transport::Tcp] {
        for client in [client.as_deref(), None] {
            let context = Context {
                snapshot,
                domains: &domains,
                client,
                transport,
                rotation: data.len(),
            };
            check(data, &handle(data, &context), transport);
        }
    }
});

fn check(data: &[u8], handled: &Handled, transport: Transport) {
    match handled {
        Handled::Drop => {}
        Handled::Reply { bytes, .. } => {
            let reply = Message::from_vec(bytes).expect("a reply decodes");
            assert_eq!(reply.message_type(), MessageType::Response);
            assert_eq!(&bytes[..2], &data[..2], "a reply carries the query's id");
            if transport == Transport::Udp {
                let limit = Message::from_vec(data).map_or(512, |query| query.max_payload());
                assert!(bytes.len() <= usize::from(limit), "UDP reply over {limit} bytes");
            }
        }
        Handled::Forward(forward) => {
            assert_eq!(forward.message, data, "a forward carries the query unchanged");
            assert_eq!(forward.id.to_be_bytes(), [data[0], data[1]]);
            assert!(forward.response_limit >= 512);
            // The same bytes as an upstream's answer: checked and relayed, never a panic; a
            // relayed answer carries the client's id and fits the client's transport.
            let _ = check_answer(data, forward.id, &forward.question);
            let relayed = forward.relay(data.to_vec());
            assert_eq!(&relayed[..2], &data[..2], "a relayed answer carries the id");
            assert!(relayed.len() <= forward.response_limit);
            let servfail = Message::from_vec(&forward.error(ResponseCode::ServFail))
                .expect("SERVFAIL decodes");
            assert_eq!(servfail.id(), forward.id);
            learn(data, forward.question.name());
        }
    }
}

/// The bytes as an upstream answer for `asked`: what they teach, and the learned set after.
fn learn(data: &[u8], asked: &hickory_proto::rr::Name) {
    let addresses = answered_addresses(data, asked);
    assert!(addresses.len() <= MAX_ADDRESSES_PER_ANSWER);
    for (index, address) in addresses.iter().enumerate() {
        assert!(
            addresses[..index].iter().all(|other| other.ip != address.ip),
            "an address is learned once per answer"
        );
    }
    let limits = LearnedLimits {
        ttl_min: Duration::from_secs(30),
        ttl_max: Duration::from_secs(3600),
        max_per_pod: 8,
    };
    let learned = LearnedDestinations::new(limits);
    let entry = EntryRef {
        namespace: "default".into(),
        name: "api".into(),
    };
    let now = Instant::now();
    learned.learn("api.example.com", &[entry], &addresses, now);
    assert!(learned.len() <= limits.max_per_pod);
    for (_, grants) in learned.entries(now) {
        for grant in grants {
            let lasts = grant.expires - now;
            assert!(lasts >= limits.ttl_min && lasts <= limits.ttl_max);
        }
    }
}
