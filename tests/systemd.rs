//! `protocol = systemd`: programs that know nothing of clusterd, in any
//! language. The Node.js shop (examples/node-shop) and small Python programs
//! (tests/fixtures) get their listeners at fds 3.. with LISTEN_FDS,
//! LISTEN_FDNAMES and LISTEN_PID, report READY on the readiness pipe, by
//! sd_notify or not at all (`ready_after`), and drain on SIGTERM.
//!
//! Needs `node` and `python3` on the PATH.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use serde_json::Value;

use crate::util::*;

// ---------------------------------------------------------------------------
// Helpers

fn repo_file(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// A config running the Node.js shop (examples/node-shop/server.js), with
/// a `drain_timeout` short enough that a drain that hangs shows up as a
/// SIGKILL well within the harness's deadline.
fn node_shop(workers: u32, drain_timeout: &str) -> String {
    format!(
        "exec = node \"{}\"\nprotocol = systemd\nworkers = {workers}\n\
         listen = 127.0.0.1:0\ndrain_timeout = {drain_timeout}\n",
        repo_file("examples/node-shop/server.js")
    )
}

/// A config running tests/fixtures/pyworker.py in `mode`.
fn pyworker(mode: &str, workers: u32, extra: &str) -> String {
    format!(
        "exec = python3 \"{}\" {mode}\nprotocol = systemd\nworkers = {workers}\n\
         listen = 127.0.0.1:0\n{extra}\n",
        repo_file("tests/fixtures/pyworker.py")
    )
}

/// Waits for `pool.ready` of `generation`, failing at once (the log shows
/// the program's own error) if a worker crashed meanwhile.
fn wait_ready_no_crash(cluster: &Cluster, generation: u64) {
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

/// `clusterctl status --json`, which must succeed.
fn status(cluster: &Cluster) -> Value {
    let out = cluster.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "clusterctl status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// Polls `status --json` until `pred` holds; returns that status. Fails at
/// once if a worker crashed meanwhile.
fn wait_status(cluster: &Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, || {
            if let Some(crash) = cluster.events("worker.crash").first() {
                panic!("a worker crashed: {}", crash.raw);
            }
            last = status(cluster);
            pred(&last).then(|| last.clone())
        })
    }));
    found.unwrap_or_else(|e| {
        eprintln!("last status: {last:#}");
        std::panic::resume_unwind(e)
    })
}

fn workers(status: &Value) -> &[Value] {
    status["workers"].as_array().expect("workers array")
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

/// Waits until both workers of `generation` have exited, and checks that
/// they exited 0 (drained), not by SIGKILL at drain_timeout.
fn wait_drained(cluster: &Cluster, generation: u64) {
    let exits = cluster.wait_events("worker.exit", 2, |l| l.num("generation") == generation);
    for exit in exits {
        assert_eq!(
            exit.get("status"),
            Some("exit 0"),
            "a drained worker exits 0: {}",
            exit.raw
        );
    }
}

/// The environment a process was started with.
fn environ(pid: u32) -> HashMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (k, v) = entry.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The pids of the workers spawned for `generation` so far.
fn spawned(cluster: &Cluster, generation: u64) -> Vec<u32> {
    cluster
        .events("worker.spawn")
        .iter()
        .filter(|l| l.num("generation") == generation)
        .map(|l| l.num("pid") as u32)
        .collect()
}

/// One request on a new connection (`Connection: close`), read to EOF:
/// status, headers (names lowercased) and body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers, body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Waits until every load has had `more` further successful requests.
fn wait_flowing(loads: &[(&str, clusterd_bench::Running)], more: u64) {
    for (label, load) in loads {
        let target = load.ok_so_far() + more;
        assert!(
            load.wait_for_ok(target, DEADLINE),
            "{label}: load stalled: {}",
            load.snapshot()
        );
    }
}

fn signal(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("signal a worker");
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn the_node_shop_serves_through_clusterd() {
    let cluster = Cluster::start("node-serves", &node_shop(2, "10s"));
    wait_ready_no_crash(&cluster, 1);
    let addr = cluster.addr();
    let st = status(&cluster);
    assert_eq!(st["protocol"], "systemd");
    assert_eq!(st["ready"], 2);

    // The routes of the Rust shop, with the same catalogue.
    let (code, headers, body) = request(addr, "GET", "/products/42", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"id": 42, "name": "Vintage Desk Lamp", "price": 159.97})
    );
    assert!(
        ["1", "2"].contains(&headers["x-worker"].as_str()),
        "{headers:?}"
    );
    for bad in ["/products/0", "/products/10001", "/products/abc"] {
        let (code, _, body) = request(addr, "GET", bad, "");
        assert_eq!(code, 404, "{bad}: {body}");
        assert!(json(&body)["error"].is_string(), "{bad}: {body}");
    }
    let (code, headers, body) = request(addr, "POST", "/checkout", r#"{"cart":[1,2]}"#);
    assert_eq!(code, 200, "{body}");
    let order = json(&body);
    assert_eq!(order["status"], "confirmed", "{body}");
    let prefix = format!("{}-", headers["x-worker"]);
    assert!(
        order["orderId"].as_str().unwrap().starts_with(&prefix),
        "{body}"
    );
    let (code, _, body) = request(addr, "GET", "/cpu", "");
    assert_eq!(code, 200, "{body}");
    assert!(json(&body)["total"].is_number(), "{body}");
    let (code, _, body) = request(addr, "GET", "/healthz", "");
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, headers, _) = request(addr, "GET", "/checkout", "");
    assert_eq!((code, headers["allow"].as_str()), (405, "POST"));

    // Both workers answer, and they say who they are.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    wait_for("both workers to answer", || {
        let report = clusterd_bench::run(&Spec {
            connections: 4,
            keep_alive: false,
            max_requests: Some(40),
            path: "/products/7".into(),
            ..Spec::new(addr)
        })
        .expect("run load");
        assert_no_failures("GET /products/7", &report);
        for (worker, n) in report.workers {
            *seen.entry(worker).or_default() += n;
        }
        (seen.len() >= 2).then_some(())
    });
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["1", "2"],
        "X-Worker values: {seen:?}"
    );

    // What each node process was started with.
    let pids = spawned(&cluster, 1);
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let env = environ(pid);
        assert_eq!(env["LISTEN_PID"], pid.to_string(), "{env:?}");
        assert_eq!(env["LISTEN_FDS"], "1");
        assert_eq!(env["LISTEN_FDNAMES"], "http");
        assert!(env["NOTIFY_SOCKET"].starts_with('@'), "{env:?}");
        assert!(env.contains_key("CLUSTERD_READY_FD"), "{env:?}");
    }
}

/// A Python program checks what it was given (tests/fixtures/sd_check.py):
/// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, listening sockets at 3.. in
/// config order, a pipe in CLUSTERD_READY_FD, no other inherited fd. It
/// reports READY only if all is well, and prints its fds' addresses.
#[test]
fn any_program_gets_its_listeners_and_environment() {
    // Strict: no fd but the listeners and the readiness pipe, not even
    // those this test process inherited without close-on-exec (clusterd
    // marks its inherited fds close-on-exec at startup; see also
    // ops::fds_clusterd_inherited_do_not_reach_workers).
    let cluster = Cluster::start(
        "sd-check",
        &format!(
            "exec = python3 \"{}\" http:admin:sock\nprotocol = systemd\nworkers = 2\n\
             listen = 127.0.0.1:0\nlisten = admin=127.0.0.1:0\nlisten = sock=unix:app.sock\n",
            repo_file("tests/fixtures/sd_check.py"),
        ),
    );
    wait_ready_no_crash(&cluster, 1);
    let listening: Vec<String> = cluster
        .events("listening")
        .iter()
        .map(|l| format!("{}={}", l.get("name").unwrap(), l.get("addr").unwrap()))
        .collect();
    assert_eq!(listening.len(), 3);
    let expected: BTreeSet<u32> = spawned(&cluster, 1).into_iter().collect();
    // What the workers print reaches the log as worker.output lines.
    let reports: Vec<Vec<String>> = wait_for("both workers' fd reports", || {
        let printed: Vec<String> = cluster
            .events("worker.output")
            .iter()
            .filter(|l| l.get("stream") == Some("stdout"))
            .filter_map(|l| l.get("line").map(str::to_owned))
            .collect();
        let lines: Vec<Vec<String>> = printed
            .iter()
            .filter(|l| l.starts_with("fds "))
            .map(|l| l.split(' ').skip(1).map(String::from).collect())
            .collect();
        (lines.len() >= 2).then_some(lines)
    });
    let mut pids = BTreeSet::new();
    for report in reports {
        pids.insert(report[0].parse::<u32>().expect("a pid"));
        assert_eq!(report[1..], listening[..], "fds 3.. in config order");
    }
    assert_eq!(pids, expected, "each report came from a worker");
}

/// Rolling restarts (`clusterctl restart`, then SIGHUP) of the Node shop
/// under keep-alive and new-connection GET and POST load: no request fails,
/// and every old worker drains and exits 0 while the load goes on (so its
/// keep-alive connections were ended by `Connection: close`, not by the
/// clients stopping).
#[test]
fn the_node_shop_restarts_under_load_without_losing_a_request() {
    let cluster = Cluster::start("node-restart", &node_shop(2, "10s"));
    wait_ready_no_crash(&cluster, 1);
    let addr = cluster.addr();
    let loads = [
        ("keep-alive GET", load(addr, 2, true, Method::Get)),
        ("new-connection GET", load(addr, 2, false, Method::Get)),
        ("keep-alive POST", load(addr, 2, true, Method::Post)),
        ("new-connection POST", load(addr, 2, false, Method::Post)),
    ];

    restart(&cluster);
    wait_ready_no_crash(&cluster, 2);
    wait_drained(&cluster, 1);
    wait_flowing(&loads, 20);

    cluster.signal(Signal::HUP);
    cluster.wait_event("restart.done", |l| l.num("generation") == 3);
    wait_ready_no_crash(&cluster, 3);
    wait_drained(&cluster, 2);
    wait_flowing(&loads, 20);

    for (label, load) in loads {
        let report = load.stop();
        assert_no_failures(label, &report);
        for worker in report.workers.keys() {
            assert!(["1", "2"].contains(&worker.as_str()), "{label}: {report}");
        }
    }
}

/// A client that vanishes in the middle of a request does not hold the
/// Node shop's drain: the worker exits 0 as soon as it goes, long before
/// drain_timeout would SIGKILL it.
#[test]
fn a_client_gone_mid_request_does_not_hold_the_node_drain() {
    let cluster = Cluster::start("node-vanish", &node_shop(1, "5s"));
    wait_ready_no_crash(&cluster, 1);
    let old = spawned(&cluster, 1)[0];
    // One exchange proves the worker holds the connection; then half a
    // POST: its head, and part of the body.
    let mut conn = TcpStream::connect(cluster.addr()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("\r\n\r\nok") {
        let n = conn.read(&mut buf).expect("read the response");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    conn.write_all(
        b"POST /checkout HTTP/1.1\r\nHost: shop\r\nContent-Length: 100\r\n\r\n{\"cart\":",
    )
    .expect("send");

    restart(&cluster);
    // server.js says so on stderr, which is clusterd's log.
    wait_for("the old worker to drain with our connection open", || {
        let log = cluster.log_text();
        log.contains("draining (SIGTERM), 1 connections open")
            .then_some(())
    });
    drop(conn);
    let exit = cluster.wait_event("worker.exit", |l| l.num("pid") == u64::from(old));
    assert_eq!(exit.get("status"), Some("exit 0"), "{}", exit.raw);
}

/// A deploy whose program never reports READY: the restart aborts when the
/// replacement misses ready_timeout, the replacement is killed, and the old
/// Node workers keep serving throughout.
#[test]
fn a_program_that_never_reports_ready_aborts_the_restart() {
    let cluster = Cluster::start("never-ready", &node_shop(2, "10s"));
    wait_ready_no_crash(&cluster, 1);
    let addr = cluster.addr();
    let old: BTreeSet<u32> = spawned(&cluster, 1).into_iter().collect();
    let loads = [("keep-alive GET", load(addr, 2, true, Method::Get))];

    // The bad deploy: same config (control line included), another program.
    let config = std::fs::read_to_string(&cluster.config).expect("read config");
    let mut bad: String = config
        .lines()
        .filter(|l| !l.starts_with("exec"))
        .map(|l| format!("{l}\n"))
        .collect();
    bad.push_str("exec = python3 -c \"import time; time.sleep(1000)\"\nready_timeout = 1s\n");
    std::fs::write(&cluster.config, bad).expect("write config");

    let out = cluster.ctl(&["restart"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restart must fail: {stderr}");
    assert!(stderr.contains("did not report READY"), "{stderr}");
    let aborted = cluster.wait_event("restart.aborted", |_| true);
    assert!(
        aborted.get("reason").unwrap_or("").contains("READY"),
        "{}",
        aborted.raw
    );
    let replacement = spawned(&cluster, 2);
    assert_eq!(replacement.len(), 1, "one replacement at a time");
    wait_for("the replacement to be gone", || {
        (!alive(replacement[0])).then_some(())
    });

    let st = status(&cluster);
    assert_eq!(st["ready"], 2, "{st:#}");
    let now: BTreeSet<u32> = workers(&st)
        .iter()
        .map(|w| w["pid"].as_u64().expect("pid") as u32)
        .collect();
    assert_eq!(now, old, "the old workers still serve: {st:#}");
    for w in workers(&st) {
        assert_eq!(
            (w["generation"].as_u64(), w["state"].as_str()),
            (Some(1), Some("ready"))
        );
    }
    wait_flowing(&loads, 20);
    let [(label, traffic)] = loads;
    assert_no_failures(label, &traffic.stop());
}

/// A program that cannot notify at all is ready once it has lived for
/// `ready_after`: the pool becomes ready, serves, and restarts.
#[test]
fn ready_after_counts_a_silent_program_as_ready() {
    let cluster = Cluster::start("ready-after", &pyworker("silent", 2, "ready_after = 300ms"));
    wait_ready_no_crash(&cluster, 1);
    for ready in cluster.events("worker.ready") {
        // Deterministic, not a timing bound: nothing else makes it ready.
        assert!(ready.num("took_ms") >= 300, "{}", ready.raw);
    }
    let (code, headers, body) = request(cluster.addr(), "GET", "/", "");
    assert_eq!((code, body.as_str()), (200, "ok"));
    assert!(["1", "2"].contains(&headers["x-worker"].as_str()));

    restart(&cluster);
    wait_ready_no_crash(&cluster, 2);
    let (code, _, _) = request(cluster.addr(), "GET", "/", "");
    assert_eq!(code, 200);
    let st = status(&cluster);
    assert_eq!(st["ready"], 2);
    assert_eq!(st["generation"], 2);
}

/// A Python worker that reports READY=1 with sd_notify is ready; its
/// STATUS=… is each worker's note in `clusterctl status`, updated as it
/// changes, and the next generation's workers have their own.
#[test]
fn sd_notify_ready_and_status_from_a_python_worker() {
    let cluster = Cluster::start("sd-notify", &pyworker("notify", 2, ""));
    wait_ready_no_crash(&cluster, 1);
    let st = wait_status(&cluster, "both notes", |st| {
        workers(st)
            .iter()
            .all(|w| w["note"] == format!("worker {} serving", w["id"]))
    });
    assert_eq!(st["ready"], 2);
    for w in workers(&st) {
        assert_eq!(w["state"], "ready", "{st:#}");
    }

    let (code, headers, _) = request(cluster.addr(), "GET", "/", "");
    assert_eq!(code, 200);
    let id: u64 = headers["x-worker"].parse().expect("a worker id");
    wait_status(&cluster, "the note to follow STATUS=", |st| {
        workers(st)
            .iter()
            .any(|w| w["id"] == id && w["note"] == format!("worker {id} served 1"))
    });

    restart(&cluster);
    wait_ready_no_crash(&cluster, 2);
    wait_status(&cluster, "the new workers' notes", |st| {
        workers(st).len() == 2
            && workers(st)
                .iter()
                .all(|w| w["generation"] == 2 && w["note"] == format!("worker {} serving", w["id"]))
    });
    wait_drained(&cluster, 1);
}

/// Notifications clusterd must ignore: any from a process that is not a
/// worker (here the test itself: READY=1, STATUS=, garbage, 5000 bytes),
/// and from a worker garbage, a lowercase key, an oversized datagram made of
/// READY=1 lines, READY=1 with a malformed line, fds attached (closed, not
/// kept). None makes a worker ready or sets a note, and clusterd stays
/// healthy; the real READY=1 then works, and STOPPING=1 is logged.
#[test]
fn notifications_from_strangers_and_malformed_ones_are_ignored() {
    let cluster = Cluster::start("sd-hostile", &pyworker("staged", 2, "ready_timeout = 60s"));
    // The workers have set up their signal handlers.
    wait_status(&cluster, "both workers started", |st| {
        workers(st).len() == 2 && workers(st).iter().all(|w| w["note"] == "started")
    });
    let pids = spawned(&cluster, 1);
    assert_eq!(pids.len(), 2);
    let notify = environ(pids[0])["NOTIFY_SOCKET"].clone();
    let name = notify.strip_prefix('@').expect("an abstract socket name");
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("address");

    let stranger = UnixDatagram::unbound().expect("socket");
    for datagram in [
        &b"READY=1"[..],
        b"STATUS=forged",
        b"READY=1\nSTATUS=forged",
        b"\x00\xff garbage \xfe",
        &b"READY=1\n".repeat(625),
    ] {
        stranger.send_to_addr(datagram, &addr).expect("send");
    }
    for &pid in &pids {
        signal(pid, Signal::USR1); // the worker's own junk, then STATUS=fence
    }
    // Datagrams are handled in order: once both fences show, everything
    // sent before them has been handled.
    let st = wait_status(&cluster, "both fences", |st| {
        workers(st).iter().all(|w| w["note"] == "fence")
    });
    assert_eq!(st["ready"], 0, "{st:#}");
    for w in workers(&st) {
        assert_eq!(w["state"], "starting", "{st:#}");
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", cluster.pid())).expect("clusterd's fds");
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("fd-probe-"),
            "clusterd kept an fd a worker sent: {}",
            target.display()
        );
    }

    for &pid in &pids {
        signal(pid, Signal::USR1); // READY=1
    }
    wait_ready_no_crash(&cluster, 1);
    let (code, _, _) = request(cluster.addr(), "GET", "/", "");
    assert_eq!(code, 200);

    signal(pids[0], Signal::USR1); // STOPPING=1, then STATUS=stopping
    wait_status(&cluster, "the stopping note", |st| {
        workers(st).iter().any(|w| w["note"] == "stopping")
    });
    cluster.wait_event("worker.stopping", |l| l.num("pid") == u64::from(pids[0]));
    assert!(cluster.events("worker.crash").is_empty());
    assert_eq!(status(&cluster)["ready"], 2);
}

/// A `protocol = systemd` worker that sends `STOPPING=1` and exits at once
/// (`_exit`) is heard, even when the exit and the datagram reach clusterd
/// together: clusterd reads the datagrams queued on its notification socket
/// before it handles an exit. To make them arrive together, clusterd is
/// stopped (SIGSTOP) while the worker is sent SIGTERM, notifies and dies,
/// and continued once the worker is a zombie. (Such a worker exits without
/// a DRAIN, so clusterd counts a crash and replaces it.)
#[test]
fn stopping_sent_just_before_exiting_is_heard() {
    const ROUNDS: u64 = 6;
    let cluster = Cluster::start(
        "py-stopping",
        &pyworker("notify-exit", 1, "min_uptime = 100ms\nrestart_delay = 10ms"),
    );
    wait_ready_no_crash(&cluster, 1);
    for round in 0..ROUNDS {
        let worker = wait_for("a ready worker", || {
            let st = status(&cluster);
            let w = workers(&st).first()?.clone();
            (w["state"] == "ready" && w["restarts"] == round).then(|| w["pid"].as_u64())?
        }) as u32;
        kill(cluster.pid(), Signal::STOP);
        kill(worker, Signal::TERM);
        // clusterd is stopped, so it cannot reap: the worker is a zombie.
        wait_gone("the worker to exit", &[worker]);
        kill(cluster.pid(), Signal::CONT);
        let exit = cluster.wait_event("worker.crash", |l| l.num("pid") == u64::from(worker));
        let lines = cluster.lines();
        let at = |event: &str| {
            lines
                .iter()
                .position(|l| l.event == event && l.num("pid") == u64::from(worker))
        };
        let (stopping, exited) = (at("worker.stopping"), at("worker.crash"));
        assert!(
            stopping.is_some() && stopping < exited,
            "round {round}: STOPPING=1 lost or late ({}): {lines:#?}",
            exit.raw
        );
    }
}
