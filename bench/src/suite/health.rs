//! 13. Worker health: hung, leaking and aging workers replaced under load.
//!
//! - Watchdog: testworker with `--hang-when PATH` (its executor blocks for good once PATH
//!   holds its pid) under `watchdog = 1s`. The suite writes a worker's pid to PATH and times,
//!   on the wall clock clusterd stamps its log with: the trigger to `worker.hung`
//!   (detection), to the replacement's `worker.ready`, to `worker.signal` (the diagnostic
//!   signal, sent once the replacement is ready) and until the hung worker is gone.
//! - max_memory: testworker with `--leak-when PATH` (50 MiB a second once triggered) under
//!   `max_memory = 256M`. The suite samples the leaking worker's PSS every 10 ms (as clusterd
//!   counts it) until it has exited, and its `VmHWM` (peak RSS) last thing before it exits:
//!   the peak before it was replaced; loads of GETs and POSTs run all along (target: 0
//!   failed).
//! - Recycling: the shop under `max_requests` and under `max_age`, each until 50 workers were
//!   recycled (`worker.recycled`), under four loads at once (GET and POST × keep-alive and
//!   new connection): failed requests (target 0) and how long the 50 took.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use clusterd_bench::{Method, Report, Running, Spec};

use super::machine::epoch_ms;
use super::procs::{Daemon, TempDir, alive, kb_field, poll_until, status_kb};
use super::{
    Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, max, median, mib, mode, thousands,
};

/// The watchdog under test.
const WATCHDOG: &str = "1s";
/// The memory limit, and the leak's rate.
const MAX_MEMORY: &str = "256M";
const LIMIT: u64 = 256 << 20;
const LEAK_PER_SEC: u64 = 50 << 20;
/// Recycles per row of the recycling table (a full run).
const RECYCLES: usize = 50;
/// `max_requests` of the recycling row: at the shop's rate under the four loads, a worker
/// serves this many in well under a second.
const MAX_REQUESTS: u64 = 3000;
/// `max_age` of the recycling row.
const MAX_AGE: &str = "1s";

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("health");
    // The quick run does fewer of each (the same parameters as the crash section's kills).
    let full = ctx.p.kills >= 10;
    let (hangs, leaks, recycles) = if full { (5, 3, RECYCLES) } else { (2, 1, 10) };
    s.md(&format!(
        "How clusterd replaces workers that do not exit: a hung one (the watchdog), a leaking \
         one (`max_memory`) and aging ones (`max_requests`, `max_age`); each replacement is \
         started and READY before the worker it replaces drains. Workers: \
         `target/release/examples/testworker` (hang and leak on a trigger file) and the shop. \
         {hangs} hangs, {leaks} leaks, {recycles} recycles per limit.\n"
    ));
    watchdog(ctx, &mut s, hangs);
    memory(ctx, &mut s, leaks);
    recycling(ctx, &mut s, recycles);
    s
}

/// A load of `GET /` or `POST /` (testworker answers anything) on `connections`.
fn spec(addr: std::net::SocketAddr, connections: usize, keep_alive: bool, post: bool) -> Spec {
    let mut spec = Spec {
        connections,
        threads: 1,
        keep_alive,
        duration: Some(Duration::from_secs(300)),
        ..Spec::new(addr)
    };
    if post {
        spec.method = Method::Post;
        spec.body = super::CART.to_vec();
    }
    spec
}

/// Starts each load and waits until requests flow.
fn start_loads(specs: &[(String, Spec)]) -> Result<Vec<(String, Running)>, String> {
    let mut loads = Vec::new();
    for (label, spec) in specs {
        let load = clusterd_bench::start(spec.clone())
            .map_err(|e| format!("cannot start the load {label}: {e}"))?;
        loads.push((label.clone(), load));
    }
    for (label, load) in &loads {
        if !load.wait_for_ok(50, Duration::from_secs(15)) {
            return Err(format!(
                "{label}: requests do not flow:\n{}",
                load.snapshot()
            ));
        }
    }
    Ok(loads)
}

/// Stops the loads; a table row per load.
fn stop_loads(loads: Vec<(String, Running)>) -> Vec<(String, Report)> {
    loads
        .into_iter()
        .map(|(label, load)| (label, load.stop()))
        .collect()
}

fn load_table(s: &mut Section, reports: &[(String, Report)]) {
    let mut t = Table::new(&[
        "load",
        "requests",
        "failed",
        "failures by class",
        "GET retries",
    ]);
    for (label, r) in reports {
        t.row(vec![
            label.clone(),
            thousands(r.total),
            thousands(r.failed()),
            failure_classes(r),
            thousands(r.retried),
        ]);
    }
    s.table(&t);
    let samples: String = reports
        .iter()
        .map(|(label, r)| super::error_samples(label, r))
        .collect();
    if !samples.is_empty() {
        s.md(&format!("Errors the load generator saw:\n\n{samples}\n"));
    }
}

/// The pid of ready worker `slot`.
fn ready_pid(daemon: &Daemon, slot: u32) -> Result<u32, String> {
    poll_until(Duration::from_secs(10), || {
        daemon
            .status()
            .ok()?
            .workers
            .iter()
            .find(|w| w.id == slot && w.state == "ready")
            .and_then(|w| w.pid)
    })
    .ok_or_else(|| format!("worker {slot} is not ready"))
}

/// Writes `pid` to the trigger file, returning the wall-clock moment in epoch ms.
fn trigger(path: &Path, pid: u32) -> Result<u64, String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pid.to_string()).map_err(|e| format!("cannot write the trigger: {e}"))?;
    let at = epoch_ms(SystemTime::now());
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write the trigger: {e}"))?;
    Ok(at)
}

fn testworker(ctx: &Ctx, args: &str) -> String {
    format!("{} {args}", ctx.bin("examples/testworker").display())
}

// ---------------------------------------------------------------------------------------------
// Watchdog

/// One hang's timings, in ms from the trigger.
struct Hang {
    /// The silence clusterd measured (`silent_ms`): from the last heartbeat, which may
    /// precede the trigger.
    silent: f64,
    detected: f64,
    replacement_ready: f64,
    signalled: f64,
    gone: f64,
}

fn watchdog(ctx: &Ctx, s: &mut Section, hangs: usize) {
    println!("  -- watchdog");
    let dir = match TempDir::new("health-hang") {
        Ok(d) => d,
        Err(e) => return s.fail("watchdog", &e),
    };
    let path = dir.path().join("hang");
    let config = format!(
        "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\nwatchdog = {WATCHDOG}\n\
         drain_timeout = 5s\nbake = 0\n",
        testworker(ctx, &format!("ok --hang-when {}", path.display()))
    );
    let mut hung = Vec::new();
    let result = (|| -> Result<Vec<(String, Report)>, String> {
        let daemon = Daemon::start(&ctx.clusterd(), &ctx.clusterctl(), "health-hang", &config)?;
        daemon.wait_pool_ready(1, Duration::from_secs(30))?;
        let addr = daemon.addr()?;
        let loads = start_loads(&[
            ("GET keep-alive".into(), spec(addr, 24, true, false)),
            ("GET new connection".into(), spec(addr, 8, false, false)),
        ])?;
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..hangs {
            let slot = 1 + (i as u32 % 2);
            let pid = ready_pid(&daemon, slot)?;
            let t0 = trigger(&path, pid)?;
            let timeout = Duration::from_secs(20);
            let p = pid.to_string();
            let h = daemon.wait_event("worker.hung", timeout, |l| l.get("pid") == Some(&p))?;
            let ready = daemon.wait_event("worker.ready", timeout, |l| {
                l.num("id") == Some(u64::from(slot))
                    && l.get("pid") != Some(&p)
                    && l.ts_ms >= h.ts_ms
            })?;
            let signal =
                daemon.wait_event("worker.signal", timeout, |l| l.get("pid") == Some(&p))?;
            poll_until(timeout, || (!alive(pid)).then_some(()))
                .ok_or_else(|| format!("the hung worker {pid} is still there after {timeout:?}"))?;
            let gone = epoch_ms(SystemTime::now());
            let since = |ts: u64| ts.saturating_sub(t0) as f64;
            let one = Hang {
                silent: h.num("silent_ms").unwrap_or_default() as f64,
                detected: since(h.ts_ms),
                replacement_ready: since(ready.ts_ms),
                signalled: since(signal.ts_ms),
                gone: since(gone),
            };
            println!(
                "     hang {}/{hangs}: worker {slot} pid {pid}: hung after {}, replacement ready \
                 after {}, signalled after {}, gone after {}",
                i + 1,
                fmt_ms(one.detected),
                fmt_ms(one.replacement_ready),
                fmt_ms(one.signalled),
                fmt_ms(one.gone)
            );
            hung.push(one);
            daemon.wait_settled(2, Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_millis(500));
        }
        let reports = stop_loads(loads);
        let _ = daemon.stop(Duration::from_secs(30));
        Ok(reports)
    })();
    let col = |f: fn(&Hang) -> f64| hung.iter().map(f).collect::<Vec<f64>>();
    let (silent, detected, ready, signalled, gone) = (
        col(|h| h.silent),
        col(|h| h.detected),
        col(|h| h.replacement_ready),
        col(|h| h.signalled),
        col(|h| h.gone),
    );
    s.md(&format!(
        "### Watchdog\n\nclusterd with 2 testworkers, `watchdog = {WATCHDOG}`, \
         `drain_timeout = 5s`, under two loads of `GET /` (24 keep-alive connections, 8 with a \
         new connection per request). {hangs} times: the suite writes a ready worker's pid to \
         the trigger file (its executor then blocks for good, heartbeat included) and times the \
         log's events from that moment (clusterd's timestamps, the same wall clock, to the \
         millisecond). The worker heartbeats more often than the watchdog, so its last \
         heartbeat can precede the hang by a fraction of the watchdog: detection then comes \
         less than a watchdog after the hang, while `silent_ms` is always at least the \
         watchdog. The target (replacement ready within the watchdog + 0.5 s) is this \
         suite's own.\n"
    ));
    let mut t = Table::new(&["from the hang to", "median", "max", "hangs"]);
    for (what, v) in [
        ("`worker.hung` (detection)", &detected),
        (
            "(`worker.hung`'s `silent_ms`: since the last heartbeat)",
            &silent,
        ),
        ("the replacement's `worker.ready`", &ready),
        ("`worker.signal` (SIGABRT to the hung worker)", &signalled),
        ("the hung worker gone (SIGKILL after its grace)", &gone),
    ] {
        t.row(vec![
            what.into(),
            fmt_ms(median(v)),
            fmt_ms(max(v)),
            v.len().to_string(),
        ]);
    }
    s.table(&t);
    let detect = format!("≤ {WATCHDOG} + 0.5 s");
    match result {
        Ok(reports) => {
            let complete = hung.len() == hangs;
            s.check(Check::new(
                "watchdog: hang to replacement ready (max)",
                &detect,
                format!(
                    "{} (detected after {} max)",
                    fmt_ms(max(&ready)),
                    fmt_ms(max(&detected))
                ),
                Some(complete && max(&ready) <= 1500.0),
            ));
            load_table(s, &reports);
            s.md(
                "A request the hung worker had already read cannot be answered; a GET on a \
                 reused connection that dies without a byte of response is retried once on a \
                 new connection (as clients do).\n",
            );
        }
        Err(e) => {
            s.fail("watchdog", &e);
            s.check(Check::failed(
                "watchdog: hang to replacement ready (max)",
                &detect,
                &e,
            ));
        }
    }
    s.md(&format!(
        "```sh\n# config: exec = target/release/examples/testworker ok --hang-when $DIR/hang\n\
         #         workers = 2, watchdog = {WATCHDOG}, drain_timeout = 5s\n\
         target/release/loadgen http://127.0.0.1:$PORT/ -c 24 -d 5m &\n\
         target/release/loadgen http://127.0.0.1:$PORT/ -c 8 -d 5m --new-conn &\n\
         echo $WORKER_PID > $DIR/hang   # × {hangs}, one worker at a time\n```\n"
    ));
}

// ---------------------------------------------------------------------------------------------
// max_memory

/// One leak.
struct Leak {
    /// From the trigger to `worker.recycle`, and the size clusterd saw then.
    to_recycle: f64,
    reason: String,
    /// Replacement spawn to the old worker told to drain (`worker.recycled took_ms`).
    took: f64,
    /// From the trigger until the worker was gone.
    gone: f64,
    peak_pss: u64,
    peak_rss: u64,
}

/// PSS plus swapped-out share, in bytes, from smaps_rollup (what clusterd counts).
fn pss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(kb_field(&text, "Pss")? + kb_field(&text, "SwapPss").unwrap_or(0))
}

fn memory(ctx: &Ctx, s: &mut Section, leaks: usize) {
    println!("  -- max_memory");
    let dir = match TempDir::new("health-leak") {
        Ok(d) => d,
        Err(e) => return s.fail("max_memory", &e),
    };
    let path = dir.path().join("leak");
    let config = format!(
        "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\nmax_memory = {MAX_MEMORY}\nbake = 0\n",
        testworker(ctx, &format!("ok --leak-when {}", path.display()))
    );
    let mut done = Vec::new();
    let result = (|| -> Result<Vec<(String, Report)>, String> {
        let daemon = Daemon::start(&ctx.clusterd(), &ctx.clusterctl(), "health-leak", &config)?;
        daemon.wait_pool_ready(1, Duration::from_secs(30))?;
        let addr = daemon.addr()?;
        let loads = start_loads(&[
            ("GET keep-alive".into(), spec(addr, 16, true, false)),
            ("POST keep-alive".into(), spec(addr, 8, true, true)),
            ("POST new connection".into(), spec(addr, 8, false, true)),
        ])?;
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..leaks {
            let slot = 1 + (i as u32 % 2);
            let pid = ready_pid(&daemon, slot)?;
            let t0 = trigger(&path, pid)?;
            let (mut peak_pss, mut peak_rss) = (0, 0);
            let end = Instant::now() + Duration::from_secs(60);
            // Sample until the worker is gone.
            while alive(pid) {
                if Instant::now() > end {
                    return Err(format!("the leaking worker {pid} still runs after 60 s"));
                }
                if let Some(b) = pss(pid) {
                    peak_pss = peak_pss.max(b);
                }
                if let Some(b) = status_kb(pid, "VmHWM") {
                    peak_rss = peak_rss.max(b);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let gone = epoch_ms(SystemTime::now());
            let p = pid.to_string();
            let timeout = Duration::from_secs(5);
            let recycle =
                daemon.wait_event("worker.recycle", timeout, |l| l.get("pid") == Some(&p))?;
            let recycled =
                daemon.wait_event("worker.recycled", timeout, |l| l.get("old_pid") == Some(&p))?;
            let one = Leak {
                to_recycle: recycle.ts_ms.saturating_sub(t0) as f64,
                reason: recycle.get("reason").unwrap_or_default().to_string(),
                took: recycled.num("took_ms").unwrap_or_default() as f64,
                gone: gone.saturating_sub(t0) as f64,
                peak_pss,
                peak_rss,
            };
            println!(
                "     leak {}/{leaks}: worker {slot} pid {pid}: recycle after {} ({}), gone after \
                 {}, peak PSS {}, VmHWM {}",
                i + 1,
                fmt_ms(one.to_recycle),
                one.reason,
                fmt_ms(one.gone),
                mib(one.peak_pss),
                mib(one.peak_rss)
            );
            done.push(one);
            daemon.wait_settled(2, Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_millis(500));
        }
        let reports = stop_loads(loads);
        let _ = daemon.stop(Duration::from_secs(30));
        Ok(reports)
    })();
    s.md(&format!(
        "### max_memory\n\nclusterd with 2 testworkers, `max_memory = {MAX_MEMORY}`, under \
         three loads (16 keep-alive connections of `GET /`, 8 keep-alive and 8 new-connection \
         ones of `POST /`). {leaks} times: the suite triggers a ready worker's leak (50 MiB a \
         second, allocated and touched in 5 MiB steps every 100 ms), and samples that worker's \
         PSS every 10 ms (`/proc/PID/smaps_rollup`, as clusterd counts it) and its `VmHWM` \
         until it has exited. One second of the leak is {}.\n",
        mib(LEAK_PER_SEC)
    ));
    let mut t = Table::new(&[
        "leak",
        "trigger → `worker.recycle`",
        "clusterd saw",
        "replacement spawn → old drained (`took_ms`)",
        "trigger → worker gone",
        "peak PSS",
        "peak RSS (`VmHWM`)",
    ]);
    for (i, l) in done.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            fmt_ms(l.to_recycle),
            l.reason.clone(),
            fmt_ms(l.took),
            fmt_ms(l.gone),
            mib(l.peak_pss),
            mib(l.peak_rss),
        ]);
    }
    s.table(&t);
    let bound = LIMIT + LEAK_PER_SEC;
    let peak = done.iter().map(|l| l.peak_pss).max().unwrap_or(0);
    let target = format!("≤ {} (the limit + 1 s of growth)", mib(bound));
    match result {
        Ok(reports) => {
            s.check(Check::new(
                "max_memory: the leaking worker's peak PSS",
                &target,
                mib(peak),
                Some(done.len() == leaks && peak <= bound),
            ));
            let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
            let total: u64 = reports.iter().map(|(_, r)| r.total).sum();
            s.check(Check::new(
                "max_memory: failed requests during the leaks",
                "0",
                format!("{} of {}", thousands(failed), thousands(total)),
                Some(failed == 0 && done.len() == leaks),
            ));
            load_table(s, &reports);
        }
        Err(e) => {
            s.fail("max_memory", &e);
            s.check(Check::failed(
                "max_memory: the leaking worker's peak PSS",
                &target,
                &e,
            ));
        }
    }
    s.md(&format!(
        "```sh\n# config: exec = target/release/examples/testworker ok --leak-when $DIR/leak\n\
         #         workers = 2, max_memory = {MAX_MEMORY}\n\
         target/release/loadgen http://127.0.0.1:$PORT/ -c 16 -d 5m &\n\
         target/release/loadgen http://127.0.0.1:$PORT/ -c 8 -d 5m --post '{{\"cart\":[1,2,3]}}' &\n\
         target/release/loadgen http://127.0.0.1:$PORT/ -c 8 -d 5m --new-conn --post '{{\"cart\":[1,2,3]}}' &\n\
         echo $WORKER_PID > $DIR/leak   # × {leaks}, one worker at a time\n```\n"
    ));
}

// ---------------------------------------------------------------------------------------------
// max_requests and max_age

fn recycling(ctx: &Ctx, s: &mut Section, recycles: usize) {
    println!("  -- recycling");
    let workers = ctx.workers();
    s.md(&format!(
        "### Recycling: max_requests and max_age\n\nclusterd with {workers} shop workers, under \
         four loads at once, 16 connections each: `GET /products/1` and `POST /checkout`, \
         keep-alive and a new connection per request. Each limit runs until {recycles} \
         workers were recycled (`worker.recycled` lines); every request of the run counts.\n"
    ));
    let mut t = Table::new(&[
        "limit",
        "recycles",
        "took",
        "replacement spawn → old drained, median (max)",
        "requests",
        "failed",
        "failures by class",
        "target",
    ]);
    let mut samples = String::new();
    for (key, value, label) in [
        ("max_requests", MAX_REQUESTS.to_string(), "max_requests"),
        ("max_age", MAX_AGE.to_string(), "max_age"),
    ] {
        let row = format!("`{key} = {value}`");
        println!("  -- {row}");
        let what = format!("{key}: failed requests over {recycles} recycles");
        match recycle_run(ctx, &format!("{key} = {value}"), label, recycles) {
            Ok((n, took, steps, reports)) => {
                let failed: u64 = reports.iter().map(|(_, r)| r.failed()).sum();
                let total: u64 = reports.iter().map(|(_, r)| r.total).sum();
                let ok: u64 = reports.iter().map(|(_, r)| r.ok).sum();
                let mut classes = Vec::new();
                for (l, one) in &reports {
                    samples.push_str(&super::error_samples(&format!("{key}, {l}"), one));
                    if one.failed() > 0 {
                        classes.push(format!("{l}: {}", failure_classes(one)));
                    }
                }
                let classes = if classes.is_empty() {
                    "none".to_string()
                } else {
                    classes.join("; ")
                };
                let pass = Some(failed == 0 && n >= recycles && ok > 0);
                s.check(Check::new(
                    &what,
                    "0",
                    format!(
                        "{} of {} ({n} recycles in {:.1} s)",
                        thousands(failed),
                        thousands(total),
                        took.as_secs_f64()
                    ),
                    pass,
                ));
                t.row(vec![
                    row,
                    n.to_string(),
                    format!("{:.1} s", took.as_secs_f64()),
                    format!("{} ({})", fmt_ms(median(&steps)), fmt_ms(max(&steps))),
                    thousands(total),
                    thousands(failed),
                    classes,
                    format!("0 {}", super::mark(pass)),
                ]);
            }
            Err(e) => {
                s.fail(&row, &e);
                s.check(Check::failed(&what, "0", &e));
                t.row(vec![row, "failed".into()]);
            }
        }
    }
    s.table(&t);
    if !samples.is_empty() {
        s.md(&format!("Errors the load generator saw:\n\n{samples}\n"));
    }
    let addr = ([127, 0, 0, 1], 0).into();
    let mut cmds = format!(
        "Config: `exec = target/release/examples/shop`, `workers = {workers}`, \
         `max_requests = {MAX_REQUESTS}` (then, instead, `max_age = {MAX_AGE}`); both get up to \
         10% jitter per worker.\n\n```sh\n"
    );
    for (route, keep_alive) in LOADS {
        let mut spec = route.spec(addr, keep_alive);
        spec.connections = 16;
        cmds.push_str(&super::loadgen_command(&spec));
        cmds.push_str(" -d 5m &\n");
    }
    cmds.push_str("```\n");
    s.md(&cmds);
}

const LOADS: [(Route, bool); 4] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Checkout, true),
    (Route::Checkout, false),
];

/// Runs the shop with `limit` under the four loads until `recycles` workers were recycled for
/// `reason`: how many, how long, each `took_ms`, and the loads' reports.
#[allow(clippy::type_complexity)]
fn recycle_run(
    ctx: &Ctx,
    limit: &str,
    reason: &str,
    recycles: usize,
) -> Result<(usize, Duration, Vec<f64>, Vec<(String, Report)>), String> {
    let workers = ctx.workers();
    let daemon = ctx.ready_shop_daemon("health-recycle", &workers.to_string(), limit)?;
    let addr = daemon.addr()?;
    let specs: Vec<(String, Spec)> = LOADS
        .iter()
        .map(|&(route, keep_alive)| {
            let mut spec = route.spec(addr, keep_alive);
            spec.connections = 16;
            spec.threads = 1;
            spec.duration = Some(Duration::from_secs(300));
            (format!("{} {}", route.label(), mode(keep_alive)), spec)
        })
        .collect();
    let loads = start_loads(&specs)?;
    let started = Instant::now();
    let count = |d: &Daemon| {
        d.events()
            .into_iter()
            .filter(|l| {
                l.event == "worker.recycled"
                    && l.get("reason").is_some_and(|r| r.starts_with(reason))
            })
            .collect::<Vec<_>>()
    };
    let done = poll_until(Duration::from_secs(180), || {
        let n = count(&daemon);
        (n.len() >= recycles).then_some(n)
    });
    let took = started.elapsed();
    // Let the last replaced worker drain and exit under the load.
    let settled = daemon.wait_settled(workers as usize, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let reports = stop_loads(loads);
    let all = count(&daemon);
    let _ = daemon.stop(Duration::from_secs(30));
    let Some(lines) = done else {
        return Err(format!(
            "only {} recycles in 180 s; log ends:\n{}",
            all.len(),
            daemon.tail()
        ));
    };
    settled?;
    let steps: Vec<f64> = lines
        .iter()
        .take(recycles)
        .map(|l| l.num("took_ms").unwrap_or_default() as f64)
        .collect();
    println!(
        "     {} recycles in {:.1} s; {}",
        lines.len(),
        took.as_secs_f64(),
        reports
            .iter()
            .map(|(l, r)| format!("{l}: {} failed of {}", r.failed(), r.total))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok((recycles.min(lines.len()), took, steps, reports))
}
