//! 17. Dispatch: shared queue or reuseport.
//!
//! The shared queue (`dispatch = shared`, every worker accepts from one listening socket, the scoreboard balancing native workers) against `dispatch =
//! reuseport` (one `SO_REUSEPORT` socket per worker, the kernel hashing each new connection
//! to one of them): balance (requests per worker, max/min) and latency (p50, p99, max,
//! standard deviation), native shop, keep-alive and new connections, and the CPU-bound
//! route where a worker's queue waits behind its slow requests.

use std::time::Duration;

use super::balance::{max_min, per_worker};
use clusterd_bench::Report;

use super::{Ctx, Route, Section, Table, fmt_ms, loadgen_block, mode, ms, thousands};

/// The loads, each run under both dispatch modes.
const LOADS: [(Route, bool); 4] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Cpu, true),
    (Route::Cpu, false),
];

const MODES: [&str; 2] = ["shared", "reuseport"];

/// The columns of a table of [`balance_row`]s.
pub(super) const BALANCE_COLUMNS: [&str; 10] = [
    "load",
    "dispatch",
    "requests/s",
    "requests per worker",
    "max/min",
    "p50",
    "p99",
    "max",
    "stdev",
    "failed",
];

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("reuseport");
    let p = &ctx.p;
    let workers = ctx.workers();
    let mut table = Table::new(&BALANCE_COLUMNS);
    // Interleaved: each load under one mode, then the other, on fresh daemons.
    for (route, keep_alive) in LOADS {
        let label = format!("{} {}", route.label(), mode(keep_alive));
        for dispatch in MODES {
            println!("  -- {label}, dispatch = {dispatch}");
            let extra = format!("dispatch = {dispatch}\n");
            let tag = format!("reuseport-{dispatch}");
            let daemon = ctx
                .ready_shop_daemon(&tag, &workers.to_string(), &extra)
                .and_then(|d| {
                    let addr = d.addr()?;
                    Ok((d, addr))
                });
            let (daemon, addr) = match daemon {
                Ok(d) => d,
                Err(e) => {
                    s.fail(&format!("{label}, dispatch = {dispatch}"), &e);
                    continue;
                }
            };
            let mut spec = route.spec(addr, keep_alive);
            spec.duration = Some(p.balance_run);
            match clusterd_bench::run(&spec) {
                Ok(report) => {
                    let counts = per_worker(&report, workers);
                    let what = format!("{label}, dispatch = {dispatch}");
                    let mut row = vec![label.clone(), dispatch.to_string()];
                    row.extend(balance_row(&mut s, &what, &counts, &report));
                    table.row(row);
                }
                Err(e) => s.fail(&format!("{label}, dispatch = {dispatch}"), &e.to_string()),
            }
            let _ = daemon.stop(Duration::from_secs(30));
        }
    }
    s.md(&format!(
        "clusterd with {workers} shop workers, `dispatch = shared` (one accept queue, the \
         scoreboard on) and `dispatch = reuseport` (one `SO_REUSEPORT` queue per worker) in \
         turn, each load for {run:?} with {conns} connections on a fresh daemon; requests per \
         worker by the `X-Worker` header; latency from the start of a request (connect \
         included) to its last byte. With reuseport the kernel picks a worker's queue by a \
         hash of the connection's addresses, whatever that worker is doing: a worker busy \
         with slow requests keeps receiving its share, and the connections in its queue wait \
         while other workers idle, which shows in p99, max and stdev. For scale, the figures \
         published for 12 nginx workers: shared queue max 72.65 ms, stdev 1.58 ms; reuseport \
         max 144.55 ms, stdev 25.27 ms.\n",
        run = p.balance_run,
        conns = super::CONNECTIONS,
    ));
    s.table(&table);
    s.md(&format!(
        "Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `listen = 127.0.0.1:0`, `dispatch = shared` or `dispatch = reuseport`. Loads:\n\n{}",
        loadgen_block(&LOADS, p.balance_run)
    ));
    s
}

/// The columns of a balance-and-latency row after its load and dispatch mode: requests/s,
/// requests per worker (`counts`), max/min, p50, p99, max, stdev and failed requests; failed
/// requests are also recorded in `s` as a failure of `what`.
pub(super) fn balance_row(
    s: &mut Section,
    what: &str,
    counts: &[u64],
    report: &Report,
) -> Vec<String> {
    if report.failed() > 0 {
        s.fail(
            what,
            &format!(
                "{} requests failed ({})",
                report.failed(),
                super::failure_classes(report)
            ),
        );
    }
    let ratio = max_min(counts);
    let joined: Vec<String> = counts.iter().map(|&c| thousands(c)).collect();
    vec![
        format!("{:.0}", report.requests_per_sec()),
        joined.join(" / "),
        if ratio.is_finite() {
            format!("{ratio:.2}")
        } else {
            "∞ (a worker got nothing)".into()
        },
        fmt_ms(ms(report.p50())),
        fmt_ms(ms(report.p99())),
        fmt_ms(ms(report.max_latency())),
        fmt_ms(ms(report.latency.stdev())),
        thousands(report.failed()),
    ]
}
