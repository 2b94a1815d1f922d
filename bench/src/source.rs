//! `source-cost`: JetStream's consumer side in process, without the engine
//! or the Wasm call, so that what wharf's source spends per message
//! (turning pulled messages into deliveries, holding them, the acks' trip
//! to the client) can be set against the native consumer's whole cost, and
//! counted under callgrind (`scripts/bench-instructions`).
//!
//! `drain` times the three parts of a wharf message together (the Wasm call,
//! the engine, the broker side); `wasm-cost` and `engine-cost` measure the
//! first two alone. This measures the third. The backlog is preloaded by a
//! child process (`wharf-bench preload`), so that neither a timing nor a
//! callgrind count of this process has the publishing in it.
//!
//! wharf's source is driven the way the engine drives it: up to
//! `concurrency` messages in flight, a receive for the free slots whenever
//! some are free, each message parsed and acked on its own. The native
//! consumer is `drain`'s: fetch a batch, parse and ack each, fetch again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use wharf::broker::nats::NatsBroker;
use wharf::broker::{Delivery, Source};

use crate::paths::{self, Path, Target, Urls};
use crate::{Consumer, cpu_seconds};

/// How long wharf's source holds a message before the broker may deliver
/// it again: far longer than a run.
const LEASE: Duration = Duration::from_secs(300);

/// `wharf-bench source-cost`: preload `messages` on a JetStream stream,
/// consume them with `consumer` in process, and say msg/s and CPU µs per
/// message. JetStream only, the acked path furthest from its target; the
/// other sources would need the engine's settling budget (a Redis stream's
/// acks ride on its next read) driven too.
pub async fn source_cost(
    consumer: Consumer,
    messages: usize,
    payload_bytes: usize,
    concurrency: usize,
) -> Result<(f64, f64)> {
    let path = Path::Jetstream;
    let urls = Urls::from_env();
    let t = Target::new(path, &crate::suite::run_id());
    let preloaded = preload(&t, messages, payload_bytes).await;
    let consumed = match preloaded {
        Ok(()) => consume(&t, &urls, consumer, messages, concurrency).await,
        Err(e) => Err(e),
    };
    let cleaned = paths::clean(&t, &urls).await;
    let (rate, cpu_us) = consumed?;
    cleaned?;
    println!(
        "source-cost {} {consumer:?} messages={messages} payload={payload_bytes}B concurrency={concurrency}: {rate:.0} msg/s, {cpu_us:.2} µs CPU/msg",
        path.name()
    );
    Ok((rate, cpu_us))
}

/// Preload in a child process (`wharf-bench preload`), out of this one's
/// CPU and instruction counts.
async fn preload(t: &Target, messages: usize, payload_bytes: usize) -> Result<()> {
    let (messages, payload_bytes) = (messages.to_string(), payload_bytes.to_string());
    let status = tokio::process::Command::new(std::env::current_exe()?)
        .arg("preload")
        .args(t.args())
        .args(["--messages", &messages, "--payload-bytes", &payload_bytes])
        .status()
        .await
        .context("starting the preload")?;
    anyhow::ensure!(status.success(), "the preload failed: {status}");
    Ok(())
}

/// Consume `messages` from `t` with `consumer`: (msg/s, CPU µs per message),
/// from the connection to the last ack.
async fn consume(
    t: &Target,
    urls: &Urls,
    consumer: Consumer,
    messages: usize,
    concurrency: usize,
) -> Result<(f64, f64)> {
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let wharf = match consumer {
        Consumer::Wharf => Some(wharf_source(t, urls, messages, concurrency).await?),
        Consumer::Native => {
            paths::native(t, urls, messages, concurrency).await?;
            None
        }
        Consumer::Peer => {
            bail!("source-cost compares wharf's source with the native consumer; the peers have no part to split off")
        }
    };
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    if let Some((broker, source)) = wharf {
        // Outside the window, as the native consumer has nothing to stop:
        // every message is settled, so the stop gives nothing back, but it
        // waits for the last pull ahead, which the server holds until it
        // expires (a second) when the stream has run dry.
        source.stop().await;
        broker.flush().await;
    }
    Ok((messages as f64 / wall, cpu * 1e6 / messages as f64))
}

/// wharf's JetStream source, driven as the engine drives it, with the
/// benchmark handler's work (a JSON parse) done in process, until every
/// message is settled; the broker and the source, still to be stopped.
async fn wharf_source(
    t: &Target,
    urls: &Urls,
    messages: usize,
    concurrency: usize,
) -> Result<(Arc<NatsBroker>, Arc<dyn Source>)> {
    let broker = Arc::new(NatsBroker::connect(&urls.nats, Vec::new()).await?);
    let source = broker.jetstream_source(&t.stream, "wharf", &t.subject, LEASE, false, concurrency);
    let settle = |d: Delivery| async move {
        paths::parse(&d.payload).with_context(|| format!("message {}", d.id))?;
        d.acker.ack().await.with_context(|| format!("acking {}", d.id))
    };
    let mut in_flight = FuturesUnordered::new();
    let (mut received, mut settled) = (0, 0);
    while settled < messages {
        let free = concurrency - in_flight.len();
        if free > 0 && received < messages {
            let batch = source.receive(free, LEASE).await?;
            received += batch.len();
            in_flight.extend(batch.into_iter().map(settle));
        }
        // Wait for one attempt when no slot is free (or nothing more will
        // come), then take every other that is done.
        if (free == 0 || received >= messages)
            && let Some(done) = in_flight.next().await
        {
            done?;
            settled += 1;
        }
        while let Some(Some(done)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
            done?;
            settled += 1;
        }
    }
    Ok((broker, source))
}
