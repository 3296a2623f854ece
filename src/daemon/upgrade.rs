//! `clusterctl upgrade` and SIGUSR2: clusterd re-executes itself in place.
//!
//! The process stays the same (same pid: still PID 1 of a container, still
//! the parent of every worker); only its image changes. The workers notice
//! nothing: their IPC channels, readiness pipes, Node channels, output
//! pipes, scoreboard cells and cgroups all stay open across the exec, and
//! the new image goes on reading them where the old one stopped.
//!
//! # Safe by construction
//!
//! 1. Refused while a rolling restart, a restart of one worker, a rollback,
//!    a lame-duck delay or a stop runs (`upgrade.refused`, with the reason).
//! 2. The new binary is run first as `BINARY --upgrade-formats`, which
//!    prints its version and the hand-off formats it takes
//!    ([`formats_text`]). A file that is missing, not executable, fails,
//!    does not answer within [`CHECK_TIMEOUT`] or does not take this
//!    image's [`FORMAT`] is refused; the old image carries on.
//! 3. Then the main loop stops: the catchable signals are blocked (a signal
//!    from now on stays pending, and the new image handles it), the events
//!    already queued are handled (a HUP or TERM among them is raised again,
//!    so it stays pending too; a control request other than `status` or
//!    `logs` is refused, naming the upgrade), and the state goes into a
//!    memfd ([`HandOff`], bincode, versioned).
//! 4. Every fd to keep loses `FD_CLOEXEC`, and clusterd calls `execve` with
//!    its own argument list and `CLUSTERD_HANDOFF_FD` naming the memfd. If
//!    the exec fails, `FD_CLOEXEC` is put back, the signals are unblocked
//!    and the old image carries on (`upgrade.failed`).
//! 5. The new image ([`take_over`]) sees `CLUSTERD_HANDOFF_FD` before it
//!    reads its arguments, decodes the state, takes ownership of the fds,
//!    installs its signal handlers, unblocks the signals and enters the
//!    same main loop (`upgrade.done`, with both versions).
//!
//! Between the exec and step 5 nothing reads the workers' channels: their
//! records wait in the socket buffers. If the new image dies in that window
//! (or fails to decode the state, and exits 1), every fd closes with the
//! process: each worker sees its IPC channel close, drains and exits
//! (DESIGN.md guarantee 6), and once they are gone nothing holds the port.
//!
//! # The hand-off
//!
//! [`HandOff`] is one struct per concern (image, daemon, sockets, tree,
//! workers, supervisor, log); an fd travels as an index into
//! [`HandOff::fds`], the fd numbers kept across the exec. A new concern (a
//! per-slot listener, say) is a new field holding [`FdRef`]s; any change of
//! the layout is a new [`FORMAT`] (and [`ACCEPTS`] keeps the formats a new
//! image can still read).

use std::ffi::{CString, OsString};
use std::io::{self, Read as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use smol::channel::{Receiver, Sender};
use smol::{Async, LocalExecutor};

use super::{
    Daemon, Event, Generation, Proc, Scoreboard, control, listen, logcap, logsink, metrics, node,
    notify, ready_pipe, spawn, tree,
};
use crate::config::{Config, Protocol};
use crate::lifecycle::snapshot::{Snapshot, When};
use crate::lifecycle::{InstanceId, Supervisor};
use crate::proto::{self, Response};

/// The hand-off format this image writes.
pub const FORMAT: u32 = 1;

/// The hand-off formats this image can take over from.
pub const ACCEPTS: [u32; 1] = [1];

/// The environment variable naming the memfd that holds the hand-off.
pub const ENV_FD: &str = "CLUSTERD_HANDOFF_FD";

/// The flag that prints the version and the formats accepted.
pub const FORMATS_FLAG: &str = "--upgrade-formats";

/// How long the new binary has to answer `--upgrade-formats`.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the memfd, before the format number.
const MAGIC: &[u8; 8] = b"clusterd";

/// Largest hand-off read (the log ring is most of it).
const MAX_HANDOFF: u64 = 1 << 30;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The signals clusterd handles; blocked around the exec.
pub(super) const SIGNALS: [async_signal::Signal; 9] = {
    use async_signal::Signal as S;
    [
        S::Term,
        S::Int,
        S::Quit,
        S::Hup,
        S::Ttin,
        S::Ttou,
        S::Child,
        S::Usr1,
        S::Usr2,
    ]
};

const SIGNAL_NUMBERS: [i32; 9] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// What `clusterd --upgrade-formats` prints: `clusterd VERSION` and
/// `handoff FORMAT...`.
pub fn formats_text() -> String {
    let list: Vec<String> = ACCEPTS.iter().map(u32::to_string).collect();
    let mut text = format!("clusterd {VERSION}\nhandoff {}", list.join(" "));
    if let Some(layout) = layout() {
        text.push_str(&format!("\nlayout {FORMAT} {layout:016x}"));
    }
    text
}

/// A fingerprint of [`FORMAT`]'s layout in this build: the hash of a sample
/// hand-off with every part filled in. Two builds that write the same
/// format number with different layouts (a field added without a new
/// [`FORMAT`]) print different fingerprints, and the upgrade is refused.
pub fn layout() -> Option<u64> {
    // FNV-1a: stable across builds and platforms.
    let hash = encode(&sample()?)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    Some(hash)
}

/// A hand-off with every part filled in (fds and times made up).
fn sample() -> Option<HandOff> {
    let config = crate::config::parse_str(
        "exec = /bin/true a\nlisten = 127.0.0.1:1\nenv = A=1\nwatchdog = 1s\nmax_requests = 9\n",
        Path::new("/layout.conf"),
    )
    .ok()?;
    let t0 = Instant::now();
    let mut sup = Supervisor::new(super::timing(&config), 2, 1);
    sup.start(t0);
    for a in sup.take_actions() {
        if let crate::lifecycle::Action::Spawn { instance, .. } = a {
            sup.spawned(instance, 7);
            sup.ready_reported(t0, instance);
        }
    }
    sup.take_actions();
    let when = When::In(Duration::from_millis(1));
    Some(HandOff {
        from: "0".into(),
        image: ImageState {
            binary: "/b".into(),
            argv: vec!["a".into()],
            upgrades: 1,
            started: when,
            asked_ns: 1,
        },
        daemon: DaemonState {
            config: config.clone(),
            generations: vec![(1, config)],
            next_generation: 2,
            counters: metrics::Counters::default(),
            last_words: vec![(1, "w".into())],
            node_adapter: Some(AdapterState {
                dir: "/d".into(),
                dir_fd: 0,
                shared: true,
            }),
        },
        sockets: Sockets {
            listeners: vec![ListenerState {
                name: "n".into(),
                address: "a".into(),
                fd: 0,
                unix_path: Some("/u".into()),
            }],
            control_path: "/c".into(),
            control: 0,
            notify_name: "@n".into(),
            notify: 0,
            metrics: Some(0),
            scoreboard: Some(ScoreboardState {
                fd: 0,
                free: vec![1],
            }),
        },
        tree: TreeState {
            parent: Some(("/p".into(), 1)),
            emptying: vec!["/e".into()],
        },
        workers: vec![WorkerState {
            instance: InstanceId(1),
            pid: 7,
            protocol: Protocol::Clusterd,
            ipc: Some(0),
            ready_pipe: Some(0),
            node: Some(0),
            output: Some([0, 0]),
            stats: Some((1, 1)),
            note: Some("n".into()),
            cell: Some(0),
            cgroup: Some("/g".into()),
        }],
        supervisor: sup.snapshot(t0),
        dispatch: Some(super::dispatch::Handed {
            workers: vec![super::dispatch::HandedWorker {
                id: InstanceId(1),
                slot: 1,
                cell: Some(0),
                inboxes: Some(vec![0]),
                node: false,
                reported: 1,
                sent_since_report: 1,
                warned: false,
            }],
            inflight: vec![(0, 0)],
            turn: crate::dispatch::Turn::default(),
        }),
        reuseport: Some(ReuseportState {
            lines: vec![("n".into(), ([127, 0, 0, 1], 1).into())],
            backlog: 1,
            slots: vec![(
                1,
                vec![ListenerState {
                    name: "n".into(),
                    address: "a".into(),
                    fd: 0,
                    unix_path: None,
                }],
            )],
        }),
        log: (vec![(Some(1), "l".into())], vec![(7, "w".into())]),
        fds: vec![3],
    })
}

/// What `--upgrade-formats` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formats {
    pub version: String,
    pub formats: Vec<u32>,
    /// The layout fingerprint of each format that has one.
    pub layouts: Vec<(u32, u64)>,
}

/// The version, the formats and their layouts in what `--upgrade-formats`
/// printed.
pub fn parse_formats(text: &str) -> Result<Formats, String> {
    let mut version = None;
    let mut formats = None;
    let mut layouts = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("layout") => {
                let format = words.next().and_then(|w| w.parse().ok());
                let hash = words.next().and_then(|w| u64::from_str_radix(w, 16).ok());
                if let (Some(f), Some(h)) = (format, hash) {
                    layouts.push((f, h));
                }
            }
            Some("clusterd") => version = words.next().map(str::to_string),
            Some("handoff") => {
                let list: Result<Vec<u32>, _> = words.map(str::parse).collect();
                formats = Some(list.map_err(|_| format!("a bad format list: {line:?}"))?);
            }
            _ => {}
        }
    }
    match (version, formats) {
        (Some(version), Some(formats)) => Ok(Formats {
            version,
            formats,
            layouts,
        }),
        _ => Err(format!(
            "its answer to {FORMATS_FLAG} is not a clusterd's: {:?}",
            text.chars().take(200).collect::<String>()
        )),
    }
}

/// This image of clusterd: when it started, where it came from, and the
/// upgrade it is about to make.
#[derive(Debug)]
pub struct Image {
    /// When this image began (its `image_uptime`).
    pub started: Instant,
    /// The file clusterd was first started from: the default binary of an
    /// upgrade (a package manager replaces that file).
    pub binary: PathBuf,
    /// clusterd's own arguments, given again to the new image.
    pub argv: Vec<OsString>,
    /// Upgrades since clusterd started.
    pub upgrades: u32,
    /// Set in an image that took over: the version it took over from, and
    /// how long ago the upgrade was asked for.
    pub resumed: Option<(String, Duration)>,
    /// The control socket and the metrics listener, owned by the main loop's
    /// tasks; their numbers, to hand over.
    pub control_fd: RawFd,
    pub metrics_fd: Option<RawFd>,
    /// An upgrade accepted, carried out once the event at hand is handled.
    pub pending: Option<Pending>,
}

impl Image {
    /// The first image: started from the command line.
    pub fn first() -> Image {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let binary = std::env::current_exe().unwrap_or_else(|_| {
            argv.first()
                .map(PathBuf::from)
                .unwrap_or_else(|| "clusterd".into())
        });
        Image {
            started: Instant::now(),
            binary,
            argv,
            upgrades: 0,
            resumed: None,
            control_fd: -1,
            metrics_fd: None,
            pending: None,
        }
    }
}

/// An upgrade about to happen.
#[derive(Debug)]
pub struct Pending {
    binary: PathBuf,
    to: String,
    asked: Instant,
    reply: Option<Sender<Response>>,
}

// ---------------------------------------------------------------------------
// The hand-off format

/// Longest wait, before the exec, for a message partly written to a node
/// worker's channel (`dispatch = clusterd`) to be finished.
const MID_MESSAGE_WAIT: Duration = Duration::from_secs(2);

/// An fd kept across the exec: an index into [`HandOff::fds`].
pub type FdRef = u32;

/// Everything the new image needs, as data.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandOff {
    /// The version of the image that wrote it.
    pub from: String,
    pub image: ImageState,
    pub daemon: DaemonState,
    pub sockets: Sockets,
    pub tree: TreeState,
    pub workers: Vec<WorkerState>,
    pub supervisor: Snapshot,
    /// `dispatch = clusterd`: inboxes, loads and connections not yet passed.
    pub dispatch: Option<super::dispatch::Handed>,
    /// `dispatch = reuseport`: each slot's sockets.
    pub reuseport: Option<ReuseportState>,
    /// The log's recent lines and the workers' last stderr lines.
    pub log: logsink::Kept,
    /// The fd numbers kept open across the exec.
    pub fds: Vec<RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ImageState {
    pub binary: PathBuf,
    pub argv: Vec<OsString>,
    pub upgrades: u32,
    /// When clusterd started (its uptime goes on).
    pub started: When,
    /// When the upgrade was asked for, on `CLOCK_MONOTONIC` (the same
    /// clock in both images: the time the upgrade took, exec included).
    pub asked_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub config: Config,
    /// The config of every generation still in use.
    pub generations: Vec<(u64, Config)>,
    pub next_generation: u64,
    pub counters: metrics::Counters,
    pub last_words: Vec<(u32, String)>,
    pub node_adapter: Option<AdapterState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdapterState {
    pub dir: PathBuf,
    pub dir_fd: FdRef,
    pub shared: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Sockets {
    pub listeners: Vec<ListenerState>,
    pub control_path: PathBuf,
    pub control: FdRef,
    pub notify_name: String,
    pub notify: FdRef,
    pub metrics: Option<FdRef>,
    pub scoreboard: Option<ScoreboardState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerState {
    pub name: String,
    pub address: String,
    pub fd: FdRef,
    pub unix_path: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReuseportState {
    pub lines: Vec<(String, std::net::SocketAddr)>,
    pub backlog: u32,
    pub slots: Vec<(u32, Vec<ListenerState>)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreboardState {
    pub fd: FdRef,
    /// The free cells (the others belong to workers).
    pub free: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TreeState {
    /// The workers' parent cgroup and the number of its next group.
    pub parent: Option<(PathBuf, u64)>,
    /// Cgroups of reaped workers, not yet empty.
    pub emptying: Vec<PathBuf>,
}

/// One worker process (the supervisor's snapshot has the rest).
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerState {
    pub instance: InstanceId,
    pub pid: u32,
    pub protocol: Protocol,
    pub ipc: Option<FdRef>,
    pub ready_pipe: Option<FdRef>,
    pub node: Option<FdRef>,
    /// stdout and stderr, captured.
    pub output: Option<[FdRef; 2]>,
    pub stats: Option<(u64, u32)>,
    pub note: Option<String>,
    pub cell: Option<u32>,
    pub cgroup: Option<PathBuf>,
}

/// The fds to keep, collected while the state is written.
#[derive(Debug, Default)]
struct Fds(Vec<RawFd>);

impl Fds {
    fn add(&mut self, fd: BorrowedFd<'_>) -> FdRef {
        self.0.push(fd.as_raw_fd());
        (self.0.len() - 1) as FdRef
    }
}

/// The memfd's content: [`MAGIC`], [`FORMAT`] (little-endian u32), then
/// the state.
pub fn encode(handoff: &HandOff) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(FORMAT.to_le_bytes());
    out.extend(
        bincode::serde::encode_to_vec(handoff, bincode::config::standard())
            .expect("encoding to memory cannot fail"),
    );
    out
}

/// The state in `bytes`, if this image takes its format.
pub fn decode(bytes: &[u8]) -> Result<HandOff, String> {
    let rest = bytes.strip_prefix(MAGIC).ok_or("not a clusterd hand-off")?;
    let (format, rest) = rest.split_at_checked(4).ok_or("truncated")?;
    let format = u32::from_le_bytes(format.try_into().expect("4 bytes"));
    if !ACCEPTS.contains(&format) {
        return Err(format!(
            "hand-off format {format}; this clusterd {VERSION} takes {ACCEPTS:?}"
        ));
    }
    let (handoff, used): (HandOff, usize) =
        bincode::serde::decode_from_slice(rest, bincode::config::standard())
            .map_err(|e| format!("malformed hand-off: {e}"))?;
    if used != rest.len() {
        return Err(format!("{} bytes after the hand-off", rest.len() - used));
    }
    Ok(handoff)
}

// ---------------------------------------------------------------------------
// Signals

fn sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set it is given; sigaddset adds
    // valid signal numbers to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in SIGNAL_NUMBERS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks (`true`) or unblocks clusterd's signals in the calling thread.
fn mask(block: bool) {
    let set = sigset();
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: a valid set and a null old-set pointer.
    unsafe {
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Installs clusterd's signal handlers so that only the main thread takes
/// its signals: they are blocked while the reactor's thread starts (it
/// inherits the mask), then unblocked here. Blocking them here around the
/// exec then keeps every one pending for the new image. In an image that
/// took over, the signals that arrived meanwhile are delivered now.
pub(super) fn signals() -> io::Result<async_signal::Signals> {
    mask(true);
    let signals = async_signal::Signals::new(SIGNALS);
    // The reactor's thread starts with the first registration; make sure
    // it has (a timer is registered when polled).
    let _ = smol::block_on(smol::future::poll_once(smol::Timer::after(
        Duration::from_secs(3600),
    )));
    mask(false);
    signals
}

// ---------------------------------------------------------------------------
// The old image

impl Daemon {
    /// `clusterctl upgrade [--binary PATH]` (`reply`) or SIGUSR2: checks,
    /// then marks the upgrade pending for the main loop.
    pub(super) fn upgrade(&mut self, binary: Option<String>, reply: Option<Sender<Response>>) {
        let asked = Instant::now();
        let binary = binary.map_or_else(|| self.image.binary.clone(), PathBuf::from);
        let refusal = if self.image.pending.is_some() {
            Some("an upgrade is already in progress".to_string())
        } else if self.sup.is_stopping() {
            Some("clusterd is stopping".to_string())
        } else {
            self.sup.busy_with_rollout()
        };
        let checked = match refusal {
            Some(why) => Err(why),
            None => check(&binary),
        };
        match checked {
            Err(why) => {
                log!(
                    warn,
                    "upgrade.refused",
                    binary = binary.display(),
                    reason = why
                );
                self.counters.upgrades_refused += 1;
                if let Some(r) = reply {
                    let _ = r.try_send(Response::Error(format!("upgrade refused: {why}")));
                }
            }
            Ok(to) => {
                log!(
                    info,
                    "upgrade.begin",
                    from = VERSION,
                    to = to,
                    binary = binary.display(),
                    workers = self.procs.len()
                );
                if let Some(r) = &reply {
                    let _ = r.try_send(Response::Upgrading(proto::Upgrading {
                        from: VERSION.into(),
                        to: to.clone(),
                        binary: binary.display().to_string(),
                        upgrades: self.image.upgrades,
                    }));
                }
                self.image.pending = Some(Pending {
                    binary,
                    to,
                    asked,
                    reply,
                });
            }
        }
    }

    /// First thing in an image that took over: says so, and reaps what
    /// exited during the exec.
    pub(super) fn resumed(&mut self) {
        let Some((from, took)) = self.image.resumed.take() else {
            return;
        };
        log!(
            info,
            "upgrade.done",
            from = from,
            to = VERSION,
            pid = rustix::process::getpid().as_raw_nonzero(),
            workers = self.procs.len(),
            upgrades = self.image.upgrades,
            took_ms = took.as_millis()
        );
        self.reap();
    }

    /// An event that arrives while the upgrade is under way (after the
    /// loop has stopped taking new work).
    fn handle_upgrading(&mut self, event: Event) {
        use async_signal::Signal as S;
        match event {
            Event::Signal(S::Child) => self.reap(),
            // Pending again (blocked): the new image handles it.
            Event::Signal(sig) => {
                let _ = rustix::process::kill_process(rustix::process::getpid(), rustix_sig(sig));
            }
            Event::Control(req) => match req.request {
                proto::Request::Status | proto::Request::Logs { .. } => self.control(req),
                other => {
                    let what = match other {
                        proto::Request::Restart | proto::Request::RestartWorker(_) => "restart",
                        proto::Request::Scale(_) => "scale",
                        proto::Request::Stop => "stop",
                        _ => "request",
                    };
                    log!(warn, "upgrade.busy", request = what);
                    let _ = req.reply.try_send(Response::Error(format!(
                        "{what} refused: clusterd is upgrading itself; ask again once the new image answers (a moment)"
                    )));
                }
            },
            other => self.handle(other),
        }
    }

    /// The state to hand over, and the fds it refers to.
    fn hand_off(&self, now: Instant, asked: Instant) -> (HandOff, Fds) {
        let mut fds = Fds::default();
        let listeners = self
            .listeners
            .iter()
            .map(|l| ListenerState {
                name: l.name.clone(),
                address: l.address.clone(),
                fd: fds.add(l.fd.as_fd()),
                unix_path: l.unix_path().map(Path::to_path_buf),
            })
            .collect();
        // SAFETY: the control socket and the metrics listener are owned by
        // the main loop's tasks, which outlive this call.
        let control = fds.add(unsafe { BorrowedFd::borrow_raw(self.image.control_fd) });
        let metrics = self
            .image
            .metrics_fd
            // SAFETY: as above.
            .map(|fd| fds.add(unsafe { BorrowedFd::borrow_raw(fd) }));
        let sockets = Sockets {
            listeners,
            control_path: self.config.control_path(),
            control,
            notify_name: self.notify_name.clone(),
            notify: fds.add(self.notify.as_fd()),
            metrics,
            scoreboard: self.scoreboard.as_ref().map(|b| ScoreboardState {
                fd: fds.add(b.fd.as_fd()),
                free: b.cells.free().to_vec(),
            }),
        };
        let mut workers = Vec::new();
        for (&instance, p) in &self.procs {
            workers.push(WorkerState {
                instance,
                pid: p.pid,
                protocol: p.protocol,
                ipc: p.ipc.as_ref().map(|fd| fds.add(fd.get_ref().as_fd())),
                ready_pipe: p
                    .ready_pipe
                    .as_ref()
                    .map(|fd| fds.add(fd.get_ref().as_fd())),
                node: p.node.as_ref().map(|c| fds.add(c.as_fd())),
                output: p.output.as_ref().map(|o| {
                    let [out, err] = o.fds();
                    [fds.add(out), fds.add(err)]
                }),
                stats: p.stats,
                note: p.note.clone(),
                cell: p.cell,
                cgroup: p.tree.cgroup_path().map(Path::to_path_buf),
            });
        }
        let (parent, emptying) = self.tree.handed();
        let node_adapter = self.node_adapter.as_ref().map(|a| {
            let (dir, dir_fd, shared) = a.handed();
            AdapterState {
                dir: dir.to_path_buf(),
                dir_fd: fds.add(dir_fd),
                shared,
            }
        });
        let handoff = HandOff {
            from: VERSION.into(),
            image: ImageState {
                binary: self.image.binary.clone(),
                argv: self.image.argv.clone(),
                upgrades: self.image.upgrades + 1,
                started: When::of(self.started, now),
                asked_ns: monotonic_ns()
                    .saturating_sub(now.duration_since(asked).as_nanos() as u64),
            },
            daemon: DaemonState {
                config: self.config.clone(),
                generations: self
                    .gens
                    .iter()
                    .map(|(g, generation)| (*g, generation.config.clone()))
                    .collect(),
                next_generation: self.next_generation,
                counters: self.counters.clone(),
                last_words: self
                    .last_words
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
                node_adapter,
            },
            sockets,
            tree: TreeState { parent, emptying },
            workers,
            supervisor: self.sup.snapshot(now),
            dispatch: self
                .dispatch
                .as_ref()
                .map(|d| d.hand_off(&mut |fd| fds.add(fd))),
            reuseport: self.reuseport.as_ref().map(|pool| {
                let (lines, backlog, slots) = pool.handed();
                ReuseportState {
                    lines: lines.to_vec(),
                    backlog,
                    slots: slots
                        .iter()
                        .map(|(&slot, sockets)| {
                            let sockets = sockets
                                .iter()
                                .map(|l| ListenerState {
                                    name: l.name.clone(),
                                    address: l.address.clone(),
                                    fd: fds.add(l.fd.as_fd()),
                                    unix_path: None,
                                })
                                .collect();
                            (slot, sockets)
                        })
                        .collect(),
                }
            }),
            log: logsink::kept(),
            fds: fds.0.clone(),
        };
        (handoff, fds)
    }
}

fn rustix_sig(sig: async_signal::Signal) -> rustix::process::Signal {
    use async_signal::Signal as S;
    use rustix::process::Signal as R;
    match sig {
        S::Term => R::TERM,
        S::Int => R::INT,
        S::Quit => R::QUIT,
        S::Hup => R::HUP,
        S::Ttin => R::TTIN,
        S::Ttou => R::TTOU,
        S::Usr1 => R::USR1,
        S::Usr2 => R::USR2,
        _ => R::CHILD,
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Runs `binary --upgrade-formats`: its version if it takes this image's
/// hand-off, else why not.
pub fn check(binary: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = binary.display();
    if !binary.is_absolute() {
        return Err(format!(
            "{shown}: the binary must be given as an absolute path"
        ));
    }
    let meta = std::fs::metadata(binary).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("{shown} does not exist"),
        _ => format!("{shown}: {e}"),
    })?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown} is not executable"));
    }
    let mut child = Command::new(binary)
        .arg(FORMATS_FLAG)
        .env_remove(ENV_FD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let end = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} {FORMATS_FLAG} did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {shown}: {e}")),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(s) = child.stdout.take() {
        let _ = s.take(64 * 1024).read_to_string(&mut out);
    }
    if let Some(s) = child.stderr.take() {
        let _ = s.take(64 * 1024).read_to_string(&mut err);
    }
    if !status.success() {
        let said = err.lines().next().unwrap_or("").trim();
        return Err(format!(
            "{shown} {FORMATS_FLAG} failed ({status}{}{said}): not a clusterd that can take over",
            if said.is_empty() { "" } else { ": " }
        ));
    }
    let Formats {
        version,
        formats,
        layouts,
    } = parse_formats(&out).map_err(|e| format!("{shown}: {e}"))?;
    if !formats.contains(&FORMAT) {
        return Err(format!(
            "{shown} (clusterd {version}) takes hand-off formats {formats:?}, this clusterd {VERSION} hands over format {FORMAT}"
        ));
    }
    let theirs = layouts.iter().find(|(f, _)| *f == FORMAT).map(|l| l.1);
    if let (Some(theirs), Some(ours)) = (theirs, layout()) {
        if theirs != ours {
            return Err(format!(
                "{shown} (clusterd {version}) reads hand-off format {FORMAT} with another layout \
                 ({theirs:016x}, this clusterd's is {ours:016x}): a build that changed the state \
                 without a new format number"
            ));
        }
    }
    Ok(version)
}

/// Carries out the pending upgrade: stops taking work, hands the state over
/// and execs. Returns only if the exec failed (logged; the old image goes
/// on as before).
pub(super) async fn perform(d: &mut Daemon, rx: &Receiver<Event>) {
    let Some(pending) = d.image.pending.take() else {
        return;
    };
    // From now on every signal stays pending, for the new image.
    mask(true);
    // Let the reply reach its client, and the signal task pass on what it
    // caught before the mask.
    for _ in 0..64 {
        smol::future::yield_now().await;
        if pending.reply.as_ref().is_none_or(Sender::is_empty) {
            break;
        }
    }
    drop(pending.reply);
    for _ in 0..4 {
        smol::future::yield_now().await;
    }
    for _ in 0..super::MAX_QUEUED_EVENTS {
        let Ok(event) = rx.try_recv() else { break };
        d.handle_upgrading(event);
        d.execute();
    }
    d.execute();
    // A connection partly written to a node worker's channel must be
    // finished first: the new image writes its own messages on it.
    let deadline = Instant::now() + MID_MESSAGE_WAIT;
    while d.dispatch.as_ref().is_some_and(|x| x.mid_message()) && Instant::now() < deadline {
        smol::Timer::after(Duration::from_millis(2)).await;
    }
    if d.dispatch.as_ref().is_some_and(|x| x.mid_message()) {
        mask(false);
        log!(
            error,
            "upgrade.failed",
            binary = pending.binary.display(),
            to = pending.to,
            error = "a node worker's channel is stuck in the middle of a message; ask again"
        );
        d.counters.upgrades_refused += 1;
        return;
    }
    let (handoff, fds) = d.hand_off(Instant::now(), pending.asked);
    let error = exec(&pending.binary, &d.image.argv, &encode(&handoff), &fds.0);
    mask(false);
    log!(
        error,
        "upgrade.failed",
        binary = pending.binary.display(),
        to = pending.to,
        error = error
    );
    d.counters.upgrades_refused += 1;
}

/// Writes `state` into a memfd, keeps `fds` open across the exec and runs
/// `binary` with `argv`. Returns only on failure (everything put back).
fn exec(binary: &Path, argv: &[OsString], state: &[u8], fds: &[RawFd]) -> io::Error {
    let memfd = match memfd(state) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let path = match CString::new(binary.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    let cstr = |s: &[u8]| CString::new(s).ok();
    let argv: Vec<CString> = argv.iter().filter_map(|a| cstr(a.as_bytes())).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != ENV_FD)
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend(v.as_bytes());
            cstr(&kv)
        })
        .collect();
    env.extend(cstr(format!("{ENV_FD}={}", memfd.as_raw_fd()).as_bytes()));
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    set_cloexec(fds, false);
    // SAFETY: NUL-terminated strings and NULL-terminated arrays of them,
    // alive for the call; execve returns only on failure.
    unsafe {
        libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
    }
    let error = io::Error::last_os_error();
    set_cloexec(fds, true);
    drop(memfd);
    io::Error::new(
        error.kind(),
        format!("cannot execute {}: {error}", binary.display()),
    )
}

/// A memfd (inherited across exec) holding `bytes`, read from the start.
fn memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("clusterd-handoff", rustix::fs::MemfdFlags::empty())?;
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rustix::io::write(&fd, rest)?;
        rest = &rest[n..];
    }
    rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0))?;
    Ok(fd)
}

fn set_cloexec(fds: &[RawFd], on: bool) {
    for &fd in fds {
        // SAFETY: the fds are owned by the daemon's state, alive here; only
        // their flags change.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = if on {
            rustix::io::FdFlags::CLOEXEC
        } else {
            rustix::io::FdFlags::empty()
        };
        let _ = rustix::io::fcntl_setfd(fd, flags);
    }
}

// ---------------------------------------------------------------------------
// The new image

/// If this process is an upgrade's new image (`CLUSTERD_HANDOFF_FD` set),
/// takes over and runs until clusterd stops: the exit code. `None`: a
/// normal start. Called first thing in `main`, while no other thread runs.
pub fn take_over() -> Option<i32> {
    let value = std::env::var_os(ENV_FD)?;
    // SAFETY: called first in main, before any other thread exists, so
    // nothing reads the environment meanwhile. Workers must not inherit it.
    unsafe { std::env::remove_var(ENV_FD) };
    let handoff = value
        .to_str()
        .and_then(|v| v.parse::<RawFd>().ok())
        .ok_or_else(|| format!("{ENV_FD}={value:?} is not an fd number"))
        .and_then(|fd| read_handoff(fd).map_err(|e| format!("{ENV_FD}={fd}: {e}")));
    match handoff {
        Ok(handoff) => Some(resume(handoff)),
        Err(e) => {
            // The fds close with this process: the workers drain and exit.
            eprintln!("clusterd: cannot take over from the previous image: {e}");
            Some(1)
        }
    }
}

fn read_handoff(fd: RawFd) -> Result<HandOff, String> {
    // SAFETY: the number the old image put in the environment, for this
    // image to own and close.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_getfd(&fd).map_err(|e| format!("not open: {e}"))?;
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_HANDOFF)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    decode(&bytes)
}

/// The fds handed over, owned; each taken once.
struct Taken(Vec<Option<OwnedFd>>);

impl Taken {
    fn new(raw: &[RawFd]) -> Taken {
        Taken(
            raw.iter()
                .map(|&fd| {
                    // SAFETY: the old image kept these open across the exec
                    // for this one; nothing else in this image owns them.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    // Marked again: later workers must not inherit them.
                    match rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC) {
                        Ok(()) => Some(owned),
                        Err(_) => {
                            // Not open after all: never close a number
                            // someone else may get.
                            std::mem::forget(owned);
                            None
                        }
                    }
                })
                .collect(),
        )
    }

    fn take(&mut self, r: FdRef) -> io::Result<OwnedFd> {
        self.0
            .get_mut(r as usize)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other(format!("fd #{r} of the hand-off is missing")))
    }
}

/// Runs clusterd from `handoff`.
fn resume(handoff: HandOff) -> i32 {
    let now = Instant::now();
    let mut fds = Taken::new(&handoff.fds);
    spawn::cloexec_inherited_fds();
    let signals = match signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clusterd: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let config = &handoff.daemon.config;
    if let Err(e) = logsink::configure(
        config.log_format,
        config.log_file.clone(),
        usize::try_from(config.log_buffer).unwrap_or(usize::MAX),
    ) {
        eprintln!("clusterd: log_file: {e}");
        return 1;
    }
    let from = handoff.from.clone();
    let ex = Rc::new(LocalExecutor::new());
    let (tx, rx) = smol::channel::unbounded();
    match restore(handoff, &mut fds, ex.clone(), tx.clone(), now, signals) {
        Ok((daemon, shell)) => super::serve(shell, daemon, ex, tx, rx),
        Err(e) => {
            log!(error, "upgrade.failed", from = from, error = e);
            eprintln!("clusterd: cannot take over from the previous image: {e}");
            1
        }
    }
}

/// The daemon `handoff` describes, its sockets taken over, every worker's
/// fds read again.
fn restore(
    handoff: HandOff,
    fds: &mut Taken,
    ex: Rc<LocalExecutor<'static>>,
    tx: Sender<Event>,
    now: Instant,
    signals: async_signal::Signals,
) -> io::Result<(Daemon, super::Shell)> {
    let HandOff {
        from,
        image,
        daemon: state,
        sockets,
        tree: tree_state,
        workers,
        supervisor,
        dispatch: dispatch_state,
        reuseport: reuseport_state,
        log,
        fds: _,
    } = handoff;
    logsink::take_over(log);
    let mut listeners = Vec::new();
    for l in sockets.listeners {
        let fd = fds.take(l.fd)?;
        listeners.push(listen::Listener::taken_over(
            l.name,
            l.address,
            fd,
            l.unix_path,
        ));
    }
    let control =
        control::ControlSocket::taken_over(&sockets.control_path, fds.take(sockets.control)?)?;
    let notify = Rc::new(notify::NotifySocket::taken_over(
        fds.take(sockets.notify)?,
        sockets.notify_name,
    )?);
    let metrics = match sockets.metrics {
        Some(r) => Some(Async::new(std::net::TcpListener::from(fds.take(r)?))?),
        None => None,
    };
    let scoreboard = match sockets.scoreboard {
        Some(b) => Some(Scoreboard {
            fd: fds.take(b.fd)?,
            cells: crate::scoreboard::Cells::from_free(b.free),
        }),
        None => None,
    };
    let node_adapter = match state.node_adapter {
        Some(a) => Some(node::AdapterFile::taken_over(
            a.dir,
            fds.take(a.dir_fd)?,
            a.shared,
        )),
        None => None,
    };
    let reuseport = match reuseport_state {
        Some(r) => {
            let mut slots = std::collections::BTreeMap::new();
            for (slot, sockets) in r.slots {
                let mut taken = Vec::with_capacity(sockets.len());
                for l in sockets {
                    let fd = fds.take(l.fd)?;
                    taken.push(listen::Listener::taken_over(l.name, l.address, fd, None));
                }
                slots.insert(slot, taken);
            }
            Some(super::reuseport::Reuseport::taken_over(
                r.lines, r.backlog, slots,
            ))
        }
        None => None,
    };
    let config = state.config;
    let fallback = super::fallback::Fallback::new(&ex, &config, &listeners);
    if let Some(pool) = &reuseport {
        fallback.set_listeners(pool.all());
    }
    let dispatch = super::dispatch::Dispatcher::start(
        &ex,
        &config,
        &listeners,
        scoreboard.as_ref().map(|b| &b.fd),
    );
    let took = Duration::from_nanos(monotonic_ns().saturating_sub(image.asked_ns));
    let mut d = Daemon {
        notify_name: notify.name.clone(),
        notify: notify.clone(),
        gens: state
            .generations
            .into_iter()
            .map(|(g, config)| (g, Generation::new(config)))
            .collect(),
        next_generation: state.next_generation,
        sup: Supervisor::restore(supervisor, now),
        procs: Default::default(),
        pids: Default::default(),
        ex: ex.clone(),
        tx,
        restart_watchers: Vec::new(),
        started: image.started.at(now),
        exit_code: None,
        counters: state.counters,
        manager: notify::Manager::from_env(),
        scoreboard,
        fallback,
        tree: tree::Tree::taken_over(tree_state.parent, tree_state.emptying),
        memory_check: None,
        last_words: state.last_words.into_iter().collect(),
        node_adapter,
        dispatch,
        reuseport,
        image: Image {
            started: now,
            binary: image.binary,
            argv: image.argv,
            upgrades: image.upgrades,
            resumed: Some((from, took)),
            control_fd: -1,
            metrics_fd: None,
            pending: None,
        },
        config,
        listeners,
    };
    for w in workers {
        let Some(inst) = d.sup.instance(w.instance).cloned() else {
            continue;
        };
        let tree = tree::Worker::taken_over(w.pid, w.cgroup);
        let ipc = match w.ipc {
            Some(r) => Some(Rc::new(Async::new(fds.take(r)?)?)),
            None => None,
        };
        if let Some(ipc) = &ipc {
            d.ex.spawn(super::read_worker(w.instance, ipc.clone(), d.tx.clone()))
                .detach();
        }
        let ready_pipe = match w.ready_pipe {
            Some(r) => Some(Rc::new(Async::new(fds.take(r)?)?)),
            None => None,
        };
        if let Some(pipe) = &ready_pipe {
            let reader = ready_pipe::read(w.instance, pipe.clone(), tree.reaped(), d.tx.clone());
            d.ex.spawn(reader).detach();
        }
        let node = match w.node {
            Some(r) => Some(node::Channel::new(fds.take(r)?)?),
            None => None,
        };
        if let Some(channel) = &node {
            let reader = node::read(w.instance, channel.clone(), tree.reaped(), d.tx.clone());
            d.ex.spawn(reader).detach();
        }
        let output = match w.output {
            Some([out, err]) => {
                let pipes = logcap::Pipes::taken_over(fds.take(out)?, fds.take(err)?);
                let tag = logcap::Tag {
                    id: inst.slot,
                    pid: w.pid,
                    generation: inst.generation,
                };
                Some(logcap::Capture::start(&d.ex, pipes, tag)?)
            }
            None => None,
        };
        if inst.killed.is_some() {
            // Its SIGKILL is sent again until it is reaped.
            tree.kill(&d.ex);
        }
        d.pids.insert(w.pid, w.instance);
        d.procs.insert(
            w.instance,
            Proc {
                pid: w.pid,
                protocol: w.protocol,
                ipc,
                ready_pipe,
                stats: w.stats,
                note: w.note,
                cell: w.cell,
                output,
                tree,
                node,
            },
        );
    }
    if let (Some(dispatcher), Some(handed)) = (&d.dispatch, dispatch_state) {
        let procs = &d.procs;
        dispatcher.take_over(handed, &mut |r| fds.take(r), &|id| {
            let channel = procs.get(&id)?.node.as_ref()?;
            channel.as_fd().try_clone_to_owned().ok()
        })?;
    }
    let shell = super::Shell {
        signals,
        control,
        metrics,
        notify,
    };
    Ok((d, shell))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formats_answer_round_trips() {
        let f = parse_formats(&formats_text()).unwrap();
        assert_eq!(f.version, VERSION);
        assert_eq!(f.formats, ACCEPTS.to_vec());
        assert!(f.formats.contains(&FORMAT));
        assert_eq!(f.layouts, vec![(FORMAT, layout().unwrap())]);
        // Stable: the same build computes the same fingerprint.
        assert_eq!(layout(), layout());
    }

    #[test]
    fn a_foreign_answer_is_refused_with_what_it_said() {
        let e = parse_formats("usage: foo [-c FILE]").unwrap_err();
        assert!(
            e.contains("not a clusterd's") && e.contains("usage: foo"),
            "{e}"
        );
        let e = parse_formats("clusterd 9.0.0\nhandoff x").unwrap_err();
        assert!(e.contains("bad format list"), "{e}");
        let f = parse_formats("clusterd 9.0.0\nhandoff 7 8\nlayout 7 00ff\n").unwrap();
        assert_eq!((f.version.as_str(), f.formats), ("9.0.0", vec![7, 8]));
        assert_eq!(f.layouts, vec![(7, 255)]);
    }

    /// Everything written is read back as it was.
    #[test]
    fn a_full_hand_off_round_trips() {
        let sample = sample().expect("the sample config parses");
        let bytes = encode(&sample);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(encode(&back), bytes);
        assert_eq!(back.workers[0].output, Some([0, 0]));
        assert_eq!(back.daemon.generations.len(), 1);
        assert_eq!(back.supervisor, sample.supervisor);
        // Truncated anywhere: an error, never a panic.
        for cut in [8, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn another_format_or_garbage_is_refused() {
        assert!(
            decode(b"hello")
                .unwrap_err()
                .contains("not a clusterd hand-off")
        );
        let mut bytes = MAGIC.to_vec();
        bytes.extend(99u32.to_le_bytes());
        let e = decode(&bytes).unwrap_err();
        assert!(e.contains("format 99"), "{e}");
        let mut bytes = MAGIC.to_vec();
        bytes.extend(FORMAT.to_le_bytes());
        bytes.extend([0xff; 3]);
        assert!(decode(&bytes).unwrap_err().contains("malformed"));
    }

    #[test]
    fn a_missing_or_unrunnable_binary_is_refused() {
        let e = check(Path::new("/nonexistent/clusterd")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = check(Path::new("relative/clusterd")).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = check(Path::new("/")).unwrap_err();
        assert!(e.contains("not a file"), "{e}");
    }
}
