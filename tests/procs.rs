//! Process hygiene (DESIGN.md guarantee 6): what workers leave behind.
//!
//! - A crashed worker's children, in its process group and escaped with
//!   `setsid`, die with it; at stop nothing is left and the port is free.
//! - A worker that moves into clusterd's own process group and ignores TERM
//!   is still killed at `drain_timeout`.
//! - The readiness pipe (`protocol = systemd`) is closed when its worker is
//!   reaped, even while a helper still holds the write end, and is not read
//!   after READY (a worker spewing into it costs clusterd nothing).
//! - A zero-length IPC record is a protocol error, not the channel closing.
//!
//! The process-tree tests run twice: with a cgroup per worker (where this
//! machine allows it, see the `cgroup` log line) and with the fallback
//! forced by `CLUSTERD_CGROUP=off` (process groups and the subreaper).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use rustix::process::Signal;

use crate::util::*;

/// Which way clusterd tracks worker trees in a test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tracking {
    /// cgroups where the machine allows them.
    Auto,
    /// `CLUSTERD_CGROUP=off`.
    Fallback,
}

/// Writes an executable script `name` into `dir`.
fn script(dir: &TempDir, name: &str, text: &str) {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn clusterd(tracking: Tracking) -> Command {
    let mut cmd = Command::new(clusterd_bin());
    match tracking {
        Tracking::Auto => cmd.env_remove("CLUSTERD_CGROUP"),
        Tracking::Fallback => cmd.env("CLUSTERD_CGROUP", "off"),
    };
    cmd
}

/// Says which way the cluster tracks its workers (the log tells).
fn note_tracking(cluster: &Cluster, tracking: Tracking) {
    let on = wait_for("the cgroup log line", || {
        cluster
            .lines()
            .into_iter()
            .find(|l| l.event == "cgroup" || l.event == "cgroup.unavailable")
            .map(|l| l.event)
    });
    match tracking {
        Tracking::Fallback => assert_eq!(on, "cgroup.unavailable", "CLUSTERD_CGROUP=off"),
        Tracking::Auto if on == "cgroup" => {}
        Tracking::Auto => eprintln!("note: no cgroups here; the fallback is what was tested"),
    }
}

/// Lines `A B` of `file` (numbers), where present.
fn pairs(dir: &TempDir, file: &str) -> Vec<(u32, u32)> {
    std::fs::read_to_string(dir.path().join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// SIGKILLs the recorded pids on drop (a failed test leaves nothing).
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).expect("pid"),
                    Signal::KILL,
                );
            }
        }
    }
}

const CRASHING_PARENT: &str = r#"#!/bin/sh
# A helper in the worker's own process group, and one that escapes it with
# setsid (a daemonizing double fork); both hold the listener (fd 3).
sleep 1000 &
echo "$$ $!" >> kids
W=$$ setsid -f sh -c 'echo "$W $$" >> escapees; exec sleep 1000'
exit 1
"#;

fn a_crashed_workers_children_die_with_it(tracking: Tracking) {
    let dir = TempDir::new("orphans");
    script(&dir, "worker.sh", CRASHING_PARENT);
    let config = "exec = ./worker.sh\nprotocol = systemd\nworkers = 1\nlisten = 127.0.0.1:0\n\
                  restart_delay = 50ms\nrestart_delay_max = 200ms\nmin_uptime = 1h\n";
    let mut cluster = Cluster::start_in(dir, "orphans", config, clusterd(tracking));
    let addr = cluster.addr();
    let crashes = cluster.wait_events("worker.crash", 3, |_| true);
    let crashed: BTreeSet<u32> = crashes.iter().map(|l| l.num("pid") as u32).collect();
    let mut reaper = Reaper(Vec::new());
    let mut left = Vec::new();
    for (worker, kid) in pairs(&cluster.dir, "kids")
        .into_iter()
        .chain(pairs(&cluster.dir, "escapees"))
    {
        reaper.0.push(kid);
        if crashed.contains(&worker) {
            left.push(kid);
        }
    }
    assert!(!left.is_empty(), "the crashed workers started no helper");
    wait_gone("the helpers of crashed workers", &left);

    cluster.signal(Signal::TERM);
    assert!(cluster.wait_exit().success());
    // Everything any worker started is gone (they were clusterd's).
    for (_, kid) in pairs(&cluster.dir, "kids")
        .into_iter()
        .chain(pairs(&cluster.dir, "escapees"))
    {
        reaper.0.push(kid);
    }
    let all = reaper.0.clone();
    wait_gone("every helper, after clusterd stopped", &all);
    // The port is free: another clusterd could bind it.
    std::net::TcpListener::bind(addr).expect("the port is free after the stop");
    note_tracking(&cluster, tracking);
}

#[test]
fn a_crashed_workers_children_die_with_it_in_its_cgroup() {
    a_crashed_workers_children_die_with_it(Tracking::Auto);
}

#[test]
fn a_crashed_workers_children_die_with_it_without_cgroups() {
    a_crashed_workers_children_die_with_it(Tracking::Fallback);
}

const GROUP_HOPPER: &str = r#"
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = os.fork()
if helper == 0:
    # Keeps the worker's old process group alive.
    time.sleep(1000)
    os._exit(0)
os.setpgid(0, os.getpgid(os.getppid()))
with open("moved", "a") as f:
    f.write(f"{os.getpid()} {helper}\n")
os.write(int(os.environ["CLUSTERD_READY_FD"]), b"READY=1\n")
while True:
    time.sleep(1000)
"#;

fn a_worker_that_leaves_its_group_and_ignores_term_is_killed(tracking: Tracking) {
    let dir = TempDir::new("hopper");
    std::fs::write(dir.path().join("hopper.py"), GROUP_HOPPER).expect("write");
    let config = "exec = python3 hopper.py\nprotocol = systemd\nworkers = 1\n\
                  listen = 127.0.0.1:0\ndrain_timeout = 1s\n";
    let mut cluster = Cluster::start_in(dir, "hopper", config, clusterd(tracking));
    let pid = cluster.ready_pid(1, 1);
    let (worker, helper) = wait_for("the worker to move", || {
        pairs(&cluster.dir, "moved").first().copied()
    });
    assert_eq!(worker, pid);
    let _reaper = Reaper(vec![worker, helper]);
    assert_eq!(
        pgid(worker),
        pgid(cluster.pid()),
        "it moved into clusterd's group"
    );

    cluster.signal(Signal::TERM);
    cluster.wait_event("worker.kill", |l| l.num("pid") == u64::from(pid));
    assert!(cluster.wait_exit().success());
    wait_gone("the worker and its helper", &[worker, helper]);
    note_tracking(&cluster, tracking);
}

#[test]
fn a_worker_that_leaves_its_group_and_ignores_term_is_killed_in_its_cgroup() {
    a_worker_that_leaves_its_group_and_ignores_term_is_killed(Tracking::Auto);
}

#[test]
fn a_worker_that_leaves_its_group_and_ignores_term_is_killed_without_cgroups() {
    a_worker_that_leaves_its_group_and_ignores_term_is_killed(Tracking::Fallback);
}

/// The pipe inode behind `link` (`pipe:[123]`).
fn pipe_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

#[test]
fn the_readiness_pipe_is_closed_when_its_worker_is_reaped_though_a_helper_holds_it() {
    let dir = TempDir::new("readyfd");
    script(
        &dir,
        "worker.sh",
        "#!/bin/sh\necho READY=1 >&\"$CLUSTERD_READY_FD\"\nexec sleep 1000\n",
    );
    let config = "exec = ./worker.sh\nprotocol = systemd\nworkers = 1\nlisten = 127.0.0.1:0\n";
    let cluster = Cluster::start_in(dir, "readyfd", config, clusterd(Tracking::Auto));
    let pid = cluster.ready_pid(1, 1);
    // The test plays the helper: it holds the pipe's write end, opened
    // through the worker's fd 4 (one listener at 3).
    let link = std::fs::read_link(format!("/proc/{pid}/fd/4")).expect("the worker's fd 4");
    let inode = pipe_inode(&link.to_string_lossy()).expect("fd 4 is the readiness pipe");
    let _writer = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/4"))
        .expect("open the pipe's write end");
    let holds = |p: u32| fds(p).iter().any(|(_, t)| pipe_inode(t) == Some(inode));
    assert!(holds(cluster.pid()), "clusterd reads the readiness pipe");

    kill(pid, Signal::KILL);
    cluster.wait_exits(&[pid]);
    wait_for(
        "clusterd to close the reaped worker's readiness pipe",
        || (!holds(cluster.pid())).then_some(()),
    );
}

/// Bytes clusterd has read with read(2) and the like (`rchar`).
fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar")
}

#[test]
fn a_worker_spewing_into_the_readiness_pipe_after_ready_is_not_read() {
    let dir = TempDir::new("spew");
    script(
        &dir,
        "worker.sh",
        "#!/bin/sh\nprintf 'READY=1\\n' >&\"$CLUSTERD_READY_FD\"\nexec cat /dev/zero >&\"$CLUSTERD_READY_FD\"\n",
    );
    let config = "exec = ./worker.sh\nprotocol = systemd\nworkers = 1\nlisten = 127.0.0.1:0\n";
    let cluster = Cluster::start_in(dir, "spew", config, clusterd(Tracking::Auto));
    let pid = cluster.ready_pid(1, 1);
    // The worker writes on and on; clusterd's reads come to a halt (the
    // pipe fills and the writer blocks), where before it read for ever.
    let mut last = (0, 0);
    wait_for("clusterd to stop reading the readiness pipe", || {
        let now = rchar(cluster.pid());
        let same = if now == last.0 { last.1 + 1 } else { 0 };
        last = (now, same);
        (same >= 3).then_some(())
    });
    assert!(alive(pid), "the worker spews on (blocked)");
    let status = cluster.status_json();
    assert_eq!(status["ready"], 1, "{status:#}");
}

#[test]
fn an_empty_ipc_record_is_a_protocol_error_and_the_channel_stays_open() {
    let mut cluster = Cluster::testworkers("empty", 1, "empty-record", "");
    cluster.wait_ready(1);
    let pid = cluster.ready_pid(1, 1);
    cluster.wait_event("worker.protocol", |l| {
        l.num("pid") == u64::from(pid) && l.get("error").is_some_and(|e| e.contains("empty"))
    });
    assert!(
        cluster.events("worker.ipc_closed").is_empty(),
        "an empty record is not the end of the channel"
    );
    let response = get(cluster.addr(), "/").expect("the worker serves");
    assert_eq!(response.status, 200);
    // The drain goes over the channel, which is still open.
    cluster.signal(Signal::TERM);
    cluster.wait_event("worker.drained", |l| l.num("pid") == u64::from(pid));
    assert!(cluster.wait_exit().success());
}
