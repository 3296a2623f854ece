//! 18. Upgrade: clusterd replaced in place.
//!
//! clusterd replaces its own program in place (`clusterctl upgrade`), under load, a hundred
//! times: nothing lost, no worker replaced, nothing leaked.

use std::time::{Duration, Instant};

use clusterd::proto::{Request, Response};

use super::procs::{poll_until, raw_request, settled_fd_count, status_kb};
use super::{
    Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, max, median, mib, quantile,
    thousands,
};

/// Connections of each of the four loads.
const CONNECTIONS: usize = 16;

/// The worker pids, sorted.
fn worker_pids(status: &clusterd::proto::Status) -> Vec<u32> {
    let mut pids: Vec<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
    pids.sort_unstable();
    pids
}

/// One upgrade over the control socket: the time from sending `Upgrade` to the first
/// `Status` the new image answers, in ms.
fn upgrade_once(control: &std::path::Path) -> Result<f64, String> {
    let t = Instant::now();
    let before = match raw_request(control, &Request::Upgrade { binary: None })? {
        Response::Upgrading(u) => u.upgrades,
        other => return Err(format!("unexpected reply to Upgrade: {other:?}")),
    };
    poll_until(Duration::from_secs(30), || {
        match raw_request(control, &Request::Status) {
            Ok(Response::Status(s)) if s.upgrades > before => Some(()),
            _ => {
                std::thread::sleep(Duration::from_micros(200));
                None
            }
        }
    })
    .ok_or("the new image did not answer within 30 s")?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("upgrade");
    let upgrades = ctx.p.upgrades;
    let workers = ctx.workers();
    let d = match ctx.ready_shop_daemon("upgrade", &workers.to_string(), "") {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            s.check(Check::failed("upgrade: failed requests", "0", &e));
            return s;
        }
    };
    let addr = match d.addr() {
        Ok(a) => a,
        Err(e) => {
            s.fail("address", &e);
            return s;
        }
    };
    let pid = d.pid();
    let before = match d.status() {
        Ok(st) => st,
        Err(e) => {
            s.fail("status", &e);
            return s;
        }
    };
    let (fds0, rss0) = (settled_fd_count(pid), status_kb(pid, "VmRSS"));
    let loads: Vec<(String, clusterd_bench::Running)> = [
        (Route::Products, true),
        (Route::Products, false),
        (Route::Checkout, true),
        (Route::Checkout, false),
    ]
    .into_iter()
    .filter_map(|(route, keep_alive)| {
        let mut spec = route.spec(addr, keep_alive);
        spec.connections = CONNECTIONS;
        spec.duration = Some(Duration::from_secs(3600));
        let label = format!("{} {}", route.label(), super::mode(keep_alive));
        clusterd_bench::start(spec).ok().map(|r| (label, r))
    })
    .collect();
    for (label, l) in &loads {
        if !l.wait_for_ok(50, Duration::from_secs(15)) {
            s.fail("starting the load", &format!("{label}: {}", l.snapshot()));
        }
    }

    let mut times = Vec::new();
    let mut samples: Vec<(usize, Option<u64>, Option<u64>)> = vec![(0, fds0, rss0)];
    let mut error = None;
    let t = Instant::now();
    for i in 1..=upgrades {
        match upgrade_once(&d.control) {
            Ok(ms) => times.push(ms),
            Err(e) => {
                error = Some(format!("upgrade {i}: {e}"));
                break;
            }
        }
        if i == 1 || i % (upgrades / 4).max(1) == 0 {
            let (fds, rss) = (settled_fd_count(pid), status_kb(pid, "VmRSS"));
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
            println!(
                "     upgrade {i}/{upgrades}: {}, {} fds, {} bytes RSS",
                fmt_ms(*times.last().unwrap_or(&0.0)),
                show(fds),
                show(rss)
            );
            samples.push((i, fds, rss));
        }
    }
    let wall = t.elapsed();
    let reports: Vec<(String, clusterd_bench::Report)> =
        loads.into_iter().map(|(l, r)| (l, r.stop())).collect();
    let after = d.status();
    let took: Vec<f64> = d
        .events()
        .iter()
        .filter(|l| l.event == "upgrade.done")
        .filter_map(|l| l.num("took_ms"))
        .map(|v| v as f64)
        .collect();
    let _ = d.stop(Duration::from_secs(30));

    let mut table = Table::new(&["load", "requests", "failed", "failures by class"]);
    let mut failed = 0;
    for (label, r) in &reports {
        failed += r.failed();
        table.row(vec![
            label.clone(),
            thousands(r.total),
            thousands(r.failed()),
            failure_classes(r),
        ]);
    }
    let done = times.len();
    let complete = error.is_none() && done == upgrades;
    let ok_requests: u64 = reports.iter().map(|(_, r)| r.ok).sum();
    s.check(Check::new(
        &format!("upgrade: failed requests over {upgrades} upgrades"),
        "0",
        format!(
            "{} failed of {} ({done} upgrades in {:.1} s)",
            thousands(failed),
            thousands(reports.iter().map(|(_, r)| r.total).sum()),
            wall.as_secs_f64()
        ),
        Some(complete && failed == 0 && ok_requests > 0),
    ));
    match &after {
        Ok(st) => s.check(Check::new(
            "upgrade: workers replaced",
            "0 (the same pids)",
            if worker_pids(st) == worker_pids(&before) {
                format!("0 ({} workers, the same pids)", st.workers.len())
            } else {
                format!("{:?} → {:?}", worker_pids(&before), worker_pids(st))
            },
            Some(worker_pids(st) == worker_pids(&before) && st.upgrades as usize == done),
        )),
        Err(e) => s.check(Check::failed("upgrade: workers replaced", "0", e)),
    }
    if !times.is_empty() {
        s.check(Check::new(
            "upgrade: request → the new image answers status (median)",
            "≤ 50 ms",
            format!(
                "{} (p99 {}, max {})",
                fmt_ms(median(&times)),
                fmt_ms(quantile(&times, 0.99)),
                fmt_ms(max(&times))
            ),
            Some(median(&times) <= 50.0),
        ));
    }
    let mut timing = Table::new(&["time", "median", "p99", "max", "upgrades"]);
    timing.row(vec![
        "`Upgrade` sent → first status from the new image".into(),
        fmt_ms(median(&times)),
        fmt_ms(quantile(&times, 0.99)),
        fmt_ms(max(&times)),
        times.len().to_string(),
    ]);
    timing.row(vec![
        "clusterd's own `took_ms` (request → the new image running, exec included)".into(),
        fmt_ms(median(&took)),
        fmt_ms(quantile(&took, 0.99)),
        fmt_ms(max(&took)),
        took.len().to_string(),
    ]);
    let mut growth = Table::new(&["after upgrade", "clusterd open fds", "clusterd RSS"]);
    for (i, fds, rss) in &samples {
        growth.row(vec![
            i.to_string(),
            fds.map_or_else(|| "?".into(), |n| n.to_string()),
            rss.map_or_else(|| "?".into(), mib),
        ]);
    }
    // Each upgrade starts a fresh image, so the figure after upgrade N is that image's, not
    // an accumulation: compared with the one before any upgrade. (What does carry over and
    // grow is bounded: the log kept for `clusterctl logs`, at most `log_buffer`.)
    if let (Some((_, Some(f0), Some(r0))), Some((n, Some(f1), Some(r1)))) =
        (samples.first().copied(), samples.last().copied())
    {
        s.check(Check::new(
            "upgrade: clusterd's open fds, before any upgrade vs after the last",
            "flat",
            format!("{f0} → {f1} (after upgrade {n})"),
            Some(f1 <= f0),
        ));
        s.check(Check::new(
            "upgrade: clusterd's RSS, before any upgrade vs after the last",
            "flat (≤ +128 KiB)",
            format!("{} → {} (after upgrade {n})", mib(r0), mib(r1)),
            Some(r1 <= r0 + 128 * 1024),
        ));
    }
    if let Some(e) = &error {
        s.fail("upgrade", e);
    }
    s.md(&format!(
        "clusterd with {workers} shop workers, upgraded in place {upgrades} times in a row (the \
         `Upgrade` control request, as `clusterctl upgrade` sends it, to the same binary) while \
         four loads of {CONNECTIONS} connections each run: keep-alive and new-connection \
         `GET /products/1` and `POST /checkout`. Each upgrade is timed from sending the request \
         to the first `status` the new image answers (polled over new control connections). \
         clusterd's open fds and RSS are read before the first upgrade, after it and at each \
         quarter (fds: the fewest of five reads 20 ms apart); each upgrade starts a fresh \
         image, so the last figures are compared with those before any upgrade.\n"
    ));
    s.table(&timing);
    s.table(&table);
    s.table(&growth);
    s
}
