//! The tenants' key-value store, in the host's database.
//!
//! Keys are scoped by tenant: `(tenant, key)`. Each value is stored with its
//! expiry (Unix ms, 0 for none); expired values read as absent and are swept
//! by [`Kv::sweep_expired`]. Quotas per tenant: number of keys and value size,
//! from the manifest's `[tenants.<name>]`.

use anyhow::Result;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::store::{Store, now_ms};

const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const KV_KEYS: TableDefinition<&str, u64> = TableDefinition::new("kv_keys");

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Create the key-value tables.
pub fn init_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(KV)?;
    txn.open_table(KV_KEYS)?;
    Ok(())
}

/// Why a key-value operation failed; mirrors the WIT `kv-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A quota would be exceeded.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// `increment` on a value that is not a decimal integer.
    #[error("not a number: {0}")]
    NotANumber(String),
    /// The store failed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<anyhow::Error> for KvError {
    fn from(e: anyhow::Error) -> Self {
        KvError::Unavailable(format!("{e:#}"))
    }
}

/// A tenant's quota.
#[derive(Debug, Clone, Copy)]
pub struct KvQuota {
    /// Keys the tenant may hold.
    pub max_keys: u64,
    /// Largest value, in bytes.
    pub max_value_bytes: u64,
}

/// One tenant's view of the store.
#[derive(Clone)]
pub struct Kv {
    store: Store,
    tenant: String,
    quota: KvQuota,
}

fn decode(raw: &[u8], now: u64) -> Option<&[u8]> {
    let (expiry, value) = raw.split_at_checked(8)?;
    let expiry = u64::from_le_bytes(expiry.try_into().ok()?);
    (expiry == 0 || expiry > now).then_some(value)
}

fn encode(value: &[u8], expires_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out.extend_from_slice(value);
    out
}

impl Kv {
    /// The store as seen by `tenant`.
    pub fn new(store: Store, tenant: &str, quota: KvQuota) -> Self {
        Self {
            store,
            tenant: tenant.to_string(),
            quota,
        }
    }

    fn check_key(key: &str) -> Result<(), KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::QuotaExceeded(format!(
                "key is {} bytes; the limit is {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        Ok(())
    }

    /// The live value under `key`.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Self::check_key(key)?;
        Ok(self.store.read(|txn| {
            let t = txn.open_table(KV)?;
            let now = now_ms();
            Ok(t.get((self.tenant.as_str(), key))?
                .and_then(|v| decode(v.value(), now).map(<[u8]>::to_vec)))
        })?)
    }

    /// Write `value` (None deletes) under `key` with `expires_ms`; returns
    /// whether a live value was there before. Keeps the key count in step.
    fn put(
        txn: &WriteTransaction,
        tenant: &str,
        key: &str,
        value: Option<&[u8]>,
        expires_ms: u64,
        max_keys: u64,
    ) -> Result<Result<bool, KvError>> {
        let mut t = txn.open_table(KV)?;
        let mut counts = txn.open_table(KV_KEYS)?;
        let existed_row = t.get((tenant, key))?.map(|v| v.value().to_vec());
        let live_before = existed_row.as_deref().and_then(|r| decode(r, now_ms())).is_some();
        let count = counts.get(tenant)?.map(|v| v.value()).unwrap_or(0);
        match value {
            Some(v) => {
                if existed_row.is_none() {
                    if count >= max_keys {
                        return Ok(Err(KvError::QuotaExceeded(format!(
                            "tenant {tenant:?} already holds {count} keys (kv_max_keys = {max_keys})"
                        ))));
                    }
                    counts.insert(tenant, count + 1)?;
                }
                t.insert((tenant, key), encode(v, expires_ms).as_slice())?;
            }
            None => {
                if existed_row.is_some() {
                    t.remove((tenant, key))?;
                    counts.insert(tenant, count.saturating_sub(1))?;
                }
            }
        }
        Ok(Ok(live_before))
    }

    /// Store `value` under `key`, expiring after `ttl_ms` if given.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        Self::check_key(key)?;
        if value.len() as u64 > self.quota.max_value_bytes {
            return Err(KvError::QuotaExceeded(format!(
                "value is {} bytes (kv_max_value_bytes = {})",
                value.len(),
                self.quota.max_value_bytes
            )));
        }
        let (tenant, key, max) = (self.tenant.clone(), key.to_string(), self.quota.max_keys);
        let expires = ttl_ms.map(|t| now_ms().saturating_add(t.max(1))).unwrap_or(0);
        self.store
            .write(move |txn| Self::put(txn, &tenant, &key, Some(&value), expires, max))
            .await??;
        Ok(())
    }

    /// Remove `key`; true when a live value was there.
    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        Self::check_key(key)?;
        let (tenant, key, max) = (self.tenant.clone(), key.to_string(), self.quota.max_keys);
        self.store
            .write(move |txn| Self::put(txn, &tenant, &key, None, 0, max))
            .await?
    }

    /// Add `delta` to the integer under `key` (absent counts as 0); atomic,
    /// because every write runs on the one writer thread.
    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        Self::check_key(key)?;
        let (tenant, key, max) = (self.tenant.clone(), key.to_string(), self.quota.max_keys);
        self.store
            .write(move |txn| {
                let (current, expires) = {
                    let t = txn.open_table(KV)?;
                    let row = t.get((tenant.as_str(), key.as_str()))?.map(|v| v.value().to_vec());
                    match row.as_deref() {
                        Some(raw) => match decode(raw, now_ms()) {
                            Some(v) => {
                                let text = String::from_utf8_lossy(v);
                                match text.trim().parse::<i64>() {
                                    Ok(n) => (n, u64::from_le_bytes(raw[..8].try_into().unwrap_or_default())),
                                    Err(_) => {
                                        return Ok(Err(KvError::NotANumber(format!("{key:?} holds {text:?}"))));
                                    }
                                }
                            }
                            None => (0, 0),
                        },
                        None => (0, 0),
                    }
                };
                let Some(next) = current.checked_add(delta) else {
                    return Ok(Err(KvError::NotANumber(format!(
                        "{key:?}: {current} + {delta} overflows"
                    ))));
                };
                match Self::put(txn, &tenant, &key, Some(next.to_string().as_bytes()), expires, max)? {
                    Ok(_) => Ok(Ok(next)),
                    Err(e) => Ok(Err(e)),
                }
            })
            .await?
    }

    /// Remove every expired value of every tenant; returns how many.
    pub async fn sweep_expired(store: &Store) -> Result<usize> {
        store
            .write(|txn| {
                let now = now_ms();
                let expired: Vec<(String, String)> = {
                    let t = txn.open_table(KV)?;
                    let mut out = Vec::new();
                    for entry in t.iter()? {
                        let (k, v) = entry?;
                        if decode(v.value(), now).is_none() {
                            let (tenant, key) = k.value();
                            out.push((tenant.to_string(), key.to_string()));
                        }
                    }
                    out
                };
                let mut t = txn.open_table(KV)?;
                let mut counts = txn.open_table(KV_KEYS)?;
                for (tenant, key) in &expired {
                    t.remove((tenant.as_str(), key.as_str()))?;
                    let n = counts.get(tenant.as_str())?.map(|v| v.value()).unwrap_or(0);
                    counts.insert(tenant.as_str(), n.saturating_sub(1))?;
                }
                Ok(expired.len())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_are_isolated_and_quotas_hold() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = crate::store::open_all(&dir.path().join("db"))?;
        let quota = KvQuota {
            max_keys: 2,
            max_value_bytes: 4,
        };
        let a = Kv::new(store.clone(), "a", quota);
        let b = Kv::new(store.clone(), "b", quota);
        a.set("k", b"1".to_vec(), None).await?;
        assert_eq!(b.get("k")?, None);
        assert_eq!(a.increment("k", 41).await?, 42);
        assert_eq!(a.get("k")?, Some(b"42".to_vec()));
        a.set("j", b"x".to_vec(), None).await?;
        assert!(matches!(
            a.set("third", b"x".to_vec(), None).await,
            Err(KvError::QuotaExceeded(_))
        ));
        assert!(matches!(
            a.set("k", b"12345".to_vec(), None).await,
            Err(KvError::QuotaExceeded(_))
        ));
        assert!(matches!(a.increment("j", 1).await, Err(KvError::NotANumber(_))));
        assert!(a.delete("j").await?);
        a.set("third", b"x".to_vec(), None).await?;
        b.set("t", b"x".to_vec(), Some(1)).await?;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(b.get("t")?, None);
        assert_eq!(Kv::sweep_expired(&store).await?, 1);
        Ok(())
    }
}
