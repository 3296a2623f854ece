//! 4. Balance: how evenly the workers share the load at saturation.
//!
//! The `X-Worker` header of every response says which worker answered; the share of each
//! worker over one run gives max/min (target ≤ 1.10) and Jain's fairness index
//! ((Σx)² / (n·Σx²): 1 is perfectly even, 1/n is one worker doing everything).
//!
//! The library balances in two ways: the scoreboard (a worker past its fair share leaves a
//! new connection to a sibling holding fewer) and the accept limit (256 connections per worker by default). Each
//! is measured on and off. The shop takes the limit from `SHOP_INFLIGHT_LIMIT` (0 = no limit)
//! and leaves the scoreboard with `SHOP_SCOREBOARD=off`, and names both in its start-up line
//! (`in-flight limit N` or `none`, `scoreboard on` or `off`); a shop without those knobs
//! cannot be measured with them changed, and those rows say so.
//!
//! A last table scales 1 worker up under keep-alive load, with and without the scoreboard:
//! whether the clients reach the new workers.

use std::time::Duration;

use clusterd_bench::Report;

use super::{Check, Ctx, Route, Section, Table, loadgen_command, mode, thousands};

/// The loads, each run once per limit setting.
const LOADS: [(Route, bool); 3] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Cpu, true),
];

/// Jain's fairness index of `x`: 1 when all equal; 0 when empty or all zero.
pub fn jain(x: &[u64]) -> f64 {
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let squares: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    if x.is_empty() || squares == 0.0 {
        0.0
    } else {
        sum * sum / (x.len() as f64 * squares)
    }
}

/// max / min of `x` (infinite when a worker got nothing).
pub fn max_min(x: &[u64]) -> f64 {
    let max = x.iter().copied().max().unwrap_or(0) as f64;
    let min = x.iter().copied().min().unwrap_or(0) as f64;
    if min == 0.0 { f64::INFINITY } else { max / min }
}

/// Requests per worker id `1..=workers`, from a report's `X-Worker` counts.
pub fn per_worker(report: &Report, workers: u32) -> Vec<u64> {
    by_id(&report.workers, workers)
}

/// The values of `counts` for worker ids `1..=workers` (0 where missing).
fn by_id(counts: &std::collections::BTreeMap<String, u64>, workers: u32) -> Vec<u64> {
    (1..=workers)
        .map(|id| counts.get(&id.to_string()).copied().unwrap_or(0))
        .collect()
}

/// Counts joined as `a / b / c`.
fn joined(counts: &[u64]) -> String {
    counts
        .iter()
        .map(|&c| thousands(c))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// One way of running the shop for the balance section.
struct Setting {
    /// The row's label.
    label: &'static str,
    /// `SHOP_INFLIGHT_LIMIT`, or `None` for the default.
    limit: Option<usize>,
    /// Whether the shop publishes its count on the scoreboard (the default).
    scoreboard: bool,
}

const SETTINGS: [Setting; 4] = [
    Setting {
        label: "scoreboard, limit 256 (default)",
        limit: None,
        scoreboard: true,
    },
    Setting {
        label: "scoreboard, no limit",
        limit: Some(0),
        scoreboard: true,
    },
    Setting {
        label: "limit 256 only",
        limit: None,
        scoreboard: false,
    },
    Setting {
        label: "neither",
        limit: Some(0),
        scoreboard: false,
    },
];

/// Whether the shop's start-up lines show the scoreboard off when `scoreboard` is false.
/// `Err` says why not.
pub fn scoreboard_applied(lines: &[String], scoreboard: bool) -> Result<(), String> {
    if scoreboard || lines.iter().any(|l| l.contains("scoreboard off")) {
        Ok(())
    } else {
        Err("asked for SHOP_SCOREBOARD=off, the shop does not report `scoreboard off`".into())
    }
}

/// Whether the shop's start-up lines show the in-flight limit `want` (`None`: the default,
/// no knob needed). `Err` says why not.
pub fn knob_applied(lines: &[String], want: Option<usize>) -> Result<(), String> {
    let Some(want) = want else {
        return Ok(());
    };
    let named: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once("in-flight limit ").map(|(_, v)| v))
        .map(|v| v.split([' ', ',', ';', ')']).next().unwrap_or_default())
        .collect();
    if named.is_empty() {
        return Err(
            "the shop has no SHOP_INFLIGHT_LIMIT knob (no `in-flight limit` in its start-up line)"
                .into(),
        );
    }
    let ok = |v: &&str| match want {
        0 => matches!(*v, "none" | "unlimited" | "off" | "0"),
        n => *v == n.to_string(),
    };
    if named.iter().all(ok) {
        Ok(())
    } else {
        Err(format!(
            "asked for SHOP_INFLIGHT_LIMIT={want}, the shop reports in-flight limit {named:?}"
        ))
    }
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("balance");
    let p = &ctx.p;
    let workers = ctx.workers();
    let mut table = Table::new(&[
        "load",
        "balancing",
        "connections per worker",
        "requests per worker",
        "shares",
        "max/min",
        "Jain",
        "target",
    ]);
    for (i, setting) in SETTINGS.iter().enumerate() {
        let Setting {
            label: setting,
            limit,
            scoreboard,
        } = setting;
        let setting = setting.to_string();
        println!("  -- balancing: {setting}");
        let mut extra = limit.map_or(String::new(), |n| {
            format!("env = SHOP_INFLIGHT_LIMIT={n}\n")
        });
        if !scoreboard {
            extra.push_str("env = SHOP_SCOREBOARD=off\n");
        }
        let tag = format!("balance-{i}");
        let daemon = ctx
            .shop_daemon(&tag, &workers.to_string(), &extra)
            .and_then(|d| {
                d.wait_pool_ready(1, Duration::from_secs(30))?;
                knob_applied(&d.raw_lines(), *limit)?;
                scoreboard_applied(&d.raw_lines(), *scoreboard)?;
                let addr = d.addr()?;
                Ok((d, addr))
            });
        let (daemon, addr) = match daemon {
            Ok(d) => d,
            Err(e) => {
                s.fail(&format!("balancing: {setting}"), &e);
                for (route, keep_alive) in LOADS {
                    table.row(vec![
                        format!("{} {}", route.label(), mode(keep_alive)),
                        setting.clone(),
                        format!("not measured: {e}"),
                    ]);
                }
                continue;
            }
        };
        for (route, keep_alive) in LOADS {
            let label = format!("{} {}", route.label(), mode(keep_alive));
            let mut spec = route.spec(addr, keep_alive);
            spec.duration = Some(p.balance_run);
            let report = match clusterd_bench::run(&spec) {
                Ok(r) => r,
                Err(e) => {
                    s.fail(&label, &e.to_string());
                    continue;
                }
            };
            let counts = per_worker(&report, workers);
            let total: u64 = counts.iter().sum();
            let ratio = max_min(&counts);
            let fairness = jain(&counts);
            let pass = Some(total > 0 && ratio <= 1.10);
            let shares: Vec<String> = counts
                .iter()
                .map(|&c| format!("{:.1}%", 100.0 * c as f64 / total.max(1) as f64))
                .collect();
            let ratio_text = if ratio.is_finite() {
                format!("{ratio:.3}")
            } else {
                "∞ (a worker got nothing)".into()
            };
            if i == 0 {
                s.check(Check::new(
                    &format!("balance max/min, {label}"),
                    "≤ 1.10",
                    format!("{ratio_text} (Jain {fairness:.4})"),
                    pass,
                ));
            }
            if report.failed() > 0 {
                s.fail(
                    &label,
                    &format!(
                        "{} requests failed ({})",
                        report.failed(),
                        super::failure_classes(&report)
                    ),
                );
            }
            table.row(vec![
                label,
                setting.clone(),
                if keep_alive {
                    joined(&by_id(&report.connections, workers))
                } else {
                    "(one per request)".into()
                },
                joined(&counts),
                shares.join(" / "),
                ratio_text,
                format!("{fairness:.4}"),
                format!("≤ 1.10 {}", super::mark(pass)),
            ]);
        }
        let _ = daemon.stop(Duration::from_secs(30));
    }
    s.md(&format!(
        "clusterd with {workers} shop workers; each load runs {run:?} with {conns} \
         connections, counting the responses of each worker by its `X-Worker` header. With \
         keep-alive each worker serves the connections it accepted at the start for the \
         whole run, so its share follows how many it holds (*connections per worker*, by \
         the worker that answered each connection's first request) and how much CPU it \
         gets; with a \
         new connection per request, every request is won by one worker's accept. The \
         `clusterd::worker` accept loop balances in two ways. *Scoreboard*: a worker takes \
         pending connections while it holds less than its fair share (of what every worker \
         holds plus the accept queue) and past it leaves the next one to a sibling holding \
         fewer (for 2 ms at most); off is `SHOP_SCOREBOARD=off`. *Limit*: it takes a connection only while \
         the worker holds fewer than its limit (256 by default, which does not bind at \
         {conns} connections); off is `SHOP_INFLIGHT_LIMIT=0`. The target applies to the \
         default.\n",
        run = p.balance_run,
        conns = super::CONNECTIONS,
    ));
    s.table(&table);
    let addr = ([127, 0, 0, 1], 0).into();
    let mut cmds = format!(
        "Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `listen = 127.0.0.1:0`, plus `env = SHOP_INFLIGHT_LIMIT=0` (no limit) and \
         `env = SHOP_SCOREBOARD=off` (no scoreboard) as the row says. Loads:\n\n```sh\n"
    );
    for (route, keep_alive) in LOADS {
        let mut spec = route.spec(addr, keep_alive);
        spec.duration = Some(p.balance_run);
        cmds.push_str(&loadgen_command(&spec));
        cmds.push('\n');
    }
    cmds.push_str("```\n");
    s.md(&cmds);
    scale_up(ctx, &mut s);
    s
}

/// Keep-alive clients after a scale-up from 1 worker to `ctx.workers()`: with the
/// scoreboard, the worker holding every connection ends its excess after a response
/// (`Connection: close`, `InFlight::crowded`) and the clients reconnect to the new
/// workers; without it they stay where they are.
fn scale_up(ctx: &Ctx, s: &mut Section) {
    let p = &ctx.p;
    let workers = ctx.workers();
    let mut table = Table::new(&[
        "balancing",
        "connections that moved to the new workers",
        "requests per worker after the scale-up",
        "shares",
        "max/min",
        "failed",
    ]);
    for (i, scoreboard) in [true, false].into_iter().enumerate() {
        let label = if scoreboard {
            "scoreboard (default)"
        } else {
            "no scoreboard"
        };
        println!("  -- scale-up 1 -> {workers}: {label}");
        let extra = if scoreboard {
            ""
        } else {
            "env = SHOP_SCOREBOARD=off\n"
        };
        match scale_up_once(ctx, &format!("balance-scale-{i}"), extra, workers) {
            Ok((moved, counts, report)) => {
                let total: u64 = counts.iter().sum();
                let shares: Vec<String> = counts
                    .iter()
                    .map(|&c| format!("{:.1}%", 100.0 * c as f64 / total.max(1) as f64))
                    .collect();
                let ratio = max_min(&counts);
                if report.failed() > 0 {
                    s.fail(
                        &format!("scale-up, {label}"),
                        &format!(
                            "{} requests failed ({})",
                            report.failed(),
                            super::failure_classes(&report)
                        ),
                    );
                }
                table.row(vec![
                    label.into(),
                    format!("{moved} of {}", super::CONNECTIONS),
                    joined(&counts),
                    shares.join(" / "),
                    if ratio.is_finite() {
                        format!("{ratio:.3}")
                    } else {
                        "∞ (a worker got nothing)".into()
                    },
                    thousands(report.failed()),
                ]);
            }
            Err(e) => {
                s.fail(&format!("scale-up, {label}"), &e);
                table.row(vec![label.into(), format!("not measured: {e}")]);
            }
        }
    }
    s.md(&format!(
        "**After a scale-up.** clusterd with 1 shop worker under {conns} keep-alive \
         connections of `GET /products/1`; after {settle:?} `clusterctl scale {workers}`, and \
         once every worker is ready and another {settle:?} has passed, each worker's \
         responses are counted for {run:?}. A keep-alive client reconnects only when its \
         connection ends, so new workers get nothing unless the one holding every \
         connection ends some of them: with the scoreboard, the shop answers its excess \
         over a fair share (`InFlight::crowded`) with `Connection: close`, and the accept \
         loops send the reconnecting clients to the workers holding fewer. The same happens \
         to a crashed worker's replacement. *Connections that moved* counts the \
         connections whose first response came from a new worker.\n",
        conns = super::CONNECTIONS,
        settle = SCALE_SETTLE,
        run = p.balance_run,
    ));
    s.table(&table);
}

/// How long the load runs before the scale-up, and after it before counting.
const SCALE_SETTLE: Duration = Duration::from_secs(1);

/// One scale-up run: the connections that moved to the new workers, the requests per
/// worker in the counting window, and the whole run's report.
fn scale_up_once(
    ctx: &Ctx,
    tag: &str,
    extra: &str,
    workers: u32,
) -> Result<(u64, Vec<u64>, Report), String> {
    let d = ctx.ready_shop_daemon(tag, "1", extra)?;
    let mut spec = Route::Products.spec(d.addr()?, true);
    spec.duration = Some(Duration::from_secs(120));
    let running = clusterd_bench::start(spec).map_err(|e| e.to_string())?;
    std::thread::sleep(SCALE_SETTLE);
    let scaled = d
        .ctl(&["scale", &workers.to_string()], Duration::from_secs(30))
        .and_then(|out| {
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("clusterctl scale: {}: {}", out.status, out.stderr))
            }
        })
        .and_then(|()| {
            d.wait_settled(workers as usize, Duration::from_secs(30))
                .map(|_| ())
        });
    if let Err(e) = scaled {
        let _ = running.stop();
        let _ = d.stop(Duration::from_secs(30));
        return Err(e);
    }
    std::thread::sleep(SCALE_SETTLE);
    let before = per_worker(&running.snapshot(), workers);
    std::thread::sleep(ctx.p.balance_run);
    let after = per_worker(&running.snapshot(), workers);
    let report = running.stop();
    let _ = d.stop(Duration::from_secs(30));
    let moved = by_id(&report.connections, workers).iter().skip(1).sum();
    let counts = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    Ok((moved, counts, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness() {
        assert_eq!(jain(&[10, 10, 10]), 1.0);
        assert!((jain(&[1, 0]) - 0.5).abs() < 1e-9);
        assert_eq!(jain(&[]), 0.0);
        assert_eq!(max_min(&[110, 100]), 1.1);
        assert!(max_min(&[5, 0]).is_infinite());
    }

    #[test]
    fn knob() {
        let lines = |s: &str| vec![format!("shop: worker 1 gen 1 listening on http=x, {s}")];
        assert!(knob_applied(&lines("whatever"), None).is_ok());
        assert!(
            knob_applied(&lines("no knob"), Some(0))
                .unwrap_err()
                .contains("no SHOP_INFLIGHT_LIMIT knob")
        );
        assert!(knob_applied(&lines("in-flight limit none"), Some(0)).is_ok());
        assert!(knob_applied(&lines("in-flight limit 32"), Some(32)).is_ok());
        assert!(knob_applied(&lines("in-flight limit 256"), Some(32)).is_err());
        assert!(scoreboard_applied(&lines("scoreboard on"), true).is_ok());
        assert!(scoreboard_applied(&lines("scoreboard on"), false).is_err());
        assert!(scoreboard_applied(&lines("in-flight limit 0, scoreboard off"), false).is_ok());
    }

    #[test]
    fn counts_by_worker_id() {
        let mut r = Report::default();
        r.workers.insert("2".into(), 5);
        r.workers.insert("9".into(), 1);
        assert_eq!(per_worker(&r, 3), vec![0, 5, 0]);
    }
}
