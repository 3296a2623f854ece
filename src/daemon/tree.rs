//! What a worker leaves behind, and what clusterd leaves behind when it exits.
//!
//! DESIGN.md guarantee 6: when a worker exits, nothing it started outlives
//! it; at stop, nothing clusterd started outlives clusterd.
//!
//! - Each worker leads its own process group, and runs in its own cgroup
//!   where clusterd can create one ([`super::cgroup`]).
//! - An exited worker is seen before it is reaped (`waitid` with `WNOWAIT`):
//!   while its zombie still holds its pid, and so its process-group id, what
//!   is left of its group is sent SIGKILL, and so is its whole cgroup
//!   (`cgroup.kill`), so even a `setsid` escapee goes. Then it is reaped.
//! - Without cgroups, an escapee is re-parented to clusterd (the subreaper)
//!   when its parent exits, and is no longer traceable to its worker. When
//!   a worker exits, every child of clusterd that is not a worker and not in
//!   a live worker's process group is killed (`orphan.kill`).
//! - A signal for a worker goes to the process itself as well as its group:
//!   a worker that left its group (into clusterd's own, say) is reached too.
//!   A SIGKILL is sent again every second while the worker is not reaped
//!   (`worker.kill_retry`).
//! - When clusterd exits, every cgroup is killed, every child it still has
//!   is sent SIGKILL (children re-parented to it meanwhile too), and it waits
//!   for them, up to [`EXIT_WAIT`].

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use smol::LocalExecutor;
use smol::channel::{Receiver, Sender};

use super::cgroup;
use super::spawn::{self, Inherit, Spawned, Spec};

/// How long clusterd waits at exit for what it killed.
pub const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How often a SIGKILL that did not take is sent again.
pub const KILL_RETRY: Duration = Duration::from_secs(1);

/// The process tree clusterd is responsible for.
#[derive(Debug)]
pub struct Tree {
    cgroups: Option<cgroup::Parent>,
    /// Cgroups of reaped workers, removed once empty.
    emptying: Vec<cgroup::Group>,
    /// The process groups of the workers that exited since the last sweep
    /// (already killed: not logged again as orphans).
    killed_groups: Vec<u32>,
}

/// One worker, as far as its process tree goes.
#[derive(Debug)]
pub struct Worker {
    pid: u32,
    cgroup: Option<cgroup::Group>,
    /// Dropped with the worker's record when it is reaped: every task
    /// holding [`Worker::reaped`] then ends.
    _alive: Sender<()>,
    reaped: Receiver<()>,
    retrying: Cell<bool>,
}

impl Tree {
    /// Sets up a cgroup for the workers where possible (logged either way).
    pub fn new() -> Tree {
        let cgroups = match cgroup::Parent::create() {
            Ok(parent) => {
                log!(info, "cgroup", path = parent.path().display());
                Some(parent)
            }
            Err(why) => {
                log!(
                    info,
                    "cgroup.unavailable",
                    reason = why,
                    fallback = "process groups and the subreaper's children"
                );
                None
            }
        };
        Tree {
            cgroups,
            emptying: Vec::new(),
            killed_groups: Vec::new(),
        }
    }

    /// Starts a worker (see [`spawn::spawn`]) in a cgroup of its own where
    /// there are cgroups.
    pub fn spawn(
        &mut self,
        spec: &Spec,
        slot: u32,
        generation: u64,
        listeners: &[Inherit<'_>],
        notify: Option<&str>,
        output: Option<super::logcap::ChildEnds>,
    ) -> io::Result<(Spawned, Worker)> {
        let group = self.cgroups.as_mut().and_then(|p| match p.group() {
            Ok(g) => Some(g),
            Err(e) => {
                log!(warn, "cgroup.failed", error = e);
                None
            }
        });
        let procs = group.as_ref().and_then(cgroup::Group::procs);
        let spawned = match spawn::spawn(spec, slot, generation, listeners, notify, output, procs) {
            Ok(s) => s,
            Err(e) => {
                if let Some(g) = group {
                    self.emptying.push(g);
                    self.tidy();
                }
                return Err(e);
            }
        };
        // Again from here: in case the child could not move itself.
        let group = group.and_then(|mut g| match g.adopt(spawned.pid) {
            Ok(()) => Some(g),
            Err(e) => {
                log!(warn, "cgroup.failed", pid = spawned.pid, error = e);
                self.emptying.push(g);
                None
            }
        });
        let (alive, reaped) = smol::channel::bounded(1);
        let worker = Worker {
            pid: spawned.pid,
            cgroup: group,
            _alive: alive,
            reaped,
            retrying: Cell::new(false),
        };
        Ok((spawned, worker))
    }

    /// A worker has exited and is not reaped yet: kills what is left of its
    /// process group and its cgroup.
    pub fn worker_exited(&mut self, worker: &mut Worker) {
        signal_group_only(worker.pid, Signal::KILL);
        self.killed_groups.push(worker.pid);
        if let Some(group) = worker.cgroup.take() {
            group.kill();
            self.emptying.push(group);
        }
    }

    /// A child that is not a worker (an orphan re-parented to clusterd) has
    /// exited and is not reaped yet: if it led a process group, what is left
    /// of that goes too.
    pub fn orphan_exited(&mut self, pid: u32) {
        signal_group_only(pid, Signal::KILL);
    }

    /// After a worker exited, without cgroups: kills every child of
    /// clusterd that is neither a worker nor in a live worker's process
    /// group (what a worker left behind, re-parented to clusterd).
    pub fn sweep(&mut self, is_worker: impl Fn(u32) -> bool) {
        let killed = std::mem::take(&mut self.killed_groups);
        if self.cgroups.is_some() {
            return;
        }
        let me = std::process::id();
        for c in children_of(me).unwrap_or_default() {
            if is_worker(c.pid) || is_worker(c.pgrp) || killed.contains(&c.pgrp) {
                continue;
            }
            log!(warn, "orphan.kill", pid = c.pid, pgid = c.pgrp);
            signal(c.pid, Signal::KILL);
            if c.pgrp == c.pid {
                signal_group_only(c.pid, Signal::KILL);
            }
        }
    }

    /// Removes the cgroups of reaped workers that are empty now.
    pub fn tidy(&mut self) {
        self.emptying.retain(|g| !g.remove());
    }

    /// At exit: kills everything clusterd still has (cgroups, children,
    /// their process groups, and whatever is re-parented to it meanwhile)
    /// and reaps it, for up to [`EXIT_WAIT`].
    pub fn end_all(&mut self) {
        let me = std::process::id();
        let end = Instant::now() + EXIT_WAIT;
        let mut killed = std::collections::BTreeSet::new();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(p) = &self.cgroups {
                p.kill_all();
            }
            let listed = children_of(me);
            for c in listed.iter().flatten() {
                killed.insert(c.pid);
                signal(c.pid, Signal::KILL);
                if c.pgrp == c.pid {
                    signal_group_only(c.pid, Signal::KILL);
                }
            }
            if me == 1 {
                // As PID 1 of a pid namespace, -1 is every other process
                // in it: all of them are clusterd's to end.
                let _ = rustix::process::kill_process_group(Pid::INIT, Signal::KILL);
            }
            let none_left = loop {
                match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break false,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => break true,
                }
            };
            let populated = self.cgroups.as_ref().is_some_and(cgroup::Parent::populated);
            // Without /proc nor cgroups, children cannot be listed: no wait.
            let blind = listed.is_none() && self.cgroups.is_none() && me != 1;
            if (none_left && !populated) || blind {
                break;
            }
            if Instant::now() >= end {
                log!(
                    warn,
                    "leftovers.survived",
                    waited_ms = EXIT_WAIT.as_millis(),
                    reason = "not dead after SIGKILL (uninterruptible sleep?)"
                );
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        if !killed.is_empty() {
            log!(info, "leftovers.killed", count = killed.len());
        }
        self.tidy();
        if let Some(p) = &self.cgroups {
            p.remove();
        }
    }
}

impl Tree {
    /// The parent cgroup (folder, next number) and the cgroups still
    /// emptying, to hand over (`clusterctl upgrade`).
    pub fn handed(&self) -> (Option<(std::path::PathBuf, u64)>, Vec<std::path::PathBuf>) {
        let parent = self.cgroups.as_ref().map(cgroup::Parent::handed);
        let emptying = self
            .emptying
            .iter()
            .map(|g| g.path().to_path_buf())
            .collect();
        (parent, emptying)
    }

    /// The tree an earlier image of clusterd handed over.
    pub fn taken_over(
        parent: Option<(std::path::PathBuf, u64)>,
        emptying: Vec<std::path::PathBuf>,
    ) -> Tree {
        Tree {
            cgroups: parent.map(|(dir, next)| cgroup::Parent::taken_over(dir, next)),
            emptying: emptying
                .into_iter()
                .map(cgroup::Group::taken_over)
                .collect(),
            killed_groups: Vec::new(),
        }
    }
}

impl Worker {
    /// A running worker an earlier image of clusterd started.
    pub fn taken_over(pid: u32, cgroup: Option<std::path::PathBuf>) -> Worker {
        let (alive, reaped) = smol::channel::bounded(1);
        Worker {
            pid,
            cgroup: cgroup.map(cgroup::Group::taken_over),
            _alive: alive,
            reaped,
            retrying: Cell::new(false),
        }
    }

    /// Its cgroup's folder, to hand over.
    pub fn cgroup_path(&self) -> Option<&std::path::Path> {
        self.cgroup.as_ref().map(cgroup::Group::path)
    }
}

impl Default for Tree {
    fn default() -> Tree {
        Tree::new()
    }
}

impl Worker {
    /// Ends (with an error) once the worker has been reaped.
    pub fn reaped(&self) -> Receiver<()> {
        self.reaped.clone()
    }

    /// Sends `sig` to the worker and its process group.
    pub fn signal(&self, sig: Signal) {
        spawn::signal_group(self.pid, sig);
    }

    /// SIGKILL to the worker, its process group and its cgroup, sent again
    /// every [`KILL_RETRY`] while it is not reaped.
    pub fn kill(&self, ex: &LocalExecutor<'static>) {
        self.signal(Signal::KILL);
        if let Some(g) = &self.cgroup {
            g.kill();
        }
        if self.retrying.replace(true) {
            return;
        }
        let (pid, reaped) = (self.pid, self.reaped.clone());
        let cgroup = self.cgroup.as_ref().map(|g| g.path().to_path_buf());
        ex.spawn(async move {
            loop {
                let gone = smol::future::or(
                    async {
                        let _ = reaped.recv().await;
                        true
                    },
                    async {
                        smol::Timer::after(KILL_RETRY).await;
                        false
                    },
                )
                .await;
                // Not reaped yet (that runs on this thread), so `pid` is
                // still this worker, if only as a zombie.
                if gone || reaped.is_closed() {
                    return;
                }
                log!(warn, "worker.kill_retry", pid = pid);
                spawn::signal_group(pid, Signal::KILL);
                if let Some(dir) = &cgroup {
                    let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
                }
            }
        })
        .detach();
    }
}

/// The pid of a child that has exited, left unreaped, if there is one.
///
/// # Errors
/// `ECHILD` when clusterd has no children.
pub fn exited_child() -> Result<Option<u32>, rustix::io::Errno> {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid siginfo_t to write to; WNOWAIT leaves the
    // child as it is.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r == -1 {
        return Err(rustix::io::Errno::from_raw_os_error(
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    // SAFETY: waitid filled `info` in (si_pid is 0 when no child had exited).
    let pid = unsafe { info.si_pid() };
    Ok((pid > 0).then_some(pid as u32))
}

/// Reaps `pid`, which [`exited_child`] reported.
pub fn reap(pid: u32) -> Option<rustix::process::WaitStatus> {
    let pid = Pid::from_raw(pid as i32)?;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            Ok(r) => return r.map(|(_, status)| status),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
}

/// `sig` to process `pid`.
fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// `sig` to process group `pgid`, never to clusterd's own group nor to -1.
fn signal_group_only(pgid: u32, sig: Signal) {
    if pgid <= 1 || pgid == spawn::own_pgid() {
        return;
    }
    if let Some(pgid) = Pid::from_raw(pgid as i32) {
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
}

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
}

/// Parses `/proc/PID/stat` (the command may hold spaces and parentheses).
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (head, rest) = stat.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let mut f = rest.split_whitespace();
    let _state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(ProcStat { pid, ppid, pgrp })
}

/// The children of `ppid`, from `/proc` (`None` without a `/proc` of
/// clusterd's own pid namespace: another namespace's pids would name other
/// processes).
pub fn children_of(ppid: u32) -> Option<Vec<ProcStat>> {
    let me = std::fs::read_link("/proc/self").ok()?;
    if me.to_str()?.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let dir = std::fs::read_dir("/proc").ok()?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Gone since the listing: skipped.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(s) = parse_stat(&stat).filter(|s| s.ppid == ppid) {
            out.push(s);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_hostile_command_names() {
        let stat = "4242 (a) b (c)) S 17 4242 17 0 -1 4194560 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(ProcStat {
                pid: 4242,
                ppid: 17,
                pgrp: 4242
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (init) S"), None);
    }

    #[test]
    fn this_process_is_among_its_parents_children() {
        let me = std::process::id();
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
        let kids = children_of(parent).expect("/proc");
        assert!(kids.iter().any(|k| k.pid == me), "{kids:?}");
    }
}
