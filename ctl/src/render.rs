//! What clusterctl prints: pure functions from protocol values to text (human
//! output) or to [`serde_json::Value`] (`--json`).
//!
//! # JSON output
//!
//! The JSON field names are clusterctl's own contract, spelled out here rather
//! than derived from the wire types in [`clusterd::proto`], so renaming a wire
//! field cannot silently change what scripts see. Durations are in
//! milliseconds (`*_ms`), sizes in bytes (`*_bytes`), unknown values `null`.
//!
//! - `status --json` prints one object: [`status_json`].
//! - Every other command prints JSON Lines, one `{"type": …, "data": …}` object
//!   per event ([`event`]): `progress`, `baking`, `done`, `aborted`,
//!   `rolled_back` (restart),
//!   `scaled`, `stopping`, and `error` (`{"message": …}`) for any failure.
//!
//! # Text from elsewhere
//!
//! Workers choose some of what clusterd reports (an sd_notify `STATUS=` is
//! a worker's note) and may run as another user. Human output passes every
//! such string through [`clean`], so it cannot carry terminal escapes (a new
//! window title, a cleared screen, an overwritten line). JSON keeps the exact
//! text (serde escapes control characters).

use clusterd::proto::{self, Baking, Progress, RestartOutcome, Status, WorkerStatus};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `text` with what could drive a terminal escaped as `\u{..}`, as clusterd's
/// log does: control characters (C0, DEL, C1 such as the one-byte CSI
/// U+009B), line and paragraph separators, and the bidirectional overrides
/// and isolates that reorder what is shown.
pub fn clean(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// What [`clean`] escapes.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// [`clean`], owned.
fn cleaned(text: &str) -> String {
    clean(text).into_owned()
}

/// A duration for uptimes: the two largest units, e.g. `3h12m`, `2d4h`,
/// `12m5s`, `42s` (zero units are left out: `3h`, not `3h0m`).
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let units = [(d, "d"), (h, "h"), (m, "m"), (s, "s")];
    let Some(first) = units.iter().position(|&(n, _)| n > 0) else {
        return "0s".into();
    };
    let mut out = String::new();
    for &(n, unit) in &units[first..(first + 2).min(units.len())] {
        if n > 0 {
            let _ = write!(out, "{n}{unit}");
        }
    }
    out
}

/// A duration for how long an operation took: `41 ms`, `1.32 s`, `2m05s`.
pub fn elapsed(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.2} s", ms as f64 / 1000.0)
    } else {
        let s = ms / 1000;
        if s < 3600 {
            format!("{}m{:02}s", s / 60, s % 60)
        } else {
            format!("{}h{:02}m", s / 3600, s / 60 % 60)
        }
    }
}

/// A memory size in binary units, as `ps`/`top` show them: `512B`, `4.0K`,
/// `14.2M`, `142M`, `1.5G`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Switch units before rounding would print "1024K".
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 99.95 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

/// `worker 2/8 replaced (pid 812 -> 907) in 41 ms`
pub fn progress(p: &Progress) -> String {
    format!(
        "worker {}/{} replaced (pid {} -> {}) in {}",
        p.done,
        p.total,
        opt(p.old_pid),
        p.new_pid,
        elapsed(p.elapsed_ms)
    )
}

/// `restart done: generation 4, 8 workers replaced in 1.32 s`
pub fn restart_done(generation: u64, replaced: u32, elapsed_ms: u64) -> String {
    format!(
        "restart done: generation {generation}, {replaced} {} replaced in {}",
        plural(replaced, "worker", "workers"),
        elapsed(elapsed_ms)
    )
}

/// `canary: worker 1 (pid 907) is READY and must stay up 5.00 s before the
/// restart goes on`
pub fn baking(b: &Baking) -> String {
    let (who, then) = match b.role.as_str() {
        "canary" => ("canary: ", "the restart goes on"),
        "last" => ("last replacement: ", "the restart is done"),
        _ => ("", "the old one drains"),
    };
    format!(
        "{who}worker {} (pid {}) is READY and must stay up {} before {then}",
        b.worker_id,
        b.pid,
        elapsed(b.bake_ms),
    )
}

/// `restart rolled back: generation 5 failed; 2 workers went back to
/// generation 4: <reason>` (printed after `clusterctl: `).
pub fn rolled_back(outcome: &RestartOutcome) -> String {
    let RestartOutcome::RolledBack {
        reason,
        generation,
        failed_generation,
        restored,
        complete,
        ..
    } = outcome
    else {
        return String::new();
    };
    let restored = match restored {
        0 => String::new(),
        n => format!(
            "; {n} {} went back to generation {generation}",
            plural(*n, "worker", "workers")
        ),
    };
    if *complete {
        format!(
            "restart rolled back: generation {failed_generation} failed{restored}; every worker runs generation {generation}: {reason}"
        )
    } else {
        format!(
            "restart failed and its rollback did not finish: generation {failed_generation} failed{restored}, and some workers still run it: {reason}"
        )
    }
}

/// `restart aborted after 2/8: <reason>` (printed after `clusterctl: `).
pub fn restart_aborted(reason: &str, replaced: u32, total: u32) -> String {
    format!(
        "restart aborted after {replaced}/{total}: {}",
        clean(reason)
    )
}

/// `scaled 4 -> 6`
pub fn scaled(from: u32, to: u32) -> String {
    if from == to {
        format!("scaled {from} -> {to} (no change)")
    } else {
        format!("scaled {from} -> {to}")
    }
}

/// What `clusterctl stop` prints once clusterd has begun to stop.
pub fn stopping() -> String {
    "stopping: clusterd is draining its workers and will exit when they are done".into()
}

/// The human `status`: a summary block, a blank line, then one table row
/// per worker.
pub fn status(s: &Status) -> String {
    let listeners = if s.listeners.is_empty() {
        "-".to_string()
    } else {
        s.listeners
            .iter()
            .map(|l| format!("{}={}", clean(&l.name), clean(&l.address)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let summary = [
        ("version", cleaned(&s.version)),
        ("pid", s.pid.to_string()),
        ("uptime", image_uptime(s)),
        ("config", cleaned(&s.config)),
        ("protocol", cleaned(&s.protocol)),
        ("listeners", listeners),
        ("workers", workers_summary(s)),
        ("generation", s.generation.to_string()),
        ("phase", s.phase.clone()),
        (
            "operation",
            s.operation.as_deref().map_or_else(|| "-".into(), cleaned),
        ),
        ("restart", last_restart(s)),
    ];
    let mut out = String::new();
    for (label, value) in summary {
        let _ = writeln!(out, "{label:<12}{value}");
    }
    if let Some(crash_loop) = &s.crash_loop {
        let _ = writeln!(out, "{:<12}{}", "crash loop", clean(crash_loop));
    }
    out.push('\n');
    if s.workers.is_empty() {
        out.push_str("(no workers)\n");
    } else {
        out.push_str(&worker_table(&s.workers));
    }
    out
}

/// `done, generation 3, 2m ago`, `rolled_back to generation 2, 40s ago: REASON`.
fn last_restart(s: &Status) -> String {
    let Some(l) = &s.last_restart else {
        return "-".into();
    };
    let mut text = match l.outcome.as_str() {
        "done" => format!("done, generation {}", l.generation),
        outcome => format!("{outcome}, generation {} serving", l.generation),
    };
    let _ = write!(text, ", {} ago", uptime(l.ago_ms));
    if let Some(reason) = &l.reason {
        let _ = write!(text, ": {reason}");
    }
    text
}

/// `ready 8/8`, or `ready 6/8 (1 starting, 1 backoff)` when some are not.
fn workers_summary(s: &Status) -> String {
    let mut others: BTreeMap<&str, u32> = BTreeMap::new();
    for w in s.workers.iter().filter(|w| w.state != "ready") {
        *others.entry(w.state.as_str()).or_default() += 1;
    }
    let mut text = format!("ready {}/{}", s.ready, s.desired);
    if !others.is_empty() {
        let parts: Vec<String> = others
            .iter()
            .map(|(state, n)| format!("{n} {}", clean(state)))
            .collect();
        let _ = write!(text, " ({})", parts.join(", "));
    }
    text
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// The per-worker table; the NOTE column only when some worker has a note
/// (its `STATUS=`, or the last stderr line of a worker that crashed).
fn worker_table(workers: &[WorkerStatus]) -> String {
    use Align::{Left, Right};
    let note = |w: &WorkerStatus| {
        w.note
            .clone()
            .or_else(|| w.last_words.as_ref().map(|l| format!("last words: {l}")))
    };
    let with_note = workers.iter().any(|w| note(w).is_some());
    let mut columns = vec![
        ("ID", Right),
        ("PID", Right),
        ("GEN", Right),
        ("STATE", Left),
        ("UPTIME", Right),
        ("RESTARTS", Right),
        ("LAST-EXIT", Left),
        ("RSS", Right),
        ("REQUESTS", Right),
        ("ACTIVE", Right),
    ];
    if with_note {
        columns.push(("NOTE", Left));
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let mut row = vec![
                w.id.to_string(),
                opt(w.pid),
                w.generation.to_string(),
                cleaned(&w.state),
                // A slot waiting in backoff has no process, so no uptime.
                w.pid.map_or_else(|| "-".into(), |_| uptime(w.uptime_ms)),
                w.restarts.to_string(),
                w.last_exit.as_deref().map_or_else(|| "-".into(), cleaned),
                w.rss_bytes.map_or_else(|| "-".into(), size),
                opt(w.requests),
                opt(w.active),
            ];
            if with_note {
                row.push(note(w).as_deref().map_or_else(|| "-".into(), cleaned));
            }
            row
        })
        .collect();
    table(&columns, &rows)
}

/// Aligned columns two spaces apart, no trailing blanks.
fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.chars().count();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (head, _))| {
            rows.iter()
                .map(|r| width(&r[i]))
                .chain([width(head)])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - width(cell));
            match columns[i].1 {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&pad);
                }
                Align::Right => {
                    line.push_str(&pad);
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn plural<'a>(n: u32, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

// ---------------------------------------------------------------------------
// JSON

/// One JSON Lines event, `{"type":KIND,"data":DATA}`, with `type` first
/// whatever the JSON map's key order.
pub fn event(kind: &str, data: &Value) -> String {
    json_line(&format!(
        r#"{{"type":{},"data":{data}}}"#,
        Value::from(kind)
    ))
}

/// Serialized JSON with the characters serde leaves raw but [`clean`]
/// escapes (C1 controls, separators, bidi overrides) written as `\uXXXX`:
/// the same JSON value, harmless on a terminal. They can only occur inside
/// strings, where the escape means the same character.
pub fn json_line(json: &str) -> String {
    if !json.chars().any(needs_escape) {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len() + 12);
    for c in json.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// clusterd's uptime; after an in-place upgrade, this image's too.
fn image_uptime(s: &Status) -> String {
    match s.upgrades {
        0 => uptime(s.uptime_ms),
        n => format!(
            "{} (this image {}, {n} upgrade{})",
            uptime(s.uptime_ms),
            uptime(s.image_uptime_ms),
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// What `clusterctl upgrade` prints once the new image answers.
pub fn upgraded(u: &proto::Upgrading, s: &Status, elapsed_ms: u64) -> String {
    let workers = s.workers.iter().filter(|w| w.pid.is_some()).count();
    format!(
        "clusterd upgraded in place: {} -> {} (pid {}, {workers} worker{} kept, {elapsed_ms} ms)",
        clean(&u.from),
        clean(&s.version),
        s.pid,
        if workers == 1 { "" } else { "s" }
    )
}

/// `upgrade --json`: the final event.
pub fn upgraded_json(u: &proto::Upgrading, s: &Status, elapsed_ms: u64) -> Value {
    json!({
        "from": u.from,
        "to": s.version,
        "binary": u.binary,
        "pid": s.pid,
        "upgrades": s.upgrades,
        "workers": s.workers.iter().filter(|w| w.pid.is_some()).count(),
        "elapsed_ms": elapsed_ms,
    })
}

/// `status --json`.
pub fn status_json(s: &Status) -> Value {
    json!({
        "version": s.version,
        "pid": s.pid,
        "uptime_ms": s.uptime_ms,
        "image_uptime_ms": s.image_uptime_ms,
        "upgrades": s.upgrades,
        "config": s.config,
        "protocol": s.protocol,
        "listeners": s.listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address,
        })).collect::<Vec<_>>(),
        "desired": s.desired,
        "ready": s.ready,
        "generation": s.generation,
        "phase": s.phase,
        "crash_loop": s.crash_loop,
        "operation": s.operation,
        "last_restart": s.last_restart.as_ref().map(|l| json!({
            "outcome": l.outcome,
            "generation": l.generation,
            "reason": l.reason,
            "ago_ms": l.ago_ms,
        })),
        "workers": s.workers.iter().map(|w| json!({
            "id": w.id,
            "pid": w.pid,
            "generation": w.generation,
            "state": w.state,
            "uptime_ms": w.uptime_ms,
            "restarts": w.restarts,
            "last_exit": w.last_exit,
            "rss_bytes": w.rss_bytes,
            "requests": w.requests,
            "active": w.active,
            "note": w.note,
            "last_words": w.last_words,
        })).collect::<Vec<_>>(),
    })
}

/// The `data` of a `progress` event.
pub fn progress_json(p: &Progress) -> Value {
    json!({
        "worker_id": p.worker_id,
        "done": p.done,
        "total": p.total,
        "old_pid": p.old_pid,
        "new_pid": p.new_pid,
        "elapsed_ms": p.elapsed_ms,
    })
}

/// The `data` of a `done` event.
pub fn done_json(generation: u64, replaced: u32, elapsed_ms: u64) -> Value {
    json!({ "generation": generation, "replaced": replaced, "elapsed_ms": elapsed_ms })
}

/// The `data` of a `baking` event.
pub fn baking_json(b: &Baking) -> Value {
    json!({
        "worker_id": b.worker_id,
        "pid": b.pid,
        "generation": b.generation,
        "role": b.role,
        "bake_ms": b.bake_ms,
    })
}

/// The `data` of a `rolled_back` event.
pub fn rolled_back_json(outcome: &RestartOutcome) -> Value {
    match outcome {
        RestartOutcome::RolledBack {
            reason,
            generation,
            failed_generation,
            replaced,
            restored,
            total,
            complete,
        } => json!({
            "reason": reason,
            "generation": generation,
            "failed_generation": failed_generation,
            "replaced": replaced,
            "restored": restored,
            "total": total,
            "complete": complete,
        }),
        _ => Value::Null,
    }
}

/// The `data` of an `aborted` event.
pub fn aborted_json(reason: &str, replaced: u32, total: u32) -> Value {
    json!({ "reason": reason, "replaced": replaced, "total": total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_escapes_what_drives_a_terminal() {
        assert!(matches!(
            clean("serving 3 carts, 50 % – ok"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            clean("\u{1b}]0;t\u{7}\u{1b}[2J\r\n\t\u{9b}1m\u{202e}x\u{7f}"),
            "\\u{1b}]0;t\\u{7}\\u{1b}[2J\\u{d}\\u{a}\\u{9}\\u{9b}1m\\u{202e}x\\u{7f}"
        );
    }
    use clusterd::proto::ListenerInfo;

    fn worker(id: u32) -> WorkerStatus {
        WorkerStatus {
            id,
            pid: Some(800 + id),
            generation: 4,
            state: "ready".into(),
            uptime_ms: 11_520_000,
            restarts: 0,
            last_exit: None,
            rss_bytes: Some(14_890_000),
            requests: Some(10_234),
            active: Some(3),
            note: None,
            last_words: None,
        }
    }

    fn sample() -> Status {
        let mut crashed = worker(2);
        crashed.restarts = 3;
        crashed.last_exit = Some("signal 9 (SIGKILL)".into());
        crashed.uptime_ms = 41_000;
        crashed.requests = None;
        crashed.active = None;
        let mut backoff = worker(3);
        backoff.pid = None;
        backoff.state = "backoff".into();
        backoff.rss_bytes = None;
        backoff.requests = None;
        backoff.active = None;
        backoff.restarts = 12;
        backoff.last_exit = Some("exit 1".into());
        Status {
            version: "0.1.0".into(),
            pid: 4242,
            uptime_ms: 11_533_000,
            config: "/etc/clusterd/shop.conf".into(),
            protocol: "clusterd".into(),
            listeners: vec![
                ListenerInfo {
                    name: "http".into(),
                    address: "127.0.0.1:3000".into(),
                },
                ListenerInfo {
                    name: "admin".into(),
                    address: "unix:/run/shop/admin.sock".into(),
                },
            ],
            desired: 3,
            ready: 2,
            generation: 4,
            operation: None,
            phase: "running".into(),
            last_restart: None,
            crash_loop: None,
            workers: vec![worker(1), crashed, backoff],
            image_uptime_ms: 11_533_000,
            upgrades: 0,
        }
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(999), "0s");
        assert_eq!(uptime(42_000), "42s");
        assert_eq!(uptime(725_000), "12m5s");
        assert_eq!(uptime(11_520_000), "3h12m");
        assert_eq!(uptime(10_800_000), "3h");
        assert_eq!(uptime(10_805_000), "3h");
        assert_eq!(uptime(2 * 86_400_000 + 4 * 3_600_000 + 59_000), "2d4h");
    }

    #[test]
    fn elapsed_times() {
        assert_eq!(elapsed(0), "0 ms");
        assert_eq!(elapsed(41), "41 ms");
        assert_eq!(elapsed(1320), "1.32 s");
        assert_eq!(elapsed(59_994), "59.99 s");
        assert_eq!(elapsed(125_000), "2m05s");
        assert_eq!(elapsed(3_720_000), "1h02m");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(1023), "1023B");
        assert_eq!(size(4096), "4.0K");
        assert_eq!(size(14_890_000), "14.2M");
        assert_eq!(size(148_900_000), "142M");
        assert_eq!(size(1_048_500), "1.0M");
        assert_eq!(size(1_610_612_736), "1.5G");
    }

    #[test]
    fn progress_and_results() {
        let mut p = Progress {
            worker_id: 2,
            done: 2,
            total: 8,
            old_pid: Some(812),
            new_pid: 907,
            elapsed_ms: 41,
        };
        assert_eq!(
            progress(&p),
            "worker 2/8 replaced (pid 812 -> 907) in 41 ms"
        );
        p.old_pid = None;
        assert_eq!(progress(&p), "worker 2/8 replaced (pid - -> 907) in 41 ms");
        assert_eq!(
            restart_done(4, 8, 1320),
            "restart done: generation 4, 8 workers replaced in 1.32 s"
        );
        assert_eq!(
            restart_done(2, 1, 90),
            "restart done: generation 2, 1 worker replaced in 90 ms"
        );
        assert_eq!(
            restart_aborted("worker 3 exited with code 1 before it was ready", 2, 8),
            "restart aborted after 2/8: worker 3 exited with code 1 before it was ready"
        );
        assert_eq!(scaled(4, 6), "scaled 4 -> 6");
        assert_eq!(scaled(4, 4), "scaled 4 -> 4 (no change)");
    }

    #[test]
    fn status_text() {
        let text = status(&sample());
        let expected = "\
version     0.1.0
pid         4242
uptime      3h12m
config      /etc/clusterd/shop.conf
protocol    clusterd
listeners   http=127.0.0.1:3000, admin=unix:/run/shop/admin.sock
workers     ready 2/3 (1 backoff)
generation  4
phase       running
operation   -
restart     -

ID  PID  GEN  STATE    UPTIME  RESTARTS  LAST-EXIT             RSS  REQUESTS  ACTIVE
 1  801    4  ready     3h12m         0  -                   14.2M     10234       3
 2  802    4  ready       41s         3  signal 9 (SIGKILL)  14.2M         -       -
 3    -    4  backoff       -        12  exit 1                  -         -       -
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn an_upgraded_clusterd_shows_this_image_too() {
        let mut s = sample();
        s.upgrades = 2;
        s.image_uptime_ms = 42_000;
        let text = status(&s);
        assert!(
            text.contains("uptime      3h12m (this image 42s, 2 upgrades)\n"),
            "{text}"
        );
        let u = proto::Upgrading {
            from: "0.1.0".into(),
            to: "0.1.0".into(),
            binary: "/usr/bin/clusterd".into(),
            upgrades: 1,
        };
        assert_eq!(
            upgraded(&u, &s, 35),
            "clusterd upgraded in place: 0.1.0 -> 0.1.0 (pid 4242, 2 workers kept, 35 ms)"
        );
        assert_eq!(upgraded_json(&u, &s, 35)["workers"], 2);
    }

    #[test]
    fn notes_add_a_column_and_empty_status_says_so() {
        let mut s = sample();
        s.workers[0].note = Some("warming caches".into());
        s.operation = Some("restart 1/3".into());
        let text = status(&s);
        assert!(text.contains("operation   restart 1/3\n"), "{text}");
        let header = text.lines().find(|l| l.starts_with("ID")).unwrap();
        assert!(header.ends_with("ACTIVE  NOTE"), "{header}");
        assert!(text.contains("       3  warming caches\n"), "{text}");

        s.workers.clear();
        s.listeners.clear();
        let text = status(&s);
        assert!(
            text.contains("listeners   -\n") && text.ends_with("\n(no workers)\n"),
            "{text}"
        );
    }

    #[test]
    fn status_json_field_names_are_stable() {
        let v = status_json(&sample());
        let keys = |v: &Value| {
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&v),
            [
                "config",
                "crash_loop",
                "desired",
                "generation",
                "image_uptime_ms",
                "last_restart",
                "listeners",
                "operation",
                "phase",
                "pid",
                "protocol",
                "ready",
                "upgrades",
                "uptime_ms",
                "version",
                "workers"
            ]
        );
        assert_eq!(
            keys(&v["workers"][0]),
            [
                "active",
                "generation",
                "id",
                "last_exit",
                "last_words",
                "note",
                "pid",
                "requests",
                "restarts",
                "rss_bytes",
                "state",
                "uptime_ms"
            ]
        );
        assert_eq!(v["workers"][0]["rss_bytes"], 14_890_000);
        assert_eq!(v["workers"][2]["pid"], Value::Null);
        assert_eq!(
            v["listeners"][1],
            json!({"name": "admin", "address": "unix:/run/shop/admin.sock"})
        );
        assert_eq!(v["operation"], Value::Null);
    }

    #[test]
    fn events() {
        let p = Progress {
            worker_id: 3,
            done: 1,
            total: 2,
            old_pid: None,
            new_pid: 9,
            elapsed_ms: 5,
        };
        let line = event("progress", &progress_json(&p));
        assert!(line.starts_with(r#"{"type":"progress","data":{"#), "{line}");
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"type": "progress", "data": {
                "worker_id": 3, "done": 1, "total": 2, "old_pid": null, "new_pid": 9, "elapsed_ms": 5
            }})
        );
        assert_eq!(
            event("stopping", &json!({})),
            r#"{"type":"stopping","data":{}}"#
        );
        assert_eq!(
            done_json(4, 8, 1320),
            json!({"generation": 4, "replaced": 8, "elapsed_ms": 1320})
        );
        assert_eq!(
            aborted_json("why", 2, 8),
            json!({"reason": "why", "replaced": 2, "total": 8})
        );
    }
}
