//! The worker side of the clusterd protocol: the library a Rust worker embeds.
//!
//! A worker started by clusterd inherits the IPC channel (`CLUSTERD_FD`),
//! receives its listening sockets by name, reports [`Worker::ready`], serves
//! until [`Worker::shutdown`] resolves, stops accepting, finishes what is in
//! flight and reports [`Worker::drained`]. The same program started without
//! clusterd binds its own fallback addresses, so an app can be developed and
//! tested without the supervisor; `ready`, `drained` and stats are then no-ops
//! and SIGTERM / SIGINT (Ctrl-C) start the same drain.
//!
//! # Implementation
//!
//! - [`Worker::connect`] takes over the fd named by `CLUSTERD_FD` (once per
//!   process), checks that it is a unix `SOCK_SEQPACKET` socket, sets
//!   `CLOEXEC` on it (so programs the worker spawns do not inherit it) and
//!   waits up to 5 s for the `Hello` record with the listener fds attached.
//!   Received fds are `CLOEXEC` already ([`crate::fdpass`]); listeners are
//!   switched to non-blocking mode when taken ([`Worker::take_listener`]).
//! - One background thread, `clusterd-worker`, runs for the life of the
//!   [`Worker`]. It reads records from clusterd (`Drain`, or end of file when
//!   clusterd died, start the shutdown; malformed records are logged once and
//!   ignored, never fatal), watches SIGTERM and SIGINT, and sends the latest
//!   [`Stats`] at most once a second when they changed. A second SIGINT
//!   during a drain exits the process at once with status 130, so a
//!   developer's double Ctrl-C is never stuck behind a slow drain. Once the
//!   [`Worker`] is dropped, SIGTERM and SIGINT exit the process (status
//!   128 + signal number), as they would have without the library.
//! - Messages to clusterd are sent without blocking the caller's thread; a
//!   clusterd that does not read for 5 s makes [`Worker::ready`] fail.
//! - [`Shutdown`] is a cloneable future: any number of tasks can wait for
//!   the drain to begin, and [`Shutdown::is_triggered`] answers without
//!   waiting (for example to add `Connection: close` to a response).
//!
//! # Balanced accepting
//!
//! Every worker accepts from the same listening socket, and the kernel wakes
//! them all for each new connection: left alone, whichever runs first wins,
//! so a burst of keep-alive connections splits unevenly and stays split.
//! Under clusterd, the [`InFlight`] count given to [`Stats::track`] is
//! published on the [`scoreboard`](crate::scoreboard) the worker shares with
//! its siblings, and [`Listener::accept_limited`] and [`Acceptor`] take
//! pending connections while the worker holds less than its fair share
//! ([`Board::over_share`]: what every accepting worker holds plus the accept
//! queue, divided among them); past it they leave the next one to a sibling
//! that holds fewer, for [`scoreboard::DEFER_MAX`], before taking it. They
//! also accept only while the count is below its limit (as nginx stops
//! accepting when a worker's connections run low). [`Acceptor::accept`]
//! takes the connections already pending back to back, yielding to the
//! worker's other tasks after every [`ACCEPT_BATCH`], so a new connection
//! does not wait for a round of a CPU-busy worker's tasks per connection
//! queued ahead of it. [`InFlight::crowded`] tells a worker holding more than
//! its share when to end a keep-alive connection, so that clients move onto
//! a replacement or new workers. Each accepted
//! connection carries a [`Guard`] that releases its slot when dropped,
//! however the connection ends, so a client that disconnects mid-request can
//! never leave a drain waiting.
//!
//! # Examples
//!
//! A complete worker: serve until clusterd says drain, then let the open
//! connections finish.
//!
//! ```no_run
//! use clusterd::worker::{Acceptor, InFlight, Worker};
//! use smol::io::{AsyncReadExt, AsyncWriteExt};
//!
//! fn main() -> std::io::Result<()> {
//!     smol::block_on(async {
//!         // Under clusterd the listeners come from clusterd; alone, we bind.
//!         let mut worker = Worker::connect(&[("http", "127.0.0.1:3000")])?;
//!         let in_flight = InFlight::default();
//!         worker.stats().track(&in_flight);
//!         let mut acceptor = Acceptor::new(
//!             worker.take_listener("http")?,
//!             in_flight.clone(),
//!             worker.shutdown(),
//!         );
//!         worker.ready().await?;
//!
//!         // `accept` returns `None` once the drain has begun; the listener
//!         // is closed at that moment.
//!         while let Some(conn) = acceptor.accept().await? {
//!             smol::spawn(async move {
//!                 let mut stream = conn.stream;
//!                 let mut buf = [0u8; 1024];
//!                 if let Ok(n) = stream.read(&mut buf).await {
//!                     let _ = stream.write_all(&buf[..n]).await;
//!                 }
//!                 drop(conn.guard); // also released if the task is dropped
//!             })
//!             .detach();
//!         }
//!         in_flight.wait_idle().await;
//!         worker.drained().await
//!     })
//! }
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_signal::{Signal, Signals};
use event_listener::{Event, EventListener};
use rustix::io::Errno;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, RecvFlags, SocketType};
use smol::future::{self, FutureExt as _};
use smol::io::{AsyncRead, AsyncWrite};
use smol::stream::StreamExt as _;
use smol::{Async, Timer};

use crate::fdpass;
pub use crate::proto::ListenerInfo;
use crate::proto::{self, FromWorker, Hello, ToWorker};
use crate::scoreboard::{self, Board};

/// Writes one line to stderr in a single `write`, so it never interleaves
/// with clusterd's log lines or another worker's (`eprintln!` may write a
/// line in several pieces).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

/// The environment variable naming the IPC fd clusterd passes to a worker.
pub const ENV_FD: &str = "CLUSTERD_FD";

/// How long [`Worker::connect`] waits for clusterd's `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a message to clusterd may wait for room in the socket buffer.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the background thread considers sending [`Stats`].
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// How long [`Acceptor::accept`] pauses when the process is out of fds or
/// memory, instead of spinning on a listener that stays readable.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// How many connections [`Acceptor::accept`] takes back to back before it
/// yields to the worker's other tasks once. Accepting until the queue is
/// empty (as libuv and Go do) keeps a connection from waiting in the accept
/// queue for a whole round of a busy executor per connection ahead of it;
/// the bound keeps a flood of connections from starving the ones already
/// accepted.
pub const ACCEPT_BATCH: u32 = 64;

/// How often [`InFlight::crowded`] looks at the scoreboard: once every this
/// many calls (responses, typically). Between two looks it asks to close at
/// most the excess it last saw, so the connections it sheds have time to
/// close before it counts again.
pub const CROWDED_EVERY: u32 = 32;

/// Set once the fd named by `CLUSTERD_FD` has been taken over, so that two
/// `OwnedFd`s can never own it.
static IPC_FD_TAKEN: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------
// Worker

/// A worker's connection to clusterd (or its standalone stand-in).
///
/// Keep it alive while serving: dropping it closes the channel to clusterd
/// (which then counts the worker as gone) and resolves every [`Shutdown`].
pub struct Worker {
    /// Slot number from `Hello`, 0 standalone.
    id: u32,
    /// Generation from `Hello`, 0 standalone.
    generation: u64,
    /// Names and addresses, in clusterd's order (taken ones included).
    listeners: Vec<ListenerInfo>,
    /// The IPC channel; `None` standalone.
    ipc: Option<Arc<Async<OwnedFd>>>,
    /// State shared with the background thread and the handles.
    shared: Arc<Shared>,
    /// Dropped with the worker, which stops the background thread.
    _stop: smol::channel::Sender<()>,
}

/// What the worker, its background thread and its handles share.
struct Shared {
    /// Worker id, for log lines.
    id: u32,
    /// The shutdown trigger behind every [`Shutdown`].
    shutdown: Arc<ShutdownState>,
    /// Latest values for the next `Stats` record.
    stats: Stats,
    /// Listener fds not taken yet, by index into `Worker::listeners`; closed
    /// when the shutdown begins.
    fds: Mutex<Vec<Option<(Kind, OwnedFd)>>>,
    /// `Ready` was sent, so `Stats` may follow.
    ready_sent: AtomicBool,
    /// `Drained` is being sent, so no more `Stats`. Set under `send_lock`.
    drained: AtomicBool,
    /// Orders `Stats` against `Drained`: a `Stats` record is sent either
    /// before `drained` is set or not at all.
    send_lock: Mutex<()>,
}

impl Shared {
    /// Starts the shutdown (first reason wins) and closes untaken listeners.
    fn begin_shutdown(&self, reason: ShutdownReason) -> bool {
        let first = self.shutdown.trigger(reason);
        if first {
            lock(&self.fds).iter_mut().for_each(|fd| *fd = None);
            if let Some(board) = self.stats.cells.board.get() {
                board.withdraw();
            }
        }
        first
    }

    fn log(&self, message: fmt::Arguments<'_>) {
        say!("clusterd::worker (worker {}): {message}", self.id);
    }
}

impl Worker {
    /// Connects to clusterd, or binds `fallback` when not run by clusterd.
    ///
    /// Under clusterd (`CLUSTERD_FD` set) this takes over the IPC fd and
    /// waits up to 5 seconds for the `Hello` record and the listeners. Run
    /// alone, it binds each `(name, address)` of `fallback` itself; an
    /// address is `host:port`, `[v6]:port` or `unix:/path` (a stale socket
    /// file nobody listens on is replaced). In both cases SIGTERM and SIGINT
    /// start the shutdown from then on.
    ///
    /// # Errors
    ///
    /// `CLUSTERD_FD` is not a clusterd IPC socket or was already taken; no
    /// valid `Hello` arrived in time (a protocol version mismatch names both
    /// versions); a fallback address cannot be bound; the signal handlers or
    /// the background thread cannot be set up.
    pub fn connect(fallback: &[(&str, &str)]) -> io::Result<Worker> {
        // Register first, so that a SIGTERM arriving while we wait for
        // `Hello` is queued rather than killing the process.
        let signals = Signals::new([Signal::Term, Signal::Int])?;
        match std::env::var_os(ENV_FD) {
            Some(value) if !value.is_empty() => {
                let fd = take_env_fd(&value)?;
                Worker::supervised(fd, Some(signals))
            }
            _ => Worker::standalone(fallback, Some(signals)),
        }
    }

    /// Connects over an IPC channel the caller already owns.
    ///
    /// Like [`Worker::connect`] under clusterd, except that the fd is given
    /// rather than found in the environment and no signal handlers are
    /// installed (the caller keeps control of SIGTERM and SIGINT). Meant for
    /// tests and custom launchers.
    ///
    /// # Errors
    ///
    /// As [`Worker::connect`].
    #[doc(hidden)]
    pub fn from_fd(fd: OwnedFd) -> io::Result<Worker> {
        check_ipc_socket(&fd)?;
        Worker::supervised(fd, None)
    }

    fn supervised(fd: OwnedFd, signals: Option<Signals>) -> io::Result<Worker> {
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
        let (hello, fds, board_fd) = receive_hello(&fd)?;
        let mut kinds = Vec::with_capacity(fds.len());
        for (info, fd) in hello.listeners.iter().zip(fds) {
            let kind = listener_kind(&fd).map_err(|e| {
                with_context(
                    e,
                    format_args!("listener {}={} from clusterd", info.name, info.address),
                )
            })?;
            kinds.push(Some((kind, fd)));
        }
        // Without the scoreboard the worker still serves, only unbalanced.
        let board = match (hello.scoreboard, board_fd) {
            (Some(cell), Some(board_fd)) => Board::map(&board_fd, cell)
                .map_err(|e| {
                    say!(
                        "clusterd::worker (worker {}): scoreboard: {e}; accepting without it",
                        hello.worker_id
                    )
                })
                .ok(),
            _ => None,
        };
        let ipc = Arc::new(Async::new(fd)?);
        Worker::start(
            hello.worker_id,
            hello.generation,
            hello.listeners,
            kinds,
            Some(ipc),
            signals,
            board,
        )
    }

    fn standalone(fallback: &[(&str, &str)], signals: Option<Signals>) -> io::Result<Worker> {
        let mut infos = Vec::with_capacity(fallback.len());
        let mut fds = Vec::with_capacity(fallback.len());
        for &(name, address) in fallback {
            let (kind, fd, bound) = bind(address)
                .map_err(|e| with_context(e, format_args!("cannot listen on {name}={address}")))?;
            infos.push(ListenerInfo {
                name: name.to_owned(),
                address: bound,
            });
            fds.push(Some((kind, fd)));
        }
        Worker::start(0, 0, infos, fds, None, signals, None)
    }

    fn start(
        id: u32,
        generation: u64,
        listeners: Vec<ListenerInfo>,
        fds: Vec<Option<(Kind, OwnedFd)>>,
        ipc: Option<Arc<Async<OwnedFd>>>,
        signals: Option<Signals>,
        board: Option<Board>,
    ) -> io::Result<Worker> {
        let stats = Stats::default();
        if let Some(board) = board {
            let _ = stats.cells.board.set(board);
        }
        let shared = Arc::new(Shared {
            id,
            shutdown: Arc::new(ShutdownState::default()),
            stats,
            fds: Mutex::new(fds),
            ready_sent: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            send_lock: Mutex::new(()),
        });
        let (stop, stopped) = smol::channel::bounded(1);
        let background = Background {
            ipc: ipc.clone(),
            signals,
            shared: shared.clone(),
            stopped,
        };
        std::thread::Builder::new()
            .name("clusterd-worker".into())
            .spawn(move || background.run())?;
        Ok(Worker {
            id,
            generation,
            listeners,
            ipc,
            shared,
            _stop: stop,
        })
    }

    /// The worker's slot number, 1..=N, stable across respawns; 0 standalone.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The generation (incremented by each rolling restart); 0 standalone.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the worker runs under clusterd.
    pub fn is_supervised(&self) -> bool {
        self.ipc.is_some()
    }

    /// Every listener's name and address, in clusterd's order, including
    /// the ones already taken. Standalone, the address is the one actually
    /// bound (so port 0 shows the port the kernel chose).
    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.listeners
    }

    /// Takes the listener called `name`, ready to accept asynchronously.
    ///
    /// # Errors
    ///
    /// No listener has that name (the message lists the names there are), it
    /// was already taken, the shutdown has begun (untaken listeners are closed
    /// then), or it cannot be registered with the async reactor.
    pub fn take_listener(&mut self, name: &str) -> io::Result<Listener> {
        let mut fds = lock(&self.shared.fds);
        let slot = self
            .listeners
            .iter()
            .zip(fds.iter_mut())
            .find(|(l, fd)| l.name == name && fd.is_some())
            .and_then(|(_, fd)| fd.take());
        if let Some((kind, fd)) = slot {
            return Listener::from_fd(kind, fd);
        }
        let why = if self.shared.shutdown.is_triggered() {
            format!("listener {name:?} is closed: the worker is shutting down")
        } else if self.listeners.iter().any(|l| l.name == name) {
            format!("listener {name:?} was already taken")
        } else {
            let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
            format!(
                "no listener named {name:?} (listeners: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            )
        };
        Err(io::Error::new(io::ErrorKind::NotFound, why))
    }

    /// Tells clusterd the worker is serving (no-op standalone, and after the
    /// first success). clusterd starts draining the worker this one replaces
    /// only after this, so call it once the listeners are being accepted on.
    ///
    /// # Errors
    ///
    /// The channel to clusterd is closed, or clusterd did not read for 5 s.
    pub async fn ready(&self) -> io::Result<()> {
        if self.shared.ready_sent.load(Ordering::Acquire) {
            return Ok(());
        }
        // Ready means about to accept: from now on the siblings leave new
        // connections to this worker while it holds fewer.
        self.shared.stats.join_board();
        if let Some(ipc) = &self.ipc {
            send(ipc, &FromWorker::Ready)
                .await
                .map_err(|e| with_context(e, format_args!("cannot report Ready to clusterd")))?;
        }
        self.shared.ready_sent.store(true, Ordering::Release);
        Ok(())
    }

    /// A future that resolves when the worker should drain: clusterd sent
    /// `Drain`, the channel to clusterd closed, SIGTERM or SIGINT arrived, or
    /// the [`Worker`] was dropped. Clone it freely.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.shared.shutdown.clone())
    }

    /// A handle for reporting load to clusterd (shown by `clusterctl status`).
    /// The latest values are sent at most once a second, when they changed,
    /// after [`Worker::ready`]. Standalone, the values are kept but not sent.
    pub fn stats(&self) -> Stats {
        self.shared.stats.clone()
    }

    /// Tells clusterd the drain is complete, and consumes the worker. Call it
    /// when everything in flight has finished, then exit.
    ///
    /// A closed channel is not an error here: clusterd is gone, so there is
    /// nobody left to tell.
    ///
    /// # Errors
    ///
    /// The message could not be sent for another reason.
    pub async fn drained(self) -> io::Result<()> {
        {
            let _order = lock(&self.shared.send_lock);
            self.shared.drained.store(true, Ordering::Release);
        }
        if let Some(ipc) = &self.ipc {
            match send(ipc, &FromWorker::Drained).await {
                Err(e) if !is_disconnect(&e) => {
                    return Err(with_context(
                        e,
                        format_args!("cannot report Drained to clusterd"),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The IPC channel, for tests that need to send raw records.
    #[doc(hidden)]
    pub fn ipc_fd(&self) -> Option<BorrowedFd<'_>> {
        self.ipc.as_deref().map(|fd| fd.get_ref().as_fd())
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .field("supervised", &self.is_supervised())
            .field("listeners", &self.listeners)
            .field("shutdown", &self.shared.shutdown.reason())
            .finish_non_exhaustive()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.begin_shutdown(ShutdownReason::Disconnected);
    }
}

/// Parses `CLUSTERD_FD` and takes ownership of that fd, once per process.
fn take_env_fd(value: &OsStr) -> io::Result<OwnedFd> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ENV_FD}={}: {why}", value.to_string_lossy()),
        )
    };
    let raw: RawFd = value
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&fd: &RawFd| fd >= 0)
        .ok_or_else(|| invalid("not a file descriptor number"))?;
    if IPC_FD_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(invalid(
            "the IPC channel was already taken by another Worker",
        ));
    }
    // SAFETY: clusterd starts the worker with this fd open and nothing else in
    // the process owns it; `IPC_FD_TAKEN` guarantees we claim it at most once.
    // If the variable lies (the fd is closed or is something else, e.g. the
    // variable was inherited from a parent worker), the check below gives the
    // number back without closing it, so no fd we do not own is ever closed.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match check_ipc_socket(&fd) {
        Ok(()) => Ok(fd),
        Err(e) => {
            let _ = fd.into_raw_fd();
            Err(invalid(&format!(
                "not a clusterd IPC socket ({e}); was the variable inherited from another process?"
            )))
        }
    }
}

fn check_ipc_socket(fd: &OwnedFd) -> io::Result<()> {
    let kind = sockopt::socket_type(fd)?;
    let domain = sockopt::socket_domain(fd)?;
    if kind != SocketType::SEQPACKET || domain != AddressFamily::UNIX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected a unix SOCK_SEQPACKET socket",
        ));
    }
    Ok(())
}

/// Receives the first record, which must be `Hello` with one fd per listener
/// (and the scoreboard's after them, when it names a cell).
fn receive_hello(fd: &OwnedFd) -> io::Result<(Hello, Vec<OwnedFd>, Option<OwnedFd>)> {
    // Blocking with a deadline; the fd may have been created non-blocking.
    rustix::io::ioctl_fionbio(fd, false)?;
    sockopt::set_socket_timeout(fd, Timeout::Recv, Some(HELLO_TIMEOUT))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let received = loop {
        match fdpass::recv_with_fds(fd, &mut buf, RecvFlags::empty()) {
            Ok(received) => break received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted && Instant::now() < deadline => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no Hello from clusterd within {HELLO_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(with_context(e, format_args!("cannot receive Hello"))),
        }
    };
    sockopt::set_socket_timeout(fd, Timeout::Recv, None)?;
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if received.len == 0 && received.fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "clusterd closed the IPC channel before sending Hello",
        ));
    }
    if received.truncated {
        return Err(invalid(format!(
            "clusterd IPC: first record exceeds {} bytes",
            proto::MAX_IPC_RECORD
        )));
    }
    match proto::decode::<ToWorker>(&buf[..received.len], proto::MAX_IPC_RECORD) {
        Ok(ToWorker::Hello(hello))
            if hello.listeners.len() + usize::from(hello.scoreboard.is_some())
                == received.fds.len() =>
        {
            let mut fds = received.fds;
            let board = hello.scoreboard.and_then(|_| fds.pop());
            Ok((hello, fds, board))
        }
        Ok(ToWorker::Hello(hello)) => Err(invalid(format!(
            "clusterd IPC: Hello names {} listeners{} but {} fds are attached",
            hello.listeners.len(),
            if hello.scoreboard.is_some() {
                " and a scoreboard"
            } else {
                ""
            },
            received.fds.len()
        ))),
        Ok(other) => Err(invalid(format!(
            "clusterd IPC: expected Hello as the first record, got {other:?}"
        ))),
        Err(e) => Err(invalid(format!("clusterd IPC: {e}"))),
    }
}

/// Checks that `fd` is a listening stream socket and says which kind.
fn listener_kind(fd: &OwnedFd) -> io::Result<Kind> {
    let not_listening = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening TCP or unix stream socket",
        )
    };
    if sockopt::socket_type(fd)? != SocketType::STREAM || !sockopt::socket_acceptconn(fd)? {
        return Err(not_listening());
    }
    match sockopt::socket_domain(fd)? {
        AddressFamily::INET | AddressFamily::INET6 => Ok(Kind::Tcp),
        AddressFamily::UNIX => Ok(Kind::Unix),
        _ => Err(not_listening()),
    }
}

/// Binds a standalone listener; returns it with the address actually bound.
fn bind(address: &str) -> io::Result<(Kind, OwnedFd, String)> {
    if let Some(path) = address.strip_prefix("unix:") {
        let listener = bind_unix(path)?;
        Ok((Kind::Unix, listener.into(), address.to_owned()))
    } else {
        let addrs: Vec<_> = address.to_socket_addrs()?.collect();
        let listener = std::net::TcpListener::bind(&addrs[..])?;
        let bound = listener.local_addr()?.to_string();
        Ok((Kind::Tcp, listener.into(), bound))
    }
}

/// Binds a unix listener, replacing a stale socket file that nobody listens on.
fn bind_unix(path: &str) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)?.file_type().is_socket();
            let refused = matches!(UnixStream::connect(path),
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused);
            if !(is_socket && refused) {
                return Err(e);
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------
// The background thread

/// What the `clusterd-worker` thread owns.
struct Background {
    ipc: Option<Arc<Async<OwnedFd>>>,
    signals: Option<Signals>,
    shared: Arc<Shared>,
    /// Closed when the [`Worker`] is dropped.
    stopped: smol::channel::Receiver<()>,
}

impl Background {
    fn run(self) {
        let Background {
            ipc,
            signals,
            shared,
            stopped,
        } = self;
        let shared = &*shared;
        let records = async {
            match &ipc {
                Some(ipc) => read_records(ipc, shared).await,
                None => future::pending().await,
            }
        };
        let stats = async {
            match &ipc {
                Some(ipc) => report_stats(ipc, shared).await,
                None => future::pending().await,
            }
        };
        let watch = async {
            match &signals {
                Some(signals) => watch_signals(signals, shared).await,
                None => future::pending().await,
            }
        };
        let work = future::zip(records, future::zip(stats, watch));
        smol::block_on(
            async {
                let _ = stopped.recv().await;
            }
            .or(async {
                work.await;
            }),
        );
        // The worker is gone: close our copy of the channel, but keep
        // watching the signals, since dropping them would leave SIGTERM and
        // SIGINT ignored (the handler stays installed). Behave as the default
        // action would, exiting with the shell's 128 + signal number.
        drop(ipc);
        if let Some(signals) = signals {
            smol::block_on(async {
                let mut signals = &signals;
                while let Some(signal) = signals.next().await {
                    match signal {
                        Ok(Signal::Term) => std::process::exit(128 + 15),
                        Ok(Signal::Int) => std::process::exit(128 + 2),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    }
}

/// Reads records from clusterd until the channel closes.
async fn read_records(ipc: &Async<OwnedFd>, shared: &Shared) {
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let mut complained = false;
    let mut complain = |why: fmt::Arguments<'_>| {
        if !complained {
            complained = true;
            shared.log(format_args!(
                "ignoring a bad record from clusterd: {why} (further bad records are ignored silently)"
            ));
        }
    };
    loop {
        let received = ipc
            .read_with(|fd| fdpass::recv_with_fds(fd, &mut buf, RecvFlags::empty()))
            .await;
        let received = match received {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Too many fds attached: they were closed, the record is bad.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                complain(format_args!("{e}"));
                continue;
            }
            Err(e) => {
                shared.log(format_args!("the IPC channel failed ({e}); draining"));
                shared.begin_shutdown(ShutdownReason::Disconnected);
                return;
            }
        };
        if received.len == 0 && received.fds.is_empty() {
            shared.begin_shutdown(ShutdownReason::Disconnected);
            return;
        }
        if received.truncated {
            complain(format_args!(
                "record exceeds {} bytes",
                proto::MAX_IPC_RECORD
            ));
            continue;
        }
        // Any fds attached to a record other than Hello are dropped (closed).
        match proto::decode::<ToWorker>(&buf[..received.len], proto::MAX_IPC_RECORD) {
            Ok(ToWorker::Drain { timeout_ms }) => {
                shared.begin_shutdown(ShutdownReason::Drain {
                    timeout: Duration::from_millis(timeout_ms),
                });
            }
            Ok(ToWorker::Hello(_)) => complain(format_args!("a second Hello")),
            Err(e) => complain(format_args!("{e}")),
        }
    }
}

/// Sends the latest [`Stats`] once a second when they changed, until the
/// drain is reported or the channel closes. A full socket buffer skips a
/// report rather than waiting.
async fn report_stats(ipc: &Async<OwnedFd>, shared: &Shared) {
    let mut last = None;
    loop {
        Timer::after(STATS_INTERVAL).await;
        let _order = lock(&shared.send_lock);
        if shared.drained.load(Ordering::Acquire)
            || shared.shutdown.reason() == Some(ShutdownReason::Disconnected)
        {
            return;
        }
        if !shared.ready_sent.load(Ordering::Acquire) {
            continue;
        }
        let now = (shared.stats.requests(), shared.stats.active());
        if last == Some(now) {
            continue;
        }
        let record = proto::encode(&FromWorker::Stats {
            requests: now.0,
            active: now.1,
        });
        if fdpass::send_with_fds(ipc, &record, &[]).is_ok() {
            last = Some(now);
        }
    }
}

/// Turns SIGTERM and SIGINT into the shutdown; a SIGINT during the shutdown
/// exits at once.
async fn watch_signals(mut signals: &Signals, shared: &Shared) {
    while let Some(signal) = signals.next().await {
        let reason = match signal {
            Ok(Signal::Term) => ShutdownReason::Terminate,
            Ok(Signal::Int) => ShutdownReason::Interrupt,
            Ok(_) => continue,
            Err(e) => {
                shared.log(format_args!("cannot watch signals: {e}"));
                return;
            }
        };
        if !shared.begin_shutdown(reason) && reason == ShutdownReason::Interrupt {
            shared.log(format_args!(
                "SIGINT during shutdown: exiting without waiting for the drain"
            ));
            std::process::exit(130);
        }
    }
}

/// Sends one record, waiting (up to [`SEND_TIMEOUT`]) for buffer space.
async fn send(ipc: &Async<OwnedFd>, msg: &FromWorker) -> io::Result<()> {
    let record = proto::encode(msg);
    ipc.write_with(|fd| fdpass::send_with_fds(fd, &record, &[]))
        .or(async {
            Timer::after(SEND_TIMEOUT).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("clusterd did not read for {SEND_TIMEOUT:?}"),
            ))
        })
        .await
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

// ---------------------------------------------------------------------------
// Shutdown

/// Why the worker is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// clusterd sent `Drain`; it sends SIGKILL once `timeout` has passed.
    Drain {
        /// How long clusterd waits before SIGKILL.
        timeout: Duration,
    },
    /// The channel to clusterd closed (clusterd exited), or the [`Worker`]
    /// was dropped.
    Disconnected,
    /// SIGTERM arrived (`docker stop`, systemd, or clusterd's parent-death
    /// signal).
    Terminate,
    /// SIGINT arrived (Ctrl-C).
    Interrupt,
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Drain { timeout } => {
                write!(
                    f,
                    "DRAIN from clusterd, SIGKILL after {}",
                    crate::lifecycle::human(*timeout)
                )
            }
            ShutdownReason::Disconnected => f.write_str("the channel to clusterd closed"),
            ShutdownReason::Terminate => f.write_str("SIGTERM"),
            ShutdownReason::Interrupt => f.write_str("SIGINT"),
        }
    }
}

#[derive(Default)]
struct ShutdownState {
    reason: OnceLock<ShutdownReason>,
    triggered: Event,
}

impl ShutdownState {
    /// Records `reason` unless a shutdown already began; wakes every waiter.
    fn trigger(&self, reason: ShutdownReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.triggered.notify(usize::MAX);
        }
        first
    }

    fn reason(&self) -> Option<ShutdownReason> {
        self.reason.get().copied()
    }

    fn is_triggered(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// A future that resolves, with the reason, once the worker should drain.
///
/// Cloning is cheap; every clone resolves. Awaiting it again after it
/// resolved returns the same reason at once.
#[must_use = "futures do nothing unless awaited"]
pub struct Shutdown {
    state: Arc<ShutdownState>,
    /// Registered with `state.triggered` once polled.
    listener: Option<EventListener>,
}

impl Shutdown {
    fn new(state: Arc<ShutdownState>) -> Shutdown {
        Shutdown {
            state,
            listener: None,
        }
    }

    /// Whether the shutdown has begun, without waiting.
    pub fn is_triggered(&self) -> bool {
        self.state.is_triggered()
    }

    /// Why the shutdown began, if it has.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.state.reason()
    }
}

impl Future for Shutdown {
    type Output = ShutdownReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ShutdownReason> {
        let this = self.get_mut();
        loop {
            if let Some(reason) = this.state.reason() {
                this.listener = None;
                return Poll::Ready(reason);
            }
            match this.listener.as_mut() {
                // Registered before the check above, so no trigger is missed.
                None => this.listener = Some(this.state.triggered.listen()),
                Some(listener) => {
                    std::task::ready!(Pin::new(listener).poll(cx));
                    this.listener = None;
                }
            }
        }
    }
}

impl Clone for Shutdown {
    fn clone(&self) -> Shutdown {
        Shutdown::new(self.state.clone())
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("reason", &self.reason())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Stats

/// A cloneable handle for the load figures reported to clusterd.
///
/// Record as often as you like (each call is an atomic operation); the
/// background thread sends the latest values at most once a second.
#[derive(Clone, Default)]
pub struct Stats {
    cells: Arc<StatsCells>,
}

#[derive(Default)]
struct StatsCells {
    requests: AtomicU64,
    active: AtomicU32,
    /// When set, `active` is read from here instead.
    tracked: Mutex<Option<InFlight>>,
    /// The scoreboard, when clusterd passed one.
    board: OnceLock<Board>,
}

impl Stats {
    /// Counts one served request.
    pub fn count_request(&self) {
        self.add_requests(1);
    }

    /// Counts `n` served requests.
    pub fn add_requests(&self, n: u64) {
        self.cells.requests.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the number of active connections (ignored while an [`InFlight`]
    /// is tracked).
    pub fn set_active(&self, active: u32) {
        self.cells.active.store(active, Ordering::Relaxed);
    }

    /// Reports `in_flight.active()` as the active count from now on: to
    /// clusterd (`status`, `/metrics`) and, under clusterd, to the sibling
    /// workers, whose accept loops then leave new connections to whichever
    /// worker holds fewest (see [balanced accepting](self#balanced-accepting)).
    /// Track the counter your [`Acceptor`]s use.
    pub fn track(&self, in_flight: &InFlight) {
        *lock(&self.cells.tracked) = Some(in_flight.clone());
        if let Some(board) = self.cells.board.get() {
            let _ = in_flight.inner.board.set(*board);
        }
    }

    /// Publishes the tracked count on the scoreboard, if both exist.
    fn join_board(&self) {
        if let (Some(board), Some(in_flight)) =
            (self.cells.board.get(), &*lock(&self.cells.tracked))
        {
            board.join(in_flight.active());
        }
    }

    /// Requests counted so far.
    pub fn requests(&self) -> u64 {
        self.cells.requests.load(Ordering::Relaxed)
    }

    /// The active count that would be reported now.
    pub fn active(&self) -> u32 {
        match &*lock(&self.cells.tracked) {
            Some(in_flight) => u32::try_from(in_flight.active()).unwrap_or(u32::MAX),
            None => self.cells.active.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("requests", &self.requests())
            .field("active", &self.active())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// In-flight accounting

/// Counts a worker's connections (or requests) in flight, up to a limit.
///
/// [`Listener::accept_limited`] and [`Acceptor`] accept only while the count
/// is below the limit, so a loaded worker leaves new connections to idle
/// ones. Each accepted connection holds a [`Guard`] that gives its slot back
/// when dropped. Cloning shares the count.
///
/// The limit counts every open connection, idle keep-alive ones included, so
/// it must stay above the number of keep-alive connections a worker is
/// expected to hold; otherwise a worker full of idle connections stops
/// accepting although it has nothing to do. The default,
/// [`InFlight::DEFAULT_LIMIT`] = 256, suits a worker per core behind a proxy
/// or load generator holding some dozens of connections per worker. Use
/// [`InFlight::unlimited`] to count without limiting.
///
/// The limit is soft: each acceptor sharing the counter may overshoot it by
/// one connection it was already accepting when the limit was reached.
#[derive(Clone)]
pub struct InFlight {
    inner: Arc<InFlightInner>,
}

struct InFlightInner {
    active: AtomicUsize,
    /// `usize::MAX` means no limit.
    limit: usize,
    /// Notified when the count drops below the limit.
    capacity: Event,
    /// Notified when the count drops to zero.
    idle: Event,
    /// Where the count is published for the sibling workers, once tracked.
    board: OnceLock<Board>,
    /// Connections [`InFlight::crowded`] may still ask to close, from its
    /// last look at the board.
    shed: AtomicUsize,
    /// Calls of [`InFlight::crowded`], to look at the board every
    /// [`CROWDED_EVERY`].
    crowded_calls: AtomicU32,
}

impl InFlight {
    /// The default limit: see the type's documentation.
    pub const DEFAULT_LIMIT: usize = 256;

    /// A counter with the given limit (0 is taken as 1).
    pub fn new(limit: usize) -> InFlight {
        InFlight::with_limit(limit.max(1))
    }

    /// A counter without a limit.
    pub fn unlimited() -> InFlight {
        InFlight::with_limit(usize::MAX)
    }

    fn with_limit(limit: usize) -> InFlight {
        InFlight {
            inner: Arc::new(InFlightInner {
                active: AtomicUsize::new(0),
                limit,
                capacity: Event::new(),
                idle: Event::new(),
                board: OnceLock::new(),
                shed: AtomicUsize::new(0),
                crowded_calls: AtomicU32::new(0),
            }),
        }
    }

    /// The limit, or `None` for no limit.
    pub fn limit(&self) -> Option<usize> {
        (self.inner.limit != usize::MAX).then_some(self.inner.limit)
    }

    /// How many guards are alive.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Whether the count is below the limit.
    pub fn has_capacity(&self) -> bool {
        self.active() < self.inner.limit
    }

    /// Counts one more, regardless of the limit, until the guard is dropped.
    pub fn enter(&self) -> Guard {
        let before = self.inner.active.fetch_add(1, Ordering::AcqRel);
        if let Some(board) = self.inner.board.get() {
            board.publish(before + 1);
        }
        Guard {
            in_flight: self.clone(),
        }
    }

    /// Whether this worker holds clearly more connections than its fair
    /// share, so that a server should end the keep-alive connection it is
    /// answering after this response (`Connection: close`): the client
    /// reconnects, and the accept loops send the new connection to a worker
    /// that holds fewer. That is how keep-alive clients spread onto a
    /// replacement after a crash, or onto new workers after `clusterctl
    /// scale`; otherwise they stay where they are for as long as they keep
    /// their connections.
    ///
    /// Asks for at most the excess [`scoreboard::Board::excess`] found (the
    /// connections beyond a fair share and a tolerance of one in 32), and
    /// looks at the board once every [`CROWDED_EVERY`] calls, so calling it
    /// for every response is cheap. Always `false` unless the count is
    /// tracked under clusterd ([`Stats::track`]).
    pub fn crowded(&self) -> bool {
        let inner = &self.inner;
        let Some(board) = inner.board.get() else {
            return false;
        };
        let from_budget = inner
            .shed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if from_budget.is_ok() {
            return true;
        }
        if inner.crowded_calls.fetch_add(1, Ordering::Relaxed) % CROWDED_EVERY != 0 {
            return false;
        }
        match board.excess(self.active()) {
            0 => false,
            excess => {
                inner.shed.store(excess - 1, Ordering::Release);
                true
            }
        }
    }

    /// Waits until the count is below the limit.
    pub async fn wait_capacity(&self) {
        until(&self.inner.capacity, || self.has_capacity()).await;
    }

    /// Waits until the count is zero (every guard dropped): what a drain
    /// waits for once the listener is closed.
    pub async fn wait_idle(&self) {
        until(&self.inner.idle, || self.active() == 0).await;
    }
}

impl Default for InFlight {
    /// A counter with [`InFlight::DEFAULT_LIMIT`].
    fn default() -> InFlight {
        InFlight::new(InFlight::DEFAULT_LIMIT)
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("active", &self.active())
            .field("limit", &self.limit())
            .finish()
    }
}

/// One unit counted by an [`InFlight`]; dropping it gives the slot back.
#[must_use = "the slot is given back as soon as the guard is dropped"]
pub struct Guard {
    in_flight: InFlight,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.in_flight.inner;
        let before = inner.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(board) = inner.board.get() {
            board.publish(before - 1);
        }
        if before == inner.limit {
            inner.capacity.notify(usize::MAX);
        }
        if before == 1 {
            inner.idle.notify(usize::MAX);
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Waits until `holds()`, woken by `event`. The listener is registered
/// before the second check, so a notification between the two is not lost.
async fn until(event: &Event, holds: impl Fn() -> bool) {
    loop {
        if holds() {
            return;
        }
        let listener = event.listen();
        if holds() {
            return;
        }
        listener.await;
    }
}

// ---------------------------------------------------------------------------
// Listeners and streams

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
}

/// A listening socket, registered with the async reactor.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener (IPv4 or IPv6).
    Tcp(Async<std::net::TcpListener>),
    /// A unix stream listener.
    Unix(Async<std::os::unix::net::UnixListener>),
}

impl Listener {
    fn from_fd(kind: Kind, fd: OwnedFd) -> io::Result<Listener> {
        Ok(match kind {
            Kind::Tcp => Listener::Tcp(Async::new(std::net::TcpListener::from(fd))?),
            Kind::Unix => Listener::Unix(Async::new(std::os::unix::net::UnixListener::from(fd))?),
        })
    }

    /// Waits until a connection is pending (another worker may still take
    /// it first).
    async fn readable(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(listener) => listener.readable().await,
            Listener::Unix(listener) => listener.readable().await,
        }
    }

    /// Whether a connection is pending right now.
    fn is_readable_now(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            self,
            rustix::event::PollFlags::IN,
        )];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(1))
    }

    /// How many connections wait in the accept queue: TCP says
    /// (`TCP_INFO` of a listener), for a unix listener it is taken as 1.
    fn pending(&self) -> usize {
        match self {
            Listener::Tcp(listener) => tcp_accept_queue(listener.as_fd()).unwrap_or(1),
            Listener::Unix(_) => 1,
        }
    }

    /// Accepts a pending connection without waiting.
    fn try_accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.get_ref().accept()?;
                tcp_stream(stream, peer)
            }
            Listener::Unix(listener) => {
                let (stream, peer) = listener.get_ref().accept()?;
                Ok((
                    Stream::Unix(Async::new(stream)?.into()),
                    unix_address(&peer),
                ))
            }
        }
    }

    /// Accepts one connection; returns it with the peer's address
    /// (`1.2.3.4:5678`, `[::1]:5678`, `unix:/path` or `unix:(unnamed)`).
    /// TCP connections get `TCP_NODELAY`.
    ///
    /// # Errors
    ///
    /// As `accept(2)`; see [`Acceptor`] for a loop that deals with the
    /// transient ones.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.read_with(|l| l.accept()).await?;
                tcp_stream(stream, peer)
            }
            Listener::Unix(listener) => {
                let (stream, peer) = listener.read_with(|l| l.accept()).await?;
                Ok((
                    Stream::Unix(Async::new(stream)?.into()),
                    unix_address(&peer),
                ))
            }
        }
    }

    /// Waits until `in_flight` is below its limit, then accepts one
    /// connection, counted by the returned guard.
    ///
    /// When `in_flight` is tracked under clusterd ([`Stats::track`]) and this
    /// worker already holds its fair share ([`Board::over_share`]), a pending
    /// connection is left to a sibling that holds fewer for up to
    /// [`scoreboard::DEFER_MAX`] before this worker takes it itself.
    ///
    /// # Errors
    ///
    /// As [`Listener::accept`].
    pub async fn accept_limited(&self, in_flight: &InFlight) -> io::Result<Accepted> {
        in_flight.wait_capacity().await;
        let (stream, peer) = match in_flight.inner.board.get() {
            Some(board) => {
                board.join(in_flight.active());
                self.accept_balanced(board, in_flight).await?
            }
            None => self.accept().await?,
        };
        Ok(Accepted {
            stream,
            peer,
            guard: in_flight.enter(),
        })
    }

    /// Accepts the next connection unless a sibling that holds fewer takes
    /// it within [`scoreboard::DEFER_MAX`].
    async fn accept_balanced(
        &self,
        board: &Board,
        in_flight: &InFlight,
    ) -> io::Result<(Stream, String)> {
        let over_share = || board.over_share(in_flight.active(), || self.pending());
        loop {
            let mut over = over_share();
            if over {
                // Serve what this worker already holds first: a short
                // request finishes and the count drops, and only a worker
                // still over its share after that defers below.
                future::yield_now().await;
                over = over_share();
            }
            // A connection this worker should have is taken at once: waiting
            // for readiness first would cost a turn of the reactor, which a
            // busy executor reaches only after a round of its tasks.
            if !over {
                match self.try_accept() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => return result,
                }
            }
            self.readable().await?;
            let deferred = Instant::now();
            while over_share() && deferred.elapsed() < scoreboard::DEFER_MAX {
                Timer::after(scoreboard::DEFER_TICK).await;
                if !self.is_readable_now() {
                    break; // taken
                }
            }
            match self.try_accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
        }
    }

    /// The bound address, written as in the config (`host:port` or
    /// `unix:/path`).
    ///
    /// # Errors
    ///
    /// As `getsockname(2)`.
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(listener) => Ok(listener.get_ref().local_addr()?.to_string()),
            Listener::Unix(listener) => Ok(unix_address(&listener.get_ref().local_addr()?)),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener) => listener.as_fd(),
        }
    }
}

/// The length of a TCP listener's accept queue: for a socket in the LISTEN
/// state, Linux reports it in `tcpi_unacked` of `TCP_INFO` (what `ss -l`
/// shows as Recv-Q).
fn tcp_accept_queue(listener: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: `tcp_info` is plain integers, so all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and `len` is a valid
    // out-pointer; the kernel writes at most `len` bytes and updates it.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    Ok(info.tcpi_unacked as usize)
}

/// `TCP_LISTEN` of the kernel's `enum tcp_states` (not in the libc crate).
const TCP_LISTEN: u8 = 10;

fn tcp_stream(
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
) -> io::Result<(Stream, String)> {
    // Responses are written in pieces; do not let Nagle hold them.
    let _ = stream.set_nodelay(true);
    Ok((Stream::Tcp(Async::new(stream)?.into()), peer.to_string()))
}

fn unix_address(addr: &std::os::unix::net::SocketAddr) -> String {
    use std::os::linux::net::SocketAddrExt;
    if let Some(path) = addr.as_pathname() {
        format!("unix:{}", path.display())
    } else if let Some(name) = addr.as_abstract_name() {
        format!("unix:@{}", String::from_utf8_lossy(name))
    } else {
        "unix:(unnamed)".to_owned()
    }
}

/// A connection accepted by [`Listener::accept_limited`] or [`Acceptor`].
#[derive(Debug)]
pub struct Accepted {
    /// The connection.
    pub stream: Stream,
    /// The peer's address, as [`Listener::accept`] writes it.
    pub peer: String,
    /// Counts the connection as in flight until dropped; keep it as long as
    /// the connection is open.
    pub guard: Guard,
}

/// What ended the wait between two requests ([`Stream::next_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// A request has begun to arrive: serve it.
    Request,
    /// The peer closed the connection (or it failed).
    Closed,
    /// No request within the idle timeout.
    TimedOut,
    /// The drain began and no request arrived within [`DRAIN_IDLE_GRACE`].
    Draining,
}

/// How long a keep-alive connection that is idle when the drain begins may
/// still deliver a request (see [`Stream::next_request`]).
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);

/// An accepted connection: TCP or unix, readable and writable
/// asynchronously, and cheap to clone (clones share the socket).
#[derive(Debug, Clone)]
pub enum Stream {
    /// A TCP connection.
    Tcp(smol::net::TcpStream),
    /// A unix stream connection.
    Unix(smol::net::unix::UnixStream),
}

impl Stream {
    /// The peer's address, as [`Listener::accept`] writes it.
    ///
    /// # Errors
    ///
    /// As `getpeername(2)` (for example when the peer has gone).
    pub fn peer_addr(&self) -> io::Result<String> {
        match self {
            Stream::Tcp(stream) => Ok(stream.peer_addr()?.to_string()),
            Stream::Unix(stream) => Ok(unix_address(&stream.peer_addr()?)),
        }
    }

    /// Waits until there is something to read: data, or the end of the
    /// stream. An HTTP server uses it to tell an idle keep-alive connection
    /// (close it on shutdown) from one whose next request has begun (serve
    /// it, then close).
    ///
    /// # Errors
    ///
    /// The socket failed.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => {
                let io: Arc<Async<std::net::TcpStream>> = stream.clone().into();
                io.readable().await
            }
            Stream::Unix(stream) => {
                let io: Arc<Async<std::os::unix::net::UnixStream>> = stream.clone().into();
                io.readable().await
            }
        }
    }

    /// Waits, between two requests of a keep-alive connection, for the next
    /// request to begin arriving.
    ///
    /// Returns [`Idle::Closed`] when the peer closed or the socket failed,
    /// [`Idle::TimedOut`] after `idle_timeout`, and [`Idle::Draining`] when the
    /// drain has begun and no request arrived within [`DRAIN_IDLE_GRACE`].
    ///
    /// The grace matters: an HTTP/1.1 client may already have sent its next
    /// request when the server decides to close an idle connection, and it
    /// cannot tell whether the server saw it, so it retries only idempotent
    /// requests; a `POST` would be lost. Under load the next request follows
    /// the last response within microseconds, so it is served (with
    /// `Connection: close`) instead; a connection that is really idle is
    /// closed once the grace ends.
    pub async fn next_request(&self, shutdown: Option<&Shutdown>, idle_timeout: Duration) -> Idle {
        let request = async {
            match self.readable().await {
                Ok(()) => Idle::Request,
                Err(_) => Idle::Closed,
            }
        };
        let timeout = async {
            Timer::after(idle_timeout).await;
            Idle::TimedOut
        };
        match shutdown {
            Some(shutdown) => {
                let drain = async {
                    shutdown.clone().await;
                    Timer::after(DRAIN_IDLE_GRACE).await;
                    Idle::Draining
                };
                request.or(drain).or(timeout).await
            }
            None => request.or(timeout).await,
        }
    }

    /// Shuts down reading, writing or both (`shutdown(2)`), for every clone.
    ///
    /// # Errors
    ///
    /// As `shutdown(2)`.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.shutdown(how),
            Stream::Unix(stream) => stream.shutdown(how),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(stream) => stream.as_fd(),
            Stream::Unix(stream) => stream.as_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_read_vectored(cx, bufs),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_close(cx),
            Stream::Unix(s) => Pin::new(s).poll_close(cx),
        }
    }
}

// ---------------------------------------------------------------------------
// The accept loop

/// An accept loop that balances load and stops at once on shutdown.
///
/// [`Acceptor::accept`] accepts only while the [`InFlight`] count is below its
/// limit, retries the errors `accept(2)` documents as transient, backs off
/// when the process runs out of fds, and returns `Ok(None)` as soon as the
/// [`Shutdown`] resolves, closing the listener at that moment so that the
/// kernel hands new connections to the other workers.
#[derive(Debug)]
pub struct Acceptor {
    /// `None` once closed.
    listener: Option<Listener>,
    in_flight: InFlight,
    shutdown: Shutdown,
    /// Connections returned since the last yield (see [`ACCEPT_BATCH`]).
    batch: u32,
}

impl Acceptor {
    /// Accepts from `listener`, counting connections in `in_flight`, until
    /// `shutdown` resolves.
    pub fn new(listener: Listener, in_flight: InFlight, shutdown: Shutdown) -> Acceptor {
        Acceptor {
            listener: Some(listener),
            in_flight,
            shutdown,
            batch: 0,
        }
    }

    /// The next connection, or `None` once the shutdown has begun (the
    /// listener is closed then). Connections already pending are taken back
    /// to back; after every [`ACCEPT_BATCH`] of them it yields to the
    /// caller's other tasks once, so that a flood of new connections cannot
    /// starve the ones already accepted.
    ///
    /// # Errors
    ///
    /// A non-transient `accept(2)` error (the listener is unusable).
    pub async fn accept(&mut self) -> io::Result<Option<Accepted>> {
        let Acceptor {
            listener,
            in_flight,
            shutdown,
            batch,
        } = self;
        if *batch >= ACCEPT_BATCH {
            *batch = 0;
            future::yield_now().await;
        }
        let mut exhausted_logged = false;
        loop {
            let Some(current) = listener.as_ref() else {
                return Ok(None);
            };
            let next = async {
                shutdown.clone().await;
                Next::Shutdown
            }
            .or(async { Next::Accepted(current.accept_limited(in_flight).await) })
            .await;
            match next {
                Next::Shutdown => {
                    *listener = None;
                    return Ok(None);
                }
                Next::Accepted(Ok(accepted)) => {
                    *batch += 1;
                    return Ok(Some(accepted));
                }
                Next::Accepted(Err(e)) if is_transient_accept_error(&e) => {}
                Next::Accepted(Err(e)) if is_exhaustion(&e) => {
                    if !exhausted_logged {
                        exhausted_logged = true;
                        say!("clusterd::worker: accept: {e}; retrying");
                    }
                    let _ = async {
                        Timer::after(EXHAUSTED_BACKOFF).await;
                    }
                    .or(async {
                        shutdown.clone().await;
                    })
                    .await;
                }
                Next::Accepted(Err(e)) => return Err(e),
            }
        }
    }

    /// Closes the listener now; [`Acceptor::accept`] returns `None` from then on.
    pub fn close(&mut self) {
        self.listener = None;
    }

    /// Whether the listener is closed.
    pub fn is_closed(&self) -> bool {
        self.listener.is_none()
    }

    /// The counter connections are accepted against.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

enum Next {
    Shutdown,
    Accepted(io::Result<Accepted>),
}

/// Errors `accept(2)` reports for one failed connection, not the listener
/// ("treat them like EAGAIN by retrying", accept(2) on Linux).
fn is_transient_accept_error(e: &io::Error) -> bool {
    [
        Errno::CONNABORTED,
        Errno::INTR,
        Errno::PROTO,
        Errno::PERM,
        Errno::NETDOWN,
        Errno::NOPROTOOPT,
        Errno::HOSTDOWN,
        Errno::NONET,
        Errno::HOSTUNREACH,
        Errno::OPNOTSUPP,
        Errno::NETUNREACH,
        Errno::TIMEDOUT,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// Out of fds or memory: retrying at once would spin.
fn is_exhaustion(e: &io::Error) -> bool {
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

// ---------------------------------------------------------------------------
// Helpers

/// Locks a mutex, ignoring poisoning: every value guarded here stays valid
/// whatever panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Prefixes an error's message, keeping its kind.
fn with_context(e: io::Error, context: fmt::Arguments<'_>) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::MAX_IPC_RECORD;
    use rustix::net::{SocketFlags, socketpair};
    use smol::LocalExecutor;
    use smol::future::poll_once;
    use std::io::{Read, Write};

    /// Fails the test instead of hanging it.
    fn within<T>(fut: impl Future<Output = T>) -> T {
        smol::block_on(fut.or(async {
            Timer::after(Duration::from_secs(10)).await;
            panic!("timed out");
        }))
    }

    /// The clusterd end of an IPC channel.
    struct Clusterd {
        fd: OwnedFd,
        /// The listener whose fd was sent in `Hello` (our own copy).
        listener: std::net::TcpListener,
    }

    impl Clusterd {
        fn send(&self, bytes: &[u8]) {
            fdpass::send_with_fds(&self.fd, bytes, &[]).unwrap();
        }

        fn recv(&self) -> Option<FromWorker> {
            let mut buf = vec![0u8; MAX_IPC_RECORD];
            let got = fdpass::recv_with_fds(&self.fd, &mut buf, RecvFlags::empty()).unwrap();
            (got.len > 0).then(|| proto::decode(&buf[..got.len], MAX_IPC_RECORD).unwrap())
        }
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        // Never let a broken test hang on a receive.
        sockopt::set_socket_timeout(&a, Timeout::Recv, Some(Duration::from_secs(10))).unwrap();
        (a, b)
    }

    fn hello_record(listener: &std::net::TcpListener) -> Vec<u8> {
        proto::encode(&ToWorker::Hello(Hello {
            worker_id: 3,
            generation: 7,
            listeners: vec![ListenerInfo {
                name: "http".into(),
                address: listener.local_addr().unwrap().to_string(),
            }],
            scoreboard: None,
        }))
    }

    /// A worker connected to a fake clusterd that sent `Hello` with one TCP
    /// listener named `http`.
    fn connected() -> (Worker, Clusterd) {
        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[listener.as_fd()]).unwrap();
        let worker = Worker::from_fd(theirs).unwrap();
        (worker, Clusterd { fd: ours, listener })
    }

    #[test]
    fn hello_ready_drain_drained() {
        let (mut worker, clusterd) = connected();
        assert_eq!((worker.id(), worker.generation()), (3, 7));
        assert!(worker.is_supervised());
        assert_eq!(worker.listeners()[0].name, "http");
        let address = clusterd.listener.local_addr().unwrap();

        let listener = worker.take_listener("http").unwrap();
        assert_eq!(listener.local_addr().unwrap(), address.to_string());
        let mut client = std::net::TcpStream::connect(address).unwrap();
        let (mut stream, peer) = within(listener.accept()).unwrap();
        assert_eq!(peer, client.local_addr().unwrap().to_string());
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        within(smol::io::AsyncReadExt::read_exact(&mut stream, &mut buf)).unwrap();
        assert_eq!(&buf, b"ping");

        within(worker.ready()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Ready));
        within(worker.ready()).unwrap(); // a second call sends nothing

        let shutdown = worker.shutdown();
        assert!(within(poll_once(shutdown.clone())).is_none());
        clusterd.send(&proto::encode(&ToWorker::Drain { timeout_ms: 1500 }));
        let drain = ShutdownReason::Drain {
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(within(shutdown.clone()), drain);
        assert_eq!(within(worker.shutdown()), drain);
        assert!(shutdown.is_triggered());

        within(worker.drained()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Drained));
        // The worker is gone, so is the channel.
        assert_eq!(clusterd.recv(), None);
    }

    #[test]
    fn shutdown_resolves_when_clusterd_goes_away() {
        let (worker, clusterd) = connected();
        let shutdowns: Vec<Shutdown> = (0..3).map(|_| worker.shutdown()).collect();
        drop(clusterd);
        for shutdown in shutdowns {
            assert_eq!(within(shutdown), ShutdownReason::Disconnected);
        }
        // Nobody to tell: not an error.
        within(worker.drained()).unwrap();
    }

    #[test]
    fn untaken_listeners_close_on_shutdown() {
        let (mut worker, clusterd) = connected();
        drop(clusterd);
        within(worker.shutdown());
        let err = worker.take_listener("http").unwrap_err();
        assert!(err.to_string().contains("shutting down"), "{err}");
    }

    #[test]
    fn take_listener_names_the_listeners_there_are() {
        let (mut worker, _clusterd) = connected();
        let err = worker.take_listener("htp").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("listeners: http"), "{err}");
        worker.take_listener("http").unwrap();
        let err = worker.take_listener("http").unwrap_err();
        assert!(err.to_string().contains("already taken"), "{err}");
    }

    #[test]
    fn bad_records_are_ignored() {
        let (worker, clusterd) = connected();
        clusterd.send(&[0xff; 40]);
        clusterd.send(&[1, 200]);
        clusterd.send(&vec![1u8; MAX_IPC_RECORD + 100]);
        clusterd.send(&hello_record(&clusterd.listener));
        let mut wrong_version = proto::encode(&ToWorker::Drain { timeout_ms: 1 });
        wrong_version[0] = 99;
        clusterd.send(&wrong_version);
        // A record with an fd attached that nobody asked for.
        let (r, _w) = std::io::pipe().unwrap();
        fdpass::send_with_fds(&clusterd.fd, &[7, 7], &[r.as_fd()]).unwrap();
        // Still listening: the Drain below is what ends it, not the garbage.
        clusterd.send(&proto::encode(&ToWorker::Drain { timeout_ms: 2 }));
        assert_eq!(
            within(worker.shutdown()),
            ShutdownReason::Drain {
                timeout: Duration::from_millis(2)
            }
        );
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut record = hello_record(&listener);
        const { assert!(proto::VERSION < 251, "one-byte varint") };
        record[0] = 99;
        fdpass::send_with_fds(&ours, &record, &[listener.as_fd()]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            text.contains("version 99") && text.contains(&format!("version {}", proto::VERSION)),
            "{text}"
        );
    }

    #[test]
    fn hello_must_come_first_and_match_its_fds() {
        let (ours, theirs) = pair();
        drop(ours);
        let err = Worker::from_fd(theirs).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("0 fds"), "{err}");

        let (ours, theirs) = pair();
        ours_send(&ours, &proto::encode(&ToWorker::Drain { timeout_ms: 1 }));
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("expected Hello"), "{err}");

        // An fd that is not a listening socket.
        let (ours, theirs) = pair();
        let (r, _w) = std::io::pipe().unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[r.as_fd()]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("listener http="), "{err}");

        // Not a seqpacket socket at all.
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Worker::from_fd(stream.into()).is_err());
    }

    fn ours_send(fd: &OwnedFd, bytes: &[u8]) {
        fdpass::send_with_fds(fd, bytes, &[]).unwrap();
    }

    #[test]
    fn env_fd_must_be_a_number() {
        for value in ["", "abc", "-1", "3x"] {
            let err = take_env_fd(OsStr::new(value)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().starts_with(ENV_FD), "{err}");
        }
    }

    #[test]
    fn stats_are_reported_after_ready() {
        let (worker, clusterd) = connected();
        let stats = worker.stats();
        stats.count_request();
        stats.add_requests(2);
        let in_flight = InFlight::default();
        let _guard = in_flight.enter();
        stats.set_active(9); // overridden by the tracked counter
        stats.track(&in_flight);
        within(worker.ready()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Ready));
        assert_eq!(
            clusterd.recv(),
            Some(FromWorker::Stats {
                requests: 3,
                active: 1
            })
        );
        within(worker.drained()).unwrap();
        // Nothing after Drained but the end of the channel.
        assert_eq!(clusterd.recv(), Some(FromWorker::Drained));
        assert_eq!(clusterd.recv(), None);
    }

    #[test]
    fn standalone_binds_the_fallback_addresses() {
        let dir = std::env::temp_dir().join(format!("clusterd-worker-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let unix = format!("unix:{}", path.display());
        for _ in 0..2 {
            // The second round finds the stale socket file of the first.
            let mut worker =
                Worker::standalone(&[("http", "127.0.0.1:0"), ("admin", &unix)], None).unwrap();
            assert!(!worker.is_supervised());
            assert_eq!((worker.id(), worker.generation()), (0, 0));
            let http = &worker.listeners()[0];
            assert!(http.address.starts_with("127.0.0.1:") && !http.address.ends_with(":0"));
            assert_eq!(worker.listeners()[1].address, unix);
            within(worker.ready()).unwrap();

            let admin = worker.take_listener("admin").unwrap();
            let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let (stream, peer) = within(admin.accept()).unwrap();
            assert_eq!(peer, "unix:(unnamed)");
            client.write_all(b"x").unwrap();
            within(stream.readable()).unwrap();
            let mut byte = [0u8; 1];
            let mut reader = stream.clone();
            within(smol::io::AsyncReadExt::read_exact(&mut reader, &mut byte)).unwrap();
            drop((stream, reader));
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();

            let shutdown = worker.shutdown();
            within(worker.drained()).unwrap();
            assert_eq!(within(shutdown), ShutdownReason::Disconnected);
        }
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().to_string();
        let err = Worker::standalone(&[("http", &busy)], None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&format!("http={busy}")), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guards_give_their_slot_back() {
        let in_flight = InFlight::new(2);
        assert_eq!(in_flight.limit(), Some(2));
        within(in_flight.wait_idle());
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.active(), 2);
        assert!(!in_flight.has_capacity());
        let mut capacity = Box::pin(in_flight.wait_capacity());
        let mut idle = Box::pin(in_flight.wait_idle());
        assert!(within(poll_once(&mut capacity)).is_none());
        assert!(within(poll_once(&mut idle)).is_none());
        drop(a);
        within(capacity);
        assert!(within(poll_once(&mut idle)).is_none());
        // A guard moved into a task that is dropped half-way (a client that
        // disconnected mid-request) still gives its slot back.
        let task = smol::spawn(async move {
            let _b = b;
            future::pending::<()>().await;
        });
        within(task.cancel());
        within(idle);
        assert_eq!(in_flight.active(), 0);

        assert_eq!(InFlight::unlimited().limit(), None);
        assert_eq!(InFlight::new(0).limit(), Some(1));
        assert_eq!(InFlight::default().limit(), Some(InFlight::DEFAULT_LIMIT));
    }

    #[test]
    fn accept_limited_waits_below_the_limit() {
        let (mut worker, clusterd) = connected();
        let listener = worker.take_listener("http").unwrap();
        let address = clusterd.listener.local_addr().unwrap();
        let in_flight = InFlight::new(1);
        let _c1 = std::net::TcpStream::connect(address).unwrap();
        let _c2 = std::net::TcpStream::connect(address).unwrap();
        let first = within(listener.accept_limited(&in_flight)).unwrap();
        assert_eq!(in_flight.active(), 1);
        // A connection is waiting, but the worker is at its limit.
        let mut second = Box::pin(listener.accept_limited(&in_flight));
        assert!(within(poll_once(&mut second)).is_none());
        drop(first);
        let second = within(second).unwrap();
        assert_eq!(in_flight.active(), 1);
        drop(second);
        assert_eq!(in_flight.active(), 0);
    }

    /// An [`Acceptor`] counting in `in_flight` on a connected worker's
    /// listener, with the worker and the fake clusterd (keep them alive) and
    /// the listener's address.
    fn acceptor(in_flight: &InFlight) -> (Acceptor, Worker, Clusterd, std::net::SocketAddr) {
        let (mut worker, clusterd) = connected();
        let acceptor = Acceptor::new(
            worker.take_listener("http").unwrap(),
            in_flight.clone(),
            worker.shutdown(),
        );
        let address = clusterd.listener.local_addr().unwrap();
        (acceptor, worker, clusterd, address)
    }

    /// `n` clients connected to `address` (waiting in its accept queue).
    fn clients(address: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect()
    }

    #[test]
    fn acceptor_stops_and_closes_the_listener_on_shutdown() {
        let in_flight = InFlight::default();
        let (mut acceptor, _worker, clusterd, address) = acceptor(&in_flight);
        let _client = clients(address, 1);
        let conn = within(acceptor.accept()).unwrap().unwrap();
        assert_eq!(acceptor.in_flight().active(), 1);

        let mut next = Box::pin(acceptor.accept());
        assert!(within(poll_once(&mut next)).is_none());
        clusterd.send(&proto::encode(&ToWorker::Drain { timeout_ms: 10 }));
        assert!(within(next).unwrap().is_none());
        assert!(acceptor.is_closed());
        assert!(within(acceptor.accept()).unwrap().is_none());
        // The connection accepted before the drain is still counted.
        assert_eq!(in_flight.active(), 1);
        drop(conn);
        within(in_flight.wait_idle());
    }

    #[test]
    fn a_tcp_listener_reports_its_accept_queue() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        assert_eq!(tcp_accept_queue(listener.as_fd()).unwrap(), 0);
        let _clients = clients(address, 3);
        assert_eq!(tcp_accept_queue(listener.as_fd()).unwrap(), 3);
        let _taken = listener.accept().unwrap();
        assert_eq!(tcp_accept_queue(listener.as_fd()).unwrap(), 2);
        let client = std::net::TcpStream::connect(address).unwrap();
        assert!(tcp_accept_queue(client.as_fd()).is_err(), "not a listener");
    }

    /// Runs `body` on a local executor beside a task that counts how often
    /// it gets to run (it yields after each count); returns what `body`
    /// returned and the count of the rounds it let happen.
    fn with_busy_neighbour<T>(body: impl Future<Output = T>) -> (T, u64) {
        let ex = LocalExecutor::new();
        let rounds = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let done = std::rc::Rc::new(std::cell::Cell::new(false));
        let neighbour = ex.spawn({
            let (rounds, done) = (rounds.clone(), done.clone());
            async move {
                // Bounded: a broken test ends instead of spinning.
                for _ in 0..10_000_000 {
                    if done.get() {
                        break;
                    }
                    rounds.set(rounds.get() + 1);
                    future::yield_now().await;
                }
            }
        });
        let out = within(ex.run(async {
            // Let the neighbour start, so that it is queued from now on.
            future::yield_now().await;
            let before = rounds.get();
            let out = body.await;
            let spent = rounds.get() - before;
            done.set(true);
            (out, spent)
        }));
        within(ex.run(neighbour));
        out
    }

    #[test]
    fn acceptor_takes_pending_connections_back_to_back() {
        let in_flight = InFlight::default();
        let (mut acceptor, _worker, _clusterd, address) = acceptor(&in_flight);
        let _clients = clients(address, 10);
        // A worker busy with other tasks still takes the whole queue in one
        // go: one round of its tasks per connection would keep the tenth
        // client waiting for ten rounds.
        let (accepted, rounds) = with_busy_neighbour(async {
            let mut accepted = Vec::new();
            for _ in 0..10 {
                accepted.push(acceptor.accept().await.unwrap().unwrap());
            }
            accepted
        });
        assert_eq!(accepted.len(), 10);
        assert_eq!(rounds, 0, "accepting yielded to the other tasks");
        assert_eq!(in_flight.active(), 10);
    }

    #[test]
    fn a_balanced_worker_takes_its_share_of_a_burst_back_to_back() {
        let in_flight = InFlight::default();
        // This worker has cell 0; a sibling that accepts but is stuck (it
        // never takes a connection) holds none.
        let cells: &'static [AtomicU32] =
            vec![AtomicU32::new(scoreboard::VACANT), AtomicU32::new(0)].leak();
        in_flight.inner.board.set(Board::over(cells, 0)).unwrap();
        let (mut acceptor, _worker, _clusterd, address) = acceptor(&in_flight);
        let _clients = clients(address, 10);
        let (mut accepted, rounds) = with_busy_neighbour(async {
            let mut accepted = Vec::new();
            for _ in 0..5 {
                accepted.push(acceptor.accept().await.unwrap().unwrap());
            }
            accepted
        });
        assert_eq!(rounds, 0, "its share of the burst, without yielding");
        assert_eq!(cells[0].load(Ordering::Relaxed), 5, "published");
        // Over its share now: it leaves the next one to the sibling, serving
        // its own tasks meanwhile, and takes it itself when the sibling
        // does not (so a stuck sibling never loses a connection).
        let (sixth, rounds) = with_busy_neighbour(acceptor.accept());
        accepted.push(sixth.unwrap().unwrap());
        assert!(rounds > 0, "it deferred to the sibling first");
        assert_eq!(in_flight.active(), 6);
    }

    #[test]
    fn a_crowded_worker_sheds_only_its_excess() {
        let untracked = InFlight::default();
        let _held: Vec<Guard> = (0..10).map(|_| untracked.enter()).collect();
        assert!(!untracked.crowded(), "not on a board: never crowded");

        let in_flight = InFlight::default();
        let cells: &'static [AtomicU32] =
            vec![AtomicU32::new(scoreboard::VACANT), AtomicU32::new(0)].leak();
        let board = Board::over(cells, 0);
        board.join(0);
        in_flight.inner.board.set(board).unwrap();
        let mut held: Vec<Guard> = (0..10).map(|_| in_flight.enter()).collect();
        // 10 held, the sibling none: a share is 5, the tolerance 1, so 4
        // connections should move; then it waits CROWDED_EVERY calls.
        let shed = (0..CROWDED_EVERY).filter(|_| in_flight.crowded()).count();
        assert_eq!(shed, 4);
        // Those 4 closed; the sibling has taken 3 of the clients back.
        held.truncate(6);
        cells[1].store(3, Ordering::Relaxed);
        let shed = (0..=CROWDED_EVERY).filter(|_| in_flight.crowded()).count();
        assert_eq!(shed, 0, "6 / 3: a share of 5, and 1");
        cells[1].store(scoreboard::WITHDRAWN, Ordering::Relaxed);
        let shed = (0..=CROWDED_EVERY).filter(|_| in_flight.crowded()).count();
        assert_eq!(shed, 0, "the sibling is draining: nowhere to go");
        cells[1].store(0, Ordering::Relaxed);
        let shed = (0..=CROWDED_EVERY).filter(|_| in_flight.crowded()).count();
        assert_eq!(shed, 2, "6 / 0: a share of 3, and 1");
        drop(held);
    }

    #[test]
    fn shutdown_reasons_read_well() {
        let drain = ShutdownReason::Drain {
            timeout: Duration::from_secs(30),
        };
        assert_eq!(drain.to_string(), "DRAIN from clusterd, SIGKILL after 30s");
        assert_eq!(ShutdownReason::Terminate.to_string(), "SIGTERM");
    }
}
