//! Assembling a running host from a manifest, and taking it down cleanly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::broker::embedded::EmbeddedBroker;
use crate::broker::redis::RedisBroker;
use crate::delivery::{self, Binding, Lane, RetryPolicy, Shutdown};
use crate::kv::Kv;
use crate::manifest::{BrokerConfig, DEFAULT_TENANT, EMBEDDED_BROKER, Manifest};
use crate::registry::Registry;
use crate::runtime::{AttemptLimits, HandlerContext, Runtime, RuntimeConfig};
use crate::shard::Shards;
use crate::store::Store;
use crate::subject::Grants;
use crate::tenant::Tenant;

/// The database file inside the data folder.
pub const DB_FILE: &str = "wharf.redb";
/// Where a host whose HTTP port was 0 writes the address it bound.
pub const HTTP_ADDR_FILE: &str = "http.addr";
/// How often expired key-value entries and dedup marks are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Instances allowed beyond the sum of handler concurrency (checks, reloads).
const SPARE_INSTANCES: u32 = 16;

/// Everything a running host shares between its tasks.
pub struct App {
    /// The manifest it runs.
    pub manifest: Manifest,
    /// The local database.
    pub store: Store,
    /// The embedded broker.
    pub broker: EmbeddedBroker,
    /// The Wasm runtime.
    pub runtime: Arc<Runtime>,
    /// Handler bindings.
    pub registry: Registry,
    /// The runtimes the consumers run on ([`crate::shard`]).
    pub shards: Shards,
    /// Each shard's brokers by name (the embedded one included), made on
    /// that shard so that their connections are driven there.
    pub brokers: Vec<BTreeMap<String, Broker>>,
    /// True once every consumer is running, false again on shutdown.
    pub ready: AtomicBool,
    /// Held by the reload under way: one at a time ([`crate::reload`]).
    pub reloading: tokio::sync::Mutex<()>,
}

/// Build the runtime a manifest needs (also used by `wharf check`).
pub fn runtime_for(manifest: &Manifest) -> Result<Runtime> {
    let max_instances = manifest.handlers.values().map(|h| h.concurrency).sum::<u32>() + SPARE_INSTANCES;
    let max_memory_mb = manifest.handlers.values().map(|h| h.memory_mb).max().unwrap_or(64);
    Runtime::new(RuntimeConfig {
        max_instances,
        max_memory_bytes: (max_memory_mb << 20) as usize,
        cache_dir: manifest.host.data_dir.join("cache"),
        cpu_budget: true,
    })
}

impl App {
    /// Open the data folder, load every component and bind every handler.
    /// Nothing consumes until [`App::run`].
    pub async fn new(manifest: Manifest) -> Result<Arc<Self>> {
        let store = crate::store::open_all(&manifest.host.data_dir.join(DB_FILE))?;
        let broker = EmbeddedBroker::new(store.clone());
        let runtime = Arc::new(runtime_for(&manifest)?);

        let shards = Shards::start(manifest.host.shards)?;
        let mut brokers = Vec::with_capacity(shards.count());
        for shard in 0..shards.count() {
            // What the first shard made that the others share.
            let shared = brokers
                .first()
                .map_or_else(BTreeMap::new, |first: &BTreeMap<String, Broker>| {
                    first
                        .iter()
                        .filter(|(_, b)| !b.connection_per_shard())
                        .map(|(name, b)| (name.clone(), b.clone()))
                        .collect()
                });
            let connecting = connect_brokers(
                manifest.brokers.clone(),
                broker.clone(),
                manifest.host.data_dir.clone(),
                shard,
                shared,
            );
            let connected = shards
                .handle(shard)
                .spawn(connecting)
                .await
                .context("connecting the brokers")?;
            brokers.push(connected?);
        }

        let mut tenants: BTreeMap<String, Arc<Tenant>> = BTreeMap::new();
        let mut registry = Registry::default();
        for (name, h) in &manifest.handlers {
            let tenant = match tenants.get(&h.tenant) {
                Some(t) => t.clone(),
                None => {
                    let cfg = manifest.tenant(&h.tenant);
                    let t = Arc::new(Tenant::new(&h.tenant, &cfg).map_err(anyhow::Error::msg)?);
                    tenants.insert(h.tenant.clone(), t.clone());
                    t
                }
            };
            debug_assert!(h.tenant != DEFAULT_TENANT || tenant.name == DEFAULT_TENANT);
            let component = runtime
                .load(&h.component)
                .with_context(|| format!("loading handler {name:?}"))?;
            tracing::info!(handler = %name, component = %h.component.display(), digest = %&component.digest[..12], "handler loaded");
            // Requests go through the source's broker, or the publish
            // target's, whichever is NATS: the first shard's connection,
            // shared by every shard (requests are rare next to deliveries).
            let requester = std::iter::once(&h.source.broker)
                .chain(h.publish_to.as_ref().and_then(|t| t.broker.as_ref()))
                .find_map(|b| match brokers[0].get(b) {
                    Some(Broker::Nats(n)) => Some(n.clone()),
                    _ => None,
                });
            let context = Arc::new(HandlerContext {
                requester,
                name: name.clone(),
                tenant: h.tenant.clone(),
                grants: Grants::new(&h.publish).map_err(anyhow::Error::msg)?,
                tenant_grants: tenant.grants.clone(),
                config: h.config.clone(),
                kv: Kv::new(store.clone(), &h.tenant, tenant.kv_quota),
                limits: AttemptLimits {
                    timeout: Duration::from_millis(h.timeout_ms),
                    memory_bytes: (h.memory_mb << 20) as usize,
                    max_payload_bytes: h.max_payload_bytes as usize,
                    max_publishes: h.max_publishes,
                    max_log_bytes: h.max_log_bytes as usize,
                    instance_reuse: h.instance_reuse,
                },
            });
            // Validated: the brokers named exist.
            let target = h
                .publish_to
                .as_ref()
                .and_then(|t| t.broker.clone())
                .unwrap_or_else(|| h.source.broker.clone());
            let retry = RetryPolicy::from(&h.retry);
            let lease = delivery::lease_for(Duration::from_millis(h.timeout_ms));
            let reclaim_after = lease + retry.max_delay;
            let mut lanes = Vec::new();
            let mut dead_letter_queue = String::new();
            let readers = if brokers[0][&h.source.broker].read_on_every_shard(&h.source) {
                shards.count()
            } else {
                1
            };
            for (shard, brokers) in brokers.iter().enumerate().take(readers) {
                let concurrency = crate::shard::split(h.concurrency as usize, readers, shard);
                if concurrency == 0 {
                    continue;
                }
                // Made on the shard: the tasks a source, sink or dedup store
                // starts (ack batchers, heartbeats) run beside its consumer.
                let _on_shard = shards.handle(shard).enter();
                let source_broker = &brokers[&h.source.broker];
                let endpoints = source_broker.endpoints(name, h, concurrency as u32, lease, reclaim_after);
                dead_letter_queue = endpoints.dead_letter_queue;
                lanes.push(Lane {
                    shard,
                    source: endpoints.source,
                    sink: brokers[&target].sink(h.publish_to.as_ref(), h.source.kind),
                    dedup: h
                        .dedup
                        .as_ref()
                        .map(|d| (source_broker.dedup(&store), Duration::from_secs(d.ttl_secs))),
                    concurrency,
                });
            }
            registry.insert(Arc::new(Binding {
                name: name.clone(),
                component: ArcSwap::from_pointee(component),
                context,
                lanes,
                dead_letter_queue,
                tenant_permits: tenant.permits.clone(),
                retry,
                rate_limit: h
                    .rate_limit
                    .as_ref()
                    .and_then(|r| delivery::rate_limiter(r.messages, Duration::from_millis(r.per_ms))),
                metrics: Default::default(),
            }));
        }
        runtime.prune_cache(&registry.digests());
        Ok(Arc::new(Self {
            manifest,
            store,
            broker,
            runtime,
            registry,
            shards,
            brokers,
            ready: AtomicBool::new(false),
            reloading: Default::default(),
        }))
    }

    /// Ready to take work: consuming, and every broker reachable.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.brokers.iter().flat_map(BTreeMap::values).all(Broker::is_ready)
    }

    /// Serve HTTP and consume until `shutdown.stop`, then drain: wait up to
    /// the grace period for in-flight messages, release the rest, return.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) -> Result<()> {
        // The metrics recorder first: a counter bumped before it exists is
        // lost, and consumers may settle a waiting backlog before the HTTP
        // server's task has even started.
        crate::telemetry::prometheus();
        let listener = tokio::net::TcpListener::bind(self.manifest.host.http)
            .await
            .with_context(|| format!("binding the HTTP server to {}", self.manifest.host.http))?;
        let addr: SocketAddr = listener.local_addr()?;
        // Written whole or not at all (a reader polling for it never sees it
        // empty or half written): a temporary file, then a rename.
        let addr_file = self.manifest.host.data_dir.join(HTTP_ADDR_FILE);
        let tmp = addr_file.with_extension("addr.tmp");
        std::fs::write(&tmp, addr.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &addr_file).with_context(|| format!("writing {}", addr_file.display()))?;
        tracing::info!(%addr, "HTTP server listening");
        let server = tokio::spawn(crate::server::serve(listener, self.clone(), shutdown.abort.clone()));

        let mut consumers = JoinSet::new();
        for binding in self.registry.iter() {
            for (lane, on) in binding.lanes.iter().enumerate() {
                consumers.spawn_on(
                    delivery::run_binding(binding.clone(), lane, self.runtime.clone(), shutdown.clone()),
                    self.shards.handle(on.shard),
                );
            }
        }
        for (shard, brokers) in self.brokers.iter().enumerate() {
            // A broker the shards share is the first shard's, probed there.
            let own = brokers.iter().filter(|(_, b)| shard == 0 || b.connection_per_shard());
            for (name, b) in own {
                // On the shard: a connection made by the probe is the one
                // the shard's consumers use next.
                let b = b.clone();
                let probe = self.shards.handle(shard).spawn(async move { b.probe().await }).await;
                if let Ok(Err(e)) = probe {
                    tracing::warn!(broker = %name, error = %format!("{e:#}"), "broker not reachable yet; not ready until it is");
                }
            }
        }
        let sweeper = tokio::spawn(sweep(self.store.clone()));
        let reloader = crate::reload::start(self.clone(), shutdown.stop.clone());
        self.ready.store(true, Ordering::SeqCst);
        tracing::info!(
            handlers = self.manifest.handlers.len(),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            shards = %self.manifest.host.shards.map_or_else(|| "none".to_string(), |n| n.to_string()),
            "wharf running"
        );

        shutdown.stop.cancelled().await;
        self.ready.store(false, Ordering::SeqCst);
        let grace = Duration::from_millis(self.manifest.host.shutdown_grace_ms);
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: finishing in-flight messages"
        );
        let drained = tokio::time::timeout(grace, async { while consumers.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("grace period over: releasing the messages still in flight for redelivery");
            shutdown.abort.cancel();
            while consumers.join_next().await.is_some() {}
        }
        shutdown.abort.cancel();
        for b in self.brokers.iter().flat_map(BTreeMap::values) {
            b.flush().await;
        }
        self.shards.stop().await;
        sweeper.abort();
        let _ = reloader.await;
        let _ = server.await;
        tracing::info!("wharf stopped");
        Ok(())
    }
}

/// The brokers of shard `shard` by name: `embedded`, those in `shared` (made
/// by the first shard, [`Broker::connection_per_shard`]) and a connection of
/// its own to each other configured one. Run on the shard, so that a
/// client's driver task runs there. The Redis consumer name of shard n > 0 has
/// `-shard<n>` appended: each shard reads (and at start re-reads) its own pending
/// entries, and a shard that no longer runs has them reclaimed like a dead
/// host's.
async fn connect_brokers(
    configs: BTreeMap<String, BrokerConfig>,
    embedded: EmbeddedBroker,
    data_dir: std::path::PathBuf,
    shard: usize,
    shared: BTreeMap<String, Broker>,
) -> Result<BTreeMap<String, Broker>> {
    let mut brokers = BTreeMap::from([(EMBEDDED_BROKER.to_string(), Broker::Embedded(embedded))]);
    for (name, cfg) in &configs {
        if let Some(b) = shared.get(name) {
            brokers.insert(name.clone(), b.clone());
            continue;
        }
        match cfg {
            BrokerConfig::Embedded {} => {}
            BrokerConfig::Redis { url, consumer } => {
                let consumer = consumer.clone().unwrap_or_else(|| default_consumer(&data_dir));
                // Shard 0 keeps the plain name, so a host that starts
                // or stops using shards re-reads its pending entries.
                let consumer = match shard {
                    0 => consumer,
                    n => format!("{consumer}-shard{n}"),
                };
                let redis = RedisBroker::new(url, consumer).with_context(|| format!("broker {name:?}"))?;
                brokers.insert(name.clone(), Broker::Redis(Arc::new(redis)));
            }
            BrokerConfig::Amqp {
                url,
                exchanges,
                queues,
                bindings,
            } => {
                use crate::broker::amqp::{AmqpBroker, BindingSpec, ExchangeSpec, QueueSpec, Topology};
                use crate::manifest::{AmqpExchangeKind as K, AmqpQueueType};
                let topology = Topology {
                    exchanges: exchanges
                        .iter()
                        .map(|e| ExchangeSpec {
                            name: e.name.clone(),
                            kind: match e.kind {
                                K::Direct => "direct",
                                K::Topic => "topic",
                                K::Fanout => "fanout",
                                K::Headers => "headers",
                            }
                            .to_string(),
                        })
                        .collect(),
                    queues: queues
                        .iter()
                        .map(|q| QueueSpec {
                            name: q.name.clone(),
                            quorum: q.queue_type == AmqpQueueType::Quorum,
                        })
                        .collect(),
                    bindings: bindings
                        .iter()
                        .map(|b| BindingSpec {
                            queue: b.queue.clone(),
                            exchange: b.exchange.clone(),
                            routing_key: b.routing_key.clone(),
                        })
                        .collect(),
                };
                brokers.insert(name.clone(), Broker::Amqp(Arc::new(AmqpBroker::new(url, topology))));
            }
            BrokerConfig::Nats { url, streams } => {
                let streams = streams
                    .iter()
                    .map(|s| crate::broker::nats::StreamSpec {
                        name: s.name.clone(),
                        subjects: s.subjects.clone(),
                        duplicate_window: Duration::from_secs(s.duplicate_window_secs),
                    })
                    .collect();
                let nats = crate::broker::nats::NatsBroker::connect(url, streams)
                    .await
                    .with_context(|| format!("broker {name:?}"))?;
                brokers.insert(name.clone(), Broker::Nats(Arc::new(nats)));
            }
        }
    }
    Ok(brokers)
}

/// A consumer name that is stable across restarts of this host and distinct
/// for two hosts on one machine: the hostname and a hash of the data folder.
fn default_consumer(data_dir: &std::path::Path) -> String {
    use sha2::Digest;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "wharf".into());
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = sha2::Sha256::digest(dir.to_string_lossy().as_bytes());
    format!("{}-{}", host.trim(), hex::encode(&hash[..4]))
}

async fn sweep(store: Store) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        if let Err(e) = Kv::sweep_expired(&store).await {
            tracing::warn!(error = %format!("{e:#}"), "sweeping expired key-value entries failed");
        }
        if let Err(e) = delivery::dedup::sweep_expired(&store).await {
            tracing::warn!(error = %format!("{e:#}"), "sweeping expired dedup marks failed");
        }
    }
}
