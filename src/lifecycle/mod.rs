//! The supervisor as a pure state machine.
//!
//! The daemon feeds it what happened (a worker was spawned, reported READY,
//! exited; an operator asked for a restart; a deadline passed) together with
//! the current time, and carries out the [`Action`]s it returns: spawn, drain,
//! terminate, kill, log, exit. Nothing here reads a clock, touches a process or
//! does I/O, so every behaviour (crash backoff, rolling restart and its abort,
//! scaling, stop) is unit-tested as a script of events.
//!
//! # Model
//!
//! - A **slot** is a numbered place in the pool, `1..=desired`. Its number is
//!   the worker id that operators, logs, metrics and `X-Worker` see; it is
//!   stable across crashes and restarts, so labels stay bounded.
//! - An **instance** is one process in a slot. A slot normally has one live
//!   instance; during a rolling restart it briefly has two (the replacement is
//!   surged above the count), and draining instances linger until they exit.
//! - A **generation** numbers the worker spec (program, env, …). Each rolling
//!   restart creates a new one; a slot respawns with its own generation, so a
//!   crash in an old worker during or after an aborted restart brings back the
//!   known-good program.
//!
//! - A **rollout** moves slots to a generation one at a time: a rolling
//!   restart (every slot to a new generation), the restart of one worker
//!   (one slot, same generation), and a rollback (every slot that left the
//!   last stable generation goes back to it). They share one path, in
//!   [`rollout`]: "go to generation G" is the only operation.
//!
//! # Guarantees kept here
//!
//! - A replacement must be READY before the instance it replaces is drained.
//!   The first and the last replacement of a restart (and a single worker's
//!   replacement) must then stay up for `bake` while the instance they
//!   replace keeps serving. If a replacement exits, misses `ready_timeout`,
//!   or a worker of the new generation fails before the restart is done,
//!   the restart aborts and every slot already replaced goes back to the
//!   previous generation, READY-gated as well.
//! - A generation that fails twice within `rollback_window` after its
//!   restart finished is rolled back the same way, once.
//! - A crashed instance is respawned at once the first time, then after
//!   `restart_delay`, doubling up to `restart_delay_max`, until an instance
//!   has lived `min_uptime`.
//! - A draining instance is killed at `drain_timeout`.

mod health;
mod rollout;
pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

pub use health::{Reason as HealthReason, jittered};
pub use rollout::{LastRestart, Outcome, Phase};
use rollout::{Rollout, Watch};

/// A worker id (slot number), `1..=desired`.
pub type SlotId = u32;

/// The most workers a pool may have.
pub const MAX_WORKERS: u32 = 1024;

/// Identifies one instance (process) for the daemon; never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct InstanceId(pub u64);

/// The time limits of the pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub restart_delay: Duration,
    pub restart_delay_max: Duration,
    pub min_uptime: Duration,
    /// Between SIGTERM and SIGKILL on a fast stop.
    pub fast_stop_grace: Duration,
    /// `ready_after`: a worker still running this long after its start
    /// counts as ready (for programs that cannot notify).
    pub ready_after: Option<Duration>,
    /// `bake`: how long a restart's canary and its last replacement must
    /// stay up after READY before the instance they replace is drained.
    pub bake: Duration,
    /// After a restart has finished, its generation is rolled back if it
    /// fails twice within this; zero turns it off (`rollback = off`).
    pub rollback_window: Duration,
    /// `watchdog`: a ready worker silent this long is hung.
    pub watchdog: Option<Duration>,
    /// Between a hung worker's diagnostic signal and its SIGKILL.
    pub watchdog_grace: Duration,
    /// `max_requests`: recycle a worker that served this many (plus jitter).
    pub max_requests: Option<u64>,
    /// `max_age`: recycle a worker that lived this long (plus jitter).
    pub max_age: Option<Duration>,
    /// `crash_loop`: the crash streak that is a crash loop.
    pub crash_loop: Option<u32>,
    /// `on_crash_loop = exit`.
    pub exit_on_crash_loop: bool,
}

impl Timing {
    /// The wait before respawning after the `streak`-th crash in a row
    /// (0-based): none for the first, then `restart_delay` doubling up to
    /// `restart_delay_max`.
    pub fn backoff(&self, streak: u32) -> Duration {
        if streak == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(streak - 1).unwrap_or(u32::MAX);
        self.restart_delay
            .saturating_mul(factor)
            .min(self.restart_delay_max)
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It could not be started (fork or exec failed).
    SpawnFailed(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "signal {s} ({name})"),
                None => write!(f, "signal {s}"),
            },
            Exit::SpawnFailed(why) => write!(f, "failed to start: {why}"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum State {
    /// Spawned, READY not yet reported.
    Starting,
    /// Serving.
    Ready,
    /// Told to drain (or to terminate, on a fast stop); waiting for it to exit.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }
}

/// Why clusterd sent SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KillReason {
    ReadyTimeout,
    DrainTimeout,
    /// A failed replacement is removed.
    Aborted,
    FastStop,
    /// A hung worker, after its diagnostic signal and grace.
    Watchdog,
}

impl KillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KillReason::ReadyTimeout => "ready_timeout",
            KillReason::DrainTimeout => "drain_timeout",
            KillReason::Aborted => "restart_aborted",
            KillReason::FastStop => "fast_stop",
            KillReason::Watchdog => "watchdog",
        }
    }
}

/// One process.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: InstanceId,
    pub slot: SlotId,
    pub generation: u64,
    /// Known once spawned.
    pub pid: Option<u32>,
    pub state: State,
    pub started: Instant,
    /// When it reported READY.
    pub ready_at: Option<Instant>,
    /// The ready or drain deadline, whichever applies.
    deadline: Option<Instant>,
    /// When it counts as ready without reporting it (`ready_after`).
    auto_ready: Option<Instant>,
    /// SIGKILL was sent.
    pub killed: Option<KillReason>,
    /// The worker reported DRAINED.
    pub drained: bool,
    /// Requests served and failed, as the worker last reported them.
    pub outcomes: Outcomes,
    /// The last watchdog heartbeat.
    pub heartbeat: Option<Instant>,
    /// Missed its watchdog: no longer counts, replaced, then killed.
    pub hung: bool,
    /// A hung instance got its diagnostic signal.
    pub signalled: bool,
    /// Queued or being recycled (never twice).
    pub recycling: bool,
    /// What the worker last said about itself (`protocol = node`: what the
    /// app waits for, or the error that stopped it); a restart that fails
    /// on this instance gives it in its reason.
    pub note: Option<String>,
}

/// What a worker reports of the requests it answered (native workers that
/// count failures: `Stats::count_failure` in `clusterd::worker`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcomes {
    pub requests: u64,
    pub failed: u64,
}

impl Outcomes {
    /// What happened between `earlier` and `self` (counters only grow).
    fn since(self, earlier: Outcomes) -> Outcomes {
        Outcomes {
            requests: self.requests.saturating_sub(earlier.requests),
            failed: self.failed.saturating_sub(earlier.failed),
        }
    }
}

impl Instance {
    /// Starting or Ready, and not being killed: counts towards the pool.
    fn live(&self) -> bool {
        self.state != State::Draining && self.killed.is_none() && !self.hung
    }
}

/// A place in the pool.
#[derive(Debug, Clone)]
pub struct Slot {
    pub id: SlotId,
    /// The generation this slot runs (and respawns with).
    pub generation: u64,
    /// Unexpected exits so far.
    pub restarts: u32,
    /// How the last unexpected exit ended.
    pub last_exit: Option<String>,
    /// Crashes in a row, each before `min_uptime`.
    streak: u32,
    /// When to respawn, after a crash.
    pub respawn_at: Option<Instant>,
}

/// What the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker process for `slot` running `generation`'s spec, then
    /// report [`Supervisor::spawned`] or [`Supervisor::spawn_failed`].
    Spawn {
        instance: InstanceId,
        slot: SlotId,
        generation: u64,
    },
    /// Ask the worker to drain (DRAIN message, or SIGTERM).
    Drain {
        instance: InstanceId,
        timeout: Duration,
    },
    /// SIGTERM (fast stop).
    Terminate { instance: InstanceId },
    /// The diagnostic signal (`watchdog_signal`) to a hung worker.
    Signal { instance: InstanceId },
    /// SIGKILL.
    Kill {
        instance: InstanceId,
        reason: KillReason,
    },
    /// Something to log (and to tell control clients).
    Notice(Notice),
    /// Every worker is gone after a stop: exit with this code.
    Exit { code: i32 },
}

/// Events worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready {
        slot: SlotId,
        pid: Option<u32>,
        generation: u64,
        took: Duration,
    },
    Exited {
        slot: SlotId,
        pid: Option<u32>,
        generation: u64,
        exit: Exit,
        expected: bool,
        uptime: Duration,
        /// Why clusterd killed it, if it did.
        killed: Option<KillReason>,
    },
    Backoff {
        slot: SlotId,
        delay: Duration,
        restarts: u32,
    },
    /// A restart's canary or last replacement is READY and must now stay
    /// up `bake` before the rollout goes on.
    Baking {
        slot: SlotId,
        pid: Option<u32>,
        generation: u64,
        bake: Duration,
        /// `canary` (the first replacement), `last`, or `worker` (the
        /// restart of one worker).
        role: &'static str,
    },
    /// Every slot has a ready worker again.
    AllReady {
        workers: u32,
        generation: u64,
    },
    RestartBegun {
        generation: u64,
        total: u32,
        /// `clusterctl restart --worker ID`: only this one.
        worker: Option<SlotId>,
    },
    RestartProgress {
        slot: SlotId,
        done: u32,
        total: u32,
        old_pid: Option<u32>,
        new_pid: Option<u32>,
        took: Duration,
    },
    RestartDone {
        generation: u64,
        replaced: u32,
        took: Duration,
        /// The restart of this one worker, not a rolling restart.
        worker: Option<SlotId>,
    },
    RestartAborted {
        generation: u64,
        reason: String,
        replaced: u32,
        total: u32,
        /// The restart of this one worker, not a rolling restart.
        worker: Option<SlotId>,
    },
    /// A generation failed after some of its workers had served: every slot
    /// it took goes back to `to`.
    RollbackBegun {
        from: u64,
        to: u64,
        reason: String,
        /// Slots to replace (READY-gated) with generation `to`.
        slots: u32,
        /// The restart had finished (the rollback is the automatic one).
        after_restart: bool,
    },
    /// The rollback ended: `complete` when every slot runs `to` again.
    RolledBack {
        from: u64,
        to: u64,
        reason: String,
        /// Slots the failed generation had replaced before it failed.
        replaced: u32,
        /// Slots replaced back (READY-gated) by the rollback.
        restored: u32,
        total: u32,
        took: Duration,
        complete: bool,
        after_restart: bool,
    },
    Scaled {
        from: u32,
        to: u32,
    },
    /// A worker missed its watchdog (`silent` zero: it asked to be).
    Hung {
        slot: SlotId,
        pid: Option<u32>,
        silent: Duration,
        /// It never sent a heartbeat at all.
        never: bool,
    },
    /// A worker will be replaced for `reason` (when no rollout runs).
    RecycleQueued {
        slot: SlotId,
        pid: Option<u32>,
        reason: HealthReason,
    },
    /// A worker was replaced for `reason`: its replacement is READY and it
    /// drains.
    Recycled {
        slot: SlotId,
        reason: HealthReason,
        old_pid: Option<u32>,
        new_pid: Option<u32>,
        took: Duration,
    },
    /// The replacement failed; the worker serves on and is not recycled
    /// again.
    RecycleFailed {
        slot: SlotId,
        reason: HealthReason,
        why: String,
    },
    /// A slot's crash streak reached `crash_loop`.
    CrashLoop {
        slot: SlotId,
        streak: u32,
        last: String,
        /// `on_crash_loop = exit`: clusterd stops.
        exiting: bool,
    },
    Stopping {
        fast: bool,
        workers: u32,
    },
    /// A graceful stop begins with `delay` of lame duck.
    LameDuck {
        delay: Duration,
    },
}

/// What the operator may ask to change the pool size to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    Exactly(u32),
    Up(u32),
    Down(u32),
}

/// The supervisor.
#[derive(Debug)]
pub struct Supervisor {
    timing: Timing,
    slots: BTreeMap<SlotId, Slot>,
    instances: BTreeMap<InstanceId, Instance>,
    next_instance: u64,
    /// The generation new slots get; becomes a restart's generation when it
    /// completes.
    generation: u64,
    rollout: Option<Rollout>,
    /// The generation a finished restart brought, watched for crashes
    /// during `rollback_window`.
    watch: Option<Watch>,
    /// How the last rollout ended, for status.
    last_restart: Option<LastRestart>,
    /// Health recycles waiting for their turn, oldest first.
    recycles: VecDeque<(InstanceId, HealthReason)>,
    /// Health replacements begun since the daemon last took them.
    replacements: Vec<HealthReason>,
    /// The exit code once stopped (1 after `on_crash_loop = exit`).
    stop_code: i32,
    /// The end of the lame-duck delay before a graceful stop.
    lame_duck: Option<Instant>,
    /// `Some(fast)` once stopping.
    stopping: Option<bool>,
    /// Fast stop: SIGKILL what is left at this time.
    stop_deadline: Option<Instant>,
    /// Whether the last check found every slot ready (to report changes).
    all_ready: bool,
    actions: Vec<Action>,
}

impl Supervisor {
    /// A pool of `desired` workers at `generation`; nothing runs until [`start`](Self::start).
    pub fn new(timing: Timing, desired: u32, generation: u64) -> Supervisor {
        let slots = (1..=desired.clamp(1, MAX_WORKERS))
            .map(|id| {
                let slot = Slot {
                    id,
                    generation,
                    restarts: 0,
                    last_exit: None,
                    streak: 0,
                    respawn_at: None,
                };
                (id, slot)
            })
            .collect();
        Supervisor {
            timing,
            slots,
            instances: BTreeMap::new(),
            next_instance: 1,
            generation,
            rollout: None,
            watch: None,
            last_restart: None,
            recycles: VecDeque::new(),
            replacements: Vec::new(),
            stop_code: 0,
            lame_duck: None,
            stopping: None,
            stop_deadline: None,
            all_ready: false,
            actions: Vec::new(),
        }
    }

    /// Starts every slot's first worker.
    pub fn start(&mut self, now: Instant) {
        let slots: Vec<(SlotId, u64)> = self.slots.values().map(|s| (s.id, s.generation)).collect();
        for (slot, generation) in slots {
            self.spawn(now, slot, generation);
        }
    }

    /// The actions decided since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Replaces the time limits (a reloaded config); running deadlines stay.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    // --- queries -----------------------------------------------------------

    pub fn desired(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Instances that are ready (not draining).
    pub fn ready(&self) -> u32 {
        self.instances
            .values()
            .filter(|i| i.state == State::Ready && i.live())
            .count() as u32
    }

    /// The generation new workers get.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.values()
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    pub fn instance(&self, id: InstanceId) -> Option<&Instance> {
        self.instances.get(&id)
    }

    /// Stopping, or serving out a lame-duck delay before it (`/healthz`
    /// says 503 for both).
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some() || self.lame_duck.is_some()
    }

    /// A graceful stop after `delay` of lame duck (`shutdown_delay`): the
    /// workers keep serving meanwhile (and crashed ones are still
    /// replaced) while `/healthz` fails, so that load balancers stop sending
    /// new connections first. A second request during the delay stops at
    /// once; a zero delay is [`stop`](Self::stop).
    pub fn stop_after(&mut self, now: Instant, delay: Duration) {
        if self.stopping.is_some() {
            return;
        }
        if self.lame_duck.is_some() || delay.is_zero() {
            self.lame_duck = None;
            return self.stop(now, false);
        }
        self.lame_duck = Some(now + delay);
        self.watch = None;
        if self.rollout.is_some() {
            self.rollout_failed(now, "clusterd is stopping".into());
        }
        self.notice(Notice::LameDuck { delay });
    }

    /// The operation in progress, for status: `restart 3/8`, `stopping`.
    pub fn operation(&self) -> Option<String> {
        if self.stopping.is_some() {
            return Some(format!("stopping ({} left)", self.instances.len()));
        }
        if self.lame_duck.is_some() {
            return Some("lame duck: serving, then stopping".into());
        }
        self.rollout.as_ref().map(Rollout::describe)
    }

    /// What the pool is doing, as one word for status and metrics.
    pub fn phase(&self) -> Phase {
        if self.stopping.is_some() {
            return Phase::Stopping;
        }
        if self.lame_duck.is_some() {
            return Phase::LameDuck;
        }
        self.rollout.as_ref().map_or(Phase::Running, Rollout::phase)
    }

    /// How the last rolling restart (or rollback) ended.
    pub fn last_restart(&self) -> Option<&LastRestart> {
        self.last_restart.as_ref()
    }

    /// Every generation some slot, instance or the rollout still refers to
    /// (the daemon keeps those specs and may forget the others).
    pub fn generations_in_use(&self) -> Vec<u64> {
        let mut gens: Vec<u64> = self
            .slots
            .values()
            .map(|s| s.generation)
            .chain(self.instances.values().map(|i| i.generation))
            .chain(self.rollout.iter().flat_map(|r| [r.generation, r.previous]))
            .chain(self.watch.iter().map(|w| w.previous))
            .chain([self.generation])
            .collect();
        gens.sort_unstable();
        gens.dedup();
        gens
    }

    /// The earliest time [`tick`](Self::tick) has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let instances = self
            .instances
            .values()
            .flat_map(|i| {
                [
                    i.deadline,
                    i.auto_ready
                        .filter(|_| i.state == State::Starting && i.killed.is_none()),
                ]
            })
            .flatten();
        let live = self.live_slots();
        // A slot with a live instance keeps its respawn pending (in case that
        // instance, a restart's replacement, fails) but has nothing to do yet.
        let respawns = self
            .slots
            .values()
            .filter(|s| !live.contains(&s.id))
            .filter_map(|s| s.respawn_at);
        let rollout = self.rollout.as_ref().and_then(Rollout::bake_until);
        let watch = self.watch.as_ref().map(|w| w.until);
        instances
            .chain(respawns)
            .chain(self.stop_deadline)
            .chain(rollout)
            .chain(watch)
            .chain(self.health_deadline())
            .chain(self.lame_duck)
            .min()
    }

    // --- events ------------------------------------------------------------

    /// The process for `id` was started as `pid`.
    pub fn spawned(&mut self, id: InstanceId, pid: u32) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.pid = Some(pid);
        }
    }

    /// The process for `id` could not be started: handled like an exit.
    pub fn spawn_failed(&mut self, now: Instant, id: InstanceId, why: String) {
        self.exited(now, id, Exit::SpawnFailed(why));
    }

    /// The worker reported READY. Returns false when the report was out of
    /// place (twice, or while draining) and so ignored.
    pub fn ready_reported(&mut self, now: Instant, id: InstanceId) -> bool {
        let Some(inst) = self.instances.get_mut(&id) else {
            return false;
        };
        if inst.state != State::Starting || inst.killed.is_some() {
            return false;
        }
        inst.state = State::Ready;
        inst.deadline = None;
        inst.ready_at = Some(now);
        let (slot_id, generation, pid, took) =
            (inst.slot, inst.generation, inst.pid, now - inst.started);
        self.notice(Notice::Ready {
            slot: slot_id,
            pid,
            generation,
            took,
        });
        if let Some(slot) = self.slots.get_mut(&slot_id) {
            slot.respawn_at = None;
        }

        self.signal_hung(now, slot_id);
        if self.is_replacement(id) {
            self.step_ready(now);
        }
        self.check_all_ready();
        true
    }

    /// The worker reported how many requests it served and how many of them
    /// failed (a baking replacement is judged on them).
    pub fn outcomes_reported(&mut self, now: Instant, id: InstanceId, outcomes: Outcomes) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.outcomes = outcomes;
            self.check_requests(now, id);
        }
    }

    /// `EXTEND_TIMEOUT_USEC`: a starting or draining worker asks for more
    /// time; its deadline becomes at least `now + by`.
    pub fn extend_deadline(&mut self, now: Instant, id: InstanceId, by: Duration) {
        if let Some(inst) = self.instances.get_mut(&id) {
            let waiting = matches!(inst.state, State::Starting | State::Draining);
            if waiting && inst.killed.is_none() && !inst.hung {
                inst.deadline = inst.deadline.map(|d| d.max(now + by));
            }
        }
    }

    /// The worker reported DRAINED. Returns false when it had not been asked
    /// to drain (the report is ignored).
    pub fn drained_reported(&mut self, id: InstanceId) -> bool {
        match self.instances.get_mut(&id) {
            Some(inst) if inst.state == State::Draining => {
                inst.drained = true;
                true
            }
            _ => false,
        }
    }

    /// The process for `id` exited (it has been reaped).
    pub fn exited(&mut self, now: Instant, id: InstanceId, exit: Exit) {
        let Some(inst) = self.instances.remove(&id) else {
            return;
        };
        let uptime = now.saturating_duration_since(inst.started);
        let expected = inst.state == State::Draining
            || inst.hung
            || self.stopping.is_some()
            || matches!(
                inst.killed,
                Some(KillReason::Aborted | KillReason::DrainTimeout)
            );
        self.notice(Notice::Exited {
            slot: inst.slot,
            pid: inst.pid,
            generation: inst.generation,
            exit: exit.clone(),
            expected,
            uptime,
            killed: inst.killed,
        });

        if self.stopping.is_some() {
            if self.instances.is_empty() {
                self.actions.push(Action::Exit {
                    code: self.stop_code,
                });
            }
            return;
        }

        if self.is_replacement(id) {
            let reason = format!(
                "the {} for worker {} ({}) ended with {exit} {}",
                self.rollout
                    .as_ref()
                    .map_or("replacement", Rollout::step_role),
                inst.slot,
                pid_text(inst.pid),
                since_ready(&inst, now)
            );
            self.rollout_failed(now, reason);
        } else if !expected {
            self.crashed(now, &inst, exit.clone());
            if self.fails_rollout(&inst) {
                let reason = format!(
                    "worker {} ({}) of generation {} ended with {exit} {}",
                    inst.slot,
                    pid_text(inst.pid),
                    inst.generation,
                    since_ready(&inst, now)
                );
                self.rollout_failed(now, reason);
            } else {
                self.watch_crash(now, &inst, &exit);
            }
        }
        self.respawn_due(now);
        self.check_all_ready();
    }

    /// Time has passed: enforce deadlines and respawn slots whose backoff ended.
    pub fn tick(&mut self, now: Instant) {
        let auto: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| {
                i.state == State::Starting
                    && i.killed.is_none()
                    && i.auto_ready.is_some_and(|t| t <= now)
            })
            .map(|i| i.id)
            .collect();
        for id in auto {
            self.ready_reported(now, id);
        }
        let due: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.deadline.is_some_and(|d| d <= now))
            .map(|i| i.id)
            .collect();
        for id in due {
            let inst = self.instances.get_mut(&id).expect("listed above");
            inst.deadline = None;
            match inst.state {
                State::Starting => {
                    let (slot, pid) = (inst.slot, inst.pid);
                    let said = inst.note.as_ref().map(|n| format!(": {n}"));
                    if self.is_replacement(id) {
                        let reason = format!(
                            "the {} for worker {slot} ({}) did not report READY within {}{}",
                            self.rollout
                                .as_ref()
                                .map_or("replacement", Rollout::step_role),
                            pid_text(pid),
                            human(self.timing.ready_timeout),
                            said.unwrap_or_default()
                        );
                        self.rollout_failed(now, reason);
                    } else {
                        self.kill(id, KillReason::ReadyTimeout);
                    }
                }
                State::Draining => self.kill(id, KillReason::DrainTimeout),
                State::Ready if inst.hung => self.hung_deadline(now, id),
                State::Ready => {}
            }
        }
        if self.stop_deadline.is_some_and(|d| d <= now) {
            self.stop_deadline = None;
            let left: Vec<InstanceId> = self
                .instances
                .values()
                .filter(|i| i.killed.is_none())
                .map(|i| i.id)
                .collect();
            for id in left {
                self.kill(id, KillReason::FastStop);
            }
        }
        if self.lame_duck.is_some_and(|t| t <= now) {
            self.lame_duck = None;
            self.stop(now, false);
        }
        self.tick_rollout(now);
        self.tick_health(now);
        self.respawn_due(now);
    }

    // --- commands ----------------------------------------------------------

    /// Changes the number of workers. Scaling down drains the highest ids.
    ///
    /// # Errors
    /// Refused, with the reason, while stopping or restarting, or for a
    /// count of 0 or above [`MAX_WORKERS`].
    pub fn scale(&mut self, now: Instant, to: ScaleTo) -> Result<(u32, u32), String> {
        if self.stopping.is_some() {
            return Err("clusterd is stopping".into());
        }
        if let Some(r) = &self.rollout {
            return Err(format!("{}; scale when it has finished", r.busy()));
        }
        let from = self.desired();
        let to = match to {
            ScaleTo::Exactly(n) => i64::from(n),
            ScaleTo::Up(n) => i64::from(from) + i64::from(n),
            ScaleTo::Down(n) => i64::from(from) - i64::from(n),
        };
        if to < 1 {
            return Err(format!(
                "cannot scale to {to} workers: at least 1 is needed (use stop to stop)"
            ));
        }
        if to > i64::from(MAX_WORKERS) {
            return Err(format!(
                "cannot scale to {to} workers: the limit is {MAX_WORKERS}"
            ));
        }
        let to = to as u32;
        for id in from + 1..=to {
            let slot = Slot {
                id,
                generation: self.generation,
                restarts: 0,
                last_exit: None,
                streak: 0,
                respawn_at: None,
            };
            self.slots.insert(id, slot);
            self.spawn(now, id, self.generation);
        }
        for id in (to + 1..=from).rev() {
            self.slots.remove(&id);
            let live: Vec<InstanceId> = self
                .instances
                .values()
                .filter(|i| i.slot == id && i.live())
                .map(|i| i.id)
                .collect();
            for inst in live {
                self.drain(now, inst);
            }
        }
        self.notice(Notice::Scaled { from, to });
        self.check_all_ready();
        Ok((from, to))
    }

    /// Stops: gracefully (drain everything) or fast (SIGTERM, then SIGKILL
    /// after `fast_stop_grace`). A fast stop may follow a graceful one.
    pub fn stop(&mut self, now: Instant, fast: bool) {
        match self.stopping {
            Some(true) => return,
            Some(false) if !fast => return,
            _ => {}
        }
        self.stopping = Some(fast);
        self.lame_duck = None;
        self.watch = None;
        if self.rollout.is_some() {
            self.rollout_failed(now, "clusterd is stopping".into());
        }
        for slot in self.slots.values_mut() {
            slot.respawn_at = None;
        }
        self.notice(Notice::Stopping {
            fast,
            workers: self.instances.len() as u32,
        });
        let ids: Vec<InstanceId> = self.instances.keys().copied().collect();
        for id in ids {
            let inst = &self.instances[&id];
            if fast {
                if inst.killed.is_none() {
                    self.actions.push(Action::Terminate { instance: id });
                }
                let inst = self.instances.get_mut(&id).expect("listed above");
                inst.state = State::Draining;
                inst.deadline = None;
            } else if inst.state != State::Draining && inst.killed.is_none() {
                self.drain(now, id);
            }
        }
        if fast {
            self.stop_deadline = Some(now + self.timing.fast_stop_grace);
        }
        if self.instances.is_empty() {
            self.actions.push(Action::Exit {
                code: self.stop_code,
            });
        }
    }

    // --- internals ---------------------------------------------------------

    fn notice(&mut self, notice: Notice) {
        self.actions.push(Action::Notice(notice));
    }

    fn spawn(&mut self, now: Instant, slot: SlotId, generation: u64) -> InstanceId {
        let id = InstanceId(self.next_instance);
        self.next_instance += 1;
        self.instances.insert(
            id,
            Instance {
                id,
                slot,
                generation,
                pid: None,
                state: State::Starting,
                started: now,
                ready_at: None,
                deadline: Some(now + self.timing.ready_timeout),
                auto_ready: self.timing.ready_after.map(|d| now + d),
                killed: None,
                drained: false,
                outcomes: Outcomes::default(),
                heartbeat: None,
                hung: false,
                signalled: false,
                recycling: false,
                note: None,
            },
        );
        self.actions.push(Action::Spawn {
            instance: id,
            slot,
            generation,
        });
        id
    }

    fn drain(&mut self, now: Instant, id: InstanceId) {
        let timeout = self.timing.drain_timeout;
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.state = State::Draining;
            inst.deadline = Some(now + timeout);
            self.actions.push(Action::Drain {
                instance: id,
                timeout,
            });
        }
    }

    fn kill(&mut self, id: InstanceId, reason: KillReason) {
        if let Some(inst) = self.instances.get_mut(&id) {
            if inst.killed.is_none() {
                inst.killed = Some(reason);
                inst.deadline = None;
                self.actions.push(Action::Kill {
                    instance: id,
                    reason,
                });
            }
        }
    }

    /// A live instance ended without being asked to: count it and schedule
    /// the slot's respawn with backoff.
    fn crashed(&mut self, now: Instant, inst: &Instance, exit: Exit) {
        let uptime = now.saturating_duration_since(inst.started);
        let Some(slot) = self.slots.get_mut(&inst.slot) else {
            return;
        };
        slot.restarts += 1;
        slot.last_exit = Some(match inst.killed {
            Some(KillReason::ReadyTimeout) => {
                format!("no READY within {}", human(self.timing.ready_timeout))
            }
            _ => exit.to_string(),
        });
        if uptime >= self.timing.min_uptime {
            slot.streak = 0;
        }
        let delay = self.timing.backoff(slot.streak);
        slot.streak = slot.streak.saturating_add(1);
        slot.respawn_at = Some(now + delay);
        let (id, restarts, streak) = (slot.id, slot.restarts, slot.streak);
        if delay > Duration::ZERO {
            self.notice(Notice::Backoff {
                slot: id,
                delay,
                restarts,
            });
        }
        self.check_crash_loop(now, id, streak, &exit);
    }

    /// The slots that have a live (starting or ready) instance.
    fn live_slots(&self) -> BTreeSet<SlotId> {
        self.instances
            .values()
            .filter(|i| i.live())
            .map(|i| i.slot)
            .collect()
    }

    /// Spawns every slot whose backoff has ended and that has no live instance.
    fn respawn_due(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let live = self.live_slots();
        let due: Vec<(SlotId, u64)> = self
            .slots
            .values()
            .filter(|s| !live.contains(&s.id) && s.respawn_at.is_some_and(|t| t <= now))
            .map(|s| (s.id, s.generation))
            .collect();
        for (slot, generation) in due {
            self.slots.get_mut(&slot).expect("listed above").respawn_at = None;
            self.spawn(now, slot, generation);
        }
    }

    fn check_all_ready(&mut self) {
        let all =
            self.stopping.is_none() && self.ready() >= self.desired() && self.rollout.is_none();
        if all && !self.all_ready {
            self.notice(Notice::AllReady {
                workers: self.desired(),
                generation: self.generation,
            });
        }
        self.all_ready = all;
    }
}

/// `1.2s after READY`, or `before it was ready`.
fn since_ready(inst: &Instance, now: Instant) -> String {
    let when = match inst.ready_at {
        Some(t) => format!("{} after READY", seconds(now.saturating_duration_since(t))),
        None => "before it was ready".into(),
    };
    match &inst.note {
        Some(note) => format!("{when}: {note}"),
        None => when,
    }
}

/// `0.3s`, `12.0s`: a short span for a sentence.
fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "no pid".to_string(), |p| format!("pid {p}"))
}

/// `10s`, `250ms`, `2m30s`: durations as the config writes them.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        let s = ms / 1000;
        match (s / 3600, s % 3600 / 60, s % 60) {
            (0, 0, s) => format!("{s}s"),
            (0, m, 0) => format!("{m}m"),
            (0, m, s) => format!("{m}m{s}s"),
            (h, 0, 0) => format!("{h}h"),
            (h, m, s) => format!("{h}h{m}m{s}s"),
        }
    }
}

#[cfg(test)]
mod tests;
