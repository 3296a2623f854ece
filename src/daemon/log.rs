//! One line per event on stderr: `TIMESTAMP LEVEL EVENT key=value …`.
//!
//! Values containing spaces, quotes or `=` are quoted with `"` (and `"`/`\`
//! escaped), so every line splits unambiguously. Timestamps are UTC,
//! RFC 3339 with milliseconds, computed without a time-zone database.

use std::fmt::{self, Display, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// Formats one log line (without the trailing newline).
pub fn format_line(
    now: SystemTime,
    level: Level,
    event: &str,
    fields: &[(&str, &dyn Display)],
) -> String {
    let mut line = String::with_capacity(96);
    write_timestamp(&mut line, now);
    let _ = write!(line, " {level} {event}");
    for (key, value) in fields {
        let value = value.to_string();
        let _ = write!(line, " {key}=");
        push_value(&mut line, &value);
    }
    line
}

/// Logs one event: to stderr or `log_file`, in the configured format, in
/// a single `write` so lines never interleave (see [`super::logsink`]).
pub fn emit(level: Level, event: &str, fields: &[(&str, &dyn Display)]) {
    let entry = crate::proto::LogEntry {
        ts_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        level: level.to_string(),
        event: event.to_string(),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.to_string()))
            .collect(),
    };
    super::logsink::write(&[entry], None);
}

fn push_value(out: &mut String, value: &str) {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=' && c != '\\');
    if plain {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `now` as RFC 3339 UTC with milliseconds.
pub fn write_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One event line, parsed: the inverse of [`format_line`], for tools that
/// read clusterd's log (the tests and the benchmark suite).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub level: String,
    pub event: String,
    pub fields: Vec<(String, String)>,
}

impl Line {
    /// Parses an event line; `None` for anything else (a worker's own
    /// output shares clusterd's stderr).
    pub fn parse(line: &str) -> Option<Line> {
        let mut words = line.splitn(4, ' ');
        let ts_ms = parse_timestamp(words.next()?)?;
        let level = words.next()?.to_string();
        let event = words.next().filter(|e| !e.is_empty())?.to_string();
        let fields = parse_fields(words.next().unwrap_or_default());
        Some(Line {
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

    /// The value of `key`, as a number.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

/// `key=value key="quoted \"value\""…`, undoing [`push_value`].
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
                    '\\' => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, 'u')) => {
                            // \u{HEX}
                            let rest = &quoted[i + 2..];
                            let close = rest.find('}').unwrap_or(rest.len());
                            let code = rest
                                .get(1..close)
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            v.extend(code.and_then(char::from_u32));
                            for _ in 0..=close {
                                chars.next(); // `{`, the digits and `}`
                            }
                        }
                        Some((_, n)) => v.push(n),
                        None => {}
                    },
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
pub fn parse_timestamp(ts: &str) -> Option<u64> {
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

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `log!(info, "worker.ready", id = 3, pid = 812)`
#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($level:ident, $event:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::daemon::log::emit(
            $crate::__clusterd_log_level!($level),
            $event,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

#[macro_export]
#[doc(hidden)]
macro_rules! __clusterd_log_level {
    (info) => {
        $crate::daemon::log::Level::Info
    };
    (warn) => {
        $crate::daemon::log::Level::Warn
    };
    (error) => {
        $crate::daemon::log::Level::Error
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_are_key_value_and_quoted_when_needed() {
        let t = UNIX_EPOCH + Duration::from_millis(1_763_717_696_789);
        let line = format_line(
            t,
            Level::Warn,
            "worker.exit",
            &[("id", &3), ("status", &"exit 1"), ("why", &"a\"b")],
        );
        assert_eq!(
            line,
            r#"2025-11-21T09:34:56.789Z warn worker.exit id=3 status="exit 1" why="a\"b""#
        );
    }

    #[test]
    fn lines_parse_back_to_what_was_logged() {
        let t = UNIX_EPOCH + Duration::from_millis(1_763_717_696_789);
        let tricky = "a \"quoted\" \\ value\nwith\u{7} control=chars";
        let line = format_line(
            t,
            Level::Error,
            "restart.aborted",
            &[("id", &3), ("reason", &tricky), ("e", &"")],
        );
        let parsed = Line::parse(&line).unwrap();
        assert_eq!(parsed.ts_ms, 1_763_717_696_789);
        assert_eq!(
            (parsed.level.as_str(), parsed.event.as_str()),
            ("error", "restart.aborted")
        );
        assert_eq!(parsed.num("id"), Some(3));
        assert_eq!(parsed.get("reason"), Some(tricky));
        assert_eq!(parsed.get("e"), Some(""));
        assert_eq!(Line::parse("shop: worker 1 gen 1 listening"), None);
        assert_eq!(Line::parse("2025-13-01T00:00:00.000Z info x"), None);
    }

    #[test]
    fn calendar_edges() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for z in [-1, 0, 59, 11_016, 20_413, 100_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), z);
        }
    }
}
