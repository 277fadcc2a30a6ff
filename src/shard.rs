//! Data-plane shards (layer L0): connections live on one thread from accept to close.
//!
//! With tokio's multi-threaded runtime a tunnel's task and the task of the HTTP/2 connection
//! it rides on run wherever a worker is free: every chunk handed between them can wake a parked
//! worker on another core (a `futex` call and a cold cache for the bytes just read), and an
//! HBONE round trip crosses threads several times. A shard is one thread with a single-threaded
//! runtime. Accept loops hand each connection to a shard; everything the connection spawns
//! (the stream tasks of an inbound HTTP/2 connection, the HTTP/2 connection an outbound tunnel
//! opens) is spawned on that shard, and the pool keeps each shard's HBONE connections apart
//! ([`current`] is part of the pool key), so a tunnel and its connection share a thread and
//! a cache. Parallelism comes from having several shards, as ztunnel gets it from its workers.
//!
//! [`Shards::inline`] spawns on the caller's runtime instead (tests, embedders).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

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
    next: AtomicUsize,
    /// Dropping this stops every shard's thread (their runtimes end with it).
    _stop: Option<tokio::sync::watch::Sender<()>>,
}

impl Shards {
    /// No threads of its own: connections are spawned on the caller's runtime.
    pub fn inline() -> Arc<Self> {
        Arc::new(Shards {
            handles: Vec::new(),
            next: AtomicUsize::new(0),
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
            handles,
            next: AtomicUsize::new(0),
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

    /// The runtime the next connection goes to (round robin), or `None` when inline.
    pub fn pick(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles.get(index)
    }

    /// Spawns `task` on the next shard (or on the caller's runtime when inline).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.pick() {
            Some(shard) => shard.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_round_robin_and_know_their_shard() {
        let shards = Shards::start(2).expect("start shards");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (index, name) = shards
                .spawn(async {
                    // A task spawned from a shard stays on it.
                    let nested = tokio::spawn(async { current() }).await.expect("nested");
                    assert_eq!(nested, current());
                    (current(), std::thread::current().name().map(str::to_string))
                })
                .await
                .expect("shard task");
            assert_eq!(name, Some(format!("nodetunnel-shard-{index}")));
            seen.push(index);
        }
        assert_eq!(seen, vec![0, 1, 0, 1]);
    }

    #[tokio::test]
    async fn inline_shards_spawn_on_the_callers_runtime() {
        let shards = Shards::inline();
        assert!(shards.is_empty());
        let here = std::thread::current().id();
        let there = shards
            .spawn(async { std::thread::current().id() })
            .await
            .expect("inline task");
        // A current-thread test runtime: the task ran on this very thread.
        assert_eq!(here, there);
        assert_eq!(current(), 0);
    }
}
