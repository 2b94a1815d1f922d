//! The delivery engine in process, with a source whose acks the test holds
//! back: what a message holds while the broker has not yet confirmed its
//! ack (`delivery::Slot`), and what a shutdown that gives up does to an ack
//! under way. No broker here on purpose: a real one confirms too fast to
//! hold an ack open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::bail;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, watch};
use wharf::broker::{Acker, Delivery, OutboundMessage, Sink, Source};
use wharf::delivery::{Binding, Lane, RetryPolicy, Shutdown, run_binding};
use wharf::kv::{Kv, KvQuota};
use wharf::runtime::{AttemptLimits, HandlerContext, Runtime, RuntimeConfig};
use wharf::subject::Grants;

use crate::harness::{Result, program};

/// What the test sees of the source: ids handed out, acks asked for and
/// confirmed; `confirm` lets the held acks through.
#[derive(Default)]
struct Seen {
    handed_out: Mutex<Vec<String>>,
    acks_asked: AtomicUsize,
    acks_confirmed: AtomicUsize,
    /// Releases asked for (confirmed at once unless `releases_hang`).
    released: Mutex<Vec<String>>,
    releases_hang: AtomicBool,
    /// Receives wait, their messages taken, until the source is stopped.
    receives_wait_for_stop: AtomicBool,
    stopped: watch::Sender<bool>,
    /// The source's stop never returns.
    stop_hangs: AtomicBool,
    changed: Notify,
}

struct HeldAcker {
    id: String,
    seen: Arc<Seen>,
    confirm: watch::Receiver<bool>,
}

#[async_trait]
impl Acker for HeldAcker {
    async fn ack(&self) -> anyhow::Result<()> {
        self.seen.acks_asked.fetch_add(1, Ordering::SeqCst);
        self.seen.changed.notify_waiters();
        self.confirm.clone().wait_for(|go| *go).await?;
        self.seen.acks_confirmed.fetch_add(1, Ordering::SeqCst);
        self.seen.changed.notify_waiters();
        Ok(())
    }
    async fn retry(&self, _: Duration) -> anyhow::Result<()> {
        bail!("the ok handler never fails")
    }
    async fn dead_letter(&self, _: &str, _: Vec<(String, String)>) -> anyhow::Result<()> {
        bail!("the ok handler never fails")
    }
    async fn release(&self) -> anyhow::Result<()> {
        self.seen
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.id.clone());
        self.seen.changed.notify_waiters();
        if self.seen.releases_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn defer(&self, _: Duration) -> anyhow::Result<()> {
        bail!("no dedup here")
    }
}

struct Queue {
    ids: Mutex<VecDeque<String>>,
    seen: Arc<Seen>,
    confirm: watch::Receiver<bool>,
}

#[async_trait]
impl Source for Queue {
    async fn receive(&self, max: usize, _lease: Duration) -> anyhow::Result<Vec<Delivery>> {
        let taken: Vec<String> = {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            let n = max.min(ids.len());
            ids.drain(..n).collect()
        };
        if taken.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.seen
            .handed_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(taken.iter().cloned());
        self.seen.changed.notify_waiters();
        if self.seen.receives_wait_for_stop.load(Ordering::SeqCst) {
            self.seen.stopped.subscribe().wait_for(|stopped| *stopped).await?;
        }
        Ok(taken
            .into_iter()
            .map(|id| Delivery {
                id: id.clone(),
                subject: "held".into(),
                payload: Bytes::from_static(b"{}"),
                headers: vec![],
                content_type: None,
                reply_to: None,
                attempt: 1,
                redelivered: false,
                first_seen_ms: 0,
                acker: Box::new(HeldAcker {
                    id,
                    seen: self.seen.clone(),
                    confirm: self.confirm.clone(),
                }),
            })
            .collect())
    }

    async fn stop(&self) {
        self.seen.stopped.send_replace(true);
        if self.seen.stop_hangs.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

struct NoSink;

#[async_trait]
impl Sink for NoSink {
    async fn publish(&self, _: Vec<OutboundMessage>) -> anyhow::Result<()> {
        bail!("the ok handler publishes nothing")
    }
}

impl Seen {
    /// Wait (up to 30 s) until `cond` holds.
    async fn until(&self, what: &str, cond: impl Fn(&Seen) -> bool) -> Result {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cond(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!("timed out waiting for {what}");
            }
        }
    }

    fn handed_out(&self) -> Vec<String> {
        self.handed_out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn released(&self) -> Vec<String> {
        self.released.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The `ok` handler at `concurrency = 1`, bound to a [`Queue`] of `ids`
/// whose acks wait for `confirm`, and its consumer loop running.
struct HeldRun {
    _dir: tempfile::TempDir,
    seen: Arc<Seen>,
    confirm: watch::Sender<bool>,
    shutdown: Shutdown,
    consumer: tokio::task::JoinHandle<()>,
}

fn run_held(name: &str, ids: &[&str]) -> anyhow::Result<HeldRun> {
    run_held_seeing(name, ids, Seen::default())
}

/// [`run_held`] with `seen` set up beforehand (releases that hang, receives
/// that wait for the stop).
fn run_held_seeing(name: &str, ids: &[&str], seen: Seen) -> anyhow::Result<HeldRun> {
    let dir = tempfile::tempdir()?;
    let seen = Arc::new(seen);
    let (confirm, confirmed) = watch::channel(false);
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        max_instances: 4,
        max_memory_bytes: 64 << 20,
        cache_dir: dir.path().join("cache"),
        cpu_budget: true,
    })?);
    let component = Arc::new(runtime.load(&program("ok"))?);
    let context = Arc::new(HandlerContext {
        requester: None,
        name: name.into(),
        tenant: "default".into(),
        grants: Grants::default(),
        tenant_grants: Grants::default(),
        config: Default::default(),
        kv: Kv::new(
            wharf::store::open_all(&dir.path().join("db"))?,
            "default",
            KvQuota {
                max_keys: 10,
                max_value_bytes: 64,
            },
        ),
        limits: AttemptLimits {
            timeout: Duration::from_secs(5),
            memory_bytes: 64 << 20,
            max_payload_bytes: 1 << 20,
            max_publishes: 0,
            max_log_bytes: 4096,
            instance_reuse: 1,
        },
    });
    let binding = Arc::new(Binding {
        name: name.into(),
        component: ArcSwap::new(component),
        context,
        lanes: vec![Lane {
            shard: 0,
            source: Arc::new(Queue {
                ids: Mutex::new(ids.iter().map(|id| id.to_string()).collect()),
                seen: seen.clone(),
                confirm: confirmed,
            }),
            sink: Arc::new(NoSink),
            dedup: None,
            concurrency: 1,
        }],
        dead_letter_queue: format!("{name}.dead"),
        tenant_permits: Arc::new(Semaphore::new(1)),
        retry: RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            multiplier: 2.0,
        },
        rate_limit: None,
        metrics: OnceLock::new(),
    });
    let shutdown = Shutdown::default();
    let consumer = tokio::spawn(run_binding(binding, 0, runtime, shutdown.clone()));
    Ok(HeldRun {
        _dir: dir,
        seen,
        confirm,
        shutdown,
        consumer,
    })
}

/// `handler`'s messages counted acked, released and unknown.
fn outcomes(handler: &str) -> [u64; 3] {
    ["acked", "released", "unknown"].map(|outcome| settled(handler, outcome))
}

/// `wharf_messages_total{handler, outcome}` as this process counted it.
fn settled(handler: &str, outcome: &str) -> u64 {
    let metrics = wharf::telemetry::prometheus().expect("the recorder").render();
    let labels = [format!("handler=\"{handler}\""), format!("outcome=\"{outcome}\"")];
    metrics
        .lines()
        .find(|l| l.starts_with("wharf_messages_total{") && labels.iter().all(|x| l.contains(x.as_str())))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// With `concurrency = 1`: the first message, handled, waits for its ack
/// without its slot, so the second is taken and run meanwhile; the second
/// then waits for the settling place (still holding the slot), so a third
/// is not taken until the first ack is confirmed. Then all are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handled_message_waits_for_its_ack_without_its_slot_within_a_budget() -> Result {
    let HeldRun {
        seen,
        confirm,
        shutdown,
        consumer,
        ..
    } = run_held("held", &["m0", "m1", "m2"])?;

    // m0 is handled and asks for its ack, which is held: its slot goes to m1.
    seen.until("m1 to be taken while m0's ack is held", |s| s.handed_out().len() >= 2)
        .await?;
    assert_eq!(seen.acks_confirmed.load(Ordering::SeqCst), 0);
    // m1 runs; the settling budget (one place, m0's) is full, so m1 keeps
    // its slot and m2 is not taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.handed_out(),
        ["m0", "m1"],
        "a third message was taken past the budget"
    );
    assert_eq!(seen.acks_asked.load(Ordering::SeqCst), 1);

    confirm.send(true)?;
    seen.until("every ack to be confirmed", |s| {
        s.acks_confirmed.load(Ordering::SeqCst) == 3
    })
    .await?;
    assert_eq!(seen.handed_out(), ["m0", "m1", "m2"]);
    shutdown.stop.cancel();
    consumer.await?;
    Ok(())
}

/// A shutdown that gives up on what is in flight releases a message only
/// while its fate is open. `m0` is handled and its ack is under way (held);
/// `m1` has run and waits for the settling place. The abort releases `m1`,
/// but not `m0`, whose ack stands: releasing it would contradict an ack the
/// broker may already have, and count it released. `m0`'s ack, confirmed
/// soon after the abort, is counted acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_gives_up_lets_an_ack_under_way_stand() -> Result {
    let HeldRun {
        seen,
        confirm,
        shutdown,
        consumer,
        ..
    } = run_held("gives-up", &["m0", "m1"])?;

    seen.until("m0's ack to be under way and m1 taken", |s| {
        s.acks_asked.load(Ordering::SeqCst) == 1 && s.handed_out().len() == 2
    })
    .await?;
    // m1 runs (a few ms), then waits for m0's settling place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.stop.cancel();
    shutdown.abort.cancel();
    seen.until("m1 to be released", |s| !s.released().is_empty()).await?;
    // Had m0's ack been given up at the abort, it would never be confirmed.
    confirm.send(true)?;
    tokio::time::timeout(Duration::from_secs(10), consumer).await??;

    assert_eq!(seen.released(), ["m1"]);
    assert_eq!(seen.acks_confirmed.load(Ordering::SeqCst), 1, "m0's ack went through");
    assert_eq!(outcomes("gives-up"), [1, 1, 0], "acked, released, unknown");
    Ok(())
}

/// An ack the broker never confirms does not hold a shutdown that gave up
/// for longer than `TELL_AT_SHUTDOWN` (1 s): it is counted unknown (the
/// broker redelivers the message if it never got the ack), still not
/// released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_gives_up_waits_for_an_ack_under_way_only_so_long() -> Result {
    let HeldRun {
        seen,
        confirm: _confirm,
        shutdown,
        consumer,
        ..
    } = run_held("never-confirmed", &["m0"])?;

    seen.until("m0's ack to be under way", |s| s.acks_asked.load(Ordering::SeqCst) == 1)
        .await?;
    shutdown.stop.cancel();
    shutdown.abort.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer).await??;
    assert!(seen.released().is_empty());
    assert_eq!(seen.acks_confirmed.load(Ordering::SeqCst), 0);
    assert_eq!(settled("never-confirmed", "unknown"), 1);
    Ok(())
}

/// Nor does a release the broker never confirms: `m1`, given up before its
/// verdict, is released, and the release hangs; after `TELL_AT_SHUTDOWN`
/// it is counted unknown (it comes back when its lease runs out) and the
/// consumer loop ends, as it does for `m0`'s ack, also never confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_gives_up_waits_for_a_release_only_so_long() -> Result {
    let seen = Seen {
        releases_hang: true.into(),
        ..Seen::default()
    };
    let HeldRun {
        seen,
        confirm: _confirm,
        shutdown,
        consumer,
        ..
    } = run_held_seeing("release-unconfirmed", &["m0", "m1"], seen)?;

    seen.until("m0's ack to be under way and m1 taken", |s| {
        s.acks_asked.load(Ordering::SeqCst) == 1 && s.handed_out().len() == 2
    })
    .await?;
    // m1 runs (a few ms), then waits for m0's settling place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.stop.cancel();
    shutdown.abort.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer).await??;

    assert_eq!(seen.released(), ["m1"]);
    assert_eq!(outcomes("release-unconfirmed"), [0, 0, 2], "acked, released, unknown");
    Ok(())
}

/// A receive under way when the host stops is let finish, and what it took
/// is released unrun; those releases are bounded by `TELL_AT_SHUTDOWN` too.
/// Here the receive takes `m0` and returns only once the source is stopped,
/// and the release hangs: `m0` is counted unknown (it comes back when its
/// lease runs out) and the consumer loop ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_at_the_stop_is_waited_for_only_so_long() -> Result {
    let seen = Seen {
        releases_hang: true.into(),
        receives_wait_for_stop: true.into(),
        ..Seen::default()
    };
    let HeldRun {
        seen,
        shutdown,
        consumer,
        ..
    } = run_held_seeing("release-at-stop", &["m0", "m1"], seen)?;

    seen.until("m0 to be taken by a receive under way", |s| !s.handed_out().is_empty())
        .await?;
    shutdown.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer).await??;

    assert_eq!(seen.handed_out(), ["m0"]);
    assert_eq!(seen.released(), ["m0"]);
    assert_eq!(seen.acks_asked.load(Ordering::SeqCst), 0, "m0 never ran");
    assert_eq!(outcomes("release-at-stop"), [0, 0, 1], "acked, released, unknown");
    Ok(())
}

/// A source whose stop never returns (a broker that stopped answering a
/// consumer cancel) holds the consumer loop for `SOURCE_STOP` (5 s), not
/// for ever; what such a source holds comes back from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_does_not_stop_holds_the_shutdown_only_so_long() -> Result {
    let seen = Seen {
        stop_hangs: true.into(),
        ..Seen::default()
    };
    let HeldRun {
        seen,
        confirm,
        shutdown,
        consumer,
        ..
    } = run_held_seeing("stop-hangs", &["m0"], seen)?;
    confirm.send(true)?;
    seen.until("m0 to be acked", |s| s.acks_confirmed.load(Ordering::SeqCst) == 1)
        .await?;
    shutdown.stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), consumer).await??;
    assert!(*seen.stopped.borrow(), "the source was asked to stop");
    assert_eq!(settled("stop-hangs", "acked"), 1);
    Ok(())
}
