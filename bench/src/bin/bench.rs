//! `bench`: clusterd's benchmark suite, one command.
//!
//! ```sh
//! cargo run --release -p clusterd-bench --bin bench              # about 40 minutes after the build
//! cargo run --release -p clusterd-bench --bin bench -- --quick   # a 1-2 minute smoke run
//! ```
//!
//! It first builds what it measures (`cargo build --release --workspace --bins --examples`),
//! then runs its sections on this machine, over 127.0.0.1 (and `fleet` in network namespaces of
//! its own), printing as it goes, and
//! writes BENCHMARKS.md at the repository root (or `--out PATH`): machine facts, the exact
//! commands, a table per section, and every target beside its measured figure with ✓ or ✗.
//!
//! 1. `overhead`: `GET /products/1`, `GET /cpu` and `POST /checkout` of the example shop,
//!    bare, under clusterd with one worker (target ≥ 0.98× bare) and with `workers = auto`;
//!    interleaved runs, medians.
//! 2. `zero-downtime`: 20 rolling restarts under 64 connections of each of GET and POST ×
//!    keep-alive and new connection; every request classified (target: 0 failed).
//! 3. `crash`: `kill -9` of a worker under load, 10 times: failed requests, and the time to a
//!    ready replacement from clusterd's log.
//! 4. `balance`: requests per worker at saturation (max/min ≤ 1.10, Jain's index), with the
//!    worker library's accept limit at its default, tight and off.
//! 5. `footprint`: clusterd's RSS with 2 and 64 workers (≤ 2 / 4 MiB), its CPU time and
//!    wake-ups over idle seconds (0 ticks, ≤ 1/s), the `clusterctl status` round trip
//!    (≤ 2 ms), start to listening (≤ 10 ms), cold start to the first 200, binary sizes
//!    (release and `+crt-static`).
//! 6. `scale`: 64 workers started, restarted and stopped; clusterd's peak RSS.
//! 7. `soak`: 1000 rolling restarts under load: failed requests, clusterd's fds and RSS.
//! 8. `bad-deploy`: a restart onto a program that dies 300 ms after READY, under load, with
//!    and without the bake; the bake's cost to a healthy restart.
//! 9. `hostile`: `/healthz` and `clusterctl status` latency while 1,000 idle and slowloris
//!    connections are held on the metrics port, the shop's port and the control socket.
//! 10. `cross-check`: the shop under clusterd, `GET /products/1` with a new connection per
//!     request (and keep-alive), measured by our loadgen and by wrk (`-H "Connection: close"`)
//!     in turn: requests/s and errors of each (target: 0 errors from both). wrk is Debian's
//!     package; without it the section is skipped with a note in the report, not failed.
//! 11. `logs`: the lines per second clusterd passes on from a worker's pipe (`log_capture =
//!     on`) and its CPU per million lines; the shop logging every request, with capture on
//!     and off.
//! 12. `fleet`: three hosts (network namespaces) behind HAProxy: failed requests at the load
//!     balancer for a rolling restart and a replacement of every host, with and without
//!     `shutdown_delay`, and how long after TERM HAProxy stopped sending to a host (root,
//!     `ip` and `haproxy`).
//! 13. `health`: a hung worker (`watchdog`) to its replacement READY, a worker leaking
//!     50 MiB/s under `max_memory = 256M` (its peak, failed requests), and 50 recycles each of
//!     `max_requests` and `max_age` under load (failed requests).
//! 14. `node`: the unmodified Express shop under clusterd (`protocol = node`), PM2 cluster
//!     mode (PM2 from bench/node's lock file, `npm ci`) and a Node `cluster` master:
//!     throughput, failed requests over 20 restarts in four loads, crash recovery, RSS.
//! 15. `dispatch`: `dispatch = clusterd` (clusterd accepts and passes each connection)
//!     against the shared queue, native shop, new connections and keep-alive: requests/s,
//!     p99, requests per worker (max/min), clusterd's CPU per 10,000 passed connections;
//!     and with `sticky = cookie:sid` (every head peeked).
//! 16. `socketio`: the Socket.IO chat of examples/chat on four workers: handshakes per second
//!     (long-polling, then the upgrade) through clusterd (`dispatch = clusterd`, `sticky =
//!     socket.io`) and Node's `cluster` with `@socket.io/sticky`; new connections per second
//!     against Node's `cluster` round-robin primary (node, npm, redis-server).
//! 17. `reuseport`: `dispatch = shared` against `dispatch = reuseport` (native shop,
//!     keep-alive and new connections, and the CPU-bound route): requests per worker
//!     (max/min), p50, p99, max and standard deviation of the latency.
//! 18. `upgrade`: 100 in-place upgrades of clusterd (`clusterctl upgrade`) under keep-alive
//!     and new-connection GET and POST load: failed requests (target 0), workers replaced
//!     (0), the time from the request to the new image answering `status`, clusterd's fds and
//!     RSS before and after.
//! 19. `node-dispatch`: the unmodified Express shop (`protocol = node`) under `dispatch =
//!     shared`, `clusterd` and `reuseport`, keep-alive and new connections: requests/s,
//!     requests per worker (max/min), p50, p99, max and standard deviation of the latency.
//!
//! Options: `--quick` (short runs, few repetitions, no static build: checks that the suite
//! works, measures nothing worth publishing), `--only SECTION[,SECTION…]` (the names above;
//! the report then holds only those sections), `--out PATH`, `--no-build`. Run it on a quiet
//! machine: the load generator shares the CPUs with the servers it measures.
//!
//! A step that fails is reported (on the console and in the file) and the suite goes on.
//! The suite signals only processes it started (and the workers of its own clusterds, for the
//! crash section), by pid, and stops them all before it exits.
//! Exit status: 0 when every step ran (whether or not targets were met), 1 when a step
//! failed, 2 on a usage error or when the binaries cannot be built.

#[path = "../suite/mod.rs"]
mod suite;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use suite::machine::Machine;
use suite::procs::{self, Proc};
use suite::{Ctx, Params, SECTIONS, Section};

const USAGE: &str = "\
usage: bench [--quick] [--only SECTION[,SECTION…]] [--out PATH] [--no-build]

clusterd's benchmark suite: builds the release binaries, runs every section on this
machine (127.0.0.1 only) and writes BENCHMARKS.md at the repository root.

  --quick          a 1-2 minute smoke run: short runs, few repetitions, no static build
  --only SECTIONS  run only these sections (repeatable, or comma-separated):
                   overhead, zero-downtime, crash, balance, footprint, scale,
                   soak, bad-deploy, hostile, cross-check, logs,
                   fleet (root, ip, haproxy), health, node (node, npm),
                   dispatch, socketio (node, npm, redis-server), reuseport,
                   upgrade, node-dispatch (node, npm)
                   (the report then holds only those sections)
  --out PATH       write the report here instead of BENCHMARKS.md at the repository root
  --no-build       do not run `cargo build --release --workspace --bins --examples` first
  -h, --help       print this help

Run it as: cargo run --release -p clusterd-bench --bin bench [-- OPTIONS]";

/// The build the suite runs first.
const BUILD: [&str; 5] = ["build", "--release", "--workspace", "--bins", "--examples"];

/// The command line.
#[derive(Debug, Default, PartialEq)]
struct Options {
    quick: bool,
    only: Vec<&'static str>,
    out: Option<PathBuf>,
    build: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    procs::install_panic_hook();
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let root = root.canonicalize().unwrap_or(root);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let build = if opts.build {
        println!("=== building: cargo {}", BUILD.join(" "));
        if let Err(e) = build(&cargo, &root) {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
        Some(format!("cargo {}", BUILD.join(" ")))
    } else {
        None
    };
    let suite_started = Instant::now();
    let target = target_dir(&cargo, &root);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ctx = Ctx {
        p: Params::new(opts.quick),
        root: root.clone(),
        target,
        cpus,
    };
    for bin in [ctx.clusterd(), ctx.clusterctl(), ctx.shop()] {
        if !bin.exists() {
            eprintln!(
                "bench: {} is missing: build with `cargo {}` (or drop --no-build)",
                bin.display(),
                BUILD.join(" ")
            );
            return ExitCode::from(2);
        }
    }
    let machine = Machine::read(&root, cpus);
    println!(
        "=== machine: {} × {}; {}; {}; load average {}",
        machine.cores, machine.cpu, machine.kernel, machine.rustc, machine.load_before
    );
    println!("    binaries from {}", ctx.target.join("release").display());
    if opts.quick {
        println!("    quick smoke run: the figures are not benchmarks");
    }

    let mut sections: Vec<Section> = Vec::new();
    let mut skipped = Vec::new();
    for (id, _) in SECTIONS {
        if !opts.only.is_empty() && !opts.only.contains(&id) {
            skipped.push(id);
            continue;
        }
        let t = Instant::now();
        let mut section = match id {
            "overhead" => suite::overhead::run(&ctx),
            "zero-downtime" => suite::zero_downtime::run(&ctx),
            "crash" => suite::crash::run(&ctx),
            "balance" => suite::balance::run(&ctx),
            "footprint" => suite::footprint::run(&ctx),
            "scale" => suite::scale::run(&ctx),
            "bad-deploy" => suite::bad_deploy::run(&ctx),
            "hostile" => suite::hostile::run(&ctx),
            "cross-check" => suite::cross_check::run(&ctx),
            "logs" => suite::logs::run(&ctx),
            "fleet" => suite::fleet::run(&ctx),
            "health" => suite::health::run(&ctx),
            "node" => suite::node::run(&ctx),
            "dispatch" => suite::dispatch::run(&ctx),
            "socketio" => suite::socketio::run(&ctx),
            "reuseport" => suite::reuseport::run(&ctx),
            "upgrade" => suite::upgrade::run(&ctx),
            "node-dispatch" => suite::node_dispatch::run(&ctx),
            _ => suite::soak::run(&ctx),
        };
        section.took = t.elapsed();
        println!(
            "  ({} took {})",
            section.title,
            suite::fmt_secs(section.took)
        );
        sections.push(section);
    }

    let run = suite::report::Run {
        machine: &machine,
        quick: opts.quick,
        command: command_line(&args),
        build,
        took: suite_started.elapsed(),
        skipped,
    };
    let text = suite::report::markdown(&run, &sections);
    let out = opts.out.unwrap_or_else(|| root.join("BENCHMARKS.md"));
    let written = std::fs::write(&out, text);

    println!("\n=== summary");
    let mut failed_steps = 0;
    for s in &sections {
        for c in &s.checks {
            println!(
                "  {} {}: {} (target {})",
                suite::mark(c.pass),
                c.what,
                c.measured,
                c.target
            );
        }
        failed_steps += s.errors.len();
    }
    println!(
        "  {failed_steps} failed steps; {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    match written {
        Ok(()) => println!("  report written to {}", out.display()),
        Err(e) => {
            eprintln!("bench: cannot write {}: {e}", out.display());
            return ExitCode::from(1);
        }
    }
    if failed_steps == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Parses the arguments; `None` for `--help`.
fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut opts = Options {
        build: true,
        ..Options::default()
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--quick" => opts.quick = true,
            "--no-build" => opts.build = false,
            "--out" => opts.out = Some(PathBuf::from(value("a path")?)),
            "--only" => {
                for want in value("a section")?.split(',').filter(|s| !s.is_empty()) {
                    let id = SECTIONS
                        .iter()
                        .map(|(id, _)| *id)
                        .find(|id| *id == want)
                        .ok_or_else(|| {
                            let names: Vec<&str> = SECTIONS.iter().map(|(id, _)| *id).collect();
                            format!("unknown section {want:?} (one of {})", names.join(", "))
                        })?;
                    if !opts.only.contains(&id) {
                        opts.only.push(id);
                    }
                }
            }
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
        if inline.is_some() && !matches!(name, "--out" | "--only") {
            return Err(format!("{name} takes no value"));
        }
    }
    Ok(Some(opts))
}

/// Runs the release build, its output on the console; bounded to 30 minutes.
fn build(cargo: &str, root: &Path) -> Result<(), String> {
    let proc = Proc::spawn(
        Command::new(cargo)
            .current_dir(root)
            .args(BUILD)
            .stdin(Stdio::null()),
        "cargo build",
    )?;
    match proc.wait_exit(Duration::from_secs(30 * 60)) {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("cargo {} failed: {status}", BUILD.join(" "))),
        None => {
            proc.stop("TERM", Duration::from_secs(10));
            Err(format!("cargo {} took over 30 minutes", BUILD.join(" ")))
        }
    }
}

/// Cargo's target directory (`cargo metadata`), else `$CARGO_TARGET_DIR`, else `ROOT/target`.
fn target_dir(cargo: &str, root: &Path) -> PathBuf {
    let meta = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["target_directory"].as_str().map(PathBuf::from));
    meta.or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| root.join("target"))
}

/// How this run was started, for the report.
fn command_line(args: &[String]) -> String {
    let mut cmd = String::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        cmd.push_str(&format!("CARGO_TARGET_DIR={} ", dir.to_string_lossy()));
    }
    cmd.push_str("cargo run --release -p clusterd-bench --bin bench");
    if !args.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&args.join(" "));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Options>, String> {
        let args: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse_args(&args)
    }

    #[test]
    fn arguments() {
        let o = parse("").unwrap().unwrap();
        assert!(o.build && !o.quick && o.only.is_empty() && o.out.is_none());
        let o = parse("--quick --only crash,balance --only crash --out /tmp/x.md --no-build")
            .unwrap()
            .unwrap();
        assert!(o.quick && !o.build);
        assert_eq!(o.only, vec!["crash", "balance"]);
        assert_eq!(o.out, Some(PathBuf::from("/tmp/x.md")));
        assert_eq!(parse("--only=scale").unwrap().unwrap().only, vec!["scale"]);
        assert_eq!(parse("-h").unwrap(), None);
        for (bad, why) in [
            ("--only nope", "unknown section"),
            ("--out", "needs a path"),
            ("--quick=1", "takes no value"),
            ("extra", "unexpected argument"),
        ] {
            assert!(parse(bad).unwrap_err().contains(why), "{bad}");
        }
    }
}
