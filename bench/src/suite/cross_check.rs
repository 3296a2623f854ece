//! 10. Cross-check: the shop under clusterd measured by our load generator and by wrk.
//!
//! Every other section measures with `clusterd_bench` (the library behind `loadgen`), so a
//! slip that both our client and our server make goes unseen: the shop once closed a
//! `Connection: close` request's connection without saying `Connection: close` in the
//! response, which loadgen took in its stride while wrk counted a read error for almost
//! every request (403,915 of 411,113 in one run). This section runs the same load with both
//! clients against the same clusterd, new connection per request (`--new-conn` and
//! `wrk -H "Connection: close"`) and keep-alive, the rounds interleaved, and puts their
//! requests/s and errors side by side. wrk is Debian's package (`apt-get install wrk`); when
//! it is not installed the section says so and measures nothing, without failing the suite.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterd_bench::Report;

use super::procs::{Proc, TempDir};
use super::{
    Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, loadgen_command, median, ms,
    thousands,
};

/// Where Debian's package installs wrk; else it is looked up in `PATH`.
const WRK: &str = "/usr/bin/wrk";

/// The per-request timeout of both clients (loadgen's default; wrk's is 2 s).
const TIMEOUT: Duration = Duration::from_secs(10);

/// What wrk printed, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkReport {
    /// `N requests in T`: responses read completely.
    pub requests: u64,
    pub elapsed: Duration,
    /// `Requests/sec:`.
    pub requests_per_sec: f64,
    /// `Socket errors: connect A, read B, write C, timeout D` (absent when all are 0).
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// `Non-2xx or 3xx responses: N` (absent when 0).
    pub non_2xx: u64,
    /// From `--latency`'s distribution, when printed.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl WrkReport {
    /// Socket errors of every kind plus non-2xx/3xx responses.
    pub fn errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx
    }

    /// The errors by class, e.g. `read 3, non-2xx 1`, or `none`.
    pub fn classes(&self) -> String {
        let parts: Vec<String> = [
            ("connect", self.connect),
            ("read", self.read),
            ("write", self.write),
            ("timeout", self.timeout),
            ("non-2xx/3xx", self.non_2xx),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Parses wrk 4's report (as printed with `--latency`).
pub fn parse_wrk(out: &str) -> Result<WrkReport, String> {
    let mut r = WrkReport::default();
    let mut found_requests = false;
    let mut found_rate = false;
    let mut in_distribution = false;
    for line in out.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            match line.split_once('%') {
                Some((pct, value)) if pct.trim().parse::<f64>().is_ok() => {
                    let value = parse_time(value.trim())
                        .ok_or_else(|| format!("bad latency line {line:?}"))?;
                    match pct.trim() {
                        "50" => r.p50 = Some(value),
                        "99" => r.p99 = Some(value),
                        _ => {}
                    }
                    continue;
                }
                _ => in_distribution = false,
            }
        }
        if let Some((n, rest)) = line.split_once(" requests in ") {
            r.requests = n
                .trim()
                .parse()
                .map_err(|_| format!("bad request count in {line:?}"))?;
            let t = rest.split(',').next().unwrap_or_default().trim();
            r.elapsed = parse_time(t).ok_or_else(|| format!("bad duration in {line:?}"))?;
            found_requests = true;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(kind), Some(n), None) = (words.next(), words.next(), words.next()) else {
                    return Err(format!("bad socket errors line {line:?}"));
                };
                let n: u64 = n
                    .parse()
                    .map_err(|_| format!("bad socket errors line {line:?}"))?;
                match kind {
                    "connect" => r.connect = n,
                    "read" => r.read = n,
                    "write" => r.write = n,
                    "timeout" => r.timeout = n,
                    _ => return Err(format!("unknown socket error {kind:?} in {line:?}")),
                }
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = n
                .trim()
                .parse()
                .map_err(|_| format!("bad non-2xx line {line:?}"))?;
        } else if let Some(x) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = x
                .trim()
                .parse()
                .map_err(|_| format!("bad rate line {line:?}"))?;
            found_rate = true;
        }
    }
    if !found_requests || !found_rate {
        return Err(format!("not a wrk report: {:?}", out.trim()));
    }
    Ok(r)
}

/// wrk's times: `412.00us`, `5.79ms`, `3.10s`, `1.00m`, `1.00h`.
fn parse_time(s: &str) -> Option<Duration> {
    let unit_at = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(unit_at);
    let n: f64 = n.parse().ok()?;
    let ns_per_unit = match unit {
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => return None,
    };
    let ns = (n * ns_per_unit).round();
    (ns.is_finite() && ns >= 0.0 && ns < u64::MAX as f64).then(|| Duration::from_nanos(ns as u64))
}

/// wrk, if installed: [`WRK`], else the first `wrk` in `PATH`.
fn find_wrk() -> Option<PathBuf> {
    let candidates = std::iter::once(PathBuf::from(WRK)).chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("wrk"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    candidates.into_iter().find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// wrk's version line (`wrk debian/4.1.0-3+b2 [epoll] …`), for the report.
fn wrk_version(wrk: &Path) -> String {
    Command::new(wrk)
        .arg("-v")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.split(" Copyright").next().unwrap_or(l).trim().to_string())
        })
        .filter(|l| l.starts_with("wrk"))
        .unwrap_or_else(|| "wrk (version unknown)".into())
}

/// The wrk arguments of the load `loadgen` runs with these settings.
fn wrk_args(url: &str, duration: Duration, keep_alive: bool) -> Vec<String> {
    let mut args = vec![
        "-t".to_string(),
        super::THREADS.to_string(),
        "-c".into(),
        super::CONNECTIONS.to_string(),
        "-d".into(),
        format!("{}s", duration.as_secs().max(1)),
        "--timeout".into(),
        format!("{}s", TIMEOUT.as_secs()),
        "--latency".into(),
    ];
    if !keep_alive {
        args.push("-H".into());
        args.push("Connection: close".into());
    }
    args.push(url.to_string());
    args
}

/// Runs wrk once; its output goes to a file in `dir`.
fn run_wrk(
    wrk: &Path,
    dir: &Path,
    args: &[String],
    duration: Duration,
) -> Result<WrkReport, String> {
    let out_path = dir.join("wrk.out");
    let err_path = dir.join("wrk.err");
    let out = std::fs::File::create(&out_path).map_err(|e| format!("wrk output: {e}"))?;
    let err = std::fs::File::create(&err_path).map_err(|e| format!("wrk output: {e}"))?;
    let proc = Proc::spawn(
        Command::new(wrk)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
        "wrk",
    )?;
    let status = match proc.wait_exit(duration + Duration::from_secs(30)) {
        Some(status) => status,
        None => {
            proc.stop("TERM", Duration::from_secs(2));
            return Err(format!("wrk did not finish within {duration:?} + 30 s"));
        }
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        return Err(format!(
            "wrk failed ({status}): {}{}",
            text.trim(),
            err.trim()
        ));
    }
    parse_wrk(&text)
}

/// The runs of one client in one mode.
#[derive(Default)]
struct Runs {
    loadgen: Vec<Report>,
    wrk: Vec<WrkReport>,
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("cross-check");
    let p = &ctx.p;
    let workers = ctx.workers();
    let Some(wrk) = find_wrk() else {
        let why = "wrk is not installed (Debian: `apt-get install wrk`)";
        println!("  skipped: {why}");
        s.md(&format!(
            "**Not measured: {why}.** This section runs the shop's new-connection load with \
             wrk beside loadgen, so that an error only an independent client sees cannot hide \
             behind our own load generator. Install wrk and run \
             `cargo run --release -p clusterd-bench --bin bench -- --only cross-check`.\n"
        ));
        s.check(Check::failed(
            "wrk, new connection: errors",
            "0",
            "wrk is not installed",
        ));
        return s;
    };
    let version = wrk_version(&wrk);
    println!("  {version} ({})", wrk.display());
    let dir = match TempDir::new("cross-check") {
        Ok(d) => d,
        Err(e) => {
            s.fail("making a temp folder", &e);
            return s;
        }
    };
    let daemon = match ctx.ready_shop_daemon("cross-check", &workers.to_string(), "") {
        Ok(d) => d,
        Err(e) => {
            s.fail("starting clusterd", &e);
            return s;
        }
    };
    let addr = match daemon.addr() {
        Ok(a) => a,
        Err(e) => {
            s.fail("reading the listener's address", &e);
            return s;
        }
    };
    println!(
        "  clusterd pid {} on {addr}, {workers} shop workers",
        daemon.pid()
    );
    let route = Route::Products;
    let url = format!("http://{addr}{}", route.spec(addr, true).path);

    let modes = [false, true];
    let mut runs: Vec<Runs> = modes.iter().map(|_| Runs::default()).collect();
    for (m, &keep_alive) in modes.iter().enumerate() {
        println!("  -- {} {}", route.label(), super::mode(keep_alive));
        let mut warm = route.spec(addr, keep_alive);
        warm.duration = Some(p.overhead_warmup);
        if let Err(e) = clusterd_bench::run(&warm) {
            s.fail("warm-up", &e.to_string());
        }
        for round in 0..p.cross_reps {
            // Alternate which client goes first, so drift hits both alike.
            for k in 0..2 {
                if (k + round) % 2 == 0 {
                    let mut spec = route.spec(addr, keep_alive);
                    spec.duration = Some(p.cross_run);
                    match clusterd_bench::run(&spec) {
                        Ok(r) => {
                            println!(
                                "     round {}/{} loadgen {:>9.0} req/s  failed {}",
                                round + 1,
                                p.cross_reps,
                                r.requests_per_sec(),
                                r.failed()
                            );
                            runs[m].loadgen.push(r);
                        }
                        Err(e) => s.fail("loadgen", &e.to_string()),
                    }
                } else {
                    let args = wrk_args(&url, p.cross_run, keep_alive);
                    match run_wrk(&wrk, dir.path(), &args, p.cross_run) {
                        Ok(r) => {
                            println!(
                                "     round {}/{} wrk     {:>9.0} req/s  errors {}",
                                round + 1,
                                p.cross_reps,
                                r.requests_per_sec,
                                r.errors()
                            );
                            runs[m].wrk.push(r);
                        }
                        Err(e) => s.fail("wrk", &e),
                    }
                }
            }
        }
    }
    drop(daemon);

    let mut table = Table::new(&[
        "mode",
        "client",
        "req/s (median)",
        "runs (min–max)",
        "p50",
        "p99",
        "requests",
        "errors",
        "errors by class",
        "loadgen ÷ wrk",
    ]);
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!(
            "{}–{}",
            thousands(lo.round() as u64),
            thousands(hi.round() as u64)
        )
    };
    for (m, &keep_alive) in modes.iter().enumerate() {
        let mode = super::mode(keep_alive);
        let r = &runs[m];
        let lg_rps: Vec<f64> = r.loadgen.iter().map(Report::requests_per_sec).collect();
        let wrk_rps: Vec<f64> = r.wrk.iter().map(|w| w.requests_per_sec).collect();
        let ratio = (!lg_rps.is_empty() && !wrk_rps.is_empty())
            .then(|| median(&lg_rps) / median(&wrk_rps))
            .filter(|x| x.is_finite());
        if !r.loadgen.is_empty() {
            let p50: Vec<f64> = r.loadgen.iter().map(|x| ms(x.p50())).collect();
            let p99: Vec<f64> = r.loadgen.iter().map(|x| ms(x.p99())).collect();
            let failed: u64 = r.loadgen.iter().map(Report::failed).sum();
            let mut classes: Vec<String> = r.loadgen.iter().map(failure_classes).collect();
            classes.retain(|c| c != "none");
            table.row(vec![
                mode.into(),
                "loadgen".into(),
                thousands(median(&lg_rps).round() as u64),
                range(&lg_rps),
                fmt_ms(median(&p50)),
                fmt_ms(median(&p99)),
                thousands(r.loadgen.iter().map(|x| x.total).sum()),
                thousands(failed),
                if classes.is_empty() {
                    "none".into()
                } else {
                    classes.join("; ")
                },
                ratio.map_or_else(String::new, |x| format!("{x:.2}×")),
            ]);
            if !keep_alive {
                s.check(Check::new(
                    "cross-check, loadgen, new connection: failed requests",
                    "0",
                    thousands(failed),
                    Some(failed == 0),
                ));
            }
        }
        if !r.wrk.is_empty() {
            let p50: Vec<f64> = r.wrk.iter().filter_map(|x| x.p50).map(ms).collect();
            let p99: Vec<f64> = r.wrk.iter().filter_map(|x| x.p99).map(ms).collect();
            let errors: u64 = r.wrk.iter().map(WrkReport::errors).sum();
            let mut classes: Vec<String> = r.wrk.iter().map(WrkReport::classes).collect();
            classes.retain(|c| c != "none");
            table.row(vec![
                mode.into(),
                "wrk".into(),
                thousands(median(&wrk_rps).round() as u64),
                range(&wrk_rps),
                fmt_ms(median(&p50)),
                fmt_ms(median(&p99)),
                thousands(r.wrk.iter().map(|x| x.requests).sum()),
                thousands(errors),
                if classes.is_empty() {
                    "none".into()
                } else {
                    classes.join("; ")
                },
                String::new(),
            ]);
            if !keep_alive {
                s.check(Check::new(
                    "cross-check, wrk, new connection: errors (socket errors + non-2xx/3xx)",
                    "0",
                    thousands(errors),
                    Some(errors == 0),
                ));
            }
        }
    }

    s.md(&format!(
        "The shop's `{route}` under clusterd ({workers} workers), measured by two clients \
         in turn: loadgen (ours) and {version}, {conns} connections on {threads} threads, \
         {run:?} per run, {reps} rounds per mode, the clients alternating (a {warm:?} \
         warm-up precedes each mode). New connection: one request per connection, the \
         request saying `Connection: close`; a server that closes without saying so in its \
         response makes wrk reuse the dead connection and count a read error, which is how \
         issue 12 item 19 was found. Errors: loadgen's failed requests, wrk's socket errors \
         (connect, read, write, timeout) plus non-2xx/3xx responses; both clients time a \
         request out after {timeout:?}. Throughput differs between the clients (they spend \
         the machine's CPUs differently, and loadgen waits for the server's FIN after \
         `Connection: close`, so the server holds TIME_WAIT, where wrk closes its socket as soon as it has read \
         the response); the \
         point is that both see the same server: no errors, and figures of one order.\n",
        route = route.label(),
        conns = super::CONNECTIONS,
        threads = super::THREADS,
        run = p.cross_run,
        reps = p.cross_reps,
        warm = p.overhead_warmup,
        timeout = TIMEOUT,
    ));
    s.table(&table);
    let any_addr = ([127, 0, 0, 1], 0).into();
    let mut commands = format!(
        "With `target/release/clusterd -c cross-check.conf` (`exec = \
         target/release/examples/shop`, `workers = {workers}`, `listen = 127.0.0.1:0`), one \
         round of each mode is:\n\n```sh\n"
    );
    for keep_alive in modes {
        let mut spec = route.spec(any_addr, keep_alive);
        spec.duration = Some(p.cross_run);
        commands.push_str(&loadgen_command(&spec));
        commands.push('\n');
        let args = wrk_args("http://127.0.0.1:$PORT/products/1", p.cross_run, keep_alive);
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            })
            .collect();
        commands.push_str(&format!("wrk {}\n", args.join(" ")));
    }
    commands.push_str("```\n");
    s.md(&commands);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1.0 against the shop before it echoed `Connection: close` (issue 12 item 19).
    const BROKEN: &str = "Running 20s test @ http://127.0.0.1:3000/products/1
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.01ms    2.10ms  40.00ms   80.00%
    Req/Sec    10.33k     1.00k   12.00k    70.00%
  Latency Distribution
     50%    2.50ms
     75%    3.50ms
     90%    5.00ms
     99%   12.34ms
  411113 requests in 20.10s, 70.00MB read
  Socket errors: connect 0, read 403915, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  20453.38
Transfer/sec:      3.48MB
";

    const CLEAN: &str = "Running 3s test @ http://127.0.0.1:37307/products/1
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.33ms    8.95ms  49.35ms   68.87%
    Req/Sec     2.55k     1.05k    5.59k    70.69%
  15650 requests in 3.10s, 2.81MB read
Requests/sec:   5040.93
Transfer/sec:      0.90MB
";

    #[test]
    fn parses_wrk_reports() {
        let r = parse_wrk(BROKEN).unwrap();
        assert_eq!(r.requests, 411_113);
        assert_eq!(r.elapsed, Duration::from_millis(20_100));
        assert_eq!(r.requests_per_sec, 20453.38);
        assert_eq!((r.connect, r.read, r.write, r.timeout), (0, 403_915, 0, 2));
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.errors(), 403_924);
        assert_eq!(r.classes(), "read 403915, timeout 2, non-2xx/3xx 7");
        assert_eq!(r.p50, Some(Duration::from_micros(2500)));
        assert_eq!(r.p99, Some(Duration::from_micros(12_340)));

        let r = parse_wrk(CLEAN).unwrap();
        assert_eq!((r.requests, r.errors(), r.p50), (15_650, 0, None));
        assert_eq!(r.classes(), "none");

        assert!(parse_wrk("").is_err());
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
        let bad = CLEAN.replace("15650 requests", "many requests");
        assert!(parse_wrk(&bad).is_err());
        let bad = BROKEN.replace("read 403915", "lost 403915");
        assert!(parse_wrk(&bad).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("412.00us"), Some(Duration::from_micros(412)));
        assert_eq!(parse_time("1.50m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_time("2.00h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_time("3"), None);
        assert_eq!(parse_time("3.0x"), None);
    }

    #[test]
    fn wrk_arguments_match_the_loadgen_load() {
        let args = wrk_args(
            "http://127.0.0.1:1/products/1",
            Duration::from_secs(5),
            false,
        );
        assert_eq!(
            args.join(" "),
            "-t 2 -c 64 -d 5s --timeout 10s --latency -H Connection: close http://127.0.0.1:1/products/1"
        );
        let args = wrk_args("http://x/", Duration::from_millis(300), true);
        assert!(args.contains(&"1s".to_string()) && !args.contains(&"-H".to_string()));
    }
}
