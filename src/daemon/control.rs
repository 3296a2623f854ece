//! The control socket: where `clusterctl` talks to clusterd.
//!
//! A unix stream socket, mode 0600 in a 0700 folder. Each connection carries
//! **one request**: the client sends one [`proto::frame`] holding a
//! [`Request`], clusterd answers with one or more [`Response`] frames (a
//! rolling restart streams [`Response::Progress`] before its final
//! [`Response::Restarted`]) and then closes the connection. A client that
//! wants to send another request opens another connection.
//!
//! [`ControlSocket::bind`] creates the socket (replacing a stale one, refusing
//! to steal one a live clusterd answers on); [`ControlSocket::serve`] accepts
//! clients and hands their requests to the main loop as [`ControlRequest`]s.
//! Dropping the [`ControlSocket`] removes the socket file.
//!
//! # Implementation
//!
//! - `serve` owns a private [`LocalExecutor`] that runs one task per client,
//!   so `serve` borrows nothing from the caller's executor and dropping the
//!   `serve` future disconnects every client. It must be polled for clients to
//!   make progress (spawn it on the main loop's executor).
//! - Every client is checked with `SO_PEERCRED`: only the daemon's euid and
//!   root may talk to it, whatever the file mode says. Anyone else gets one
//!   [`Response::Error`] frame and is disconnected.
//! - The request frame (length prefix, at most [`proto::MAX_REQUEST`] bytes,
//!   refused before allocating) must arrive within [`READ_TIMEOUT`]. Every
//!   response frame must be written within [`WRITE_TIMEOUT`] or the client is
//!   dropped, so a client that stops reading cannot pin memory.
//! - At most [`MAX_CLIENTS`] clients at once (so at most that many file
//!   descriptors and request buffers). When all slots are taken, no new
//!   client is accepted until there is room: it waits in the kernel's listen
//!   queue, which costs clusterd nothing, and a real client there has sent
//!   its request by the time it is accepted. Room is made by dropping the
//!   oldest client that has sent nothing, else the oldest that has sent only
//!   part of a request; never one accepted less than [`GRACE`] ago (a real
//!   client sends right after connecting, but may not have been scheduled
//!   yet) and never one whose bytes wait unread (its task reads them first),
//!   so a flood of idle or stuck connections that reconnect can slow the
//!   operator's `clusterctl` down (each slot admits one client per
//!   [`GRACE`]) but not lock it out. Each dropped client is told which it
//!   was. If every slot holds a request being served and none frees within
//!   [`BUSY_WAIT`], the next client gets a "busy" error and is closed. A
//!   burst is logged once: `control.busy` when it starts,
//!   `control.busy_end` with its counts after [`BUSY_QUIET`] without a
//!   client dropped or refused.
//! - [`ControlSocket::serve_while`] serves until the main loop's future ends,
//!   then writes the replies the main loop left queued (a `Stop` answered
//!   just before clusterd exits reaches its client) for at most
//!   [`FLUSH_TIMEOUT`]; clients still waiting are told clusterd is shutting
//!   down.
//! - The folder is opened without following a symbolic link and must be
//!   private ([`ControlSocket::bind`]); the bind is serialized with a lock
//!   file only the owner can open, not with a lock on the folder (anyone who
//!   can read the folder could hold that one).
//! - `accept` failing (`EMFILE`, `ENFILE`, ...) is logged once and retried
//!   every [`ACCEPT_BACKOFF`], so it cannot spin the CPU.
//! - Writes use `send(MSG_NOSIGNAL)`: a client that went away is an error,
//!   never a `SIGPIPE`.

use crate::proto::{self, FRAME_HEADER, MAX_REQUEST, MAX_RESPONSE, Request, Response};
use rustix::fs::{Mode, OFlags};
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::Uid;
use smol::channel::{Receiver, Sender};
use smol::future::FutureExt as _;
use smol::io::AsyncReadExt as _;
use smol::lock::{Semaphore, SemaphoreGuardArc};
use smol::{Async, LocalExecutor, Timer};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most clients served at once.
pub const MAX_CLIENTS: usize = 64;

/// A client must send its whole request frame within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Each response frame must be written within this, or the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause before retrying a failed `accept` (e.g. out of file descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long [`ControlSocket::bind`] waits for a clusterd already listening on
/// the path to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`ControlSocket::bind`] waits for another clusterd's lock (held
/// while it checks and binds its own socket).
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A client is never dropped to make room for another before it has been
/// connected this long. A real client sends its request microseconds after
/// connecting, unless it is not scheduled: this is that margin. It also sets
/// the pace of a flood: each of the [`MAX_CLIENTS`] slots admits at most one
/// new client per `GRACE` while none is free.
pub const GRACE: Duration = Duration::from_millis(100);

/// When every slot holds a request being served, how long a new client
/// waits for one to free before it is told clusterd is busy.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);

/// A burst of clients over the limit ends after this long without a client
/// dropped or refused.
pub const BUSY_QUIET: Duration = Duration::from_secs(10);

/// After the main loop ends, how long queued replies may take to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// What is appended to the socket's file name to name its lock file.
const LOCK_SUFFIX: &str = ".lock";

/// Longest path a `sockaddr_un` holds (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A request from a control client and where to send its replies.
///
/// The main loop sends one or more [`Response`]s on `reply` and then drops it;
/// the connection is closed once `reply` is dropped and every response is
/// written. `reply` is unbounded, so sending never waits (use
/// [`Sender::try_send`] from synchronous code); a send error means the client
/// has gone away and can be ignored.
///
/// The main loop must not close its receiver while requests are queued in
/// it and keep `serve` running: a queued request keeps its client waiting.
/// (Dropping the `serve` future disconnects everyone; a closed, empty
/// channel makes new clients get "clusterd is shutting down".)
#[derive(Debug)]
pub struct ControlRequest {
    pub request: Request,
    pub reply: Sender<Response>,
}

/// The bound control socket. Dropping it removes the socket file (if it is
/// still the one this value created).
#[derive(Debug)]
pub struct ControlSocket {
    /// Where the socket lives; removed on drop.
    path: PathBuf,
    listener: Async<UnixListener>,
    /// `(st_dev, st_ino)` of the socket file created by `bind`, so that drop
    /// never removes a socket someone else put at the same path.
    id: (u64, u64),
    /// The daemon's effective uid: with root, the only peer allowed in.
    owner: Uid,
}

impl ControlSocket {
    /// Creates the control socket at `path`.
    ///
    /// - The folder is created with mode 0700 if it does not exist. An
    ///   existing one must be a directory (not a symbolic link to one: its
    ///   owner could point it elsewhere later) owned by this user or root and
    ///   not writable by others unless sticky (like `/tmp`); its mode is left
    ///   alone. Otherwise someone else could replace the socket.
    /// - A socket file nobody listens on (connecting is refused) is a stale
    ///   leftover and is replaced. If a clusterd answers on it, binding fails
    ///   naming its pid; if something else listens there, binding fails too.
    ///   Any other file at `path` is never removed.
    /// - The socket is made mode 0600.
    ///
    /// While checking and binding, `PATH.lock` (created mode 0600, never
    /// through a symbolic link, and left in place) is `flock`ed so that two
    /// clusterds starting at once cannot both decide the socket is stale.
    /// Only its owner can open it, so nobody else can hold that lock.
    ///
    /// # Errors
    ///
    /// One-line [`io::Error`]s naming the path, e.g. `control socket
    /// /run/clusterd/shop.sock is in use by clusterd pid 1234`.
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        let shown = path.display();
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "control socket path {shown} is too long ({len} bytes; a unix socket path has at most {MAX_SOCKET_PATH})"
                ),
            ));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let Some(file_name) = path.file_name() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("control socket path {shown} does not name a file"),
            ));
        };
        let dir_fd = ensure_dir(dir)?;
        let _lock = lock(&dir_fd, dir, file_name)?;
        remove_if_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind control socket {shown}: {e}"))
        })?;
        // The socket must be in the folder that was checked (the path was
        // not redirected meanwhile).
        let here = rustix::fs::statat(&dir_fd, file_name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        let there = fs::symlink_metadata(path);
        match (here, there) {
            (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) == (b.dev(), b.ino()) => {}
            _ => {
                let _ = rustix::fs::unlinkat(&dir_fd, file_name, rustix::fs::AtFlags::empty());
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "control socket folder {} changed while the socket was being bound",
                        dir.display()
                    ),
                ));
            }
        }
        let meta = fs::symlink_metadata(path)
            .and_then(|m| {
                fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
                Ok(m)
            })
            .map_err(|e| {
                let _ = fs::remove_file(path);
                io::Error::new(
                    e.kind(),
                    format!("cannot set up control socket {shown}: {e}"),
                )
            })?;
        let id = (meta.dev(), meta.ino());
        let listener = Async::new(listener).map_err(|e| {
            let _ = fs::remove_file(path);
            io::Error::new(
                e.kind(),
                format!("cannot watch control socket {shown}: {e}"),
            )
        })?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener,
            id,
            owner: rustix::process::geteuid(),
        })
    }

    /// The socket an earlier image of clusterd bound at `path`, listening
    /// on `fd` (`clusterctl upgrade`): clients waiting in its queue are
    /// answered by this image.
    pub fn taken_over(path: &Path, fd: OwnedFd) -> io::Result<ControlSocket> {
        let meta = fs::symlink_metadata(path)?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener: Async::new(UnixListener::from(fd))?,
            id: (meta.dev(), meta.ino()),
            owner: rustix::process::geteuid(),
        })
    }

    /// The listening socket, to hand over.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.listener.get_ref())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients until the returned future is dropped, sending each
    /// client's request to the main loop on `requests`.
    ///
    /// Clients are served by tasks on an executor private to this future, so
    /// it must be polled continuously (spawn it on the main loop's
    /// executor); dropping it disconnects every client. If `requests` is
    /// closed, clients are told clusterd is shutting down.
    pub async fn serve(&self, requests: Sender<ControlRequest>) {
        self.serve_while(requests, std::future::pending::<()>())
            .await
    }

    /// Serves clients (as [`ControlSocket::serve`]) while `main` runs and
    /// returns its output. Once `main` has ended, no client is accepted; the
    /// replies already queued are written (for at most [`FLUSH_TIMEOUT`]), so
    /// that a request answered just before `main` returned (a `Stop` when no
    /// worker has to drain) is answered on the wire too, and every other
    /// client is told clusterd is shutting down.
    pub async fn serve_while<T>(
        &self,
        requests: Sender<ControlRequest>,
        main: impl std::future::Future<Output = T>,
    ) -> T {
        let clients = LocalExecutor::new();
        // Closed when `main` is done: clients stop waiting for replies.
        let (closing_tx, closing) = smol::channel::bounded::<()>(1);
        // Each client task holds a sender: closed once all of them are done.
        let (alive_tx, alive) = smol::channel::bounded::<()>(1);
        let out = clients
            .run(main.or(async {
                self.accept_loop(&clients, requests, closing, alive_tx)
                    .await;
                std::future::pending().await
            }))
            .await;
        drop(closing_tx);
        clients
            .run(
                async {
                    let _ = alive.recv().await;
                }
                .or(async {
                    Timer::after(FLUSH_TIMEOUT).await;
                }),
            )
            .await;
        out
    }

    async fn accept_loop(
        &self,
        clients: &LocalExecutor<'_>,
        requests: Sender<ControlRequest>,
        closing: Receiver<()>,
        alive: Sender<()>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        // Clients that have not sent their request yet, oldest first.
        let waiting: Rc<RefCell<BTreeMap<u64, Waiter>>> = Rc::default();
        let mut next_id = 0u64;
        let mut accept_failing = false;
        let mut burst: Option<Burst> = None;
        // A slot taken for a connection that was gone by the time it was to
        // be accepted: the next one gets it.
        let mut reserved: Option<SemaphoreGuardArc> = None;
        loop {
            // Wait for a connection in the listen queue; nothing is accepted
            // before there is room for it (see `make_room`).
            let listener = &self.listener;
            let pending = match burst.as_ref().map(|b| b.last + BUSY_QUIET) {
                Some(quiet) => {
                    async { Some(listener.readable().await) }
                        .or(async {
                            Timer::at(quiet).await;
                            None
                        })
                        .await
                }
                None => Some(listener.readable().await),
            };
            let Some(pending) = pending else {
                if let Some(b) = burst.take() {
                    log!(
                        info,
                        "control.busy_end",
                        evicted = b.evicted,
                        refused = b.refused
                    );
                }
                continue;
            };
            if let Err(e) = pending {
                self.accept_failed(&mut accept_failing, e).await;
                continue;
            }

            let slot = match reserved.take().or_else(|| slots.try_acquire_arc()) {
                Some(slot) => Some(slot),
                None => {
                    let b = burst.get_or_insert_with(|| {
                        log!(
                            warn,
                            "control.busy",
                            limit = MAX_CLIENTS,
                            action = format!(
                                "new clients wait to be accepted; the oldest client silent for {} ms is dropped to make room for each",
                                GRACE.as_millis()
                            )
                        );
                        Burst {
                            evicted: 0,
                            refused: 0,
                            last: Instant::now(),
                        }
                    });
                    let (slot, evicted) = make_room(&slots, &waiting).await;
                    b.last = Instant::now();
                    b.evicted += evicted;
                    slot
                }
            };

            let stream = match listener.get_ref().accept() {
                Ok((stream, _)) => {
                    if accept_failing {
                        accept_failing = false;
                        log!(info, "control.accept_recovered");
                    }
                    stream
                }
                Err(e) => {
                    reserved = slot;
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) {
                        self.accept_failed(&mut accept_failing, e).await;
                    }
                    continue;
                }
            };
            let stream = match Async::new(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    reserved = slot;
                    self.accept_failed(&mut accept_failing, e).await;
                    continue;
                }
            };
            let Some(slot) = slot else {
                if let Some(b) = burst.as_mut() {
                    b.refused += 1;
                }
                try_send_error(
                    &stream,
                    format!(
                        "clusterd is busy: {MAX_CLIENTS} control requests are in progress; try again"
                    ),
                );
                continue;
            };

            let id = next_id;
            next_id += 1;
            let (evict, evicted) = smol::channel::bounded::<()>(1);
            let stream = Rc::new(stream);
            let got = Rc::new(Cell::new(0));
            waiting.borrow_mut().insert(
                id,
                Waiter {
                    _evict: evict,
                    stream: stream.clone(),
                    got: got.clone(),
                    since: Instant::now(),
                },
            );
            let client = Client {
                stream,
                got,
                owner: self.owner,
                _slot: slot,
                waiting: Waiting {
                    id,
                    list: waiting.clone(),
                },
                closing: closing.clone(),
                _alive: alive.clone(),
            };
            clients
                .spawn(client.run(requests.clone(), evicted))
                .detach();
        }
    }

    /// `accept` failed with `EMFILE`, `ENFILE`, `ENOMEM`...: the pending
    /// connection stays queued and the listener stays readable, so this
    /// waits [`ACCEPT_BACKOFF`] before the next try (logged once until an
    /// `accept` succeeds).
    async fn accept_failed(&self, failing: &mut bool, e: io::Error) {
        if !*failing {
            *failing = true;
            log!(
                error,
                "control.accept_failed",
                error = e,
                retry_ms = ACCEPT_BACKOFF.as_millis()
            );
        }
        Timer::after(ACCEPT_BACKOFF).await;
    }
}

/// Clients over the limit, since the burst began.
struct Burst {
    evicted: u64,
    refused: u64,
    /// When a client was last dropped or refused.
    last: Instant,
}

/// How many times in a row [`make_room`] lets the clients run when the only
/// clients it could drop have bytes waiting unread (their tasks read them
/// when they run), before it sleeps for [`RECHECK`].
const READ_ROUNDS: usize = 3;

/// How often [`make_room`] looks again while the clients it could drop all
/// have bytes waiting unread.
const RECHECK: Duration = Duration::from_millis(10);

/// Waits for room for a new client when all slots are taken; returns a slot
/// (`None`: the new client is to be refused) and how many clients were
/// dropped for it.
///
/// A slot is freed by dropping the oldest client that has sent nothing for
/// [`GRACE`] (see [`choose_victim`]), else the oldest one that has sent part
/// of its request and nothing more for as long. A client younger than
/// [`GRACE`] is never dropped, nor one whose bytes are waiting unread: while
/// every slot holds such a client (or a request being served), this waits,
/// and the new client with everyone behind it waits in the kernel's listen
/// queue, where it costs clusterd neither a file descriptor nor memory. A
/// client there has connected, so it has sent its request (if it is a real
/// one) by the time it is accepted. Only when no slot frees within
/// [`BUSY_WAIT`] (every slot holds a request being served) is the new client
/// refused.
async fn make_room(
    slots: &Arc<Semaphore>,
    waiting: &RefCell<BTreeMap<u64, Waiter>>,
) -> (Option<SemaphoreGuardArc>, u64) {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut reads = 0;
    loop {
        if let Some(slot) = slots.try_acquire_arc() {
            return (Some(slot), 0);
        }
        let now = Instant::now();
        let choice = {
            let list = waiting.borrow();
            choose_victim(list.iter().map(|(&id, w)| (id, w.since)), now, |id| {
                list[&id].sent()
            })
        };
        if let Choice::Drop(id) = choice {
            // Not borrowed across the wait: the client's task removes itself.
            let waiter = waiting.borrow_mut().remove(&id);
            if let Some(waiter) = waiter {
                // Its task ends (and frees its slot) the next time it runs:
                // it polls its eviction signal first.
                drop(waiter);
                let slot = async { Some(slots.acquire_arc().await) }
                    .or(async {
                        Timer::after(BUSY_WAIT).await;
                        None
                    })
                    .await;
                return (slot, 1);
            }
            continue;
        }
        if now >= deadline {
            return (None, 0);
        }
        let until = match choice {
            Choice::Drop(_) => unreachable!(),
            Choice::Unread if reads < READ_ROUNDS => {
                reads += 1;
                smol::future::yield_now().await;
                continue;
            }
            Choice::Unread => now + RECHECK,
            Choice::WaitUntil(ripe) => ripe,
            Choice::None => deadline,
        };
        reads = 0;
        let freed = async { Some(slots.acquire_arc().await) }
            .or(async {
                Timer::at(until.min(deadline)).await;
                None
            })
            .await;
        if let Some(slot) = freed {
            return (Some(slot), 0);
        }
    }
}

/// How much of its request a waiting client has sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Nothing yet.
    Nothing,
    /// Bytes its task has read, and none waiting: an incomplete request.
    Part,
    /// Bytes waiting in the socket for its task to read.
    Unread,
}

/// Which client [`make_room`] drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    /// This one.
    Drop(u64),
    /// None now; some have bytes waiting unread.
    Unread,
    /// None before this instant, when the oldest fresh client's grace ends.
    WaitUntil(Instant),
    /// None (no client is waiting for its request: all are being served).
    None,
}

/// Chooses the client to drop for a newcomer among those that have not sent
/// a whole request (`clients`: id and when it was accepted, oldest first;
/// `sent` tells how much of its request one has sent): the oldest that has sent nothing
/// since it was accepted [`GRACE`] ago, else the oldest of those that have
/// sent part of a request. A client accepted less than [`GRACE`] ago is never
/// chosen (a real client sends its request right after connecting, but it
/// may not have been scheduled yet), nor one with bytes waiting unread.
fn choose_victim(
    clients: impl IntoIterator<Item = (u64, Instant)>,
    now: Instant,
    sent: impl Fn(u64) -> Sent,
) -> Choice {
    let mut part = None;
    let mut unread = false;
    for (id, since) in clients {
        let ripe = since + GRACE;
        if ripe > now {
            // The list is in the order of acceptance: the rest are younger.
            return match (part, unread) {
                (Some(id), _) => Choice::Drop(id),
                (None, true) => Choice::Unread,
                (None, false) => Choice::WaitUntil(ripe),
            };
        }
        match sent(id) {
            Sent::Nothing => return Choice::Drop(id),
            Sent::Part => {
                part.get_or_insert(id);
            }
            Sent::Unread => unread = true,
        }
    }
    match (part, unread) {
        (Some(id), _) => Choice::Drop(id),
        (None, true) => Choice::Unread,
        (None, false) => Choice::None,
    }
}

/// A client that has not sent its request yet, as the accept loop sees it.
struct Waiter {
    /// Dropping it tells the client to go away.
    _evict: Sender<()>,
    stream: Rc<Async<UnixStream>>,
    /// Bytes of the request its task has read.
    got: Rc<Cell<usize>>,
    /// When it was accepted.
    since: Instant,
}

impl Waiter {
    fn sent(&self) -> Sent {
        sent(&self.stream, &self.got)
    }
}

/// How much of its request a client has sent: bytes waiting in the socket,
/// else bytes read by its task already.
fn sent(stream: &Async<UnixStream>, got: &Cell<usize>) -> Sent {
    let mut byte = [0u8; 1];
    let waiting = matches!(
        rustix::net::recv(
            stream.get_ref(),
            &mut byte,
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT
        ),
        Ok((n, _)) if n > 0
    );
    if waiting {
        Sent::Unread
    } else if got.get() > 0 {
        Sent::Part
    } else {
        Sent::Nothing
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log!(
                        warn,
                        "control.unlink_failed",
                        path = self.path.display(),
                        error = e
                    );
                }
            }
            Ok(_) => log!(
                warn,
                "control.unlink_skipped",
                path = self.path.display(),
                reason = "the path now holds another file"
            ),
            Err(_) => {}
        }
    }
}

/// One connected client; its fields are released when its task ends.
struct Client {
    stream: Rc<Async<UnixStream>>,
    /// Bytes of the request read so far.
    got: Rc<Cell<usize>>,
    owner: Uid,
    /// One of the [`MAX_CLIENTS`] permits.
    _slot: SemaphoreGuardArc,
    /// Membership in the list of clients that may be evicted.
    waiting: Waiting,
    /// Closed when the main loop has ended.
    closing: Receiver<()>,
    /// Held while the client is served (see [`ControlSocket::serve_while`]).
    _alive: Sender<()>,
}

/// Removes a client from the eviction list when it has sent its request (or
/// ends).
struct Waiting {
    id: u64,
    list: Rc<RefCell<BTreeMap<u64, Waiter>>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.list.borrow_mut().remove(&self.id);
    }
}

/// Why a client's request could not be read.
#[derive(Debug)]
enum BadRequest {
    /// The connection was closed after `got` bytes (0: before anything was
    /// sent); `want` is the frame's size when its header had arrived.
    Closed { got: usize, want: Option<usize> },
    /// No complete frame within [`READ_TIMEOUT`].
    TimedOut { got: usize },
    /// Reading failed.
    Io(io::Error),
    /// The frame was too large or its contents are not a valid request.
    Invalid(proto::Error),
}

impl BadRequest {
    /// The text logged and sent back to the client.
    fn reason(&self) -> String {
        match self {
            BadRequest::Closed { got: 0, .. } => {
                "connection closed before a request was sent".into()
            }
            BadRequest::Closed {
                got,
                want: Some(want),
            } => {
                format!("connection closed after {got} of {want} bytes of the request")
            }
            BadRequest::Closed { got, want: None } => {
                format!("connection closed after {got} bytes, inside the request's length prefix")
            }
            BadRequest::TimedOut { got } => format!(
                "no complete request within {} s ({got} bytes received)",
                READ_TIMEOUT.as_secs()
            ),
            BadRequest::Io(e) => format!("cannot read the request: {e}"),
            BadRequest::Invalid(proto::Error::Version { theirs, ours }) => format!(
                "protocol version mismatch: the client speaks version {theirs}, this clusterd speaks version {ours}"
            ),
            BadRequest::Invalid(proto::Error::TooLarge { len, limit }) => {
                format!("request of {len} bytes exceeds the limit of {limit}")
            }
            BadRequest::Invalid(e) => format!("bad request: {e}"),
        }
    }
}

impl Client {
    async fn run(self, requests: Sender<ControlRequest>, evicted: Receiver<()>) {
        let cred = match rustix::net::sockopt::socket_peercred(&self.stream) {
            Ok(cred) => cred,
            Err(e) => {
                log!(
                    warn,
                    "control.bad_request",
                    reason = "cannot read the peer's credentials",
                    error = e
                );
                return;
            }
        };
        let (pid, uid) = (cred.pid.as_raw_pid(), cred.uid.as_raw());

        // Until the request is in, the client may be evicted to make room. The
        // eviction signal is polled first, so an evicted client always ends
        // the next time it runs.
        let eviction = async {
            let _ = evicted.recv().await;
            None
        };
        let closing = async {
            let _ = self.closing.recv().await;
            None
        };
        let read = eviction.or(closing).or(self.read_checked(cred.uid, pid));
        let Some(request) = read.await else {
            // Evicted or shut down (rather than refused or failed).
            if evicted.is_closed() {
                let why = match sent(&self.stream, &self.got) {
                    // It arrived as the client was chosen: nothing of it
                    // was acted on.
                    Sent::Unread => {
                        "clusterd had not read this one's request yet; try again".to_string()
                    }
                    Sent::Part => format!(
                        "this one had sent only part of its request ({} bytes)",
                        self.got.get()
                    ),
                    Sent::Nothing => "this one had not sent a request".to_string(),
                };
                try_send_error(
                    &self.stream,
                    format!("dropped: {MAX_CLIENTS} control clients were connected and {why}"),
                );
            } else if self.closing.is_closed() {
                try_send_error(&self.stream, "clusterd is shutting down".into());
            }
            return;
        };
        drop(self.waiting);

        if !matches!(request, Request::Status) {
            log!(
                info,
                "control.request",
                pid = pid,
                uid = uid,
                request = format!("{request:?}")
            );
        }
        let (reply, replies) = smol::channel::unbounded();
        if requests
            .send(ControlRequest { request, reply })
            .await
            .is_err()
        {
            let _ = write_frame(
                &self.stream,
                &proto::frame(&Response::Error("clusterd is shutting down".into())),
            )
            .await;
            return;
        }
        let mut answered = false;
        loop {
            // Once the main loop has ended, nothing more will be queued:
            // what is queued is written, then the connection is closed.
            let next = async { replies.recv().await.ok() }.or(async {
                let _ = self.closing.recv().await;
                replies.try_recv().ok()
            });
            let Some(response) = next.await else {
                break;
            };
            answered = true;
            let mut frame = proto::frame(&response);
            if frame.len() - FRAME_HEADER > MAX_RESPONSE {
                let len = frame.len() - FRAME_HEADER;
                log!(
                    error,
                    "control.response_too_large",
                    pid = pid,
                    len = len,
                    limit = MAX_RESPONSE
                );
                frame = proto::frame(&Response::Error(format!(
                    "internal error: the response of {len} bytes exceeds the limit of {MAX_RESPONSE}"
                )));
            }
            if let Err(e) = write_frame(&self.stream, &frame).await {
                if e.kind() == io::ErrorKind::TimedOut {
                    log!(
                        warn,
                        "control.slow_client",
                        pid = pid,
                        uid = uid,
                        reason = e
                    );
                } else {
                    log!(info, "control.client_gone", pid = pid, uid = uid, error = e);
                }
                return;
            }
        }
        if !answered && self.closing.is_closed() {
            let frame = proto::frame(&Response::Error("clusterd is shutting down".into()));
            let _ = write_frame(&self.stream, &frame).await;
        }
    }

    /// Checks the peer and reads its request. `None`: the client was refused
    /// or sent a bad request (already answered and logged).
    async fn read_checked(&self, peer: Uid, pid: i32) -> Option<Request> {
        let uid = peer.as_raw();
        if peer != self.owner && !peer.is_root() {
            let owner = self.owner.as_raw();
            log!(
                warn,
                "control.refused",
                pid = pid,
                uid = uid,
                owner = owner,
                reason = "not the owner or root"
            );
            let msg = format!(
                "permission denied: uid {uid} may not control this clusterd (owner uid {owner})"
            );
            let _ = write_frame(&self.stream, &proto::frame(&Response::Error(msg))).await;
            return None;
        }
        let got = &*self.got;
        let timeout = async {
            Timer::after(READ_TIMEOUT).await;
            Err(BadRequest::TimedOut { got: got.get() })
        };
        match read_request(&self.stream, got).or(timeout).await {
            Ok(request) => Some(request),
            Err(bad) => {
                let reason = bad.reason();
                if let BadRequest::Closed { got: 0, .. } = bad {
                    // Connect-and-close: a probe or a port check, not an attack.
                    log!(
                        info,
                        "control.bad_request",
                        pid = pid,
                        uid = uid,
                        reason = reason
                    );
                } else {
                    log!(
                        warn,
                        "control.bad_request",
                        pid = pid,
                        uid = uid,
                        reason = reason
                    );
                }
                if !matches!(bad, BadRequest::Io(_)) {
                    let _ =
                        write_frame(&self.stream, &proto::frame(&Response::Error(reason))).await;
                }
                None
            }
        }
    }
}

/// Reads one request frame, counting the bytes received in `got`.
async fn read_request(
    stream: &Async<UnixStream>,
    got: &Cell<usize>,
) -> Result<Request, BadRequest> {
    let mut header = [0u8; FRAME_HEADER];
    read_full(stream, &mut header, got, None).await?;
    let len = proto::frame_len(header, MAX_REQUEST).map_err(BadRequest::Invalid)?;
    let mut body = vec![0u8; len];
    read_full(stream, &mut body, got, Some(FRAME_HEADER + len)).await?;
    proto::decode::<Request>(&body, MAX_REQUEST).map_err(BadRequest::Invalid)
}

async fn read_full(
    mut stream: &Async<UnixStream>,
    buf: &mut [u8],
    got: &Cell<usize>,
    want: Option<usize>,
) -> Result<(), BadRequest> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await {
            Ok(0) => {
                return Err(BadRequest::Closed {
                    got: got.get(),
                    want,
                });
            }
            Ok(n) => {
                filled += n;
                got.set(got.get() + n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BadRequest::Io(e)),
        }
    }
    Ok(())
}

/// Writes a whole frame within [`WRITE_TIMEOUT`] (`TimedOut` otherwise).
async fn write_frame(stream: &Async<UnixStream>, frame: &[u8]) -> io::Result<()> {
    let write = async {
        let mut sent = 0;
        while sent < frame.len() {
            sent += stream
                .write_with(|s| {
                    rustix::net::send(s, &frame[sent..], SendFlags::NOSIGNAL)
                        .map_err(io::Error::from)
                })
                .await?;
        }
        Ok(())
    };
    let timeout = async {
        Timer::after(WRITE_TIMEOUT).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client did not read a response within {} s",
                WRITE_TIMEOUT.as_secs()
            ),
        ))
    };
    write.or(timeout).await
}

/// Sends an error frame if the socket buffer takes it right away; for clients
/// being turned away, which get no more of clusterd's time.
fn try_send_error(stream: &Async<UnixStream>, message: String) {
    let frame = proto::frame(&Response::Error(message));
    let _ = rustix::net::send(stream, &frame, SendFlags::NOSIGNAL | SendFlags::DONTWAIT);
}

/// Makes sure the socket's folder exists (creating it 0700) and is a private
/// directory: not a symbolic link, owned by this user or root, and not
/// writable by others (unless sticky, like `/tmp`), so nobody else can
/// replace the socket in it. Returns the folder, opened without following a
/// link, for the checks and the lock that follow.
fn ensure_dir(dir: &Path) -> io::Result<OwnedFd> {
    let shown = dir.display();
    let access = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot access control socket folder {shown}: {e}"),
        )
    };
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot create control socket folder {shown}: {e}"),
                    )
                })?;
        }
        Err(e) => return Err(access(e)),
        Ok(_) => {}
    }
    let not_followed = || {
        let target = fs::read_link(dir)
            .map(|t| format!(" (to {})", t.display()))
            .unwrap_or_default();
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "control socket folder {shown} is a symbolic link{target}; it is not followed, \
                 as whoever owns it could point it elsewhere later: name the real folder \
                 (`control =` in the config or $CLUSTERD_SOCKET)"
            ),
        )
    };
    let not_a_dir = || {
        io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("control socket folder {shown} is not a directory"),
        )
    };
    let fd = match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            return Err(match fs::symlink_metadata(dir) {
                Ok(m) if m.file_type().is_symlink() => not_followed(),
                _ => not_a_dir(),
            });
        }
        Err(e) => return Err(access(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| access(e.into()))?;
    let euid = rustix::process::geteuid().as_raw();
    if st.st_uid != euid && st.st_uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "control socket folder {shown} belongs to uid {}, not to this user (uid {euid}) or root; \
                 another user may have made it to take over the control socket: remove it (as root), \
                 or name a private folder (`control =` in the config, $CLUSTERD_SOCKET or $XDG_RUNTIME_DIR)",
                st.st_uid
            ),
        ));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "control socket folder {shown} is writable by other users (mode {mode:04o}); make it private (0700)"
            ),
        ));
    }
    Ok(fd)
}

/// Takes an exclusive `flock` on `NAME.lock` in the folder (created mode
/// 0600, never through a link), released when the returned file is
/// dropped. Another clusterd holds it for at most [`PROBE_TIMEOUT`] and a
/// bit, so waiting longer than [`LOCK_TIMEOUT`] is an error. Only its owner
/// (and root) can open the file, so no other user can hold the lock; a
/// lock file of another user is refused.
fn lock(dir_fd: &OwnedFd, dir: &Path, socket: &std::ffi::OsStr) -> io::Result<fs::File> {
    use rustix::fs::FlockOperation::NonBlockingLockExclusive;
    let mut name = socket.to_os_string();
    name.push(LOCK_SUFFIX);
    let path = dir.join(&name);
    let shown = path.display();
    let fd = rustix::fs::openat(
        dir_fd,
        &*name,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(
            e.kind(),
            format!("cannot open the control socket's lock file {shown}: {e}"),
        )
    })?;
    let st = rustix::fs::fstat(&fd)?;
    let euid = rustix::process::geteuid().as_raw();
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
        || st.st_uid != euid
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the control socket's lock file {shown} is not a file of this user (uid {euid}); remove it"
            ),
        ));
    }
    if st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
    }
    let file = fs::File::from(fd);
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        match rustix::fs::flock(&file, NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "cannot lock {shown}: another clusterd has held its lock for {} s",
                        LOCK_TIMEOUT.as_secs()
                    ),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot lock {shown}: {e}"),
                ));
            }
        }
    }
}

/// Removes a stale socket at `path`; fails if the path is in use or is not a
/// socket.
fn remove_if_stale(path: &Path) -> io::Result<()> {
    let shown = path.display();
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot inspect control socket {shown}: {e}"),
            ));
        }
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "control socket path {shown} exists and is not a socket (refusing to replace it)"
                ),
            ));
        }
        Ok(_) => {}
    }
    let in_use = |what: String| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("control socket {shown} is in use by {what}"),
        )
    };
    match probe(path) {
        Ok(Probe::Stale) => match fs::remove_file(path) {
            Ok(()) => {
                log!(info, "control.stale_removed", path = shown);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot remove stale control socket {shown}: {e}"),
            )),
        },
        Ok(Probe::Gone) => Ok(()),
        Ok(Probe::Clusterd(pid)) => Err(in_use(format!("clusterd pid {pid}"))),
        Ok(Probe::Other(what)) => Err(in_use(what)),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot check whether control socket {shown} is in use: {e}"),
        )),
    }
}

/// What listens on an existing socket file.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// Nobody: connecting is refused.
    Stale,
    /// The file disappeared meanwhile.
    Gone,
    /// A clusterd that answered `Status` with this pid.
    Clusterd(u32),
    /// Something else, described.
    Other(String),
}

/// Asks whatever listens at `path` for its `Status`, within [`PROBE_TIMEOUT`].
fn probe(path: &Path) -> io::Result<Probe> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    // A nonblocking connect to a unix socket completes at once, or fails with
    // EAGAIN when the listener's backlog is full (rather than waiting).
    match rustix::net::connect(&fd, &SocketAddrUnix::new(path)?) {
        Ok(()) => {}
        Err(rustix::io::Errno::CONNREFUSED) => return Ok(Probe::Stale),
        Err(rustix::io::Errno::NOENT) => return Ok(Probe::Gone),
        Err(rustix::io::Errno::AGAIN) => {
            return Ok(Probe::Other(
                "a program that is not accepting connections (its backlog is full)".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let mut stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let answer = (|| {
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        stream.write_all(&proto::frame(&Request::Status))?;
        let mut header = [0u8; FRAME_HEADER];
        read_exact_by(&mut stream, &mut header, deadline)?;
        let len = proto::frame_len(header, MAX_RESPONSE).map_err(io::Error::other)?;
        let mut body = vec![0u8; len];
        read_exact_by(&mut stream, &mut body, deadline)?;
        proto::decode::<Response>(&body, MAX_RESPONSE).map_err(io::Error::other)
    })();
    Ok(match answer {
        Ok(Response::Status(status)) => Probe::Clusterd(status.pid),
        Ok(Response::Error(msg)) => Probe::Other(format!(
            "a clusterd that refused to give its status ({msg})"
        )),
        Ok(other) => Probe::Other(format!(
            "a program that gave an unexpected answer ({other:?})"
        )),
        Err(e) => Probe::Other(format!(
            "a program that did not answer as clusterd within {} s ({e})",
            PROBE_TIMEOUT.as_secs()
        )),
    })
}

/// `read_exact` on a blocking stream, failing with `TimedOut` at `deadline`.
fn read_exact_by(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ListenerInfo, Progress, RestartOutcome, Status, WorkerStatus};
    use std::os::unix::process::CommandExt as _;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    const PID: u32 = 4242;

    /// A fresh, empty folder of our own under the system temp dir (mode
    /// 0755), removed on drop.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "clusterd-control-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            pid: PID,
            uptime_ms: 11_520_000,
            config: "/etc/clusterd/shop.conf".into(),
            protocol: "clusterd".into(),
            listeners: vec![ListenerInfo {
                name: "http".into(),
                address: "127.0.0.1:3000".into(),
            }],
            desired: 1,
            ready: 1,
            generation: 4,
            operation: None,
            phase: "running".into(),
            last_restart: None,
            crash_loop: None,
            workers: vec![WorkerStatus {
                id: 1,
                pid: Some(812),
                generation: 4,
                state: "ready".into(),
                uptime_ms: 60_000,
                restarts: 0,
                last_exit: None,
                rss_bytes: Some(14_900_000),
                requests: Some(10),
                active: Some(1),
                note: None,
                last_words: None,
            }],
            image_uptime_ms: 11_520_000,
            upgrades: 0,
        }
    }

    fn restart_replies() -> Vec<Response> {
        let step = |done, old, new| {
            Response::Progress(Progress {
                worker_id: done,
                done,
                total: 2,
                old_pid: Some(old),
                new_pid: new,
                elapsed_ms: 41,
            })
        };
        vec![
            step(1, 812, 907),
            step(2, 813, 908),
            Response::Restarted(RestartOutcome::Done {
                generation: 5,
                replaced: 2,
                elapsed_ms: 1320,
            }),
        ]
    }

    /// How the fake main loop behaves.
    #[derive(Clone, Copy)]
    enum Main {
        /// Answers like a daemon: Status, Restart (streamed), Stop; refuses Scale.
        Normal,
        /// Answers Status with a status of some MiB (more than socket buffers hold).
        Big,
        /// Answers Status with a status too large to send.
        Huge,
        /// Has gone away: the request channel is closed.
        Gone,
    }

    async fn fake_main(mode: Main, requests: Receiver<ControlRequest>) {
        while let Ok(ControlRequest { request, reply }) = requests.recv().await {
            let replies = match (mode, request) {
                (Main::Big, _) => {
                    let mut s = status();
                    s.workers = vec![s.workers[0].clone(); 40_000];
                    vec![Response::Status(Box::new(s))]
                }
                (Main::Huge, _) => {
                    let mut s = status();
                    s.workers[0].note = Some("x".repeat(MAX_RESPONSE));
                    vec![Response::Status(Box::new(s))]
                }
                (_, Request::Status) => vec![Response::Status(Box::new(status()))],
                (_, Request::Restart | Request::RestartWorker(_)) => restart_replies(),
                (_, Request::Scale(_)) => {
                    vec![Response::Error("scaling is refused in this test".into())]
                }
                (_, Request::Stop) => vec![Response::Stopping],
                (_, Request::Logs { .. }) => vec![Response::Logs(Vec::new())],
                (_, Request::Upgrade { .. }) => {
                    vec![Response::Error("upgrading is refused in this test".into())]
                }
            };
            for r in replies {
                reply.try_send(r).unwrap();
            }
        }
    }

    /// A ControlSocket served on its own thread by a LocalExecutor, with a
    /// fake main loop. Dropping it stops the thread (and so the socket).
    struct Server {
        path: PathBuf,
        stop: Option<smol::channel::Sender<()>>,
        done: mpsc::Receiver<()>,
        thread: Option<JoinHandle<()>>,
    }

    impl Server {
        fn start(dir: &Path) -> Server {
            Server::with(
                ControlSocket::bind(&dir.join("ctl/test.sock")).unwrap(),
                Main::Normal,
            )
        }

        fn with(socket: ControlSocket, mode: Main) -> Server {
            let path = socket.path().to_path_buf();
            let (stop, stopped) = smol::channel::bounded::<()>(1);
            let (done_tx, done) = mpsc::channel();
            let thread = std::thread::spawn(move || {
                let ex = LocalExecutor::new();
                let (tx, rx) = smol::channel::unbounded();
                if let Main::Gone = mode {
                    rx.close();
                }
                smol::block_on(ex.run(async {
                    let main = ex.spawn(fake_main(mode, rx));
                    socket
                        .serve(tx)
                        .or(async {
                            let _ = stopped.recv().await;
                        })
                        .await;
                    drop(main);
                }));
                drop(socket);
                let _ = done_tx.send(());
            });
            Server {
                path,
                stop: Some(stop),
                done,
                thread: Some(thread),
            }
        }

        /// Stops serving and drops the socket; bounded in time.
        fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                drop(stop);
                self.done
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the server thread did not stop within 10 s");
                self.thread.take().unwrap().join().unwrap();
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                self.stop();
            }
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Reads responses until the server closes the connection.
    fn read_all(s: &mut UnixStream) -> Vec<Response> {
        let mut out = Vec::new();
        loop {
            let mut header = [0u8; FRAME_HEADER];
            match s.read_exact(&mut header) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return out,
                // Closing with our unsent junk unread resets the connection
                // after the buffered replies have been read.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("reading a response: {e}"),
                Ok(()) => {}
            }
            let len = proto::frame_len(header, MAX_RESPONSE).unwrap();
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            out.push(proto::decode(&body, MAX_RESPONSE).unwrap());
        }
    }

    fn send_raw(path: &Path, bytes: &[u8], shutdown: bool) -> Vec<Response> {
        let mut s = connect(path);
        s.write_all(bytes).unwrap();
        if shutdown {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        read_all(&mut s)
    }

    fn ask(path: &Path, request: &Request) -> Vec<Response> {
        send_raw(path, &proto::frame(request), false)
    }

    /// The one reply must be an error containing every piece of `needles`.
    #[track_caller]
    fn assert_error(replies: &[Response], needles: &[&str]) {
        match replies {
            [Response::Error(msg)] => {
                for needle in needles {
                    assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
                }
            }
            other => panic!("expected one error, got {other:?}"),
        }
    }

    #[test]
    fn status_round_trip() {
        let dir = temp_dir("status");
        let server = Server::start(&dir);
        assert_eq!(
            ask(&server.path, &Request::Status),
            [Response::Status(Box::new(status()))]
        );
        assert_eq!(ask(&server.path, &Request::Stop), [Response::Stopping]);
        assert_error(
            &ask(&server.path, &Request::Scale(proto::Scale::To(3))),
            &["refused"],
        );
    }

    #[test]
    fn restart_replies_are_streamed_in_order() {
        let dir = temp_dir("restart");
        let server = Server::start(&dir);
        assert_eq!(ask(&server.path, &Request::Restart), restart_replies());
    }

    #[test]
    fn random_bytes_get_an_error() {
        let dir = temp_dir("random");
        let server = Server::start(&dir);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        };
        // A plausible length, then junk.
        let mut bytes = vec![0, 0, 0, 32];
        bytes.extend((0..32).map(|_| random()));
        assert!(matches!(
            &send_raw(&server.path, &bytes, false)[..],
            [Response::Error(_)]
        ));
        // Junk all the way, then the client stops sending.
        let bytes: Vec<u8> = (0..200).map(|_| random()).collect();
        assert!(matches!(
            &send_raw(&server.path, &bytes, true)[..],
            [Response::Error(_)]
        ));
        // The server is still fine.
        assert_eq!(ask(&server.path, &Request::Status).len(), 1);
    }

    #[test]
    fn a_4_gib_length_is_refused_at_once() {
        let dir = temp_dir("huge-length");
        let server = Server::start(&dir);
        let start = Instant::now();
        assert_error(
            &send_raw(&server.path, &[0xff; 4], false),
            &["4294967295 bytes exceeds the limit of 65536"],
        );
        assert!(start.elapsed() < READ_TIMEOUT, "it waited for the body");
    }

    #[test]
    fn a_truncated_frame_gets_an_error() {
        let dir = temp_dir("truncated");
        let server = Server::start(&dir);
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend([1; 10]);
        assert_error(
            &send_raw(&server.path, &bytes, true),
            &["closed after 14 of 104 bytes"],
        );
        assert_error(
            &send_raw(&server.path, &[0, 0], true),
            &["closed after 2 bytes"],
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let dir = temp_dir("trailing");
        let server = Server::start(&dir);
        let mut record = proto::encode(&Request::Status);
        record.push(0);
        let mut bytes = (record.len() as u32).to_be_bytes().to_vec();
        bytes.extend(record);
        assert_error(
            &send_raw(&server.path, &bytes, false),
            &["1 trailing bytes"],
        );
    }

    #[test]
    fn a_wrong_version_is_named() {
        let dir = temp_dir("version");
        let server = Server::start(&dir);
        let mut record = bincode::serde::encode_to_vec(99u16, bincode::config::standard()).unwrap();
        record.extend(
            bincode::serde::encode_to_vec(Request::Status, bincode::config::standard()).unwrap(),
        );
        let mut bytes = (record.len() as u32).to_be_bytes().to_vec();
        bytes.extend(record);
        assert_error(
            &send_raw(&server.path, &bytes, false),
            &[
                "version mismatch",
                "version 99",
                &format!("version {}", proto::CONTROL_VERSION),
            ],
        );
    }

    #[test]
    fn idle_clients_do_not_block_others() {
        let dir = temp_dir("idle");
        let server = Server::start(&dir);
        let idle: Vec<UnixStream> = (0..100).map(|_| connect(&server.path)).collect();
        let start = Instant::now();
        assert_eq!(
            ask(&server.path, &Request::Status),
            [Response::Status(Box::new(status()))]
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "status took {:?}",
            start.elapsed()
        );

        // The 64 slots were full: the oldest idle clients were dropped to make
        // room (36 for the other idle ones, one for the status request), each
        // told why; the newer ones are still connected.
        let closed: Vec<bool> = idle
            .iter()
            .map(|s| {
                s.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 512];
                let mut s = s;
                match s.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Ok(n) => {
                        assert!(n > FRAME_HEADER);
                        let reply: Response = proto::decode(&buf[FRAME_HEADER..n], MAX_RESPONSE).unwrap();
                        assert!(matches!(reply, Response::Error(m) if m.contains("had not sent a request")));
                        true
                    }
                    Err(e) => panic!("{e}"),
                }
            })
            .collect();
        let evicted = 100 + 1 - MAX_CLIENTS;
        assert!(closed[..evicted].iter().all(|&c| c), "{closed:?}");
        if start.elapsed() < READ_TIMEOUT {
            assert!(closed[evicted..].iter().all(|&c| !c), "{closed:?}");
        }
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped() {
        let dir = temp_dir("slow");
        let server = Server::with(ControlSocket::bind(&dir.join("s.sock")).unwrap(), Main::Big);
        let slow = connect(&server.path);
        (&slow).write_all(&proto::frame(&Request::Status)).unwrap();
        let start = Instant::now();
        // Others are served meanwhile.
        assert!(matches!(
            &ask(&server.path, &Request::Status)[..],
            [Response::Status(_)]
        ));
        // Without reading, poke the connection until clusterd has closed it.
        let deadline = start + WRITE_TIMEOUT + Duration::from_secs(10);
        loop {
            match rustix::net::send(&slow, &[0], SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => break,
                Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "the slow client was not dropped");
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = start.elapsed();
        assert!(
            waited > WRITE_TIMEOUT - Duration::from_millis(500),
            "dropped after {waited:?}"
        );
    }

    #[test]
    fn a_response_over_the_limit_becomes_an_error() {
        let dir = temp_dir("huge");
        let server = Server::with(
            ControlSocket::bind(&dir.join("s.sock")).unwrap(),
            Main::Huge,
        );
        assert_error(&ask(&server.path, &Request::Status), &["exceeds the limit"]);
    }

    #[test]
    fn the_main_loop_gone_is_reported() {
        let dir = temp_dir("gone");
        let server = Server::with(
            ControlSocket::bind(&dir.join("s.sock")).unwrap(),
            Main::Gone,
        );
        assert_error(&ask(&server.path, &Request::Status), &["shutting down"]);
    }

    #[test]
    fn folder_and_socket_permissions() {
        let dir = temp_dir("modes");
        let server = Server::start(&dir);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(server.path.parent().unwrap()), 0o700);
        assert_eq!(mode(&server.path), 0o600);
        assert!(
            fs::symlink_metadata(&server.path)
                .unwrap()
                .file_type()
                .is_socket()
        );
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = temp_dir("stale");
        let path = dir.join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "the stale socket file stays behind");
        let server = Server::with(ControlSocket::bind(&path).unwrap(), Main::Normal);
        assert_eq!(ask(&server.path, &Request::Status).len(), 1);
    }

    #[test]
    fn a_live_socket_is_refused_naming_the_pid() {
        let dir = temp_dir("live");
        let server = Server::start(&dir);
        let err = ControlSocket::bind(&server.path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!(
                "control socket {} is in use by clusterd pid {PID}",
                server.path.display()
            )
        );
        // Still served.
        assert_eq!(ask(&server.path, &Request::Status).len(), 1);
    }

    #[test]
    fn concurrent_binds_leave_one_winner() {
        let dir = temp_dir("race");
        let path = dir.join("ctl/s.sock");
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let binds: Vec<_> = (0..4)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ControlSocket::bind(&path)
                })
            })
            .collect();
        let results: Vec<io::Result<ControlSocket>> =
            binds.into_iter().map(|t| t.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{results:?}");
        for err in results.iter().filter_map(|r| r.as_ref().err()) {
            // Nobody serves the winner here, so it does not answer as clusterd.
            assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        }
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    }

    #[test]
    fn the_folder_must_be_private() {
        let dir = temp_dir("private");
        let shared = dir.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ControlSocket::bind(&shared.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is writable by other users (mode 0777)"),
            "{err}"
        );
        // Sticky, like /tmp: others cannot remove or rename our socket.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        drop(ControlSocket::bind(&shared.join("s.sock")).unwrap());

        if rustix::process::geteuid().is_root() {
            let theirs = dir.join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = ControlSocket::bind(&theirs.join("s.sock"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("belongs to uid 65534, not to this user (uid 0) or root"),
                "{err}"
            );
        }
    }

    #[test]
    fn other_files_are_never_replaced() {
        let dir = temp_dir("files");
        let path = dir.join("s.sock");
        fs::write(&path, "data").unwrap();
        let err = ControlSocket::bind(&path).unwrap_err().to_string();
        assert!(
            err.contains("exists and is not a socket") && err.contains(&*path.to_string_lossy()),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");

        let err = ControlSocket::bind(&path.join("x.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a directory"), "{err}");

        let long = dir.join("x".repeat(120));
        let err = ControlSocket::bind(&long).unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn the_socket_is_removed_on_drop_if_still_ours() {
        let dir = temp_dir("drop");
        let mut server = Server::start(&dir);
        let path = server.path.clone();
        server.stop();
        assert!(!path.exists(), "{} was left behind", path.display());

        // Someone replaced the socket with another file: leave it alone.
        let socket = ControlSocket::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, "not ours").unwrap();
        drop(socket);
        assert_eq!(fs::read_to_string(&path).unwrap(), "not ours");
    }

    #[test]
    fn a_reader_of_the_folder_cannot_block_the_bind() {
        let dir = temp_dir("lock");
        let folder = dir.join("ctl");
        fs::create_dir(&folder).unwrap();
        fs::set_permissions(&folder, fs::Permissions::from_mode(0o755)).unwrap();
        // Anyone who may open the folder (read-only is enough) may flock it,
        // and hold the lock for as long as they like.
        let reader = fs::File::open(&folder).unwrap();
        rustix::fs::flock(&reader, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let path = folder.join("s.sock");
        let start = Instant::now();
        let socket = ControlSocket::bind(&path).unwrap();
        assert!(
            start.elapsed() < LOCK_TIMEOUT,
            "bind waited {:?} for the reader's lock",
            start.elapsed()
        );
        // What is locked instead: a file only the owner can open.
        let lock = fs::symlink_metadata(folder.join("s.sock.lock")).unwrap();
        assert!(lock.file_type().is_file());
        assert_eq!(lock.permissions().mode() & 0o7777, 0o600);
        assert_eq!(lock.uid(), rustix::process::geteuid().as_raw());
        drop(socket);
        drop(reader);
    }

    #[test]
    fn a_lock_path_that_is_a_symlink_is_not_followed() {
        let dir = temp_dir("lock-link");
        let target = dir.join("target");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("s.sock.lock")).unwrap();
        let err = ControlSocket::bind(&dir.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.sock.lock"), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn a_symlinked_folder_is_refused() {
        let dir = temp_dir("symlink");
        // Like `/tmp/clusterd-UID -> /tmp`: a link to a sticky folder owned
        // by root passes every check made on what it points to.
        let sticky = dir.join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&sticky, &link).unwrap();
        let err = ControlSocket::bind(&link.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{} is a symbolic link", link.display())),
            "{err}"
        );
        assert!(!sticky.join("s.sock").exists(), "bound through the link");
        // A private folder reached by a link is refused all the same.
        let private = dir.join("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.join("link2");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        assert!(ControlSocket::bind(&link.join("s.sock")).is_err());
    }

    #[test]
    fn another_users_folder_is_refused_naming_the_fix() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("note: skipped (needs root to give a folder to uid 65534)");
            return;
        }
        let dir = temp_dir("squatted");
        let theirs = dir.join("clusterd-1000");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = ControlSocket::bind(&theirs.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&*theirs.to_string_lossy()), "{err}");
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert!(
            err.contains("CLUSTERD_SOCKET") && err.contains("control ="),
            "the fix is named: {err}"
        );
    }

    /// Connections that never send a whole request, reopened as soon as
    /// clusterd closes them (as a script stuck in a reconnect loop would):
    /// `idle` send nothing, `slow` send one byte of a frame each pass. At most
    /// `idle + slow` open at once; stops (closing them all) on drop.
    struct Flood {
        stop: Arc<std::sync::atomic::AtomicBool>,
        opened: Arc<std::sync::atomic::AtomicU64>,
        thread: Option<JoinHandle<()>>,
    }

    impl Flood {
        fn start(path: &Path, idle: usize, slow: usize) -> Flood {
            use std::sync::atomic::{AtomicBool, AtomicU64};
            let stop = Arc::new(AtomicBool::new(false));
            let opened = Arc::new(AtomicU64::new(0));
            let (s, o) = (stop.clone(), opened.clone());
            let path = path.to_path_buf();
            // A frame announcing 1,000 bytes, trickled and never finished.
            let mut head = 1000u32.to_be_bytes().to_vec();
            head.extend_from_slice(&[7; 1000]);
            let thread = std::thread::spawn(move || {
                let mut conns: Vec<Option<(UnixStream, usize)>> =
                    (0..idle + slow).map(|_| None).collect();
                while !s.load(Ordering::Relaxed) {
                    for (i, slot) in conns.iter_mut().enumerate() {
                        if let Some((c, _)) = slot {
                            let mut buf = [0u8; 512];
                            match c.read(&mut buf) {
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                                _ => *slot = None,
                            }
                        }
                        if slot.is_none() {
                            // Non-blocking: a unix connect blocks while the
                            // listen queue is full.
                            let Ok(c) = rustix::net::socket_with(
                                AddressFamily::UNIX,
                                SocketType::STREAM,
                                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                                None,
                            ) else {
                                continue;
                            };
                            let addr = SocketAddrUnix::new(&path).unwrap();
                            if rustix::net::connect(&c, &addr).is_ok() {
                                o.fetch_add(1, Ordering::Relaxed);
                                *slot = Some((UnixStream::from(c), 0));
                            }
                        }
                        if i >= idle {
                            if let Some((c, sent)) = slot {
                                if *sent < head.len() && c.write(&head[*sent..=*sent]).is_ok() {
                                    *sent += 1;
                                }
                            }
                        }
                    }
                    // Paced: one pass over the connections every 10 ms at most.
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            Flood {
                stop,
                opened,
                thread: Some(thread),
            }
        }

        fn opened(&self) -> u64 {
            self.opened.load(Ordering::Relaxed)
        }
    }

    impl Drop for Flood {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn every_request_is_answered_while_idle_clients_reconnect() {
        let dir = temp_dir("flood");
        let server = Server::start(&dir);
        let flood = Flood::start(&server.path, 100, 100);
        // Wait until the flood churns: well over the slots reopened.
        let deadline = Instant::now() + Duration::from_secs(30);
        while flood.opened() < 400 {
            assert!(
                Instant::now() < deadline,
                "only {} connections opened",
                flood.opened()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for i in 0..20 {
            let mut client = connect(&server.path);
            if i % 2 == 1 {
                // A client that is not scheduled right after it connects
                // (a loaded machine), for well under GRACE.
                std::thread::sleep(GRACE / 5);
            }
            // If it was dropped, the reply says why.
            let _ = client.write_all(&proto::frame(&Request::Status));
            assert_eq!(
                read_all(&mut client),
                [Response::Status(Box::new(status()))],
                "request {i} ({} flood connections opened)",
                flood.opened()
            );
        }
        drop(flood);
    }

    #[test]
    fn a_fresh_client_is_not_dropped_for_newer_ones() {
        let dir = temp_dir("fresh");
        let server = Server::start(&dir);
        let mut first = connect(&server.path);
        // As many silent clients as there are slots: the last one finds
        // them all taken, and `first` the oldest that has sent nothing.
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| connect(&server.path)).collect();
        // It is not scheduled again at once (a loaded machine), for well
        // under GRACE: meanwhile clusterd sees every slot taken.
        std::thread::sleep(GRACE / 5);
        let _ = first.write_all(&proto::frame(&Request::Status));
        assert_eq!(read_all(&mut first), [Response::Status(Box::new(status()))]);
        drop(idle);
    }

    #[test]
    fn the_victim_is_the_oldest_silent_client_past_its_grace() {
        let now = Instant::now();
        let old = now - GRACE * 3;
        let choose = |clients: &[(Instant, Sent)]| {
            choose_victim(
                clients
                    .iter()
                    .enumerate()
                    .map(|(id, &(since, _))| (id as u64, since)),
                now,
                |id| clients[id as usize].1,
            )
        };
        let fresh = now - GRACE / 2;
        use Sent::*;
        // The oldest silent one, before an older one that sent part.
        assert_eq!(
            choose(&[(old, Part), (old, Unread), (old, Nothing), (old, Nothing)]),
            Choice::Drop(2)
        );
        // Else the oldest that sent part; never one with bytes unread.
        assert_eq!(
            choose(&[(old, Unread), (old, Part), (old, Part)]),
            Choice::Drop(1)
        );
        assert_eq!(choose(&[(old, Unread), (fresh, Nothing)]), Choice::Unread);
        // A fresh one is never chosen: wait for its grace to end.
        assert_eq!(
            choose(&[(fresh, Nothing), (now, Nothing)]),
            Choice::WaitUntil(fresh + GRACE)
        );
        assert_eq!(choose(&[(old, Part), (fresh, Nothing)]), Choice::Drop(0));
        assert_eq!(choose(&[]), Choice::None);
    }

    #[test]
    fn clients_whose_requests_wait_unread_are_not_told_they_sent_none() {
        let dir = temp_dir("burst");
        let socket = ControlSocket::bind(&dir.join("s.sock")).unwrap();
        let path = socket.path().to_path_buf();
        // 100 clients send a request before clusterd accepts any of them, so
        // it accepts them in one burst, more than it has slots for.
        let clients: Vec<UnixStream> = (0..100)
            .map(|_| {
                let s = connect(&path);
                (&s).write_all(&proto::frame(&Request::Status)).unwrap();
                s
            })
            .collect();
        let server = Server::with(socket, Main::Normal);
        let mut served = 0;
        for mut client in clients {
            match &read_all(&mut client)[..] {
                [Response::Status(_)] => served += 1,
                [Response::Error(m)] => {
                    assert!(!m.contains("had not sent a request"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(served >= MAX_CLIENTS, "only {served} of 100 were served");
        drop(server);
    }

    #[test]
    fn replies_are_written_before_the_main_loop_ends() {
        // The main loop answers Stop and returns at once (as clusterd does
        // when no worker has to drain): the answer must still go out.
        let dir = temp_dir("flush");
        let socket = ControlSocket::bind(&dir.join("s.sock")).unwrap();
        let path = socket.path().to_path_buf();
        let thread = std::thread::spawn(move || {
            let (tx, rx) = smol::channel::unbounded::<ControlRequest>();
            let main = async move {
                while let Ok(ControlRequest { request, reply }) = rx.recv().await {
                    if let Request::Stop = request {
                        reply.try_send(Response::Stopping).unwrap();
                        return 0;
                    }
                }
                1
            };
            smol::block_on(socket.serve_while(tx, main))
        });
        let mut idle = connect(&path);
        assert_eq!(ask(&path, &Request::Stop), [Response::Stopping]);
        assert_eq!(thread.join().unwrap(), 0);
        // A client whose request was never read is told why it is dropped.
        assert_error(&read_all(&mut idle), &["shutting down"]);
    }

    #[test]
    fn another_uid_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!(
                "note: another_uid_is_refused skipped (needs root to run a client as uid 65534)"
            );
            return;
        }
        let python = Path::new("/usr/bin/python3");
        if !python.exists() {
            eprintln!("note: another_uid_is_refused skipped (no /usr/bin/python3)");
            return;
        }
        let dir = temp_dir("uid");
        let server = Server::start(&dir);
        // Let uid 65534 reach the socket: only SO_PEERCRED stops it now.
        fs::set_permissions(
            server.path.parent().unwrap(),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::set_permissions(&server.path, fs::Permissions::from_mode(0o777)).unwrap();
        let script = "import socket, sys\n\
                      s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
                      s.settimeout(10)\n\
                      s.connect(sys.argv[1])\n\
                      data = b''\n\
                      while True:\n    \
                          chunk = s.recv(65536)\n    \
                          if not chunk: break\n    \
                          data += chunk\n\
                      sys.stdout.write(data.hex())\n";
        let mut child = std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(&server.path)
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the python client did not finish within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "python client failed: {stderr}");
        let hex = String::from_utf8(out.stdout).unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let len =
            proto::frame_len(bytes[..FRAME_HEADER].try_into().unwrap(), MAX_RESPONSE).unwrap();
        assert_eq!(bytes.len(), FRAME_HEADER + len, "exactly one frame");
        let reply: Response = proto::decode(&bytes[FRAME_HEADER..], MAX_RESPONSE).unwrap();
        let owner = rustix::process::geteuid().as_raw();
        assert_eq!(
            reply,
            Response::Error(format!(
                "permission denied: uid 65534 may not control this clusterd (owner uid {owner})"
            ))
        );
        // The daemon is unaffected.
        assert_eq!(ask(&server.path, &Request::Status).len(), 1);
    }
}
