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
fn an_abort_midway_keeps_replaced_slots_and_respawns_the_rest_with_their_own_generation() {
    let mut s = Script::started(3);
    s.sup.restart(s.now, 2).unwrap();
    let new1 = s.spawn_all()[0];
    s.sup.ready_reported(s.now, new1);
    let new2 = s.spawn_all()[0];
    s.sup.exited(s.now, new2, Exit::Code(1));
    assert!(aborted_reason(&s.sup.take_actions()).is_some());
    let gens: Vec<u64> = s.sup.slots().map(|sl| sl.generation).collect();
    assert_eq!(gens, vec![2, 1, 1]);
    // Slot 3 (still generation 1) crashes: it comes back as generation 1.
    s.advance(60 * S);
    let old3 = s.ready_in_slot(3);
    s.sup.exited(s.now, old3, Exit::Signal(11));
    assert_eq!(spawns(&s.sup.take_actions()), vec![(3, 1)]);
    assert_eq!(s.sup.generations_in_use(), vec![1, 2]);
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
    assert!(err.contains("already in progress (0/2"), "{err}");
    let err = s.sup.scale(s.now, ScaleTo::Up(1)).unwrap_err();
    assert!(err.contains("rolling restart is in progress"), "{err}");
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
