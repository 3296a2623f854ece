//! Starting a worker process.
//!
//! `std::process::Command` forks, applies the uid/gid, working directory and
//! process group, and reports a failure in the child (a missing program, say)
//! to the parent as an error. The rest runs in [`child_setup`] between fork
//! and exec, which makes async-signal-safe system calls only and neither
//! allocates nor locks: it moves the inherited fds into place, sets the
//! parent-death signal, checks the parent is still there, writes the child's
//! own pid into `LISTEN_PID` (systemd protocol) and calls `execve` itself
//! with an argv and environment built before the fork.
//!
//! # fds in the child
//!
//! Every fd clusterd opens is close-on-exec, and the ones it inherited are
//! marked so at startup ([`cloexec_inherited_fds`]). The ones a worker must inherit
//! are first duplicated (still close-on-exec) to numbers above every target,
//! so that in the child each `dup2(source, target)` has a distinct source and
//! target, lands on the exact number and clears close-on-exec there. What the
//! child ends up with is fds 0-2 (inherited stdio) plus the targets:
//!
//! - `protocol = clusterd`: fd 3, the IPC channel.
//! - `protocol = systemd`: the listeners at 3.., then the readiness pipe.
//! - `protocol = node`: the same, then Node's IPC channel
//!   (`NODE_CHANNEL_FD`, see [`super::node`]).

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::{Pid, Signal};

use crate::config::{Config, Protocol, RESERVED_ENV};
use crate::proto::MAX_LISTENERS;

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
    /// `watchdog`: passed as `WATCHDOG_USEC` (and `WATCHDOG_PID`, the
    /// worker's own pid), systemd's convention.
    pub watchdog: Option<std::time::Duration>,
    /// `backlog` and `drain_timeout`, told to the Node adapter.
    pub backlog: u32,
    pub drain_timeout: std::time::Duration,
    /// `protocol = node`: the adapter file clusterd wrote (set by the
    /// daemon before each spawn).
    pub node_adapter: Option<PathBuf>,
    /// `dispatch = clusterd`: told to the worker (`CLUSTERD_DISPATCH`).
    pub dispatch: bool,
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
            watchdog: config.watchdog,
            backlog: config.backlog,
            drain_timeout: config.drain_timeout,
            node_adapter: None,
            dispatch: config.dispatch == crate::config::Dispatch::Clusterd,
        }
    }
}

/// A listener as a worker receives it.
#[derive(Debug, Clone, Copy)]
pub struct Inherit<'a> {
    pub name: &'a str,
    pub fd: BorrowedFd<'a>,
}

/// A started worker.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// clusterd's end of the IPC channel (`protocol = clusterd`).
    pub ipc: Option<OwnedFd>,
    /// The read end of the readiness pipe (`protocol = systemd` and `node`).
    pub ready_pipe: Option<OwnedFd>,
    /// clusterd's end of Node's IPC channel (`protocol = node`).
    pub node_channel: Option<OwnedFd>,
}

/// The first fd number a worker inherits.
const FIRST_FD: RawFd = 3;

/// Starts `spec` as worker `slot` of `generation`. `notify` is the
/// `NOTIFY_SOCKET` value for `protocol = systemd`; `cgroup_procs` the
/// `cgroup.procs` file of the worker's own cgroup, which the child moves
/// itself into before exec.
///
/// # Errors
/// Creating the channel, forking or executing failed; the message names the
/// program.
pub fn spawn(
    spec: &Spec,
    slot: u32,
    generation: u64,
    listeners: &[Inherit<'_>],
    notify: Option<&str>,
    output: Option<super::logcap::ChildEnds>,
    cgroup_procs: Option<BorrowedFd<'_>>,
) -> io::Result<Spawned> {
    let mut env: Vec<(String, String)> = vec![
        ("CLUSTERD_WORKER_ID".into(), slot.to_string()),
        ("CLUSTERD_GENERATION".into(), generation.to_string()),
    ];
    if spec.dispatch && spec.protocol != Protocol::Systemd {
        env.push((crate::proto::ENV_DISPATCH.into(), "clusterd".into()));
    }
    let (inherit, ipc, ready_pipe, theirs);
    let (mut node_channel, mut node_theirs) = (None, None);
    let listen_pid;
    match spec.protocol {
        Protocol::Clusterd => {
            let (ours, child) = rustix::net::socketpair(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| step(spec, "cannot create the IPC channel", e.into()))?;
            env.push(("CLUSTERD_FD".into(), FIRST_FD.to_string()));
            theirs = child;
            inherit = vec![theirs.as_fd()];
            ipc = Some(ours);
            ready_pipe = None;
            listen_pid = false;
        }
        Protocol::Systemd | Protocol::Node => {
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| step(spec, "cannot create the readiness pipe", e.into()))?;
            if spec.protocol == Protocol::Node {
                // Node's IPC channel, after the readiness pipe.
                let (ours, child) = rustix::net::socketpair(
                    AddressFamily::UNIX,
                    SocketType::STREAM,
                    SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| step(spec, "cannot create the Node IPC channel", e.into()))?;
                let channel_fd = FIRST_FD + listeners.len() as RawFd + 1;
                let node_env = super::node::worker_env(spec, listeners, channel_fd)
                    .map_err(|e| step(spec, "", e))?;
                env.extend(node_env);
                node_channel = Some(ours);
                node_theirs = Some(child);
            }
            let names: Vec<&str> = listeners.iter().map(|l| l.name).collect();
            env.push(("LISTEN_FDS".into(), listeners.len().to_string()));
            env.push(("LISTEN_FDNAMES".into(), names.join(":")));
            env.push((
                "CLUSTERD_READY_FD".into(),
                (FIRST_FD + listeners.len() as RawFd).to_string(),
            ));
            if let Some(notify) = notify {
                env.push(("NOTIFY_SOCKET".into(), notify.into()));
            }
            theirs = write;
            inherit = listeners
                .iter()
                .map(|l| l.fd)
                .chain([theirs.as_fd()])
                .chain(node_theirs.as_ref().map(|c| c.as_fd()))
                .collect();
            ipc = None;
            ready_pipe = Some(read);
            listen_pid = true;
        }
    }
    let moves =
        FdMoves::new(&inherit).map_err(|e| step(spec, "cannot duplicate the fds to pass", e))?;
    if let Some(watchdog) = spec.watchdog {
        env.push(("WATCHDOG_USEC".into(), watchdog.as_micros().to_string()));
    }
    let mut pid_keys: Vec<&[u8]> = Vec::new();
    if listen_pid {
        pid_keys.push(b"LISTEN_PID=");
    }
    if spec.watchdog.is_some() {
        pid_keys.push(b"WATCHDOG_PID=");
    }
    let image = ExecImage::new(spec, &env, &pid_keys).map_err(|e| step(spec, "", e))?;
    drop(inherit);
    drop(theirs);
    drop(node_theirs);

    let mut cmd = Command::new(&spec.program);
    cmd.current_dir(&spec.chdir).process_group(0);
    // Captured output (logcap): the pipes' write ends become fds 1 and 2;
    // `cmd` holds clusterd's copies and closes them when it is dropped.
    if let Some(output) = output {
        cmd.stdout(output.stdout).stderr(output.stderr);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    let parent = rustix::process::getpid();
    let sources = moves.raw;
    let count = moves.count;
    let cgroup_procs = cgroup_procs.map(|fd| fd.as_raw_fd());
    let mut image = image;
    // SAFETY: the closure runs in the forked child before exec. It makes only
    // async-signal-safe system calls (dup2, prctl, getppid, getpid, execve) on
    // integers and buffers prepared before the fork, and neither allocates nor
    // locks.
    unsafe {
        cmd.pre_exec(move || {
            child_setup(&sources[..count], parent, cgroup_procs)?;
            Err(image.exec())
        });
    }
    let child = cmd.spawn().map_err(|e| step(spec, "", e))?;
    drop(moves);
    Ok(Spawned {
        pid: child.id(),
        ipc,
        ready_pipe,
        node_channel,
    })
}

/// An error before or during the fork, naming the program and the step.
fn step(spec: &Spec, what: &str, e: io::Error) -> io::Error {
    let program = spec.program.display();
    let message = if what.is_empty() {
        format!("cannot start {program}: {e}")
    } else {
        format!("cannot start {program}: {what}: {e}")
    };
    io::Error::new(e.kind(), message)
}

/// Sources duplicated above every target fd, as raw numbers for the child.
struct FdMoves {
    _owned: Vec<OwnedFd>,
    raw: [RawFd; MAX_LISTENERS + 2],
    count: usize,
}

impl FdMoves {
    fn new(fds: &[BorrowedFd<'_>]) -> io::Result<FdMoves> {
        if fds.len() > MAX_LISTENERS + 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for a worker",
            ));
        }
        let above = FIRST_FD + fds.len() as RawFd;
        let mut raw = [0; MAX_LISTENERS + 2];
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

/// The program, argv and environment, built before the fork.
struct ExecImage {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// The digits of `LISTEN_PID=` and `WATCHDOG_PID=`, written in the child.
    pid_digits: Vec<*mut u8>,
}

// SAFETY: the raw pointers point into the buffers this struct owns; it is
// moved into the pre-exec closure and used only in the forked child.
unsafe impl Send for ExecImage {}
// SAFETY: as above; the closure is never called concurrently.
unsafe impl Sync for ExecImage {}

/// Room for a pid's digits and the terminating NUL.
const PID_ROOM: usize = 21;

impl ExecImage {
    /// `pid_keys`: the variables (`KEY=`) whose value is the worker's own
    /// pid, which the child writes in after the fork.
    fn new(spec: &Spec, ours: &[(String, String)], pid_keys: &[&[u8]]) -> io::Result<ExecImage> {
        let cstring = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in the worker's command or environment",
                )
            })
        };
        let path = cstring(spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for a in &spec.args {
            argv.push(cstring(a.as_bytes())?);
        }
        // clusterd's own variables win over the config's `env` (which
        // cannot name the reserved ones; NODE_OPTIONS gets the adapter
        // appended), which wins over clusterd's environment.
        let ours_has = |key: &[u8]| ours.iter().any(|(k, _)| k.as_bytes() == key);
        let overridden = |key: &OsStr| {
            let key = key.as_bytes();
            RESERVED_ENV.iter().any(|r| r.as_bytes() == key)
                || spec.env.iter().any(|(k, _)| k.as_bytes() == key)
                || ours_has(key)
        };
        let mut env: Vec<Vec<u8>> = Vec::new();
        for (k, v) in std::env::vars_os().filter(|(k, _)| !overridden(k)) {
            env.push([k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat());
        }
        let configured = spec.env.iter().filter(|(k, _)| !ours_has(k.as_bytes()));
        for (k, v) in configured.chain(ours) {
            env.push([k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat());
        }
        if env.iter().any(|e| e[..e.len() - 1].contains(&0)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a NUL byte in the worker's environment",
            ));
        }
        let mut pid_digits = Vec::new();
        for key in pid_keys {
            let mut entry = key.to_vec();
            entry.resize(entry.len() + PID_ROOM, 0);
            env.push(entry);
            let last = env.last_mut().expect("just pushed");
            // SAFETY: in bounds: the entry has PID_ROOM bytes after the '='.
            // The Vec's buffer does not move when `env` grows (only the Vec
            // header does).
            pid_digits.push(unsafe { last.as_mut_ptr().add(key.len()) });
        }
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp_ptrs = env
            .iter()
            .map(|e| e.as_ptr().cast())
            .chain([std::ptr::null()])
            .collect();
        Ok(ExecImage {
            path,
            _argv: argv,
            argv_ptrs,
            _env: env,
            envp_ptrs,
            pid_digits,
        })
    }

    /// Writes `LISTEN_PID` (and `WATCHDOG_PID`) and executes the program.
    /// Runs in the child; returns only on failure.
    fn exec(&mut self) -> io::Error {
        for &digits in &self.pid_digits {
            let mut pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
            let mut buf = [0u8; 10];
            let mut n = 0;
            loop {
                buf[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in 0..n {
                // SAFETY: n <= 10 < PID_ROOM bytes reserved after the '='; the
                // byte after the digits stays NUL.
                unsafe { *digits.add(i) = buf[n - 1 - i] };
            }
        }
        // SAFETY: path, argv and envp are NUL-terminated strings in
        // NUL-terminated pointer arrays, all owned by `self`.
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            )
        };
        io::Error::last_os_error()
    }
}

/// Runs in the child between fork and exec. Async-signal-safe only.
fn child_setup(sources: &[RawFd], parent: Pid, cgroup_procs: Option<RawFd>) -> io::Result<()> {
    if let Some(procs) = cgroup_procs {
        // Into its own cgroup before anything else: "0" is the writer
        // itself. A failure is not fatal: clusterd moves it after the fork
        // too, and says so if that fails.
        // SAFETY: the fd is open in the child (inherited across fork) and
        // only written to.
        let _ = rustix::io::write(unsafe { BorrowedFd::borrow_raw(procs) }, b"0");
    }
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
    // (No message: building one would allocate.)
    if rustix::process::getppid() != Some(parent) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Marks every fd clusterd inherited, above stdio, close-on-exec.
///
/// Every fd clusterd opens itself is close-on-exec, but one its own parent
/// left open without the flag (a shell's redirection, a leaked pipe) would
/// otherwise reach every worker. Called once at startup, before anything
/// else is opened. It lists `/proc/self/fd`, or, where there is no `/proc`
/// (an empty root), tries every number below the fd limit.
pub fn cloexec_inherited_fds() {
    let mark = |fd: RawFd| {
        // SAFETY: only the fd flags of a number that may or may not be open
        // are read and set; nothing is closed or owned.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = rustix::io::fcntl_getfd(fd) {
            if !flags.contains(rustix::io::FdFlags::CLOEXEC) {
                let _ = rustix::io::fcntl_setfd(fd, flags | rustix::io::FdFlags::CLOEXEC);
            }
        }
    };
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => {
            let fds: Vec<RawFd> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&fd| fd >= FIRST_FD)
                .collect();
            // (The directory's own fd is among them and already closed.)
            fds.into_iter().for_each(mark);
        }
        Err(_) => {
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            let limit = limit.unwrap_or(65_536).min(65_536) as RawFd;
            (FIRST_FD..limit).for_each(mark);
        }
    }
}

/// Sends `signal` to the worker itself and to its process group (it was
/// made the group's leader), so helpers it started go too; the worker
/// itself is reached even if it moved to another group. A process or group
/// that is gone is not an error. `pid` must be an unreaped child (so it
/// cannot name another process).
pub fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = Pid::from_raw(pid as i32).filter(|p| *p != Pid::INIT) else {
        return;
    };
    if pid.as_raw_nonzero().get() as u32 != own_pgid() {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
    // The worker itself too when it left its group (the group's signal did
    // not reach it), and always for SIGKILL. Not twice otherwise: a second
    // SIGTERM can land while a program's handler is being reset and kill it.
    let in_its_group = rustix::process::getpgid(Some(pid)).is_ok_and(|g| g == pid);
    if !in_its_group || signal == Signal::KILL {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// clusterd's own process group; 0 when it lies outside clusterd's pid
/// namespace (`unshare --pid --fork`), where rustix's `getpgrp` would panic.
pub fn own_pgid() -> u32 {
    // SAFETY: getpgrp takes no arguments and cannot fail.
    let pgid = unsafe { libc::getpgrp() };
    pgid.max(0) as u32
}

/// The resident set size of `pid`, from `/proc/PID/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
