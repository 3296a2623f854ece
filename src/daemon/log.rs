//! One line per event on stderr: `TIMESTAMP LEVEL EVENT key=value …`.
//!
//! Values containing spaces, quotes or `=` are quoted with `"` (and `"`/`\`
//! escaped), so every line splits unambiguously. Timestamps are UTC,
//! RFC 3339 with milliseconds, computed without a time-zone database.

use std::fmt::{self, Display, Write as _};
use std::io::Write as _;
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

/// Writes one event to stderr, in a single `write` so lines never interleave.
pub fn emit(level: Level, event: &str, fields: &[(&str, &dyn Display)]) {
    let mut line = format_line(SystemTime::now(), level, event, fields);
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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

fn write_timestamp(out: &mut String, now: SystemTime) {
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
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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
    fn calendar_edges() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
