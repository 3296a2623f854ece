//! Rolling restarts (HUP): every worker replaced with zero failed requests
//! (guarantees 2 and 3), aborted restarts that keep the old workers serving,
//! and clients that go away mid-request.

use std::collections::BTreeSet;
use std::io::Write as _;

use rustix::process::Signal;

use crate::util::*;

/// The lines of the restart to `generation`: from its `restart.begin` to its
/// `restart.done` or `restart.aborted` (or the end of the log).
fn restart_lines(cluster: &Cluster, generation: u64) -> Vec<LogLine> {
    let lines = cluster.lines();
    let is_gen = |l: &LogLine, event: &str| {
        l.event == event && l.get("generation") == Some(generation.to_string().as_str())
    };
    let begin = lines
        .iter()
        .position(|l| is_gen(l, "restart.begin"))
        .unwrap_or_else(|| panic!("no restart.begin generation={generation}"));
    let end = lines[begin..]
        .iter()
        .position(|l| is_gen(l, "restart.done") || is_gen(l, "restart.aborted"))
        .map_or(lines.len(), |i| begin + i + 1);
    lines[begin..end].to_vec()
}

/// Three HUPs in a row, each under four loads (keep-alive and new-connection,
/// GET and POST): each replaces both workers one by one (two
/// `restart.progress` lines, new pids, generation + 1), the old workers
/// drain and exit 0 (never killed), and not one request fails.
#[test]
fn hup_under_load_replaces_every_worker_without_a_failed_request() {
    let cluster = Cluster::shop("hup", 2, "");
    cluster.wait_ready(1);
    let loads = mixed_load(cluster.addr());
    let mut current: BTreeSet<u32> = [1, 2].map(|id| cluster.ready_pid(id, 1)).into();

    for generation in 2..=4u64 {
        let_loads_run(&loads, 10);
        cluster.signal(Signal::HUP);
        let done = cluster.wait_event("restart.done", |l| l.num("generation") == generation);
        assert_eq!(done.num("replaced"), 2, "{}", done.raw);
        let lines = restart_lines(&cluster, generation);
        let progress: Vec<&LogLine> = lines
            .iter()
            .filter(|l| l.event == "restart.progress")
            .collect();
        assert_eq!(
            progress.len(),
            2,
            "one progress line per worker: {lines:#?}"
        );
        let old: BTreeSet<u32> = progress.iter().map(|l| l.num("old_pid") as u32).collect();
        let new: BTreeSet<u32> = progress.iter().map(|l| l.num("new_pid") as u32).collect();
        assert_eq!(
            old, current,
            "every worker of the last generation is replaced"
        );
        assert!(old.is_disjoint(&new), "new pids: {old:?} -> {new:?}");
        // One replacement at a time, each READY before the worker it
        // replaces is told to drain (guarantee 2): spawn, ready, drain of
        // the old one, and only then the next spawn.
        let at = |event: &str, pid: u64| {
            lines
                .iter()
                .position(|l| l.event == event && l.get("pid") == Some(pid.to_string().as_str()))
                .unwrap_or_else(|| panic!("no {event} pid={pid} in {lines:#?}"))
        };
        let mut previous_ready = 0;
        for p in &progress {
            let (old_pid, new_pid) = (p.num("old_pid"), p.num("new_pid"));
            let spawn = at("worker.spawn", new_pid);
            assert_eq!(
                lines[spawn].num("generation"),
                generation,
                "{}",
                lines[spawn].raw
            );
            let ready = at("worker.ready", new_pid);
            let drain = at("worker.drain", old_pid);
            assert!(
                previous_ready < spawn && spawn < ready && ready < drain,
                "replacement order for {old_pid} -> {new_pid}: {lines:#?}"
            );
            previous_ready = ready;
        }
        cluster.wait_ready(generation);

        // The old workers drained and exited by themselves.
        let old: Vec<u32> = old.into_iter().collect();
        for exit in cluster.wait_exits(&old) {
            assert_eq!(exit.event, "worker.exit", "{}", exit.raw);
            assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
        }
        let children: BTreeSet<u32> = cluster.worker_pids().into_iter().collect();
        assert_eq!(children, new, "exactly the new workers run");
        current = new;
    }
    let_loads_run(&loads, 10);
    assert!(
        cluster.events("worker.kill").is_empty(),
        "nobody was killed"
    );
    assert_eq!(cluster.status_json()["generation"], 4);
    finish_loads(loads);
}

/// HUP after `exec` was changed to a program that exits 1, then to one that
/// never reports READY, then to one that does not exist: each restart is
/// aborted (or refused) with the reason, the old workers (same pids) keep
/// serving, and not one request fails meanwhile.
#[test]
fn a_bad_deploy_aborts_the_restart_and_the_old_workers_keep_serving() {
    let cluster = Cluster::shop("baddeploy", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let loads = mixed_load(addr);
    let old: BTreeSet<u32> = [1, 2].map(|id| cluster.ready_pid(id, 1)).into();
    let same_workers = || {
        let children: BTreeSet<u32> = cluster.worker_pids().into_iter().collect();
        assert_eq!(children, old, "the old workers, and only them, run");
    };

    // A program that exits 1.
    cluster.set_config("exec", "/bin/false");
    cluster.signal(Signal::HUP);
    let aborted = cluster.wait_event("restart.aborted", |l| l.num("generation") == 2);
    let reason = aborted.get("reason").unwrap_or_default();
    assert!(
        reason.contains("exit 1") && reason.contains("before it was ready"),
        "the reason names the cause: {}",
        aborted.raw
    );
    assert_eq!(aborted.num("replaced"), 0, "{}", aborted.raw);
    let failed = restart_lines(&cluster, 2)
        .into_iter()
        .find(|l| l.event == "worker.spawn")
        .expect("the replacement was spawned")
        .num("pid") as u32;
    cluster.wait_exits(&[failed]);
    same_workers();
    let_loads_run(&loads, 10);

    // A program that never reports READY.
    cluster.set_config("exec", "/bin/sleep 1000");
    cluster.set_config("ready_timeout", "1s");
    cluster.signal(Signal::HUP);
    let aborted = cluster.wait_event("restart.aborted", |l| l.num("generation") == 3);
    let reason = aborted.get("reason").unwrap_or_default();
    assert!(
        reason.contains("did not report READY within 1s"),
        "the reason names the cause: {}",
        aborted.raw
    );
    let sleeper = restart_lines(&cluster, 3)
        .into_iter()
        .find(|l| l.event == "worker.spawn")
        .expect("the replacement was spawned")
        .num("pid") as u32;
    let kill = cluster.wait_event("worker.kill", |l| l.num("pid") == u64::from(sleeper));
    assert_eq!(kill.get("reason"), Some("restart_aborted"), "{}", kill.raw);
    cluster.wait_exits(&[sleeper]);
    assert!(!alive(sleeper));
    same_workers();
    let_loads_run(&loads, 10);

    // A program that does not exist: the config no longer loads, the restart
    // is refused, naming the program.
    cluster.set_config("exec", "/nonexistent/shop-v2");
    cluster.signal(Signal::HUP);
    let refused = cluster.wait_event("restart.refused", |_| true);
    assert!(
        refused
            .get("reason")
            .is_some_and(|r| r.contains("/nonexistent/shop-v2")),
        "{}",
        refused.raw
    );
    same_workers();
    let_loads_run(&loads, 10);

    for pid in &old {
        assert!(alive(*pid), "old worker {pid} still runs");
    }
    let status = cluster.status_json();
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["ready"], 2, "{status}");
    finish_loads(loads);
}

/// Clients that send a whole `POST /checkout` (or a part of its body) and
/// go away before the 50 ms answer, just before a HUP: the old workers still
/// finish their drain and exit by themselves, long before the 60 s
/// drain_timeout would have killed them, leaving exactly two workers.
#[test]
fn clients_gone_mid_checkout_do_not_hold_up_a_restart() {
    let cluster = Cluster::shop("abandon", 2, "drain_timeout = 60s");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let old = [1, 2].map(|id| cluster.ready_pid(id, 1));

    for i in 0..12 {
        let mut s = connect(addr);
        match i % 3 {
            // The whole request, then a close (FIN).
            0 => s
                .write_all(&request("POST", "/checkout", CART, false))
                .unwrap(),
            // The whole request, then a reset (SO_LINGER 0).
            1 => {
                s.write_all(&request("POST", "/checkout", CART, false))
                    .unwrap();
                rustix::net::sockopt::set_socket_linger(&s, Some(std::time::Duration::ZERO))
                    .unwrap();
            }
            // The head and half the body, then a close.
            _ => {
                let req = request("POST", "/checkout", CART, false);
                s.write_all(&req[..req.len() - CART.len() / 2]).unwrap();
            }
        }
        drop(s);
    }
    cluster.signal(Signal::HUP);
    cluster.wait_event("restart.done", |l| l.num("generation") == 2);

    // DEADLINE (30 s) is half the drain_timeout: an exit seen within it was
    // not a SIGKILL at drain_timeout.
    for exit in cluster.wait_exits(&old) {
        assert_eq!(exit.event, "worker.exit", "{}", exit.raw);
        assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
    }
    assert!(
        cluster.events("worker.kill").is_empty(),
        "no worker was killed"
    );
    assert_eq!(cluster.worker_pids().len(), 2, "exactly two workers");
    let resp = get(addr, "/products/1").unwrap();
    assert_eq!(resp.status, 200);
}
