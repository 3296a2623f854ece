//! `protocol = node`: an unmodified Node.js server as a worker.
//!
//! A node worker speaks the systemd protocol (listeners at fds 3..,
//! `LISTEN_FDS`, the readiness pipe, SIGTERM to drain, exit when drained)
//! through an adapter clusterd provides: `src/node/adapter.js`, embedded
//! here, written at first use to a file of clusterd's own
//! ([`AdapterFile`]) and loaded by Node before the app through
//! `NODE_OPTIONS=--require <file>` (Node needs a real file: a memfd path
//! fails its `realpath`). What the adapter does is described at the top of
//! adapter.js and in clusterd(8).
//!
//! Besides the systemd fds the worker gets Node's own IPC channel, a unix
//! stream socket after the readiness pipe (`NODE_CHANNEL_FD`, JSON
//! serialization: one JSON value per line). The adapter sends
//! `{"cmd":"CLUSTERD_HEARTBEAT","requests":N,"active":N}` from a timer on the
//! event loop (stats, and the watchdog's heartbeat) and
//! `{"cmd":"CLUSTERD_STATUS","status":"…"}` (what it waits for before READY,
//! the app's fatal error). Anything else on it (the app's own
//! `process.send()`, Node's internal messages) is ignored. Being Node's
//! channel, it can later carry connections clusterd accepts itself (a
//! `NODE_HANDLE` message with the fd attached).
//!
//! The reader is bounded like the other worker channels: lines of at most
//! [`MAX_LINE`] bytes, at most [`MAX_BAD_LINES`] malformed ones before the
//! channel is ignored, and the fd is kept (not read) until the worker is
//! reaped once it is ignored.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{Mode, OFlags};
use smol::Async;
use smol::channel::{Receiver, Sender};

use super::spawn::{Inherit, Spec};
use super::{Event, WorkerEvent};
use crate::lifecycle::InstanceId;
use crate::proto::FromWorker;

/// The adapter's source.
pub const ADAPTER: &str = include_str!("../node/adapter.js");

/// The file name of the adapter in its folder.
const ADAPTER_NAME: &str = "clusterd-node-adapter.js";

/// The longest line read on a Node channel; longer ones are skipped.
pub const MAX_LINE: usize = 16 * 1024;

/// Malformed lines tolerated before a channel is ignored.
pub const MAX_BAD_LINES: u32 = 16;

/// The longest status kept (characters).
const MAX_STATUS: usize = 300;

/// The adapter written to a private folder, removed when dropped.
///
/// The folder is made with `mkdir` (which fails on anything already there,
/// a link included) under a fresh random name, mode 0700, then opened
/// without following links and checked to be clusterd's own; the file is
/// created in it with `O_EXCL | O_NOFOLLOW`, mode 0444. Workers that run as
/// another user (`user =`) need to reach it: the folder becomes 0711 then
/// (not listable; the file is not secret, and only clusterd's user can
/// change either).
#[derive(Debug)]
pub struct AdapterFile {
    dir: PathBuf,
    dir_fd: OwnedFd,
    path: PathBuf,
    shared: bool,
}

impl AdapterFile {
    /// Writes the adapter into a new private folder in the first of
    /// `parents` where that works.
    pub fn create(parents: &[PathBuf]) -> io::Result<AdapterFile> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no folder to write it in");
        for parent in parents {
            match Self::create_in(parent) {
                Ok(file) => return Ok(file),
                Err(e) => {
                    last = io::Error::new(
                        e.kind(),
                        format!("cannot write the Node adapter in {}: {e}", parent.display()),
                    )
                }
            }
        }
        Err(last)
    }

    fn create_in(parent: &Path) -> io::Result<AdapterFile> {
        let mut tries = 0;
        let dir = loop {
            let name = format!("clusterd-node-{}-{:016x}", std::process::id(), random());
            let dir = parent.join(name);
            match rustix::fs::mkdir(&dir, Mode::from_raw_mode(0o700)) {
                Ok(()) => break dir,
                Err(rustix::io::Errno::EXIST) if tries < 8 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        };
        let made = AdapterDir(dir.clone());
        let dir_fd = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&dir_fd)?;
        if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the folder made for it is not private",
            ));
        }
        let file = rustix::fs::openat(
            &dir_fd,
            ADAPTER_NAME,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )?;
        let mut bytes = ADAPTER.as_bytes();
        while !bytes.is_empty() {
            let n = rustix::io::write(&file, bytes)?;
            bytes = &bytes[n..];
        }
        std::mem::forget(made);
        Ok(AdapterFile {
            path: dir.join(ADAPTER_NAME),
            dir,
            dir_fd,
            shared: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its folder, the folder's fd and whether it is shared, to hand over
    /// (`clusterctl upgrade`).
    pub fn handed(&self) -> (&Path, BorrowedFd<'_>, bool) {
        (&self.dir, self.dir_fd.as_fd(), self.shared)
    }

    /// The adapter an earlier image of clusterd wrote.
    pub fn taken_over(dir: PathBuf, dir_fd: OwnedFd, shared: bool) -> AdapterFile {
        AdapterFile {
            path: dir.join(ADAPTER_NAME),
            dir,
            dir_fd,
            shared,
        }
    }

    /// Lets a worker running as `uid` read the adapter.
    pub fn allow(&mut self, uid: Option<u32>) {
        let euid = rustix::process::geteuid().as_raw();
        if self.shared || uid.is_none_or(|u| u == euid) {
            return;
        }
        match rustix::fs::fchmod(&self.dir_fd, Mode::from_raw_mode(0o711)) {
            Ok(()) => self.shared = true,
            Err(e) => log!(warn, "node.adapter_failed", error = io::Error::from(e)),
        }
    }
}

impl Drop for AdapterFile {
    fn drop(&mut self) {
        let _ = rustix::fs::unlinkat(&self.dir_fd, ADAPTER_NAME, rustix::fs::AtFlags::empty());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes a folder made but not yet handed over (a failed create).
struct AdapterDir(PathBuf);

impl Drop for AdapterDir {
    fn drop(&mut self) {
        if let Ok(dir) = rustix::fs::open(
            &self.0,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let _ = rustix::fs::unlinkat(&dir, ADAPTER_NAME, rustix::fs::AtFlags::empty());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// 64 random bits for a folder name (std's hasher keys are random).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The environment a node worker gets besides the systemd protocol's:
/// Node's IPC channel on fd `channel_fd`, what the adapter must know, and
/// `NODE_OPTIONS` with `--require <adapter>` appended to the one the worker
/// would otherwise get (the config's `env`, else clusterd's own).
pub fn worker_env(
    spec: &Spec,
    listeners: &[Inherit<'_>],
    channel_fd: i32,
) -> io::Result<Vec<(String, String)>> {
    let adapter = spec.node_adapter.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the Node adapter file could not be written (see the node.adapter_failed log line)",
        )
    })?;
    let mut described = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        described.push(describe(l.name, l.fd, 3 + i as i32)?);
    }
    let inherited = std::env::var_os("NODE_OPTIONS");
    let configured = spec
        .env
        .iter()
        .find(|(k, _)| k == "NODE_OPTIONS")
        .map(|(_, v)| OsString::from(v));
    let options = node_options(configured.or(inherited).as_deref(), adapter)?;
    Ok(vec![
        ("NODE_CHANNEL_FD".into(), channel_fd.to_string()),
        ("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()),
        (
            "CLUSTERD_NODE_LISTENERS".into(),
            serde_json::Value::Array(described).to_string(),
        ),
        ("CLUSTERD_BACKLOG".into(), spec.backlog.to_string()),
        (
            "CLUSTERD_DRAIN_TIMEOUT_MS".into(),
            spec.drain_timeout.as_millis().to_string(),
        ),
        ("NODE_OPTIONS".into(), options),
    ])
}

/// `{"name":"http","fd":3,"host":"127.0.0.1","port":3000}` or
/// `{"name":"sock","fd":4,"path":"/run/app.sock"}`: the address the
/// listener is bound to, so that the adapter maps `listen(port)` by port.
fn describe(name: &str, fd: BorrowedFd<'_>, number: i32) -> io::Result<serde_json::Value> {
    use std::net::SocketAddr;
    let addr = rustix::net::getsockname(fd)?;
    let mut v = serde_json::json!({ "name": name, "fd": number });
    if let Ok(ip) = SocketAddr::try_from(addr.clone()) {
        v["host"] = ip.ip().to_string().into();
        v["port"] = ip.port().into();
    } else if let Ok(unix) = rustix::net::SocketAddrUnix::try_from(addr) {
        let path = unix
            .path_bytes()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        v["path"] = path.unwrap_or_default().into();
    }
    Ok(v)
}

/// `options` with `--require "<adapter>"` appended (quoted the way Node
/// reads NODE_OPTIONS).
pub fn node_options(options: Option<&std::ffi::OsStr>, adapter: &Path) -> io::Result<String> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let options = match options {
        Some(o) => o
            .to_str()
            .ok_or_else(|| invalid("NODE_OPTIONS is not UTF-8"))?
            .trim_end()
            .to_string(),
        None => String::new(),
    };
    let path = std::str::from_utf8(adapter.as_os_str().as_bytes())
        .map_err(|_| invalid("the Node adapter's path is not UTF-8"))?;
    let quoted = path.replace('\\', "\\\\").replace('"', "\\\"");
    let require = format!("--require \"{quoted}\"");
    Ok(if options.is_empty() {
        require
    } else {
        format!("{options} {require}")
    })
}

// ---------------------------------------------------------------------------
// The channel

/// What one line from a Node worker means to clusterd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// From the event loop: alive, with its counts.
    Heartbeat { requests: u64, active: u32 },
    /// What it waits for or what failed; `None` clears it.
    Status(Option<String>),
    /// Anything else (the app's own messages): ignored.
    Other,
    /// Not JSON.
    Bad(String),
}

/// Reads one line.
pub fn parse(line: &[u8]) -> Message {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Message::Bad(format!("Node channel: not JSON: {e}")),
    };
    match value.get("cmd").and_then(|c| c.as_str()) {
        Some("CLUSTERD_HEARTBEAT") => {
            let count = |key: &str| value.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
            Message::Heartbeat {
                requests: count("requests"),
                active: u32::try_from(count("active")).unwrap_or(u32::MAX),
            }
        }
        Some("CLUSTERD_STATUS") => {
            let text = value.get("status").and_then(|s| s.as_str()).unwrap_or("");
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_STATUS)
                .collect();
            let text = text.trim();
            Message::Status((!text.is_empty()).then(|| text.to_string()))
        }
        _ => Message::Other,
    }
}

/// Splits a byte stream into lines, within [`MAX_LINE`].
#[derive(Debug, Default)]
pub struct Lines {
    line: Vec<u8>,
    /// The current line is too long: skipped to its end.
    skipping: bool,
    bad: u32,
}

impl Lines {
    /// The messages in `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.skipping {
                    self.skipping = false;
                } else if !self.line.is_empty() {
                    out.push(parse(&self.line));
                }
                self.line.clear();
            } else if self.skipping {
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                self.skipping = true;
                self.line.clear();
                out.push(Message::Bad(format!(
                    "Node channel: a line longer than {} KiB (skipped)",
                    MAX_LINE / 1024
                )));
            }
        }
        self.bad += out.iter().filter(|m| matches!(m, Message::Bad(_))).count() as u32;
        out
    }

    /// Too many malformed lines: stop listening.
    pub fn given_up(&self) -> bool {
        self.bad >= MAX_BAD_LINES
    }
}

/// clusterd's end of a Node worker's channel, shared by its reader task and
/// the daemon (which reads what is queued when the worker exits).
#[derive(Debug, Clone)]
pub struct Channel {
    fd: Rc<Async<OwnedFd>>,
    lines: Rc<RefCell<Lines>>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel {
            fd: Rc::new(Async::new(fd)?),
            lines: Rc::default(),
        })
    }

    /// clusterd's end of the channel: `dispatch = clusterd` writes on it, and
    /// `clusterctl upgrade` hands it over.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// What is queued now, read without waiting (at most 64 KiB): a worker
    /// that reports its error and exits at once is heard before its exit is
    /// handled.
    pub(super) fn read_queued(&self) -> Vec<WorkerEvent> {
        let mut events = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            if self.lines.borrow().given_up() {
                break;
            }
            match rustix::io::read(self.fd.get_ref().as_fd(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let messages = self.lines.borrow_mut().feed(&buf[..n]);
                    events.extend(messages.into_iter().flat_map(events_of));
                }
            }
        }
        events
    }
}

/// The daemon's events for one message.
fn events_of(m: Message) -> Vec<WorkerEvent> {
    match m {
        Message::Heartbeat { requests, active } => vec![
            WorkerEvent::Message(FromWorker::Stats { requests, active }),
            WorkerEvent::Message(FromWorker::Heartbeat),
        ],
        Message::Status(text) => vec![WorkerEvent::Note(text)],
        Message::Other => vec![],
        Message::Bad(why) => vec![WorkerEvent::Bad(why)],
    }
}

/// Reads worker `id`'s channel and forwards its messages until EOF, the
/// worker is reaped, or it has sent too much garbage (then the fd is kept,
/// unread, until the worker is reaped).
pub(super) async fn read(
    id: InstanceId,
    channel: Channel,
    reaped: Receiver<()>,
    tx: Sender<Event>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Some(n) = super::ready_pipe::read_until_reaped(&channel.fd, &mut buf, &reaped).await
        else {
            return;
        };
        let messages = channel.lines.borrow_mut().feed(&buf[..n]);
        for event in messages.into_iter().flat_map(events_of) {
            if tx.send(Event::Worker(id, event)).await.is_err() {
                return;
            }
        }
        if channel.lines.borrow().given_up() {
            let why = "Node channel: too many malformed lines: it is now ignored".to_string();
            let _ = tx.send(Event::Worker(id, WorkerEvent::Bad(why))).await;
            let _ = reaped.recv().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_and_the_rest_ignored() {
        assert_eq!(
            parse(br#"{"cmd":"CLUSTERD_HEARTBEAT","requests":12,"active":3}"#),
            Message::Heartbeat {
                requests: 12,
                active: 3
            }
        );
        assert_eq!(
            parse(br#"{"cmd":"CLUSTERD_HEARTBEAT","requests":-1,"active":1e40}"#),
            Message::Heartbeat {
                requests: 0,
                active: 0
            }
        );
        assert_eq!(
            parse(br#"{"cmd":"CLUSTERD_STATUS","status":"the app failed:\nError: x"}"#),
            Message::Status(Some("the app failed: Error: x".into()))
        );
        assert_eq!(
            parse(br#"{"cmd":"CLUSTERD_STATUS","status":""}"#),
            Message::Status(None)
        );
        let long = format!(
            r#"{{"cmd":"CLUSTERD_STATUS","status":"{}"}}"#,
            "x".repeat(5000)
        );
        assert!(
            matches!(parse(long.as_bytes()), Message::Status(Some(s)) if s.len() == MAX_STATUS)
        );
        // The app's own process.send() and Node's internal messages.
        for other in [
            &br#""ready""#[..],
            br#"{"cmd":"NODE_HANDLE_ACK"}"#,
            b"[1,2]",
        ] {
            assert_eq!(parse(other), Message::Other);
        }
        assert!(matches!(parse(b"{nope"), Message::Bad(_)));
    }

    #[test]
    fn lines_are_split_across_reads_and_bounded() {
        let mut l = Lines::default();
        assert_eq!(l.feed(br#"{"cmd":"CLUSTERD_STAT"#), vec![]);
        assert_eq!(
            l.feed(b"US\",\"status\":\"up\"}\n\n\"x\"\n"),
            vec![Message::Status(Some("up".into())), Message::Other]
        );
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.extend_from_slice(b"\n\"y\"\n");
        let out = l.feed(&big);
        assert!(matches!(out[0], Message::Bad(_)), "{out:?}");
        assert_eq!(out[1..], [Message::Other]);
        let mut l = Lines::default();
        for _ in 0..MAX_BAD_LINES {
            assert!(!l.given_up());
            l.feed(b"garbage\n");
        }
        assert!(l.given_up());
    }

    #[test]
    fn node_options_get_the_adapter_appended_and_quoted() {
        let adapter = Path::new("/tmp/clusterd-node-1-ab/clusterd-node-adapter.js");
        assert_eq!(
            node_options(None, adapter).unwrap(),
            r#"--require "/tmp/clusterd-node-1-ab/clusterd-node-adapter.js""#
        );
        assert_eq!(
            node_options(Some("--max-old-space-size=512 ".as_ref()), adapter).unwrap(),
            r#"--max-old-space-size=512 --require "/tmp/clusterd-node-1-ab/clusterd-node-adapter.js""#
        );
        assert_eq!(
            node_options(None, Path::new("/a b/\"q\"\\.js")).unwrap(),
            r#"--require "/a b/\"q\"\\.js""#
        );
    }

    #[test]
    fn the_adapter_file_is_private_and_removed() {
        let parent = std::env::temp_dir();
        let file = AdapterFile::create(&[PathBuf::from("/nonexistent-folder"), parent]).unwrap();
        let path = file.path().to_path_buf();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), ADAPTER);
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().unwrap().to_path_buf();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o444);
        let mut file = file;
        file.allow(None);
        assert_eq!(mode(&dir), 0o700);
        file.allow(Some(rustix::process::geteuid().as_raw() + 1));
        assert_eq!(mode(&dir), 0o711);
        drop(file);
        assert!(!dir.exists());
    }
}
