//! NATS as a broker: core subjects (with queue groups and request/reply) and
//! JetStream durable pull consumers, through async-nats.
//!
//! | source `kind` | guarantee | delivery | attempt | retry | dead letter |
//! |---|---|---|---|---|---|
//! | `core` (default) | **at-most-once** | queue subscription (`group`, default `wharf`) | 1 | in memory only | core publish of a copy |
//! | `jetstream` | at-least-once | durable pull consumer, `fetch` in batches (the handler's concurrency at a time while there is a backlog, the next pull out before the last runs out: [`Prefetched`]), explicit acks | the delivery count in the ack metadata | `Nak` with the backoff delay | JetStream publish of a copy (with `Nats-Msg-Id`), then `Term` |
//!
//! While an attempt holds a JetStream message, `Progress` is sent at least
//! every third of the consumer's ack wait (one keeper per source walks the
//! held messages), so a slow attempt, outbox or ack never lets the server
//! redeliver under it. Acks and naks go out in bursts: one task per source
//! sends every ack that is ready together, so the client writes them in one
//! frame rather than one write (and one server wake-up) each. Publishes to
//! JetStream carry `Nats-Msg-Id` (the outbox's deterministic id), so the
//! stream's duplicate window absorbs replays. Publishes to `_INBOX.` subjects (replies) always go through core
//! NATS. async-nats reconnects by itself; the host starts while NATS is down
//! (`retry_on_initial_connect`) and is not ready until it is connected and
//! the manifest's streams are declared. Every reconnect declares them again
//! before the host is ready (a server may come back without its data), as
//! does a JetStream call that finds a stream or consumer missing
//! ([`keep_declared`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_nats::{Event, HeaderMap, connection::State};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{Acker, Delivery, OutboundMessage, Sink, Source};
use crate::store::now_ms;

/// The header carrying a message's id, which JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// How long a fetch waits for messages before the loop looks again.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// How often an idle JetStream source checks that its consumer still exists.
const CONSUMER_CHECK: Duration = Duration::from_secs(5);

/// A stream the manifest declares.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
}

/// A NATS connection and the streams it declares.
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Vec<StreamSpec>,
    /// The manifest's streams exist on the server. Cleared when the
    /// connection is lost or remade, and when a JetStream call fails to find
    /// a stream or consumer (a server that came back without its data); the
    /// keeper ([`keep_declared`]) then declares them again.
    declared: Arc<AtomicBool>,
    /// One declaration at a time.
    declaring: Mutex<()>,
    /// Wakes the keeper to look at `declared` again.
    recheck: Arc<Notify>,
}

/// What kind of NATS source or sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsKind {
    /// Core NATS.
    Core,
    /// JetStream.
    JetStream,
}

impl NatsBroker {
    /// Connect to `url`. Returns at once; the connection is made (and remade)
    /// in the background.
    pub async fn connect(url: &str, streams: Vec<StreamSpec>) -> Result<Self> {
        let declared = Arc::new(AtomicBool::new(false));
        let recheck = Arc::new(Notify::new());
        let (declared_here, wake) = (declared.clone(), recheck.clone());
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                // A server met again may have lost its streams (restarted
                // without its data): not ready until they are declared on it.
                match &event {
                    Event::Connected => {
                        declared_here.store(false, Ordering::Release);
                        wake.notify_one();
                        tracing::info!("connected to NATS");
                    }
                    Event::Disconnected => {
                        declared_here.store(false, Ordering::Release);
                        tracing::warn!("lost the connection to NATS; reconnecting");
                    }
                    Event::ServerError(_) | Event::ClientError(_) | Event::LameDuckMode => {
                        tracing::warn!(%event, "NATS")
                    }
                    // One per message a full subscription drops (core NATS,
                    // at-most-once by design): too many to warn about.
                    Event::SlowConsumer(_) | Event::Draining | Event::Closed => tracing::debug!(%event, "NATS"),
                }
                async {}
            })
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            streams,
            declared,
            declaring: Mutex::new(()),
            recheck,
        })
    }

    /// Whether the connection is up and the manifest's streams exist.
    pub fn is_up(&self) -> bool {
        self.client.connection_state() == State::Connected && self.declared.load(Ordering::Acquire)
    }

    /// Declare the manifest's streams now, and keep them declared from now
    /// on ([`keep_declared`]): while NATS is away, as soon as it is back. The
    /// host is not ready until they exist, so nothing is published to a
    /// stream that is not there yet. The error is the first try's.
    pub async fn probe(self: &Arc<Self>) -> Result<()> {
        const FIRST_TRY: Duration = Duration::from_secs(5);
        tokio::spawn(keep_declared(Arc::downgrade(self), self.recheck.clone()));
        tokio::time::timeout(FIRST_TRY, self.declare())
            .await
            .unwrap_or_else(|_| Err(anyhow!("NATS did not answer within {} s", FIRST_TRY.as_secs())))
    }

    /// Declare the manifest's streams, unless that was done on this server
    /// already.
    async fn declare(&self) -> Result<()> {
        if self.declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.declaring.lock().await;
        if self.declared.load(Ordering::Acquire) {
            return Ok(());
        }
        for s in &self.streams {
            self.js
                .get_or_create_stream(jetstream::stream::Config {
                    name: s.name.clone(),
                    subjects: s.subjects.clone(),
                    duplicate_window: s.duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("declaring JetStream stream {}", s.name))?;
        }
        self.declared.store(true, Ordering::Release);
        Ok(())
    }

    /// Publish to JetStream, declaring the streams first if needed. The
    /// returned future resolves once the server has stored the message.
    async fn js_publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<()>> + '_> {
        self.declare().await?;
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| anyhow!("JetStream publish to {subject}: {e}"))?;
        let subject = subject.to_string();
        Ok(async move {
            ack.await.map(drop).map_err(|e| {
                // No stream may capture the subject any more (a server that
                // came back without its data): declare them again first.
                self.redeclare();
                anyhow!("JetStream publish to {subject} not confirmed (does a declared stream capture it?): {e}")
            })
        })
    }

    /// A JetStream call failed in a way a missing stream would explain:
    /// declare the streams again before the next use.
    fn redeclare(&self) {
        self.declared.store(false, Ordering::Release);
        self.recheck.notify_one();
    }

    /// Write out everything handed to the client (acks, naks, publishes)
    /// before the process exits: the client sends from a task of its own,
    /// which dies with the process. Bounded, so an unreachable server does
    /// not hold up the exit (what was not written comes back after its ack
    /// wait, and dedup absorbs it).
    pub async fn flush(&self) {
        match tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not flush NATS before exiting"),
            Err(_) => tracing::warn!("NATS did not take the last writes within 2 s of exiting"),
        }
    }

    /// A core source on `subject` in queue group `group`.
    pub fn core_source(&self, subject: &str, group: &str) -> Arc<dyn Source> {
        Arc::new(CoreSource {
            client: self.client.clone(),
            subject: subject.to_string(),
            group: group.to_string(),
            local: Mutex::new(None),
        })
    }

    /// A JetStream source: durable pull consumer `consumer` of `stream`,
    /// filtered to `subject`, with an ack wait of `lease`. While the stream
    /// has a backlog it pulls `prefetch` messages at a time (the handler's
    /// concurrency) and hands them out as slots free; see [`Prefetched`].
    pub fn jetstream_source(
        self: &Arc<Self>,
        stream: &str,
        consumer: &str,
        subject: &str,
        lease: Duration,
        double_ack: bool,
        prefetch: usize,
    ) -> Arc<dyn Source> {
        Arc::new_cyclic(|me| JetStreamSource {
            me: me.clone(),
            broker: self.clone(),
            stream: stream.to_string(),
            consumer_name: consumer.to_string(),
            subject: subject.to_string(),
            lease,
            double_ack,
            prefetch: prefetch.max(1),
            prefetched: Default::default(),
            pulled: Notify::new(),
            consumer: Mutex::new(None),
            held: Default::default(),
            acks: std::sync::OnceLock::new(),
            checked: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// A sink publishing through core NATS or JetStream.
    pub fn sink(self: &Arc<Self>, kind: NatsKind) -> Arc<dyn Sink> {
        Arc::new(NatsSink {
            broker: self.clone(),
            kind,
        })
    }

    /// Request/reply for handlers: send `payload` to `subject` and wait up to
    /// `timeout` for the first reply.
    pub async fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> Result<Vec<u8>, RequestError> {
        let request = self
            .client
            .request_with_headers(subject.to_string(), header_map(headers), payload.into());
        match tokio::time::timeout(timeout, request).await {
            Err(_) => Err(RequestError::Timeout(format!(
                "no reply from {subject} in {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(reply)) => Ok(reply.payload.to_vec()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                Err(RequestError::NoResponders(format!("nobody answers on {subject}")))
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                Err(RequestError::Timeout(format!("no reply from {subject}")))
            }
            Ok(Err(e)) => Err(RequestError::Failed(e.to_string())),
        }
    }
}

/// Why a request failed; mirrors the WIT `request-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not granted, or the broker cannot do request/reply.
    #[error("denied: {0}")]
    Denied(String),
    /// No reply in time.
    #[error("timeout: {0}")]
    Timeout(String),
    /// Nobody subscribes to the subject.
    #[error("no responders: {0}")]
    NoResponders(String),
    /// Anything else.
    #[error("failed: {0}")]
    Failed(String),
}

fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(k.as_str(), v.as_str());
    }
    map
}

/// A message's headers as a sorted list, and its `Nats-Msg-Id` (the first,
/// as `HeaderMap::get` would give it), in one pass over the map: a received
/// JetStream message needs both, and looking the id up again would hash its
/// name once more.
fn headers_and_id(map: Option<&HeaderMap>) -> (Vec<(String, String)>, Option<String>) {
    let (mut out, mut id) = (Vec::new(), None);
    if let Some(map) = map {
        out.reserve(map.iter().len());
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            if name == MSG_ID {
                id = values.first().map(|v| v.as_str().to_owned());
            }
            out.extend(values.iter().map(|v| (name.to_owned(), v.as_str().to_owned())));
        }
        out.sort();
    }
    (out, id)
}

/// What wharf reads from a JetStream message's ack subject.
#[derive(Debug, PartialEq)]
struct AckMeta<'a> {
    stream: &'a str,
    stream_sequence: u64,
    /// The server's delivery count: the attempt.
    delivered: u64,
    /// When the server stored the message, in Unix milliseconds.
    published_ms: u64,
}

/// Read an ack subject (`$JS.ACK.…`) the way async-nats's `Message::info`
/// does, both formats of ADR-15: `<stream>.<consumer>.<delivered>.<stream
/// seq>.<consumer seq>.<nanos>.<pending>` after the prefix, or the same
/// behind `<domain>.<account hash>.` with optional tokens after it. Only the
/// four fields wharf uses are parsed: `info` also builds a calendar date
/// from the timestamp (which wharf turned straight back into a number) and
/// parses the rest. In instructions a message (callgrind, `wharf-bench
/// source-cost`): `info` 1.5k, this 0.8k, of a source that costs 20k.
fn ack_meta(reply: &str) -> Result<AckMeta<'_>> {
    let bad = |why: &str| anyhow!("bad JetStream ack subject {reply:?}: {why}");
    let rest = reply
        .strip_prefix("$JS.ACK.")
        .ok_or_else(|| bad("no $JS.ACK. prefix"))?;
    // Where each of the first ten tokens ends: a plain scan, 0.4k
    // instructions fewer than `split` on subjects this short.
    let mut ends = [0; 10];
    let mut n = 0;
    for (i, byte) in rest.bytes().enumerate() {
        if byte == b'.' {
            if n < ends.len() {
                ends[n] = i;
            }
            n += 1;
        }
    }
    if n < ends.len() {
        ends[n] = rest.len();
    }
    n += 1;
    let first = match n {
        7 => 0,
        9.. => 2,
        _ => return Err(bad(&format!("{n} tokens after the prefix; expected 7, or 9 or more"))),
    };
    let token = |i: usize| {
        let i = first + i;
        let start = if i == 0 { 0 } else { ends[i - 1] + 1 };
        &rest[start..ends[i]]
    };
    let number = |i: usize, what: &str| {
        token(i)
            .parse::<u64>()
            .map_err(|e| bad(&format!("{what} {:?}: {e}", token(i))))
    };
    Ok(AckMeta {
        stream: token(0),
        delivered: number(2, "delivery count")?,
        stream_sequence: number(3, "stream sequence")?,
        published_ms: number(5, "timestamp")? / 1_000_000,
    })
}

fn header_list(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    headers_and_id(map).0
}

// ---------------------------------------------------------------- core

struct CoreSource {
    client: async_nats::Client,
    subject: String,
    group: String,
    local: Mutex<Option<LocalQueue>>,
}

/// Received core messages, plus in-memory redeliveries (core NATS has
/// nothing to redeliver from).
struct LocalQueue {
    tx: mpsc::UnboundedSender<(async_nats::Message, u32)>,
    rx: mpsc::UnboundedReceiver<(async_nats::Message, u32)>,
}

#[async_trait]
impl Source for CoreSource {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        let mut guard = self.local.lock().await;
        if guard.is_none() {
            let mut subscriber = self
                .client
                .queue_subscribe(self.subject.clone(), self.group.clone())
                .await
                .map_err(|e| anyhow!("subscribing to {} in group {}: {e}", self.subject, self.group))?;
            let (tx, rx) = mpsc::unbounded_channel();
            let forward = tx.downgrade();
            tokio::spawn(async move {
                while let Some(m) = subscriber.next().await {
                    let Some(tx) = forward.upgrade() else { return };
                    let _ = tx.send((m, 1));
                }
            });
            *guard = Some(LocalQueue { tx, rx });
        }
        let Some(queue) = guard.as_mut() else { return Ok(vec![]) };
        let Ok(Some(first)) = tokio::time::timeout(FETCH_WAIT, queue.rx.recv()).await else {
            return Ok(vec![]);
        };
        let mut items = vec![first];
        while items.len() < max {
            match queue.rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        Ok(items
            .into_iter()
            .map(|(m, attempt)| {
                let (headers, id) = headers_and_id(m.headers.as_ref());
                let id = id.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
                Delivery {
                    id,
                    subject: m.subject.as_str().to_owned(),
                    payload: m.payload.clone(),
                    headers,
                    content_type: None,
                    reply_to: m.reply.as_ref().map(|r| r.to_string()),
                    attempt,
                    redelivered: attempt > 1,
                    first_seen_ms: now_ms(),
                    acker: Box::new(CoreAcker {
                        client: self.client.clone(),
                        message: m,
                        attempt,
                        requeue: queue.tx.clone(),
                    }),
                }
            })
            .collect())
    }
}

struct CoreAcker {
    client: async_nats::Client,
    message: async_nats::Message,
    attempt: u32,
    requeue: mpsc::UnboundedSender<(async_nats::Message, u32)>,
}

impl CoreAcker {
    fn again(&self, delay: Duration, attempt: u32) {
        let (tx, m) = (self.requeue.clone(), self.message.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send((m, attempt));
        });
    }
}

#[async_trait]
impl Acker for CoreAcker {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        self.again(delay, self.attempt + 1);
        Ok(())
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        self.again(delay, self.attempt);
        Ok(())
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let mut all = header_list(self.message.headers.as_ref());
        all.extend(headers);
        self.client
            .publish_with_headers(queue.to_string(), header_map(&all), self.message.payload.clone())
            .await?;
        self.client.flush().await?;
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        tracing::warn!(subject = %self.message.subject, "core NATS message dropped on shutdown (core NATS is at-most-once)");
        Ok(())
    }
}

// ---------------------------------------------------------------- JetStream

struct JetStreamSource {
    /// Itself, for the pull ahead's task ([`Self::pull_ahead`]).
    me: Weak<JetStreamSource>,
    broker: Arc<NatsBroker>,
    stream: String,
    consumer_name: String,
    subject: String,
    lease: Duration,
    double_ack: bool,
    /// The most one pull asks for while the stream has a backlog.
    prefetch: usize,
    /// Messages pulled but not yet handed to the engine.
    prefetched: std::sync::Mutex<Prefetched>,
    /// Told when the pull ahead has ended.
    pulled: Notify,
    consumer: Mutex<Option<jetstream::consumer::Consumer<pull::Config>>>,
    /// Messages an attempt holds, kept alive by [`keep_alive`].
    held: Arc<std::sync::Mutex<Held>>,
    /// The queue of [`send_acks`], started with the first receive.
    acks: std::sync::OnceLock<mpsc::UnboundedSender<AckOp>>,
    /// When the consumer was last looked up on the server.
    checked: std::sync::Mutex<Instant>,
}

/// Messages a pull brought beyond what the engine asked for, handed out by
/// the next receives before anything is pulled again.
///
/// Why: a pull request costs nats-server far more than a message does, and
/// the engine asks for as many messages as it has free slots, which during a
/// drain is a few at a time. So while the stream has a backlog (the last pull
/// came back full) a pull asks for `prefetch` messages, the handler's
/// concurrency, as the native consumers and nats.js' `consume()` do; a pull
/// that comes back short means the backlog is gone, and the next asks only
/// for the free slots again.
///
/// While there is a backlog, the next pull goes out *ahead*, as soon as no
/// more than half of `prefetch` messages wait here (as `consume()` re-pulls at
/// half its batch), in a task of its own ([`JetStreamSource::pull_ahead`]);
/// without it every `prefetch` messages the handler's slots stood empty for
/// a pull's round trip, and the host sat idle for two fifths of a drain. So
/// at most one and a half times `prefetch` messages wait here, kept alive by
/// [`keep_alive`] like those being handled. The cost: JetStream counts every
/// delivery, so a message still waiting here when the host stops is given
/// back (`Nak`) with a delivery counted that no attempt used, as one in a
/// quorum queue's prefetch is; after a crash it comes back when its ack wait
/// runs out, counted the same way.
#[derive(Default)]
struct Prefetched {
    waiting: std::collections::VecDeque<Delivery>,
    /// The last pull returned all it asked for: there is a backlog.
    backlog: bool,
    /// A pull ahead is out; it ends by telling `JetStreamSource::pulled`.
    ahead: bool,
    /// The source was stopped: nothing waits here any more.
    stopped: bool,
}

impl Prefetched {
    /// Keep `extra`, brought by a pull that did (`backlog`) or did not fill
    /// what it asked for, for the next receives; once the source is
    /// stopped, return it instead, to be given back at once.
    fn keep(&mut self, extra: Vec<Delivery>, backlog: bool) -> Vec<Delivery> {
        self.backlog = backlog;
        if self.stopped {
            return extra;
        }
        self.waiting.extend(extra);
        Vec::new()
    }
}

/// The held messages of a source, by a number of their own. Hashed twice per
/// message (entered, removed), by foldhash rather than SipHash: the keys are
/// the source's own sequential numbers, not anyone's input.
#[derive(Default)]
struct Held {
    next: u64,
    ackers: HashMap<u64, Weak<jetstream::message::Acker>, foldhash::fast::RandomState>,
}

fn held_lock(held: &std::sync::Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Declare `broker`'s streams whenever they may be missing (`declared` is
/// false: at start-up, after a reconnect, after a call found one missing),
/// retrying with backoff while NATS does not answer, and at once when woken.
/// Ends with the broker.
async fn keep_declared(broker: Weak<NatsBroker>, recheck: Arc<Notify>) {
    /// How often an idle keeper checks that its broker is still there.
    const IDLE_CHECK: Duration = Duration::from_secs(5);
    let mut failures = 0;
    loop {
        let Some(b) = broker.upgrade() else { return };
        let pause = if b.declared.load(Ordering::Acquire) {
            failures = 0;
            IDLE_CHECK
        } else {
            match b.declare().await {
                Ok(()) => {
                    failures = 0;
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %format!("{e:#}"), "declaring JetStream streams failed; trying again");
                    super::reconnect_backoff(failures)
                }
            }
        };
        drop(b);
        // A wake-up that came before this wait is kept by `Notify`.
        let _ = tokio::time::timeout(pause, recheck.notified()).await;
    }
}

/// One ack (or nak, term, progress) to send, and who waits for it.
type AckOp = (Arc<jetstream::message::Acker>, AckKind, oneshot::Sender<Result<()>>);

/// Send a source's acks in bursts. Woken by the first, it lets every other
/// task that is ready run first (attempts finishing now queue theirs), then
/// hands the whole burst to the client without yielding in between, so the
/// client's connection task writes it as one frame. Without this each ack was
/// its own write: a fifth of the host's CPU in syscalls in the JetStream
/// drain, and as many wake-ups of the server.
async fn send_acks(mut rx: mpsc::UnboundedReceiver<AckOp>) {
    const BURST: usize = 1024;
    let mut burst = Vec::with_capacity(BURST);
    while rx.recv_many(&mut burst, BURST).await > 0 {
        tokio::task::yield_now().await;
        while burst.len() < BURST {
            match rx.try_recv() {
                Ok(op) => burst.push(op),
                Err(_) => break,
            }
        }
        for (acker, kind, done) in burst.drain(..) {
            let sent = acker.ack_with(kind).await.map_err(|e| anyhow!("JetStream ack: {e}"));
            let _ = done.send(sent);
        }
    }
}

impl JetStreamSource {
    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let mut guard = self.consumer.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        self.broker.declare().await?;
        let stream = self.broker.js.get_stream(&self.stream).await.map_err(|e| {
            self.broker.redeclare();
            anyhow!("JetStream stream {}: {e}", self.stream)
        })?;
        let consumer = stream
            .get_or_create_consumer(
                &self.consumer_name,
                pull::Config {
                    durable_name: Some(self.consumer_name.clone()),
                    filter_subject: self.subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.lease,
                    // wharf dead-letters by itself; the server never gives up.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("JetStream consumer {} on {}: {e}", self.consumer_name, self.stream))?;
        *guard = Some(consumer.clone());
        Ok(consumer)
    }
}

#[async_trait]
impl Source for JetStreamSource {
    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let ask = loop {
            let ahead = {
                let mut p = prefetched_lock(&self.prefetched);
                if !p.waiting.is_empty() {
                    let n = max.min(p.waiting.len());
                    let out = p.waiting.drain(..n).collect();
                    self.pull_ahead(&mut p);
                    return Ok(out);
                }
                if p.stopped {
                    // Stopped while this receive waited for the pull ahead:
                    // take nothing more.
                    return Ok(Vec::new());
                }
                if !p.ahead {
                    break if p.backlog { max.max(self.prefetch) } else { max };
                }
                self.pulled.notified()
            };
            // Nothing waits here, but the pull ahead is out: its messages
            // come sooner than a new pull's would.
            self.wait_ahead(ahead).await;
        };
        let (mut pulled, backlog, failed) = self.pull(ask).await;
        if let Some(e) = failed {
            if pulled.is_empty() {
                return Err(e);
            }
            // What arrived before the failure is ours: hand it out.
            tracing::warn!(consumer = %self.consumer_name, error = %format!("{e:#}"), received = pulled.len(), "JetStream fetch failed part-way");
        }
        tracing::debug!(consumer = %self.consumer_name, asked = ask, pulled = pulled.len(), free = max, "JetStream pull");
        let extra = if pulled.len() > max {
            pulled.split_off(max)
        } else {
            Vec::new()
        };
        let unwanted = {
            let mut p = prefetched_lock(&self.prefetched);
            let unwanted = p.keep(extra, backlog);
            self.pull_ahead(&mut p);
            unwanted
        };
        release_all(unwanted).await;
        Ok(pulled)
    }

    async fn stop(&self) {
        let (waiting, ahead) = {
            let mut p = prefetched_lock(&self.prefetched);
            p.stopped = true;
            (p.waiting.drain(..).collect(), p.ahead.then(|| self.pulled.notified()))
        };
        release_all(waiting).await;
        // A pull ahead still out gives its messages back itself (it finds
        // the source stopped); wait for that, so they are sent before exit.
        if let Some(ahead) = ahead {
            self.wait_ahead(ahead).await;
        }
    }
}

impl JetStreamSource {
    /// Send the next pull out now, in a task of its own, if the stream has a
    /// backlog and no more than half of `prefetch` messages are left
    /// waiting (see [`Prefetched`]). Called with the lock held, so there is
    /// never more than one pull ahead. A source that pulls one message at a
    /// time (a rate-limited handler's) never pulls ahead: what it pulled
    /// would only wait, out of other hosts' reach.
    fn pull_ahead(&self, p: &mut Prefetched) {
        if self.prefetch < 2 || !p.backlog || p.ahead || p.stopped || p.waiting.len() > self.prefetch / 2 {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        p.ahead = true;
        tokio::spawn(async move {
            let (pulled, backlog, failed) = me.pull(me.prefetch).await;
            if let Some(e) = &failed {
                // Said by the next receive, which pulls by itself (the
                // backlog is forgotten) and meets the same failure.
                tracing::debug!(consumer = %me.consumer_name, error = %format!("{e:#}"), received = pulled.len(), "JetStream pull ahead failed");
            }
            tracing::debug!(consumer = %me.consumer_name, asked = me.prefetch, pulled = pulled.len(), "JetStream pull ahead");
            let unwanted = prefetched_lock(&me.prefetched).keep(pulled, backlog);
            release_all(unwanted).await;
            prefetched_lock(&me.prefetched).ahead = false;
            me.pulled.notify_waiters();
        });
    }

    /// Wait for the pull ahead to end; `ahead` was made while the lock was
    /// held and the pull was out, so its end cannot be missed. Bounded by
    /// more than a pull's own wait, in case its task never ends.
    async fn wait_ahead(&self, ahead: tokio::sync::futures::Notified<'_>) {
        let _ = tokio::time::timeout(FETCH_WAIT * 3, ahead).await;
    }
}

/// Give prefetched messages back to the server, unrun.
async fn release_all(deliveries: Vec<Delivery>) {
    if !deliveries.is_empty() {
        tracing::debug!(messages = deliveries.len(), "giving prefetched JetStream messages back");
    }
    for d in deliveries {
        if let Err(e) = d.acker.release().await {
            tracing::warn!(message_id = %d.id, error = %format!("{e:#}"), "could not give a prefetched message back; it comes back after its ack wait");
        }
    }
}

fn prefetched_lock(p: &std::sync::Mutex<Prefetched>) -> std::sync::MutexGuard<'_, Prefetched> {
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl JetStreamSource {
    /// Pull up to `ask` messages: what arrived, whether it filled `ask`
    /// (there is a backlog), and the failure that cut the pull short, if
    /// any. After a failure the consumer may be gone (a server that came
    /// back without its data): the next pull looks it up, or makes it,
    /// again.
    async fn pull(&self, ask: usize) -> (Vec<Delivery>, bool, Option<anyhow::Error>) {
        let mut pulled = Vec::new();
        let failed = self.fetch(ask, &mut pulled).await.err();
        if failed.is_some() {
            *self.consumer.lock().await = None;
        }
        let backlog = failed.is_none() && pulled.len() == ask;
        (pulled, backlog, failed)
    }

    /// Pull up to `max` messages into `out`. On a failure part-way, `out`
    /// keeps what arrived before it.
    async fn fetch(&self, max: usize, out: &mut Vec<Delivery>) -> Result<()> {
        let consumer = self.consumer().await?;
        let acks = self.acks.get_or_init(|| {
            // A consumer that existed before (bound, not created) keeps its
            // own ack wait, which may be shorter than the lease.
            let ack_wait = consumer.cached_info().config.ack_wait;
            let ack_wait = if ack_wait.is_zero() {
                self.lease
            } else {
                ack_wait.min(self.lease)
            };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send_acks(rx));
            tokio::spawn(keep_alive(Arc::downgrade(&self.held), tx.clone(), ack_wait));
            tx
        });
        let mut batch = consumer
            .fetch()
            .max_messages(max)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| anyhow!("fetching from {}: {e}", self.consumer_name))?;
        while let Some(next) = batch.next().await {
            let message = next.map_err(|e| anyhow!("fetching from {}: {e}", self.consumer_name))?;
            let reply = message.reply.as_ref().map_or("", |r| r.as_str());
            let meta = ack_meta(reply)?;
            let attempt = u32::try_from(meta.delivered.max(1)).unwrap_or(u32::MAX);
            let published_ms = meta.published_ms;
            let (headers, id) = headers_and_id(message.headers.as_ref());
            let id = id.unwrap_or_else(|| format!("{}:{}", meta.stream, meta.stream_sequence));
            let (m, acker) = message.split();
            let acker = Arc::new(acker);
            let held_id = {
                let mut held = held_lock(&self.held);
                held.next += 1;
                let id = held.next;
                held.ackers.insert(id, Arc::downgrade(&acker));
                id
            };
            out.push(Delivery {
                id,
                subject: m.subject.as_str().to_owned(),
                payload: m.payload.clone(),
                headers,
                content_type: None,
                reply_to: None,
                attempt,
                redelivered: attempt > 1,
                first_seen_ms: published_ms,
                acker: Box::new(JetStreamAcker {
                    broker: self.broker.clone(),
                    acker,
                    held: (self.held.clone(), held_id),
                    holding: AtomicBool::new(true),
                    acks: acks.clone(),
                    message: m,
                    double_ack: self.double_ack,
                }),
            });
        }
        if out.is_empty() {
            self.check_consumer(consumer).await?;
        }
        Ok(())
    }

    /// An empty fetch looks the same whether the stream is idle or the
    /// consumer is gone: a server that came back without its data answers a
    /// pull for a missing consumer with nothing at all. While fetches come
    /// back empty, ask the server about the consumer every
    /// [`CONSUMER_CHECK`]; an error makes the next receive declare the
    /// stream and the consumer again.
    async fn check_consumer(&self, mut consumer: jetstream::consumer::Consumer<pull::Config>) -> Result<()> {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.elapsed() < CONSUMER_CHECK {
                return Ok(());
            }
            *checked = Instant::now();
        }
        consumer
            .info()
            .await
            .map(drop)
            .map_err(|e| anyhow!("JetStream consumer {} on {}: {e}", self.consumer_name, self.stream))
    }
}

/// Send `Progress` for every held message every third of the ack wait, so a
/// message is refreshed at least that often however long it is held. Ends
/// with the source.
async fn keep_alive(held: Weak<std::sync::Mutex<Held>>, acks: mpsc::UnboundedSender<AckOp>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(held) = held.upgrade() else { return };
        let ackers: Vec<_> = held_lock(&held).ackers.values().filter_map(Weak::upgrade).collect();
        drop(held);
        for acker in ackers {
            // A failed progress is not fatal: the next tick tries again, and
            // a message whose ack wait ran out is redelivered (dedup absorbs
            // the copy).
            let (done, _) = oneshot::channel();
            if acks.send((acker, AckKind::Progress, done)).is_err() {
                return;
            }
        }
    }
}

struct JetStreamAcker {
    broker: Arc<NatsBroker>,
    acker: Arc<jetstream::message::Acker>,
    /// Its entry in the source's held messages.
    held: (Arc<std::sync::Mutex<Held>>, u64),
    /// The entry is still there: neither settled nor dropped yet.
    holding: AtomicBool,
    acks: mpsc::UnboundedSender<AckOp>,
    message: async_nats::Message,
    double_ack: bool,
}

impl Drop for JetStreamAcker {
    fn drop(&mut self) {
        self.unhold();
    }
}

impl JetStreamAcker {
    /// No more progress for this message: it is being settled (or dropped).
    /// Once: settling unholds, and so does the drop that follows it.
    fn unhold(&self) {
        if self.holding.swap(false, Ordering::AcqRel) {
            held_lock(&self.held.0).ackers.remove(&self.held.1);
        }
    }

    async fn send(&self, kind: AckKind) -> Result<()> {
        self.unhold();
        let (done, sent) = oneshot::channel();
        self.acks
            .send((self.acker.clone(), kind, done))
            .map_err(|_| anyhow!("JetStream ack: the source's ack sender stopped"))?;
        sent.await
            .map_err(|_| anyhow!("JetStream ack: the source's ack sender stopped"))?
    }
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self) -> Result<()> {
        if self.double_ack {
            // Confirmed by the server: one round trip each, nothing to batch.
            self.unhold();
            self.acker
                .double_ack()
                .await
                .map_err(|e| anyhow!("JetStream double ack: {e}"))
        } else {
            self.send(AckKind::Ack).await
        }
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        self.send(AckKind::Nak(Some(delay))).await
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        // The server counts every delivery; a deferral is one.
        self.send(AckKind::Nak(Some(delay))).await
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let (mut all, id) = headers_and_id(self.message.headers.as_ref());
        let id = id.unwrap_or_default();
        all.retain(|(k, _)| k != MSG_ID);
        all.push((MSG_ID.to_string(), format!("{id}:dead")));
        all.extend(headers);
        self.broker
            .js_publish(queue, header_map(&all), self.message.payload.clone())
            .await
            .context("dead-letter publish")?
            .await
            .context("dead-letter publish")?;
        self.send(AckKind::Term).await
    }

    async fn release(&self) -> Result<()> {
        self.send(AckKind::Nak(None)).await
    }
}

// ---------------------------------------------------------------- sink

struct NatsSink {
    broker: Arc<NatsBroker>,
    kind: NatsKind,
}

#[async_trait]
impl Sink for NatsSink {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<()> {
        let mut confirmations = Vec::new();
        let mut core = false;
        for m in messages {
            let mut headers = m.headers.clone();
            if let Some(id) = &m.id {
                headers.push((MSG_ID.to_string(), id.clone()));
            }
            let payload: Bytes = m.payload.clone();
            if self.kind == NatsKind::Core || m.subject.starts_with("_INBOX.") {
                self.broker
                    .client
                    .publish_with_headers(m.subject.clone(), header_map(&headers), payload)
                    .await?;
                core = true;
            } else {
                confirmations.push(
                    self.broker
                        .js_publish(&m.subject, header_map(&headers), payload)
                        .await?,
                );
            }
        }
        for confirmed in confirmations {
            confirmed.await?;
        }
        if core {
            self.broker
                .client
                .flush()
                .await
                .context("flushing core NATS publishes")?;
        }
        Ok(())
    }
}

/// Check that `subject` is a valid NATS subject for a source (wildcards
/// allowed) — used by the manifest.
pub fn check_source_subject(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.chars().any(|c| c.is_whitespace()) {
        bail!("NATS subject {subject:?} must be non-empty with no whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_come_sorted_with_the_first_message_id() {
        let mut map = HeaderMap::new();
        map.append("Zed", "1");
        map.append(MSG_ID, "order-7");
        map.append(MSG_ID, "order-7b");
        map.append("Alpha", "2");
        let (headers, id) = headers_and_id(Some(&map));
        assert_eq!(id.as_deref(), Some("order-7"), "the id is what HeaderMap::get gives");
        let expected = [("Alpha", "2"), (MSG_ID, "order-7"), (MSG_ID, "order-7b"), ("Zed", "1")];
        let expected: Vec<_> = expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(headers, expected);
        assert_eq!(id, map.get(MSG_ID).map(|v| v.to_string()));
    }

    /// A timestamp as the server writes it: nanoseconds since the epoch.
    const TS: &str = "1790230470084404999";

    #[test]
    fn ack_subjects_of_both_formats_are_read() {
        let expected = |stream, delivered, stream_sequence| AckMeta {
            stream,
            stream_sequence,
            delivered,
            published_ms: 1_790_230_470_084,
        };
        // The original format: seven tokens after the prefix.
        let v1 = format!("$JS.ACK.orders.workers.3.100.7.{TS}.42");
        assert_eq!(ack_meta(&v1).unwrap(), expected("orders", 3, 100));
        // ADR-15's: a domain (`_` for none) and an account hash before
        // them, and tokens after them that wharf does not read.
        let v2 = format!("$JS.ACK._.szMpdrwD.orders.workers.1.5.1.{TS}.0");
        assert_eq!(ack_meta(&v2).unwrap(), expected("orders", 1, 5));
        let v2_more = format!("$JS.ACK.hub.szMpdrwD.orders.workers.2.50.9.{TS}.0.rand.future");
        assert_eq!(ack_meta(&v2_more).unwrap(), expected("orders", 2, 50));
    }

    #[test]
    fn a_malformed_ack_subject_is_an_error_that_quotes_it() {
        for (reply, why) in [
            (format!("$JS.ACK.orders.workers.3.100.7.{TS}"), "6 tokens"),
            (format!("$JS.ACK.hub.szMpdrwD.orders.workers.2.50.9.{TS}"), "8 tokens"),
            (format!("_INBOX.orders.workers.3.100.7.{TS}.42"), "prefix"),
            (
                format!("$JS.ACK.orders.workers.x.100.7.{TS}.42"),
                "delivery count \"x\"",
            ),
            ("$JS.ACK.orders.workers.3.100.7.-1.42".to_string(), "timestamp \"-1\""),
            (String::new(), "prefix"),
        ] {
            let error = ack_meta(&reply).unwrap_err().to_string();
            assert!(error.contains(why), "{reply}: {error}");
            assert!(error.contains(&format!("{reply:?}")), "{reply}: {error}");
        }
    }

    #[test]
    fn a_message_without_an_id_header_has_none() {
        let mut map = HeaderMap::new();
        map.append("nats-msg-id", "not the id: header names are case-sensitive");
        let (headers, id) = headers_and_id(Some(&map));
        assert_eq!(id, None);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers_and_id(None), (Vec::new(), None));
    }
}
