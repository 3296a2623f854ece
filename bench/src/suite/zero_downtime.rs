//! 2. Zero-downtime: rolling restarts, one after another, under saturating load.
//!
//! For each of GET and POST × keep-alive and new connection: start the load, let it flow,
//! run `clusterctl restart` N times (each waits for the restart's result; a short pause
//! between two), wait until the replaced workers have drained and exited, let the load run
//! on the new workers a moment, stop it. Every request counts, and the target is 0 failed.

use std::time::{Duration, Instant};

use clusterd_bench::Report;

use super::procs::{Daemon, Restart};
use super::{
    Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, loadgen_command, max, median, mode,
    ms, thousands,
};

/// The four loads.
const ROWS: [(Route, bool); 4] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Checkout, true),
    (Route::Checkout, false),
];

/// What one row measured.
struct Row {
    report: Report,
    restarts: Vec<Restart>,
    /// Why the row stopped early, if it did.
    error: Option<String>,
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("zero-downtime");
    let p = &ctx.p;
    let workers = ctx.workers();
    let daemon = ctx.ready_shop_daemon("zero-downtime", &workers.to_string(), "");
    let daemon = match daemon {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            for (route, keep_alive) in ROWS {
                s.checks.push(Check::failed(
                    &format!("failed requests, {} {}", route.label(), mode(keep_alive)),
                    "0",
                    "clusterd did not start",
                ));
            }
            return s;
        }
    };
    let mut table = Table::new(&[
        "load",
        "restarts",
        "workers replaced",
        "requests",
        "failed",
        "failures by class",
        "GET retries¹",
        "replacement spawn→ready, median (max)",
        "restart time per worker: clusterd (clusterctl)",
        "target",
    ]);
    let mut samples = String::new();
    for (route, keep_alive) in ROWS {
        let label = format!("{} {}", route.label(), mode(keep_alive));
        println!("  -- {label}");
        let what = format!("failed requests, {label}");
        let row = match one_row(ctx, &daemon, route, keep_alive) {
            Ok(row) => row,
            Err(e) => {
                s.fail(&label, &e);
                s.check(Check::failed(&what, "0", &e));
                table.row(vec![label, "failed".into()]);
                continue;
            }
        };
        let r = &row.report;
        samples.push_str(&super::error_samples(&label, r));
        let steps: Vec<f64> = row
            .restarts
            .iter()
            .flat_map(|x| x.steps_ms.iter().map(|&v| v as f64))
            .collect();
        let replaced: u64 = row.restarts.iter().map(|x| x.replaced).sum();
        let wall: Duration = row.restarts.iter().map(|x| x.wall).sum();
        let clusterd_ms: u64 = row.restarts.iter().map(|x| x.elapsed_ms).sum();
        let per_worker = if replaced > 0 {
            format!(
                "{} ({})",
                fmt_ms(clusterd_ms as f64 / replaced as f64),
                fmt_ms(ms(wall) / replaced as f64)
            )
        } else {
            "–".into()
        };
        let complete = row.error.is_none() && row.restarts.len() == p.restarts;
        let pass = Some(r.failed() == 0 && complete && r.ok > 0);
        let mut measured = format!(
            "{} failed of {} ({} restarts)",
            thousands(r.failed()),
            thousands(r.total),
            row.restarts.len()
        );
        if let Some(e) = &row.error {
            s.fail(&label, e);
            measured.push_str(&format!("; stopped early: {e}"));
        }
        s.check(Check::new(&what, "0", measured, pass));
        table.row(vec![
            label,
            format!("{}/{}", row.restarts.len(), p.restarts),
            replaced.to_string(),
            thousands(r.total),
            thousands(r.failed()),
            failure_classes(r),
            thousands(r.retried),
            format!("{} ({})", fmt_ms(median(&steps)), fmt_ms(max(&steps))),
            per_worker,
            format!("0 {}", super::mark(pass)),
        ]);
    }
    let events = daemon.events();
    let count = |event: &str| events.iter().filter(|l| l.event == event).count();
    let (crashes, kills) = (count("worker.crash"), count("worker.kill"));
    let _ = daemon.stop(Duration::from_secs(30));

    s.md(&format!(
        "clusterd with {workers} shop workers. For each load: {conns} connections start, and \
         once requests flow, {n} rolling restarts run one after another (`clusterctl restart`, \
         which returns when the restart is done; {gap:?} between two). Then the suite waits \
         until the replaced workers have drained and exited (`status` shows exactly \
         {workers} ready workers), lets the load run on, and stops it; every request of the \
         whole run counts. *Replacement spawn→ready* is clusterd's figure per replaced \
         worker (`restart.progress took_ms`: the old worker is told to drain only then); \
         *restart time per worker* is a whole restart divided by the workers it replaced, \
         by clusterd's own clock (`restart.done took_ms`) and, in brackets, by the wall time \
         of the `clusterctl restart` process (exec and connect included, competing for the \
         CPUs with the load). During this section clusterd logged {crashes} \
         `worker.crash` and {kills} `worker.kill` (drain timeout) lines.\n",
        conns = super::CONNECTIONS,
        n = p.restarts,
        gap = p.restart_gap,
    ));
    s.table(&table);
    if !samples.is_empty() {
        s.md(&format!("Errors the load generator saw:\n\n{samples}\n"));
    }
    let addr = ([127, 0, 0, 1], 0).into();
    let mut cmds = format!(
        "¹ A keep-alive GET whose reused connection the server closed before any byte of the \
         response (a drained worker closing an idle connection as the next request was on \
         its way) is retried once on a new connection, as browsers and Go's `net/http` do; \
         only the retry's outcome counts. POSTs are never retried.\n\n\
         Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `listen = 127.0.0.1:0`. Loads (each runs until stopped) and restarts:\n\n```sh\n"
    );
    for (route, keep_alive) in ROWS {
        cmds.push_str(&loadgen_command(&route.spec(addr, keep_alive)));
        cmds.push_str(" -d 10m &\n");
    }
    cmds.push_str("target/release/clusterctl -c zero-downtime.conf --json restart   # × N\n```\n");
    s.md(&cmds);
    s
}

fn one_row(ctx: &Ctx, daemon: &Daemon, route: Route, keep_alive: bool) -> Result<Row, String> {
    let p = &ctx.p;
    let addr = daemon.addr()?;
    let mut spec = route.spec(addr, keep_alive);
    // A bound in case everything else goes wrong; the row stops the load itself.
    spec.duration = Some(Duration::from_secs(600));
    let load = clusterd_bench::start(spec).map_err(|e| format!("cannot start the load: {e}"))?;
    if !load.wait_for_ok(100, Duration::from_secs(15)) {
        return Err(format!("the load never got going:\n{}", load.stop()));
    }
    std::thread::sleep(p.restart_gap);
    let mut restarts = Vec::new();
    let mut error = None;
    let started = Instant::now();
    for i in 0..p.restarts {
        match daemon.restart(Duration::from_secs(120)) {
            Ok(r) => {
                println!(
                    "     restart {}/{}: {} workers in {} (steps {:?} ms); load ok so far {}",
                    i + 1,
                    p.restarts,
                    r.replaced,
                    fmt_ms(ms(r.wall)),
                    r.steps_ms,
                    load.ok_so_far()
                );
                restarts.push(r);
            }
            Err(e) => {
                error = Some(format!("restart {}: {e}", i + 1));
                break;
            }
        }
        std::thread::sleep(p.restart_gap);
    }
    if let Err(e) = daemon.wait_settled(ctx.workers() as usize, Duration::from_secs(60)) {
        error.get_or_insert(e);
    }
    // The load goes on a moment on the new workers only.
    std::thread::sleep(p.restart_gap);
    let report = load.stop();
    println!(
        "     {} requests, {} failed ({}) over {:.1} s of restarts",
        report.total,
        report.failed(),
        failure_classes(&report),
        started.elapsed().as_secs_f64()
    );
    Ok(Row {
        report,
        restarts,
        error,
    })
}
