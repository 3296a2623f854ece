//! `clusterctl scale` under load, and the scales that are refused.

use super::*;

#[test]
fn scale_up_and_down_under_load_drops_nothing() {
    let mut cluster = Cluster::testworkers("ctl-scale", 2, "ok", "");
    cluster.wait_ready(1);

    // Scaling to 0 is refused by clusterctl itself: a usage error, nothing sent.
    let out = ctl(&cluster, &["scale", "0"]).exit(2);
    assert!(out.stderr.starts_with("clusterctl: "), "{out}");
    assert!(
        out.stderr.contains("stop"),
        "points to `clusterctl stop`: {out}"
    );
    assert!(
        cluster.events("control.request").is_empty(),
        "scale 0 reached clusterd:\n{}",
        cluster.log_text()
    );

    // Scaling below 1 is refused by clusterd: exit 1 with its reason.
    let out = ctl(&cluster, &["scale", "-5"]).exit(1);
    let reason = out.error_message();
    assert!(!reason.is_empty() && !reason.contains('\n'), "{out}");
    let refused = cluster.wait_event("scale.refused", |_| true);
    assert_eq!(refused.get("reason"), Some(reason.as_str()), "{out}");
    let out = ctl(&cluster, &["scale", "-5", "--json"]).exit(1);
    assert_eq!(
        out.events(),
        [(
            "error".to_string(),
            serde_json::json!({ "message": reason })
        )],
        "{out}"
    );
    let s = status(&cluster);
    assert!(settled(&s, 2, 1), "a refused scale changes nothing: {s:#}");

    // A new connection per request, so every worker gets some, the ones
    // scaled away included.
    let load = load(cluster.addr(), 4, false, Method::Get);

    // Up: a third worker starts and becomes ready.
    let out = ctl(&cluster, &["scale", "+1"]).ok();
    assert_eq!(out.stdout, "scaled 2 -> 3\n", "{out}");
    let s = wait_status(&cluster, "3 ready workers", |s| settled(s, 3, 1));
    let before = workers(&s);
    assert_eq!(before.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3]);
    wait_for("worker 3 to serve some of the load", || {
        load.snapshot().workers.contains_key("3").then_some(())
    });

    // Down to 1: the two highest ids drain and exit 0; worker 1 is untouched.
    let out = ctl(&cluster, &["scale", "1", "--json"]).ok();
    assert_eq!(
        out.events(),
        [(
            "scaled".to_string(),
            serde_json::json!({"from": 3, "to": 1})
        )],
        "{out}"
    );
    let drains = cluster.wait_events("worker.drain", 2, |_| true);
    let mut drained: Vec<(u64, u64)> = drains.iter().map(|l| (l.num("id"), l.num("pid"))).collect();
    drained.sort();
    assert_eq!(drained, before[1..], "the highest ids drain");
    for (id, pid) in &drained {
        let exit = cluster.wait_event("worker.exit", |l| l.num("pid") == *pid);
        assert_eq!(exit.num("id"), *id, "{}", exit.raw);
        assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
    }
    let s = wait_status(&cluster, "1 worker left", |s| settled(s, 1, 1));
    assert_eq!(workers(&s), before[..1], "worker 1 kept its process: {s:#}");
    let out = ctl(&cluster, &["status"]).ok();
    assert_eq!(
        parse_human_status(&out).summary["workers"],
        "ready 1/1",
        "{out}"
    );
    let served = load.ok_so_far();
    assert!(
        load.wait_for_ok(served + 50, DEADLINE),
        "load stalled after scaling down: {}",
        load.snapshot()
    );

    let report = load.stop();
    println!("scale under load:\n{report}");
    assert_no_failures("scale 2 -> 3 -> 1 under load", &report);
    assert_eq!(
        cluster.events("worker.drain").len(),
        2,
        "only ids 2 and 3 drained"
    );
    assert!(cluster.events("worker.crash").is_empty(), "no crash");
    assert!(cluster.events("worker.kill").is_empty(), "no kill");

    // stop --json: one `stopping` event, then clusterd exits 0 and removes
    // its socket.
    let out = ctl(&cluster, &["stop", "--json"]).ok();
    assert_eq!(
        out.events(),
        [("stopping".to_string(), serde_json::json!({}))],
        "{out}"
    );
    let exit = cluster.wait_exit();
    assert_eq!(exit.code(), Some(0), "clusterd after stop: {exit}");
    assert!(!exists(&cluster.control), "the socket is left behind");
}
