//! The allocator's per-thread caches, given back once a thread has gone quiet.
//!
//! jemalloc (the agent's global allocator, `main.rs`) keeps freed objects in a cache per thread
//! for that thread's next allocations: the cheap path every connection's tasks, buffers and
//! records take. A burst of connections leaves each data-plane thread's cache full of objects
//! it freed, and each cached object keeps the slab (page run) it sits in from being given
//! back: 1-2 MB per agent after 2 000 connections closed (`scripts/bench`, RSS after they
//! close), which the allocator's own purging (background thread, `dirty_decay_ms`) cannot
//! reach. Turning the caches off (`tcache:false`) gave that back but cost 5-12 % more CPU per
//! Gbit on 16 streams (`scripts/bench-ab`). So each thread that runs connections keeps its
//! cache while it works and hands it back (`thread.idle`) on the first quiet second after
//! real work; a busy thread never pays for it. Work is bytes allocated *or freed*: a shard
//! that frees what another allocated (a connection moved to it, see `shard::Shards::place`)
//! fills its cache without allocating, and closing thousands of connections is mostly frees.

use std::time::Duration;

/// How often a thread's allocation counter is looked at.
const PERIOD: Duration = Duration::from_secs(1);

/// Less than this allocated and freed in a period is a quiet thread (timers and housekeeping
/// allocate a little all the time).
const QUIET_BYTES: u64 = 64 * 1024;

/// Decides, from a thread's running count of bytes allocated and freed, sampled once a period,
/// when its cache is worth giving back: at the first quiet period after at least one busy one.
#[derive(Debug, Default)]
struct QuietWatch {
    last: Option<u64>,
    worked_since_release: bool,
}

impl QuietWatch {
    /// Takes the count sampled now; true when the cache should be given back now.
    fn sample(&mut self, activity: u64) -> bool {
        let Some(last) = self.last.replace(activity) else {
            return false;
        };
        if activity.wrapping_sub(last) >= QUIET_BYTES {
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
        let Some(activity) = thread_activity() else {
            return std::future::pending().await;
        };
        if watch.sample(activity) {
            crate::sys::release_thread_allocator_cache();
        }
    }
}

/// Bytes the calling thread has allocated through jemalloc so far.
pub(crate) fn thread_allocated() -> Option<u64> {
    tikv_jemalloc_ctl::thread::allocatedp::read()
        .ok()
        .map(|counter| counter.get())
}

/// Bytes the calling thread has allocated plus bytes it has freed, so far.
fn thread_activity() -> Option<u64> {
    let freed = tikv_jemalloc_ctl::thread::deallocatedp::read().ok()?.get();
    Some(thread_allocated()?.wrapping_add(freed))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A thread that only frees (what another thread allocated) counts as working: its cache
    /// fills all the same.
    #[test]
    fn freeing_what_another_thread_allocated_is_activity() {
        use std::alloc::{GlobalAlloc, Layout};
        let layout = Layout::from_size_align(4096, 8).expect("layout");
        // SAFETY (test): allocated with `layout` on the other thread, freed once here with it.
        #[allow(unsafe_code)]
        let objects: Vec<usize> = std::thread::spawn(move || {
            (0..64)
                .map(|_| unsafe { tikv_jemallocator::Jemalloc.alloc(layout) } as usize)
                .collect()
        })
        .join()
        .expect("allocating thread");
        assert!(objects.iter().all(|&object| object != 0));
        let before = thread_activity().expect("jemalloc counters");
        let allocated_before = thread_allocated().expect("jemalloc counter");
        for object in objects {
            #[allow(unsafe_code)]
            unsafe {
                tikv_jemallocator::Jemalloc.dealloc(object as *mut u8, layout)
            };
        }
        let after = thread_activity().expect("jemalloc counters");
        assert_eq!(
            thread_allocated(),
            Some(allocated_before),
            "nothing allocated here"
        );
        assert!(after - before >= 64 * 4096, "{before} -> {after}");
        assert!(after - before >= QUIET_BYTES, "enough to count as work");
    }
}
