//! Added latency: an open-loop producer writes timestamped messages to a
//! Redis stream at a fixed rate whatever the consumer does; the consumer
//! (wharf's benchmark handler with `forward_to`, or the native forwarder)
//! parses each, publishes it to an output stream and acks it; a reader on the
//! output stream takes the end-to-end time of each. Same machine, same clock.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use tokio::process::Command;

use crate::Consumer;
use crate::measure::{self, Wharf};
use crate::paths::{self, Path, Target, Urls};
use crate::suite::{REUSE, SHARDS, median};

/// End-to-end latency of one run.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub messages: usize,
    /// Messages that came out of the pipeline per second while the producer
    /// ran (after the warm-up): the offered rate while the consumer keeps
    /// up, the pipeline's maximum once it does not.
    pub delivered_per_s: f64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Who consumes in a latency run: the native forwarder, or wharf with its
/// handler's `instance_reuse` (1: a fresh instance per message) on a host
/// with `shards` (`None`: no `[host] shards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub consumer: Consumer,
    pub instance_reuse: u32,
    pub shards: Option<u32>,
}

impl Setup {
    /// The native forwarder.
    pub const NATIVE: Setup = Setup {
        consumer: Consumer::Native,
        instance_reuse: 1,
        shards: None,
    };

    /// wharf with `instance_reuse` on a host with `shards`.
    pub const fn wharf(instance_reuse: u32, shards: Option<u32>) -> Setup {
        Setup {
            consumer: Consumer::Wharf,
            instance_reuse,
            shards,
        }
    }

    /// Its name in the table.
    fn name(self) -> String {
        let mut name = match self.consumer {
            Consumer::Wharf => "wharf",
            Consumer::Native => return "native".into(),
            Consumer::Peer => return "peer".into(),
        }
        .to_string();
        if self.instance_reuse > 1 {
            name += &format!(", `instance_reuse = {}`", self.instance_reuse);
        }
        if let Some(n) = self.shards {
            name += &format!(", `shards = {n}`");
        }
        name
    }
}

/// Run the producer, the consumer and the reader for `duration`.
pub async fn run(component: &std::path::Path, who: Setup, rate: u32, duration: Duration) -> Result<Latency> {
    let urls = Urls::from_env();
    let run = format!("lat{:x}{}", std::process::id(), now_us() % 1_000_000);
    let t = Target::new(Path::RedisStream, &run);
    let out = format!("{}.out", t.subject);
    let result = measure_run(component, who, rate, duration, &t, &out, &urls).await;
    paths::clean(&t, &urls).await?;
    result
}

async fn measure_run(
    component: &std::path::Path,
    who: Setup,
    rate: u32,
    duration: Duration,
    t: &Target,
    out: &str,
    urls: &Urls,
) -> Result<Latency> {
    let mut conn = paths::redis_conn(&urls.redis).await?;
    // The output stream exists before anyone writes, and the reader starts
    // right after this first entry. (Not at `$`: that is resolved when the
    // reader's first XREAD runs, and a forwarder can have written the first
    // messages by then.)
    let init: String = redis::cmd("XADD")
        .arg(out)
        .arg("*")
        .arg("init")
        .arg("1")
        .query_async(&mut conn)
        .await?;
    let _dir;
    let mut wharf = None;
    let mut child = None;
    let Setup {
        consumer,
        instance_reuse,
        shards,
    } = who;
    match consumer {
        Consumer::Wharf => {
            let dir = tempfile::tempdir()?;
            let data = dir.path().join("data");
            let manifest = dir.path().join("wharf.toml");
            let extra = format!(
                "publish = [\"bench.>\"]\ninstance_reuse = {instance_reuse}\nconfig = {{ forward_to = {out:?} }}\n"
            );
            let host = shards.map_or_else(String::new, |n| format!("shards = {n}\n"));
            std::fs::write(
                &manifest,
                crate::suite::wharf_manifest(component, t, urls, &data, 100, &host, &extra),
            )?;
            wharf = Some(Wharf::start(&measure::wharf_binary()?, &manifest, &data).await?);
            _dir = dir;
        }
        Consumer::Native => {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("native")
                .args(t.args())
                .args(["--messages", "0", "--batch", "100", "--forward-to", out])
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut c = cmd.spawn()?;
            let stdout = c.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
                Ok(Ok(Some(l))) if l == "ready" => {}
                other => bail!("the native forwarder did not start: {other:?}"),
            }
            child = Some(c);
        }
        Consumer::Peer => bail!("the latency benchmark compares wharf with the native consumer only"),
    }

    // Reader: every entry on the output stream, latency from its stamp.
    let reader = {
        let (url, out) = (urls.redis.clone(), out.to_string());
        tokio::spawn(async move {
            let mut conn = paths::redis_conn(&url).await?;
            let mut last = init;
            let mut samples = Vec::new();
            let mut idle = 0;
            loop {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&out)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await?;
                let Some(reply) = reply else {
                    idle += 1;
                    if idle >= 3 {
                        return Ok::<_, anyhow::Error>(samples);
                    }
                    continue;
                };
                idle = 0;
                let now = now_us();
                for key in reply.keys {
                    for e in key.ids {
                        if let Some(redis::Value::BulkString(body)) = e.map.get("payload") {
                            let v: serde_json::Value = serde_json::from_slice(body)?;
                            let sent = v["t"].as_u64().unwrap_or(now);
                            let index = v["i"].as_u64().unwrap_or(u64::MAX);
                            samples.push((sent, now.saturating_sub(sent), index));
                        }
                        last = e.id;
                    }
                }
            }
        })
    };

    // Open-loop producer: catch up to `rate` every millisecond, never waiting
    // on the consumer.
    let started = Instant::now();
    let mut sent = 0u64;
    let pad = "x".repeat(60);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        if due <= sent {
            continue;
        }
        let mut pipe = redis::pipe();
        for i in sent..due {
            let body = format!(r#"{{"t":{},"i":{i},"pad":"{pad}"}}"#, now_us());
            pipe.cmd("XADD")
                .arg(&t.subject)
                .arg("*")
                .arg("id")
                .arg(format!("m{i}"))
                .arg("payload")
                .arg(body)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        sent = due;
    }
    let produced_until = now_us();
    let first_counted = produced_until - (duration.as_micros() as u64) + (duration.as_micros() as u64) / 5;
    let samples = reader.await??;
    if let Some(w) = wharf {
        w.stop().await?;
    }
    drop(child);
    if samples.len() as u64 != sent {
        let mut seen: Vec<u64> = samples.iter().map(|(_, _, i)| *i).collect();
        seen.sort_unstable();
        let missing: Vec<u64> = (0..sent).filter(|i| seen.binary_search(i).is_err()).take(10).collect();
        bail!(
            "{} of {sent} messages came out the other side (missing, first ten: {missing:?})",
            samples.len()
        );
    }
    // The first fifth is warm-up (connections, caches, the JIT of the peers).
    let mut lat: Vec<u64> = samples
        .iter()
        .filter(|(sent_at, _, _)| *sent_at >= first_counted)
        .map(|(_, l, _)| *l)
        .collect();
    lat.sort_unstable();
    anyhow::ensure!(!lat.is_empty(), "no messages after the warm-up");
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as f64;
    Ok(Latency {
        p50_us: p(0.5),
        p99_us: p(0.99),
        messages: lat.len(),
        delivered_per_s: delivered_per_s(&samples, first_counted, produced_until),
    })
}

/// How many of `samples` (sent at, latency, index) arrived between `from`
/// and `until` (µs since the epoch), per second.
fn delivered_per_s(samples: &[(u64, u64, u64)], from: u64, until: u64) -> f64 {
    let arrived = samples
        .iter()
        .filter(|(sent, latency, _)| (from..until).contains(&(sent + latency)))
        .count();
    arrived as f64 / (until.saturating_sub(from).max(1) as f64 / 1e6)
}

/// The native forwarder: consume the stream, parse, publish to `out`, ack.
pub async fn native_forwarder(t: &Target, urls: &Urls, out: &str, batch: usize) -> Result<()> {
    let mut conn = paths::redis_conn(&urls.redis).await?;
    paths::ensure_group(&mut conn, &t.subject, "$").await?;
    println!("ready");
    loop {
        let entries = paths::read_group(&mut conn, &t.subject, batch).await?;
        if entries.is_empty() {
            continue;
        }
        let mut ids = Vec::with_capacity(entries.len());
        let mut pipe = redis::pipe();
        for (id, body) in entries {
            if let Some(body) = body {
                let _: serde_json::Value = serde_json::from_slice(&body)?;
                pipe.cmd("XADD").arg(out).arg("*").arg("payload").arg(body).ignore();
            }
            ids.push(id);
        }
        // Publish confirmed before the ack, as wharf does with its outbox.
        let () = pipe.query_async(&mut conn).await?;
        paths::ack_group(&mut conn, &t.subject, &ids).await?;
    }
}

/// The consumers each round of [`table`] runs, in turn: the native
/// forwarder, then wharf in its default mode and in its fastest one, each
/// on the shared threads and on `shards = SHARDS`.
const CONSUMERS: [Setup; 5] = [
    Setup::NATIVE,
    Setup::wharf(1, None),
    Setup::wharf(REUSE, None),
    Setup::wharf(1, Some(SHARDS)),
    Setup::wharf(REUSE, Some(SHARDS)),
];

/// One consumer's runs at one rate, a round each.
type Runs = Vec<Result<Latency, String>>;

/// The median of the rounds' own differences `runs` − `native` in what `f`
/// reads: each compares two runs a few seconds apart, so a round the
/// machine disturbed moves no median.
fn added(runs: &Runs, native: &Runs, f: impl Fn(&Latency) -> f64) -> Option<f64> {
    let differences = runs
        .iter()
        .zip(native)
        .filter_map(|(r, n)| Some(f(r.as_ref().ok()?) - f(n.as_ref().ok()?)))
        .collect();
    median(differences)
}

/// One row of the table: the medians of a consumer's rounds at one rate,
/// and (for wharf) the medians of its rounds' differences to native's.
fn row(rate: u32, who: Setup, runs: &Runs, native: &Runs) -> String {
    let name = who.name();
    let ok: Vec<&Latency> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    if ok.is_empty() {
        let e = runs
            .iter()
            .find_map(|r| r.as_ref().err())
            .map_or("not run", |e| e.as_str());
        return format!(
            "| {rate} | {name} | error: {} | | | | |",
            e.lines().next().unwrap_or_default()
        );
    }
    // Some: `ok` is not empty.
    let median_of = |f: fn(&Latency) -> f64| median(ok.iter().map(|l| f(l)).collect()).unwrap_or_default();
    let failed = runs.len() - ok.len();
    let show_added = |f: fn(&Latency) -> f64| match (who.consumer, added(runs, native, f)) {
        (Consumer::Wharf, Some(d)) => format!("{d:+.0}"),
        _ => String::new(),
    };
    let failed = if failed > 0 {
        format!(" ({failed} round(s) failed)")
    } else {
        String::new()
    };
    format!(
        "| {rate} | {name}{failed} | {:.0} | {:.0} | {:.0} | {} | {} |",
        median_of(|l| l.p50_us),
        median_of(|l| l.p99_us),
        median_of(|l| l.delivered_per_s),
        show_added(|l| l.p50_us),
        show_added(|l| l.p99_us),
    )
}

/// The added-latency table of docs/BENCHMARKS.md: in `rounds` alternating
/// rounds, the native forwarder and wharf (default, and `instance_reuse`)
/// each run at a rate both sustain (5 000 msg/s) and at half the native
/// pipeline's maximum (the issue's load). That maximum is the native
/// forwarder's output while a producer offers it `saturating` msg/s (the
/// native drain's maximum, which the forwarding pipeline cannot reach).
/// A failed run is counted in `failures` and shown in its cell.
pub async fn table(
    component: &std::path::Path,
    rounds: usize,
    smoke: bool,
    saturating: Option<f64>,
    failures: &mut usize,
) -> Result<String> {
    let mut out = String::new();
    let seconds = Duration::from_secs(if smoke { 1 } else { 10 });
    let mut rates = vec![if smoke { 1000 } else { 5000 }];
    if let Some(offered) = saturating.filter(|_| !smoke) {
        let offered = offered as u32;
        match run(component, Setup::NATIVE, offered, Duration::from_secs(4)).await {
            Ok(l) => {
                eprintln!(
                    "latency: native pipeline at {offered} msg/s offered: {:.0} msg/s out",
                    l.delivered_per_s
                );
                writeln!(
                    out,
                    "\nThe native pipeline's maximum: {:.0} msg/s out while {offered} msg/s (the native drain's maximum) went in for 4 s{}.",
                    l.delivered_per_s,
                    if l.delivered_per_s >= 0.95 * f64::from(offered) {
                        " (it kept up: the maximum is at least this)"
                    } else {
                        ""
                    }
                )?;
                rates.push((l.delivered_per_s / 2.0) as u32);
            }
            Err(e) => {
                *failures += 1;
                eprintln!("latency: native pipeline at {offered} msg/s: FAILED: {e:#}");
                writeln!(out, "\nThe native pipeline's maximum: error: {e:#}")?;
            }
        }
    }
    // runs[rate][consumer]: a run per round.
    let mut runs: Vec<[Runs; CONSUMERS.len()]> = rates.iter().map(|_| Default::default()).collect();
    for round in 1..=rounds {
        for (&rate, at_rate) in rates.iter().zip(&mut runs) {
            for (&who, cell) in CONSUMERS.iter().zip(at_rate.iter_mut()) {
                let r = run(component, who, rate, seconds).await;
                let what = format!("round {round}: latency {rate} msg/s {}", who.name());
                match &r {
                    Ok(l) => eprintln!(
                        "{what}: p50 {:.0} µs, p99 {:.0} µs, {:.0} msg/s out",
                        l.p50_us, l.p99_us, l.delivered_per_s
                    ),
                    Err(e) => {
                        *failures += 1;
                        eprintln!("{what}: FAILED: {e:#}");
                    }
                }
                cell.push(r.map_err(|e| format!("{e:#}")));
            }
        }
    }
    writeln!(
        out,
        "\nEnd-to-end latency, Redis stream in → consumer (parse, publish to an output stream, ack) → out; open-loop producer for {}s, first fifth not counted; \
         the medians of {rounds} alternating round(s), and the medians of the rounds' own differences to native\n\n\
         | rate msg/s | consumer | p50 µs | p99 µs | delivered msg/s | added p50 µs | added p99 µs |\n|---|---|---|---|---|---|---|",
        seconds.as_secs()
    )?;
    for (&rate, at_rate) in rates.iter().zip(&runs) {
        // `at_rate[0]`: the native forwarder's runs (`CONSUMERS[0]`).
        for (&who, cell) in CONSUMERS.iter().zip(at_rate) {
            writeln!(out, "{}", row(rate, who, cell, &at_rate[0]))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(p50_us: f64, p99_us: f64) -> Result<Latency, String> {
        Ok(Latency {
            p50_us,
            p99_us,
            messages: 100,
            delivered_per_s: 5000.0,
        })
    }

    #[test]
    fn delivered_counts_only_what_arrived_while_the_producer_ran() {
        // (sent, latency, index), µs: arrivals at 1.1 s, 1.5 s, 2.9 s and,
        // after the producer stopped at 3 s, at 3.5 s.
        let samples = [
            (1_000_000, 100_000, 0),
            (1_400_000, 100_000, 1),
            (2_000_000, 900_000, 2),
            (2_500_000, 1_000_000, 3),
        ];
        assert_eq!(delivered_per_s(&samples, 1_000_000, 3_000_000), 1.5);
        assert_eq!(delivered_per_s(&samples, 1_200_000, 3_000_000), 2.0 / 1.8);
    }

    #[test]
    fn added_latency_is_the_median_of_the_rounds_own_differences() {
        let native = vec![ran(500.0, 900.0), ran(480.0, 2_000.0), ran(470.0, 700.0)];
        // Round 2 disturbed both; the medians of the cells would say +100,
        // the rounds' own differences say +50.
        let wharf = vec![ran(520.0, 950.0), ran(490.0, 2_300.0), ran(480.0, 750.0)];
        assert_eq!(added(&wharf, &native, |l| l.p99_us), Some(50.0));
        assert_eq!(added(&wharf, &native, |l| l.p50_us), Some(10.0));
        let row = row(5000, Setup::wharf(1, None), &wharf, &native);
        assert_eq!(row, "| 5000 | wharf | 490 | 950 | 5000 | +10 | +50 |");
    }

    #[test]
    fn a_failed_round_is_left_out_of_the_differences_and_said() {
        let native = vec![ran(500.0, 900.0), Err("redis down".into()), ran(470.0, 700.0)];
        let wharf = vec![ran(520.0, 950.0), ran(490.0, 2_300.0), Err("no".into())];
        assert_eq!(added(&wharf, &native, |l| l.p99_us), Some(50.0));
        assert_eq!(
            row(5000, Setup::wharf(REUSE, None), &wharf, &native),
            "| 5000 | wharf, `instance_reuse = 1000` (1 round(s) failed) | 520 | 2300 | 5000 | +20 | +50 |"
        );
        assert_eq!(
            row(5000, Setup::NATIVE, &native, &native),
            "| 5000 | native (1 round(s) failed) | 500 | 900 | 5000 |  |  |"
        );
        let failed = vec![Err("broker down\nmore".to_string())];
        assert_eq!(
            row(5000, Setup::NATIVE, &failed, &failed),
            "| 5000 | native | error: broker down | | | | |"
        );
    }

    #[test]
    fn a_setup_is_named_by_what_it_sets() {
        assert_eq!(Setup::NATIVE.name(), "native");
        assert_eq!(Setup::wharf(1, None).name(), "wharf");
        assert_eq!(Setup::wharf(1, Some(2)).name(), "wharf, `shards = 2`");
        assert_eq!(
            Setup::wharf(1000, Some(2)).name(),
            "wharf, `instance_reuse = 1000`, `shards = 2`"
        );
    }
}
