//! The allocator's per-thread caches, given back once a thread has gone quiet.
//!
//! jemalloc (the agent's global allocator, `main.rs`) keeps freed objects in a cache per thread
//! for that thread's next allocations: the cheap path every connection's tasks, buffers and
//! records take. A burst of connections leaves each data-plane thread's cache full of objects
//! it freed, and each cached object keeps the slab (page run) it sits in from being given
//! back: about 2 MB per agent after 2 000 connections closed (`scripts/bench`, RSS after they
//! close), which the allocator's own purging (background thread, `dirty_decay_ms`) cannot
//! reach. Turning the caches off (`tcache:false`) gave that back but cost 5-12 % more CPU per
//! Gbit on 16 streams (`scripts/bench-ab`). So each thread that runs connections keeps its
//! cache while it works and hands it back (`thread.idle`) on the first quiet second after
//! real work; a busy thread never pays for it.

use std::time::Duration;

/// How often a thread's allocation counter is looked at.
const PERIOD: Duration = Duration::from_secs(1);

/// Less than this allocated in a period is a quiet thread (timers and housekeeping allocate a
/// little all the time).
const QUIET_BYTES: u64 = 64 * 1024;

/// Decides, from a thread's running count of bytes allocated sampled once a period, when its
/// cache is worth giving back: at the first quiet period after at least one busy one.
#[derive(Debug, Default)]
struct QuietWatch {
    last: Option<u64>,
    worked_since_release: bool,
}

impl QuietWatch {
    /// Takes the count sampled now; true when the cache should be given back now.
    fn sample(&mut self, allocated: u64) -> bool {
        let Some(last) = self.last.replace(allocated) else {
            return false;
        };
        if allocated.wrapping_sub(last) >= QUIET_BYTES {
            self.worked_since_release = true;
            return false;
        }
        std::mem::take(&mut self.worked_since_release)
    }
}

/// Runs on the thread whose cache it watches, forever: spawn it on a current-thread runtime
/// (a data-plane shard), or on a runtime with one worker. Waits forever without acting if
/// jemalloc's counter cannot be read.
pub async fn release_cache_when_quiet() -> std::convert::Infallible {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = QuietWatch::default();
    loop {
        ticks.tick().await;
        let Some(allocated) = thread_allocated() else {
            return std::future::pending().await;
        };
        if watch.sample(allocated) {
            release_thread_cache();
        }
    }
}

/// Bytes the calling thread has allocated through jemalloc so far.
fn thread_allocated() -> Option<u64> {
    tikv_jemalloc_ctl::thread::allocatedp::read()
        .ok()
        .map(|counter| counter.get())
}

/// Hands the calling thread's cached objects back to jemalloc's arenas, where emptied slabs can
/// be purged (`thread.idle`: flushes the thread's cache and lets jemalloc tidy what it holds
/// for an idle thread).
#[allow(unsafe_code)]
fn release_thread_cache() -> bool {
    // SAFETY: `thread.idle` is a void mallctl: it reads and writes nothing of ours (all four
    // pointers null, as jemalloc requires for it), and only acts on the calling thread's own
    // cache. The name is NUL-terminated.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.idle".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc thread.idle failed");
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn a_cache_goes_back_at_the_first_quiet_period_after_work_and_only_then() {
        let mut watch = QuietWatch::default();
        assert!(
            !watch.sample(1_000),
            "the first sample only sets the baseline"
        );
        assert!(
            !watch.sample(1_000 + 100),
            "quiet, but no work to give back"
        );
        assert!(!watch.sample(5_000_000), "busy: keep the cache");
        assert!(!watch.sample(10_000_000), "still busy");
        assert!(watch.sample(10_000_100), "first quiet period after work");
        assert!(!watch.sample(10_000_200), "already given back");
        assert!(!watch.sample(10_000_200 + QUIET_BYTES), "busy again");
        assert!(
            watch.sample(10_000_200 + QUIET_BYTES + 1),
            "and back once quiet"
        );
    }

    /// Through jemalloc itself (the unit tests run on the system allocator): this thread's
    /// counter moves with what it allocates, and jemalloc knows `thread.idle` (this build has
    /// no statistics to show the cache emptied: `scripts/bench`'s RSS after connections close
    /// does).
    #[test]
    fn the_counter_moves_and_jemalloc_takes_the_cache_back() {
        let jemalloc = tikv_jemallocator::Jemalloc;
        let layout = Layout::from_size_align(512, 8).expect("layout");
        let before = thread_allocated().expect("jemalloc counter");
        // SAFETY (test): each pointer is allocated with `layout` and freed once with it.
        #[allow(unsafe_code)]
        unsafe {
            let objects: Vec<*mut u8> = (0..512).map(|_| jemalloc.alloc(layout)).collect();
            assert!(objects.iter().all(|object| !object.is_null()));
            for object in objects {
                jemalloc.dealloc(object, layout);
            }
        }
        let after = thread_allocated().expect("counter");
        assert!(after >= before + 512 * 512, "{before} -> {after}");
        assert!(release_thread_cache(), "thread.idle refused");
    }
}
