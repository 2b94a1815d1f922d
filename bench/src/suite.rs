//! One drain (preload, one consumer, timed), and the whole suite as a table.

use std::fmt::Write as _;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::Command;

use crate::measure::{self, BrokerCpu, Sample, Wharf};
use crate::paths::{self, Path, Target, Urls};
use crate::{Consumer, DrainArgs};

/// The `instance_reuse` of the suite's fastest mode.
pub const REUSE: u32 = 1000;
/// The `shards` of the sharded columns: one per vCPU of the machine the
/// suite was made for (two).
pub const SHARDS: u32 = 2;

/// A name no other run uses.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:06x}", std::process::id(), nanos % 0xff_ffff)
}

/// The Node.js peers (`bench/node`).
fn node_dir() -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// The peer script for a path, if there is one.
fn peer_script(path: Path) -> Option<&'static str> {
    match path {
        Path::RedisList | Path::RedisStream => Some("bullmq.mjs"),
        Path::AmqpClassic | Path::AmqpQuorum => Some("amqplib.mjs"),
        Path::Jetstream => Some("jetstream.mjs"),
        Path::Embedded | Path::NatsCore => None,
    }
}

/// The manifest that points wharf at `t` with the benchmark handler.
pub fn wharf_manifest(
    component: &FsPath,
    t: &Target,
    urls: &Urls,
    data_dir: &FsPath,
    concurrency: u32,
    host: &str,
    extra: &str,
) -> String {
    let (brokers, source) = paths::manifest_source(t, urls);
    format!(
        "[host]\ndata_dir = {:?}\nhttp = \"127.0.0.1:0\"\n{host}\n{brokers}\n[tenants.default]\nmax_concurrency = {concurrency}\npublish = [\"bench.>\"]\n\n\
         [handlers.bench]\ncomponent = {:?}\nsource = {source}\nconcurrency = {concurrency}\n{extra}",
        data_dir.display().to_string(),
        component.display().to_string(),
    )
}

/// Preload, consume with one consumer, clean up.
pub async fn drain(component: &FsPath, a: &DrainArgs) -> Result<Sample> {
    let urls = Urls::from_env();
    let t = Target::new(a.path, &run_id());
    paths::clean(&t, &urls).await?;
    let result = drain_on(component, a, &t, &urls).await;
    if result.is_err() && std::env::var_os("WHARF_BENCH_KEEP").is_some() {
        eprintln!("kept what the failed run left on the broker: {t:?}");
        return result;
    }
    paths::clean(&t, &urls).await?;
    result
}

async fn drain_on(component: &FsPath, a: &DrainArgs, t: &Target, urls: &Urls) -> Result<Sample> {
    let body = paths::payload(a.payload_bytes);
    let n = a.messages;
    let lossy = a.path == Path::NatsCore;
    let broker = a.path.broker_process().and_then(BrokerCpu::find);
    let broker = broker.as_ref();
    // Core NATS keeps nothing: the producer starts once the consumer is up.
    let producer = |t: &Target, body: &[u8]| {
        let (t, body, urls) = (t.clone(), body.to_vec(), Urls::from_env());
        Some(tokio::spawn(
            async move { paths::publish_core(&t, &urls, n, &body).await },
        ))
    };
    match a.consumer {
        Consumer::Wharf => {
            let dir = tempfile::tempdir()?;
            let data = dir.path().join("data");
            let mut extra = format!("instance_reuse = {}\n", a.instance_reuse);
            if a.dedup {
                extra.push_str("[handlers.bench.dedup]\nttl_secs = 3600\n");
            }
            let manifest_path = dir.path().join("wharf.toml");
            std::fs::write(
                &manifest_path,
                wharf_manifest(component, t, urls, &data, a.concurrency, &a.host_settings(), &extra),
            )?;
            // The component compiled into the data folder's cache first (the
            // embedded preload's host does it), so wharf starts as it does
            // after its first start: the memory column is then the host's
            // own, not what compiling left behind.
            if a.path == Path::Embedded {
                preload_embedded(&manifest_path, t, n, &body).await?;
            } else {
                warm_cache(&manifest_path)?;
                if a.path.preloads() {
                    paths::preload(t, urls, n, &body).await?;
                }
            }
            let mut wharf = Wharf::start(&measure::wharf_binary()?, &manifest_path, &data).await?;
            let mut produced = None;
            if lossy {
                // The subscription is made by the consumer loop, just after ready.
                tokio::time::sleep(Duration::from_millis(500)).await;
                produced = producer(t, &body);
            }
            let sample = wharf.drain(n, lossy, broker).await;
            if sample.is_err() && std::env::var_os("WHARF_BENCH_KEEP").is_some() {
                return sample;
            }
            wharf.stop().await?;
            if let Some(p) = produced {
                p.await??;
            }
            sample
        }
        Consumer::Native => {
            if a.path == Path::Embedded {
                bail!("the embedded broker is wharf's own; there is no native consumer for it");
            }
            if a.path.preloads() {
                paths::preload(t, urls, n, &body).await?;
            }
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("native").args(t.args()).args([
                "--messages",
                &n.to_string(),
                "--batch",
                &a.concurrency.to_string(),
            ]);
            measure::child_lines(cmd, n, || if lossy { producer(t, &body) } else { None }, lossy, broker).await
        }
        Consumer::Peer => {
            let script = peer_script(a.path).ok_or_else(|| anyhow!("no peer benchmark for {}", a.path.name()))?;
            let node = |mode: &str| {
                let mut cmd = Command::new("node");
                cmd.arg(node_dir().join(script))
                    .arg(mode)
                    .env("SUBJECT", &t.subject)
                    .env("STREAM", &t.stream)
                    .env("MESSAGES", n.to_string())
                    .env("CONCURRENCY", a.concurrency.to_string())
                    .env("QUORUM", if a.path == Path::AmqpQuorum { "1" } else { "" })
                    .env("REDIS_URL", &urls.redis)
                    .env("AMQP_URL", &urls.amqp)
                    .env("NATS_URL", &urls.nats)
                    .env("BODY", std::str::from_utf8(&body).unwrap_or("{}"));
                cmd
            };
            if script == "bullmq.mjs" {
                // BullMQ jobs live in BullMQ's own keys: it preloads itself.
                let status = node("preload").status().await.context("running node")?;
                anyhow::ensure!(status.success(), "BullMQ preload failed ({status})");
            } else {
                paths::preload(t, urls, n, &body).await?;
            }
            measure::child_lines(node("consume"), n, || None, false, broker).await
        }
    }
}

/// Compile the manifest's components into its data folder's cache.
fn warm_cache(path: &FsPath) -> Result<()> {
    let manifest = wharf::manifest::Manifest::load(path).map_err(|e| anyhow!("{e}"))?;
    let runtime = wharf::app::runtime_for(&manifest)?;
    for h in manifest.handlers.values() {
        runtime.load(&h.component)?;
    }
    Ok(())
}

/// Preload the embedded broker of the manifest at `path` (in its data dir),
/// then close it so the `wharf` process can open it.
async fn preload_embedded(path: &FsPath, t: &Target, n: usize, body: &[u8]) -> Result<()> {
    let manifest = wharf::manifest::Manifest::load(path).map_err(|e| anyhow!("{e}"))?;
    let app = wharf::app::App::new(manifest).await?;
    let body = bytes::Bytes::copy_from_slice(body);
    for start in (0..n).step_by(1000) {
        let batch = (start..(start + 1000).min(n))
            .map(|i| wharf::broker::OutboundMessage {
                id: Some(t.message_id(i)),
                subject: t.subject.clone(),
                payload: body.clone(),
                headers: vec![],
                content_type: None,
                reply_to: None,
                delay: Duration::ZERO,
            })
            .collect();
        app.broker.publish(batch).await?;
    }
    Ok(())
}

/// One row of the table.
#[derive(Default)]
struct Row {
    wharf: Cell,
    /// The default on a host with `shards = SHARDS`.
    sharded: Cell,
    dedup: Cell,
    reuse: Cell,
    /// `instance_reuse` on a host with `shards = SHARDS`.
    reuse_sharded: Cell,
    native: Cell,
    peer: Cell,
}

/// One consumer's drains of a row, a round each (empty: not measured).
type Cell = Vec<Result<Sample, String>>;

/// The middle value (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The round with the median rate, or the first error if no round worked.
fn show(c: &Cell) -> String {
    let mut ok: Vec<&Sample> = c.iter().filter_map(|r| r.as_ref().ok()).collect();
    ok.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let Some(s) = ok.get(ok.len() / 2) else {
        return match c.iter().find_map(|r| r.as_ref().err()) {
            Some(e) => format!("error: {}", e.lines().next().unwrap_or_default()),
            None => "—".into(),
        };
    };
    let failed = c.iter().filter(|r| r.is_err()).count();
    let failed = if failed > 0 {
        format!(", {failed} round(s) failed")
    } else {
        String::new()
    };
    if s.messages == 0 {
        return format!("drained before the first look{failed}");
    }
    if s.dropped > 0 {
        return format!(
            "{:.0} ({:.0}), {:.0}% dropped{failed}",
            s.rate(),
            s.cpu_us_per_msg(),
            s.dropped as f64 * 100.0 / (s.messages + s.dropped) as f64
        );
    }
    format!("{:.0} ({:.0}){failed}", s.rate(), s.cpu_us_per_msg())
}

/// What the suite's runs leave beside their figures.
#[derive(Default)]
struct RunLog {
    /// Measurements that failed.
    failures: usize,
    /// The vCPUs' round trip before each drain, ns
    /// ([`measure::vcpu_round_trip_ns`]).
    round_trips: Vec<f64>,
}

impl RunLog {
    /// The round trips' range, and how many drains ran with the vCPUs
    /// placed apart (a round trip over 150 ns).
    fn placement(&self) -> Option<String> {
        let mut ns = self.round_trips.clone();
        ns.sort_by(f64::total_cmp);
        let (first, last) = (ns.first()?, ns.last()?);
        let apart = ns.iter().filter(|&&t| t > 150.0).count();
        Some(format!(
            "The two vCPUs' cache-line round trip before each drain: {first:.0}–{last:.0} ns, median {:.0}; {apart} of {} drains ran with it over 150 ns (the vCPUs placed apart, where wharf's per-message CPU rises; docs/BENCHMARKS.md).\n",
            ns[ns.len() / 2],
            ns.len()
        ))
    }
}

/// [`drain`], its outcome logged under `label` (a failure counted in the
/// log), with the vCPUs' round trip just before it, as an error string for
/// a [`Cell`].
async fn drain_logged(component: &FsPath, a: &DrainArgs, label: &str, log: &mut RunLog) -> Result<Sample, String> {
    let round_trip = tokio::task::spawn_blocking(crate::measure::vcpu_round_trip_ns)
        .await
        .ok()
        .flatten();
    log.round_trips.extend(round_trip);
    let placement = round_trip.map_or_else(String::new, |ns| format!(", vCPU round trip {ns:.0} ns"));
    let r = drain(component, a).await.map_err(|e| format!("{e:#}"));
    let what = format!(
        "{label}: {} {}B {:?}{}{}{}{}",
        a.path.name(),
        a.payload_bytes,
        a.consumer,
        if a.dedup { " dedup" } else { "" },
        if a.instance_reuse > 1 { " reuse" } else { "" },
        a.worker_threads.map_or_else(String::new, |n| format!(" {n} thread(s)")),
        a.shards.map_or_else(String::new, |n| format!(" {n} shard(s)")),
    );
    match &r {
        Ok(s) => eprintln!("{what}: {s}{placement}"),
        Err(e) => {
            log.failures += 1;
            eprintln!("{what}: FAILED: {e}");
        }
    }
    r
}

/// The peer's name as a cell's prefix ("" where there is none).
fn peer_name(path: Path) -> &'static str {
    match peer_script(path) {
        Some("bullmq.mjs") => "BullMQ ",
        Some("amqplib.mjs") => "amqplib ",
        Some(_) => "nats.js ",
        None => "",
    }
}

/// The median over the rounds that worked of `value`, where a round has
/// one, to no decimals.
fn show_median(c: &Cell, value: impl Fn(&Sample) -> Option<f64>) -> String {
    let values = c.iter().filter_map(|r| value(r.as_ref().ok()?)).collect();
    median(values).map_or_else(|| "—".into(), |m| format!("{m:.0}"))
}

/// The median round's peak resident memory, MiB.
fn show_rss(c: &Cell) -> String {
    show_median(c, |s| (s.peak_rss_kib > 0).then(|| s.peak_rss_mib()))
}

/// The median round's broker CPU per message, µs.
fn show_broker(c: &Cell) -> String {
    show_median(c, Sample::broker_us_per_msg)
}

/// A round's rate, if it worked and its window held messages (a smoke
/// drain can be over before the first look at it).
fn timed(r: &Result<Sample, String>) -> Option<f64> {
    r.as_ref().ok().filter(|s| s.messages > 0).map(Sample::rate)
}

/// The median of the rounds' own ratios: a round's drains run back to back,
/// so each ratio compares drains a minute or two apart, and one disturbed
/// drain moves no median.
fn ratio(a: &Cell, b: &Cell) -> String {
    let ratios = a
        .iter()
        .zip(b)
        .filter_map(|(a, b)| Some(timed(a)? / timed(b)?))
        .collect();
    median(ratios).map_or_else(|| "—".into(), |r| format!("{r:.2}"))
}

/// Three rounds of `variants` in turn, keeping for each the run with the
/// least CPU (`cpu`): a single run, or a pair run back to back, is at the
/// mercy of whatever else the machine did meanwhile.
async fn best_of_three<V: Copy, T: Copy, const N: usize>(
    variants: [V; N],
    mut measure: impl AsyncFnMut(V) -> Result<T>,
    cpu: impl Fn(&T) -> f64,
) -> Result<[T; N]> {
    let mut best: [Option<T>; N] = [None; N];
    for _ in 0..3 {
        for (slot, v) in variants.into_iter().enumerate() {
            let c = measure(v).await?;
            if best[slot].is_none_or(|b| cpu(&c) < cpu(&b)) {
                best[slot] = Some(c);
            }
        }
    }
    Ok(best.map(|b| b.expect("every variant ran at least once")))
}

/// A table of one figure per consumer of every drained row, under `title`.
fn per_consumer_table(
    out: &mut String,
    title: &str,
    rows: &[(Path, usize, Row)],
    figure: fn(&Cell) -> String,
) -> std::fmt::Result {
    let (header, rule) = consumer_header();
    writeln!(out, "\n{title}\n\n{header} |\n{rule}|")?;
    for (path, payload, r) in rows {
        writeln!(out, "{} |", consumer_cells(*path, *payload, r, figure))?;
    }
    Ok(())
}

/// The header of the columns [`consumer_cells`] fills, and its rule; the
/// caller closes both (or adds columns).
fn consumer_header() -> (String, &'static str) {
    (
        format!(
            "| path | payload | wharf | wharf, `shards = {SHARDS}` | wharf, dedup on | wharf, `instance_reuse = {REUSE}` | the same, `shards = {SHARDS}` | native Rust | peer"
        ),
        "|---|---|---|---|---|---|---|---|---",
    )
}

/// A row's path, payload and one `figure` per consumer, in the order of
/// [`consumer_header`]; the caller closes the row (or adds columns).
fn consumer_cells(path: Path, payload: usize, r: &Row, figure: fn(&Cell) -> String) -> String {
    format!(
        "| {} | {} B | {} | {} | {} | {} | {} | {} | {}{}",
        path.name(),
        payload,
        figure(&r.wharf),
        figure(&r.sharded),
        figure(&r.dedup),
        figure(&r.reuse),
        figure(&r.reuse_sharded),
        figure(&r.native),
        peer_name(path),
        figure(&r.peer),
    )
}

/// Everything in docs/BENCHMARKS.md, printed as markdown.
pub async fn run(component: &FsPath, lean: &FsPath, smoke: bool, messages: Option<usize>, rounds: usize) -> Result<()> {
    let n = messages.unwrap_or(if smoke { 300 } else { 100_000 });
    let mut out = String::new();
    let mut log = RunLog::default();

    let iterations = if smoke { 200 } else { 20_000 };
    let [on, off, reused, lean_fresh, lean_reused] = best_of_three(
        [
            (component, true, 1),
            (component, false, 1),
            (component, true, REUSE),
            (lean, true, 1),
            (lean, true, REUSE),
        ],
        async |(handler, epoch, reuse)| crate::wasm_cost(handler, iterations, 1024, epoch, reuse).await,
        |c| c.cpu_us,
    )
    .await?;
    writeln!(
        out,
        "\n| per-message Wasm cost, 1 KiB JSON, {iterations} iterations (best of 3 alternating rounds) | p50 µs | p99 µs | CPU µs/msg |\n|---|---|---|---|\n\
         | epoch interruption on (default) | {:.1} | {:.1} | {:.1} |\n| epoch interruption off | {:.1} | {:.1} | {:.1} |\n\
         | epoch overhead (CPU) | | | {:+.1}% |\n| `instance_reuse = {REUSE}` (epoch on) | {:.1} | {:.1} | {:.1} |\n\
         | the handler built without std (lean), fresh | {:.1} | {:.1} | {:.1} |\n| the lean handler, `instance_reuse = {REUSE}` | {:.1} | {:.1} | {:.1} |",
        on.p50_us,
        on.p99_us,
        on.cpu_us,
        off.p50_us,
        off.p99_us,
        off.cpu_us,
        (on.cpu_us / off.cpu_us - 1.0) * 100.0,
        reused.p50_us,
        reused.p99_us,
        reused.cpu_us,
        lean_fresh.p50_us,
        lean_fresh.p99_us,
        lean_fresh.cpu_us,
        lean_reused.p50_us,
        lean_reused.p99_us,
        lean_reused.cpu_us,
    )?;

    // The delivery engine in process on a backlog held in memory: what the
    // host spends around the call with no broker client in the figure.
    let engine_messages = if smoke { 300 } else { 50_000 };
    let [engine_fresh, engine_reused] = best_of_three(
        [1, REUSE],
        async |reuse| crate::engine::engine_cost(component, engine_messages, 1024, 100, reuse).await,
        |&(_, cpu_us)| cpu_us,
    )
    .await?;
    writeln!(
        out,
        "\n| the delivery engine in process, no broker, 1 KiB, {engine_messages} messages, 100 in flight (best of 3) | msg/s | CPU µs/msg | of which around the Wasm call |\n|---|---|---|---|\n\
         | a fresh instance per message (default) | {:.0} | {:.1} | {:.1} |\n| `instance_reuse = {REUSE}` | {:.0} | {:.1} | {:.1} |",
        engine_fresh.0,
        engine_fresh.1,
        engine_fresh.1 - on.cpu_us,
        engine_reused.0,
        engine_reused.1,
        engine_reused.1 - reused.cpu_us,
    )?;

    let payloads: &[usize] = if smoke { &[100] } else { &[100, 1024] };
    let mut rows = Vec::new();
    let mut native_stream_rates = Vec::new();
    for &payload in payloads {
        for path in Path::ALL {
            let mut row = Row::default();
            // Each round drains with every consumer in turn, so a ratio
            // compares drains minutes apart.
            for round in 1..=rounds {
                let cell = |consumer, dedup, instance_reuse, shards| DrainArgs {
                    path,
                    consumer,
                    messages: n,
                    payload_bytes: payload,
                    concurrency: 100,
                    dedup,
                    instance_reuse,
                    worker_threads: None,
                    shards,
                };
                let label = format!("round {round}");
                let mut measure = async |args: DrainArgs| drain_logged(component, &args, &label, &mut log).await;
                row.wharf.push(measure(cell(Consumer::Wharf, false, 1, None)).await);
                row.sharded
                    .push(measure(cell(Consumer::Wharf, false, 1, Some(SHARDS))).await);
                row.dedup.push(measure(cell(Consumer::Wharf, true, 1, None)).await);
                row.reuse.push(measure(cell(Consumer::Wharf, false, REUSE, None)).await);
                row.reuse_sharded
                    .push(measure(cell(Consumer::Wharf, false, REUSE, Some(SHARDS))).await);
                if path != Path::Embedded {
                    let native = measure(cell(Consumer::Native, false, 1, None)).await;
                    if path == Path::RedisStream
                        && payload == 100
                        && let Ok(s) = &native
                    {
                        native_stream_rates.push(s.rate());
                    }
                    row.native.push(native);
                }
                if peer_script(path).is_some() {
                    row.peer.push(measure(cell(Consumer::Peer, false, 1, None)).await);
                }
            }
            rows.push((path, payload, row));
        }
    }
    let native_stream_rate = median(native_stream_rates);
    let (header, rule) = consumer_header();
    writeln!(
        out,
        "\n{n} messages per drain, 100 in flight; msg/s (consumer CPU µs/msg){}\n\n\
         {header} | wharf / native | shards / native | reuse / native | reuse, shards / native | wharf / peer | shards / peer | reuse / peer | reuse, shards / peer |\n{rule}|---|---|---|---|---|---|---|---|",
        if rounds > 1 {
            format!("; the median of {rounds} alternating rounds, and the median of the rounds' ratios")
        } else {
            String::new()
        }
    )?;
    for (path, payload, r) in &rows {
        writeln!(
            out,
            "{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            consumer_cells(*path, *payload, r, show),
            ratio(&r.wharf, &r.native),
            ratio(&r.sharded, &r.native),
            ratio(&r.reuse, &r.native),
            ratio(&r.reuse_sharded, &r.native),
            ratio(&r.wharf, &r.peer),
            ratio(&r.sharded, &r.peer),
            ratio(&r.reuse, &r.peer),
            ratio(&r.reuse_sharded, &r.peer),
        )?;
    }

    // One message at a time (a handler that must keep order): no batch
    // hides a wait per message. The seventeenth session found one here
    // (Redis streams at 313 msg/s), which no drain at concurrency 100 could
    // show.
    let single = if smoke { 100 } else { 10_000 };
    writeln!(
        out,
        "\nConcurrency 1, {single} messages of 100 B, one round: msg/s (consumer CPU µs/msg)\n\n\
         | path | wharf | wharf, `instance_reuse = {REUSE}` | native Rust | wharf / native |\n|---|---|---|---|---|"
    )?;
    for path in Path::ALL.into_iter().filter(|p| *p != Path::NatsCore) {
        let mut one = async |consumer, instance_reuse| -> Cell {
            let args = DrainArgs {
                path,
                consumer,
                messages: single,
                payload_bytes: 100,
                concurrency: 1,
                dedup: false,
                instance_reuse,
                worker_threads: None,
                shards: None,
            };
            vec![drain_logged(component, &args, "concurrency 1", &mut log).await]
        };
        let wharf = one(Consumer::Wharf, 1).await;
        let reuse = one(Consumer::Wharf, REUSE).await;
        let native = if path == Path::Embedded {
            Vec::new()
        } else {
            one(Consumer::Native, 1).await
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            path.name(),
            show(&wharf),
            show(&reuse),
            show(&native),
            ratio(&wharf, &native),
        )?;
    }

    per_consumer_table(
        &mut out,
        "Peak resident memory (RSS) of the consumer process while it drained, MiB (sampled every 10 ms; the median round)",
        &rows,
        show_rss,
    )?;
    per_consumer_table(
        &mut out,
        "CPU the broker's server process spent per message while the consumer drained, µs (`/proc/<pid>/stat`, 10 ms ticks; the median round; the embedded broker runs inside wharf, so its CPU is in wharf's figure)",
        &rows,
        show_broker,
    )?;

    // Added latency, in rounds of its own after the drains.
    out += &crate::latency::table(component, rounds, smoke, native_stream_rate, &mut log.failures).await?;
    if let Some(placement) = log.placement() {
        out += "\n";
        out += &placement;
    }
    println!("{out}");
    if log.failures > 0 {
        bail!("{} measurement(s) failed (see above)", log.failures);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(rate: f64) -> Result<Sample, String> {
        Ok(Sample {
            messages: 1000,
            secs: 1000.0 / rate,
            cpu: 0.01,
            dropped: 0,
            peak_rss_kib: 0,
            broker_cpu: Some(0.02),
        })
    }

    #[test]
    fn the_placement_line_gives_the_round_trips_range_median_and_how_many_ran_apart() {
        assert_eq!(RunLog::default().placement(), None, "no drain measured it");
        let log = RunLog {
            failures: 0,
            round_trips: vec![310.0, 55.0, 52.0, 151.0, 60.0],
        };
        let line = log.placement().expect("a line");
        assert!(line.starts_with("The two vCPUs' cache-line round trip before each drain: 52–310 ns, median 60; 2 of 5 drains ran with it over 150 ns"), "{line}");
    }

    #[test]
    fn the_vcpu_round_trip_is_measured_where_there_are_two_cpus() {
        let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        let ns = crate::measure::vcpu_round_trip_ns();
        assert_eq!(ns.is_some(), two, "{ns:?}");
        if let Some(ns) = ns {
            assert!(ns > 0.0 && ns.is_finite(), "{ns}");
        }
    }

    #[test]
    fn a_cell_shows_its_median_round_and_says_how_many_failed() {
        let cell = vec![
            drained(300.0),
            Err("broker down".into()),
            drained(100.0),
            drained(200.0),
        ];
        assert_eq!(show(&cell), "200 (10), 1 round(s) failed");
        assert_eq!(show(&vec![drained(100.0)]), "100 (10)");
        assert_eq!(show(&vec![Err("broker down\nmore".into())]), "error: broker down");
        assert_eq!(show(&Vec::new()), "—");
    }

    #[test]
    fn the_broker_column_is_the_median_of_the_rounds_that_measured_it() {
        let unmeasured = Ok(Sample {
            broker_cpu: None,
            ..drained(100.0).expect("a sample")
        });
        let more = Ok(Sample {
            broker_cpu: Some(0.05),
            ..drained(100.0).expect("a sample")
        });
        // 20 and 50 µs a message, a failed round and one without a reading:
        // the median of what was measured.
        let cell = vec![drained(100.0), unmeasured.clone(), Err("x".into()), more.clone(), more];
        assert_eq!(show_broker(&cell), "50");
        assert_eq!(show_broker(&vec![unmeasured]), "—");
        assert_eq!(drained(1.0).expect("a sample").broker_note(), "20.0 µs CPU/msg");
    }

    #[test]
    fn a_ratio_is_the_median_of_the_rounds_ratios() {
        // Round by round 0.5, 0.9 and 0.6: the median is 0.6, not the ratio
        // of the medians (200 / 250 = 0.8).
        let a = vec![drained(100.0), drained(180.0), drained(300.0)];
        let b = vec![drained(200.0), drained(200.0), drained(500.0)];
        assert_eq!(ratio(&a, &b), "0.60");
        // A failed round on either side drops that round's pair.
        let a = vec![drained(100.0), Err("x".into()), drained(300.0)];
        assert_eq!(ratio(&a, &b), "0.60");
        assert_eq!(ratio(&a, &Vec::new()), "—");
        // So does a round over before the first look (no rate, not 0).
        let untimed = Ok(Sample {
            messages: 0,
            ..drained(1.0).expect("a sample")
        });
        let a = vec![drained(100.0), untimed.clone(), drained(300.0)];
        assert_eq!(ratio(&a, &b), "0.60");
        assert_eq!(ratio(&b, &a), "2.00");
        assert_eq!(ratio(&vec![untimed], &b), "—");
    }

    #[test]
    fn a_log_line_gives_the_figures_or_says_the_window_was_empty() {
        let s = drained(100.0).expect("a sample");
        assert_eq!(
            s.to_string(),
            "100 msg/s, CPU 10.0 µs/msg, peak RSS 0.0 MiB, broker 20.0 µs CPU/msg"
        );
        let untimed = Sample { messages: 0, ..s };
        assert_eq!(
            untimed.to_string(),
            "drained before the first look (too few messages to time), peak RSS 0.0 MiB"
        );
    }
}
