//! Bad deploys that fail after READY (issue 11): the canary's bake, the
//! rollback of a restart, the automatic rollback after one, the restart of
//! one worker, and a READY that was queued while clusterd was stopped.
//!
//! Each test runs load through the restart; the only requests allowed to
//! fail are those a crashing worker of the bad generation held (at most one
//! per load connection per such crash).

use super::*;
use clusterd_bench::Method;

fn testworker(args: &str) -> String {
    format!("{} {args}", example("testworker").display())
}

/// Crashes of workers of `generation` in the log.
fn crashes_of(cluster: &Cluster, generation: u64) -> u64 {
    cluster
        .events("worker.crash")
        .iter()
        .filter(|l| l.num("generation") == generation)
        .count() as u64
}

/// Stops the loads and checks that they lost no more than `crashes`
/// crashing workers could have held: one request per connection each.
#[track_caller]
fn check_losses(loads: Vec<(&str, clusterd_bench::Running, u64)>, crashes: u64) {
    for (name, load, connections) in loads {
        let report = load.stop();
        println!("---- load: {name} ----\n{report}");
        assert!(report.ok > 0, "{name}: nothing served\n{report}");
        assert!(
            report.failed() <= connections * crashes,
            "{name}: {} failed, more than the {crashes} crash(es) of the bad generation \
             could have held on {connections} connections\n{report}",
            report.failed()
        );
    }
}

/// A keep-alive and a new-connection GET load, two connections each (the
/// new connections are what reaches a canary).
fn loads(cluster: &Cluster) -> Vec<(&'static str, clusterd_bench::Running, u64)> {
    vec![
        (
            "keep-alive GET",
            load(cluster.addr(), 2, true, Method::Get),
            2,
        ),
        (
            "new-connection GET",
            load(cluster.addr(), 2, false, Method::Get),
            2,
        ),
    ]
}

/// Restarts onto `bad`, which must fail; checks that clusterctl says it
/// rolled back to generation 1 and that every worker runs generation 1
/// again. Returns clusterctl's message.
#[track_caller]
fn restart_rolls_back(cluster: &Cluster, bad: &str) -> String {
    set_exec(cluster, &testworker(bad));
    let out = ctl(cluster, &["restart"]).exit(1);
    let message = out.error_message();
    assert!(
        message.starts_with("restart rolled back: generation 2 failed")
            && message.contains("every worker runs generation 1: "),
        "{out}"
    );
    let s = wait_status(cluster, "every worker back on generation 1", |s| {
        settled(s, 4, 1)
    });
    assert_eq!(s["last_restart"]["outcome"], "rolled_back", "{s:#}");
    assert_eq!(s["last_restart"]["generation"], 1, "{s:#}");
    assert_eq!(s["phase"], "running", "{s:#}");
    let rollback = cluster.wait_event("restart.rollback", |_| true);
    assert_eq!(rollback.level, "error", "{}", rollback.raw);
    assert_eq!(rollback.num("generation"), 1);
    assert_eq!(rollback.get("after_restart"), Some("false"));
    cluster.wait_event("restart.rolled_back", |_| true);
    let resp = get(cluster.addr(), "/").expect("GET after the rollback");
    assert_eq!(resp.header("x-generation"), Some("1"));
    message
}

#[test]
fn a_canary_that_dies_after_ready_is_rolled_back_under_load() {
    let cluster = Cluster::start(
        "rb-canary",
        &format!(
            "exec = {}\nworkers = 4\nlisten = 127.0.0.1:0\nbake = 3s\nmetrics = 127.0.0.1:0\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let old = pids(&status(&cluster));
    let loads = loads(&cluster);

    let message = restart_rolls_back(&cluster, "crash-after 300");
    assert!(
        message.contains("the canary for worker 1")
            && message.contains("ended with exit 3")
            && message.contains("after READY"),
        "says which worker failed, how, and when: {message}"
    );
    let s = status(&cluster);
    assert_eq!(
        pids(&s),
        old,
        "the canary's bake kept every old worker serving: {s:#}"
    );
    assert!(
        cluster.events("worker.drain").is_empty(),
        "no old worker was drained"
    );
    let crashes = crashes_of(&cluster, 2);
    check_losses(loads, crashes);

    // The human status and the metrics tell the same story.
    let human = parse_human_status(&ctl(&cluster, &["status"]).ok());
    assert!(
        human.summary["restart"].starts_with("rolled_back, generation 1 serving"),
        "{:?}",
        human.summary
    );
    let metrics = cluster.wait_event("metrics", |_| true);
    let addr: std::net::SocketAddr = metrics.get("addr").unwrap().parse().unwrap();
    let text = get(addr, "/metrics").expect("scrape").text();
    assert!(text.contains("\nclusterd_rollbacks_total 1\n"), "{text}");
    assert!(
        text.contains("\nclusterd_phase{phase=\"running\"} 1\n"),
        "{text}"
    );
}

#[test]
fn a_generation_that_dies_1s_after_a_1s_start_is_rolled_back_even_without_a_bake() {
    // With no bake, the rollout moves on at each READY; a replaced worker
    // that then crashes between steps must still stop it and roll back.
    let cluster = Cluster::start(
        "rb-slow",
        &format!(
            "exec = {}\nworkers = 4\nlisten = 127.0.0.1:0\nbake = 0\nready_timeout = 5s\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let loads = loads(&cluster);
    let message = restart_rolls_back(&cluster, "crash-after 1000 --ready-delay 1000");
    assert!(message.contains("ended with exit 3"), "{message}");
    let progress = cluster.events("restart.progress");
    assert!(
        !progress.is_empty() && progress.len() < 4,
        "some slots were replaced before it failed, not all: {}",
        cluster.log_text()
    );
    assert!(cluster.events("restart.done").is_empty(), "never done");
    check_losses(loads, crashes_of(&cluster, 2));
}

#[test]
fn a_generation_that_dies_on_its_first_request_is_rolled_back() {
    let cluster = Cluster::start(
        "rb-first",
        &format!(
            "exec = {}\nworkers = 4\nlisten = 127.0.0.1:0\nbake = 3s\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let loads = loads(&cluster);
    let message = restart_rolls_back(&cluster, "ok --crash-on-request 1");
    assert!(message.contains("the canary for worker 1"), "{message}");
    check_losses(loads, crashes_of(&cluster, 2));
}

#[test]
fn a_generation_that_dies_after_k_requests_is_rolled_back() {
    let cluster = Cluster::start(
        "rb-k",
        &format!(
            "exec = {}\nworkers = 4\nlisten = 127.0.0.1:0\nbake = 5s\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let loads = loads(&cluster);
    restart_rolls_back(&cluster, "ok --crash-on-request 30");
    check_losses(loads, crashes_of(&cluster, 2));
}

#[test]
fn a_generation_that_never_becomes_ready_is_aborted_and_nothing_changes() {
    let cluster = Cluster::start(
        "rb-never",
        &format!(
            "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\nbake = 3s\nready_timeout = 1s\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let old = pids(&status(&cluster));
    let load = load(cluster.addr(), 2, false, Method::Get);
    set_exec(&cluster, &testworker("never-ready"));
    let out = ctl(&cluster, &["restart", "--json"]).exit(1);
    let events = out.events();
    assert_eq!(events.last().unwrap().0, "aborted", "{out}");
    assert!(
        out.error_message().contains("the canary for worker 1")
            && out
                .error_message()
                .contains("did not report READY within 1s"),
        "{out}"
    );
    let s = wait_status(&cluster, "the old workers alone", |s| settled(s, 2, 1));
    assert_eq!(pids(&s), old, "{s:#}");
    assert_eq!(s["last_restart"]["outcome"], "aborted", "{s:#}");
    assert_no_failures("a restart onto a never-ready program", &load.stop());
}

#[test]
fn a_generation_that_starts_failing_after_its_restart_is_rolled_back_once() {
    let cluster = Cluster::start(
        "rb-later",
        &format!(
            "exec = {}\nworkers = 4\nlisten = 127.0.0.1:0\nbake = 200ms\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    let trigger = cluster.dir.path().join("fail-now");
    let loads = loads(&cluster);
    set_exec(
        &cluster,
        &testworker(&format!("ok --fail-when {}", trigger.display())),
    );
    let out = ctl(&cluster, &["restart"]).ok();
    assert!(out.stdout.contains("restart done: generation 2"), "{out}");
    wait_status(&cluster, "generation 2 serving", |s| settled(s, 4, 2));
    run_more(&loads, 200);

    // Generation 2 starts failing: every worker exits, and so does every
    // respawn, until clusterd rolls it back to generation 1.
    std::fs::write(&trigger, b"").unwrap();
    let rollback = cluster.wait_event("restart.rollback", |_| true);
    assert_eq!(
        rollback.get("after_restart"),
        Some("true"),
        "{}",
        rollback.raw
    );
    assert!(
        rollback
            .get("reason")
            .unwrap_or_default()
            .starts_with("generation 2 failed 2 times within 1m of its restart"),
        "{}",
        rollback.raw
    );
    let s = wait_status(&cluster, "every worker back on generation 1", |s| {
        settled(s, 4, 1)
    });
    assert_eq!(s["last_restart"]["outcome"], "rolled_back", "{s:#}");
    run_more(&loads, 200);
    // Generation 1 does not look at the trigger: it stays.
    assert_eq!(cluster.events("restart.rollback").len(), 1, "only once");
    check_losses(loads, crashes_of(&cluster, 2));
}

fn run_more(loads: &[(&str, clusterd_bench::Running, u64)], n: u64) {
    for (name, l, _) in loads {
        let target = l.ok_so_far() + n;
        assert!(
            l.wait_for_ok(target, DEADLINE),
            "{name}: load stalled: {}",
            l.snapshot()
        );
    }
}

#[test]
fn a_healthy_restart_bakes_and_loses_nothing() {
    let cluster = Cluster::start(
        "rb-healthy",
        &format!(
            "exec = {}\nworkers = 3\nlisten = 127.0.0.1:0\nbake = 1s\n",
            example("shop").display()
        ),
    );
    cluster.wait_ready(1);
    let loads = mixed_load(cluster.addr());
    let out = ctl(&cluster, &["restart", "--json"]).ok();
    let kinds: Vec<String> = out.events().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        [
            "baking", "progress", "progress", "baking", "progress", "done"
        ],
        "{out}"
    );
    let events = out.events();
    assert_eq!(events[0].1["role"], "canary", "{out}");
    assert_eq!(events[0].1["bake_ms"], 1000, "{out}");
    assert_eq!(events[3].1["role"], "last", "{out}");
    wait_status(&cluster, "generation 2 settled", |s| settled(s, 3, 2));
    let_loads_run(&loads, 50);
    finish_loads(loads);
    let s = status(&cluster);
    assert_eq!(s["last_restart"]["outcome"], "done", "{s:#}");
}

#[test]
fn one_worker_is_restarted_ready_gated_and_baked() {
    let cluster = Cluster::start(
        "rb-worker",
        &format!(
            "exec = {}\nworkers = 3\nlisten = 127.0.0.1:0\nbake = 500ms\n",
            example("shop").display()
        ),
    );
    cluster.wait_ready(1);
    let before = workers(&status(&cluster));
    let loads = mixed_load(cluster.addr());

    let out = ctl(&cluster, &["restart", "--worker", "2"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("worker 2 (pid "), "{out}");
    assert!(
        lines[0].ends_with("must stay up 500 ms before the old one drains"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("restart done: generation 1, 1 worker replaced"),
        "{out}"
    );
    let s = wait_status(&cluster, "worker 2 replaced", |s| {
        settled(s, 3, 1) && workers(s)[1].1 != before[1].1
    });
    let after = workers(&s);
    assert_eq!(
        (after[0], after[2]),
        (before[0], before[2]),
        "only worker 2"
    );
    // A SIGTERM to one worker is a crash; this was not.
    assert!(cluster.events("worker.crash").is_empty());
    let_loads_run(&loads, 50);
    finish_loads(loads);

    let out = ctl(&cluster, &["restart", "--worker", "9"]).exit(1);
    assert!(
        out.error_message()
            .contains("there is no worker 9 (the workers are 1 to 3)"),
        "{out}"
    );
}

#[test]
fn a_ready_queued_while_clusterd_was_stopped_counts() {
    let cluster = Cluster::start(
        "rb-sigstop",
        &format!(
            // The worker's own line must reach the log while clusterd is
            // stopped, so it writes there itself.
            "exec = {}\nworkers = 1\nlisten = 127.0.0.1:0\nready_timeout = 1s\nlog_capture = off\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    set_exec(&cluster, &testworker("ok --ready-delay 200"));
    let restart = Background::start(&cluster, &["restart"]);
    cluster.wait_event("worker.spawn", |l| l.num("generation") == 2);
    // clusterd is stopped before the replacement reports READY, and stays
    // stopped past that worker's ready_timeout.
    let stopped = std::time::Instant::now();
    kill(cluster.pid(), rustix::process::Signal::STOP);
    wait_for("the replacement to report READY", || {
        cluster
            .log_text()
            .contains("testworker: worker 1 gen 2 reported ready")
            .then_some(())
    });
    // Time must pass here: the deadline has to be behind clusterd when it
    // resumes. Polled, not slept blindly.
    wait_for("the replacement's ready_timeout to pass", || {
        (stopped.elapsed() > std::time::Duration::from_millis(1500)).then_some(())
    });
    kill(cluster.pid(), rustix::process::Signal::CONT);
    let out = restart.wait().ok();
    assert!(out.stdout.contains("restart done: generation 2"), "{out}");
    assert!(
        cluster.events("worker.ready_ignored").is_empty(),
        "{}",
        cluster.log_text()
    );
}

#[test]
fn a_canary_answering_errors_is_rolled_back_and_the_errors_stop() {
    let cluster = Cluster::start(
        "rb-errors",
        &format!(
            "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\nbake = 2s\n",
            testworker("ok")
        ),
    );
    cluster.wait_ready(1);
    // New connections, so the canary gets its share while it bakes.
    let load = load(cluster.addr(), 4, false, Method::Get);
    set_exec(&cluster, &testworker("ok --fail-requests"));
    let out = ctl(&cluster, &["restart"]).exit(1);
    let message = out.error_message();
    assert!(
        message.starts_with("restart rolled back: generation 2 failed")
            && message.contains("the canary for worker 1")
            && message.contains("requests during its bake")
            && message.contains("the workers it replaces 0.0%"),
        "{out}"
    );
    wait_status(&cluster, "back on generation 1", |s| settled(s, 2, 1));
    // The canary's errors were all there were; none come after.
    let failed = load.snapshot().failed();
    assert!(failed > 0, "the canary served errors: {}", load.snapshot());
    let target = load.ok_so_far() + 500;
    assert!(load.wait_for_ok(target, DEADLINE), "{}", load.snapshot());
    let report = load.stop();
    println!("{report}");
    assert_eq!(
        report.failed(),
        report.non_2xx_total(),
        "only HTTP errors, no broken connection"
    );
    assert_eq!(report.failed(), failed, "no error after the rollback");
}
