//! `protocol = node`: unmodified Node.js apps from the npm registry as
//! workers, through clusterd's adapter.
//!
//! The apps are in tests/fixtures/node, with a package.json and a
//! package-lock.json pinning Express 4 and 5, Fastify, Socket.IO and ws. The
//! first test to need them copies that folder to `target/tmp/node-fixtures`
//! and runs `npm ci` there (once: later runs reuse it while the lock file
//! is unchanged). Needs `node` (18 or later) and `npm` on the PATH; the
//! registry is needed the first time.
//!
//! Rolling restarts under the four loads (keep-alive and new-connection GET
//! and POST): 20 for the plain `http` app and Express 5, fewer for the
//! others (each restart of two Node workers takes about a second here, and
//! the suite must stay quick); WebSocket clients get 1012 and reconnect to
//! the new workers; apps that cannot start abort the restart with their
//! error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::util::*;

// ---------------------------------------------------------------------------
// The npm fixtures

/// tests/fixtures/node, installed under target/tmp (see the module docs).
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| npm_install("tests/fixtures/node", "node-fixtures"))
}

/// examples/express-shop, installed under target/tmp.
fn express_shop() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| npm_install("examples/express-shop", "express-shop"))
}

/// Copies the files of the repository's folder `from` to target/tmp/`to`
/// and runs `npm ci` there unless it already ran with the same lock file.
fn npm_install(from: &str, to: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(from);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(to);
    std::fs::create_dir_all(&dir).expect("create a folder under target/tmp");
    // Another test binary run at the same time installs under the same lock.
    let lock = std::fs::File::create(dir.join(".lock")).expect("the fixtures' lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    for entry in std::fs::read_dir(&src).expect("tests/fixtures/node") {
        let path = entry.expect("a fixture").path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).expect("copy a fixture");
        }
    }
    let lock_file = std::fs::read(src.join("package-lock.json")).expect("package-lock.json");
    let stamp = dir.join("node_modules/.clusterd-installed-lock");
    if std::fs::read(&stamp).ok().as_ref() != Some(&lock_file) {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "the Node.js tests need npm (and node 18 or later) on the PATH, \
                     to install {from}: cannot run npm: {e}"
                )
            });
        assert!(
            out.status.success(),
            "npm ci in {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&stamp, &lock_file).expect("write the install stamp");
    }
    dir
}

/// A config running fixture `app` under `protocol = node`.
fn node_app(app: &str, workers: u32, extra: &str) -> String {
    format!(
        "exec = node \"{}\"\nprotocol = node\nworkers = {workers}\n\
         listen = 127.0.0.1:0\ndrain_timeout = 30s\n{extra}\n",
        fixtures().join(app).display()
    )
}

/// `clusterctl restart`, which must succeed.
fn restart(cluster: &Cluster) {
    let out = cluster.ctl(&["restart"]);
    assert!(
        out.status.success(),
        "clusterctl restart failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `pool.ready` of `generation`; fails at once if a worker
/// crashed (the log shows the app's error).
fn wait_ready(cluster: &Cluster, generation: u64) {
    wait_for(&format!("pool.ready of generation {generation}"), || {
        let lines = cluster.lines();
        if let Some(crash) = lines.iter().find(|l| l.event == "worker.crash") {
            panic!("a worker crashed: {}", crash.raw);
        }
        lines
            .iter()
            .any(|l| l.event == "pool.ready" && l.num("generation") == generation)
            .then_some(())
    });
}

/// Every worker that left did so by draining: `worker.exit` with `exit 0`,
/// never a SIGKILL at drain_timeout or a crash.
fn assert_all_drained(cluster: &Cluster) {
    for l in cluster.lines() {
        assert!(
            !matches!(l.event.as_str(), "worker.kill" | "worker.crash"),
            "{}",
            l.raw
        );
        if l.event == "worker.exit" {
            assert_eq!(l.get("status"), Some("exit 0"), "{}", l.raw);
        }
    }
}

/// `restarts` rolling restarts of two workers of `app` under the four
/// loads: not one failed request, and every old worker drained.
fn restarts_lose_nothing(app: &str, restarts: u64) {
    let cluster = Cluster::start(&format!("node-{app}"), &node_app(app, 2, ""));
    wait_ready(&cluster, 1);
    let addr = cluster.addr();
    let response = get(addr, "/products/7").expect("GET /products/7");
    let body = String::from_utf8_lossy(&response.body);
    assert_eq!(response.status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["id"],
        7,
        "{body}"
    );

    let loads = mixed_load(addr);
    for generation in 2..=restarts + 1 {
        restart(&cluster);
        wait_ready(&cluster, generation);
        let_loads_run(&loads, 20);
    }
    let st = cluster.status_json();
    finish_loads(loads);
    assert_eq!(st["protocol"], "node");
    // The adapter's stats reach `status`.
    let served: u64 = st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["requests"].as_u64().unwrap_or(0))
        .sum();
    assert!(served > 0, "no requests in status: {st:#}");
    let exits = cluster.wait_events("worker.exit", 2 * restarts as usize, |_| true);
    assert_eq!(exits.len(), 2 * restarts as usize);
    assert_all_drained(&cluster);
}

// ---------------------------------------------------------------------------
// Serving and rolling restarts

#[test]
fn the_express_shop_example_runs_unchanged() {
    let config = format!(
        "exec = node server.js\nchdir = {}\nprotocol = node\nworkers = 2\n\
         listen = 127.0.0.1:0\n",
        express_shop().display()
    );
    let cluster = Cluster::start("node-express-shop", &config);
    wait_ready(&cluster, 1);
    let addr = cluster.addr();
    let response = get(addr, "/products/42").expect("GET /products/42");
    let body = String::from_utf8_lossy(&response.body);
    assert_eq!(response.status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        serde_json::json!({"id": 42, "name": "Vintage Desk Lamp", "price": 159.97})
    );
    assert_eq!(get(addr, "/products/0").expect("GET").status, 404);
    let loads = mixed_load(addr);
    for generation in 2..=4 {
        restart(&cluster);
        wait_ready(&cluster, generation);
        let_loads_run(&loads, 20);
    }
    finish_loads(loads);
    assert_all_drained(&cluster);
}

#[test]
fn plain_http_loses_nothing_over_20_restarts() {
    restarts_lose_nothing("http.js", 20);
}

#[test]
fn express5_loses_nothing_over_20_restarts() {
    restarts_lose_nothing("express5.js", 20);
}

#[test]
fn express4_loses_nothing_over_20_restarts() {
    restarts_lose_nothing("express4.js", 20);
}

#[test]
fn fastify_loses_nothing_over_20_restarts() {
    restarts_lose_nothing("fastify.js", 20);
}

// ---------------------------------------------------------------------------
// WebSockets

/// The pids of the ready workers of `generation`.
fn pids_of(cluster: &Cluster, generation: u64) -> BTreeSet<u64> {
    let st = cluster.status_json();
    st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["generation"] == generation && w["state"] == "ready")
        .filter_map(|w| w["pid"].as_u64())
        .collect()
}

/// `node clients.js KIND URL N`: N WebSocket clients that report their
/// events; killed on drop.
struct Clients {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Clients {
    fn start(kind: &str, url: &str, n: usize) -> Clients {
        let mut child = Command::new("node")
            .arg(fixtures().join("clients.js"))
            .args([kind, url, &n.to_string()])
            .current_dir(fixtures())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start node clients.js");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Clients { child, events }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Each client's worker, from its last `hello`.
    fn workers(&self) -> BTreeMap<u64, u64> {
        let mut at = BTreeMap::new();
        for e in self.events() {
            if e["event"] == "hello" {
                at.insert(e["client"].as_u64().unwrap(), e["worker"].as_u64().unwrap());
            }
        }
        at
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two workers of `app` with `n` WebSocket clients of `kind`; `restarts`
/// rolling restarts: every client gets 1012 and reconnects to a worker of
/// the new generation, the old workers drain (exit 0) well before
/// drain_timeout, and the HTTP loads lose nothing.
fn websockets_reconnect(app: &str, kind: &str, path: &str, restarts: u64) {
    const CLIENTS: usize = 20;
    let cluster = Cluster::start(&format!("node-{kind}"), &node_app(app, 2, ""));
    wait_ready(&cluster, 1);
    let addr = cluster.addr();
    let clients = Clients::start(kind, &format!("ws://{addr}{path}"), CLIENTS);
    let loads = mixed_load(addr);
    for generation in 2..=restarts + 1 {
        let old = pids_of(&cluster, generation - 1);
        wait_for(
            &format!("{CLIENTS} clients on generation {}", generation - 1),
            || {
                let at = clients.workers();
                (at.len() == CLIENTS && at.values().all(|w| old.contains(w))).then_some(())
            },
        );
        let before = clients.events().len();
        restart(&cluster);
        wait_ready(&cluster, generation);
        let new = pids_of(&cluster, generation);
        // Every client was told 1012 and is back, on a new worker (some
        // twice: the first worker's clients may land on the second old one).
        wait_for("every client reconnected to the new generation", || {
            let at = clients.workers();
            at.values().all(|w| new.contains(w)).then_some(())
        });
        let events = clients.events();
        let closes: Vec<&Value> = events[before..]
            .iter()
            .filter(|e| e["event"] == "close")
            .collect();
        let closed: BTreeSet<u64> = closes
            .iter()
            .map(|c| c["client"].as_u64().unwrap())
            .collect();
        assert_eq!(closed.len(), CLIENTS, "every client was closed: {closes:?}");
        for c in &closes {
            assert_eq!(c["code"], 1012, "closed with Service Restart: {c}");
        }
        let_loads_run(&loads, 20);
    }
    finish_loads(loads);
    // The old workers drained, and well before drain_timeout (30 s).
    let drains = cluster.events("worker.drain");
    for exit in cluster.wait_events("worker.exit", 2 * restarts as usize, |_| true) {
        let drain = drains
            .iter()
            .find(|d| d.get("pid") == exit.get("pid"))
            .expect("a worker.drain line for each exit");
        let took = exit.ts_ms() - drain.ts_ms();
        assert!(took < 15_000, "drained in {took} ms: {}", exit.raw);
    }
    assert_all_drained(&cluster);
}

#[test]
fn ws_clients_get_1012_and_reconnect_to_new_workers() {
    websockets_reconnect("ws.js", "ws", "/", 2);
}

#[test]
fn socketio_clients_get_1012_and_reconnect_to_new_workers() {
    websockets_reconnect("socketio.js", "socketio", "", 2);
}

// ---------------------------------------------------------------------------
// Apps that cannot start

/// A restart onto `app` aborts with a reason containing `needle`; the
/// first generation serves on.
fn restart_onto_fails(app: &str, extra: &str, needle: &str) {
    let cluster = Cluster::start(
        &format!("node-bad-{}", app.trim_end_matches(".js")),
        &node_app("http.js", 2, extra),
    );
    wait_ready(&cluster, 1);
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let bad = text.replace(
        &fixtures().join("http.js").display().to_string(),
        &fixtures().join(app).display().to_string(),
    );
    std::fs::write(&cluster.config, bad).unwrap();
    let out = cluster.ctl(&["restart"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("restart aborted"), "{stderr}");
    assert!(
        stderr.contains(needle),
        "the reason names the app's error: {stderr}"
    );
    let aborted = cluster.wait_event("restart.aborted", |_| true);
    assert!(aborted.raw.contains(needle), "{}", aborted.raw);
    let response = get(cluster.addr(), "/products/1").expect("still serving");
    assert_eq!(response.status, 200);
    assert_eq!(cluster.status_json()["ready"], 2);
}

#[test]
fn an_app_that_throws_at_startup_aborts_the_restart_with_its_error() {
    restart_onto_fails(
        "throws.js",
        "",
        "the app failed: Error: DATABASE_URL is not set (at ",
    );
}

#[test]
fn an_app_that_never_listens_aborts_the_restart_saying_so() {
    restart_onto_fails(
        "never-listens.js",
        "ready_timeout = 3s",
        "did not report READY within 3s: the app has not called listen() yet: \
         nothing listens on http (127.0.0.1:",
    );
}

// ---------------------------------------------------------------------------
// The adapter's plumbing

#[test]
fn the_adapter_is_appended_to_node_options_and_removed_at_exit() {
    let extra = "env = NODE_OPTIONS=--max-old-space-size=200\nworkers = 1";
    let config = node_app("http.js", 1, "").replace("workers = 1\n", "") + extra;
    let mut cluster = Cluster::start("node-options", &config);
    wait_ready(&cluster, 1);
    let adapter = cluster.wait_event("node.adapter", |_| true);
    let path = PathBuf::from(adapter.get("path").expect("path"));
    let folder = path.parent().unwrap().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&folder), 0o700);
    assert_eq!(mode(&path), 0o444);
    // The worker got the user's NODE_OPTIONS with the adapter appended; the
    // app's own environment has neither the adapter nor the listeners.
    let pid = cluster.worker_pids()[0];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let options = environ
        .split('\0')
        .find_map(|e| e.strip_prefix("NODE_OPTIONS="))
        .expect("NODE_OPTIONS");
    assert_eq!(
        options,
        format!("--max-old-space-size=200 --require \"{}\"", path.display())
    );
    assert!(environ.contains("NODE_CHANNEL_FD="), "{environ}");
    cluster.signal(rustix::process::Signal::TERM);
    assert!(cluster.wait_exit().success());
    assert!(!folder.exists(), "{} is left behind", folder.display());
}

#[test]
fn a_blocked_event_loop_is_replaced_by_the_watchdog() {
    // The heartbeat comes from the event loop: SIGSTOP stands in for a loop
    // that blocks (a `while (true)` in a handler).
    let cluster = Cluster::start("node-watchdog", &node_app("http.js", 1, "watchdog = 2s"));
    wait_ready(&cluster, 1);
    let pid = cluster.worker_pids()[0];
    // It heartbeats: alive well past the watchdog.
    wait_for("the worker to be up 3 s", || {
        let up = cluster.status_json()["workers"][0]["uptime_ms"].as_u64();
        up.is_some_and(|ms| ms > 3000).then_some(())
    });
    assert!(
        cluster.events("worker.hung").is_empty(),
        "{}",
        cluster.log_text()
    );
    kill(pid, rustix::process::Signal::STOP);
    let hung = cluster.wait_event("worker.hung", |_| true);
    assert_eq!(
        hung.get("pid"),
        Some(pid.to_string().as_str()),
        "{}",
        hung.raw
    );
    cluster.wait_event("worker.ready", |l| {
        l.get("pid") != Some(pid.to_string().as_str())
    });
}
