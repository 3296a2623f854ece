//! 16. Socket.IO: sticky sessions on four workers.
//!
//! The chat of examples/chat (Socket.IO 4.8, Express, the Redis adapter) on four workers.
//! Socket.IO handshakes per second (the long-polling handshake, then the
//! upgrade to WebSocket, as a browser does) through clusterd (`dispatch = clusterd`, `sticky =
//! socket.io`) and through Node's `cluster` module with `@socket.io/sticky` (its documented
//! setup: `examples/chat/cluster-sticky.js`); new connections per second (`GET /`, one request
//! per connection) through clusterd (`dispatch = clusterd` and `shared`), Node's `cluster`
//! round-robin primary (`cluster-rr.js`, the app unchanged) and the `@socket.io/sticky` primary.
//!
//! Needs node and npm (examples/chat is installed with `npm ci` under target/tmp/chat, as the
//! tests do) and redis-server (`.ci/redis-server` finds or installs Debian's); without them the
//! section says so and measures nothing. Its redis-server runs on an ephemeral port with its
//! files in a temp folder and is stopped by pid.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterd_bench::{Report, Spec};

use super::procs::{Daemon, Proc, TempDir, free_port, poll_until};
use super::{Check, Ctx, Section, Table, failure_classes, fmt_ms, median, ms, thousands};

/// Workers of every setup (the figure).
const WORKERS: u32 = 4;
/// Concurrent clients of the handshake load.
const HANDSHAKE_CLIENTS: usize = 32;

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("socketio");
    let app = match install_chat(ctx) {
        Ok(dir) => dir,
        Err(e) => {
            s.fail("installing examples/chat", &e);
            return s;
        }
    };
    let redis = match Redis::start(ctx) {
        Ok(r) => r,
        Err(e) => {
            s.fail("starting redis-server", &e);
            return s;
        }
    };
    let quick = ctx.p.overhead_run < Duration::from_secs(2);
    let handshake_secs: u64 = if quick { 3 } else { 10 };
    let reps = if quick { 1 } else { 3 };
    let conn_run = ctx.p.overhead_run;

    let mut handshakes = Table::new(&["setup", "handshakes/s (median)", "runs", "errors"]);
    let mut conns = Table::new(&[
        "setup",
        "new connections/s (median)",
        "p99",
        "failed requests",
    ]);
    let mut clusterd_rate = None;
    let mut sticky_rate = None;
    let mut clusterd_errors = None;

    // clusterd, dispatch = clusterd, sticky = socket.io.
    let config = |dispatch: &str| {
        format!(
            "exec = node index.js\nchdir = {}\nprotocol = node\nworkers = {WORKERS}\n\
             listen = 127.0.0.1:0\n{dispatch}env = REDIS_URL={}\nbake = 0\n",
            app.display(),
            redis.url()
        )
    };
    let clusterd_setup = "clusterd, `dispatch = clusterd`, `sticky = socket.io`";
    match start_clusterd(
        ctx,
        "socketio",
        &config("dispatch = clusterd\nsticky = socket.io\n"),
    ) {
        Ok((d, addr)) => {
            let (rate, runs, errors) = measure_handshakes(&app, addr, handshake_secs, reps);
            handshakes.row(vec![
                clusterd_setup.into(),
                format!("{rate:.0}"),
                runs,
                errors.clone(),
            ]);
            clusterd_rate = Some(rate);
            clusterd_errors = Some(errors);
            let r = measure_conns(addr, conn_run, reps);
            conns.row(conn_row(clusterd_setup, &r));
            let _ = d.stop(Duration::from_secs(30));
        }
        Err(e) => s.fail("clusterd with dispatch = clusterd", &e),
    }
    // clusterd, the shared queue (new connections only: long-polling needs sticky sessions).
    let shared_setup = "clusterd, `dispatch = shared` (no sticky sessions)";
    match start_clusterd(ctx, "socketio-shared", &config("")) {
        Ok((d, addr)) => {
            let r = measure_conns(addr, conn_run, reps);
            conns.row(conn_row(shared_setup, &r));
            let _ = d.stop(Duration::from_secs(30));
        }
        Err(e) => s.fail("clusterd with dispatch = shared", &e),
    }
    // Node's cluster module with @socket.io/sticky.
    let sticky_setup = "Node `cluster` + `@socket.io/sticky` (`cluster-sticky.js`)";
    match start_node(&app, "cluster-sticky.js", &redis) {
        Ok((p, addr)) => {
            let (rate, runs, errors) = measure_handshakes(&app, addr, handshake_secs, reps);
            handshakes.row(vec![
                sticky_setup.into(),
                format!("{rate:.0}"),
                runs,
                errors,
            ]);
            sticky_rate = Some(rate);
            let r = measure_conns(addr, conn_run, reps);
            conns.row(conn_row(sticky_setup, &r));
            drop(p);
        }
        Err(e) => s.fail("cluster-sticky.js", &e),
    }
    // Node's cluster module, round-robin primary, the app unchanged.
    let rr_setup = "Node `cluster`, round-robin primary (`cluster-rr.js`)";
    match start_node(&app, "cluster-rr.js", &redis) {
        Ok((p, addr)) => {
            let r = measure_conns(addr, conn_run, reps);
            conns.row(conn_row(rr_setup, &r));
            drop(p);
        }
        Err(e) => s.fail("cluster-rr.js", &e),
    }

    match (clusterd_rate, sticky_rate) {
        (Some(c), Some(n)) => s.check(Check::new(
            "Socket.IO handshakes/s, clusterd (dispatch = clusterd) against @socket.io/sticky",
            "≥ 1.00×",
            format!("{:.2}× ({c:.0} against {n:.0})", c / n.max(1e-9)),
            Some(c >= n),
        )),
        _ => s.check(Check::failed(
            "Socket.IO handshakes/s, clusterd against @socket.io/sticky",
            "≥ 1.00×",
            "a setup did not run",
        )),
    }
    match clusterd_errors {
        Some(e) => s.check(Check::new(
            "failed Socket.IO handshakes through clusterd (sticky = socket.io)",
            "0",
            e.clone(),
            Some(e == "none"),
        )),
        None => s.check(Check::failed(
            "failed Socket.IO handshakes through clusterd (sticky = socket.io)",
            "0",
            "clusterd did not run",
        )),
    }

    s.md(&format!(
        "The chat of `examples/chat` (Socket.IO 4.8 on Express, `@socket.io/redis-adapter` to a \
         local redis-server) on {WORKERS} workers, on a {cpus}-CPU machine shared with the \
         clients. **Handshakes**: `node examples/chat/clients.js handshakes URL {handshake_secs} \
         {HANDSHAKE_CLIENTS}`: {HANDSHAKE_CLIENTS} socket.io-client loops, each connecting with \
         the default transports (the long-polling handshake, the Socket.IO connect, then the \
         upgrade to WebSocket), counting it once upgraded, and disconnecting; {reps} run(s) of \
         {handshake_secs} s per setup after a warm-up, median. Only sticky setups can do this \
         on several workers. **New connections**: our loadgen, `GET /` (the chat's page) with a \
         new connection per request, 64 connections on 2 threads, {run} per run, {reps} run(s), \
         median. `cluster-sticky.js` is `@socket.io/sticky`'s documented setup (the primary \
         accepts, reads each request and passes its bytes to a worker over IPC); \
         `cluster-rr.js` runs `index.js` unchanged under Node's `cluster` (the primary accepts \
         and passes the sockets round-robin).\n",
        cpus = ctx.cpus,
        run = fmt_ms(ms(conn_run)),
    ));
    s.md("\nSocket.IO handshakes:\n");
    s.table(&handshakes);
    s.md("New connections:\n");
    s.table(&conns);
    drop(redis);
    s
}

/// examples/chat installed under target/tmp/chat (`npm ci` unless it already ran with the same
/// lock file): the folder the tests use.
fn install_chat(ctx: &Ctx) -> Result<PathBuf, String> {
    let src = ctx.root.join("examples/chat");
    let dir = ctx.target.join("tmp/chat");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let entries = std::fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(entry.file_name()))
                .map_err(|e| format!("copy {}: {e}", path.display()))?;
        }
    }
    let lock = std::fs::read(src.join("package-lock.json"))
        .map_err(|e| format!("examples/chat/package-lock.json: {e}"))?;
    let stamp = dir.join("node_modules/.clusterd-installed-lock");
    if std::fs::read(&stamp).ok().as_ref() != Some(&lock) {
        println!("  npm ci in {}", dir.display());
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("needs node and npm on the PATH: cannot run npm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "npm ci failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::fs::write(&stamp, &lock).map_err(|e| format!("write the install stamp: {e}"))?;
    }
    Ok(dir)
}

/// A redis-server of the section's own, on an ephemeral port.
struct Redis {
    // Field order: the process stops before its folder goes.
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    fn start(ctx: &Ctx) -> Result<Redis, String> {
        let script = ctx.root.join(".ci/redis-server");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bin = stdout.lines().last().unwrap_or("").trim().to_string();
        if !out.status.success() || bin.is_empty() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let dir = TempDir::new("redis")?;
        let port = free_port()?;
        let proc = Proc::spawn(
            Command::new(&bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "redis-server",
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        poll_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).ok()
        })
        .ok_or_else(|| format!("redis-server did not listen on {addr}"))?;
        Ok(Redis {
            proc,
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.proc.stop("TERM", Duration::from_secs(10));
    }
}

/// clusterd on `config`, every worker ready, and its address.
fn start_clusterd(ctx: &Ctx, tag: &str, config: &str) -> Result<(Daemon, SocketAddr), String> {
    let d = Daemon::start(&ctx.clusterd(), &ctx.clusterctl(), tag, config)?;
    d.wait_pool_ready(1, Duration::from_secs(60))
        .map_err(|e| format!("{e}\n{}", d.tail()))?;
    let addr = d.addr()?;
    Ok((d, addr))
}

/// `node SCRIPT` of examples/chat with WORKERS workers on a free port, answering `GET /`.
fn start_node(app: &Path, script: &str, redis: &Redis) -> Result<(Proc, SocketAddr), String> {
    let port = free_port()?;
    let proc = Proc::spawn(
        Command::new("node")
            .arg(script)
            .current_dir(app)
            .env("PORT", port.to_string())
            .env("WORKERS", WORKERS.to_string())
            .env("REDIS_URL", redis.url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        script,
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Up once a few requests in a row are answered (the workers start one by one).
    let mut answered = 0;
    poll_until(Duration::from_secs(60), || {
        if clusterd_bench::get(addr, "/").is_ok_and(|r| r.status == 200) {
            answered += 1;
        } else {
            answered = 0;
        }
        (answered >= 20).then_some(())
    })
    .ok_or_else(|| format!("{script} did not answer GET / within 60 s"))?;
    Ok((proc, addr))
}

/// Handshakes per second: a warm-up, then `reps` runs; (median rate, the runs, the errors).
fn measure_handshakes(
    app: &Path,
    addr: SocketAddr,
    secs: u64,
    reps: usize,
) -> (f64, String, String) {
    let _ = handshake_run(app, addr, 1);
    let mut rates = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for _ in 0..reps {
        match handshake_run(app, addr, secs) {
            Ok(v) => {
                rates.push(v["rate"].as_f64().unwrap_or(0.0));
                if let Some(e) = v["errors"].as_object() {
                    for (what, n) in e {
                        *errors.entry(what.clone()).or_default() += n.as_u64().unwrap_or(0);
                    }
                }
            }
            Err(e) => {
                *errors.entry(e).or_default() += 1;
            }
        }
    }
    let runs = rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    let errors = if errors.is_empty() {
        "none".to_string()
    } else {
        errors
            .iter()
            .map(|(what, n)| format!("{} × {what}", thousands(*n)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    (median(&rates), runs, errors)
}

fn handshake_run(app: &Path, addr: SocketAddr, secs: u64) -> Result<serde_json::Value, String> {
    let out = Command::new("node")
        .arg("clients.js")
        .args([
            "handshakes",
            &format!("http://{addr}"),
            &secs.to_string(),
            &HANDSHAKE_CLIENTS.to_string(),
        ])
        .current_dir(app)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run node clients.js: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|_| {
        format!(
            "clients.js said {:?} {:?}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// New connections: `GET /`, one request per connection, `reps` runs; the median run.
fn measure_conns(addr: SocketAddr, run: Duration, reps: usize) -> Result<Report, String> {
    let spec = Spec {
        connections: super::CONNECTIONS,
        threads: super::THREADS,
        keep_alive: false,
        duration: Some(run),
        path: "/".into(),
        ..Spec::new(addr)
    };
    let warm = Spec {
        duration: Some(Duration::from_millis(500)),
        ..spec.clone()
    };
    let _ = clusterd_bench::run(&warm);
    let mut runs = Vec::new();
    for _ in 0..reps {
        runs.push(clusterd_bench::run(&spec).map_err(|e| e.to_string())?);
    }
    runs.sort_by(|a, b| a.requests_per_sec().total_cmp(&b.requests_per_sec()));
    Ok(runs.swap_remove(runs.len() / 2))
}

fn conn_row(setup: &str, r: &Result<Report, String>) -> Vec<String> {
    match r {
        Ok(r) => vec![
            setup.into(),
            format!("{:.0}", r.requests_per_sec()),
            fmt_ms(ms(r.p99())),
            failure_classes(r),
        ],
        Err(e) => vec![
            setup.into(),
            format!("not measured: {e}"),
            String::new(),
            String::new(),
        ],
    }
}
