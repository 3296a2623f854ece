//! The benchmark suite behind `bench`: what every section shares.
//!
//! Each section is a function `fn(&Ctx) -> Section`. It prints as it goes, and returns its
//! Markdown (tables, method, configs, commands) and its [`Check`]s: a measured figure beside
//! its target. A step that fails is recorded in the section ([`Section::fail`]) and the
//! section goes on with what it can; nothing a section does can stop the suite.

pub mod bad_deploy;
pub mod balance;
pub mod crash;
pub mod cross_check;
pub mod dispatch;
pub mod fleet;
pub mod footprint;
pub mod health;
pub mod hostile;
pub mod log;
pub mod logs;
pub mod machine;
pub mod node;
pub mod node_dispatch;
pub mod overhead;
pub mod procs;
pub mod report;
pub mod reuseport;
pub mod scale;
pub mod soak;
pub mod socketio;
pub mod upgrade;
pub mod zero_downtime;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clusterd_bench::{Method, Report, Spec};

use procs::Daemon;

/// The sections, in the order they run.
pub const SECTIONS: [(&str, &str); 19] = [
    ("overhead", "1. Overhead"),
    ("zero-downtime", "2. Zero-downtime rolling restarts"),
    ("crash", "3. Crash recovery"),
    ("balance", "4. Balance"),
    ("footprint", "5. Footprint"),
    ("scale", "6. Scale: 64 workers"),
    ("soak", "7. Soak: a thousand rolling restarts"),
    ("bad-deploy", "8. Bad deploy: bake and rollback"),
    ("hostile", "9. Hostile clients"),
    ("cross-check", "10. Cross-check: loadgen against wrk"),
    ("logs", "11. Logs: worker output through clusterd"),
    ("fleet", "12. Fleet: three hosts behind HAProxy"),
    ("health", "13. Worker health"),
    ("node", "14. Node.js app"),
    ("dispatch", "15. Dispatch: clusterd passes the connections"),
    ("socketio", "16. Socket.IO: sticky sessions on four workers"),
    ("reuseport", "17. Dispatch: shared queue or reuseport"),
    ("upgrade", "18. Upgrade: clusterd replaced in place"),
    ("node-dispatch", "19. Dispatch with Node workers"),
];

/// Connections of every load (as `wrk -c64` in the issue's comparisons).
pub const CONNECTIONS: usize = 64;

/// Load generator threads, as `wrk -t2 -c64` (wrk's default thread count) in the issue's
/// figures: two event loops, one per CPU of this machine.
pub const THREADS: usize = 2;

/// The body of every `POST /checkout`.
pub const CART: &[u8] = br#"{"cart":[1,2,3]}"#;

/// How long, and how often, each section measures: the full run or `--quick`.
#[derive(Clone, Debug)]
pub struct Params {
    /// Overhead: one measured run, the warm-up before each series, runs per setup.
    pub overhead_run: Duration,
    pub overhead_warmup: Duration,
    pub overhead_reps: usize,
    /// Zero-downtime: restarts per row and the pause between two.
    pub restarts: usize,
    pub restart_gap: Duration,
    /// Crash: kills, and the pause between two.
    pub kills: usize,
    pub kill_gap: Duration,
    /// Balance: one run.
    pub balance_run: Duration,
    /// Footprint: the idle window, the status round trips, start and cold-start runs.
    pub idle: Duration,
    pub status_runs: usize,
    pub start_runs: usize,
    pub cold_runs: usize,
    pub static_build: bool,
    /// Scale: the worker count.
    pub scale_workers: u32,
    /// Soak: rolling restarts in a row.
    pub soak_restarts: usize,
    /// Bad deploy: healthy restarts timed with and without the bake.
    pub bake_runs: usize,
    /// Cross-check: one run of each client, and rounds per mode.
    pub cross_run: Duration,
    pub cross_reps: usize,
    /// Upgrade: in-place upgrades of clusterd in a row.
    pub upgrades: usize,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                overhead_run: Duration::from_secs(1),
                overhead_warmup: Duration::from_millis(300),
                overhead_reps: 2,
                restarts: 5,
                restart_gap: Duration::from_millis(200),
                kills: 3,
                kill_gap: Duration::from_millis(700),
                balance_run: Duration::from_millis(1500),
                idle: Duration::from_secs(3),
                status_runs: 20,
                start_runs: 3,
                cold_runs: 2,
                static_build: false,
                scale_workers: 64,
                soak_restarts: 40,
                bake_runs: 1,
                cross_run: Duration::from_secs(1),
                cross_reps: 1,
                upgrades: 20,
            }
        } else {
            Params {
                overhead_run: Duration::from_secs(5),
                overhead_warmup: Duration::from_secs(1),
                overhead_reps: 5,
                restarts: 20,
                restart_gap: Duration::from_millis(500),
                kills: 10,
                kill_gap: Duration::from_millis(1100),
                balance_run: Duration::from_secs(5),
                idle: Duration::from_secs(10),
                status_runs: 100,
                start_runs: 10,
                cold_runs: 5,
                static_build: true,
                scale_workers: 64,
                soak_restarts: 1000,
                bake_runs: 3,
                cross_run: Duration::from_secs(5),
                cross_reps: 3,
                upgrades: 100,
            }
        }
    }
}

/// What every section needs: where things are, the machine, the parameters.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub p: Params,
    /// The workspace root.
    pub root: PathBuf,
    /// Cargo's target directory.
    pub target: PathBuf,
    /// CPUs available to this process (what `workers = auto` means to clusterd).
    pub cpus: usize,
}

impl Ctx {
    /// The release binary or example `name`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.target.join("release").join(name)
    }
    pub fn clusterd(&self) -> PathBuf {
        self.bin("clusterd")
    }
    pub fn clusterctl(&self) -> PathBuf {
        self.bin("clusterctl")
    }
    pub fn shop(&self) -> PathBuf {
        self.bin("examples/shop")
    }

    /// The worker count of the multi-worker sections: `auto`, but at least 2 so that a
    /// rolling restart replaces more than one worker and a balance has two sides.
    pub fn workers(&self) -> u32 {
        self.cpus.max(2) as u32
    }

    /// Starts clusterd with shop workers on an ephemeral port: `workers` is a number or
    /// `auto`, `extra` more config lines. Without a `bake` line in `extra`, `bake = 0`: a
    /// healthy restart's bake is only waiting, and section 8 measures what it costs.
    pub fn shop_daemon(&self, tag: &str, workers: &str, extra: &str) -> Result<Daemon, String> {
        let bake = if extra.contains("bake") {
            ""
        } else {
            "bake = 0\n"
        };
        let config = format!(
            "exec = {}\nworkers = {workers}\nlisten = 127.0.0.1:0\n{bake}{extra}\n",
            self.shop().display()
        );
        Daemon::start(&self.clusterd(), &self.clusterctl(), tag, &config)
    }

    /// [`Ctx::shop_daemon`], then waits until every worker is ready.
    pub fn ready_shop_daemon(
        &self,
        tag: &str,
        workers: &str,
        extra: &str,
    ) -> Result<Daemon, String> {
        let d = self.shop_daemon(tag, workers, extra)?;
        d.wait_pool_ready(1, Duration::from_secs(30))?;
        Ok(d)
    }
}

/// A measured figure beside its target, for the summary and the section's tables.
#[derive(Clone, Debug)]
pub struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// Met, missed, or not measured (the step failed, or was skipped).
    pub pass: Option<bool>,
}

impl Check {
    pub fn new(what: &str, target: &str, measured: String, pass: Option<bool>) -> Check {
        Check {
            what: what.to_string(),
            target: target.to_string(),
            measured,
            pass,
        }
    }

    /// A target that could not be measured, and why.
    pub fn failed(what: &str, target: &str, why: &str) -> Check {
        Check::new(what, target, format!("not measured: {why}"), None)
    }
}

/// ✓ or ✗ (or `–` when not measured).
pub fn mark(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "–",
    }
}

/// One section's results.
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub title: String,
    /// Markdown under the section's heading.
    pub body: String,
    pub checks: Vec<Check>,
    /// Steps that failed, with why.
    pub errors: Vec<String>,
    pub took: Duration,
}

impl Section {
    pub fn new(id: &str) -> Section {
        let title = SECTIONS
            .iter()
            .find(|(i, _)| *i == id)
            .map_or(id, |(_, t)| *t);
        println!("\n=== {title}");
        Section {
            title: title.to_string(),
            ..Section::default()
        }
    }

    /// Records a failed step, printing it at once.
    pub fn fail(&mut self, step: &str, why: &str) {
        println!("  FAILED {step}: {why}");
        self.errors.push(format!("{step}: {why}"));
    }

    /// Adds a check, printing it at once.
    pub fn check(&mut self, check: Check) {
        println!(
            "  {} {}: {} (target {})",
            mark(check.pass),
            check.what,
            check.measured,
            check.target
        );
        self.checks.push(check);
    }

    /// Appends Markdown.
    pub fn md(&mut self, text: &str) {
        self.body.push_str(text);
        if !text.ends_with('\n') {
            self.body.push('\n');
        }
    }

    /// Appends a table, as a block of its own.
    pub fn table(&mut self, table: &Table) {
        if !self.body.is_empty() && !self.body.ends_with("\n\n") {
            self.body.push('\n');
        }
        self.md(&table.markdown());
        self.body.push('\n');
    }
}

/// A Markdown table, also printed on the console as it is built.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (printing it).
    pub fn row(&mut self, cells: Vec<String>) {
        let line: Vec<String> = self
            .header
            .iter()
            .zip(&cells)
            .filter(|(_, c)| !c.is_empty())
            .map(|(h, c)| format!("{h}: {c}"))
            .collect();
        println!("  | {}", line.join(" | "));
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| {} |",
            self.header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for row in &self.rows {
            let mut cells: Vec<String> = row.iter().map(|c| esc(c)).collect();
            cells.resize(self.header.len(), String::new());
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }
}

/// The median of `v` (the mean of the two middle values for an even count); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A duration in ms for tables: `0.84 ms`, `12.3 ms`, `1520 ms`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// A section's duration: `0.4 s`, `236 s`.
pub fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

/// A count with thousands separators: `19,394`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in MiB: `1.23 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The sample error messages of a report, as Markdown list items under `label` (nothing when
/// there are none): what the load generator saw, for diagnosis.
pub fn error_samples(label: &str, r: &Report) -> String {
    let mut out = String::new();
    for (message, n) in r.errors.iter().take(8) {
        let _ = writeln!(out, "- {label}: {n} × `{}`", message.replace('`', "'"));
    }
    out
}

/// The failures of a report by class, e.g. `reset 3, timeout 1`, or `none`.
pub fn failure_classes(r: &Report) -> String {
    let mut parts: Vec<String> = r
        .non_2xx
        .iter()
        .map(|(status, n)| format!("HTTP {status} {n}"))
        .collect();
    for (label, n) in [
        ("connect error", r.connect_error),
        ("reset", r.reset),
        ("EOF before response", r.eof_before_response),
        ("closed unanswered on a reused connection", r.idle_close),
        ("EOF mid-response", r.eof_mid_response),
        ("timeout", r.timeout),
        ("bad response", r.bad_response),
        ("other", r.other_error),
    ] {
        if n > 0 {
            parts.push(format!("{label} {n}"));
        }
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

/// A load of the shop: `GET /products/1`, `GET /cpu` or `POST /checkout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Products,
    Cpu,
    Checkout,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::Products => "GET /products/1",
            Route::Cpu => "GET /cpu",
            Route::Checkout => "POST /checkout",
        }
    }

    /// A spec for this route against `addr`: [`CONNECTIONS`] connections on [`THREADS`]
    /// threads, 10 s timeout.
    pub fn spec(self, addr: SocketAddr, keep_alive: bool) -> Spec {
        let mut spec = Spec {
            connections: CONNECTIONS,
            threads: THREADS,
            keep_alive,
            timeout: Duration::from_secs(10),
            ..Spec::new(addr)
        };
        match self {
            Route::Products => spec.path = "/products/1".into(),
            Route::Cpu => spec.path = "/cpu".into(),
            Route::Checkout => {
                spec.method = Method::Post;
                spec.path = "/checkout".into();
                spec.body = CART.to_vec();
            }
        }
        spec
    }
}

/// A fenced `sh` block of the `loadgen` commands of `loads` (route, keep-alive), each
/// running for `run`.
pub fn loadgen_block(loads: &[(Route, bool)], run: Duration) -> String {
    let addr = ([127, 0, 0, 1], 0).into();
    let mut block = String::from("```sh\n");
    for &(route, keep_alive) in loads {
        let mut spec = route.spec(addr, keep_alive);
        spec.duration = Some(run);
        block.push_str(&loadgen_command(&spec));
        block.push('\n');
    }
    block.push_str("```\n");
    block
}

/// The `loadgen` command that runs the same load as `spec` (with the port as `$PORT`).
pub fn loadgen_command(spec: &Spec) -> String {
    let mut cmd = format!(
        "target/release/loadgen http://127.0.0.1:$PORT{} -c {}",
        spec.path, spec.connections
    );
    if spec.threads != 1 {
        let _ = write!(cmd, " -t {}", spec.threads);
    }
    if let Some(d) = spec.duration {
        if d.subsec_millis() == 0 {
            let _ = write!(cmd, " -d {}s", d.as_secs());
        } else {
            let _ = write!(cmd, " -d {}ms", d.as_millis());
        }
    }
    if !spec.keep_alive {
        cmd.push_str(" --new-conn");
    }
    if spec.method == Method::Post {
        let _ = write!(cmd, " --post '{}'", String::from_utf8_lossy(&spec.body));
    }
    cmd
}

/// "keep-alive" or "new connection".
pub fn mode(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "new connection"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.9), 4.0);
        assert_eq!(max(&[1.0, 5.0, 2.0]), 5.0);
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(19_394), "19,394");
        assert_eq!(thousands(418), "418");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(fmt_ms(0.844), "0.84 ms");
        assert_eq!(fmt_ms(12.34), "12.3 ms");
        assert_eq!(mib(3 * 1024 * 1024 / 2), "1.50 MiB");
        let mut t = Table::new(&["a", "b"]);
        t.rows.push(vec!["1".into(), "x|y".into()]);
        assert_eq!(t.markdown(), "| a | b |\n|---|---|\n| 1 | x\\|y |\n");
    }

    #[test]
    fn loadgen_commands() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let mut spec = Route::Checkout.spec(addr, false);
        spec.duration = Some(Duration::from_secs(5));
        assert_eq!(
            loadgen_command(&spec),
            "target/release/loadgen http://127.0.0.1:$PORT/checkout -c 64 -t 2 -d 5s --new-conn --post '{\"cart\":[1,2,3]}'"
        );
    }
}
