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
//! # Guarantees kept here
//!
//! - A replacement must be READY before the instance it replaces is drained;
//!   if it exits or misses `ready_timeout` the restart aborts and the old
//!   instances keep serving.
//! - A crashed instance is respawned at once the first time, then after
//!   `restart_delay`, doubling up to `restart_delay_max`, until an instance
//!   has lived `min_uptime`.
//! - A draining instance is killed at `drain_timeout`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// A worker id (slot number), `1..=desired`.
pub type SlotId = u32;

/// The most workers a pool may have.
pub const MAX_WORKERS: u32 = 1024;

/// Identifies one instance (process) for the daemon; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub u64);

/// The time limits of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    ReadyTimeout,
    DrainTimeout,
    /// A failed replacement is removed.
    Aborted,
    FastStop,
}

impl KillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KillReason::ReadyTimeout => "ready_timeout",
            KillReason::DrainTimeout => "drain_timeout",
            KillReason::Aborted => "restart_aborted",
            KillReason::FastStop => "fast_stop",
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
    /// The ready or drain deadline, whichever applies.
    deadline: Option<Instant>,
    /// When it counts as ready without reporting it (`ready_after`).
    auto_ready: Option<Instant>,
    /// SIGKILL was sent.
    pub killed: Option<KillReason>,
    /// The worker reported DRAINED.
    pub drained: bool,
}

impl Instance {
    /// Starting or Ready, and not being killed: counts towards the pool.
    fn live(&self) -> bool {
        self.state != State::Draining && self.killed.is_none()
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
    /// Every slot has a ready worker again.
    AllReady {
        workers: u32,
        generation: u64,
    },
    RestartBegun {
        generation: u64,
        total: u32,
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
    },
    RestartAborted {
        generation: u64,
        reason: String,
        replaced: u32,
        total: u32,
    },
    Scaled {
        from: u32,
        to: u32,
    },
    Stopping {
        fast: bool,
        workers: u32,
    },
}

/// A rolling restart in progress.
#[derive(Debug, Clone)]
struct Rollout {
    generation: u64,
    pending: VecDeque<SlotId>,
    total: u32,
    done: u32,
    started: Instant,
    /// The replacement being started, and when.
    current: Option<(InstanceId, Instant)>,
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

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// The operation in progress, for status: `restart 3/8`, `stopping`.
    pub fn operation(&self) -> Option<String> {
        if self.stopping.is_some() {
            return Some(format!("stopping ({} left)", self.instances.len()));
        }
        self.rollout
            .as_ref()
            .map(|r| format!("restart {}/{}", r.done, r.total))
    }

    /// Every generation some slot, instance or the rollout still refers to
    /// (the daemon keeps those specs and may forget the others).
    pub fn generations_in_use(&self) -> Vec<u64> {
        let mut gens: Vec<u64> = self
            .slots
            .values()
            .map(|s| s.generation)
            .chain(self.instances.values().map(|i| i.generation))
            .chain(self.rollout.iter().map(|r| r.generation))
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
        instances.chain(respawns).chain(self.stop_deadline).min()
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

        let is_replacement = self.is_replacement(id);
        if is_replacement {
            self.replacement_ready(now, id, slot_id, generation);
        }
        self.check_all_ready();
        true
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
                self.actions.push(Action::Exit { code: 0 });
            }
            return;
        }

        let was_replacement = self.is_replacement(id);
        if was_replacement {
            let reason = format!(
                "the replacement for worker {} ({}) ended with {} before it was ready",
                inst.slot,
                pid_text(inst.pid),
                exit
            );
            self.abort(reason);
        } else if !expected {
            self.crashed(now, &inst, exit);
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
                    let is_replacement = self.is_replacement(id);
                    if is_replacement {
                        let reason = format!(
                            "the replacement for worker {slot} ({}) did not report READY within {}",
                            pid_text(pid),
                            human(self.timing.ready_timeout)
                        );
                        self.abort(reason);
                    } else {
                        self.kill(id, KillReason::ReadyTimeout);
                    }
                }
                State::Draining => self.kill(id, KillReason::DrainTimeout),
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
        self.respawn_due(now);
    }

    // --- commands ----------------------------------------------------------

    /// Begins a rolling restart to `generation` (which must be new).
    ///
    /// # Errors
    /// Refused, with the reason, while stopping or while a restart runs.
    pub fn restart(&mut self, now: Instant, generation: u64) -> Result<(), String> {
        if self.stopping.is_some() {
            return Err("clusterd is stopping".into());
        }
        if let Some(r) = &self.rollout {
            return Err(format!(
                "a rolling restart is already in progress ({}/{} replaced)",
                r.done, r.total
            ));
        }
        let pending: VecDeque<SlotId> = self.slots.keys().copied().collect();
        let total = pending.len() as u32;
        self.rollout = Some(Rollout {
            generation,
            pending,
            total,
            done: 0,
            started: now,
            current: None,
        });
        self.notice(Notice::RestartBegun { generation, total });
        self.advance(now);
        Ok(())
    }

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
            return Err(format!(
                "a rolling restart is in progress ({}/{} replaced); scale when it has finished",
                r.done, r.total
            ));
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
        if self.rollout.is_some() {
            self.abort("clusterd is stopping".into());
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
            self.actions.push(Action::Exit { code: 0 });
        }
    }

    // --- internals ---------------------------------------------------------

    /// Whether `id` is the replacement the rolling restart is starting.
    fn is_replacement(&self, id: InstanceId) -> bool {
        self.rollout
            .as_ref()
            .and_then(|r| r.current)
            .is_some_and(|(cur, _)| cur == id)
    }

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
                deadline: Some(now + self.timing.ready_timeout),
                auto_ready: self.timing.ready_after.map(|d| now + d),
                killed: None,
                drained: false,
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
        let (id, restarts) = (slot.id, slot.restarts);
        if delay > Duration::ZERO {
            self.notice(Notice::Backoff {
                slot: id,
                delay,
                restarts,
            });
        }
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

    /// The rolling restart's replacement reported READY: the slot now runs
    /// the new generation; drain what it replaces and go on to the next.
    fn replacement_ready(
        &mut self,
        now: Instant,
        id: InstanceId,
        slot_id: SlotId,
        generation: u64,
    ) {
        let old: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.slot == slot_id && i.id != id && i.live())
            .map(|i| i.id)
            .collect();
        let old_pid = old.iter().find_map(|o| self.instances[o].pid);
        for o in old {
            self.drain(now, o);
        }
        if let Some(slot) = self.slots.get_mut(&slot_id) {
            slot.generation = generation;
            slot.streak = 0;
        }
        let new_pid = self.instances[&id].pid;
        let rollout = self
            .rollout
            .as_mut()
            .expect("a replacement belongs to a rollout");
        let started = rollout.current.take().map_or(now, |(_, t)| t);
        rollout.done += 1;
        let (done, total) = (rollout.done, rollout.total);
        self.notice(Notice::RestartProgress {
            slot: slot_id,
            done,
            total,
            old_pid,
            new_pid,
            took: now - started,
        });
        self.advance(now);
    }

    /// Starts the next replacement, or finishes the restart.
    fn advance(&mut self, now: Instant) {
        let Some(rollout) = self.rollout.as_mut() else {
            return;
        };
        if rollout.current.is_some() {
            return;
        }
        let generation = rollout.generation;
        while let Some(slot) = rollout.pending.pop_front() {
            if self.slots.contains_key(&slot) {
                let id = self.spawn(now, slot, generation);
                let rollout = self.rollout.as_mut().expect("checked above");
                rollout.current = Some((id, now));
                return;
            }
        }
        let rollout = self.rollout.take().expect("checked above");
        self.generation = rollout.generation;
        self.notice(Notice::RestartDone {
            generation: rollout.generation,
            replaced: rollout.done,
            took: now - rollout.started,
        });
    }

    /// Ends the rolling restart without finishing it. The replacement being
    /// started, if any, is removed; everything else keeps running.
    fn abort(&mut self, reason: String) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        if let Some((id, _)) = rollout.current {
            self.kill(id, KillReason::Aborted);
        }
        self.notice(Notice::RestartAborted {
            generation: rollout.generation,
            reason,
            replaced: rollout.done,
            total: rollout.total,
        });
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
