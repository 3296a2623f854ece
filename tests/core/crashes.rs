//! Crashes: a killed worker is replaced and the accept queue it shared is
//! served by the others (guarantees 1 and 4); a worker that keeps crashing is
//! respawned with a growing delay, never in a fork storm.

use std::io::Write as _;

use rustix::process::Signal;

use crate::util::*;

/// kill -9 of worker 1 while four loads run: worker 1 comes back (a new pid,
/// `worker.crash` then `worker.ready`) and serves again. The requests that
/// were in flight on the killed worker are lost (at most one per load
/// connection, as each connection has one request at a time); nothing else:
/// no connect error, no timeout, no error status, no garbage.
#[test]
fn a_killed_worker_is_replaced_under_load() {
    let cluster = Cluster::shop("kill9", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let old = cluster.ready_pid(1, 1);
    let loads = mixed_load(addr);
    let connections = 2 * loads.len() as u64;
    let_loads_run(&loads, 10);

    kill(old, Signal::KILL);
    let crash = cluster.wait_event("worker.crash", |l| l.get("pid") == Some(&old.to_string()));
    assert_eq!(crash.num("id"), 1, "{}", crash.raw);
    assert_eq!(
        crash.get("status"),
        Some("signal 9 (SIGKILL)"),
        "{}",
        crash.raw
    );
    let ready = cluster.wait_event("worker.ready", |l| {
        l.num("id") == 1 && l.num("pid") != u64::from(old)
    });
    let new = ready.num("pid") as u32;
    let lines = cluster.lines();
    let at = |pred: &dyn Fn(&LogLine) -> bool| lines.iter().position(pred).expect("logged");
    assert!(
        at(&|l| l.event == "worker.crash" && l.num("pid") == u64::from(old))
            < at(&|l| l.event == "worker.ready" && l.num("pid") == u64::from(new)),
        "the crash is logged before the replacement is ready"
    );
    assert!(!alive(old));

    // The replacement serves: responses from worker 1 after it was ready
    // can only come from it (the old one is dead).
    let served_by_1 = |loads: &[(&str, clusterd_bench::Running)]| -> u64 {
        loads
            .iter()
            .map(|(_, l)| l.snapshot().workers.get("1").copied().unwrap_or(0))
            .sum()
    };
    let before = served_by_1(&loads);
    wait_for("responses from the new worker 1", || {
        (served_by_1(&loads) > before).then_some(())
    });
    let_loads_run(&loads, 10);

    let mut failed = 0;
    for (name, running) in loads {
        let report = running.stop();
        println!("---- load: {name} ----\n{report}");
        assert!(report.ok > 0, "{name}: nothing succeeded\n{report}");
        assert_eq!(report.connect_error, 0, "{name}: connect errors\n{report}");
        assert_eq!(report.timeout, 0, "{name}: timeouts\n{report}");
        assert!(
            report.non_2xx.is_empty(),
            "{name}: error statuses\n{report}"
        );
        assert_eq!(report.bad_response, 0, "{name}: bad responses\n{report}");
        failed += report.failed();
    }
    assert!(
        failed <= connections,
        "{failed} requests failed; at most {connections} (one per connection) were in flight on the killed worker"
    );
}

/// The deterministic backlog check: with a single worker, kill -9 it and at
/// once open 20 connections, each sending a request. The listener is
/// clusterd's, so the connections wait in its accept queue and the
/// replacement answers every one.
#[test]
fn connections_queued_while_the_only_worker_is_dead_are_served() {
    let cluster = Cluster::shop("backlog", 1, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let old = cluster.ready_pid(1, 1);

    kill(old, Signal::KILL);
    // Dead (its fds closed), so it cannot have taken any of what follows.
    wait_gone("the killed worker to die", &[old]);
    let mut streams: Vec<_> = (0..20)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(&request("GET", "/products/1", b"", true))
                .expect("send a request");
            s
        })
        .collect();
    for (i, s) in streams.iter_mut().enumerate() {
        let resp = read_response(s).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(resp.status, 200, "connection {i}: {resp:?}");
        assert_eq!(resp.header("x-worker"), Some("1"), "connection {i}");
    }
    let crash = cluster.wait_event("worker.crash", |l| l.num("pid") == u64::from(old));
    assert_eq!(crash.get("status"), Some("signal 9 (SIGKILL)"));
    let new = cluster.wait_event("worker.ready", |l| l.num("pid") != u64::from(old));
    assert_eq!(new.num("id"), 1);
}

/// A program that exits at once (`/bin/false`): respawned with a doubling
/// delay up to `restart_delay_max`, no fork storm, every crash logged, and
/// clusterd stays up and tells the story in `status`.
#[test]
fn a_crash_loop_backs_off_without_a_fork_storm() {
    const DELAY: u64 = 20;
    const MAX: u64 = 320;
    let mut cluster = Cluster::start(
        "crashloop",
        &format!(
            "exec = /bin/false\nworkers = 2\nlisten = 127.0.0.1:0\n\
             restart_delay = {DELAY}ms\nrestart_delay_max = {MAX}ms\n"
        ),
    );
    let fds_at_start = fds(cluster.pid()).len();
    // Reaching the cap takes 20+40+80+160 = 300 ms; then 4 more crashes at
    // the cap per slot, about 1.3 s.
    for id in [1, 2] {
        cluster.wait_events("worker.backoff", 5, |l| {
            l.num("id") == id && l.num("delay_ms") == MAX
        });
    }

    let lines = cluster.lines();
    for id in [1u64, 2] {
        let delays: Vec<u64> = lines
            .iter()
            .filter(|l| l.event == "worker.backoff" && l.num("id") == id)
            .map(|l| l.num("delay_ms"))
            .collect();
        // The first crash respawns at once (no backoff line), then the delay
        // doubles from restart_delay and stays at restart_delay_max.
        let expected: Vec<u64> = (0..delays.len() as u32)
            .map(|n| (DELAY << n.min(10)).min(MAX))
            .collect();
        assert_eq!(delays, expected, "worker {id}'s backoff delays");
        let crashes: Vec<&LogLine> = lines
            .iter()
            .filter(|l| l.event == "worker.crash" && l.num("id") == id)
            .collect();
        assert!(
            crashes.len() > delays.len(),
            "worker {id}: every crash is logged"
        );
        for c in crashes {
            assert_eq!(c.get("status"), Some("exit 1"), "{}", c.raw);
        }
    }

    // No fork storm. Per slot, spawn n+1 (n >= 5) can happen no earlier than
    // 0+20+40+80+160 + 320*(n-5) ms after the first, so within a window of
    // T ms a slot spawns at most 6 + (T-300)/320 times. The bound below adds
    // 2 per slot of slack for the log's own delays: for T of about 2 s that
    // is about 28 spawns for the two slots, where a storm (a fork+exec of
    // /bin/false every few ms) would make hundreds.
    let spawns: Vec<&LogLine> = lines.iter().filter(|l| l.event == "worker.spawn").collect();
    let window = lines.last().expect("lines").ts_ms() - spawns[0].ts_ms();
    let bound = 2 * (8 + window / MAX);
    assert!(
        spawns.len() as u64 <= bound,
        "{} spawns in {window} ms: a fork storm (at most {bound} with the backoff)",
        spawns.len()
    );

    // clusterd is fine, and status tells what is going on.
    let status = cluster.status_json();
    assert_eq!(status["desired"], 2, "{status}");
    assert_eq!(status["ready"], 0, "{status}");
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{status}");
    for w in workers {
        assert!(w["restarts"].as_u64().unwrap_or(0) > 0, "{w}");
        let state = w["state"].as_str().unwrap_or_default();
        assert!(["backoff", "starting"].contains(&state), "{w}");
        assert_eq!(w["last_exit"], "exit 1", "{w}");
    }
    assert!(
        cluster.events("pool.ready").is_empty(),
        "the pool was never ready"
    );
    // Dozens of crashes later, clusterd holds no more fds than at the start
    // (plus at most one IPC channel per slot).
    let fds_now = fds(cluster.pid()).len();
    assert!(
        fds_now <= fds_at_start + 2,
        "clusterd leaks fds: {fds_at_start} at start, {fds_now} now: {:?}",
        fds(cluster.pid())
    );

    // And it still stops cleanly.
    cluster.signal(Signal::TERM);
    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", cluster.log_text());
}
