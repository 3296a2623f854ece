//! 6. Scale: 64 workers started, restarted and stopped; clusterd's peak memory.

use std::time::{Duration, Instant};

use super::procs::{alive, poll_until, status_kb};
use super::{Ctx, Section, Table, fmt_ms, mib, ms};

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("scale");
    let n = ctx.p.scale_workers;
    let mut table = Table::new(&["phase", "wall time", "notes"]);
    let mut peak = 0u64;
    let d = match ctx.shop_daemon("scale", &n.to_string(), "") {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            return s;
        }
    };
    let pid = d.pid();
    let sample = |peak: &mut u64| {
        if let Some(hwm) = status_kb(pid, "VmHWM") {
            *peak = (*peak).max(hwm);
        }
    };

    // Start: spawn → pool.ready.
    match d.wait_pool_ready(1, Duration::from_secs(120)) {
        Ok(line) => {
            let wall = d.spawned.elapsed();
            let started = d
                .events()
                .iter()
                .find(|l| l.event == "started")
                .map(|l| l.ts_ms);
            let logged = started.map_or_else(String::new, |t| {
                format!(
                    "clusterd's log: `started` → `pool.ready` {} ms",
                    line.ts_ms.saturating_sub(t)
                )
            });
            table.row(vec![
                format!("start {n} workers (spawn clusterd → all ready)"),
                fmt_ms(ms(wall)),
                logged,
            ]);
        }
        Err(e) => {
            s.fail("start", &e);
            let _ = d.stop(Duration::from_secs(60));
            return s;
        }
    }
    sample(&mut peak);
    let rss_ready = status_kb(pid, "VmRSS");

    // Rolling restart, then until the old workers have exited.
    let t = Instant::now();
    match d.restart(Duration::from_secs(300)) {
        Ok(r) => {
            let done = t.elapsed();
            let settled = d.wait_settled(n as usize, Duration::from_secs(120));
            let all = t.elapsed();
            sample(&mut peak);
            let steps: Vec<f64> = r.steps_ms.iter().map(|&v| v as f64).collect();
            table.row(vec![
                format!("rolling restart of {n} (`clusterctl restart`)"),
                fmt_ms(ms(done)),
                format!(
                    "{} replaced; per worker {} (spawn→ready median {}); until every old worker \
                     had exited {}",
                    r.replaced,
                    fmt_ms(ms(done) / r.replaced.max(1) as f64),
                    fmt_ms(super::median(&steps)),
                    if settled.is_ok() {
                        fmt_ms(ms(all))
                    } else {
                        "not reached".into()
                    }
                ),
            ]);
            if let Err(e) = settled {
                s.fail("settling after the restart", &e);
            }
        }
        Err(e) => s.fail("restart", &e),
    }

    // Graceful stop: `clusterctl stop` → clusterd has exited, every worker gone.
    let workers: Vec<u32> = d
        .status()
        .map(|st| st.workers.iter().filter_map(|w| w.pid).collect())
        .unwrap_or_default();
    sample(&mut peak);
    let t = Instant::now();
    match d.ctl(&["stop"], Duration::from_secs(30)) {
        Ok(out) if out.status.success() => {
            let exited = poll_until(Duration::from_secs(120), || {
                sample(&mut peak);
                d.exited()
            });
            let wall = t.elapsed();
            let left = workers.iter().filter(|&&p| alive(p)).count();
            match exited {
                Some(status) => table.row(vec![
                    format!("stop {n} (`clusterctl stop` → clusterd exited)"),
                    fmt_ms(ms(wall)),
                    format!(
                        "{status}; {left} of {} workers still alive after",
                        workers.len()
                    ),
                ]),
                None => s.fail("stop", "clusterd did not exit within 120 s"),
            }
        }
        Ok(out) => s.fail(
            "stop",
            &format!("clusterctl stop: {} {}", out.status, out.stderr),
        ),
        Err(e) => s.fail("stop", &e),
    }
    let _ = d.stop(Duration::from_secs(30));
    table.row(vec![
        "clusterd peak RSS (VmHWM)".into(),
        String::new(),
        format!(
            "{} (VmRSS once all {n} were ready: {})",
            mib(peak),
            rss_ready.map_or_else(|| "unknown".into(), mib)
        ),
    ]);
    s.md(&format!(
        "clusterd with {n} shop workers (`workers = {n}`) on a {cpus}-CPU machine: the time \
         from spawning clusterd to its `pool.ready` line, a rolling restart \
         (`clusterctl restart`, one worker at a time), and a graceful stop \
         (`clusterctl stop`, waiting for clusterd to exit). The peak is the highest \
         `VmHWM` of clusterd read along the way (the last reading is just before it \
         exits).\n",
        cpus = ctx.cpus
    ));
    s.table(&table);
    s
}
