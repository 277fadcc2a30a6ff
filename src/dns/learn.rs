//! What a relayed upstream answer teaches the pod's egress check (pure; layer L3): the
//! addresses the asked name stands for, with the TTL each may be trusted for.
//!
//! Only the answer section counts, and only records on the chain that starts at the asked
//! name: the name's own A/AAAA records, and those of the names its CNAMEs lead to (followed in
//! order, at most [`MAX_CNAME_CHAIN`] links, so a loop or a long chain ends). Records for other
//! owners (an upstream padding its answer with unrelated names), the authority and additional
//! sections, and answers whose code is not NOERROR teach nothing. An address's TTL is the
//! smallest on its way: its record's and every CNAME's before it.
//!
//! The bytes come from an upstream resolver and are parsed again here (the forwarder only
//! checked the header and question), with hickory-proto's decoder, under the fuzz target
//! `dns_query`.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData};

use crate::state::learned::{AnsweredAddress, MAX_ADDRESSES_PER_ANSWER};

/// CNAME links followed from the asked name.
pub const MAX_CNAME_CHAIN: usize = 8;

/// The addresses `answer` gives for `asked` (at most [`MAX_ADDRESSES_PER_ANSWER`], in answer
/// order, without duplicates); empty if it does not parse or is not a NOERROR answer.
pub fn answered_addresses(answer: &[u8], asked: &Name) -> Vec<AnsweredAddress> {
    let Ok(message) = Message::from_vec(answer) else {
        return Vec::new();
    };
    if message.response_code() != ResponseCode::NoError {
        return Vec::new();
    }
    let records = message.answers();
    // (name on the chain, smallest TTL of the CNAMEs that led to it)
    let mut chain: Vec<(&Name, u32)> = vec![(asked, u32::MAX)];
    for _ in 0..MAX_CNAME_CHAIN {
        let Some(&(current, ttl)) = chain.last() else {
            break;
        };
        let next = records.iter().find_map(|record| match record.data() {
            RData::CNAME(target) if record.name() == current => Some((&target.0, record.ttl())),
            _ => None,
        });
        let Some((target, link_ttl)) = next else {
            break;
        };
        if chain.iter().any(|(name, _)| *name == target) {
            break;
        }
        chain.push((target, ttl.min(link_ttl)));
    }
    let mut out: Vec<AnsweredAddress> = Vec::new();
    for record in records {
        let ip = match record.data() {
            RData::A(a) => std::net::IpAddr::V4(a.0),
            RData::AAAA(aaaa) => std::net::IpAddr::V6(aaaa.0),
            _ => continue,
        };
        let Some(&(_, chain_ttl)) = chain.iter().find(|(name, _)| *name == record.name()) else {
            continue;
        };
        if out.iter().any(|known| known.ip == ip) {
            continue;
        }
        out.push(AnsweredAddress {
            ip,
            ttl: chain_ttl.min(record.ttl()),
        });
        if out.len() == MAX_ADDRESSES_PER_ANSWER {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Record, RecordType};

    fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("name")
    }

    fn a(owner: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().expect("v4"))))
    }

    fn cname(owner: &str, target: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn answer(code: ResponseCode, records: Vec<Record>) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(1)
            .set_message_type(MessageType::Response)
            .set_response_code(code)
            .add_query(Query::query(name("api.example.com."), RecordType::A));
        message.add_answers(records);
        message.to_vec().expect("encode")
    }

    fn learned(bytes: &[u8]) -> Vec<String> {
        answered_addresses(bytes, &name("api.example.com."))
            .iter()
            .map(|address| format!("{} {}", address.ip, address.ttl))
            .collect()
    }

    #[test]
    fn addresses_on_the_chain_from_the_asked_name_are_learned() {
        let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
            (
                "direct A records, any case",
                answer(
                    ResponseCode::NoError,
                    vec![
                        a("API.example.com.", "192.0.2.1", 60),
                        a("api.example.com.", "192.0.2.2", 300),
                    ],
                ),
                vec!["192.0.2.1 60", "192.0.2.2 300"],
            ),
            (
                "a CNAME chain: the smallest TTL on the way",
                answer(
                    ResponseCode::NoError,
                    vec![
                        cname("api.example.com.", "edge.cdn.example.", 20),
                        cname("edge.cdn.example.", "pop.cdn.example.", 600),
                        a("pop.cdn.example.", "198.51.100.1", 120),
                        Record::from_rdata(
                            name("pop.cdn.example."),
                            5,
                            RData::AAAA(AAAA("2001:db8::1".parse().expect("v6"))),
                        ),
                    ],
                ),
                vec!["198.51.100.1 20", "2001:db8::1 5"],
            ),
            (
                "records of names off the chain are ignored",
                answer(
                    ResponseCode::NoError,
                    vec![
                        a("evil.example.", "203.0.113.66", 60),
                        a("api.example.com.", "192.0.2.1", 60),
                    ],
                ),
                vec!["192.0.2.1 60"],
            ),
            (
                "a CNAME loop ends",
                answer(
                    ResponseCode::NoError,
                    vec![
                        cname("api.example.com.", "b.example.", 60),
                        cname("b.example.", "api.example.com.", 60),
                        a("b.example.", "192.0.2.9", 60),
                    ],
                ),
                vec!["192.0.2.9 60"],
            ),
            (
                "NXDOMAIN teaches nothing",
                answer(
                    ResponseCode::NXDomain,
                    vec![a("api.example.com.", "192.0.2.1", 60)],
                ),
                vec![],
            ),
            (
                "garbage teaches nothing",
                vec![0, 1, 0x81, 0x80, 0xff],
                vec![],
            ),
        ];
        for (case, bytes, expected) in cases {
            assert_eq!(learned(&bytes), expected, "{case}");
        }
    }

    #[test]
    fn a_long_answer_is_cut_and_a_long_chain_is_not_followed_to_the_end() {
        let many: Vec<Record> = (0..200u8)
            .map(|index| a("api.example.com.", &format!("10.0.{index}.1"), 60))
            .collect();
        let bytes = answer(ResponseCode::NoError, many);
        assert_eq!(learned(&bytes).len(), MAX_ADDRESSES_PER_ANSWER);

        let mut chain: Vec<Record> = Vec::new();
        let mut owner = "api.example.com.".to_string();
        for link in 0..=MAX_CNAME_CHAIN {
            let target = format!("hop{link}.example.");
            chain.push(cname(&owner, &target, 60));
            owner = target;
        }
        chain.push(a(&owner, "192.0.2.50", 60));
        assert_eq!(
            learned(&answer(ResponseCode::NoError, chain)),
            Vec::<String>::new()
        );
    }
}
