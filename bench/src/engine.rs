//! `engine-cost`: wharf's delivery engine in process, on a backlog held in
//! memory, so that what the host spends per message around the Wasm call —
//! the consumer loop, a task and two permits per message, building the
//! message, settling it, metrics — can be measured (and counted under
//! callgrind) without a broker client or another process in the figure.
//!
//! The source hands out ready-made deliveries as fast as the loop asks; each
//! delivery's acker counts the ack. Anything but an ack (a retry, a dead
//! letter, a publish) fails the run: the benchmark handler only parses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};
use wharf::broker::{Acker, Delivery, OutboundMessage, Sink, Source};
use wharf::delivery::{Binding, Lane, RetryPolicy, Shutdown, run_binding};
use wharf::runtime::{LoadedComponent, Runtime, RuntimeConfig};

use crate::{bench_context, cpu_seconds};

/// What a run counts.
struct Tally {
    messages: usize,
    acked: AtomicUsize,
    /// Settled any other way than an ack.
    other: AtomicUsize,
    done: Notify,
}

impl Tally {
    fn settled(&self, acked: bool) {
        let counter = if acked { &self.acked } else { &self.other };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.count() >= self.messages {
            self.done.notify_one();
        }
    }

    /// Messages settled so far, any way.
    fn count(&self) -> usize {
        self.acked.load(Ordering::Relaxed) + self.other.load(Ordering::Relaxed)
    }
}

struct CountingAcker(Arc<Tally>);

#[async_trait]
impl Acker for CountingAcker {
    async fn ack(&self) -> Result<()> {
        self.0.settled(true);
        Ok(())
    }
    async fn retry(&self, _delay: Duration) -> Result<()> {
        self.0.settled(false);
        Ok(())
    }
    async fn dead_letter(&self, _queue: &str, _headers: Vec<(String, String)>) -> Result<()> {
        self.0.settled(false);
        Ok(())
    }
    async fn release(&self) -> Result<()> {
        self.0.settled(false);
        Ok(())
    }
    async fn defer(&self, _delay: Duration) -> Result<()> {
        self.0.settled(false);
        Ok(())
    }
}

/// A backlog of `tally.messages` deliveries, made as they are asked for.
struct Backlog {
    next: AtomicUsize,
    payload: Bytes,
    tally: Arc<Tally>,
}

#[async_trait]
impl Source for Backlog {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        // Only the binding's one consumer loop calls this, so a load and a
        // store need no compare-and-swap.
        let total = self.tally.messages;
        let start = self.next.load(Ordering::Relaxed).min(total);
        let end = (start + max).min(total);
        self.next.store(end, Ordering::Relaxed);
        if start == end {
            // Drained: wait as a broker with nothing would, briefly.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok((start..end)
            .map(|i| Delivery {
                id: format!("m{i}"),
                subject: "bench".into(),
                payload: self.payload.clone(),
                headers: vec![],
                content_type: Some("application/json".into()),
                reply_to: None,
                attempt: 1,
                redelivered: false,
                first_seen_ms: 0,
                acker: Box::new(CountingAcker(self.tally.clone())),
            })
            .collect())
    }
}

struct NoSink;

#[async_trait]
impl Sink for NoSink {
    async fn publish(&self, _messages: Vec<OutboundMessage>) -> Result<()> {
        bail!("the benchmark handler publishes nothing here")
    }
}

/// Run `messages` deliveries through the engine; msg/s and CPU µs/message.
async fn drain(
    runtime: &Arc<Runtime>,
    component: &Arc<LoadedComponent>,
    context: &Arc<wharf::runtime::HandlerContext>,
    messages: usize,
    payload: &Bytes,
    concurrency: usize,
) -> Result<(f64, f64)> {
    let tally = Arc::new(Tally {
        messages,
        acked: AtomicUsize::new(0),
        other: AtomicUsize::new(0),
        done: Notify::new(),
    });
    let binding = Arc::new(Binding {
        name: "bench".into(),
        component: ArcSwap::new(component.clone()),
        context: context.clone(),
        lanes: vec![Lane {
            shard: 0,
            source: Arc::new(Backlog {
                next: AtomicUsize::new(0),
                payload: payload.clone(),
                tally: tally.clone(),
            }),
            sink: Arc::new(NoSink),
            dedup: None,
            concurrency,
        }],
        dead_letter_queue: "bench.dead".into(),
        tenant_permits: Arc::new(Semaphore::new(concurrency)),
        retry: RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            multiplier: 2.0,
        },
        rate_limit: None,
        metrics: OnceLock::new(),
    });
    let shutdown = Shutdown::default();
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let consumer = tokio::spawn(run_binding(binding, 0, runtime.clone(), shutdown.clone()));
    let done = tally.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    // A message the engine never settles must fail the run, not hang it.
    let limit = Duration::from_secs(60) + Duration::from_millis(messages as u64);
    if tally.count() < messages && tokio::time::timeout(limit, done).await.is_err() {
        bail!(
            "only {} of {messages} messages were settled within {limit:?}",
            tally.count()
        );
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    shutdown.stop.cancel();
    consumer.await.context("the consumer loop panicked")?;
    let other = tally.other.load(Ordering::Relaxed);
    if other > 0 {
        bail!("{other} of {messages} messages were not acked (see the log)");
    }
    Ok((messages as f64 / wall, cpu * 1e6 / messages as f64))
}

/// `wharf-bench engine-cost`: a warm-up of 1 000 messages (fewer if asked
/// for fewer), then the measured run: (msg/s, CPU µs per message).
pub async fn engine_cost(
    component: &std::path::Path,
    messages: usize,
    payload_bytes: usize,
    concurrency: usize,
    reuse: u32,
) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        // Each slot reserves 8 GiB of address space: keep concurrency small
        // under valgrind (scripts/bench-instructions runs 4).
        max_instances: u32::try_from(concurrency)?.saturating_add(1),
        max_memory_bytes: 64 << 20,
        cache_dir: dir.path().join("cache"),
        cpu_budget: true,
    })?);
    let loaded = Arc::new(
        runtime
            .load(component)
            .with_context(|| format!("loading {}", component.display()))?,
    );
    let context = bench_context(&dir.path().join("db"), reuse)?;
    let payload = Bytes::from(crate::paths::payload(payload_bytes));
    drain(&runtime, &loaded, &context, messages.min(1000), &payload, concurrency).await?;
    let (rate, cpu_us) = drain(&runtime, &loaded, &context, messages, &payload, concurrency).await?;
    println!(
        "engine-cost payload={}B messages={messages} concurrency={concurrency} reuse={reuse}: {rate:.0} msg/s, CPU {cpu_us:.1} µs/msg",
        payload.len()
    );
    Ok((rate, cpu_us))
}
