//! clusterctl: control a running clusterd over its control socket.
//!
//! One request per run: connect, send the request, print each response as it
//! arrives, exit. A small synchronous program: blocking std sockets with
//! timeouts, no async runtime.
//!
//! # Exit status
//!
//! - 0: success.
//! - 1: the command failed: clusterd refused it, or a restart aborted or
//!   rolled back (any [`Response::Error`]), or its reply made no sense.
//! - 2: usage or config error (nothing was sent).
//! - 3: clusterd not reachable: no socket, nobody listening, no answer in
//!   time, or the connection dropped before the final reply; or what
//!   answered is not the clusterd asked for: a server of another user (not
//!   this user or root, by `SO_PEERCRED`), or, with `-c`, a clusterd running
//!   another config file (nothing but `Status` is sent to it).
//!
//! Errors are printed once, as `clusterctl: MESSAGE` on stderr (with
//! control characters escaped, see [`render::clean`]); with `--json` an
//! `{"type":"error","data":{"message":…}}` line is also printed on stdout,
//! with the exact text.

mod args;
mod client;
mod render;

use args::{Args, Command, Parsed};
use client::{Conn, RecvError};
use clusterd::proto::{self, LogEntry, Request, Response, RestartOutcome};
use serde_json::json;
use std::ffi::OsString;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Longest wait for clusterd to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a reply to `status`, `scale` and `stop` (a restart may
/// take as long as it takes; only the connection dropping ends the wait).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `upgrade` waits for the new image to answer.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why clusterctl stops without success.
#[derive(Debug)]
enum Failure {
    /// A bad command line (exit 2).
    Usage(String),
    /// The config named by `-c` does not load: `FILE:LINE: message` lines
    /// (exit 2).
    Config(String),
    /// The command failed (exit 1).
    Failed(String),
    /// A restart aborted or rolled back; its JSON event is already printed
    /// (exit 1).
    Aborted(String),
    /// clusterd cannot be reached, or went away (exit 3).
    Unreachable(String),
    /// Stdout was closed (`clusterctl status | head -1`): stop quietly.
    Quiet,
}

fn main() -> ExitCode {
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let json = raw.iter().take_while(|a| *a != "--").any(|a| a == "--json");
    let result = match args::parse(raw) {
        Ok(Parsed::Help) => print(args::HELP.trim_end()),
        Ok(Parsed::Version) => print(&format!("clusterctl {}", env!("CARGO_PKG_VERSION"))),
        Ok(Parsed::Run(args)) => run(&args),
        Err(message) => Err(Failure::Usage(message)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure, json),
    }
}

/// Prints a failure and returns its exit code.
fn report(failure: Failure, json: bool) -> ExitCode {
    let mut stderr = io::stderr().lock();
    // Messages may quote clusterd, and so a worker: escaped for the
    // terminal (line by line: config errors are one per line).
    let clean = |m: &str| {
        m.split('\n')
            .map(|line| render::clean(line).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (code, message) = match failure {
        Failure::Quiet => return ExitCode::SUCCESS,
        Failure::Usage(m) => {
            let _ = writeln!(
                stderr,
                "clusterctl: {}\n{}\nTry 'clusterctl --help' for more information.",
                clean(&m),
                args::USAGE
            );
            (2, Some(m))
        }
        Failure::Config(m) => {
            let _ = writeln!(stderr, "{}", clean(&m));
            (2, Some(m))
        }
        Failure::Failed(m) => {
            let _ = writeln!(stderr, "clusterctl: {}", clean(&m));
            (1, Some(m))
        }
        Failure::Aborted(m) => {
            let _ = writeln!(stderr, "clusterctl: {}", clean(&m));
            (1, None)
        }
        Failure::Unreachable(m) => {
            let _ = writeln!(stderr, "clusterctl: {}", clean(&m));
            (3, Some(m))
        }
    };
    if let (true, Some(message)) = (json, message) {
        let _ = print(&render::event("error", &json!({ "message": message })));
    }
    ExitCode::from(code)
}

/// Prints one line on stdout (flushed: restart progress must show at once).
fn print(line: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                Failure::Quiet
            } else {
                Failure::Failed(format!("cannot write to stdout: {e}"))
            }
        })
}

fn run(args: &Args) -> Result<(), Failure> {
    let target = choose_socket(args)?;
    let request = match &args.command {
        Command::Status => Request::Status,
        Command::Upgrade(binary) => Request::Upgrade {
            binary: match binary {
                // clusterd runs elsewhere: the path as this shell means it.
                Some(path) => Some(absolute(path)?.to_string_lossy().into_owned()),
                None => None,
            },
        },
        Command::Restart(None) => Request::Restart,
        Command::Restart(Some(id)) => Request::RestartWorker(*id),
        Command::Scale(scale) => Request::Scale(*scale),
        Command::Stop => Request::Stop,
        Command::Logs {
            lines,
            follow,
            worker,
        } => Request::Logs {
            lines: *lines,
            follow: *follow,
            worker: *worker,
        },
    };
    // With -c, the daemon must be the one running that file: ask first, so
    // that nothing but Status reaches the daemon of another config.
    if target.config.is_some() && !matches!(args.command, Command::Status) {
        let mut who = open(&target, &Request::Status, Some(REPLY_TIMEOUT), args.json)?;
        match who.next("its status")? {
            Response::Status(status) => target.check_config(&status.config)?,
            other => return Err(unexpected(&other)),
        }
    }
    let timeout = match args.command {
        Command::Restart(_) | Command::Logs { follow: true, .. } => None,
        _ => Some(REPLY_TIMEOUT),
    };
    let mut session = open(&target, &request, timeout, args.json)?;
    match args.command {
        Command::Status => session.status(&target),
        Command::Restart(_) => session.restart(),
        Command::Scale(_) => session.scale(),
        Command::Stop => session.stop(),
        Command::Logs { follow, .. } => session.logs(follow, &target, &request, args.json),
        Command::Upgrade(_) => session.upgrade(&target),
    }
}

/// `path` made absolute against the current folder.
fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path)
        .map_err(|e| Failure::Usage(format!("--binary {}: {e}", path.display())))
}

/// Connects to the target's socket, checks who serves it, and sends
/// `request`.
fn open(
    target: &Target,
    request: &Request,
    timeout: Option<Duration>,
    json: bool,
) -> Result<Session, Failure> {
    let path = &target.path;
    let conn = Conn::connect(path, CONNECT_TIMEOUT).map_err(|e| {
        Failure::Unreachable(format!(
            "cannot reach clusterd at {} ({}): {}{}",
            path.display(),
            target.origin,
            os_error(&e),
            hint(&e)
        ))
    })?;
    session(target, conn, request, timeout, json)
}

/// Checks who serves `conn` and sends `request`.
fn session(
    target: &Target,
    conn: Conn,
    request: &Request,
    timeout: Option<Duration>,
    json: bool,
) -> Result<Session, Failure> {
    let path = &target.path;
    // Whoever could put a socket at this path (a folder another user made
    // or can repoint) could answer "restart done" to anything: only a
    // server of this user or root is believed.
    let me = rustix::process::geteuid().as_raw();
    match conn.peer_uid() {
        Ok(uid) if uid == me || uid == 0 => {}
        // Root may control other users' clusterds: one whose socket is in a
        // folder private to its user (not a link, theirs, not writable by
        // others) is that user's own.
        Ok(uid) if me == 0 && private_to(path, uid) => {}
        Ok(uid) => {
            return Err(Failure::Unreachable(format!(
                "refusing to talk to {}: it is served by uid {uid}, not by this user (uid {me}) or root, \
                 so it is not this user's clusterd (check who owns its folder)",
                path.display()
            )));
        }
        Err(e) => {
            return Err(Failure::Unreachable(format!(
                "cannot check who serves {}: {}",
                path.display(),
                os_error(&e)
            )));
        }
    }
    conn.set_read_timeout(timeout)
        .map_err(|e| Failure::Unreachable(format!("cannot use the connection to clusterd: {e}")))?;
    let mut conn = conn;
    // If sending fails, clusterd may still have answered (e.g. refused us
    // before reading): read first, report the send error if nothing came.
    let sent = conn.send(request);
    Ok(Session {
        conn,
        path: path.clone(),
        sent,
        json,
    })
}

/// Whether the folder of the socket at `path` (itself, not what a link
/// points to) is a directory of `uid` that nobody else may write to.
fn private_to(path: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// The socket to talk to.
struct Target {
    path: PathBuf,
    /// Where the path came from, for messages.
    origin: String,
    /// With `-c`: the config file as given, and resolved (canonical).
    config: Option<(PathBuf, PathBuf)>,
}

impl Target {
    /// With `-c`, fails (exit 3) unless `theirs`, the config the daemon
    /// reports, is the same file as ours.
    fn check_config(&self, theirs: &str) -> Result<(), Failure> {
        let Some((given, ours)) = &self.config else {
            return Ok(());
        };
        let theirs_path = Path::new(theirs);
        let same =
            theirs_path == ours || std::fs::canonicalize(theirs_path).is_ok_and(|t| t == *ours);
        if same {
            return Ok(());
        }
        Err(Failure::Unreachable(format!(
            "the clusterd at {} runs {theirs}, not {}: both configs use this control socket. \
             Give each its own control setting, or use -s {} to talk to that clusterd",
            self.path.display(),
            given.display(),
            self.path.display()
        )))
    }
}

/// The control socket: `-s`, else the config's (`-c`), else
/// `$CLUSTERD_SOCKET`; with a description of where it came from.
fn choose_socket(args: &Args) -> Result<Target, Failure> {
    let target = |path: PathBuf, origin: &str| Target {
        path,
        origin: origin.into(),
        config: None,
    };
    if let Some(path) = &args.socket {
        return Ok(target(path.clone(), "given with -s"));
    }
    if let Some(file) = &args.config {
        let config = clusterd::config::read(file).map_err(|e| Failure::Config(e.to_string()))?;
        let why = match &config.control {
            Some(_) => "its control setting".to_string(),
            None => clusterd::config::default_control_path(&config.socket_name())
                .1
                .to_string(),
        };
        let canonical = std::fs::canonicalize(&config.path).unwrap_or(config.path.clone());
        return Ok(Target {
            path: config.control_path(),
            origin: format!("chosen from -c {}: {why}", file.display()),
            config: Some((config.path, canonical)),
        });
    }
    match std::env::var_os("CLUSTERD_SOCKET").filter(|p| !p.is_empty()) {
        Some(path) => Ok(target(path.into(), "from $CLUSTERD_SOCKET")),
        None => Err(Failure::Usage(
            "no control socket given: use -s SOCKET or -c CONFIG (or set CLUSTERD_SOCKET)".into(),
        )),
    }
}

/// An I/O error's text without the ` (os error N)` suffix.
fn os_error(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    }
}

/// What a failed connect most likely means.
fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => " (is clusterd running?)",
        io::ErrorKind::PermissionDenied => {
            " (only the user clusterd runs as, and root, may use its control socket)"
        }
        io::ErrorKind::TimedOut => " (clusterd is not accepting connections)",
        _ => "",
    }
}

/// A sent request and the responses coming back.
struct Session {
    conn: Conn,
    path: PathBuf,
    /// Whether the request went out (see [`run`]).
    sent: io::Result<()>,
    json: bool,
}

impl Session {
    fn status(&mut self, target: &Target) -> Result<(), Failure> {
        match self.next("a status")? {
            Response::Status(status) => {
                target.check_config(&status.config)?;
                if self.json {
                    print(&render::json_line(
                        &render::status_json(&status).to_string(),
                    ))
                } else {
                    print(render::status(&status).trim_end())
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    fn restart(&mut self) -> Result<(), Failure> {
        let mut progress: Option<(u32, u32)> = None;
        loop {
            let what = match progress {
                None => "the restart's result".to_string(),
                Some((done, total)) => {
                    format!("the restart's result (after {done}/{total} workers were replaced)")
                }
            };
            match self.next(&what)? {
                Response::Progress(p) => {
                    progress = Some((p.done, p.total));
                    if self.json {
                        print(&render::event("progress", &render::progress_json(&p)))?;
                    } else {
                        print(&render::progress(&p))?;
                    }
                }
                Response::Baking(b) => {
                    if self.json {
                        print(&render::event("baking", &render::baking_json(&b)))?;
                    } else {
                        print(&render::baking(&b))?;
                    }
                }
                Response::Restarted(RestartOutcome::Done {
                    generation,
                    replaced,
                    elapsed_ms,
                }) => {
                    return if self.json {
                        print(&render::event(
                            "done",
                            &render::done_json(generation, replaced, elapsed_ms),
                        ))
                    } else {
                        print(&render::restart_done(generation, replaced, elapsed_ms))
                    };
                }
                Response::Restarted(RestartOutcome::Aborted {
                    reason,
                    replaced,
                    total,
                }) => {
                    if self.json {
                        print(&render::event(
                            "aborted",
                            &render::aborted_json(&reason, replaced, total),
                        ))?;
                    }
                    return Err(Failure::Aborted(render::restart_aborted(
                        &reason, replaced, total,
                    )));
                }
                Response::Restarted(outcome @ RestartOutcome::RolledBack { .. }) => {
                    if self.json {
                        print(&render::event(
                            "rolled_back",
                            &render::rolled_back_json(&outcome),
                        ))?;
                    }
                    return Err(Failure::Aborted(render::rolled_back(&outcome)));
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// The answer to `upgrade`, then the status of the new image once it
    /// answers (its count of upgrades is one more).
    fn upgrade(&mut self, target: &Target) -> Result<(), Failure> {
        let asked = Instant::now();
        let up = match self.next("the upgrade's answer")? {
            Response::Upgrading(up) => up,
            other => return Err(unexpected(&other)),
        };
        if self.json {
            print(&render::event(
                "upgrading",
                &json!({ "from": up.from, "to": up.to, "binary": up.binary }),
            ))?;
        } else {
            print(&format!(
                "upgrading clusterd {} -> {} ({})",
                render::clean(&up.from),
                render::clean(&up.to),
                render::clean(&up.binary)
            ))?;
        }
        let end = asked + UPGRADE_TIMEOUT;
        let mut pause = Duration::from_millis(2);
        loop {
            let answer = match Conn::connect(&target.path, CONNECT_TIMEOUT) {
                // Gone: nobody listens on the socket any more.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) =>
                {
                    return Err(Failure::Failed(format!(
                        "clusterd exited during the upgrade ({}): its workers drain and exit; see its log",
                        os_error(&e)
                    )));
                }
                Err(_) => None,
                Ok(conn) => session(
                    target,
                    conn,
                    &Request::Status,
                    Some(REPLY_TIMEOUT),
                    self.json,
                )
                .and_then(|mut s| s.next("a status"))
                .ok(),
            };
            if let Some(Response::Status(status)) = answer {
                if status.upgrades > up.upgrades {
                    let elapsed = asked.elapsed().as_millis() as u64;
                    return if self.json {
                        print(&render::event(
                            "upgraded",
                            &render::upgraded_json(&up, &status, elapsed),
                        ))
                    } else {
                        print(&render::upgraded(&up, &status, elapsed))
                    };
                }
            }
            if Instant::now() >= end {
                return Err(Failure::Failed(format!(
                    "the new image did not answer within {} s: clusterd still runs the old one \
                     (see upgrade.failed in its log)",
                    UPGRADE_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn scale(&mut self) -> Result<(), Failure> {
        match self.next("the result")? {
            Response::Scaled { from, to } => {
                if self.json {
                    print(&render::event("scaled", &json!({ "from": from, "to": to })))
                } else {
                    print(&render::scaled(from, to))
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    fn stop(&mut self) -> Result<(), Failure> {
        match self.next("the result")? {
            Response::Stopping => {
                if self.json {
                    print(&render::event("stopping", &json!({})))
                } else {
                    print(&render::stopping())
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Prints log lines as they come; without `follow`, the one batch.
    /// Following ends when clusterd closes the connection and its socket no
    /// longer answers, or another process serves it (it exited): exit 0;
    /// when it cut this client off for reading too slowly: exit 1. A
    /// clusterd upgrading itself closes the connection too but keeps its
    /// socket and its pid: then the new image is asked for its log buffer
    /// and following goes on after the last line printed.
    fn logs(
        &mut self,
        follow: bool,
        target: &Target,
        request: &Request,
        json: bool,
    ) -> Result<(), Failure> {
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut printed = Printed::new(since_ms);
        let pid = self.conn.peer_pid().ok();
        // Whether a batch came on this connection, and on any before it.
        let (mut answered, mut resumable) = (false, false);
        // Connections in a row that ended before their first batch: a
        // clusterd that keeps accepting and dropping us is not followed forever.
        let mut fruitless = 0;
        loop {
            let mut batch = match self.next("the log") {
                Ok(Response::Logs(batch)) => batch,
                Ok(other) => return Err(unexpected(&other)),
                Err(e @ Failure::Unreachable(_)) if follow => {
                    if !answered {
                        fruitless += 1;
                        if fruitless > 3 {
                            return Err(e);
                        }
                    }
                    // Before any batch, the request as asked; after, the
                    // newest lines kept, to resume in.
                    let again = match *request {
                        Request::Logs { worker, .. } if resumable => Request::Logs {
                            lines: u32::MAX,
                            follow: true,
                            worker,
                        },
                        _ => request.clone(),
                    };
                    let conn = match Conn::connect(&target.path, CONNECT_TIMEOUT) {
                        Ok(conn) => conn,
                        // Nobody listens any more: clusterd exited.
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                            ) =>
                        {
                            return Ok(());
                        }
                        Err(e) => {
                            return Err(Failure::Unreachable(format!(
                                "cannot reach clusterd at {} again: {}",
                                target.path.display(),
                                os_error(&e)
                            )));
                        }
                    };
                    if conn.peer_pid().ok() != pid {
                        // Another clusterd: the one followed has exited.
                        return Ok(());
                    }
                    *self = session(target, conn, &again, None, json)?;
                    answered = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !std::mem::replace(&mut answered, true) {
                fruitless = 0;
                if resumable {
                    batch.drain(..printed.resume_at(&batch));
                }
                resumable = true;
            }
            for entry in &batch {
                let line = if self.json {
                    clusterd::daemon::logsink::json_line(entry)
                } else {
                    render::clean(&clusterd::daemon::logsink::text_line(entry)).into_owned()
                };
                print(&line)?;
                printed.push(entry);
            }
            if !follow {
                return Ok(());
            }
        }
    }

    /// The next response; [`Response::Error`] and every way of not getting a
    /// response become failures. `what` names the awaited reply in messages.
    fn next(&mut self, what: &str) -> Result<Response, Failure> {
        let path = self.path.display();
        match self.conn.recv() {
            Ok(Some(Response::Error(message))) => Err(Failure::Failed(message)),
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(Failure::Unreachable(match &self.sent {
                Err(e) => format!(
                    "cannot send the request to clusterd at {path}: {}",
                    os_error(e)
                ),
                Ok(()) => format!("clusterd at {path} closed the connection before sending {what}"),
            })),
            Err(RecvError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Failure::Unreachable(format!(
                    "clusterd at {path} did not send {what} within {} s",
                    REPLY_TIMEOUT.as_secs()
                )))
            }
            Err(RecvError::Io(e)) => Err(Failure::Unreachable(format!(
                "lost the connection to clusterd at {path} while waiting for {what}: {}",
                os_error(&e)
            ))),
            Err(RecvError::Truncated) => Err(Failure::Unreachable(format!(
                "clusterd at {path} closed the connection in the middle of {what}"
            ))),
            Err(RecvError::Protocol(proto::Error::Version { theirs, ours })) => {
                Err(Failure::Failed(format!(
                    "clusterd at {path} speaks protocol version {theirs}, this clusterctl speaks version {ours} \
                 (use the clusterctl that comes with this clusterd)"
                )))
            }
            Err(RecvError::Protocol(e)) => Err(Failure::Failed(format!(
                "cannot understand the reply of clusterd at {path}: {e}"
            ))),
        }
    }
}

fn unexpected(response: &Response) -> Failure {
    Failure::Failed(format!("unexpected reply from clusterd: {response:?}"))
}

/// The last lines `clusterctl logs -f` printed, to find where to resume in
/// the backlog of a clusterd that upgraded itself meanwhile.
struct Printed {
    lines: std::collections::VecDeque<LogEntry>,
    /// When following began (ms since the epoch; clusterd is on this host).
    since_ms: u64,
}

impl Printed {
    /// How many lines are kept to match.
    const KEPT: usize = 32;

    fn new(since_ms: u64) -> Printed {
        Printed {
            lines: std::collections::VecDeque::new(),
            since_ms,
        }
    }

    fn push(&mut self, entry: &LogEntry) {
        if self.lines.len() == Self::KEPT {
            self.lines.pop_front();
        }
        self.lines.push_back(entry.clone());
    }

    /// Where the new lines begin in `backlog` (oldest first): after the
    /// latest place where the lines printed last end; if they are not there
    /// (the buffer turned over), after the last printed line's time; with
    /// nothing printed, from when following began.
    fn resume_at(&self, backlog: &[LogEntry]) -> usize {
        let Some(last) = self.lines.back() else {
            return backlog
                .iter()
                .position(|e| e.ts_ms >= self.since_ms)
                .unwrap_or(backlog.len());
        };
        let ends_here = |end: usize| {
            self.lines
                .iter()
                .rev()
                .zip(backlog[..end].iter().rev())
                .all(|(a, b)| a == b)
        };
        (1..=backlog.len())
            .rev()
            .find(|&end| ends_here(end))
            .unwrap_or_else(|| {
                backlog
                    .iter()
                    .position(|e| e.ts_ms > last.ts_ms)
                    .unwrap_or(backlog.len())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_lose_their_number() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(os_error(&e), "No such file or directory");
        assert_eq!(hint(&e), " (is clusterd running?)");
        let e = io::Error::other("custom");
        assert_eq!(os_error(&e), "custom");
    }

    fn entry(ts_ms: u64, event: &str) -> LogEntry {
        LogEntry {
            ts_ms,
            level: "info".into(),
            event: event.into(),
            fields: Vec::new(),
        }
    }

    #[test]
    fn following_resumes_after_the_last_printed_line() {
        // Nothing printed: from when following began.
        let mut printed = Printed::new(2);
        assert_eq!(printed.resume_at(&[entry(1, "a"), entry(2, "b")]), 1);
        assert_eq!(printed.resume_at(&[entry(1, "a")]), 1);
        for e in [entry(1, "a"), entry(2, "x"), entry(2, "x")] {
            printed.push(&e);
        }
        // The new image's backlog: what was printed, then what came after
        // the connection was cut (the same line again among it).
        let backlog = [
            entry(0, "older"),
            entry(1, "a"),
            entry(2, "x"),
            entry(2, "x"),
            entry(2, "x"),
            entry(3, "upgrade.done"),
        ];
        assert_eq!(printed.resume_at(&backlog), 4, "the third x is new");
        let backlog = [entry(1, "a"), entry(2, "x"), entry(2, "x"), entry(3, "b")];
        assert_eq!(printed.resume_at(&backlog), 3);
        // The buffer turned over: by time.
        let backlog = [entry(2, "y"), entry(3, "b"), entry(4, "c")];
        assert_eq!(printed.resume_at(&backlog), 1);
        assert_eq!(printed.resume_at(&[]), 0);
        // Only the last KEPT lines are kept.
        for t in 10..100 {
            printed.push(&entry(t, "n"));
        }
        assert_eq!(printed.lines.len(), Printed::KEPT);
    }
}
