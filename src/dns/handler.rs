//! One DNS message in, one decision out (pure; layer L3): answer from the mesh, forward
//! upstream, or drop. No I/O, no clock, so the fuzz target drives exactly what the listeners run.
//!
//! Bad input never reaches the resolver: a datagram too short for a header is dropped, as is a
//! *response* sent as a query (answering it could start a loop between two servers); an opcode
//! other than QUERY gets NOTIMP; a message that does not parse, or asks anything but exactly
//! one question, gets FORMERR. Queries from a pod whose workload the model does not know get
//! SERVFAIL, as in ztunnel.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::answer::{self, Domains, Family, Resolution};
use crate::state::{Snapshot, Workload};

/// TTL of every answer the mesh gives, in seconds (ztunnel's).
pub const TTL: u32 = 30;

/// The EDNS payload size we advertise in local answers (the DNS flag day 2020 value).
const ADVERTISED_PAYLOAD: u16 = 1232;

/// How a query reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A datagram on 15053/udp.
    Udp,
    /// A length-prefixed message on 15053/tcp.
    Tcp,
}

impl Transport {
    /// `udp` or `tcp`, the metrics label value.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Everything a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The model.
    pub snapshot: &'a Snapshot,
    /// The cluster domain.
    pub domains: &'a Domains,
    /// The pod the listener belongs to; `None` if the model does not know it (yet).
    pub client: Option<&'a Workload>,
    /// UDP or TCP.
    pub transport: Transport,
    /// Rotates the order of answered addresses (spreads clients over endpoints).
    pub rotation: usize,
}

/// What to do with one message.
#[derive(Debug)]
pub enum Handled {
    /// Send `bytes` back to the client.
    Reply {
        /// The encoded answer.
        bytes: Vec<u8>,
        /// The question, if the message had a readable one (metrics, log).
        question: Option<Query>,
        /// What happened, for the query log (`success`, `no records`, `formerr`...).
        result: &'static str,
        /// How many addresses were answered.
        addresses: usize,
    },
    /// Not a mesh name: ask the upstream resolvers.
    Forward(Forward),
    /// Say nothing.
    Drop,
}

/// A query to forward, with what is needed to check and relay the upstream's answer.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The client's message as it arrived (its id is replaced before it leaves).
    pub message: Vec<u8>,
    /// The client's transaction id.
    pub id: u16,
    /// The one question; the upstream's answer must repeat it.
    pub question: Query,
    /// Whether the client asked for recursion (echoed in answers we make).
    pub recursion_desired: bool,
    /// The largest answer the client takes over its transport.
    pub response_limit: usize,
}

impl Forward {
    /// An answer with only `code` (SERVFAIL when upstreams fail, REFUSED when the pod has too
    /// many queries in flight).
    pub fn error(&self, code: ResponseCode) -> Vec<u8> {
        let mut response = response_to(self.id, self.recursion_desired, &self.question);
        response.set_response_code(code);
        encode(&response)
    }

    /// The upstream's `answer` for the client: its id restored, and cut down to a truncated
    /// answer if it exceeds what the client's transport takes (the client retries over TCP).
    pub fn relay(&self, mut answer: Vec<u8>) -> Vec<u8> {
        if answer.len() < 2 {
            return self.error(ResponseCode::ServFail);
        }
        if answer.len() > self.response_limit {
            let mut truncated = response_to(self.id, self.recursion_desired, &self.question);
            truncated.set_truncated(true);
            return encode(&truncated);
        }
        answer[..2].copy_from_slice(&self.id.to_be_bytes());
        answer
    }
}

/// Decides what to do with `message`.
pub fn handle(message: &[u8], context: &Context<'_>) -> Handled {
    let Ok(header) = Header::read(&mut BinDecoder::new(message)) else {
        return Handled::Drop;
    };
    if header.message_type() == MessageType::Response {
        return Handled::Drop;
    }
    if header.op_code() != OpCode::Query {
        let mut response = Message::error_msg(header.id(), header.op_code(), ResponseCode::NotImp);
        response.set_recursion_desired(header.recursion_desired());
        return reply(encode(&response), None, "not implemented", 0);
    }
    let request = match Message::from_vec(message) {
        Ok(request) if request.queries().len() == 1 => request,
        _ => {
            let response = Message::error_msg(header.id(), OpCode::Query, ResponseCode::FormErr);
            return reply(encode(&response), None, "formerr", 0);
        }
    };
    let question = request.queries()[0].clone();
    let Some(client) = context.client else {
        let mut response = response_to(header.id(), header.recursion_desired(), &question);
        response.set_response_code(ResponseCode::ServFail);
        return reply(encode(&response), Some(question), "unknown source", 0);
    };
    let family = match question.query_type() {
        RecordType::A => Some(Family::V4),
        RecordType::AAAA => Some(Family::V6),
        _ => None,
    };
    let name = plain_name(question.name());
    let resolution = match (family, &name) {
        (Some(family), Some(name)) if question.query_class() == DNSClass::IN => {
            answer::resolve(context.snapshot, context.domains, client, name, family)
        }
        _ => Resolution::Unknown,
    };
    match resolution {
        Resolution::Unknown => Handled::Forward(Forward {
            message: message.to_vec(),
            id: header.id(),
            recursion_desired: header.recursion_desired(),
            response_limit: response_limit(&request, context.transport),
            question,
        }),
        Resolution::Known {
            canonical,
            mut addresses,
            ..
        } => {
            if !addresses.is_empty() {
                let turn = context.rotation % addresses.len();
                addresses.rotate_left(turn);
            }
            let count = addresses.len();
            let records = records(question.name(), canonical.as_deref(), &addresses);
            let bytes = local_answer(&request, &question, records, context.transport);
            let result = if count == 0 { "no records" } else { "success" };
            reply(bytes, Some(question), result, count)
        }
    }
}

fn reply(
    bytes: Vec<u8>,
    question: Option<Query>,
    result: &'static str,
    addresses: usize,
) -> Handled {
    Handled::Reply {
        bytes,
        question,
        result,
        addresses,
    }
}

/// The asked name in lower case without the trailing dot, or `None` if a label is not plain
/// ASCII (no mesh hostname is).
pub(super) fn plain_name(name: &Name) -> Option<String> {
    let mut labels = Vec::with_capacity(usize::from(name.num_labels()));
    for label in name.iter() {
        let label = std::str::from_utf8(label).ok().filter(|label| {
            label
                .bytes()
                .all(|byte| byte.is_ascii_graphic() && byte != b'.')
        })?;
        labels.push(label.to_ascii_lowercase());
    }
    Some(labels.join("."))
}

/// The largest answer a client takes: 512 bytes over UDP unless its EDNS record allows more,
/// 64 KiB over TCP.
fn response_limit(request: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Udp => usize::from(request.max_payload()),
        Transport::Tcp => usize::from(u16::MAX),
    }
}

/// The A/AAAA records for `addresses`, preceded by a CNAME from the asked name when the name
/// was found under `canonical`.
fn records(asked: &Name, canonical: Option<&str>, addresses: &[IpAddr]) -> Vec<Record> {
    let mut out = Vec::with_capacity(addresses.len() + 1);
    let mut owner = asked.clone();
    if let Some(target) = canonical.and_then(|name| Name::from_ascii(format!("{name}.")).ok()) {
        out.push(Record::from_rdata(
            asked.clone(),
            TTL,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    for address in addresses {
        let rdata = match address {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        out.push(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    out
}

/// A response header for `id` echoing `question`: authoritative, recursion available, as
/// ztunnel answers.
fn response_to(id: u16, recursion_desired: bool, question: &Query) -> Message {
    let mut response = Message::new();
    response
        .set_id(id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(recursion_desired)
        .set_recursion_available(true)
        .add_query(question.clone());
    response
}

/// The answer the mesh gives, truncated (TC, no records) if it exceeds the client's limit.
fn local_answer(
    request: &Message,
    question: &Query,
    records: Vec<Record>,
    transport: Transport,
) -> Vec<u8> {
    let mut response = response_to(request.id(), request.recursion_desired(), question);
    response.set_checking_disabled(request.checking_disabled());
    response.add_answers(records);
    if let Some(asked) = request.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_PAYLOAD)
            .set_version(0)
            .set_dnssec_ok(asked.flags().dnssec_ok);
        response.set_edns(edns);
    }
    let bytes = encode(&response);
    if bytes.len() <= response_limit(request, transport) {
        return bytes;
    }
    encode(&response.truncate())
}

/// Encodes `message`; if that fails (nothing we build should fail), a bare SERVFAIL with its
/// id, which always encodes.
fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|error| {
        tracing::warn!(target: "dns", %error, "cannot encode an answer; sending SERVFAIL");
        let mut bytes = message.id().to_be_bytes().to_vec();
        // QR=1, opcode QUERY, RA=1, rcode SERVFAIL; no records.
        bytes.extend_from_slice(&[0x80, 0x82, 0, 0, 0, 0, 0, 0, 0, 0]);
        bytes
    })
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
