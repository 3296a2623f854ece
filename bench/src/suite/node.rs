//! 14. Node.js app: the unmodified Express shop under clusterd, PM2 and a `cluster` master.
//!
//! The app is examples/express-shop (`app.listen(3000)`, nothing about any supervisor). Its
//! npm packages, and PM2's (bench/node, pinned by its package-lock.json), are installed with
//! `npm ci` under `TARGET/bench-node/` (again only when a lock file changed). Three
//! supervisors run it with the same worker count:
//!
//! - clusterd, `protocol = node` (its adapter maps the listen call onto clusterd's listener,
//!   reports READY, drains on SIGTERM), `bake = 0` as in section 2; restarts with
//!   `clusterctl restart`;
//! - PM2 in cluster mode (`pm2 start server.js -i N`) with a PM2_HOME of its own in a temp
//!   folder; restarts with `pm2 reload`; stopped with `pm2 kill`;
//! - bench/node/cluster-master.js, a `cluster` primary written as Node's docs write one;
//!   restarts on SIGHUP, one worker at a time.
//!
//! The same preload (bench/node/bench-preload.js, `node -r`) runs in every worker under all
//! three: it points `listen(3000)` at a free port (PM2 and the cluster master; other programs
//! may hold 3000 here) and adds `X-Worker: PID` to every response, so that the load generator
//! sees which worker answered. Each supervisor in turn: throughput (keep-alive GETs), failed
//! requests over N rolling restarts in each of the four loads, crash recovery (`kill -9` of
//! a worker under new-connection load: the time until a new worker answers), and the
//! supervisor's RSS.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterd_bench::Report;

use super::procs::{
    Daemon, Proc, TempDir, alive, cpu_sample, free_port, poll_until, signal, status_kb,
};
use super::{
    Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, max, median, mib, mode, thousands,
};

/// The four loads of the restart rows.
const ROWS: [(Route, bool); 4] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Checkout, true),
    (Route::Checkout, false),
];

/// Pause between two restarts, and between two kills.
const RESTART_GAP: Duration = Duration::from_millis(200);
const KILL_GAP: Duration = Duration::from_millis(1000);
/// Connections of the crash load (new connection per request).
const CRASH_CONNECTIONS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Clusterd,
    Pm2,
    Cluster,
    /// The cluster master restarting as the Black Friday tutorial does.
    Tutorial,
}

/// Every supervisor the section compares, in the order of its rows.
const KINDS: [Kind; 4] = [Kind::Clusterd, Kind::Pm2, Kind::Cluster, Kind::Tutorial];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Clusterd => "clusterd (`protocol = node`)",
            Kind::Pm2 => "PM2 cluster mode",
            Kind::Cluster => "Node `cluster` master (docs)",
            Kind::Tutorial => "Node `cluster` master (tutorial)",
        }
    }
    fn supervisor(self) -> &'static str {
        match self {
            Kind::Clusterd => "clusterd",
            Kind::Pm2 => "PM2 God daemon",
            Kind::Cluster | Kind::Tutorial => "the cluster primary",
        }
    }
    fn restart(self) -> &'static str {
        match self {
            Kind::Clusterd => "`clusterctl restart`",
            Kind::Pm2 => "`pm2 reload shop`",
            Kind::Cluster | Kind::Tutorial => "SIGHUP to the primary",
        }
    }
}

/// Where the installed things are.
pub(super) struct Install {
    /// The express-shop folder with its node_modules.
    app: PathBuf,
    /// The bench/node folder with node_modules (PM2), the preload and the master.
    tools: PathBuf,
}

impl Install {
    /// examples/express-shop, installed with `npm ci` under the target folder, and
    /// bench/node (PM2, the preload, the cluster master) beside it.
    pub(super) fn new(ctx: &Ctx) -> Result<Install, String> {
        let app = npm_ci(ctx, &ctx.root.join("examples/express-shop"), "express-shop")?;
        let tools = npm_ci(ctx, &ctx.root.join("bench/node"), "tools")?;
        Ok(Install { app, tools })
    }
    fn server(&self) -> PathBuf {
        self.app.join("server.js")
    }
    fn preload(&self) -> PathBuf {
        self.tools.join("bench-preload.js")
    }
    /// The worker command of every supervisor: the unmodified shop, with the preload.
    pub(super) fn exec(&self) -> String {
        format!(
            "node -r {} {}",
            self.preload().display(),
            self.server().display()
        )
    }
    fn master(&self) -> PathBuf {
        self.tools.join("cluster-master.js")
    }
    fn pm2(&self) -> PathBuf {
        self.tools.join("node_modules/pm2/bin/pm2")
    }
}

/// Copies the files of `from` to `TARGET/bench-node/to` and runs `npm ci` there, unless it
/// already ran with the same lock file.
fn npm_ci(ctx: &Ctx, from: &Path, to: &str) -> Result<PathBuf, String> {
    let dir = ctx.target.join("bench-node").join(to);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(entry.file_name()))
                .map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
        }
    }
    let lock = std::fs::read(from.join("package-lock.json"))
        .map_err(|e| format!("{}: {e}", from.join("package-lock.json").display()))?;
    let stamp = dir.join("node_modules/.clusterd-bench-lock");
    if std::fs::read(&stamp).ok().as_ref() == Some(&lock) {
        return Ok(dir);
    }
    println!("  npm ci in {}", dir.display());
    let log = dir.join("npm-ci.log");
    let file = std::fs::File::create(&log).map_err(|e| format!("cannot create npm-ci.log: {e}"))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("cannot create npm-ci.log: {e}"))?;
    let proc = Proc::spawn(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err),
        "npm ci",
    )
    .map_err(|e| format!("{e} (the section needs node and npm on the PATH)"))?;
    match proc.wait_exit_blocking(Duration::from_secs(600)) {
        Some(s) if s.success() => {}
        other => {
            return Err(format!(
                "npm ci in {} failed ({other:?}):\n{}",
                dir.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
    }
    std::fs::write(&stamp, &lock).map_err(|e| format!("cannot write the install stamp: {e}"))?;
    Ok(dir)
}

/// The version of PM2 `npm ci` installed under `tools`.
fn pm2_version(tools: &Path) -> String {
    std::fs::read_to_string(tools.join("node_modules/pm2/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(String::from))
        .unwrap_or_else(|| "(version unknown)".into())
}

/// The node processes running the app below `pid` (its children whose command line names
/// server.js), zombies left out.
fn app_children(pid: u32) -> Vec<u32> {
    let mut out = BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for child in text
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("server.js") && alive(child) {
                out.insert(child);
            }
        }
    }
    out.into_iter().collect()
}

/// A running supervisor of the app.
enum Sup {
    Clusterd(Daemon),
    Pm2 {
        god: u32,
        pm2: PathBuf,
        home: TempDir,
    },
    Cluster {
        proc: Proc,
        out: PathBuf,
        _dir: TempDir,
    },
}

impl Sup {
    fn start(
        kind: Kind,
        ctx: &Ctx,
        inst: &Install,
        workers: u32,
    ) -> Result<(Sup, SocketAddr), String> {
        let exec = inst.exec();
        match kind {
            Kind::Clusterd => {
                let config = format!(
                    "exec = {exec}\nprotocol = node\nworkers = {workers}\n\
                     listen = 127.0.0.1:0\nbake = 0\n"
                );
                let d =
                    Daemon::start(&ctx.clusterd(), &ctx.clusterctl(), "node-clusterd", &config)?;
                d.wait_pool_ready(1, Duration::from_secs(60))?;
                let addr = d.addr()?;
                Ok((Sup::Clusterd(d), addr))
            }
            Kind::Pm2 => {
                let home = TempDir::new("pm2-home")?;
                let port = free_port()?;
                let pm2 = inst.pm2();
                let node_args = format!("-r {}", inst.preload().display());
                pm2_cli(
                    &pm2,
                    home.path(),
                    port,
                    &[
                        "start",
                        &inst.server().to_string_lossy(),
                        "-i",
                        &workers.to_string(),
                        "--name",
                        "shop",
                        "--node-args",
                        &node_args,
                    ],
                )?;
                let god = std::fs::read_to_string(home.path().join("pm2.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .ok_or("PM2 wrote no pm2.pid")?;
                let sup = Sup::Pm2 { god, pm2, home };
                Ok((sup, ([127, 0, 0, 1], port).into()))
            }
            Kind::Cluster | Kind::Tutorial => {
                let dir = TempDir::new("node-cluster")?;
                let port = free_port()?;
                let out = dir.path().join("primary.log");
                let file = std::fs::File::create(&out)
                    .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
                let err = file.try_clone().map_err(|e| e.to_string())?;
                let proc = Proc::spawn(
                    Command::new("node")
                        .arg("-r")
                        .arg(inst.preload())
                        .arg(inst.master())
                        .arg(inst.server())
                        .env("WORKERS", workers.to_string())
                        .env(
                            "STYLE",
                            if kind == Kind::Tutorial {
                                "tutorial"
                            } else {
                                "docs"
                            },
                        )
                        .env("BENCH_PORT", port.to_string())
                        .current_dir(&inst.app)
                        .stdin(Stdio::null())
                        .stdout(file)
                        .stderr(err),
                    "node cluster-master.js",
                )?;
                Ok((
                    Sup::Cluster {
                        proc,
                        out,
                        _dir: dir,
                    },
                    ([127, 0, 0, 1], port).into(),
                ))
            }
        }
    }

    /// The supervisor's pid.
    fn pid(&self) -> u32 {
        match self {
            Sup::Clusterd(d) => d.pid(),
            Sup::Pm2 { god, .. } => *god,
            Sup::Cluster { proc, .. } => proc.pid(),
        }
    }

    fn workers(&self) -> Vec<u32> {
        app_children(self.pid())
    }

    /// Waits until exactly `n` app processes run below the supervisor and a GET answers.
    fn settle(&self, addr: SocketAddr, n: usize, timeout: Duration) -> Result<(), String> {
        let mut last = Vec::new();
        poll_until(timeout, || {
            last = self.workers();
            (last.len() == n
                && clusterd_bench::get(addr, "/products/1").is_ok_and(|r| r.status == 200))
            .then_some(())
        })
        .ok_or_else(|| {
            format!(
                "{} did not settle to {n} workers answering in {timeout:?} (workers: {last:?}){}",
                self.name(),
                self.log_tail()
            )
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Sup::Clusterd(_) => "clusterd",
            Sup::Pm2 { .. } => "PM2",
            Sup::Cluster { .. } => "the cluster master",
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Sup::Clusterd(d) => format!("; log ends:\n{}", d.tail()),
            Sup::Pm2 { home, .. } => {
                let text = std::fs::read_to_string(home.path().join("pm2.log")).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "; pm2.log ends:\n{}",
                    lines[lines.len().saturating_sub(8)..].join("\n")
                )
            }
            Sup::Cluster { out, .. } => {
                let text = std::fs::read_to_string(out).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "; output ends:\n{}",
                    lines[lines.len().saturating_sub(8)..].join("\n")
                )
            }
        }
    }

    /// One rolling restart, waiting for its end; its wall time.
    fn restart(&self, addr: SocketAddr) -> Result<Duration, String> {
        let started = Instant::now();
        match self {
            Sup::Clusterd(d) => {
                d.restart(Duration::from_secs(120))?;
            }
            Sup::Pm2 { pm2, home, .. } => {
                pm2_cli(pm2, home.path(), addr.port(), &["reload", "shop"])?;
            }
            Sup::Cluster { proc, out, .. } => {
                let done = || {
                    std::fs::read_to_string(out)
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| *l == "restart done")
                        .count()
                };
                let before = done();
                signal(proc.pid(), "HUP")?;
                poll_until(Duration::from_secs(120), || (done() > before).then_some(()))
                    .ok_or_else(|| format!("no `restart done` in 120 s{}", self.log_tail()))?;
            }
        }
        Ok(started.elapsed())
    }

    /// Stops the supervisor and its workers.
    fn stop(self) -> Result<(), String> {
        match self {
            Sup::Clusterd(d) => d.stop(Duration::from_secs(30)).map(|_| ()),
            Sup::Pm2 { god, pm2, home } => {
                let workers = app_children(god);
                let r = pm2_cli(&pm2, home.path(), 0, &["kill"]);
                let gone = poll_until(Duration::from_secs(10), || {
                    (!alive(god) && workers.iter().all(|&w| !alive(w))).then_some(())
                });
                if gone.is_none() {
                    // `pm2 kill` failed: the processes PM2 started for this section, by pid.
                    for pid in workers.iter().chain([&god]) {
                        if alive(*pid) {
                            let _ = signal(*pid, "KILL");
                        }
                    }
                    return Err(format!("pm2 kill left PM2 running ({r:?}): killed by pid"));
                }
                r
            }
            Sup::Cluster { proc, .. } => {
                // The tutorial's primary has no SIGTERM handler: it dies, and its workers
                // exit once they see the IPC channel close and their connections end.
                let workers = app_children(proc.pid());
                let (status, killed) = proc.stop("TERM", Duration::from_secs(10));
                let gone = poll_until(Duration::from_secs(15), || {
                    workers.iter().all(|&w| !alive(w)).then_some(())
                });
                if gone.is_none() {
                    for &pid in &workers {
                        if alive(pid) {
                            let _ = signal(pid, "KILL");
                        }
                    }
                    return Err(
                        "the cluster workers outlived their primary by 15 s: killed \
                                by pid"
                            .into(),
                    );
                }
                if killed {
                    Err(format!("the cluster primary needed SIGKILL ({status:?})"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Runs the PM2 CLI with its own PM2_HOME (and BENCH_PORT for the apps it starts).
fn pm2_cli(pm2: &Path, home: &Path, port: u16, args: &[&str]) -> Result<(), String> {
    let out = home.join("cli.out");
    let file =
        std::fs::File::create(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let proc = Proc::spawn(
        Command::new("node")
            .arg(pm2)
            .args(args)
            .env("PM2_HOME", home)
            .env("BENCH_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err),
        "pm2",
    )?;
    match proc.wait_exit_blocking(Duration::from_secs(120)) {
        Some(s) if s.success() => Ok(()),
        other => Err(format!(
            "pm2 {} failed ({other:?}):\n{}",
            args.join(" "),
            std::fs::read_to_string(&out).unwrap_or_default()
        )),
    }
}

/// One load's restarts: the load's report and each restart's wall time, or why they failed.
type RestartRow = Result<(Report, Vec<Duration>), String>;

/// A supervisor started (or not) with what it measured so far.
type Running = (Kind, Option<(Sup, SocketAddr)>, Results);

/// What one supervisor measured.
#[derive(Default)]
struct Results {
    throughput: Option<Report>,
    /// Supervisor CPU seconds per second during the throughput run.
    sup_cpu: Option<f64>,
    restarts: Vec<(String, RestartRow)>,
    /// Kill to a new worker's first response, and kill to the worker count back at N (ms).
    kills: Vec<(f64, f64)>,
    crash_load: Option<Report>,
    rss_idle: Option<u64>,
    rss_peak: Option<u64>,
    errors: Vec<String>,
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("node");
    let p = &ctx.p;
    let workers = ctx.workers();
    let full = p.restarts >= 20;
    let kills = if full { 5 } else { 2 };
    // Throughput: interleaved runs per supervisor, the median by requests/s.
    let (run_time, reps) = if full {
        (Duration::from_secs(3), 3)
    } else {
        (Duration::from_secs(1), 1)
    };
    let inst = match Install::new(ctx) {
        Ok(i) => i,
        Err(e) => {
            s.fail("installing the npm packages", &e);
            return s;
        }
    };
    let node = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let kinds = KINDS;
    // All of them run at once (the idle ones cost no CPU) so that the throughput runs can be
    // interleaved: this machine's background load moves, and each gets the median of its runs.
    let mut running: Vec<Running> = Vec::new();
    for kind in kinds {
        println!("  -- starting under {}", kind.label());
        let mut r = Results::default();
        let sup = start(ctx, &inst, kind, workers, &mut r);
        running.push((kind, sup, r));
    }
    throughput(&mut running, run_time, reps);
    let mut all = Vec::new();
    for (kind, sup, mut r) in running {
        println!("  -- {}", kind.label());
        if let Some((sup, addr)) = sup {
            measure(ctx, sup, addr, workers, kills, &mut r);
        }
        for e in &r.errors {
            s.fail(kind.label(), e);
        }
        all.push((kind, r));
    }

    s.md(&format!(
        "examples/express-shop (Express 5, `app.listen(3000)`, unchanged) on Node {node}, \
         {workers} workers under each supervisor in turn. Every worker runs with the same \
         preload, `node -r bench/node/bench-preload.js`: it adds `X-Worker: PID` to each \
         response (to see which worker answered) and, under PM2 and the cluster master, points \
         `listen(3000)` at a free port (clusterd's adapter maps any port onto its listener). \
         PM2 {pm2} comes from the npm registry, pinned by bench/node/package-lock.json and \
         installed with `npm ci` under `target/bench-node/`; it runs with a PM2_HOME of its own \
         and is stopped with `pm2 kill`. The cluster master is bench/node/cluster-master.js: \
         one worker per CPU, a new one when one dies, and on SIGHUP a rolling restart as \
         Node's docs write it (fork a new worker, once it listens `disconnect()` an old one, \
         which closes its server, and `kill()` it if it has not exited 2 s later); the \
         *tutorial* row is the same file with `STYLE=tutorial`, restarting as the popular \
         Black Friday tutorial does: each worker in turn gets a `shutdown` message, calls \
         `server.close()` and exits (after 10 s at the latest, the tutorials' force-exit timer), and only then is its replacement forked. clusterd \
         runs with `bake = 0` (as in section 2: the bake is waiting, measured in section 8).\n",
        pm2 = pm2_version(&inst.tools)
    ));

    // Summary table.
    let mut t = Table::new(&[
        "supervisor",
        "GET keep-alive req/s (p99)",
        &format!("failed over {} restarts: GET keep-alive", p.restarts),
        "GET new connection",
        "POST keep-alive",
        "POST new connection",
        "crash: kill -9 → a new worker answers, median (max)",
        "supervisor RSS idle (peak)",
    ]);
    for (kind, r) in &all {
        let mut row = vec![kind.label().to_string()];
        row.push(match &r.throughput {
            Some(rep) => format!(
                "{} ({})",
                thousands(rep.requests_per_sec() as u64),
                fmt_ms(super::ms(rep.p99()))
            ),
            None => "–".into(),
        });
        for (route, keep_alive) in ROWS {
            let label = format!("{} {}", route.label(), mode(keep_alive));
            let cell = match r.restarts.iter().find(|(l, _)| *l == label) {
                Some((_, Ok((rep, _)))) => {
                    format!("{} of {}", thousands(rep.failed()), thousands(rep.total))
                }
                Some((_, Err(_))) => "failed".into(),
                None => "–".into(),
            };
            row.push(cell);
        }
        let serve: Vec<f64> = r.kills.iter().map(|k| k.0).collect();
        row.push(if serve.is_empty() {
            "–".into()
        } else {
            format!("{} ({})", fmt_ms(median(&serve)), fmt_ms(max(&serve)))
        });
        row.push(match (r.rss_idle, r.rss_peak) {
            (Some(i), Some(p)) => format!("{} ({})", mib(i), mib(p)),
            (Some(i), None) => mib(i),
            _ => "–".into(),
        });
        t.row(row);
    }
    s.table(&t);

    // Checks: clusterd's targets.
    if let Some((_, r)) = all.iter().find(|(k, _)| *k == Kind::Clusterd) {
        for (route, keep_alive) in ROWS {
            let label = format!("{} {}", route.label(), mode(keep_alive));
            let what = format!("Node.js app under clusterd: failed requests, {label}");
            match r.restarts.iter().find(|(l, _)| *l == label) {
                Some((_, Ok((rep, restarts)))) => s.check(Check::new(
                    &what,
                    "0",
                    format!(
                        "{} of {} ({} restarts)",
                        thousands(rep.failed()),
                        thousands(rep.total),
                        restarts.len()
                    ),
                    Some(rep.failed() == 0 && restarts.len() == p.restarts && rep.ok > 0),
                )),
                Some((_, Err(e))) => s.check(Check::failed(&what, "0", e)),
                None => s.check(Check::failed(&what, "0", "not run")),
            }
        }
    }

    // Restart details.
    let mut rt = Table::new(&[
        "supervisor",
        "load",
        "restarts",
        "requests",
        "failed",
        "failures by class",
        "GET retries¹",
        "one restart, median (max)",
    ]);
    let mut samples = String::new();
    for (kind, r) in &all {
        for (label, res) in &r.restarts {
            match res {
                Ok((rep, times)) => {
                    let v: Vec<f64> = times.iter().map(|d| super::ms(*d)).collect();
                    samples.push_str(&super::error_samples(
                        &format!("{}, {label}", kind.label()),
                        rep,
                    ));
                    rt.row(vec![
                        kind.label().into(),
                        label.clone(),
                        times.len().to_string(),
                        thousands(rep.total),
                        thousands(rep.failed()),
                        failure_classes(rep),
                        thousands(rep.retried),
                        format!("{} ({})", fmt_ms(median(&v)), fmt_ms(max(&v))),
                    ]);
                }
                Err(e) => rt.row(vec![
                    kind.label().into(),
                    label.clone(),
                    format!("failed: {e}"),
                ]),
            }
        }
    }
    s.md(&format!(
        "### Rolling restarts\n\nFor each load ({conns} connections, `loadgen` as in section \
         2): the load starts, {n} rolling restarts run one after another ({gap:?} apart; \
         {restarts}), the suite waits until exactly {workers} workers are left and answer, and \
         stops the load. Every request counts.\n",
        conns = super::CONNECTIONS,
        n = p.restarts,
        gap = RESTART_GAP,
        restarts = KINDS
            .iter()
            .map(|k| format!("{}: {}", k.label(), k.restart()))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    s.table(&rt);
    s.md(
        "¹ A keep-alive GET whose reused connection was closed before any byte of the response \
         is retried once on a new connection, as browsers do; POSTs are never retried.\n\n",
    );
    if !samples.is_empty() {
        s.md(&format!("Errors the load generator saw:\n\n{samples}\n"));
    }

    // Crash details.
    let mut ct = Table::new(&[
        "supervisor",
        "kills",
        "kill -9 → a new worker answers, median (max)",
        "kill -9 → worker count back, median (max)",
        "requests during the kills",
        "failed",
        "failures by class",
    ]);
    for (kind, r) in &all {
        let serve: Vec<f64> = r.kills.iter().map(|k| k.0).collect();
        let back: Vec<f64> = r.kills.iter().map(|k| k.1).collect();
        let mut row = vec![
            kind.label().into(),
            r.kills.len().to_string(),
            format!("{} ({})", fmt_ms(median(&serve)), fmt_ms(max(&serve))),
            format!("{} ({})", fmt_ms(median(&back)), fmt_ms(max(&back))),
        ];
        if let Some(rep) = &r.crash_load {
            row.push(thousands(rep.total));
            row.push(thousands(rep.failed()));
            row.push(failure_classes(rep));
        }
        ct.row(row);
    }
    s.md(&format!(
        "### Crash recovery\n\nUnder {CRASH_CONNECTIONS} connections of `GET /products/1`, a \
         new connection per request (so that every worker, a new one included, gets its share \
         at once), {kills} times: `kill -9` one worker (in turn), and poll every millisecond \
         for the first response whose `X-Worker` is a pid never seen before (a new worker \
         serving), and for the supervisor's worker processes to be {workers} again; \
         {gap:?} between two kills.\n",
        gap = KILL_GAP,
    ));
    s.table(&ct);

    // Throughput and RSS.
    let mut tt = Table::new(&[
        "supervisor",
        "req/s",
        "p50",
        "p99",
        "failed",
        "supervisor CPU during the run",
        "supervisor RSS idle",
        "supervisor peak RSS (VmHWM, whole section)",
    ]);
    for (kind, r) in &all {
        let mut row = vec![kind.label().into()];
        match &r.throughput {
            Some(rep) => {
                row.push(thousands(rep.requests_per_sec() as u64));
                row.push(fmt_ms(super::ms(rep.p50())));
                row.push(fmt_ms(super::ms(rep.p99())));
                row.push(thousands(rep.failed()));
            }
            None => row.extend(["–".into(), "–".into(), "–".into(), "–".into()]),
        }
        row.push(
            r.sup_cpu
                .map_or("–".into(), |c| format!("{:.0}%", c * 100.0)),
        );
        row.push(r.rss_idle.map_or("–".into(), mib));
        row.push(r.rss_peak.map_or("–".into(), mib));
        tt.row(row);
    }
    s.md(&format!(
        "### Throughput and footprint\n\n`GET /products/1`, {conns} keep-alive connections: the \
         three supervisors run side by side (the idle ones cost no CPU), and after a 1 s \
         warm-up each, {reps} rounds of one {t:?} run against each in turn; the median run \
         (by requests/s) is shown, and the supervisor's CPU time over its runs. The \
         supervisor's RSS is read from /proc once its workers \
         are ready (idle), and its `VmHWM` at the end of its runs. *Supervisor*: {}.\n",
        KINDS
            .iter()
            .map(|k| format!("{}: {}", k.label(), k.supervisor()))
            .collect::<Vec<_>>()
            .join(", "),
        conns = super::CONNECTIONS,
        t = run_time,
        reps = reps,
    ));
    s.table(&tt);

    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut cmds = String::from(
        "```sh\n# clusterd: exec = node -r $BENCH/bench-preload.js $APP/server.js\n#           protocol = node, workers = N, listen = 127.0.0.1:0, bake = 0\ntarget/release/clusterctl -c node.conf restart\n\n# PM2 (its own PM2_HOME):\nPM2_HOME=$TMP/pm2 BENCH_PORT=$PORT node $BENCH/node_modules/pm2/bin/pm2 start $APP/server.js -i N --name shop --node-args \"-r $BENCH/bench-preload.js\"\nPM2_HOME=$TMP/pm2 node $BENCH/node_modules/pm2/bin/pm2 reload shop\nPM2_HOME=$TMP/pm2 node $BENCH/node_modules/pm2/bin/pm2 kill\n\n# the cluster master:\nWORKERS=N BENCH_PORT=$PORT node -r $BENCH/bench-preload.js $BENCH/cluster-master.js $APP/server.js &\nkill -HUP $PRIMARY_PID\n\n# loads:\n",
    );
    let mut tspec = Route::Products.spec(addr, true);
    tspec.duration = Some(run_time);
    cmds.push_str(&super::loadgen_command(&tspec));
    cmds.push('\n');
    for (route, keep_alive) in ROWS {
        cmds.push_str(&super::loadgen_command(&route.spec(addr, keep_alive)));
        cmds.push_str(" -d 10m &   # then the restarts\n");
    }
    let mut cspec = Route::Products.spec(addr, false);
    cspec.connections = CRASH_CONNECTIONS;
    cspec.threads = 1;
    cmds.push_str(&super::loadgen_command(&cspec));
    cmds.push_str(" -d 10m &   # then kill -9 $WORKER_PID\n```\n");
    s.md(&cmds);
    s
}

/// Starts `kind` and waits until its workers answer; its idle RSS.
fn start(
    ctx: &Ctx,
    inst: &Install,
    kind: Kind,
    workers: u32,
    r: &mut Results,
) -> Option<(Sup, SocketAddr)> {
    let (sup, addr) = match Sup::start(kind, ctx, inst, workers) {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(format!("starting: {e}"));
            return None;
        }
    };
    if let Err(e) = sup.settle(addr, workers as usize, Duration::from_secs(60)) {
        r.errors.push(format!("starting: {e}"));
        if let Err(e) = sup.stop() {
            r.errors.push(format!("stopping: {e}"));
        }
        return None;
    }
    r.rss_idle = status_kb(sup.pid(), "VmRSS");
    Some((sup, addr))
}

/// Keep-alive GETs against each running supervisor in turn, `reps` rounds after a warm-up;
/// each keeps its median run (by requests/s) and the supervisor's CPU share over its runs.
fn throughput(running: &mut [Running], run_time: Duration, reps: usize) {
    let mut runs: Vec<Vec<Report>> = running.iter().map(|_| Vec::new()).collect();
    let mut cpu: Vec<(f64, f64)> = running.iter().map(|_| (0.0, 0.0)).collect();
    for round in 0..=reps {
        for (i, (kind, sup, r)) in running.iter_mut().enumerate() {
            let Some((sup, addr)) = sup else { continue };
            let mut spec = Route::Products.spec(*addr, true);
            // Round 0 is the warm-up.
            spec.duration = Some(if round == 0 {
                Duration::from_secs(1)
            } else {
                run_time
            });
            let cpu0 = cpu_sample(sup.pid());
            let t0 = Instant::now();
            match clusterd_bench::run(&spec) {
                Ok(rep) if round > 0 => {
                    println!(
                        "     {}: {:.0} req/s, p99 {}, {} failed",
                        kind.label(),
                        rep.requests_per_sec(),
                        fmt_ms(super::ms(rep.p99())),
                        rep.failed()
                    );
                    if let (Some(a), Some(b)) = (cpu0, cpu_sample(sup.pid())) {
                        cpu[i].0 += b.ticks.saturating_sub(a.ticks) as f64 / 100.0;
                        cpu[i].1 += t0.elapsed().as_secs_f64();
                    }
                    runs[i].push(rep);
                }
                Ok(_) => {}
                Err(e) => r.errors.push(format!("throughput: {e}")),
            }
        }
    }
    for (i, (_, _, r)) in running.iter_mut().enumerate() {
        let mut v = std::mem::take(&mut runs[i]);
        v.sort_by(|a, b| a.requests_per_sec().total_cmp(&b.requests_per_sec()));
        if !v.is_empty() {
            let mid = v.len() / 2;
            r.throughput = Some(v.swap_remove(mid));
        }
        if cpu[i].1 > 0.0 {
            r.sup_cpu = Some(cpu[i].0 / cpu[i].1);
        }
    }
}

/// The restarts and the kills of one supervisor, then its peak RSS; stops it.
fn measure(ctx: &Ctx, sup: Sup, addr: SocketAddr, workers: u32, kills: usize, r: &mut Results) {
    let n = workers as usize;
    for (route, keep_alive) in ROWS {
        let label = format!("{} {}", route.label(), mode(keep_alive));
        println!("     -- {label}");
        let res = restarts(ctx, &sup, addr, n, route, keep_alive);
        if let Err(e) = &res {
            r.errors.push(format!("{label}: {e}"));
        }
        r.restarts.push((label, res));
    }
    match crash(&sup, addr, n, kills) {
        Ok((k, rep)) => {
            r.kills = k;
            r.crash_load = Some(rep);
        }
        Err(e) => r.errors.push(format!("crash recovery: {e}")),
    }
    r.rss_peak = status_kb(sup.pid(), "VmHWM");
    if let Err(e) = sup.stop() {
        r.errors.push(format!("stopping: {e}"));
    }
}

fn restarts(
    ctx: &Ctx,
    sup: &Sup,
    addr: SocketAddr,
    n: usize,
    route: Route,
    keep_alive: bool,
) -> RestartRow {
    let mut spec = route.spec(addr, keep_alive);
    spec.duration = Some(Duration::from_secs(600));
    let load = clusterd_bench::start(spec).map_err(|e| format!("cannot start the load: {e}"))?;
    if !load.wait_for_ok(100, Duration::from_secs(15)) {
        return Err(format!("the load never got going:\n{}", load.stop()));
    }
    std::thread::sleep(RESTART_GAP);
    let mut times = Vec::new();
    let mut error = None;
    for i in 0..ctx.p.restarts {
        match sup.restart(addr) {
            Ok(d) => times.push(d),
            Err(e) => {
                error = Some(format!("restart {}: {e}", i + 1));
                break;
            }
        }
        std::thread::sleep(RESTART_GAP);
    }
    let settled = sup.settle(addr, n, Duration::from_secs(60));
    std::thread::sleep(RESTART_GAP);
    let report = load.stop();
    let v: Vec<f64> = times.iter().map(|d| super::ms(*d)).collect();
    println!(
        "        {} restarts (median {}), {} failed of {} ({})",
        times.len(),
        fmt_ms(median(&v)),
        report.failed(),
        report.total,
        failure_classes(&report)
    );
    if let Some(e) = error {
        return Err(e);
    }
    settled?;
    Ok((report, times))
}

/// Kills workers under new-connection load: per kill, ms to a new worker's first response
/// and to the worker count back at `n`; and the load's report.
#[allow(clippy::type_complexity)]
fn crash(
    sup: &Sup,
    addr: SocketAddr,
    n: usize,
    kills: usize,
) -> Result<(Vec<(f64, f64)>, Report), String> {
    let mut spec = Route::Products.spec(addr, false);
    spec.connections = CRASH_CONNECTIONS;
    spec.threads = 1;
    spec.duration = Some(Duration::from_secs(300));
    let load = clusterd_bench::start(spec).map_err(|e| format!("cannot start the load: {e}"))?;
    if !load.wait_for_ok(100, Duration::from_secs(15)) {
        return Err(format!("the load never got going:\n{}", load.stop()));
    }
    std::thread::sleep(KILL_GAP);
    let mut out = Vec::new();
    for i in 0..kills {
        let pids = sup.workers();
        let Some(&victim) = pids.get(i % pids.len().max(1)) else {
            return Err("no worker to kill".into());
        };
        let known: BTreeSet<String> = load.snapshot().workers.keys().cloned().collect();
        let t0 = Instant::now();
        signal(victim, "KILL")?;
        let (mut serve, mut back) = (None, None);
        let end = t0 + Duration::from_secs(30);
        while (serve.is_none() || back.is_none()) && Instant::now() < end {
            if serve.is_none()
                && load
                    .snapshot()
                    .workers
                    .keys()
                    .any(|k| !known.contains(k) && k != &victim.to_string())
            {
                serve = Some(super::ms(t0.elapsed()));
            }
            if back.is_none() {
                let now = sup.workers();
                if now.len() == n && !now.contains(&victim) {
                    back = Some(super::ms(t0.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (Some(serve), Some(back)) = (serve, back) else {
            return Err(format!(
                "kill {}: no new worker answering within 30 s (answered: {serve:?}, count back: \
                 {back:?}){}",
                i + 1,
                sup.log_tail()
            ));
        };
        println!(
            "     kill {}/{kills}: pid {victim}: a new worker answered after {}, count back after {}",
            i + 1,
            fmt_ms(serve),
            fmt_ms(back)
        );
        out.push((serve, back));
        std::thread::sleep(KILL_GAP);
    }
    Ok((out, load.stop()))
}
