//! Redis as a broker: streams with consumer groups, reliable lists (the job
//! queue), and pub/sub.
//!
//! | source `kind` | delivery | attempt count | retry | dead letter |
//! |---|---|---|---|---|
//! | `stream` | `XREADGROUP` batches; acks batched into one `XACK`, sent with the next read while there is a backlog ([`stream_acks`]) | the entry's delivery counter | entry stays pending; `XCLAIM`ed back after the delay | `MULTI { XADD <dlq>; XACK }` |
//! | `list` | `BLMOVE` into `<queue>:processing:<consumer>` | `attempts` in the job envelope | `LREM` + `ZADD <queue>:delayed` (one Lua script), due by Redis' clock | `LREM` + `LPUSH <dlq>` (one Lua script) |
//! | `channel`, `pattern` | `SUBSCRIBE` / `PSUBSCRIBE` | 1 | in memory only | `XADD <dlq>` |
//!
//! **Pub/sub is at-most-once**: a message published while no host is
//! subscribed, or in flight when the host dies, is gone. `wharf check` warns.
//!
//! Crash recovery:
//! - streams: on start a host first re-reads its own pending entries (same
//!   consumer name); a janitor `XAUTOCLAIM`s entries other consumers left idle
//!   for longer than the lease plus the longest retry delay (so a live host's
//!   scheduled retry is never stolen).
//! - lists: each consumer keeps a heartbeat key alive; a reaper returns the
//!   processing list of a consumer whose heartbeat expired to the queue,
//!   counting the interrupted attempt, in one Lua script. On start a host
//!   returns its own processing list the same way.
//!
//! Connections are made lazily and remade after any connection error, so a
//! host starts (not ready) while Redis is down and recovers when it is back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{Acker, Delivery, OutboundMessage, Sink, Source};
use crate::delivery::{Claim, DedupStore};
use crate::store::now_ms;

/// How long a blocking read waits before looking at retries and the janitor.
const BLOCK: Duration = Duration::from_secs(1);
/// Response timeout of command connections.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily made connection that is dropped after a connection error and
/// made again on next use. Its state is the broker's readiness.
struct Conn {
    client: redis::Client,
    response_timeout: Duration,
    slot: Mutex<Option<MultiplexedConnection>>,
    health: Arc<Health>,
}

/// Whether the broker's connections currently work.
#[derive(Default)]
pub struct Health {
    up: AtomicBool,
    url: String,
}

impl Health {
    /// True while the last connection attempt or command succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn set(&self, up: bool, why: Option<&RedisError>) {
        let was = self.up.swap(up, Ordering::SeqCst);
        match (was, up) {
            (false, true) => tracing::info!(url = %self.url, "connected to Redis"),
            (true, false) => {
                tracing::warn!(url = %self.url, error = %why.map(|e| e.to_string()).unwrap_or_default(), "lost the Redis connection; reconnecting")
            }
            _ => {}
        }
    }
}

impl Conn {
    fn new(client: redis::Client, response_timeout: Duration, health: Arc<Health>) -> Self {
        Self {
            client,
            response_timeout,
            slot: Mutex::new(None),
            health,
        }
    }

    async fn get(&self) -> Result<MultiplexedConnection> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.response_timeout));
        match self.client.get_multiplexed_async_connection_with_config(&config).await {
            Ok(c) => {
                self.health.set(true, None);
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.health.set(false, Some(&e));
                Err(anyhow!(e).context(format!("connecting to Redis at {}", self.health.url)))
            }
        }
    }

    /// Note the outcome of a command: a connection-level failure drops the
    /// connection so the next call reconnects.
    async fn observe<T>(&self, result: Result<T, RedisError>) -> Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() {
                    *self.slot.lock().await = None;
                    self.health.set(false, Some(&e));
                }
                Err(anyhow!(e))
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut c = self.get().await?;
        let r = cmd.query_async(&mut c).await;
        self.observe(r).await
    }

    async fn pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let mut c = self.get().await?;
        let r = pipe.query_async(&mut c).await;
        self.observe(r).await
    }

    async fn script<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T> {
        let mut c = self.get().await?;
        let r = inv.invoke_async(&mut c).await;
        self.observe(r).await
    }
}

/// What kind of Redis source or sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisKind {
    /// A stream read by a consumer group.
    Stream,
    /// A list used as a reliable job queue.
    List,
    /// A pub/sub channel.
    Channel,
    /// A pub/sub channel pattern (sources only).
    Pattern,
}

/// A Redis broker connection.
pub struct RedisBroker {
    client: redis::Client,
    consumer: String,
    commands: Arc<Conn>,
    health: Arc<Health>,
}

impl RedisBroker {
    /// A broker for `url` with this host's stable consumer name. Does not
    /// connect: connections are made on first use and remade after errors.
    pub fn new(url: &str, consumer: String) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("invalid Redis URL {url:?}"))?;
        let health = Arc::new(Health {
            up: AtomicBool::new(false),
            url: redact(url),
        });
        let commands = Arc::new(Conn::new(client.clone(), COMMAND_TIMEOUT, health.clone()));
        Ok(Self {
            client,
            consumer,
            commands,
            health,
        })
    }

    /// Whether Redis is reachable right now.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Try to connect once (at start-up, to report readiness early).
    pub async fn probe(&self) -> Result<()> {
        let _: String = self.commands.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// A source of `kind` on `subject`. `group` is the stream consumer
    /// group; `reclaim_after` how long a stream entry must sit idle in a dead
    /// consumer's pending list before the janitor takes it.
    pub fn source(&self, kind: RedisKind, subject: &str, group: &str, reclaim_after: Duration) -> Arc<dyn Source> {
        let blocking = || {
            Arc::new(Conn::new(
                self.client.clone(),
                BLOCK + COMMAND_TIMEOUT,
                self.health.clone(),
            ))
        };
        match kind {
            RedisKind::Stream => Arc::new(StreamSource::new(
                self.commands.clone(),
                blocking(),
                subject,
                group,
                &self.consumer,
                reclaim_after,
            )),
            RedisKind::List => Arc::new(ListSource::new(
                self.commands.clone(),
                blocking(),
                subject,
                &self.consumer,
            )),
            RedisKind::Channel | RedisKind::Pattern => Arc::new(PubSubSource::new(
                self.client.clone(),
                self.commands.clone(),
                self.health.clone(),
                subject,
                kind == RedisKind::Pattern,
            )),
        }
    }

    /// A sink publishing to streams (trimmed to about `maxlen` when given),
    /// lists or channels.
    pub fn sink(&self, kind: RedisKind, maxlen: Option<u64>) -> Arc<dyn Sink> {
        Arc::new(RedisSink {
            commands: self.commands.clone(),
            kind,
            maxlen,
        })
    }

    /// Dedup marks kept in Redis, shared by every host using it.
    pub fn dedup(&self) -> Arc<dyn DedupStore> {
        Arc::new(RedisDedup {
            commands: self.commands.clone(),
            claims: Default::default(),
            marks: Default::default(),
        })
    }
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_and_auth, host)) => {
            let scheme = scheme_and_auth.split("://").next().unwrap_or("redis");
            format!("{scheme}://***@{host}")
        }
        None => url.to_string(),
    }
}

// ---------------------------------------------------------------- messages

/// The JSON envelope of a list job (and the fields of a stream entry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Envelope {
    id: String,
    #[serde(with = "payload_text")]
    payload: Vec<u8>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
    /// Attempts made before this delivery (list jobs only).
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    published_at: u64,
}

/// Payloads are stored as text when they are UTF-8 (readable in redis-cli),
/// else as `{"b16": "<hex>"}`.
mod payload_text {
    use std::fmt;

    use serde::de::{self, MapAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    struct Hex {
        b16: String,
    }

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Hex {
                b16: hex::encode(bytes),
            }
            .serialize(s),
        }
    }

    /// A visitor rather than an untagged enum: the enum buffers the whole
    /// payload into serde's `Content` and copies it again, per message.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(PayloadVisitor)
    }

    struct PayloadVisitor;

    impl<'de> Visitor<'de> for PayloadVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a string or {"b16": "<hex>"}"#)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<u8>, E> {
            Ok(v.into_bytes())
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<u8>, A::Error> {
            let mut b16: Option<String> = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == "b16" {
                    b16 = Some(map.next_value()?);
                } else {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            let b16 = b16.ok_or_else(|| de::Error::missing_field("b16"))?;
            hex::decode(b16).map_err(de::Error::custom)
        }
    }
}

impl Envelope {
    fn from_outbound(m: &OutboundMessage) -> Self {
        Self {
            id: m
                .id
                .clone()
                .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
            payload: m.payload.to_vec(),
            headers: m.headers.clone(),
            content_type: m.content_type.clone(),
            reply_to: m.reply_to.clone(),
            attempts: 0,
            published_at: now_ms(),
        }
    }

    /// A list item: our envelope, or anything else pushed by a foreign
    /// producer, whose raw text becomes the payload and whose hash the id.
    fn from_list_item(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_else(|_| {
            use sha2::Digest;
            Self {
                id: hex::encode(&sha2::Sha256::digest(raw.as_bytes())[..16]),
                payload: raw.as_bytes().to_vec(),
                headers: vec![],
                content_type: None,
                reply_to: None,
                attempts: 0,
                published_at: 0,
            }
        })
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Stream entry fields.
    fn stream_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            ("id", self.id.as_bytes().to_vec()),
            ("payload", self.payload.clone()),
            ("published-at", self.published_at.to_string().into_bytes()),
        ];
        if !self.headers.is_empty() {
            f.push(("headers", serde_json::to_vec(&self.headers).unwrap_or_default()));
        }
        if let Some(ct) = &self.content_type {
            f.push(("content-type", ct.as_bytes().to_vec()));
        }
        if let Some(r) = &self.reply_to {
            f.push(("reply-to", r.as_bytes().to_vec()));
        }
        f
    }

    /// From stream entry fields, taken: the payload moves, uncopied. An
    /// entry without a `payload` field (a foreign producer's) becomes a JSON
    /// object of its fields.
    fn from_stream_fields(entry_id: &str, mut fields: Vec<(String, Vec<u8>)>) -> Self {
        // Taking it out reorders the rest, which only a foreign entry's
        // object (an entry with no payload field) would show.
        let payload = fields
            .iter()
            .position(|(f, _)| f == "payload")
            .map(|at| fields.swap_remove(at).1);
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_slice());
        let text = |k: &str| get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let payload = payload.unwrap_or_else(|| {
            let obj: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                    )
                })
                .collect();
            serde_json::to_vec(&obj).unwrap_or_default()
        });
        Self {
            id: text("id").unwrap_or_else(|| entry_id.to_string()),
            payload,
            headers: get("headers")
                .and_then(|h| serde_json::from_slice(h).ok())
                .unwrap_or_default(),
            content_type: text("content-type"),
            reply_to: text("reply-to"),
            attempts: 0,
            published_at: text("published-at")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| entry_ms(entry_id)),
        }
    }

    fn into_delivery(self, subject: &str, attempt: u32, acker: Box<dyn Acker>) -> Delivery {
        Delivery {
            id: self.id,
            subject: subject.to_string(),
            payload: Bytes::from(self.payload),
            headers: self.headers,
            content_type: self.content_type,
            reply_to: self.reply_to,
            attempt,
            redelivered: attempt > 1,
            first_seen_ms: self.published_at,
            acker,
        }
    }
}

/// The millisecond part of a stream entry id (`<ms>-<seq>`).
fn entry_ms(entry_id: &str) -> u64 {
    entry_id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------- reply parsing

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The items of an array (or set) reply, taken; anything else has none.
fn into_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => vec![],
    }
}

/// `[[id, [field, value, ...]], ...]` → entries (nil entries — deleted while
/// pending — are returned with no fields so they can be acked away). Takes
/// the reply, so values (the payload) move into the entry uncopied.
fn parse_entries(v: Value) -> Vec<Entry> {
    into_array(v)
        .into_iter()
        .filter_map(|e| {
            let mut parts = into_array(e).into_iter();
            let id = text(&parts.next()?)?;
            let mut kv = parts.next().map(into_array).unwrap_or_default().into_iter();
            let mut fields = Vec::with_capacity(kv.len() / 2);
            while let (Some(k), Some(val)) = (kv.next(), kv.next()) {
                let val = match val {
                    Value::BulkString(b) => Some(b),
                    other => text(&other).map(String::into_bytes),
                };
                if let (Some(k), Some(val)) = (text(&k), val) {
                    fields.push((k, val));
                }
            }
            Some((id, fields))
        })
        .collect()
}

/// The entries in the second place of an array reply: a stream's in
/// XREADGROUP's `[stream, entries]`, XAUTOCLAIM's `[cursor, entries, ...]`.
fn second_entries(v: Value) -> Vec<Entry> {
    into_array(v).into_iter().nth(1).map(parse_entries).unwrap_or_default()
}

/// XREADGROUP reply (RESP2: `[[stream, entries]]`, or nil).
fn parse_read(v: Value) -> Vec<Entry> {
    match v {
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| parse_entries(entries))
            .collect(),
        v => into_array(v).into_iter().flat_map(second_entries).collect(),
    }
}

// ---------------------------------------------------------------- streams

struct StreamSource {
    inner: Arc<StreamShared>,
    blocking: Arc<Conn>,
    state: Mutex<StreamState>,
}

struct StreamShared {
    commands: Arc<Conn>,
    stream: String,
    group: String,
    consumer: String,
    reclaim_after: Duration,
    acks: mpsc::UnboundedSender<PendingAck>,
    /// Acks the ack task has taken and not yet sent, for the next read to
    /// carry ([`stream_acks`]).
    parked: std::sync::Mutex<Vec<PendingAck>>,
    /// The last read of new entries came back full: more are waiting.
    backlog: AtomicBool,
    /// Ends the parked acks' wait for a read ([`Source::flush_acks`]). A
    /// wake-up with no ack parked is kept and ends the next wait early: one
    /// `XACK` of its own, never an ack held longer.
    ack_now: Notify,
    /// Retries waiting for their delay: (due, entry id) → next attempt. The
    /// entry itself stays pending in Redis, so a crash loses only the timer:
    /// a restart re-reads it, or another host's janitor reclaims it.
    retries: std::sync::Mutex<BTreeMap<(Instant, String), u32>>,
}

#[derive(Default)]
struct StreamState {
    group_ready: bool,
    /// Own pending entries from a previous run have been re-read.
    recovered: bool,
    /// How far the re-read of our own pending entries has got.
    recovery_cursor: Option<String>,
    last_janitor: Option<Instant>,
}

impl StreamShared {
    fn retries(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Instant, String), u32>> {
        self.retries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<PendingAck>> {
        self.parked.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `XREADGROUP` of up to `max` entries from `from` (`>`: new ones; an
    /// id: this consumer's pending ones after it), waiting up to `block` for
    /// new ones when given.
    fn xreadgroup(&self, max: usize, block: Option<Duration>, from: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        cmd
    }

    /// The parked acks, taken to be sent by whoever takes them.
    fn take_parked(&self) -> Vec<PendingAck> {
        std::mem::take(&mut *self.parked())
    }
}

impl StreamSource {
    fn new(
        commands: Arc<Conn>,
        blocking: Arc<Conn>,
        stream: &str,
        group: &str,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Self {
        let (acks, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(StreamShared {
            commands,
            stream: stream.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            reclaim_after,
            acks,
            parked: Default::default(),
            backlog: AtomicBool::new(false),
            ack_now: Notify::new(),
            retries: Default::default(),
        });
        tokio::spawn(stream_acks(Arc::downgrade(&inner), rx));
        Self {
            inner,
            blocking,
            state: Mutex::new(StreamState::default()),
        }
    }

    async fn ensure_group(&self, state: &mut StreamState) -> Result<()> {
        if state.group_ready {
            return Ok(());
        }
        let s = &self.inner;
        // From the start of the stream: a backlog written before the first
        // host started is work too.
        let r: Result<String> = s
            .commands
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&s.stream)
                    .arg(&s.group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match r {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e.context(format!("creating consumer group {} on stream {}", s.group, s.stream))),
        }
        state.group_ready = true;
        Ok(())
    }

    /// Delivery counts of entries pending for this consumer, by id.
    async fn delivery_counts(&self, ids: &[String]) -> Result<std::collections::HashMap<String, u32>> {
        let s = &self.inner;
        let mut out = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(&s.stream)
                .arg(&s.group)
                .arg(id)
                .arg(id)
                .arg(1)
                .arg(&s.consumer);
        }
        let replies: Vec<Value> = s.commands.pipe(&pipe).await?;
        for reply in replies {
            for row in into_array(reply) {
                let r = into_array(row);
                if let (Some(id), Some(Value::Int(n))) = (r.first().and_then(text), r.get(3)) {
                    out.insert(id, *n as u32);
                }
            }
        }
        Ok(out)
    }

    fn deliveries(&self, entries: Vec<Entry>, attempt_of: impl Fn(&str) -> u32) -> (Vec<Delivery>, Vec<String>) {
        let mut out = Vec::new();
        let mut deleted = Vec::new();
        for (entry_id, fields) in entries {
            if fields.is_empty() {
                // Deleted (e.g. trimmed) while pending: nothing to deliver.
                deleted.push(entry_id);
                continue;
            }
            let attempt = attempt_of(&entry_id).max(1);
            let env = Envelope::from_stream_fields(&entry_id, fields);
            let acker = Box::new(StreamAcker {
                shared: self.inner.clone(),
                entry_id,
                attempt,
            });
            out.push(env.into_delivery(&self.inner.stream, attempt, acker));
        }
        (out, deleted)
    }

    /// Deliveries for `entries`. Entries deleted from the stream while they
    /// were pending (trimmed) have no data left to deliver: they are acked
    /// away, and said so.
    async fn deliver(&self, entries: Vec<Entry>, attempt_of: impl Fn(&str) -> u32) -> Result<Vec<Delivery>> {
        let (out, deleted) = self.deliveries(entries, attempt_of);
        if !deleted.is_empty() {
            tracing::warn!(
                stream = %self.inner.stream,
                entries = ?deleted,
                "entries were deleted from the stream (trimmed?) while pending; their data is gone, acking them away"
            );
            self.ack_ids(&deleted).await?;
        }
        Ok(out)
    }

    /// [`Self::deliver`] for entries whose delivery counts Redis keeps
    /// (re-read or reclaimed ones).
    async fn deliver_counted(&self, entries: Vec<Entry>) -> Result<Vec<Delivery>> {
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let counts = self.delivery_counts(&ids).await?;
        self.deliver(entries, |id| counts.get(id).copied().unwrap_or(1)).await
    }

    async fn ack_ids(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let s = &self.inner;
        let _: i64 = s
            .commands
            .query(redis::cmd("XACK").arg(&s.stream).arg(&s.group).arg(ids))
            .await?;
        Ok(())
    }

    async fn claim(&self, ids: &[String], min_idle: Duration) -> Result<Vec<Entry>> {
        let s = &self.inner;
        let reply: Value = s
            .commands
            .query(
                redis::cmd("XCLAIM")
                    .arg(&s.stream)
                    .arg(&s.group)
                    .arg(&s.consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg(ids),
            )
            .await?;
        Ok(parse_entries(reply))
    }
}

#[async_trait]
impl Source for StreamSource {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        let received = self.read(max).await;
        if let Err(e) = &received
            && e.downcast_ref::<RedisError>().and_then(RedisError::code) == Some("NOGROUP")
        {
            // The group is gone: a Redis that came back without its data, or
            // the stream deleted. Make it again (from the stream's start)
            // before the next read.
            self.state.lock().await.group_ready = false;
        }
        received
    }

    fn flush_acks(&self) {
        self.inner.ack_now.notify_one();
    }
}

impl StreamSource {
    async fn read(&self, max: usize) -> Result<Vec<Delivery>> {
        let mut state = self.state.lock().await;
        self.ensure_group(&mut state).await?;
        let s = &self.inner;

        if !state.recovered {
            // Our own pending entries from before a restart.
            let from = state.recovery_cursor.as_deref().unwrap_or("0");
            let reply: Value = s.commands.query(&s.xreadgroup(max, None, from)).await?;
            let entries = parse_read(reply);
            if entries.is_empty() {
                state.recovered = true;
            } else {
                state.recovery_cursor = entries.last().map(|(id, _)| id.clone());
                let out = self.deliver_counted(entries).await?;
                tracing::info!(stream = %s.stream, consumer = %s.consumer, count = out.len(), "re-delivering this consumer's pending entries");
                if !out.is_empty() {
                    return Ok(out);
                }
            }
        }

        // Retries whose delay has passed.
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut retries = s.retries();
            while due.len() < max && retries.first_key_value().is_some_and(|((at, _), _)| *at <= now) {
                if let Some(((_, id), attempt)) = retries.pop_first() {
                    due.push((id, attempt));
                }
            }
        }
        if !due.is_empty() {
            let ids: Vec<String> = due.iter().map(|(id, _)| id.clone()).collect();
            let entries = self.claim(&ids, Duration::ZERO).await?;
            let out = self
                .deliver(entries, |id| {
                    due.iter().find(|(d, _)| d == id).map(|(_, a)| *a).unwrap_or(1)
                })
                .await?;
            if !out.is_empty() {
                return Ok(out);
            }
        }

        // The janitor: entries a dead consumer left idle.
        let janitor_every = (s.reclaim_after / 4).max(Duration::from_millis(500));
        if state.last_janitor.is_none_or(|t| t.elapsed() >= janitor_every) {
            state.last_janitor = Some(Instant::now());
            let reply: Value = s
                .commands
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&s.stream)
                        .arg(&s.group)
                        .arg(&s.consumer)
                        .arg(s.reclaim_after.as_millis() as u64)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(max),
                )
                .await?;
            // [next cursor, entries, deleted ids]
            let entries = second_entries(reply);
            if !entries.is_empty() {
                let out = self.deliver_counted(entries).await?;
                if !out.is_empty() {
                    tracing::info!(stream = %s.stream, count = out.len(), "reclaimed entries idle in a dead consumer");
                    return Ok(out);
                }
            }
        }

        // New entries. While there is a backlog, ask without blocking, on the
        // command connection, with the parked acks in the same round trip.
        drop(state);
        if s.backlog.load(Ordering::Relaxed) {
            let entries = self.read_with_acks(max).await?;
            s.backlog.store(entries.len() >= max, Ordering::Relaxed);
            if !entries.is_empty() {
                return Ok(self.deliveries(entries, |_| 1).0);
            }
        }
        // Block no longer than until the next retry is due.
        let block = s
            .retries()
            .first_key_value()
            .map(|((at, _), _)| at.saturating_duration_since(Instant::now()))
            .unwrap_or(BLOCK)
            .clamp(Duration::from_millis(1), BLOCK);
        let mut conn = self.blocking.get().await?;
        let reply = s
            .xreadgroup(max, Some(block), ">")
            .query_async::<Value>(&mut conn)
            .await;
        let reply = self.blocking.observe(reply).await?;
        let entries = parse_read(reply);
        s.backlog.store(entries.len() >= max, Ordering::Relaxed);
        Ok(self.deliveries(entries, |_| 1).0)
    }

    /// Up to `max` new entries without waiting for any, sent after one
    /// `XACK` of the parked acks in the same pipeline; answers those acks.
    async fn read_with_acks(&self, max: usize) -> Result<Vec<Entry>> {
        let s = &self.inner;
        let (ids, waiting): (Vec<String>, Vec<_>) = s.take_parked().into_iter().unzip();
        let mut pipe = redis::pipe();
        if !ids.is_empty() {
            pipe.cmd("XACK").arg(&s.stream).arg(&s.group).arg(&ids).ignore();
        }
        pipe.add_command(s.xreadgroup(max, None, ">"));
        let reply: Result<(Value,)> = s.commands.pipe(&pipe).await;
        answer(waiting, xack_answers(&ids, reply.as_ref().err()));
        Ok(parse_read(reply?.0))
    }
}

/// How long, at most, the ack task leaves acks parked for the next read to
/// carry while there is a backlog. Long enough for a read to come (one comes
/// as soon as a slot frees, and a message frees its slot before its ack);
/// short enough that an ack is never held up noticeably.
const ACK_RIDE: Duration = Duration::from_millis(2);

/// The stream source's ack task: a group commit like [`batcher`]'s, except
/// that while the stream has a backlog it parks the acks for up to
/// [`ACK_RIDE`] so that the next read can carry them in its own round trip
/// ([`StreamSource::read_with_acks`]). Then it sends what no read took in
/// one `XACK`. A backlog means a read is coming soon, so the acks that ride
/// cost no round trip at all: the native consumer's one `XACK` per read.
/// Unless every slot of the handler waits to settle behind these very acks
/// (always so at concurrency 1, where each message waited out the whole
/// ride): then no read can come, and the engine says so
/// ([`Source::flush_acks`]), which ends the wait at once.
async fn stream_acks(shared: std::sync::Weak<StreamShared>, mut rx: mpsc::UnboundedReceiver<PendingAck>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let Some(s) = shared.upgrade() else { return };
        s.parked().append(&mut batch);
        if s.backlog.load(Ordering::Relaxed) {
            let ride = tokio::time::sleep(ACK_RIDE);
            tokio::pin!(ride);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut batch, ACK_BATCH) => {
                        s.parked().append(&mut batch);
                        if n == 0 {
                            break;
                        }
                    }
                    _ = &mut ride => break,
                    _ = s.ack_now.notified() => break,
                }
            }
        }
        let left = s.take_parked();
        if left.is_empty() {
            continue;
        }
        let (ids, waiting): (Vec<String>, Vec<_>) = left.into_iter().unzip();
        answer(waiting, xack(s, ids).await);
    }
}

/// An item waiting for its batch, and who waits for its answer.
type Pending<I, R> = (I, oneshot::Sender<Result<R>>);

/// An ack waiting for its batch: the entry id or list item.
type PendingAck = Pending<String, ()>;

/// The most items folded into one command.
const ACK_BATCH: usize = 1024;

/// Fold concurrent requests (acks, dedup claims, dedup marks) into one
/// command per round trip (a group commit): the first goes at once, those
/// that arrive while it is in flight go together next. `flush` handles a
/// batch and answers item by item, in order. Ends with `shared` (the source
/// or the connection) or when every sender is gone.
async fn batcher<S, I, R, F, Fut>(shared: std::sync::Weak<S>, mut rx: mpsc::UnboundedReceiver<Pending<I, R>>, flush: F)
where
    F: Fn(Arc<S>, Vec<I>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<R>>>,
{
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let Some(s) = shared.upgrade() else { return };
        let (items, waiting): (Vec<I>, Vec<_>) = batch.drain(..).unzip();
        answer(waiting, flush(s, items).await);
    }
}

/// Answer each waiting request with its answer, in order. A request whose
/// caller is gone (cancelled) is skipped.
fn answer<R>(waiting: Vec<oneshot::Sender<Result<R>>>, answers: Vec<Result<R>>) {
    for (done, answer) in waiting.into_iter().zip(answers) {
        let _ = done.send(answer);
    }
}

/// Hand `item` to a [`batcher`] and wait for its batch's answer.
async fn batched<I, R>(to: &mpsc::UnboundedSender<Pending<I, R>>, item: I) -> Result<R> {
    let (tx, rx) = oneshot::channel();
    to.send((item, tx)).map_err(|_| anyhow!("the batcher stopped"))?;
    rx.await.map_err(|_| anyhow!("the batcher dropped a request"))?
}

/// One `XACK` for a batch of entry ids: all acked, or all failed.
async fn xack(s: Arc<StreamShared>, ids: Vec<String>) -> Vec<Result<()>> {
    let result: Result<i64> = s
        .commands
        .query(redis::cmd("XACK").arg(&s.stream).arg(&s.group).arg(&ids))
        .await;
    xack_answers(&ids, result.as_ref().err())
}

/// One answer per id of an `XACK` that succeeded or failed as a whole.
fn xack_answers(ids: &[String], failed: Option<&anyhow::Error>) -> Vec<Result<()>> {
    match failed {
        None => ids.iter().map(|_| Ok(())).collect(),
        Some(e) => all_failed(ids, format!("XACK failed: {e:#}")),
    }
}

struct StreamAcker {
    shared: Arc<StreamShared>,
    entry_id: String,
    attempt: u32,
}

#[async_trait]
impl Acker for StreamAcker {
    async fn ack(&self) -> Result<()> {
        batched(&self.shared.acks, self.entry_id.clone()).await
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        // Leave the entry pending and claim it back when the delay is over;
        // the claim bumps its delivery counter, which is the attempt.
        self.shared
            .retries()
            .insert((Instant::now() + delay, self.entry_id.clone()), self.attempt + 1);
        Ok(())
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let s = &self.shared;
        // Copy the entry with the dead-letter headers, then ack, atomically.
        let reply: Value = s
            .commands
            .query(
                redis::cmd("XRANGE")
                    .arg(&s.stream)
                    .arg(&self.entry_id)
                    .arg(&self.entry_id),
            )
            .await?;
        let mut env = match parse_entries(reply).into_iter().next() {
            Some((id, fields)) => Envelope::from_stream_fields(&id, fields),
            None => bail!(
                "entry {} of stream {} is gone; cannot dead-letter it",
                self.entry_id,
                s.stream
            ),
        };
        env.headers.extend(headers);
        let mut xadd = redis::cmd("XADD");
        xadd.arg(queue).arg("*");
        for (k, v) in env.stream_fields() {
            xadd.arg(k).arg(v);
        }
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(xadd).ignore();
        pipe.cmd("XACK")
            .arg(&s.stream)
            .arg(&s.group)
            .arg(&self.entry_id)
            .ignore();
        let _: () = s.commands.pipe(&pipe).await?;
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        // Stays pending for this consumer: re-read on restart (the attempt
        // is counted), or reclaimed by another host's janitor.
        Ok(())
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        // Claiming the entry back bumps its delivery counter, so on streams
        // a deferral does count as an attempt; the counter is Redis'.
        self.retry(delay).await
    }
}

// ---------------------------------------------------------------- lists

struct ListSource {
    commands: Arc<Conn>,
    blocking: Arc<Conn>,
    keys: Arc<ListKeys>,
    started: AtomicBool,
}

/// A list job's raw item, shared by the in-flight map, the acker and the ack
/// batch rather than copied into each (it holds the whole payload).
type RawJob = Arc<String>;

/// Jobs of this host's processing list that an attempt holds right now (raw
/// item → count). Anything else in the processing list is an orphan: its
/// settle failed (Redis was unreachable) and it must go back to the queue.
///
/// Keyed by the whole item, hashed twice per job (taken, settled): foldhash
/// rather than SipHash, which cost ~4% of a 1 KiB list drain's CPU. The map
/// is only this host's, so hash flooding is not a concern.
type InFlightMap = HashMap<RawJob, usize, foldhash::fast::RandomState>;
type InFlight = Arc<std::sync::Mutex<InFlightMap>>;

fn in_flight_lock(map: &InFlight) -> std::sync::MutexGuard<'_, InFlightMap> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ListKeys {
    queue: String,
    processing: String,
    heartbeat: String,
    consumers: String,
    delayed: String,
    consumer: String,
    in_flight: InFlight,
    /// Acks waiting for [`lrem_many`], started with the source.
    acks: std::sync::OnceLock<mpsc::UnboundedSender<Pending<RawJob, ()>>>,
}

/// How long a list consumer's heartbeat lives; refreshed every third of it.
const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

/// Move ARGV[1] from the processing list KEYS[1] back to the queue KEYS[2] as
/// ARGV[2] (its attempt counted), if it is still there.
const RETURN_ORPHAN: &str = r#"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"#;

/// Return every item of consumer ARGV[1]'s processing list KEYS[1] to the
/// queue KEYS[2], counting the interrupted attempt, if its heartbeat KEYS[3]
/// is gone (or ARGV[2] == "self"). Removes it from the consumer set KEYS[4].
const REAP: &str = r#"
if ARGV[2] ~= 'self' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local n = 0
while true do
  local item = redis.call('RPOP', KEYS[1])
  if not item then break end
  local ok, job = pcall(cjson.decode, item)
  if ok and type(job) == 'table' and job['id'] then
    job['attempts'] = (job['attempts'] or 0) + 1
    item = cjson.encode(job)
  end
  redis.call('RPUSH', KEYS[2], item)
  n = n + 1
end
if ARGV[2] ~= 'self' then redis.call('SREM', KEYS[4], ARGV[1]) end
return n
"#;

/// Move due jobs from the delayed set KEYS[1] to the queue KEYS[2], by
/// Redis' clock.
const PROMOTE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 256)
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[1], item)
  redis.call('LPUSH', KEYS[2], item)
end
return #due
"#;

/// Every script of this module, hashed once (a `Script` is its source and
/// SHA1; the client sends `EVALSHA` and loads the source on `NOSCRIPT`).
static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE));
static REAP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REAP));
static PROMOTE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PROMOTE));
static RETURN_ORPHAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RETURN_ORPHAN));
static DELAY_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(DELAY));
static ABANDON_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ABANDON));

/// Add `ARGV[1]` to the delayed set `KEYS[1]`, due `ARGV[2]` ms from now by
/// Redis' clock (like retries, so hosts' clocks do not matter).
const DELAY: &str = "local t = redis.call('TIME') return redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]), ARGV[1])";

/// Release a dedup claim (`KEYS[1]`) after a failed attempt; never a mark.
const ABANDON: &str = "if redis.call('GET', KEYS[1]) == 'claimed' then return redis.call('DEL', KEYS[1]) end return 0";

/// Ack a batch of jobs: one pipeline of `LREM`s, one round trip. (A Lua
/// script looping over the same `LREM`s cost Redis more: ~1 µs per job of
/// script overhead on top of the commands.) Each `LREM` counts from the
/// tail, where the processing list keeps its oldest jobs, the ones most
/// likely done first; a job is unique in it, or identical to its twin. A job
/// no longer there (returned by a reaper) was not acked.
async fn lrem_many(commands: Arc<Conn>, keys: Arc<ListKeys>, items: Vec<RawJob>) -> Vec<Result<()>> {
    let mut pipe = redis::pipe();
    for item in &items {
        pipe.cmd("LREM").arg(&keys.processing).arg(-1).arg(item.as_str());
    }
    let removed: Result<Vec<i64>> = commands.pipe(&pipe).await;
    match removed {
        Ok(removed) if removed.len() == items.len() => removed
            .into_iter()
            .map(|n| match n {
                0 => Err(anyhow!(
                    "no longer in {} (returned to the queue by a reaper?); the ack was not applied",
                    keys.processing
                )),
                _ => Ok(()),
            })
            .collect(),
        Ok(removed) => all_failed(
            &items,
            format!(
                "ack pipeline answered {} results for {} jobs",
                removed.len(),
                items.len()
            ),
        ),
        Err(e) => all_failed(&items, format!("{e:#}")),
    }
}

/// Remove ARGV[1] from the processing list KEYS[1]; if it was there, act:
/// ARGV[2] = 'retry' (ZADD KEYS[2] at now + ARGV[4] ms the item ARGV[3]) |
/// 'dead' (LPUSH KEYS[2] ARGV[3]) | 'release' (RPUSH KEYS[2] ARGV[1]).
/// Returns 1 when done, 0 when the item was no longer held. Acks go through
/// [`lrem_many`]; any other op is refused before anything is removed.
const SETTLE: &str = r#"
local op = ARGV[2]
if op ~= 'retry' and op ~= 'dead' and op ~= 'release' then
  return redis.error_reply('wharf settle: unknown op ' .. tostring(op))
end
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
if op == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
elseif op == 'dead' then
  redis.call('LPUSH', KEYS[2], ARGV[3])
elseif op == 'release' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return 1
"#;

impl ListSource {
    fn new(commands: Arc<Conn>, blocking: Arc<Conn>, queue: &str, consumer: &str) -> Self {
        let keys = Arc::new(ListKeys {
            queue: queue.to_string(),
            processing: format!("{queue}:processing:{consumer}"),
            heartbeat: format!("{queue}:consumer:{consumer}"),
            consumers: format!("{queue}:consumers"),
            delayed: format!("{queue}:delayed"),
            consumer: consumer.to_string(),
            in_flight: Default::default(),
            acks: Default::default(),
        });
        Self {
            commands,
            blocking,
            keys,
            started: AtomicBool::new(false),
        }
    }

    async fn start(&self) -> Result<()> {
        let k = &self.keys;
        heartbeat(k, &self.commands).await?;
        // Our own processing list from before a restart goes back first.
        let n: i64 = self
            .commands
            .script(
                REAP_SCRIPT
                    .key(&k.processing)
                    .key(&k.queue)
                    .key(&k.heartbeat)
                    .key(&k.consumers)
                    .arg(&k.consumer)
                    .arg("self"),
            )
            .await?;
        if n > 0 {
            tracing::info!(queue = %k.queue, consumer = %k.consumer, returned = n, "returned this consumer's unfinished jobs to the queue");
        }
        tokio::spawn(list_maintenance(Arc::downgrade(&self.keys), self.commands.clone()));
        self.keys.acks.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let commands = self.commands.clone();
            tokio::spawn(batcher(Arc::downgrade(&self.keys), rx, move |keys, items| {
                lrem_many(commands.clone(), keys, items)
            }));
            tx
        });
        self.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn delivery(&self, raw: String) -> Delivery {
        let env = Envelope::from_list_item(&raw);
        let raw = Arc::new(raw);
        *in_flight_lock(&self.keys.in_flight).entry(raw.clone()).or_default() += 1;
        let attempt = env.attempts + 1;
        let acker = Box::new(ListAcker {
            commands: self.commands.clone(),
            keys: self.keys.clone(),
            raw,
            id: env.id.clone(),
        });
        env.into_delivery(&self.keys.queue, attempt, acker)
    }
}

/// Say this consumer is alive (for `HEARTBEAT_TTL`) and known.
async fn heartbeat(k: &ListKeys, commands: &Conn) -> Result<()> {
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(&k.heartbeat)
        .arg(1)
        .arg("PX")
        .arg(HEARTBEAT_TTL.as_millis() as u64)
        .ignore();
    pipe.cmd("SADD").arg(&k.consumers).arg(&k.consumer).ignore();
    commands.pipe::<()>(&pipe).await
}

/// Heartbeat, reaper of dead consumers and promoter of delayed jobs, for as
/// long as the source lives.
async fn list_maintenance(keys: std::sync::Weak<ListKeys>, commands: Arc<Conn>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_beat = Instant::now();
    let mut last_reap = Instant::now();
    let mut last_orphans = Instant::now();
    let mut suspects: std::collections::HashSet<String> = Default::default();
    loop {
        tick.tick().await;
        let Some(k) = keys.upgrade() else { return };
        if last_orphans.elapsed() >= ORPHAN_CHECK {
            last_orphans = Instant::now();
            match return_orphans(&k, &commands, &suspects).await {
                Ok(next) => suspects = next,
                Err(e) => tracing::debug!(queue = %k.queue, error = %format!("{e:#}"), "orphan check failed"),
            }
        }
        if let Err(e) = commands
            .script::<i64>(PROMOTE_SCRIPT.key(&k.delayed).key(&k.queue))
            .await
        {
            tracing::debug!(queue = %k.queue, error = %format!("{e:#}"), "promoting delayed jobs failed");
            continue;
        }
        if last_beat.elapsed() >= HEARTBEAT_TTL / 3 {
            last_beat = Instant::now();
            let _ = heartbeat(&k, &commands).await;
        }
        if last_reap.elapsed() >= HEARTBEAT_TTL / 3 {
            last_reap = Instant::now();
            let Ok(members) = commands
                .query::<Vec<String>>(redis::cmd("SMEMBERS").arg(&k.consumers))
                .await
            else {
                continue;
            };
            for other in members.into_iter().filter(|c| *c != k.consumer) {
                let processing = format!("{}:processing:{other}", k.queue);
                let heartbeat = format!("{}:consumer:{other}", k.queue);
                match commands
                    .script::<i64>(
                        REAP_SCRIPT
                            .key(&processing)
                            .key(&k.queue)
                            .key(&heartbeat)
                            .key(&k.consumers)
                            .arg(&other)
                            .arg("other"),
                    )
                    .await
                {
                    Ok(n) if n > 0 => {
                        tracing::warn!(queue = %k.queue, dead_consumer = %other, returned = n, "returned a dead consumer's jobs to the queue")
                    }
                    _ => {}
                }
            }
        }
    }
}

/// How often the processing list is checked for orphans; an item must be
/// seen orphaned twice in a row before it is returned.
const ORPHAN_CHECK: Duration = Duration::from_secs(5);

/// Return items of this consumer's processing list that no attempt holds and
/// that were already suspects last time; return the new suspects.
async fn return_orphans(
    k: &ListKeys,
    commands: &Conn,
    suspects: &std::collections::HashSet<String>,
) -> Result<std::collections::HashSet<String>> {
    let items: Vec<String> = commands
        .query(redis::cmd("LRANGE").arg(&k.processing).arg(0).arg(-1))
        .await?;
    let held = in_flight_lock(&k.in_flight).clone();
    let mut next = std::collections::HashSet::new();
    for item in items.into_iter().filter(|i| !held.contains_key(i)) {
        if suspects.contains(&item) {
            let mut env = Envelope::from_list_item(&item);
            env.attempts += 1;
            let n: i64 = commands
                .script(
                    RETURN_ORPHAN_SCRIPT
                        .key(&k.processing)
                        .key(&k.queue)
                        .arg(&item)
                        .arg(env.to_json()),
                )
                .await?;
            if n > 0 {
                tracing::warn!(queue = %k.queue, message_id = %env.id, "returned a job whose settle had failed to the queue");
            }
        } else {
            next.insert(item);
        }
    }
    Ok(next)
}

#[async_trait]
impl Source for ListSource {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        if !self.started.load(Ordering::SeqCst) {
            self.start().await?;
        }
        let k = &self.keys;
        let mut conn = self.blocking.get().await?;
        let first: Result<Option<String>, RedisError> = redis::cmd("BLMOVE")
            .arg(&k.queue)
            .arg(&k.processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(BLOCK.as_secs_f64())
            .query_async(&mut conn)
            .await;
        let Some(first) = self.blocking.observe(first).await? else {
            return Ok(vec![]);
        };
        let mut items = vec![first];
        if max > 1 {
            let mut pipe = redis::pipe();
            for _ in 1..max {
                pipe.cmd("LMOVE")
                    .arg(&k.queue)
                    .arg(&k.processing)
                    .arg("RIGHT")
                    .arg("LEFT");
            }
            let more: Vec<Option<String>> = self.commands.pipe(&pipe).await?;
            items.extend(more.into_iter().flatten());
        }
        Ok(items.into_iter().map(|raw| self.delivery(raw)).collect())
    }
}

struct ListAcker {
    commands: Arc<Conn>,
    keys: Arc<ListKeys>,
    raw: RawJob,
    /// The job's id, for errors.
    id: String,
}

impl Drop for ListAcker {
    /// The attempt is over, settled or not: the item is no longer held.
    fn drop(&mut self) {
        let mut map = in_flight_lock(&self.keys.in_flight);
        if let Some(n) = map.get_mut(&self.raw) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.raw);
            }
        }
    }
}

impl ListAcker {
    /// The job's envelope, parsed again from the raw item: only a retry, a
    /// dead letter or a deferral needs it, so an ack never copies it.
    fn envelope(&self) -> Envelope {
        Envelope::from_list_item(&self.raw)
    }

    async fn settle(&self, op: &str, target: &str, item: &str, delay_ms: u64) -> Result<()> {
        let done: i64 = self
            .commands
            .script(
                SETTLE_SCRIPT
                    .key(&self.keys.processing)
                    .key(target)
                    .arg(self.raw.as_str())
                    .arg(op)
                    .arg(item)
                    .arg(delay_ms),
            )
            .await?;
        if done == 0 {
            bail!(
                "job {} is no longer in {} (returned to the queue by a reaper?); its {op} was not applied",
                self.id,
                self.keys.processing
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Acker for ListAcker {
    async fn ack(&self) -> Result<()> {
        let acks = self.keys.acks.get().ok_or_else(|| anyhow!("list source not started"))?;
        batched(acks, self.raw.clone())
            .await
            .with_context(|| format!("acking job {}", self.id))
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        let mut next = self.envelope();
        next.attempts += 1;
        self.settle("retry", &self.keys.delayed, &next.to_json(), delay.as_millis() as u64)
            .await
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let mut dead = self.envelope();
        dead.attempts += 1;
        dead.headers.extend(headers);
        self.settle("dead", queue, &dead.to_json(), 0).await
    }

    async fn release(&self) -> Result<()> {
        self.settle("release", &self.keys.queue, "", 0).await
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        // Back to the delayed set with the attempt count it came with.
        self.settle(
            "retry",
            &self.keys.delayed,
            &self.envelope().to_json(),
            delay.as_millis() as u64,
        )
        .await
    }
}

// ---------------------------------------------------------------- pub/sub

struct PubSubSource {
    client: redis::Client,
    commands: Arc<Conn>,
    health: Arc<Health>,
    channel: String,
    pattern: bool,
    local: Arc<Mutex<Option<LocalQueue>>>,
}

struct LocalQueue {
    tx: mpsc::UnboundedSender<(Envelope, u32)>,
    rx: mpsc::UnboundedReceiver<(Envelope, u32)>,
}

impl PubSubSource {
    fn new(client: redis::Client, commands: Arc<Conn>, health: Arc<Health>, channel: &str, pattern: bool) -> Self {
        Self {
            client,
            commands,
            health,
            channel: channel.to_string(),
            pattern,
            local: Arc::new(Mutex::new(None)),
        }
    }

    fn start(&self) -> LocalQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(subscriber(
            self.client.clone(),
            self.health.clone(),
            self.channel.clone(),
            self.pattern,
            tx.downgrade(),
        ));
        LocalQueue { tx, rx }
    }
}

/// The pub/sub header [`subscriber`] records the message's channel in.
const CHANNEL_HEADER: &str = "channel";

/// The channel a pub/sub message was published on.
fn arrived_on(env: &Envelope) -> Option<&str> {
    env.headers
        .iter()
        .find(|(k, _)| k == CHANNEL_HEADER)
        .map(|(_, v)| v.as_str())
}

/// Keep a subscription alive, forwarding messages, until the source is gone.
async fn subscriber(
    client: redis::Client,
    health: Arc<Health>,
    channel: String,
    pattern: bool,
    tx: mpsc::WeakUnboundedSender<(Envelope, u32)>,
) {
    use futures_util::StreamExt;
    let mut failures = 0u32;
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            if pattern {
                pubsub.psubscribe(&channel).await?
            } else {
                pubsub.subscribe(&channel).await?
            }
            Ok::<_, RedisError>(pubsub)
        };
        match subscribed.await {
            Ok(pubsub) => {
                failures = 0;
                health.set(true, None);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(tx) = tx.upgrade() else { return };
                    let env = Envelope {
                        id: format!("{:032x}", rand::random::<u128>()),
                        payload: msg.get_payload_bytes().to_vec(),
                        headers: vec![(CHANNEL_HEADER.into(), msg.get_channel_name().to_string())],
                        content_type: None,
                        reply_to: None,
                        attempts: 0,
                        published_at: now_ms(),
                    };
                    let _ = tx.send((env, 1));
                }
                health.set(false, None);
            }
            Err(e) => health.set(false, Some(&e)),
        }
        if tx.upgrade().is_none() {
            return;
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(super::reconnect_backoff(failures)).await;
    }
}

#[async_trait]
impl Source for PubSubSource {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        let mut guard = self.local.lock().await;
        if guard.is_none() {
            *guard = Some(self.start());
        }
        let Some(queue) = guard.as_mut() else { return Ok(vec![]) };
        let mut out = Vec::new();
        let first = tokio::time::timeout(BLOCK, queue.rx.recv()).await;
        let Ok(Some(first)) = first else { return Ok(out) };
        let mut items = vec![first];
        while items.len() < max {
            match queue.rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        for (env, attempt) in items {
            let acker = Box::new(PubSubAcker {
                commands: self.commands.clone(),
                env: env.clone(),
                attempt,
                requeue: queue.tx.clone(),
            });
            // The channel it was published on: for a pattern source, the
            // one the pattern matched, not the pattern.
            let subject = arrived_on(&env).unwrap_or(&self.channel).to_string();
            out.push(env.into_delivery(&subject, attempt, acker));
        }
        Ok(out)
    }
}

struct PubSubAcker {
    commands: Arc<Conn>,
    env: Envelope,
    attempt: u32,
    requeue: mpsc::UnboundedSender<(Envelope, u32)>,
}

#[async_trait]
impl Acker for PubSubAcker {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        // In memory: pub/sub has nothing to redeliver from.
        let (tx, env, next) = (self.requeue.clone(), self.env.clone(), self.attempt + 1);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send((env, next));
        });
        Ok(())
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let mut env = self.env.clone();
        env.headers.extend(headers);
        RedisSink::xadd(&self.commands, queue, &env, None).await
    }

    async fn release(&self) -> Result<()> {
        tracing::warn!(message_id = %self.env.id, "pub/sub message dropped on shutdown (pub/sub is at-most-once)");
        Ok(())
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        let (tx, env, attempt) = (self.requeue.clone(), self.env.clone(), self.attempt);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send((env, attempt));
        });
        Ok(())
    }
}

// ---------------------------------------------------------------- sink, dedup

struct RedisSink {
    commands: Arc<Conn>,
    kind: RedisKind,
    maxlen: Option<u64>,
}

impl RedisSink {
    fn xadd_cmd(key: &str, env: &Envelope, maxlen: Option<u64>) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key);
        if let Some(n) = maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (k, v) in env.stream_fields() {
            cmd.arg(k).arg(v);
        }
        cmd
    }

    async fn xadd(commands: &Conn, key: &str, env: &Envelope, maxlen: Option<u64>) -> Result<()> {
        let _: String = commands.query(&Self::xadd_cmd(key, env, maxlen)).await?;
        Ok(())
    }
}

#[async_trait]
impl Sink for RedisSink {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<()> {
        let mut pipe = redis::pipe();
        let mut delayed = Vec::new();
        for m in &messages {
            let env = Envelope::from_outbound(m);
            match self.kind {
                RedisKind::Stream => {
                    pipe.add_command(Self::xadd_cmd(&m.subject, &env, self.maxlen)).ignore();
                }
                RedisKind::List if !m.delay.is_zero() => delayed.push((m, env)),
                RedisKind::List => {
                    pipe.cmd("LPUSH").arg(&m.subject).arg(env.to_json()).ignore();
                }
                RedisKind::Channel | RedisKind::Pattern => {
                    pipe.cmd("PUBLISH").arg(&m.subject).arg(m.payload.as_ref()).ignore();
                }
            }
        }
        let _: () = self.commands.pipe(&pipe).await?;
        for (m, env) in delayed {
            // Due by Redis' clock, like retries.
            let _: i64 = self
                .commands
                .script(
                    DELAY_SCRIPT
                        .key(format!("{}:delayed", m.subject))
                        .arg(env.to_json())
                        .arg(m.delay.as_millis() as u64),
                )
                .await?;
        }
        Ok(())
    }
}

/// Dedup keys in Redis. Claims and marks from concurrent deliveries are
/// sent in one pipeline per round trip each (the way acks are batched), so
/// each costs the host a share of one request rather than a request.
struct RedisDedup {
    commands: Arc<Conn>,
    /// `(key, lease ms)` to claim; started on first use.
    claims: std::sync::OnceLock<mpsc::UnboundedSender<Pending<(String, u64), Claim>>>,
    /// `(key, ttl ms)` to mark done; started on first use.
    marks: std::sync::OnceLock<mpsc::UnboundedSender<Pending<(String, u64), ()>>>,
}

fn dedup_key(handler: &str, id: &str) -> String {
    format!("wharf:dedup:{handler}:{id}")
}

/// Claim a batch of `(key, lease ms)`: one pipeline of `SET NX PX`, then,
/// for the keys already set (duplicates, rare), one pipeline of `GET` to
/// tell a claim (busy) from a mark (done). Plain commands, not a script:
/// Lua costs Redis more per key than the commands it would save.
async fn claim_many(commands: Arc<Conn>, items: Vec<(String, u64)>) -> Vec<Result<Claim>> {
    let mut set = redis::pipe();
    for (key, ms) in &items {
        set.cmd("SET").arg(key).arg("claimed").arg("NX").arg("PX").arg(ms);
    }
    let claimed = match commands.pipe::<Vec<Option<String>>>(&set).await {
        Ok(c) if c.len() == items.len() => c,
        Ok(c) => return all_failed(&items, format!("{} answers to {} claims", c.len(), items.len())),
        Err(e) => return all_failed(&items, format!("{e:#}")),
    };
    let taken: Vec<&str> = items
        .iter()
        .zip(&claimed)
        .filter(|(_, c)| c.is_none())
        .map(|((key, _), _)| key.as_str())
        .collect();
    let mut current = Vec::new();
    if !taken.is_empty() {
        let mut get = redis::pipe();
        for key in &taken {
            get.cmd("GET").arg(*key);
        }
        current = match commands.pipe::<Vec<Option<String>>>(&get).await {
            Ok(c) if c.len() == taken.len() => c,
            Ok(c) => return all_failed(&items, format!("{} answers to {} reads", c.len(), taken.len())),
            Err(e) => return all_failed(&items, format!("{e:#}")),
        };
    }
    let mut current = current.into_iter();
    claimed
        .into_iter()
        .map(|c| match c {
            Some(_) => Ok(Claim::Acquired),
            None => Ok(match current.next().flatten().as_deref() {
                // Claimed by a copy in flight, or expired since the SET
                // (someone else may claim it now): come back later.
                Some("claimed") | None => Claim::Busy,
                // "done", or a mark written by anything else: handled.
                Some(_) => Claim::Done,
            }),
        })
        .collect()
}

/// Mark a batch of `(key, ttl ms)` done: one pipeline of `SET PX`.
async fn mark_many(commands: Arc<Conn>, items: Vec<(String, u64)>) -> Vec<Result<()>> {
    let mut set = redis::pipe();
    for (key, ms) in &items {
        set.cmd("SET").arg(key).arg("done").arg("PX").arg(ms).ignore();
    }
    match commands.pipe::<()>(&set).await {
        Ok(()) => items.iter().map(|_| Ok(())).collect(),
        Err(e) => all_failed(&items, format!("{e:#}")),
    }
}

/// The same error for every item of a batch.
fn all_failed<I, R>(items: &[I], error: String) -> Vec<Result<R>> {
    items.iter().map(|_| Err(anyhow!("{error}"))).collect()
}

impl RedisDedup {
    fn claims(&self) -> &mpsc::UnboundedSender<Pending<(String, u64), Claim>> {
        self.claims.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batcher(Arc::downgrade(&self.commands), rx, claim_many));
            tx
        })
    }

    fn marks(&self) -> &mpsc::UnboundedSender<Pending<(String, u64), ()>> {
        self.marks.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batcher(Arc::downgrade(&self.commands), rx, mark_many));
            tx
        })
    }
}

#[async_trait]
impl DedupStore for RedisDedup {
    async fn claim(&self, handler: &str, id: &str, lease: Duration) -> Result<Claim> {
        let item = (dedup_key(handler, id), lease.as_millis().max(1) as u64);
        batched(self.claims(), item).await
    }

    async fn finish(&self, handler: &str, id: &str, ttl: Duration) -> Result<()> {
        let item = (dedup_key(handler, id), ttl.as_millis().max(1) as u64);
        batched(self.marks(), item).await
    }

    async fn abandon(&self, handler: &str, id: &str) -> Result<()> {
        let _: i64 = self
            .commands
            .script(&ABANDON_SCRIPT.key(dedup_key(handler, id)))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload: &[u8]) -> Envelope {
        Envelope {
            id: "job-1".into(),
            payload: payload.to_vec(),
            headers: vec![("k".into(), "v".into())],
            content_type: Some("application/json".into()),
            reply_to: None,
            attempts: 2,
            published_at: 7,
        }
    }

    #[test]
    fn list_envelopes_round_trip_text_and_binary_payloads() {
        let text = envelope("{\"order\": \"\\\"quoted\\\" é\"}".as_bytes());
        let json = text.to_json();
        assert!(
            json.contains(r#""payload":"{\"order\""#),
            "text payloads stay readable: {json}"
        );
        assert_eq!(Envelope::from_list_item(&json), text);

        let binary = envelope(&[0xff, 0x00, 0x80]);
        let json = binary.to_json();
        assert!(json.contains(r#""payload":{"b16":"ff0080"}"#), "{json}");
        assert_eq!(Envelope::from_list_item(&json), binary);

        // What the untagged enum the visitor replaced also took: a hex
        // object with other keys beside `b16`, and text with no escapes.
        let env = Envelope::from_list_item(r#"{"id": "j", "payload": {"note": [1], "b16": "ff00"}}"#);
        assert_eq!((env.id.as_str(), env.payload.as_slice()), ("j", &[0xff, 0x00][..]));
        let env = Envelope::from_list_item(r#"{"id": "j", "payload": "plain"}"#);
        assert_eq!(env.payload, b"plain");
    }

    #[test]
    fn stream_replies_parse_into_envelopes() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, fields: &[&str]| {
            Value::Array(vec![bulk(id), Value::Array(fields.iter().map(|f| bulk(f)).collect())])
        };
        // XREADGROUP, RESP2: [[stream, [entry, ...]]]; an entry deleted while
        // pending comes back as [id, nil].
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                entry(
                    "5-0",
                    &[
                        "id",
                        "job-1",
                        "payload",
                        "{\"n\":1}",
                        "headers",
                        r#"[["k","v"]]"#,
                        "content-type",
                        "application/json",
                        "published-at",
                        "7",
                    ],
                ),
                entry("6-0", &["colour", "red", "size", "9"]),
                Value::Array(vec![bulk("7-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read(reply);
        assert_eq!(entries.len(), 3);
        let ours = Envelope::from_stream_fields(&entries[0].0, entries[0].1.clone());
        assert_eq!(
            ours,
            Envelope {
                id: "job-1".into(),
                payload: b"{\"n\":1}".to_vec(),
                headers: vec![("k".into(), "v".into())],
                content_type: Some("application/json".into()),
                reply_to: None,
                attempts: 0,
                published_at: 7,
            }
        );
        // A foreign entry: its fields as a JSON object for payload; the entry id
        // and time as its id and publish time.
        let foreign = Envelope::from_stream_fields(&entries[1].0, entries[1].1.clone());
        assert_eq!(foreign.payload, br#"{"colour":"red","size":"9"}"#);
        assert_eq!((foreign.id.as_str(), foreign.published_at), ("6-0", 6));
        assert!(entries[2].1.is_empty(), "a deleted entry has no fields");
    }

    #[test]
    fn a_foreign_list_item_is_the_payload_and_its_hash_the_id() {
        for raw in [
            "plain text",
            r#"{"payload": 5}"#,
            r#"{"id": "x", "payload": {"b16": "zz"}}"#,
        ] {
            let env = Envelope::from_list_item(raw);
            assert_eq!(env.payload, raw.as_bytes(), "{raw}");
            assert_eq!(env.id.len(), 32, "{raw}");
            assert_eq!(env.attempts, 0);
            // Parsing is deterministic: a foreign job keeps its id.
            assert_eq!(Envelope::from_list_item(raw), env);
        }
    }
}
