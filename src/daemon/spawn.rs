//! Starting a worker process.
//!
//! `std::process::Command` forks and execs; it also reports an exec failure
//! (a missing program, say) to the parent as an error. Between fork and exec
//! the child runs only [`child_setup`], which makes async-signal-safe system
//! calls and nothing that allocates or takes a lock: the fd moves, the
//! parent-death signal and a check that the parent is still there.
//!
//! # fds in the child
//!
//! Every fd clusterd opens is close-on-exec. The ones a worker must inherit
//! are first duplicated (still close-on-exec) to numbers above every target,
//! so that in the child each `dup2(source, target)` has a distinct source and
//! target, lands on the exact number and clears close-on-exec there. What the
//! child ends up with is fds 0-2 (inherited stdio) plus the targets.

use std::ffi::OsString;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::{Pid, Signal};

use crate::config::{Config, Protocol};

/// How to run one generation's workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub chdir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub protocol: Protocol,
}

impl Spec {
    pub fn from_config(config: &Config) -> Spec {
        let mut exec = config.exec.iter();
        Spec {
            program: exec.next().map(PathBuf::from).unwrap_or_default(),
            args: exec.cloned().collect(),
            env: config.env.clone(),
            chdir: config.chdir.clone(),
            uid: config.user.map(|(uid, _)| uid),
            gid: config.group.or(config.user.map(|(_, gid)| gid)),
            protocol: config.protocol,
        }
    }
}

/// A started worker.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// clusterd's end of the IPC channel (`protocol = clusterd`).
    pub ipc: Option<OwnedFd>,
}

/// The first fd number a worker inherits.
const FIRST_FD: RawFd = 3;

/// Starts `spec` as worker `slot` of `generation`.
///
/// # Errors
/// Creating the channel, forking or executing failed; the message names the
/// program.
pub fn spawn(spec: &Spec, slot: u32, generation: u64) -> io::Result<Spawned> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // Keep our end non-blocking: the event loop owns it.
    rustix::fs::fcntl_setfl(&ours, rustix::fs::OFlags::NONBLOCK)?;

    let inherit = [theirs.as_fd()];
    let moves = FdMoves::new(&inherit)?;
    drop(theirs);

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .env("CLUSTERD_FD", FIRST_FD.to_string())
        .env("CLUSTERD_WORKER_ID", slot.to_string())
        .env("CLUSTERD_GENERATION", generation.to_string())
        .current_dir(&spec.chdir)
        .process_group(0);
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    let parent = rustix::process::getpid();
    let sources = moves.raw;
    let count = moves.count;
    // SAFETY: the closure runs in the forked child before exec; it only makes
    // async-signal-safe system calls (dup2, prctl, getppid) on plain integers
    // copied in above, and neither allocates nor locks.
    unsafe {
        cmd.pre_exec(move || child_setup(&sources[..count], parent));
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", spec.program.display()),
        )
    })?;
    drop(moves);
    Ok(Spawned {
        pid: child.id(),
        ipc: Some(ours),
    })
}

/// Sources duplicated above every target fd, as raw numbers for the child.
struct FdMoves {
    _owned: Vec<OwnedFd>,
    raw: [RawFd; crate::proto::MAX_LISTENERS + 2],
    count: usize,
}

impl FdMoves {
    fn new(fds: &[BorrowedFd<'_>]) -> io::Result<FdMoves> {
        let above = FIRST_FD + fds.len() as RawFd;
        let mut raw = [0; crate::proto::MAX_LISTENERS + 2];
        let mut owned = Vec::with_capacity(fds.len());
        for (i, fd) in fds.iter().enumerate() {
            let high = rustix::io::fcntl_dupfd_cloexec(fd, above)?;
            raw[i] = high.as_raw_fd();
            owned.push(high);
        }
        Ok(FdMoves {
            _owned: owned,
            raw,
            count: fds.len(),
        })
    }
}

/// Runs in the child between fork and exec. Async-signal-safe only.
fn child_setup(sources: &[RawFd], parent: Pid) -> io::Result<()> {
    for (i, &src) in sources.iter().enumerate() {
        // SAFETY: `src` is open in the child (inherited across fork; it is
        // closed only at exec). The target is wrapped in ManuallyDrop, so no
        // fd is closed here by a drop.
        unsafe {
            let mut target = ManuallyDrop::new(OwnedFd::from_raw_fd(FIRST_FD + i as RawFd));
            rustix::io::dup2(BorrowedFd::borrow_raw(src), &mut target)?;
        }
    }
    // If clusterd dies, the worker gets SIGTERM and drains (the IPC channel
    // closing tells it too; this also covers programs that ignore it).
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
    // clusterd may have died between fork and prctl.
    if rustix::process::getppid() != Some(parent) {
        return Err(io::Error::other(
            "clusterd exited while starting the worker",
        ));
    }
    Ok(())
}

/// Sends `signal` to the worker's process group (it is the group's leader),
/// so helpers it started go too. A group that is gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return;
    };
    if rustix::process::kill_process_group(pid, signal).is_err() {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// The resident set size of `pid`, from `/proc/PID/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
