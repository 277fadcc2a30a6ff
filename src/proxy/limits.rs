//! Caps on concurrent unauthenticated connections (layer L3): per pod (its three listeners
//! together) and per source IP (node-wide, on the inbound listeners). A plaintext connection to
//! a captured pod costs the shared agent two fds for as long as it lasts, and a TCP connection
//! to 15008 holds one until its TLS handshake ends; without caps one hostile pod or peer could
//! take every fd of the node's agent from every other pod.
//!
//! Checked in the accept loop, before any work: a refused connection is reset at once (the
//! client sees the refusal), counted in `nodetunnel_connections_refused_total` by listener and
//! reason, and logged once per burst. An [`Admitted`] slot is given back when dropped: at the
//! end of the connection (15001, 15006) or of the TLS handshake (15008), after which the
//! connection is authenticated and the HTTP/2 limits take over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Which listener a connection arrived on (the metric's `listener` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ListenerKind {
    /// 15001: the pod's own outbound connections (capped per pod only: the source is the pod).
    Outbound,
    /// 15006: plaintext to the pod.
    InboundPlaintext,
    /// 15008: HBONE, until its TLS handshake ends.
    Hbone,
}

impl ListenerKind {
    /// The label value (and log field) for this listener.
    pub(super) fn name(self) -> &'static str {
        match self {
            ListenerKind::Outbound => "outbound",
            ListenerKind::InboundPlaintext => "inbound_plaintext",
            ListenerKind::Hbone => "inbound",
        }
    }

    /// Whether the peer's IP names someone other than the pod (so a per-source cap applies).
    fn remote_source(self) -> bool {
        !matches!(self, ListenerKind::Outbound)
    }

    /// How many connections more than the least loaded shard the accepting shard may run
    /// and still keep a new one (`shard::Shards::place`). HBONE connections are few, long-lived
    /// and carry many streams each: balanced exactly. An app's connections are many and mostly
    /// short: a shard keeps them unless it is clearly busier, since moving one costs a second
    /// thread's wake-up.
    pub(super) fn placement_slack(self) -> usize {
        match self {
            ListenerKind::Hbone => 0,
            ListenerKind::Outbound | ListenerKind::InboundPlaintext => 1,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    /// The pod already has its maximum of unauthenticated connections.
    #[error("the pod has {0} unauthenticated connections, its maximum")]
    Pod(usize),
    /// The source IP already has its maximum of unauthenticated connections to this node.
    #[error("the source has {0} unauthenticated connections to this node, its maximum")]
    Source(usize),
}

impl Refusal {
    /// The metric's `reason` label.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Refusal::Pod(_) => "pod_limit",
            Refusal::Source(_) => "source_limit",
        }
    }
}

/// The node-wide per-source counts; one for the whole agent.
#[derive(Debug)]
pub struct SourceLimits {
    max_per_source: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl SourceLimits {
    /// At most `max_per_source` unauthenticated connections from one IP to any pod of the node.
    pub fn new(max_per_source: u32) -> Arc<Self> {
        Arc::new(SourceLimits {
            max_per_source: usize::try_from(max_per_source).unwrap_or(usize::MAX),
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn acquire(&self, source: IpAddr) -> Result<(), Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return Err(Refusal::Source(self.max_per_source));
        }
        *count += 1;
        Ok(())
    }

    fn release(&self, source: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                // No entry outlives its connections: the map holds only live sources.
                counts.remove(&source);
            }
        }
    }
}

/// One pod's count, shared by its three listeners.
#[derive(Debug)]
pub(super) struct PodLimit {
    max: usize,
    count: AtomicUsize,
    /// A refusal was logged and no slot has been given back since (one warning per burst).
    refusing: AtomicBool,
}

impl PodLimit {
    pub(super) fn new(max: u32) -> Arc<Self> {
        Arc::new(PodLimit {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            count: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
        })
    }

    /// Unauthenticated connections of the pod now.
    #[cfg(test)]
    pub(super) fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Takes a slot for a connection from `source` on `listener`, or says why not.
    pub(super) fn admit(
        self: &Arc<Self>,
        sources: &Arc<SourceLimits>,
        listener: ListenerKind,
        source: IpAddr,
    ) -> Result<Admitted, Refusal> {
        let taken = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                (count < self.max).then_some(count + 1)
            });
        if taken.is_err() {
            return Err(Refusal::Pod(self.max));
        }
        let mut admitted = Admitted {
            pod: self.clone(),
            source: None,
        };
        if listener.remote_source() {
            sources.acquire(source)?;
            admitted.source = Some((sources.clone(), source));
        }
        Ok(admitted)
    }

    /// Whether this refusal starts a burst (and so deserves a warning).
    pub(super) fn first_refusal(&self) -> bool {
        !self.refusing.swap(true, Ordering::AcqRel)
    }
}

/// A connection's slot; given back when dropped.
#[derive(Debug)]
pub(super) struct Admitted {
    pod: Arc<PodLimit>,
    source: Option<(Arc<SourceLimits>, IpAddr)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.pod.count.fetch_sub(1, Ordering::AcqRel);
        self.pod.refusing.store(false, Ordering::Release);
        if let Some((sources, ip)) = &self.source {
            sources.release(*ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// The pod cap counts all three listeners; the source cap counts one IP across pods, on
    /// inbound listeners only; slots come back when their connections end.
    #[test]
    fn pod_and_source_caps_refuse_over_the_limit_and_free_on_drop() {
        let sources = SourceLimits::new(2);
        let pod = PodLimit::new(3);
        let other_pod = PodLimit::new(10);
        let first = pod
            .admit(&sources, ListenerKind::Hbone, CLIENT)
            .expect("1st");
        let second = pod
            .admit(&sources, ListenerKind::InboundPlaintext, CLIENT)
            .expect("2nd");
        assert_eq!(
            other_pod
                .admit(&sources, ListenerKind::Hbone, CLIENT)
                .expect_err("source cap across pods"),
            Refusal::Source(2)
        );
        let outbound = pod
            .admit(&sources, ListenerKind::Outbound, CLIENT)
            .expect("outbound is not capped by source");
        assert_eq!(
            pod.admit(&sources, ListenerKind::Hbone, OTHER)
                .expect_err("pod cap"),
            Refusal::Pod(3)
        );
        assert_eq!(pod.current(), 3);
        drop(first);
        let again = other_pod
            .admit(&sources, ListenerKind::Hbone, CLIENT)
            .expect("a slot came back");
        drop((second, outbound, again));
        assert_eq!(pod.current(), 0);
        assert!(
            sources
                .counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty(),
            "no entry outlives its connections"
        );
    }

    /// A refusal by source gives back the pod slot it took first.
    #[test]
    fn a_source_refusal_leaves_the_pod_count_unchanged() {
        let sources = SourceLimits::new(1);
        let pod = PodLimit::new(5);
        let _held = pod
            .admit(&sources, ListenerKind::Hbone, CLIENT)
            .expect("1st");
        pod.admit(&sources, ListenerKind::Hbone, CLIENT)
            .expect_err("source cap");
        assert_eq!(pod.current(), 1);
    }
}
