//! Deduplication marks: (handler, message id) → handled successfully, until
//! the TTL runs out.
//!
//! A mark is written only after the handler succeeded and its outbox was
//! confirmed, just before the ack. A crash between mark and ack redelivers
//! the message, and the mark then acks it without running the handler again.

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::store::{Store, now_ms};

const DEDUP: TableDefinition<(&str, &str), u64> = TableDefinition::new("dedup");

/// Create the dedup table.
pub fn init_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(DEDUP)?;
    Ok(())
}

/// Where dedup marks live. The embedded store implements it; shared stores
/// (Redis) let several hosts share marks.
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// Whether `id` was handled successfully by `handler` within its TTL.
    async fn is_done(&self, handler: &str, id: &str) -> Result<bool>;
    /// Record that `handler` handled `id`, for `ttl`.
    async fn mark_done(&self, handler: &str, id: &str, ttl: Duration) -> Result<()>;
}

#[async_trait]
impl DedupStore for Store {
    async fn is_done(&self, handler: &str, id: &str) -> Result<bool> {
        self.read(|txn| {
            let t = txn.open_table(DEDUP)?;
            Ok(t.get((handler, id))?.is_some_and(|v| v.value() > now_ms()))
        })
    }

    async fn mark_done(&self, handler: &str, id: &str, ttl: Duration) -> Result<()> {
        let (handler, id) = (handler.to_string(), id.to_string());
        let expires = now_ms().saturating_add(ttl.as_millis() as u64);
        self.write(move |txn| {
            txn.open_table(DEDUP)?
                .insert((handler.as_str(), id.as_str()), expires)?;
            Ok(())
        })
        .await
    }
}

/// Remove expired marks; returns how many.
pub async fn sweep_expired(store: &Store) -> Result<usize> {
    store
        .write(|txn| {
            let now = now_ms();
            let mut t = txn.open_table(DEDUP)?;
            let expired: Vec<(String, String)> = t
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, v)| v.value() <= now)
                .map(|(k, _)| (k.value().0.to_string(), k.value().1.to_string()))
                .collect();
            for (h, id) in &expired {
                t.remove((h.as_str(), id.as_str()))?;
            }
            Ok(expired.len())
        })
        .await
}

/// Count of live marks for `handler` (for tests and inspection).
pub fn count(store: &Store, handler: &str) -> Result<usize> {
    store.read(|txn| {
        let t = txn.open_table(DEDUP)?;
        let now = now_ms();
        let mut n = 0;
        for e in t.range((handler, "")..)? {
            let (k, v) = e?;
            if k.value().0 != handler {
                break;
            }
            if v.value() > now {
                n += 1;
            }
        }
        Ok(n)
    })
}
