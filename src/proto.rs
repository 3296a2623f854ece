//! The wire protocols: clusterd ↔ worker (IPC) and clusterctl ↔ clusterd (control).
//!
//! Both use serde + bincode 2 (standard config). Every record starts with its
//! protocol's version ([`IPC_VERSION`] or [`CONTROL_VERSION`], the
//! [`Message::VERSION`] of the message type) as a bincode varint, followed
//! by exactly one message;
//! decoding checks the version first (so a mismatch is reported as such, naming
//! both versions, rather than as garbage), enforces a hard size limit and
//! rejects trailing bytes.
//!
//! - IPC records travel one per record of a `SOCK_SEQPACKET` socketpair, so they
//!   need no length prefix. Listener fds ride along with [`ToWorker::Hello`]
//!   as `SCM_RIGHTS` (see [`crate::fdpass`]).
//! - Control records travel over a unix stream socket, each prefixed by its
//!   length as a big-endian `u32` ([`frame`], [`frame_len`]).
//!
//! Everything here is pure: byte slices in, values out. Malformed input is an
//! [`Error`], never a panic.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fmt;

/// The worker protocol's version. It changes only when a worker built
/// against an older `clusterd::worker` could not be understood: new
/// messages are appended to the enums, so running workers survive an
/// upgrade of clusterd.
pub const IPC_VERSION: u16 = 2;

/// The control protocol's version (clusterctl and clusterd ship together).
/// 3: restart of one worker, bake and rollback outcomes, phase in status.
/// 4: `Upgrade`; the image's uptime and the upgrades so far in status.
pub const CONTROL_VERSION: u16 = 4;

/// A message of one of the two protocols; its type names its version.
pub trait Message: Serialize + DeserializeOwned {
    const VERSION: u16;
}

impl Message for ToWorker {
    const VERSION: u16 = IPC_VERSION;
}
impl Message for FromWorker {
    const VERSION: u16 = IPC_VERSION;
}
impl Message for Request {
    const VERSION: u16 = CONTROL_VERSION;
}
impl Message for Response {
    const VERSION: u16 = CONTROL_VERSION;
}

/// Largest IPC record, in either direction.
pub const MAX_IPC_RECORD: usize = 16 * 1024;

/// Largest control request a client may send to clusterd.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Largest control response clusterd sends (a status of many workers).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Maximum number of listeners (and so of fds in one `SCM_RIGHTS` message).
pub const MAX_LISTENERS: usize = 64;

// ---------------------------------------------------------------------------
// clusterd ↔ worker

/// A message from clusterd to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first record on the channel; the listener fds are attached, in the
    /// order of `listeners`.
    Hello(Hello),
    /// Stop accepting, finish in-flight work, report [`FromWorker::Drained`]
    /// and exit. clusterd sends SIGKILL after `timeout_ms`.
    Drain { timeout_ms: u64 },
    /// `dispatch = clusterd`: a connection clusterd accepted, attached,
    /// bytes untouched. Sent on the worker's inbox for that listener (see
    /// [`FromWorker::TakesConnections`]), never on the IPC channel itself.
    /// Appended: older workers never announce an inbox, so never get one.
    Connection,
}

/// The environment variable clusterd sets to `clusterd` for the workers of
/// a `dispatch = clusterd` pool: a worker library that can take connections
/// from clusterd announces its inboxes ([`FromWorker::TakesConnections`])
/// and no longer accepts from the listeners itself.
pub const ENV_DISPATCH: &str = "CLUSTERD_DISPATCH";

/// What a worker learns when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The worker's slot number, 1..=N; stable across respawns and restarts.
    pub worker_id: u32,
    /// The generation (incremented by every rolling restart).
    pub generation: u64,
    /// One entry per attached listener fd, in order.
    pub listeners: Vec<ListenerInfo>,
    /// The worker's cell in the [`crate::scoreboard`], whose memfd is
    /// attached after the listeners; `None` when there is no board.
    pub scoreboard: Option<u32>,
}

/// A named listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// The name from the config (`listen = NAME=ADDRESS`), `http` by default.
    pub name: String,
    /// The bound address, e.g. `127.0.0.1:3000`, `[::1]:80` or `unix:/run/app.sock`.
    pub address: String,
}

/// A message from a worker to clusterd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker is serving; it may now replace another.
    Ready,
    /// The worker has finished draining and is about to exit.
    Drained,
    /// Optional load report (at most about once a second).
    Stats { requests: u64, active: u32 },
    /// [`FromWorker::Stats`] with the number of requests that failed
    /// (answered with a server error), sent instead of it once the worker
    /// has counted a failure: a baking replacement that fails far more than
    /// the workers it replaces fails the restart. Appended, so a worker
    /// that never counts a failure speaks to any clusterd of this version.
    StatsWithFailures {
        requests: u64,
        active: u32,
        failed: u64,
    },
    /// The worker's event loop is alive (with `watchdog`, whose period
    /// `WATCHDOG_USEC` in the environment gives; send at least twice per
    /// period).
    Heartbeat,
    /// `dispatch = clusterd` (the worker saw [`ENV_DISPATCH`]): the worker
    /// takes connections clusterd accepted. One unix `SOCK_SEQPACKET`
    /// socket per listener is attached, in the order of `Hello`'s
    /// listeners: the worker keeps the other end of each pair, its inbox,
    /// where clusterd sends [`ToWorker::Connection`] records. Sent right
    /// after `Hello` (before `Ready`); a worker that never sends it (an
    /// older library) accepts from the shared listeners as before.
    TakesConnections { listeners: u32 },
}

// ---------------------------------------------------------------------------
// clusterctl ↔ clusterd

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Status,
    /// Rolling restart, re-reading the config. The reply is a stream of
    /// [`Response::Progress`] and one final [`Response::Restarted`].
    Restart,
    Scale(Scale),
    /// Graceful stop: drain every worker, then exit 0.
    Stop,
    /// Replace one worker (by id) with a new instance of its generation,
    /// READY-gated and baked; answered like [`Request::Restart`].
    RestartWorker(u32),
    /// The last `lines` log lines (of worker `worker` only, if given), as
    /// [`Response::Logs`]; with `follow`, then every new line as it comes,
    /// until clusterd exits or the client reads too slowly.
    Logs {
        lines: u32,
        follow: bool,
        worker: Option<u32>,
    },
    /// Re-execute clusterd in place from `binary` (default: the file it was
    /// started from), keeping every worker. Answered with
    /// [`Response::Upgrading`] just before the exec, or an error if the
    /// upgrade is refused; the new image then answers on the same socket
    /// (its status counts one more upgrade).
    Upgrade {
        binary: Option<String>,
    },
}

/// A change of the worker count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scale {
    To(u32),
    Up(u32),
    Down(u32),
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Status(Box<Status>),
    /// One worker of a rolling restart was replaced.
    Progress(Progress),
    /// The final result of a rolling restart.
    Restarted(RestartOutcome),
    /// The worker count was changed from `from` to `to`.
    Scaled {
        from: u32,
        to: u32,
    },
    /// A graceful stop has begun.
    Stopping,
    /// The request was refused or failed.
    Error(String),
    /// A replacement is READY and must stay up for its bake before the
    /// restart goes on (new variants go last: the others keep their tags).
    Baking(Baking),
    /// Log lines, oldest first.
    Logs(Vec<LogEntry>),
    /// The new binary accepted the hand-off: clusterd re-executes itself.
    Upgrading(Upgrading),
}

/// An upgrade about to happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrading {
    /// The running version.
    pub from: String,
    /// The version the new binary reported.
    pub to: String,
    /// The file executed.
    pub binary: String,
    /// [`Status::upgrades`] before this one.
    pub upgrades: u32,
}

/// One log line: one of clusterd's events, or a line a worker wrote
/// (`worker.output`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `info`, `warn` or `error`.
    pub level: String,
    pub event: String,
    pub fields: Vec<(String, String)>,
}

impl LogEntry {
    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The worker id the line is about (its `id` field), if any.
    pub fn worker(&self) -> Option<u32> {
        self.get("id")?.parse().ok()
    }
}

/// The daemon's state, as `clusterctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub config: String,
    pub protocol: String,
    pub listeners: Vec<ListenerInfo>,
    pub desired: u32,
    pub ready: u32,
    pub generation: u64,
    /// e.g. `restart 3/8`, `stopping`; `None` when idle.
    pub operation: Option<String>,
    /// `running`, `restarting`, `baking`, `rolling_back` or `stopping`.
    pub phase: String,
    /// How the last rolling restart (or rollback) ended.
    pub last_restart: Option<LastRestart>,
    /// A worker id crash-looping (its crash streak reached `crash_loop`),
    /// e.g. `worker 2: 10 crashes in a row, the last exit 1`.
    pub crash_loop: Option<String>,
    pub workers: Vec<WorkerStatus>,
    /// How long this image of clusterd has run: `uptime_ms` counts from
    /// clusterd's start, this one from its last in-place upgrade.
    pub image_uptime_ms: u64,
    /// In-place upgrades (`clusterctl upgrade`) since clusterd started.
    pub upgrades: u32,
}

/// The result of the last rolling restart, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRestart {
    /// `done`, `aborted`, `rolled_back` or `rollback_failed`.
    pub outcome: String,
    /// The generation serving after it.
    pub generation: u64,
    pub reason: Option<String>,
    /// How long ago it ended.
    pub ago_ms: u64,
}

/// One worker process (or a slot waiting in backoff, with `pid: None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: Option<u32>,
    pub generation: u64,
    /// `starting`, `ready`, `draining`, `backoff`, or `hung` (missed its
    /// watchdog; being replaced).
    pub state: String,
    pub uptime_ms: u64,
    pub restarts: u32,
    /// e.g. `exit 1`, `signal 9 (SIGKILL)`.
    pub last_exit: Option<String>,
    pub rss_bytes: Option<u64>,
    pub requests: Option<u64>,
    pub active: Option<u32>,
    /// Free text a worker reported (sd_notify `STATUS=`).
    pub note: Option<String>,
    /// The last line the worker that crashed wrote to its stderr, with
    /// `last_exit` (its last words: why it crashed, often).
    pub last_words: Option<String>,
}

/// One step of a rolling restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub worker_id: u32,
    /// 1-based position in this restart.
    pub done: u32,
    pub total: u32,
    pub old_pid: Option<u32>,
    pub new_pid: u32,
    /// Time from spawning the replacement to it being READY.
    pub elapsed_ms: u64,
}

/// A replacement that must stay up for its bake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baking {
    pub worker_id: u32,
    pub pid: u32,
    pub generation: u64,
    /// `canary`, `last` or `worker`.
    pub role: String,
    pub bake_ms: u64,
}

/// How a rolling restart ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartOutcome {
    Done {
        generation: u64,
        replaced: u32,
        elapsed_ms: u64,
    },
    Aborted {
        reason: String,
        replaced: u32,
        total: u32,
    },
    /// The new generation failed after it had served: every slot it took
    /// went back to `generation` (all of them when `complete`).
    RolledBack {
        reason: String,
        /// The generation serving again.
        generation: u64,
        /// The generation that failed.
        failed_generation: u64,
        /// Workers the failed generation had replaced.
        replaced: u32,
        /// Workers replaced back, READY-gated.
        restored: u32,
        total: u32,
        complete: bool,
    },
}

// ---------------------------------------------------------------------------
// Encoding

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The record is larger than the limit.
    TooLarge { len: usize, limit: usize },
    /// The peer speaks another protocol version.
    Version { theirs: u64, ours: u16 },
    /// The bytes are not a valid message.
    Malformed(String),
    /// A valid message followed by extra bytes.
    Trailing { extra: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge { len, limit } => {
                write!(f, "message of {len} bytes exceeds the limit of {limit}")
            }
            Error::Version { theirs, ours } => write!(
                f,
                "protocol version mismatch: peer speaks version {theirs}, this build speaks version {ours}"
            ),
            Error::Malformed(why) => write!(f, "malformed message: {why}"),
            Error::Trailing { extra } => write!(f, "malformed message: {extra} trailing bytes"),
        }
    }
}

impl std::error::Error for Error {}

fn config() -> impl bincode::config::Config {
    // The explicit limit also bounds every allocation bincode makes while
    // decoding (a hostile length field cannot reserve gigabytes).
    bincode::config::standard().with_limit::<{ MAX_RESPONSE }>()
}

/// Encodes `msg` as a record: its protocol's version, then the message.
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    let mut out = bincode::serde::encode_to_vec(T::VERSION, config()).expect("encode version");
    out.extend(
        bincode::serde::encode_to_vec(msg, config())
            .expect("encoding a message to memory cannot fail"),
    );
    out
}

/// Decodes one record of at most `limit` bytes: checks the version, decodes the
/// message and requires that every byte was consumed.
pub fn decode<T: Message>(bytes: &[u8], limit: usize) -> Result<T, Error> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (theirs, used): (u64, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| Error::Malformed(format!("no version header ({e})")))?;
    if theirs != u64::from(T::VERSION) {
        return Err(Error::Version {
            theirs,
            ours: T::VERSION,
        });
    }
    let rest = &bytes[used..];
    let (msg, used): (T, usize) = bincode::serde::decode_from_slice(rest, config())
        .map_err(|e| Error::Malformed(e.to_string()))?;
    if used != rest.len() {
        return Err(Error::Trailing {
            extra: rest.len() - used,
        });
    }
    Ok(msg)
}

/// Size of the length prefix of a control frame.
pub const FRAME_HEADER: usize = 4;

/// Encodes `msg` as a control frame: a big-endian `u32` length, then the record.
pub fn frame<T: Message>(msg: &T) -> Vec<u8> {
    let record = encode(msg);
    let mut out = Vec::with_capacity(FRAME_HEADER + record.len());
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(&record);
    out
}

/// Reads the length from a frame header, refusing lengths above `limit` before
/// anything is allocated.
pub fn frame_len(header: [u8; FRAME_HEADER], limit: usize) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(Error::TooLarge { len, limit });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ToWorker {
        ToWorker::Hello(Hello {
            worker_id: 3,
            generation: 7,
            listeners: vec![ListenerInfo {
                name: "http".into(),
                address: "127.0.0.1:3000".into(),
            }],
            scoreboard: Some(1),
        })
    }

    #[test]
    fn ipc_round_trip() {
        for msg in [
            hello(),
            ToWorker::Drain { timeout_ms: 30_000 },
            ToWorker::Connection,
        ] {
            assert_eq!(
                decode::<ToWorker>(&encode(&msg), MAX_IPC_RECORD).unwrap(),
                msg
            );
        }
        for msg in [
            FromWorker::Ready,
            FromWorker::Drained,
            FromWorker::Stats {
                requests: 9,
                active: 2,
            },
            FromWorker::StatsWithFailures {
                requests: 9,
                active: 2,
                failed: 1,
            },
            FromWorker::TakesConnections { listeners: 2 },
        ] {
            assert_eq!(
                decode::<FromWorker>(&encode(&msg), MAX_IPC_RECORD).unwrap(),
                msg
            );
        }
    }

    #[test]
    fn control_round_trip() {
        for req in [
            Request::Status,
            Request::Restart,
            Request::Stop,
            Request::Scale(Scale::Up(2)),
            Request::RestartWorker(3),
        ] {
            let f = frame(&req);
            let len = frame_len(f[..4].try_into().unwrap(), MAX_REQUEST).unwrap();
            assert_eq!(len, f.len() - 4);
            assert_eq!(decode::<Request>(&f[4..], MAX_REQUEST).unwrap(), req);
        }
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut bytes = bincode::serde::encode_to_vec(9u16, config()).unwrap();
        bytes.extend(bincode::serde::encode_to_vec(FromWorker::Ready, config()).unwrap());
        let err = decode::<FromWorker>(&bytes, MAX_IPC_RECORD).unwrap_err();
        assert_eq!(
            err,
            Error::Version {
                theirs: 9,
                ours: IPC_VERSION
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("version 9") && text.contains(&format!("version {IPC_VERSION}")),
            "{text}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&FromWorker::Ready);
        bytes.push(0);
        assert_eq!(
            decode::<FromWorker>(&bytes, MAX_IPC_RECORD),
            Err(Error::Trailing { extra: 1 })
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[1],
            &[1, 200],
            &[0xff; 40],
            &[1, 0, 0xfc, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(
                decode::<ToWorker>(bytes, MAX_IPC_RECORD).is_err(),
                "{bytes:?}"
            );
            assert!(decode::<Request>(bytes, MAX_REQUEST).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes(), MAX_REQUEST),
            Err(Error::TooLarge { .. })
        ));
        let big = vec![1u8; MAX_IPC_RECORD + 1];
        assert!(matches!(
            decode::<FromWorker>(&big, MAX_IPC_RECORD),
            Err(Error::TooLarge { .. })
        ));
        // A string claiming to be 2^60 bytes long inside a small record.
        let mut bytes = encode(&ToWorker::Drain { timeout_ms: 0 });
        bytes.truncate(1);
        bytes.push(0); // ToWorker::Hello
        bytes.extend([3, 7, 1, 0xfd]);
        bytes.extend((1u64 << 60).to_le_bytes());
        assert!(decode::<ToWorker>(&bytes, MAX_IPC_RECORD).is_err());
    }
}
