//! The harness: real `clusterd` processes with real workers on 127.0.0.1.
//!
//! [`Cluster`] writes a config into a fresh temp folder, starts the
//! `clusterd` binary with its stderr going to a log file, and learns the
//! ephemeral port from the `listening` log line. Every wait polls a condition
//! against a deadline. On drop it stops the daemon it started (QUIT, a fast
//! stop, then KILL after a deadline, by pid) and removes the folder; if a
//! test failed, the log is printed first so the failure explains itself
//! (`CLUSTERD_TEST_LOG=1` prints every test's log).

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

/// One event line of clusterd's log (parsed by the daemon's own
/// `log::Line`, the inverse of its formatter), with the raw text for
/// failure messages.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub level: String,
    pub event: String,
    pub fields: Vec<(String, String)>,
    pub raw: String,
    ts_ms: u64,
}

impl LogLine {
    /// `None` for anything but an event line (workers share the log).
    pub fn parse(line: &str) -> Option<LogLine> {
        let l = clusterd::daemon::log::Line::parse(line)?;
        Some(LogLine {
            level: l.level,
            event: l.event,
            fields: l.fields,
            raw: line.to_string(),
            ts_ms: l.ts_ms,
        })
    }

    /// The timestamp, in milliseconds since the Unix epoch.
    pub fn ts_ms(&self) -> u64 {
        self.ts_ms
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
    /// Waits until every listener is bound. A config without a `bake` line
    /// gets `bake = 0`: the tests that are not about the bake keep their
    /// restarts quick and their output as it was; the bake tests set it.
    pub fn start(tag: &str, config: &str) -> Cluster {
        Cluster::start_in(TempDir::new(tag), tag, config, Command::new(clusterd_bin()))
    }

    /// Like [`Cluster::start`], in `dir` (which may already hold files the
    /// config refers to), running `command`: the clusterd binary or a copy
    /// of it, with whatever the test set (uid, gid, rlimits…). The harness
    /// adds `-c CONFIG` and the standard streams.
    pub fn start_in(dir: TempDir, tag: &str, config: &str, mut command: Command) -> Cluster {
        let control = dir.path().join("control.sock");
        let mut text = config.to_string();
        let _ = writeln!(text, "\ncontrol = {}", control.display());
        if !text.lines().any(|l| l.trim_start().starts_with("bake")) {
            text.push_str("bake = 0\n");
        }
        let config = dir.path().join(format!("{tag}.conf"));
        std::fs::write(&config, &text).expect("write config");
        let log = dir.path().join("clusterd.log");
        let child = command
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
        // With `log_file` or JSON the harness cannot read "started" in its
        // log: it waits for the control socket to answer instead.
        let text_on_stderr = !text.contains("log_file") && !text.contains("log_format = json");
        if text_on_stderr {
            cluster.wait_event("started", |_| true);
        } else {
            wait_for("the control socket", || {
                std::os::unix::net::UnixStream::connect(&cluster.control).ok()
            });
        }
        cluster
    }

    /// Starts a cluster of `workers` shop workers on an ephemeral port, with
    /// `extra` config lines.
    pub fn shop(tag: &str, workers: u32, extra: &str) -> Cluster {
        let config = format!(
            "exec = {}\nworkers = {workers}\nlisten = 127.0.0.1:0\n{extra}\n",
            example("shop").display()
        );
        Cluster::start(tag, &config)
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

    /// The log so far, up to its last complete line (a line being written
    /// is left for the next look).
    pub fn log_text(&self) -> String {
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let end = text.rfind('\n').map_or(0, |i| i + 1);
        text.truncate(end);
        text
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
            // Whether it had exited before the log was read: then the log
            // is complete, and a missing line will never come.
            let exited = self.peek_exit().is_some();
            let found = self.events(event).into_iter().find(|l| pred(l));
            if found.is_none() && exited {
                panic!(
                    "clusterd exited while waiting for {event}:\n{}",
                    self.log_text()
                );
            }
            found
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
            let exited = self.peek_exit().is_some();
            let got: Vec<LogLine> = self.events(event).into_iter().filter(|l| pred(l)).collect();
            if got.len() < n && exited {
                panic!(
                    "clusterd exited with {} of {n} {event} lines:\n{}",
                    got.len(),
                    self.log_text()
                );
            }
            (got.len() >= n).then_some(got)
        })
    }

    /// The pid of worker `id` of `generation` once it is ready (its
    /// `worker.ready` line).
    pub fn ready_pid(&self, id: u32, generation: u64) -> u32 {
        let line = self.wait_event("worker.ready", |l| {
            l.num("id") == u64::from(id) && l.num("generation") == generation
        });
        line.num("pid") as u32
    }

    /// Waits for the `worker.exit` (or `worker.crash`) line of each of
    /// `pids`; returns them in the order of `pids`.
    pub fn wait_exits(&self, pids: &[u32]) -> Vec<LogLine> {
        pids.iter()
            .map(|&pid| {
                wait_for(&format!("the exit of worker pid {pid}"), || {
                    self.lines().into_iter().find(|l| {
                        (l.event == "worker.exit" || l.event == "worker.crash")
                            && l.get("pid") == Some(pid.to_string().as_str())
                    })
                })
            })
            .collect()
    }

    /// Sets `key = value` in the config file: replaces the line that sets
    /// `key`, or appends one. Every other line (the `control` line the
    /// harness added, too) stays.
    pub fn set_config(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        let mut found = false;
        let mut out = String::new();
        for line in text.lines() {
            if line.split('=').next().map(str::trim) == Some(key) {
                if !found {
                    let _ = writeln!(out, "{key} = {value}");
                }
                found = true;
            } else {
                let _ = writeln!(out, "{line}");
            }
        }
        if !found {
            let _ = writeln!(out, "{key} = {value}");
        }
        std::fs::write(&self.config, out).expect("write config");
    }

    /// `clusterctl status --json`, parsed; panics unless it succeeds.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "clusterctl status failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
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
        if self.exit.is_some() {
            return self.exit;
        }
        // try_wait needs &mut; peek through /proc instead when running.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (state == "Z").then(ExitStatus::default)
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
        // CLUSTERD_TEST_LOG=1 shows every log, not only a failed test's.
        if std::thread::panicking() || std::env::var_os("CLUSTERD_TEST_LOG").is_some() {
            eprintln!(
                "---- clusterd log ({}) ----\n{}---- end of log ----",
                self.log.display(),
                self.log_text()
            );
            // What the workers printed to stdout, byte for byte (some tests
            // read it).
            let stdout = self.dir.path().join("stdout.log");
            if let Ok(bytes) = std::fs::read(&stdout) {
                if !bytes.is_empty() {
                    eprintln!(
                        "---- stdout ({}, {} bytes) ----\n{}\n---- end of stdout ----",
                        stdout.display(),
                        bytes.len(),
                        bytes.escape_ascii()
                    );
                }
            }
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

/// Sends `sig` to one process, by pid.
pub fn kill(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("send a signal");
}

/// Waits until none of `pids` is alive (gone, or a zombie).
pub fn wait_gone(what: &str, pids: &[u32]) {
    wait_for(what, || pids.iter().all(|&p| !alive(p)).then_some(()));
}

/// The process group of `pid` (from /proc).
pub fn pgid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After "(comm)": state, ppid, pgrp.
    let rest = stat.rsplit(')').next().expect("stat fields");
    rest.split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .expect("pgrp")
}

/// The open fds of `pid`: number and link target (`socket:[123]`, a path…).
pub fn fds(pid: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd");
    for entry in dir.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // An fd closed since the listing is simply skipped.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            out.push((fd, target.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    out
}

/// The socket inodes among `pid`'s fds.
pub fn socket_inodes(pid: u32) -> std::collections::BTreeSet<u64> {
    fds(pid)
        .iter()
        .filter_map(|(_, t)| socket_inode(t))
        .collect()
}

/// `socket:[123]` → 123.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the TCP sockets in LISTEN state that hold `addr`'s port:
/// bound to `addr` itself or to a wildcard address that covers it.
pub fn tcp_listen_inodes(addr: SocketAddr) -> Vec<u64> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    // /proc/net/tcp{,6} print addresses as native-endian 32-bit words.
    let parse_ip = |hex: &str| -> Option<IpAddr> {
        let words: Vec<u32> = (0..hex.len() / 8)
            .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
            .collect::<Option<_>>()?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        match bytes.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
            _ => None,
        }
    };
    let covers = |ip: IpAddr| {
        ip == addr.ip()
            || ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            || ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            || ip.to_canonical() == addr.ip()
    };
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some((ip, port)) = local.split_once(':') else {
                continue;
            };
            let port = u16::from_str_radix(port, 16).ok();
            if *state == "0A" && port == Some(addr.port()) && parse_ip(ip).is_some_and(covers) {
                out.push(inode.parse().expect("inode"));
            }
        }
    }
    out
}

/// The inode of the listening unix socket bound to `path` (/proc/net/unix).
pub fn unix_socket_inode(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    let path = path.to_string_lossy();
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        (f.get(7) == Some(&path.as_ref())).then(|| f[6].parse().ok())?
    })
}

/// Runs the clusterd binary with `args` (it is expected to exit by itself:
/// a config error, --check, --help); kills it and panics after `DEADLINE`.
pub fn run_clusterd(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut child = Command::new(clusterd_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run clusterd");
    let end = Instant::now() + DEADLINE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("clusterd output");
            panic!(
                "clusterd {args:?} did not exit within {DEADLINE:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("clusterd output")
}

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The bytes of a request: `GET` without a body, `POST` with `body`.
pub fn request(method: &str, path: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if method == "POST" {
        let _ = write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    if close {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A checkout request body.
pub const CART: &[u8] = br#"{"cart":[1,2,3]}"#;

/// Connects to `addr` (with a deadline on connect, reads and writes).
pub fn connect(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    s.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    s
}

/// Reads one response framed by `Content-Length` (what the shop and the
/// testworker send). Errors on EOF, timeout, or anything malformed.
pub fn read_response(stream: &mut std::net::TcpStream) -> std::io::Result<RawResponse> {
    use std::io::{Error, ErrorKind, Read};
    let bad = |why: String| Error::new(ErrorKind::InvalidData, why);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!("EOF after {} bytes of a response head", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| bad(format!("no Content-Length in {head:?}")))?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "EOF in the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends one request on a new connection and reads the response.
pub fn exchange(addr: SocketAddr, req: &[u8]) -> std::io::Result<RawResponse> {
    use std::io::Write;
    let mut s = connect(addr);
    s.write_all(req)?;
    read_response(&mut s)
}

/// Prints every report, then asserts that none has a failure of any kind.
#[track_caller]
pub fn finish_loads(loads: Vec<(&str, clusterd_bench::Running)>) {
    let reports: Vec<(&str, Report)> = loads.into_iter().map(|(n, l)| (n, l.stop())).collect();
    for (name, report) in &reports {
        println!("---- load: {name} ----\n{report}");
    }
    for (name, report) in &reports {
        assert_no_failures(name, report);
    }
}

/// The four loads of the restart tests against the shop, two connections
/// each: keep-alive `GET /products/1`, new-connection GET, keep-alive
/// `POST /checkout`, new-connection POST.
pub fn mixed_load(addr: SocketAddr) -> Vec<(&'static str, clusterd_bench::Running)> {
    vec![
        ("keep-alive GET", load(addr, 2, true, Method::Get)),
        ("new-connection GET", load(addr, 2, false, Method::Get)),
        ("keep-alive POST", load(addr, 2, true, Method::Post)),
        ("new-connection POST", load(addr, 2, false, Method::Post)),
    ]
}

/// Lets every load complete at least `n` more requests.
#[track_caller]
pub fn let_loads_run(loads: &[(&str, clusterd_bench::Running)], n: u64) {
    for (name, l) in loads {
        let target = l.ok_so_far() + n;
        assert!(
            l.wait_for_ok(target, DEADLINE),
            "{name}: load stalled: {}",
            l.snapshot()
        );
    }
}

/// Polls `cond` until it holds, for at most `limit`; whether it held. For
/// checks that report what they saw when the condition never held.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Copies the program `src` to `dst` (mode 0755) and returns once it can be
/// run. The copy is written under another name and renamed into place, so a
/// process that runs `dst` meanwhile finds either no file or the whole
/// program. Until every process forked (by any thread of this test binary)
/// while the copy was open for writing has exec'd, running it fails with
/// ETXTBSY: it is run once with `--version` (testworker and clusterd both
/// exit at once) until it is not busy.
pub fn copy_program(src: &Path, dst: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut name = dst.file_name().expect("a file name").to_os_string();
    name.push(".partial");
    let partial = dst.with_file_name(name);
    std::fs::copy(src, &partial)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), partial.display()));
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wait_for(&format!("{} to be runnable", partial.display()), || {
        let run = Command::new(&partial)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match run {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
            Err(e) => panic!("cannot run {}: {e}", partial.display()),
            Ok(_) => Some(()),
        }
    });
    std::fs::rename(&partial, dst).expect("rename the copy into place");
}

/// The fields of `/proc/PID/stat` after the command name (state is field 0).
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    stat.rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The CPU time `pid` has used so far, user plus system (`/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Duration {
    let f = stat_fields(pid);
    // After the state: ppid pgrp session tty_nr tpgid flags minflt cminflt
    // majflt cmajflt utime stime.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| f[i].parse::<u64>().expect("utime/stime"))
        .sum();
    Duration::from_secs_f64(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The resident set size of `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// The real uid of `pid` (`/proc/PID/status`), if it still exists.
pub fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every process id in /proc.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// How many tasks (processes and their threads: what RLIMIT_NPROC counts)
/// run with real uid `uid` on the machine.
pub fn tasks_of_uid(uid: u32) -> usize {
    all_pids()
        .into_iter()
        .filter(|&p| proc_uid(p) == Some(uid))
        .map(|p| std::fs::read_dir(format!("/proc/{p}/task")).map_or(0, |d| d.flatten().count()))
        .sum()
}

/// The processes (other than this one) whose command line mentions `path`.
pub fn procs_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.as_os_str().as_encoded_bytes();
    all_pids()
        .into_iter()
        .filter(|&p| p != std::process::id())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// A unix socket as `/proc/net/unix` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// 1 stream, 2 datagram, 5 seqpacket.
    pub kind: u32,
    /// Empty when unnamed, `@name` when abstract. Sockets accepted from a
    /// listener show the listener's path.
    pub path: String,
}

/// Every unix socket in this network namespace, by inode.
pub fn unix_sockets() -> std::collections::HashMap<u64, UnixSocket> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode [Path]
            let kind = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let inode = f.get(6)?.parse().ok()?;
            let path = f.get(7).map_or(String::new(), |p| p.to_string());
            Some((inode, UnixSocket { kind, path }))
        })
        .collect()
}

/// An fd's kind with the inode left out (`socket`, `pipe`,
/// `anon_inode:[eventpoll]`, a path): what stays the same from one process
/// to a like one.
pub fn fd_kind(target: &str) -> String {
    match target.split_once(":[") {
        Some((kind @ ("socket" | "pipe"), _)) => kind.to_string(),
        _ => target.to_string(),
    }
}

/// Checks what each worker in `pids` holds: fds 0-2; its IPC channel at fd 3
/// (a SOCK_SEQPACKET socket no other process of the cluster holds); the
/// listener clusterd bound; and otherwise only what its own runtime opened
/// (epoll, eventfd, timerfd; pipes and sockets that neither clusterd nor
/// another worker holds). Nothing of clusterd's: no control socket, no end
/// of any channel, no other worker's fd, nothing clusterd itself inherited
/// from whoever started it.
#[track_caller]
pub fn check_worker_fds(cluster: &Cluster, pids: &[u32]) {
    use std::collections::BTreeSet;
    let listeners: BTreeSet<u64> = tcp_listen_inodes(cluster.addr()).into_iter().collect();
    assert_eq!(listeners.len(), 1, "one listening socket: {listeners:?}");
    let control = unix_socket_inode(&cluster.control).expect("the control socket is listed");
    let unix = unix_sockets();
    let clusterd_fds = fds(cluster.pid());
    let clusterd_targets: BTreeSet<&str> = clusterd_fds.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        clusterd_targets.contains(format!("socket:[{control}]").as_str()),
        "clusterd holds its control socket: {clusterd_fds:?}"
    );
    let all: Vec<(u32, Vec<(i32, String)>)> = pids.iter().map(|&p| (p, fds(p))).collect();
    for (pid, worker_fds) in &all {
        let numbers: BTreeSet<i32> = worker_fds.iter().map(|(fd, _)| *fd).collect();
        for fd in [0, 1, 2, 3] {
            assert!(
                numbers.contains(&fd),
                "worker {pid} has fd {fd}: {worker_fds:?}"
            );
        }
        let others: BTreeSet<&str> = all
            .iter()
            .filter(|(p, _)| p != pid)
            .flat_map(|(_, f)| f.iter().map(|(_, t)| t.as_str()))
            .collect();
        for listener in &listeners {
            assert!(
                worker_fds
                    .iter()
                    .any(|(_, t)| socket_inode(t) == Some(*listener)),
                "worker {pid} holds the listener (inode {listener}): {worker_fds:?}"
            );
        }
        for (fd, target) in worker_fds {
            let what = format!("worker {pid} fd {fd} -> {target}");
            if *fd <= 2 {
                continue;
            }
            if *fd == 3 {
                let inode = socket_inode(target).unwrap_or_else(|| panic!("{what}: not a socket"));
                assert_eq!(
                    unix.get(&inode).map(|s| s.kind),
                    Some(5),
                    "{what}: the IPC channel is a unix SOCK_SEQPACKET socket"
                );
            }
            if target.starts_with("anon_inode:") {
                continue; // the runtime's epoll, eventfd, timerfd
            }
            match socket_inode(target) {
                Some(inode) if listeners.contains(&inode) => continue,
                Some(inode) => assert_ne!(inode, control, "{what}: the control socket"),
                None => assert!(
                    target.starts_with("pipe:["),
                    "{what}: unexpected (a worker holds sockets, pipes and anon inodes only): {worker_fds:?}"
                ),
            }
            assert!(
                !clusterd_targets.contains(target.as_str()),
                "{what}: clusterd holds it too: clusterd's fds {clusterd_fds:?}"
            );
            assert!(
                !others.contains(target.as_str()),
                "{what}: another worker holds it too: {all:?}"
            );
        }
    }
}
