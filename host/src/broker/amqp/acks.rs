//! Settling a channel's deliveries, with acks folded into `multiple`.
//!
//! AMQP delivery tags count up per channel, and `basic.ack(tag, multiple)`
//! settles every unacked delivery up to `tag`. Handlers finish out of order,
//! so a naive `multiple` would ack a message still being handled (and lose it
//! if the host then died). The batcher therefore keeps, per channel, every
//! tag handed to the engine and what was decided for it, and on each flush:
//!
//! 1. sends the requeues (`basic.nack`, requeue) first, one by one;
//! 2. acks the *contiguous prefix* of decided-ack tags with one
//!    `basic.ack(last, multiple)` — nothing at or below `last` is still held,
//!    and the nacks above are already on the wire, in order, on this channel;
//! 3. lets the decided tags behind a still-held one wait for it, so that a
//!    later `multiple` carries them too, but for [`SWEEP_AFTER`] at most: a
//!    *sweep* then acks whatever still waits singly, so a slow message never
//!    holds finished ones back for long (they count against the prefetch).
//!
//! Flushes are group commits: the first settle queues one, which lets every
//! other task that is ready run first (attempts finishing now decide theirs)
//! and then takes everything decided; settles that arrive while it is being
//! written wait for the next one. A flush runs in its own task, so a
//! cancelled caller cannot leave a decision half sent. A tag whose delivery is
//! dropped undecided stays held: it bars `multiple` past it for the life of
//! the channel, which is correct (the broker still counts it unacked) and
//! only costs batching.
//!
//! Why the wait: with 100 messages in flight nearly every completion has an
//! older message still running ahead of it, and acking each singly sent
//! RabbitMQ a frame per 5–7 messages in the default mode, each costing the
//! broker a channel operation. Waiting up to 1 ms sends 2–4× fewer frames
//! and cuts RabbitMQ's CPU per message by 4–21% (`docs/BENCHMARKS.md`). The
//! price: a finished message's ack, and its place in the prefetch, can be up
//! to [`SWEEP_AFTER`] later; a host killed meanwhile hands it out again,
//! as any unacked message (dedup absorbs it).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::oneshot;

/// What was decided for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Remove it (done, or its copy was confirmed elsewhere).
    Ack,
    /// Give it back to the queue, to be delivered again at once.
    Requeue,
}

type Reply = oneshot::Sender<Result<(), String>>;

/// How long a decided ack behind a still-held tag waits for that tag, so
/// that one `multiple` can carry it, before a sweep sends it on its own.
const SWEEP_AFTER: Duration = Duration::from_millis(1);

#[derive(Default)]
struct State {
    /// Every tag handed to the engine and not yet sent: `None` while it is
    /// held (not decided), then what was decided and who waits for it.
    tags: BTreeMap<u64, Option<(Decision, Reply)>>,
    /// A flush task is queued that has not yet taken the decided tags.
    flush_queued: bool,
    /// A sweep is queued: a flush that also sends the acks behind a held tag.
    sweep_queued: bool,
}

/// The frames one flush sends, in this order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<T> {
    /// `basic.nack(tag, requeue)` each.
    pub requeue: Vec<(u64, T)>,
    /// One `basic.ack(last tag, multiple)` for all of them.
    pub prefix: Vec<(u64, T)>,
    /// `basic.ack(tag)` each: decided, but behind a held tag (a sweep only).
    pub single: Vec<(u64, T)>,
}

/// Split `tags` (ascending) into what to send now. Held tags stay in `tags`,
/// and so do the acks behind one unless this is a `sweep`.
pub fn plan<T>(tags: &mut BTreeMap<u64, Option<(Decision, T)>>, sweep: bool) -> Plan<T> {
    let mut out = Plan {
        requeue: vec![],
        prefix: vec![],
        single: vec![],
    };
    let mut below_all_held = true;
    for (tag, slot) in std::mem::take(tags) {
        match slot {
            None => {
                below_all_held = false;
                tags.insert(tag, None);
            }
            Some((Decision::Requeue, t)) => out.requeue.push((tag, t)),
            Some((Decision::Ack, t)) if below_all_held => out.prefix.push((tag, t)),
            Some((Decision::Ack, t)) if sweep => out.single.push((tag, t)),
            waiting @ Some((Decision::Ack, _)) => {
                tags.insert(tag, waiting);
            }
        }
    }
    out
}

/// Tracks and settles the deliveries of one channel.
pub struct AckBatcher {
    channel: Channel,
    state: Mutex<State>,
    /// One flush writes at a time, so frames go out in plan order.
    turn: tokio::sync::Mutex<()>,
}

impl AckBatcher {
    /// A batcher for deliveries received on `channel`.
    pub fn new(channel: Channel) -> Arc<Self> {
        Arc::new(Self {
            channel,
            state: Mutex::new(State::default()),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// The channel the deliveries arrived on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Record a delivery handed to the engine. Call before the next await
    /// after taking it from the consumer, so no tag can go unrecorded.
    pub fn hold(&self, tag: u64) {
        self.lock().tags.insert(tag, None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decide `tag` and return once the frame carrying the decision is
    /// written. An error means the outcome is unknown (the channel failed):
    /// the broker redelivers the message.
    pub async fn settle(self: &Arc<Self>, tag: u64, decision: Decision) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.lock();
            match state.tags.get_mut(&tag) {
                Some(slot @ None) => *slot = Some((decision, reply)),
                // Already decided (a cancelled ack followed by a shutdown
                // release): the first decision stands.
                Some(Some(_)) | None => return Ok(()),
            }
            if !state.flush_queued {
                state.flush_queued = true;
                tokio::spawn(self.clone().flush(false));
            }
        }
        match answer.await {
            Ok(result) => result.map_err(|e| anyhow!(e)),
            Err(_) => Err(anyhow!("the channel went away before basic.{decision:?} was sent")),
        }
    }

    /// Send what is decided (a sweep: the acks behind a held tag too).
    /// Boxed as a `Send` future: a flush may queue a sweep, which is a
    /// flush, so its type cannot name itself.
    fn flush(self: Arc<Self>, sweep: bool) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            if sweep {
                tokio::time::sleep(SWEEP_AFTER).await;
            }
            let _turn = self.turn.lock().await;
            if !sweep {
                // Attempts finishing now decide theirs before the plan is made.
                tokio::task::yield_now().await;
            }
            let plan = {
                let mut state = self.lock();
                if sweep {
                    state.sweep_queued = false;
                } else {
                    state.flush_queued = false;
                }
                let plan = plan(&mut state.tags, sweep);
                if !state.sweep_queued && state.tags.values().any(Option::is_some) {
                    state.sweep_queued = true;
                    tokio::spawn(self.clone().flush(true));
                }
                plan
            };
            self.send(plan).await;
        })
    }

    async fn send(&self, plan: Plan<Reply>) {
        for (tag, reply) in plan.requeue {
            let sent = self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    },
                )
                .await;
            let _ = reply.send(sent.map_err(|e| format!("basic.nack: {e}")));
        }
        if let Some(&(last, _)) = plan.prefix.last() {
            let multiple = plan.prefix.len() > 1;
            let sent = self
                .channel
                .basic_ack(last, BasicAckOptions { multiple })
                .await
                .map_err(|e| format!("basic.ack: {e}"));
            metrics::histogram!("wharf_amqp_acks_per_frame").record(plan.prefix.len() as f64);
            for (_, reply) in plan.prefix {
                let _ = reply.send(sent.clone());
            }
        }
        for (tag, reply) in plan.single {
            let sent = self.channel.basic_ack(tag, BasicAckOptions::default()).await;
            metrics::histogram!("wharf_amqp_acks_per_frame").record(1.0);
            let _ = reply.send(sent.map_err(|e| format!("basic.ack: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(slots: &[(u64, Option<Decision>)]) -> BTreeMap<u64, Option<(Decision, ())>> {
        slots.iter().map(|&(t, d)| (t, d.map(|d| (d, ())))).collect()
    }

    fn only_tags(v: &[(u64, ())]) -> Vec<u64> {
        v.iter().map(|(t, _)| *t).collect()
    }

    use Decision::{Ack, Requeue};

    #[test]
    fn in_order_completions_fold_into_one_multiple_ack() {
        let mut t = tags(&[(1, Some(Ack)), (2, Some(Ack)), (3, Some(Ack))]);
        let p = plan(&mut t, false);
        assert_eq!(only_tags(&p.prefix), [1, 2, 3]);
        assert!(p.single.is_empty() && p.requeue.is_empty() && t.is_empty());
    }

    #[test]
    fn a_held_tag_bars_multiple_past_it_and_the_acks_behind_it_wait() {
        let mut t = tags(&[(1, Some(Ack)), (2, None), (3, Some(Ack)), (4, Some(Ack))]);
        let p = plan(&mut t, false);
        assert_eq!(only_tags(&p.prefix), [1]);
        assert!(p.single.is_empty() && p.requeue.is_empty());
        assert_eq!(
            t.keys().copied().collect::<Vec<_>>(),
            [2, 3, 4],
            "held, and waiting behind it"
        );
        assert!(t[&2].is_none() && t[&3].is_some() && t[&4].is_some());
    }

    #[test]
    fn once_the_held_tag_is_decided_the_waiting_acks_join_its_multiple() {
        let mut t = tags(&[(2, None), (3, Some(Ack)), (4, Some(Ack)), (6, None)]);
        assert_eq!(plan(&mut t, false), Plan::default());
        t.insert(2, Some((Ack, ())));
        let p = plan(&mut t, false);
        assert_eq!(only_tags(&p.prefix), [2, 3, 4]);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn a_sweep_sends_the_acks_behind_a_held_tag_singly() {
        // A slow message never holds finished ones back for longer than
        // the sweep takes to come.
        let mut t = tags(&[(1, Some(Ack)), (2, None), (3, Some(Ack)), (4, Some(Ack))]);
        let p = plan(&mut t, true);
        assert_eq!(only_tags(&p.prefix), [1]);
        assert_eq!(only_tags(&p.single), [3, 4]);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [2], "the held tag stays held");
    }

    #[test]
    fn requeues_go_first_and_do_not_break_the_prefix() {
        // The nack for 2 is written before the multiple ack for 3, on the
        // same channel, so the ack cannot cover it.
        let mut t = tags(&[
            (1, Some(Ack)),
            (2, Some(Requeue)),
            (3, Some(Ack)),
            (5, None),
            (6, Some(Requeue)),
        ]);
        let p = plan(&mut t, false);
        assert_eq!(only_tags(&p.requeue), [2, 6]);
        assert_eq!(only_tags(&p.prefix), [1, 3]);
        assert!(p.single.is_empty());
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn nothing_decided_sends_nothing() {
        let mut t = tags(&[(7, None), (8, None)]);
        assert_eq!(plan(&mut t, false), Plan::default());
        assert_eq!(plan(&mut t, true), Plan::default());
        assert_eq!(t.len(), 2);
    }
}
