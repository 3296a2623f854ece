//! 19. Dispatch with Node workers.
//!
//! The unmodified Express shop (`protocol = node`) under `dispatch = shared` (every worker
//! accepts from the one listening socket), `dispatch = clusterd` (clusterd accepts and passes
//! each connection on the worker's IPC channel, to the worker with fewest open) and
//! `dispatch = reuseport` (one `SO_REUSEPORT` socket per worker), keep-alive and new
//! connections: requests per second, requests per worker (max/min), p50, p99, max and
//! standard deviation of the latency, failed requests.
//!
//! Sections 15 and 17 measure the same with native workers. Node workers do not publish
//! their open connections on the scoreboard: with the shared queue, whichever worker's
//! event loop reaches `accept` first takes the connection.

use std::time::Duration;

use super::node::Install;
use super::procs::Daemon;
use super::reuseport::{BALANCE_COLUMNS, balance_row};
use super::{Ctx, Route, Section, Table, loadgen_block, mode};

const MODES: [&str; 3] = ["shared", "clusterd", "reuseport"];

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("node-dispatch");
    let p = &ctx.p;
    let workers = ctx.workers();
    let inst = match Install::new(ctx) {
        Ok(i) => i,
        Err(e) => {
            s.fail("installing the npm packages", &e);
            return s;
        }
    };
    let mut table = Table::new(&BALANCE_COLUMNS);
    // Interleaved: each load under each mode in turn, on fresh daemons.
    for keep_alive in [true, false] {
        let label = format!("{} {}", Route::Products.label(), mode(keep_alive));
        for dispatch in MODES {
            println!("  -- {label}, dispatch = {dispatch}");
            let what = format!("{label}, dispatch = {dispatch}");
            let config = format!(
                "exec = {}\nprotocol = node\nworkers = {workers}\nlisten = 127.0.0.1:0\n\
                 bake = 0\ndispatch = {dispatch}\n",
                inst.exec()
            );
            let daemon = Daemon::start(
                &ctx.clusterd(),
                &ctx.clusterctl(),
                &format!("node-dispatch-{dispatch}"),
                &config,
            )
            .and_then(|d| {
                d.wait_pool_ready(1, Duration::from_secs(60))?;
                let addr = d.addr()?;
                Ok((d, addr))
            });
            let (daemon, addr) = match daemon {
                Ok(d) => d,
                Err(e) => {
                    s.fail(&what, &e);
                    continue;
                }
            };
            // A short warm-up: V8 compiles the routes' hot paths.
            let mut warm = Route::Products.spec(addr, keep_alive);
            warm.duration = Some(Duration::from_millis(500));
            let _ = clusterd_bench::run(&warm);
            let mut spec = Route::Products.spec(addr, keep_alive);
            spec.duration = Some(p.balance_run);
            match clusterd_bench::run(&spec) {
                Ok(report) => {
                    // By `X-Worker: PID` (the bench preload's header); a worker that
                    // answered nothing counts as 0.
                    let mut counts: Vec<u64> = report.workers.values().copied().collect();
                    counts.resize(counts.len().max(workers as usize), 0);
                    counts.sort_unstable_by(|a, b| b.cmp(a));
                    let mut row = vec![label.clone(), dispatch.to_string()];
                    row.extend(balance_row(&mut s, &what, &counts, &report));
                    table.row(row);
                }
                Err(e) => s.fail(&what, &e.to_string()),
            }
            let _ = daemon.stop(Duration::from_secs(30));
        }
    }
    s.md(&format!(
        "examples/express-shop (unchanged) under clusterd, `protocol = node`, {workers} \
         workers, with each `dispatch` mode in turn, each load for {run:?} with {conns} \
         connections on a fresh daemon after a 500 ms warm-up; requests per worker by the \
         `X-Worker: PID` header of the bench preload (largest first); latency from the start \
         of a request (connect included) to its last byte. Native workers: sections 15 \
         (`clusterd` against `shared`) and 17 (`reuseport` against `shared`).\n",
        run = p.balance_run,
        conns = super::CONNECTIONS,
    ));
    s.table(&table);
    s.md(&format!(
        "Config: `exec = node -r bench/node/bench-preload.js examples/express-shop/server.js`, \
         `protocol = node`, `workers = {workers}`, `listen = 127.0.0.1:0`, `bake = 0`, \
         `dispatch = shared | clusterd | reuseport`. Loads:\n\n{}",
        loadgen_block(
            &[(Route::Products, true), (Route::Products, false)],
            p.balance_run
        )
    ));
    s
}
