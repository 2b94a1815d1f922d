//! Shards: single-threaded runtimes that each run a share of every handler.
//!
//! With `[host] shards = N` the host starts N threads, each driving its own
//! current-thread tokio runtime. Each shard gets its own broker connections
//! ([`crate::app`] makes them on the shard, so their driver tasks run there;
//! not RabbitMQ's, [`crate::broker::Broker::connection_per_shard`]) and a
//! share of every handler's concurrency ([`split`]), for the sources every
//! shard reads ([`crate::broker::Broker::read_on_every_shard`]). A message
//! is then received, handled and acked on one thread: no hand-offs between
//! threads, no wake-ups across cores, and no lock or cache line bouncing
//! between two workers over one connection. docs/BENCHMARKS.md measures
//! what that buys.
//!
//! What stays shared: the Wasm engine and its instance pool, the store, the
//! handler's component (so a reload swaps it for every shard at once), its
//! rate limit, and its tenant's budget. The HTTP server, reloads and sweeps
//! stay on the main runtime.
//!
//! Without `shards` there is one shard: the main runtime itself, and
//! everything runs as it did before shards existed.

use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The runtimes the consumers run on, and the threads that drive them.
pub struct Shards {
    handles: Vec<Handle>,
    /// Dedicated threads (none when the main runtime is the one shard):
    /// each runs until its stop sender is dropped ([`Shards::stop`]).
    threads: std::sync::Mutex<Vec<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Shards {
    /// `count` dedicated shards, or (`None`) the current runtime as the one
    /// shard.
    pub fn start(count: Option<u32>) -> Result<Self> {
        let Some(count) = count else {
            return Ok(Self {
                handles: vec![Handle::current()],
                threads: Default::default(),
            });
        };
        let (mut handles, mut threads) = (Vec::new(), Vec::new());
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| format!("starting shard {i}"))?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("wharf-shard-{i}"))
                .spawn(move || {
                    // Runs the shard's tasks until the host lets it go; what
                    // is left then (idle broker drivers) drops with it.
                    let _ = runtime.block_on(stopped);
                })
                .with_context(|| format!("starting the thread of shard {i}"))?;
            threads.push((stop, thread));
        }
        Ok(Self {
            handles,
            threads: std::sync::Mutex::new(threads),
        })
    }

    /// How many shards there are (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The runtime of shard `i`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }

    /// Let the dedicated threads end and wait for them. Call once nothing
    /// runs on them any more (the consumers and the brokers' flush are done).
    pub async fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let threads: Vec<_> = threads
            .into_iter()
            .map(|(stop, thread)| {
                drop(stop);
                thread
            })
            .collect();
        // Joining blocks; not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Shard `shard`'s share of `concurrency` over `shards` shards: as even as
/// can be, the first shards taking one more when it does not divide. A
/// share may be 0 (fewer slots than shards): that shard does not consume
/// for the handler at all.
pub fn split(concurrency: usize, shards: usize, shard: usize) -> usize {
    concurrency / shards + usize::from(shard < concurrency % shards)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_adds_up_and_differs_by_at_most_one() {
        for concurrency in 0..40 {
            for shards in 1..9 {
                let shares: Vec<usize> = (0..shards).map(|s| split(concurrency, shards, s)).collect();
                assert_eq!(shares.iter().sum::<usize>(), concurrency, "{concurrency} over {shards}");
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(hi - lo <= 1, "{concurrency} over {shards}: {shares:?}");
            }
        }
        assert_eq!(split(1, 2, 0), 1);
        assert_eq!(split(1, 2, 1), 0);
    }
}
