//! RabbitMQ (AMQP 0-9-1) as a broker, through lapin.
//!
//! | what | how |
//! |---|---|
//! | topology | the manifest's exchanges, queues (classic or quorum, durable) and bindings, declared on every (re)connect |
//! | consume | one channel per source, `basic.qos` = the handler's concurrency, manual acks, folded into `basic.ack(multiple)` where safe ([`acks`]) |
//! | attempt | quorum queues: `x-delivery-count` + 1; plus wharf's `x-wharf-attempts` header, set when it republishes for a retry; a classic-queue redelivery after a crash counts one more |
//! | retry | confirmed republish (persistent) to `<queue>.wharf-retry`, whose per-message TTL dead-letters back to `<queue>`, then ack |
//! | dead letter | confirmed publish to the dead-letter queue (`<queue>.dead` by default) with the dead-letter headers, then ack — never the broker's DLX, which is at-most-once |
//! | publish | persistent, `message_id` = the outbox id, publisher confirms, before the source message is acked |
//!
//! Every settle happens after the republish is confirmed; if the host dies
//! between the confirm and the ack, the message is both retried (or
//! dead-lettered) and redelivered: at-least-once, and dedup absorbs it.
//!
//! lapin does not reconnect by itself here: the connection is made lazily and
//! remade (with the topology) after it fails; a source whose own channel
//! fails on a live connection declares the topology again on it instead
//! ([`AmqpBroker::channel_failed`]). An ack on a dead channel is "outcome
//! unknown" — the broker redelivers the message.

mod acks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use self::acks::{AckBatcher, Decision};
use super::{Acker, Delivery, OutboundMessage, Sink, Source};
use crate::store::now_ms;

/// Header carrying the attempts wharf has counted when it republished.
pub const ATTEMPTS_HEADER: &str = "x-wharf-attempts";
/// Header carrying the routing key a message was first published with, on
/// the copies wharf republishes (a retry comes back from its retry queue
/// with the work queue's name as its routing key).
pub const ROUTING_KEY_HEADER: &str = "x-wharf-routing-key";
/// How long a receive waits before returning empty.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);

/// An exchange to declare.
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    /// Name.
    pub name: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    pub kind: String,
}

/// A queue to declare.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Name.
    pub name: String,
    /// Quorum (replicated, counts deliveries) rather than classic.
    pub quorum: bool,
}

/// A binding to declare.
#[derive(Debug, Clone)]
pub struct BindingSpec {
    /// Queue.
    pub queue: String,
    /// Exchange.
    pub exchange: String,
    /// Routing key or pattern.
    pub routing_key: String,
}

/// The topology a manifest declares.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues.
    pub queues: Vec<QueueSpec>,
    /// Bindings.
    pub bindings: Vec<BindingSpec>,
}

/// A RabbitMQ connection and its topology.
pub struct AmqpBroker {
    url: String,
    topology: Topology,
    conn: Mutex<Option<Arc<Connection>>>,
}

impl AmqpBroker {
    /// A broker for `url`; connects on first use.
    pub fn new(url: &str, topology: Topology) -> Self {
        Self {
            url: url.to_string(),
            topology,
            conn: Mutex::new(None),
        }
    }

    /// Connect and declare the topology now (at start-up, so that nothing is
    /// published to a queue or exchange that does not exist yet).
    pub async fn probe(&self) -> Result<()> {
        self.connection().await.map(drop)
    }

    /// Whether the connection is up.
    pub fn is_up(&self) -> bool {
        self.conn
            .try_lock()
            .map(|c| c.as_ref().is_some_and(|c| c.status().connected()))
            .unwrap_or(true)
    }

    /// The live connection, made (and the topology declared) if needed.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", redact(&self.url)))?;
        self.declare_on(&conn).await?;
        tracing::info!(url = %redact(&self.url), "connected to RabbitMQ; topology declared");
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forget the connection after a failure, so the next use reconnects.
    async fn broken(&self) {
        *self.conn.lock().await = None;
    }

    /// A source's channel failed: opening its consumer, or while consuming.
    /// If the connection is still up, the failure was that channel's alone
    /// (a queue deleted under the host or never made, access refused: the
    /// server closes the channel, not the connection). Then declare the
    /// topology again on the same connection, which brings back a deleted
    /// queue, and leave the connection, and every other source's and sink's
    /// channel on it, alone. Before, any such failure forgot the connection:
    /// one handler consuming a missing queue made the host open a new
    /// connection (and declare everything again) at every retry.
    async fn channel_failed(&self) {
        let live = self.conn.lock().await.clone().filter(|c| c.status().connected());
        let Some(conn) = live else {
            self.broken().await;
            return;
        };
        if let Err(e) = self.declare_on(&conn).await {
            tracing::warn!(url = %redact(&self.url), error = %format!("{e:#}"), "could not declare the RabbitMQ topology again; reconnecting");
            self.broken().await;
        }
    }

    /// Declare the topology on a channel of its own, closed afterwards (a
    /// failed declare closes it anyway).
    async fn declare_on(&self, conn: &Connection) -> Result<()> {
        let channel = conn.create_channel().await?;
        self.declare(&channel).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    async fn declare(&self, ch: &Channel) -> Result<()> {
        let t = &self.topology;
        for e in &t.exchanges {
            let kind = match e.kind.as_str() {
                "direct" => lapin::ExchangeKind::Direct,
                "topic" => lapin::ExchangeKind::Topic,
                "fanout" => lapin::ExchangeKind::Fanout,
                "headers" => lapin::ExchangeKind::Headers,
                other => bail!("unknown exchange kind {other:?}"),
            };
            ch.exchange_declare(
                e.name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {}", e.name))?;
        }
        for q in &t.queues {
            declare_queue(ch, &q.name, q.quorum, FieldTable::default()).await?;
        }
        for b in &t.bindings {
            ch.queue_bind(
                b.queue.as_str().into(),
                b.exchange.as_str().into(),
                b.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {} to {} with {:?}", b.queue, b.exchange, b.routing_key))?;
        }
        Ok(())
    }

    /// A channel with publisher confirms on.
    async fn confirm_channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        let ch = match conn.create_channel().await {
            Ok(ch) => ch,
            Err(e) => {
                self.broken().await;
                return Err(e.into());
            }
        };
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// A source consuming `queue` (declared by the manifest or existing),
    /// with `prefetch` unacked messages at most.
    pub fn source(self: &Arc<Self>, queue: &str, prefetch: u16) -> Arc<dyn Source> {
        Arc::new(AmqpSource {
            broker: self.clone(),
            queue: queue.to_string(),
            prefetch,
            state: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            stopped: Default::default(),
        })
    }

    /// A sink publishing to `exchange` (the default exchange when empty) with
    /// the subject as routing key.
    pub fn sink(self: &Arc<Self>, exchange: &str) -> Arc<dyn Sink> {
        Arc::new(AmqpSink {
            broker: self.clone(),
            exchange: exchange.to_string(),
            channel: Mutex::new(None),
        })
    }
}

async fn declare_queue(ch: &Channel, name: &str, quorum: bool, mut args: FieldTable) -> Result<()> {
    if quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring queue {name}"))?;
    Ok(())
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_auth, host)) => format!("{}://***@{host}", scheme_auth.split("://").next().unwrap_or("amqp")),
        None => url.to_string(),
    }
}

fn header_int(table: Option<&FieldTable>, key: &str) -> Option<u64> {
    match table?.inner().get(key)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

fn headers_of(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(table) = table else { return vec![] };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let value = match v {
                AMQPValue::LongString(s) => s.to_string(),
                AMQPValue::ShortString(s) => s.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                _ => return None,
            };
            Some((k.to_string(), value))
        })
        .collect()
}

fn field_table(headers: &[(String, String)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    t
}

// ---------------------------------------------------------------- consume

struct AmqpSource {
    broker: Arc<AmqpBroker>,
    queue: String,
    prefetch: u16,
    state: Mutex<Option<(Arc<AckBatcher>, lapin::Consumer)>>,
    /// Channels of cancelled consumers, kept open for their in-flight acks.
    held: Mutex<Vec<Arc<AckBatcher>>>,
    /// Set on shutdown: no new consumer, and a waiting receive returns.
    stopped: tokio_util::sync::CancellationToken,
}

impl AmqpSource {
    async fn open(&self) -> Result<(Arc<AckBatcher>, lapin::Consumer)> {
        let conn = self.broker.connection().await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
        // The retry queue: messages wait there for their TTL, then the
        // broker dead-letters them back to the work queue.
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        declare_queue(&ch, &retry_queue(&self.queue), false, args).await?;
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                format!("wharf-{:08x}", rand::random::<u32>()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming queue {}", self.queue))?;
        Ok((AckBatcher::new(ch), consumer))
    }
}

fn retry_queue(queue: &str) -> String {
    format!("{queue}.wharf-retry")
}

#[async_trait]
impl Source for AmqpSource {
    async fn stop(&self) {
        // First, so that a receive waiting for deliveries gives up the
        // consumer it holds, which `cancel` needs.
        self.stopped.cancel();
        self.cancel().await;
    }

    async fn receive(&self, max: usize, _lease: Duration) -> Result<Vec<Delivery>> {
        if self.stopped.is_cancelled() {
            tokio::time::sleep(RECEIVE_WAIT).await;
            return Ok(vec![]);
        }
        let mut state = self.state.lock().await;
        if state
            .as_ref()
            .is_none_or(|(acks, _)| !acks.channel().status().connected())
        {
            *state = None;
            match self.open().await {
                Ok(s) => *state = Some(s),
                Err(e) => {
                    self.broker.channel_failed().await;
                    return Err(e);
                }
            }
        }
        let Some((acks, consumer)) = state.as_mut() else {
            return Ok(vec![]);
        };
        // Each delivery is recorded with the batcher as soon as it is taken
        // (before the next await), so a cancelled receive cannot leave a tag
        // unrecorded for a later `multiple` ack to sweep up.
        let acks = acks.clone();
        let mut out = Vec::new();
        let first = tokio::select! {
            first = tokio::time::timeout(RECEIVE_WAIT, consumer.next()) => first,
            _ = self.stopped.cancelled() => return Ok(vec![]),
        };
        match first {
            Err(_) => return Ok(vec![]),
            Ok(None) => {
                *state = None;
                bail!("the consumer of {} was cancelled", self.queue);
            }
            Ok(Some(Err(e))) => {
                *state = None;
                self.broker.channel_failed().await;
                return Err(anyhow!(e).context(format!("consuming {}", self.queue)));
            }
            Ok(Some(Ok(d))) => out.push(self.delivery(d, &acks)),
        }
        // Then whatever else has already arrived, without waiting (a zero
        // `timeout` here waited for the timer's next tick, up to 1 ms, every
        // time the buffer ran dry).
        while out.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => out.push(self.delivery(d, &acks)),
                _ => break,
            }
        }
        Ok(out)
    }
}

impl AmqpSource {
    async fn cancel(&self) {
        if let Some((acks, consumer)) = self.state.lock().await.take() {
            let _ = acks
                .channel()
                .basic_cancel(
                    consumer.tag().as_str().into(),
                    lapin::options::BasicCancelOptions::default(),
                )
                .await;
            // The channel stays open: deliveries still in flight are settled on it.
            drop(consumer);
            self.held.lock().await.push(acks);
        }
    }

    fn delivery(&self, d: lapin::message::Delivery, acks: &Arc<AckBatcher>) -> Delivery {
        acks.hold(d.delivery_tag);
        let props = &d.properties;
        let headers = props.headers().as_ref();
        let counted = header_int(headers, ATTEMPTS_HEADER).unwrap_or(0);
        let attempt = match header_int(headers, "x-delivery-count") {
            // Quorum queue: deliveries of this copy before this one.
            Some(before) => counted + before + 1,
            None => counted + 1 + u64::from(d.redelivered),
        };
        let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        // What the handler sees as the subject: the routing key the message
        // was published with (for the default exchange, the queue's name).
        let routing_key = match headers.and_then(|t| t.inner().get(ROUTING_KEY_HEADER)) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            _ => d.routing_key.to_string(),
        };
        let mut visible = headers_of(headers);
        visible.retain(|(k, _)| {
            k != ATTEMPTS_HEADER
                && k != ROUTING_KEY_HEADER
                && k != "x-delivery-count"
                && k != "x-death"
                && k != "x-first-death-queue"
        });
        let first_seen = props.timestamp().map(|t| t * 1000).unwrap_or_else(now_ms);
        Delivery {
            id: id.clone(),
            subject: routing_key.clone(),
            payload: Bytes::from(d.data.clone()),
            headers: visible,
            content_type: props.content_type().as_ref().map(|s| s.to_string()),
            reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
            attempt,
            redelivered: d.redelivered || attempt > 1,
            first_seen_ms: first_seen,
            acker: Box::new(AmqpAcker {
                broker: self.broker.clone(),
                queue: self.queue.clone(),
                id,
                attempt,
                routing_key,
                acks: acks.clone(),
                delivery: d,
            }),
        }
    }
}

struct AmqpAcker {
    broker: Arc<AmqpBroker>,
    queue: String,
    id: String,
    attempt: u32,
    /// The routing key it was first published with.
    routing_key: String,
    /// Settles this delivery on the channel it arrived on.
    acks: Arc<AckBatcher>,
    delivery: lapin::message::Delivery,
}

impl AmqpAcker {
    /// Publish a copy of the message to `queue` (default exchange) with
    /// `headers` added and `counted` attempts recorded, wait for the
    /// broker's confirm, then ack the original.
    async fn republish_then_ack(
        &self,
        queue: &str,
        extra: Vec<(String, String)>,
        counted: u32,
        expiration: Option<Duration>,
    ) -> Result<()> {
        let ch = self.broker.confirm_channel().await?;
        let props = &self.delivery.properties;
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(i64::from(counted)));
        headers.insert(
            ROUTING_KEY_HEADER.into(),
            AMQPValue::LongString(self.routing_key.as_str().into()),
        );
        for (k, v) in extra {
            headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
        }
        let mut out = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(self.id.as_str().into())
            .with_headers(headers)
            .with_timestamp(props.timestamp().unwrap_or(now_ms() / 1000));
        if let Some(ct) = props.content_type() {
            out = out.with_content_type(ct.clone());
        }
        if let Some(r) = props.reply_to() {
            out = out.with_reply_to(r.clone());
        }
        if let Some(ttl) = expiration {
            out = out.with_expiration(ttl.as_millis().max(1).to_string().into());
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &self.delivery.data,
                out,
            )
            .await?
            .await?;
        let _ = ch.close(200, "done".into()).await;
        if !confirm.is_ack() {
            bail!("RabbitMQ refused the copy for {queue} (nack)");
        }
        self.acks
            .settle(self.delivery.delivery_tag, Decision::Ack)
            .await
            .context("ack after republish")
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<()> {
        self.acks.settle(self.delivery.delivery_tag, Decision::Ack).await
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        self.republish_then_ack(&retry_queue(&self.queue), vec![], self.attempt, Some(delay))
            .await
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        self.republish_then_ack(
            &retry_queue(&self.queue),
            vec![],
            self.attempt.saturating_sub(1),
            Some(delay),
        )
        .await
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let ch = self.broker.confirm_channel().await?;
        declare_queue(&ch, queue, false, FieldTable::default()).await?;
        let _ = ch.close(200, "done".into()).await;
        self.republish_then_ack(queue, headers, self.attempt, None).await
    }

    async fn release(&self) -> Result<()> {
        self.acks.settle(self.delivery.delivery_tag, Decision::Requeue).await
    }
}

// ---------------------------------------------------------------- publish

struct AmqpSink {
    broker: Arc<AmqpBroker>,
    exchange: String,
    channel: Mutex<Option<Channel>>,
}

#[async_trait]
impl Sink for AmqpSink {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<()> {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_none_or(|c| !c.status().connected()) {
            *slot = Some(self.broker.confirm_channel().await?);
        }
        let Some(ch) = slot.as_ref() else { bail!("no channel") };
        let mut confirms = Vec::new();
        for m in &messages {
            let mut props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(field_table(&m.headers))
                .with_timestamp(now_ms() / 1000);
            if let Some(id) = &m.id {
                props = props.with_message_id(id.as_str().into());
            }
            if let Some(ct) = &m.content_type {
                props = props.with_content_type(ShortString::from(ct.as_str()));
            }
            let (exchange, key) = (self.exchange.clone(), m.subject.clone());
            let publish = ch
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.payload,
                    props,
                )
                .await;
            match publish {
                Ok(confirm) => confirms.push((key, confirm)),
                Err(e) => {
                    *slot = None;
                    return Err(anyhow!(e).context(format!("publishing to {key}")));
                }
            }
        }
        for (key, confirm) in confirms {
            match confirm.await {
                Ok(lapin::Confirmation::Ack(None)) => {}
                Ok(lapin::Confirmation::Ack(Some(_))) => {
                    bail!(
                        "message for {key:?} was not routed to any queue (exchange {:?})",
                        self.exchange
                    )
                }
                Ok(other) => bail!("RabbitMQ did not confirm the message for {key:?}: {other:?}"),
                Err(e) => {
                    *slot = None;
                    return Err(anyhow!(e).context(format!("confirm for {key}")));
                }
            }
        }
        Ok(())
    }
}
