//! clusterd's log, read from the file its stderr goes to: `TIMESTAMP LEVEL EVENT key=value…`.
//!
//! Workers share clusterd's stderr, so the file also holds their lines (`shop: worker 1 …`);
//! a line is an event only if it starts with an RFC 3339 UTC timestamp with milliseconds.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Most bytes kept from one read of the log (a runaway log must not eat the memory).
const MAX_LOG: u64 = 64 * 1024 * 1024;

/// One event line: clusterd's own parser, the inverse of its log formatter.
pub use clusterd::daemon::log::Line as LogLine;
/// The date of a day number since 1970-01-01 (for the report's date).
pub use clusterd::daemon::log::civil_from_days;

/// Reads a growing log file incrementally: each [`LogReader::poll`] reads what was appended
/// since, keeping a partial last line for the next look.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Every complete line so far, events and worker output alike.
    pub raw: Vec<String>,
    /// The event lines among them.
    pub events: Vec<LogLine>,
}

impl LogReader {
    pub fn new(path: &Path) -> LogReader {
        LogReader {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            raw: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Reads what was appended. A missing or unreadable file reads as nothing new.
    pub fn poll(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = file.take(MAX_LOG).read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if let Some(event) = LogLine::parse(&line) {
                self.events.push(event);
            }
            self.raw.push(line);
        }
    }

    /// The last `n` complete lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let start = self.raw.len().saturating_sub(n);
        self.raw[start..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_and_skips_worker_output() {
        let line = LogLine::parse(
            r#"2026-11-21T09:46:02.101Z warn worker.crash id=2 pid=30101 status="signal 9 (SIGKILL)" uptime_ms=27217"#,
        )
        .unwrap();
        assert_eq!(line.level, "warn");
        assert_eq!(line.event, "worker.crash");
        assert_eq!(line.num("id"), Some(2));
        assert_eq!(line.get("status"), Some("signal 9 (SIGKILL)"));
        assert_eq!(line.num("uptime_ms"), Some(27217));
        assert_eq!(line.ts_ms % 1000, 101);
        assert!(LogLine::parse("shop: worker 1 gen 1 listening on http=127.0.0.1:1").is_none());
        assert!(LogLine::parse("").is_none());
        let quoted =
            LogLine::parse(r#"2026-11-21T09:46:02.101Z info x a="b \"c\" d" e=f"#).unwrap();
        assert_eq!(quoted.get("a"), Some(r#"b "c" d"#));
        assert_eq!(quoted.get("e"), Some("f"));
    }

    #[test]
    fn reads_incrementally() {
        let dir = std::env::temp_dir().join(format!("bench-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(
            &path,
            "2026-11-21T09:46:02.101Z info a x=1\nworker says hi\n2026",
        )
        .unwrap();
        let mut log = LogReader::new(&path);
        log.poll();
        assert_eq!(log.raw.len(), 2);
        assert_eq!(log.events.len(), 1);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"-11-21T09:46:02.102Z info b\n").unwrap();
        log.poll();
        assert_eq!(log.events.len(), 2);
        assert_eq!(log.events[1].event, "b");
        assert_eq!(log.tail(1), "2026-11-21T09:46:02.102Z info b");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
