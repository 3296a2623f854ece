//! 13. Dispatch: `dispatch = clusterd` against the shared queue (native shop).
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
use super::{Check, Ctx, Route, Section, Table, fmt_ms, loadgen_command, mode, ms, thousands};

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

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("dispatch");
    let p = &ctx.p;
    let workers = ctx.workers();
    let mut table = Table::new(&[
        "load",
        "dispatch",
        "requests/s",
        "p99",
        "requests per worker",
        "max/min",
        "clusterd CPU",
        "clusterd CPU per 10,000 connections",
    ]);
    let mut rates: Vec<(String, bool, f64)> = Vec::new();
    for (i, (label, extra)) in SETUPS.iter().enumerate() {
        println!("  -- dispatch: {label}");
        let daemon = ctx.ready_shop_daemon(&format!("dispatch-{i}"), &workers.to_string(), extra);
        let daemon = match daemon.and_then(|d| d.addr().map(|a| (d, a))) {
            Ok(d) => d,
            Err(e) => {
                s.fail(label, &e);
                continue;
            }
        };
        let (daemon, addr) = daemon;
        for keep_alive in [false, true] {
            let load = format!("{} {}", Route::Products.label(), mode(keep_alive));
            let mut spec = Route::Products.spec(addr, keep_alive);
            spec.duration = Some(p.balance_run);
            let before = cpu_sample(daemon.pid()).map(|c| c.ticks);
            let report = match clusterd_bench::run(&spec) {
                Ok(r) => r,
                Err(e) => {
                    s.fail(&load, &e.to_string());
                    continue;
                }
            };
            let after = cpu_sample(daemon.pid()).map(|c| c.ticks);
            let cpu = match (before, after) {
                (Some(b), Some(a)) => a.saturating_sub(b) as f64 / TICKS_PER_SEC,
                _ => f64::NAN,
            };
            let rate = report.ok as f64 / report.elapsed.as_secs_f64().max(1e-9);
            let counts = per_worker(&report, workers);
            let ratio = max_min(&counts);
            // New connections: one per request; keep-alive: the 64 of the run.
            let connections = if keep_alive {
                report.connections.values().sum::<u64>()
            } else {
                report.total
            };
            let per_10k = if !keep_alive && connections > 0 {
                fmt_ms(cpu * 1e3 * 10_000.0 / connections as f64)
            } else {
                "–".into()
            };
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
            rates.push((label.to_string(), keep_alive, rate));
            table.row(vec![
                load,
                label.to_string(),
                thousands(rate as u64),
                fmt_ms(ms(report.latency.quantile(0.99))),
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
                format!("{:.2} s", cpu),
                per_10k,
            ]);
        }
        let _ = daemon.stop(Duration::from_secs(30));
    }
    let rate = |label: &str, keep_alive: bool| {
        rates
            .iter()
            .find(|(l, k, _)| l == label && *k == keep_alive)
            .map(|r| r.2)
    };
    if let (Some(shared), Some(passed)) = (rate(SETUPS[0].0, false), rate(SETUPS[1].0, false)) {
        s.check(Check::new(
            "new connections/s through dispatch = clusterd, against shared",
            "report",
            format!("{:.0}%", 100.0 * passed / shared.max(1e-9)),
            None,
        ));
    }
    s.md(&format!(
        "clusterd with {workers} shop workers; each load runs {run:?} with {conns} \
         connections. *shared*: the default, every worker accepts from the one listening \
         socket (balanced by the scoreboard). *clusterd*: clusterd accepts each connection \
         and passes it (`SCM_RIGHTS`) to the worker holding the fewest connections. \
         *sticky = cookie:sid*: the same, after peeking at each request head (`MSG_PEEK`; \
         the load sends no cookie, so the choice is still by balance). clusterd CPU is its \
         user + system time over the run (`/proc/PID/stat`); per 10,000 connections for the \
         new-connection load, where every request is a connection clusterd passed.\n",
        run = p.balance_run,
        conns = super::CONNECTIONS,
    ));
    s.table(&table);
    let addr = ([127, 0, 0, 1], 0).into();
    let mut cmds = format!(
        "Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `listen = 127.0.0.1:0`, plus the row's `dispatch` and `sticky` lines. Loads:\n\n```sh\n"
    );
    for keep_alive in [false, true] {
        let mut spec = Route::Products.spec(addr, keep_alive);
        spec.duration = Some(p.balance_run);
        cmds.push_str(&loadgen_command(&spec));
        cmds.push('\n');
    }
    cmds.push_str("```\n");
    s.md(&cmds);
    s
}
