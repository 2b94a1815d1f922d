//! Added latency: an open-loop producer writes timestamped messages to a
//! Redis stream at a fixed rate whatever the consumer does; the consumer
//! (wharf's benchmark handler with `forward_to`, or the native forwarder)
//! parses each, publishes it to an output stream and acks it; a reader on the
//! output stream takes the end-to-end time of each. Same machine, same clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use tokio::process::Command;

use crate::Consumer;
use crate::measure::{self, Wharf};
use crate::paths::{self, Path, Target, Urls};

/// End-to-end latency of one run.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub messages: usize,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Run the producer, the consumer and the reader for `duration`; wharf's
/// handler has `instance_reuse` (1: a fresh instance per message).
pub async fn run(
    component: &std::path::Path,
    consumer: Consumer,
    rate: u32,
    duration: Duration,
    instance_reuse: u32,
) -> Result<Latency> {
    let urls = Urls::from_env();
    let run = format!("lat{:x}{}", std::process::id(), now_us() % 1_000_000);
    let t = Target::new(Path::RedisStream, &run);
    let out = format!("{}.out", t.subject);
    let who = Who {
        component,
        consumer,
        instance_reuse,
    };
    let result = measure_run(&who, rate, duration, &t, &out, &urls).await;
    paths::clean(&t, &urls).await?;
    result
}

/// The consumer under test.
#[derive(Clone, Copy)]
struct Who<'a> {
    component: &'a std::path::Path,
    consumer: Consumer,
    /// wharf's `instance_reuse`.
    instance_reuse: u32,
}

async fn measure_run(
    who: &Who<'_>,
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
    let Who {
        component,
        consumer,
        instance_reuse,
    } = *who;
    match consumer {
        Consumer::Wharf => {
            let dir = tempfile::tempdir()?;
            let data = dir.path().join("data");
            let manifest = dir.path().join("wharf.toml");
            let extra = format!(
                "publish = [\"bench.>\"]\ninstance_reuse = {instance_reuse}\nconfig = {{ forward_to = {out:?} }}\n"
            );
            std::fs::write(
                &manifest,
                crate::suite::wharf_manifest(component, t, urls, &data, 100, &extra),
            )?;
            wharf = Some(Wharf::start(&measure::wharf_binary()?, &manifest, &data).await?);
            _dir = dir;
        }
        Consumer::Native => {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.args([
                "native",
                "--path",
                "redis-stream",
                "--subject",
                &t.subject,
                "--stream",
                "-",
            ])
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
    let first_counted = now_us() - (duration.as_micros() as u64) + (duration.as_micros() as u64) / 5;
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
    })
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
