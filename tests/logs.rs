//! Worker log capture (`log_capture`): every line a worker writes reaches
//! clusterd's log whole, as a `worker.output` event tagged with the worker's
//! id, pid, generation and stream; a dead reader of clusterd's stderr kills
//! no worker; a worker's last words before it exits are not lost.
//!
//! The workers are shell scripts (`/bin/sh FILE`, run with `protocol =
//! systemd` and `ready_after`): the shell does not ignore SIGPIPE, as most
//! programs in C or Go do not.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::util::*;

/// Writes `script` as `worker.sh` in `dir` and returns the config lines that
/// run it as `workers` systemd-protocol workers.
fn script_config(dir: &Path, script: &str, workers: u32, extra: &str) -> String {
    std::fs::write(dir.join("worker.sh"), script).expect("write worker.sh");
    format!(
        "exec = /bin/sh worker.sh\nprotocol = systemd\nready_after = 100ms\n\
         workers = {workers}\nlisten = 127.0.0.1:0\n{extra}\n"
    )
}

/// The `worker.output` lines of `cluster`'s log.
fn output(cluster: &Cluster) -> Vec<LogLine> {
    cluster.events("worker.output")
}

/// A clusterd whose stderr is a pipe the test holds: killed on drop.
struct PipedClusterd {
    child: Child,
    control: std::path::PathBuf,
}

impl PipedClusterd {
    fn status(&self) -> serde_json::Value {
        let out = Command::new(bin_dir().join("clusterctl"))
            .arg("-s")
            .arg(&self.control)
            .args(["status", "--json"])
            .output()
            .expect("run clusterctl");
        assert!(
            out.status.success(),
            "clusterctl status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

impl Drop for PipedClusterd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            kill(self.child.id(), rustix::process::Signal::QUIT);
            if !eventually(DEADLINE, || self.child.try_wait().ok().flatten().is_some()) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The number a worker's loop last wrote to `count.ID`.
fn count(dir: &Path, id: u32) -> u64 {
    std::fs::read_to_string(dir.join(format!("count.{id}")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// clusterd's log reader dies (its stderr is a pipe whose read end is
/// closed): clusterd's own writes fail with EPIPE, but the workers, which
/// log a line every few ms, keep running: none gets SIGPIPE (which killed
/// every shell worker on its next line when workers wrote to clusterd's
/// stderr themselves; `log_capture = off` still does that).
#[test]
fn a_dead_reader_of_clusterds_stderr_kills_no_worker() {
    let dir = TempDir::new("deadlog");
    let control = dir.path().join("control.sock");
    let script = "i=0\nwhile :; do\n  i=$((i+1))\n  echo \"tick $i\"\n  echo \"tock $i\" >&2\n  \
                  echo $i > count.$CLUSTERD_WORKER_ID\n  sleep 0.01\ndone\n";
    let config = format!(
        "{}control = {}\n",
        script_config(dir.path(), script, 2, ""),
        control.display()
    );
    let path = dir.path().join("deadlog.conf");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(clusterd_bin())
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start clusterd");
    let stderr = child.stderr.take().expect("stderr");
    let clusterd = PipedClusterd { child, control };

    // Read the log until the pool is ready and the workers' lines flow.
    let mut reader = BufReader::new(stderr);
    let mut ready = false;
    let mut ticks = 0;
    let mut line = String::new();
    while !(ready && ticks >= 4) {
        line.clear();
        let n = reader.read_line(&mut line).expect("read clusterd's log");
        assert!(n > 0, "clusterd's log ended early");
        // (A worker's line is an event with capture, raw text without.)
        match LogLine::parse(line.trim_end()) {
            Some(event) if event.event == "worker.output" => ticks += 1,
            Some(event) => ready |= event.event == "pool.ready",
            None => ticks += 1,
        }
    }
    drop(reader); // the log reader dies

    let before: Vec<u64> = (1..=2).map(|id| count(dir.path(), id)).collect();
    let status = clusterd.status();
    let pids: Vec<Option<u64>> = (0..2)
        .map(|i| status["workers"][i]["pid"].as_u64())
        .collect();
    // Until every worker has logged 20 more lines, or one was restarted.
    let restarted =
        |s: &serde_json::Value| (0..2).any(|i| s["workers"][i]["restarts"].as_u64() != Some(0));
    wait_for("20 more lines of each worker, or a restart", || {
        let s = clusterd.status();
        let logged = (1..=2).all(|id| count(dir.path(), id) >= before[id as usize - 1] + 20);
        (logged || restarted(&s)).then_some(())
    });
    let status = clusterd.status();
    for i in 0..2 {
        let w = &status["workers"][i];
        assert_eq!(w["restarts"], 0, "no worker died: {status}");
        assert!(pids[i].is_some(), "{status}");
        assert_eq!(w["pid"].as_u64(), pids[i], "same worker: {status}");
        assert!(alive(pids[i].unwrap_or_default() as u32), "{status}");
    }
    assert_eq!(status["ready"], 2, "{status}");
}

/// 8 workers write lines concurrently, short and long (10 KB, more than a
/// pipe writes atomically), to stdout and stderr: each arrives whole, once,
/// in order, tagged with its worker's id, pid, generation and stream.
#[test]
fn lines_of_8_concurrent_workers_are_whole_and_tagged() {
    const LINES: u32 = 60;
    let dir = TempDir::new("tags");
    let script = format!(
        "pad=$(printf '%010000d' 0)\ni=1\nwhile [ $i -le {LINES} ]; do\n  \
         if [ $((i % 2)) = 0 ]; then\n    \
         echo \"w$CLUSTERD_WORKER_ID n=$i $pad\"\n  else\n    \
         echo \"w$CLUSTERD_WORKER_ID n=$i short\" >&2\n  fi\n  i=$((i+1))\ndone\n\
         exec sleep 3600\n"
    );
    let config = script_config(dir.path(), &script, 8, "");
    let cluster = Cluster::start_in(dir, "tags", &config, Command::new(clusterd_bin()));
    cluster.wait_ready(1);
    let lines = cluster.wait_events("worker.output", 8 * LINES as usize, |_| true);
    let spawned: BTreeMap<u64, u64> = cluster
        .events("worker.spawn")
        .iter()
        .map(|l| (l.num("id"), l.num("pid")))
        .collect();
    assert_eq!(spawned.len(), 8, "{spawned:?}");
    let pad = "0".repeat(10_000);
    // Odd lines go to stderr, even ones to stdout: each stream is in
    // order (the two pipes are read independently).
    let mut next: BTreeMap<(u64, String), u32> = BTreeMap::new();
    for l in &lines {
        let id = l.num("id");
        assert_eq!(Some(&l.num("pid")), spawned.get(&id), "{}", l.raw);
        assert_eq!(l.num("generation"), 1, "{}", l.raw);
        assert_eq!(l.level, "info", "{}", l.raw);
        let raw: String = l.raw.chars().take(300).collect();
        let stream = l.get("stream").unwrap_or_default().to_string();
        let first = match stream.as_str() {
            "stdout" => 2,
            "stderr" => 1,
            _ => panic!("no stream: {raw}"),
        };
        let n = next.entry((id, stream.clone())).or_insert(first);
        let text = if *n % 2 == 0 {
            format!("w{id} n={n} {pad}")
        } else {
            format!("w{id} n={n} short")
        };
        assert!(
            l.get("line") == Some(text.as_str()),
            "worker {id} {stream} line {n} is not whole and in order: {raw}"
        );
        assert_eq!(l.get("part"), None);
        *n += 2;
    }
    assert_eq!(next.len(), 16, "{next:?}");
    assert!(next.values().all(|&n| n > LINES), "{next:?}");
}

/// A worker that writes and exits at once: its last lines (the last one
/// without a newline) are in the log, before the line of its exit.
#[test]
fn a_workers_last_words_before_it_exits_appear() {
    let dir = TempDir::new("lastwords");
    let script = "echo \"starting $CLUSTERD_WORKER_ID\"\n\
                  echo 'fatal: cannot open /data/db: no such file' >&2\n\
                  printf 'goodbye without a newline' >&2\nexit 3\n";
    let config = script_config(
        dir.path(),
        script,
        1,
        "restart_delay = 1s\nrestart_delay_max = 1s",
    );
    let cluster = Cluster::start_in(dir, "lastwords", &config, Command::new(clusterd_bin()));
    let crash = cluster.wait_event("worker.crash", |_| true);
    let pid = crash.num("pid");
    let lines = cluster.lines();
    let at = |text: &str| {
        lines
            .iter()
            .position(|l| {
                l.event == "worker.output" && l.get("line") == Some(text) && l.num("pid") == pid
            })
            .unwrap_or_else(|| panic!("no output line {text:?} of pid {pid}"))
    };
    let crash_at = lines
        .iter()
        .position(|l| l.event == "worker.crash" && l.num("pid") == pid)
        .unwrap();
    let starting = at("starting 1");
    let fatal = at("fatal: cannot open /data/db: no such file");
    let goodbye = at("goodbye without a newline");
    assert_eq!(lines[starting].get("stream"), Some("stdout"));
    assert_eq!(lines[fatal].get("stream"), Some("stderr"));
    assert!(fatal < goodbye, "in order");
    assert!(
        starting < crash_at && goodbye < crash_at,
        "the last words come before the exit:\n{}",
        cluster.log_text()
    );
    // And status shows them beside the exit status.
    let s = cluster.status_json();
    let w = &s["workers"][0];
    assert_eq!(w["last_exit"], "exit 3", "{s:#}");
    assert_eq!(w["last_words"], "goodbye without a newline", "{s:#}");
}

/// `log_capture = off`: the workers write to clusterd's stderr themselves,
/// as before capture existed.
#[test]
fn log_capture_off_passes_output_through() {
    let dir = TempDir::new("passthrough");
    let script = "echo 'plain words' >&2\nexec sleep 3600\n";
    let config = script_config(dir.path(), script, 1, "log_capture = off");
    let cluster = Cluster::start_in(dir, "passthrough", &config, Command::new(clusterd_bin()));
    cluster.wait_ready(1);
    wait_for("the worker's own line", || {
        cluster
            .log_text()
            .lines()
            .any(|l| l == "plain words")
            .then_some(())
    });
    assert!(output(&cluster).is_empty());
}

/// `log_format = json`: every line clusterd writes, its events and its
/// workers' output, is one JSON object.
#[test]
fn json_lines_parse() {
    let dir = TempDir::new("jsonlog");
    let script = "echo \"hello \\\"json\\\" from $CLUSTERD_WORKER_ID\"\nexec sleep 3600\n";
    let config = script_config(dir.path(), script, 2, "log_format = json");
    let cluster = Cluster::start_in(dir, "jsonlog", &config, Command::new(clusterd_bin()));
    let outputs = wait_for("both workers' lines", || {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&cluster.log)
            .ok()?
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        let outputs: Vec<serde_json::Value> = lines
            .into_iter()
            .filter(|v| v["event"] == "worker.output")
            .collect();
        (outputs.len() >= 2).then_some(outputs)
    });
    for v in &outputs {
        assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{v}");
        assert_eq!(v["level"], "info");
        assert!(v["id"].is_u64() && v["pid"].is_u64(), "numbers: {v}");
        assert_eq!(v["stream"], "stdout");
        let id = v["id"].as_u64().unwrap();
        assert_eq!(v["line"], format!("hello \"json\" from {id}"));
    }
}

/// Runs `clusterctl -s SOCKET ARGS` in the background, stdout to a file.
fn ctl_in_background(cluster: &Cluster, args: &[&str], out: &Path) -> Child {
    Command::new(bin_dir().join("clusterctl"))
        .arg("-s")
        .arg(&cluster.control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start clusterctl")
}

#[test]
fn logs_shows_the_last_lines_and_follows_a_rolling_restart() {
    let cluster = Cluster::testworkers("logs-follow", 2, "ok", "");
    cluster.wait_ready(1);
    let out = cluster.ctl(&["logs", "-n", "3"]).stdout;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.lines().count(), 3, "{text}");
    let out = cluster.ctl(&["logs", "-n", "100", "--worker", "2"]).stdout;
    let text = String::from_utf8_lossy(&out);
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let l = LogLine::parse(line).unwrap_or_else(|| panic!("{line}"));
        assert_eq!(l.num("id"), 2, "only worker 2: {line}");
    }

    let follow_out = cluster.dir.path().join("follow.out");
    let mut follow = ctl_in_background(&cluster, &["logs", "-f", "-n", "1"], &follow_out);
    // Once the follower has its first line, it is registered: restart.
    wait_for("the follower's first line", || {
        std::fs::read_to_string(&follow_out)
            .ok()
            .filter(|t| !t.is_empty())
    });
    let restart = cluster.ctl(&["restart"]);
    assert!(restart.status.success());
    let text = wait_for("the restart in the followed log", || {
        std::fs::read_to_string(&follow_out)
            .ok()
            .filter(|t| t.contains(" restart.done "))
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(text.contains(" restart.begin "), "{text}");
    assert!(
        text.lines()
            .filter_map(LogLine::parse)
            .any(|l| l.event == "worker.output" && l.num("generation") == 2),
        "the new workers' output too:\n{text}"
    );
}

/// `logs -f` goes on across `clusterctl upgrade` (the new image keeps the
/// log buffer; the follower resumes after the last line it printed, nothing
/// twice), and ends with exit 0 when clusterd stops.
#[test]
fn a_follower_goes_on_across_an_upgrade_and_ends_at_the_stop() {
    let cluster = Cluster::testworkers("logs-follow-upgrade", 2, "ok", "");
    cluster.wait_ready(1);
    let follow_out = cluster.dir.path().join("follow.out");
    let mut follow = ctl_in_background(&cluster, &["logs", "-f", "-n", "5"], &follow_out);
    // One that has printed nothing when the upgrade comes (worker 2 is
    // quiet until the restart): it must not print, when it resumes, the
    // older lines it did not ask for.
    let quiet_out = cluster.dir.path().join("quiet.out");
    let mut quiet = ctl_in_background(
        &cluster,
        &["logs", "-f", "-n", "0", "--worker", "2"],
        &quiet_out,
    );
    wait_for("the follower's first lines", || {
        std::fs::read_to_string(&follow_out)
            .ok()
            .filter(|t| t.lines().count() >= 5)
    });
    let out = cluster.ctl(&["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("upgrade.done in the followed log", || {
        std::fs::read_to_string(&follow_out)
            .ok()
            .filter(|t| t.contains(" upgrade.done "))
    });
    // Still following: a restart after the upgrade shows up too.
    assert!(cluster.ctl(&["restart"]).status.success());
    wait_for("restart.done in the followed log", || {
        std::fs::read_to_string(&follow_out)
            .ok()
            .filter(|t| t.contains(" restart.done "))
    });
    assert!(cluster.ctl(&["stop"]).status.success());
    let status = wait_for("the follower to end", || follow.try_wait().ok().flatten());
    assert!(status.success(), "{status}");
    let status = wait_for("the quiet follower to end", || {
        quiet.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&quiet_out).unwrap();
    let spawned = |generation: u64| {
        text.lines()
            .filter_map(LogLine::parse)
            .any(|l| l.event == "worker.spawn" && l.num("generation") == generation)
    };
    assert!(!spawned(1), "a line from before -f began:\n{text}");
    assert!(spawned(2), "the restart's lines:\n{text}");
    let text = std::fs::read_to_string(&follow_out).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        assert!(seen.insert(line), "printed twice: {line}\n{text}");
    }
    assert!(text.contains(" upgrade.begin "), "{text}");
}

/// A follower that never reads is cut off; clusterd goes on.
#[test]
fn a_follower_that_does_not_read_is_cut_off() {
    use std::io::{Read as _, Write as _};
    let dir = TempDir::new("slowfollow");
    let script = "i=0\nwhile :; do i=$((i+1)); echo \"spam $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; done\n";
    let config = script_config(dir.path(), script, 1, "log_file = clusterd-file.log");
    let cluster = Cluster::start_in(dir, "slowfollow", &config, Command::new(clusterd_bin()));
    let mut sock = std::os::unix::net::UnixStream::connect(&cluster.control).expect("connect");
    let request = clusterd::proto::Request::Logs {
        lines: 0,
        follow: true,
        worker: None,
    };
    sock.write_all(&clusterd::proto::frame(&request)).unwrap();
    // Not reading: the socket buffers fill, then clusterd's queue for it.
    wait_for("the slow follower to be cut off", || {
        let text = std::fs::read_to_string(cluster.dir.path().join("clusterd-file.log")).ok()?;
        (text.contains("control.slow_client") || text.contains("cut off")).then_some(())
    });
    // What it gets when it finally reads: lines, then the end.
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut all = Vec::new();
    let _ = sock.read_to_end(&mut all);
    assert!(!all.is_empty());
    // clusterd serves on.
    let s = cluster.status_json();
    assert_eq!(s["ready"], 1, "{s:#}");
}

/// `log_file` and SIGUSR1, logrotate's way: rename, signal; not a line is
/// lost or doubled.
#[test]
fn sigusr1_reopens_the_log_file_without_losing_a_line() {
    let dir = TempDir::new("reopen");
    let script = "i=0\nwhile [ $i -lt 30000 ]; do i=$((i+1)); echo \"n=$i\"; \
                  [ $((i % 200)) -eq 0 ] && sleep 0.01; done\nexec sleep 3600\n";
    let config = script_config(dir.path(), script, 1, "log_file = shop.log");
    let cluster = Cluster::start_in(dir, "reopen", &config, Command::new(clusterd_bin()));
    let log = cluster.dir.path().join("shop.log");
    let rotated = cluster.dir.path().join("shop.log.1");
    wait_for("some lines in the log file", || {
        (std::fs::metadata(&log).ok()?.len() > 50_000).then_some(())
    });
    std::fs::rename(&log, &rotated).unwrap();
    cluster.signal(rustix::process::Signal::USR1);
    wait_for("the worker to finish counting", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("line=\"n=30000\"").then_some(())
    });
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(new.contains(" log.reopened "), "{new}");
    let numbers: Vec<u64> = old
        .lines()
        .chain(new.lines())
        .filter_map(LogLine::parse)
        .filter(|l| l.event == "worker.output")
        .filter_map(|l| l.get("line")?.strip_prefix("n=")?.parse().ok())
        .collect();
    let expected: Vec<u64> = (1..=30_000).collect();
    assert!(
        numbers == expected,
        "{} lines, first gap near {:?}",
        numbers.len(),
        numbers.windows(2).find(|w| w[1] != w[0] + 1)
    );
}
