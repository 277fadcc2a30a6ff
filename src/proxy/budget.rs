//! The node-wide memory budget of HBONE connections (layer L3).
//!
//! What one HBONE connection can make the agent hold is set by two things: the HTTP/2 receive
//! window it advertises (a peer may send that much before the app reads any of it) and the bytes
//! read from the apps of its streams that wait for the peer's window (a peer that never reads).
//! Both are reserved here, per connection, from one pool for the whole node
//! (`proxy.memoryBudget`): a connection gets its configured connection window for receiving and
//! the same amount as its send allowance, or, when the pool runs low, the largest halving that
//! fits, down to [`MIN_WINDOW`] (HTTP/2's default window), which is granted even when the pool
//! is spent so that no connection is refused for memory. The reservation lasts as long as the
//! connection.
//!
//! The send allowance is enforced by [`SendAllowance`]: every buffer a tunnel reads from its app
//! holds permits for its size until h2 has written the last byte of it (the permits travel with
//! the `Bytes`), so what waits for a stalled peer on one connection never exceeds its allowance,
//! whatever the number of streams. Waiting for allowance is the same backpressure HTTP/2's
//! connection window gives: it only holds up streams of the connection whose peer is not
//! reading. The receive side needs no enforcement here: h2 refuses a peer that sends beyond the
//! advertised window, and the proxy gives window back only for bytes delivered to the app.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::hbone::H2Settings;

/// The smallest window (and send allowance) a connection gets: HTTP/2's initial window, which a
/// peer may assume before our SETTINGS arrive anyway.
pub const MIN_WINDOW: u32 = 65_535;

/// The node-wide pool every HBONE connection reserves its buffers from. Shared by all workload
/// proxies of the agent.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    reserved: AtomicU64,
    /// Connections that got less than their configured window.
    reduced: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit,
            reserved: AtomicU64::new(0),
            reduced: AtomicUsize::new(0),
        })
    }

    /// A budget that never reduces a window (for components used without an agent, and tests).
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// The configured limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved by open connections now; above the limit only by connections at
    /// [`MIN_WINDOW`].
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// How many connections so far got a smaller window than configured.
    pub fn reduced_connections(&self) -> usize {
        self.reduced.load(Ordering::Relaxed)
    }

    /// Reserves a receive window and an equal send allowance for one connection that would like
    /// `wanted` bytes of each: all of it if the pool has it, else the largest halving that fits,
    /// at least [`MIN_WINDOW`].
    pub fn reserve(self: &Arc<Self>, wanted: u32) -> ConnectionMemory {
        let mut window = wanted.max(MIN_WINDOW);
        let mut reserved = self.reserved.load(Ordering::Relaxed);
        loop {
            let cost = 2 * u64::from(window);
            let fits = reserved.saturating_add(cost) <= self.limit;
            if !fits && window > MIN_WINDOW {
                window = (window / 2).max(MIN_WINDOW);
                continue;
            }
            match self.reserved.compare_exchange_weak(
                reserved,
                reserved + cost,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => {
                    // Someone else reserved or released meanwhile: start over from the wish.
                    reserved = now;
                    window = wanted.max(MIN_WINDOW);
                }
            }
        }
        if window < wanted {
            self.reduced.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                wanted,
                window,
                "node memory budget low; HBONE connection gets a smaller window"
            );
        }
        ConnectionMemory {
            budget: self.clone(),
            window,
            send: SendAllowance(Arc::new(Semaphore::new(window as usize))),
        }
    }
}

/// One connection's reservation: its receive window and its send allowance. Given back to the
/// budget when dropped (when the connection and all its tunnels are gone).
#[derive(Debug)]
pub struct ConnectionMemory {
    budget: Arc<MemoryBudget>,
    window: u32,
    send: SendAllowance,
}

impl ConnectionMemory {
    /// The connection's receive window (also its send allowance).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// `settings` with the windows this reservation allows: the connection window granted, and
    /// stream windows no larger than it.
    pub fn h2_settings(&self, settings: &H2Settings) -> H2Settings {
        H2Settings {
            connection_window: self.window,
            stream_window: settings.stream_window.min(self.window),
            ..settings.clone()
        }
    }

    /// The allowance the connection's tunnels read from their apps against.
    pub fn send_allowance(&self) -> SendAllowance {
        self.send.clone()
    }
}

impl Drop for ConnectionMemory {
    fn drop(&mut self) {
        self.budget
            .reserved
            .fetch_sub(2 * u64::from(self.window), Ordering::AcqRel);
    }
}

/// Bytes a connection's tunnels may hold, read from their apps and not yet written to the peer.
/// Cheap to clone; clones share the allowance.
#[derive(Debug, Clone)]
pub struct SendAllowance(Arc<Semaphore>);

impl SendAllowance {
    /// An allowance of `bytes`, for a tunnel outside any connection's reservation.
    pub fn new(bytes: u32) -> Self {
        SendAllowance(Arc::new(Semaphore::new(bytes as usize)))
    }

    /// Bytes of the allowance not held by any buffer now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// [`Self::poll_buffer`] as a future (the copy polls; tests await).
    #[cfg(test)]
    pub async fn buffer(&self, wanted: usize, floor: usize) -> AllowedBuffer {
        let mut wait = BufferWait::default();
        std::future::poll_fn(|cx| self.poll_buffer(cx, wanted, floor, &mut wait)).await
    }

    /// A buffer of up to `wanted` bytes' capacity whose allowance is held until the buffer (and
    /// every `Bytes` made from it by [`AllowedBuffer::seal`]) is dropped. Waits only when the
    /// allowance cannot give even `min(wanted, floor)` bytes: a stalled peer holds the rest.
    /// `wait` keeps the waiting state between polls (nothing unless the allowance is short, so
    /// an idle tunnel holds one null pointer).
    pub fn poll_buffer(
        &self,
        cx: &mut Context<'_>,
        wanted: usize,
        floor: usize,
        wait: &mut BufferWait,
    ) -> Poll<AllowedBuffer> {
        let waiting = match &mut wait.0 {
            Some(waiting) => waiting,
            None => {
                let wanted = wanted.max(1);
                let available = self.0.available_permits();
                let take = if available >= wanted {
                    wanted
                } else {
                    available.max(floor.min(wanted))
                };
                match self.0.clone().try_acquire_many_owned(as_permits(take)) {
                    Ok(permit) => return Poll::Ready(AllowedBuffer::charged(take, Some(permit))),
                    // Never closed; should it be, an uncharged buffer is the safe fallback.
                    Err(TryAcquireError::Closed) => {
                        return Poll::Ready(AllowedBuffer::charged(take, None))
                    }
                    Err(TryAcquireError::NoPermits) => {}
                }
                let semaphore = self.0.clone();
                wait.0.insert(Box::pin(async move {
                    let permit = semaphore.acquire_many_owned(as_permits(take)).await.ok();
                    AllowedBuffer::charged(take, permit)
                }))
            }
        };
        let buffer = ready!(waiting.as_mut().poll(cx));
        wait.0 = None;
        Poll::Ready(buffer)
    }
}

/// A [`SendAllowance::poll_buffer`] that is waiting for the allowance; empty otherwise.
#[derive(Default)]
pub struct BufferWait(Option<Pin<Box<dyn Future<Output = AllowedBuffer> + Send>>>);

impl std::fmt::Debug for BufferWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BufferWait(waiting)"
        } else {
            "BufferWait(idle)"
        })
    }
}

fn as_permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A read buffer charged to a [`SendAllowance`].
#[derive(Debug)]
pub struct AllowedBuffer {
    /// The buffer; read into it up to its capacity.
    pub data: BytesMut,
    permit: Option<OwnedSemaphorePermit>,
}

impl AllowedBuffer {
    fn charged(capacity: usize, permit: Option<OwnedSemaphorePermit>) -> Self {
        AllowedBuffer {
            data: BytesMut::with_capacity(capacity),
            permit,
        }
    }

    /// The filled part as `Bytes` that keep the allowance until their last clone is dropped.
    /// The allowance is charged for the memory held, so a short read is moved into a buffer of
    /// its own size first (an app writing a byte at a time must not pin a whole buffer per
    /// byte), and the permits beyond that go back at once.
    pub fn seal(mut self) -> Bytes {
        if self.data.len() * 4 <= self.data.capacity() {
            self.data = BytesMut::from(&self.data[..]);
        }
        let held = self.data.capacity();
        if let Some(permit) = self.permit.as_mut() {
            let surplus = permit.num_permits().saturating_sub(held);
            if surplus > 0 {
                drop(permit.split(surplus));
            }
        }
        Bytes::from_owner(Sealed {
            data: self.data,
            _permit: self.permit,
        })
    }
}

struct Sealed {
    data: BytesMut,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Sealed {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_under_pressure_and_come_back() {
        let budget = MemoryBudget::new(10 * 1024 * 1024);
        let first = budget.reserve(4 * 1024 * 1024);
        assert_eq!(first.window(), 4 * 1024 * 1024, "8 MiB of 10 fit");
        let second = budget.reserve(4 * 1024 * 1024);
        assert_eq!(
            second.window(),
            1024 * 1024,
            "2 MiB left: the largest halving that fits"
        );
        let third = budget.reserve(4 * 1024 * 1024);
        assert_eq!(
            third.window(),
            MIN_WINDOW,
            "spent: the floor is still granted"
        );
        assert_eq!(budget.reduced_connections(), 2);
        assert!(budget.reserved() > budget.limit(), "only by the floor");
        drop((first, second, third));
        assert_eq!(budget.reserved(), 0);
        assert_eq!(budget.reserve(4 * 1024 * 1024).window(), 4 * 1024 * 1024);
    }

    #[test]
    fn stream_windows_never_exceed_the_granted_connection_window() {
        let budget = MemoryBudget::new(4 * u64::from(MIN_WINDOW));
        let memory = budget.reserve(16 * 1024 * 1024);
        let settings =
            crate::hbone::H2Settings::from(&crate::config::agent::ProxyConfig::default());
        let granted = memory.h2_settings(&settings);
        assert_eq!(granted.connection_window, memory.window());
        assert!(granted.stream_window <= granted.connection_window);
        assert_eq!(granted.frame_size, settings.frame_size);
    }

    #[tokio::test]
    async fn sent_bytes_hold_the_allowance_until_the_last_clone_is_dropped() {
        let allowance = SendAllowance::new(100);
        let mut buffer = allowance.buffer(60, 10).await;
        buffer.data.extend_from_slice(&[7; 50]);
        let bytes = buffer.seal();
        assert_eq!(
            allowance.0.available_permits(),
            40,
            "the whole buffer is held"
        );
        let mut rest = bytes.clone();
        let head = rest.split_to(5);
        drop(bytes);
        drop(head);
        assert_eq!(
            allowance.0.available_permits(),
            40,
            "a clone still holds it"
        );
        drop(rest);
        assert_eq!(allowance.0.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_short_read_is_charged_for_its_own_size() {
        let allowance = SendAllowance::new(100);
        let mut buffer = allowance.buffer(60, 10).await;
        buffer.data.extend_from_slice(&[7; 10]);
        let bytes = buffer.seal();
        assert_eq!(&bytes[..], &[7; 10]);
        assert_eq!(allowance.0.available_permits(), 90);
        drop(bytes);
        assert_eq!(allowance.0.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_spent_allowance_gives_what_is_left_then_waits() {
        let allowance = SendAllowance::new(100);
        let mut held = allowance.buffer(90, 10).await;
        held.data.extend_from_slice(&[1; 90]);
        let held = held.seal();
        let small = allowance.buffer(64, 8).await;
        assert_eq!(
            small.data.capacity(),
            10,
            "what is left, more than the floor"
        );
        let waiting = allowance.buffer(64, 16);
        tokio::pin!(waiting);
        let ready_now = tokio::select! {
            biased;
            _ = waiting.as_mut() => true,
            () = std::future::ready(()) => false,
        };
        assert!(!ready_now, "less than the floor left: wait");
        drop((held, small));
        let buffer = waiting.await;
        assert!(buffer.data.capacity() >= 16);
    }
}
