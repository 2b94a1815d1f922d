//! wharf-bench: the measurements behind docs/BENCHMARKS.md.
//!
//! Build the trivial handler first (`scripts/bench` does both):
//! `cargo build --profile guest --target wasm32-wasip2 --target-dir target/guests -p bench-handler`.
//!
//! - `wasm-cost`: instantiate from `InstancePre` + `handle` + drop, in a loop,
//!   with a 1 KiB JSON payload; p50/p99/mean per message.
//! - `drain`: preload a backlog into the embedded broker, start a host on it,
//!   time the drain; msg/s and the process's CPU µs per message.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wharf::app::App;
use wharf::broker::OutboundMessage;
use wharf::delivery::Shutdown;
use wharf::kv::{Kv, KvQuota};
use wharf::manifest::Manifest;
use wharf::runtime::{AttemptLimits, HandlerContext, Message, Runtime, RuntimeConfig};
use wharf::subject::Grants;

#[derive(Parser)]
struct Cli {
    /// The benchmark handler component.
    #[arg(long, default_value = "target/guests/wasm32-wasip2/guest/bench_handler.wasm")]
    component: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-message Wasm cost: instantiate + handle + drop.
    WasmCost {
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
    },
    /// Drain a preloaded backlog from the embedded broker.
    Drain {
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Turn dedup on.
        #[arg(long)]
        dedup: bool,
    },
}

/// A JSON object of about `bytes` bytes.
fn payload(bytes: usize) -> Vec<u8> {
    let filler = "x".repeat(bytes.saturating_sub(40));
    serde_json::to_vec(&serde_json::json!({ "id": 12345, "kind": "bench", "pad": filler })).unwrap_or_default()
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

async fn wasm_cost(component: &PathBuf, iterations: usize, payload_bytes: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 16,
        max_memory_bytes: 64 << 20,
        cache_dir: dir.path().join("cache"),
    })?;
    let loaded = runtime
        .load(component)
        .with_context(|| format!("loading {}", component.display()))?;
    let store = wharf::store::open_all(&dir.path().join("db"))?;
    let handler = Arc::new(HandlerContext {
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
        },
    });
    let body = payload(payload_bytes);
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
    for _ in 0..1000 {
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
    println!(
        "wasm-cost payload={}B iterations={iterations}: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, CPU {:.1} µs/msg",
        body.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        wall.as_secs_f64() * 1e6 / iterations as f64,
        cpu * 1e6 / iterations as f64,
    );
    Ok(())
}

async fn drain(
    component: &PathBuf,
    messages: usize,
    payload_bytes: usize,
    concurrency: u32,
    dedup: bool,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let manifest_path = dir.path().join("wharf.toml");
    let component = std::fs::canonicalize(component).with_context(|| format!("{}", component.display()))?;
    let text = format!(
        "[host]\ndata_dir = \"data\"\nhttp = \"127.0.0.1:0\"\n\n[tenants.default]\nmax_concurrency = {concurrency}\n\n\
         [handlers.bench]\ncomponent = {:?}\nsource = {{ subject = \"bench\" }}\nconcurrency = {concurrency}\n{}",
        component.display().to_string(),
        if dedup {
            "[handlers.bench.dedup]\nttl_secs = 3600\n"
        } else {
            ""
        }
    );
    std::fs::write(&manifest_path, &text)?;
    let manifest = Manifest::load(&manifest_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = App::new(manifest).await?;
    let body = bytes::Bytes::from(payload(payload_bytes));
    for chunk in (0..messages).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| OutboundMessage {
                id: Some(format!("m{i}")),
                subject: "bench".into(),
                payload: body.clone(),
                headers: vec![],
                content_type: None,
                reply_to: None,
                delay: Duration::ZERO,
            })
            .collect();
        app.broker.publish(batch).await?;
    }
    let shutdown = Shutdown::default();
    let cpu = cpu_seconds();
    let started = Instant::now();
    let running = tokio::spawn(app.clone().run(shutdown.clone()));
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if app.broker.stats()?.iter().all(|s| s.ready == 0 && s.pending == 0) {
            break;
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds() - cpu;
    shutdown.stop.cancel();
    running.await??;
    println!(
        "drain embedded messages={messages} payload={}B concurrency={concurrency} dedup={dedup}: {:.0} msg/s, CPU {:.1} µs/msg",
        body.len(),
        messages as f64 / wall.as_secs_f64(),
        cpu * 1e6 / messages as f64,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::WasmCost {
            iterations,
            payload_bytes,
        } => wasm_cost(&cli.component, iterations, payload_bytes).await,
        Command::Drain {
            messages,
            payload_bytes,
            concurrency,
            dedup,
        } => drain(&cli.component, messages, payload_bytes, concurrency, dedup).await,
    }
}
