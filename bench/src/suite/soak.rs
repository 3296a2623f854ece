//! 7. Soak: a thousand rolling restarts under load; nothing lost, nothing leaked.

use std::time::{Duration, Instant};

use super::procs::{settled_fd_count, status_kb};
use super::{Check, Ctx, Route, Section, Table, failure_classes, mib, thousands};

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("soak");
    let restarts = ctx.p.soak_restarts;
    let daemon = ctx.ready_shop_daemon("soak", "2", "");
    let d = match daemon {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            s.check(Check::failed("soak: failed requests", "0", &e));
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
    let loads: Vec<(String, clusterd_bench::Running)> =
        [(Route::Products, true), (Route::Checkout, false)]
            .into_iter()
            .filter_map(|(route, keep_alive)| {
                let mut spec = route.spec(addr, keep_alive);
                spec.connections = 16;
                spec.duration = Some(Duration::from_secs(3600));
                let label = format!("{} {}", route.label(), super::mode(keep_alive));
                clusterd_bench::start(spec).ok().map(|r| (label, r))
            })
            .collect();

    let pid = d.pid();
    // Measured after the first restart (every lazily allocated buffer
    // exists by then) and at the end, each time once every old worker has
    // exited.
    let mut samples: Vec<(usize, Option<u64>, Option<u64>)> = Vec::new();
    let t = Instant::now();
    let mut done = 0;
    let mut error = None;
    for i in 1..=restarts {
        match d.restart(Duration::from_secs(120)) {
            Ok(_) => done = i,
            Err(e) => {
                error = Some(format!("restart {i}: {e}"));
                break;
            }
        }
        if i == 1 || i % (restarts / 4).max(1) == 0 {
            if let Err(e) = d.wait_settled(2, Duration::from_secs(60)) {
                error = Some(format!("settling after restart {i}: {e}"));
                break;
            }
            let (fds, rss) = (settled_fd_count(pid), status_kb(pid, "VmRSS"));
            samples.push((i, fds, rss));
            let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
            println!(
                "     restart {i}/{restarts}: {} fds, {} bytes RSS",
                show(fds),
                show(rss)
            );
        }
    }
    let wall = t.elapsed();
    let reports: Vec<(String, clusterd_bench::Report)> =
        loads.into_iter().map(|(l, r)| (l, r.stop())).collect();
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
    let mut growth = Table::new(&["after restart", "clusterd open fds", "clusterd RSS"]);
    for (i, fds, rss) in &samples {
        growth.row(vec![
            i.to_string(),
            fds.map_or_else(|| "?".into(), |n| n.to_string()),
            rss.map_or_else(|| "?".into(), mib),
        ]);
    }
    let first = samples.first().copied();
    // The allocator's arenas warm up over the first few hundred restarts (a separate
    // 3000-restart run stayed at the same RSS from restart 1000 to 3000), so growth is
    // judged over the second half: a leak of 256 bytes a restart shows there as 125 KiB.
    let middle = samples.iter().find(|(i, ..)| *i >= restarts / 2).copied();
    let last = samples.last().copied();
    let complete = error.is_none() && done == restarts;
    let ok_requests: u64 = reports.iter().map(|(_, r)| r.ok).sum();
    s.check(Check::new(
        &format!("soak: failed requests over {restarts} rolling restarts"),
        "0",
        format!(
            "{} failed of {} ({done} restarts in {:.0} s)",
            thousands(failed),
            thousands(reports.iter().map(|(_, r)| r.total).sum()),
            wall.as_secs_f64()
        ),
        Some(complete && failed == 0 && ok_requests > 0),
    ));
    if let (Some((_, Some(f0), Some(r0))), Some((n, Some(f1), Some(r1)))) = (first, last) {
        s.check(Check::new(
            "soak: clusterd's open fds, after restart 1 vs the last",
            "flat",
            format!("{f0} → {f1} (after restart {n})"),
            Some(f1 <= f0),
        ));
        if let Some((m, _, Some(rm))) = middle.filter(|(m, ..)| *m < n) {
            s.check(Check::new(
                "soak: clusterd's RSS over the second half",
                "flat (≤ +128 KiB)",
                format!(
                    "{} after restart {m} → {} after restart {n} ({} after restart 1)",
                    mib(rm),
                    mib(r1),
                    mib(r0)
                ),
                Some(r1 <= rm + 128 * 1024),
            ));
        }
    }
    if let Some(e) = &error {
        s.fail("soak", e);
    }
    s.md(&format!(
        "{restarts} rolling restarts (`clusterctl restart`, one after another) of 2 shop \
         workers while 16 keep-alive GET and 16 new-connection POST clients run; clusterd's \
         open fds and RSS read after restart 1 and at each quarter, once every old worker has \
         exited (fds: the fewest of five reads 20 ms apart, so that a control connection \
         clusterd has not yet seen close is not counted).\n"
    ));
    s.table(&table);
    s.table(&growth);
    s
}
