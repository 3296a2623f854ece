//! Every command, human and `--json`, and how clusterctl finds the socket.

use super::*;

#[test]
fn every_command_in_human_and_json_form() {
    let mut cluster = Cluster::testworkers("ctl-commands", 2, "ok", "");
    cluster.wait_ready(1);
    let addr = cluster.addr().to_string();
    let config = cluster.config.to_str().expect("utf-8 path").to_string();

    // status --json: the daemon, its listeners and one entry per worker.
    let s = status(&cluster);
    assert_eq!(s["pid"], daemon_pid(&cluster), "{s:#}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s:#}");
    assert_eq!(s["config"], config.as_str(), "{s:#}");
    assert_eq!(s["protocol"], "clusterd", "{s:#}");
    assert_eq!(
        s["listeners"],
        serde_json::json!([{"name": "http", "address": addr}]),
        "{s:#}"
    );
    assert!(settled(&s, 2, 1), "{s:#}");
    assert!(s["uptime_ms"].is_u64(), "{s:#}");
    let ids: Vec<u64> = workers(&s).iter().map(|w| w.0).collect();
    assert_eq!(ids, [1, 2], "{s:#}");
    assert_eq!(
        pids(&s),
        child_pids(&cluster),
        "status pids are clusterd's children: {s:#}"
    );
    for w in s["workers"].as_array().unwrap() {
        assert_eq!(w["restarts"], 0, "{s:#}");
        assert!(w["last_exit"].is_null(), "{s:#}");
        assert!(w["uptime_ms"].is_u64(), "{s:#}");
        assert!(w["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{s:#}");
    }

    // status, human: the same facts in the summary and the table.
    let out = ctl(&cluster, &["status"]).ok();
    let human = parse_human_status(&out);
    let summary = |label: &str| {
        human
            .summary
            .get(label)
            .unwrap_or_else(|| panic!("no {label} in the summary: {out}"))
            .as_str()
    };
    assert_eq!(summary("pid"), cluster.pid().to_string(), "{out}");
    assert_eq!(summary("version"), env!("CARGO_PKG_VERSION"), "{out}");
    assert_eq!(summary("config"), config, "{out}");
    assert_eq!(summary("listeners"), format!("http={addr}"), "{out}");
    assert_eq!(summary("workers"), "ready 2/2", "{out}");
    assert_eq!(summary("generation"), "1", "{out}");
    assert_eq!(summary("operation"), "-", "{out}");
    let rows: Vec<[String; 4]> = workers(&s)
        .iter()
        .map(|(id, pid)| [id.to_string(), pid.to_string(), "1".into(), "ready".into()])
        .collect();
    assert_eq!(human.rows, rows, "{out}");

    // -c CONFIG finds the socket through the config's control line.
    let out = ctl_raw(&["-c", &config, "status", "--json"]).ok();
    assert_eq!(out.json()["pid"], daemon_pid(&cluster), "{out}");
    let out = ctl_raw(&["--config", &config, "status"]).ok();
    let pid = parse_human_status(&out).summary["pid"].clone();
    assert_eq!(pid, cluster.pid().to_string(), "{out}");

    // scale, JSON then human.
    let out = ctl(&cluster, &["scale", "+1", "--json"]).ok();
    assert_eq!(
        out.events(),
        [(
            "scaled".to_string(),
            serde_json::json!({"from": 2, "to": 3})
        )],
        "{out}"
    );
    let s = wait_status(&cluster, "3 ready workers", |s| settled(s, 3, 1));
    let before = workers(&s);
    assert_eq!(before.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3]);
    let out = ctl(&cluster, &["scale", "2"]).ok();
    assert_eq!(out.stdout, "scaled 3 -> 2\n", "{out}");
    let s = wait_status(&cluster, "worker 3 gone", |s| settled(s, 2, 1));
    assert_eq!(workers(&s), before[..2], "the highest id went: {s:#}");

    // restart --json: JSON Lines, one progress object per worker, then done.
    let old = pids(&s);
    let out = ctl(&cluster, &["restart", "--json"]).ok();
    let (new, _) = check_json_restart(&out, &old, Some(2));
    let s = wait_status(&cluster, "generation 2 settled", |s| settled(s, 2, 2));
    assert_eq!(pids(&s), new, "status shows the replacements: {s:#}");
    assert_eq!(pids(&s), child_pids(&cluster), "{s:#}");

    // restart, human.
    let out = ctl(&cluster, &["restart"]).ok();
    let new = check_human_restart(&out, &pids(&s), 3);
    let s = wait_status(&cluster, "generation 3 settled", |s| settled(s, 2, 3));
    assert_eq!(pids(&s), new, "status shows the replacements: {s:#}");
    assert_eq!(
        cluster.events("restart.progress").len(),
        4,
        "one progress event per worker per restart"
    );

    // stop, human: clusterd drains, exits 0 and removes its socket.
    let workers_now = pids(&s);
    let out = ctl(&cluster, &["stop"]).ok();
    assert!(out.stdout.starts_with("stopping"), "{out}");
    let exit = cluster.wait_exit();
    assert_eq!(exit.code(), Some(0), "clusterd after stop: {exit}");
    assert!(
        !exists(&cluster.control),
        "{} is left behind",
        cluster.control.display()
    );
    for pid in workers_now {
        assert!(!alive(pid as u32), "worker {pid} outlived clusterd");
    }
    assert_eq!(cluster.events("worker.crash").len(), 0, "no worker crashed");

    // Nobody answers any more: exit 3, naming the socket and where that
    // path came from.
    let out = ctl(&cluster, &["status"]).exit(3);
    let message = out.error_message();
    let sock = cluster.control.to_str().unwrap();
    assert!(message.contains(sock) && message.contains("-s"), "{out}");
    let out = ctl_raw(&["-c", config.as_str(), "status"]).exit(3);
    let message = out.error_message();
    assert!(message.contains(sock) && message.contains(&config), "{out}");
}

#[test]
fn an_unreachable_socket_exits_3_naming_the_path() {
    let path = "/nonexistent/x.sock";
    let out = ctl_raw(&["-s", path, "status"]).exit(3);
    let message = out.error_message();
    assert!(message.contains(path), "names the socket: {out}");
    assert!(
        message.contains("-s"),
        "says where the path came from: {out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    let out = ctl_raw(&["--json", "-s", path, "status"]).exit(3);
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0].0, "error", "{out}");
    let message = events[0].1["message"].as_str().expect("message");
    assert!(message.contains(path), "{out}");

    // A socket file nobody listens on is unreachable too.
    let dir = TempDir::new("ctl-stale");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = ctl_raw(&[OsStr::new("-s"), stale.as_os_str(), OsStr::new("stop")]).exit(3);
    assert!(
        out.error_message().contains(stale.to_str().unwrap()),
        "{out}"
    );
}
