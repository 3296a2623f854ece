//! examples/chat, the Socket.IO tutorial's chat with the Redis adapter, run
//! unchanged under `protocol = node` with `dispatch = clusterd` and
//! `sticky = socket.io`: 200 socket.io-client clients with the default
//! transports (long-polling, then the upgrade to WebSocket) all get through
//! the handshake, every message reaches every client whatever worker it is
//! on (through Redis), and through a rolling restart the clients get 1012,
//! reconnect to the new workers and chat on without losing a message sent
//! after they are back.
//!
//! Needs node and npm (as tests/node.rs: examples/chat is installed with
//! `npm ci` under target/tmp/chat) and Debian's `redis-server`, which
//! `.ci/redis-server` finds or installs (root and apt-get); where it cannot,
//! the tests say so loudly and skip. Each test starts its own redis-server on
//! an ephemeral port of 127.0.0.1 with its files in a temp folder, and stops
//! it by pid.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// How long 200 clients may take to connect, reconnect or get a round of
/// messages: four Node workers and the clients share two CPUs with other
/// tests.
const CHAT_DEADLINE: Duration = Duration::from_secs(90);

/// Says loudly why a test does not run here.
fn skip(test: &str, why: &str) {
    let bar = "#".repeat(78);
    eprintln!("\n{bar}\n# SKIPPED {test}: {why}\n{bar}\n");
}

/// examples/chat, installed under target/tmp (see tests/node.rs).
fn chat_app() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| crate::node::npm_install("examples/chat", "chat"))
}

/// The redis-server binary, found or installed by `.ci/redis-server`; the
/// reason when there is none.
fn redis_server() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/redis-server");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = stdout.lines().last().unwrap_or("").trim();
        if out.status.success() && !path.is_empty() {
            Ok(PathBuf::from(path))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    })
    .clone()
}

/// A redis-server of the test's own on 127.0.0.1, stopped (TERM, then KILL
/// after a deadline, by pid) on drop.
struct Redis {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Redis {
    fn start(bin: &Path) -> Redis {
        // An ephemeral port: the kernel picks a free one, which redis then
        // binds (another process may take it in between: then try again).
        for _ in 0..5 {
            let port = {
                let probe = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
                probe.local_addr().unwrap().port()
            };
            let dir = TempDir::new("redis");
            let child = Command::new(bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let mut redis = Redis {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                _dir: dir,
            };
            let up = eventually(DEADLINE, || {
                redis.ping() || redis.child.try_wait().ok().flatten().is_some()
            });
            if up && redis.ping() {
                return redis;
            }
            let log = std::fs::read_to_string(redis._dir.path().join("redis.log"));
            eprintln!("redis-server did not start on port {port}: {log:?}");
        }
        panic!("redis-server did not start (5 tries)");
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut answer = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(self.child.id(), rustix::process::Signal::TERM);
        let child = &mut self.child;
        if !eventually(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        }) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `node clients.js chat URL N` (examples/chat/clients.js): N chat clients
/// that report their events and answer commands; killed on drop.
struct Clients {
    child: Child,
    stdin: ChildStdin,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Clients {
    fn start(url: &str, n: usize, transports: Option<&str>) -> Clients {
        let mut command = Command::new("node");
        command
            .arg(chat_app().join("clients.js"))
            .args(["chat", url, &n.to_string()])
            .current_dir(chat_app())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(t) = transports {
            command.env("CHAT_TRANSPORTS", t);
        }
        let mut child = command.spawn().expect("start node clients.js");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Clients {
            child,
            stdin,
            events,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn of(&self, event: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// Sends a command; returns the answer (the next `event` line).
    fn ask(&mut self, command: &str, event: &str) -> Value {
        let before = self.of(event).len();
        writeln!(self.stdin, "{command}").expect("a command to the clients");
        wait_for(&format!("the clients' answer to {command:?}"), || {
            self.of(event).get(before).cloned()
        })
    }

    /// (connected, on WebSocket)
    fn status(&mut self) -> (u64, u64) {
        let st = self.ask("status", "status");
        (
            st["connected"].as_u64().unwrap(),
            st["websocket"].as_u64().unwrap(),
        )
    }

    /// Waits until all `n` clients are connected and on WebSocket.
    fn wait_all_upgraded(&mut self, n: u64, what: &str) {
        wait_for_within(what, CHAT_DEADLINE, || {
            (self.status() == (n, n)).then_some(())
        });
    }

    /// Every connected client says something in `round`; waits until every
    /// client got every message of it, and returns how many were sent.
    fn round_reaches_everyone(&mut self, round: u64, n: u64) -> u64 {
        let sent = self.ask(&format!("send {round}"), "sent");
        let senders = sent["from"].as_array().unwrap().len() as u64;
        assert_eq!(senders, n, "every client was connected to send: {sent}");
        let mut last = Value::Null;
        let complete = eventually(CHAT_DEADLINE, || {
            last = self.ask(&format!("check {round}"), "check");
            last["missing"] == 0
        });
        assert!(
            complete,
            "round {round}: messages did not reach every client: {last}"
        );
        senders
    }

    /// The last connect of each client: client -> (sid, worker id).
    fn sessions(&self) -> BTreeMap<u64, (String, String)> {
        let mut at = BTreeMap::new();
        for e in self.of("connect") {
            at.insert(
                e["client"].as_u64().unwrap(),
                (
                    e["sid"].as_str().unwrap_or("").to_string(),
                    e["worker"].as_str().unwrap_or("").to_string(),
                ),
            );
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

/// The chat's config: `workers` workers, dispatched by clusterd, sticky on
/// engine.io's sid, talking to `redis`.
fn chat_config(workers: u32, redis: &Redis) -> String {
    format!(
        "exec = node index.js\nchdir = {}\nprotocol = node\nworkers = {workers}\n\
         listen = 127.0.0.1:0\ndispatch = clusterd\nsticky = socket.io\n\
         env = REDIS_URL={}\ndrain_timeout = 30s\nready_timeout = 60s\n",
        chat_app().display(),
        redis.url()
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

/// The pids of the workers of `generation` that are ready.
fn pids_of(cluster: &Cluster, generation: u64) -> Vec<u32> {
    let st = cluster.status_json();
    st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["generation"] == generation && w["state"] == "ready")
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// Every worker that left did so by draining (exit 0, no SIGKILL, no crash).
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

/// The chat on `workers` workers with `CLIENTS` clients, through `restarts`
/// rolling restarts.
fn chat_survives_rolling_restarts(test: &str, workers: u32, restarts: u64) {
    const CLIENTS: u64 = 200;
    let redis = match redis_server() {
        Ok(bin) => Redis::start(&bin),
        Err(why) => return skip(test, &why),
    };
    let cluster = Cluster::start("chat", &chat_config(workers, &redis));
    wait_for_within("every worker ready", CHAT_DEADLINE, || {
        (pids_of(&cluster, 1).len() as u32 == workers).then_some(())
    });
    let addr = cluster.addr();
    let mut clients = Clients::start(&format!("http://{addr}"), CLIENTS as usize, None);

    // Every handshake succeeds (long-polling first, then the upgrade).
    clients.wait_all_upgraded(CLIENTS, "every client connected and upgraded to WebSocket");
    let errors = clients.of("connect_error");
    assert!(errors.is_empty(), "failed handshakes: {errors:?}");
    assert!(
        clients.of("disconnect").is_empty(),
        "{:?}",
        clients.of("disconnect")
    );
    let sessions = clients.sessions();
    assert_eq!(sessions.len() as u64, CLIENTS);
    // Session ids name their worker (the adapter's engine.io hook), and
    // with several workers the clients are spread over them, so that a
    // message crosses workers through Redis.
    let ids: BTreeSet<String> = sessions.values().map(|(_, w)| w.clone()).collect();
    let slots: BTreeSet<String> = (1..=workers).map(|i| i.to_string()).collect();
    assert!(ids.is_subset(&slots), "worker ids in sids: {sessions:?}");
    if workers > 1 {
        assert!(ids.len() > 1, "every client on one worker: {ids:?}");
    }
    let mut round = 1;
    clients.round_reaches_everyone(round, CLIENTS);

    for generation in 2..=restarts + 1 {
        let old = pids_of(&cluster, generation - 1);
        assert_eq!(old.len() as u32, workers);
        let before = clients.events().len();
        restart(&cluster);
        wait_for("the new generation ready", || {
            (pids_of(&cluster, generation).len() as u32 == workers).then_some(())
        });
        // The old workers drained: every client left them.
        cluster.wait_exits(&old);
        // Every client was told (its first close after the restart is 1012:
        // they were all on WebSocket) and is back, on WebSocket.
        clients.wait_all_upgraded(CLIENTS, "every client reconnected and upgraded");
        let events = clients.events();
        let after = &events[before..];
        let mut first_close: BTreeMap<u64, &Value> = BTreeMap::new();
        for e in after.iter().filter(|e| e["event"] == "disconnect") {
            first_close
                .entry(e["client"].as_u64().unwrap())
                .or_insert(e);
            // Later closes (a client that went back to an old worker
            // drained later): 1012 again; on long-polling, engine.io's close
            // packet, or, when the drain came between two polls, the 400 of
            // the new worker that got the next one ("transport error": the
            // session moved).
            assert!(
                e["code"] == 1012
                    || (e["code"].is_null()
                        && (e["reason"] == "transport close" || e["reason"] == "transport error")),
                "a close that is not the drain's: {e}"
            );
        }
        assert_eq!(
            first_close.len() as u64,
            CLIENTS,
            "every client was closed by the restart"
        );
        for (client, e) in &first_close {
            assert_eq!(e["code"], 1012, "client {client}: {e}");
        }
        // Back on a worker of the new generation (the old ones are gone),
        // whose id starts the new session id.
        let now = clients.sessions();
        for (client, (sid, worker)) in &now {
            assert_ne!(sid, &sessions[client].0, "client {client} kept its session");
            assert!(slots.contains(worker), "client {client}: sid {sid}");
        }
        // Chatting goes on, and nothing sent once they are back is lost.
        for _ in 0..3 {
            round += 1;
            clients.round_reaches_everyone(round, CLIENTS);
        }
    }
    assert_all_drained(&cluster);
    drop(clients);
    drop(cluster);
    drop(redis);
}

#[test]
fn chat_on_one_worker_survives_a_rolling_restart() {
    chat_survives_rolling_restarts("chat::chat_on_one_worker_…", 1, 2);
}

#[test]
fn chat_on_four_workers_reaches_every_client_and_survives_a_rolling_restart() {
    chat_survives_rolling_restarts("chat::chat_on_four_workers_…", 4, 2);
}

// ---------------------------------------------------------------------------
// The drain of engine.io sessions

/// A Socket.IO server that closes itself on SIGTERM, as many apps do
/// (`io.close()`), written into the installed chat folder (for its
/// node_modules).
const IO_CLOSE_APP: &str = r#"
const { createServer } = require('node:http');
const { Server } = require('socket.io');
const server = createServer();
const io = new Server(server);
io.on('connection', (socket) => {
  socket.on('chat message', (msg) => io.emit('chat message', msg));
});
process.on('SIGTERM', () => io.close());
server.listen(3000);
"#;

/// A restart of one worker of `app` (a file written into the chat folder)
/// with `n` clients on `transports`: returns their disconnect events.
fn disconnects_on_restart(tag: &str, app: &str, transports: &str) -> Vec<Value> {
    const CLIENTS: u64 = 20;
    let file = format!("{tag}.js");
    std::fs::write(chat_app().join(&file), app).expect("write the app");
    let config = format!(
        "exec = node {file}\nchdir = {}\nprotocol = node\nworkers = 1\n\
         listen = 127.0.0.1:0\ndrain_timeout = 60s\nready_timeout = 60s\n",
        chat_app().display()
    );
    let cluster = Cluster::start(tag, &config);
    wait_for_within("the worker ready", CHAT_DEADLINE, || {
        (pids_of(&cluster, 1).len() == 1).then_some(())
    });
    let mut clients = Clients::start(
        &format!("http://{}", cluster.addr()),
        CLIENTS as usize,
        Some(transports),
    );
    wait_for("every client connected", || {
        (clients.status().0 == CLIENTS).then_some(())
    });
    let old = pids_of(&cluster, 1);
    let before = clients.events().len();
    restart(&cluster);
    cluster.wait_exits(&old);
    wait_for("every client back", || {
        (clients.status().0 == CLIENTS).then_some(())
    });
    assert_all_drained(&cluster);
    clients.events()[before..]
        .iter()
        .filter(|e| e["event"] == "disconnect")
        .cloned()
        .collect()
}

#[test]
fn an_apps_own_io_close_on_sigterm_tells_websocket_clients_1012() {
    // Without the adapter's hook, engine.io's close says nothing: 1005.
    let closes = disconnects_on_restart("io-close", IO_CLOSE_APP, "websocket");
    assert_eq!(closes.len(), 20, "{closes:?}");
    for c in &closes {
        assert_eq!(c["code"], 1012, "{c}");
    }
}

#[test]
fn long_polling_sessions_get_engine_ios_close_packet_on_drain() {
    // The app of the tutorial, without Redis: its pending polls get the
    // close packet at once ("transport close"), not an answer at the next
    // ping and then a 400 from the new worker ("transport error").
    let app = IO_CLOSE_APP.replace("process.on('SIGTERM', () => io.close());\n", "");
    let closes = disconnects_on_restart("polling", &app, "polling");
    assert_eq!(closes.len(), 20, "{closes:?}");
    for c in &closes {
        assert_eq!(c["reason"], "transport close", "{c}");
    }
}
