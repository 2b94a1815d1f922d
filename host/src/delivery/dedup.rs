//! Deduplication on (handler, message id).
//!
//! Before an attempt the engine *claims* the key: if the id was already
//! handled successfully within its TTL it is acked without running; if
//! another attempt (this host or another) holds it right now, this copy waits
//! and comes back later; otherwise the claim is taken, for one lease. On
//! success the key is marked done for the TTL — after the outbox was
//! confirmed, just before the ack — and on failure the claim is dropped. A
//! crash leaves a claim that expires with the lease, so the redelivered
//! message can run.

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::store::{Store, now_ms};

/// (handler, id) → (expires ms, done).
const DEDUP: TableDefinition<(&str, &str), (u64, bool)> = TableDefinition::new("dedup");

/// Create the dedup table.
pub fn init_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(DEDUP)?;
    Ok(())
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has handled or holds it: the caller now does.
    Acquired,
    /// Already handled successfully: a duplicate.
    Done,
    /// Another attempt holds it right now.
    Busy,
}

/// Where dedup keys live. The embedded store keeps them for one host; Redis
/// lets several hosts share them.
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// Claim `(handler, id)` for `lease`.
    async fn claim(&self, handler: &str, id: &str, lease: Duration) -> Result<Claim>;
    /// Mark `(handler, id)` handled, for `ttl`.
    async fn finish(&self, handler: &str, id: &str, ttl: Duration) -> Result<()>;
    /// Drop this attempt's claim (the attempt failed), unless already done.
    async fn abandon(&self, handler: &str, id: &str) -> Result<()>;
}

#[async_trait]
impl DedupStore for Store {
    async fn claim(&self, handler: &str, id: &str, lease: Duration) -> Result<Claim> {
        let (handler, id) = (handler.to_string(), id.to_string());
        self.write(move |txn| {
            let mut t = txn.open_table(DEDUP)?;
            let now = now_ms();
            let current = t.get((handler.as_str(), id.as_str()))?.map(|v| v.value());
            Ok(match current {
                Some((expires, true)) if expires > now => Claim::Done,
                Some((expires, false)) if expires > now => Claim::Busy,
                _ => {
                    t.insert((handler.as_str(), id.as_str()), (now + lease.as_millis() as u64, false))?;
                    Claim::Acquired
                }
            })
        })
        .await
    }

    async fn finish(&self, handler: &str, id: &str, ttl: Duration) -> Result<()> {
        let (handler, id) = (handler.to_string(), id.to_string());
        let expires = now_ms().saturating_add(ttl.as_millis() as u64);
        self.write(move |txn| {
            txn.open_table(DEDUP)?
                .insert((handler.as_str(), id.as_str()), (expires, true))?;
            Ok(())
        })
        .await
    }

    async fn abandon(&self, handler: &str, id: &str) -> Result<()> {
        let (handler, id) = (handler.to_string(), id.to_string());
        self.write(move |txn| {
            let mut t = txn.open_table(DEDUP)?;
            let held = t.get((handler.as_str(), id.as_str()))?.is_some_and(|v| !v.value().1);
            if held {
                t.remove((handler.as_str(), id.as_str()))?;
            }
            Ok(())
        })
        .await
    }
}

/// Remove expired keys; returns how many.
pub async fn sweep_expired(store: &Store) -> Result<usize> {
    store
        .write(|txn| {
            let now = now_ms();
            let mut t = txn.open_table(DEDUP)?;
            let expired: Vec<(String, String)> = t
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, v)| v.value().0 <= now)
                .map(|(k, _)| (k.value().0.to_string(), k.value().1.to_string()))
                .collect();
            for (h, id) in &expired {
                t.remove((h.as_str(), id.as_str()))?;
            }
            Ok(expired.len())
        })
        .await
}

/// Count of ids `handler` handled within their TTL (for tests and inspection).
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
            let (expires, done) = v.value();
            if done && expires > now {
                n += 1;
            }
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claim_finish_abandon() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = crate::store::open_all(&dir.path().join("db"))?;
        let lease = Duration::from_secs(60);
        assert_eq!(store.claim("h", "a", lease).await?, Claim::Acquired);
        assert_eq!(store.claim("h", "a", lease).await?, Claim::Busy);
        assert_eq!(
            store.claim("other", "a", lease).await?,
            Claim::Acquired,
            "keys are per handler"
        );
        store.abandon("h", "a").await?;
        assert_eq!(store.claim("h", "a", lease).await?, Claim::Acquired);
        store.finish("h", "a", lease).await?;
        assert_eq!(store.claim("h", "a", lease).await?, Claim::Done);
        store.abandon("h", "a").await?;
        assert_eq!(
            store.claim("h", "a", lease).await?,
            Claim::Done,
            "abandon never undoes done"
        );
        // A crashed attempt's claim expires with its lease.
        assert_eq!(store.claim("h", "b", Duration::from_millis(1)).await?, Claim::Acquired);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.claim("h", "b", lease).await?, Claim::Acquired);
        assert_eq!(count(&store, "h")?, 1);
        Ok(())
    }
}
