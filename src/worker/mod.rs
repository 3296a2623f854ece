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
//!   [`Stats`] at most once a second when they changed. It has no periodic
//!   timer: a change of the figures wakes it (then it waits a second for
//!   more to coalesce them into one record), so an idle worker is never
//!   woken at all (no timer, no polling). A second SIGINT
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
//! that holds fewer, for
//! [`scoreboard::DEFER_MAX`](crate::scoreboard::DEFER_MAX), before taking
//! it. They also accept only while the count is below its limit (as nginx
//! stops accepting when a worker's connections run low). [`Acceptor::accept`]
//! takes the connections already pending back to back, yielding to the
//! worker's other tasks after every [`ACCEPT_BATCH`], so a new connection
//! does not wait for a round of a CPU-busy worker's tasks per connection
//! queued ahead of it. [`InFlight::crowded`] tells a worker holding more than
//! its share when to end a keep-alive connection, so that clients move onto
//! a replacement or new workers. Each accepted connection carries a
//! [`Guard`] that releases its slot when dropped, however the connection
//! ends, so a client that disconnects mid-request can never leave a drain
//! waiting.
//!
//! # Idle connections
//!
//! The limit counts idle connections too. [`Accepted::next_request`], the
//! wait before each request, bounds them with the counter's [`IdlePolicy`]:
//! a first-byte deadline for a new connection (5 s by default), the
//! keep-alive idle time between requests (30 s), and, at the limit with a
//! connection waiting in the accept queue, the eviction of the oldest
//! connection that has not sent a byte (else the one idle longest) to admit
//! it. A few hundred sockets that never send a byte therefore cannot lock
//! real clients out.
//!
//! # Examples
//!
//! A complete worker: serve until clusterd says drain, then let the open
//! connections finish.
//!
//! ```no_run
//! use clusterd::worker::{Acceptor, Idle, InFlight, Worker};
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
//!                 let mut conn = conn;
//!                 // Bounded by the IdlePolicy; closed at once to make room
//!                 // when the worker is at its limit.
//!                 if conn.next_request(None).await == Idle::Request {
//!                     let mut buf = [0u8; 1024];
//!                     if let Ok(n) = conn.stream.read(&mut buf).await {
//!                         let _ = conn.stream.write_all(&buf[..n]).await;
//!                     }
//!                 }
//!                 drop(conn); // the slot, also released if the task is dropped
//!             })
//!             .detach();
//!         }
//!         in_flight.wait_idle().await;
//!         worker.drained().await
//!     })
//! }
//! ```

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_signal::{Signal, Signals};
use smol::Async;

use crate::proto::FromWorker;
pub use crate::proto::ListenerInfo;
use crate::scoreboard::Board;

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

// One concept per module; the public items are re-exported below, so the
// API is `clusterd::worker::{...}` whatever file an item lives in.
// - connect: CLUSTERD_FD, the Hello record, standalone binding.
// - background: the `clusterd-worker` thread (records, signals, Stats).
// - shutdown: Shutdown and ShutdownReason.
// - stats: Stats, and the link from the tracked InFlight to the scoreboard.
// - inflight: InFlight and Guard (the limit, the share, `crowded`).
// - idle: IdlePolicy, Accepted::next_request, evicting idle connections.
// - listener: Listener, its balanced accept, Accepted.
// - inbox: connections clusterd passes (`dispatch = clusterd`).
// - stream: Stream and the wait between two requests (Idle).
// - acceptor: Acceptor, the accept loop.
// - testing (tests only): the fake clusterd the unit tests share.
mod acceptor;
mod background;
mod connect;
mod idle;
mod inbox;
mod inflight;
mod listener;
mod shutdown;
mod stats;
mod stream;
#[cfg(test)]
mod testing;

pub use acceptor::{ACCEPT_BATCH, Acceptor};
pub use connect::ENV_FD;
pub use idle::IdlePolicy;
pub use inflight::{CROWDED_EVERY, Guard, InFlight};
pub use listener::{Accepted, Listener};
pub use shutdown::{Shutdown, ShutdownReason};
pub use stats::Stats;
pub use stream::{DRAIN_IDLE_GRACE, Idle, Stream};

use background::{Background, is_disconnect, send};
use connect::{bind, check_ipc_socket, listener_kind, receive_hello, take_env_fd};
use listener::Kind;
use shutdown::ShutdownState;

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
        // Held across the trigger: a task woken by it that calls
        // `take_listener` waits for the listeners to be closed.
        let mut fds = lock(&self.fds);
        let first = self.shutdown.trigger(reason);
        if first {
            fds.iter_mut().for_each(|fd| *fd = None);
            drop(fds);
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
                let dispatched =
                    std::env::var_os(crate::proto::ENV_DISPATCH).is_some_and(|v| v == "clusterd");
                Worker::supervised(fd, Some(signals), dispatched)
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
        Worker::supervised(fd, None, false)
    }

    /// [`Worker::from_fd`] for a `dispatch = clusterd` pool: the worker
    /// announces its inboxes and takes connections from clusterd.
    #[doc(hidden)]
    pub fn from_fd_dispatched(fd: OwnedFd) -> io::Result<Worker> {
        check_ipc_socket(&fd)?;
        Worker::supervised(fd, None, true)
    }

    fn supervised(fd: OwnedFd, signals: Option<Signals>, dispatched: bool) -> io::Result<Worker> {
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
        if dispatched && !kinds.is_empty() {
            // From now on clusterd passes the connections; the listening
            // sockets are closed here, so this worker never accepts one.
            match inbox::announce(&fd, kinds.len()) {
                Ok(inboxes) => {
                    kinds = inboxes
                        .into_iter()
                        .map(|fd| Some((Kind::Inbox, fd)))
                        .collect();
                }
                Err(e) => say!(
                    "clusterd::worker (worker {}): cannot take connections from clusterd \
                     ({e}); accepting from the listeners instead",
                    hello.worker_id
                ),
            }
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
            let address = self
                .listeners
                .iter()
                .find(|l| l.name == name)
                .map_or("", |l| l.address.as_str());
            return Listener::from_fd(kind, fd, address);
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
        // The figures may be sent from now on: the first report follows.
        self.shared.stats.cells.changed.notify(1);
        Ok(())
    }

    /// A future that resolves when the worker should drain: clusterd sent
    /// `Drain`, the channel to clusterd closed, SIGTERM or SIGINT arrived, or
    /// the [`Worker`] was dropped. Clone it freely.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.shared.shutdown.clone())
    }

    /// The watchdog's heartbeat: a future that tells clusterd every half
    /// period that this worker's executor is alive, for as long as it runs.
    /// Spawn it on the executor whose health it vouches for (the one that
    /// runs the accept loop and the requests): if that executor blocks (a
    /// CPU loop, a deadlock), the beats stop and clusterd replaces the
    /// worker (see `watchdog` in clusterd.conf(5)).
    ///
    /// It resolves at once, sending nothing, when clusterd set no watchdog
    /// (`WATCHDOG_USEC` is not in the environment, or `WATCHDOG_PID` names
    /// another process) or without clusterd, and when the channel closes.
    ///
    /// ```no_run
    /// # fn demo(worker: &clusterd::worker::Worker, ex: &smol::LocalExecutor<'_>) {
    /// ex.spawn(worker.watchdog()).detach();
    /// # }
    /// ```
    pub fn watchdog(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let ipc = self.ipc.clone();
        let period = watchdog_period();
        async move {
            let (Some(ipc), Some(period)) = (ipc, period) else {
                return;
            };
            loop {
                if send(&ipc, &FromWorker::Heartbeat).await.is_err() {
                    return;
                }
                smol::Timer::after(period / 2).await;
            }
        }
    }

    /// A handle for reporting load to clusterd (shown by `clusterctl status`).
    /// The latest values are sent at most once a second, when they changed,
    /// after [`Worker::ready`]; nothing is sent (and nothing wakes) while
    /// they stay the same. Standalone, the values are kept but not sent.
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

/// The watchdog period clusterd set (`WATCHDOG_USEC`), if it is meant for
/// this process (`WATCHDOG_PID`, when set, is its pid).
fn watchdog_period() -> Option<std::time::Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::proto::{self, ToWorker};
    use smol::future::poll_once;
    use std::io::{Read, Write};
    use std::time::Duration;

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
        // Repeated: the background thread starts the shutdown while this
        // thread wakes, and the listeners must be gone by the time it looks.
        for _ in 0..200 {
            let (mut worker, clusterd) = connected();
            drop(clusterd);
            within(worker.shutdown());
            let err = worker.take_listener("http").unwrap_err();
            assert!(err.to_string().contains("shutting down"), "{err}");
        }
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
}
