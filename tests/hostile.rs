//! Hostile clients: the metrics port under idle and slowloris connections, and
//! `empty_pool` (clients of an empty pool get an answer instead of hanging).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clusterd_bench::hostile::{Attack, Target};

use crate::util::*;

/// Each probe must get its answer within this (generous: the machine is
/// shared and the attack is busy; this is not a latency target).
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

fn metrics_addr(cluster: &Cluster) -> SocketAddr {
    let line = cluster.wait_event("metrics", |_| true);
    line.get("addr").expect("addr").parse().expect("address")
}

/// `GET path` on a new connection, each step within [`PROBE_DEADLINE`].
fn probe(addr: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, PROBE_DEADLINE)?;
    s.set_read_timeout(Some(PROBE_DEADLINE))?;
    s.set_write_timeout(Some(PROBE_DEADLINE))?;
    s.write_all(&request("GET", path, b"", true))?;
    read_response(&mut s)
}

#[test]
fn healthz_answers_while_1000_idle_and_slowloris_connections_are_held() {
    let cluster = Cluster::testworkers("hostile-metrics", 1, "ok", "metrics = 127.0.0.1:0");
    let m = metrics_addr(&cluster);
    cluster.wait_ready(1);
    let attack = Attack::start(Target::Tcp(m), 500, 500).expect("attack");
    wait_for("1000 hostile connections opened", || {
        (attack.opened() >= 1000).then_some(())
    });
    let mut failures = Vec::new();
    for i in 0..20 {
        // Spread over the attack: each probe after more reconnects.
        let seen = attack.opened();
        wait_for("the attack to go on", || {
            (attack.opened() > seen).then_some(())
        });
        match probe(m, "/healthz") {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failures.push(format!("probe {i}: status {}", r.status)),
            Err(e) => failures.push(format!("probe {i}: {e}")),
        }
    }
    // The scrape endpoint too.
    match probe(m, "/metrics") {
        Ok(r) if r.status == 200 => {}
        Ok(r) => failures.push(format!("scrape: status {}", r.status)),
        Err(e) => failures.push(format!("scrape: {e}")),
    }
    let opened = attack.opened();
    attack.stop();
    println!("hostile connections opened: {opened}");
    assert!(
        failures.is_empty(),
        "{} of 21 probes failed under the attack: {failures:?}",
        failures.len()
    );
    assert!(
        !cluster.events("metrics.busy").is_empty(),
        "metrics.busy is logged:\n{}",
        cluster.log_text()
    );
    // Still serving after the attack, and the evictions are counted.
    let text = String::from_utf8_lossy(&probe(m, "/metrics").expect("scrape").body).into_owned();
    let evicted = text
        .lines()
        .find_map(|l| l.strip_prefix("clusterd_metrics_connections_evicted_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the evicted counter");
    assert!(evicted > 0, "{text}");
}

/// A worker program that fails until the file `good` exists in its folder,
/// then is a testworker `ok`.
fn flaky_worker(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("flaky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e good ] || exit 1\nexec {} ok\n",
            example("testworker").display()
        ),
    )
    .expect("write the worker script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

#[test]
fn an_empty_pool_answers_503_then_a_ready_worker_gets_the_requests() {
    let dir = TempDir::new("empty-503");
    let script = flaky_worker(dir.path());
    let config = format!(
        "exec = {}\nworkers = 1\nlisten = 127.0.0.1:0\nmetrics = 127.0.0.1:0\n\
         ready_timeout = 1s\nrestart_delay_max = 500ms\nempty_pool = 503\n",
        script.display()
    );
    let cluster = Cluster::start_in(
        dir,
        "empty-503",
        &config,
        std::process::Command::new(clusterd_bin()),
    );
    let (addr, m) = (cluster.addr(), metrics_addr(&cluster));
    cluster.wait_event("empty_pool.begin", |l| l.get("mode") == Some("503"));

    for method in ["GET", "POST"] {
        let mut s = std::net::TcpStream::connect_timeout(&addr, PROBE_DEADLINE).unwrap();
        s.set_read_timeout(Some(PROBE_DEADLINE)).unwrap();
        s.write_all(&request(method, "/products/1", CART, false))
            .unwrap();
        let r = read_response(&mut s).expect("an answer, not a hang");
        assert_eq!(r.status, 503, "{method}");
        assert_eq!(r.header("retry-after"), Some("5"));
        assert_eq!(r.header("connection"), Some("close"));
    }
    // A client that sends nothing is answered too (after a short wait).
    let mut silent = std::net::TcpStream::connect_timeout(&addr, PROBE_DEADLINE).unwrap();
    silent.set_read_timeout(Some(PROBE_DEADLINE)).unwrap();
    assert_eq!(read_response(&mut silent).expect("an answer").status, 503);
    let text = String::from_utf8_lossy(&probe(m, "/metrics").expect("scrape").body).into_owned();
    assert!(
        text.lines().any(|l| l
            .starts_with("clusterd_empty_pool_connections_total{action=\"503\"} ")
            && !l.ends_with(" 0")),
        "{text}"
    );

    // The deploy is fixed: the worker comes up, clusterd stops answering.
    std::fs::write(cluster.dir.path().join("good"), "").unwrap();
    cluster.wait_event("worker.ready", |_| true);
    let end = cluster.wait_event("empty_pool.end", |_| true);
    assert!(end.num("answered") >= 3, "{}", end.raw);
    for _ in 0..5 {
        let r = exchange(addr, &request("GET", "/", b"", false)).expect("served");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-worker"), Some("1"));
    }
}

#[test]
fn an_empty_pool_in_reset_mode_resets_connections_at_once() {
    let cluster = Cluster::start(
        "empty-reset",
        "exec = /bin/false\nworkers = 1\nlisten = 127.0.0.1:0\n\
         ready_timeout = 1s\nempty_pool = reset\n",
    );
    let addr = cluster.addr();
    cluster.wait_event("empty_pool.begin", |l| l.get("mode") == Some("reset"));
    // connect_timeout polls the socket and then reads SO_ERROR: a reset that
    // arrives before that read is reported by the connect itself.
    let mut s = match std::net::TcpStream::connect_timeout(&addr, PROBE_DEADLINE) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect: {e}"),
    };
    if let Err(e) = s.set_read_timeout(Some(PROBE_DEADLINE)) {
        // Reset before the option could be set: the reset this test wants.
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        return;
    }
    let _ = s.write_all(&request("GET", "/", b"", true));
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut s, &mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// A worker that makes the shared listener blocking (the file status flags
/// belong to the socket, so every copy sees them) must not leave clusterd
/// blocked in `accept` while it answers for the empty pool: clusterd sets
/// the flag back, says so once, and goes on answering. (Here clusterd is the
/// only one accepting, so an accept would not block anyway: the log line is
/// what shows the guard at work.)
#[test]
fn a_worker_that_makes_the_listener_blocking_does_not_block_clusterd() {
    let cluster = Cluster::start(
        "empty-blocking",
        "exec = python3 -c 'import os, time; os.set_blocking(3, True); time.sleep(0.3)'\n\
         protocol = systemd\nworkers = 1\nlisten = 127.0.0.1:0\n\
         ready_timeout = 1s\nrestart_delay_max = 300ms\nempty_pool = 503\n",
    );
    let addr = cluster.addr();
    cluster.wait_event("empty_pool.begin", |l| l.get("mode") == Some("503"));
    // Each respawned worker clears O_NONBLOCK again; every probe is answered.
    wait_for("clusterd to notice the blocking listener", || {
        let r = probe(addr, "/").expect("an answer, not a hang");
        assert_eq!(r.status, 503);
        (!cluster.events("empty_pool.blocking").is_empty()).then_some(())
    });
    let r = probe(addr, "/").expect("still answering");
    assert_eq!(r.status, 503);
    assert!(cluster.ctl(&["status"]).status.success());
    assert_eq!(cluster.events("empty_pool.blocking").len(), 1, "said once");
}
