//! Worker health: workers that hang, leak or age are replaced without
//! waiting for them to exit.
//!
//! - **Watchdog** (`watchdog`): a ready worker that has not sent a
//!   heartbeat for that long is *hung*. It stops counting as capacity, its
//!   slot gets a replacement at once, and once the replacement is READY (or
//!   `ready_timeout` has passed) the hung worker gets the diagnostic signal
//!   (`watchdog_signal`: most runtimes dump their stacks), then SIGKILL
//!   after [`Timing::watchdog_grace`].
//! - **Recycling** (`max_memory`, `max_requests`, `max_age`): the worker is
//!   replaced the way a rolling restart replaces one: a new instance is
//!   started beside it, and the old one drains once the new one is READY.
//!   Recycles wait in a queue and run one at a time, never during a rolling
//!   restart (which replaces every worker anyway). The request and age
//!   limits carry a jitter of up to a tenth, fixed per instance, so workers
//!   started together do not all recycle together.
//! - **Crash loops** (`crash_loop`): a slot whose crash streak reaches the
//!   limit puts the pool in a crash loop (for `/healthz`), and with
//!   `on_crash_loop = exit` clusterd stops, exiting 1, so that an
//!   orchestrator takes over.

use std::fmt;
use std::time::{Duration, Instant};

use super::rollout::Kind;
use super::{
    Action, Exit, Instance, InstanceId, KillReason, Notice, SlotId, State, Supervisor, human,
};

/// Why a worker is replaced while it still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reason {
    /// Silent for longer than `watchdog` (or it sent `WATCHDOG=trigger`).
    Watchdog,
    /// Its memory was above `max_memory`.
    Memory { bytes: u64, limit: u64 },
    /// It served `max_requests` (with its jitter).
    MaxRequests { requests: u64 },
    /// It lived `max_age` (with its jitter).
    MaxAge,
}

impl Reason {
    /// The label of logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Watchdog => "watchdog",
            Reason::Memory { .. } => "max_memory",
            Reason::MaxRequests { .. } => "max_requests",
            Reason::MaxAge => "max_age",
        }
    }

    /// Every reason's label, for the metrics.
    pub const ALL: [&'static str; 4] = ["watchdog", "max_memory", "max_requests", "max_age"];
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Watchdog => write!(f, "watchdog"),
            Reason::Memory { bytes, limit } => {
                write!(f, "max_memory ({} MiB of {} MiB)", bytes >> 20, limit >> 20)
            }
            Reason::MaxRequests { requests } => write!(f, "max_requests ({requests} served)"),
            Reason::MaxAge => write!(f, "max_age"),
        }
    }
}

/// Up to a tenth more than `base`, the same for the same instance: spreads
/// the recycles of workers started together.
pub fn jittered(base: u64, instance: InstanceId) -> u64 {
    // SplitMix64 of the instance number: cheap, and no clock or RNG state.
    let mut z = instance.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    base.saturating_add((u128::from(base) * u128::from(z % 1000) / 10_000) as u64)
}

impl Supervisor {
    /// The worker is alive (a watchdog heartbeat: `WATCHDOG=1`, or the
    /// library's, or the Node adapter's).
    pub fn heartbeat(&mut self, now: Instant, id: InstanceId) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.heartbeat = Some(now);
        }
    }

    /// What a worker says about itself (`None` or empty: nothing to say),
    /// kept for the reason of a restart it fails.
    pub fn noted(&mut self, id: InstanceId, note: Option<String>) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.note = note.filter(|n| !n.is_empty());
        }
    }

    /// The worker asked to be treated as hung (`WATCHDOG=trigger`).
    pub fn watchdog_triggered(&mut self, now: Instant, id: InstanceId) {
        if self.instances.get(&id).is_some_and(|i| i.live()) {
            self.hung(now, id, Duration::ZERO);
        }
    }

    /// The worker uses more memory than `max_memory` (the daemon measures
    /// it): queue its recycle.
    pub fn memory_exceeded(&mut self, now: Instant, id: InstanceId, bytes: u64, limit: u64) {
        self.queue_recycle(now, id, Reason::Memory { bytes, limit });
    }

    /// When a ready worker's watchdog runs out, if it has one.
    fn watchdog_due(&self, inst: &Instance) -> Option<Instant> {
        let watchdog = self.timing.watchdog?;
        if inst.state != State::Ready || !inst.live() {
            return None;
        }
        Some(inst.heartbeat.or(inst.ready_at)? + watchdog)
    }

    /// When a ready worker reaches `max_age` (with its jitter).
    fn max_age_due(&self, inst: &Instance) -> Option<Instant> {
        let age = self.timing.max_age?;
        if inst.state != State::Ready || !inst.live() || inst.recycling {
            return None;
        }
        let ms = jittered(age.as_millis() as u64, inst.id);
        Some(inst.started + Duration::from_millis(ms))
    }

    /// The earliest health deadline: a watchdog or an age.
    pub(super) fn health_deadline(&self) -> Option<Instant> {
        self.instances
            .values()
            .flat_map(|i| [self.watchdog_due(i), self.max_age_due(i)])
            .flatten()
            .min()
    }

    /// Time has passed: watchdogs and ages.
    pub(super) fn tick_health(&mut self, now: Instant) {
        let silent: Vec<(InstanceId, Duration)> = self
            .instances
            .values()
            .filter_map(|i| {
                let due = self.watchdog_due(i)?;
                let since = i.heartbeat.or(i.ready_at)?;
                (due <= now).then(|| (i.id, now - since))
            })
            .collect();
        for (id, silent) in silent {
            self.hung(now, id, silent);
        }
        let old: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| self.max_age_due(i).is_some_and(|t| t <= now))
            .map(|i| i.id)
            .collect();
        for id in old {
            self.queue_recycle(now, id, Reason::MaxAge);
        }
        self.next_recycle(now);
    }

    /// The worker reported its requests: at `max_requests`, queue its recycle.
    pub(super) fn check_requests(&mut self, now: Instant, id: InstanceId) {
        let Some(max) = self.timing.max_requests else {
            return;
        };
        let Some(inst) = self.instances.get(&id) else {
            return;
        };
        let requests = inst.outcomes.requests;
        if requests >= jittered(max, id) {
            self.queue_recycle(now, id, Reason::MaxRequests { requests });
            self.next_recycle(now);
        }
    }

    /// `id` is hung: it no longer counts, its slot is respawned at once,
    /// and it gets the diagnostic signal once the replacement is READY (or
    /// after `ready_timeout`), then SIGKILL.
    fn hung(&mut self, now: Instant, id: InstanceId, silent: Duration) {
        let ready_timeout = self.timing.ready_timeout;
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        inst.hung = true;
        inst.deadline = Some(now + ready_timeout);
        let (slot_id, pid, generation) = (inst.slot, inst.pid, inst.generation);
        let never = inst.heartbeat.is_none();
        self.notice(Notice::Hung {
            slot: slot_id,
            pid,
            silent,
            never,
        });
        self.replacements.push(Reason::Watchdog);
        if let Some(slot) = self.slots.get_mut(&slot_id) {
            slot.restarts += 1;
            slot.last_exit = Some(if silent.is_zero() {
                "watchdog (WATCHDOG=trigger)".into()
            } else {
                format!("watchdog: silent {}", human_ms(silent))
            });
            slot.respawn_at = Some(now);
        }
        let step = self.is_replacement(id);
        let new_generation = self.rollout.as_ref().is_some_and(|r| {
            r.kind == Kind::Restart && r.generation == generation && r.generation != r.previous
        });
        if step || new_generation {
            let reason = format!(
                "worker {slot_id} ({}) of generation {generation} hung: no watchdog heartbeat for {}",
                super::pid_text(pid),
                human_ms(silent)
            );
            self.rollout_failed(now, reason);
        }
        self.respawn_due(now);
    }

    /// A worker became READY: the hung workers of its slot get their
    /// diagnostic signal now.
    pub(super) fn signal_hung(&mut self, now: Instant, slot: SlotId) {
        let hung: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.slot == slot && i.hung && !i.signalled)
            .map(|i| i.id)
            .collect();
        for id in hung {
            self.diagnose(now, id);
        }
    }

    /// The diagnostic signal, then SIGKILL after the grace.
    fn diagnose(&mut self, now: Instant, id: InstanceId) {
        let grace = self.timing.watchdog_grace;
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.signalled = true;
            inst.deadline = Some(now + grace);
            self.actions.push(Action::Signal { instance: id });
        }
    }

    /// A hung instance's deadline passed: signal it if that has not been
    /// done (its replacement was not READY in time), else kill it.
    pub(super) fn hung_deadline(&mut self, now: Instant, id: InstanceId) {
        match self.instances.get(&id) {
            Some(inst) if !inst.signalled => self.diagnose(now, id),
            Some(_) => self.kill(id, KillReason::Watchdog),
            None => {}
        }
    }

    /// Queues the recycle of `id` for `reason` (once per instance).
    fn queue_recycle(&mut self, now: Instant, id: InstanceId, reason: Reason) {
        if self.stopping.is_some() {
            return;
        }
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        if inst.recycling || !inst.live() || inst.state != State::Ready {
            return;
        }
        inst.recycling = true;
        let (slot, pid) = (inst.slot, inst.pid);
        self.recycles.push_back((id, reason));
        self.notice(Notice::RecycleQueued { slot, pid, reason });
        self.next_recycle(now);
    }

    /// Starts the next queued recycle when no rollout runs.
    pub(super) fn next_recycle(&mut self, now: Instant) {
        while self.rollout.is_none() && self.stopping.is_none() {
            let Some((id, reason)) = self.recycles.pop_front() else {
                return;
            };
            let Some(inst) = self.instances.get(&id).filter(|i| i.live()) else {
                continue; // gone, draining or hung meanwhile
            };
            let (slot, generation) = (inst.slot, inst.generation);
            self.replacements.push(reason);
            self.begin_recycle(now, slot, generation, reason);
        }
    }

    /// The recycles waiting, for status.
    pub fn recycles_queued(&self) -> usize {
        self.recycles.len()
    }

    /// Replacements made for health so far, by reason (each counted once,
    /// when it begins), for the metrics; taken, so each is counted once.
    pub fn take_replacements(&mut self) -> Vec<Reason> {
        std::mem::take(&mut self.replacements)
    }

    /// A crash of `slot`'s worker made its streak `streak`: at the
    /// `crash_loop` limit the pool is in a crash loop; with
    /// `on_crash_loop = exit` clusterd stops and exits 1.
    pub(super) fn check_crash_loop(
        &mut self,
        now: Instant,
        slot: SlotId,
        streak: u32,
        exit: &Exit,
    ) {
        let Some(limit) = self.timing.crash_loop else {
            return;
        };
        if streak < limit {
            return;
        }
        let give_up = self.timing.exit_on_crash_loop && self.stopping.is_none();
        self.notice(Notice::CrashLoop {
            slot,
            streak,
            last: exit.to_string(),
            exiting: give_up,
        });
        if give_up {
            self.stop_code = 1;
            self.stop(now, false);
        }
    }

    /// The slot in a crash loop, if any: its crash streak is at the
    /// `crash_loop` limit and it has no worker that has been ready for
    /// `min_uptime`.
    pub fn crash_loop(&self, now: Instant) -> Option<(SlotId, u32)> {
        let limit = self.timing.crash_loop?;
        let min_uptime = self.timing.min_uptime;
        self.slots
            .values()
            .filter(|s| s.streak >= limit)
            .find(|s| {
                !self.instances.values().any(|i| {
                    i.slot == s.id
                        && i.state == State::Ready
                        && i.live()
                        && i.ready_at
                            .is_some_and(|t| now.saturating_duration_since(t) >= min_uptime)
                })
            })
            .map(|s| (s.id, s.streak))
    }
}

/// `1.5s`, `10s`: a measured span, to the millisecond.
fn human_ms(d: Duration) -> String {
    human(Duration::from_millis(d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth_and_spreads() {
        let values: Vec<u64> = (0..200).map(|i| jittered(1000, InstanceId(i))).collect();
        assert!(values.iter().all(|&v| (1000..=1100).contains(&v)));
        let mut distinct = values.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 50, "{distinct:?}");
        assert_eq!(jittered(1000, InstanceId(7)), jittered(1000, InstanceId(7)));
        assert_eq!(jittered(u64::MAX, InstanceId(3)), u64::MAX, "no overflow");
    }
}
