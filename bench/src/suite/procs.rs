//! The processes the suite starts, and what it reads about them from /proc.
//!
//! Every process is started by [`Proc::spawn`], which records its pid; only those pids are
//! ever signalled. Dropping a [`Proc`] stops it (TERM, then KILL after a grace, by pid), and
//! since the release profile aborts on panic (no unwinding, no drops), a panic hook kills the
//! recorded pids first ([`install_panic_hook`]). clusterd's workers follow their clusterd
//! (they drain when its IPC channel closes, and have a parent-death signal).
//!
//! Signals are sent with the `kill` program: the bench package depends on nothing that wraps
//! `kill(2)`.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use clusterd::proto::{self, FRAME_HEADER, MAX_RESPONSE, Request, Response, Status};

use super::log::{LogLine, LogReader};

/// Pids of the processes started and not yet reaped.
static STARTED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// How often waits look again.
const POLL: Duration = Duration::from_millis(1);

/// Kills every process the suite started and has not reaped, then panics as usual.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(pids) = STARTED.try_lock() {
            for &pid in pids.iter() {
                let _ = signal(pid, "KILL");
            }
        }
        previous(info);
    }));
}

/// Sends `sig` (`TERM`, `KILL`, `HUP`…) to `pid`, a process this suite started.
pub fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let out = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kill -{sig} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `f` every [`POLL`] until it returns `Some`, or `None` after `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A fresh temp folder, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("clusterd-bench-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process this suite started.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: RefCell<Child>,
    exit: Cell<Option<ExitStatus>>,
}

impl Proc {
    /// Spawns `cmd` and records its pid.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Proc, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        if let Ok(mut pids) = STARTED.lock() {
            pids.push(child.id());
        }
        Ok(Proc {
            name: name.to_string(),
            child: RefCell::new(child),
            exit: Cell::new(None),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.borrow().id()
    }

    /// Its exit status, if it has exited (it is reaped then).
    pub fn exit(&self) -> Option<ExitStatus> {
        if self.exit.get().is_none() {
            let status = self.child.borrow_mut().try_wait().ok().flatten();
            if let Some(status) = status {
                self.exit.set(Some(status));
                let pid = self.pid();
                if let Ok(mut pids) = STARTED.lock() {
                    pids.retain(|&p| p != pid);
                }
            }
        }
        self.exit.get()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.exit())
    }

    /// Blocks until it exits (no polling, so the moment of the exit is seen at once, for
    /// timings); SIGKILLs it if that takes longer than `timeout`, and then returns `None`.
    pub fn wait_exit_blocking(&self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit() {
            return Some(status);
        }
        let pid = self.pid();
        let (done, watch) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(timeout) {
                let _ = signal(pid, "KILL");
                true
            } else {
                false
            }
        });
        let status = self.child.borrow_mut().wait().ok();
        let _ = done.send(());
        let killed = watchdog.join().unwrap_or(false);
        if let Some(status) = status {
            self.exit.set(Some(status));
            if let Ok(mut pids) = STARTED.lock() {
                pids.retain(|&p| p != pid);
            }
        }
        if killed { None } else { status }
    }

    /// Sends `sig`, waits up to `grace` for the exit, then SIGKILLs it. Returns the exit
    /// status, and whether it needed the SIGKILL.
    pub fn stop(&self, sig: &str, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.exit() {
            return (Some(status), false);
        }
        let _ = signal(self.pid(), sig);
        if let Some(status) = self.wait_exit(grace) {
            return (Some(status), false);
        }
        let _ = self.child.borrow_mut().kill();
        (self.wait_exit(Duration::from_secs(10)), true)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit().is_none() {
            let (status, killed) = self.stop("TERM", Duration::from_secs(15));
            if killed || status.is_none() {
                eprintln!("  (had to SIGKILL {} pid {})", self.name, self.pid());
            }
        }
    }
}

/// What `clusterctl` printed, and how long it took.
#[derive(Debug)]
pub struct CtlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub wall: Duration,
}

/// One rolling restart as `clusterctl restart --json` reported it.
#[derive(Debug, Clone, Default)]
pub struct Restart {
    /// clusterctl's run time: connect, restart, final result.
    pub wall: Duration,
    /// Each replaced worker's step: spawn of the replacement to its READY, in ms.
    pub steps_ms: Vec<u64>,
    pub replaced: u64,
    /// clusterd's own figure for the whole restart.
    pub elapsed_ms: u64,
}

/// A running clusterd started by the suite, with a config in its own temp folder and its
/// stderr (the log) in a file there.
#[derive(Debug)]
pub struct Daemon {
    // Field order matters: the process is stopped before its folder is removed.
    proc: Proc,
    log: RefCell<LogReader>,
    pub control: PathBuf,
    /// Its config file (a test may rewrite it before a restart).
    pub config: PathBuf,
    clusterctl: PathBuf,
    /// When it was spawned, by the monotonic and by the wall clock.
    pub spawned: Instant,
    pub spawned_wall: SystemTime,
    dir: TempDir,
}

impl Daemon {
    /// Writes `config` plus a `control` line into a temp folder and starts clusterd on it.
    /// Does not wait for anything.
    pub fn start(
        clusterd: &Path,
        clusterctl: &Path,
        tag: &str,
        config: &str,
    ) -> Result<Daemon, String> {
        Daemon::start_wrapped(&[], clusterd, clusterctl, tag, config)
    }

    /// [`Daemon::start`], with clusterd run by `wrapper` (`ip netns exec NS`, which execs
    /// it, so the pid is clusterd's).
    pub fn start_wrapped(
        wrapper: &[&str],
        clusterd: &Path,
        clusterctl: &Path,
        tag: &str,
        config: &str,
    ) -> Result<Daemon, String> {
        let dir = TempDir::new(tag)?;
        let control = dir.path().join("control.sock");
        let mut text = config.trim_end().to_string();
        let _ = writeln!(text, "\ncontrol = {}", control.display());
        let config_path = dir.path().join(format!("{tag}.conf"));
        std::fs::write(&config_path, &text).map_err(|e| format!("cannot write config: {e}"))?;
        let log_path = dir.path().join("clusterd.log");
        let file = |p: &Path| {
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        let stdout = file(&dir.path().join("stdout.log"))?;
        let stderr = file(&log_path)?;
        let spawned_wall = SystemTime::now();
        let spawned = Instant::now();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(clusterd);
                cmd
            }
            None => Command::new(clusterd),
        };
        let proc = Proc::spawn(
            cmd.arg("-c")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr),
            "clusterd",
        )?;
        Ok(Daemon {
            proc,
            log: RefCell::new(LogReader::new(&log_path)),
            control,
            config: config_path,
            clusterctl: clusterctl.to_path_buf(),
            spawned,
            spawned_wall,
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Rewrites the config's `exec` line, for the next rolling restart.
    pub fn set_exec(&self, exec: &str) -> Result<(), String> {
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| format!("cannot read {}: {e}", self.config.display()))?;
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("exec =") {
                    format!("exec = {exec}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&self.config, text.join("\n") + "\n")
            .map_err(|e| format!("cannot write {}: {e}", self.config.display()))
    }

    /// The event lines logged so far.
    pub fn events(&self) -> Vec<LogLine> {
        let mut log = self.log.borrow_mut();
        log.poll();
        log.events.clone()
    }

    /// Every line so far, worker output included.
    pub fn raw_lines(&self) -> Vec<String> {
        let mut log = self.log.borrow_mut();
        log.poll();
        log.raw.clone()
    }

    /// The last lines of the log, for error messages.
    pub fn tail(&self) -> String {
        let mut log = self.log.borrow_mut();
        log.poll();
        log.tail(8)
    }

    /// Waits up to `timeout` for the first `event` line (after the first `skip` event lines)
    /// that satisfies `pred`. Fails early if clusterd exits.
    pub fn wait_event(
        &self,
        event: &str,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Result<LogLine, String> {
        let end = Instant::now() + timeout;
        loop {
            // Whether it had exited before the log was read: then the log is complete.
            let exited = self.proc.exit();
            {
                let mut log = self.log.borrow_mut();
                log.poll();
                if let Some(line) = log.events.iter().find(|l| l.event == event && pred(l)) {
                    return Ok(line.clone());
                }
            }
            if let Some(status) = exited {
                return Err(format!(
                    "clusterd exited ({status}) before logging {event}; log ends:\n{}",
                    self.tail()
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "no {event} in clusterd's log after {timeout:?}; log ends:\n{}",
                    self.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The address of the `http` listener, from the `listening` line.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        let line = self.wait_event("listening", Duration::from_secs(10), |l| {
            l.get("name") == Some("http")
        })?;
        let addr = line.get("addr").unwrap_or_default();
        addr.parse()
            .map_err(|_| format!("listening line has no socket address: {addr:?}"))
    }

    /// Waits for `pool.ready` of `generation`.
    pub fn wait_pool_ready(&self, generation: u64, timeout: Duration) -> Result<LogLine, String> {
        self.wait_event("pool.ready", timeout, |l| {
            l.num("generation") == Some(generation)
        })
    }

    /// `Status` over the control socket, without clusterctl.
    pub fn status(&self) -> Result<Status, String> {
        match raw_request(&self.control, &Request::Status)? {
            Response::Status(status) => Ok(*status),
            other => Err(format!("unexpected reply to Status: {other:?}")),
        }
    }

    /// Waits until exactly `workers` workers exist, all ready (the drained ones gone).
    pub fn wait_settled(&self, workers: usize, timeout: Duration) -> Result<Status, String> {
        let mut last = String::new();
        poll_until(timeout, || match self.status() {
            Ok(s) if s.workers.len() == workers && s.workers.iter().all(|w| w.state == "ready") => {
                Some(s)
            }
            Ok(s) => {
                last = s
                    .workers
                    .iter()
                    .map(|w| format!("{}:{}", w.id, w.state))
                    .collect::<Vec<_>>()
                    .join(" ");
                None
            }
            Err(e) => {
                last = e;
                None
            }
        })
        .ok_or_else(|| format!("workers did not settle to {workers} ready in {timeout:?}: {last}"))
    }

    /// Runs `clusterctl -s SOCKET ARGS…`, killing it after `timeout`. Its output goes to files
    /// in the temp folder (no pipe to fill up).
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Result<CtlOutput, String> {
        let out_path = self.dir.path().join("ctl.out");
        let err_path = self.dir.path().join("ctl.err");
        let file = |p: &Path| {
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        let started = Instant::now();
        let proc = Proc::spawn(
            Command::new(&self.clusterctl)
                .arg("-s")
                .arg(&self.control)
                .args(args)
                .stdin(Stdio::null())
                .stdout(file(&out_path)?)
                .stderr(file(&err_path)?),
            "clusterctl",
        )?;
        let status = proc.wait_exit_blocking(timeout);
        let wall = started.elapsed();
        let Some(status) = status else {
            return Err(format!(
                "clusterctl {} did not finish in {timeout:?}",
                args.join(" ")
            ));
        };
        Ok(CtlOutput {
            status,
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
            wall,
        })
    }

    /// `clusterctl restart --json`: a rolling restart, waiting for its result.
    pub fn restart(&self, timeout: Duration) -> Result<Restart, String> {
        let out = self.ctl(&["--json", "restart"], timeout)?;
        let mut restart = Restart {
            wall: out.wall,
            ..Restart::default()
        };
        let mut done = false;
        for line in out.stdout.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let data = &v["data"];
            match v["type"].as_str() {
                Some("progress") => restart
                    .steps_ms
                    .push(data["elapsed_ms"].as_u64().unwrap_or_default()),
                Some("done") => {
                    done = true;
                    restart.replaced = data["replaced"].as_u64().unwrap_or_default();
                    restart.elapsed_ms = data["elapsed_ms"].as_u64().unwrap_or_default();
                }
                _ => {}
            }
        }
        if !out.status.success() || !done {
            return Err(format!(
                "clusterctl restart failed ({}): {}{}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            ));
        }
        Ok(restart)
    }

    /// Graceful stop (SIGTERM), waiting up to `grace` before SIGKILL. Returns how long clusterd
    /// took to exit, or why the stop was not clean.
    pub fn stop(&self, grace: Duration) -> Result<Duration, String> {
        // clusterd installs its signal handlers just before it logs `started`; a TERM sent
        // earlier would kill it outright.
        let _ = self.wait_event("started", Duration::from_secs(10), |_| true);
        let started = Instant::now();
        match self.proc.stop("TERM", grace) {
            (Some(status), false) if status.success() => Ok(started.elapsed()),
            (Some(status), false) => Err(format!("clusterd exited with {status}")),
            (_, _) => Err(format!(
                "clusterd did not stop within {grace:?} of SIGTERM (killed)"
            )),
        }
    }

    /// Whether clusterd has exited (it is reaped then).
    pub fn exited(&self) -> Option<ExitStatus> {
        self.proc.exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // See `stop`: then the process is stopped (TERM, KILL after a grace) as a `Proc`.
        if self.proc.exit().is_none() {
            let _ = self.wait_event("started", Duration::from_secs(5), |_| true);
        }
    }
}

/// One control request and its first response, over a fresh connection.
pub fn raw_request(control: &Path, request: &Request) -> Result<Response, String> {
    let io = |e: io::Error| format!("control socket {}: {e}", control.display());
    let mut s = UnixStream::connect(control).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(&proto::frame(request)).map_err(io)?;
    let mut header = [0u8; FRAME_HEADER];
    s.read_exact(&mut header).map_err(io)?;
    let len = proto::frame_len(header, MAX_RESPONSE).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(io)?;
    proto::decode(&body, MAX_RESPONSE).map_err(|e| e.to_string())
}

/// A port free on 127.0.0.1 right now (bound, then released).
pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`), in bytes.
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    kb_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

/// `KEY:   N kB` in a /proc text (status, smaps), in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    status_field(text, key)?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// The value of `key:` in a /proc status text.
pub fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// CPU time (utime + stime, in clock ticks, every thread) and context switches (voluntary +
/// involuntary, summed over every thread) of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSample {
    pub ticks: u64,
    pub switches: u64,
    pub threads: u64,
}

pub fn cpu_sample(pid: u32) -> Option<CpuSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)? + field(15)?;
    let mut switches = 0;
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        threads += 1;
        for key in ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"] {
            switches += status_field(&text, key)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(CpuSample {
        ticks,
        switches,
        threads,
    })
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, s)| s.split_whitespace().next())
            != Some("Z")
    })
}

/// The open fds of `pid`.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The open fds of a clusterd once the control connections just used are closed: the fewest
/// of five reads 20 ms apart. The clients have gone, but clusterd closes its end when it next
/// reads from them, so one read can count one of them; a leaked fd is in every read.
pub fn settled_fd_count(pid: u32) -> Option<u64> {
    (0..5)
        .filter_map(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            fd_count(pid)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_proc_files() {
        let me = std::process::id();
        assert!(status_kb(me, "VmRSS").is_some_and(|b| b > 0));
        let s = cpu_sample(me).unwrap();
        assert!(s.threads >= 1);
        assert!(alive(me));
        assert_eq!(
            status_field("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS"),
            Some("1234 kB")
        );
    }
}
