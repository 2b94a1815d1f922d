//! The seam between wharf and a message broker.
//!
//! A backend provides two things:
//!
//! - a [`Source`]: batches of [`Delivery`]s for one subject (queue, stream,
//!   consumer). Each delivery carries its own [`Acker`], which settles it in
//!   exactly one way: `ack`, `retry(delay)`, `dead_letter`, or `release`.
//! - a [`Sink`]: publish with broker confirmation.
//!
//! Every decision about *which* of those to call is made by
//! [`crate::delivery`]; backends only carry them out, as atomically as the
//! broker allows (the embedded broker moves a message to its dead-letter queue
//! in one transaction). One file per backend lives beside this one.

pub mod amqp;
pub mod embedded;
pub mod nats;
pub mod redis;

use std::sync::Arc;

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// Stable id; the broker assigns one when `None`.
    pub id: Option<String>,
    /// Target subject.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Application headers.
    pub headers: Vec<(String, String)>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Where replies should go.
    pub reply_to: Option<String>,
    /// Deliver no sooner than this from now.
    pub delay: Duration,
}

/// One received message and the means to settle it.
pub struct Delivery {
    /// Stable message id (the dedup key).
    pub id: String,
    /// The subject it arrived on.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Application headers.
    pub headers: Vec<(String, String)>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Where replies should go.
    pub reply_to: Option<String>,
    /// 1-based attempt number, counted durably by the broker.
    pub attempt: u32,
    /// Whether this message was delivered before.
    pub redelivered: bool,
    /// When the broker first saw it, Unix ms.
    pub first_seen_ms: u64,
    /// Settles this delivery.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Settles one delivery. Exactly one method is called, once.
///
/// An `Err` means the outcome is unknown (the broker could not be told): the
/// message will come back when its lease expires, and dedup absorbs a repeat.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: remove the message.
    async fn ack(&self) -> Result<()>;
    /// Failed, transiently: deliver again no sooner than `delay` from now.
    /// The attempt already counted.
    async fn retry(&self, delay: Duration) -> Result<()>;
    /// Failed for good: move to dead-letter queue `queue` with `headers`
    /// added, and remove from the source, atomically where possible.
    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()>;
    /// Not processed (shutdown): give it back now without counting the attempt.
    async fn release(&self) -> Result<()>;
    /// Not processed (a copy is in flight elsewhere): give it back, to be
    /// delivered no sooner than `delay` from now, without counting the
    /// attempt where the broker allows it.
    async fn defer(&self, delay: Duration) -> Result<()>;
}

/// Where a handler's messages come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// Wait for, then return, between 1 and `max` deliveries. Each is hidden
    /// from other consumers for `lease`, after which it is delivered again
    /// unless settled. Returns early with none only on error.
    async fn receive(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>>;

    /// Stop taking messages from the broker (shutdown), so that what this
    /// host releases goes to other consumers rather than back to it. Runs
    /// alongside a receive that was under way, which should then return
    /// what it already took without waiting for more (a receive that waits
    /// no longer than a second or so may simply run out its wait). The host
    /// waits for a stop at most 5 s (`delivery::SOURCE_STOP`).
    async fn stop(&self) {}

    /// Send now the acks this source holds back for its next receive to
    /// carry (the Redis stream source does): a handled message waits to
    /// settle behind them, so no receive may come until they are sent.
    fn flush_acks(&self) {}
}

/// Where a handler's publishes go.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Publish `messages`, returning once the broker has confirmed all of them
    /// (durably stored, for durable brokers).
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<()>;
}

/// How long to wait before reconnecting or receiving again after `failures`
/// failures in a row: exponential from 100 ms, capped at 5 s, with equal
/// jitter so that many consumers do not hammer a recovering broker in step.
pub fn reconnect_backoff(failures: u32) -> Duration {
    let ceiling = Duration::from_millis(100 * 2u64.pow(failures.min(6))).min(Duration::from_secs(5));
    ceiling / 2 + (ceiling / 2).mul_f64(rand::random::<f64>())
}

/// A configured broker, by backend. The one place that maps manifest
/// settings to a backend's sources, sinks and dedup store.
#[derive(Clone)]
pub enum Broker {
    /// The embedded broker.
    Embedded(embedded::EmbeddedBroker),
    /// A Redis server.
    Redis(Arc<redis::RedisBroker>),
    /// A NATS server.
    Nats(Arc<nats::NatsBroker>),
    /// A RabbitMQ server.
    Amqp(Arc<amqp::AmqpBroker>),
}

/// What a binding needs from its broker.
pub struct Endpoints {
    /// Where messages come from.
    pub source: Arc<dyn Source>,
    /// Dead-letter queue name.
    pub dead_letter_queue: String,
}

impl Broker {
    /// The source for `cfg`, and its dead-letter queue (`dead_letter` when
    /// the manifest names one). `concurrency`: the messages the source's
    /// consumer loop runs at once (the handler's, or its share on a shard),
    /// which sizes prefetch. `reclaim_after`: how long an entry must sit
    /// idle with a dead consumer before another host takes it (streams).
    pub fn endpoints(
        &self,
        handler: &str,
        h: &crate::manifest::HandlerConfig,
        concurrency: u32,
        lease: Duration,
        reclaim_after: Duration,
    ) -> Endpoints {
        let (cfg, dead_letter) = (&h.source, h.dead_letter.as_deref());
        match self {
            Broker::Amqp(b) => Endpoints {
                source: b.source(&cfg.subject, u16::try_from(concurrency).unwrap_or(u16::MAX)),
                dead_letter_queue: dead_letter
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{}.dead", cfg.subject)),
            },
            Broker::Embedded(b) => Endpoints {
                source: b.source(&cfg.subject),
                dead_letter_queue: dead_letter.unwrap_or(&cfg.subject).to_string(),
            },
            Broker::Redis(b) => {
                let kind = redis_kind(cfg.kind).unwrap_or(redis::RedisKind::Stream);
                let group = cfg.group.as_deref().unwrap_or("wharf");
                Endpoints {
                    source: b.source(kind, &cfg.subject, group, reclaim_after),
                    dead_letter_queue: dead_letter
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{}:dead", cfg.subject)),
                }
            }
            Broker::Nats(b) => {
                let group = cfg.group.as_deref().unwrap_or("wharf");
                let source = match (cfg.kind, cfg.stream.as_deref()) {
                    (Some(crate::manifest::SourceKind::Jetstream), Some(stream)) => b.jetstream_source(
                        stream,
                        cfg.consumer.as_deref().unwrap_or(handler),
                        &cfg.subject,
                        lease,
                        cfg.double_ack.unwrap_or(false),
                        // A rate-limited handler takes one message at a
                        // time, after the limit: what it prefetched would
                        // only wait, out of other hosts' reach.
                        if h.rate_limit.is_some() {
                            1
                        } else {
                            concurrency as usize
                        },
                    ),
                    _ => b.core_source(&cfg.subject, group),
                };
                Endpoints {
                    source,
                    dead_letter_queue: dead_letter
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("wharf.dead.{handler}")),
                }
            }
        }
    }

    /// Whether every shard ([`crate::shard`]) reads `cfg`'s source, each
    /// with its share of the handler's concurrency; if not, the first shard
    /// reads it with all of it. Not Redis pub/sub, which gives every
    /// subscriber every message (core NATS subscribes in a queue group, and
    /// every other source leases, so a message goes to one shard). Not
    /// RabbitMQ either: its consumers' acks and deliveries go through the
    /// connection's own I/O thread (lapin's), so a shard does not keep a
    /// message on one thread, and two consumers of a queue measured 3–20%
    /// slower than one (docs/BENCHMARKS.md).
    pub fn read_on_every_shard(&self, cfg: &crate::manifest::SourceConfig) -> bool {
        match self {
            Broker::Redis(_) => !matches!(
                redis_kind(cfg.kind),
                Some(redis::RedisKind::Channel | redis::RedisKind::Pattern)
            ),
            Broker::Embedded(_) | Broker::Nats(_) => true,
            Broker::Amqp(_) => false,
        }
    }

    /// Whether each shard ([`crate::shard`]) makes a connection of its own
    /// to this broker, so that the connection is driven on the shard. Not
    /// RabbitMQ's: lapin drives each connection's socket on a thread of its
    /// own whatever runtime uses it, so a second connection would add a
    /// busy thread, not keep anything on one; the shards' sinks share the
    /// first shard's connection.
    pub fn connection_per_shard(&self) -> bool {
        !matches!(self, Broker::Amqp(_))
    }

    /// The sink for a handler's outbox. `source_kind` is the kind of the
    /// handler's source, the default when this broker is also the source's.
    pub fn sink(
        &self,
        to: Option<&crate::manifest::PublishTo>,
        source_kind: Option<crate::manifest::SourceKind>,
    ) -> Arc<dyn Sink> {
        match self {
            Broker::Embedded(b) => b.sink(),
            Broker::Amqp(b) => b.sink(to.and_then(|t| t.exchange.as_deref()).unwrap_or("")),
            Broker::Redis(b) => {
                let kind = to
                    .and_then(|t| redis_kind(t.kind))
                    .or_else(|| redis_kind(source_kind))
                    .map(|k| {
                        if k == redis::RedisKind::Pattern {
                            redis::RedisKind::Channel
                        } else {
                            k
                        }
                    })
                    .unwrap_or(redis::RedisKind::Stream);
                b.sink(kind, to.and_then(|t| t.maxlen))
            }
            Broker::Nats(b) => {
                use crate::manifest::SourceKind as K;
                let jetstream = matches!(to.and_then(|t| t.kind).or(source_kind), Some(K::Jetstream));
                b.sink(if jetstream {
                    nats::NatsKind::JetStream
                } else {
                    nats::NatsKind::Core
                })
            }
        }
    }

    /// Where dedup marks live for handlers consuming this broker: Redis keeps
    /// them itself (shared by every host); otherwise the local store (NATS:
    /// per host; JetStream's own duplicate window covers publishes).
    pub fn dedup(&self, local: &crate::store::Store) -> Arc<dyn crate::delivery::DedupStore> {
        match self {
            Broker::Embedded(_) | Broker::Nats(_) | Broker::Amqp(_) => Arc::new(local.clone()),
            Broker::Redis(b) => b.dedup(),
        }
    }

    /// Try to connect once (at start-up, to report readiness early).
    pub async fn probe(&self) -> Result<()> {
        match self {
            Broker::Embedded(_) => Ok(()),
            Broker::Redis(b) => b.probe().await,
            Broker::Nats(b) => b.probe().await,
            Broker::Amqp(b) => b.probe().await,
        }
    }

    /// Before the process exits: write out what the client still holds.
    pub async fn flush(&self) {
        if let Broker::Nats(b) = self {
            b.flush().await;
        }
    }

    /// Whether the broker is reachable.
    pub fn is_ready(&self) -> bool {
        match self {
            Broker::Embedded(_) => true,
            Broker::Redis(b) => b.health().is_up(),
            Broker::Nats(b) => b.is_up(),
            Broker::Amqp(b) => b.is_up(),
        }
    }
}

fn redis_kind(kind: Option<crate::manifest::SourceKind>) -> Option<redis::RedisKind> {
    use crate::manifest::SourceKind as K;
    Some(match kind? {
        K::Stream => redis::RedisKind::Stream,
        K::List => redis::RedisKind::List,
        K::Channel => redis::RedisKind::Channel,
        K::Pattern => redis::RedisKind::Pattern,
        K::Queue | K::Core | K::Jetstream => return None,
    })
}
