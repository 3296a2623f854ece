//! 11. Logs: what worker log capture (`log_capture = on`) costs.
//!
//! 1. The lines per second clusterd passes on, and its CPU time per million lines: one
//!    worker, `yes` (an access-log line written as fast as the pipe takes it), under
//!    `protocol = systemd`, with `log_file = /dev/null` and with a file in the temp folder.
//!    Over a fixed window the worker's written bytes (`wchar` in /proc/PID/io) give the
//!    lines, and clusterd's `utime + stime` (/proc/PID/stat) its CPU time. What the pipe
//!    holds at either end of the window (64 KiB at most) is a rounding error. With the file,
//!    the lines in it are counted after the stop: none may be missing.
//! 2. The shop logging every request (`SHOP_LOG_REQUESTS=1`) under keep-alive
//!    `GET /products/1`, with `log_capture = on` (lines through clusterd into `log_file`)
//!    and `off` (the workers write to clusterd's stdout, a file): two clusterds side by side,
//!    runs interleaved, medians.
//!
//! The log goes to `log_file`, so this section does not use [`super::procs::Daemon`] (which
//! reads clusterd's stderr): it waits on the control socket's `Status` instead.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterd::proto::{Request, Response, Status};
use clusterd_bench::Report;

use super::procs::{Proc, TempDir, cpu_sample, free_port, poll_until, raw_request};
use super::{
    Check, Ctx, Route, Section, Table, fmt_ms, loadgen_command, median, mib, ms, thousands,
};

/// The worker's line: `yes` prints its arguments joined by spaces, a newline after each.
const LINE_ARGS: [&str; 4] = ["GET", "/products/1", "200", "0.043ms"];

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// The longest window of the line-rate runs (a file run writes some 100 MB a second).
const MAX_WINDOW: Duration = Duration::from_secs(3);

/// Before a window: the worker's pipe is full and clusterd is busy.
const SETTLE: Duration = Duration::from_millis(300);

/// Measured runs of each shop setup, interleaved (more, shorter rounds: this machine's load
/// drifts).
const SHOP_REPS: usize = 4;

/// The longest shop run.
const MAX_SHOP_RUN: Duration = Duration::from_secs(3);

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("logs");
    let devnull = line_rate(ctx, &mut s);
    shop(ctx, &mut s, devnull.as_ref());
    s
}

/// A clusterd started by this section: its config, stdout and stderr in a temp folder, its
/// log wherever the config's `log_file` says.
struct Clusterd {
    // Field order matters: the process is stopped before its folder is removed.
    proc: Proc,
    control: PathBuf,
    dir: TempDir,
}

impl Clusterd {
    fn start(ctx: &Ctx, tag: &str, config: &str) -> Result<Clusterd, String> {
        let dir = TempDir::new(tag)?;
        let control = dir.path().join("control.sock");
        let text = format!("{}\ncontrol = {}\n", config.trim_end(), control.display());
        let path = dir.path().join(format!("{tag}.conf"));
        std::fs::write(&path, text).map_err(|e| format!("cannot write config: {e}"))?;
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::File::create(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        let proc = Proc::spawn(
            Command::new(ctx.clusterd())
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(file("stdout.log")?)
                .stderr(file("stderr.log")?),
            "clusterd",
        )?;
        Ok(Clusterd { proc, control, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until `workers` workers are ready; their status.
    fn wait_ready(&self, workers: usize, timeout: Duration) -> Result<Status, String> {
        let mut last = String::from("no answer on the control socket");
        let status = poll_until(timeout, || {
            if self.proc.exit().is_some() {
                return Some(None);
            }
            match raw_request(&self.control, &Request::Status) {
                Ok(Response::Status(s))
                    if s.workers.len() == workers
                        && s.workers.iter().all(|w| w.state == "ready") =>
                {
                    Some(Some(*s))
                }
                Ok(other) => {
                    last = format!("{other:?}");
                    None
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        match status {
            Some(Some(s)) => Ok(s),
            Some(None) => Err(format!(
                "clusterd exited: {}",
                std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
            )),
            None => Err(format!(
                "{workers} workers not ready in {timeout:?}: {}",
                last.chars().take(300).collect::<String>()
            )),
        }
    }

    /// SIGTERM (a graceful stop: the workers drain), SIGKILL after 15 s.
    fn stop(&self) -> Result<(), String> {
        match self.proc.stop("TERM", Duration::from_secs(15)) {
            (Some(status), false) if status.success() => Ok(()),
            (Some(status), false) => Err(format!("clusterd exited with {status}")),
            _ => Err("clusterd did not stop within 15 s of SIGTERM (killed)".into()),
        }
    }
}

/// A field of /proc/PID/io: `wchar` (bytes written, to anything), `syscr` (read calls).
fn io_field(pid: u32, key: &str) -> Result<u64, String> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|text| super::procs::status_field(&text, key)?.parse().ok())
        .ok_or(format!("cannot read {key} in /proc/{pid}/io"))
}

/// clusterd's and the worker's counters at one moment of a line-rate run.
struct Look {
    at: Instant,
    /// Bytes the worker has written: its lines.
    worker_wchar: u64,
    worker_ticks: u64,
    clusterd_ticks: u64,
    clusterd_wchar: u64,
    clusterd_reads: u64,
}

/// clusterd's CPU ticks (utime + stime).
fn ticks(pid: u32) -> Result<u64, String> {
    cpu_sample(pid)
        .map(|c| c.ticks)
        .ok_or(format!("cannot read /proc/{pid}/stat"))
}

/// The lines of a file that contain `needle`, and all its lines.
fn count_lines(path: &Path, needle: &str) -> Result<(u64, u64), String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let needle = needle.as_bytes();
    let mut line = Vec::new();
    let (mut hits, mut all) = (0, 0);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok((hits, all)),
            Ok(_) => {
                all += 1;
                if line.windows(needle.len()).any(|w| w == needle) {
                    hits += 1;
                }
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// One line-rate run's figures.
struct LineRun {
    window: Duration,
    lines: u64,
    cpu_secs: f64,
    /// The worker's CPU time in the window.
    worker_cpu_secs: f64,
    /// What clusterd wrote in the window (its log lines, nearly all of it).
    written: u64,
    /// clusterd's read calls in the window (the worker's pipe, nearly all of them).
    reads: u64,
    /// With a file: the worker's lines in it after the stop, and the lines the worker had
    /// written by its last look.
    file: Option<(u64, u64)>,
}

impl LineRun {
    fn per_sec(&self) -> f64 {
        self.lines as f64 / self.window.as_secs_f64()
    }
    fn cpu_per_million(&self) -> f64 {
        self.cpu_secs / (self.lines as f64 / 1e6)
    }
}

fn line_config(log_file: &str) -> String {
    format!(
        "exec = yes {}\nprotocol = systemd\nready_after = 100ms\nworkers = 1\n\
         listen = 127.0.0.1:0\nbake = 0\nlog_capture = on\nlog_file = {log_file}\n",
        LINE_ARGS.join(" ")
    )
}

fn line_run(ctx: &Ctx, log_file: &str, window: Duration) -> Result<LineRun, String> {
    let line_bytes = LINE_ARGS.join(" ").len() as u64 + 1;
    let d = Clusterd::start(ctx, "logs-lines", &line_config(log_file))?;
    let status = d.wait_ready(1, Duration::from_secs(10))?;
    let cpid = d.proc.pid();
    let wpid = status.workers[0].pid.ok_or("the worker has no pid")?;
    std::thread::sleep(SETTLE);
    let look = || -> Result<Look, String> {
        Ok(Look {
            at: Instant::now(),
            worker_wchar: io_field(wpid, "wchar")?,
            clusterd_ticks: ticks(cpid)?,
            clusterd_wchar: io_field(cpid, "wchar")?,
            clusterd_reads: io_field(cpid, "syscr")?,
            worker_ticks: ticks(wpid)?,
        })
    };
    let a = look()?;
    std::thread::sleep(window);
    let b = look()?;
    let after = d.wait_ready(1, Duration::from_secs(5))?;
    if after.workers[0].pid != Some(wpid) {
        return Err("the worker was replaced during the window".into());
    }
    d.stop()?;
    let file = if log_file == "/dev/null" {
        None
    } else {
        let (lines, _) = count_lines(&d.path(log_file), "worker.output")?;
        Some((lines, b.worker_wchar / line_bytes))
    };
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SEC;
    Ok(LineRun {
        window: b.at - a.at,
        lines: b.worker_wchar.saturating_sub(a.worker_wchar) / line_bytes,
        cpu_secs: secs(a.clusterd_ticks, b.clusterd_ticks),
        worker_cpu_secs: secs(a.worker_ticks, b.worker_ticks),
        written: b.clusterd_wchar.saturating_sub(a.clusterd_wchar),
        reads: b.clusterd_reads.saturating_sub(a.clusterd_reads),
        file,
    })
}

/// Part 1; the run to /dev/null, if measured.
fn line_rate(ctx: &Ctx, s: &mut Section) -> Option<LineRun> {
    let window = ctx.p.overhead_run.min(MAX_WINDOW);
    s.md(&format!(
        "**Lines per second.** One worker, `yes {}`, writes its line as fast as its stdout \
         pipe takes it; clusterd (`log_capture = on`, `log_format = text`) passes every line \
         on as a `worker.output` event. Over a {:.0} s window (after {} ms of settling) the \
         worker's `wchar` (/proc/PID/io) divided by the line's {} bytes gives the lines, and \
         clusterd's `utime + stime` (/proc/PID/stat) its CPU time; the worker's CPU time \
         beside it shows how much of the window it spent writing rather than blocked on its \
         full pipe. The figure is what clusterd passes on with this machine's CPUs shared \
         among clusterd, the worker and whatever else runs.\n",
        LINE_ARGS.join(" "),
        window.as_secs_f64(),
        SETTLE.as_millis(),
        LINE_ARGS.join(" ").len() + 1
    ));
    let mut table = Table::new(&[
        "log_file",
        "window",
        "lines passed on",
        "lines/s",
        "clusterd CPU",
        "worker CPU",
        "clusterd CPU s per million lines",
        "clusterd wrote",
        "bytes per line out",
        "lines per clusterd read",
    ]);
    let mut devnull = None;
    for (log_file, label) in [
        ("/dev/null", "`/dev/null`"),
        ("lines.log", "a file in the temp folder"),
    ] {
        match line_run(ctx, log_file, window) {
            Ok(r) => {
                table.row(vec![
                    label.into(),
                    format!("{:.2} s", r.window.as_secs_f64()),
                    thousands(r.lines),
                    thousands(r.per_sec() as u64),
                    format!(
                        "{:.2} s ({:.0}%)",
                        r.cpu_secs,
                        100.0 * r.cpu_secs / r.window.as_secs_f64()
                    ),
                    format!(
                        "{:.2} s ({:.0}%)",
                        r.worker_cpu_secs,
                        100.0 * r.worker_cpu_secs / r.window.as_secs_f64()
                    ),
                    format!("{:.2}", r.cpu_per_million()),
                    mib(r.written),
                    format!("{:.0}", r.written as f64 / r.lines.max(1) as f64),
                    format!("{:.0}", r.lines as f64 / r.reads.max(1) as f64),
                ]);
                if let Some((in_file, written)) = r.file {
                    let lost = written.saturating_sub(in_file);
                    s.check(Check::new(
                        "logs: worker lines lost on the way to log_file",
                        "0",
                        format!(
                            "{lost} ({} in the file, {} written by the worker's last look)",
                            thousands(in_file),
                            thousands(written)
                        ),
                        Some(lost == 0),
                    ));
                }
                if log_file == "/dev/null" {
                    devnull = Some(r);
                }
            }
            Err(e) => {
                s.fail(&format!("line rate, log_file = {log_file}"), &e);
                if log_file != "/dev/null" {
                    s.check(Check::failed(
                        "logs: worker lines lost on the way to log_file",
                        "0",
                        &e,
                    ));
                }
            }
        }
    }
    s.table(&table);
    s.md(&format!(
        "Config (plus a `control` line):\n\n```ini\n{}```\n",
        line_config("/dev/null")
    ));
    devnull
}

/// One shop setup of part 2.
struct ShopSetup {
    capture: bool,
    daemon: Clusterd,
    addr: SocketAddr,
    runs: Vec<Report>,
    /// clusterd's CPU time over each measured run, in seconds.
    cpu: Vec<f64>,
    /// clusterd's CPU seconds per million requests (a line each) of each measured run.
    cpu_per_million: Vec<f64>,
    /// Requests (a line each) per clusterd read call, each measured run.
    lines_per_read: Vec<f64>,
    /// Requests answered 200, warm-up included.
    answered: u64,
}

fn shop_config(ctx: &Ctx, port: u16, capture: bool) -> String {
    format!(
        "exec = {}\nworkers = {}\nlisten = 127.0.0.1:{port}\nbake = 0\n\
         env = SHOP_LOG_REQUESTS=1\nlog_capture = {}\nlog_file = clusterd.log\n",
        ctx.shop().display(),
        ctx.workers(),
        if capture { "on" } else { "off" }
    )
}

fn start_shop(ctx: &Ctx, capture: bool) -> Result<ShopSetup, String> {
    let port = free_port()?;
    let tag = if capture { "logs-on" } else { "logs-off" };
    let daemon = Clusterd::start(ctx, tag, &shop_config(ctx, port, capture))?;
    daemon.wait_ready(ctx.workers() as usize, Duration::from_secs(30))?;
    Ok(ShopSetup {
        capture,
        daemon,
        addr: ([127, 0, 0, 1], port).into(),
        runs: Vec::new(),
        cpu: Vec::new(),
        cpu_per_million: Vec::new(),
        lines_per_read: Vec::new(),
        answered: 0,
    })
}

/// Part 2, and the check of part 1's line rate against the shop's request rate.
fn shop(ctx: &Ctx, s: &mut Section, devnull: Option<&LineRun>) {
    let p = &ctx.p;
    let run = p.overhead_run.min(MAX_SHOP_RUN);
    let workers = ctx.workers();
    let mut setups = Vec::new();
    for capture in [true, false] {
        match start_shop(ctx, capture) {
            Ok(setup) => setups.push(setup),
            Err(e) => s.fail(
                &format!("starting the shop, log_capture = {}", on_off(capture)),
                &e,
            ),
        }
    }
    for setup in &mut setups {
        let mut spec = Route::Products.spec(setup.addr, true);
        spec.duration = Some(p.overhead_warmup);
        match clusterd_bench::run(&spec) {
            Ok(r) => setup.answered += r.ok,
            Err(e) => s.fail("shop warm-up", &e.to_string()),
        }
    }
    for rep in 0..SHOP_REPS {
        let n = setups.len();
        for k in 0..n {
            let setup = &mut setups[(k + rep) % n];
            let mut spec = Route::Products.spec(setup.addr, true);
            spec.duration = Some(run);
            let cpid = setup.daemon.proc.pid();
            let before = (ticks(cpid), io_field(cpid, "syscr"));
            match clusterd_bench::run(&spec) {
                Ok(r) => {
                    let after = (ticks(cpid), io_field(cpid, "syscr"));
                    let cpu = match (&before.0, &after.0) {
                        (Ok(a), Ok(b)) => b.saturating_sub(*a) as f64 / TICKS_PER_SEC,
                        _ => f64::NAN,
                    };
                    if let (Ok(a), Ok(b)) = (&before.1, &after.1) {
                        setup
                            .lines_per_read
                            .push(r.total as f64 / b.saturating_sub(*a).max(1) as f64);
                    }
                    println!(
                        "     round {}/{SHOP_REPS} log_capture = {:<3} {:>9.0} req/s  p50 {}  p99 {}  failed {}  clusterd CPU {cpu:.2} s",
                        rep + 1,
                        on_off(setup.capture),
                        r.requests_per_sec(),
                        fmt_ms(ms(r.p50())),
                        fmt_ms(ms(r.p99())),
                        r.failed()
                    );
                    setup.answered += r.ok;
                    setup.cpu.push(cpu);
                    setup
                        .cpu_per_million
                        .push(cpu / (r.total.max(1) as f64 / 1e6));
                    setup.runs.push(r);
                }
                Err(e) => s.fail(
                    &format!("shop load, log_capture = {}", on_off(setup.capture)),
                    &e.to_string(),
                ),
            }
        }
    }

    let mut table = Table::new(&[
        "log_capture",
        "access log goes to",
        "req/s (median)",
        "p50",
        "p99",
        "failed",
        "clusterd CPU per run",
        "clusterd CPU s per million lines",
        "lines per clusterd read",
        "access lines logged / requests answered",
    ]);
    let mut rates = [None, None];
    // With capture: clusterd's CPU s per million lines, and lines per read.
    let mut captured = None;
    for setup in &setups {
        if let Err(e) = setup.daemon.stop() {
            s.fail(
                &format!("stopping the shop, log_capture = {}", on_off(setup.capture)),
                &e,
            );
        }
        // Captured lines are `worker.output` events in log_file; uncaptured ones are the
        // shop's own lines on clusterd's stdout.
        let (file, needle) = if setup.capture {
            ("clusterd.log", "line=\"GET /products/1 200 ")
        } else {
            ("stdout.log", "GET /products/1 200 ")
        };
        let logged = match count_lines(&setup.daemon.path(file), needle) {
            Ok((n, _)) => thousands(n),
            Err(e) => format!("? ({e})"),
        };
        if setup.runs.is_empty() {
            continue;
        }
        let rate = median(
            &setup
                .runs
                .iter()
                .map(Report::requests_per_sec)
                .collect::<Vec<_>>(),
        );
        rates[usize::from(!setup.capture)] = Some(rate);
        if setup.capture {
            captured = Some((
                median(&setup.cpu_per_million),
                median(&setup.lines_per_read),
            ));
        }
        let p50 = median(&setup.runs.iter().map(|r| ms(r.p50())).collect::<Vec<_>>());
        let p99 = median(&setup.runs.iter().map(|r| ms(r.p99())).collect::<Vec<_>>());
        let failed: u64 = setup.runs.iter().map(Report::failed).sum();
        table.row(vec![
            on_off(setup.capture).into(),
            if setup.capture {
                "clusterd → `log_file` (a file)".into()
            } else {
                "clusterd's stdout (a file)".into()
            },
            thousands(rate as u64),
            fmt_ms(p50),
            fmt_ms(p99),
            thousands(failed),
            format!(
                "{:.2} s ({:.0}%)",
                median(&setup.cpu),
                100.0 * median(&setup.cpu) / run.as_secs_f64()
            ),
            if setup.capture {
                format!("{:.2}", median(&setup.cpu_per_million))
            } else {
                "–".into()
            },
            if setup.capture {
                format!("{:.1}", median(&setup.lines_per_read))
            } else {
                "–".into()
            },
            format!("{logged} / {}", thousands(setup.answered)),
        ]);
    }

    let spec = {
        let mut spec = Route::Products.spec(([127, 0, 0, 1], 0).into(), true);
        spec.duration = Some(run);
        spec
    };
    s.md(&format!(
        "\n**The shop logging every request.** clusterd with {workers} shop workers, each \
         printing an access-log line per request to stdout (`SHOP_LOG_REQUESTS=1`: `GET \
         /products/1 200 0.041ms`). With `log_capture = on` the lines go through clusterd \
         into `log_file` as `worker.output` events; with `off` the workers write them \
         straight to clusterd's stdout, a file. Both clusterds run side by side (one idle \
         while the other is measured); a {} ms warm-up each, then {SHOP_REPS} runs of {} each, interleaved, \
         order rotating; medians. Load: `{}` (keep-alive, as in section 1).\n",
        p.overhead_warmup.as_millis(),
        super::fmt_secs(run),
        loadgen_command(&spec)
    ));
    s.table(&table);
    if let [Some(on), Some(off)] = rates {
        s.md(&format!(
            "With capture the shop serves **{:.2}×** its throughput without \
             ({} against {} req/s). The CPU clusterd spends passing a line per request on \
             comes out of the same {} CPUs the workers and the load generator run on.\n",
            on / off,
            thousands(on as u64),
            thousands(off as u64),
            ctx.cpus
        ));
        println!("  capture on / off: {:.2}×", on / off);
    }
    if let (Some((cpu, per_read)), Some(y)) = (captured, devnull) {
        s.md(&format!(
            "\nclusterd's CPU per million lines: {cpu:.2} s from the shop, {:.2} s from `yes` \
             in the first table. The shop writes one line per `write` and clusterd reads \
             {per_read:.1} lines per read call (its `syscr` in /proc/PID/io); `yes` fills the \
             pipe many lines per `write`, and clusterd read {:.0} per call.\n",
            y.cpu_per_million(),
            y.lines as f64 / y.reads.max(1) as f64
        ));
    }
    match (devnull.map(LineRun::per_sec), rates[1]) {
        (Some(lines), Some(off)) => s.check(Check::new(
            "logs: lines/s clusterd passes on, against the shop's request rate",
            "≥ the shop's req/s logging uncaptured (one line per request)",
            format!(
                "{} lines/s; the shop {} req/s",
                thousands(lines as u64),
                thousands(off as u64)
            ),
            Some(lines >= off),
        )),
        _ => s.check(Check::failed(
            "logs: lines/s clusterd passes on, against the shop's request rate",
            "≥ the shop's req/s logging uncaptured (one line per request)",
            "a run failed",
        )),
    }
    s.md(&format!(
        "\nShop config (plus a `control` line; `log_capture = off` for the other):\n\n\
         ```ini\n{}```\n",
        shop_config(ctx, 0, true).replace(
            &ctx.shop().display().to_string(),
            "target/release/examples/shop"
        )
    ));
    s.md(
        "\nCommands: `cargo run --release -p clusterd-bench --bin bench -- --only logs`; by \
         hand, `target/release/clusterd -c logs.conf` with the config above, then \
         `grep wchar /proc/$WORKER_PID/io` and fields 14 and 15 of `/proc/$CLUSTERD_PID/stat` \
         a few seconds apart (`clusterctl status` shows the worker's pid); for the shop, \
         `target/release/loadgen` as above against each config.\n",
    );
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}
