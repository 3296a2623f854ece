//! 9. Hostile clients.
//!
//! `/healthz` and `clusterctl status` latency while 1,000 idle and slowloris connections
//! are held on the metrics port, the shop's port and the control socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clusterd_bench::hostile::{Attack, Target};

use super::procs::{Daemon, poll_until};
use super::{Check, Ctx, Section, Table, fmt_ms, max, median, ms, quantile};

/// Hostile connections held against each target: half idle, half slowloris.
const IDLE: usize = 500;
const SLOWLORIS: usize = 500;
/// Each probe must be answered within this to count as answered.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// The probes of one target are spread over at least this long, so that the attack goes on
/// through several of its rounds and past the servers' first-byte deadlines.
const HOLD: Duration = Duration::from_secs(5);

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("hostile");
    s.md(&format!(
        "The example shop with 2 workers and `metrics = 127.0.0.1:0`. For each target, one \
         thread holds {} connections ({IDLE} that send nothing, {SLOWLORIS} that send one byte \
         of a request head that never ends every 100 ms); a connection the server closes is \
         opened again (at most 250 a round, so at most 2,500 connects a second). Once the first \
         1,000 are open, {} probes spread over at least {} s are timed, alternating a `GET /healthz` on a new connection \
         and a whole `clusterctl status` run (exec included); a probe not answered within {} s \
         counts as failed. Loopback only; the attack and the probes share the machine's CPUs \
         with clusterd and the shop.",
        IDLE + SLOWLORIS,
        ctx.p.status_runs,
        HOLD.as_secs(),
        PROBE_DEADLINE.as_secs()
    ));
    let d = match ctx.ready_shop_daemon("hostile", "2", "metrics = 127.0.0.1:0") {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            return s;
        }
    };
    let addrs = d.addr().and_then(|shop| {
        let line = d.wait_event("metrics", Duration::from_secs(10), |_| true)?;
        let m: SocketAddr = line
            .get("addr")
            .unwrap_or_default()
            .parse()
            .map_err(|_| "the metrics line has no address".to_string())?;
        Ok((shop, m))
    });
    let (shop, metrics) = match addrs {
        Ok(a) => a,
        Err(e) => {
            s.fail("addresses", &e);
            let _ = d.stop(Duration::from_secs(30));
            return s;
        }
    };
    let mut table = Table::new(&[
        "connections held on",
        "`/healthz` median",
        "p99",
        "max",
        "failed",
        "`clusterctl status` median",
        "p99",
        "max",
        "failed",
        "hostile connects",
    ]);
    let targets = [
        ("nothing (baseline)", None),
        ("the metrics port", Some(Target::Tcp(metrics))),
        ("the shop's port", Some(Target::Tcp(shop))),
        ("the control socket", Some(Target::Unix(d.control.clone()))),
    ];
    for (label, target) in targets {
        let attack = match target
            .map(|t| Attack::start(t, IDLE, SLOWLORIS))
            .transpose()
        {
            Ok(a) => a,
            Err(e) => {
                s.fail(label, &e.to_string());
                continue;
            }
        };
        if let Some(a) = &attack {
            let opened = poll_until(Duration::from_secs(30), || {
                (a.opened() >= (IDLE + SLOWLORIS) as u64).then_some(())
            });
            if opened.is_none() {
                s.fail(
                    label,
                    &format!("only {} hostile connections opened in 30 s", a.opened()),
                );
            }
        }
        let before = attack.as_ref().map_or(0, Attack::opened);
        let r = probe(ctx, &d, metrics);
        let connects = attack.as_ref().map_or(0, Attack::opened);
        if let Some(a) = attack {
            a.stop();
        }
        let cells = |v: &[f64], failed: usize| {
            vec![
                fmt_ms(median(v)),
                fmt_ms(quantile(v, 0.99)),
                fmt_ms(max(v)),
                failed.to_string(),
            ]
        };
        let mut row = vec![label.to_string()];
        row.extend(cells(&r.health, r.health_failed));
        row.extend(cells(&r.status, r.status_failed));
        row.push(if connects == 0 {
            "–".into()
        } else {
            format!("{connects} ({} while probing)", connects - before)
        });
        table.row(row);
        let n = ctx.p.status_runs;
        s.check(Check::new(
            &format!("`/healthz` answered, {label} held"),
            "every probe",
            format!("{}/{n}", n - r.health_failed),
            Some(r.health_failed == 0),
        ));
        s.check(Check::new(
            &format!("`clusterctl status` answered, {label} held"),
            "every probe",
            format!("{}/{n}", n - r.status_failed),
            Some(r.status_failed == 0),
        ));
        if let Some(e) = r.first_error {
            s.md(&format!("First failure with {label} held: `{e}`"));
        }
    }
    s.table(&table);
    if let Err(e) = d.stop(Duration::from_secs(30)) {
        s.fail("stopping clusterd", &e);
    }
    s
}

/// Probe latencies (ms) of the answered probes, and the failures.
struct Probes {
    health: Vec<f64>,
    health_failed: usize,
    status: Vec<f64>,
    status_failed: usize,
    first_error: Option<String>,
}

fn probe(ctx: &Ctx, d: &Daemon, metrics: SocketAddr) -> Probes {
    let mut r = Probes {
        health: Vec::new(),
        health_failed: 0,
        status: Vec::new(),
        status_failed: 0,
        first_error: None,
    };
    let n = ctx.p.status_runs.max(1);
    let start = Instant::now();
    for i in 0..n {
        // Paced: probe i starts no earlier than i/n of HOLD.
        if let Some(wait) = (HOLD * i as u32 / n as u32).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        match clusterd_bench::get(metrics, "/healthz") {
            Ok(resp) if resp.status == 200 && t.elapsed() <= PROBE_DEADLINE => {
                r.health.push(ms(t.elapsed()));
            }
            other => {
                r.health_failed += 1;
                let why = match other {
                    Ok(resp) => format!("/healthz: status {} after {:?}", resp.status, t.elapsed()),
                    Err(e) => format!("/healthz: {e}"),
                };
                r.first_error.get_or_insert(why);
            }
        }
        match d.ctl(&["status"], PROBE_DEADLINE) {
            Ok(out) if out.status.success() => r.status.push(ms(out.wall)),
            Ok(out) => {
                r.status_failed += 1;
                r.first_error
                    .get_or_insert(format!("clusterctl status: {}: {}", out.status, out.stderr));
            }
            Err(e) => {
                r.status_failed += 1;
                r.first_error
                    .get_or_insert(format!("clusterctl status: {e}"));
            }
        }
    }
    r
}
