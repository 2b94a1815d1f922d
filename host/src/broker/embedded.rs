//! The embedded durable broker: queues in the host's redb database.
//!
//! What a manifest gets when a handler names no external broker. Each subject
//! is a queue with competing consumers (one handler binding per subject is
//! the usual shape; two bindings on one subject share its messages).
//!
//! Storage (all in one transaction per change, so a SIGKILL at any point
//! leaves every message either queued or settled):
//!
//! | table | key | value |
//! |---|---|---|
//! | `queue` | (subject, due ms, seq) | () — ordered by due time per subject |
//! | `meta` | seq | JSON [`Meta`]: id, headers, attempt count, current due time |
//! | `payload` | seq | the body |
//! | `dead` | (dead-letter queue, seq) | () |
//!
//! A lease is simply a new due time: taking a message moves its `queue` key
//! to `now + lease` and counts the attempt, in one commit. If the host dies,
//! the message becomes due again when the lease runs out. Retries and delayed
//! publishes use the same mechanism. Settling checks a lease token (the
//! delivery count) so that a late ack of an expired lease cannot remove a
//! message another consumer now holds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Acker, Delivery, OutboundMessage, Sink, Source};
use crate::store::{Store, now_ms};

const QUEUE: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("queue");
const META: TableDefinition<u64, &[u8]> = TableDefinition::new("meta");
const PAYLOAD: TableDefinition<u64, &[u8]> = TableDefinition::new("payload");
const DEAD: TableDefinition<(&str, u64), ()> = TableDefinition::new("dead");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_SEQ: &str = "next_seq";

/// How long an idle consumer sleeps before looking again, at most. Publishes
/// wake it at once; this only bounds the wait for delayed messages.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What the broker keeps about a message besides its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    subject: String,
    headers: Vec<(String, String)>,
    content_type: Option<String>,
    reply_to: Option<String>,
    published_at_ms: u64,
    /// Attempts counted (taken and not released).
    attempt: u32,
    /// Times taken; doubles as the lease token.
    deliveries: u32,
    /// Its key's due time in `queue` (unused while dead).
    due_ms: u64,
    /// The dead-letter queue it sits in, if dead.
    dead: Option<String>,
}

/// A dead-lettered message as listed by `wharf dlq list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetterEntry {
    /// Message id.
    pub id: String,
    /// The subject it was consumed from (where replay sends it).
    pub subject: String,
    /// Headers, dead-letter headers included.
    pub headers: Vec<(String, String)>,
    /// The body, as UTF-8 when it is, else base-16.
    pub payload: String,
    /// Attempts made.
    pub attempts: u32,
}

/// Depth of one subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Subject or dead-letter queue name.
    pub name: String,
    /// Due now.
    pub ready: u64,
    /// Leased to a consumer, or delayed (retries, delayed publishes).
    pub pending: u64,
    /// In this name's dead-letter queue.
    pub dead: u64,
}

/// The embedded broker. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBroker {
    store: Store,
    wake: Arc<Notify>,
}

impl EmbeddedBroker {
    /// Create the broker's tables (called once when the store opens).
    pub fn init_tables(txn: &WriteTransaction) -> Result<()> {
        txn.open_table(QUEUE)?;
        txn.open_table(META)?;
        txn.open_table(PAYLOAD)?;
        txn.open_table(DEAD)?;
        txn.open_table(COUNTERS)?;
        Ok(())
    }

    /// The broker on `store` (whose tables exist).
    pub fn new(store: Store) -> Self {
        Self {
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    /// A source consuming `subject`.
    pub fn source(&self, subject: &str) -> Arc<dyn Source> {
        Arc::new(EmbeddedSource {
            broker: self.clone(),
            subject: subject.to_string(),
            stopped: CancellationToken::new(),
        })
    }

    /// A sink publishing into this broker.
    pub fn sink(&self) -> Arc<dyn Sink> {
        Arc::new(self.clone())
    }

    /// Store `messages` durably; returns their ids.
    pub async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<Vec<String>> {
        let ids = self
            .store
            .write(move |txn| {
                let mut counters = txn.open_table(COUNTERS)?;
                let mut seq = counters.get(NEXT_SEQ)?.map(|v| v.value()).unwrap_or(1);
                let mut queue = txn.open_table(QUEUE)?;
                let mut meta = txn.open_table(META)?;
                let mut payloads = txn.open_table(PAYLOAD)?;
                let now = now_ms();
                let mut ids = Vec::with_capacity(messages.len());
                for m in messages {
                    let id = m.id.unwrap_or_else(new_id);
                    let due = now + m.delay.as_millis() as u64;
                    let record = Meta {
                        id: id.clone(),
                        subject: m.subject,
                        headers: m.headers,
                        content_type: m.content_type,
                        reply_to: m.reply_to,
                        published_at_ms: now,
                        attempt: 0,
                        deliveries: 0,
                        due_ms: due,
                        dead: None,
                    };
                    queue.insert((record.subject.as_str(), due, seq), ())?;
                    meta.insert(seq, serde_json::to_vec(&record)?.as_slice())?;
                    payloads.insert(seq, m.payload.as_ref())?;
                    ids.push(id);
                    seq += 1;
                }
                counters.insert(NEXT_SEQ, seq)?;
                Ok(ids)
            })
            .await?;
        self.wake.notify_waiters();
        Ok(ids)
    }

    /// Take up to `max` due messages of `subject`, leasing them for `lease`.
    async fn lease(&self, subject: &str, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let subject_owned = subject.to_string();
        let taken = self
            .store
            .write(move |txn| {
                let subject = subject_owned.as_str();
                let now = now_ms();
                let mut queue = txn.open_table(QUEUE)?;
                let mut meta_table = txn.open_table(META)?;
                let payloads = txn.open_table(PAYLOAD)?;
                let due: Vec<(u64, u64)> = queue
                    .range((subject, 0, 0)..=(subject, now, u64::MAX))?
                    .take(max)
                    .map(|e| e.map(|(k, _)| (k.value().1, k.value().2)))
                    .collect::<Result<_, _>>()?;
                let until = now + lease.as_millis() as u64;
                let mut taken = Vec::with_capacity(due.len());
                for (old_due, seq) in due {
                    let Some(raw) = meta_table.get(seq)? else { continue };
                    let mut m: Meta = serde_json::from_slice(raw.value())?;
                    drop(raw);
                    let payload = payloads
                        .get(seq)?
                        .map(|p| Bytes::copy_from_slice(p.value()))
                        .unwrap_or_default();
                    m.attempt += 1;
                    m.deliveries += 1;
                    m.due_ms = until;
                    queue.remove((subject, old_due, seq))?;
                    queue.insert((subject, until, seq), ())?;
                    meta_table.insert(seq, serde_json::to_vec(&m)?.as_slice())?;
                    taken.push((seq, m, payload));
                }
                Ok(taken)
            })
            .await?;
        Ok(taken
            .into_iter()
            .map(|(seq, m, payload)| Delivery {
                acker: Box::new(EmbeddedAcker {
                    broker: self.clone(),
                    seq,
                    token: m.deliveries,
                }),
                id: m.id,
                subject: m.subject,
                payload,
                headers: m.headers,
                content_type: m.content_type,
                reply_to: m.reply_to,
                attempt: m.attempt,
                redelivered: m.deliveries > 1,
                first_seen_ms: m.published_at_ms,
            })
            .collect())
    }

    /// The earliest due time of `subject`, if it has messages.
    fn next_due(&self, subject: &str) -> Result<Option<u64>> {
        self.store.read(|txn| {
            let queue = txn.open_table(QUEUE)?;
            let first = queue.range((subject, 0, 0)..=(subject, u64::MAX, u64::MAX))?.next();
            Ok(match first {
                Some(entry) => Some(entry?.0.value().1),
                None => None,
            })
        })
    }

    /// Apply `change` to the message `seq` if lease `token` still holds it.
    /// Returns false when the lease was lost (expired and taken again, or
    /// settled): the caller's outcome is then unknown and nothing is written.
    async fn settle(
        &self,
        seq: u64,
        token: u32,
        change: impl FnOnce(&WriteTransaction, Meta) -> Result<()> + Send + 'static,
    ) -> Result<bool> {
        let held = self
            .store
            .write(move |txn| {
                let m: Meta = {
                    let meta_table = txn.open_table(META)?;
                    let Some(raw) = meta_table.get(seq)? else {
                        return Ok(false);
                    };
                    serde_json::from_slice(raw.value())?
                };
                if m.deliveries != token || m.dead.is_some() {
                    return Ok(false);
                }
                txn.open_table(QUEUE)?.remove((m.subject.as_str(), m.due_ms, seq))?;
                change(txn, m)?;
                Ok(true)
            })
            .await?;
        self.wake.notify_waiters();
        Ok(held)
    }

    /// Dead-lettered messages in `queue`, oldest first.
    pub fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetterEntry>> {
        self.store.read(|txn| {
            let dead = txn.open_table(DEAD)?;
            let meta_table = txn.open_table(META)?;
            let payloads = txn.open_table(PAYLOAD)?;
            let mut out = Vec::new();
            for entry in dead.range((queue, 0)..=(queue, u64::MAX))? {
                let seq = entry?.0.value().1;
                let Some(raw) = meta_table.get(seq)? else { continue };
                let m: Meta = serde_json::from_slice(raw.value())?;
                let body = payloads.get(seq)?.map(|p| p.value().to_vec()).unwrap_or_default();
                let payload = String::from_utf8(body).unwrap_or_else(|e| hex::encode(e.as_bytes()));
                out.push(DeadLetterEntry {
                    id: m.id,
                    subject: m.subject,
                    headers: m.headers,
                    payload,
                    attempts: m.attempt,
                });
            }
            Ok(out)
        })
    }

    /// Move dead letters of `queue` (all, or the one with `id`) back to the
    /// subject they came from, with a fresh attempt count and the dead-letter
    /// headers removed. Returns how many moved.
    pub async fn replay(&self, queue: &str, id: Option<String>) -> Result<usize> {
        let queue_name = queue.to_string();
        let moved = self
            .store
            .write(move |txn| {
                let mut dead = txn.open_table(DEAD)?;
                let mut meta_table = txn.open_table(META)?;
                let mut queue = txn.open_table(QUEUE)?;
                let mut selected = Vec::new();
                for entry in dead.range((queue_name.as_str(), 0)..=(queue_name.as_str(), u64::MAX))? {
                    let seq = entry?.0.value().1;
                    let Some(raw) = meta_table.get(seq)? else { continue };
                    let m: Meta = serde_json::from_slice(raw.value())?;
                    if id.as_deref().is_none_or(|want| want == m.id) {
                        selected.push((seq, m));
                    }
                }
                let now = now_ms();
                for (seq, mut m) in selected.iter().cloned() {
                    dead.remove((queue_name.as_str(), seq))?;
                    m.dead = None;
                    m.attempt = 0;
                    m.due_ms = now;
                    m.headers
                        .retain(|(k, _)| !k.starts_with(crate::delivery::DEAD_LETTER_HEADER_PREFIX));
                    queue.insert((m.subject.as_str(), now, seq), ())?;
                    meta_table.insert(seq, serde_json::to_vec(&m)?.as_slice())?;
                }
                Ok(selected.len())
            })
            .await?;
        self.wake.notify_waiters();
        Ok(moved)
    }

    /// Depth of every subject and dead-letter queue that holds messages.
    pub fn stats(&self) -> Result<Vec<QueueStats>> {
        self.store.read(|txn| {
            let now = now_ms();
            let mut by_name: std::collections::BTreeMap<String, QueueStats> = Default::default();
            for entry in txn.open_table(QUEUE)?.iter()? {
                let (key, _) = entry?;
                let (subject, due, _) = key.value();
                let s = by_name.entry(subject.to_string()).or_default();
                if due <= now { s.ready += 1 } else { s.pending += 1 }
            }
            for entry in txn.open_table(DEAD)?.iter()? {
                let (key, _) = entry?;
                by_name.entry(key.value().0.to_string()).or_default().dead += 1;
            }
            Ok(by_name.into_iter().map(|(name, s)| QueueStats { name, ..s }).collect())
        })
    }
}

#[async_trait]
impl Sink for EmbeddedBroker {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Result<()> {
        EmbeddedBroker::publish(self, messages).await.map(drop)
    }
}

struct EmbeddedSource {
    broker: EmbeddedBroker,
    subject: String,
    /// Set on shutdown: a waiting receive returns with nothing.
    stopped: CancellationToken,
}

#[async_trait]
impl Source for EmbeddedSource {
    async fn receive(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        loop {
            if self.stopped.is_cancelled() {
                return Ok(vec![]);
            }
            // Register for wake-ups before looking, so a publish between the
            // look and the wait is not missed.
            let notified = self.broker.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = self.broker.lease(&self.subject, max, lease).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = now_ms();
            let wait = match self.broker.next_due(&self.subject)? {
                Some(due) if due > now => Duration::from_millis(due - now).min(IDLE_POLL),
                Some(_) => Duration::ZERO,
                None => IDLE_POLL,
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.stopped.cancelled() => {}
            }
        }
    }

    async fn stop(&self) {
        self.stopped.cancel();
    }
}

struct EmbeddedAcker {
    broker: EmbeddedBroker,
    seq: u64,
    token: u32,
}

impl EmbeddedAcker {
    fn lost(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{what} of embedded message #{} not applied: its lease expired and it was taken again (handler slower than the lease?)",
            self.seq
        )
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<()> {
        let seq = self.seq;
        let held = self
            .broker
            .settle(seq, self.token, move |txn, _| {
                txn.open_table(META)?.remove(seq)?;
                txn.open_table(PAYLOAD)?.remove(seq)?;
                Ok(())
            })
            .await?;
        if held { Ok(()) } else { Err(self.lost("ack")) }
    }

    async fn retry(&self, delay: Duration) -> Result<()> {
        let seq = self.seq;
        let held = self
            .broker
            .settle(seq, self.token, move |txn, mut m| {
                m.due_ms = now_ms() + delay.as_millis() as u64;
                txn.open_table(QUEUE)?.insert((m.subject.as_str(), m.due_ms, seq), ())?;
                txn.open_table(META)?.insert(seq, serde_json::to_vec(&m)?.as_slice())?;
                Ok(())
            })
            .await?;
        if held { Ok(()) } else { Err(self.lost("retry")) }
    }

    async fn dead_letter(&self, queue: &str, headers: Vec<(String, String)>) -> Result<()> {
        let seq = self.seq;
        let queue = queue.to_string();
        let held = self
            .broker
            .settle(seq, self.token, move |txn, mut m| {
                m.headers.extend(headers);
                txn.open_table(DEAD)?.insert((queue.as_str(), seq), ())?;
                m.dead = Some(queue);
                txn.open_table(META)?.insert(seq, serde_json::to_vec(&m)?.as_slice())?;
                Ok(())
            })
            .await?;
        if held { Ok(()) } else { Err(self.lost("dead-letter")) }
    }

    async fn release(&self) -> Result<()> {
        self.give_back(Duration::ZERO, "release").await
    }

    async fn defer(&self, delay: Duration) -> Result<()> {
        self.give_back(delay, "defer").await
    }
}

impl EmbeddedAcker {
    /// Make the message due after `delay`, uncounting this attempt.
    async fn give_back(&self, delay: Duration, what: &str) -> Result<()> {
        let seq = self.seq;
        let held = self
            .broker
            .settle(seq, self.token, move |txn, mut m| {
                m.attempt = m.attempt.saturating_sub(1);
                m.due_ms = now_ms() + delay.as_millis() as u64;
                txn.open_table(QUEUE)?.insert((m.subject.as_str(), m.due_ms, seq), ())?;
                txn.open_table(META)?.insert(seq, serde_json::to_vec(&m)?.as_slice())?;
                Ok(())
            })
            .await?;
        if held { Ok(()) } else { Err(self.lost(what)) }
    }
}

fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Open the store's embedded broker at `path`, for tools that read it after
/// the host has stopped (tests, inspection).
pub fn open_offline(path: &std::path::Path) -> Result<(Store, EmbeddedBroker)> {
    let store = crate::store::open_all(path).context("opening the embedded broker")?;
    Ok((store.clone(), EmbeddedBroker::new(store)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(subject: &str, id: &str) -> OutboundMessage {
        OutboundMessage {
            id: Some(id.into()),
            subject: subject.into(),
            payload: Bytes::from_static(b"{}"),
            headers: vec![],
            content_type: None,
            reply_to: None,
            delay: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn lease_hides_then_expires_and_counts_attempts() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, broker) = open_offline(&dir.path().join("db"))?;
        broker.publish(vec![msg("s", "a")]).await?;
        let src = broker.source("s");
        let first = src.receive(10, Duration::from_millis(50)).await?;
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].attempt, first[0].redelivered), (1, false));
        // Hidden while leased.
        assert_eq!(broker.stats()?[0].ready, 0);
        // Comes back after the lease with the attempt counted.
        let second = src.receive(10, Duration::from_secs(60)).await?;
        assert_eq!((second[0].attempt, second[0].redelivered), (2, true));
        // The first lease is stale: settling it must fail and change nothing.
        assert!(first[0].acker.ack().await.is_err());
        second[0].acker.ack().await?;
        assert!(broker.stats()?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn dead_letter_and_replay() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, broker) = open_offline(&dir.path().join("db"))?;
        broker.publish(vec![msg("s", "a"), msg("s", "b")]).await?;
        let got = broker.source("s").receive(10, Duration::from_secs(60)).await?;
        got[0]
            .acker
            .dead_letter("s.dead", vec![("wharf-dead-letter-reason".into(), "rejected".into())])
            .await?;
        got[1].acker.release().await?;
        let dead = broker.dead_letters("s.dead")?;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, "a");
        assert_eq!(broker.replay("s.dead", None).await?, 1);
        assert!(broker.dead_letters("s.dead")?.is_empty());
        let again = broker.source("s").receive(10, Duration::from_secs(60)).await?;
        // Released "b" did not count an attempt; replayed "a" starts afresh.
        assert!(again.iter().all(|d| d.attempt == 1), "{again:?}");
        assert!(again.iter().all(|d| d.headers.is_empty()));
        Ok(())
    }

    #[tokio::test]
    async fn retry_delays_delivery() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, broker) = open_offline(&dir.path().join("db"))?;
        broker.publish(vec![msg("s", "a")]).await?;
        let got = broker.source("s").receive(1, Duration::from_secs(60)).await?;
        got[0].acker.retry(Duration::from_secs(3600)).await?;
        let stats = broker.stats()?;
        assert_eq!((stats[0].ready, stats[0].pending), (0, 1));
        Ok(())
    }
}
