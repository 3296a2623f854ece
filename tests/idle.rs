//! Idle workers stay asleep: a native worker with nothing to do is never
//! woken (no stats tick, no polling), before and after it served requests.

use std::time::Duration;

use crate::util::*;

/// How long each idle window is watched.
const WINDOW: Duration = Duration::from_secs(3);

/// The most context switches a worker may make in a [`WINDOW`] of idleness.
///
/// An idle worker's threads all sleep in the kernel with no timer armed, so
/// the honest figure is 0 (measured: 0 over 10 s, release and debug builds).
/// The allowance covers a stray wake-up that is not the worker's doing (a
/// signal, memory reclaim touching it on a loaded 2-core machine) without
/// letting any periodic wake-up through: the old 1 s stats tick cost 4-5
/// switches a tick across the worker's threads (the tick, the reactor
/// handing over, async-io's driver thread), 12-15 per window. It is a count,
/// not a timing: a slow machine makes no switches that an idle worker would
/// not make anyway.
const MAX_SWITCHES: u64 = 3;

/// Voluntary plus involuntary context switches of every thread of `pid`
/// (`/proc/PID/task/*/status`).
fn context_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("no /proc/{pid}/task: {e}"));
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that just ended
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .map(|v| v.trim().parse::<u64>().expect("a switch count"))
            .sum::<u64>();
    }
    total
}

/// Worker `id`'s `(requests, active)` in `clusterctl status --json`, once it
/// has reported them.
fn reported(cluster: &Cluster, id: u64) -> Option<(u64, u64)> {
    let status = cluster.status_json();
    let worker = status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id)?
        .clone();
    Some((worker["requests"].as_u64()?, worker["active"].as_u64()?))
}

/// Watches `pids` for a [`WINDOW`]: fails as soon as one of them has made
/// more than [`MAX_SWITCHES`] context switches.
fn assert_asleep(what: &str, pids: &[u32]) {
    let before: Vec<u64> = pids.iter().map(|&p| context_switches(p)).collect();
    let mut seen = vec![0; pids.len()];
    let woke = eventually(WINDOW, || {
        for (i, &pid) in pids.iter().enumerate() {
            seen[i] = context_switches(pid) - before[i];
        }
        seen.iter().any(|&n| n > MAX_SWITCHES)
    });
    assert!(
        !woke,
        "{what}: idle workers {pids:?} made {seen:?} context switches within {WINDOW:?} \
         (at most {MAX_SWITCHES} each): something wakes them periodically"
    );
}

#[test]
fn an_idle_native_worker_is_not_woken() {
    let cluster = Cluster::shop("idle", 2, "");
    cluster.wait_ready(1);
    let pids = [cluster.ready_pid(1, 1), cluster.ready_pid(2, 1)];
    // Settled: each worker's first report (sent after Ready) has arrived,
    // so nothing of its start-up is left to do.
    for id in [1, 2] {
        wait_for(&format!("worker {id}'s first stats"), || {
            reported(&cluster, id)
        });
    }
    assert_asleep("after start-up", &pids);

    // Served requests are still reported, and once the connections are
    // closed the active count goes back to 0...
    let addr = cluster.addr();
    for _ in 0..20 {
        assert_eq!(get(addr, "/products/1").unwrap().status, 200);
    }
    wait_for("the 20 requests in status, no connection active", || {
        let (r1, a1) = reported(&cluster, 1)?;
        let (r2, a2) = reported(&cluster, 2)?;
        (r1 + r2 == 20 && a1 + a2 == 0).then_some(())
    });
    // ...and then the workers are asleep again.
    assert_asleep("after serving 20 requests", &pids);
}
