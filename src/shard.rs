//! Data-plane shards (layer L0): connections live on one thread from accept to close.
//!
//! With tokio's multi-threaded runtime a tunnel's task and the task of the HTTP/2 connection
//! it rides on run wherever a worker is free: every chunk handed between them can wake a parked
//! worker on another core (a `futex` call and a cold cache for the bytes just read), and an
//! HBONE round trip crosses threads several times. A shard is one thread with a single-threaded
//! runtime. Each shard accepts on its own copy of a pod's listeners and keeps what it accepts
//! unless another shard is less loaded ([`Shards::place`]); everything the connection spawns
//! (the stream tasks of an inbound HTTP/2 connection, the HTTP/2 connection an outbound tunnel
//! opens) is spawned on that shard, and the pool keeps each shard's HBONE connections apart
//! ([`current`] is part of the pool key), so a tunnel and its connection share a thread and
//! a cache. Parallelism comes from having several shards, as ztunnel gets it from its workers.
//!
//! [`Shards::inline`] spawns on the caller's runtime instead (tests, embedders).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;

thread_local! {
    /// The index of the shard whose thread this is.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard of the calling thread (`0` outside any shard).
pub fn current() -> usize {
    CURRENT.with(Cell::get).unwrap_or(0)
}

/// The data plane's threads.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    /// Connections each shard runs now, for [`Shards::place`].
    loads: Vec<Load>,
    /// Dropping this stops every shard's thread (their runtimes end with it).
    _stop: Option<tokio::sync::watch::Sender<()>>,
}

impl Shards {
    /// No threads of its own: connections are spawned on the caller's runtime.
    pub fn inline() -> Arc<Self> {
        Arc::new(Shards {
            handles: Vec::new(),
            loads: Vec::new(),
            _stop: None,
        })
    }

    /// Starts `count` shard threads (at least one), named `nodetunnel-shard-N`.
    pub fn start(count: usize) -> std::io::Result<Arc<Self>> {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("nodetunnel-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(Some(index)));
                    // Runs the shard's tasks until the `Shards` is dropped (the sender closes),
                    // and gives the thread's allocator cache back whenever it goes quiet.
                    runtime.block_on(async move {
                        tokio::select! {
                            () = async { while stopped.changed().await.is_ok() {} } => {}
                            never = crate::allocator::release_cache_when_quiet() => match never {},
                        }
                    });
                    // The agent is exiting: tasks still on this shard are cut, not awaited.
                    runtime.shutdown_background();
                })?;
        }
        Ok(Arc::new(Shards {
            loads: handles.iter().map(|_| Load::default()).collect(),
            handles,
            _stop: Some(stop),
        }))
    }

    /// The shards' runtimes, in shard order (for their metrics).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Whether connections run on the caller's runtime ([`Shards::inline`]).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Where a connection just accepted on the calling shard runs, counted there until the
    /// returned [`ShardLoad`] is dropped; `None` when the shards are inline.
    ///
    /// Each shard accepts on its own copy of a listener and the kernel picks the copy by a hash
    /// of the addresses: fine for many connections, uneven for a few (two HBONE connections
    /// land on one shard half the time, and then one core carries both). So a connection
    /// stays where it was accepted unless that shard runs more than `slack` connections more
    /// than the least loaded one, which then takes it (the caller moves the socket there).
    pub fn place(self: &Arc<Self>, slack: usize) -> Option<ShardLoad> {
        let load = |index: usize| self.loads[index].0.load(Ordering::Relaxed);
        let (least, least_load) = (0..self.loads.len())
            .map(|index| (index, load(index)))
            .min_by_key(|&(_, load)| load)?;
        let index = match CURRENT.with(Cell::get) {
            Some(here) if here < self.loads.len() && load(here) <= least_load + slack => here,
            _ => least,
        };
        self.loads[index].0.fetch_add(1, Ordering::Relaxed);
        Some(ShardLoad {
            shards: self.clone(),
            index,
        })
    }
}

/// One shard's connection count, alone on its cache line: each shard updates its own on every
/// connection, and placement reads them all.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Load(AtomicUsize);

/// A connection counted on its shard (see [`Shards::place`]); dropping it ends the count.
#[derive(Debug)]
pub struct ShardLoad {
    shards: Arc<Shards>,
    index: usize,
}

impl ShardLoad {
    /// The shard the connection runs on.
    pub fn index(&self) -> usize {
        self.index
    }

    /// That shard's runtime.
    pub fn handle(&self) -> &Handle {
        &self.shards.handles[self.index]
    }
}

impl Drop for ShardLoad {
    fn drop(&mut self) {
        self.shards.loads[self.index]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_know_their_shard_and_what_they_spawn_stays_on_it() {
        let shards = Shards::start(2).expect("start shards");
        for (index, shard) in shards.handles().iter().enumerate() {
            let (seen, name) = shard
                .spawn(async {
                    let nested = tokio::spawn(async { current() }).await.expect("nested");
                    assert_eq!(nested, current());
                    (current(), std::thread::current().name().map(str::to_string))
                })
                .await
                .expect("shard task");
            assert_eq!(seen, index);
            assert_eq!(name, Some(format!("nodetunnel-shard-{index}")));
        }
        assert!(Shards::inline().is_empty());
        assert_eq!(current(), 0, "outside any shard");
    }

    #[tokio::test]
    async fn connections_stay_on_the_accepting_shard_until_it_is_busier_by_more_than_slack() {
        assert!(
            Shards::inline().place(0).is_none(),
            "inline: nothing to place"
        );
        let shards = Shards::start(2).expect("start shards");
        let inner = shards.clone();
        let [exact, with_slack] = shards.handles()[0]
            .spawn(async move {
                let mut placed = [Vec::new(), Vec::new()];
                for (slack, indices) in placed.iter_mut().enumerate() {
                    let held: Vec<_> = (0..5)
                        .map(|_| inner.place(slack).expect("sharded"))
                        .collect();
                    indices.extend(held.iter().map(ShardLoad::index));
                }
                placed
            })
            .await
            .expect("shard task");
        assert_eq!(exact, vec![0, 1, 0, 1, 0]);
        assert_eq!(with_slack, vec![0, 0, 1, 0, 1]);
        let loads: Vec<usize> = shards
            .loads
            .iter()
            .map(|load| load.0.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, vec![0, 0], "every count ends with its connection");
    }
}
