//! The command line, parsed by hand: `clusterctl [-s SOCKET | -c CONFIG]
//! [--json] COMMAND`. Options may come before or after the command. Pure: no
//! environment, no files.

use clusterd::proto::Scale;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;

pub const USAGE: &str = "Usage: clusterctl [-s SOCKET | -c CONFIG] [--json] status|restart [--worker ID]|scale N|+N|-N|stop|logs [-f] [-n N] [--worker ID]|upgrade [--binary PATH]";

pub const HELP: &str = "\
clusterctl: control a running clusterd

Usage: clusterctl [-s SOCKET | -c CONFIG] [--json] COMMAND

Commands:
  status          show clusterd and its workers
  restart [--worker ID]
                  rolling restart (re-reads the config); waits and reports
                  each step; a new generation that fails is rolled back
                  (exit 1). With --worker, replaces only that worker with a
                  new instance of the same program, READY-gated and baked
  scale N|+N|-N   set the worker count, or add or remove workers
  stop            graceful stop: clusterd drains every worker, then exits
  logs [-f] [-n N] [--worker ID]
                  the last N log lines (default 50) of clusterd and its
                  workers (of worker ID only); -f: then follow them live
  upgrade [--binary PATH]
                  re-execute clusterd in place from PATH (default: the file
                  it was started from), keeping every worker; waits until
                  the new image answers. Refused (exit 1, nothing changed)
                  while a restart or a stop runs, or if PATH cannot take
                  over

Options:
  -s, --socket PATH   the control socket
  -c, --config FILE   use the control socket of clusterd's config FILE
      --json          JSON output: one object for status, JSON Lines
                      {\"type\":…,\"data\":…} for the other commands
  -h, --help          print this help
  -V, --version       print the version

The socket is the one -s names, else the one -c implies (its `control`
setting or the default path), else $CLUSTERD_SOCKET.

Exit status: 0 success, 1 the command failed (e.g. restart aborted or
rolled back), 2 usage or config error, 3 clusterd not reachable.
";

/// Lines `clusterctl logs` shows without `-n`.
pub const DEFAULT_LOG_LINES: u32 = 50;

/// A command to send to clusterd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    /// `restart`, or `restart --worker ID`.
    Restart(Option<u32>),
    /// `logs [-f] [-n N] [--worker ID]`.
    Logs {
        lines: u32,
        follow: bool,
        worker: Option<u32>,
    },
    Scale(Scale),
    Stop,
    /// `upgrade [--binary PATH]`.
    Upgrade(Option<PathBuf>),
}

/// A parsed command line that runs a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `-s PATH`.
    pub socket: Option<PathBuf>,
    /// `-c FILE`.
    pub config: Option<PathBuf>,
    pub json: bool,
    pub command: Command,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Help,
    Version,
    Run(Args),
}

/// Parses the arguments (without the program name). The error is a one-line
/// usage message.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Parsed, String> {
    let args: Vec<OsString> = args.into_iter().collect();
    // --help and --version win wherever they are (before a `--`).
    for arg in args.iter().take_while(|a| *a != "--") {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Parsed::Help),
            Some("-V" | "--version") => return Ok(Parsed::Version),
            _ => {}
        }
    }

    let mut socket = None;
    let mut config = None;
    let mut json = false;
    let mut worker: Option<u32> = None;
    let mut follow = false;
    let mut lines: Option<u32> = None;
    let mut binary: Option<PathBuf> = None;
    let mut words: Vec<String> = Vec::new();
    let mut only_words = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if only_words || !is_option(&text) {
            words.push(
                arg.into_string()
                    .map_err(|a| format!("argument {a:?} is not valid UTF-8"))?,
            );
            continue;
        }
        let (name, inline) = split_option(&arg);
        match name.as_str() {
            "--" => only_words = true,
            "--json" if inline.is_none() => json = true,
            "-f" | "--follow" if inline.is_none() => follow = true,
            "-n" | "--lines" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or("-n needs a number of lines")?,
                };
                let value = value.to_string_lossy();
                lines = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("-n needs a number of lines, found '{value}'"))?,
                );
            }
            "--binary" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or("--binary needs a path")?,
                };
                if value.is_empty() {
                    return Err("--binary needs a non-empty path".into());
                }
                binary = Some(PathBuf::from(value));
            }
            "--worker" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or("--worker needs a worker id")?,
                };
                let value = value.to_string_lossy();
                worker = Some(value.parse::<u32>().ok().filter(|&id| id >= 1).ok_or_else(
                    || format!("--worker needs a worker id (1, 2, ...), found '{value}'"),
                )?);
            }
            "-s" | "--socket" | "-c" | "--config" => {
                let is_socket = matches!(name.as_str(), "-s" | "--socket");
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| {
                        let what = if is_socket {
                            "a socket path"
                        } else {
                            "a config file"
                        };
                        format!("{name} needs {what}")
                    })?,
                };
                if value.is_empty() {
                    return Err(format!("{name} needs a non-empty value"));
                }
                if is_socket {
                    socket = Some(PathBuf::from(value));
                } else {
                    config = Some(PathBuf::from(value));
                }
            }
            _ => return Err(format!("unknown option '{text}'")),
        }
    }

    let mut words = words.into_iter();
    let command = match words.next().as_deref() {
        None => {
            return Err(
                "no command given (commands: status, restart, scale, stop, logs, upgrade)".into(),
            );
        }
        Some("status") => Command::Status,
        Some("restart") => Command::Restart(worker.take()),
        Some("logs") => Command::Logs {
            lines: lines.take().unwrap_or(DEFAULT_LOG_LINES),
            follow: std::mem::take(&mut follow),
            worker: worker.take(),
        },
        Some("stop") => Command::Stop,
        Some("upgrade") => Command::Upgrade(binary.take()),
        Some("scale") => match words.next() {
            Some(count) => Command::Scale(parse_scale(&count)?),
            None => return Err("scale needs a worker count: N, +N or -N".into()),
        },
        Some(other) => {
            return Err(format!(
                "unknown command '{other}' (commands: status, restart, scale, stop, logs, upgrade)"
            ));
        }
    };
    if let Some(extra) = words.next() {
        return Err(format!("unexpected argument '{extra}'"));
    }
    if worker.is_some() {
        return Err("--worker goes with restart or logs".into());
    }
    if binary.is_some() {
        return Err("--binary goes with upgrade".into());
    }
    if follow || lines.is_some() {
        return Err("-f and -n go with logs".into());
    }
    Ok(Parsed::Run(Args {
        socket,
        config,
        json,
        command,
    }))
}

/// Whether `arg` is an option rather than a word. `-1` is a word (as in
/// `scale -1`): no option starts with a digit. A lone `-` is a word too.
fn is_option(arg: &str) -> bool {
    let mut chars = arg.chars();
    chars.next() == Some('-') && chars.next().is_some_and(|c| !c.is_ascii_digit())
}

/// Splits `--name=value` and `-sVALUE` / `-cVALUE` into name and value (the
/// value stays an OS string: paths need not be UTF-8).
fn split_option(arg: &OsStr) -> (String, Option<OsString>) {
    let bytes = arg.as_bytes();
    let (name, value) = if bytes.starts_with(b"--") {
        match bytes.iter().position(|&b| b == b'=') {
            Some(eq) => (&bytes[..eq], Some(&bytes[eq + 1..])),
            None => (bytes, None),
        }
    } else if bytes.len() > 2 && matches!(&bytes[..2], b"-s" | b"-c") {
        (&bytes[..2], Some(&bytes[2..]))
    } else {
        (bytes, None)
    };
    (
        String::from_utf8_lossy(name).into_owned(),
        value.map(|v| OsStr::from_bytes(v).to_os_string()),
    )
}

/// `N` (scale to N), `+N` (add N) or `-N` (remove N), N ≥ 1.
pub fn parse_scale(text: &str) -> Result<Scale, String> {
    let (make, digits): (fn(u32) -> Scale, &str) = match text.as_bytes().first() {
        Some(b'+') => (Scale::Up, &text[1..]),
        Some(b'-') => (Scale::Down, &text[1..]),
        _ => (Scale::To, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid worker count '{text}': expected N, +N or -N"
        ));
    }
    let n: u32 = digits
        .parse()
        .map_err(|_| format!("invalid worker count '{text}': too large"))?;
    match (make(n), n) {
        (Scale::To(_), 0) => {
            Err("cannot scale to 0 workers (use 'clusterctl stop' to stop clusterd)".into())
        }
        (_, 0) => Err(format!("scale {text} would change nothing")),
        (scale, _) => Ok(scale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(OsString::from))
    }

    fn ok(args: &[&str]) -> Args {
        match run(args) {
            Ok(Parsed::Run(a)) => a,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_and_options_in_any_order() {
        let a = ok(&["status"]);
        assert_eq!(
            (a.command, a.json, a.socket, a.config),
            (Command::Status, false, None, None)
        );
        let a = ok(&["--json", "-s", "/run/x.sock", "status"]);
        assert_eq!((a.command, a.json), (Command::Status, true));
        assert_eq!(a.socket, Some(PathBuf::from("/run/x.sock")));
        let a = ok(&["restart", "--json", "--config", "shop.conf"]);
        assert_eq!((a.command, a.json), (Command::Restart(None), true));
        assert_eq!(a.config, Some(PathBuf::from("shop.conf")));
        let a = ok(&["restart", "--worker", "3"]);
        assert_eq!(a.command, Command::Restart(Some(3)));
        let a = ok(&["--worker=2", "restart"]);
        assert_eq!(a.command, Command::Restart(Some(2)));
        let a = ok(&["logs"]);
        assert_eq!(
            a.command,
            Command::Logs {
                lines: 50,
                follow: false,
                worker: None
            }
        );
        let a = ok(&["logs", "-f", "-n", "200", "--worker", "3"]);
        assert_eq!(
            a.command,
            Command::Logs {
                lines: 200,
                follow: true,
                worker: Some(3)
            }
        );
        let a = ok(&["--socket=/a.sock", "-cshop.conf", "stop"]);
        assert_eq!(a.socket, Some(PathBuf::from("/a.sock")));
        assert_eq!(a.config, Some(PathBuf::from("shop.conf")));
        assert_eq!(
            ok(&["-s/b.sock", "stop"]).socket,
            Some(PathBuf::from("/b.sock"))
        );
    }

    #[test]
    fn scale_counts() {
        assert_eq!(ok(&["scale", "8"]).command, Command::Scale(Scale::To(8)));
        assert_eq!(ok(&["scale", "+2"]).command, Command::Scale(Scale::Up(2)));
        assert_eq!(ok(&["scale", "-1"]).command, Command::Scale(Scale::Down(1)));
        assert_eq!(
            ok(&["scale", "-1", "--json"]).command,
            Command::Scale(Scale::Down(1))
        );
        assert_eq!(
            ok(&["-s", "x", "scale", "--", "-3"]).command,
            Command::Scale(Scale::Down(3))
        );
        for bad in [
            "0",
            "-0",
            "+0",
            "abc",
            "",
            "1.5",
            "++1",
            "+-1",
            "4294967296",
            " 3",
            "3x",
        ] {
            assert!(parse_scale(bad).is_err(), "{bad:?}");
        }
        assert!(parse_scale("0").unwrap_err().contains("clusterctl stop"));
        assert!(
            run(&["scale"])
                .unwrap_err()
                .contains("needs a worker count")
        );
        assert!(
            run(&["scale", "x"])
                .unwrap_err()
                .contains("invalid worker count 'x'")
        );
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(run(&["--help"]), Ok(Parsed::Help));
        assert_eq!(run(&["bogus", "-h"]), Ok(Parsed::Help));
        assert_eq!(run(&["--version"]), Ok(Parsed::Version));
        assert_eq!(run(&["status", "-V"]), Ok(Parsed::Version));
        assert!(run(&["scale", "--", "--help"]).is_err());
    }

    #[test]
    fn usage_errors() {
        for (args, needle) in [
            (&[][..], "no command given"),
            (&["frobnicate"], "unknown command 'frobnicate'"),
            (&["status", "now"], "unexpected argument 'now'"),
            (&["-x", "status"], "unknown option '-x'"),
            (&["--json=yes", "status"], "unknown option '--json=yes'"),
            (&["status", "-s"], "-s needs a socket path"),
            (&["status", "--config"], "--config needs a config file"),
            (&["status", "--socket="], "needs a non-empty value"),
            (&["restart", "--worker"], "--worker needs a worker id"),
            (&["restart", "--worker", "0"], "found '0'"),
            (&["restart", "--worker", "two"], "found 'two'"),
            (
                &["status", "--worker", "2"],
                "--worker goes with restart or logs",
            ),
            (&["status", "-f"], "-f and -n go with logs"),
            (
                &["logs", "-n", "x"],
                "-n needs a number of lines, found 'x'",
            ),
        ] {
            let err = run(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
