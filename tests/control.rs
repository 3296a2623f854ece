//! clusterctl end to end: the real `clusterctl` binary against a real
//! `clusterd` (DESIGN.md, "Control protocol"; issue 3, "Tests").
//!
//! - `commands`: every command in human and `--json` form, `-c` and `-s`,
//!   the unreachable exit code.
//! - `scale`: scaling up and down under load, refusals.
//! - `restart`: rolling restarts under load, aborted and refused restarts.
//! - `rollback`: bad deploys that fail after READY: bake, rollback, the
//!   restart of one worker.
//! - `hostile`: malformed, oversized and idle control clients; another uid.
//!
//! This file holds the helpers the submodules share: running clusterctl and
//! parsing what it prints (JSON with serde_json, the human text by its
//! documented layout).

use crate::util::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod commands;
mod hardening;
mod hostile;
mod restart;
mod rollback;
mod scale;

/// What one clusterctl run did.
struct Ctl {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn new<S: AsRef<OsStr>>(args: &[S], out: Output) -> Ctl {
        Ctl {
            args: args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code; returns the run for more checks.
    #[track_caller]
    fn exit(self, code: i32) -> Ctl {
        assert_eq!(self.code, Some(code), "unexpected exit code of {self}");
        self
    }

    /// Asserts success.
    #[track_caller]
    fn ok(self) -> Ctl {
        self.exit(0)
    }

    /// Stdout as one JSON value (`status --json`).
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim_end())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self}"))
    }

    /// Stdout as JSON Lines: `{"type":…,"data":…}` objects, each checked to
    /// have exactly those two keys.
    #[track_caller]
    fn events(&self) -> Vec<(String, Value)> {
        self.stdout
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("line {line:?} is not JSON ({e}): {self}"));
                let obj = v
                    .as_object()
                    .unwrap_or_else(|| panic!("not an object: {self}"));
                assert_eq!(obj.len(), 2, "event {line:?} is not {{type, data}}: {self}");
                let kind = obj["type"]
                    .as_str()
                    .unwrap_or_else(|| panic!("event {line:?} has no type: {self}"));
                (kind.to_string(), obj["data"].clone())
            })
            .collect()
    }

    /// The one line of stderr, which must be `clusterctl: MESSAGE`.
    #[track_caller]
    fn error_message(&self) -> String {
        let message = self
            .stderr
            .strip_prefix("clusterctl: ")
            .unwrap_or_else(|| panic!("stderr does not start with 'clusterctl: ': {self}"));
        message.trim_end().to_string()
    }
}

impl fmt::Display for Ctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "clusterctl {}: exit {:?}\n---- stdout ----\n{}---- stderr ----\n{}---- end ----",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

fn ctl_bin() -> PathBuf {
    bin_dir().join("clusterctl")
}

/// Runs clusterctl with `-s` pointing at `cluster`'s control socket.
fn ctl(cluster: &Cluster, args: &[&str]) -> Ctl {
    let mut shown = vec!["-s", cluster.control.to_str().expect("utf-8 path")];
    shown.extend_from_slice(args);
    Ctl::new(&shown, cluster.ctl(args))
}

/// Runs clusterctl with exactly `args`.
fn ctl_raw<S: AsRef<OsStr>>(args: &[S]) -> Ctl {
    let out = Command::new(ctl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run clusterctl");
    Ctl::new(args, out)
}

/// `status --json`, which must succeed.
#[track_caller]
fn status(cluster: &Cluster) -> Value {
    ctl(cluster, &["status", "--json"]).ok().json()
}

/// Polls `status --json` until `pred` holds; returns that status.
fn wait_status(cluster: &Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, || {
            last = status(cluster);
            pred(&last).then(|| last.clone())
        })
    }));
    found.unwrap_or_else(|e| {
        eprintln!("last status: {last:#}");
        std::panic::resume_unwind(e)
    })
}

/// The workers of a status, as `(id, pid)` sorted by id.
fn workers(status: &Value) -> Vec<(u64, u64)> {
    let mut list: Vec<(u64, u64)> = status["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| {
            (
                w["id"].as_u64().expect("worker id"),
                w["pid"].as_u64().expect("worker pid"),
            )
        })
        .collect();
    list.sort();
    list
}

/// The worker pids of a status, sorted.
fn pids(status: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> = workers(status).into_iter().map(|(_, pid)| pid).collect();
    pids.sort();
    pids
}

/// Whether `status` is idle with `n` ready workers, all of `generation`.
fn settled(status: &Value, n: u64, generation: u64) -> bool {
    let list = status["workers"].as_array().expect("workers array");
    status["desired"] == n
        && status["ready"] == n
        && status["generation"] == generation
        && status["operation"].is_null()
        && list.len() as u64 == n
        && list
            .iter()
            .all(|w| w["state"] == "ready" && w["generation"] == generation)
}

/// The daemon's pid as a JSON number.
fn daemon_pid(cluster: &Cluster) -> Value {
    Value::from(cluster.pid())
}

/// The children of clusterd now, sorted (the worker processes).
fn child_pids(cluster: &Cluster) -> Vec<u64> {
    let mut pids: Vec<u64> = cluster.worker_pids().into_iter().map(u64::from).collect();
    pids.sort();
    pids
}

/// Rewrites the config's `exec` line (the `control` line stays).
fn set_exec(cluster: &Cluster, exec: &str) {
    edit_config(cluster, |line| {
        if line.starts_with("exec =") {
            Some(format!("exec = {exec}"))
        } else {
            Some(line.to_string())
        }
    });
}

/// Rewrites the config line by line (`None` drops a line).
fn edit_config(cluster: &Cluster, edit: impl Fn(&str) -> Option<String>) {
    let text = std::fs::read_to_string(&cluster.config).expect("read config");
    let mut out = String::new();
    for line in text.lines() {
        if let Some(line) = edit(line) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    assert!(out.contains("\ncontrol = "), "the control line is kept");
    std::fs::write(&cluster.config, out).expect("write config");
}

/// The human `status`: the `label  value` summary, then the table's rows
/// (ID, PID, GEN and STATE columns).
struct HumanStatus {
    summary: BTreeMap<String, String>,
    rows: Vec<[String; 4]>,
}

#[track_caller]
fn parse_human_status(out: &Ctl) -> HumanStatus {
    let (head, table) = out
        .stdout
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("no blank line between summary and table: {out}"));
    let summary = head
        .lines()
        .map(|line| {
            let (label, value) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("summary line {line:?}: {out}"));
            (label.to_string(), value.trim().to_string())
        })
        .collect();
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header.get(..4),
        Some(&["ID", "PID", "GEN", "STATE"][..]),
        "table header: {out}"
    );
    let rows = lines
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert!(cells.len() >= 4, "table row {line:?}: {out}");
            [0, 1, 2, 3].map(|i| cells[i].to_string())
        })
        .collect();
    HumanStatus { summary, rows }
}

/// One human progress line, `worker K/N replaced (pid A -> B) in ELAPSED`:
/// `(K, N, A, B)`.
fn parse_progress(line: &str) -> Option<(u64, u64, u64, u64)> {
    let rest = line.strip_prefix("worker ")?;
    let (counts, rest) = rest.split_once(" replaced (pid ")?;
    let (k, n) = counts.split_once('/')?;
    let (pids, elapsed) = rest.split_once(") in ")?;
    let (a, b) = pids.split_once(" -> ")?;
    let unit_ok = elapsed.ends_with(" ms") || elapsed.ends_with(" s") || elapsed.ends_with('s');
    if !unit_ok || elapsed.len() < 3 {
        return None;
    }
    Some((
        k.parse().ok()?,
        n.parse().ok()?,
        a.parse().ok()?,
        b.parse().ok()?,
    ))
}

/// Checks a human restart's output: one progress line per worker, in order,
/// each replacing one of `old` by a new pid, then `restart done: generation
/// G, N workers replaced in …`. Returns the new pids.
#[track_caller]
fn check_human_restart(out: &Ctl, old: &[u64], generation: u64) -> Vec<u64> {
    let n = old.len() as u64;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines.len() as u64,
        n + 1,
        "{n} progress lines and a result: {out}"
    );
    let mut replaced = Vec::new();
    let mut new = Vec::new();
    for (i, line) in lines[..n as usize].iter().enumerate() {
        let (k, total, a, b) =
            parse_progress(line).unwrap_or_else(|| panic!("not a progress line {line:?}: {out}"));
        assert_eq!((k, total), (i as u64 + 1, n), "line {line:?}: {out}");
        assert!(
            old.contains(&a),
            "pid {a} was not an old worker {old:?}: {out}"
        );
        assert!(
            !old.contains(&b) && !new.contains(&b),
            "pid {b} is not new: {out}"
        );
        replaced.push(a);
        new.push(b);
    }
    replaced.sort();
    assert_eq!(replaced, old, "every old worker replaced once: {out}");
    let done = lines[n as usize];
    let expected = format!(
        "restart done: generation {generation}, {n} worker{} replaced in ",
        if n == 1 { "" } else { "s" }
    );
    assert!(done.starts_with(&expected), "final line {done:?}: {out}");
    new.sort();
    new
}

/// Checks a `restart --json`: exactly one `progress` object per worker
/// (done 1..=N of N, old pid one of `old`, a new pid), then one `done`
/// object (of `generation`, when given). Returns the new pids and the
/// generation.
#[track_caller]
fn check_json_restart(out: &Ctl, old: &[u64], generation: Option<u64>) -> (Vec<u64>, u64) {
    let n = old.len() as u64;
    let events = out.events();
    assert_eq!(
        events.len() as u64,
        n + 1,
        "{n} progress events and a result: {out}"
    );
    let mut replaced = Vec::new();
    let mut new = Vec::new();
    let mut ids = Vec::new();
    for (i, (kind, data)) in events[..n as usize].iter().enumerate() {
        assert_eq!(kind, "progress", "{out}");
        assert_eq!(data["done"], i as u64 + 1, "{out}");
        assert_eq!(data["total"], n, "{out}");
        let a = data["old_pid"].as_u64().expect("old_pid");
        let b = data["new_pid"].as_u64().expect("new_pid");
        assert!(
            old.contains(&a),
            "pid {a} was not an old worker {old:?}: {out}"
        );
        assert!(
            !old.contains(&b) && !new.contains(&b),
            "pid {b} is not new: {out}"
        );
        assert!(data["elapsed_ms"].is_u64(), "{out}");
        ids.push(data["worker_id"].as_u64().expect("worker_id"));
        replaced.push(a);
        new.push(b);
    }
    ids.sort();
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "each worker id once: {out}"
    );
    replaced.sort();
    assert_eq!(replaced, old, "every old worker replaced once: {out}");
    let (kind, data) = &events[n as usize];
    assert_eq!(kind, "done", "{out}");
    let got = data["generation"].as_u64().expect("generation");
    if let Some(generation) = generation {
        assert_eq!(got, generation, "{out}");
    }
    assert_eq!(data["replaced"], n, "{out}");
    assert!(data["elapsed_ms"].is_u64(), "{out}");
    new.sort();
    (new, got)
}

/// A clusterctl started in the background; killed (by pid) if the test
/// fails before it ends.
struct Background {
    args: Vec<String>,
    child: Option<Child>,
}

impl Background {
    fn start(cluster: &Cluster, args: &[&str]) -> Background {
        let mut all = vec!["-s", cluster.control.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        let child = Command::new(ctl_bin())
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start clusterctl");
        Background {
            args: all.iter().map(|s| s.to_string()).collect(),
            child: Some(child),
        }
    }

    /// Waits (with the harness deadline) for it to end.
    fn wait(mut self) -> Ctl {
        let mut child = self.child.take().expect("child");
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("the background clusterctl to exit", || {
                child.try_wait().expect("try_wait").map(|_| ())
            })
        }));
        if let Err(e) = done {
            let _ = child.kill();
            let _ = child.wait();
            std::panic::resume_unwind(e);
        }
        let out = child.wait_with_output().expect("clusterctl output");
        Ctl::new(&self.args, out)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A size from /proc/PID/status (`VmRSS`: resident now, `VmHWM`: the peak
/// of that), in bytes.
fn proc_bytes(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}: not a size"));
    kb * 1024
}

/// Whether a path exists at all (a socket file included).
fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
