//! The Wasm runtime: one wasmtime engine, components compiled once and cached
//! on disk, and a fresh store + instance per attempt.
//!
//! | setting | value | why |
//! |---|---|---|
//! | allocator | pooling, sized from the manifest | instantiation is a slot reuse, not an mmap |
//! | CPU budget | epoch interruption, one tick per [`TICK`] | a loop with no host calls is still stopped; the guest also yields to tokio every tick |
//! | wall budget | `tokio::time::timeout` around the call | a guest parked in a host call is stopped too |
//! | memory | [`host::MemoryCap`] per store | growth past `memory_mb` fails, reported as `memory` |
//! | WASI | linked with nothing granted | Rust's std imports it; files, env, args, network stay closed |
//! | cache | `<data_dir>/cache/<sha256(component)>-<engine hash>.cwasm` ([`cache`]) | restarts skip compilation; only files this host wrote, with a matching checksum, are deserialised; bounded to what runs and the last [`cache::SPARE`] others |

mod cache;
mod host;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};

use cache::ComponentCache;
pub use host::{AttemptLimits, HandlerContext, sanitize};
use host::{STDIO_CAPACITY, StoreState};

use crate::broker::OutboundMessage;

/// The generated bindings, kept private; the types that cross the seam are
/// re-exported below.
mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-world",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::wharf::handler::types::{HandlerError, Message};

/// Bytes of each reused linear memory and table reset with memset (kept
/// resident) rather than madvise; a small handler's whole heap fits.
const KEEP_RESIDENT: usize = 1 << 20;

/// One epoch tick. The CPU budget is counted in ticks, so it is enforced to
/// within a tick; 10 ms keeps the ticker thread's cost negligible.
pub const TICK: Duration = Duration::from_millis(10);

/// Why an attempt failed, as recorded in logs, metrics and the
/// `wharf-dead-letter-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The handler asked for a retry.
    Retry,
    /// The handler rejected the message.
    Rejected,
    /// The guest trapped (panic, unreachable, out-of-bounds ...).
    Trap,
    /// CPU or wall-clock budget exhausted.
    Timeout,
    /// Linear memory growth past the cap.
    Memory,
    /// Anything else: instantiation failed, bad output, outbox not confirmed.
    Error,
    /// The message is larger than `max_payload_bytes`; never shown to the guest.
    PayloadTooLarge,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Retry,
        FailureKind::Rejected,
        FailureKind::Trap,
        FailureKind::Timeout,
        FailureKind::Memory,
        FailureKind::Error,
        FailureKind::PayloadTooLarge,
    ];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retry => "retry",
            FailureKind::Rejected => "rejected",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Error => "error",
            FailureKind::PayloadTooLarge => "payload-too-large",
        }
    }
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Classification.
    pub kind: FailureKind,
    /// Human-readable detail (sanitised guest text or host error).
    pub message: String,
    /// The handler's requested minimum delay before the next attempt.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure with no retry-after.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// What one attempt produced.
#[derive(Debug)]
pub struct Attempt {
    /// Success, or why not.
    pub result: Result<(), Failure>,
    /// Publishes to release if (and only if) the attempt succeeded.
    pub outbox: Vec<OutboundMessage>,
    /// Wall time of instantiate + call.
    pub elapsed: Duration,
}

/// Sizing of the engine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Instances alive at once, at most (sum of handler concurrency, plus room).
    pub max_instances: u32,
    /// Largest linear memory any handler may have, bytes.
    pub max_memory_bytes: usize,
    /// Where compiled components are cached.
    pub cache_dir: PathBuf,
    /// Count CPU with epoch interruption (the CPU budget). The host always
    /// turns it on: without it a guest that loops is never stopped. Off only
    /// to measure what it costs (`wharf-bench wasm-cost --no-epoch`).
    pub cpu_budget: bool,
}

/// The engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    /// The settings that decide a compiled artifact: `engine`'s, less
    /// how instances are allocated ([`compile`]).
    compile_settings: Config,
    linker: Linker<StoreState>,
    cpu_budget: bool,
    cache: ComponentCache,
    ticker_stop: Arc<AtomicBool>,
}

/// A component file's bytes, as read, and their digest.
pub struct ComponentFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Hex sha256 of the bytes: what [`LoadedComponent::digest`] will be.
    pub digest: String,
}

impl ComponentFile {
    /// Read the component file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading component {}", path.display()))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            digest,
        })
    }
}

/// A component ready to instantiate.
pub struct LoadedComponent {
    pre: bindings::HandlerWorldPre<StoreState>,
    /// Hex sha256 of the component bytes.
    pub digest: String,
    /// Instances waiting for their next message, for handlers with
    /// `instance_reuse` > 1; `None` once a reload replaced the component,
    /// whose instances are then dropped, not kept, so the old and the new
    /// component never hold more instances between them than the handler's
    /// concurrency.
    idle: std::sync::Mutex<Option<Vec<Warm>>>,
}

/// An instance that handled a message cleanly and may handle more.
struct Warm {
    store: Store<StoreState>,
    /// `None` until instantiated (and while a call holds it).
    instance: Option<bindings::HandlerWorld>,
    /// Messages it has handled.
    served: u32,
}

impl LoadedComponent {
    fn take_warm(&self, handler: &Arc<HandlerContext>) -> Option<Warm> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Only ever this handler's own instances (a component is loaded per
        // handler, so this is a guard, not a filter).
        idle.as_mut()?
            .pop()
            .filter(|w| Arc::ptr_eq(&w.store.data().attempt.handler, handler))
    }

    fn put_warm(&self, warm: Warm) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Retired: `warm` is dropped instead, after the lock (parameters
        // drop after locals).
        if let Some(idle) = idle.as_mut() {
            idle.push(warm);
        }
    }

    /// This component was replaced (a reload): drop its waiting instances
    /// now, and each running one when its attempt ends.
    pub fn retire(&self) {
        let waiting = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Dropped here, after the lock: tearing down instances takes a while.
        drop(waiting);
    }
}

/// Compile `bytes` into an artifact for engines with `settings`, on an
/// engine of its own that is dropped afterwards, then give back to the
/// system what the compile left free.
///
/// Why its own engine: an engine keeps the compiler's working state (one
/// Cranelift context per thread that compiled, each as large as the largest
/// function it has seen) for its whole life, so a host that compiled at
/// start-up carried ~25 MiB of it while it ran. And why each thread: the
/// compile runs on rayon's threads, and mimalloc gives a thread's freed
/// pages back only when that thread allocates again, which an idle pool
/// thread never does. Idle RSS after compiling the benchmark handler: 62
/// MiB with neither, 59–61 with the per-thread collect alone, 33–38 with
/// both, against 28–31 when it came from the cache (`docs/BENCHMARKS.md`).
/// The price is an engine built per compile: under 5 ms, against the
/// hundreds a compile takes.
fn compile(settings: &Config, bytes: &[u8]) -> wasmtime::Result<Vec<u8>> {
    let compiled = Engine::new(settings).and_then(|compiler| compiler.precompile_component(bytes));
    // SAFETY: mi_collect only frees memory the allocator holds unused (none
    // in a binary whose global allocator is another).
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(true) });
    unsafe { libmimalloc_sys::mi_collect(true) };
    compiled
}

/// The CPU budget of an attempt ran out.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget exhausted")]
struct CpuBudgetExhausted;

impl Runtime {
    /// Build the engine and linker and start the epoch ticker.
    pub fn new(cfg: RuntimeConfig) -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = cfg.max_instances.max(1);
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(cfg.max_memory_bytes)
            // Reset a reused slot with memset instead of madvise: the pages
            // stay resident, so the next instance takes no page faults and
            // the kernel no TLB shootdowns. Memory is still zeroed between
            // instances. (docs/BENCHMARKS.md has the before/after.)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        // Every setting that shapes compiled code goes here, so that the
        // engines that compile ([`compile`]) and the one that runs agree.
        let mut compile_settings = Config::new();
        compile_settings
            .epoch_interruption(cfg.cpu_budget)
            .wasm_component_model(true);
        let mut config = compile_settings.clone();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the Wasm engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        bindings::HandlerWorld::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)
            .context("linking the wharf host imports")?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .context("starting the epoch ticker")?;

        let cache = ComponentCache::open(cfg.cache_dir, &engine)?;
        Ok(Self {
            engine,
            compile_settings,
            linker,
            cpu_budget: cfg.cpu_budget,
            cache,
            ticker_stop,
        })
    }

    /// Load the component at `path`: from the compiled cache when this host
    /// compiled it before, else compile and cache it. Fails, naming what is
    /// wrong, when it does not implement the handler world (missing or
    /// mistyped export, imports wharf does not provide).
    pub fn load(&self, path: &Path) -> Result<LoadedComponent> {
        self.load_file(ComponentFile::read(path)?)
    }

    /// [`Runtime::load`] of a file already read (a reload reads it first, to
    /// skip the loading when its digest is the one running).
    pub fn load_file(&self, file: ComponentFile) -> Result<LoadedComponent> {
        let ComponentFile { path, bytes, digest } = file;
        let path = path.as_path();
        let component = match self.cache.read(&digest) {
            Some(component) => component,
            None => {
                tracing::debug!(component = %path.display(), "compiling component");
                let compiled = compile(&self.compile_settings, &bytes)
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))?;
                self.cache.write(&digest, &compiled)?;
                // SAFETY: `compiled` was produced just now, with this engine's
                // settings (deserialize checks that they match).
                unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(anyhow::Error::from)?
            }
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} needs imports wharf does not provide", path.display()))?;
        let pre = bindings::HandlerWorldPre::new(instance_pre)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "{} does not export `wharf:handler/handler@0.1.0` with `handle`",
                    path.display()
                )
            })?;
        Ok(LoadedComponent {
            pre,
            digest,
            idle: std::sync::Mutex::new(Some(Vec::new())),
        })
    }

    /// Bound the compiled-component cache: keep the artifacts of the
    /// `running` digests and the few others used last ([`cache`]).
    pub fn prune_cache(&self, running: &[String]) {
        self.cache.prune(running);
    }

    /// Run one attempt: instantiate `component` in a fresh store with the
    /// handler's limits and call `handle(msg)` (or, for a handler with
    /// `instance_reuse` > 1, call it on an instance that handled earlier
    /// messages cleanly). Never panics and never fails: every problem becomes
    /// a classified [`Failure`].
    pub async fn invoke(&self, component: &LoadedComponent, handler: &Arc<HandlerContext>, msg: Message) -> Attempt {
        let started = Instant::now();
        let limits = handler.limits;
        let reuse = limits.instance_reuse > 1;
        let mut w = match reuse.then(|| component.take_warm(handler)).flatten() {
            Some(mut w) => {
                w.store.data_mut().next_attempt(msg.id.clone(), msg.reply_to.clone());
                if self.cpu_budget {
                    w.store.set_epoch_deadline(1);
                }
                w
            }
            None => Warm {
                store: self.new_store(handler, &msg),
                instance: None,
                served: 0,
            },
        };

        let call = async {
            let instance = match w.instance.take() {
                Some(i) => i,
                None => component.pre.instantiate_async(&mut w.store).await?,
            };
            w.served += 1;
            let returned = instance.wharf_handler_handler().call_handle(&mut w.store, &msg).await;
            w.instance = Some(instance);
            returned
        };
        // The CPU budget (epochs) is the precise limit; the wall-clock limit,
        // a little longer, catches a guest parked in a host call.
        let outcome = tokio::time::timeout(wall_budget(limits.timeout), call).await;
        // The guest returned (success, retry or reject): its instance is sound.
        let clean = matches!(outcome, Ok(Ok(_)));
        let result = match outcome {
            Err(_) => Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "wall-clock budget of {} ms exhausted",
                    wall_budget(limits.timeout).as_millis()
                ),
            )),
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(HandlerError::Retry(info)))) => Err(Failure {
                kind: FailureKind::Retry,
                message: sanitize(&info.reason),
                retry_after: info.after_ms.map(Duration::from_millis),
            }),
            Ok(Ok(Err(HandlerError::Reject(reason)))) => Err(Failure::new(FailureKind::Rejected, sanitize(&reason))),
            Ok(Err(e)) => Err(classify(&e, w.store.data().memory.exceeded, &limits)),
        };
        let state = w.store.data_mut();
        state.attempt.flush_stdio();
        let outbox = std::mem::take(&mut state.attempt.outbox);
        // A reused instance goes back only after a clean return, within its
        // message allowance, with room left in its stdio buffers.
        let (out, err) = state.attempt.stdio_seen;
        if reuse && clean && w.served < limits.instance_reuse && out.max(err) < STDIO_CAPACITY / 2 {
            component.put_warm(w);
        }
        Attempt {
            result,
            outbox,
            elapsed: started.elapsed(),
        }
    }

    /// A fresh store for one message of `handler`.
    fn new_store(&self, handler: &Arc<HandlerContext>, msg: &Message) -> Store<StoreState> {
        let limits = handler.limits;
        let mut store = Store::new(
            &self.engine,
            StoreState::new(handler.clone(), msg.id.clone(), msg.reply_to.clone()),
        );
        store.limiter(|s| &mut s.memory);
        if self.cpu_budget {
            let budget_ticks = (limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64;
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |mut cx| {
                let state = cx.data_mut();
                state.ticks += 1;
                if state.ticks >= budget_ticks {
                    return Err(wasmtime::Error::new(CpuBudgetExhausted));
                }
                Ok(UpdateDeadline::Yield(1))
            });
        }
        store
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The wall-clock limit of an attempt with CPU budget `timeout`: 10% and
/// five ticks more, so that a busy guest is stopped (and reported) by its CPU
/// budget, and only a guest waiting on something is stopped by the clock.
fn wall_budget(timeout: Duration) -> Duration {
    timeout + timeout / 10 + TICK * 5
}

fn classify(e: &wasmtime::Error, memory_exceeded: bool, limits: &AttemptLimits) -> Failure {
    if e.is::<CpuBudgetExhausted>() {
        return Failure::new(
            FailureKind::Timeout,
            format!("CPU budget of {} ms exhausted", limits.timeout.as_millis()),
        );
    }
    if memory_exceeded {
        return Failure::new(
            FailureKind::Memory,
            format!(
                "linear memory would exceed the cap of {} MiB: {e}",
                limits.memory_bytes >> 20
            ),
        );
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        // The root cause first, then the guest backtrace wasmtime attached.
        return Failure::new(FailureKind::Trap, sanitize(&format!("{trap}: {e:?}")));
    }
    Failure::new(FailureKind::Error, sanitize(&format!("{e:?}")))
}

/// Check, without running anything, that `path` is a loadable handler.
pub fn check_component(runtime: &Runtime, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("no component at {}", path.display());
    }
    runtime.load(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine that compiles is not the one that runs: what it makes must
    /// load into the running one, whatever the CPU budget setting (a setting
    /// added to one engine and not the other fails here, not at a user's
    /// first start).
    #[test]
    fn what_the_compile_engine_makes_loads_into_the_running_engine() {
        for cpu_budget in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let runtime = Runtime::new(RuntimeConfig {
                max_instances: 1,
                max_memory_bytes: 1 << 20,
                cache_dir: dir.path().to_path_buf(),
                cpu_budget,
            })
            .unwrap();
            // The empty component, in binary (the `wat` feature is off).
            let compiled = compile(&runtime.compile_settings, b"\0asm\x0d\0\x01\0").unwrap();
            // SAFETY: compiled just now, by `compile`.
            let loaded = unsafe { Component::deserialize(&runtime.engine, &compiled) };
            assert!(loaded.is_ok(), "cpu_budget {cpu_budget}: {:?}", loaded.err());
        }
    }
}
