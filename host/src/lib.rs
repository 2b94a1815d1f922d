//! wharf: a WebAssembly worker host that owns the broker connections and all
//! delivery work, and runs each message through a sandboxed handler component.
//!
//! # How a message flows
//!
//! 1. [`manifest`] parses and validates the TOML manifest.
//! 2. [`app::App::new`] opens the [`store`] (redb) and the
//!    [`broker::embedded`] broker on it, builds the [`runtime`] (wasmtime
//!    engine, pooling allocator, epoch ticker), loads every component
//!    (compiled once, cached on disk) and builds one [`delivery::Binding`]
//!    per handler, kept in the [`registry`], with its [`tenant`]'s limits.
//! 3. [`delivery::run_binding`] takes deliveries from a lane of the
//!    binding (its [`broker::Source`] on one [`shard`], the main runtime
//!    unless `[host] shards` is set) as its share of concurrency allows; [`delivery::process`] decides
//!    each one: dedup, [`runtime::Runtime::invoke`] (fresh instance, CPU,
//!    wall-clock and memory limits, host imports in `runtime/host.rs`), then
//!    outbox → [`broker::Sink`], dedup mark, and ack — or retry with backoff,
//!    or dead-letter — through the delivery's [`broker::Acker`].
//! 4. [`server`] is how producers and operators reach the host over HTTP;
//!    [`cli`] is the `wharf` command; [`reload`] swaps a handler's component
//!    while it runs (SIGHUP, or its file changing).

pub mod app;
pub mod broker;
pub mod cli;
pub mod delivery;
pub mod kv;
pub mod manifest;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod store;
pub mod subject;
pub mod telemetry;
pub mod tenant;
