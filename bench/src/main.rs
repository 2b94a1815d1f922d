//! wharf-bench: the measurements behind docs/BENCHMARKS.md.
//!
//! `scripts/bench` builds everything it needs (the trivial handler, the
//! `wharf` binary, the Node.js peers) and runs `suite`.
//!
//! - `wasm-cost`: instantiate from `InstancePre` + `handle` + drop, in a loop,
//!   with a 1 KiB JSON payload; p50/p99/mean per message, epoch interruption
//!   on or off.
//! - `engine-cost`: the delivery engine in process on a backlog held in
//!   memory (no broker): the host's own per-message cost around the call.
//! - `source-cost`: wharf's JetStream source in process, without the engine
//!   or the Wasm call, against the native consumer: the broker side's cost.
//! - `drain`: preload a backlog on one broker path, start one consumer
//!   process (wharf, the native Rust consumer or the Node.js peer), time the
//!   drain from its first message to its last; msg/s, the consumer's CPU
//!   µs per message and its peak resident memory from /proc.
//! - `latency`: an open-loop producer at a fixed rate through a forwarding
//!   consumer; end-to-end p50/p99.
//! - `latency-table`: the suite's latency part on its own: native and wharf
//!   (default and `instance_reuse`, each also on `shards = 2`) in
//!   alternating rounds, at 5 000 msg/s and at half the native pipeline's
//!   maximum.
//! - `suite`: all of it, one table.

/// The allocator the `wharf` binary uses, so that the in-process Wasm cost
/// and the native consumers are measured on the same footing.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod engine;
mod latency;
mod measure;
mod paths;
mod source;
mod suite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use wharf::kv::{Kv, KvQuota};
use wharf::runtime::{AttemptLimits, HandlerContext, Message, Runtime, RuntimeConfig};
use wharf::subject::Grants;

use crate::paths::{Path, Target, Urls};

#[derive(Parser)]
struct Cli {
    /// The benchmark handler component.
    #[arg(long, default_value = "target/guests/wasm32-wasip2/guest/bench_handler.wasm")]
    component: PathBuf,
    /// The same handler built without std (a lean handler): the suite's
    /// Wasm-cost table measures it too.
    #[arg(long, default_value = "target/guests-lean/wasm32-wasip2/guest/bench_handler.wasm")]
    lean_component: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Who consumes in a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consumer {
    /// The `wharf` binary with the benchmark handler.
    Wharf,
    /// A Rust consumer on the same crates, no Wasm.
    Native,
    /// What users would pick instead (Node.js: BullMQ, amqplib, nats.js).
    Peer,
}

#[derive(clap::Args, Clone, Debug)]
pub struct DrainArgs {
    #[arg(long, value_enum)]
    path: Path,
    #[arg(long, value_enum, default_value = "wharf")]
    consumer: Consumer,
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Messages in flight (wharf's concurrency, the native batch/prefetch,
    /// the peers' concurrency/prefetch).
    #[arg(long, default_value_t = 100)]
    concurrency: u32,
    /// wharf only: turn dedup on.
    #[arg(long)]
    dedup: bool,
    /// wharf only: the handler's `instance_reuse` (1: an instance per message).
    #[arg(long, default_value_t = 1)]
    instance_reuse: u32,
    /// wharf only: the host's `worker_threads` (unset: one per CPU).
    #[arg(long)]
    worker_threads: Option<u32>,
    /// wharf only: the host's `shards` (unset: none).
    #[arg(long)]
    shards: Option<u32>,
}

impl DrainArgs {
    /// The `[host]` lines of wharf's manifest these arguments set.
    fn host_settings(&self) -> String {
        let mut lines = String::new();
        if let Some(n) = self.worker_threads {
            lines.push_str(&format!("worker_threads = {n}\n"));
        }
        if let Some(n) = self.shards {
            lines.push_str(&format!("shards = {n}\n"));
        }
        lines
    }
}

#[derive(Subcommand)]
enum Command {
    /// Per-message Wasm cost: instantiate + handle + drop.
    WasmCost {
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
        /// Turn epoch interruption (the CPU budget) off, to measure its cost.
        #[arg(long)]
        no_epoch: bool,
        /// Messages per instance (the handler's `instance_reuse`).
        #[arg(long, default_value_t = 1)]
        reuse: u32,
    },
    /// wharf's delivery engine in process on a backlog held in memory: the
    /// host's per-message cost around the Wasm call, without a broker.
    EngineCost {
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// The handler's `instance_reuse` (1: an instance per message).
        #[arg(long, default_value_t = 1)]
        reuse: u32,
    },
    /// JetStream's consumer side in process, without the engine or the
    /// Wasm call: wharf's source (parse, ack) against the native consumer.
    SourceCost {
        #[arg(long, value_enum, default_value = "wharf")]
        consumer: Consumer,
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
    },
    /// Drain a preloaded backlog with one consumer.
    Drain(DrainArgs),
    /// End-to-end latency under an open-loop producer (Redis streams).
    Latency {
        #[arg(long, value_enum, default_value = "wharf")]
        consumer: Consumer,
        /// Messages per second.
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// wharf only: the handler's `instance_reuse` (1: an instance per message).
        #[arg(long, default_value_t = 1)]
        instance_reuse: u32,
        /// wharf only: the host's `shards` (unset: none).
        #[arg(long)]
        shards: Option<u32>,
    },
    /// The suite's latency table on its own: native, wharf and wharf with
    /// `instance_reuse`, each also on `shards = 2`, in alternating rounds,
    /// at 5 000 msg/s and at half the native pipeline's maximum (found by a
    /// native drain first).
    LatencyTable {
        /// 1 000 msg/s for 1 s only, as in the suite's smoke run.
        #[arg(long)]
        smoke: bool,
        /// Rounds: each runs every consumer at every rate in turn.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        rounds: u16,
    },
    /// Everything, as the table in docs/BENCHMARKS.md.
    Suite {
        /// A few hundred messages per path, debug-friendly: the test suite's run.
        #[arg(long)]
        smoke: bool,
        /// Backlog per drain (default 100 000; 300 with --smoke).
        #[arg(long)]
        messages: Option<usize>,
        /// Rounds of drains: each round drains every path with every
        /// consumer in turn; the table shows each cell's median round and
        /// the median of the rounds' ratios.
        /// Default 3; 1 with --smoke.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        rounds: Option<u16>,
    },
    /// (internal) Preload a backlog, as a child process of `source-cost`.
    #[command(hide = true)]
    Preload {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        payload_bytes: usize,
    },
    /// (internal) The native consumer, as a child process of `drain`.
    #[command(hide = true)]
    Native {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        batch: usize,
        /// Forward each message to this Redis stream (latency runs).
        #[arg(long)]
        forward_to: Option<String>,
    },
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Result of a `wasm-cost` run.
#[derive(Debug, Clone, Copy)]
pub struct WasmCost {
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_us: f64,
}

/// The benchmark handler's context: no grants, no config, a 5 s budget,
/// `instance_reuse` as asked.
pub fn bench_context(db: &std::path::Path, reuse: u32) -> Result<Arc<HandlerContext>> {
    let store = wharf::store::open_all(db)?;
    Ok(Arc::new(HandlerContext {
        requester: None,
        name: "bench".into(),
        tenant: "default".into(),
        grants: Grants::default(),
        tenant_grants: Grants::default(),
        config: Default::default(),
        kv: Kv::new(
            store,
            "default",
            KvQuota {
                max_keys: 1,
                max_value_bytes: 1,
            },
        ),
        limits: AttemptLimits {
            timeout: Duration::from_secs(5),
            memory_bytes: 64 << 20,
            max_payload_bytes: 1 << 20,
            max_publishes: 0,
            max_log_bytes: 0,
            instance_reuse: reuse,
        },
    }))
}

async fn wasm_cost(
    component: &std::path::Path,
    iterations: usize,
    payload_bytes: usize,
    epoch: bool,
    reuse: u32,
) -> Result<WasmCost> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::new(RuntimeConfig {
        // One instance lives at a time. A small pool also keeps the address
        // space it reserves (8 GiB per memory slot) within what valgrind can
        // host, so `scripts/bench-instructions` can count instructions.
        max_instances: 2,
        max_memory_bytes: 64 << 20,
        cache_dir: dir.path().join("cache"),
        cpu_budget: epoch,
    })?;
    let loaded = runtime
        .load(component)
        .with_context(|| format!("loading {}", component.display()))?;
    let handler = bench_context(&dir.path().join("db"), reuse)?;
    let body = paths::payload(payload_bytes);
    let message = || Message {
        id: "m".into(),
        subject: "bench".into(),
        payload: body.clone(),
        headers: vec![],
        content_type: None,
        attempt: 1,
        redelivered: false,
        published_at_ms: 0,
        deadline_ms: 0,
        reply_to: None,
    };
    for _ in 0..1000.min(iterations) {
        runtime
            .invoke(&loaded, &handler, message())
            .await
            .result
            .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    }
    let mut samples = Vec::with_capacity(iterations);
    let cpu = cpu_seconds();
    let started = Instant::now();
    for _ in 0..iterations {
        let msg = message();
        let t = Instant::now();
        let attempt = runtime.invoke(&loaded, &handler, msg).await;
        samples.push(t.elapsed());
        attempt.result.map_err(|f| anyhow::anyhow!("{f:?}"))?;
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds() - cpu;
    samples.sort();
    let cost = WasmCost {
        p50_us: percentile(&samples, 0.50).as_secs_f64() * 1e6,
        p99_us: percentile(&samples, 0.99).as_secs_f64() * 1e6,
        cpu_us: cpu * 1e6 / iterations as f64,
    };
    println!(
        "wasm-cost payload={}B iterations={iterations} epoch={epoch} reuse={reuse}: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, CPU {:.1} µs/msg",
        body.len(),
        cost.p50_us,
        cost.p99_us,
        wall.as_secs_f64() * 1e6 / iterations as f64,
        cost.cpu_us,
    );
    Ok(cost)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let component = std::fs::canonicalize(&cli.component)
        .with_context(|| format!("{} (build it with scripts/bench)", cli.component.display()));
    match cli.command {
        Command::WasmCost {
            iterations,
            payload_bytes,
            no_epoch,
            reuse,
        } => wasm_cost(&component?, iterations, payload_bytes, !no_epoch, reuse)
            .await
            .map(drop),
        Command::EngineCost {
            messages,
            payload_bytes,
            concurrency,
            reuse,
        } => engine::engine_cost(&component?, messages, payload_bytes, concurrency, reuse)
            .await
            .map(drop),
        Command::SourceCost {
            consumer,
            messages,
            payload_bytes,
            concurrency,
        } => source::source_cost(consumer, messages, payload_bytes, concurrency)
            .await
            .map(drop),
        Command::Preload {
            target,
            messages,
            payload_bytes,
        } => paths::preload(&target, &Urls::from_env(), messages, &paths::payload(payload_bytes)).await,
        Command::Drain(args) => {
            let sample = suite::drain(&component?, &args).await?;
            println!(
                "drain {} {:?} messages={} payload={}B concurrency={} dedup={} instance_reuse={} worker_threads={} shards={}: {sample}",
                args.path.name(),
                args.consumer,
                args.messages,
                args.payload_bytes,
                args.concurrency,
                args.dedup,
                args.instance_reuse,
                args.worker_threads.map_or_else(|| "default".into(), |n| n.to_string()),
                args.shards.map_or_else(|| "none".into(), |n| n.to_string()),
            );
            Ok(())
        }
        Command::Latency {
            consumer,
            rate,
            seconds,
            instance_reuse,
            shards,
        } => {
            let who = latency::Setup {
                consumer,
                instance_reuse,
                shards,
            };
            let l = latency::run(&component?, who, rate, Duration::from_secs(seconds)).await?;
            println!(
                "latency redis-stream {consumer:?} rate={rate}/s instance_reuse={instance_reuse} shards={}: p50 {:.0} µs, p99 {:.0} µs ({} messages, {:.0} msg/s out)",
                shards.map_or_else(|| "none".into(), |n| n.to_string()),
                l.p50_us,
                l.p99_us,
                l.messages,
                l.delivered_per_s
            );
            Ok(())
        }
        Command::LatencyTable { smoke, rounds } => {
            let component = component?;
            let saturating = if smoke {
                None
            } else {
                let native = DrainArgs {
                    path: Path::RedisStream,
                    consumer: Consumer::Native,
                    messages: 100_000,
                    payload_bytes: 100,
                    concurrency: 100,
                    dedup: false,
                    instance_reuse: 1,
                    worker_threads: None,
                    shards: None,
                };
                Some(suite::drain(&component, &native).await?.rate())
            };
            let mut failures = 0;
            let table = latency::table(&component, rounds.into(), smoke, saturating, &mut failures).await?;
            println!("{table}");
            anyhow::ensure!(failures == 0, "{failures} measurement(s) failed (see above)");
            Ok(())
        }
        Command::Suite {
            smoke,
            messages,
            rounds,
        } => {
            let rounds = rounds.map_or(if smoke { 1 } else { 3 }, usize::from);
            let lean = std::fs::canonicalize(&cli.lean_component)
                .with_context(|| format!("{} (build it with scripts/bench)", cli.lean_component.display()))?;
            suite::run(&component?, &lean, smoke, messages, rounds).await
        }
        Command::Native {
            target: t,
            messages,
            batch,
            forward_to,
        } => match forward_to {
            Some(out) => latency::native_forwarder(&t, &Urls::from_env(), &out, batch).await,
            None => paths::native(&t, &Urls::from_env(), messages, batch).await,
        },
    }
}
