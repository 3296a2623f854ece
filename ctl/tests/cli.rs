//! Runs the real clusterctl binary against a fake clusterd: a unix listener in
//! a temp dir, served by a thread of this test process that speaks the control
//! protocol (read one request frame, answer with a script of frames).
//!
//! End-to-end tests against the real clusterd belong with the daemon's tests.

use clusterd::proto::{
    self, Baking, FRAME_HEADER, LastRestart, ListenerInfo, LogEntry, MAX_REQUEST, Progress,
    Request, Response, RestartOutcome, Scale, Status, WorkerStatus,
};
use serde_json::Value;
use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Harness

/// A fresh, empty folder under the system temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("clusterctl-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake daemon does on a connection, in order; then it closes it.
#[derive(Clone)]
enum Step {
    Send(Response),
    Raw(Vec<u8>),
}

type Script = dyn Fn(&Request) -> Vec<Step> + Send + Sync;

/// A fake clusterd on its own thread. Records every request it decodes.
struct FakeDaemon {
    /// Removed (with the socket) when the daemon is dropped.
    _dir: Dir,
    path: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(
        name: &str,
        script: impl Fn(&Request) -> Vec<Step> + Send + Sync + 'static,
    ) -> FakeDaemon {
        let dir = Dir::new(name);
        let path = dir.join("clusterd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        serve(stream, &*script, &requests);
                    }
                }
            })
        };
        FakeDaemon {
            _dir: dir,
            path,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept; the thread then sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection: read a request frame, run the script, close.
fn serve(mut stream: UnixStream, script: &Script, requests: &Mutex<Vec<Request>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut header = [0u8; FRAME_HEADER];
    if stream.read_exact(&mut header).is_err() {
        return;
    }
    let len = proto::frame_len(header, MAX_REQUEST).unwrap();
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    let request: Request = proto::decode(&body, MAX_REQUEST).unwrap();
    requests.lock().unwrap().push(request.clone());
    for step in script(&request) {
        let bytes = match step {
            Step::Send(response) => proto::frame(&response),
            Step::Raw(bytes) => bytes,
        };
        if stream.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// The outcome of one clusterctl run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn expect(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code; {self:#?}");
        self
    }

    /// stdout as JSON Lines.
    #[track_caller]
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect()
    }
}

/// Runs clusterctl with `args` (and no `$CLUSTERD_SOCKET` unless given in
/// `env`), killing it if it runs longer than 20 s.
fn clusterctl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    cmd.args(args)
        .env_remove("CLUSTERD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let reader = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "clusterctl {args:?} ran for more than 20 s\nstdout: {}\nstderr: {}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code().expect("clusterctl was killed by a signal"),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

// ---------------------------------------------------------------------------
// Sample replies

fn worker(id: u32) -> WorkerStatus {
    WorkerStatus {
        id,
        pid: Some(810 + id),
        generation: 4,
        state: "ready".into(),
        uptime_ms: 11_520_000,
        restarts: 0,
        last_exit: None,
        rss_bytes: Some(14_890_000),
        requests: Some(10_234),
        active: Some(3),
        note: None,
        last_words: None,
    }
}

fn status() -> Status {
    let mut second = worker(2);
    second.restarts = 1;
    second.last_exit = Some("signal 9 (SIGKILL)".into());
    second.uptime_ms = 41_000;
    second.requests = None;
    second.active = None;
    Status {
        version: "0.1.0".into(),
        pid: 4242,
        uptime_ms: 11_533_000,
        config: "/etc/clusterd/shop.conf".into(),
        protocol: "clusterd".into(),
        listeners: vec![ListenerInfo {
            name: "http".into(),
            address: "127.0.0.1:3000".into(),
        }],
        desired: 2,
        ready: 2,
        generation: 4,
        operation: None,
        phase: "running".into(),
        last_restart: Some(LastRestart {
            outcome: "rolled_back".into(),
            generation: 4,
            reason: Some(
                "the canary for worker 1 (pid 905) ended with exit 3 0.3s after READY".into(),
            ),
            ago_ms: 125_000,
        }),
        crash_loop: None,
        workers: vec![worker(1), second],
        image_uptime_ms: 11_533_000,
        upgrades: 0,
    }
}

fn progress(done: u32, total: u32, old_pid: Option<u32>, new_pid: u32, elapsed_ms: u64) -> Step {
    Step::Send(Response::Progress(Progress {
        worker_id: done,
        done,
        total,
        old_pid,
        new_pid,
        elapsed_ms,
    }))
}

/// A daemon that answers every request the way a healthy clusterd would.
fn healthy(name: &str) -> FakeDaemon {
    FakeDaemon::start(name, |request| match request {
        Request::Status => vec![Step::Send(Response::Status(Box::new(status())))],
        Request::Restart => vec![
            progress(1, 2, Some(811), 907, 41),
            progress(2, 2, None, 908, 1200),
            Step::Send(Response::Restarted(RestartOutcome::Done {
                generation: 5,
                replaced: 2,
                elapsed_ms: 1320,
            })),
        ],
        Request::Scale(Scale::Up(n)) => vec![Step::Send(Response::Scaled { from: 4, to: 4 + n })],
        Request::Scale(Scale::Down(n)) => vec![Step::Send(Response::Scaled { from: 4, to: 4 - n })],
        Request::Scale(Scale::To(n)) => vec![Step::Send(Response::Scaled { from: 4, to: *n })],
        Request::Stop => vec![Step::Send(Response::Stopping)],
        Request::Upgrade { .. } => vec![Step::Send(Response::Error(
            "upgrade refused: not in this test".into(),
        ))],
        Request::Logs { lines, .. } => vec![Step::Send(Response::Logs(
            (0..*lines)
                .map(|i| LogEntry {
                    ts_ms: 1_764_932_696_789 + u64::from(i),
                    level: "info".into(),
                    event: "worker.output".into(),
                    fields: vec![
                        ("id".into(), "1".into()),
                        ("line".into(), format!("line {i} \u{1b}[2J")),
                    ],
                })
                .collect(),
        ))],
        Request::RestartWorker(id) => vec![
            Step::Send(Response::Baking(Baking {
                worker_id: *id,
                pid: 990,
                generation: 4,
                role: "worker".into(),
                bake_ms: 5000,
            })),
            Step::Send(Response::Progress(Progress {
                worker_id: *id,
                done: 1,
                total: 1,
                old_pid: Some(812),
                new_pid: 990,
                elapsed_ms: 12,
            })),
            Step::Send(Response::Restarted(RestartOutcome::Done {
                generation: 4,
                replaced: 1,
                elapsed_ms: 5013,
            })),
        ],
    })
}

// ---------------------------------------------------------------------------
// status

#[test]
fn status_human() {
    let daemon = healthy("status");
    let run = clusterctl(&["-s", daemon.path(), "status"], &[]);
    run.expect(0);
    assert_eq!(run.stderr, "");
    let lines: Vec<&str> = run.stdout.lines().collect();
    for (label, value) in [
        ("version", "0.1.0"),
        ("pid", "4242"),
        ("uptime", "3h12m"),
        ("config", "/etc/clusterd/shop.conf"),
        ("protocol", "clusterd"),
        ("listeners", "http=127.0.0.1:3000"),
        ("workers", "ready 2/2"),
        ("generation", "4"),
        ("phase", "running"),
        ("operation", "-"),
        (
            "restart",
            "rolled_back, generation 4 serving, 2m5s ago: the canary for worker 1 (pid 905) ended with exit 3 0.3s after READY",
        ),
    ] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label}: {run:#?}"));
        assert_eq!(line[label.len()..].trim(), value, "{run:#?}");
    }
    // The table: a header and one row per worker, columns aligned.
    let header = lines
        .iter()
        .position(|l| l.starts_with("ID"))
        .expect("table header");
    let (head, rows) = (lines[header], &lines[header + 1..]);
    let columns: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "ID",
            "PID",
            "GEN",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST-EXIT",
            "RSS",
            "REQUESTS",
            "ACTIVE"
        ]
    );
    assert_eq!(rows.len(), 2, "{run:#?}");
    let state = head.find("STATE").unwrap();
    let last_exit = head.find("LAST-EXIT").unwrap();
    for row in rows {
        assert_eq!(&row[state..state + 5], "ready", "{run:#?}");
    }
    assert!(
        rows[0].contains("14.2M") && rows[0].contains("10234"),
        "{run:#?}"
    );
    assert!(
        rows[1][last_exit..].starts_with("signal 9 (SIGKILL)"),
        "{run:#?}"
    );
    assert!(
        rows[1].trim_end().ends_with('-'),
        "unknown ACTIVE shows as -: {run:#?}"
    );
    assert_eq!(daemon.requests(), [Request::Status]);
}

#[test]
fn status_json() {
    let daemon = healthy("status-json");
    // Options may follow the command.
    let run = clusterctl(&["status", "--json", "-s", daemon.path()], &[]);
    run.expect(0);
    assert_eq!(run.stdout.lines().count(), 1, "one object: {run:#?}");
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["pid"], 4242);
    assert_eq!(v["uptime_ms"], 11_533_000);
    assert_eq!(v["desired"], 2);
    assert_eq!(v["operation"], Value::Null);
    assert_eq!(v["phase"], "running");
    assert_eq!(v["last_restart"]["outcome"], "rolled_back");
    assert_eq!(v["last_restart"]["generation"], 4);
    assert_eq!(v["last_restart"]["ago_ms"], 125_000);
    assert_eq!(v["listeners"][0]["name"], "http");
    assert_eq!(v["listeners"][0]["address"], "127.0.0.1:3000");
    let w = &v["workers"][1];
    assert_eq!(w["id"], 2);
    assert_eq!(w["pid"], 812);
    assert_eq!(w["rss_bytes"], 14_890_000);
    assert_eq!(w["uptime_ms"], 41_000);
    assert_eq!(w["last_exit"], "signal 9 (SIGKILL)");
    assert_eq!(w["requests"], Value::Null);
}

#[test]
fn an_error_reply_fails_with_its_message() {
    let daemon = FakeDaemon::start("refused", |_| {
        vec![Step::Send(Response::Error(
            "permission denied: uid 1000 may not control this clusterd (owner uid 0)".into(),
        ))]
    });
    let run = clusterctl(&["-s", daemon.path(), "status"], &[]);
    run.expect(1);
    assert_eq!(
        run.stderr,
        "clusterctl: permission denied: uid 1000 may not control this clusterd (owner uid 0)\n"
    );
    assert_eq!(run.stdout, "");

    let run = clusterctl(&["-s", daemon.path(), "--json", "status"], &[]);
    run.expect(1);
    assert!(
        run.stderr.starts_with("clusterctl: permission denied"),
        "{run:#?}"
    );
    let lines = run.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "error");
    assert!(
        lines[0]["data"]["message"]
            .as_str()
            .unwrap()
            .starts_with("permission denied: uid 1000")
    );
}

#[test]
fn another_protocol_version_is_named() {
    let daemon = FakeDaemon::start("version", |_| {
        // A 2-byte record: version 7, then variant 4 (`Stopping`), both
        // bincode varints; checked against this build's encoding below.
        let ours = proto::encode(&Response::Stopping);
        assert_eq!(ours, [proto::CONTROL_VERSION as u8, 4]);
        vec![Step::Raw(vec![0, 0, 0, 2, 7, 4])]
    });
    let run = clusterctl(&["-s", daemon.path(), "stop"], &[]);
    run.expect(1);
    assert!(
        run.stderr.contains(&format!(
            "speaks protocol version 7, this clusterctl speaks version {}",
            proto::CONTROL_VERSION
        )),
        "{run:#?}"
    );
}

// ---------------------------------------------------------------------------
// restart

#[test]
fn restart_human() {
    let daemon = healthy("restart");
    let run = clusterctl(&["-s", daemon.path(), "restart"], &[]);
    run.expect(0);
    assert_eq!(
        run.stdout,
        "worker 1/2 replaced (pid 811 -> 907) in 41 ms\n\
         worker 2/2 replaced (pid - -> 908) in 1.20 s\n\
         restart done: generation 5, 2 workers replaced in 1.32 s\n"
    );
    assert_eq!(run.stderr, "");
}

#[test]
fn restart_json_lines() {
    let daemon = healthy("restart-json");
    let run = clusterctl(&["--json", "-s", daemon.path(), "restart"], &[]);
    run.expect(0);
    let events = run.json_lines();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["progress", "progress", "done"]);
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"worker_id": 1, "done": 1, "total": 2, "old_pid": 811, "new_pid": 907, "elapsed_ms": 41})
    );
    assert_eq!(events[1]["data"]["old_pid"], Value::Null);
    assert_eq!(
        events[2]["data"],
        serde_json::json!({"generation": 5, "replaced": 2, "elapsed_ms": 1320})
    );
}

fn aborting(name: &str) -> FakeDaemon {
    FakeDaemon::start(name, |_| {
        vec![
            progress(1, 3, Some(811), 907, 35),
            Step::Send(Response::Restarted(RestartOutcome::Aborted {
                reason: "worker 2 (pid 908) exited with code 1 before it was ready".into(),
                replaced: 1,
                total: 3,
            })),
        ]
    })
}

#[test]
fn an_aborted_restart_exits_1_with_the_reason() {
    let daemon = aborting("aborted");
    let run = clusterctl(&["-s", daemon.path(), "restart"], &[]);
    run.expect(1);
    assert_eq!(
        run.stdout,
        "worker 1/3 replaced (pid 811 -> 907) in 35 ms\n"
    );
    assert_eq!(
        run.stderr,
        "clusterctl: restart aborted after 1/3: worker 2 (pid 908) exited with code 1 before it was ready\n"
    );

    let run = clusterctl(&["-s", daemon.path(), "restart", "--json"], &[]);
    run.expect(1);
    let events = run.json_lines();
    assert_eq!(events.len(), 2, "{run:#?}");
    assert_eq!(events[1]["type"], "aborted");
    assert_eq!(
        events[1]["data"],
        serde_json::json!({
            "reason": "worker 2 (pid 908) exited with code 1 before it was ready",
            "replaced": 1,
            "total": 3,
        })
    );
    assert!(
        run.stderr
            .starts_with("clusterctl: restart aborted after 1/3: "),
        "{run:#?}"
    );
}

#[test]
fn logs_print_text_escaped_or_json() {
    let daemon = healthy("logs");
    let run = clusterctl(&["-s", daemon.path(), "logs", "-n", "2"], &[]);
    run.expect(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:#?}");
    assert!(
        lines[0].starts_with("2025-12-05T11:04:56.789Z info worker.output id=1 line=")
            && !lines[0].contains('\u{1b}'),
        "{run:#?}"
    );
    let run = clusterctl(&["-s", daemon.path(), "logs", "-n", "1", "--json"], &[]);
    run.expect(0);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["event"], "worker.output");
    assert_eq!(v["id"], 1);
    assert_eq!(v["line"], "line 0 \u{1b}[2J");
    assert_eq!(
        daemon.requests().last(),
        Some(&Request::Logs {
            lines: 1,
            follow: false,
            worker: None
        })
    );
}

#[test]
fn one_worker_restart_shows_its_bake() {
    let daemon = healthy("restart-worker");
    let run = clusterctl(&["-s", daemon.path(), "restart", "--worker", "2"], &[]);
    run.expect(0);
    assert_eq!(
        run.stdout,
        "worker 2 (pid 990) is READY and must stay up 5.00 s before the old one drains\n\
         worker 1/1 replaced (pid 812 -> 990) in 12 ms\n\
         restart done: generation 4, 1 worker replaced in 5.01 s\n"
    );
    assert_eq!(daemon.requests(), [Request::RestartWorker(2)]);
    let run = clusterctl(
        &["-s", daemon.path(), "restart", "--worker=2", "--json"],
        &[],
    );
    run.expect(0);
    let events = run.json_lines();
    assert_eq!(events[0]["type"], "baking");
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"worker_id": 2, "pid": 990, "generation": 4, "role": "worker", "bake_ms": 5000})
    );
}

#[test]
fn a_rolled_back_restart_exits_1_naming_the_generations() {
    let reason = "worker 2 (pid 908) of generation 5 ended with exit 3 0.3s after READY";
    let daemon = FakeDaemon::start("rolled-back", move |_| {
        vec![
            Step::Send(Response::Baking(Baking {
                worker_id: 1,
                pid: 907,
                generation: 5,
                role: "canary".into(),
                bake_ms: 5000,
            })),
            progress(1, 3, Some(811), 907, 35),
            Step::Send(Response::Restarted(RestartOutcome::RolledBack {
                reason: reason.into(),
                generation: 4,
                failed_generation: 5,
                replaced: 1,
                restored: 1,
                total: 1,
                complete: true,
            })),
        ]
    });
    let run = clusterctl(&["-s", daemon.path(), "restart"], &[]);
    run.expect(1);
    assert_eq!(
        run.stdout,
        "canary: worker 1 (pid 907) is READY and must stay up 5.00 s before the restart goes on\n\
         worker 1/3 replaced (pid 811 -> 907) in 35 ms\n"
    );
    assert_eq!(
        run.stderr,
        format!(
            "clusterctl: restart rolled back: generation 5 failed; 1 worker went back to generation 4; every worker runs generation 4: {reason}\n"
        )
    );
    let run = clusterctl(&["-s", daemon.path(), "restart", "--json"], &[]);
    run.expect(1);
    let events = run.json_lines();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["baking", "progress", "rolled_back"]);
    assert_eq!(
        events[2]["data"],
        serde_json::json!({
            "reason": reason,
            "generation": 4,
            "failed_generation": 5,
            "replaced": 1,
            "restored": 1,
            "total": 1,
            "complete": true,
        })
    );
}

#[test]
fn a_restart_cut_short_exits_3() {
    let daemon = FakeDaemon::start("cut", |_| vec![progress(1, 3, Some(811), 907, 35)]);
    let run = clusterctl(&["-s", daemon.path(), "restart"], &[]);
    run.expect(3);
    assert_eq!(
        run.stdout,
        "worker 1/3 replaced (pid 811 -> 907) in 35 ms\n"
    );
    assert!(
        run.stderr.contains("closed the connection") && run.stderr.contains("after 1/3"),
        "{run:#?}"
    );

    // Cut in the middle of a frame.
    let daemon = FakeDaemon::start("cut-frame", |_| {
        let frame = proto::frame(&Response::Stopping);
        vec![Step::Raw(frame[..frame.len() - 1].to_vec())]
    });
    let run = clusterctl(&["-s", daemon.path(), "restart"], &[]);
    run.expect(3);
    assert!(run.stderr.contains("in the middle of"), "{run:#?}");
}

// ---------------------------------------------------------------------------
// scale and stop

#[test]
fn scale() {
    let daemon = healthy("scale");
    let run = clusterctl(&["-s", daemon.path(), "scale", "+2"], &[]);
    run.expect(0);
    assert_eq!(run.stdout, "scaled 4 -> 6\n");
    clusterctl(&["-s", daemon.path(), "scale", "-1"], &[]).expect(0);
    clusterctl(&["scale", "8", "-s", daemon.path()], &[]).expect(0);
    let run = clusterctl(&["-s", daemon.path(), "--json", "scale", "5"], &[]);
    run.expect(0);
    assert_eq!(
        run.json_lines(),
        [serde_json::json!({"type": "scaled", "data": {"from": 4, "to": 5}})]
    );
    assert_eq!(
        daemon.requests(),
        [
            Request::Scale(Scale::Up(2)),
            Request::Scale(Scale::Down(1)),
            Request::Scale(Scale::To(8)),
            Request::Scale(Scale::To(5)),
        ]
    );
}

#[test]
fn scale_refused() {
    let daemon = FakeDaemon::start("scale-refused", |_| {
        vec![Step::Send(Response::Error(
            "cannot scale to 300 workers: at most 256".into(),
        ))]
    });
    let run = clusterctl(&["-s", daemon.path(), "scale", "300"], &[]);
    run.expect(1);
    assert_eq!(
        run.stderr,
        "clusterctl: cannot scale to 300 workers: at most 256\n"
    );
    assert_eq!(run.stdout, "");
}

#[test]
fn scale_usage_errors_send_nothing() {
    let daemon = healthy("scale-usage");
    for (count, needle) in [
        (Some("0"), "cannot scale to 0 workers"),
        (Some("-0"), "would change nothing"),
        (Some("abc"), "invalid worker count 'abc'"),
        (Some("2.5"), "invalid worker count '2.5'"),
        (None, "needs a worker count"),
    ] {
        let mut args = vec!["-s", daemon.path(), "scale"];
        args.extend(count);
        let run = clusterctl(&args, &[]);
        run.expect(2);
        assert!(
            run.stderr.starts_with("clusterctl: ") && run.stderr.contains(needle),
            "{run:#?}"
        );
        assert_eq!(run.stdout, "");
    }
    assert_eq!(daemon.requests(), []);
}

#[test]
fn stop() {
    let daemon = healthy("stop");
    let run = clusterctl(&["-s", daemon.path(), "stop"], &[]);
    run.expect(0);
    assert!(run.stdout.starts_with("stopping"), "{run:#?}");
    let run = clusterctl(&["-s", daemon.path(), "stop", "--json"], &[]);
    run.expect(0);
    assert_eq!(
        run.json_lines(),
        [serde_json::json!({"type": "stopping", "data": {}})]
    );
    assert_eq!(daemon.requests(), [Request::Stop, Request::Stop]);
}

// ---------------------------------------------------------------------------
// Finding and reaching clusterd

#[test]
fn unreachable_socket_exits_3_naming_the_path() {
    let dir = Dir::new("unreachable");
    let missing = dir.join("missing.sock");
    let missing = missing.to_str().unwrap();
    let run = clusterctl(&["-s", missing, "status"], &[]);
    run.expect(3);
    assert_eq!(
        run.stderr,
        format!(
            "clusterctl: cannot reach clusterd at {missing} (given with -s): No such file or directory (is clusterd running?)\n"
        )
    );

    // A socket file nobody listens on.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let run = clusterctl(
        &["restart"],
        &[("CLUSTERD_SOCKET", stale.to_str().unwrap())],
    );
    run.expect(3);
    assert!(
        run.stderr.contains(&format!(
            "at {} (from $CLUSTERD_SOCKET): Connection refused",
            stale.display()
        )),
        "{run:#?}"
    );

    let run = clusterctl(&["--json", "-s", missing, "status"], &[]);
    run.expect(3);
    let lines = run.json_lines();
    assert_eq!(lines[0]["type"], "error");
    assert!(
        lines[0]["data"]["message"]
            .as_str()
            .unwrap()
            .contains(missing)
    );
}

#[test]
fn the_socket_comes_from_the_environment_last() {
    let daemon = healthy("env");
    clusterctl(&["stop"], &[("CLUSTERD_SOCKET", daemon.path())]).expect(0);
    // -s wins over the environment.
    let run = clusterctl(
        &["-s", "/nonexistent/x.sock", "stop"],
        &[("CLUSTERD_SOCKET", daemon.path())],
    );
    run.expect(3);
    assert_eq!(daemon.requests(), [Request::Stop]);
}

#[test]
fn no_socket_is_a_usage_error() {
    let run = clusterctl(&["status"], &[]);
    run.expect(2);
    assert!(
        run.stderr.starts_with(
            "clusterctl: no control socket given: use -s SOCKET or -c CONFIG (or set CLUSTERD_SOCKET)\n"
        ),
        "{run:#?}"
    );
}

// ---------------------------------------------------------------------------
// The command line

#[test]
fn help_and_version() {
    let run = clusterctl(&["--help"], &[]);
    run.expect(0);
    assert!(
        run.stdout
            .starts_with("clusterctl: control a running clusterd"),
        "{run:#?}"
    );
    for needle in [
        "Usage: clusterctl",
        "status",
        "restart",
        "scale N|+N|-N",
        "stop",
        "--json",
        "Exit status",
    ] {
        assert!(run.stdout.contains(needle), "{needle}: {run:#?}");
    }
    assert_eq!(clusterctl(&["-h"], &[]).expect(0).stdout, run.stdout);

    let run = clusterctl(&["--version"], &[]);
    run.expect(0);
    assert_eq!(run.stdout, "clusterctl 0.1.0\n");
}

#[test]
fn unknown_commands_and_options_exit_2() {
    for (args, needle) in [
        (&["frobnicate"][..], "unknown command 'frobnicate'"),
        (&["--frobnicate", "status"], "unknown option '--frobnicate'"),
        (&[], "no command given"),
        (&["status", "extra"], "unexpected argument 'extra'"),
        (&["status", "-s"], "-s needs a socket path"),
    ] {
        let run = clusterctl(args, &[("CLUSTERD_SOCKET", "/nonexistent/x.sock")]);
        run.expect(2);
        assert!(
            run.stderr.starts_with(&format!("clusterctl: {needle}")),
            "{run:#?}"
        );
        assert!(run.stderr.contains("clusterctl --help"), "{run:#?}");
    }
}

// ---------------------------------------------------------------------------
// -c CONFIG

#[test]
fn the_config_names_the_socket() {
    let dir = Dir::new("config");
    let conf = dir.join("shop.conf");
    // The daemon runs this very file (named by a path with a detour, which
    // still counts as the same file).
    let runs = format!(
        "{}/../{}/shop.conf",
        dir.0.display(),
        dir.0.file_name().unwrap().to_str().unwrap()
    );
    let daemon = FakeDaemon::start("config", move |request| match request {
        Request::Status => {
            let mut s = status();
            s.config = runs.clone();
            vec![Step::Send(Response::Status(Box::new(s)))]
        }
        Request::Stop => vec![Step::Send(Response::Stopping)],
        _ => vec![],
    });
    std::fs::write(
        &conf,
        format!(
            "exec = /bin/true\nlisten = 127.0.0.1:3000\ncontrol = {}\n",
            daemon.path()
        ),
    )
    .unwrap();
    let run = clusterctl(&["-c", conf.to_str().unwrap(), "stop"], &[]);
    run.expect(0);
    // It asked who the daemon is first.
    assert_eq!(daemon.requests(), [Request::Status, Request::Stop]);
    // -s wins over -c.
    let run = clusterctl(
        &[
            "-c",
            conf.to_str().unwrap(),
            "-s",
            "/nonexistent/x.sock",
            "stop",
        ],
        &[],
    );
    run.expect(3);
    assert_eq!(daemon.requests(), [Request::Status, Request::Stop]);
}

#[test]
fn the_config_default_socket_is_named_with_its_origin() {
    let dir = Dir::new("config-default");
    let name = format!("ctltest{}", std::process::id());
    let conf = dir.join(&format!("{name}.conf"));
    std::fs::write(&conf, "exec = /bin/true\nlisten = 127.0.0.1:3000\n").unwrap();
    let xdg = dir.join("xdg");
    let run = clusterctl(
        &["-c", conf.to_str().unwrap(), "status"],
        &[("XDG_RUNTIME_DIR", xdg.to_str().unwrap())],
    );
    run.expect(3);
    let conf = conf.display();
    // NAME is the stem and a hash of the file's path: shop-1a2b3c4d.
    let (as_root, as_user) = (
        format!("at /run/clusterd/{name}-"),
        format!("at {}/clusterd/{name}-", xdg.display()),
    );
    let rest = run
        .stderr
        .split_once(&as_root)
        .or_else(|| run.stderr.split_once(&as_user))
        .unwrap_or_else(|| panic!("{run:#?}"))
        .1;
    let (hash, rest) = rest.split_at(8);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{run:#?}");
    assert!(
        rest.starts_with(&format!(
            ".sock (chosen from -c {conf}: default for root): "
        )) || rest.starts_with(&format!(
            ".sock (chosen from -c {conf}: from $XDG_RUNTIME_DIR): "
        )),
        "{run:#?}"
    );
    assert!(run.stderr.ends_with("(is clusterd running?)\n"), "{run:#?}");
}

#[test]
fn a_bad_config_is_a_config_error() {
    let dir = Dir::new("config-bad");
    let conf = dir.join("shop.conf");
    std::fs::write(
        &conf,
        "exec = /bin/true\nlisten = 127.0.0.1:3000\nwrokers = 4\n",
    )
    .unwrap();
    let run = clusterctl(&["-c", conf.to_str().unwrap(), "status"], &[]);
    run.expect(2);
    assert!(
        run.stderr.starts_with(&format!("{}:3: ", conf.display())),
        "{run:#?}"
    );
    assert_eq!(run.stdout, "");

    let missing = dir.join("missing.conf");
    let run = clusterctl(&["--json", "-c", missing.to_str().unwrap(), "status"], &[]);
    run.expect(2);
    assert!(run.stderr.contains("missing.conf"), "{run:#?}");
    assert_eq!(run.json_lines()[0]["type"], "error");
}

// ---------------------------------------------------------------------------
// Hostile text from workers and daemons

/// Text a worker chose (sd_notify `STATUS=`), with terminal escapes in it.
const EVIL: &str = "\u{1b}]0;title\u{7}\u{1b}[2J\rok\u{9b}31m\u{202e}";

#[track_caller]
fn assert_inert(text: &str) {
    for c in text.chars() {
        assert!(
            c == '\n' || !(c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
            "{c:?} printed raw in {text:?}"
        );
    }
}

#[test]
fn worker_text_cannot_drive_the_terminal() {
    let daemon = FakeDaemon::start("escapes", |request| {
        let mut s = status();
        s.workers[0].note = Some(EVIL.into());
        s.workers[1].last_exit = Some(EVIL.into());
        s.workers[1].state = EVIL.into();
        s.listeners[0].name = EVIL.into();
        s.config = EVIL.into();
        s.operation = Some(EVIL.into());
        match request {
            Request::Status => vec![Step::Send(Response::Status(Box::new(s)))],
            Request::Restart => vec![Step::Send(Response::Restarted(RestartOutcome::Aborted {
                reason: EVIL.into(),
                replaced: 0,
                total: 2,
            }))],
            _ => vec![Step::Send(Response::Error(EVIL.into()))],
        }
    });
    let run = clusterctl(&["-s", daemon.path(), "status"], &[]);
    run.expect(0);
    assert_inert(&run.stdout);
    assert!(run.stdout.contains("\\u{1b}]0;title\\u{7}"), "{run:#?}");
    for args in [&["restart"][..], &["stop"], &["scale", "3"]] {
        let mut all = vec!["-s", daemon.path()];
        all.extend_from_slice(args);
        let run = clusterctl(&all, &[]);
        run.expect(1);
        assert_inert(&run.stdout);
        assert_inert(&run.stderr);
        assert!(run.stderr.contains("\\u{1b}[2J"), "{run:#?}");
    }
    // JSON keeps the exact text (serde escapes it).
    let run = clusterctl(&["-s", daemon.path(), "status", "--json"], &[]);
    run.expect(0);
    assert_inert(&run.stdout);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["workers"][0]["note"], EVIL);
    assert_eq!(v["config"], EVIL);
    let run = clusterctl(&["-s", daemon.path(), "stop", "--json"], &[]);
    run.expect(1);
    assert_eq!(run.json_lines()[0]["data"]["message"], EVIL);
}

// ---------------------------------------------------------------------------
// -c CONFIG reaching the daemon of another config

#[test]
fn a_daemon_running_another_config_is_refused() {
    // Two apps whose configs are both called shop.conf, here given the same
    // socket: the daemon runs the other one.
    let daemon = healthy("other-config");
    let dir = Dir::new("other-config");
    let conf = dir.join("shop.conf");
    std::fs::write(
        &conf,
        format!(
            "exec = /bin/true\nlisten = 127.0.0.1:3000\ncontrol = {}\n",
            daemon.path()
        ),
    )
    .unwrap();
    let conf_text = conf.to_str().unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["stop"],
        &["restart"],
        &["scale", "3"],
    ] {
        let mut all = vec!["-c", conf_text];
        all.extend_from_slice(args);
        let run = clusterctl(&all, &[]);
        run.expect(3);
        assert!(
            run.stderr.contains(conf_text) && run.stderr.contains("/etc/clusterd/shop.conf"),
            "both configs are named: {run:#?}"
        );
        if args.contains(&"--json") {
            assert_eq!(run.json_lines().len(), 1, "{run:#?}");
            assert_eq!(run.json_lines()[0]["type"], "error");
        } else {
            assert_eq!(run.stdout, "", "{run:#?}");
        }
    }
    assert!(
        daemon.requests().iter().all(|r| *r == Request::Status),
        "only asked who it is: {:?}",
        daemon.requests()
    );
}
