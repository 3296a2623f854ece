//! The supervisor, scripted: events in, actions checked. No processes, no
//! sleeps; time is an `Instant` the script advances by hand.

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
        bake: Duration::ZERO,
        rollback_window: Duration::ZERO,
        watchdog: None,
        watchdog_grace: 5 * S,
        max_requests: None,
        max_age: None,
        crash_loop: None,
        exit_on_crash_loop: false,
    }
}

/// A supervisor, a clock, and fake pids.
struct Script {
    sup: Supervisor,
    now: Instant,
    next_pid: u32,
}

impl Script {
    fn new(workers: u32) -> Script {
        Script {
            sup: Supervisor::new(timing(), workers, 1),
            now: Instant::now(),
            next_pid: 100,
        }
    }

    /// Starts the pool and makes every worker ready.
    fn started(workers: u32) -> Script {
        let mut s = Script::new(workers);
        s.sup.start(s.now);
        for id in s.spawn_all() {
            assert!(s.sup.ready_reported(s.now, id));
        }
        s.sup.take_actions();
        assert_eq!(s.sup.ready(), workers);
        s
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.sup.tick(self.now);
    }

    /// Carries out pending Spawn actions (giving pids); returns the instances.
    fn spawn_all(&mut self) -> Vec<InstanceId> {
        let mut ids = Vec::new();
        for a in self.sup.take_actions() {
            if let Action::Spawn { instance, .. } = a {
                self.sup.spawned(instance, self.next_pid);
                self.next_pid += 1;
                ids.push(instance);
            }
        }
        ids
    }

    fn live_in_slot(&self, slot: SlotId) -> Vec<InstanceId> {
        self.sup
            .instances()
            .filter(|i| i.slot == slot && i.live())
            .map(|i| i.id)
            .collect()
    }

    fn ready_in_slot(&self, slot: SlotId) -> InstanceId {
        self.sup
            .instances()
            .find(|i| i.slot == slot && i.state == State::Ready)
            .expect("a ready instance")
            .id
    }
}

fn spawns(actions: &[Action]) -> Vec<(SlotId, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn {
                slot, generation, ..
            } => Some((*slot, *generation)),
            _ => None,
        })
        .collect()
}

fn drains(actions: &[Action]) -> Vec<InstanceId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Drain { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect()
}

fn kills(actions: &[Action]) -> Vec<(InstanceId, KillReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Kill { instance, reason } => Some((*instance, *reason)),
            _ => None,
        })
        .collect()
}

fn notices(actions: &[Action]) -> Vec<&Notice> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notice(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// `(from, to, reason, slots)` of a RollbackBegun.
fn rollback_begun(actions: &[Action]) -> Option<(u64, u64, String, u32)> {
    notices(actions).into_iter().find_map(|n| match n {
        Notice::RollbackBegun {
            from,
            to,
            reason,
            slots,
            ..
        } => Some((*from, *to, reason.clone(), *slots)),
        _ => None,
    })
}

/// `(from, to, replaced, restored, complete)` of a RolledBack.
fn rolled_back(actions: &[Action]) -> Option<(u64, u64, u32, u32, bool)> {
    notices(actions).into_iter().find_map(|n| match n {
        Notice::RolledBack {
            from,
            to,
            replaced,
            restored,
            complete,
            ..
        } => Some((*from, *to, *replaced, *restored, *complete)),
        _ => None,
    })
}

fn aborted_reason(actions: &[Action]) -> Option<String> {
    notices(actions).into_iter().find_map(|n| match n {
        Notice::RestartAborted { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn start_spawns_every_slot_and_reports_all_ready() {
    let mut s = Script::new(3);
    s.sup.start(s.now);
    let actions = s.sup.take_actions();
    assert_eq!(spawns(&actions), vec![(1, 1), (2, 1), (3, 1)]);
    let ids: Vec<InstanceId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    for (n, id) in ids.iter().enumerate() {
        s.sup.spawned(*id, 100 + n as u32);
        s.sup.ready_reported(s.now, *id);
    }
    let actions = s.sup.take_actions();
    assert!(notices(&actions).contains(&&Notice::AllReady {
        workers: 3,
        generation: 1
    }));
    assert_eq!(s.sup.ready(), 3);
    assert_eq!(
        s.sup.next_deadline(),
        None,
        "nothing to wait for when all are ready"
    );
}

#[test]
fn backoff_is_immediate_then_doubles_up_to_the_cap() {
    let t = timing();
    let delays: Vec<Duration> = (0..12).map(|k| t.backoff(k)).collect();
    assert_eq!(
        delays[..5],
        [Duration::ZERO, 100 * MS, 200 * MS, 400 * MS, 800 * MS]
    );
    assert_eq!(delays[10], 30 * S);
    assert_eq!(t.backoff(u32::MAX), 30 * S, "no overflow");
}

#[test]
fn a_crash_is_respawned_at_once_and_counted() {
    let mut s = Script::started(2);
    s.advance(60 * S);
    let victim = s.ready_in_slot(2);
    s.sup.exited(s.now, victim, Exit::Signal(9));
    let actions = s.sup.take_actions();
    assert_eq!(
        spawns(&actions),
        vec![(2, 1)],
        "respawned at once after a long healthy run"
    );
    let slot = s.sup.slots().find(|sl| sl.id == 2).unwrap();
    assert_eq!(slot.restarts, 1);
    assert_eq!(slot.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::Exited {
            slot: 2,
            expected: false,
            ..
        }
    )));
}

#[test]
fn a_crash_loop_backs_off_exponentially_without_a_fork_storm() {
    let mut s = Script::new(1);
    s.sup.start(s.now);
    let mut spawned_at = Vec::new();
    let end = s.now + 60 * S;
    let mut current = s.spawn_all();
    spawned_at.push(s.now);
    // The worker exits 1 right after each start; the clock jumps to each
    // deadline the supervisor asks for, as the daemon's loop does.
    while s.now < end {
        for id in current.drain(..) {
            s.now += MS;
            s.sup.exited(s.now, id, Exit::Code(1));
        }
        let mut got = s.spawn_all();
        if got.is_empty() {
            let next = s.sup.next_deadline().expect("a respawn is scheduled");
            s.now = next;
            s.sup.tick(s.now);
            got = s.spawn_all();
        }
        assert_eq!(got.len(), 1);
        spawned_at.push(s.now);
        current = got;
    }
    // 0, 100ms, 200ms, ... 25.6s: about a dozen starts in a minute, not thousands.
    assert!(
        spawned_at.len() <= 14,
        "{} spawns in 60 s",
        spawned_at.len()
    );
    let gaps: Vec<Duration> = spawned_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0]),
        "gaps never shrink: {gaps:?}"
    );
    let slot = s.sup.slots().next().unwrap();
    assert_eq!(slot.last_exit.as_deref(), Some("exit 1"));
    assert_eq!(
        slot.restarts as usize,
        spawned_at.len() - 1,
        "every exit is counted"
    );
}

#[test]
fn backoff_resets_after_min_uptime() {
    let mut s = Script::new(1);
    s.sup.start(s.now);
    for _ in 0..4 {
        let id = s.spawn_all()[0];
        s.sup.exited(s.now, id, Exit::Code(1));
        if let Some(t) = s.sup.next_deadline() {
            s.now = t;
            s.sup.tick(s.now);
        }
    }
    let id = s.spawn_all()[0];
    s.sup.ready_reported(s.now, id);
    s.advance(6 * S); // lived past min_uptime
    s.sup.exited(s.now, id, Exit::Code(1));
    assert_eq!(
        spawns(&s.sup.take_actions()),
        vec![(1, 1)],
        "healthy again: respawned at once"
    );
}

#[test]
fn a_restart_of_a_single_worker_ends_with_all_ready() {
    let mut s = Script::started(1);
    let old = s.ready_in_slot(1);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.sup.ready_reported(s.now, new);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions), vec![old]);
    assert!(
        notices(&actions).contains(&&Notice::AllReady {
            workers: 1,
            generation: 2
        }),
        "{actions:?}"
    );
    s.sup.exited(s.now, old, Exit::Code(0));
    assert!(
        !notices(&s.sup.take_actions())
            .iter()
            .any(|n| matches!(n, Notice::AllReady { .. })),
        "once"
    );
}

#[test]
fn rolling_restart_replaces_one_at_a_time_and_never_drops_capacity() {
    let mut s = Script::started(3);
    s.sup.restart(s.now, 2).unwrap();
    let mut actions = s.sup.take_actions();
    for slot in 1..=3 {
        assert_eq!(
            spawns(&actions),
            vec![(slot, 2)],
            "one replacement at a time"
        );
        let new = s.live_in_slot(slot).into_iter().max().unwrap();
        s.sup.spawned(new, 500 + slot);
        let old = s.ready_in_slot(slot);
        assert!(
            !drains(&actions).contains(&old),
            "nothing drained before the replacement is ready"
        );
        assert_eq!(s.sup.ready(), 3, "capacity while the replacement starts");
        assert_eq!(s.sup.operation(), Some(format!("restart {}/3", slot - 1)));
        s.now += 40 * MS;
        s.sup.ready_reported(s.now, new);
        let after_ready = s.sup.take_actions();
        assert_eq!(
            drains(&after_ready),
            vec![old],
            "the replaced worker drains only now"
        );
        assert_eq!(s.sup.ready(), 3);
        let progress = notices(&after_ready)
            .into_iter()
            .find_map(|n| match n {
                Notice::RestartProgress {
                    slot: sl,
                    done,
                    total,
                    old_pid,
                    new_pid,
                    took,
                } => Some((*sl, *done, *total, *old_pid, *new_pid, *took)),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            progress,
            (
                slot,
                slot,
                3,
                s.sup.instance(old).unwrap().pid,
                Some(500 + slot),
                40 * MS
            )
        );
        s.sup.exited(s.now, old, Exit::Code(0));
        assert!(
            spawns(&s.sup.take_actions()).is_empty(),
            "a drained worker is not respawned"
        );
        if slot == 3 {
            let n = notices(&after_ready);
            assert!(n.iter().any(|n| matches!(
                n,
                Notice::RestartDone {
                    generation: 2,
                    replaced: 3,
                    ..
                }
            )));
            assert!(n.contains(&&Notice::AllReady {
                workers: 3,
                generation: 2
            }));
        }
        actions = after_ready;
    }
    assert_eq!(s.sup.generation(), 2);
    assert!(
        s.sup
            .slots()
            .all(|sl| sl.generation == 2 && sl.restarts == 0)
    );
    assert_eq!(s.sup.operation(), None);
}

#[test]
fn a_replacement_that_exits_aborts_the_restart_and_the_old_workers_keep_serving() {
    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.sup.exited(s.now, new, Exit::Code(1));
    let actions = s.sup.take_actions();
    let reason = aborted_reason(&actions).expect("aborted");
    assert!(
        reason.contains("worker 1") && reason.contains("exit 1"),
        "{reason}"
    );
    assert!(drains(&actions).is_empty() && spawns(&actions).is_empty());
    assert_eq!(s.sup.ready(), 2);
    assert_eq!(s.sup.generation(), 1);
    assert!(
        s.sup.slots().all(|sl| sl.restarts == 0),
        "a failed deploy is not a crash"
    );
    // The next restart is allowed.
    s.sup.restart(s.now, 3).unwrap();
}

#[test]
fn a_replacement_that_never_reports_ready_is_killed_and_the_restart_aborts() {
    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    assert_eq!(s.sup.next_deadline(), Some(s.now + 10 * S));
    s.advance(10 * S);
    let actions = s.sup.take_actions();
    assert_eq!(kills(&actions), vec![(new, KillReason::Aborted)]);
    let reason = aborted_reason(&actions).unwrap();
    assert!(
        reason.contains("did not report READY within 10s"),
        "{reason}"
    );
    s.sup.exited(s.now, new, Exit::Signal(9));
    let actions = s.sup.take_actions();
    assert!(spawns(&actions).is_empty());
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::Exited { expected: true, .. }))
    );
    assert_eq!(s.sup.ready(), 2);
}

#[test]
fn what_a_failed_replacement_said_is_in_the_restart_reason() {
    // Exited before READY, after saying why.
    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.sup.noted(
        new,
        Some("the app failed: Error: no DATABASE_URL (at server.js:3:9)".into()),
    );
    s.sup.exited(s.now, new, Exit::Code(1));
    let reason = aborted_reason(&s.sup.take_actions()).expect("aborted");
    assert!(
        reason.ends_with(
            "exit 1 before it was ready: the app failed: Error: no DATABASE_URL (at server.js:3:9)"
        ),
        "{reason}"
    );
    // Never ready, still saying what it waits for.
    s.sup.restart(s.now, 3).unwrap();
    let new = s.spawn_all()[0];
    s.sup.noted(new, Some("waiting for listen()".into()));
    s.sup.noted(new, Some("nothing listens on http yet".into()));
    s.advance(10 * S);
    let reason = aborted_reason(&s.sup.take_actions()).unwrap();
    assert!(
        reason.ends_with("did not report READY within 10s: nothing listens on http yet"),
        "{reason}"
    );
    // An empty note is no note.
    s.sup.exited(s.now, new, Exit::Signal(9));
    s.sup.take_actions();
    s.sup.restart(s.now, 4).unwrap();
    let new = s.spawn_all()[0];
    s.sup.noted(new, Some("waiting".into()));
    s.sup.noted(new, Some(String::new()));
    s.sup.exited(s.now, new, Exit::Code(0));
    let reason = aborted_reason(&s.sup.take_actions()).unwrap();
    assert!(reason.ends_with("exit 0 before it was ready"), "{reason}");
}

#[test]
fn a_replacement_failing_midway_rolls_the_replaced_slots_back_ready_gated() {
    let mut s = Script::started(3);
    s.sup.restart(s.now, 2).unwrap();
    let new1 = s.spawn_all()[0];
    s.sup.ready_reported(s.now, new1);
    let new2 = s.spawn_all()[0];
    s.sup.exited(s.now, new2, Exit::Code(1));
    let actions = s.sup.take_actions();
    assert!(aborted_reason(&actions).is_none(), "not a plain abort");
    let begun = rollback_begun(&actions).expect("a rollback");
    assert_eq!((begun.0, begun.1, begun.3), (2, 1, 1), "{begun:?}");
    assert!(
        begun.2.contains("worker 2") && begun.2.contains("exit 1"),
        "{begun:?}"
    );
    // Every slot runs generation 1 again as soon as it respawns; slot 1
    // gets a generation-1 replacement while its generation-2 worker serves.
    let gens: Vec<u64> = s.sup.slots().map(|sl| sl.generation).collect();
    assert_eq!(gens, vec![1, 1, 1]);
    assert_eq!(s.sup.generation(), 1);
    assert_eq!(spawns(&actions), vec![(1, 1)]);
    assert!(drains(&actions).is_empty(), "nothing drained before READY");
    assert_eq!(s.sup.ready(), 3, "capacity kept");
    assert_eq!(s.sup.phase(), Phase::RollingBack);
    let back = s.live_in_slot(1).into_iter().max().unwrap();
    s.sup.spawned(back, 700);
    s.sup.ready_reported(s.now, back);
    let actions = s.sup.take_actions();
    assert_eq!(
        drains(&actions),
        vec![new1],
        "the failed generation drains now"
    );
    let done = rolled_back(&actions).expect("rolled back");
    assert_eq!(
        done,
        (2, 1, 1, 1, true),
        "from, to, replaced, restored, complete"
    );
    assert_eq!(s.sup.phase(), Phase::Running);
    let last = s.sup.last_restart().unwrap();
    assert_eq!((last.outcome, last.generation), (Outcome::RolledBack, 1));
    // Slot 3 (still generation 1) crashes: it comes back as generation 1.
    s.sup.exited(s.now, new1, Exit::Code(0));
    s.advance(60 * S);
    let old3 = s.ready_in_slot(3);
    s.sup.exited(s.now, old3, Exit::Signal(11));
    assert_eq!(spawns(&s.sup.take_actions()), vec![(3, 1)]);
    assert_eq!(s.sup.generations_in_use(), vec![1]);
}

#[test]
fn an_old_worker_crashing_while_its_replacement_fails_is_still_respawned() {
    let mut s = Script::started(1);
    s.advance(60 * S);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    let old = s.ready_in_slot(1);
    s.sup.exited(s.now, old, Exit::Signal(9));
    assert!(
        spawns(&s.sup.take_actions()).is_empty(),
        "the replacement is starting in that slot"
    );
    s.sup.exited(s.now, new, Exit::Code(1));
    let actions = s.sup.take_actions();
    assert!(aborted_reason(&actions).is_some());
    assert_eq!(
        spawns(&actions),
        vec![(1, 1)],
        "the known-good generation comes back"
    );
}

#[test]
fn a_second_restart_is_refused_with_a_reason() {
    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    let err = s.sup.restart(s.now, 3).unwrap_err();
    assert!(err.contains("already in progress (0/2 replaced)"), "{err}");
    let err = s.sup.scale(s.now, ScaleTo::Up(1)).unwrap_err();
    assert!(
        err.contains("rolling restart is already in progress"),
        "{err}"
    );
}

#[test]
fn a_worker_that_ignores_drain_is_killed_at_the_drain_timeout() {
    let mut s = Script::started(2);
    s.sup.scale(s.now, ScaleTo::Down(1)).unwrap();
    let actions = s.sup.take_actions();
    let drained = drains(&actions);
    assert_eq!(drained.len(), 1);
    assert_eq!(
        s.sup.instance(drained[0]).unwrap().slot,
        2,
        "the highest id goes"
    );
    s.advance(29 * S);
    assert!(kills(&s.sup.take_actions()).is_empty());
    s.advance(S);
    assert_eq!(
        kills(&s.sup.take_actions()),
        vec![(drained[0], KillReason::DrainTimeout)]
    );
    s.sup.exited(s.now, drained[0], Exit::Signal(9));
    let actions = s.sup.take_actions();
    assert!(spawns(&actions).is_empty());
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::Exited {
            slot: 2,
            expected: true,
            ..
        }
    )));
}

#[test]
fn drained_and_ready_out_of_place_are_ignored() {
    let mut s = Script::started(1);
    let id = s.ready_in_slot(1);
    assert!(!s.sup.ready_reported(s.now, id), "READY twice");
    assert!(!s.sup.drained_reported(id), "DRAINED before DRAIN");
    assert_eq!(s.sup.instance(id).unwrap().state, State::Ready);
    s.sup.stop(s.now, false);
    assert!(s.sup.drained_reported(id));
    assert!(!s.sup.ready_reported(s.now, id), "READY while draining");
}

#[test]
fn scaling_up_and_down_and_its_limits() {
    let mut s = Script::started(2);
    assert_eq!(s.sup.scale(s.now, ScaleTo::Up(2)), Ok((2, 4)));
    assert_eq!(spawns(&s.sup.take_actions()), vec![(3, 1), (4, 1)]);
    assert_eq!(s.sup.scale(s.now, ScaleTo::Exactly(1)), Ok((4, 1)));
    assert_eq!(
        drains(&s.sup.take_actions()).len(),
        3,
        "starting workers are drained too"
    );
    assert!(
        s.sup
            .scale(s.now, ScaleTo::Down(1))
            .unwrap_err()
            .contains("at least 1")
    );
    assert!(s.sup.scale(s.now, ScaleTo::Exactly(0)).is_err());
    assert!(
        s.sup
            .scale(s.now, ScaleTo::Exactly(MAX_WORKERS + 1))
            .unwrap_err()
            .contains("limit")
    );
    assert_eq!(s.sup.desired(), 1);
}

#[test]
fn a_worker_that_never_becomes_ready_is_killed_and_respawned_with_backoff() {
    let mut s = Script::new(1);
    s.sup.start(s.now);
    let id = s.spawn_all()[0];
    s.advance(10 * S);
    assert_eq!(
        kills(&s.sup.take_actions()),
        vec![(id, KillReason::ReadyTimeout)]
    );
    s.sup.exited(s.now, id, Exit::Signal(9));
    assert_eq!(spawns(&s.sup.take_actions()), vec![(1, 1)]);
    let slot = s.sup.slots().next().unwrap();
    assert_eq!(slot.last_exit.as_deref(), Some("no READY within 10s"));
    let id = s.spawn_all();
    assert!(id.is_empty(), "already taken above");
}

#[test]
fn a_program_that_cannot_start_backs_off() {
    let mut s = Script::new(1);
    s.sup.start(s.now);
    let id = s.spawn_all()[0];
    s.sup
        .spawn_failed(s.now, id, "/nope: No such file or directory".into());
    let actions = s.sup.take_actions();
    assert_eq!(spawns(&actions).len(), 1, "first retry at once");
    let id = actions
        .iter()
        .find_map(|a| match a {
            Action::Spawn { instance, .. } => Some(*instance),
            _ => None,
        })
        .unwrap();
    s.sup
        .spawn_failed(s.now, id, "/nope: No such file or directory".into());
    let actions = s.sup.take_actions();
    assert!(spawns(&actions).is_empty());
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::Backoff { delay, .. } if *delay == 100 * MS))
    );
    let slot = s.sup.slots().next().unwrap();
    assert_eq!(
        slot.last_exit.as_deref(),
        Some("failed to start: /nope: No such file or directory")
    );
}

#[test]
fn graceful_stop_drains_everything_respawns_nothing_and_exits_zero() {
    let mut s = Script::started(3);
    s.sup.stop(s.now, false);
    let actions = s.sup.take_actions();
    let drained = drains(&actions);
    assert_eq!(drained.len(), 3);
    assert_eq!(s.sup.operation().as_deref(), Some("stopping (3 left)"));
    assert!(s.sup.restart(s.now, 2).is_err());
    assert!(s.sup.scale(s.now, ScaleTo::Up(1)).is_err());
    s.sup.exited(s.now, drained[0], Exit::Code(0));
    s.sup.exited(s.now, drained[1], Exit::Signal(11));
    let actions = s.sup.take_actions();
    assert!(spawns(&actions).is_empty());
    assert!(!actions.contains(&Action::Exit { code: 0 }));
    s.sup.exited(s.now, drained[2], Exit::Code(0));
    assert!(s.sup.take_actions().contains(&Action::Exit { code: 0 }));
}

#[test]
fn fast_stop_terminates_then_kills_after_the_grace() {
    let mut s = Script::started(2);
    s.sup.stop(s.now, false);
    s.sup.take_actions();
    s.sup.stop(s.now, true);
    let actions = s.sup.take_actions();
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Terminate { .. }))
            .count(),
        2
    );
    s.advance(S);
    let killed = kills(&s.sup.take_actions());
    assert_eq!(killed.len(), 2);
    assert!(killed.iter().all(|(_, r)| *r == KillReason::FastStop));
    for (id, _) in killed {
        s.sup.exited(s.now, id, Exit::Signal(9));
    }
    assert!(s.sup.take_actions().contains(&Action::Exit { code: 0 }));
}

#[test]
fn stop_during_a_restart_aborts_it() {
    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.sup.stop(s.now, false);
    let actions = s.sup.take_actions();
    assert_eq!(
        aborted_reason(&actions).as_deref(),
        Some("clusterd is stopping")
    );
    assert_eq!(kills(&actions), vec![(new, KillReason::Aborted)]);
    assert_eq!(drains(&actions).len(), 2);
}

#[test]
fn durations_print_as_the_config_writes_them() {
    assert_eq!(human(Duration::ZERO), "0s");
    assert_eq!(human(250 * MS), "250ms");
    assert_eq!(human(10 * S), "10s");
    assert_eq!(human(150 * S), "2m30s");
    assert_eq!(human(3600 * S), "1h");
}

#[test]
fn ready_after_counts_a_silent_worker_as_ready_and_can_replace_with_it() {
    let mut s = Script::new(1);
    s.sup.set_timing(Timing {
        ready_after: Some(2 * S),
        ..timing()
    });
    s.sup.start(s.now);
    let id = s.spawn_all()[0];
    assert_eq!(s.sup.next_deadline(), Some(s.now + 2 * S));
    s.advance(2 * S);
    assert_eq!(s.sup.instance(id).unwrap().state, State::Ready);
    assert!(
        notices(&s.sup.take_actions())
            .iter()
            .any(|n| matches!(n, Notice::AllReady { .. }))
    );
    // A rolling restart waits for it too, then drains the old one.
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.advance(S);
    assert!(drains(&s.sup.take_actions()).is_empty());
    s.advance(S);
    assert_eq!(s.sup.instance(new).unwrap().state, State::Ready);
    assert_eq!(drains(&s.sup.take_actions()), vec![id]);
}

#[test]
fn ready_after_does_not_revive_a_worker_that_exited() {
    let mut s = Script::new(1);
    s.sup.set_timing(Timing {
        ready_after: Some(2 * S),
        ..timing()
    });
    s.sup.start(s.now);
    let id = s.spawn_all()[0];
    s.now += S;
    s.sup.exited(s.now, id, Exit::Code(1));
    assert!(s.sup.instance(id).is_none());
    let again = s.spawn_all();
    assert_eq!(again.len(), 1, "respawned at once");
    s.advance(S); // the first one's ready_after time passes
    assert_eq!(s.sup.ready(), 0);
}

// --- bake and rollback --------------------------------------------------------

/// A pool with a 5 s bake and the automatic rollback on (its window is 60 s).
fn baked(workers: u32) -> Script {
    let mut s = Script::new(workers);
    s.sup.set_timing(Timing {
        bake: 5 * S,
        rollback_window: 60 * S,
        ..timing()
    });
    s.sup.start(s.now);
    for id in s.spawn_all() {
        assert!(s.sup.ready_reported(s.now, id));
    }
    s.sup.take_actions();
    s
}

/// The newest starting instance (the replacement the rollout spawned),
/// given a pid and made READY. Leaves the actions for the caller.
fn ready_replacement(s: &mut Script, pid: u32) -> InstanceId {
    let id = s
        .sup
        .instances()
        .filter(|i| i.state == State::Starting)
        .map(|i| i.id)
        .max()
        .expect("a starting replacement");
    s.sup.spawned(id, pid);
    s.sup.ready_reported(s.now, id);
    id
}

fn baking(actions: &[Action]) -> Vec<(SlotId, &'static str)> {
    notices(actions)
        .into_iter()
        .filter_map(|n| match n {
            Notice::Baking { slot, role, .. } => Some((*slot, *role)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_canary_and_the_last_replacement_bake_while_the_old_workers_serve() {
    let mut s = baked(3);
    s.sup.restart(s.now, 2).unwrap();
    let old1 = s.ready_in_slot(1);
    let canary = ready_replacement(&mut s, 501);
    let actions = s.sup.take_actions();
    assert_eq!(baking(&actions), vec![(1, "canary")]);
    assert!(drains(&actions).is_empty(), "the old worker serves on");
    assert_eq!(s.sup.ready(), 4, "one above the count while baking");
    assert_eq!(s.sup.phase(), Phase::Baking);
    assert_eq!(
        s.sup.operation().as_deref(),
        Some("restart 0/3, canary baking")
    );
    assert_eq!(s.sup.next_deadline(), Some(s.now + 5 * S));
    s.advance(5 * S - MS);
    assert!(
        drains(&s.sup.take_actions()).is_empty(),
        "not before the bake"
    );
    s.advance(MS);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions), vec![old1]);
    assert_eq!(spawns(&actions), vec![(2, 2)], "then the next slot");
    // The middle one is only READY-gated.
    let old2 = s.ready_in_slot(2);
    ready_replacement(&mut s, 502);
    let actions = s.sup.take_actions();
    assert!(baking(&actions).is_empty());
    assert_eq!(drains(&actions), vec![old2]);
    // The last one bakes; the restart is done only after it.
    let old3 = s.ready_in_slot(3);
    ready_replacement(&mut s, 503);
    let actions = s.sup.take_actions();
    assert_eq!(baking(&actions), vec![(3, "last")]);
    assert!(drains(&actions).is_empty());
    assert_eq!(s.sup.generation(), 1, "not done yet");
    s.advance(5 * S);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions), vec![old3]);
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::RestartDone {
            generation: 2,
            replaced: 3,
            ..
        }
    )));
    assert_eq!(s.sup.generation(), 2);
    assert_eq!(s.sup.last_restart().unwrap().outcome, Outcome::Done);
    assert!(s.sup.instance(canary).is_some());
    // Generation 1 is kept for the rollback window, then forgotten.
    assert_eq!(s.sup.generations_in_use(), vec![1, 2]);
    s.advance(60 * S);
    for id in [old1, old2, old3] {
        s.sup.exited(s.now, id, Exit::Code(0));
    }
    assert_eq!(s.sup.generations_in_use(), vec![2]);
}

#[test]
fn a_single_worker_pool_bakes_its_one_replacement_once() {
    let mut s = baked(1);
    s.sup.restart(s.now, 2).unwrap();
    ready_replacement(&mut s, 501);
    assert_eq!(baking(&s.sup.take_actions()), vec![(1, "canary")]);
    s.advance(5 * S);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions).len(), 1);
    assert!(baking(&actions).is_empty());
    assert_eq!(s.sup.generation(), 2);
}

#[test]
fn a_canary_that_dies_while_baking_rolls_back_with_nothing_to_replace() {
    let mut s = baked(4);
    s.sup.restart(s.now, 2).unwrap();
    let old1 = s.ready_in_slot(1);
    let canary = ready_replacement(&mut s, 501);
    s.sup.take_actions();
    s.now += 300 * MS;
    s.sup.exited(s.now, canary, Exit::Code(3));
    let actions = s.sup.take_actions();
    let (from, to, reason, slots) = rollback_begun(&actions).expect("rollback");
    assert_eq!((from, to, slots), (2, 1, 0));
    assert_eq!(
        reason,
        "the canary for worker 1 (pid 501) ended with exit 3 0.3s after READY"
    );
    assert_eq!(rolled_back(&actions), Some((2, 1, 0, 0, true)));
    assert!(spawns(&actions).is_empty() && drains(&actions).is_empty());
    assert!(kills(&actions).is_empty());
    assert_eq!(s.sup.ready(), 4, "the old workers never stopped serving");
    assert_eq!(s.ready_in_slot(1), old1);
    assert_eq!(s.sup.generation(), 1);
    assert!(s.sup.slots().all(|sl| sl.restarts == 0));
    assert_eq!(s.sup.generations_in_use(), vec![1]);
    // The next restart is allowed.
    s.sup.restart(s.now, 3).unwrap();
}

#[test]
fn a_new_worker_crashing_after_ready_rolls_back_even_the_baking_last_replacement() {
    let mut s = baked(3);
    s.sup.restart(s.now, 2).unwrap();
    let new1 = ready_replacement(&mut s, 501);
    s.advance(5 * S);
    let new2 = ready_replacement(&mut s, 502);
    s.sup.take_actions();
    let new3 = ready_replacement(&mut s, 503);
    let actions = s.sup.take_actions();
    assert_eq!(baking(&actions), vec![(3, "last")]);
    let old3 = s.ready_in_slot(3);
    assert_ne!(old3, new3);
    // Worker 2 of the new generation dies 1 s after READY, during the last bake.
    s.now += S;
    s.sup.exited(s.now, new2, Exit::Signal(11));
    let actions = s.sup.take_actions();
    let (from, to, reason, slots) = rollback_begun(&actions).expect("rollback");
    assert_eq!((from, to), (2, 1));
    assert!(
        reason.starts_with("worker 2 (pid 502) of generation 2 ended with signal 11"),
        "{reason}"
    );
    assert_eq!(
        slots, 1,
        "slot 1; slot 2 respawns; slot 3 still has its old worker"
    );
    assert_eq!(
        drains(&actions),
        vec![new3],
        "the baking replacement drains: nothing is killed"
    );
    assert!(kills(&actions).is_empty());
    let mut spawned = spawns(&actions);
    spawned.sort();
    assert_eq!(
        spawned,
        vec![(1, 1), (2, 1)],
        "slot 2 respawns with generation 1 at once; slot 1 gets a replacement"
    );
    let slot2 = s.sup.slots().find(|sl| sl.id == 2).unwrap();
    assert_eq!(slot2.restarts, 1, "the crash is counted");
    // Slot 1's replacement is READY: its generation-2 worker drains.
    let back = s
        .sup
        .instances()
        .find(|i| i.slot == 1 && i.generation == 1 && i.state == State::Starting)
        .unwrap()
        .id;
    s.sup.ready_reported(s.now, back);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions), vec![new1]);
    assert_eq!(rolled_back(&actions), Some((2, 1, 2, 1, true)));
}

#[test]
fn a_rollback_whose_replacement_fails_stops_and_says_so() {
    let mut s = baked(2);
    s.sup.restart(s.now, 2).unwrap();
    ready_replacement(&mut s, 501);
    s.advance(5 * S);
    let new2 = ready_replacement(&mut s, 502);
    s.sup.take_actions();
    s.sup.exited(s.now, new2, Exit::Code(1));
    s.sup.take_actions();
    // Slot 2 respawned as generation 1; slot 1 waits for its replacement.
    let back = s
        .sup
        .instances()
        .find(|i| i.slot == 1 && i.generation == 1 && i.state == State::Starting)
        .unwrap()
        .id;
    assert_eq!(s.sup.phase(), Phase::RollingBack);
    let err = s.sup.restart(s.now, 3).unwrap_err();
    assert!(
        err.contains("rollback to generation 1 is in progress"),
        "{err}"
    );
    s.sup.exited(s.now, back, Exit::Code(127));
    let actions = s.sup.take_actions();
    let (from, to, _, restored, complete) = rolled_back(&actions).unwrap();
    assert_eq!((from, to, restored, complete), (2, 1, 0, false));
    let last = s.sup.last_restart().unwrap();
    assert_eq!(last.outcome, Outcome::RollbackFailed);
    assert!(
        last.reason
            .as_deref()
            .unwrap()
            .contains("then the rollback failed"),
        "{last:?}"
    );
    assert_eq!(s.sup.phase(), Phase::Running);
    // Slot 1's generation-2 worker serves on; the slot respawns generation 1.
    assert_eq!(
        s.sup.slots().map(|sl| sl.generation).collect::<Vec<_>>(),
        [1, 1]
    );
}

#[test]
fn a_replacement_that_fails_before_anything_served_is_only_an_abort() {
    let mut s = baked(2);
    s.sup.restart(s.now, 2).unwrap();
    let new = s.spawn_all()[0];
    s.advance(10 * S);
    let actions = s.sup.take_actions();
    assert_eq!(kills(&actions), vec![(new, KillReason::Aborted)]);
    assert!(
        aborted_reason(&actions)
            .unwrap()
            .contains("the canary for worker 1")
    );
    assert!(rollback_begun(&actions).is_none());
    assert_eq!(s.sup.last_restart().unwrap().outcome, Outcome::Aborted);
    assert_eq!(s.sup.last_restart().unwrap().generation, 1);
}

/// A baked pool that finished a restart to generation 2.
fn restarted(workers: u32) -> Script {
    let mut s = baked(workers);
    s.sup.restart(s.now, 2).unwrap();
    for slot in 1..=workers {
        ready_replacement(&mut s, 500 + slot);
        if slot == 1 || slot == workers {
            s.advance(5 * S);
        }
    }
    let old: Vec<InstanceId> = s
        .sup
        .instances()
        .filter(|i| i.generation == 1)
        .map(|i| i.id)
        .collect();
    for id in old {
        s.sup.exited(s.now, id, Exit::Code(0));
    }
    s.sup.take_actions();
    assert_eq!(s.sup.generation(), 2);
    s
}

#[test]
fn a_generation_failing_twice_right_after_its_restart_is_rolled_back() {
    let mut s = restarted(3);
    s.advance(10 * S);
    let w1 = s.ready_in_slot(1);
    s.sup.exited(s.now, w1, Exit::Code(3));
    let actions = s.sup.take_actions();
    assert!(
        rollback_begun(&actions).is_none(),
        "one crash is not enough"
    );
    assert_eq!(spawns(&actions), vec![(1, 2)], "respawned as generation 2");
    s.spawn_all();
    s.now += 200 * MS;
    let w2 = s.ready_in_slot(2);
    s.sup.exited(s.now, w2, Exit::Code(3));
    let actions = s.sup.take_actions();
    let (from, to, reason, slots) = rollback_begun(&actions).expect("rollback");
    assert_eq!((from, to), (2, 1));
    assert!(
        reason.starts_with("generation 2 failed 2 times within 1m of its restart (the last: worker 2 (pid 502) ended with exit 3"),
        "{reason}"
    );
    // Slot 1's respawn (starting, generation 2) and slot 3 need replacing;
    // slot 2 respawns straight into generation 1.
    assert_eq!(slots, 2);
    let mut spawned = spawns(&actions);
    spawned.sort();
    assert_eq!(spawned, vec![(1, 1), (2, 1)]);
    assert_eq!(s.sup.generation(), 1);
    assert_eq!(s.sup.phase(), Phase::RollingBack);
}

#[test]
fn crashes_after_the_window_or_with_rollback_off_only_respawn() {
    let mut s = restarted(2);
    s.advance(61 * S);
    for slot in [1, 2] {
        let w = s.ready_in_slot(slot);
        s.sup.exited(s.now, w, Exit::Code(3));
    }
    let actions = s.sup.take_actions();
    assert!(rollback_begun(&actions).is_none());
    assert_eq!(
        s.sup.generations_in_use(),
        vec![2],
        "generation 1 forgotten"
    );

    let mut s = Script::started(2);
    s.sup.restart(s.now, 2).unwrap();
    for _ in 0..2 {
        ready_replacement(&mut s, 600);
    }
    s.sup.take_actions();
    assert_eq!(s.sup.generation(), 2);
    for slot in [1, 2] {
        let w = s.ready_in_slot(slot);
        s.sup.exited(s.now, w, Exit::Code(3));
    }
    assert!(
        rollback_begun(&s.sup.take_actions()).is_none(),
        "rollback = off"
    );
}

#[test]
fn one_worker_restarts_ready_gated_and_baked() {
    let mut s = baked(2);
    let err = s.sup.restart_worker(s.now, 3).unwrap_err();
    assert_eq!(err, "there is no worker 3 (the workers are 1 to 2)");
    let old = s.ready_in_slot(2);
    s.sup.restart_worker(s.now, 2).unwrap();
    let actions = s.sup.take_actions();
    assert_eq!(spawns(&actions), vec![(2, 1)], "same generation");
    assert!(notices(&actions).contains(&&Notice::RestartBegun {
        generation: 1,
        total: 1,
        worker: Some(2)
    }));
    assert_eq!(s.sup.operation().as_deref(), Some("restart of worker 2"));
    let err = s.sup.restart(s.now, 2).unwrap_err();
    assert!(err.contains("restart of worker 2 is in progress"), "{err}");
    let new = s.live_in_slot(2).into_iter().max().unwrap();
    s.sup.spawned(new, 900);
    s.sup.ready_reported(s.now, new);
    assert_eq!(baking(&s.sup.take_actions()), vec![(2, "worker")]);
    s.advance(5 * S);
    let actions = s.sup.take_actions();
    assert_eq!(drains(&actions), vec![old]);
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::RestartDone {
            generation: 1,
            replaced: 1,
            worker: Some(2),
            ..
        }
    )));
    assert_eq!(s.sup.generation(), 1);

    // A replacement that fails is an abort: the old worker serves on.
    let old = s.ready_in_slot(1);
    s.sup.restart_worker(s.now, 1).unwrap();
    let new = s.spawn_all()[0];
    s.sup.exited(s.now, new, Exit::Code(1));
    let actions = s.sup.take_actions();
    assert!(aborted_reason(&actions).is_some());
    assert!(rollback_begun(&actions).is_none());
    assert_eq!(s.ready_in_slot(1), old);
}

#[test]
fn stopping_ends_a_rollback() {
    let mut s = baked(2);
    s.sup.restart(s.now, 2).unwrap();
    ready_replacement(&mut s, 501);
    s.sup.take_actions();
    s.advance(5 * S);
    let new2 = s.spawn_all()[0];
    s.sup.exited(s.now, new2, Exit::Code(1));
    let actions = s.sup.take_actions();
    assert!(rollback_begun(&actions).is_some(), "{actions:#?}");
    assert_eq!(s.sup.phase(), Phase::RollingBack);
    s.sup.stop(s.now, false);
    let actions = s.sup.take_actions();
    let (.., complete) = rolled_back(&actions).expect("ended");
    assert!(!complete);
    assert_eq!(s.sup.phase(), Phase::Stopping);
    assert!(s.sup.operation().unwrap().starts_with("stopping"));
}

#[test]
fn a_canary_failing_far_more_requests_than_the_old_workers_fails_its_bake() {
    let outcomes = |requests, failed| Outcomes { requests, failed };
    // The old workers fail 1 in 1000; the canary 30 of its 40.
    let mut s = baked(2);
    let olds: Vec<InstanceId> = (1..=2).map(|slot| s.ready_in_slot(slot)).collect();
    for &id in &olds {
        s.sup.outcomes_reported(s.now, id, outcomes(5000, 5));
    }
    s.sup.restart(s.now, 2).unwrap();
    let canary = ready_replacement(&mut s, 501);
    s.sup.take_actions();
    for &id in &olds {
        s.sup.outcomes_reported(s.now, id, outcomes(6000, 6));
    }
    s.sup.outcomes_reported(s.now, canary, outcomes(40, 30));
    s.advance(5 * S);
    let actions = s.sup.take_actions();
    let (from, to, reason, slots) = rollback_begun(&actions).expect("a rollback");
    assert_eq!((from, to, slots), (2, 1, 0));
    assert_eq!(
        reason,
        "the canary for worker 1 (pid 501) failed 30 of its 40 requests during its bake (75%; the workers it replaces 0.1%)"
    );
    assert_eq!(drains(&actions), vec![canary], "drained, not killed");
    assert_eq!(s.sup.ready(), 2);

    // As bad as the old workers, or too few requests to judge: it passes.
    for (old, new) in [((6000, 600), (40, 5)), ((6000, 6), (19, 19))] {
        let mut s = baked(2);
        let olds: Vec<InstanceId> = (1..=2).map(|slot| s.ready_in_slot(slot)).collect();
        s.sup.restart(s.now, 2).unwrap();
        let canary = ready_replacement(&mut s, 501);
        s.sup.take_actions();
        for &id in &olds {
            s.sup.outcomes_reported(s.now, id, outcomes(old.0, old.1));
        }
        s.sup
            .outcomes_reported(s.now, canary, outcomes(new.0, new.1));
        s.advance(5 * S);
        let actions = s.sup.take_actions();
        assert!(rollback_begun(&actions).is_none(), "{old:?} {new:?}");
        assert_eq!(spawns(&actions), vec![(2, 2)], "the restart goes on");
    }
}

// --- health -----------------------------------------------------------------

fn healthy(workers: u32, tweak: impl FnOnce(&mut Timing)) -> Script {
    let mut t = timing();
    tweak(&mut t);
    let mut s = Script::new(workers);
    s.sup.set_timing(t);
    s.sup.start(s.now);
    for id in s.spawn_all() {
        assert!(s.sup.ready_reported(s.now, id));
    }
    s.sup.take_actions();
    s
}

fn signals(actions: &[Action]) -> Vec<InstanceId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { instance } => Some(*instance),
            _ => None,
        })
        .collect()
}

#[test]
fn a_silent_worker_is_replaced_first_then_signalled_then_killed() {
    let mut s = healthy(2, |t| t.watchdog = Some(10 * S));
    let (w1, w2) = (s.ready_in_slot(1), s.ready_in_slot(2));
    s.advance(6 * S);
    s.sup.heartbeat(s.now, w2);
    assert_eq!(
        s.sup.next_deadline(),
        Some(s.now + 4 * S),
        "worker 1's watchdog"
    );
    s.advance(4 * S);
    let actions = s.sup.take_actions();
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::Hung {
            slot: 1,
            silent,
            ..
        } if *silent == 10 * S
    )));
    assert_eq!(spawns(&actions), vec![(1, 1)], "its replacement first");
    assert!(signals(&actions).is_empty() && kills(&actions).is_empty());
    assert_eq!(s.sup.ready(), 1, "a hung worker is not capacity");
    let slot = s.sup.slots().find(|sl| sl.id == 1).unwrap();
    assert_eq!(slot.last_exit.as_deref(), Some("watchdog: silent 10s"));
    assert_eq!(s.sup.take_replacements(), vec![HealthReason::Watchdog]);
    // The replacement is READY: the hung one gets its diagnostic signal...
    let new = s.live_in_slot(1)[0];
    s.sup.spawned(new, 900);
    s.sup.ready_reported(s.now, new);
    assert_eq!(signals(&s.sup.take_actions()), vec![w1]);
    // ...and SIGKILL after the grace, unless it exits first.
    s.advance(5 * S);
    assert_eq!(
        kills(&s.sup.take_actions()),
        vec![(w1, KillReason::Watchdog)]
    );
    s.sup.exited(s.now, w1, Exit::Signal(9));
    let actions = s.sup.take_actions();
    assert!(spawns(&actions).is_empty(), "expected: no second respawn");
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::Exited { expected: true, .. }))
    );
    assert_eq!(s.sup.ready(), 2);
}

#[test]
fn a_hung_worker_whose_replacement_is_slow_is_signalled_at_ready_timeout() {
    let mut s = healthy(1, |t| t.watchdog = Some(S));
    let old = s.ready_in_slot(1);
    s.advance(S);
    s.spawn_all();
    s.advance(10 * S);
    let actions = s.sup.take_actions();
    assert_eq!(
        signals(&actions),
        vec![old],
        "not held up by the replacement"
    );
}

#[test]
fn watchdog_trigger_and_extend_timeout() {
    let mut s = healthy(1, |t| t.watchdog = Some(10 * S));
    let w = s.ready_in_slot(1);
    s.sup.watchdog_triggered(s.now, w);
    let actions = s.sup.take_actions();
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::Hung { silent, .. } if silent.is_zero()))
    );
    assert_eq!(spawns(&actions), vec![(1, 1)]);
    // EXTEND_TIMEOUT_USEC moves a starting worker's deadline.
    let new = s.live_in_slot(1)[0];
    s.sup.extend_deadline(s.now, new, 30 * S);
    s.advance(20 * S);
    assert!(
        kills(&s.sup.take_actions())
            .iter()
            .all(|(id, _)| *id != new)
    );
}

#[test]
fn max_requests_and_max_age_recycle_one_worker_at_a_time_ready_gated() {
    let mut s = healthy(3, |t| {
        t.max_requests = Some(1000);
        t.max_age = Some(3600 * S);
    });
    let ids: Vec<InstanceId> = (1..=3).map(|slot| s.ready_in_slot(slot)).collect();
    for &id in &ids {
        s.sup.outcomes_reported(
            s.now,
            id,
            Outcomes {
                requests: 2000,
                failed: 0,
            },
        );
    }
    let actions = s.sup.take_actions();
    let queued = notices(&actions)
        .iter()
        .filter(|n| matches!(n, Notice::RecycleQueued { .. }))
        .count();
    assert_eq!(queued, 3);
    assert_eq!(spawns(&actions), vec![(1, 1)], "one at a time");
    assert!(drains(&actions).is_empty(), "READY-gated");
    assert_eq!(s.sup.phase(), Phase::Running);
    assert_eq!(
        s.sup.operation().as_deref(),
        Some("replacing worker 1 (max_requests)")
    );
    for slot in 1..=3 {
        let new = ready_replacement(&mut s, 700 + slot);
        let actions = s.sup.take_actions();
        assert_eq!(
            drains(&actions),
            vec![ids[slot as usize - 1]],
            "then the old one drains"
        );
        assert!(notices(&actions).iter().any(|n| matches!(
            n,
            Notice::Recycled { slot: sl, reason: HealthReason::MaxRequests { .. }, .. } if *sl == slot
        )));
        if slot < 3 {
            assert_eq!(spawns(&actions), vec![(slot + 1, 1)], "the next one");
        }
        s.sup.outcomes_reported(
            s.now,
            new,
            Outcomes {
                requests: 10,
                failed: 0,
            },
        );
        s.sup.exited(s.now, ids[slot as usize - 1], Exit::Code(0));
    }
    assert_eq!(s.sup.recycles_queued(), 0);
    assert_eq!(s.sup.take_replacements().len(), 3);
    // An hour (plus jitter) later, max_age.
    let before = s.sup.next_deadline().expect("an age");
    assert!(before >= s.now + 3600 * S && before <= s.now + 3960 * S);
    s.now = before;
    s.sup.tick(s.now);
    let actions = s.sup.take_actions();
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::RecycleQueued {
            reason: HealthReason::MaxAge,
            ..
        }
    )));
    assert_eq!(spawns(&actions).len(), 1);
}

#[test]
fn memory_recycles_and_a_restart_supersedes_recycles() {
    let mut s = healthy(2, |_| {});
    let w1 = s.ready_in_slot(1);
    s.sup.memory_exceeded(s.now, w1, 300 << 20, 256 << 20);
    s.sup.memory_exceeded(s.now, w1, 310 << 20, 256 << 20);
    let actions = s.sup.take_actions();
    assert_eq!(spawns(&actions), vec![(1, 1)], "queued once");
    // A rolling restart replaces every worker anyway: the recycle gives way.
    s.sup.restart(s.now, 2).unwrap();
    let actions = s.sup.take_actions();
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::RecycleFailed { slot: 1, .. }))
    );
    assert_eq!(spawns(&actions), vec![(1, 2)]);
    assert_eq!(s.sup.recycles_queued(), 0);
}

#[test]
fn a_recycle_whose_replacement_fails_leaves_the_worker_serving() {
    let mut s = healthy(1, |t| t.max_requests = Some(10));
    let w = s.ready_in_slot(1);
    s.sup.outcomes_reported(
        s.now,
        w,
        Outcomes {
            requests: 20,
            failed: 0,
        },
    );
    let new = s.spawn_all()[0];
    s.sup.exited(s.now, new, Exit::Code(1));
    let actions = s.sup.take_actions();
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::RecycleFailed { .. }))
    );
    assert_eq!(s.ready_in_slot(1), w);
    // Not queued again (it would fail again): it serves until it exits.
    s.sup.outcomes_reported(
        s.now,
        w,
        Outcomes {
            requests: 30,
            failed: 0,
        },
    );
    assert!(spawns(&s.sup.take_actions()).is_empty());
}

/// Worker `slot` exits 1 as soon as it starts; returns the actions of the
/// exit, then lets the respawn happen (at its backoff).
fn crash_now(s: &mut Script, slot: SlotId) -> Vec<Action> {
    let id = s
        .sup
        .instances()
        .find(|i| i.slot == slot && i.live())
        .map(|i| i.id)
        .expect("a live worker");
    s.sup.exited(s.now, id, Exit::Code(1));
    let actions = s.sup.take_actions();
    if spawns(&actions).is_empty() && !s.sup.is_stopping() {
        s.now = s.sup.next_deadline().expect("a respawn");
        s.sup.tick(s.now);
        s.sup.take_actions();
    }
    actions
}

#[test]
fn a_crash_loop_is_reported_and_with_exit_clusterd_stops_with_1() {
    let mut s = healthy(2, |t| t.crash_loop = Some(3));
    crash_now(&mut s, 2);
    crash_now(&mut s, 2);
    assert_eq!(s.sup.crash_loop(s.now), None);
    let actions = crash_now(&mut s, 2);
    assert!(notices(&actions).iter().any(|n| matches!(
        n,
        Notice::CrashLoop {
            slot: 2,
            streak: 3,
            exiting: false,
            ..
        }
    )));
    assert_eq!(s.sup.crash_loop(s.now), Some((2, 3)));
    assert!(!s.sup.is_stopping(), "backoff: it goes on");

    let mut s = healthy(1, |t| {
        t.crash_loop = Some(2);
        t.exit_on_crash_loop = true;
    });
    crash_now(&mut s, 1);
    let actions = crash_now(&mut s, 1);
    assert!(
        notices(&actions)
            .iter()
            .any(|n| matches!(n, Notice::CrashLoop { exiting: true, .. }))
    );
    assert!(s.sup.is_stopping());
    assert!(actions.contains(&Action::Exit { code: 1 }), "{actions:?}");
}

#[test]
fn a_lame_duck_serves_until_its_delay_then_drains_and_a_second_stop_skips_it() {
    let mut s = Script::started(2);
    s.sup.stop_after(s.now, 10 * S);
    let actions = s.sup.take_actions();
    assert!(notices(&actions).contains(&&Notice::LameDuck { delay: 10 * S }));
    assert!(drains(&actions).is_empty(), "still serving");
    assert!(s.sup.is_stopping(), "/healthz fails");
    assert_eq!(s.sup.phase(), Phase::LameDuck);
    assert!(s.sup.restart(s.now, 2).is_err(), "no restart now");
    // A crash while serving is still replaced.
    s.advance(60 * MS);
    let w = s.ready_in_slot(1);
    s.sup.exited(s.now, w, Exit::Signal(9));
    let respawned = s.spawn_all();
    assert_eq!(respawned.len(), 1, "respawned while serving");
    s.sup.ready_reported(s.now, respawned[0]);
    s.sup.take_actions();
    s.now += 10 * S;
    s.sup.tick(s.now);
    assert_eq!(drains(&s.sup.take_actions()).len(), 2, "then the drain");
    assert_eq!(s.sup.phase(), Phase::Stopping);

    let mut s = Script::started(1);
    s.sup.stop_after(s.now, 10 * S);
    s.sup.take_actions();
    s.sup.stop_after(s.now, 10 * S);
    assert_eq!(
        drains(&s.sup.take_actions()).len(),
        1,
        "a second TERM skips the rest"
    );
}
