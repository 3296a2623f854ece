//! Where log lines go: clusterd's own events and its workers' captured
//! output, in one stream.
//!
//! Every line is written to the destination (standard error, or
//! `log_file`) in the configured format (`log_format = text` or `json`),
//! kept in a ring of bounded size for `clusterctl logs`, and sent to the
//! clients following the log (`clusterctl logs -f`).
//!
//! # Implementation
//!
//! One process-wide sink behind a mutex: the daemon runs on one thread, and
//! the lock keeps lines whole if anything else ever writes. Until
//! [`configure`] is called (and in unit tests), lines go to standard error
//! as text and are not kept.
//!
//! - A failed write (a dead reader of stderr: EPIPE; a full disk) drops the
//!   line; nothing waits for the reader.
//! - The ring holds the newest lines up to `log_buffer` bytes of text.
//! - A follower whose connection has more than [`FOLLOWER_BACKLOG`] lines
//!   not yet written is cut off (told so, then dropped): a slow reader
//!   cannot make clusterd's memory grow or slow it down.
//! - [`reopen`] (SIGUSR1) opens `log_file` again between two lines, so
//!   logrotate's rename-then-signal loses none.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use smol::channel::Sender;

use super::log::{Level, format_line};
use crate::proto::{LogEntry, Response};

/// Lines queued for one follower before it is cut off.
pub const FOLLOWER_BACKLOG: usize = 1024;

/// Longest worker stderr line kept as its "last words" for `status`.
pub const LAST_WORDS: usize = 200;

pub use crate::config::LogFormat as Format;

struct Follower {
    tx: Sender<Response>,
    worker: Option<u32>,
}

#[derive(Default)]
struct Sink {
    format: Format,
    /// `log_file`, and the file open on it; stderr when `None`.
    file: Option<(PathBuf, File)>,
    /// The newest lines, as text (compact), with the worker id each is
    /// about; `ring_bytes` counts their text.
    ring: VecDeque<(Option<u32>, String)>,
    ring_bytes: usize,
    ring_limit: usize,
    followers: Vec<Follower>,
    /// The last stderr line of each worker process, by pid.
    last_stderr: HashMap<u32, String>,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

fn sink() -> MutexGuard<'static, Option<Sink>> {
    SINK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sets the format, the destination and the ring's size (in bytes of text).
///
/// # Errors
/// `log_file` cannot be opened (for appending, created 0640 if missing).
pub fn configure(format: Format, file: Option<PathBuf>, ring_limit: usize) -> io::Result<()> {
    let file = match file {
        Some(path) => {
            let f = open(&path)?;
            Some((path, f))
        }
        None => None,
    };
    let mut guard = sink();
    let sink = guard.get_or_insert_with(Sink::default);
    sink.format = format;
    sink.file = file;
    sink.ring_limit = ring_limit;
    sink.trim();
    Ok(())
}

fn open(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
}

/// Opens `log_file` again (after logrotate moved it away). Lines go on to
/// the old file until the new one is open, so none is lost.
///
/// # Errors
/// The file cannot be opened; the old one stays in use.
pub fn reopen() -> io::Result<Option<PathBuf>> {
    let mut guard = sink();
    let Some((path, file)) = guard.as_mut().and_then(|s| s.file.as_mut()) else {
        return Ok(None);
    };
    *file = open(path)?;
    Ok(Some(path.clone()))
}

/// Writes `entries` whole, keeps them, and passes them to the followers.
/// `stderr_of`: the worker pid whose standard error they are, if they are.
pub fn write(entries: &[LogEntry], stderr_of: Option<u32>) {
    if entries.is_empty() {
        return;
    }
    let mut guard = sink();
    let Some(sink) = guard.as_mut() else {
        // Not configured: text to stderr, nothing kept.
        let text: String = entries.iter().map(|e| text_line(e) + "\n").collect();
        let _ = io::stderr().lock().write_all(text.as_bytes());
        return;
    };
    let format = sink.format;
    let text: String = entries
        .iter()
        .map(|e| {
            let mut line = match format {
                Format::Text => text_line(e),
                Format::Json => json_line(e),
            };
            line.push('\n');
            line
        })
        .collect();
    // A failure (EPIPE, ENOSPC) drops the lines: nothing waits.
    let _ = match &mut sink.file {
        Some((_, file)) => file.write_all(text.as_bytes()),
        None => io::stderr().lock().write_all(text.as_bytes()),
    };
    if let (Some(pid), Some(last)) = (stderr_of, entries.last()) {
        let words: String = last
            .get("line")
            .unwrap_or_default()
            .chars()
            .take(LAST_WORDS)
            .collect();
        sink.last_stderr.insert(pid, words);
    }
    for entry in entries {
        sink.keep(entry);
    }
    sink.followers.retain(|f| {
        let chosen: Vec<LogEntry> = entries
            .iter()
            .filter(|e| f.worker.is_none() || e.worker() == f.worker)
            .cloned()
            .collect();
        if chosen.is_empty() {
            return !f.tx.is_closed();
        }
        if f.tx.len() >= FOLLOWER_BACKLOG {
            let _ = f.tx.try_send(Response::Error(format!(
                "cut off: this client read the log too slowly ({FOLLOWER_BACKLOG} lines waiting)"
            )));
            return false;
        }
        f.tx.try_send(Response::Logs(chosen)).is_ok()
    });
}

/// The last `n` lines kept (of worker `worker` only, if given), oldest first,
/// and no more than [`TAIL_BUDGET`] bytes of them.
pub fn tail(n: usize, worker: Option<u32>) -> Vec<LogEntry> {
    match sink().as_ref() {
        Some(sink) => sink.tail(n, worker, TAIL_BUDGET),
        None => Vec::new(),
    }
}

/// How much text one [`tail`] answers with at most: the answer must fit in a
/// control response ([`crate::proto::MAX_RESPONSE`]), and an entry encodes
/// in fewer bytes than its text line. A `log_buffer` larger than this is
/// not sent whole (`clusterctl logs -n` with a huge count, or a follower
/// resuming after an upgrade, gets the newest lines).
const TAIL_BUDGET: usize = crate::proto::MAX_RESPONSE / 2;

/// Sends every line from now on (of `worker` only, if given) to `tx`.
pub fn follow(tx: Sender<Response>, worker: Option<u32>) {
    if let Some(sink) = sink().as_mut() {
        sink.followers.push(Follower { tx, worker });
    }
}

/// Ends every follow (clusterd is exiting).
pub fn unfollow_all() {
    if let Some(sink) = sink().as_mut() {
        sink.followers.clear();
    }
}

/// The last line worker process `pid` wrote to its standard error, taken
/// (it is asked for once, when the worker has exited).
pub fn take_last_stderr(pid: u32) -> Option<String> {
    sink().as_mut()?.last_stderr.remove(&pid)
}

/// What the log keeps (recent lines with their worker ids, and each worker
/// process's last stderr line), to hand over (`clusterctl upgrade`).
pub type Kept = (Vec<(Option<u32>, String)>, Vec<(u32, String)>);

/// What the log keeps, copied.
pub fn kept() -> Kept {
    let guard = sink();
    let Some(sink) = guard.as_ref() else {
        return Kept::default();
    };
    let ring = sink.ring.iter().cloned().collect();
    let words = sink
        .last_stderr
        .iter()
        .map(|(p, w)| (*p, w.clone()))
        .collect();
    (ring, words)
}

/// Puts back what an earlier image of clusterd kept, before this image's
/// own lines.
pub fn take_over(kept: Kept) {
    let (ring, words) = kept;
    let mut guard = sink();
    let sink = guard.get_or_insert_with(Sink::default);
    let mine = std::mem::take(&mut sink.ring);
    sink.ring = ring.into_iter().chain(mine).collect();
    sink.ring_bytes = sink.ring.iter().map(|(_, t)| t.len() + RING_OVERHEAD).sum();
    sink.trim();
    sink.last_stderr.extend(words);
}

/// A kept text line back as an entry.
fn parse(text: &str) -> Option<LogEntry> {
    let line = super::log::Line::parse(text)?;
    Some(LogEntry {
        ts_ms: line.ts_ms,
        level: line.level,
        event: line.event,
        fields: line.fields,
    })
}

/// What a kept line costs beyond its text (the String and the slot).
const RING_OVERHEAD: usize = 48;

impl Sink {
    /// The last `n` lines of `worker` (or all), oldest first, within
    /// `budget` bytes of text.
    fn tail(&self, n: usize, worker: Option<u32>, budget: usize) -> Vec<LogEntry> {
        let mut bytes = 0;
        let mut lines: Vec<LogEntry> = self
            .ring
            .iter()
            .rev()
            .filter(|(id, _)| worker.is_none() || *id == worker)
            .take(n)
            .take_while(|(_, text)| {
                bytes += text.len() + 1;
                bytes <= budget
            })
            .filter_map(|(_, text)| parse(text))
            .collect();
        lines.reverse();
        lines
    }

    fn keep(&mut self, entry: &LogEntry) {
        if self.ring_limit == 0 {
            return;
        }
        let text = text_line(entry);
        self.ring_bytes += text.len() + RING_OVERHEAD;
        self.ring.push_back((entry.worker(), text));
        self.trim();
    }

    fn trim(&mut self) {
        while self.ring_bytes > self.ring_limit {
            let Some((_, old)) = self.ring.pop_front() else {
                break;
            };
            self.ring_bytes -= old.len() + RING_OVERHEAD;
        }
        if self.ring.len() < self.ring.capacity() / 4 {
            self.ring.shrink_to_fit();
        }
    }
}

/// `log_format = text`: `TIMESTAMP LEVEL EVENT key=value…`.
pub fn text_line(e: &LogEntry) -> String {
    let fields: Vec<(&str, &dyn std::fmt::Display)> = e
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), v as &dyn std::fmt::Display))
        .collect();
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.ts_ms);
    let level = match e.level.as_str() {
        "warn" => Level::Warn,
        "error" => Level::Error,
        _ => Level::Info,
    };
    format_line(when, level, &e.event, &fields)
}

/// `log_format = json`: one JSON object.
pub fn json_line(e: &LogEntry) -> String {
    let mut map = serde_json::Map::new();
    let mut ts = String::new();
    super::log::write_timestamp(
        &mut ts,
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.ts_ms),
    );
    map.insert("ts".into(), ts.into());
    map.insert("level".into(), e.level.clone().into());
    map.insert("event".into(), e.event.clone().into());
    for (k, v) in &e.fields {
        let value = match v.parse::<u64>() {
            Ok(n) if !v.starts_with('0') || v == "0" => n.into(),
            _ => v.clone().into(),
        };
        map.insert(k.clone(), value);
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: &str, fields: &[(&str, &str)]) -> LogEntry {
        LogEntry {
            ts_ms: 1_764_932_696_789,
            level: "info".into(),
            event: event.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn json_lines_parse_with_numbers_as_numbers() {
        let e = entry(
            "worker.output",
            &[
                ("id", "2"),
                ("pid", "4711"),
                ("stream", "stderr"),
                ("line", "a \"quoted\"\tthing\u{1b}[2J"),
                ("code", "007"),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&json_line(&e)).unwrap();
        assert_eq!(v["event"], "worker.output");
        assert_eq!(v["id"], 2);
        assert_eq!(v["pid"], 4711);
        assert_eq!(v["code"], "007", "not a number: leading zeros kept");
        assert_eq!(v["line"], "a \"quoted\"\tthing\u{1b}[2J");
        assert_eq!(v["ts"], "2025-12-05T11:04:56.789Z");
        assert!(!json_line(&e).contains('\n'), "one line");
    }

    #[test]
    fn text_lines_round_trip_through_the_parser() {
        let e = entry("worker.output", &[("id", "1"), ("line", "hello world")]);
        let parsed = super::super::log::Line::parse(&text_line(&e)).unwrap();
        assert_eq!(parsed.event, "worker.output");
        assert_eq!(parsed.get("line"), Some("hello world"));
        assert_eq!(parsed.ts_ms, e.ts_ms);
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_within_its_bytes() {
        let mut sink = Sink {
            ring_limit: 1000,
            ..Sink::default()
        };
        for i in 0..100 {
            sink.keep(&entry(
                "worker.output",
                &[("id", "1"), ("line", &format!("line {i}"))],
            ));
        }
        assert!(sink.ring_bytes <= 1000);
        assert!(sink.ring.len() > 5 && sink.ring.len() < 100);
        assert!(sink.ring.back().unwrap().1.ends_with("line=\"line 99\""));
    }

    #[test]
    fn a_tail_is_the_newest_lines_within_its_count_and_its_bytes() {
        let mut sink = Sink {
            ring_limit: 1 << 20,
            ..Sink::default()
        };
        for i in 0..100 {
            let id = if i % 2 == 0 { "1" } else { "2" };
            sink.keep(&entry(
                "worker.output",
                &[("id", id), ("line", &format!("line {i}"))],
            ));
        }
        let lines = |t: Vec<LogEntry>| -> Vec<String> {
            t.iter()
                .map(|e| e.get("line").unwrap().to_string())
                .collect()
        };
        assert_eq!(
            lines(sink.tail(2, None, usize::MAX)),
            ["line 98", "line 99"]
        );
        assert_eq!(
            lines(sink.tail(2, Some(1), usize::MAX)),
            ["line 96", "line 98"]
        );
        assert_eq!(sink.tail(1000, None, usize::MAX).len(), 100);
        // The budget keeps the newest lines whose text fits.
        let one = sink.ring.back().unwrap().1.len() + 1;
        assert_eq!(
            lines(sink.tail(1000, None, 2 * one)),
            ["line 98", "line 99"]
        );
        assert!(sink.tail(1000, None, one - 1).is_empty());
        // The whole default buffer is sent.
        assert!(crate::config::DEFAULT_LOG_BUFFER as usize <= TAIL_BUDGET);
    }
}
