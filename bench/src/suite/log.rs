//! clusterd's log, read from the file its stderr goes to: `TIMESTAMP LEVEL EVENT key=value…`.
//!
//! Workers share clusterd's stderr, so the file also holds their lines (`shop: worker 1 …`);
//! a line is an event only if it starts with an RFC 3339 UTC timestamp with milliseconds.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Most bytes kept from one read of the log (a runaway log must not eat the memory).
const MAX_LOG: u64 = 64 * 1024 * 1024;

/// One event line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The timestamp, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub level: String,
    pub event: String,
    pub fields: Vec<(String, String)>,
}

impl LogLine {
    /// Parses an event line; `None` for anything else (a worker's own output).
    pub fn parse(line: &str) -> Option<LogLine> {
        let mut words = line.splitn(4, ' ');
        let ts_ms = parse_ts_ms(words.next()?)?;
        let level = words.next()?.to_string();
        let event = words.next()?.to_string();
        if event.is_empty() {
            return None;
        }
        let fields = parse_fields(words.next().unwrap_or_default());
        Some(LogLine {
            ts_ms,
            level,
            event,
            fields,
        })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` as a number.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

/// `key=value key="quoted \"value\""…`.
fn parse_fields(mut s: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    s = s.trim_start();
    while let Some(eq) = s.find('=') {
        let key = s[..eq].to_string();
        s = &s[eq + 1..];
        let value;
        if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut end = quoted.len();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(if n == 'n' { '\n' } else { n });
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &quoted[end..];
        } else {
            let end = s.find(' ').unwrap_or(s.len());
            value = s[..end].to_string();
            s = &s[end..];
        }
        fields.push((key, value));
        s = s.trim_start();
    }
    fields
}

/// `2025-11-21T09:34:56.789Z` as milliseconds since the Unix epoch.
pub fn parse_ts_ms(ts: &str) -> Option<u64> {
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let mut t = time.split(':');
    let (h, min, sec) = (num(t.next()?)?, num(t.next()?)?, t.next()?);
    let (s, ms) = sec.split_once('.')?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || ms.len() != 3 {
        return None;
    }
    let secs = days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60 + num(s)?;
    u64::try_from(secs * 1000 + num(ms)?).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01: (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

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
    fn timestamps() {
        assert_eq!(parse_ts_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_ts_ms("2000-03-01T00:00:01.250Z"),
            Some(951_868_801_250)
        );
        assert_eq!(parse_ts_ms("2000-03-01T00:00:01Z"), None);
        assert_eq!(parse_ts_ms("shop:"), None);
        for days in [-1, 0, 59, 60, 10_957, 11_016, 11_017, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
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
