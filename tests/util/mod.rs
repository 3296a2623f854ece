//! The harness: real `clusterd` processes with real workers on 127.0.0.1.
//!
//! [`Cluster`] writes a config into a fresh temp folder, starts the
//! `clusterd` binary with its stderr going to a log file, and learns the
//! ephemeral port from the `listening` log line. Every wait polls a condition
//! against a deadline. On drop it stops the daemon it started (TERM, then
//! KILL after a deadline, by pid) and removes the folder; if a test failed,
//! the log is printed first so the failure explains itself.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use clusterd_bench::{Method, Report, Spec, get};

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A unique, empty temp folder, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("clusterd-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
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

/// The folder with the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_clusterd"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

pub fn clusterd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clusterd"))
}

/// An example program (built by `cargo test` along with the tests).
pub fn example(name: &str) -> PathBuf {
    let path = bin_dir().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// Polls `cond` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    wait_for_within(what, DEADLINE, &mut cond)
}

pub fn wait_for_within<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One parsed log line: `TS LEVEL EVENT key=value …`.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub level: String,
    pub event: String,
    pub fields: Vec<(String, String)>,
    pub raw: String,
}

impl LogLine {
    pub fn parse(line: &str) -> Option<LogLine> {
        let mut rest = line;
        let word = |rest: &mut &str| -> Option<String> {
            let s = rest.trim_start();
            let end = s.find(' ').unwrap_or(s.len());
            let w = s[..end].to_string();
            *rest = &s[end..];
            Some(w).filter(|w| !w.is_empty())
        };
        let _ts = word(&mut rest)?;
        let level = word(&mut rest)?;
        let event = word(&mut rest)?;
        let mut fields = Vec::new();
        let mut s = rest.trim_start();
        while let Some(eq) = s.find('=') {
            let key = s[..eq].to_string();
            s = &s[eq + 1..];
            let value;
            if let Some(quoted) = s.strip_prefix('"') {
                let mut v = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                v.push(if n == 'n' { '\n' } else { n });
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => v.push(c),
                    }
                }
                value = v;
                s = &quoted[end..];
            } else {
                let end = s.find(' ').unwrap_or(s.len());
                value = s[..end].to_string();
                s = &s[end..];
            }
            fields.push((key, value));
            s = s.trim_start();
        }
        Some(LogLine {
            level,
            event,
            fields,
            raw: line.to_string(),
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {key} in {}", self.raw))
    }
}

/// A running clusterd started by this test.
pub struct Cluster {
    pub dir: TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    pub control: PathBuf,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl Cluster {
    /// Writes `config` (the `control` line is added) and starts clusterd.
    /// Waits until every listener is bound.
    pub fn start(tag: &str, config: &str) -> Cluster {
        let dir = TempDir::new(tag);
        let control = dir.path().join("control.sock");
        let mut text = config.to_string();
        let _ = writeln!(text, "\ncontrol = {}", control.display());
        let config = dir.path().join(format!("{tag}.conf"));
        std::fs::write(&config, text).expect("write config");
        let log = dir.path().join("clusterd.log");
        let child = Command::new(clusterd_bin())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).expect("stdout log"))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start clusterd");
        let cluster = Cluster {
            dir,
            config,
            log,
            control,
            child: Some(child),
            exit: None,
        };
        cluster.wait_event("started", |_| true);
        cluster
    }

    /// Starts a cluster of `workers` test workers in `mode` on an ephemeral port.
    pub fn testworkers(tag: &str, workers: u32, mode: &str, extra: &str) -> Cluster {
        let config = format!(
            "exec = {} {mode}\nworkers = {workers}\nlisten = 127.0.0.1:0\n{extra}\n",
            example("testworker").display()
        );
        Cluster::start(tag, &config)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The log so far, as lines.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn lines(&self) -> Vec<LogLine> {
        self.log_text().lines().filter_map(LogLine::parse).collect()
    }

    pub fn events(&self, event: &str) -> Vec<LogLine> {
        self.lines()
            .into_iter()
            .filter(|l| l.event == event)
            .collect()
    }

    /// Waits for the first `event` line that satisfies `pred`.
    pub fn wait_event(&self, event: &str, pred: impl Fn(&LogLine) -> bool) -> LogLine {
        wait_for(&format!("log event {event}"), || {
            if let Some(status) = self.peek_exit() {
                panic!(
                    "clusterd exited ({status}) while waiting for {event}:\n{}",
                    self.log_text()
                );
            }
            self.events(event).into_iter().find(|l| pred(l))
        })
    }

    /// Waits until `n` lines of `event` satisfy `pred`; returns them.
    pub fn wait_events(
        &self,
        event: &str,
        n: usize,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Vec<LogLine> {
        wait_for(&format!("{n} log events {event}"), || {
            let got: Vec<LogLine> = self.events(event).into_iter().filter(|l| pred(l)).collect();
            (got.len() >= n).then_some(got)
        })
    }

    /// The address of listener `name`.
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        let line = self.wait_event("listening", |l| l.get("name") == Some(name));
        line.get("addr")
            .expect("addr")
            .parse()
            .expect("a socket address")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr_of("http")
    }

    /// Waits until every worker is ready (`pool.ready` with this generation).
    pub fn wait_ready(&self, generation: u64) {
        self.wait_event("pool.ready", |l| l.num("generation") == generation);
    }

    /// The pids of the worker processes alive now (children of clusterd).
    pub fn worker_pids(&self) -> Vec<u32> {
        children(self.pid())
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if self.exit.is_none() {
            let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    fn peek_exit(&self) -> Option<ExitStatus> {
        // try_wait needs &mut; peek through /proc instead when running.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (state == "Z").then(|| std::process::ExitStatus::default())
    }

    /// Waits for clusterd to exit; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        let child = self.child.as_mut().expect("child");
        let status = wait_for("clusterd to exit", || child.try_wait().ok().flatten());
        self.exit = Some(status);
        status
    }

    /// Runs clusterctl against this cluster.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let ctl = bin_dir().join("clusterctl");
        assert!(
            ctl.exists(),
            "{} is missing: run the tests with `cargo test --workspace`",
            ctl.display()
        );
        Command::new(ctl)
            .arg("-s")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run clusterctl")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- clusterd log ({}) ----\n{}---- end of log ----",
                self.log.display(),
                self.log_text()
            );
        }
        if self.exit.is_some() {
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The child pids of `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Load against `addr` in the background: `connections` clients.
pub fn load(
    addr: SocketAddr,
    connections: usize,
    keep_alive: bool,
    method: Method,
) -> clusterd_bench::Running {
    let mut spec = Spec::new(addr);
    spec.connections = connections;
    spec.keep_alive = keep_alive;
    spec.method = method;
    spec.duration = Some(Duration::from_secs(120));
    spec.timeout = Duration::from_secs(20);
    match method {
        Method::Get => spec.path = "/products/1".into(),
        Method::Post => {
            spec.path = "/checkout".into();
            spec.body = br#"{"cart":[1,2,3]}"#.to_vec();
        }
    }
    let running = clusterd_bench::start(spec).expect("start load");
    assert!(
        running.wait_for_ok(20, DEADLINE),
        "load never got going: {}",
        running.snapshot()
    );
    running
}

/// Asserts that a load report has no failure of any kind.
#[track_caller]
pub fn assert_no_failures(what: &str, report: &Report) {
    assert!(report.ok > 0, "{what}: no request succeeded\n{report}");
    assert_eq!(report.failed(), 0, "{what}: failed requests\n{report}");
}
