//! Rollouts: moving slots to a generation one at a time.
//!
//! One mechanism serves three operations:
//!
//! - a **restart** moves every slot to a new generation. Its first
//!   replacement is the canary and, like its last, must stay up `bake` after
//!   READY while the instance it replaces keeps serving (the pool is one
//!   above its count meanwhile); the others drain what they replace as soon
//!   as they are READY;
//! - the **restart of one worker** replaces one slot with the same
//!   generation, READY-gated and baked;
//! - a **rollback** moves every slot that left the previous generation back
//!   to it, READY-gated, without a bake (that generation was serving).
//!
//! A restart fails when a replacement exits or misses `ready_timeout`, or
//! when a worker of the new generation exits before the restart is done.
//! If no worker of the new generation had become READY, the restart is
//! simply aborted; otherwise it turns into a rollback. After a restart has
//! finished, its generation is watched for `rollback_window`: a second
//! crash of its workers in that time rolls it back too, once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{
    HealthReason, InstanceId, KillReason, Notice, Outcomes, SlotId, State, Supervisor, human,
    pid_text,
};

/// Crashes of a just-restarted generation's workers, within
/// `rollback_window`, that roll it back.
pub const ROLLBACK_CRASHES: u32 = 2;

/// A baking replacement fails when, over its bake, it answered at least
/// this many requests...
pub const BAKE_MIN_REQUESTS: u64 = 20;
/// ...and at least this share of them failed...
pub const BAKE_MAX_FAILED: f64 = 0.10;
/// ...and this many times the share of the workers it replaces (over the
/// same time).
pub const BAKE_FAILED_FACTOR: f64 = 10.0;

/// What the pool is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// A rolling restart (or one worker's restart) is replacing workers.
    Restarting,
    /// A replacement is READY and must stay up `bake` before the restart
    /// goes on.
    Baking,
    /// Slots go back to the last stable generation.
    RollingBack,
    /// `shutdown_delay`: serving while `/healthz` fails, before stopping.
    LameDuck,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Restarting => "restarting",
            Phase::Baking => "baking",
            Phase::RollingBack => "rolling_back",
            Phase::LameDuck => "lame_duck",
            Phase::Stopping => "stopping",
        }
    }

    /// Every phase, for the metrics.
    pub const ALL: [Phase; 6] = [
        Phase::Running,
        Phase::Restarting,
        Phase::Baking,
        Phase::RollingBack,
        Phase::LameDuck,
        Phase::Stopping,
    ];
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Done,
    /// Failed before any worker of the new generation served.
    Aborted,
    /// Failed after some had: the pool went back to the previous generation.
    RolledBack,
    /// A rollback that could not finish (its replacements failed too).
    RollbackFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Aborted => "aborted",
            Outcome::RolledBack => "rolled_back",
            Outcome::RollbackFailed => "rollback_failed",
        }
    }
}

/// The last rollout's result, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRestart {
    pub outcome: Outcome,
    /// The generation the pool serves after it.
    pub generation: u64,
    /// Why it did not finish.
    pub reason: Option<String>,
    pub at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Kind {
    Restart,
    /// One slot, same generation.
    Worker(SlotId),
    Rollback {
        /// The generation that failed.
        from: u64,
        reason: String,
        /// How many slots it had replaced.
        replaced: u32,
        after_restart: bool,
    },
    /// A worker replaced for its health (memory, requests, age, watchdog):
    /// READY-gated, not baked.
    Recycle {
        slot: SlotId,
        reason: HealthReason,
    },
}

impl Kind {
    /// The one worker a `Worker` rollout restarts.
    pub fn worker(&self) -> Option<SlotId> {
        match self {
            Kind::Worker(slot) => Some(*slot),
            _ => None,
        }
    }
}

/// A rollout in progress.
#[derive(Debug, Clone)]
pub(super) struct Rollout {
    pub kind: Kind,
    /// Where the slots go.
    pub generation: u64,
    /// Where they go back to if this fails.
    pub previous: u64,
    pub pending: VecDeque<SlotId>,
    pub total: u32,
    pub done: u32,
    pub started: Instant,
    pub step: Option<Step>,
    /// A worker of the new generation has been READY: failing now means
    /// rolling back, not only aborting.
    pub served: bool,
    /// The pids of the last step: the worker replaced and its replacement.
    pub pids: (Option<u32>, Option<u32>),
}

/// The replacement being started (and perhaps baked) in one slot.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub slot: SlotId,
    pub instance: InstanceId,
    pub spawned: Instant,
    pub ready_at: Option<Instant>,
    /// Set at READY when this step bakes: the instance it replaces keeps
    /// serving until then.
    pub bake_until: Option<Instant>,
    /// At the start of the bake, what every live instance had reported:
    /// the baseline its failures are judged against.
    pub baseline: Vec<(InstanceId, Outcomes)>,
}

/// A finished restart's generation, on probation.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    pub generation: u64,
    pub previous: u64,
    pub until: Instant,
    pub crashes: u32,
}

impl Rollout {
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Restart => {
                let baking = match self.step.as_ref().filter(|s| s.bake_until.is_some()) {
                    Some(_) => format!(", {} baking", self.step_role()),
                    None => String::new(),
                };
                format!("restart {}/{}{baking}", self.done, self.total)
            }
            Kind::Worker(slot) => format!("restart of worker {slot}"),
            Kind::Recycle { slot, reason } => {
                format!("replacing worker {slot} ({})", reason.as_str())
            }
            Kind::Rollback { .. } => format!(
                "rollback {}/{} to generation {}",
                self.done, self.total, self.generation
            ),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.kind {
            Kind::Rollback { .. } => Phase::RollingBack,
            // A routine replacement: the pool is running.
            Kind::Recycle { .. } => Phase::Running,
            _ if self.bake_until().is_some() => Phase::Baking,
            _ => Phase::Restarting,
        }
    }

    pub fn bake_until(&self) -> Option<Instant> {
        self.step.as_ref().and_then(|s| s.bake_until)
    }

    /// What the current replacement is called in messages.
    pub fn step_role(&self) -> &'static str {
        match self.kind {
            Kind::Restart if self.done == 0 => "canary",
            _ => "replacement",
        }
    }

    /// Why another operation must wait.
    pub fn busy(&self) -> String {
        match &self.kind {
            Kind::Restart => format!(
                "a rolling restart is already in progress ({}/{} replaced)",
                self.done, self.total
            ),
            Kind::Worker(slot) => format!("a restart of worker {slot} is in progress"),
            Kind::Recycle { slot, reason } => format!(
                "worker {slot} is being replaced ({}); try again in a moment",
                reason.as_str()
            ),
            Kind::Rollback { .. } => format!(
                "a rollback to generation {} is in progress ({}/{})",
                self.generation, self.done, self.total
            ),
        }
    }
}

impl Supervisor {
    /// Begins a rolling restart to `generation` (which must be new).
    ///
    /// # Errors
    /// Refused, with the reason, while stopping or while a rollout runs.
    pub fn restart(&mut self, now: Instant, generation: u64) -> Result<(), String> {
        // A rolling restart replaces every worker: health recycles, queued
        // or running, give way to it.
        if self.stopping.is_none() {
            if let Some(Kind::Recycle { .. }) = self.rollout.as_ref().map(|r| &r.kind) {
                self.rollout_failed(now, "a rolling restart replaces every worker".into());
            }
            for (id, _) in std::mem::take(&mut self.recycles) {
                if let Some(inst) = self.instances.get_mut(&id) {
                    inst.recycling = false;
                }
            }
        }
        self.may_begin()?;
        let pending: VecDeque<SlotId> = self.slots.keys().copied().collect();
        self.watch = None;
        self.begin(now, Kind::Restart, generation, self.generation, pending);
        Ok(())
    }

    /// Replaces one worker with a new instance of its own generation,
    /// READY-gated and baked (a graceful recycle).
    ///
    /// # Errors
    /// Refused, with the reason, while stopping or while a rollout runs, or
    /// when the slot does not exist or has no ready worker.
    pub fn restart_worker(&mut self, now: Instant, slot: SlotId) -> Result<(), String> {
        self.may_begin()?;
        let Some(generation) = self.slots.get(&slot).map(|s| s.generation) else {
            return Err(format!(
                "there is no worker {slot} (the workers are 1 to {})",
                self.desired()
            ));
        };
        let ready = self
            .instances
            .values()
            .any(|i| i.slot == slot && i.state == State::Ready && i.live());
        if !ready {
            return Err(format!(
                "worker {slot} is not ready: it is being replaced already (see status)"
            ));
        }
        self.begin(
            now,
            Kind::Worker(slot),
            generation,
            generation,
            VecDeque::from([slot]),
        );
        Ok(())
    }

    /// Replaces `slot`'s worker for its health, READY-gated (the queue in
    /// [`super::health`] calls this when no rollout runs).
    pub(super) fn begin_recycle(
        &mut self,
        now: Instant,
        slot: SlotId,
        generation: u64,
        reason: HealthReason,
    ) {
        self.begin(
            now,
            Kind::Recycle { slot, reason },
            generation,
            generation,
            VecDeque::from([slot]),
        );
    }

    fn may_begin(&self) -> Result<(), String> {
        if self.is_stopping() {
            return Err("clusterd is stopping".into());
        }
        match &self.rollout {
            Some(r) => Err(r.busy()),
            None => Ok(()),
        }
    }

    fn begin(
        &mut self,
        now: Instant,
        kind: Kind,
        generation: u64,
        previous: u64,
        pending: VecDeque<SlotId>,
    ) {
        let total = pending.len() as u32;
        let worker = kind.worker();
        let quiet = matches!(kind, Kind::Rollback { .. } | Kind::Recycle { .. });
        if !matches!(kind, Kind::Recycle { .. }) {
            // A restart or a rollback ends with "every worker is ready
            // again" (AllReady), whatever the pool's size: with one worker,
            // no exit during the restart would have marked the pool as not
            // all ready.
            self.all_ready = false;
        }
        self.rollout = Some(Rollout {
            kind,
            generation,
            previous,
            pending,
            total,
            done: 0,
            started: now,
            step: None,
            served: false,
            pids: (None, None),
        });
        if !quiet {
            self.notice(Notice::RestartBegun {
                generation,
                total,
                worker,
            });
        }
        self.advance(now);
    }

    /// Whether `id` is the replacement the rollout is starting or baking.
    pub(super) fn is_replacement(&self, id: InstanceId) -> bool {
        self.rollout
            .as_ref()
            .and_then(|r| r.step.as_ref())
            .is_some_and(|s| s.instance == id)
    }

    /// Whether the unexpected exit of `inst` fails the rollout: a worker of
    /// the generation a restart is bringing.
    pub(super) fn fails_rollout(&self, inst: &super::Instance) -> bool {
        self.rollout
            .as_ref()
            .is_some_and(|r| r.kind == Kind::Restart && inst.generation == r.generation)
    }

    /// Starts the next replacement, or finishes the rollout.
    fn advance(&mut self, now: Instant) {
        let Some(rollout) = self.rollout.as_ref() else {
            return;
        };
        if rollout.step.is_some() {
            return;
        }
        let (generation, rollback) = (
            rollout.generation,
            matches!(rollout.kind, Kind::Rollback { .. }),
        );
        loop {
            let rollout = self.rollout.as_mut().expect("checked above");
            let Some(slot) = rollout.pending.pop_front() else {
                break;
            };
            // A rollback skips a slot that came back by itself (a crashed
            // worker respawns with the slot's generation).
            let skip = !self.slots.contains_key(&slot)
                || (rollback && !self.runs_other_than(slot, generation));
            if skip {
                continue;
            }
            let id = self.spawn(now, slot, generation);
            let rollout = self.rollout.as_mut().expect("checked above");
            rollout.step = Some(Step {
                slot,
                instance: id,
                spawned: now,
                ready_at: None,
                bake_until: None,
                baseline: Vec::new(),
            });
            return;
        }
        let rollout = self.rollout.take().expect("checked above");
        let took = now - rollout.started;
        self.finish(now, rollout, took);
        self.next_recycle(now);
    }

    /// Reports a rollout that has moved every slot it had to.
    fn finish(&mut self, now: Instant, rollout: Rollout, took: Duration) {
        match rollout.kind {
            Kind::Recycle { slot, reason } => {
                let (old_pid, new_pid) = rollout.pids;
                self.notice(Notice::Recycled {
                    slot,
                    reason,
                    old_pid,
                    new_pid,
                    took,
                });
            }
            Kind::Restart | Kind::Worker(_) => {
                if rollout.kind == Kind::Restart {
                    self.generation = rollout.generation;
                    if self.timing.rollback_window > Duration::ZERO {
                        self.watch = Some(Watch {
                            generation: rollout.generation,
                            previous: rollout.previous,
                            until: now + self.timing.rollback_window,
                            crashes: 0,
                        });
                    }
                }
                self.finished(now, Outcome::Done, rollout.generation, None);
                self.notice(Notice::RestartDone {
                    generation: rollout.generation,
                    replaced: rollout.done,
                    took,
                    worker: rollout.kind.worker(),
                });
            }
            Kind::Rollback {
                from,
                reason,
                replaced,
                after_restart,
            } => {
                self.finished(now, Outcome::RolledBack, rollout.generation, Some(&reason));
                self.notice(Notice::RolledBack {
                    from,
                    to: rollout.generation,
                    reason,
                    replaced,
                    restored: rollout.done,
                    total: rollout.total,
                    took,
                    complete: true,
                    after_restart,
                });
            }
        }
    }

    fn finished(&mut self, now: Instant, outcome: Outcome, generation: u64, reason: Option<&str>) {
        self.last_restart = Some(LastRestart {
            outcome,
            generation,
            reason: reason.map(str::to_string),
            at: now,
        });
    }

    /// Whether `slot` has a live instance of another generation than `generation`.
    fn runs_other_than(&self, slot: SlotId, generation: u64) -> bool {
        self.instances
            .values()
            .any(|i| i.slot == slot && i.live() && i.generation != generation)
    }

    /// The current replacement reported READY: bake it, or take the slot.
    pub(super) fn step_ready(&mut self, now: Instant) {
        let bake = self.timing.bake;
        let rollout = self.rollout.as_mut().expect("a replacement has a rollout");
        let last = rollout.pending.is_empty();
        let role = match rollout.kind {
            Kind::Restart if rollout.done == 0 => Some("canary"),
            Kind::Restart if last => Some("last"),
            Kind::Worker(_) => Some("worker"),
            _ => None,
        };
        if rollout.kind == Kind::Restart {
            rollout.served = true;
        }
        let step = rollout.step.as_mut().expect("a replacement has a step");
        step.ready_at = Some(now);
        step.baseline = self
            .instances
            .values()
            .filter(|i| i.live())
            .map(|i| (i.id, i.outcomes))
            .collect();
        match role.filter(|_| bake > Duration::ZERO) {
            Some(role) => {
                step.bake_until = Some(now + bake);
                let (slot, id, generation) = (step.slot, step.instance, rollout.generation);
                let pid = self.instances.get(&id).and_then(|i| i.pid);
                self.notice(Notice::Baking {
                    slot,
                    pid,
                    generation,
                    bake,
                    role,
                });
            }
            None => self.take_slot(now),
        }
    }

    /// Bakes that are over let the rollout go on, unless the baked
    /// replacement failed too many of its requests.
    pub(super) fn tick_rollout(&mut self, now: Instant) {
        if self
            .rollout
            .as_ref()
            .and_then(Rollout::bake_until)
            .is_some_and(|t| t <= now)
        {
            match self.bake_failures() {
                Some(reason) => self.rollout_failed(now, reason),
                None => self.take_slot(now),
            }
        }
        if self.watch.as_ref().is_some_and(|w| w.until <= now) {
            self.watch = None;
        }
    }

    /// Why the baked replacement failed its bake on errors, if it did: it
    /// answered at least [`BAKE_MIN_REQUESTS`], at least
    /// [`BAKE_MAX_FAILED`] of them failed, and that share is
    /// [`BAKE_FAILED_FACTOR`] times the one of the workers of the previous
    /// generation over the same time. Workers that report no failures are
    /// never judged so.
    fn bake_failures(&self) -> Option<String> {
        let rollout = self.rollout.as_ref()?;
        let step = rollout.step.as_ref()?;
        let base = |id: InstanceId| {
            step.baseline
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(Outcomes::default(), |(_, o)| *o)
        };
        let canary = self.instances.get(&step.instance)?;
        let new = canary.outcomes.since(base(canary.id));
        let old = self
            .instances
            .values()
            .filter(|i| i.id != canary.id && i.live())
            .filter(|i| rollout.kind.worker().is_some() || i.generation != rollout.generation)
            .map(|i| i.outcomes.since(base(i.id)))
            .fold(Outcomes::default(), |a, o| Outcomes {
                requests: a.requests + o.requests,
                failed: a.failed + o.failed,
            });
        let share = |o: Outcomes| o.failed as f64 / o.requests.max(1) as f64;
        let (new_share, old_share) = (share(new), share(old));
        let failed = new.requests >= BAKE_MIN_REQUESTS
            && new_share >= BAKE_MAX_FAILED
            && new_share >= BAKE_FAILED_FACTOR * old_share;
        failed.then(|| {
            format!(
                "the {} for worker {} ({}) failed {} of its {} requests during its bake ({:.0}%; the workers it replaces {:.1}%)",
                rollout.step_role(),
                step.slot,
                pid_text(canary.pid),
                new.failed,
                new.requests,
                new_share * 100.0,
                old_share * 100.0
            )
        })
    }

    /// The replacement has proved itself: drain what it replaces, give the
    /// slot its generation, go on to the next.
    fn take_slot(&mut self, now: Instant) {
        let rollout = self.rollout.as_mut().expect("a step has a rollout");
        let step = rollout.step.take().expect("a step");
        let generation = rollout.generation;
        rollout.done += 1;
        let (done, total) = (rollout.done, rollout.total);
        let old: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.slot == step.slot && i.id != step.instance && i.live())
            .map(|i| i.id)
            .collect();
        let old_pid = old.iter().find_map(|o| self.instances[o].pid);
        for o in old {
            self.drain(now, o);
        }
        if let Some(slot) = self.slots.get_mut(&step.slot) {
            slot.generation = generation;
            slot.streak = 0;
        }
        let new_pid = self.instances.get(&step.instance).and_then(|i| i.pid);
        if let Some(rollout) = self.rollout.as_mut() {
            rollout.pids = (old_pid, new_pid);
        }
        let ready_at = step.ready_at.unwrap_or(now);
        self.notice(Notice::RestartProgress {
            slot: step.slot,
            done,
            total,
            old_pid,
            new_pid,
            took: ready_at - step.spawned,
        });
        self.advance(now);
    }

    /// The rollout cannot go on, for `reason`: abort it, or roll back what
    /// the new generation took.
    pub(super) fn rollout_failed(&mut self, now: Instant, reason: String) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        if let Some(step) = &rollout.step {
            // A replacement that is serving (baking) drains like any other
            // worker; one that never became ready is removed.
            match self.instances.get(&step.instance).map(|i| i.state) {
                Some(State::Ready) => self.drain(now, step.instance),
                Some(State::Starting) => self.kill(step.instance, KillReason::Aborted),
                _ => {}
            }
        }
        match rollout.kind {
            Kind::Restart if rollout.served && self.stopping.is_none() => {
                self.rollback(now, rollout.generation, rollout.previous, reason, false);
            }
            Kind::Rollback {
                from,
                reason: first,
                replaced,
                after_restart,
            } => {
                let reason = if self.stopping.is_some() {
                    format!("{first}; the rollback was cut short: {reason}")
                } else {
                    format!("{first}; then the rollback failed: {reason}")
                };
                self.finished(
                    now,
                    Outcome::RollbackFailed,
                    rollout.generation,
                    Some(&reason),
                );
                self.notice(Notice::RolledBack {
                    from,
                    to: rollout.generation,
                    reason,
                    replaced,
                    restored: rollout.done,
                    total: rollout.total,
                    took: now - rollout.started,
                    complete: false,
                    after_restart,
                });
            }
            Kind::Recycle { slot, reason: why } => {
                // The worker serves on; it is not recycled again (it would
                // fail the same way), so it serves until it exits.
                self.notice(Notice::RecycleFailed {
                    slot,
                    reason: why,
                    why: reason,
                });
            }
            _ => {
                let serving = match rollout.kind {
                    Kind::Restart => rollout.previous,
                    _ => rollout.generation,
                };
                self.finished(now, Outcome::Aborted, serving, Some(&reason));
                self.notice(Notice::RestartAborted {
                    generation: rollout.generation,
                    reason,
                    replaced: rollout.done,
                    total: rollout.total,
                    worker: rollout.kind.worker(),
                });
            }
        }
    }

    /// Sends every slot that left generation `to` back to it: at once for
    /// slots with no live worker (their respawn is due now), READY-gated
    /// for the others.
    fn rollback(&mut self, now: Instant, from: u64, to: u64, reason: String, after_restart: bool) {
        self.watch = None;
        self.generation = to;
        let mut replaced = 0;
        let live = self.live_slots();
        for slot in self.slots.values_mut() {
            if slot.generation == from {
                replaced += 1;
                slot.generation = to;
                // The failed generation's crashes do not delay the good one.
                slot.streak = 0;
                if !live.contains(&slot.id) && slot.respawn_at.is_some() {
                    slot.respawn_at = Some(now);
                }
            }
        }
        let pending: VecDeque<SlotId> = self
            .slots
            .keys()
            .copied()
            .filter(|&s| self.runs_other_than(s, to))
            .collect();
        self.notice(Notice::RollbackBegun {
            from,
            to,
            reason: reason.clone(),
            slots: pending.len() as u32,
            after_restart,
        });
        self.begin(
            now,
            Kind::Rollback {
                from,
                reason,
                replaced,
                after_restart,
            },
            to,
            to,
            pending,
        );
    }

    /// A worker crashed outside a rollout: if its generation is on
    /// probation after its restart, count it, and roll back at the limit.
    pub(super) fn watch_crash(&mut self, now: Instant, inst: &super::Instance, exit: &super::Exit) {
        if self.rollout.is_some() || self.stopping.is_some() {
            return;
        }
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        if watch.until <= now {
            self.watch = None;
            return;
        }
        if inst.generation != watch.generation {
            return;
        }
        watch.crashes += 1;
        if watch.crashes < ROLLBACK_CRASHES {
            return;
        }
        let (from, to) = (watch.generation, watch.previous);
        let reason = format!(
            "generation {from} failed {} times within {} of its restart (the last: worker {} ({}) ended with {exit} after {})",
            watch.crashes,
            human(self.timing.rollback_window),
            inst.slot,
            pid_text(inst.pid),
            super::seconds(now.saturating_duration_since(inst.started)),
        );
        self.rollback(now, from, to, reason, true);
    }
}
