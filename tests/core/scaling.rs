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
