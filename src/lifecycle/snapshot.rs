//! The supervisor as plain data, for `clusterctl upgrade`: the old image
//! takes a [`Snapshot`] just before it re-executes itself, the new image
//! [restores](Supervisor::restore) it when it takes over.
//!
//! An [`Instant`] means nothing to another process image, so every point in
//! time becomes a [`When`]: how long ago it was, or how long is left until
//! it, at the moment of the snapshot. Restored against the new image's
//! clock, a backoff, a drain deadline or a bake has the same time left as it
//! had when the snapshot was taken (the exec itself, a few milliseconds, is
//! not counted against it), and an uptime goes on from where it was.
//!
//! The snapshot holds everything the supervisor knows except the actions
//! and notices not yet taken, which the daemon takes before it snapshots
//! (see [`Supervisor::snapshot`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rollout::{Kind, LastRestart, Outcome, Rollout, Step, Watch};
use super::{
    HealthReason, Instance, InstanceId, KillReason, Outcomes, Slot, SlotId, State, Supervisor,
    Timing,
};

/// A point in time relative to the snapshot's: `ago` in the past, or `left`
/// until it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum When {
    Ago(Duration),
    In(Duration),
}

impl When {
    /// `t` seen from `now`.
    pub fn of(t: Instant, now: Instant) -> When {
        if t > now {
            When::In(t - now)
        } else {
            When::Ago(now - t)
        }
    }

    /// The instant this is, seen from `now`. A time further in the past
    /// than the clock goes back (not possible on one machine) is `now`.
    pub fn at(self, now: Instant) -> Instant {
        match self {
            When::In(left) => now + left,
            When::Ago(ago) => now.checked_sub(ago).unwrap_or(now),
        }
    }
}

fn of(t: Option<Instant>, now: Instant) -> Option<When> {
    t.map(|t| When::of(t, now))
}

fn at(w: Option<When>, now: Instant) -> Option<Instant> {
    w.map(|w| w.at(now))
}

/// [`Supervisor`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub timing: Timing,
    pub slots: Vec<SlotSnapshot>,
    pub instances: Vec<InstanceSnapshot>,
    pub next_instance: u64,
    pub generation: u64,
    pub rollout: Option<RolloutSnapshot>,
    pub watch: Option<WatchSnapshot>,
    pub last_restart: Option<LastRestartSnapshot>,
    pub recycles: Vec<(InstanceId, HealthReason)>,
    pub stop_code: i32,
    pub lame_duck: Option<When>,
    pub stopping: Option<bool>,
    pub stop_deadline: Option<When>,
    pub all_ready: bool,
}

/// [`Slot`] as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSnapshot {
    pub id: SlotId,
    pub generation: u64,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub streak: u32,
    /// The backoff: time left until the respawn.
    pub respawn_at: Option<When>,
}

/// [`Instance`] as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    pub id: InstanceId,
    pub slot: SlotId,
    pub generation: u64,
    pub pid: Option<u32>,
    pub state: State,
    pub started: When,
    pub ready_at: Option<When>,
    pub deadline: Option<When>,
    pub auto_ready: Option<When>,
    pub killed: Option<KillReason>,
    pub drained: bool,
    pub outcomes: Outcomes,
    pub heartbeat: Option<When>,
    pub hung: bool,
    pub signalled: bool,
    pub recycling: bool,
    pub note: Option<String>,
}

/// A rollout in progress, as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSnapshot {
    kind: Kind,
    generation: u64,
    previous: u64,
    pending: Vec<SlotId>,
    total: u32,
    done: u32,
    started: When,
    step: Option<StepSnapshot>,
    served: bool,
    pids: (Option<u32>, Option<u32>),
}

/// The step of a rollout, as data (its bake as time left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSnapshot {
    slot: SlotId,
    instance: InstanceId,
    spawned: When,
    ready_at: Option<When>,
    bake_until: Option<When>,
    baseline: Vec<(InstanceId, Outcomes)>,
}

/// The probation of a finished restart's generation (`rollback = auto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchSnapshot {
    generation: u64,
    previous: u64,
    until: When,
    crashes: u32,
}

/// [`LastRestart`] as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRestartSnapshot {
    outcome: Outcome,
    generation: u64,
    reason: Option<String>,
    at: When,
}

impl Supervisor {
    /// The supervisor as data, its times seen from `now`.
    ///
    /// Actions and health replacements not taken yet are not part of it:
    /// take them first ([`take_actions`](Self::take_actions),
    /// [`take_replacements`](Self::take_replacements)).
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        debug_assert!(self.actions.is_empty(), "actions left untaken");
        Snapshot {
            timing: self.timing.clone(),
            slots: self
                .slots
                .values()
                .map(|s| SlotSnapshot {
                    id: s.id,
                    generation: s.generation,
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                    streak: s.streak,
                    respawn_at: of(s.respawn_at, now),
                })
                .collect(),
            instances: self
                .instances
                .values()
                .map(|i| InstanceSnapshot {
                    id: i.id,
                    slot: i.slot,
                    generation: i.generation,
                    pid: i.pid,
                    state: i.state,
                    started: When::of(i.started, now),
                    ready_at: of(i.ready_at, now),
                    deadline: of(i.deadline, now),
                    auto_ready: of(i.auto_ready, now),
                    killed: i.killed,
                    drained: i.drained,
                    outcomes: i.outcomes,
                    heartbeat: of(i.heartbeat, now),
                    hung: i.hung,
                    signalled: i.signalled,
                    recycling: i.recycling,
                    note: i.note.clone(),
                })
                .collect(),
            next_instance: self.next_instance,
            generation: self.generation,
            rollout: self.rollout.as_ref().map(|r| RolloutSnapshot {
                kind: r.kind.clone(),
                generation: r.generation,
                previous: r.previous,
                pending: r.pending.iter().copied().collect(),
                total: r.total,
                done: r.done,
                started: When::of(r.started, now),
                step: r.step.as_ref().map(|s| StepSnapshot {
                    slot: s.slot,
                    instance: s.instance,
                    spawned: When::of(s.spawned, now),
                    ready_at: of(s.ready_at, now),
                    bake_until: of(s.bake_until, now),
                    baseline: s.baseline.clone(),
                }),
                served: r.served,
                pids: r.pids,
            }),
            watch: self.watch.as_ref().map(|w| WatchSnapshot {
                generation: w.generation,
                previous: w.previous,
                until: When::of(w.until, now),
                crashes: w.crashes,
            }),
            last_restart: self.last_restart.as_ref().map(|l| LastRestartSnapshot {
                outcome: l.outcome,
                generation: l.generation,
                reason: l.reason.clone(),
                at: When::of(l.at, now),
            }),
            recycles: self.recycles.iter().copied().collect(),
            stop_code: self.stop_code,
            lame_duck: of(self.lame_duck, now),
            stopping: self.stopping,
            stop_deadline: of(self.stop_deadline, now),
            all_ready: self.all_ready,
        }
    }

    /// The supervisor `snapshot` describes, its times seen from `now`.
    pub fn restore(snapshot: Snapshot, now: Instant) -> Supervisor {
        let s = snapshot;
        Supervisor {
            timing: s.timing,
            slots: s
                .slots
                .into_iter()
                .map(|s| {
                    let slot = Slot {
                        id: s.id,
                        generation: s.generation,
                        restarts: s.restarts,
                        last_exit: s.last_exit,
                        streak: s.streak,
                        respawn_at: at(s.respawn_at, now),
                    };
                    (s.id, slot)
                })
                .collect::<BTreeMap<_, _>>(),
            instances: s
                .instances
                .into_iter()
                .map(|i| {
                    let inst = Instance {
                        id: i.id,
                        slot: i.slot,
                        generation: i.generation,
                        pid: i.pid,
                        state: i.state,
                        started: i.started.at(now),
                        ready_at: at(i.ready_at, now),
                        deadline: at(i.deadline, now),
                        auto_ready: at(i.auto_ready, now),
                        killed: i.killed,
                        drained: i.drained,
                        outcomes: i.outcomes,
                        heartbeat: at(i.heartbeat, now),
                        hung: i.hung,
                        signalled: i.signalled,
                        recycling: i.recycling,
                        note: i.note,
                    };
                    (i.id, inst)
                })
                .collect(),
            next_instance: s.next_instance,
            generation: s.generation,
            rollout: s.rollout.map(|r| Rollout {
                kind: r.kind,
                generation: r.generation,
                previous: r.previous,
                pending: r.pending.into_iter().collect::<VecDeque<_>>(),
                total: r.total,
                done: r.done,
                started: r.started.at(now),
                step: r.step.map(|s| Step {
                    slot: s.slot,
                    instance: s.instance,
                    spawned: s.spawned.at(now),
                    ready_at: at(s.ready_at, now),
                    bake_until: at(s.bake_until, now),
                    baseline: s.baseline,
                }),
                served: r.served,
                pids: r.pids,
            }),
            watch: s.watch.map(|w| Watch {
                generation: w.generation,
                previous: w.previous,
                until: w.until.at(now),
                crashes: w.crashes,
            }),
            last_restart: s.last_restart.map(|l| LastRestart {
                outcome: l.outcome,
                generation: l.generation,
                reason: l.reason,
                at: l.at.at(now),
            }),
            recycles: s.recycles.into_iter().collect(),
            replacements: Vec::new(),
            stop_code: s.stop_code,
            lame_duck: at(s.lame_duck, now),
            stopping: s.stopping,
            stop_deadline: at(s.stop_deadline, now),
            all_ready: s.all_ready,
            actions: Vec::new(),
        }
    }

    /// Whether a rolling restart, a restart of one worker or a rollback
    /// runs (not a routine health replacement); with the reason, for the
    /// operator.
    pub fn busy_with_rollout(&self) -> Option<String> {
        self.rollout
            .as_ref()
            .filter(|r| !matches!(r.kind, Kind::Recycle { .. }))
            .map(Rollout::busy)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Action, Exit, ScaleTo};
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing {
            ready_timeout: 10 * S,
            drain_timeout: 30 * S,
            restart_delay: 100 * MS,
            restart_delay_max: 30 * S,
            min_uptime: 5 * S,
            fast_stop_grace: S,
            ready_after: None,
            bake: 2 * S,
            rollback_window: 60 * S,
            watchdog: None,
            watchdog_grace: 5 * S,
            max_requests: None,
            max_age: None,
            crash_loop: None,
            exit_on_crash_loop: false,
        }
    }

    /// Gives every pending spawn a pid; returns the instances spawned.
    fn spawn_all(sup: &mut Supervisor, next_pid: &mut u32) -> Vec<InstanceId> {
        let mut ids = Vec::new();
        for a in sup.take_actions() {
            if let Action::Spawn { instance, .. } = a {
                sup.spawned(instance, *next_pid);
                *next_pid += 1;
                ids.push(instance);
            }
        }
        ids
    }

    fn encoded(s: &Snapshot) -> Vec<u8> {
        bincode::serde::encode_to_vec(s, bincode::config::standard()).expect("encode")
    }

    #[test]
    fn when_is_time_left_or_time_ago() {
        let now = Instant::now() + 100 * S;
        assert_eq!(When::of(now + 3 * S, now), When::In(3 * S));
        assert_eq!(When::of(now - 2 * S, now), When::Ago(2 * S));
        assert_eq!(When::of(now, now), When::Ago(Duration::ZERO));
        let later = now + 7 * S;
        assert_eq!(When::In(3 * S).at(later), later + 3 * S);
        assert_eq!(When::Ago(2 * S).at(later), later - 2 * S);
    }

    /// Snapshot, bincode, restore, snapshot again: the same data, with every
    /// deadline as far away as it was, whenever the restore happens.
    #[test]
    fn a_busy_pool_round_trips_with_its_remaining_times() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(timing(), 3, 1);
        let mut pid = 100;
        sup.start(t0);
        for id in spawn_all(&mut sup, &mut pid) {
            assert!(sup.ready_reported(t0, id));
        }
        sup.take_actions();
        // Worker 2 crashes twice quickly: its slot is in backoff.
        let t1 = t0 + 10 * S;
        let w2 = sup.instances().find(|i| i.slot == 2).unwrap().id;
        sup.exited(t1, w2, Exit::Code(1));
        let respawned = spawn_all(&mut sup, &mut pid);
        sup.exited(t1 + 10 * MS, respawned[0], Exit::Signal(9));
        sup.take_actions();
        // A scale-up: worker 4 starting, with its ready deadline.
        sup.scale(t1 + 20 * MS, ScaleTo::Up(1)).unwrap();
        spawn_all(&mut sup, &mut pid);
        let now = t1 + 50 * MS;
        sup.take_actions();

        let snap = sup.snapshot(now);
        let slot2 = snap.slots.iter().find(|s| s.id == 2).unwrap();
        assert_eq!(slot2.restarts, 2);
        assert_eq!(slot2.respawn_at, Some(When::In(60 * MS)), "{slot2:?}");
        let bytes = encoded(&snap);
        let (decoded, _): (Snapshot, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, snap);

        // Restored five minutes later (another image's clock): the same.
        let later = now + 300 * S;
        let mut restored = Supervisor::restore(decoded, later);
        assert_eq!(restored.snapshot(later), snap);
        assert_eq!(restored.ready(), 2);
        assert_eq!(restored.desired(), 4);
        assert_eq!(restored.generation(), 1);
        // The backoff is kept: nothing at 59 ms, the respawn at 60 ms.
        restored.tick(later + 59 * MS);
        assert!(restored.take_actions().is_empty());
        restored.tick(later + 60 * MS);
        let actions = restored.take_actions();
        assert!(
            matches!(actions.as_slice(), [Action::Spawn { slot: 2, .. }]),
            "{actions:?}"
        );
        // New instances do not reuse an id.
        let Action::Spawn { instance, .. } = actions[0] else {
            unreachable!()
        };
        assert!(snap.instances.iter().all(|i| i.id < instance));
    }

    /// The uptimes go on: an instance started 10 s before the snapshot is
    /// 10 s old at the restore, and the ready deadline of a starting one has
    /// the same time left.
    #[test]
    fn uptimes_and_ready_deadlines_carry_over() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(timing(), 1, 1);
        let mut pid = 100;
        sup.start(t0);
        spawn_all(&mut sup, &mut pid);
        let now = t0 + 4 * S;
        let snap = sup.snapshot(now);
        let later = now + 3600 * S;
        let mut restored = Supervisor::restore(snap, later);
        let inst = restored.instances().next().unwrap().clone();
        assert_eq!(later - inst.started, 4 * S);
        // ready_timeout is 10 s: 6 s left.
        restored.tick(later + 6 * S - MS);
        assert!(restored.take_actions().is_empty());
        restored.tick(later + 6 * S);
        let actions = restored.take_actions();
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Kill { instance, .. } if *instance == inst.id)),
            "{actions:?}"
        );
    }

    /// A restart's bake, and the probation after it, keep their time left.
    #[test]
    fn a_bake_in_progress_keeps_its_time_left() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(timing(), 2, 1);
        let mut pid = 100;
        sup.start(t0);
        for id in spawn_all(&mut sup, &mut pid) {
            sup.ready_reported(t0, id);
        }
        sup.take_actions();
        let t1 = t0 + 10 * S;
        sup.restart(t1, 2).unwrap();
        let canary = spawn_all(&mut sup, &mut pid)[0];
        assert!(sup.ready_reported(t1 + S, canary));
        sup.take_actions();
        assert_eq!(sup.phase().as_str(), "baking");
        assert!(sup.busy_with_rollout().is_some());
        let now = t1 + S + 500 * MS;
        let snap = sup.snapshot(now);
        let later = now + 60 * S;
        let restored = Supervisor::restore(snap.clone(), later);
        assert_eq!(restored.phase().as_str(), "baking");
        assert_eq!(restored.next_deadline(), Some(later + 1500 * MS));
        assert_eq!(restored.snapshot(later), snap);
    }
}
