//! The broker paths the drain benchmark measures: for each, how to preload a
//! backlog, the manifest that points wharf at it, and the native consumer —
//! the same crates wharf uses, the same ack semantics and batch, no Wasm.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{FutureExt, StreamExt};

/// Where the brokers are (the machine's own, overridable like the tests).
pub struct Urls {
    pub redis: String,
    pub amqp: String,
    pub nats: String,
}

impl Urls {
    pub fn from_env() -> Self {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        Self {
            redis: var("WHARF_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
            amqp: var("WHARF_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            nats: var("WHARF_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        }
    }
}

/// One acked (or, for core NATS, unacked) path through a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Path {
    /// wharf's own embedded broker (no external service).
    Embedded,
    /// Redis streams: consumer group, XREADGROUP, XACK.
    RedisStream,
    /// Redis lists: BLMOVE into a processing list, LREM on ack.
    RedisList,
    /// RabbitMQ classic queue, manual acks.
    AmqpClassic,
    /// RabbitMQ quorum queue, manual acks.
    AmqpQuorum,
    /// NATS JetStream durable pull consumer, explicit acks.
    Jetstream,
    /// Core NATS subject: at-most-once, nothing to preload; the producer runs
    /// flat out against a running consumer.
    NatsCore,
}

impl Path {
    pub const ALL: [Path; 7] = [
        Path::Embedded,
        Path::RedisStream,
        Path::RedisList,
        Path::AmqpClassic,
        Path::AmqpQuorum,
        Path::Jetstream,
        Path::NatsCore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Embedded => "embedded",
            Path::RedisStream => "redis-stream",
            Path::RedisList => "redis-list",
            Path::AmqpClassic => "amqp-classic",
            Path::AmqpQuorum => "amqp-quorum",
            Path::Jetstream => "jetstream",
            Path::NatsCore => "nats-core",
        }
    }

    /// The broker's server process, by its name in `/proc/<pid>/comm`
    /// (`None` for the embedded broker, which runs inside wharf).
    pub fn broker_process(self) -> Option<&'static str> {
        match self {
            Path::Embedded => None,
            Path::RedisStream | Path::RedisList => Some("redis-server"),
            Path::AmqpClassic | Path::AmqpQuorum => Some("beam.smp"),
            Path::Jetstream | Path::NatsCore => Some("nats-server"),
        }
    }

    /// Whether a backlog can be preloaded (everything but core NATS).
    pub fn preloads(self) -> bool {
        self != Path::NatsCore
    }
}

/// The names one run uses, unique so runs never see each other's leftovers.
/// Also the arguments by which `drain` and `source-cost` tell their child
/// processes (the native consumer, the preload) where to work.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    #[arg(long, value_enum)]
    pub path: Path,
    /// Queue, stream key, list key or subject.
    #[arg(long)]
    pub subject: String,
    /// JetStream stream name.
    #[arg(long)]
    pub stream: String,
}

impl Target {
    /// The id of the `i`th message of this run: unique per run, so dedup
    /// marks (Redis keeps them per handler name) never carry over.
    pub fn message_id(&self, i: usize) -> String {
        format!("{}-{i}", self.subject)
    }

    /// The arguments a child process parses back into this target (the
    /// flattened `Target` of `native` and `preload`).
    pub fn args(&self) -> [&str; 6] {
        [
            "--path",
            self.path.name(),
            "--subject",
            &self.subject,
            "--stream",
            &self.stream,
        ]
    }

    pub fn new(path: Path, run: &str) -> Self {
        Self {
            path,
            subject: format!("bench.{run}"),
            stream: format!("BENCH_{}", run.replace(['.', '-'], "_")),
        }
    }
}

/// A JSON object of about `bytes` bytes.
pub fn payload(bytes: usize) -> Vec<u8> {
    let filler = "x".repeat(bytes.saturating_sub(40));
    serde_json::to_vec(&serde_json::json!({ "id": 12345, "kind": "bench", "pad": filler })).unwrap_or_default()
}

/// The `[brokers]` table and the handler's `source` for `t`.
pub fn manifest_source(t: &Target, urls: &Urls) -> (String, String) {
    let s = &t.subject;
    match t.path {
        Path::Embedded => (String::new(), format!("{{ subject = {s:?} }}")),
        Path::RedisStream | Path::RedisList => (
            format!("[brokers.b]\nkind = \"redis\"\nurl = {:?}\n", urls.redis),
            if t.path == Path::RedisStream {
                format!("{{ broker = \"b\", kind = \"stream\", subject = {s:?}, group = \"bench\" }}")
            } else {
                format!("{{ broker = \"b\", kind = \"list\", subject = {s:?} }}")
            },
        ),
        Path::AmqpClassic | Path::AmqpQuorum => (
            format!(
                "[brokers.b]\nkind = \"amqp\"\nurl = {:?}\n[[brokers.b.queues]]\nname = {s:?}\ntype = {:?}\n",
                urls.amqp,
                if t.path == Path::AmqpQuorum {
                    "quorum"
                } else {
                    "classic"
                }
            ),
            format!("{{ broker = \"b\", subject = {s:?} }}"),
        ),
        Path::Jetstream => (
            format!("[brokers.b]\nkind = \"nats\"\nurl = {:?}\n", urls.nats),
            format!(
                "{{ broker = \"b\", kind = \"jetstream\", stream = {:?}, subject = {s:?}, consumer = \"bench\" }}",
                t.stream
            ),
        ),
        Path::NatsCore => (
            format!("[brokers.b]\nkind = \"nats\"\nurl = {:?}\n", urls.nats),
            format!("{{ broker = \"b\", kind = \"core\", subject = {s:?} }}"),
        ),
    }
}

/// A Redis connection without the client's 500 ms response timeout (the
/// consumers block for longer than that).
pub async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client.get_multiplexed_async_connection_with_config(&config).await?)
}

async fn amqp_channel(url: &str) -> Result<lapin::Channel> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    // The connection lives as long as the process (one per benchmark run).
    std::mem::forget(conn);
    Ok(ch)
}

async fn amqp_declare(ch: &lapin::Channel, t: &Target) -> Result<()> {
    let mut args = lapin::types::FieldTable::default();
    if t.path == Path::AmqpQuorum {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(
        t.subject.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    Ok(())
}

async fn jetstream(url: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(url).await.context("connecting to NATS")?;
    Ok(async_nats::jetstream::new(client))
}

async fn jetstream_stream(
    js: &async_nats::jetstream::Context,
    t: &Target,
) -> Result<async_nats::jetstream::stream::Stream> {
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: t.stream.clone(),
        subjects: vec![t.subject.clone()],
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("creating stream {}: {e}", t.stream))
}

/// Put `n` messages of `body` on `t`, confirmed by the broker. Ids are
/// `m<i>`. Not for core NATS or the embedded broker (see the callers).
pub async fn preload(t: &Target, urls: &Urls, n: usize, body: &[u8]) -> Result<()> {
    const CHUNK: usize = 1000;
    let text = std::str::from_utf8(body)?;
    match t.path {
        Path::RedisStream | Path::RedisList => {
            let mut conn = redis_conn(&urls.redis).await?;
            let now = wharf::store::now_ms();
            for start in (0..n).step_by(CHUNK) {
                let mut pipe = redis::pipe();
                for i in start..(start + CHUNK).min(n) {
                    let id = t.message_id(i);
                    if t.path == Path::RedisStream {
                        pipe.cmd("XADD")
                            .arg(&t.subject)
                            .arg("*")
                            .arg("id")
                            .arg(&id)
                            .arg("payload")
                            .arg(body)
                            .arg("published-at")
                            .arg(now);
                    } else {
                        // wharf's job envelope (what `wharf publish` writes).
                        let job = serde_json::json!({ "id": id, "payload": text, "published_at": now });
                        pipe.cmd("LPUSH").arg(&t.subject).arg(job.to_string());
                    }
                    pipe.ignore();
                }
                let () = pipe.query_async(&mut conn).await?;
            }
        }
        Path::AmqpClassic | Path::AmqpQuorum => {
            let ch = amqp_channel(&urls.amqp).await?;
            amqp_declare(&ch, t).await?;
            ch.confirm_select(Default::default()).await?;
            for start in (0..n).step_by(CHUNK) {
                let mut confirms = Vec::with_capacity(CHUNK);
                for i in start..(start + CHUNK).min(n) {
                    let props = lapin::BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(t.message_id(i).into());
                    confirms.push(
                        ch.basic_publish("".into(), t.subject.as_str().into(), Default::default(), body, props)
                            .await?,
                    );
                }
                for c in confirms {
                    anyhow::ensure!(c.await?.is_ack(), "RabbitMQ refused a preload message");
                }
            }
            let _ = ch.close(200, "preloaded".into()).await;
        }
        Path::Jetstream => {
            let js = jetstream(&urls.nats).await?;
            jetstream_stream(&js, t).await?;
            let body = bytes::Bytes::copy_from_slice(body);
            for start in (0..n).step_by(CHUNK) {
                let mut acks = Vec::with_capacity(CHUNK);
                for i in start..(start + CHUNK).min(n) {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", t.message_id(i).as_str());
                    acks.push(
                        js.publish_with_headers(t.subject.clone(), headers, body.clone())
                            .await
                            .map_err(|e| anyhow!("{e}"))?,
                    );
                }
                for a in acks {
                    a.await.map_err(|e| anyhow!("preload ack: {e}"))?;
                }
            }
        }
        Path::Embedded | Path::NatsCore => bail!("{} has no external backlog to preload", t.path.name()),
    }
    Ok(())
}

/// Publish `n` messages to a core NATS subject as fast as the client goes.
pub async fn publish_core(t: &Target, urls: &Urls, n: usize, body: &[u8]) -> Result<()> {
    let client = async_nats::connect(urls.nats.as_str()).await?;
    let body = bytes::Bytes::copy_from_slice(body);
    for _ in 0..n {
        client.publish(t.subject.clone(), body.clone()).await?;
    }
    client.flush().await?;
    Ok(())
}

/// Delete what a run left on the broker.
pub async fn clean(t: &Target, urls: &Urls) -> Result<()> {
    match t.path {
        Path::RedisStream | Path::RedisList => {
            let mut conn = redis_conn(&urls.redis).await?;
            // Ours, BullMQ's (`bull:<queue>:*`), and the dedup marks of the
            // benchmark handler (ids are `<subject>-<n>`), which would
            // otherwise stay for their TTL and grow Redis run after run.
            let mut keys: Vec<String> = Vec::new();
            for pattern in [
                format!("{}*", t.subject),
                format!("bull:{}*", t.subject),
                format!("wharf:dedup:bench:{}-*", t.subject),
            ] {
                let found: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await?;
                keys.extend(found);
            }
            for k in keys {
                let () = redis::cmd("DEL").arg(k).query_async(&mut conn).await?;
            }
        }
        Path::AmqpClassic | Path::AmqpQuorum => {
            let ch = amqp_channel(&urls.amqp).await?;
            for q in [
                t.subject.clone(),
                format!("{}.wharf-retry", t.subject),
                format!("{}.dead", t.subject),
            ] {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
        }
        Path::Jetstream => {
            let js = jetstream(&urls.nats).await?;
            let _ = js.delete_stream(&t.stream).await;
        }
        Path::Embedded | Path::NatsCore => {}
    }
    Ok(())
}

/// The native stream consumers' group `bench`, created (reading from
/// `start`) unless it exists.
pub async fn ensure_group(conn: &mut redis::aio::MultiplexedConnection, stream: &str, start: &str) -> Result<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("bench")
        .arg(start)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

/// Up to `batch` new entries of `stream` for consumer `native` of group
/// `bench` (blocking up to a second): each entry's id and `payload` field.
pub async fn read_group(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    batch: usize,
) -> Result<Vec<(String, Option<Vec<u8>>)>> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("bench")
        .arg("native")
        .arg("COUNT")
        .arg(batch)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(reply
        .keys
        .into_iter()
        .flat_map(|key| key.ids)
        .map(|entry| {
            let body = match entry.map.get("payload") {
                Some(redis::Value::BulkString(body)) => Some(body.clone()),
                _ => None,
            };
            (entry.id, body)
        })
        .collect())
}

/// `XACK` `ids` of `stream` for group `bench`.
pub async fn ack_group(conn: &mut redis::aio::MultiplexedConnection, stream: &str, ids: &[String]) -> Result<()> {
    let _: usize = redis::cmd("XACK")
        .arg(stream)
        .arg("bench")
        .arg(ids)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Counts handled messages and tells the parent: `ready` once consuming,
/// `first` at the first message, `done` at the `n`th.
struct Progress {
    n: usize,
    seen: usize,
}

impl Progress {
    fn new(n: usize) -> Self {
        println!("ready");
        Self { n, seen: 0 }
    }

    /// Count `k` handled; true when all are.
    fn handled(&mut self, k: usize) -> bool {
        if self.seen == 0 && k > 0 {
            println!("first");
        }
        self.seen += k;
        if self.seen >= self.n {
            println!("done");
            return true;
        }
        false
    }
}

/// What a handler does with a message: parse the JSON.
pub(crate) fn parse(body: &[u8]) -> Result<()> {
    let _: serde_json::Value = serde_json::from_slice(body)?;
    Ok(())
}

/// The native consumer for `t`: consume `n` messages with up to `batch` in
/// flight, parse each, ack each the way wharf does. Prints progress lines.
pub async fn native(t: &Target, urls: &Urls, n: usize, batch: usize) -> Result<()> {
    match t.path {
        Path::RedisStream => {
            let mut conn = redis_conn(&urls.redis).await?;
            ensure_group(&mut conn, &t.subject, "0").await?;
            let mut progress = Progress::new(n);
            loop {
                let entries = read_group(&mut conn, &t.subject, batch).await?;
                if entries.is_empty() {
                    continue;
                }
                let mut ids = Vec::with_capacity(entries.len());
                for (id, body) in entries {
                    if let Some(body) = body {
                        parse(&body)?;
                    }
                    ids.push(id);
                }
                ack_group(&mut conn, &t.subject, &ids).await?;
                if progress.handled(ids.len()) {
                    return Ok(());
                }
            }
        }
        Path::RedisList => {
            let mut conn = redis_conn(&urls.redis).await?;
            let processing = format!("{}:processing:native", t.subject);
            let mut progress = Progress::new(n);
            loop {
                let first: Option<String> = redis::cmd("BLMOVE")
                    .arg(&t.subject)
                    .arg(&processing)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .arg(1.0)
                    .query_async(&mut conn)
                    .await?;
                let Some(first) = first else { continue };
                let mut items = vec![first];
                let mut pipe = redis::pipe();
                for _ in 1..batch {
                    pipe.cmd("LMOVE")
                        .arg(&t.subject)
                        .arg(&processing)
                        .arg("RIGHT")
                        .arg("LEFT");
                }
                if batch > 1 {
                    let more: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
                    items.extend(more.into_iter().flatten());
                }
                let mut acks = redis::pipe();
                for item in &items {
                    let job: serde_json::Value = serde_json::from_str(item)?;
                    parse(job["payload"].as_str().unwrap_or("{}").as_bytes())?;
                    acks.cmd("LREM").arg(&processing).arg(-1).arg(item).ignore();
                }
                let () = acks.query_async(&mut conn).await?;
                if progress.handled(items.len()) {
                    return Ok(());
                }
            }
        }
        Path::AmqpClassic | Path::AmqpQuorum => {
            use lapin::options::{BasicAckOptions, BasicQosOptions};
            let ch = amqp_channel(&urls.amqp).await?;
            amqp_declare(&ch, t).await?;
            ch.basic_qos(u16::try_from(batch).unwrap_or(u16::MAX), BasicQosOptions::default())
                .await?;
            let mut consumer = ch
                .basic_consume(
                    t.subject.as_str().into(),
                    "native".into(),
                    Default::default(),
                    Default::default(),
                )
                .await?;
            let mut progress = Progress::new(n);
            // Parse what has arrived, then one `basic.ack(multiple)` for it.
            while let Some(first) = consumer.next().await {
                let mut last = first?;
                parse(&last.data)?;
                let mut k = 1;
                // What has already arrived, without waiting (a zero
                // `timeout` waits for the timer's next tick, up to 1 ms).
                while let Some(Some(next)) = consumer.next().now_or_never() {
                    last = next?;
                    parse(&last.data)?;
                    k += 1;
                }
                ch.basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
                if progress.handled(k) {
                    return Ok(());
                }
            }
            bail!("the consumer was cancelled")
        }
        Path::Jetstream => {
            use async_nats::jetstream::consumer::{AckPolicy, pull};
            let js = jetstream(&urls.nats).await?;
            let stream = jetstream_stream(&js, t).await?;
            let consumer = stream
                .get_or_create_consumer(
                    "native",
                    pull::Config {
                        durable_name: Some("native".into()),
                        ack_policy: AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let mut progress = Progress::new(n);
            loop {
                let mut messages = consumer
                    .fetch()
                    .max_messages(batch)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let mut k = 0;
                while let Some(m) = messages.next().await {
                    let m = m.map_err(|e| anyhow!("{e}"))?;
                    parse(&m.payload)?;
                    m.ack().await.map_err(|e| anyhow!("{e}"))?;
                    k += 1;
                }
                if progress.handled(k) {
                    return Ok(());
                }
            }
        }
        Path::NatsCore => {
            let client = async_nats::connect(urls.nats.as_str()).await?;
            let mut sub = client.subscribe(t.subject.clone()).await?;
            client.flush().await?;
            let mut progress = Progress::new(n);
            while let Some(m) = sub.next().await {
                parse(&m.payload)?;
                if progress.handled(1) {
                    return Ok(());
                }
            }
            bail!("subscription ended")
        }
        Path::Embedded => bail!("the embedded broker is wharf's own; it has no native consumer"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Child {
        #[command(flatten)]
        target: Target,
    }

    #[test]
    fn a_targets_arguments_parse_back_into_it() {
        for path in [Path::RedisStream, Path::AmqpQuorum, Path::Jetstream] {
            let t = Target::new(path, "run-1.2");
            let parsed = Child::try_parse_from(std::iter::once("child").chain(t.args()))
                .unwrap()
                .target;
            assert_eq!(
                (parsed.path, parsed.subject, parsed.stream),
                (t.path, t.subject, t.stream)
            );
        }
    }
}
