//! 15. Dispatch: `dispatch = clusterd` against the shared queue (native shop).
//!
//! The same loads against the same shop workers, once with the default `dispatch =
//! shared` (every worker accepts from the one listening socket) and once with `dispatch =
//! clusterd` (clusterd accepts, and passes each connection to the worker holding fewest),
//! then with `sticky = cookie:sid` (every head is peeked at; the load sends no cookie, so
//! the connections still go by balance: this is the cost of peeking). For each: requests
//! per second (with a new connection per request: new connections per second), p99
//! latency, the split of the requests among the workers (max/min), and clusterd's own CPU
//! time per 10,000 connections it passed.

use std::time::Duration;

use super::balance::{max_min, per_worker};
use super::procs::cpu_sample;
use super::{
    Check, Ctx, Route, Section, Table, fmt_ms, loadgen_block, median, mode, ms, thousands,
};

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

const SETUPS: [(&str, &str); 3] = [
    ("shared (default)", ""),
    ("clusterd", "dispatch = clusterd\n"),
    (
        "clusterd, sticky = cookie:sid",
        "dispatch = clusterd\nsticky = cookie:sid\n",
    ),
];

/// One measured run of one load against one setup.
struct Run {
    rate: f64,
    p99_ms: f64,
    counts: Vec<u64>,
    cpu_secs: f64,
    connections: u64,
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("dispatch");
    let p = &ctx.p;
    let workers = ctx.workers();
    let reps = p.overhead_reps.clamp(1, 3);
    let mut table = Table::new(&[
        "load",
        "dispatch",
        "requests/s (median)",
        "p99 (median)",
        "requests per worker (all runs)",
        "max/min",
        "clusterd CPU per 10,000 connections",
    ]);
    // Every setup runs at once (idle between its loads), and the loads take turns, so
    // that the noise of a shared machine falls on all of them alike.
    let mut daemons = Vec::new();
    for (i, (label, extra)) in SETUPS.iter().enumerate() {
        let daemon = ctx
            .ready_shop_daemon(&format!("dispatch-{i}"), &workers.to_string(), extra)
            .and_then(|d| d.addr().map(|a| (d, a)));
        match daemon {
            Ok(d) => daemons.push(Some(d)),
            Err(e) => {
                s.fail(label, &e);
                daemons.push(None);
            }
        }
    }
    let mut runs: Vec<Vec<Run>> = (0..SETUPS.len() * 2).map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for (i, (label, _)) in SETUPS.iter().enumerate() {
            let Some((daemon, addr)) = &daemons[i] else {
                continue;
            };
            for (k, keep_alive) in [false, true].into_iter().enumerate() {
                let load = format!("{} {}", Route::Products.label(), mode(keep_alive));
                println!("  -- {label}, {load}, run {}/{reps}", rep + 1);
                let mut spec = Route::Products.spec(*addr, keep_alive);
                spec.duration = Some(p.balance_run);
                let before = cpu_sample(daemon.pid()).map(|c| c.ticks);
                let report = match clusterd_bench::run(&spec) {
                    Ok(r) => r,
                    Err(e) => {
                        s.fail(&format!("{load}, {label}"), &e.to_string());
                        continue;
                    }
                };
                let after = cpu_sample(daemon.pid()).map(|c| c.ticks);
                if report.failed() > 0 {
                    s.fail(
                        &format!("{load}, {label}"),
                        &format!(
                            "{} requests failed ({})",
                            report.failed(),
                            super::failure_classes(&report)
                        ),
                    );
                }
                runs[i * 2 + k].push(Run {
                    rate: report.ok as f64 / report.elapsed.as_secs_f64().max(1e-9),
                    p99_ms: ms(report.latency.quantile(0.99)),
                    counts: per_worker(&report, workers),
                    cpu_secs: match (before, after) {
                        (Some(b), Some(a)) => a.saturating_sub(b) as f64 / TICKS_PER_SEC,
                        _ => f64::NAN,
                    },
                    // New connections: one per request; keep-alive: the run's 64.
                    connections: if keep_alive {
                        report.connections.values().sum::<u64>()
                    } else {
                        report.total
                    },
                });
            }
        }
    }
    for (i, (label, _)) in SETUPS.iter().enumerate() {
        for (k, keep_alive) in [false, true].into_iter().enumerate() {
            let r = &runs[i * 2 + k];
            if r.is_empty() {
                continue;
            }
            let rates: Vec<f64> = r.iter().map(|r| r.rate).collect();
            let p99s: Vec<f64> = r.iter().map(|r| r.p99_ms).collect();
            let mut counts = vec![0u64; workers as usize];
            for run in r {
                for (c, n) in counts.iter_mut().zip(&run.counts) {
                    *c += n;
                }
            }
            let cpu: f64 = r.iter().map(|r| r.cpu_secs).sum();
            let connections: u64 = r.iter().map(|r| r.connections).sum();
            let ratio = max_min(&counts);
            table.row(vec![
                format!("{} {}", Route::Products.label(), mode(keep_alive)),
                label.to_string(),
                thousands(median(&rates) as u64),
                fmt_ms(median(&p99s)),
                counts
                    .iter()
                    .map(|&c| thousands(c))
                    .collect::<Vec<_>>()
                    .join(" / "),
                if ratio.is_finite() {
                    format!("{ratio:.3}")
                } else {
                    "∞".into()
                },
                if !keep_alive && connections > 0 {
                    fmt_ms(cpu * 1e3 * 10_000.0 / connections as f64)
                } else {
                    format!("– ({cpu:.2} s in all)")
                },
            ]);
        }
    }
    for (daemon, _) in daemons.into_iter().flatten() {
        let _ = daemon.stop(Duration::from_secs(30));
    }
    let rate = |i: usize| {
        let r: Vec<f64> = runs[i * 2].iter().map(|r| r.rate).collect();
        (!r.is_empty()).then(|| median(&r))
    };
    if let (Some(shared), Some(passed)) = (rate(0), rate(1)) {
        s.check(Check::new(
            "new connections/s through dispatch = clusterd, against shared",
            "report",
            format!("{:.0}%", 100.0 * passed / shared.max(1e-9)),
            None,
        ));
    }
    s.md(&format!(
        "clusterd with {workers} shop workers per setup; each load runs {run:?} with \
         {conns} connections, {reps} times, the setups and loads taking turns (all three \
         clusterds run at once, idle but for the load of the moment). *shared*: the default, every worker accepts from the one listening \
         socket (balanced by the scoreboard). *clusterd*: clusterd accepts each connection \
         and passes it (`SCM_RIGHTS`) to the worker holding the fewest connections. \
         *sticky = cookie:sid*: the same, after peeking at each request head (`MSG_PEEK`; \
         the load sends no cookie, so the choice is still by balance). clusterd CPU is its \
         user + system time over the run (`/proc/PID/stat`); per 10,000 connections for the \
         new-connection load, where every request is a connection clusterd passed.\n",
        run = p.balance_run,
        conns = super::CONNECTIONS,
        reps = reps,
    ));
    s.table(&table);
    s.md(&format!(
        "Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `listen = 127.0.0.1:0`, plus the row's `dispatch` and `sticky` lines. Loads:\n\n{}",
        loadgen_block(
            &[(Route::Products, false), (Route::Products, true)],
            p.balance_run
        )
    ));
    s
}
