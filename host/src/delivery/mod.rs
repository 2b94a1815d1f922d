//! The delivery engine: the one place that decides what happens to a message.
//!
//! For each handler binding (source → handler) a consumer loop takes
//! deliveries while it has free concurrency (per handler and per tenant), and
//! for each one:
//!
//! 1. too large → dead-letter (`payload-too-large`), never shown to the guest;
//! 2. dedup on and (handler, id) already done → ack without running, counted;
//! 3. wait for the rate limit, then run one attempt in a fresh instance;
//! 4. success → publish the outbox and wait for confirmation, mark dedup,
//!    trade the running slot for a settling one ([`Slot`]), ack;
//! 5. failure → `rejected` (or a failure retrying cannot fix) dead-letters at
//!    once; anything else retries after backoff until `max_attempts`, then
//!    dead-letters with the last reason.
//!
//! Settling errors (the broker could not be told) are logged as "outcome
//! unknown": the lease runs out, the message comes back, dedup absorbs it.
//! On shutdown the loop stops taking messages (a receive under way is let
//! finish and what it took released unrun), waits up to the grace period
//! for in-flight ones, and releases the rest for immediate redelivery,
//! except those whose outcome is already being told to the broker: that
//! outcome stands. The host waits up to [`TELL_AT_SHUTDOWN`] for each
//! outcome told once it stopped waiting on handlers, a release included.
//!
//! Each delivery goes through two steps: [`decide`] (everything above up to
//! the outcome, a [`Verdict`]) and [`tell`] (the one place the broker is
//! told, and the outcome counted).

pub mod dedup;
mod retry;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::join_all;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use dedup::{Claim, DedupStore};
pub use retry::RetryPolicy;

use crate::broker::{Delivery, Sink, Source};
use crate::runtime::{Failure, FailureKind, HandlerContext, LoadedComponent, Message, Runtime};
use crate::store::now_ms;

/// How long a message waits when a copy of it is in flight.
const DEFER_BUSY: Duration = Duration::from_secs(1);

/// Every dead-letter header starts with this; replay strips them.
pub const DEAD_LETTER_HEADER_PREFIX: &str = "wharf-dead-letter-";

/// How long a delivery stays invisible to other consumers: long enough for
/// the attempt, its outbox and its ack, short enough that a crashed host's
/// messages come back soon. Must exceed the timeout by a margin because the
/// outbox publish and the ack happen after the call returns.
pub fn lease_for(timeout: Duration) -> Duration {
    timeout * 2 + Duration::from_secs(5)
}

/// A source bound to a handler, with everything needed to settle its
/// deliveries.
pub struct Binding {
    /// Handler name.
    pub name: String,
    /// The component to run; swapped atomically on reload.
    pub component: ArcSwap<LoadedComponent>,
    /// Limits, grants, config and key-value store of the handler.
    pub context: Arc<HandlerContext>,
    /// One consumer loop each, on its own shard ([`crate::shard`]); at
    /// least one.
    pub lanes: Vec<Lane>,
    /// Dead-letter queue name.
    pub dead_letter_queue: String,
    /// The tenant's shared in-flight budget.
    pub tenant_permits: Arc<Semaphore>,
    /// Retry timing.
    pub retry: RetryPolicy,
    /// Rate limit, when set.
    pub rate_limit: Option<DefaultDirectRateLimiter>,
    /// The binding's metric handles, registered on first use.
    pub metrics: OnceLock<BindingMetrics>,
}

/// A binding's share of one shard: its own connections to the broker and
/// its share of the handler's concurrency.
pub struct Lane {
    /// The shard it runs on.
    pub shard: usize,
    /// Where messages come from.
    pub source: Arc<dyn Source>,
    /// Where the outbox goes.
    pub sink: Arc<dyn Sink>,
    /// Dedup store and TTL, when dedup is on.
    pub dedup: Option<(Arc<dyn DedupStore>, Duration)>,
    /// Messages of this lane running at once (as many more may wait for
    /// their ack: [`Slot`]); the lanes' add up to the handler's.
    pub concurrency: usize,
}

/// A binding's counters and histogram, looked up in the recorder once rather
/// than once per message (a lookup hashes the labels and clones the name).
pub struct BindingMetrics {
    attempt_seconds: metrics::Histogram,
    /// By [`Settled`], in [`Settled::ALL`] order.
    messages: Vec<metrics::Counter>,
    /// By [`FailureKind`], in [`FailureKind::ALL`] order.
    failures: Vec<metrics::Counter>,
    /// Deliveries each lane took from the broker, in lane order, labelled
    /// by the lane's shard.
    received: Vec<metrics::Counter>,
}

impl BindingMetrics {
    fn new(handler: &str, lanes: &[Lane]) -> Self {
        // The recorder must exist before a handle is taken, or the handle
        // counts into nothing.
        crate::telemetry::prometheus();
        let name = handler.to_string();
        Self {
            attempt_seconds: metrics::histogram!("wharf_attempt_seconds", "handler" => name.clone()),
            messages: Settled::ALL
                .iter()
                .map(|s| metrics::counter!("wharf_messages_total", "handler" => name.clone(), "outcome" => s.as_str()))
                .collect(),
            failures: FailureKind::ALL
                .iter()
                .map(|k| metrics::counter!("wharf_failures_total", "handler" => name.clone(), "reason" => k.as_str()))
                .collect(),
            received: lanes
                .iter()
                .map(|l| metrics::counter!("wharf_received_total", "handler" => name.clone(), "shard" => l.shard.to_string()))
                .collect(),
        }
    }
}

/// Build a rate limiter allowing `messages` per `per`, with a burst of
/// `messages`.
pub fn rate_limiter(messages: u32, per: Duration) -> Option<DefaultDirectRateLimiter> {
    let burst = std::num::NonZeroU32::new(messages)?;
    let quota = Quota::with_period(per / messages)?.allow_burst(burst);
    Some(RateLimiter::direct(quota))
}

/// Shutdown signals for consumers.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking new messages.
    pub stop: CancellationToken,
    /// Give up on in-flight messages: release them for redelivery.
    pub abort: CancellationToken,
}

/// How a delivery was settled, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Handled and acked.
    Acked,
    /// Acked without running: a duplicate.
    Deduplicated,
    /// Scheduled for another attempt.
    Retried,
    /// Moved to the dead-letter queue.
    DeadLettered,
    /// Given back unprocessed (shutdown).
    Released,
    /// Given back unprocessed, for later (a copy was in flight).
    Deferred,
    /// The broker could not be told, or had not confirmed when a shutdown
    /// stopped waiting: it comes back unless the broker had it.
    Unknown,
}

impl Settled {
    const ALL: [Settled; 7] = [
        Settled::Acked,
        Settled::Deduplicated,
        Settled::Retried,
        Settled::DeadLettered,
        Settled::Released,
        Settled::Deferred,
        Settled::Unknown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "acked",
            Settled::Deduplicated => "deduplicated",
            Settled::Retried => "retried",
            Settled::DeadLettered => "dead_lettered",
            Settled::Released => "released",
            Settled::Deferred => "deferred",
            Settled::Unknown => "unknown",
        }
    }
}

impl Binding {
    fn lease(&self) -> Duration {
        lease_for(self.context.limits.timeout)
    }

    fn metrics(&self) -> &BindingMetrics {
        self.metrics
            .get_or_init(|| BindingMetrics::new(&self.name, &self.lanes))
    }

    fn count_failure(&self, kind: FailureKind) {
        match FailureKind::ALL.iter().position(|k| *k == kind) {
            Some(i) => self.metrics().failures[i].increment(1),
            // A kind left out of `ALL`: still counted, by a lookup.
            None => {
                metrics::counter!("wharf_failures_total", "handler" => self.name.clone(), "reason" => kind.as_str())
                    .increment(1)
            }
        }
    }

    fn count_settled(&self, settled: Settled) {
        match Settled::ALL.iter().position(|s| *s == settled) {
            Some(i) => self.metrics().messages[i].increment(1),
            // An outcome left out of `ALL`: still counted, by a lookup.
            None => {
                metrics::counter!("wharf_messages_total", "handler" => self.name.clone(), "outcome" => settled.as_str())
                    .increment(1)
            }
        }
    }
}

/// Run the consumer loop of `binding`'s lane `lane` until `shutdown.stop`,
/// then drain. Its attempts run on the runtime it runs on.
pub async fn run_binding(binding: Arc<Binding>, lane: usize, runtime: Arc<Runtime>, shutdown: Shutdown) {
    let this = &binding.lanes[lane];
    let permits = Arc::new(Semaphore::new(this.concurrency));
    let settling = Arc::new(Semaphore::new(this.concurrency));
    let mut in_flight = JoinSet::new();
    let mut receive_errors = 0u32;
    let received_total = &binding.metrics().received[lane];
    // Whether the source was stopped already (with a receive under way).
    let stopped = loop {
        while in_flight.try_join_next().is_some() {}
        let slots = tokio::select! {
            s = take_slots(&binding, this.concurrency, &permits) => s,
            _ = shutdown.stop.cancelled() => break false,
        };
        let receive = this.source.receive(slots.len(), binding.lease());
        tokio::pin!(receive);
        let received = tokio::select! {
            r = &mut receive => r,
            _ = shutdown.stop.cancelled() => {
                finish_receive(&binding, this, receive).await;
                break true;
            }
        };
        let deliveries = match received {
            Ok(d) => {
                receive_errors = 0;
                received_total.increment(d.len() as u64);
                d
            }
            Err(e) => {
                receive_errors = receive_errors.saturating_add(1);
                let wait = crate::broker::reconnect_backoff(receive_errors);
                tracing::warn!(handler = %binding.name, error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.stop.cancelled() => break false,
                }
            }
        };
        // Unused slots (fewer deliveries than asked for) drop here.
        for (mut delivery, running) in deliveries.into_iter().zip(slots) {
            let (binding, runtime, abort) = (binding.clone(), runtime.clone(), shutdown.abort.clone());
            let contents = Contents::take(&mut delivery);
            let mut slot = Slot {
                running: Some(running),
                settling: settling.clone(),
                place: None,
                claimed: false,
            };
            // Boxed: the attempt's future is several KiB (it holds the
            // Wasm call's), and spawn would otherwise copy it around.
            in_flight.spawn(Box::pin(async move {
                // A shutdown that gives up on what is in flight releases a
                // message only while its fate is still open: once a verdict
                // is being told to the broker, that verdict stands.
                let lane = &binding.lanes[lane];
                let verdict = tokio::select! {
                    verdict = decide(&binding, lane, &runtime, &delivery, contents, &mut slot) => verdict,
                    _ = abort.cancelled() => return give_up(&binding, lane, &delivery, &slot).await,
                };
                tell(&binding, lane, &delivery, verdict, &slot, &abort).await
            }));
        }
    };
    if !stopped {
        stop_source(&binding, this).await;
    }
    while in_flight.join_next().await.is_some() {}
}

/// The longest a shutdown waits for a source to stop. A stop takes a round
/// trip or less (an AMQP `basic.cancel`), or lets a JetStream pull ahead
/// come back (at most 3 s); a broker that stopped answering must not hold
/// the exit. What a source still holds when the host exits comes back
/// from the broker: AMQP requeues a closed channel's unacked messages,
/// and every other backend redelivers when the lease runs out.
const SOURCE_STOP: Duration = Duration::from_secs(5);

async fn stop_source(binding: &Binding, lane: &Lane) {
    if tokio::time::timeout(SOURCE_STOP, lane.source.stop()).await.is_err() {
        tracing::warn!(
            handler = %binding.name,
            "the source did not stop within {} s of shutdown; what it holds comes back from the broker",
            SOURCE_STOP.as_secs()
        );
    }
}

/// The longest a shutdown waits for a receive that was under way. Every
/// source's own wait for messages is shorter (1 s), or ends when the source
/// is stopped.
const RECEIVE_FINISH: Duration = Duration::from_secs(3);

/// Shutdown came while a receive was under way. It may already have taken
/// messages from the broker (a lease written, a job moved to the processing
/// list, a fetch delivered); dropping it would hide them until their lease
/// ran out. Instead stop the source (so it waits for nothing more), let the
/// receive finish, and release what it took at once. Both run together: a
/// source's stop may wait for the lock its receive holds.
async fn finish_receive(binding: &Binding, lane: &Lane, receive: impl Future<Output = anyhow::Result<Vec<Delivery>>>) {
    let (_, received) = tokio::join!(
        stop_source(binding, lane),
        tokio::time::timeout(RECEIVE_FINISH, receive)
    );
    match received {
        // All at once, each bounded: one by one, a broker that stopped
        // answering would hold the exit for its client's timeout per message.
        Ok(Ok(deliveries)) => {
            join_all(deliveries.iter().map(|d| release(binding, d))).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(handler = %binding.name, error = %format!("{e:#}"), "receive failed during shutdown")
        }
        Err(_) => tracing::warn!(
            handler = %binding.name,
            "a receive did not finish within {} s of shutdown; what it took comes back when its lease runs out",
            RECEIVE_FINISH.as_secs()
        ),
    }
}

/// A running message's share of the handler's and the tenant's concurrency.
type Running = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// A delivery's place in its binding's budgets, from receive to settled.
///
/// It runs holding a slot of the handler's and the tenant's concurrency.
/// Once it is handled for good (attempt done, outbox confirmed, dedup mark
/// written) and only its ack is left, it trades that slot for one of the
/// binding's *settling* budget (as large as its concurrency), so the next
/// message starts while the broker confirms this one. Waiting acks then
/// cost no handler time, and a source can fold them into fewer, fuller
/// round trips (the Redis stream source sends them with its next read).
///
/// The trade-off, stated where it is made: a host killed mid-load leaves at
/// most `concurrency` messages running and `concurrency` handled but not yet
/// acked, so without dedup up to twice `concurrency` messages may run again;
/// with dedup only the running ones can (the others' marks are written).
pub struct Slot {
    running: Option<Running>,
    settling: Arc<Semaphore>,
    /// The place in the settling budget, once traded for `running`; held
    /// until the broker confirms.
    place: Option<OwnedSemaphorePermit>,
    /// This delivery's attempt holds its dedup claim: dropped unless the
    /// message is acked, so that a redelivery need not wait for it to
    /// expire.
    claimed: bool,
}

impl Slot {
    /// Trade the running slot for a place in the settling budget, held
    /// until the ack is confirmed. Waits while the
    /// settling budget is full, still holding the running slot, so the two
    /// budgets together bound what a crash can repeat.
    ///
    /// While it waits, the acks ahead of it may be held back by `source` for
    /// its next receive to carry, which cannot come while every slot waits
    /// here (always so at concurrency 1): `source` is told to send them now.
    async fn settle_only(&mut self, source: &dyn Source) {
        let place = match self.settling.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                source.flush_acks();
                let Ok(place) = self.settling.clone().acquire_owned().await else {
                    return;
                };
                place
            }
        };
        self.running = None;
        self.place = Some(place);
    }
}

/// Wait for one free slot of the handler and the tenant, then take as many
/// more as are free at once (up to the handler's concurrency): the size of
/// the next batch. Rate-limited handlers take one at a time, after the limit.
async fn take_slots(binding: &Binding, concurrency: usize, permits: &Arc<Semaphore>) -> Vec<Running> {
    let mut slots = Vec::new();
    let Ok(first) = permits.clone().acquire_owned().await else {
        return slots;
    };
    let Ok(tenant) = binding.tenant_permits.clone().acquire_owned().await else {
        return slots;
    };
    slots.push((first, tenant));
    if let Some(limiter) = &binding.rate_limit {
        limiter.until_ready().await;
        return slots;
    }
    while slots.len() < concurrency {
        let (Ok(p), Ok(t)) = (
            permits.clone().try_acquire_owned(),
            binding.tenant_permits.clone().try_acquire_owned(),
        ) else {
            break;
        };
        slots.push((p, t));
    }
    slots
}

/// What the broker is to be told about a delivery: the one decision
/// [`decide`] makes, carried out by [`tell`].
enum Verdict {
    /// Handled: remove it.
    Ack,
    /// Already handled (dedup): remove it without running.
    Duplicate,
    /// Failed, transiently: deliver again after the delay.
    Retry(Duration),
    /// Failed for good: to the dead-letter queue, with these headers.
    DeadLetter(Vec<(String, String)>),
    /// A copy is in flight: give it back for after the delay.
    Defer(Duration),
}

impl Verdict {
    /// What the delivery counts as once the broker has the verdict.
    fn outcome(&self) -> Settled {
        match self {
            Verdict::Ack => Settled::Acked,
            Verdict::Duplicate => Settled::Deduplicated,
            Verdict::Retry(_) => Settled::Retried,
            Verdict::DeadLetter(_) => Settled::DeadLettered,
            Verdict::Defer(_) => Settled::Deferred,
        }
    }
}

/// What an attempt takes out of its delivery instead of copying: the
/// payload and what only the handler reads. No settling needs them (ackers
/// keep what they need themselves); the delivery keeps its id, subject,
/// attempt and first-seen time for the verdict, the logs and a dead letter.
struct Contents {
    payload: Bytes,
    headers: Vec<(String, String)>,
    content_type: Option<String>,
    reply_to: Option<String>,
}

impl Contents {
    fn take(d: &mut Delivery) -> Self {
        Contents {
            payload: std::mem::take(&mut d.payload),
            headers: std::mem::take(&mut d.headers),
            content_type: d.content_type.take(),
            reply_to: d.reply_to.take(),
        }
    }
}

/// Decide what happens to one delivery, whose [`Contents`] have been taken
/// out of it (so that the attempt gets them without a copy): everything up
/// to telling the broker, which [`tell`] does.
async fn decide(
    binding: &Binding,
    lane: &Lane,
    runtime: &Runtime,
    d: &Delivery,
    contents: Contents,
    slot: &mut Slot,
) -> Verdict {
    let limits = binding.context.limits;
    if contents.payload.len() > limits.max_payload_bytes {
        let failure = Failure::new(
            FailureKind::PayloadTooLarge,
            format!(
                "payload is {} bytes; max_payload_bytes is {}",
                contents.payload.len(),
                limits.max_payload_bytes
            ),
        );
        return dead_letter(binding, d, &failure);
    }
    if let Some((store, _)) = &lane.dedup {
        match store.claim(&binding.name, &d.id, binding.lease()).await {
            Ok(Claim::Acquired) => slot.claimed = true,
            Ok(Claim::Done) => {
                tracing::debug!(handler = %binding.name, message_id = %d.id, "duplicate: acked without running");
                return Verdict::Duplicate;
            }
            Ok(Claim::Busy) => {
                // A twin is being handled right now (here or on another
                // host, or by a host that died, until its claim expires).
                // Come back later; not a failure, so it never dead-letters.
                tracing::debug!(handler = %binding.name, message_id = %d.id, "a copy is in flight; deferring this one");
                return Verdict::Defer(DEFER_BUSY);
            }
            Err(e) => {
                // Running without knowing could repeat effects; try later.
                let failure = Failure::new(FailureKind::Error, format!("dedup store unavailable: {e:#}"));
                return retry_or_dead_letter(binding, d, &failure);
            }
        }
    }
    run_attempt(binding, lane, runtime, d, contents, slot).await
}

/// Run one attempt and decide by its outcome; a handled message also trades
/// its running slot for a place in the settling budget.
async fn run_attempt(
    binding: &Binding,
    lane: &Lane,
    runtime: &Runtime,
    d: &Delivery,
    contents: Contents,
    slot: &mut Slot,
) -> Verdict {
    let limits = binding.context.limits;
    let component = binding.component.load_full();
    let msg = Message {
        id: d.id.clone(),
        subject: d.subject.clone(),
        // No copy when the broker's buffer is this delivery's alone.
        payload: Vec::from(contents.payload),
        headers: contents.headers,
        content_type: contents.content_type,
        attempt: d.attempt,
        redelivered: d.redelivered,
        published_at_ms: d.first_seen_ms,
        deadline_ms: now_ms() + limits.timeout.as_millis() as u64,
        reply_to: contents.reply_to,
    };
    let attempt = runtime.invoke(&component, &binding.context, msg).await;
    binding.metrics().attempt_seconds.record(attempt.elapsed.as_secs_f64());

    if let Err(failure) = attempt.result {
        return retry_or_dead_letter(binding, d, &failure);
    }
    if !attempt.outbox.is_empty() {
        let count = attempt.outbox.len();
        if let Err(e) = lane.sink.publish(attempt.outbox).await {
            let failure = Failure::new(FailureKind::Error, format!("outbox of {count} not confirmed: {e:#}"));
            return retry_or_dead_letter(binding, d, &failure);
        }
    }
    if let Some((store, ttl)) = &lane.dedup
        && let Err(e) = store.finish(&binding.name, &d.id, *ttl).await
    {
        tracing::warn!(handler = %binding.name, message_id = %d.id, error = %format!("{e:#}"), "could not record dedup mark; a redelivery would run again");
    }
    slot.settle_only(&*lane.source).await;
    Verdict::Ack
}

fn retry_or_dead_letter(binding: &Binding, d: &Delivery, failure: &Failure) -> Verdict {
    let permanent = matches!(failure.kind, FailureKind::Rejected | FailureKind::PayloadTooLarge);
    if permanent || d.attempt >= binding.retry.max_attempts {
        return dead_letter(binding, d, failure);
    }
    let delay = binding.retry.delay(d.attempt, failure.retry_after);
    tracing::warn!(
        handler = %binding.name,
        message_id = %d.id,
        attempt = d.attempt,
        max_attempts = binding.retry.max_attempts,
        reason = failure.kind.as_str(),
        error = %failure.message,
        retry_in_ms = delay.as_millis() as u64,
        "attempt failed; will retry"
    );
    binding.count_failure(failure.kind);
    Verdict::Retry(delay)
}

/// The headers a dead letter carries, in one place for every backend.
pub fn dead_letter_headers(handler: &str, d: &Delivery, failure: &Failure) -> Vec<(String, String)> {
    let h = |k: &str, v: String| (format!("{DEAD_LETTER_HEADER_PREFIX}{k}"), v);
    vec![
        h("reason", failure.kind.as_str().to_string()),
        h("error", failure.message.chars().take(4096).collect()),
        h("attempts", d.attempt.to_string()),
        h("handler", handler.to_string()),
        h("subject", d.subject.clone()),
        h("first-seen-ms", d.first_seen_ms.to_string()),
        h("at-ms", now_ms().to_string()),
    ]
}

fn dead_letter(binding: &Binding, d: &Delivery, failure: &Failure) -> Verdict {
    tracing::error!(
        handler = %binding.name,
        message_id = %d.id,
        attempt = d.attempt,
        reason = failure.kind.as_str(),
        error = %failure.message,
        queue = %binding.dead_letter_queue,
        "message dead-lettered"
    );
    binding.count_failure(failure.kind);
    Verdict::DeadLetter(dead_letter_headers(&binding.name, d, failure))
}

/// How long a shutdown waits for an outcome it tells the broker once it no
/// longer waits on handlers: after giving up on the messages in flight, a
/// verdict already being told (releasing the message instead would
/// contradict a verdict the broker may already have, since every backend
/// keeps the first, and count it released when it was acked) or the
/// release of one given up before its verdict; and the release of what a
/// receive under way at the stop took. Telling takes milliseconds while the
/// broker is up; past this the outcome is counted unknown, and the host
/// exits without it: if the broker never got it, the message comes back
/// when its lease runs out.
const TELL_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// Tell the broker the verdict, and count what came of it.
async fn tell(
    binding: &Binding,
    lane: &Lane,
    d: &Delivery,
    verdict: Verdict,
    slot: &Slot,
    abort: &CancellationToken,
) -> Settled {
    let intended = verdict.outcome();
    let told = async {
        let result = match verdict {
            Verdict::Ack | Verdict::Duplicate => d.acker.ack().await,
            Verdict::Retry(delay) => d.acker.retry(delay).await,
            Verdict::DeadLetter(headers) => d.acker.dead_letter(&binding.dead_letter_queue, headers).await,
            Verdict::Defer(delay) => d.acker.defer(delay).await,
        };
        settle(binding, d, intended, result)
    };
    tokio::pin!(told);
    let settled = tokio::select! {
        biased;
        settled = &mut told => settled,
        _ = abort.cancelled() => told_at_shutdown(binding, d, intended, &mut told).await,
    };
    if slot.claimed && settled != Settled::Acked {
        drop_claim(binding, lane, d).await;
    }
    settled
}

/// `told`, the broker being told `intended` during a shutdown, bounded by
/// [`TELL_AT_SHUTDOWN`]; past it the message is counted unknown.
async fn told_at_shutdown(
    binding: &Binding,
    d: &Delivery,
    intended: Settled,
    told: impl Future<Output = Settled>,
) -> Settled {
    match tokio::time::timeout(TELL_AT_SHUTDOWN, told).await {
        Ok(settled) => settled,
        Err(_) => {
            tracing::warn!(
                handler = %binding.name,
                message_id = %d.id,
                intended = intended.as_str(),
                "shutdown: the broker did not confirm the outcome within {} ms; if it never got it, the message will be redelivered",
                TELL_AT_SHUTDOWN.as_millis()
            );
            binding.count_settled(Settled::Unknown);
            Settled::Unknown
        }
    }
}

/// A shutdown gave up on the delivery before its verdict: release it, and
/// drop the dedup claim its attempt holds.
async fn give_up(binding: &Binding, lane: &Lane, d: &Delivery, slot: &Slot) -> Settled {
    let released = release(binding, d).await;
    if slot.claimed {
        drop_claim(binding, lane, d).await;
    }
    released
}

/// Drop the dedup claim this delivery's attempt holds (only such a one: a
/// claim has no owner, and another attempt's must stand). Bounded like a
/// verdict after a shutdown gave up, since it may run then: the claim
/// expires with the lease anyway.
async fn drop_claim(binding: &Binding, lane: &Lane, d: &Delivery) {
    let Some((store, _)) = &lane.dedup else { return };
    let failed = match tokio::time::timeout(TELL_AT_SHUTDOWN, store.abandon(&binding.name, &d.id)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => format!("no answer within {} ms", TELL_AT_SHUTDOWN.as_millis()),
    };
    tracing::debug!(handler = %binding.name, message_id = %d.id, error = %failed, "could not drop a dedup claim; it expires with the lease");
}

/// Give the delivery back unrun. Only a shutdown releases, so the wait is
/// bounded by [`TELL_AT_SHUTDOWN`].
async fn release(binding: &Binding, d: &Delivery) -> Settled {
    let released = async { settle(binding, d, Settled::Released, d.acker.release().await) };
    told_at_shutdown(binding, d, Settled::Released, released).await
}

fn settle(binding: &Binding, d: &Delivery, intended: Settled, result: anyhow::Result<()>) -> Settled {
    let settled = match result {
        Ok(()) => intended,
        Err(e) => {
            tracing::warn!(
                handler = %binding.name,
                message_id = %d.id,
                intended = intended.as_str(),
                error = %format!("{e:#}"),
                "outcome unknown: the broker was not told; the message will be redelivered"
            );
            Settled::Unknown
        }
    };
    binding.count_settled(settled);
    settled
}
