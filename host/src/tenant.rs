//! Tenants: the ceilings shared by every handler of one tenant.
//!
//! A tenant's handlers draw on one budget of running messages (`max_concurrency`), may
//! only publish within the tenant's grants, and share one key-value space with
//! one quota. Per-handler memory and timeout ceilings are enforced when the
//! manifest is validated.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::kv::KvQuota;
use crate::manifest::TenantConfig;
use crate::subject::Grants;

/// A tenant's live limits.
pub struct Tenant {
    /// Tenant name.
    pub name: String,
    /// In-flight messages across the tenant's handlers.
    pub permits: Arc<Semaphore>,
    /// The tenant's publish ceiling.
    pub grants: Grants,
    /// Key-value quota.
    pub kv_quota: KvQuota,
}

impl Tenant {
    /// The tenant `name` as the manifest configures it.
    pub fn new(name: &str, cfg: &TenantConfig) -> Result<Self, String> {
        Ok(Self {
            name: name.to_string(),
            permits: Arc::new(Semaphore::new(cfg.max_concurrency as usize)),
            grants: Grants::new(&cfg.publish)?,
            kv_quota: KvQuota {
                max_keys: cfg.kv_max_keys,
                max_value_bytes: cfg.kv_max_value_bytes,
            },
        })
    }
}
