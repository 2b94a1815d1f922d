//! The TOML manifest: which brokers, tenants and handlers a host runs.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and every error names
//! the file, the line and the dotted field path, e.g.
//! `wharf.toml:14: handlers.validate.dedup.ttl_secs: ...`. Relative paths
//! resolve against the manifest's folder. The full reference with defaults is
//! in the README ("Manifest reference"); the defaults live here, once.
//!
//! | table | what it configures |
//! |---|---|
//! | `[host]` | data folder, HTTP listener, shutdown grace, component watching |
//! | `[brokers.<name>]` | broker connections; `embedded` always exists |
//! | `[tenants.<name>]` | per-tenant ceilings: concurrency, memory, timeout, publish grants, key-value quota |
//! | `[handlers.<name>]` | component, source, limits, retry, dead-letter, dedup, rate limit, config, grants |

mod error;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::{ManifestError, ManifestErrors};

/// The name of the broker every manifest has, whether it declares it or not.
pub const EMBEDDED_BROKER: &str = "embedded";
/// The tenant handlers belong to when they name none.
pub const DEFAULT_TENANT: &str = "default";

/// A parsed, validated manifest. Its relative paths are resolved against
/// the manifest's folder (so they are absolute when the manifest's path is).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Settings of the host process.
    #[serde(default)]
    pub host: HostConfig,
    /// Broker connections by name.
    #[serde(default)]
    pub brokers: BTreeMap<String, BrokerConfig>,
    /// Tenants by name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Handlers by name.
    #[serde(default)]
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// The manifest file this was read from.
    #[serde(skip)]
    pub file: PathBuf,
    /// Things that are valid but deserve a second look (`wharf check` prints them).
    #[serde(skip)]
    pub warnings: Vec<ManifestError>,
}

/// `[host]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Where the embedded broker, the key-value store and the compiled
    /// component cache live. Default `.wharf` beside the manifest.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Address of the HTTP server (publish, dead-letter queues, health,
    /// metrics). Port 0 picks a free port and writes it to
    /// `<data_dir>/http.addr`. Default `127.0.0.1:8480`.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// How long shutdown waits for in-flight messages before releasing them
    /// for redelivery. Default 10000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Reload a handler's component when its file changes (SIGHUP reloads
    /// whether or not this is on). Default true.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Threads running the consumer loops, the Wasm calls and the broker
    /// clients. Default: one per CPU the host may use. One thread costs less
    /// CPU per message (no hand-offs between threads) but runs one Wasm call
    /// at a time; docs/BENCHMARKS.md measures the trade.
    pub worker_threads: Option<u32>,
    /// Run the consumers on this many single-threaded shards, each with its
    /// own broker connections and an even share of every handler's
    /// concurrency, so that a message is received, handled and acked on one
    /// thread ([`crate::shard`]). Default: none, and the consumers run on
    /// the `worker_threads`; with shards those serve only HTTP, reloads and
    /// sweeps.
    pub shards: Option<u32>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            http: default_http(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            watch: default_watch(),
            worker_threads: None,
            shards: None,
        }
    }
}

/// `[brokers.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum BrokerConfig {
    /// The embedded durable broker, stored in the host's data folder.
    Embedded {},
    /// A Redis server.
    Redis {
        /// `redis://[user:password@]host:port[/db]`.
        url: String,
        /// This host's stable consumer name (stream consumer, list
        /// processing list). Default: `<hostname>-<hash of the data folder>`,
        /// stable across restarts and distinct per host.
        consumer: Option<String>,
    },
    /// A RabbitMQ server (AMQP 0-9-1).
    Amqp {
        /// `amqp://user:password@host:port/vhost` (`%2f` for `/`).
        url: String,
        /// Exchanges to declare.
        #[serde(default)]
        exchanges: Vec<AmqpExchangeConfig>,
        /// Queues to declare.
        #[serde(default)]
        queues: Vec<AmqpQueueConfig>,
        /// Bindings to declare.
        #[serde(default)]
        bindings: Vec<AmqpBindingConfig>,
    },
    /// A NATS server (core and JetStream).
    Nats {
        /// `nats://host:port`.
        url: String,
        /// JetStream streams to declare (created when missing).
        #[serde(default)]
        streams: Vec<NatsStreamConfig>,
    },
}

/// `[[brokers.<name>.exchanges]]`: a RabbitMQ exchange to declare (durable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpExchangeConfig {
    /// Exchange name.
    pub name: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    pub kind: AmqpExchangeKind,
}

/// RabbitMQ exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmqpExchangeKind {
    /// Exact routing key.
    Direct,
    /// Routing key patterns (`*` one word, `#` any).
    Topic,
    /// Every bound queue.
    Fanout,
    /// By header values.
    Headers,
}

/// `[[brokers.<name>.queues]]`: a RabbitMQ queue to declare (durable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpQueueConfig {
    /// Queue name.
    pub name: String,
    /// `classic` (default) or `quorum`.
    #[serde(default, rename = "type")]
    pub queue_type: AmqpQueueType,
}

/// RabbitMQ queue types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AmqpQueueType {
    /// A classic queue.
    #[default]
    Classic,
    /// A quorum queue (replicated; counts deliveries in `x-delivery-count`).
    Quorum,
}

/// `[[brokers.<name>.bindings]]`: bind a queue to an exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpBindingConfig {
    /// Queue.
    pub queue: String,
    /// Exchange.
    pub exchange: String,
    /// Routing key (a pattern for topic exchanges). Default "".
    #[serde(default)]
    pub routing_key: String,
}

/// `[[brokers.<name>.streams]]`: a JetStream stream to declare.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsStreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// Window in which a repeated `Nats-Msg-Id` is dropped, seconds. Default 120.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
}

fn default_duplicate_window_secs() -> u64 {
    120
}

/// What kind of source or publish target, where the broker has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Embedded broker queue (its only kind).
    Queue,
    /// Redis stream read by a consumer group (the Redis default).
    Stream,
    /// Redis list used as a reliable job queue.
    List,
    /// Redis pub/sub channel: at-most-once.
    Channel,
    /// Redis pub/sub channel pattern: at-most-once; sources only.
    Pattern,
    /// Core NATS subject: at-most-once (the NATS default).
    Core,
    /// NATS JetStream durable pull consumer.
    Jetstream,
}

/// `[tenants.<name>]`: ceilings shared by all of a tenant's handlers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Messages of this tenant running at once, across its handlers. Default 64.
    #[serde(default = "default_tenant_concurrency")]
    pub max_concurrency: u32,
    /// Largest `memory_mb` a handler of this tenant may ask for. Default 256.
    #[serde(default = "default_tenant_memory_mb")]
    pub max_memory_mb: u64,
    /// Largest `timeout_ms` a handler of this tenant may ask for. Default 60000.
    #[serde(default = "default_tenant_timeout_ms")]
    pub max_timeout_ms: u64,
    /// Subjects the tenant's handlers may ever publish to (patterns). A
    /// publish must match both the handler's and the tenant's grants.
    /// Default `[">"]`: everything the handler is granted.
    #[serde(default = "default_tenant_publish")]
    pub publish: Vec<String>,
    /// Keys the tenant may hold in the key-value store. Default 10000.
    #[serde(default = "default_kv_max_keys")]
    pub kv_max_keys: u64,
    /// Largest key-value value, in bytes. Default 65536.
    #[serde(default = "default_kv_max_value_bytes")]
    pub kv_max_value_bytes: u64,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            max_concurrency: default_tenant_concurrency(),
            max_memory_mb: default_tenant_memory_mb(),
            max_timeout_ms: default_tenant_timeout_ms(),
            publish: default_tenant_publish(),
            kv_max_keys: default_kv_max_keys(),
            kv_max_value_bytes: default_kv_max_value_bytes(),
        }
    }
}

/// `[handlers.<name>]`: one binding of a source to a handler component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Path of the component (`.wasm`), relative to the manifest's folder.
    pub component: PathBuf,
    /// The tenant the handler runs as. Default `default`.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Where messages come from.
    pub source: SourceConfig,
    /// Messages handled at once. Default 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Time budget of one attempt, in ms (CPU, enforced by epoch
    /// interruption, and wall clock). Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory cap of one instance, in MiB. Default 64.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Largest payload handed to the handler or published by it. Larger
    /// incoming messages are dead-lettered unseen. Default 1048576.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: u64,
    /// Publishes allowed per attempt. Default 100.
    #[serde(default = "default_max_publishes")]
    pub max_publishes: u32,
    /// Log bytes (log calls plus stdout/stderr) kept per attempt. Default 16384.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: u64,
    /// Messages one instance may handle before it is replaced. Default 1: a
    /// fresh instance per message. More skips instantiation for trusted
    /// handlers: what one message leaves in the instance's memory, the next
    /// message of the same handler sees. An instance that traps, times out
    /// or runs out of memory is never reused.
    #[serde(default = "default_instance_reuse")]
    pub instance_reuse: u32,
    /// Subjects the handler may publish to (patterns: `*` one token, `>` the rest).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where the outbox goes. Default: the source's broker.
    pub publish_to: Option<PublishTo>,
    /// Dead-letter queue name. Default: embedded, the source subject's own
    /// dead-letter queue; Redis, `<subject>:dead` (a stream, or a list for
    /// list sources).
    pub dead_letter: Option<String>,
    /// Deduplication on (handler, message id); off unless the table is given.
    pub dedup: Option<DedupConfig>,
    /// Rate limit; none unless the table is given.
    pub rate_limit: Option<RateLimitConfig>,
    /// Strings the handler reads with `config-get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// `source = { broker = "...", subject = "..." }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Broker name. Default `embedded`.
    #[serde(default = "default_broker")]
    pub broker: String,
    /// Subject to consume: the embedded queue, Redis stream, list key or
    /// channel (a glob for `pattern`).
    pub subject: String,
    /// Source kind. Embedded: `queue`. Redis: `stream` (default), `list`,
    /// `channel`, `pattern`.
    pub kind: Option<SourceKind>,
    /// Redis stream consumer group, or NATS core queue group. Default `wharf`.
    pub group: Option<String>,
    /// NATS JetStream: the stream to consume (required for `jetstream`).
    pub stream: Option<String>,
    /// NATS JetStream: durable consumer name. Default: the handler's name.
    pub consumer: Option<String>,
    /// NATS JetStream: wait for the server to confirm each ack. Default false.
    pub double_ack: Option<bool>,
}

/// `publish_to = { broker = "...", kind = "...", maxlen = N }`: where the
/// handler's outbox goes. Default: the source's broker, and for Redis the
/// source's kind (`stream` for pub/sub sources).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishTo {
    /// Broker name. Default: the source's broker.
    pub broker: Option<String>,
    /// Redis: `stream`, `list` or `channel`. NATS: `core` or `jetstream`.
    pub kind: Option<SourceKind>,
    /// Redis streams: trim to about this many entries on publish.
    pub maxlen: Option<u64>,
    /// RabbitMQ: the exchange to publish to (the subject is the routing
    /// key). Default "": the default exchange, routing to the queue named
    /// by the subject.
    pub exchange: Option<String>,
}

/// `[handlers.<name>.retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry, in ms. Default 200.
    #[serde(default = "default_initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// Ceiling of any retry delay, a handler's retry-after included. Default 30000.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Growth of the delay per attempt. Default 2.0.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay_ms: default_initial_delay_ms(),
            max_delay_ms: default_max_delay_ms(),
            multiplier: default_multiplier(),
        }
    }
}

/// `[handlers.<name>.dedup]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// How long a successfully handled id is remembered, in seconds. Must be
    /// at least the retry horizon. Default 86400.
    #[serde(default = "default_dedup_ttl_secs")]
    pub ttl_secs: u64,
}

/// `[handlers.<name>.rate_limit]`: at most `messages` per `per_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Messages allowed per period.
    pub messages: u32,
    /// The period, in ms. Default 1000.
    #[serde(default = "default_rate_period_ms")]
    pub per_ms: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".wharf")
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}
fn default_watch() -> bool {
    true
}

fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_tenant_concurrency() -> u32 {
    64
}
fn default_tenant_memory_mb() -> u64 {
    256
}
fn default_tenant_timeout_ms() -> u64 {
    60_000
}
fn default_tenant_publish() -> Vec<String> {
    vec![">".to_string()]
}
fn default_kv_max_keys() -> u64 {
    10_000
}
fn default_kv_max_value_bytes() -> u64 {
    65_536
}
fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}
fn default_broker() -> String {
    EMBEDDED_BROKER.to_string()
}
fn default_concurrency() -> u32 {
    8
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_memory_mb() -> u64 {
    64
}
fn default_max_payload_bytes() -> u64 {
    1 << 20
}
fn default_max_publishes() -> u32 {
    100
}
fn default_instance_reuse() -> u32 {
    1
}
fn default_max_log_bytes() -> u64 {
    16 * 1024
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_delay_ms() -> u64 {
    200
}
fn default_max_delay_ms() -> u64 {
    30_000
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_dedup_ttl_secs() -> u64 {
    86_400
}
fn default_rate_period_ms() -> u64 {
    1_000
}

impl Manifest {
    /// Read, parse and validate the manifest at `path`. Component files are
    /// checked for existence here; that they implement the handler world is
    /// checked when they are loaded (`wharf check` does both).
    pub fn load(path: &Path) -> Result<Manifest, ManifestErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ManifestErrors(vec![ManifestError {
                file: path.to_path_buf(),
                line: None,
                field: String::new(),
                message: format!("cannot read the manifest: {e}"),
            }])
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate manifest `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestErrors> {
        validate::parse(path, text)
    }

    /// The broker configuration of `name` (the implicit embedded one included).
    pub fn broker(&self, name: &str) -> Option<BrokerConfig> {
        match self.brokers.get(name) {
            Some(b) => Some(b.clone()),
            None if name == EMBEDDED_BROKER => Some(BrokerConfig::Embedded {}),
            None => None,
        }
    }

    /// The tenant settings of `name` (the implicit default tenant included).
    pub fn tenant(&self, name: &str) -> TenantConfig {
        self.tenants.get(name).cloned().unwrap_or_default()
    }
}
