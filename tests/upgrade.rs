//! `clusterctl upgrade` and SIGUSR2: clusterd re-executes itself in place
//! and keeps every worker (DESIGN.md guarantee 7).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::util::*;

/// Runs `clusterctl upgrade ARGS`; panics unless it succeeds.
fn upgrade(cluster: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let out = cluster.ctl(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "clusterctl upgrade failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `clusterctl upgrade ARGS`, which must fail with exit 1; its stderr.
fn refused(cluster: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let out = cluster.ctl(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "clusterctl upgrade should fail: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Each worker's `(id, pid, generation, restarts)`, from status.
fn workers(status: &Value) -> Vec<(u64, u64, u64, u64)> {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["id"].as_u64().unwrap(),
                w["pid"].as_u64().unwrap_or(0),
                w["generation"].as_u64().unwrap(),
                w["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn uptimes(status: &Value) -> Vec<u64> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["uptime_ms"].as_u64().unwrap())
        .collect()
}

/// The workers are the processes they were (`before`: their pids then).
fn assert_same_workers(cluster: &Cluster, mut before: Vec<u32>) {
    let mut after = cluster.worker_pids();
    before.sort_unstable();
    after.sort_unstable();
    assert_eq!(after, before, "no worker was replaced");
}

/// Writes a shell script at `path` and waits until it can be run (no
/// ETXTBSY from a fork of another test thread holding it open).
fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&partial, path).unwrap();
    wait_for(
        &format!("{} to be runnable", path.display()),
        || match Command::new(path).arg("--upgrade-formats").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => None,
            _ => Some(()),
        },
    );
}

/// 20 upgrades under keep-alive and new-connection GET and POST load: no
/// request fails, the workers are the same processes, and status goes on
/// (restarts, generations, uptimes) as if nothing had happened.
#[test]
fn twenty_upgrades_under_load_lose_nothing_and_keep_every_worker() {
    let cluster = Cluster::shop("upgrade-load", 4, "");
    cluster.wait_ready(1);
    let before = cluster.status_json();
    let pids_before = cluster.worker_pids();
    let loads = mixed_load(cluster.addr());
    let mut last = before.clone();
    for n in 1..=20u64 {
        let out = upgrade(&cluster, &[]);
        assert!(out.contains("clusterd upgraded in place"), "{out}");
        let status = cluster.status_json();
        assert_eq!(status["upgrades"], n, "{status}");
        assert_eq!(status["pid"], before["pid"], "the same process");
        assert_eq!(workers(&status), workers(&before), "{status}");
        assert!(status["uptime_ms"].as_u64() >= last["uptime_ms"].as_u64());
        for (now, then) in uptimes(&status).iter().zip(uptimes(&last)) {
            assert!(*now >= then, "worker uptimes go on: {status}");
        }
        assert!(status["image_uptime_ms"].as_u64() <= status["uptime_ms"].as_u64());
        last = status;
        let_loads_run(&loads, 10);
    }
    finish_loads(loads);
    assert_same_workers(&cluster, pids_before);
    assert_eq!(cluster.events("upgrade.done").len(), 20);
    assert!(
        cluster.events("worker.spawn").len() == 4,
        "no worker spawned again"
    );
    let done = cluster.events("upgrade.done");
    assert_eq!(done[0].get("from"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(done[0].get("to"), Some(env!("CARGO_PKG_VERSION")));
}

/// A slot waiting out its crash backoff still waits after an upgrade
/// (SIGUSR2 this time), for the rest of its delay, not from zero and not
/// not at all.
#[test]
fn an_upgrade_during_a_backoff_keeps_the_backoff() {
    let cluster = Cluster::testworkers(
        "upgrade-backoff",
        1,
        "crash-after 0",
        "restart_delay = 3s\nrestart_delay_max = 30s\nmin_uptime = 60s",
    );
    let backoff = cluster.wait_event("worker.backoff", |_| true);
    assert_eq!(backoff.num("delay_ms"), 3000, "{}", backoff.raw);
    let spawns = cluster.events("worker.spawn").len();
    cluster.signal(rustix::process::Signal::USR2);
    cluster.wait_event("upgrade.done", |_| true);
    let status = cluster.status_json();
    assert_eq!(status["upgrades"], 1);
    let worker = &status["workers"][0];
    assert_eq!(worker["state"], "backoff", "{status}");
    assert_eq!(worker["restarts"], 2, "{status}");
    // The respawn comes when the delay is over: not at the upgrade.
    let respawn = wait_for("the respawn after the backoff", || {
        cluster.events("worker.spawn").into_iter().nth(spawns)
    });
    assert!(
        respawn.ts_ms() + 5 >= backoff.ts_ms() + 3000,
        "respawned before the backoff was over:\n{}",
        cluster.log_text()
    );
}

/// A binary that does not take this clusterd's state format, and one that
/// does not exist, are refused with the reason; the old clusterd carries
/// on, the same workers serving.
#[test]
fn a_binary_that_cannot_take_over_is_refused_and_nothing_changes() {
    let cluster = Cluster::shop("upgrade-refused", 2, "");
    cluster.wait_ready(1);
    let before = cluster.status_json();
    let foreign = cluster.dir.path().join("foreign.sh");
    write_script(
        &foreign,
        "#!/bin/sh\necho 'clusterd 9.9.9'\necho 'handoff 77'\n",
    );
    let err = refused(&cluster, &["--binary", foreign.to_str().unwrap()]);
    assert!(
        err.contains("upgrade refused") && err.contains("takes hand-off formats [77]"),
        "{err}"
    );
    let missing = cluster.dir.path().join("no-such-clusterd");
    let err = refused(&cluster, &["--binary", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    let old = cluster.dir.path().join("old.sh");
    write_script(
        &old,
        "#!/bin/sh\necho \"unexpected argument $1\" >&2\nexit 2\n",
    );
    let err = refused(&cluster, &["--binary", old.to_str().unwrap()]);
    assert!(err.contains("not a clusterd that can take over"), "{err}");
    assert_eq!(cluster.events("upgrade.refused").len(), 3);
    let after = cluster.status_json();
    assert_eq!(after["upgrades"], 0);
    assert_eq!(workers(&after), workers(&before));
    assert_eq!(get(cluster.addr(), "/products/1").unwrap().status, 200);
    // And a real one still works afterwards.
    upgrade(&cluster, &[]);
    assert_eq!(cluster.status_json()["upgrades"], 1);
}

/// Refused while a rolling restart runs, with the reason; the restart goes
/// on to its end.
#[test]
fn an_upgrade_is_refused_while_a_restart_runs() {
    let cluster = Cluster::shop("upgrade-busy", 2, "bake = 2s");
    cluster.wait_ready(1);
    let ctl = crate::util::bin_dir().join("clusterctl");
    let control = cluster.control.clone();
    let restart = std::thread::spawn(move || {
        Command::new(ctl)
            .arg("-s")
            .arg(control)
            .arg("restart")
            .output()
            .unwrap()
    });
    cluster.wait_event("restart.bake", |_| true);
    let err = refused(&cluster, &[]);
    assert!(
        err.contains("rolling restart is already in progress"),
        "{err}"
    );
    let out = restart.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    upgrade(&cluster, &[]);
}

/// As PID 1 of a new pid namespace, clusterd stays PID 1 across upgrades
/// (SIGUSR2 from outside: clusterctl outside the namespace cannot be
/// checked by SO_PEERCRED) and keeps reaping: a worker killed after them
/// is reaped and replaced, and its replacement's orphan is reaped too.
#[test]
fn as_pid_1_it_stays_pid_1_and_keeps_reaping() {
    let dir = TempDir::new("upgrade-pid1");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(clusterd_bin());
    let config = format!(
        "exec = {} ok --orphan\nworkers = 2\nlisten = 127.0.0.1:0\n",
        example("testworker").display()
    );
    let cluster = Cluster::start_in(dir, "upgrade-pid1", &config, cmd);
    assert_eq!(cluster.wait_event("started", |_| true).num("pid"), 1);
    cluster.wait_ready(1);
    let clusterd = wait_for("clusterd's pid outside the namespace", || {
        children(cluster.pid()).first().copied()
    });
    let workers = wait_for("both workers", || {
        let w = children(clusterd);
        (w.len() == 2).then_some(w)
    });
    for n in 1..=3u64 {
        kill(clusterd, rustix::process::Signal::USR2);
        let done = cluster.wait_event("upgrade.done", |l| l.num("upgrades") == n);
        assert_eq!(done.num("pid"), 1, "still PID 1: {}", done.raw);
        assert_eq!(done.num("workers"), 2, "{}", done.raw);
    }
    let mut now = children(clusterd);
    now.sort_unstable();
    let mut then = workers.clone();
    then.sort_unstable();
    assert_eq!(now, then, "the same workers");
    // The new image reaps: a killed worker, then its replacement's orphan.
    let reaped = cluster.events("reaped").len();
    let spawns = cluster.events("worker.spawn").len();
    kill(workers[0], rustix::process::Signal::KILL);
    cluster.wait_event("worker.crash", |l| {
        l.get("status") == Some("signal 9 (SIGKILL)")
    });
    let respawn = wait_for("the replacement", || {
        cluster.events("worker.spawn").into_iter().nth(spawns)
    });
    cluster.wait_event("worker.ready", |l| l.get("pid") == respawn.get("pid"));
    wait_for("the new worker's orphan to be reaped", || {
        (cluster.events("reaped").len() > reaped).then_some(())
    });
    assert_eq!(get(cluster.addr(), "/").unwrap().status, 200);
}

/// The new image dies right after the exec (here: a "binary" that answers
/// the check as the real one, then exits): the workers see their channels
/// close, drain and exit, and nothing is left holding the port.
#[test]
fn a_new_image_that_dies_after_the_exec_leaves_nothing_holding_the_port() {
    let mut cluster = Cluster::shop("upgrade-crash", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let pids = cluster.worker_pids();
    assert_eq!(pids.len(), 2);
    let dying = cluster.dir.path().join("dying.sh");
    write_script(
        &dying,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = --upgrade-formats ]; then exec {} --upgrade-formats; fi\nexit 1\n",
            clusterd_bin().display()
        ),
    );
    let out = cluster.ctl(&["upgrade", "--binary", dying.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exited during the upgrade"), "{stderr}");
    let status = cluster.wait_exit();
    assert_eq!(status.code(), Some(1));
    wait_gone("the workers, after their channel closed", &pids);
    assert!(
        eventually(DEADLINE, || tcp_listen_inodes(addr).is_empty()),
        "something still listens on {addr}: {:?}",
        tcp_listen_inodes(addr)
    );
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// The worker that answered a GET with `headers` on a new connection.
fn worker_for(addr: std::net::SocketAddr, headers: &str) -> String {
    let req = format!("GET /products/1 HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    let resp = exchange(addr, req.as_bytes()).expect("a response");
    assert_eq!(resp.status, 200, "{headers}");
    resp.header("x-worker").expect("X-Worker").to_string()
}

/// `dispatch = clusterd` is handed over: the workers' inboxes (the load
/// loses nothing over 10 upgrades), sessions stay on their worker, and a
/// connection clusterd was still peeking at when it re-executed is
/// dispatched by the new image, its bytes untouched.
#[test]
fn upgrades_with_dispatch_clusterd_keep_inboxes_sessions_and_connections_in_flight() {
    use std::io::{Read as _, Write as _};
    let cluster = Cluster::shop(
        "upgrade-dispatch",
        3,
        "dispatch = clusterd\nsticky = cookie:sid",
    );
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let session = |k: usize| format!("Cookie: sid=s{k}\r\n");
    let placed: Vec<String> = (0..12).map(|k| worker_for(addr, &session(k))).collect();
    let pids_before = cluster.worker_pids();

    // Half a head: clusterd accepts the connection and peeks at it, waiting
    // for the cookie (its fd count shows it holds it), then re-executes.
    let pid = cluster.status_json()["pid"].as_u64().unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let idle = fds();
    let mut partial = std::net::TcpStream::connect(addr).unwrap();
    partial
        .write_all(b"GET /products/1 HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    wait_for("clusterd to accept the half head", || {
        (fds() > idle).then_some(())
    });
    let out = upgrade(&cluster, &[]);
    assert!(out.contains("clusterd upgraded in place"), "{out}");
    partial
        .write_all(format!("{}Connection: close\r\n\r\n", session(5)).as_bytes())
        .unwrap();
    partial
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    partial.read_to_end(&mut answer).expect("the answer");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("x-worker: {}\r\n", placed[5])),
        "the session moved: {answer}"
    );

    let loads = mixed_load(addr);
    for n in 2..=11u64 {
        upgrade(&cluster, &[]);
        assert_eq!(cluster.status_json()["upgrades"], n);
        let_loads_run(&loads, 10);
    }
    finish_loads(loads);
    for (k, w) in placed.iter().enumerate() {
        assert_eq!(&worker_for(addr, &session(k)), w, "session {k} moved");
    }
    assert_same_workers(&cluster, pids_before);
    assert!(cluster.events("dispatch.unsupported").is_empty());
    assert!(cluster.events("upgrade.failed").is_empty());
}

/// `dispatch = clusterd` with node workers: the connections go on
/// Node's IPC channel, which the new image writes on.
#[test]
fn upgrades_with_node_workers_and_dispatch_clusterd_lose_nothing() {
    let dir = TempDir::new("upgrade-node-dispatch");
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((req, res) => {\n\
         req.resume();\n\
         req.on('end', () => res.end('ok ' + process.env.CLUSTERD_WORKER_ID));\n\
         }).listen(3000);\n",
    )
    .unwrap();
    let config = format!(
        "exec = node {}\nprotocol = node\nworkers = 2\nlisten = 127.0.0.1:0\ndispatch = clusterd\n",
        app.display()
    );
    let cluster = Cluster::start_in(
        dir,
        "upgrade-node-dispatch",
        &config,
        std::process::Command::new(clusterd_bin()),
    );
    cluster.wait_ready(1);
    let pids_before = cluster.worker_pids();
    let loads = mixed_load(cluster.addr());
    for _ in 0..5 {
        upgrade(&cluster, &[]);
        let_loads_run(&loads, 20);
    }
    finish_loads(loads);
    assert_same_workers(&cluster, pids_before);
}

/// `dispatch = reuseport` is handed over: each slot keeps its own socket
/// (nothing queued on it is lost), and a slot added after the upgrade binds
/// the same port.
#[test]
fn upgrades_with_dispatch_reuseport_keep_every_slots_socket() {
    let cluster = Cluster::shop("upgrade-reuseport", 2, "dispatch = reuseport");
    cluster.wait_ready(1);
    let pids_before = cluster.worker_pids();
    let loads = mixed_load(cluster.addr());
    for _ in 0..5 {
        upgrade(&cluster, &[]);
        let_loads_run(&loads, 20);
    }
    let out = cluster.ctl(&["scale", "3"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("a third worker", || {
        (cluster.status_json()["ready"].as_u64() == Some(3)).then_some(())
    });
    let_loads_run(&loads, 20);
    finish_loads(loads);
    let mut pids_after = cluster.worker_pids();
    pids_after.retain(|p| pids_before.contains(p));
    assert_eq!(pids_after.len(), 2, "no worker was replaced");
    assert!(cluster.events("reuseport.failed").is_empty());
    // The third slot's socket serves on the same port.
    let mut seen = std::collections::BTreeSet::new();
    wait_for("the third worker to serve", || {
        let resp = exchange(cluster.addr(), &request("GET", "/products/1", b"", true)).ok()?;
        seen.insert(resp.header("x-worker")?.to_string());
        (seen.len() == 3).then_some(())
    });
}
