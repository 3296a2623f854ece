//! Facts about the machine and the build, for the report's header.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::log::civil_from_days;

/// What the report says about where it ran.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpu: String,
    /// Logical CPUs in /proc/cpuinfo.
    pub cores: usize,
    /// CPUs available to this process.
    pub available: usize,
    pub kernel: String,
    pub memory: String,
    pub rustc: String,
    pub commit: String,
    pub date: String,
    pub load_before: String,
}

impl Machine {
    pub fn read(root: &Path, available: usize) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
            .count();
        let kernel = std::fs::read_to_string("/proc/version")
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| run("uname", &["-srvm"], None));
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kb: u64 = m
                    .lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)))
            })
            .unwrap_or_else(|| "unknown".to_string());
        let rustc = run("rustc", &["--version"], Some(root));
        let mut commit = run("git", &["rev-parse", "--short=12", "HEAD"], Some(root));
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(root)
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            commit.push_str(" (with uncommitted changes)");
        }
        Machine {
            cpu,
            cores,
            available,
            kernel,
            memory,
            rustc,
            commit,
            date: utc_now(),
            load_before: loadavg(),
        }
    }
}

/// The first line of a command's output, or why there is none.
fn run(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Ok(o) => format!("unknown ({program} exited with {})", o.status),
        Err(e) => format!("unknown ({program}: {e})"),
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Now, as `2026-11-21 09:45 UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Milliseconds since the Unix epoch of a wall-clock time (to compare with log timestamps).
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
