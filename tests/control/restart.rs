//! `clusterctl restart`: under load, aborted, refused.

use super::*;

#[test]
fn restart_under_load_reports_each_worker_once() {
    let cluster = Cluster::start(
        "ctl-restart-load",
        &format!(
            "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\n",
            example("shop").display()
        ),
    );
    cluster.wait_ready(1);
    let old = pids(&status(&cluster));
    let load = load(cluster.addr(), 4, true, Method::Get);

    // Human: `worker k/N replaced (pid A -> B) in X ms` per worker, then done.
    let out = ctl(&cluster, &["restart"]).ok();
    let new = check_human_restart(&out, &old, 2);
    assert_eq!(cluster.events("restart.progress").len(), 2, "{out}");
    let s = wait_status(&cluster, "generation 2 settled", |s| settled(s, 2, 2));
    assert_eq!(pids(&s), new, "{s:#}");
    let served = load.ok_so_far();
    assert!(
        load.wait_for_ok(served + 50, DEADLINE),
        "load stalled after the restart: {}",
        load.snapshot()
    );

    // JSON Lines: a progress object per worker, then done.
    let out = ctl(&cluster, &["restart", "--json"]).ok();
    let (new, _) = check_json_restart(&out, &new, Some(3));
    assert_eq!(cluster.events("restart.progress").len(), 4, "{out}");
    let s = wait_status(&cluster, "generation 3 settled", |s| settled(s, 2, 3));
    assert_eq!(pids(&s), new, "{s:#}");
    let served = load.ok_so_far();
    assert!(
        load.wait_for_ok(served + 50, DEADLINE),
        "load stalled after the restart: {}",
        load.snapshot()
    );

    let report = load.stop();
    println!("restart under load:\n{report}");
    assert_no_failures("two rolling restarts under load", &report);
    assert!(cluster.events("worker.crash").is_empty(), "no crash");
    assert!(cluster.events("worker.kill").is_empty(), "no kill");
}

#[test]
fn a_bad_deploy_aborts_the_restart_and_the_old_workers_serve_on() {
    let cluster = Cluster::testworkers("ctl-abort", 2, "ok", "ready_timeout = 5s");
    cluster.wait_ready(1);
    let old = pids(&status(&cluster));
    let load = load(cluster.addr(), 2, false, Method::Get);

    // The new exec exits at once: the restart aborts, exit 1 with the reason.
    set_exec(&cluster, "/bin/false");
    let out = ctl(&cluster, &["restart"]).exit(1);
    let message = out.error_message();
    assert!(message.starts_with("restart aborted"), "{out}");
    assert!(
        message.contains("exit 1"),
        "the reason says how it ended: {out}"
    );
    assert!(out.stdout.is_empty(), "no worker was replaced: {out}");

    let out = ctl(&cluster, &["restart", "--json"]).exit(1);
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    let (kind, data) = &events[0];
    assert_eq!(kind, "aborted", "{out}");
    assert_eq!(
        (&data["replaced"], &data["total"]),
        (&0.into(), &2.into()),
        "{out}"
    );
    let reason = data["reason"].as_str().expect("reason");
    assert!(reason.contains("exit 1"), "{out}");
    assert!(
        out.stderr.contains(reason),
        "the reason on stderr too: {out}"
    );

    let s = wait_status(&cluster, "the old workers alone", |s| settled(s, 2, 1));
    assert_eq!(pids(&s), old, "the old workers were kept: {s:#}");
    let resp = get(cluster.addr(), "/").expect("GET after the aborted restart");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-generation"), Some("1"));

    // A config with an error: the restart is refused with FILE:LINE.
    set_exec(&cluster, &format!("{} ok", example("testworker").display()));
    let mut text = std::fs::read_to_string(&cluster.config).unwrap();
    text.push_str("drain_timout = 3s\n");
    let line = text.lines().count();
    std::fs::write(&cluster.config, &text).unwrap();
    let at = format!("{}:{line}: ", cluster.config.display());
    let out = ctl(&cluster, &["restart"]).exit(1);
    assert!(out.stderr.starts_with("clusterctl: "), "{out}");
    assert!(out.stderr.contains(&at), "names {at}: {out}");
    let out = ctl(&cluster, &["restart", "--json"]).exit(1);
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0].0, "error", "{out}");
    let message = events[0].1["message"].as_str().expect("message");
    assert!(message.contains(&at), "names {at}: {out}");
    // `-c` with that config cannot even read it: a config error, exit 2.
    let out = ctl_raw(&[
        OsStr::new("-c"),
        cluster.config.as_os_str(),
        OsStr::new("restart"),
    ])
    .exit(2);
    assert!(out.stderr.contains(&at), "names {at}: {out}");

    let s = status(&cluster);
    assert!(settled(&s, 2, 1), "{s:#}");
    assert_eq!(pids(&s), old, "the old workers were kept: {s:#}");

    // Fixed, the next restart goes through.
    edit_config(&cluster, |l| {
        (!l.starts_with("drain_timout")).then(|| l.to_string())
    });
    let out = ctl(&cluster, &["restart", "--json"]).ok();
    let (new, generation) = check_json_restart(&out, &old, None);
    let s = wait_status(&cluster, "the restart settled", |s| {
        settled(s, 2, generation)
    });
    assert_eq!(pids(&s), new, "{s:#}");

    let report = load.stop();
    println!("load across aborted and refused restarts:\n{report}");
    assert_no_failures("load across aborted and refused restarts", &report);
}

#[test]
fn a_second_restart_is_refused_while_one_runs() {
    let cluster = Cluster::testworkers("ctl-busy", 2, "ok", "ready_timeout = 5s");
    cluster.wait_ready(1);
    let old = pids(&status(&cluster));

    // Replacements that never report READY keep the first restart running
    // until their ready_timeout.
    set_exec(
        &cluster,
        &format!("{} never-ready", example("testworker").display()),
    );
    let first = Background::start(&cluster, &["restart"]);
    cluster.wait_event("restart.begin", |_| true);

    let s = status(&cluster);
    let operation = s["operation"].as_str().unwrap_or_default();
    assert!(operation.starts_with("restart "), "{s:#}");

    let out = ctl(&cluster, &["restart"]).exit(1);
    assert!(out.error_message().contains("in progress"), "{out}");
    let out = ctl(&cluster, &["restart", "--json"]).exit(1);
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0].0, "error", "{out}");
    let message = events[0].1["message"].as_str().expect("message");
    assert!(message.contains("in progress"), "{out}");
    // Scaling waits for the restart too.
    let out = ctl(&cluster, &["scale", "+1"]).exit(1);
    assert!(out.error_message().contains("in progress"), "{out}");

    // The first restart then aborts on its own, with the reason.
    let out = first.wait().exit(1);
    let message = out.error_message();
    assert!(message.starts_with("restart aborted"), "{out}");
    assert!(
        message.contains("READY"),
        "the reason says what was missing: {out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    let s = wait_status(&cluster, "the old workers alone", |s| settled(s, 2, 1));
    assert_eq!(pids(&s), old, "the old workers were kept: {s:#}");
    let resp = get(cluster.addr(), "/").expect("GET after the aborted restart");
    assert_eq!(resp.status, 200, "{}", resp.text());
}
