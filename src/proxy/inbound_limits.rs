//! Inbound protection of one destination workload (layer L3): per source, at most
//! `maxConnections` open connections and a token bucket of new connections
//! (`connectionsPerSecond`, `burst`), as the snapshot's `inboundLimits` rule for the workload
//! says (`state::inbound_limits`). A source is the peer's SPIFFE identity on HBONE and the
//! peer's IP on plaintext.
//!
//! `admission` asks [`InboundLimiter::admit`] once per HBONE stream or plaintext connection,
//! after the target check and before authorization and the connect to the app. An
//! [`InboundSlot`] counts the connection open until it is dropped.
//!
//! The table of sources is bounded: a source at rest (nothing open, bucket full) is the same as
//! no entry and is swept away every [`SWEEP_INTERVAL`]; at [`MAX_TRACKED_SOURCES`] a new
//! source first sweeps, then drops every source with nothing open (such a source may get its
//! burst back early: only a peer rotating through thousands of sources gains, and only what
//! it already spent), and is refused when every tracked source still has a connection open.
//! Time comes from tokio's clock, so tests drive the buckets with a paused clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::spiffe::Identity;
use crate::state::inbound_limits::PerSourceLimits;
use crate::telemetry::protection::LimitReason;
use crate::telemetry::ResponseFlag;

/// Sources one destination workload keeps state for. Bounds the table's memory (an entry is
/// about 200 bytes, so under 2 MiB) whatever a peer rotating source IPs does.
pub const MAX_TRACKED_SOURCES: usize = 8192;
/// How often sources at rest are swept from the table.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Who a limit counts: the identity a peer proved, or else the address it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// HBONE: the client certificate's SPIFFE identity.
    Identity(Identity),
    /// Plaintext: the client's IP.
    Ip(IpAddr),
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceKey::Identity(identity) => identity.fmt(f),
            SourceKey::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Why a connection was refused by an inbound limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitRefusal {
    /// The source already has `maxConnections` open to the workload.
    #[error(
        "{client} has {max} connections open to this workload, its inboundLimits maxConnections"
    )]
    Concurrency {
        /// Who.
        client: SourceKey,
        /// The limit.
        max: u32,
    },
    /// The source spent its burst and the bucket has not refilled a token yet.
    #[error("{client} opens connections faster than this workload's inboundLimits allow ({per_second}/s, burst {burst})")]
    Rate {
        /// Who.
        client: SourceKey,
        /// Refill rate.
        per_second: f64,
        /// Bucket size.
        burst: u32,
    },
    /// The table of sources is full and every source in it has a connection open.
    #[error(
        "this workload already tracks {0} sources with connections open; refusing new sources"
    )]
    Sources(usize),
}

impl LimitRefusal {
    /// The metric's reason.
    pub fn reason(&self) -> LimitReason {
        match self {
            LimitRefusal::Concurrency { .. } => LimitReason::InboundConcurrency,
            LimitRefusal::Rate { .. } => LimitReason::InboundRate,
            LimitRefusal::Sources(_) => LimitReason::InboundSources,
        }
    }

    /// Envoy's response flag: a rate limit is `RATE_LIMITED`, a full table or connection
    /// count `UPSTREAM_OVERFLOW` (a circuit breaker).
    pub fn flag(&self) -> ResponseFlag {
        match self {
            LimitRefusal::Rate { .. } => ResponseFlag::RateLimited,
            _ => ResponseFlag::Overflow,
        }
    }
}

#[derive(Debug)]
struct SourceState {
    open: u32,
    tokens: f64,
    refilled: Instant,
    /// The bucket as last configured (a reload may change it): tokens per second and size.
    per_second: f64,
    burst: f64,
}

impl SourceState {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
    }

    /// Nothing open and a full bucket: the same as no entry at all.
    fn at_rest(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.open == 0 && self.tokens + elapsed * self.per_second >= self.burst
    }
}

#[derive(Debug, Default)]
struct Sources {
    by_key: HashMap<SourceKey, SourceState>,
    swept: Option<Instant>,
}

impl Sources {
    fn sweep(&mut self, now: Instant) {
        self.by_key.retain(|_, state| !state.at_rest(now));
        self.swept = Some(now);
    }

    /// Room for a new source, or why there is none.
    fn make_room(&mut self, now: Instant) -> Result<(), LimitRefusal> {
        if self.by_key.len() < MAX_TRACKED_SOURCES {
            return Ok(());
        }
        self.sweep(now);
        if self.by_key.len() >= MAX_TRACKED_SOURCES {
            self.by_key.retain(|_, state| state.open > 0);
        }
        if self.by_key.len() >= MAX_TRACKED_SOURCES {
            return Err(LimitRefusal::Sources(self.by_key.len()));
        }
        Ok(())
    }
}

/// The per-source state of one destination workload.
#[derive(Debug, Default)]
pub struct InboundLimiter {
    sources: Mutex<Sources>,
}

fn lock(mutex: &Mutex<Sources>) -> MutexGuard<'_, Sources> {
    // Plain counters: still consistent after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl InboundLimiter {
    /// Admits a new connection from `source` under `limits`, or says which limit refuses it.
    /// A refused connection takes neither a slot nor a token.
    pub fn admit(
        self: &Arc<Self>,
        limits: &PerSourceLimits,
        source: SourceKey,
        now: Instant,
    ) -> Result<InboundSlot, LimitRefusal> {
        let mut sources = lock(&self.sources);
        if sources.swept.map_or(true, |swept| {
            now.saturating_duration_since(swept) >= SWEEP_INTERVAL
        }) {
            sources.sweep(now);
        }
        if !sources.by_key.contains_key(&source) {
            sources.make_room(now)?;
        }
        // Without a rate the bucket is always full (and never checked).
        let (per_second, burst) = limits.rate().unwrap_or((0.0, 0));
        let burst = f64::from(burst);
        let state = sources
            .by_key
            .entry(source.clone())
            .or_insert_with(|| SourceState {
                open: 0,
                tokens: burst,
                refilled: now,
                per_second,
                burst,
            });
        state.per_second = per_second;
        state.burst = burst;
        state.refill(now);
        if let Some(max) = limits.max_connections {
            if state.open >= max {
                return Err(LimitRefusal::Concurrency {
                    client: source,
                    max,
                });
            }
        }
        if limits.connections_per_second.is_some() {
            if state.tokens < 1.0 {
                return Err(LimitRefusal::Rate {
                    client: source,
                    per_second,
                    burst: burst as u32,
                });
            }
            state.tokens -= 1.0;
        }
        state.open += 1;
        drop(sources);
        Ok(InboundSlot {
            limiter: self.clone(),
            source,
        })
    }

    /// Sources with state now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        lock(&self.sources).by_key.len()
    }

    fn release(&self, source: &SourceKey) {
        let mut sources = lock(&self.sources);
        let now = Instant::now();
        let Some(state) = sources.by_key.get_mut(source) else {
            return;
        };
        state.open = state.open.saturating_sub(1);
        if state.at_rest(now) {
            sources.by_key.remove(source);
        }
    }
}

/// An admitted connection's place among its source's open connections; given back on drop.
#[derive(Debug)]
pub struct InboundSlot {
    limiter: Arc<InboundLimiter>,
    source: SourceKey,
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        self.limiter.release(&self.source);
    }
}

#[cfg(test)]
mod tests;
