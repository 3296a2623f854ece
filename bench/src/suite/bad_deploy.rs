//! 8. Bad deploy: bake and rollback.
//!
//! A restart onto a generation that dies 300 ms after READY, under load, with the default
//! `bake` and without one; and what the bake costs a healthy restart.
//!
//! The bad generation is `examples/testworker crash-after 300` (it reports READY, serves,
//! and exits 3 300 ms later); the good one is the shop. Three loads run through the
//! restart: keep-alive `GET /products/1`, new-connection GET (what reaches a new worker
//! first), keep-alive `POST /checkout`. The time to the rollback comes from clusterd's log:
//! `restart.begin` to `restart.rolled_back`.

use std::time::Duration;

use clusterd_bench::Report;

use super::procs::Daemon;
use super::{Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, median, thousands};

/// Connections of the three loads: keep-alive GET, new-connection GET, keep-alive POST.
const LOADS: [(Route, bool, usize); 3] = [
    (Route::Products, true, 32),
    (Route::Products, false, 16),
    (Route::Checkout, true, 16),
];

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("bad-deploy");
    let workers = ctx.workers();
    let default_bake = clusterd::config::DEFAULT_BAKE;
    s.md(&format!(
        "clusterd with {workers} shop workers. A rolling restart onto `exec = \
         examples/testworker crash-after 300` (READY, then exit 3 300 ms later) under three \
         loads at once: {}. Failed requests are those the crashing workers held; the target \
         is that nothing else fails and the pool ends on the previous generation.\n",
        LOADS
            .iter()
            .map(|(r, ka, c)| format!("{c} connections of {} {}", r.label(), super::mode(*ka)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut table = Table::new(&[
        "bake",
        "restart result",
        "restart → rolled back",
        "bad workers crashed",
        "load",
        "requests",
        "failed",
        "failures by class",
    ]);
    for bake in [Some(default_bake), Some(Duration::ZERO)] {
        let label = match bake {
            Some(b) if b == default_bake => format!("{}s (default)", b.as_secs()),
            _ => "0 (off)".into(),
        };
        match bad_restart(ctx, workers, bake) {
            Ok(run) => {
                for (i, (name, r)) in run.loads.iter().enumerate() {
                    let first = i == 0;
                    table.row(vec![
                        if first { label.clone() } else { String::new() },
                        if first {
                            run.result.clone()
                        } else {
                            String::new()
                        },
                        if first {
                            fmt_ms(run.rollback_ms)
                        } else {
                            String::new()
                        },
                        if first {
                            run.crashes.to_string()
                        } else {
                            String::new()
                        },
                        name.clone(),
                        thousands(r.total),
                        thousands(r.failed()),
                        failure_classes(r),
                    ]);
                }
                if bake == Some(default_bake) {
                    let held: u64 = LOADS.iter().map(|l| l.2 as u64).sum::<u64>() * run.crashes;
                    let failed: u64 = run.loads.iter().map(|(_, r)| r.failed()).sum();
                    s.check(Check::new(
                        "bad deploy (default bake): failed requests",
                        "only what crashing workers held",
                        format!(
                            "{failed} (at most {held}: one per connection per crash); back on generation 1: {}",
                            run.back
                        ),
                        Some(failed <= held && run.back),
                    ));
                }
            }
            Err(e) => {
                s.fail(&format!("bad deploy, bake {label}"), &e);
                if bake == Some(default_bake) {
                    s.check(Check::failed(
                        "bad deploy (default bake): failed requests",
                        "only what crashing workers held",
                        &e,
                    ));
                }
            }
        }
    }
    s.table(&table);

    // What the bake costs a healthy restart.
    let mut cost = Table::new(&["bake", "restart time, median", "runs"]);
    let runs = ctx.p.bake_runs;
    let mut times = Vec::new();
    for bake in [Duration::ZERO, default_bake] {
        match healthy_restarts(ctx, workers, bake, runs) {
            Ok(ms) => {
                let m = median(&ms);
                times.push(m);
                cost.row(vec![
                    format!("{}s", bake.as_secs()),
                    fmt_ms(m),
                    ms.len().to_string(),
                ]);
            }
            Err(e) => s.fail(&format!("healthy restarts, bake {bake:?}"), &e),
        }
    }
    s.md(&format!(
        "\nA healthy rolling restart of the {workers} shop workers, with and without the \
         default bake (`clusterctl restart`, clusterd's own `elapsed_ms`): the canary and the \
         last replacement each bake {}s.\n",
        default_bake.as_secs()
    ));
    s.table(&cost);
    if let [off, on] = times[..] {
        let extra = on - off;
        let budget = 2.0 * default_bake.as_secs_f64() * 1000.0 + 1000.0;
        s.check(Check::new(
            "healthy restart: cost of the default bake",
            &format!("≤ 2 × bake + 1 s ({})", fmt_ms(budget)),
            fmt_ms(extra),
            Some(extra <= budget),
        ));
    }
    s.md(
        "\nCommands: `cargo run --release -p clusterd-bench --bin bench -- --only bad-deploy`; \
         by hand, start clusterd on the shop, run `target/release/loadgen` as in section 2, \
         set `exec = target/release/examples/testworker crash-after 300` and run \
         `clusterctl restart`.\n",
    );
    s
}

/// One bad restart's results.
struct BadRun {
    /// `rolled back`, or what happened instead.
    result: String,
    rollback_ms: f64,
    crashes: u64,
    /// Every worker runs generation 1 again.
    back: bool,
    loads: Vec<(String, Report)>,
}

fn bad_restart(ctx: &Ctx, workers: u32, bake: Option<Duration>) -> Result<BadRun, String> {
    let extra = match bake {
        Some(b) => format!("bake = {}ms", b.as_millis()),
        None => String::new(),
    };
    let daemon = ctx.ready_shop_daemon("bad-deploy", &workers.to_string(), &extra)?;
    let addr = daemon.addr()?;
    let mut running = Vec::new();
    for (route, keep_alive, connections) in LOADS {
        let mut spec = route.spec(addr, keep_alive);
        spec.connections = connections;
        spec.duration = Some(Duration::from_secs(120));
        let label = format!("{} {}", route.label(), super::mode(keep_alive));
        let load = clusterd_bench::start(spec).map_err(|e| e.to_string())?;
        running.push((label, load));
    }
    for (label, load) in &running {
        if !load.wait_for_ok(50, Duration::from_secs(15)) {
            return Err(format!(
                "{label}: requests do not flow: {}",
                load.snapshot()
            ));
        }
    }
    daemon.set_exec(&format!(
        "{} crash-after 300",
        ctx.bin("examples/testworker").display()
    ))?;
    let out = daemon.ctl(&["--json", "restart"], Duration::from_secs(120))?;
    let result = if out.stdout.contains("\"type\":\"rolled_back\"") {
        "rolled back (exit 1)".to_string()
    } else if out.stdout.contains("\"type\":\"done\"") {
        // Without a bake the restart is done before the bad workers die;
        // the automatic rollback (`rollback = auto`) then brings the
        // previous generation back.
        match daemon.wait_event("restart.rolled_back", Duration::from_secs(60), |_| true) {
            Ok(_) => "done (exit 0), then rolled back by `rollback = auto`".to_string(),
            Err(e) => format!("done (exit 0), and not rolled back: {e}"),
        }
    } else {
        format!("{}: {}", out.status, out.stderr.trim())
    };
    let status = daemon.wait_settled(workers as usize, Duration::from_secs(60));
    let back = status
        .as_ref()
        .is_ok_and(|s| s.generation == 1 && s.workers.iter().all(|w| w.generation == 1));
    // The loads run on the previous generation a moment before they stop.
    for (_, load) in &running {
        let n = load.ok_so_far() + 200;
        load.wait_for_ok(n, Duration::from_secs(10));
    }
    let loads: Vec<(String, Report)> = running.into_iter().map(|(l, r)| (l, r.stop())).collect();
    let events = daemon.events();
    let at = |event: &str| events.iter().find(|l| l.event == event).map(|l| l.ts_ms);
    let rollback_ms = match (at("restart.begin"), at("restart.rolled_back")) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64,
        _ => f64::NAN,
    };
    let crashes = events
        .iter()
        .filter(|l| l.event == "worker.crash" && l.num("generation") == Some(2))
        .count() as u64;
    let _ = daemon.stop(Duration::from_secs(30));
    Ok(BadRun {
        result,
        rollback_ms,
        crashes,
        back,
        loads,
    })
}

/// `runs` healthy restarts with `bake`; clusterd's `elapsed_ms` of each.
fn healthy_restarts(
    ctx: &Ctx,
    workers: u32,
    bake: Duration,
    runs: usize,
) -> Result<Vec<f64>, String> {
    let extra = format!("bake = {}ms", bake.as_millis());
    let daemon: Daemon = ctx.ready_shop_daemon("bake-cost", &workers.to_string(), &extra)?;
    let mut ms = Vec::new();
    for _ in 0..runs {
        let r = daemon.restart(Duration::from_secs(120))?;
        ms.push(r.elapsed_ms as f64);
    }
    let _ = daemon.stop(Duration::from_secs(30));
    Ok(ms)
}
