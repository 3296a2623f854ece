//! The config file (`clusterd.conf(5)`): line-oriented `key = value`.
//!
//! [`parse_str`] is pure and collects every error with its line number;
//! [`load`] reads a file, parses it and resolves what needs the file system
//! (program path, chdir, user and group names).
//!
//! # Syntax
//!
//! - One `key = value` per line; whitespace around key and value is trimmed.
//!   Blank lines are ignored. A line without `=` is an error.
//! - A `#` at the start of a line, at the start of a value or after
//!   whitespace starts a comment, so `env = COLOR=#fff` keeps its `#`. In
//!   `exec` quotes are honoured too, as in a shell: `exec = sh -c "echo #1"`.
//! - `listen` and `env` may be repeated; any other key given twice is an
//!   error.
//! - Durations are an integer and a unit: `ms`, `s`, `m` or `h` (`0` alone is
//!   allowed), at most 365 days.
//! - Relative paths (`exec` programs containing a `/`, `chdir`, `control`,
//!   `unix:` listeners) are relative to the config file's folder.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::MAX_LISTENERS;
use crate::users;

/// A parsed, validated config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// The config file, as given on the command line (made absolute).
    pub path: PathBuf,
    /// The config file's stem: begins the default control socket's name.
    pub name: String,
    /// Program and arguments. A program with a `/` is made absolute against the
    /// config file's folder; a bare name is looked up in `PATH` (by [`load`]).
    pub exec: Vec<String>,
    /// `workers`: `None` means `auto`.
    pub workers: Option<u32>,
    /// `listen`, in order (at least one, at most [`MAX_LISTENERS`]).
    pub listen: Vec<Listen>,
    /// `backlog` of every listening socket.
    pub backlog: u32,
    /// `control`, if set (see [`Config::control_path`] for the default).
    pub control: Option<PathBuf>,
    /// `protocol` spoken with the workers.
    pub protocol: Protocol,
    /// `ready_timeout`: a new worker must report READY within this.
    pub ready_timeout: Duration,
    /// `drain_timeout`: SIGKILL a draining worker after this.
    pub drain_timeout: Duration,
    /// `restart_delay`: the first crash backoff.
    pub restart_delay: Duration,
    /// `restart_delay_max`: the backoff stops doubling here.
    pub restart_delay_max: Duration,
    /// `min_uptime`: a worker that lived this long did not crash-loop.
    pub min_uptime: Duration,
    /// `user`, resolved: uid and the user's primary gid. A numeric uid takes
    /// its gid from `/etc/passwd` when it has an entry there, else gid = uid
    /// (never the gid clusterd runs with, which may be root's). `group`, when
    /// set, overrides the gid.
    pub user: Option<(u32, u32)>,
    /// `group`, resolved.
    pub group: Option<u32>,
    /// `env`, in order.
    pub env: Vec<(String, String)>,
    /// Workers' working directory (default: the config file's folder).
    pub chdir: PathBuf,
    /// `ready_after` (`protocol = systemd` only): ready after living this long.
    pub ready_after: Option<Duration>,
    /// `metrics`: where to serve `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
    /// `log_capture`: workers' stdout and stderr go through clusterd, each
    /// line tagged (`on`, the default), or straight to clusterd's own
    /// (`off`).
    pub log_capture: bool,
    /// `watchdog`: a ready worker silent this long is hung and replaced.
    pub watchdog: Option<Duration>,
    /// `watchdog_signal`: the diagnostic signal a hung worker gets before
    /// SIGKILL.
    pub watchdog_signal: Signal,
    /// `max_memory`: bytes above which a worker is replaced.
    pub max_memory: Option<u64>,
    /// `max_requests`: recycle a worker after this many requests.
    pub max_requests: Option<u64>,
    /// `max_age`: recycle a worker after it lived this long.
    pub max_age: Option<Duration>,
    /// `crash_loop`: the crash streak that is a crash loop.
    pub crash_loop: u32,
    /// `on_crash_loop = exit`: stop (exit 1) when a crash loop begins.
    pub exit_on_crash_loop: bool,
    /// `log_format`: text (the default) or JSON Lines.
    pub log_format: LogFormat,
    /// `log_file`: where the log goes instead of stderr (reopened on
    /// SIGUSR1).
    pub log_file: Option<PathBuf>,
    /// `log_buffer`: bytes of recent log lines kept for `clusterctl logs`.
    pub log_buffer: u64,
    /// `shutdown_delay`: on TERM/INT and `clusterctl stop`, serve this long
    /// with `/healthz` failing before draining (lame duck).
    pub shutdown_delay: Duration,
    /// `bake`: a rolling restart's first replacement (the canary) and its
    /// last must stay up this long after READY; zero turns it off.
    pub bake: Duration,
    /// `rollback = auto`: a generation that crash-loops right after its
    /// restart finished goes back to the one before.
    pub rollback: bool,
    /// `empty_pool`: what new connections get once no worker has been ready
    /// for `ready_timeout`.
    pub empty_pool: EmptyPool,
    /// `dispatch`: how new connections reach the workers.
    pub dispatch: Dispatch,
    /// `balance` (`dispatch = clusterd`): which worker gets a connection
    /// that belongs to no session.
    pub balance: Balance,
    /// `sticky` (`dispatch = clusterd`): what makes requests one session
    /// that stays on one worker.
    pub sticky: Option<Sticky>,
}

/// `dispatch`: how new connections reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Dispatch {
    /// Every worker accepts from the one listening socket (the default).
    #[default]
    Shared,
    /// clusterd accepts, peeks at the request head, chooses a worker and
    /// passes it the connection (`SCM_RIGHTS`). Native and node workers.
    Clusterd,
    /// One `SO_REUSEPORT` listening socket per worker slot, kept by
    /// clusterd for the slot's whole life and handed to each replacement.
    Reuseport,
}

impl Dispatch {
    /// The word the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Dispatch::Shared => "shared",
            Dispatch::Clusterd => "clusterd",
            Dispatch::Reuseport => "reuseport",
        }
    }
}

/// `balance`: how `dispatch = clusterd` picks a worker for a connection that
/// no session ties to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Balance {
    /// The ready worker holding the fewest open connections (the default).
    #[default]
    LeastConnections,
    /// Ready workers in turn.
    RoundRobin,
}

/// `sticky`: what ties a request to the worker that served its session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Sticky {
    /// engine.io's `sid` query parameter (Socket.IO).
    SocketIo,
    /// A cookie, by name.
    Cookie(String),
    /// A request header, by name (lower case).
    Header(String),
    /// A query parameter, by name.
    Query(String),
    /// The client's IP address (nothing is peeked: works for TLS too).
    Ip,
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::SocketIo => f.write_str("socket.io"),
            Sticky::Cookie(n) => write!(f, "cookie:{n}"),
            Sticky::Header(n) => write!(f, "header:{n}"),
            Sticky::Query(n) => write!(f, "query:{n}"),
            Sticky::Ip => f.write_str("ip"),
        }
    }
}

/// Parses a `sticky` value.
fn parse_sticky(value: &str) -> Result<Sticky, String> {
    let expected =
        "expected \"socket.io\", \"cookie:NAME\", \"header:NAME\", \"query:NAME\" or \"ip\"";
    match value {
        "socket.io" => return Ok(Sticky::SocketIo),
        "ip" => return Ok(Sticky::Ip),
        _ => {}
    }
    let Some((kind, name)) = value.split_once(':') else {
        return Err(format!("{expected}, found {}", show(value)));
    };
    // RFC 9110 tokens: what a header or cookie name may be made of; a query
    // parameter name is held to the same so that it needs no decoding.
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(token) {
        return Err(format!(
            "{kind}: the name must be 1 to 64 letters, digits or !#$%&'*+-.^_`|~, found {}",
            show(name)
        ));
    }
    match kind {
        "cookie" => Ok(Sticky::Cookie(name.to_string())),
        "header" => Ok(Sticky::Header(name.to_ascii_lowercase())),
        "query" => Ok(Sticky::Query(name.to_string())),
        _ => Err(format!("{expected}, found {}", show(value))),
    }
}

/// `empty_pool`: what clusterd does with new connections once the pool has
/// had no ready worker for `ready_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum EmptyPool {
    /// Leave them queued in the kernel until a worker is ready (the default:
    /// nothing is lost, and a short outage is invisible but for latency).
    #[default]
    Wait,
    /// clusterd accepts them and answers `503 Service Unavailable` with
    /// `Retry-After` (HTTP listeners only).
    Http503,
    /// clusterd accepts them and resets them at once (any protocol).
    Reset,
}

/// A `listen` line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listen {
    /// The listener's name (`http` unless given as `NAME=ADDRESS`).
    pub name: String,
    /// Where it listens.
    pub addr: ListenAddr,
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ListenAddr {
    /// `host:port` or `[v6]:port`.
    Tcp(SocketAddr),
    /// `unix:/path` (absolute).
    Unix(PathBuf),
}

/// How clusterd talks to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// The native IPC channel on fd 3.
    Clusterd,
    /// `LISTEN_FDS`, sd_notify (or `ready_after`) and SIGTERM.
    Systemd,
    /// An unmodified Node.js server: the systemd protocol, spoken for it by
    /// the adapter clusterd has Node load first (`NODE_OPTIONS=--require`),
    /// plus Node's IPC channel for stats, heartbeats and status.
    Node,
}

impl Protocol {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Clusterd => "clusterd",
            Protocol::Systemd => "systemd",
            Protocol::Node => "node",
        }
    }

    /// Programs that know nothing of clusterd: listeners at fds 3..,
    /// `LISTEN_FDS`, READY by the readiness pipe or sd_notify, SIGTERM.
    pub fn is_socket_activation(self) -> bool {
        matches!(self, Protocol::Systemd | Protocol::Node)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based; 0 for problems of the whole file (a missing required key).
    pub line: usize,
    /// What is wrong, for a human.
    pub message: String,
}

/// Every problem found in a config file; displays as `FILE:LINE: message` lines.
///
/// At most [`MAX_ERRORS`] are kept (those of the first lines): a file of
/// garbage gives a readable report, not one line per line of garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The config file (absolute).
    pub path: PathBuf,
    /// The problems, ordered by line (at most [`MAX_ERRORS`]).
    pub errors: Vec<ConfigError>,
    /// How many more problems were found and left out of `errors`.
    pub omitted: usize,
}
impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", e.display(&self.path))?;
        }
        if self.omitted > 0 {
            let s = if self.omitted == 1 { "" } else { "s" };
            write!(
                f,
                "\n{}: ... and {} more error{s}",
                self.path.display(),
                self.omitted
            )?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// `FILE:LINE: message`, or `FILE: message` for line 0.
    pub fn display(&self, path: &Path) -> String {
        match self.line {
            0 => format!("{}: {}", path.display(), self.message),
            n => format!("{}:{n}: {}", path.display(), self.message),
        }
    }

    /// `FILE:LINE: warning: message`.
    pub fn warning(&self, path: &Path) -> String {
        ConfigError {
            line: self.line,
            message: format!("warning: {}", self.message),
        }
        .display(path)
    }
}

impl std::error::Error for LoadError {}

impl Config {
    /// The number of workers to start: `workers`, or the CPUs available to
    /// this process for `auto`.
    pub fn worker_count(&self) -> u32 {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
    }

    /// The control socket path: `control`, else `$CLUSTERD_SOCKET`, else
    /// `/run/clusterd/NAME.sock` for root, else
    /// `$XDG_RUNTIME_DIR/clusterd/NAME.sock` or `/tmp/clusterd-UID/NAME.sock`,
    /// NAME being [`Config::socket_name`].
    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| default_control_path(&self.socket_name()).0)
    }

    /// NAME of the default control socket: the config file's stem, `-` and
    /// 8 hex digits of a hash (FNV-1a, 32 bits) of its canonical path, e.g.
    /// `shop-1a2b3c4d`. Two configs of one name in two folders so get two
    /// sockets, and one file reached by two spellings (a link, `..`) one.
    /// A file that cannot be resolved is hashed as given.
    pub fn socket_name(&self) -> String {
        let canonical = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let mut hash: u32 = 0x811c_9dc5;
        for &b in std::os::unix::ffi::OsStrExt::as_bytes(canonical.as_os_str()) {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        format!("{}-{hash:08x}", self.name)
    }
}

/// The default control socket named `name` (see [`Config::socket_name`]),
/// and how it was chosen.
pub fn default_control_path(name: &str) -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os("CLUSTERD_SOCKET").filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), "from $CLUSTERD_SOCKET");
    }
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return (
            PathBuf::from(format!("/run/clusterd/{name}.sock")),
            "default for root",
        );
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return (
            Path::new(&dir).join(format!("clusterd/{name}.sock")),
            "from $XDG_RUNTIME_DIR",
        );
    }
    (
        PathBuf::from(format!("/tmp/clusterd-{}/{name}.sock", uid.as_raw())),
        "default (no $XDG_RUNTIME_DIR)",
    )
}

#[cfg(test)]
mod control_path_tests {
    use super::*;

    const TEXT: &str = "exec = /bin/true\nlisten = 127.0.0.1:3000\n";

    #[test]
    fn configs_of_one_name_in_two_folders_get_two_sockets() {
        let dir =
            std::env::temp_dir().join(format!("clusterd-control-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["a", "b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join("shop.conf"), TEXT).unwrap();
        }
        std::os::unix::fs::symlink(dir.join("a"), dir.join("c")).unwrap();
        let load = |p: &str| parse_str(TEXT, &dir.join(p)).unwrap();
        let (a, b) = (load("a/shop.conf"), load("b/shop.conf"));
        if std::env::var_os("CLUSTERD_SOCKET").is_none() {
            assert_ne!(a.control_path(), b.control_path());
            let file = a.control_path();
            let file = file.file_name().unwrap().to_str().unwrap();
            assert!(
                file.starts_with("shop-") && file.ends_with(".sock") && file.len() == 18,
                "readable: {file}"
            );
            // One file by two spellings has one socket.
            assert_eq!(load("c/shop.conf").control_path(), a.control_path());
            assert_eq!(load("b/../a/shop.conf").control_path(), a.control_path());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `bake` when the config does not set it: long enough to catch a program
/// that dies a few seconds after READY (a lazy database connection, the
/// first requests), short enough that a healthy rolling restart costs only
/// twice this (the canary and the last replacement bake).
pub const DEFAULT_BAKE: Duration = Duration::from_secs(5);

/// Every key, in the order of `clusterd.conf(5)`.
pub const KEYS: &[&str] = &[
    "exec",
    "workers",
    "listen",
    "backlog",
    "control",
    "protocol",
    "ready_timeout",
    "drain_timeout",
    "restart_delay",
    "restart_delay_max",
    "min_uptime",
    "user",
    "group",
    "env",
    "chdir",
    "ready_after",
    "metrics",
    "bake",
    "rollback",
    "empty_pool",
    "dispatch",
    "balance",
    "sticky",
    "log_capture",
    "watchdog",
    "watchdog_signal",
    "max_memory",
    "max_requests",
    "max_age",
    "crash_loop",
    "on_crash_loop",
    "shutdown_delay",
    "log_format",
    "log_file",
    "log_buffer",
];

/// Keys that may be given more than once.
const REPEATABLE: &[&str] = &["listen", "env"];

/// What other tools call our keys, for "did you mean".
const ALIASES: &[(&str, &str)] = &[
    ("command", "exec"),
    ("cmd", "exec"),
    ("run", "exec"),
    ("instances", "workers"),
    ("processes", "workers"),
    ("bind", "listen"),
    ("address", "listen"),
    ("port", "listen"),
    ("socket", "control"),
    ("cwd", "chdir"),
    ("dir", "chdir"),
    ("directory", "chdir"),
    ("workdir", "chdir"),
    ("environment", "env"),
    ("setenv", "env"),
];

/// Variables clusterd sets in the workers' environment itself: an `env`
/// line may not set them, and values clusterd inherited are not passed on.
pub const RESERVED_ENV: &[&str] = &[
    "CLUSTERD_FD",
    "CLUSTERD_WORKER_ID",
    "CLUSTERD_GENERATION",
    "CLUSTERD_READY_FD",
    "CLUSTERD_DISPATCH",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

const MAX_WORKERS: u64 = 1024;
/// Longest listener name: keeps [`crate::proto::Hello`] well under its cap.
const MAX_NAME_LEN: usize = 64;
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_UNIX_PATH: usize = 107;
const MAX_DURATION_MS: u64 = 365 * 24 * 3_600_000;
/// Searched for `exec` when neither the config nor clusterd has a `PATH`.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Reads and parses a config file, then resolves what needs the file system:
/// the `exec` program (which must exist and be executable), `chdir` (which
/// must be a directory) and `user`/`group` names.
///
/// Every problem, of either stage, is in the error (the first
/// [`MAX_ERRORS`] of them, see [`LoadError`]). The file is read as
/// [`read_file`] says: a regular file of at most [`MAX_FILE_BYTES`].
pub fn load(path: &Path) -> Result<Config, LoadError> {
    load_for(path, Purpose::Run).map(|loaded| loaded.config)
}

/// Why a config is loaded: what depends on the process that loads it is an
/// error when it is clusterd about to run the workers, and a warning for
/// `clusterd --check`, which may well run as another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `clusterd --check`.
    Check,
    /// clusterd starting or reloading.
    Run,
}

/// A config and the warnings about it: mistakes that are not errors (the
/// worker may still work), each naming the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: Config,
    /// In line order; `FILE:LINE: warning: message` with
    /// [`ConfigError::warning`].
    pub warnings: Vec<ConfigError>,
}

/// [`load`], with the warnings, for `purpose`.
///
/// # Errors
/// As [`load`]; with [`Purpose::Run`], also a `user` or `group` that this
/// process cannot switch to.
pub fn load_for(path: &Path, purpose: Purpose) -> Result<Loaded, LoadError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let bytes = read_file(&path).map_err(|message| LoadError {
        path: path.clone(),
        errors: vec![ConfigError { line: 0, message }],
        omitted: 0,
    })?;
    let mut parser = parse(&String::from_utf8_lossy(&bytes), &path);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if std::str::from_utf8(line).is_err() {
            parser.error(i + 1, "not valid UTF-8".into());
        }
    }
    parser.resolve();
    parser.check_switch_ids(purpose, &ProcessIds::current());
    parser.warn_about_wrappers();
    let mut warnings = std::mem::take(&mut parser.warnings);
    warnings.sort_by_key(|w| w.line);
    let config = parser.finish_load()?;
    Ok(Loaded { config, warnings })
}

/// Reads and parses a config file without resolving anything on the file
/// system: what `clusterctl -c FILE` needs to find the control socket, even
/// when the `exec` program is missing after a bad deploy.
pub fn read(path: &Path) -> Result<Config, LoadError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let bytes = read_file(&path).map_err(|message| LoadError {
        path: path.clone(),
        errors: vec![ConfigError { line: 0, message }],
        omitted: 0,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| LoadError {
        path: path.clone(),
        errors: vec![ConfigError {
            line: 0,
            message: "cannot read the config file: stream did not contain valid UTF-8".into(),
        }],
        omitted: 0,
    })?;
    parse(&text, &path).finish_load()
}

/// The largest config file read: a real one is a few hundred bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The most errors a [`LoadError`] lists (the rest are counted).
pub const MAX_ERRORS: usize = 20;

/// The bytes of the config file at `path` (absolute), or what is wrong, as
/// `cannot read the config file: …`.
///
/// It runs in the supervisor's loop (on HUP), so it must not block or
/// balloon on whatever sits at the path: only a regular file is opened (a
/// FIFO would block until someone opened its other end; a device never
/// ends), and one larger than [`MAX_FILE_BYTES`] is refused before it is
/// read. Symbolic links are followed: deploy tools link the config into
/// place. The open does not wait either (`O_NONBLOCK`), and the type is
/// checked again on the open file, so a swap after the first look changes
/// nothing.
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: io::Error| format!("cannot read the config file: {e}");
    let check = |meta: &std::fs::Metadata| -> Result<(), String> {
        if !meta.is_file() {
            return Err(format!(
                "cannot read the config file: it is {}, not a regular file",
                file_kind(&meta.file_type())
            ));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!(
                "cannot read the config file: it is {} bytes, more than the {} KiB a \
                 config file may have (is this the right file?)",
                meta.len(),
                MAX_FILE_BYTES / 1024
            ));
        }
        Ok(())
    };
    check(&std::fs::metadata(path).map_err(fail)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    check(&meta)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // It grew while being read.
        return Err(format!(
            "cannot read the config file: it is more than the {} KiB a config file may have",
            MAX_FILE_BYTES / 1024
        ));
    }
    Ok(bytes)
}

/// What a file that is not a regular one is, for a message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Parses config text. `path` is the file's absolute path, used to resolve
/// relative paths and for the config's name.
///
/// This is pure: it checks everything it can without the file system. What
/// needs it is left to [`load`]: a bare `exec` program is kept as written (not
/// looked up in `PATH`), `user`/`group` names are not resolved (they are
/// `None` here), and a numeric `user` gets gid = uid. The errors are those of
/// the earliest lines, at most [`MAX_ERRORS`].
pub fn parse_str(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    parse(text, path).finish()
}

fn parse<'a>(text: &str, path: &'a Path) -> Parser<'a> {
    let dir = path.parent().unwrap_or(path);
    let mut parser = Parser {
        dir,
        config: Config {
            path: path.to_path_buf(),
            name: path
                .file_stem()
                .map_or_else(|| "clusterd".into(), |s| s.to_string_lossy().into_owned()),
            exec: Vec::new(),
            workers: None,
            listen: Vec::new(),
            backlog: 1024,
            control: None,
            protocol: Protocol::Clusterd,
            ready_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            restart_delay: Duration::from_millis(100),
            restart_delay_max: Duration::from_secs(30),
            min_uptime: Duration::from_secs(5),
            user: None,
            group: None,
            env: Vec::new(),
            chdir: dir.to_path_buf(),
            ready_after: None,
            metrics: None,
            bake: DEFAULT_BAKE,
            rollback: true,
            empty_pool: EmptyPool::Wait,
            dispatch: Dispatch::Shared,
            balance: Balance::LeastConnections,
            sticky: None,
            log_capture: true,
            watchdog: None,
            watchdog_signal: Signal::ABRT,
            max_memory: None,
            max_requests: None,
            max_age: None,
            crash_loop: 10,
            exit_on_crash_loop: false,
            shutdown_delay: Duration::ZERO,
            log_format: LogFormat::Text,
            log_file: None,
            log_buffer: DEFAULT_LOG_BUFFER,
        },
        errors: Vec::new(),
        omitted: 0,
        warnings: Vec::new(),
        first: HashMap::new(),
        listen_lines: Vec::new(),
        env_lines: Vec::new(),
        pending: Pending::default(),
    };
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        parser.line(i + 1, line.trim());
    }
    parser.check();
    parser
}

/// The parse in progress: the config so far, its errors, and where each key
/// was set.
struct Parser<'a> {
    /// The config file's folder.
    dir: &'a Path,
    config: Config,
    /// The problems of the earliest lines, at most `2 * MAX_ERRORS` (see
    /// [`Parser::error`]).
    errors: Vec<ConfigError>,
    /// Problems found but not kept in `errors`.
    omitted: usize,
    /// Mistakes that are not errors (see [`Loaded`]).
    warnings: Vec<ConfigError>,
    /// The first line of each key given.
    first: HashMap<&'static str, usize>,
    /// The line of each listener, parallel to `config.listen`.
    listen_lines: Vec<usize>,
    /// The line of each variable, parallel to `config.env`.
    env_lines: Vec<usize>,
    pending: Pending,
}

/// What [`load`] must resolve with the file system.
#[derive(Default)]
struct Pending {
    /// `exec`'s program as written, and its line.
    program: Option<(String, usize)>,
    user: Option<(Id, usize)>,
    group: Option<(Id, usize)>,
}

/// A user or group as written.
#[derive(Debug, PartialEq)]
enum Id {
    Num(u32),
    Name(String),
}

impl Parser<'_> {
    /// Records a problem. Only the [`MAX_ERRORS`] of the earliest lines are
    /// reported, so memory stays bounded however bad the file: when twice
    /// as many are held, the later half is dropped and counted.
    fn error(&mut self, line: usize, message: String) {
        self.errors.push(ConfigError { line, message });
        if self.errors.len() >= 2 * MAX_ERRORS {
            self.keep_first_errors();
        }
    }

    /// Sorts the errors by line and keeps the first [`MAX_ERRORS`].
    fn keep_first_errors(&mut self) {
        self.errors.sort_by_key(|e| e.line);
        if self.errors.len() > MAX_ERRORS {
            self.omitted += self.errors.len() - MAX_ERRORS;
            self.errors.truncate(MAX_ERRORS);
        }
    }

    fn finish(self) -> Result<Config, Vec<ConfigError>> {
        self.finish_counted().map_err(|(errors, _)| errors)
    }

    /// The config, or its first errors and how many more there were.
    fn finish_counted(mut self) -> Result<Config, (Vec<ConfigError>, usize)> {
        if self.errors.is_empty() {
            return Ok(self.config);
        }
        self.keep_first_errors();
        Err((self.errors, self.omitted))
    }

    /// [`Parser::finish`] for a file.
    fn finish_load(self) -> Result<Config, LoadError> {
        let path = self.config.path.clone();
        self.finish_counted()
            .map_err(|(errors, omitted)| LoadError {
                path,
                errors,
                omitted,
            })
    }

    /// Parses one trimmed line.
    fn line(&mut self, line: usize, text: &str) {
        if text.is_empty() || text.starts_with('#') {
            return;
        }
        if text.contains('\0') {
            return self.error(line, "contains a NUL byte".into());
        }
        // An `=` inside a comment does not count.
        let Some((key, raw)) = text.split_once('=').filter(|(k, _)| strip_comment(k) == *k) else {
            let found = show(strip_comment(text).trim_end());
            return self.error(line, format!("expected \"key = value\", found {found}"));
        };
        let key = key.trim_end();
        if key.is_empty() {
            return self.error(line, "missing key before \"=\"".into());
        }
        let Some(&key) = KEYS.iter().find(|&&k| k == key) else {
            let message = match suggest(key) {
                Some(known) => format!("unknown key {} (did you mean \"{known}\"?)", show(key)),
                None => format!("unknown key {}", show(key)),
            };
            return self.error(line, message);
        };
        if let Some(first) = self.first.get(key).filter(|_| !REPEATABLE.contains(&key)) {
            let message = format!("duplicate key \"{key}\" (first set on line {first})");
            return self.error(line, message);
        }
        self.first.entry(key).or_insert(line);
        // exec's comments are found by the shell-like split, which knows quotes.
        let value = match key {
            "exec" => raw.trim(),
            _ => strip_comment(raw).trim(),
        };
        if value.is_empty() {
            return self.error(line, format!("{key}: missing value"));
        }
        if let Err(message) = self.set(key, value, line) {
            self.error(line, format!("{key}: {message}"));
        }
    }

    /// Sets `key` (a known key) to `value` (trimmed, not empty).
    fn set(&mut self, key: &str, value: &str, line: usize) -> Result<(), String> {
        let c = &mut self.config;
        match key {
            "exec" => {
                let (words, written) = parse_exec(value, self.dir)?;
                c.exec = words;
                self.pending.program = Some((written, line));
            }
            "workers" => c.workers = parse_workers(value)?,
            "listen" => self.listen(value, line)?,
            "backlog" => {
                c.backlog = number(value, 1, 65535).ok_or_else(|| {
                    format!("expected a number from 1 to 65535, found {}", show(value))
                })? as u32;
            }
            "control" => c.control = Some(socket_path(value, self.dir)?),
            "protocol" => {
                c.protocol = match value {
                    "clusterd" => Protocol::Clusterd,
                    "systemd" => Protocol::Systemd,
                    "node" => Protocol::Node,
                    _ => {
                        return Err(format!(
                            "expected \"clusterd\", \"systemd\" or \"node\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "ready_timeout" => c.ready_timeout = positive(parse_duration(value)?)?,
            "drain_timeout" => c.drain_timeout = positive(parse_duration(value)?)?,
            "restart_delay" => c.restart_delay = at_least_10ms(parse_duration(value)?)?,
            "restart_delay_max" => c.restart_delay_max = parse_duration(value)?,
            "min_uptime" => c.min_uptime = parse_duration(value)?,
            "ready_after" => c.ready_after = Some(parse_duration(value)?),
            "user" => {
                let id = parse_id(value)?;
                if let Id::Num(uid) = id {
                    c.user = Some((uid, uid));
                }
                self.pending.user = Some((id, line));
            }
            "group" => {
                let id = parse_id(value)?;
                if let Id::Num(gid) = id {
                    c.group = Some(gid);
                }
                self.pending.group = Some((id, line));
            }
            "env" => self.env(value, line)?,
            "chdir" => c.chdir = absolute(self.dir, value),
            "metrics" => c.metrics = Some(parse_socket_addr(value)?),
            "bake" => c.bake = parse_duration(value)?,
            "rollback" => {
                c.rollback = match value {
                    "auto" => true,
                    "off" => false,
                    _ => {
                        return Err(format!(
                            "expected \"auto\" or \"off\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "empty_pool" => {
                c.empty_pool = match value {
                    "wait" => EmptyPool::Wait,
                    "503" => EmptyPool::Http503,
                    "reset" => EmptyPool::Reset,
                    _ => {
                        return Err(format!(
                            "expected \"wait\", \"503\" or \"reset\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "dispatch" => {
                c.dispatch = match value {
                    "shared" => Dispatch::Shared,
                    "clusterd" => Dispatch::Clusterd,
                    "reuseport" => Dispatch::Reuseport,
                    _ => {
                        return Err(format!(
                            "expected \"shared\", \"clusterd\" or \"reuseport\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "balance" => {
                c.balance = match value {
                    "least-connections" => Balance::LeastConnections,
                    "round-robin" => Balance::RoundRobin,
                    _ => {
                        return Err(format!(
                            "expected \"least-connections\" or \"round-robin\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "sticky" => c.sticky = Some(parse_sticky(value)?),
            "watchdog" => c.watchdog = Some(positive(parse_duration(value)?)?),
            "watchdog_signal" => c.watchdog_signal = Signal::parse(value)?,
            "max_memory" => c.max_memory = Some(parse_size(value)?),
            "max_requests" => {
                c.max_requests = Some(number(value, 1, u64::MAX).ok_or_else(|| {
                    format!(
                        "expected a number of requests, at least 1, found {}",
                        show(value)
                    )
                })?);
            }
            "max_age" => c.max_age = Some(positive(parse_duration(value)?)?),
            "crash_loop" => {
                c.crash_loop = number(value, 1, 1_000_000).ok_or_else(|| {
                    format!(
                        "expected a number of crashes in a row, at least 1, found {}",
                        show(value)
                    )
                })? as u32;
            }
            "on_crash_loop" => {
                c.exit_on_crash_loop = match value {
                    "backoff" => false,
                    "exit" => true,
                    _ => {
                        return Err(format!(
                            "expected \"backoff\" or \"exit\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "shutdown_delay" => c.shutdown_delay = parse_duration(value)?,
            "log_format" => {
                c.log_format = match value {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => {
                        return Err(format!(
                            "expected \"text\" or \"json\", found {}",
                            show(value)
                        ));
                    }
                }
            }
            "log_file" => c.log_file = Some(absolute(self.dir, value)),
            "log_buffer" => c.log_buffer = parse_buffer(value)?,
            "log_capture" => {
                c.log_capture = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("expected \"on\" or \"off\", found {}", show(value))),
                }
            }
            // Not reached: every key in KEYS has an arm (see the tests).
            _ => return Err("not supported".into()),
        }
        Ok(())
    }

    fn listen(&mut self, value: &str, line: usize) -> Result<(), String> {
        if self.config.listen.len() >= MAX_LISTENERS {
            return Err(format!("too many listeners (at most {MAX_LISTENERS})"));
        }
        let new = parse_listen(value, self.dir)?;
        let earlier = || self.config.listen.iter().zip(&self.listen_lines);
        // Port 0 asks for a fresh ephemeral port each time.
        let ephemeral = matches!(new.addr, ListenAddr::Tcp(a) if a.port() == 0);
        if let Some((_, at)) = earlier().find(|(old, _)| old.addr == new.addr && !ephemeral) {
            let addr = addr_text(&new.addr);
            return Err(format!("{addr} is already listened on, on line {at}"));
        }
        if let Some((_, at)) = earlier().find(|(old, _)| old.name == new.name) {
            // Mirrors parse_listen: was the name left out?
            let unnamed = value.split_once('=').is_none_or(|(n, _)| n.contains(':'));
            let hint = if unnamed {
                " (name each listener: NAME=ADDRESS)"
            } else {
                ""
            };
            return Err(format!(
                "name \"{}\" is already used on line {at}{hint}",
                new.name
            ));
        }
        self.config.listen.push(new);
        self.listen_lines.push(line);
        Ok(())
    }

    fn env(&mut self, value: &str, line: usize) -> Result<(), String> {
        let Some((key, val)) = value.split_once('=') else {
            return Err(format!("expected KEY=VALUE, found {}", show(value)));
        };
        let key = key.trim_end();
        let mut chars = key.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !valid {
            return Err(format!(
                "{} is not a variable name (letters, digits and _, not starting with a digit)",
                show(key)
            ));
        }
        if RESERVED_ENV.contains(&key) {
            return Err(format!("{key} is set by clusterd itself"));
        }
        let mut earlier = self.config.env.iter().zip(&self.env_lines);
        if let Some((_, at)) = earlier.find(|((k, _), _)| k == key) {
            return Err(format!("{key} is already set on line {at}"));
        }
        self.config
            .env
            .push((key.to_owned(), val.trim_start().to_owned()));
        self.env_lines.push(line);
        Ok(())
    }

    /// The line `key` was set on (0 if it was not), unless that line has an
    /// error, in which case a check against it would only add noise.
    fn valid_line(&self, key: &str) -> Option<usize> {
        let line = self.first.get(key).copied().unwrap_or(0);
        (line == 0 || self.errors.iter().all(|e| e.line != line)).then_some(line)
    }

    /// Checks of the file as a whole, after the last line.
    fn check(&mut self) {
        for key in ["exec", "listen"] {
            if !self.first.contains_key(key) {
                self.error(0, format!("missing required key \"{key}\""));
            }
        }
        let (delay, max) = (self.config.restart_delay, self.config.restart_delay_max);
        if let (Some(a), Some(b)) = (
            self.valid_line("restart_delay"),
            self.valid_line("restart_delay_max"),
        ) {
            if delay > max {
                let message =
                    format!("restart_delay ({delay:?}) is longer than restart_delay_max ({max:?})");
                self.error(a.max(b), message);
            }
        }
        if let (Some(after), Some(line)) = (self.config.ready_after, self.valid_line("ready_after"))
        {
            let systemd = self.config.protocol.is_socket_activation();
            if !systemd && self.valid_line("protocol").is_some() {
                let message = "ready_after: only works with \"protocol = systemd\" or \"node\" \
                               (clusterd workers report READY themselves)";
                self.error(line, message.into());
            }
            let timeout = self.config.ready_timeout;
            if let Some(t) = self
                .valid_line("ready_timeout")
                .filter(|_| after >= timeout)
            {
                let message = format!(
                    "ready_after ({after:?}) must be shorter than ready_timeout ({timeout:?})"
                );
                self.error(line.max(t), message);
            }
        }
        self.check_dispatch();
        if let (Some(metrics), Some(line)) = (self.config.metrics, self.valid_line("metrics")) {
            let mut listeners = self.config.listen.iter().zip(&self.listen_lines);
            let clash = listeners.find(|(l, _)| l.addr == ListenAddr::Tcp(metrics));
            if let Some((_, at)) = clash.filter(|_| metrics.port() != 0) {
                let message = format!("metrics: {metrics} is also a listener (line {at})");
                self.error(line, message);
            }
        }
    }

    /// `dispatch`, `balance` and `sticky` together with `protocol`.
    fn check_dispatch(&mut self) {
        let dispatch = self.config.dispatch;
        if let Some(line) = self.valid_line("dispatch").filter(|&l| l > 0) {
            if dispatch == Dispatch::Clusterd && self.config.protocol == Protocol::Systemd {
                let message = "dispatch = clusterd: a \"protocol = systemd\" program takes \
                               listening sockets and cannot be handed connections; use \
                               \"dispatch = reuseport\" for balance, or protocol = clusterd \
                               or node";
                let at = self.valid_line("protocol").map_or(line, |p| p.max(line));
                self.error(at, message.into());
            }
            if dispatch == Dispatch::Reuseport {
                // The kernel balances only TCP sockets: a second bind to a
                // unix path fails, so there is no per-slot queue to give.
                let unix: Vec<(String, usize)> = (self.config.listen.iter())
                    .zip(&self.listen_lines)
                    .filter_map(|(l, &at)| match &l.addr {
                        ListenAddr::Unix(path) => Some((format!("unix:{}", path.display()), at)),
                        ListenAddr::Tcp(_) => None,
                    })
                    .collect();
                for (addr, at) in unix {
                    let message = format!(
                        "dispatch = reuseport: listen {addr} is a unix socket, which SO_REUSEPORT \
                         does not balance; use TCP listeners, or dispatch = shared"
                    );
                    self.error(at.max(line), message);
                }
            }
        }
        for key in ["balance", "sticky"] {
            if let Some(line) = self.valid_line(key).filter(|&l| l > 0) {
                if dispatch != Dispatch::Clusterd {
                    let message = format!(
                        "{key}: only works with \"dispatch = clusterd\" (clusterd chooses the \
                         worker only when it hands out the connections), found dispatch = {}",
                        dispatch.as_str()
                    );
                    self.error(line, message);
                }
            }
        }
    }

    /// Resolves what needs the file system (see [`load`]).
    fn resolve(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if let Some((written, line)) = pending.program {
            match self.resolve_program(&written) {
                Ok(program) => {
                    if let Some(first) = self.config.exec.first_mut() {
                        *first = program;
                    }
                }
                Err(message) => self.error(line, format!("exec: {message}")),
            }
        }
        if let Some(line) = self.valid_line("chdir") {
            if let Err(message) = check_dir(&self.config.chdir) {
                self.error(line, format!("chdir: {message}"));
            }
        }
        if let Some((id, line)) = pending.user {
            match resolve_user(&id, std::fs::read_to_string(users::PASSWD)) {
                Ok(user) => self.config.user = Some(user),
                Err(message) => self.error(line, format!("user: {message}")),
            }
        }
        if let Some((id, line)) = pending.group {
            match resolve_group(&id, std::fs::read_to_string(users::GROUP)) {
                Ok(gid) => self.config.group = Some(gid),
                Err(message) => self.error(line, format!("group: {message}")),
            }
        }
    }

    /// `user` and `group` that clusterd, run by this process, could not
    /// switch its workers to (not root, without CAP_SETUID/CAP_SETGID):
    /// every spawn would fail. An error when clusterd is about to run
    /// them; a warning for `--check`, which may run as another user.
    fn check_switch_ids(&mut self, purpose: Purpose, me: &ProcessIds) {
        let uid = self.config.user.map(|(uid, _)| uid);
        let gid = self.config.group.or(self.config.user.map(|(_, gid)| gid));
        let problems = [
            (
                "user",
                uid.and_then(|uid| switch_problem(me, IdKind::User, uid)),
            ),
            (
                "group",
                gid.and_then(|gid| switch_problem(me, IdKind::Group, gid)),
            ),
        ];
        // The group comes from the user line when there is no group line.
        // (Lines are looked up before either problem is recorded.)
        let found: Vec<(&str, usize, String)> = problems
            .into_iter()
            .filter_map(|(key, problem)| {
                let key = if key == "group" && !self.first.contains_key("group") {
                    "user"
                } else {
                    key
                };
                Some((key, self.valid_line(key)?, problem?))
            })
            .collect();
        for (key, line, problem) in found {
            match purpose {
                Purpose::Run => self.error(line, format!("{key}: {problem}")),
                Purpose::Check => {
                    let message = format!(
                        "{key}: {problem} (clusterd --check runs as uid {}; clusterd \
                         itself refuses to start like this)",
                        me.euid
                    );
                    self.warnings.push(ConfigError { line, message })
                }
            }
        }
    }

    /// `exec` through a wrapper that runs the server as its child, with
    /// `protocol = systemd`: the child does not get the listeners
    /// (`LISTEN_PID` names the wrapper), so it fails to listen and the
    /// worker crash-loops.
    fn warn_about_wrappers(&mut self) {
        if !self.config.protocol.is_socket_activation() {
            return;
        }
        let Some(line) = self.valid_line("exec") else {
            return;
        };
        if let Some(message) = wrapper_warning(&self.config.exec) {
            self.warnings.push(ConfigError { line, message });
        }
    }

    /// The absolute path of `exec`'s program, `written` as in the file.
    fn resolve_program(&self, written: &str) -> Result<String, String> {
        let path = if written.contains('/') {
            // Made absolute by the parse.
            let path = PathBuf::from(self.config.exec.first().map_or(written, String::as_str));
            if !executable(&path)? {
                let looked_for = if path.as_os_str() == written {
                    String::new()
                } else {
                    format!(" (looked for {})", path.display())
                };
                return Err(format!("program {} not found{looked_for}", show(written)));
            }
            path
        } else {
            self.find_in_path(written)?
        };
        path.into_os_string()
            .into_string()
            .map_err(|p| format!("{} is not valid UTF-8", p.to_string_lossy()))
    }

    /// Looks `name` up in the `PATH` the workers get: the config's
    /// `env = PATH=...` if any, else clusterd's own. Empty and relative
    /// entries are skipped.
    fn find_in_path(&self, name: &str) -> Result<PathBuf, String> {
        let search: OsString = match self.config.env.iter().rev().find(|(k, _)| k == "PATH") {
            Some((_, v)) => v.into(),
            None => std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        };
        let found = std::env::split_paths(&search)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(name))
            .find(|p| matches!(executable(p), Ok(true)));
        found.ok_or_else(|| {
            let hint = if matches!(executable(&self.dir.join(name)), Ok(true)) {
                format!("; to run the one beside the config file, write \"./{name}\"")
            } else {
                String::new()
            };
            let search = search.to_string_lossy();
            format!("program {} not found in PATH ({search}){hint}", show(name))
        })
    }
}

/// Who this process is, for [`switch_problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessIds {
    euid: u32,
    uid: u32,
    egid: u32,
    gid: u32,
    can_setuid: bool,
    can_setgid: bool,
}

impl ProcessIds {
    fn current() -> ProcessIds {
        use rustix::thread::CapabilitySet;
        let caps = rustix::thread::capabilities(None)
            .map(|c| c.effective)
            .unwrap_or(CapabilitySet::empty());
        let euid = rustix::process::geteuid().as_raw();
        ProcessIds {
            euid,
            uid: rustix::process::getuid().as_raw(),
            egid: rustix::process::getegid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            can_setuid: euid == 0 || caps.contains(CapabilitySet::SETUID),
            can_setgid: euid == 0 || caps.contains(CapabilitySet::SETGID),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    User,
    Group,
}

/// Why `me` cannot start a worker as `id`, if it cannot: setuid/setgid to
/// another id needs root (or CAP_SETUID/CAP_SETGID).
fn switch_problem(me: &ProcessIds, kind: IdKind, id: u32) -> Option<String> {
    let (mine, real, able, what) = match kind {
        IdKind::User => (me.euid, me.uid, me.can_setuid, "uid"),
        IdKind::Group => (me.egid, me.gid, me.can_setgid, "gid"),
    };
    if able || id == mine || id == real {
        return None;
    }
    Some(format!(
        "clusterd runs as {what} {mine}, not as root, so it cannot start workers as \
         {what} {id}: run clusterd as root (it then runs the workers as {what} {id}), or \
         remove this line to run them as clusterd's own {what}"
    ))
}

/// Programs that start the server as a child process of their own.
const WRAPPERS: &[&str] = &["npm", "npx", "yarn", "pnpm", "bun", "corepack"];

/// Shells, whose `-c` command runs its last program as a child unless it is
/// `exec`'d.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ash", "ksh"];

/// The warning for `exec` (as split, program first) under `protocol =
/// systemd`, if it runs the server through a wrapper.
fn wrapper_warning(exec: &[String]) -> Option<String> {
    let program = exec.first()?;
    let name = Path::new(program).file_name()?.to_str()?;
    if WRAPPERS.contains(&name) {
        return Some(format!(
            "exec: {name} runs the server as a child process, which does not get the \
             listeners (LISTEN_PID names {name}, so Node.js fails with \"listen EINVAL\"), \
             and its READY is not heard: run the server itself, as in \
             \"exec = node server.js\""
        ));
    }
    if SHELLS.contains(&name) {
        let command = exec.iter().skip_while(|a| *a != "-c").nth(1)?;
        let several = command.contains([';', '&', '|', '\n']);
        let execs = command.split_whitespace().any(|w| w == "exec");
        if several && !execs {
            return Some(format!(
                "exec: {name} -c runs the server as a child process, which does not get \
                 the listeners (LISTEN_PID names the shell): start the server with \
                 \"exec\" in the command, as in \"{name} -c 'cd app && exec node server.js'\""
            ));
        }
    }
    None
}

/// The part of `s` before its comment: a `#` at the start or after whitespace.
fn strip_comment(s: &str) -> &str {
    let mut after_space = true;
    for (i, c) in s.char_indices() {
        if c == '#' && after_space {
            return &s[..i];
        }
        after_space = c.is_whitespace();
    }
    s
}

/// `s` quoted for a message, shortened if long.
fn show(s: &str) -> String {
    const MAX_CHARS: usize = 60;
    match s.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{:?}...", &s[..end]),
        None => format!("{s:?}"),
    }
}

/// The known key an unknown `key` was probably meant to be.
fn suggest(key: &str) -> Option<&'static str> {
    if key.len() > 32 {
        return None;
    }
    let key = key.to_ascii_lowercase();
    if let Some(&(_, known)) = ALIASES.iter().find(|(alias, _)| *alias == key) {
        return Some(known);
    }
    KEYS.iter()
        .map(|&known| (strsim::damerau_levenshtein(&key, known), known))
        .filter(|&(distance, known)| distance <= (known.len() / 3).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, known)| known)
}

/// `path` against `dir`, without `.` components.
fn absolute(dir: &Path, path: &str) -> PathBuf {
    dir.join(path).components().collect()
}

/// A decimal number (ASCII digits only) in `min..=max`.
fn number(value: &str, min: u64, max: u64) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|n| (min..=max).contains(n))
}

/// `exec` split like a shell, and its program as written. A program with a
/// `/` is made absolute against `dir`.
fn parse_exec(value: &str, dir: &Path) -> Result<(Vec<String>, String), String> {
    let mut words = shlex::split(value).ok_or("unbalanced quotes or a trailing backslash")?;
    let Some(program) = words.first_mut() else {
        return Err("missing value".into());
    };
    let written = program.clone();
    if written.is_empty() {
        return Err("the program is an empty string".into());
    }
    if written.contains('/') {
        *program = absolute(dir, &written)
            .into_os_string()
            .into_string()
            .map_err(|p| format!("{} is not valid UTF-8", p.to_string_lossy()))?;
    }
    Ok((words, written))
}

fn parse_workers(value: &str) -> Result<Option<u32>, String> {
    if value == "auto" {
        return Ok(None);
    }
    match number(value, 1, MAX_WORKERS) {
        Some(n) => Ok(Some(n as u32)),
        None => Err(format!(
            "expected \"auto\" or a number from 1 to {MAX_WORKERS}, found {}",
            show(value)
        )),
    }
}

/// A duration: an integer and a unit (`ms`, `s`, `m`, `h`), or `0`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    const UNITS: &str = "use ms, s, m or h, as in 250ms, 10s, 2m or 1h";
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = value.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "expected a duration, found {}; {UNITS}",
            show(value)
        ));
    }
    let ms_per_unit: u64 = match unit.trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if num.bytes().all(|b| b == b'0') => 0,
        "" => return Err(format!("{} needs a unit: {UNITS}", show(value))),
        other => {
            return Err(format!(
                "unknown unit {} in {}: {UNITS}",
                show(other),
                show(value)
            ));
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per_unit))
        .filter(|&ms| ms <= MAX_DURATION_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{} is too long (at most 365 days)", show(value)))
}

/// The backoff floor: without one a crashing program would be forked in a
/// tight loop.
fn at_least_10ms(duration: Duration) -> Result<Duration, String> {
    if duration < Duration::from_millis(10) {
        return Err(
            "must be at least 10ms (a crashing worker would be restarted in a tight loop)".into(),
        );
    }
    Ok(duration)
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL EVENT key=value…`.
    #[default]
    Text,
    /// JSON Lines, one object per line: `ts`, `level`, `event`, then the
    /// fields (unsigned integers as numbers, the rest as strings).
    Json,
}

/// `log_buffer` when the config does not set it: about a few thousand
/// lines of recent log for `clusterctl logs`.
pub const DEFAULT_LOG_BUFFER: u64 = 1 << 20;

/// `log_buffer`: `0` (keep nothing) or a size of at most 1G.
fn parse_buffer(value: &str) -> Result<u64, String> {
    let bytes = parse_bytes(value)?;
    if bytes > 1 << 30 {
        return Err(format!("{} is more than 1G", show(value)));
    }
    Ok(bytes)
}

/// A size in bytes, at least 1 MiB (see [`parse_bytes`]).
fn parse_size(value: &str) -> Result<u64, String> {
    let bytes = parse_bytes(value)?;
    if bytes < 1 << 20 {
        return Err(format!("{} is less than 1M", show(value)));
    }
    Ok(bytes)
}

/// A size in bytes: a number, optionally with `K`, `M`, `G` or `T` (powers
/// of 1024; `KiB`, `MB`… are taken the same way).
fn parse_bytes(value: &str) -> Result<u64, String> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = value.split_at(digits);
    let expected = || {
        format!(
            "expected a size such as 512M or 2G (K, M, G, T: powers of 1024), found {}",
            show(value)
        )
    };
    let num: u64 = num.parse().map_err(|_| expected())?;
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(expected()),
    };
    num.checked_mul(1 << shift)
        .ok_or_else(|| format!("{} is too large", show(value)))
}

/// A signal clusterd may send as `watchdog_signal`.
/// Travels as its number (`clusterctl upgrade` hands the config over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    pub number: i32,
    pub name: &'static str,
}

impl Signal {
    pub const ABRT: Signal = Signal {
        number: 6,
        name: "SIGABRT",
    };
    /// The signals that make sense for a diagnosis: each runtime dumps its
    /// stacks on one of them (Go and the JVM on QUIT, most on ABRT, Python's
    /// faulthandler on what it registers).
    const CHOICES: [Signal; 7] = [
        Signal::ABRT,
        Signal {
            number: 3,
            name: "SIGQUIT",
        },
        Signal {
            number: 10,
            name: "SIGUSR1",
        },
        Signal {
            number: 12,
            name: "SIGUSR2",
        },
        Signal {
            number: 1,
            name: "SIGHUP",
        },
        Signal {
            number: 2,
            name: "SIGINT",
        },
        Signal {
            number: 15,
            name: "SIGTERM",
        },
    ];

    fn parse(value: &str) -> Result<Signal, String> {
        let upper = value.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        Signal::CHOICES
            .into_iter()
            .find(|s| &s.name[3..] == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Signal::CHOICES.iter().map(|s| s.name).collect();
                format!(
                    "expected one of {}, found {}",
                    names.join(", "),
                    show(value)
                )
            })
    }
}

impl serde::Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(self.number)
    }
}

impl<'de> serde::Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let number = i32::deserialize(d)?;
        Signal::CHOICES
            .into_iter()
            .find(|s| s.number == number)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("signal {number} is not a watchdog_signal"))
            })
    }
}

fn positive(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(duration)
}

/// A `user` or `group`: a numeric id or a name.
fn parse_id(value: &str) -> Result<Id, String> {
    // u32::MAX means "unchanged" to setuid(2) and friends.
    let max = u32::MAX - 1;
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return number(value, 0, max.into())
            .map(|n| Id::Num(n as u32))
            .ok_or_else(|| format!("{} is not a valid id (0 to {max})", show(value)));
    }
    if value.contains(|c: char| c == ':' || c.is_whitespace()) {
        return Err(format!("{} is not a valid name", show(value)));
    }
    Ok(Id::Name(value.to_owned()))
}

/// A unix socket path, made absolute against `dir`.
fn socket_path(value: &str, dir: &Path) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err("missing socket path".into());
    }
    let path = absolute(dir, value);
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        return Err(format!(
            "socket path {path:?} is {len} bytes long; the limit is {MAX_UNIX_PATH}"
        ));
    }
    Ok(path)
}

/// `[NAME=]ADDRESS`.
fn parse_listen(value: &str, dir: &Path) -> Result<Listen, String> {
    // Names have no `:`, so an `=` after one is part of the address.
    let (name, addr) = match value.split_once('=') {
        Some((name, addr)) if !name.contains(':') => (name.trim_end(), addr.trim_start()),
        _ => ("http", value),
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
    if name.is_empty() {
        return Err("missing listener name before \"=\"".into());
    }
    if name.len() > MAX_NAME_LEN || !name.bytes().all(valid) {
        return Err(format!(
            "listener name {} must be 1 to {MAX_NAME_LEN} letters, digits, '_', '.' or '-'",
            show(name)
        ));
    }
    let addr = if let Some(path) = addr.strip_prefix("unix:") {
        ListenAddr::Unix(socket_path(path.trim_start(), dir)?)
    } else if addr.contains(':') {
        ListenAddr::Tcp(parse_socket_addr(addr)?)
    } else {
        return Err(format!(
            "expected host:port, [IPv6]:port or unix:/path, found {}",
            show(addr)
        ));
    };
    Ok(Listen {
        name: name.to_owned(),
        addr,
    })
}

/// `host:port` (an IPv4 address, `localhost`, `*` or nothing) or `[IPv6]:port`.
fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    let (ip, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("expected [IPv6]:port, found {}", show(value)))?;
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| format!("{} is not an IPv6 address", show(host)))?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| format!("expected host:port or [IPv6]:port, found {}", show(value)))?;
        let ip = match host {
            "" | "*" => Ipv4Addr::UNSPECIFIED,
            "localhost" => Ipv4Addr::LOCALHOST,
            _ if host.contains(':') => {
                return Err(format!(
                    "put an IPv6 address in brackets, as in {}",
                    show(&format!("[{host}]:{port}"))
                ));
            }
            _ => host.parse().map_err(|_| {
                format!(
                    "{} is not an IPv4 address (host names other than localhost are not resolved)",
                    show(host)
                )
            })?,
        };
        (IpAddr::V4(ip), port)
    };
    let port = number(port, 0, u16::MAX.into()).ok_or_else(|| {
        format!(
            "port must be a number from 0 to 65535, found {}",
            show(port)
        )
    })?;
    Ok(SocketAddr::new(ip, port as u16))
}

/// An address as `clusterctl status` and the workers show it.
fn addr_text(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(addr) => addr.to_string(),
        ListenAddr::Unix(path) => format!("unix:{}", path.display()),
    }
}

/// Whether `path` is a program: `Ok(false)` if it does not exist, an error if
/// it exists but cannot be run.
fn executable(path: &Path) -> Result<bool, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot use {path:?}: {e}")),
        Ok(m) if m.is_dir() => Err(format!("{path:?} is a directory, not a program")),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(format!("{path:?} is not executable")),
        Ok(_) => Ok(true),
    }
}

fn check_dir(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{path:?} is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!("{path:?} does not exist")),
        Err(e) => Err(format!("cannot use {path:?}: {e}")),
    }
}

/// `user` as (uid, primary gid). A name must be in `passwd`. A number is
/// taken as is, with the gid of its passwd entry, or gid = uid when it has
/// none (or there is no passwd file, as in a scratch container).
fn resolve_user(id: &Id, passwd: io::Result<String>) -> Result<(u32, u32), String> {
    match (id, passwd) {
        (Id::Num(uid), Ok(text)) => Ok(users::parse_passwd(&text)
            .iter()
            .find(|u| u.uid == *uid)
            .map_or((*uid, *uid), |u| (u.uid, u.gid))),
        (Id::Num(uid), Err(_)) => Ok((*uid, *uid)),
        (Id::Name(name), Ok(text)) => users::parse_passwd(&text)
            .iter()
            .find(|u| u.name == *name)
            .map(|u| (u.uid, u.gid))
            .ok_or_else(|| format!("no user {} in {}", show(name), users::PASSWD)),
        (Id::Name(_), Err(e)) => Err(format!("cannot read {}: {e}", users::PASSWD)),
    }
}

/// `group` as a gid. A name must be in `group`; a number is taken as is.
fn resolve_group(id: &Id, group: io::Result<String>) -> Result<u32, String> {
    match (id, group) {
        (Id::Num(gid), _) => Ok(*gid),
        (Id::Name(name), Ok(text)) => users::parse_group(&text)
            .iter()
            .find(|g| g.name == *name)
            .map(|g| g.gid)
            .ok_or_else(|| format!("no group {} in {}", show(name), users::GROUP)),
        (Id::Name(_), Err(e)) => Err(format!("cannot read {}: {e}", users::GROUP)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const PATH: &str = "/srv/shop/shop.conf";
    const MIN: &str = "exec = ./shop\nlisten = :8080\n";

    fn ok(text: &str) -> Config {
        parse_str(text, Path::new(PATH)).unwrap_or_else(|e| panic!("{text:?}: {e:?}"))
    }

    fn errs(text: &str) -> Vec<(usize, String)> {
        match parse_str(text, Path::new(PATH)) {
            Ok(c) => panic!("{text:?} parsed: {c:?}"),
            Err(errors) => errors.into_iter().map(|e| (e.line, e.message)).collect(),
        }
    }

    /// `MIN` followed by `line` (line 3).
    fn with(line: &str) -> Config {
        ok(&format!("{MIN}{line}\n"))
    }

    /// The one error of `MIN` followed by `line`, which must be on line 3.
    fn err(line: &str) -> String {
        let errors = errs(&format!("{MIN}{line}\n"));
        assert_eq!(errors.len(), 1, "{line:?}: {errors:?}");
        assert_eq!(errors[0].0, 3, "{line:?}: {errors:?}");
        errors[0].1.clone()
    }

    fn tcp(s: &str) -> ListenAddr {
        ListenAddr::Tcp(s.parse().unwrap())
    }

    fn http(addr: ListenAddr) -> Listen {
        Listen {
            name: "http".into(),
            addr,
        }
    }

    #[test]
    fn defaults() {
        let c = ok(MIN);
        assert_eq!(
            c,
            Config {
                path: PATH.into(),
                name: "shop".into(),
                exec: vec!["/srv/shop/shop".into()],
                workers: None,
                listen: vec![http(tcp("0.0.0.0:8080"))],
                backlog: 1024,
                control: None,
                protocol: Protocol::Clusterd,
                ready_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(30),
                restart_delay: Duration::from_millis(100),
                restart_delay_max: Duration::from_secs(30),
                min_uptime: Duration::from_secs(5),
                user: None,
                group: None,
                env: vec![],
                chdir: "/srv/shop".into(),
                ready_after: None,
                metrics: None,
                bake: Duration::from_secs(5),
                rollback: true,
                empty_pool: EmptyPool::Wait,
                dispatch: Dispatch::Shared,
                balance: Balance::LeastConnections,
                sticky: None,
                log_capture: true,
                watchdog: None,
                watchdog_signal: Signal::ABRT,
                max_memory: None,
                max_requests: None,
                max_age: None,
                crash_loop: 10,
                exit_on_crash_loop: false,
                shutdown_delay: Duration::ZERO,
                log_format: LogFormat::Text,
                log_file: None,
                log_buffer: 1 << 20,
            }
        );
        assert_eq!(c.control_path(), default_control_path(&c.socket_name()).0);
        assert!(c.worker_count() >= 1);
    }

    const FULL: &str = "\
# the shop
exec = node server.js --port 0
workers = 8
listen = 127.0.0.1:8080
listen = admin=unix:admin.sock
backlog = 511
control = /run/shop.sock
protocol = node
ready_timeout = 20s
drain_timeout = 1m
restart_delay = 250ms
restart_delay_max = 1h
min_uptime = 0
user = 1000
group = 50
env = NODE_ENV=production
env = EMPTY=
chdir = app
ready_after = 2s
metrics = localhost:9100
bake = 1500ms
rollback = off
empty_pool = 503
dispatch = clusterd
balance = round-robin
sticky = socket.io
log_capture = off
watchdog = 10s
watchdog_signal = QUIT
max_memory = 512M
max_requests = 10000
max_age = 1h
crash_loop = 5
on_crash_loop = exit
shutdown_delay = 15s
log_format = json
log_file = log/shop.log
log_buffer = 4M
";

    #[test]
    fn every_key() {
        for key in KEYS {
            assert!(FULL.contains(&format!("\n{key} = ")), "{key} untested");
        }
        let c = ok(FULL);
        assert_eq!(c.exec, ["node", "server.js", "--port", "0"]);
        assert_eq!(c.workers, Some(8));
        assert_eq!(c.worker_count(), 8);
        assert_eq!(
            c.listen,
            [
                http(tcp("127.0.0.1:8080")),
                Listen {
                    name: "admin".into(),
                    addr: ListenAddr::Unix("/srv/shop/admin.sock".into()),
                },
            ]
        );
        assert_eq!(c.backlog, 511);
        assert_eq!(c.control, Some("/run/shop.sock".into()));
        assert_eq!(c.control_path(), PathBuf::from("/run/shop.sock"));
        assert_eq!(c.protocol, Protocol::Node);
        assert_eq!(c.ready_timeout, Duration::from_secs(20));
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.restart_delay, Duration::from_millis(250));
        assert_eq!(c.restart_delay_max, Duration::from_secs(3600));
        assert_eq!(c.min_uptime, Duration::ZERO);
        assert_eq!(c.user, Some((1000, 1000)));
        assert_eq!(c.group, Some(50));
        let env = [("NODE_ENV", "production"), ("EMPTY", "")];
        assert_eq!(c.env, env.map(|(k, v)| (k.to_owned(), v.to_owned())));
        assert_eq!(c.chdir, PathBuf::from("/srv/shop/app"));
        assert_eq!(c.ready_after, Some(Duration::from_secs(2)));
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(!c.log_capture);
        assert_eq!(c.watchdog, Some(Duration::from_secs(10)));
        assert_eq!(c.watchdog_signal.name, "SIGQUIT");
        assert_eq!(c.max_memory, Some(512 << 20));
        assert_eq!(c.max_requests, Some(10_000));
        assert_eq!(c.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(c.crash_loop, 5);
        assert!(c.exit_on_crash_loop);
        assert_eq!(c.shutdown_delay, Duration::from_secs(15));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_file, Some(PathBuf::from("/srv/shop/log/shop.log")));
        assert_eq!(c.log_buffer, 4 << 20);
        assert_eq!(with("log_buffer = 0").log_buffer, 0);
        assert_eq!(with("log_buffer = 64K").log_buffer, 64 << 10);
        assert_eq!(
            err("log_buffer = 2G"),
            r#"log_buffer: "2G" is more than 1G"#
        );
        assert!(with("log_capture = on").log_capture);
        assert_eq!(
            err("log_capture = yes"),
            r#"log_capture: expected "on" or "off", found "yes""#
        );
        assert_eq!(c.empty_pool, EmptyPool::Http503);
        assert_eq!(c.dispatch, Dispatch::Clusterd);
        assert_eq!(c.balance, Balance::RoundRobin);
        assert_eq!(c.sticky, Some(Sticky::SocketIo));
        assert_eq!(c.bake, Duration::from_millis(1500));
        assert!(!c.rollback);
    }

    #[test]
    fn health_keys() {
        assert_eq!(with("max_memory = 2G").max_memory, Some(2 << 30));
        assert_eq!(with("max_memory = 300MiB").max_memory, Some(300 << 20));
        assert_eq!(with("max_memory = 1048576").max_memory, Some(1 << 20));
        assert_eq!(
            err("max_memory = 100K"),
            r#"max_memory: "100K" is less than 1M"#
        );
        assert!(err("max_memory = 5X").contains("expected a size such as 512M"));
        assert_eq!(with("watchdog_signal = sigusr1").watchdog_signal.number, 10);
        assert!(err("watchdog_signal = KILL").contains("expected one of SIGABRT, SIGQUIT"));
        assert_eq!(err("watchdog = 0"), "watchdog: must be longer than 0");
        assert!(err("max_requests = 0").contains("at least 1"));
        assert!(err("on_crash_loop = stop").contains(r#"expected "backoff" or "exit""#));
    }

    #[test]
    fn bake_and_rollback() {
        assert_eq!(with("bake = 0").bake, Duration::ZERO);
        assert!(with("rollback = auto").rollback);
        assert_eq!(
            err("rollback = on"),
            r#"rollback: expected "auto" or "off", found "on""#
        );
    }

    #[test]
    fn name_is_the_file_stem() {
        let parse = |path: &str| parse_str(MIN, Path::new(path)).unwrap();
        assert_eq!(parse("/etc/clusterd/shop.conf").name, "shop");
        assert_eq!(parse("/etc/clusterd/my.shop.conf").name, "my.shop");
        assert_eq!(parse("/etc/clusterd/shop").name, "shop");
        assert_eq!(parse("/").name, "clusterd");
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let text = "\u{feff}# top\n\n   \n\t# indented\r\n  exec\t=  ./shop   a  # trailing\r\n\
                    listen=:8080# not a comment\n";
        assert_eq!(
            errs(text),
            [(
                6,
                r#"listen: port must be a number from 0 to 65535, found "8080# not a comment""#
                    .into()
            )]
        );
        let c = ok(&text.replace("# not", " # a"));
        assert_eq!(c.exec, ["/srv/shop/shop", "a"]);
        assert_eq!(c.listen, [http(tcp("0.0.0.0:8080"))]);
        // `#` inside a word is kept.
        let c = with("env = COLOR=#fff # the colour");
        assert_eq!(c.env, [("COLOR".into(), "#fff".into())]);
        assert_eq!(err("workers =# 4"), "workers: missing value");
        assert_eq!(err("workers = # 4"), "workers: missing value");
        // An `=` inside a comment does not make a line a setting.
        assert_eq!(
            err("workers # = 4"),
            r#"expected "key = value", found "workers""#
        );
    }

    #[test]
    fn line_errors() {
        assert_eq!(
            err("workers 4"),
            r#"expected "key = value", found "workers 4""#
        );
        assert_eq!(err("= 4"), r#"missing key before "=""#);
        assert_eq!(err("workers ="), "workers: missing value");
        assert_eq!(err("backlog=\t"), "backlog: missing value");
        assert_eq!(err("env = A=\0"), "contains a NUL byte");
        let long = "x".repeat(500);
        assert_eq!(
            err(&long),
            format!(r#"expected "key = value", found "{}"..."#, "x".repeat(60))
        );
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        assert_eq!(
            err("wrokers = 4"),
            r#"unknown key "wrokers" (did you mean "workers"?)"#
        );
        assert_eq!(
            err("worker = 4"),
            r#"unknown key "worker" (did you mean "workers"?)"#
        );
        assert_eq!(
            err("Workers = 4"),
            r#"unknown key "Workers" (did you mean "workers"?)"#
        );
        assert_eq!(
            err("ready-timeout = 4s"),
            r#"unknown key "ready-timeout" (did you mean "ready_timeout"?)"#
        );
        assert_eq!(
            err("restart_delay_mx = 4s"),
            r#"unknown key "restart_delay_mx" (did you mean "restart_delay_max"?)"#
        );
        assert_eq!(
            err("cwd = /"),
            r#"unknown key "cwd" (did you mean "chdir"?)"#
        );
        assert_eq!(
            err("bind = :80"),
            r#"unknown key "bind" (did you mean "listen"?)"#
        );
        assert_eq!(err("colour = red"), r#"unknown key "colour""#);
        assert_eq!(err("xyz = 1"), r#"unknown key "xyz""#);
        assert_eq!(
            err(&format!("{} = 1", "w".repeat(40))),
            format!(r#"unknown key "{}""#, "w".repeat(40))
        );
    }

    #[test]
    fn duplicate_keys() {
        let errors = errs("workers = 2\nexec = ./a\nworkers = 3\nlisten = :1\nworkers = junk\n");
        assert_eq!(
            errors,
            [
                (3, r#"duplicate key "workers" (first set on line 1)"#.into()),
                (5, r#"duplicate key "workers" (first set on line 1)"#.into()),
            ]
        );
        // listen and env repeat.
        let c = ok("exec = ./a\nlisten = :1\nlisten = b=:2\nenv = A=1\nenv = B=2\n");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.env.len(), 2);
    }

    #[test]
    fn exec_splits_like_a_shell() {
        let exec = |value: &str| ok(&format!("exec = {value}\nlisten = :1\n")).exec;
        assert_eq!(exec(r#"sh -c "echo #1""#), ["sh", "-c", "echo #1"]);
        assert_eq!(
            exec(r#"sh -c "echo #1" # comment"#),
            ["sh", "-c", "echo #1"]
        );
        assert_eq!(exec("sh -c 'a \"b\" c'"), ["sh", "-c", "a \"b\" c"]);
        assert_eq!(exec(r"echo a\ b c\#d #e"), ["echo", "a b", "c#d"]);
        assert_eq!(exec(r#"echo "" x"#), ["echo", "", "x"]);
        assert_eq!(exec("echo a#b"), ["echo", "a#b"]);
        assert_eq!(exec("node   app.js\t--x"), ["node", "app.js", "--x"]);
        assert_eq!(exec("/usr/bin/node app.js"), ["/usr/bin/node", "app.js"]);
        assert_eq!(exec("bin/app"), ["/srv/shop/bin/app"]);
        assert_eq!(exec("./bin/./app"), ["/srv/shop/bin/app"]);
        assert_eq!(exec("\"./my app\" x"), ["/srv/shop/my app", "x"]);
        // Arguments are never resolved.
        assert_eq!(exec("node ./app.js"), ["node", "./app.js"]);
    }

    #[test]
    fn exec_errors() {
        let exec_err = |value: &str| {
            let errors = errs(&format!("listen = :1\nexec = {value}\n"));
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].0, 2);
            errors[0].1.clone()
        };
        let unbalanced = "exec: unbalanced quotes or a trailing backslash";
        assert_eq!(exec_err(r#"sh -c "echo"#), unbalanced);
        assert_eq!(exec_err("sh -c 'echo"), unbalanced);
        assert_eq!(exec_err(r"sh \"), unbalanced);
        assert_eq!(exec_err("# nothing"), "exec: missing value");
        assert_eq!(exec_err("\"\" x"), "exec: the program is an empty string");
    }

    #[test]
    fn workers() {
        assert_eq!(with("workers = auto").workers, None);
        assert_eq!(with("workers = 1").workers, Some(1));
        assert_eq!(with("workers = 1024").workers, Some(1024));
        assert_eq!(with("workers = 007").workers, Some(7));
        for bad in [
            "0",
            "1025",
            "-1",
            "+4",
            "4.0",
            "four",
            "Auto",
            "99999999999999999999999",
        ] {
            assert_eq!(
                err(&format!("workers = {bad}")),
                format!(r#"workers: expected "auto" or a number from 1 to 1024, found "{bad}""#)
            );
        }
    }

    #[test]
    fn listen_addresses() {
        let listen = |value: &str| ok(&format!("exec = x\nlisten = {value}\n")).listen;
        assert_eq!(listen("127.0.0.1:80"), [http(tcp("127.0.0.1:80"))]);
        assert_eq!(listen("localhost:3000"), [http(tcp("127.0.0.1:3000"))]);
        assert_eq!(listen("*:80"), [http(tcp("0.0.0.0:80"))]);
        assert_eq!(listen(":80"), [http(tcp("0.0.0.0:80"))]);
        assert_eq!(listen("127.0.0.1:0"), [http(tcp("127.0.0.1:0"))]);
        assert_eq!(listen("[::1]:8080"), [http(tcp("[::1]:8080"))]);
        assert_eq!(listen("[::]:80"), [http(tcp("[::]:80"))]);
        assert_eq!(
            listen("unix:/run/app.sock"),
            [http(ListenAddr::Unix("/run/app.sock".into()))]
        );
        assert_eq!(
            listen("unix:app.sock"),
            [http(ListenAddr::Unix("/srv/shop/app.sock".into()))]
        );
        assert_eq!(
            listen("unix:/tmp/a=b"),
            [http(ListenAddr::Unix("/tmp/a=b".into()))]
        );
        let named = |name: &str, addr| Listen {
            name: name.into(),
            addr,
        };
        assert_eq!(listen("api=[::1]:1"), [named("api", tcp("[::1]:1"))]);
        assert_eq!(listen("a.b-c_9 = :1"), [named("a.b-c_9", tcp("0.0.0.0:1"))]);
        assert_eq!(
            listen("admin=unix:/run/a=b.sock"),
            [named("admin", ListenAddr::Unix("/run/a=b.sock".into()))]
        );
    }

    #[test]
    fn listen_errors() {
        let forms = "expected host:port, [IPv6]:port or unix:/path";
        assert_eq!(
            err("listen = 8080"),
            format!(r#"listen: {forms}, found "8080""#)
        );
        assert_eq!(err("listen = a="), format!(r#"listen: {forms}, found """#));
        assert_eq!(
            err("listen = =:80"),
            r#"listen: missing listener name before "=""#
        );
        assert_eq!(
            err("listen = my name=:80"),
            r#"listen: listener name "my name" must be 1 to 64 letters, digits, '_', '.' or '-'"#
        );
        assert!(err(&format!("listen = {}=:80", "n".repeat(65))).contains("must be 1 to 64"));
        assert_eq!(
            err("listen = example.com:80"),
            r#"listen: "example.com" is not an IPv4 address (host names other than localhost are not resolved)"#
        );
        assert_eq!(
            err("listen = ::1:80"),
            r#"listen: put an IPv6 address in brackets, as in "[::1]:80""#
        );
        assert_eq!(
            err("listen = [::1]"),
            r#"listen: expected [IPv6]:port, found "[::1]""#
        );
        assert_eq!(
            err("listen = [::1]80"),
            r#"listen: expected [IPv6]:port, found "[::1]80""#
        );
        assert_eq!(
            err("listen = [1.2.3.4]:80"),
            r#"listen: "1.2.3.4" is not an IPv6 address"#
        );
        assert_eq!(
            err("listen = :65536"),
            r#"listen: port must be a number from 0 to 65535, found "65536""#
        );
        assert_eq!(
            err("listen = 1.2.3.4:"),
            r#"listen: port must be a number from 0 to 65535, found """#
        );
        assert_eq!(err("listen = unix:"), "listen: missing socket path");
        let long = format!("/{}", "s".repeat(107));
        assert_eq!(
            err(&format!("listen = unix:{long}")),
            format!(r#"listen: socket path "{long}" is 108 bytes long; the limit is 107"#)
        );
        // 107 bytes fit.
        with(&format!("listen = a=unix:{}", &long[..107]));
    }

    #[test]
    fn listen_duplicates_and_limit() {
        let text = "exec = x\nlisten = :80\nlisten = b=:80\nlisten = 0.0.0.0:81\nlisten = http=:82\n\
                    listen = u=unix:/a\nlisten = v=unix:/a\n";
        assert_eq!(
            errs(text),
            [
                (
                    3,
                    "listen: 0.0.0.0:80 is already listened on, on line 2".into()
                ),
                (
                    4,
                    r#"listen: name "http" is already used on line 2 (name each listener: NAME=ADDRESS)"#.into()
                ),
                (5, r#"listen: name "http" is already used on line 2"#.into()),
                (
                    7,
                    "listen: unix:/a is already listened on, on line 6".into()
                ),
            ]
        );
        // Port 0 is a new ephemeral port each time.
        let c = ok("exec = x\nlisten = a=127.0.0.1:0\nlisten = b=127.0.0.1:0\n");
        assert_eq!(c.listen.len(), 2);

        let mut text = String::from("exec = x\n");
        for i in 0..=MAX_LISTENERS {
            text += &format!("listen = l{i}=:{}\n", 1000 + i);
        }
        assert_eq!(
            errs(&text),
            [(66, "listen: too many listeners (at most 64)".into())]
        );
    }

    #[test]
    fn backlog_control_protocol_chdir_metrics() {
        assert_eq!(with("backlog = 1").backlog, 1);
        assert_eq!(with("backlog = 65535").backlog, 65535);
        for bad in ["0", "65536", "lots"] {
            assert_eq!(
                err(&format!("backlog = {bad}")),
                format!(r#"backlog: expected a number from 1 to 65535, found "{bad}""#)
            );
        }

        assert_eq!(
            with("control = ctl.sock").control,
            Some("/srv/shop/ctl.sock".into())
        );
        assert_eq!(
            with("control = /run/x.sock").control,
            Some("/run/x.sock".into())
        );
        assert!(
            err(&format!("control = /{}", "c".repeat(200))).starts_with("control: socket path")
        );

        assert_eq!(with("protocol = clusterd").protocol, Protocol::Clusterd);
        assert_eq!(with("protocol = systemd").protocol, Protocol::Systemd);
        assert_eq!(with("protocol = node").protocol, Protocol::Node);
        assert_eq!(
            err("protocol = sytemd"),
            r#"protocol: expected "clusterd", "systemd" or "node", found "sytemd""#
        );

        assert_eq!(with("empty_pool = wait").empty_pool, EmptyPool::Wait);
        assert_eq!(with("empty_pool = 503").empty_pool, EmptyPool::Http503);
        assert_eq!(with("empty_pool = reset").empty_pool, EmptyPool::Reset);
        assert_eq!(
            err("empty_pool = refuse"),
            r#"empty_pool: expected "wait", "503" or "reset", found "refuse""#
        );

        assert_eq!(with("chdir = /var/www").chdir, PathBuf::from("/var/www"));
        assert_eq!(with("chdir = .").chdir, PathBuf::from("/srv/shop"));
        assert_eq!(
            with("chdir = ../web").chdir,
            PathBuf::from("/srv/shop/../web")
        );

        assert_eq!(
            with("metrics = :9100").metrics,
            Some("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(
            with("metrics = [::1]:9100").metrics,
            Some("[::1]:9100".parse().unwrap())
        );
        assert_eq!(
            err("metrics = unix:/run/m.sock"),
            r#"metrics: "unix" is not an IPv4 address (host names other than localhost are not resolved)"#
        );
        assert_eq!(
            err("metrics = 9100"),
            r#"metrics: expected host:port or [IPv6]:port, found "9100""#
        );
        assert_eq!(
            err("metrics = 0.0.0.0:8080"),
            "metrics: 0.0.0.0:8080 is also a listener (line 2)"
        );
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("250ms", ms(250)),
            ("10s", ms(10_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("0", ms(0)),
            ("000", ms(0)),
            ("0s", ms(0)),
            ("0ms", ms(0)),
            ("10 s", ms(10_000)),
            ("8760h", ms(MAX_DURATION_MS)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        let units = "use ms, s, m or h, as in 250ms, 10s, 2m or 1h";
        for (text, want) in [
            ("10", format!(r#""10" needs a unit: {units}"#)),
            (
                "10sec",
                format!(r#"unknown unit "sec" in "10sec": {units}"#),
            ),
            ("10S", format!(r#"unknown unit "S" in "10S": {units}"#)),
            ("1.5s", format!(r#"unknown unit ".5s" in "1.5s": {units}"#)),
            ("s", format!(r#"expected a duration, found "s"; {units}"#)),
            (
                "-1s",
                format!(r#"expected a duration, found "-1s"; {units}"#),
            ),
            ("8761h", r#""8761h" is too long (at most 365 days)"#.into()),
            (
                "99999999999999999999h",
                r#""99999999999999999999h" is too long (at most 365 days)"#.into(),
            ),
            (
                "18446744073709551615h",
                r#""18446744073709551615h" is too long (at most 365 days)"#.into(),
            ),
        ] {
            assert_eq!(parse_duration(text), Err(want), "{text}");
        }
        // Every duration key goes through it, with the key in the message.
        for key in [
            "ready_timeout",
            "drain_timeout",
            "restart_delay",
            "restart_delay_max",
            "min_uptime",
        ] {
            assert_eq!(
                err(&format!("{key} = 5")),
                format!(r#"{key}: "5" needs a unit: {units}"#)
            );
        }
        assert_eq!(with("min_uptime = 0").min_uptime, Duration::ZERO);
        assert_eq!(
            err("restart_delay = 0"),
            "restart_delay: must be at least 10ms (a crashing worker would be restarted in a tight loop)"
        );
        assert_eq!(
            with("restart_delay = 10ms").restart_delay,
            Duration::from_millis(10)
        );
        assert_eq!(
            err("ready_timeout = 0s"),
            "ready_timeout: must be longer than 0"
        );
        assert_eq!(
            err("drain_timeout = 0"),
            "drain_timeout: must be longer than 0"
        );
    }

    #[test]
    fn cross_checks() {
        // restart_delay <= restart_delay_max, reported on the later line.
        let message = "restart_delay (60s) is longer than restart_delay_max (30s)";
        assert_eq!(err("restart_delay = 1m"), message);
        assert_eq!(
            errs(&format!(
                "{MIN}restart_delay = 2s\nrestart_delay_max = 1s\n"
            )),
            [(
                4,
                "restart_delay (2s) is longer than restart_delay_max (1s)".into()
            )]
        );
        assert_eq!(
            errs(&format!(
                "{MIN}restart_delay_max = 1s\nworkers = 2\nrestart_delay = 2s\n"
            )),
            [(
                5,
                "restart_delay (2s) is longer than restart_delay_max (1s)".into()
            )]
        );
        with("restart_delay = 30s");
        // A bad value is reported once, not again by the cross-check.
        assert_eq!(
            errs(&format!("{MIN}restart_delay_max = 50\n")),
            [(
                3,
                "restart_delay_max: \"50\" needs a unit: use ms, s, m or h, as in 250ms, 10s, 2m or 1h"
                    .into()
            )]
        );

        // dispatch, balance and sticky.
        assert_eq!(with("dispatch = clusterd").dispatch, Dispatch::Clusterd);
        assert_eq!(with("dispatch = reuseport").dispatch, Dispatch::Reuseport);
        assert_eq!(with("dispatch = shared").dispatch, Dispatch::Shared);
        assert_eq!(
            err("dispatch = fd"),
            r#"dispatch: expected "shared", "clusterd" or "reuseport", found "fd""#
        );
        let c = ok(&format!(
            "{MIN}dispatch = clusterd\nbalance = round-robin\nsticky = cookie:SID\n"
        ));
        assert_eq!(c.balance, Balance::RoundRobin);
        assert_eq!(c.sticky, Some(Sticky::Cookie("SID".into())));
        for (text, sticky) in [
            ("socket.io", Sticky::SocketIo),
            ("ip", Sticky::Ip),
            ("header:X-Session", Sticky::Header("x-session".into())),
            ("query:room", Sticky::Query("room".into())),
        ] {
            let c = ok(&format!("{MIN}dispatch = clusterd\nsticky = {text}\n"));
            assert_eq!(c.sticky.as_ref(), Some(&sticky));
            assert_eq!(
                sticky.to_string().to_ascii_lowercase(),
                text.to_ascii_lowercase()
            );
        }
        assert_eq!(
            errs(&format!("{MIN}dispatch = clusterd\nsticky = cookie:\n")),
            [(
                4,
                "sticky: cookie: the name must be 1 to 64 letters, digits or !#$%&'*+-.^_`|~, found \"\""
                    .into()
            )]
        );
        assert_eq!(
            errs(&format!("{MIN}dispatch = clusterd\nsticky = session\n")),
            [(
                4,
                r#"sticky: expected "socket.io", "cookie:NAME", "header:NAME", "query:NAME" or "ip", found "session""#
                    .into()
            )]
        );
        assert_eq!(
            errs(&format!("{MIN}sticky = ip\n")),
            [(
                3,
                r#"sticky: only works with "dispatch = clusterd" (clusterd chooses the worker only when it hands out the connections), found dispatch = shared"#
                    .into()
            )]
        );
        assert_eq!(
            errs(&format!("{MIN}dispatch = reuseport\nbalance = round-robin\n")),
            [(
                4,
                r#"balance: only works with "dispatch = clusterd" (clusterd chooses the worker only when it hands out the connections), found dispatch = reuseport"#
                    .into()
            )]
        );
        assert_eq!(
            errs(&format!("{MIN}protocol = systemd\ndispatch = clusterd\n")),
            [(
                4,
                r#"dispatch = clusterd: a "protocol = systemd" program takes listening sockets and cannot be handed connections; use "dispatch = reuseport" for balance, or protocol = clusterd or node"#
                    .into()
            )]
        );
        ok(&format!("{MIN}protocol = systemd\ndispatch = reuseport\n"));
        assert_eq!(
            errs(
                "exec = /bin/true\nlisten = 127.0.0.1:0\nlisten = admin=unix:/tmp/a.sock\n\
                  dispatch = reuseport\n"
            ),
            vec![(
                4,
                "dispatch = reuseport: listen unix:/tmp/a.sock is a unix socket, which \
                 SO_REUSEPORT does not balance; use TCP listeners, or dispatch = shared"
                    .to_string()
            )]
        );
        ok(&format!(
            "{MIN}protocol = node\ndispatch = clusterd\nsticky = socket.io\n"
        ));

        // ready_after only with protocol = systemd, and shorter than ready_timeout.
        assert_eq!(
            err("ready_after = 2s"),
            r#"ready_after: only works with "protocol = systemd" or "node" (clusterd workers report READY themselves)"#
        );
        assert_eq!(
            errs(&format!("{MIN}ready_after = 2s\nprotocol = clusterd\n")),
            [(
                3,
                r#"ready_after: only works with "protocol = systemd" or "node" (clusterd workers report READY themselves)"#.into()
            )]
        );
        let c = ok(&format!("{MIN}ready_after = 2s\nprotocol = node\n"));
        assert_eq!(c.ready_after, Some(Duration::from_secs(2)));
        let c = ok(&format!("{MIN}ready_after = 2s\nprotocol = systemd\n"));
        assert_eq!(c.ready_after, Some(Duration::from_secs(2)));
        assert_eq!(
            errs(&format!("{MIN}protocol = systemd\nready_after = 10s\n")),
            [(
                4,
                "ready_after (10s) must be shorter than ready_timeout (10s)".into()
            )]
        );
        assert_eq!(
            errs(&format!(
                "{MIN}protocol = systemd\nready_after = 3s\nready_timeout = 2s\n"
            )),
            [(
                5,
                "ready_after (3s) must be shorter than ready_timeout (2s)".into()
            )]
        );
    }

    #[test]
    fn users_and_groups() {
        assert_eq!(with("user = 1000").user, Some((1000, 1000)));
        assert_eq!(with("user = 0").user, Some((0, 0)));
        assert_eq!(with("group = 33").group, Some(33));
        // Names are resolved by `load`.
        let c = with("user = www-data\ngroup = www-data");
        assert_eq!((c.user, c.group), (None, None));
        assert_eq!(
            err("user = 4294967295"),
            r#"user: "4294967295" is not a valid id (0 to 4294967294)"#
        );
        assert_eq!(
            err("group = 99999999999"),
            r#"group: "99999999999" is not a valid id (0 to 4294967294)"#
        );
        assert_eq!(err("user = a:b"), r#"user: "a:b" is not a valid name"#);
        assert_eq!(err("group = a b"), r#"group: "a b" is not a valid name"#);
    }

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\n# c\nwww-data:x:33:34::/var/www:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:alice\n";

    fn missing() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    #[test]
    fn resolve_users() {
        let name = |s: &str| Id::Name(s.into());
        let passwd = || Ok(PASSWD.to_owned());
        assert_eq!(resolve_user(&name("www-data"), passwd()), Ok((33, 34)));
        assert_eq!(resolve_user(&Id::Num(33), passwd()), Ok((33, 34)));
        assert_eq!(resolve_user(&Id::Num(1000), passwd()), Ok((1000, 1000)));
        assert_eq!(
            resolve_user(&Id::Num(1000), Err(missing())),
            Ok((1000, 1000))
        );
        assert_eq!(
            resolve_user(&name("bob"), passwd()),
            Err(r#"no user "bob" in /etc/passwd"#.into())
        );
        assert_eq!(
            resolve_user(&name("bob"), Err(missing())),
            Err("cannot read /etc/passwd: entity not found".into())
        );

        let group = || Ok(GROUP.to_owned());
        assert_eq!(resolve_group(&name("staff"), group()), Ok(50));
        assert_eq!(resolve_group(&Id::Num(7), Err(missing())), Ok(7));
        assert_eq!(
            resolve_group(&name("wheel"), group()),
            Err(r#"no group "wheel" in /etc/group"#.into())
        );
        assert_eq!(
            resolve_group(&name("wheel"), Err(missing())),
            Err("cannot read /etc/group: entity not found".into())
        );
    }

    #[test]
    fn env() {
        let env = |line: &str| with(line).env;
        let pair = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(env("env = A=1"), pair("A", "1"));
        assert_eq!(env("env = _x9 = a b  "), pair("_x9", "a b"));
        assert_eq!(env("env = A="), pair("A", ""));
        assert_eq!(env("env = A=\"quoted\" 'x'"), pair("A", "\"quoted\" 'x'"));
        assert_eq!(
            env("env = URL=http://x/?a=b&c#frag"),
            pair("URL", "http://x/?a=b&c#frag")
        );
        assert_eq!(err("env = A"), r#"env: expected KEY=VALUE, found "A""#);
        for bad in ["1A", "A-B", "", "É"] {
            assert_eq!(
                err(&format!("env = {bad}=1")),
                format!(
                    r#"env: "{bad}" is not a variable name (letters, digits and _, not starting with a digit)"#
                )
            );
        }
        assert_eq!(
            err("env = LISTEN_FDS=3"),
            "env: LISTEN_FDS is set by clusterd itself"
        );
        assert_eq!(
            err("env = CLUSTERD_FD=3"),
            "env: CLUSTERD_FD is set by clusterd itself"
        );
        assert_eq!(
            errs(&format!("{MIN}env = A=1\nenv = A=2\n")),
            [(4, "env: A is already set on line 3".into())]
        );
    }

    #[test]
    fn missing_required_keys() {
        assert_eq!(
            errs(""),
            [
                (0, r#"missing required key "exec""#.into()),
                (0, r#"missing required key "listen""#.into()),
            ]
        );
        assert_eq!(
            errs("exec = x"),
            [(0, r#"missing required key "listen""#.into())]
        );
        // A bad exec line still counts as given.
        assert_eq!(
            errs("exec = 'x\nlisten = :1"),
            [(1, "exec: unbalanced quotes or a trailing backslash".into())]
        );
    }

    #[test]
    fn all_errors_at_once_in_line_order() {
        let text = "\
workers = 0
wrokers = 3
listen = :80
listen = :80
ready_timeout = 10
protocol = systemd
protocol = clusterd
env = 1=2
oops
";
        assert_eq!(
            errs(text),
            [
                (0, r#"missing required key "exec""#.into()),
                (1, r#"workers: expected "auto" or a number from 1 to 1024, found "0""#.into()),
                (2, r#"unknown key "wrokers" (did you mean "workers"?)"#.into()),
                (4, "listen: 0.0.0.0:80 is already listened on, on line 3".into()),
                (
                    5,
                    r#"ready_timeout: "10" needs a unit: use ms, s, m or h, as in 250ms, 10s, 2m or 1h"#
                        .into()
                ),
                (7, r#"duplicate key "protocol" (first set on line 6)"#.into()),
                (
                    8,
                    r#"env: "1" is not a variable name (letters, digits and _, not starting with a digit)"#
                        .into()
                ),
                (9, r#"expected "key = value", found "oops""#.into()),
            ]
        );
    }

    #[test]
    fn load_error_display() {
        let e = LoadError {
            path: "/etc/shop.conf".into(),
            errors: vec![
                ConfigError {
                    line: 0,
                    message: "missing required key \"exec\"".into(),
                },
                ConfigError {
                    line: 4,
                    message: "workers: missing value".into(),
                },
            ],
            omitted: 0,
        };
        assert_eq!(
            e.to_string(),
            "/etc/shop.conf: missing required key \"exec\"\n/etc/shop.conf:4: workers: missing value"
        );
    }

    #[test]
    fn strip_comment_rule() {
        assert_eq!(strip_comment("a # b"), "a ");
        assert_eq!(strip_comment("#b"), "");
        assert_eq!(strip_comment("a#b"), "a#b");
        assert_eq!(strip_comment("a\t#b"), "a\t");
        assert_eq!(strip_comment("é #"), "é ");
    }

    /// Pseudo-random input, from text that looks like a config to raw bytes,
    /// never panics.
    #[test]
    fn fuzz_never_panics() {
        const PIECES: &[&str] = &[
            "exec",
            "listen",
            "workers",
            "env",
            "user",
            "ready_after",
            "protocol",
            "systemd",
            "restart_delay",
            "metrics",
            "chdir",
            "control",
            " = ",
            "=",
            " ",
            "\t",
            "\n",
            "\r\n",
            "#",
            "\"",
            "'",
            "\\",
            "unix:",
            "[",
            "]",
            ":",
            "::1",
            "*",
            "0",
            "9",
            "65536",
            "ms",
            "s",
            "h",
            "auto",
            "A=",
            "/",
            "./",
            "..",
            "é",
            "\u{feff}",
            "\0",
            "99999999999999999999",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        for round in 0..400 {
            let len = next() % 300;
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                (0..len / 4)
                    .flat_map(|_| PIECES[next() % PIECES.len()].bytes())
                    .collect()
            };
            let text = String::from_utf8_lossy(&bytes);
            let lines = text.lines().count();
            if let Err(errors) = parse_str(&text, Path::new(PATH)) {
                assert!(
                    errors.iter().all(|e| e.line <= lines),
                    "{text:?}: {errors:?}"
                );
            }
            let _ = parse_str(&text, Path::new(""));
        }
    }

    /// A unique temporary folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("clusterd-config-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let path = self.0.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        /// Writes `shop.conf` and loads it.
        fn load(&self, text: &str) -> Result<Config, LoadError> {
            load(&self.file("shop.conf", text, 0o644))
        }

        fn load_errs(&self, text: &str) -> Vec<(usize, String)> {
            let e = self.load(text).expect_err("should fail");
            assert_eq!(e.path, self.0.join("shop.conf"));
            e.errors.into_iter().map(|e| (e.line, e.message)).collect()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_resolves_against_the_config_folder() {
        let dir = TempDir::new();
        let shop = dir.file("bin/shop", "#!/bin/sh\n", 0o755);
        dir.file("bin/tool", "#!/bin/sh\n", 0o755);
        std::fs::create_dir(dir.0.join("www")).unwrap();
        let c = dir
            .load(&format!(
                "exec = ./bin/shop --port 0\nlisten = 127.0.0.1:0\nlisten = b=127.0.0.1:0\n\
                 chdir = www\nuser = 0\ngroup = 0\nenv = PATH={}/bin\n",
                dir.0.display()
            ))
            .unwrap();
        assert_eq!(c.path, dir.0.join("shop.conf"));
        assert_eq!(c.name, "shop");
        assert_eq!(c.exec, [shop.to_str().unwrap(), "--port", "0"]);
        assert_eq!(c.chdir, dir.0.join("www"));
        assert_eq!((c.user, c.group), (Some((0, 0)), Some(0)));

        // A bare name is looked up in the config's PATH, else clusterd's.
        let c = dir
            .load(&format!(
                "exec = tool\nlisten = :0\nenv = PATH=/nonexistent:{}/bin\n",
                dir.0.display()
            ))
            .unwrap();
        assert_eq!(c.exec, [dir.0.join("bin/tool").to_str().unwrap()]);
        let c = dir.load("exec = sh -c \"echo #1\"\nlisten = :0\n").unwrap();
        assert!(
            Path::new(&c.exec[0]).is_absolute() && c.exec[0].ends_with("/sh"),
            "{:?}",
            c.exec
        );
        assert_eq!(c.exec[1..], ["-c", "echo #1"]);
        assert_eq!(c.chdir, dir.0);
    }

    #[test]
    fn load_program_errors() {
        let dir = TempDir::new();
        dir.file("data.txt", "", 0o644);
        dir.file("tool", "", 0o755);
        let root = dir.0.display();
        assert_eq!(
            dir.load_errs("exec = ./shop\nlisten = :0\n"),
            [(
                1,
                format!(r#"exec: program "./shop" not found (looked for {root}/shop)"#)
            )]
        );
        assert_eq!(
            dir.load_errs(&format!("listen = :0\nexec = {root}/nope\n")),
            [(2, format!(r#"exec: program "{root}/nope" not found"#))]
        );
        assert_eq!(
            dir.load_errs("exec = ./data.txt\nlisten = :0\n"),
            [(1, format!(r#"exec: "{root}/data.txt" is not executable"#))]
        );
        assert_eq!(
            dir.load_errs("exec = ./\nlisten = :0\n"),
            [(
                1,
                format!(r#"exec: "{root}" is a directory, not a program"#)
            )]
        );
        assert_eq!(
            dir.load_errs("exec = nodee\nlisten = :0\nenv = PATH=/nonexistent::rel\n"),
            [(
                1,
                r#"exec: program "nodee" not found in PATH (/nonexistent::rel)"#.into()
            )]
        );
        assert_eq!(
            dir.load_errs("exec = tool\nlisten = :0\nenv = PATH=/nonexistent\n"),
            [(
                1,
                r#"exec: program "tool" not found in PATH (/nonexistent); to run the one beside the config file, write "./tool""#
                    .into()
            )]
        );
    }

    #[test]
    fn load_other_errors() {
        let dir = TempDir::new();
        dir.file("tool", "", 0o755);
        dir.file("file", "", 0o644);
        let root = dir.0.display();
        let base = "exec = ./tool\nlisten = :0\n";
        assert_eq!(
            dir.load_errs(&format!("{base}chdir = nope\n")),
            [(3, format!(r#"chdir: "{root}/nope" does not exist"#))]
        );
        assert_eq!(
            dir.load_errs(&format!("{base}chdir = file\n")),
            [(3, format!(r#"chdir: "{root}/file" is not a directory"#))]
        );
        assert_eq!(
            dir.load_errs(&format!("{base}user = no-such-user-clusterd\n")),
            [(
                3,
                r#"user: no user "no-such-user-clusterd" in /etc/passwd"#.into()
            )]
        );
        assert_eq!(
            dir.load_errs(&format!("{base}group = no-such-group-clusterd\n")),
            [(
                3,
                r#"group: no group "no-such-group-clusterd" in /etc/group"#.into()
            )]
        );
        // Parse and file-system errors come together.
        assert_eq!(
            dir.load_errs("workers = 0\nexec = ./nope\nlisten = :0\nchdir = nope\n"),
            [
                (
                    1,
                    r#"workers: expected "auto" or a number from 1 to 1024, found "0""#.into()
                ),
                (
                    2,
                    format!(r#"exec: program "./nope" not found (looked for {root}/nope)"#)
                ),
                (4, format!(r#"chdir: "{root}/nope" does not exist"#)),
            ]
        );
        // Invalid UTF-8 is reported on its line; the rest is still checked.
        let path = dir.file("bad.conf", "", 0o644);
        std::fs::write(
            &path,
            b"exec = ./tool\nlisten = :0\nenv = A=\xff\nworkers = x\n",
        )
        .unwrap();
        let errors: Vec<_> = load(&path)
            .unwrap_err()
            .errors
            .into_iter()
            .map(|e| e.line)
            .collect();
        assert_eq!(errors, [3, 4]);
    }

    #[test]
    fn load_unreadable_file() {
        let dir = TempDir::new();
        let path = dir.0.join("missing.conf");
        let e = load(&path).unwrap_err();
        assert_eq!(e.path, path);
        assert_eq!(
            e.errors,
            [ConfigError {
                line: 0,
                message: "cannot read the config file: No such file or directory (os error 2)"
                    .into(),
            }]
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{}: cannot read the config file: No such file or directory (os error 2)",
                path.display()
            )
        );
        assert_eq!(load(&dir.0).unwrap_err().errors[0].line, 0);
    }

    #[test]
    fn load_refuses_what_is_not_a_regular_file_without_blocking() {
        let dir = TempDir::new();
        let fifo = dir.0.join("fifo.conf");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        // On another thread: before the fix, opening the FIFO blocked until
        // a writer came (here: the test, after its deadline).
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send((load(&path), read(&path)));
        });
        let (loaded, read) = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(results) => results,
            Err(_) => {
                // Unblock the reader, then fail.
                let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
                panic!("load blocked on a FIFO");
            }
        };
        for e in [loaded.unwrap_err(), read.unwrap_err()] {
            assert_eq!(
                e.to_string(),
                format!(
                    "{}: cannot read the config file: it is a FIFO (named pipe), not a regular file",
                    fifo.display()
                )
            );
        }
        let e = load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            e.errors[0].message,
            "cannot read the config file: it is a character device, not a regular file"
        );
        assert_eq!(
            load(&dir.0).unwrap_err().errors[0].message,
            "cannot read the config file: it is a directory, not a regular file"
        );
        // A symbolic link to a regular file is followed (deploy tools).
        dir.file("tool", "", 0o755);
        let real = dir.file("real.conf", "exec = ./tool\nlisten = :0\n", 0o644);
        let link = dir.0.join("link.conf");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(load(&link).is_ok());
        // A link to a FIFO is refused like the FIFO.
        let to_fifo = dir.0.join("to-fifo.conf");
        std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
        assert!(
            load(&to_fifo).unwrap_err().errors[0]
                .message
                .contains("a FIFO")
        );
    }

    #[test]
    fn load_refuses_a_file_larger_than_1_mib() {
        let dir = TempDir::new();
        let mut text = String::from("exec = ./tool\nlisten = :0\n");
        text.push_str(&"# padding\n".repeat(110_000));
        let path = dir.file("big.conf", &text, 0o644);
        for e in [load(&path).unwrap_err(), read(&path).unwrap_err()] {
            assert_eq!(e.errors.len(), 1);
            assert_eq!(
                e.errors[0].message,
                format!(
                    "cannot read the config file: it is {} bytes, more than the 1024 KiB a \
                     config file may have (is this the right file?)",
                    text.len()
                )
            );
        }
        // Exactly 1 MiB is read.
        let mut text = String::from("exec = /bin/sh\nlisten = :0\n");
        text.push_str(&"#".repeat(MAX_FILE_BYTES as usize - text.len() - 1));
        text.push('\n');
        let path = dir.file("edge.conf", &text, 0o644);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MAX_FILE_BYTES);
        assert!(read(&path).is_ok());
    }

    #[test]
    fn errors_are_capped_and_counted() {
        let dir = TempDir::new();
        dir.file("tool", "", 0o755);
        let text = format!("exec = ./tool\nlisten = :0\n{}", "oops\n".repeat(200_000));
        let path = dir.file("bad.conf", &text, 0o644);
        for e in [load(&path).unwrap_err(), read(&path).unwrap_err()] {
            assert_eq!(e.errors.len(), MAX_ERRORS);
            assert_eq!(e.omitted, 200_000 - MAX_ERRORS);
            let lines: Vec<usize> = e.errors.iter().map(|e| e.line).collect();
            assert_eq!(lines, (3..3 + MAX_ERRORS).collect::<Vec<_>>());
            let shown = e.to_string();
            assert_eq!(shown.lines().count(), MAX_ERRORS + 1);
            assert_eq!(
                shown.lines().last().unwrap(),
                format!("{}: ... and 199980 more errors", path.display())
            );
        }
        // The earliest lines win, whichever stage found them: a
        // file-system error on line 1 comes before the parse errors.
        let text = format!("exec = ./nope\nlisten = :0\n{}", "oops\n".repeat(100));
        let e = dir.load(&text).unwrap_err();
        assert_eq!(e.errors[0].line, 1);
        assert_eq!(e.errors.len(), MAX_ERRORS);
        assert_eq!(e.omitted, 101 - MAX_ERRORS);
        // parse_str keeps the first ones too.
        let errors = parse_str(&"x\n".repeat(1000), Path::new(PATH)).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS);
        assert_eq!(errors[0].line, 0, "missing required keys first");
    }

    #[test]
    fn switching_ids_needs_root_or_the_capability() {
        let me = ProcessIds {
            euid: 1000,
            uid: 1000,
            egid: 100,
            gid: 100,
            can_setuid: false,
            can_setgid: false,
        };
        assert_eq!(switch_problem(&me, IdKind::User, 1000), None);
        assert_eq!(switch_problem(&me, IdKind::Group, 100), None);
        assert_eq!(
            switch_problem(&me, IdKind::User, 33).unwrap(),
            "clusterd runs as uid 1000, not as root, so it cannot start workers as uid 33: \
             run clusterd as root (it then runs the workers as uid 33), or remove this line \
             to run them as clusterd's own uid"
        );
        assert!(
            switch_problem(&me, IdKind::Group, 33)
                .unwrap()
                .starts_with("clusterd runs as gid 100")
        );
        let root = ProcessIds {
            euid: 0,
            uid: 0,
            egid: 0,
            gid: 0,
            can_setuid: true,
            can_setgid: true,
        };
        assert_eq!(switch_problem(&root, IdKind::User, 33), None);
        let capable = ProcessIds {
            can_setuid: true,
            can_setgid: true,
            ..me
        };
        assert_eq!(switch_problem(&capable, IdKind::User, 33), None);

        // An error to run with, a warning to --check with; on the line
        // that asked for it (the user line gives the group too).
        let run = |text: &str, purpose| {
            let mut p = parse(text, Path::new(PATH));
            p.check_switch_ids(purpose, &me);
            let warnings = p.warnings.clone();
            (p.finish().err().unwrap_or_default(), warnings)
        };
        let (errors, warnings) = run(&format!("{MIN}user = 33\n"), Purpose::Run);
        assert_eq!(warnings, []);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.line == 3), "{errors:?}");
        assert!(
            errors[0]
                .message
                .starts_with("user: clusterd runs as uid 1000")
        );
        assert!(
            errors[1]
                .message
                .starts_with("user: clusterd runs as gid 100")
        );
        let (errors, warnings) = run(&format!("{MIN}user = 33\ngroup = 100\n"), Purpose::Check);
        assert_eq!(errors, []);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].line, 3);
        assert!(
            warnings[0].message.ends_with(
                "(clusterd --check runs as uid 1000; clusterd itself refuses to start like this)"
            ),
            "{warnings:?}"
        );
        let (errors, _) = run(&format!("{MIN}user = 1000\ngroup = 33\n"), Purpose::Run);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 4);
        assert!(errors[0].message.starts_with("group: "));
    }

    #[test]
    fn wrappers_under_protocol_systemd_are_warned_about() {
        let warn = |exec: &str| {
            let words: Vec<String> = shlex::split(exec).unwrap();
            wrapper_warning(&words)
        };
        let npm = warn("npm start").unwrap();
        assert!(
            npm.starts_with("exec: npm runs the server as a child process"),
            "{npm}"
        );
        assert!(npm.contains("listen EINVAL") && npm.contains("exec = node server.js"));
        for exec in [
            "/usr/bin/npx serve",
            "yarn start",
            "pnpm run start",
            "bun run x.ts",
        ] {
            assert!(warn(exec).is_some(), "{exec}");
        }
        let sh = warn("sh -c 'cd app && node server.js'").unwrap();
        assert!(
            sh.starts_with("exec: sh -c runs the server as a child process"),
            "{sh}"
        );
        assert!(warn("/bin/bash -c 'source env; gunicorn app'").is_some());
        // The server itself, a single command (the shell execs it), an
        // explicit exec, and env (which execs): fine.
        for exec in [
            "node server.js",
            "sh -c 'node server.js'",
            "sh -c 'cd app && exec node server.js'",
            "env NODE_ENV=production node server.js",
            "./npm-helper",
        ] {
            assert_eq!(warn(exec), None, "{exec}");
        }
        // Only with protocol = systemd (a native worker inherits fd 3).
        let mut p = parse("exec = npm start\nlisten = :0\n", Path::new(PATH));
        p.warn_about_wrappers();
        assert_eq!(p.warnings, []);
        let mut p = parse(
            "exec = npm start\nlisten = :0\nprotocol = systemd\n",
            Path::new(PATH),
        );
        p.warn_about_wrappers();
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].line, 1);
        assert_eq!(
            p.warnings[0].warning(Path::new(PATH)),
            format!("{PATH}:1: warning: {npm}")
        );
    }
}
