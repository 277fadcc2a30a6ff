//! Forwarding a pod's query to the upstream resolvers (layer L3).
//!
//! Sockets come from the pod's socket factory: they live in the pod's network namespace and
//! carry the agent's mark, so the pod's port-53 redirect skips them and the upstream sees the
//! pod's address, exactly as if the pod had asked itself. The client's message travels as it
//! came (EDNS options included) except for its transaction id, which is replaced by a random
//! one; the answer is accepted only from the upstream's address (a connected socket on a fresh
//! port), with that id, and repeating the question's name, type and class, so an off-path
//! attacker has to guess 32 bits and the question. A UDP answer with TC set is asked again
//! over TCP. Upstreams are tried in order within one overall deadline; SERVFAIL or REFUSED from
//! one moves on to the next.
//!
//! Hand-written on hickory-proto's codec rather than hickory-resolver: the resolver turns
//! answers into record lookups (dropping the upstream's rcode, authority section and EDNS
//! options a client may rely on) and caches, where a proxy must relay each answer unchanged.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::socket::{Leg, SocketError, SocketFactory};

/// Datagrams from the upstream that do not answer our query are skipped, up to this many.
const MAX_STRAY_DATAGRAMS: usize = 16;

/// Why a forward failed; the client gets SERVFAIL for each of these.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream is configured.
    #[error("no upstream resolver")]
    NoUpstream,
    /// The deadline passed before any upstream answered.
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
    /// A socket could not be made or used.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Sending or receiving failed.
    #[error("{upstream}: {source}")]
    Io {
        /// The upstream.
        upstream: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The upstream's answer was not an answer to our query.
    #[error("{upstream}: {reason}")]
    BadAnswer {
        /// The upstream.
        upstream: SocketAddr,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Forwards queries of one pod.
#[derive(Debug, Clone)]
pub struct Forwarder {
    sockets: SocketFactory,
    upstreams: std::sync::Arc<[SocketAddr]>,
    timeout: Duration,
}

impl Forwarder {
    /// A forwarder whose sockets come from `sockets`.
    pub fn new(
        sockets: SocketFactory,
        upstreams: std::sync::Arc<[SocketAddr]>,
        timeout: Duration,
    ) -> Self {
        Forwarder {
            sockets,
            upstreams,
            timeout,
        }
    }

    /// Sends `message` (a query asking `question`) upstream and returns the first acceptable
    /// answer, with the id of `message` put back.
    pub async fn forward(&self, message: &[u8], question: &Query) -> Result<Vec<u8>, ForwardError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = Err(ForwardError::NoUpstream);
        for (index, upstream) in self.upstreams.iter().enumerate() {
            // Later upstreams get an equal share of what is left.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let share = remaining / u32::try_from(self.upstreams.len() - index).unwrap_or(1);
            let attempt = self.exchange(*upstream, message, question, Instant::now() + share);
            let result = match tokio::time::timeout_at(Instant::now() + share, attempt).await {
                Ok(result) => result,
                Err(_) => Err(ForwardError::Timeout(*upstream)),
            };
            match result {
                Ok((answer, code)) if retry_elsewhere(code) => last = Ok(answer),
                Ok((answer, _)) => return Ok(answer),
                Err(error) => {
                    tracing::debug!(target: "dns", %upstream, %error, "upstream failed");
                    if last.is_err() {
                        last = Err(error);
                    }
                }
            }
        }
        let mut answer = last?;
        answer[..2].copy_from_slice(&message[..2]);
        Ok(answer)
    }

    /// One upstream: UDP, then TCP if the UDP answer was truncated.
    async fn exchange(
        &self,
        upstream: SocketAddr,
        message: &[u8],
        question: &Query,
        deadline: Instant,
    ) -> Result<(Vec<u8>, ResponseCode), ForwardError> {
        let id: u16 = rand::random();
        let mut outgoing = message.to_vec();
        outgoing[..2].copy_from_slice(&id.to_be_bytes());
        let (answer, checked) = self.over_udp(upstream, &outgoing, id, question).await?;
        let (mut answer, checked) = if checked.truncated {
            let remaining = deadline.saturating_duration_since(Instant::now());
            self.over_tcp(upstream, &outgoing, id, question, remaining)
                .await?
        } else {
            (answer, checked)
        };
        answer[..2].copy_from_slice(&message[..2]);
        Ok((answer, checked.code))
    }

    async fn over_udp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Query,
    ) -> Result<(Vec<u8>, Checked), ForwardError> {
        let io = |source| ForwardError::Io { upstream, source };
        let socket = self.sockets.udp_connect(upstream)?;
        socket.send(query).await.map_err(io)?;
        let mut buffer = vec![0u8; usize::from(u16::MAX)];
        for _ in 0..MAX_STRAY_DATAGRAMS {
            let length = socket.recv(&mut buffer).await.map_err(io)?;
            let Some(datagram) = buffer.get(..length) else {
                continue;
            };
            // Anything that is not our answer is ignored: the real one may still come.
            if let Ok(checked) = check_answer(datagram, id, question) {
                buffer.truncate(length);
                return Ok((buffer, checked));
            }
        }
        Err(ForwardError::BadAnswer {
            upstream,
            reason: "only datagrams that do not answer the query",
        })
    }

    async fn over_tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Query,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Checked), ForwardError> {
        let io = |source| ForwardError::Io { upstream, source };
        let mut stream = self
            .sockets
            .connect(upstream, None, Leg::Network, timeout)
            .await?;
        let length = u16::try_from(query.len()).map_err(|_| ForwardError::BadAnswer {
            upstream,
            reason: "query too long for TCP",
        })?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(io)?;
        let length = stream.read_u16().await.map_err(io)?;
        let mut answer = vec![0u8; usize::from(length)];
        stream.read_exact(&mut answer).await.map_err(io)?;
        let checked = check_answer(&answer, id, question)
            .map_err(|reason| ForwardError::BadAnswer { upstream, reason })?;
        Ok((answer, checked))
    }
}

/// What matters of an accepted answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// TC was set: ask again over TCP.
    pub truncated: bool,
    /// The upstream's response code.
    pub code: ResponseCode,
}

/// Whether another upstream may do better than an answer with `code` (as a stub resolver
/// moves on after SERVFAIL or REFUSED).
fn retry_elsewhere(code: ResponseCode) -> bool {
    matches!(code, ResponseCode::ServFail | ResponseCode::Refused)
}

/// Accepts `answer` only as a response with our `id` to exactly `question` (name compared
/// case-insensitively, type and class equal).
pub fn check_answer(answer: &[u8], id: u16, question: &Query) -> Result<Checked, &'static str> {
    let message = Message::from_vec(answer).map_err(|_| "answer does not parse")?;
    if message.id() != id {
        return Err("answer with another transaction id");
    }
    if message.message_type() != MessageType::Response {
        return Err("a query instead of an answer");
    }
    match message.queries() {
        // Name equality is case-insensitive.
        [asked] if asked.name() == question.name() => {
            if asked.query_type() != question.query_type()
                || asked.query_class() != question.query_class()
            {
                return Err("answer to another question");
            }
        }
        _ => return Err("answer to another question"),
    }
    Ok(Checked {
        truncated: message.truncated(),
        code: message.response_code(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Name, RecordType};

    fn question(name: &str, record_type: RecordType) -> Query {
        Query::query(Name::from_ascii(name).expect("name"), record_type)
    }

    fn answer(id: u16, asked: &Query, truncated: bool) -> Vec<u8> {
        let mut message =
            Message::error_msg(id, hickory_proto::op::OpCode::Query, ResponseCode::NXDomain);
        message.add_query(asked.clone()).set_truncated(truncated);
        message.to_vec().expect("encode")
    }

    #[test]
    fn answers_are_matched_by_id_name_and_type() {
        let asked = question("example.com.", RecordType::A);
        let ok = check_answer(&answer(7, &asked, false), 7, &asked).expect("accepted");
        assert_eq!(ok.code, ResponseCode::NXDomain);
        assert!(!ok.truncated);
        let upper = question("EXAMPLE.com.", RecordType::A);
        assert!(
            check_answer(&answer(7, &upper, true), 7, &asked)
                .expect("case")
                .truncated
        );

        let cases = [
            (
                answer(8, &asked, false),
                "answer with another transaction id",
            ),
            (
                answer(7, &question("evil.com.", RecordType::A), false),
                "answer to another question",
            ),
            (
                answer(7, &question("example.com.", RecordType::AAAA), false),
                "answer to another question",
            ),
            (vec![0, 7, 0x81], "answer does not parse"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(check_answer(&bytes, 7, &asked), Err(expected));
        }
        let mut query = Message::new();
        query.set_id(7).add_query(asked.clone());
        assert_eq!(
            check_answer(&query.to_vec().expect("encode"), 7, &asked),
            Err("a query instead of an answer")
        );
    }
}
