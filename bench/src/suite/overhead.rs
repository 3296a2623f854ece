//! 1. Overhead: the shop bare, under clusterd with one worker, and with `workers = auto`.
//!
//! The three run side by side (idle while another is measured) and runs are interleaved,
//! the order rotating each round, so that drift on a busy machine hits all three alike.
//! Each figure is the median of the rounds. clusterd is not on the request path (workers
//! accept from the shared socket themselves), so one worker under clusterd should serve as
//! fast as the bare process: the target is ≥ 0.98×.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterd_bench::Report;

use super::procs::{Daemon, Proc, TempDir, free_port, poll_until};
use super::{Check, Ctx, Route, Section, Table, fmt_ms, loadgen_command, median, ms, thousands};

/// The shop run alone: `shop --listen 127.0.0.1:PORT`.
struct Bare {
    proc: Proc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Bare {
    fn start(ctx: &Ctx) -> Result<Bare, String> {
        let dir = TempDir::new("bare")?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(dir.path().join("shop.log"))
            .map_err(|e| format!("cannot create the shop's log: {e}"))?;
        let proc = Proc::spawn(
            Command::new(ctx.shop())
                .arg("--listen")
                .arg(addr.to_string())
                .env_remove("CLUSTERD_FD")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
            "shop",
        )?;
        let up = poll_until(Duration::from_secs(10), || {
            if proc.exit().is_some() {
                return Some(false);
            }
            clusterd_bench::get(addr, "/healthz")
                .is_ok_and(|r| r.status == 200)
                .then_some(true)
        });
        if up != Some(true) {
            let log = std::fs::read_to_string(dir.path().join("shop.log")).unwrap_or_default();
            return Err(format!("the bare shop did not come up on {addr}: {log}"));
        }
        Ok(Bare {
            proc,
            addr,
            _dir: dir,
        })
    }
}

/// One setup under test.
struct Setup {
    label: String,
    addr: SocketAddr,
    /// Reports of the measured runs, per route.
    runs: Vec<Vec<Report>>,
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("overhead");
    let p = &ctx.p;
    let routes = [Route::Products, Route::Cpu, Route::Checkout];

    // Keep every process alive until the end of the section.
    let mut bare = None;
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut setups: Vec<Setup> = Vec::new();
    let new_setup = |label: String, addr| Setup {
        label,
        addr,
        runs: vec![Vec::new(); routes.len()],
    };
    match Bare::start(ctx) {
        Ok(b) => {
            println!("  bare shop pid {} on {}", b.proc.pid(), b.addr);
            setups.push(new_setup("bare (no clusterd)".into(), b.addr));
            bare = Some(b);
        }
        Err(e) => s.fail("starting the bare shop", &e),
    }
    let auto_label = format!("clusterd, workers = auto ({})", ctx.cpus);
    for (tag, workers, label) in [
        ("overhead-1", "1", "clusterd, 1 worker".to_string()),
        ("overhead-auto", "auto", auto_label),
    ] {
        let started = ctx.shop_daemon(tag, workers, "").and_then(|d| {
            d.wait_pool_ready(1, Duration::from_secs(30))?;
            let addr = d.addr()?;
            Ok((d, addr))
        });
        match started {
            Ok((d, addr)) => {
                println!("  {label}: clusterd pid {} on {addr}", d.pid());
                setups.push(new_setup(label, addr));
                daemons.push(d);
            }
            Err(e) => s.fail(&format!("starting {label}"), &e),
        }
    }

    for (r, route) in routes.iter().enumerate() {
        println!("  -- {}", route.label());
        for setup in &setups {
            let mut spec = route.spec(setup.addr, true);
            spec.duration = Some(p.overhead_warmup);
            if let Err(e) = clusterd_bench::run(&spec) {
                s.fail(&format!("warm-up of {}", setup.label), &e.to_string());
            }
        }
        for rep in 0..p.overhead_reps {
            let n = setups.len();
            for k in 0..n {
                let setup = &mut setups[(k + rep) % n];
                let mut spec = route.spec(setup.addr, true);
                spec.duration = Some(p.overhead_run);
                match clusterd_bench::run(&spec) {
                    Ok(report) => {
                        println!(
                            "     round {}/{} {:<34} {:>9.0} req/s  p50 {}  p99 {}  failed {}",
                            rep + 1,
                            p.overhead_reps,
                            setup.label,
                            report.requests_per_sec(),
                            fmt_ms(ms(report.p50())),
                            fmt_ms(ms(report.p99())),
                            report.failed()
                        );
                        setup.runs[r].push(report);
                    }
                    Err(e) => s.fail(
                        &format!("{} on {}", route.label(), setup.label),
                        &e.to_string(),
                    ),
                }
            }
        }
    }

    let mut table = Table::new(&[
        "route",
        "setup",
        "req/s (median)",
        "runs (min–max)",
        "p50",
        "p99",
        "failed",
        "× bare",
        "target",
    ]);
    for (r, route) in routes.iter().enumerate() {
        let rps = |setup: &Setup| -> Vec<f64> {
            setup.runs[r].iter().map(Report::requests_per_sec).collect()
        };
        let bare_rps = setups
            .iter()
            .find(|s| s.label.starts_with("bare"))
            .map(|b| median(&rps(b)))
            .filter(|&x| x > 0.0);
        for setup in &setups {
            let v = rps(setup);
            if v.is_empty() {
                table.row(vec![
                    route.label().into(),
                    setup.label.clone(),
                    "failed".into(),
                ]);
                continue;
            }
            let med = median(&v);
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            let p50: Vec<f64> = setup.runs[r].iter().map(|x| ms(x.p50())).collect();
            let p99: Vec<f64> = setup.runs[r].iter().map(|x| ms(x.p99())).collect();
            let failed: u64 = setup.runs[r].iter().map(Report::failed).sum();
            let ratio = bare_rps.map(|b| med / b);
            let one_worker = setup.label == "clusterd, 1 worker";
            let target = if one_worker {
                let pass = ratio.map(|x| x >= 0.98);
                let check = Check::new(
                    &format!("throughput, 1 worker vs bare, {}", route.label()),
                    "≥ 0.98×",
                    ratio.map_or_else(
                        || "no bare figure".to_string(),
                        |x| format!("{x:.3}× ({:.0} vs {:.0} req/s)", med, med / x),
                    ),
                    pass,
                );
                s.check(check);
                format!("≥ 0.98× {}", super::mark(pass))
            } else {
                String::new()
            };
            table.row(vec![
                route.label().into(),
                setup.label.clone(),
                thousands(med.round() as u64),
                format!(
                    "{}–{}",
                    thousands(lo.round() as u64),
                    thousands(hi.round() as u64)
                ),
                fmt_ms(median(&p50)),
                fmt_ms(median(&p99)),
                thousands(failed),
                ratio.map_or_else(String::new, |x| format!("{x:.3}×")),
                target,
            ]);
        }
    }
    s.md(&format!(
        "Throughput and latency of three routes of the example shop, with {conns} keep-alive \
         connections, {run:?} per run, {reps} interleaved rounds (the order rotates each round; \
         a {warm:?} warm-up precedes each series); figures are medians over the rounds. The \
         three setups run side by side on 127.0.0.1 and each is idle while another is \
         measured. The load generator runs on the same machine and competes for its {cpus} \
         CPUs, so absolute figures understate what the server alone could do; the ratios are \
         the point. `POST /checkout` waits 50 ms of simulated I/O per request, so with {conns} \
         connections it is bounded at {conns} / 0.05 s = {bound} req/s.\n",
        conns = super::CONNECTIONS,
        run = p.overhead_run,
        reps = p.overhead_reps,
        warm = p.overhead_warmup,
        cpus = ctx.cpus,
        bound = super::CONNECTIONS * 20,
    ));
    s.table(&table);
    let any_addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut commands = String::from(
        "Setups:\n\n```sh\ntarget/release/examples/shop --listen 127.0.0.1:$PORT      # bare\n\
         target/release/clusterd -c overhead-1.conf                      # workers = 1\n\
         target/release/clusterd -c overhead-auto.conf                   # workers = auto\n```\n\n\
         with, in each config, `exec = target/release/examples/shop`, `listen = 127.0.0.1:0` \
         (the port is read from the `listening` log line) and `workers = 1` or `auto`. \
         One run of each route is the equivalent of:\n\n```sh\n",
    );
    for route in routes {
        let mut spec = route.spec(any_addr, true);
        spec.duration = Some(p.overhead_run);
        commands.push_str(&loadgen_command(&spec));
        commands.push('\n');
    }
    commands.push_str("```\n");
    s.md(&commands);
    drop(daemons);
    drop(bare);
    s
}
