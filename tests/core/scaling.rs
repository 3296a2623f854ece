//! TTIN / TTOU: one worker more or less (scale-down drains, as a stop does).

use rustix::process::Signal;

use crate::util::*;

#[test]
fn ttin_and_ttou_scale_by_one() {
    let cluster = Cluster::testworkers("ttin", 2, "ok", "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let running = load(addr, 2, false, Method::Get);

    cluster.signal(Signal::TTIN);
    let scale = cluster.wait_event("scale", |_| true);
    assert_eq!(
        (scale.num("from"), scale.num("to")),
        (2, 3),
        "{}",
        scale.raw
    );
    let third = cluster.ready_pid(3, 1);
    wait_for("three workers", || {
        (cluster.worker_pids().len() == 3).then_some(())
    });
    wait_for("responses from worker 3", || {
        running.snapshot().workers.contains_key("3").then_some(())
    });

    cluster.signal(Signal::TTOU);
    let scale = cluster.wait_event("scale", |l| l.num("from") == 3);
    assert_eq!(scale.num("to"), 2, "{}", scale.raw);
    // The highest id goes, through the drain path.
    let drain = cluster.wait_event("worker.drain", |l| l.num("pid") == u64::from(third));
    assert_eq!(drain.num("id"), 3, "{}", drain.raw);
    let exit = &cluster.wait_exits(&[third])[0];
    assert_eq!(exit.event, "worker.exit", "{}", exit.raw);
    assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
    assert_eq!(cluster.worker_pids().len(), 2);
    assert!(running.wait_for_ok(running.ok_so_far() + 20, DEADLINE));

    let report = running.stop();
    println!("{report}");
    assert_no_failures("new-connection GET while scaling", &report);
}

/// Keep-alive clients follow a scale-up: the worker holding them all ends a
/// few of their connections after a response (`Connection: close`, the
/// shop's use of `InFlight::crowded`), and the clients reconnect to the new
/// worker, which holds fewer. Without that, keep-alive clients never reach
/// the new worker (they reconnect only when their connection ends).
#[test]
fn keep_alive_clients_spread_onto_a_new_worker() {
    let cluster = Cluster::shop("spread", 1, "");
    cluster.wait_ready(1);
    let running = load(cluster.addr(), 16, true, Method::Get);
    wait_for("16 connections on worker 1", || {
        let now = running.snapshot();
        (now.connections.get("1") == Some(&16)).then_some(())
    });

    cluster.signal(Signal::TTIN);
    cluster.ready_pid(2, 1);
    let moved = wait_for("keep-alive connections moved to worker 2", || {
        let now = running.snapshot();
        let moved = now.connections.get("2").copied().unwrap_or(0);
        (moved >= 4).then_some(moved)
    });
    // No more than the excess moved: 16 over two is 8 each, give or take
    // the tolerance of one.
    assert!(moved <= 9, "{moved} connections moved");
    assert!(running.wait_for_ok(running.ok_so_far() + 20, DEADLINE));
    let report = running.stop();
    println!("{report}");
    assert_no_failures("keep-alive GET while scaling up", &report);
}
