//! The DNS listeners of one pod (layer L3): a UDP receive loop and a TCP accept loop per
//! loopback address, in the pod's drain scope.
//!
//! Local answers are computed inline (no task, no allocation beyond the answer). A forwarded
//! query takes one of the pod's forward permits for as long as it is in flight; without one it
//! is answered REFUSED at once, so a pod flooding its proxy gets refusals while memory and
//! tasks stay bounded and other pods are untouched. TCP connections take a permit too, and each
//! must deliver a message within [`TCP_IDLE_TIMEOUT`]; a length prefix beyond
//! [`MAX_QUERY_SIZE`] closes the connection before anything is buffered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::OwnedSemaphorePermit;

use hickory_proto::op::Query;

use super::handler::{self, Forward, Handled, Transport};
use super::learn;
use super::DnsProxy;
use crate::state::Workload;
use crate::telemetry::dns::DnsLabels;

/// The largest query we read. Real queries are well under 512 bytes; EDNS options add little.
pub const MAX_QUERY_SIZE: usize = 4096;

/// A TCP client must send each message (and read each answer) within this, as ztunnel's 5 s.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first step of a query: done, or waiting for upstream.
enum Step {
    /// Send this (or nothing).
    Done(Option<Vec<u8>>),
    /// Forward upstream, then answer.
    Forward(Pending),
}

/// A query on its way upstream, with what its metrics and log line need.
struct Pending {
    forward: Forward,
    labels: DnsLabels,
    source: Option<Arc<Workload>>,
}

impl DnsProxy {
    /// Decides what to do with `message` and records the request.
    fn first_step(&self, message: &[u8], transport: Transport) -> Step {
        let snapshot = self.inputs.state.snapshot();
        let source = snapshot.workload(&self.workload_uid).cloned();
        let context = handler::Context {
            snapshot: &snapshot,
            domains: &self.inputs.settings.domains,
            client: source.as_deref(),
            transport,
            rotation: self.rotation.fetch_add(1, Ordering::Relaxed),
        };
        match handler::handle(message, &context) {
            Handled::Drop => {
                tracing::debug!(target: "dns", workload = %self.workload_uid, "dropped a message that is not a query");
                Step::Done(None)
            }
            Handled::Reply {
                bytes,
                question,
                result,
                addresses,
            } => {
                if let Some(question) = &question {
                    let query_type = query_type_label(question.query_type());
                    let labels = DnsLabels::new(&query_type, transport.label(), source.as_deref());
                    self.inputs.metrics.dns().request(&labels);
                    log_query(
                        source.as_deref(),
                        &query_type,
                        &question.name().to_string(),
                        result,
                        addresses,
                    );
                }
                Step::Done(Some(bytes))
            }
            Handled::Forward(forward) => {
                let query_type = query_type_label(forward.question.query_type());
                let labels = DnsLabels::new(&query_type, transport.label(), source.as_deref());
                self.inputs.metrics.dns().request(&labels);
                Step::Forward(Pending {
                    forward,
                    labels,
                    source,
                })
            }
        }
    }

    /// Forwards a pending query and returns the client's answer (SERVFAIL on failure).
    async fn finish(&self, pending: Pending) -> Vec<u8> {
        let Pending {
            forward,
            labels,
            source,
        } = pending;
        let started = tokio::time::Instant::now();
        let result = self
            .forwarder
            .forward(&forward.message, &forward.question)
            .await;
        let seconds = started.elapsed().as_secs_f64();
        self.inputs
            .metrics
            .dns()
            .forwarded(&labels, seconds, result.is_ok());
        let name = forward.question.name().to_string();
        match result {
            Ok(answer) => {
                self.learn(source.as_deref(), &forward.question, &answer);
                // ANCOUNT, straight from the header (the answer was parsed when accepted).
                let answers = answer.get(6..8).map_or(0, |count| {
                    usize::from(u16::from_be_bytes([count[0], count[1]]))
                });
                log_query(
                    source.as_deref(),
                    &labels.request_query_type,
                    &name,
                    "forwarded",
                    answers,
                );
                forward.relay(answer)
            }
            Err(error) => {
                tracing::debug!(target: "dns", %error, domain = %name, "forwarding failed");
                log_query(
                    source.as_deref(),
                    &labels.request_query_type,
                    &name,
                    "forwarding failed",
                    0,
                );
                forward.error(ResponseCode::ServFail)
            }
        }
    }

    /// Teaches the pod's egress set the addresses of `answer` when a ServiceEntry exported to
    /// the pod's namespace allows the asked name.
    fn learn(&self, source: Option<&Workload>, question: &Query, answer: &[u8]) {
        let (Some(source), RecordType::A | RecordType::AAAA) = (source, question.query_type())
        else {
            return;
        };
        let Some(name) = handler::plain_name(question.name()) else {
            return;
        };
        let entries = self
            .inputs
            .state
            .snapshot()
            .egress()
            .entries_for_host(&source.namespace, &name);
        if entries.is_empty() {
            return;
        }
        let addresses = learn::answered_addresses(answer, question.name());
        if addresses.is_empty() {
            return;
        }
        self.learned
            .learn(&name, &entries, &addresses, tokio::time::Instant::now());
        tracing::debug!(
            target: "dns",
            workload = %self.workload_uid,
            domain = %name,
            addresses = addresses.len(),
            entry = %entries[0].name,
            "learned allowed egress addresses"
        );
    }

    /// A forward permit, if the pod has one free.
    fn forward_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.forwards.clone().try_acquire_owned().ok()
    }
}

/// The `request_query_type` value: the type's name as ztunnel writes it (lower-cased by the
/// labels), but one `unknown` for every unassigned type code, so a pod sending random types
/// cannot mint 65 536 series.
fn query_type_label(record_type: RecordType) -> String {
    match record_type {
        RecordType::Unknown(_) => "unknown".to_string(),
        known => known.to_string(),
    }
}

/// The per-query log line (target `dns`, DEBUG, so off by default), with ztunnel's fields.
fn log_query(source: Option<&Workload>, query: &str, domain: &str, result: &str, endpoints: usize) {
    tracing::event!(
        target: "dns",
        tracing::Level::DEBUG,
        src.workload = %source.map_or("unknown", |w| w.name.as_str()),
        src.namespace = %source.map_or("unknown", |w| w.namespace.as_str()),
        query,
        domain,
        result,
        endpoints,
        "dns query"
    );
}

/// Receives queries on `socket` until the pod drains.
pub(super) async fn serve_udp(proxy: Arc<DnsProxy>, socket: Arc<UdpSocket>) {
    let mut buffer = vec![0u8; MAX_QUERY_SIZE];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            _ = proxy.drain.draining() => return,
        };
        let (length, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // Rare on an unconnected socket; pause so a persistent error cannot spin.
                tracing::debug!(target: "dns", %error, "udp receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(message) = buffer.get(..length) else {
            continue;
        };
        let pending = match proxy.first_step(message, Transport::Udp) {
            Step::Done(Some(answer)) => {
                send(&socket, &answer, peer).await;
                continue;
            }
            Step::Done(None) => continue,
            Step::Forward(pending) => pending,
        };
        let Some(permit) = proxy.forward_permit() else {
            refuse(&proxy, &pending);
            send(&socket, &pending.forward.error(ResponseCode::Refused), peer).await;
            continue;
        };
        let task_proxy = proxy.clone();
        let task_socket = socket.clone();
        let forced = proxy.drain.clone();
        proxy.drain.spawn(async move {
            tokio::select! {
                answer = task_proxy.finish(pending) => send(&task_socket, &answer, peer).await,
                _ = forced.forced() => {}
            }
            drop(permit);
        });
    }
}

fn refuse(proxy: &DnsProxy, pending: &Pending) {
    tracing::debug!(
        target: "dns",
        workload = %proxy.workload_uid,
        domain = %pending.forward.question.name(),
        "too many forwarded queries in flight; refused"
    );
}

async fn send(socket: &UdpSocket, answer: &[u8], peer: std::net::SocketAddr) {
    if let Err(error) = socket.send_to(answer, peer).await {
        tracing::debug!(target: "dns", %peer, %error, "cannot send a DNS answer");
    }
}

/// Accepts TCP connections until the pod drains.
pub(super) async fn serve_tcp(proxy: Arc<DnsProxy>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = proxy.drain.draining() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(target: "dns", %error, "dns accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = proxy.tcp_connections.clone().try_acquire_owned() else {
            tracing::debug!(target: "dns", workload = %proxy.workload_uid, "too many DNS TCP connections; closed one");
            continue;
        };
        let connection = Box::pin(handle_tcp(proxy.clone(), stream));
        let forced = proxy.drain.clone();
        proxy.drain.spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = forced.forced() => {}
            }
            drop(permit);
        });
    }
}

/// Serves one TCP connection: length-prefixed queries, one at a time, until the client stops,
/// stalls, or sends something that is not a query.
async fn handle_tcp(proxy: Arc<DnsProxy>, mut stream: TcpStream) {
    loop {
        let length = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(length)) => usize::from(length),
            _ => return,
        };
        if length > MAX_QUERY_SIZE {
            tracing::debug!(target: "dns", length, "DNS TCP length prefix too large; closing");
            return;
        }
        let mut message = vec![0u8; length];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let answer = match proxy.first_step(&message, Transport::Tcp) {
            Step::Done(Some(answer)) => answer,
            Step::Done(None) => return,
            Step::Forward(pending) => match proxy.forward_permit() {
                Some(permit) => {
                    let answer = proxy.finish(pending).await;
                    drop(permit);
                    answer
                }
                None => {
                    refuse(&proxy, &pending);
                    pending.forward.error(ResponseCode::Refused)
                }
            },
        };
        let Ok(prefix) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&prefix.to_be_bytes());
        framed.extend_from_slice(&answer);
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unassigned_query_types_share_one_label() {
        assert_eq!(query_type_label(RecordType::AAAA), "AAAA");
        assert_eq!(query_type_label(RecordType::Unknown(65_000)), "unknown");
        assert_eq!(query_type_label(RecordType::Unknown(65_001)), "unknown");
    }
}
