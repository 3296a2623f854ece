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
