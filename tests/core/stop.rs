//! Stopping: the drain deadline (guarantee 3), TERM, and clusterd itself
//! killed (guarantee 6).

use std::io::{Read as _, Write as _};
use std::net::TcpListener;

use rustix::process::Signal;

use crate::util::*;

/// A worker that ignores DRAIN is SIGKILLed at drain_timeout: when a HUP
/// replaces it, and when TERM stops clusterd (which then exits 0).
#[test]
fn a_worker_that_ignores_drain_is_killed_at_drain_timeout() {
    let mut cluster = Cluster::testworkers("nodrain", 1, "ignore-drain", "drain_timeout = 1s");
    cluster.wait_ready(1);
    let first = cluster.ready_pid(1, 1);

    let killed_at_drain_timeout = |cluster: &Cluster, pid: u32| {
        let pid_is = |l: &LogLine| l.num("pid") == u64::from(pid);
        let kill = cluster.wait_event("worker.kill", pid_is);
        assert_eq!(kill.get("reason"), Some("drain_timeout"), "{}", kill.raw);
        let exit = &cluster.wait_exits(&[pid])[0];
        assert_eq!(exit.event, "worker.exit", "{}", exit.raw);
        assert_eq!(
            exit.get("status"),
            Some("signal 9 (SIGKILL)"),
            "{}",
            exit.raw
        );
        let lines = cluster.lines();
        let drain = lines
            .iter()
            .position(|l| l.event == "worker.drain" && pid_is(l))
            .expect("worker.drain");
        let kill = lines
            .iter()
            .position(|l| l.event == "worker.kill" && pid_is(l))
            .expect("worker.kill");
        assert!(drain < kill, "told to drain first");
        assert!(!alive(pid));
    };

    cluster.signal(Signal::HUP);
    cluster.wait_event("restart.done", |l| l.num("generation") == 2);
    killed_at_drain_timeout(&cluster, first);
    let second = cluster.ready_pid(1, 2);
    assert_eq!(cluster.worker_pids(), [second]);

    cluster.signal(Signal::TERM);
    killed_at_drain_timeout(&cluster, second);
    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", cluster.log_text());
}

/// TERM: the workers drain (a checkout in flight is answered, then its
/// keep-alive connection closed), clusterd exits 0, no worker is left.
#[test]
fn term_drains_and_leaves_no_worker_behind() {
    let mut cluster = Cluster::shop("term", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let pids = cluster.worker_pids();
    assert_eq!(pids.len(), 2);

    // Two keep-alive connections, each accepted by a worker (one exchange
    // done), then a checkout in flight on each as TERM arrives.
    let mut streams: Vec<_> = (0..2)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(&request("GET", "/products/1", b"", false))
                .unwrap();
            assert_eq!(read_response(&mut s).unwrap().status, 200);
            s.write_all(&request("POST", "/checkout", CART, false))
                .unwrap();
            s
        })
        .collect();
    cluster.signal(Signal::TERM);
    for s in &mut streams {
        let resp = read_response(s).expect("the checkout in flight is answered");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(
            String::from_utf8_lossy(&resp.body).contains("confirmed"),
            "{resp:?}"
        );
        // Then the worker closes the connection.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("a clean close");
        assert!(rest.is_empty(), "nothing after the response: {rest:?}");
    }

    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", cluster.log_text());
    wait_gone("every worker to be gone", &pids);
    for exit in cluster.wait_exits(&pids) {
        assert_eq!(exit.event, "worker.exit", "{}", exit.raw);
        assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
    }
    assert!(cluster.events("worker.kill").is_empty());
    let exit = cluster.wait_event("exit", |_| true);
    assert_eq!(exit.get("code"), Some("0"));
}

/// clusterd SIGKILLed: its workers notice (the IPC channel closes; the
/// parent-death signal too) and exit, and the port is free again.
#[test]
fn when_clusterd_is_killed_its_workers_exit_and_free_the_port() {
    let mut cluster = Cluster::shop("orphans", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let pids = cluster.worker_pids();
    assert_eq!(pids.len(), 2);
    assert_eq!(get(addr, "/products/1").unwrap().status, 200);

    cluster.signal(Signal::KILL);
    let status = cluster.wait_exit();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    wait_gone("the orphaned workers to exit", &pids);
    let listener = wait_for("the port to be free", || TcpListener::bind(addr).ok());
    drop(listener);
}

/// QUIT, the fast stop: SIGTERM to the workers, SIGKILL after 1 s for one
/// that ignores it, then clusterd exits.
#[test]
fn quit_stops_fast_and_kills_what_ignores_sigterm() {
    let mut cluster = Cluster::testworkers("quit", 2, "ignore-drain", "drain_timeout = 60s");
    cluster.wait_ready(1);
    let pids = cluster.worker_pids();
    assert_eq!(pids.len(), 2);

    cluster.signal(Signal::QUIT);
    let stopping = cluster.wait_event("stopping", |_| true);
    assert_eq!(stopping.get("mode"), Some("fast"), "{}", stopping.raw);
    // Well before the 60 s drain_timeout (DEADLINE is 30 s): the fast stop's
    // own 1 s grace.
    for &pid in &pids {
        let kill = cluster.wait_event("worker.kill", |l| l.num("pid") == u64::from(pid));
        assert_eq!(kill.get("reason"), Some("fast_stop"), "{}", kill.raw);
    }
    let status = cluster.wait_exit();
    assert!(
        status.code().is_some(),
        "clusterd exits by itself: {status}"
    );
    wait_gone("every worker to be gone", &pids);
}

/// `shutdown_delay`: TERM first fails `/healthz` while the workers go on
/// serving new connections (lame duck), then drains and exits 0; a second
/// TERM skips what is left of the delay.
#[test]
fn a_lame_duck_fails_healthz_serves_on_then_drains() {
    let mut cluster = Cluster::shop("lame-duck", 2, "shutdown_delay = 2s\nmetrics = 127.0.0.1:0");
    cluster.wait_ready(1);
    let line = cluster.wait_event("metrics", |_| true);
    let metrics: std::net::SocketAddr = line.get("addr").unwrap().parse().unwrap();
    assert_eq!(get(metrics, "/healthz").unwrap().status, 200);
    cluster.signal(Signal::TERM);
    let lame = cluster.wait_event("stopping", |l| l.get("mode") == Some("lame_duck"));
    assert_eq!(lame.get("delay"), Some("2s"), "{}", lame.raw);
    let health = get(metrics, "/healthz").unwrap();
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.text().trim(), "stopping");
    let s = cluster.status_json();
    assert_eq!(s["phase"], "lame_duck", "{s:#}");
    // New connections are still served by the workers.
    for _ in 0..20 {
        let resp = get(cluster.addr(), "/products/1").expect("served while a lame duck");
        assert_eq!(resp.status, 200);
    }
    assert!(
        cluster.events("worker.drain").is_empty(),
        "not draining yet"
    );
    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", cluster.log_text());
    let graceful = cluster.wait_event("stopping", |l| l.get("mode") == Some("graceful"));
    assert!(graceful.ts_ms() >= lame.ts_ms() + 2000, "after the delay");

    // A delay longer than the harness waits: only a second TERM can end it.
    let mut cluster = Cluster::shop("lame-duck-skip", 1, "shutdown_delay = 1h");
    cluster.wait_ready(1);
    cluster.signal(Signal::TERM);
    cluster.wait_event("stopping", |l| l.get("mode") == Some("lame_duck"));
    cluster.signal(Signal::TERM);
    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", cluster.log_text());
}
