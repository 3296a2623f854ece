//! Operability: metrics and health, clusterd as PID 1, systemd Type=notify,
//! and the static build running in an empty root.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// Scrapes `/metrics` and parses it with a Prometheus exposition parser.
fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let resp = get(addr, "/metrics").expect("scrape");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let ct = resp.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content type {ct}"
    );
    let text = resp.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("a valid Prometheus exposition")
}

/// The value of `name` whose labels include every `(key, value)` of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn metrics_addr(cluster: &Cluster) -> std::net::SocketAddr {
    let line = cluster.wait_event("metrics", |_| true);
    line.get("addr").expect("addr").parse().expect("address")
}

#[test]
fn metrics_follow_crashes_restarts_and_worker_stats() {
    let cluster = Cluster::start(
        "metrics",
        &format!(
            "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\nmetrics = 127.0.0.1:0\n",
            example("shop").display()
        ),
    );
    cluster.wait_ready(1);
    let m = metrics_addr(&cluster);
    let s = scrape(m);
    assert_eq!(
        sample(&s, "clusterd_workers", &[("state", "ready")]),
        Some(2.0)
    );
    assert_eq!(sample(&s, "clusterd_workers_desired", &[]), Some(2.0));
    assert_eq!(sample(&s, "clusterd_generation", &[]), Some(1.0));
    assert_eq!(
        sample(
            &s,
            "clusterd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let health = get(m, "/healthz").unwrap();
    assert_eq!(health.status, 200, "{}", health.text());

    // A crash is counted by reason and per worker id.
    let victim = cluster.wait_event("worker.spawn", |l| l.num("id") == 2);
    let pid = rustix::process::Pid::from_raw(victim.num("pid") as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    cluster.wait_event("worker.crash", |l| l.num("id") == 2);
    let s = wait_for("the crash in the metrics", || {
        let s = scrape(m);
        (sample(&s, "clusterd_worker_exits_total", &[("reason", "signal")]) == Some(1.0))
            .then_some(s)
    });
    assert_eq!(
        sample(&s, "clusterd_worker_restarts_total", &[("worker", "2")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&s, "clusterd_worker_restarts_total", &[("worker", "1")]),
        Some(0.0)
    );

    // Requests are reported by the workers (Stats, about once a second).
    for _ in 0..20 {
        assert_eq!(get(cluster.addr(), "/products/7").unwrap().status, 200);
    }
    wait_for("worker request counts in the metrics", || {
        let s = scrape(m);
        let total: f64 = s
            .samples
            .iter()
            .filter(|x| x.metric == "clusterd_worker_requests_total")
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum();
        (total >= 20.0).then_some(())
    });

    // A rolling restart is counted with its duration.
    cluster.signal(rustix::process::Signal::HUP);
    cluster.wait_event("restart.done", |_| true);
    let s = scrape(m);
    assert_eq!(
        sample(&s, "clusterd_rolling_restarts_total", &[("result", "done")]),
        Some(1.0)
    );
    assert_eq!(sample(&s, "clusterd_generation", &[]), Some(2.0));
    let raw = get(m, "/metrics").unwrap().text();
    assert!(
        raw.lines()
            .any(|l| l == "clusterd_rolling_restart_seconds_count 1"),
        "{raw}"
    );
}

#[test]
fn healthz_is_503_until_a_worker_is_ready_and_bad_requests_get_errors() {
    let cluster = Cluster::testworkers(
        "health",
        1,
        "never-ready",
        "metrics = 127.0.0.1:0\nready_timeout = 60s",
    );
    let m = metrics_addr(&cluster);
    let health = get(m, "/healthz").unwrap();
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("0/1"), "{}", health.text());
    assert_eq!(get(m, "/nope").unwrap().status, 404);
    // Garbage and an oversized head do not hurt the daemon.
    for payload in [&b"\xff\xfe\r\n\r\n"[..], &[b'a'; 20_000][..]] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(m).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(payload);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert!(
            reply.starts_with(b"HTTP/1.1 4"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    assert_eq!(get(m, "/healthz").unwrap().status, 503);
}

/// A process this test started; killed (by pid) and reaped if the test
/// ends, or fails, before it exited.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Writes a config of two testworker `ok` workers on an ephemeral port, with
/// the control socket in `dir`.
fn write_testworker_config(config: &Path, dir: &Path) {
    let text = format!(
        "exec = {} ok\nworkers = 2\nlisten = 127.0.0.1:0\ncontrol = {}\n",
        example("testworker").display(),
        dir.join("ctl.sock").display()
    );
    std::fs::write(config, text).unwrap();
}

/// Starts `cmd` with its stderr in `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> Started {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn");
    Started(child)
}

fn log_lines(log: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(LogLine::parse)
        .collect()
}

fn wait_log(log: &Path, event: &str, pred: impl Fn(&LogLine) -> bool) -> LogLine {
    wait_for(&format!("{event} in {}", log.display()), || {
        log_lines(log)
            .into_iter()
            .find(|l| l.event == event && pred(l))
    })
}

/// Waits for `child` to exit, killing it (by pid) if it does not.
fn wait_child(child: &mut Started, log: &Path) -> std::process::ExitStatus {
    let status = wait_for_within("the process to exit", DEADLINE, || {
        child.0.try_wait().ok().flatten()
    });
    if !status.success() {
        eprintln!("{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    status
}

#[test]
fn as_pid_1_it_reaps_orphans_and_stops_cleanly_on_term() {
    let dir = TempDir::new("pid1");
    let log = dir.path().join("clusterd.log");
    let config = dir.path().join("pid1.conf");
    // The worker's shell starts a background sleep in a subshell that exits
    // at once: the sleep is orphaned, and in a new PID namespace it is
    // re-parented to PID 1, clusterd, which must reap it.
    std::fs::write(
        &config,
        format!(
            "exec = /bin/sh -c \"(sleep 0.2 &); exec {} ok\"\nworkers = 1\nlisten = 127.0.0.1:0\ncontrol = {}\n",
            example("testworker").display(),
            dir.path().join("ctl.sock").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(clusterd_bin())
        .arg("-c")
        .arg(&config);
    let mut unshare = spawn_logged(cmd, &log);
    let started = wait_log(&log, "started", |_| true);
    assert_eq!(started.num("pid"), 1, "clusterd is PID 1 of the namespace");
    let reaped = wait_log(&log, "reaped", |_| true);
    assert_eq!(reaped.get("status"), Some("exit 0"), "{}", reaped.raw);
    wait_log(&log, "pool.ready", |_| true);
    let port: std::net::SocketAddr = wait_log(&log, "listening", |_| true)
        .get("addr")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get(port, "/").unwrap().status, 200);

    // TERM from outside the namespace: a graceful stop, exit 0.
    let clusterd = wait_for("clusterd's pid outside the namespace", || {
        children(unshare.0.id()).first().copied()
    });
    let pid = rustix::process::Pid::from_raw(clusterd as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait_child(&mut unshare, &log);
    assert!(status.success(), "unshare/clusterd exited with {status}");
    assert!(
        log_lines(&log)
            .iter()
            .any(|l| l.event == "exit" && l.get("code") == Some("0"))
    );
}

#[test]
fn under_systemd_type_notify_it_reports_ready_and_stopping() {
    let dir = TempDir::new("sdnotify");
    let log = dir.path().join("clusterd.log");
    let manager_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&manager_path).unwrap();
    manager.set_read_timeout(Some(DEADLINE)).unwrap();
    let config = dir.path().join("n.conf");
    write_testworker_config(&config, dir.path());
    let mut cmd = Command::new(clusterd_bin());
    cmd.arg("-c")
        .arg(&config)
        .env("NOTIFY_SOCKET", &manager_path);
    let mut child = spawn_logged(cmd, &log);
    let mut buf = [0u8; 512];
    let n = manager.recv(&mut buf).expect("READY=1 from clusterd");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        log_lines(&log).iter().any(|l| l.event == "pool.ready"),
        "ready only once all workers are"
    );
    // The workers do not inherit clusterd's NOTIFY_SOCKET.
    let worker = wait_log(&log, "worker.ready", |_| true).num("pid");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    assert!(
        !environ
            .split(|&b| b == 0)
            .any(|v| v.starts_with(b"NOTIFY_SOCKET="))
    );
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let n = manager.recv(&mut buf).expect("STOPPING=1 from clusterd");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(wait_child(&mut child, &log).success());
}

/// Builds clusterd and the test worker fully static (crt-static), as the
/// README documents, in a target folder of its own; returns its folder.
fn static_build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("static-test");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "--quiet",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--bin",
            "clusterd",
        ])
        .args(["--example", "testworker"])
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "static build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("x86_64-unknown-linux-gnu").join("debug")
}

#[test]
fn the_static_build_runs_a_cluster_in_an_empty_root() {
    let built = static_build();
    let clusterd = built.join("clusterd");
    let testworker = built.join("examples").join("testworker");
    for bin in [&clusterd, &testworker] {
        let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&ldd.stdout),
            String::from_utf8_lossy(&ldd.stderr)
        );
        assert!(
            text.contains("statically linked") || text.contains("not a dynamic executable"),
            "{} is not static: {text}",
            bin.display()
        );
    }
    // The root holds only the two binaries and the config: no /etc, no
    // /proc, no libc, no shell.
    let dir = TempDir::new("chroot");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&clusterd, root.join("clusterd")).unwrap();
    std::fs::copy(&testworker, root.join("testworker")).unwrap();
    std::fs::write(
        root.join("app.conf"),
        "exec = /testworker ok\nworkers = 2\nlisten = 127.0.0.1:0\ncontrol = /run/app.sock\n",
    )
    .unwrap();
    let listing: BTreeMap<String, bool> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().is_dir(),
            )
        })
        .collect();
    assert_eq!(listing.len(), 3, "{listing:?}");
    let log = dir.path().join("clusterd.log");
    let mut cmd = Command::new("chroot");
    // Nothing of this environment leaks in either (PATH only finds chroot).
    cmd.arg(&root)
        .args(["/clusterd", "-c", "/app.conf"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let mut child = spawn_logged(cmd, &log);
    wait_log(&log, "pool.ready", |_| true);
    let addr: std::net::SocketAddr = wait_log(&log, "listening", |_| true)
        .get("addr")
        .unwrap()
        .parse()
        .unwrap();
    let mut workers = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let resp = get(addr, "/").unwrap();
        assert_eq!(resp.status, 200);
        workers.insert(resp.header("x-worker").unwrap_or_default().to_string());
    }
    assert!(!workers.is_empty());
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(wait_child(&mut child, &log).success());
}

#[test]
fn every_example_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "conf") {
                // Parsed without the file-system checks: the container
                // config names /app/shop, which exists only in the image.
                if let Err(e) = clusterd::config::read(&path) {
                    panic!("{e}");
                }
                found.push(path);
            }
        }
    }
    assert!(found.len() >= 2, "{found:?}");
}

#[test]
fn fds_clusterd_inherited_do_not_reach_workers() {
    // A shell opens fd 7 without close-on-exec and execs clusterd, as a
    // careless init script would.
    let dir = TempDir::new("inherited");
    let log = dir.path().join("clusterd.log");
    let config = dir.path().join("i.conf");
    write_testworker_config(&config, dir.path());
    let leaked = dir.path().join("leaked");
    std::fs::write(&leaked, "x").unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("exec 7<\"$1\"; exec \"$2\" -c \"$3\"")
        .arg("sh")
        .arg(&leaked)
        .arg(clusterd_bin())
        .arg(&config);
    let mut child = spawn_logged(cmd, &log);
    wait_log(&log, "pool.ready", |_| true);
    let target = |pid: u64| std::fs::read_link(format!("/proc/{pid}/fd/7")).ok();
    assert_eq!(
        target(u64::from(child.0.id())),
        Some(leaked.clone()),
        "clusterd itself holds fd 7"
    );
    let workers: Vec<u64> = log_lines(&log)
        .iter()
        .filter(|l| l.event == "worker.ready")
        .map(|l| l.num("pid"))
        .collect();
    assert_eq!(workers.len(), 2);
    for pid in workers {
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(
            !fds.contains(&leaked),
            "worker {pid} inherited {}: {fds:?}",
            leaked.display()
        );
    }
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(wait_child(&mut child, &log).success());
}

#[test]
fn term_as_soon_as_it_listens_is_a_graceful_stop() {
    // The first sign of life (the listening line, the bound port) comes after
    // the signal handlers are installed, so a quick `docker stop` right
    // after start still drains and exits 0 instead of dying by SIGTERM.
    for round in 0..5 {
        let dir = TempDir::new("early-term");
        let log = dir.path().join("clusterd.log");
        let config = dir.path().join("e.conf");
        write_testworker_config(&config, dir.path());
        let mut cmd = Command::new(clusterd_bin());
        cmd.arg("-c").arg(&config);
        let mut child = spawn_logged(cmd, &log);
        wait_log(&log, "listening", |_| true);
        let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = wait_child(&mut child, &log);
        assert_eq!(status.code(), Some(0), "round {round}: {status}");
    }
}
