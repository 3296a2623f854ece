//! `dispatch = clusterd`: clusterd accepts, peeks, and passes each
//! connection to a worker it chooses ([`crate::dispatch`] decides).
//!
//! # Implementation
//!
//! One task per listener accepts (non-blocking, like [`super::fallback`]).
//! A connection whose session key is in the request head (`sticky =
//! socket.io`, `cookie:`, `header:`, `query:`) gets a task of its own that
//! peeks at the head with `MSG_PEEK` (nothing is consumed: the worker reads
//! every byte the client sent): at most [`MAX_PEEK`] bytes, for at most
//! [`PEEK_TIMEOUT`]; a client that sends nothing or trickles its head is
//! then dispatched by balance, as one without a key. At most
//! [`MAX_PEEKING`] heads are peeked at once; beyond that a connection goes
//! by balance at once. Without a key to peek for (`sticky = ip`, or none),
//! the accept task dispatches the connection itself.
//!
//! Passing: a native worker announced one inbox per listener (a
//! `SOCK_SEQPACKET` socketpair, [`crate::proto::FromWorker::TakesConnections`]);
//! clusterd sends a [`ToWorker::Connection`] record with the fd attached.
//! A node worker gets it on Node's own IPC channel as Node's internal
//! handle message, `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{...}}`
//! plus a newline, with the fd attached to the same `sendmsg`; Node wraps
//! it in a `net.Socket`, emits the inner message with it as
//! `internalMessage` on `process` (its `cmd` starts with `NODE_`, so the
//! app's own `message` listeners never see it) and answers
//! `NODE_HANDLE_ACK`, which clusterd ignores. clusterd closes its copy of
//! the fd once it is sent: a worker that never takes it leaks nothing.
//!
//! A send that fails (the worker's inbox or channel is full, the worker
//! died) goes to another worker. With no worker ready, the connection is
//! held (at most [`MAX_HELD`]; past that the listeners are left alone and
//! the kernel's backlog queues) until one is; once it has waited
//! `ready_timeout` it gets `empty_pool` (`503`, `reset`; `wait` keeps
//! waiting). No connection clusterd accepted is lost to a restart or a
//! crash of a worker it was not yet given to.
//!
//! A worker stops getting connections before it is told to drain (on the
//! same thread, so every connection sent to it is in its inbox before the
//! drain). A native worker takes what is in its inboxes when it drains
//! ([`crate::worker::Acceptor`]); a node worker is sent
//! `{"cmd":"NODE_CLUSTERD_DISPATCH_END"}` before SIGTERM and the adapter
//! does not exit before it has read it (everything sent before it).
//!
//! `clusterctl upgrade` hands the dispatcher over ([`Dispatcher::hand_off`],
//! [`Dispatcher::take_over`]): every worker's inboxes and load, and every
//! connection clusterd holds or is peeking at (nothing of it was read, so
//! the new image peeks again and passes it as if just accepted).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use smol::{Async, LocalExecutor, Task, Timer};

use super::listen::Listener;
use crate::config::{Balance, Config, EmptyPool, Sticky};
use crate::dispatch::{self, Candidate, Key, MAX_PEEK, Turn};
use crate::lifecycle::InstanceId;
use crate::proto::{self, ToWorker};
use crate::scoreboard::{self, Board};

/// Longest wait for a request head (a silent or trickling client); then
/// the connection goes by balance. Generous: a head that comes late from a
/// busy client (an event loop that connects, then runs other work before it
/// writes) is still a session's request, and by balance it would reach a
/// worker that does not know the session (1 s misrouted hundreds of
/// Socket.IO polls of a loaded 2-CPU machine; waiting holds up no one).
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most heads peeked at at once; beyond, connections go by balance at once.
pub const MAX_PEEKING: usize = 1024;
/// Most connections held while no worker can take them; beyond, clusterd
/// stops accepting and the kernel's backlog queues.
pub const MAX_HELD: usize = 4096;

/// How soon a connection every ready worker refused (their queues were
/// full) is offered again.
const RETRY_FULL: Duration = Duration::from_millis(20);

/// Why [`Shared::try_send`] sent nothing.
enum NotSent {
    /// No worker is ready.
    NoneReady,
    /// Ready workers could not take it (full, or gone meanwhile).
    Refused,
}

/// Connections passed to a worker, passes that failed and went to another
/// worker, heads that were not complete in time, since clusterd started;
/// and the connections held now.
static COUNTS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

/// `(connections passed, sends retried on another worker, peeks that
/// timed out, connections held now)`.
pub fn counts() -> (u64, u64, u64, u64) {
    (
        COUNTS[0].load(Ordering::Relaxed),
        COUNTS[1].load(Ordering::Relaxed),
        COUNTS[2].load(Ordering::Relaxed),
        COUNTS[3].load(Ordering::Relaxed),
    )
}

/// The daemon's handle.
pub struct Dispatcher {
    shared: Rc<Shared>,
    _tasks: Vec<Task<()>>,
}

struct Shared {
    balance: Cell<Balance>,
    sticky: RefCell<Option<Sticky>>,
    empty_pool: Cell<EmptyPool>,
    ready_timeout: Cell<Duration>,
    workers: RefCell<BTreeMap<InstanceId, Target>>,
    turn: Cell<Turn>,
    /// A worker became ready: held connections look again.
    changed: event_listener::Event,
    /// Room to accept again (a held or peeked connection went).
    room: event_listener::Event,
    peeking: Cell<usize>,
    held: Cell<usize>,
    /// clusterd's mapping of the scoreboard (native workers' counts).
    board: Option<Board>,
    /// Bytes one passed connection takes in an inbox's send queue.
    record_size: usize,
    ex: Rc<LocalExecutor<'static>>,
    /// Connections accepted and not yet passed (peeked at, held, waiting
    /// for a send), by a token: what an upgrade hands over.
    inflight: RefCell<BTreeMap<u64, (RawFd, u32)>>,
    next_token: Cell<u64>,
}

/// A connection in [`Shared::inflight`] for as long as this lives.
struct InFlight {
    shared: Rc<Shared>,
    token: u64,
}

impl InFlight {
    fn track(shared: &Rc<Shared>, conn: &OwnedFd, listener: u32) -> InFlight {
        let token = shared.next_token.get();
        shared.next_token.set(token + 1);
        shared
            .inflight
            .borrow_mut()
            .insert(token, (conn.as_raw_fd(), listener));
        InFlight {
            shared: shared.clone(),
            token,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.inflight.borrow_mut().remove(&self.token);
    }
}

/// The dispatcher as an upgrade hands it to the new image; fds are
/// indices the caller's `add` gave (see [`Dispatcher::hand_off`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Handed {
    pub workers: Vec<HandedWorker>,
    /// Connections not yet passed: fd and listener index.
    pub inflight: Vec<(u32, u32)>,
    pub turn: Turn,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct HandedWorker {
    pub id: InstanceId,
    pub slot: u32,
    pub cell: Option<u32>,
    /// A native worker's inboxes (none: not announced yet, or node).
    pub inboxes: Option<Vec<u32>>,
    /// A node worker (its channel is handed over with the worker).
    pub node: bool,
    pub reported: u64,
    pub sent_since_report: u64,
    pub warned: bool,
}

/// One worker process, as the dispatcher sees it.
struct Target {
    slot: u32,
    /// Ready and not draining (set by [`Dispatcher::update`]).
    ready: bool,
    way: Way,
    /// The scoreboard cell of a native worker.
    cell: Option<u32>,
    /// A node worker's last reported count, and connections passed since.
    reported: u64,
    sent_since_report: u64,
    /// Said once: a ready native worker that did not announce inboxes.
    warned: bool,
}

enum Way {
    /// A native worker that has not announced inboxes (yet, or ever).
    Waiting,
    /// clusterd's ends of a native worker's inboxes, by listener.
    Native(Vec<OwnedFd>),
    /// Node's IPC channel (a copy of clusterd's end); `busy` while the rest
    /// of a partly written message is being written.
    Node(Rc<OwnedFd>, Rc<Cell<bool>>),
}

impl Dispatcher {
    /// Starts dispatching on `listeners` if the pool has `dispatch =
    /// clusterd`; `board` is the scoreboard's memfd.
    pub fn start(
        ex: &Rc<LocalExecutor<'static>>,
        config: &Config,
        listeners: &[Listener],
        board: Option<&OwnedFd>,
    ) -> Option<Dispatcher> {
        if config.dispatch != crate::config::Dispatch::Clusterd {
            return None;
        }
        let board = board.and_then(|fd| match Board::map(fd, 0) {
            Ok(b) => Some(b),
            Err(e) => {
                crate::log!(warn, "dispatch.scoreboard_failed", error = e);
                None
            }
        });
        let shared = Rc::new(Shared {
            balance: Cell::new(config.balance),
            sticky: RefCell::new(config.sticky.clone()),
            empty_pool: Cell::new(config.empty_pool),
            ready_timeout: Cell::new(config.ready_timeout),
            workers: RefCell::default(),
            turn: Cell::default(),
            changed: event_listener::Event::new(),
            room: event_listener::Event::new(),
            peeking: Cell::new(0),
            held: Cell::new(0),
            board,
            record_size: record_size().unwrap_or(1024).max(1),
            ex: ex.clone(),
            inflight: RefCell::default(),
            next_token: Cell::new(0),
        });
        let mut tasks = Vec::new();
        for (index, l) in listeners.iter().enumerate() {
            match l.fd.try_clone().and_then(Async::new) {
                Ok(fd) => tasks.push(ex.spawn(accept(
                    Rc::new(fd),
                    index as u32,
                    shared.clone(),
                    ex.clone(),
                ))),
                Err(e) => crate::log!(error, "dispatch.failed", listener = l.name, error = e),
            }
        }
        crate::log!(
            info,
            "dispatch",
            balance = match config.balance {
                Balance::LeastConnections => "least-connections",
                Balance::RoundRobin => "round-robin",
            },
            sticky = config
                .sticky
                .as_ref()
                .map_or_else(|| "off".to_string(), ToString::to_string)
        );
        Some(Dispatcher {
            shared,
            _tasks: tasks,
        })
    }

    /// A rolling restart put a new config in force (balance, sticky,
    /// empty_pool and ready_timeout apply at once).
    pub fn configure(&self, config: &Config) {
        let s = &self.shared;
        s.balance.set(config.balance);
        *s.sticky.borrow_mut() = config.sticky.clone();
        s.empty_pool.set(config.empty_pool);
        s.ready_timeout.set(config.ready_timeout);
    }

    /// A native worker was spawned, with scoreboard cell `cell`.
    pub fn native(&self, id: InstanceId, slot: u32, cell: Option<u32>) {
        self.add(id, slot, cell, Way::Waiting);
    }

    /// A node worker was spawned; `channel` is clusterd's end of Node's
    /// IPC channel.
    pub fn node(&self, id: InstanceId, slot: u32, channel: BorrowedFd<'_>) {
        match channel.try_clone_to_owned() {
            Ok(fd) => self.add(
                id,
                slot,
                None,
                Way::Node(Rc::new(fd), Rc::new(Cell::new(false))),
            ),
            Err(e) => crate::log!(error, "dispatch.failed", id = slot, error = e),
        }
    }

    fn add(&self, id: InstanceId, slot: u32, cell: Option<u32>, way: Way) {
        let target = Target {
            slot,
            ready: false,
            way,
            cell,
            reported: 0,
            sent_since_report: 0,
            warned: false,
        };
        self.shared.workers.borrow_mut().insert(id, target);
    }

    /// A native worker announced its inboxes (one per listener).
    pub fn takes_connections(&self, id: InstanceId, inboxes: Vec<OwnedFd>, listeners: usize) {
        let mut workers = self.shared.workers.borrow_mut();
        let Some(t) = workers.get_mut(&id) else {
            return;
        };
        if inboxes.len() != listeners {
            crate::log!(
                warn,
                "worker.protocol",
                id = t.slot,
                error = format!(
                    "{} inboxes announced for {listeners} listeners (ignored)",
                    inboxes.len()
                )
            );
            return;
        }
        for fd in &inboxes {
            let _ = rustix::io::ioctl_fionbio(fd, true);
        }
        t.way = Way::Native(inboxes);
        if t.ready {
            self.shared.changed.notify(usize::MAX);
        }
    }

    /// A node worker reported the connections it holds.
    pub fn reported(&self, id: InstanceId, active: u32) {
        if let Some(t) = self.shared.workers.borrow_mut().get_mut(&id) {
            t.reported = u64::from(active);
            t.sent_since_report = 0;
        }
    }

    /// The worker is about to be told to drain (or killed): no more
    /// connections for it. A node worker is told that none follow.
    pub fn draining(&self, id: InstanceId) {
        let mut workers = self.shared.workers.borrow_mut();
        let Some(t) = workers.get_mut(&id) else {
            return;
        };
        t.ready = false;
        if let Way::Node(fd, _) = &t.way {
            let end = b"{\"cmd\":\"NODE_CLUSTERD_DISPATCH_END\"}\n";
            // Best effort: a full channel means a stuck worker, which its
            // drain timeout ends; the adapter then waits that long at most.
            let _ = rustix::net::send(fd, end, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
        }
        // Its inboxes stay open until it exits: closing them would drop
        // what it has not taken yet.
    }

    /// The worker exited (reaped).
    pub fn gone(&self, id: InstanceId) {
        self.shared.workers.borrow_mut().remove(&id);
    }

    /// Whether a message to a node worker is partly written: an upgrade
    /// must wait, or the new image would write into the middle of it.
    pub fn mid_message(&self) -> bool {
        self.shared
            .workers
            .borrow()
            .values()
            .any(|t| matches!(&t.way, Way::Node(_, busy) if busy.get()))
    }

    /// The state a new image takes over (`clusterctl upgrade`); `add`
    /// keeps an fd across the exec and names it. Called right before the
    /// exec, with no await in between: the connections in flight are
    /// exactly the ones no task will touch again.
    pub fn hand_off(&self, add: &mut dyn FnMut(BorrowedFd<'_>) -> u32) -> Handed {
        let workers = self
            .shared
            .workers
            .borrow()
            .iter()
            .map(|(&id, t)| HandedWorker {
                id,
                slot: t.slot,
                cell: t.cell,
                inboxes: match &t.way {
                    Way::Native(inboxes) => {
                        Some(inboxes.iter().map(|fd| add(fd.as_fd())).collect())
                    }
                    _ => None,
                },
                node: matches!(t.way, Way::Node(..)),
                reported: t.reported,
                sent_since_report: t.sent_since_report,
                warned: t.warned,
            })
            .collect();
        let inflight = self
            .shared
            .inflight
            .borrow()
            .values()
            .map(|&(fd, listener)| {
                // SAFETY: the fd is owned by the task that registered it,
                // which unregisters it before it closes it; that task is
                // not polled again before the exec.
                (add(unsafe { BorrowedFd::borrow_raw(fd) }), listener)
            })
            .collect();
        Handed {
            workers,
            inflight,
            turn: self.shared.turn.get(),
        }
    }

    /// Takes over what [`Dispatcher::hand_off`] gave, after the workers
    /// were restored; `take` gives an fd back, `channel` a copy of a node
    /// worker's IPC channel. The connections in flight are dispatched again.
    pub fn take_over(
        &self,
        handed: Handed,
        take: &mut dyn FnMut(u32) -> io::Result<OwnedFd>,
        channel: &dyn Fn(InstanceId) -> Option<OwnedFd>,
    ) -> io::Result<()> {
        self.shared.turn.set(handed.turn);
        for w in handed.workers {
            if w.node {
                let Some(fd) = channel(w.id) else { continue };
                let way = Way::Node(Rc::new(fd), Rc::new(Cell::new(false)));
                self.add(w.id, w.slot, None, way);
            } else {
                self.native(w.id, w.slot, w.cell);
            }
            if let Some(inboxes) = w.inboxes {
                let fds = inboxes
                    .into_iter()
                    .map(&mut *take)
                    .collect::<io::Result<Vec<_>>>()?;
                let n = fds.len();
                self.takes_connections(w.id, fds, n);
            }
            if let Some(t) = self.shared.workers.borrow_mut().get_mut(&w.id) {
                t.reported = w.reported;
                t.sent_since_report = w.sent_since_report;
                t.warned = w.warned;
            }
        }
        for (fd, listener) in handed.inflight {
            let conn = take(fd)?;
            handle(conn, listener, &self.shared, &self.shared.ex);
        }
        Ok(())
    }

    /// Which workers are ready (after every event of the main loop).
    pub fn update(&self, ready: impl Iterator<Item = (InstanceId, bool)>) {
        let mut newly = false;
        let mut workers = self.shared.workers.borrow_mut();
        for (id, is_ready) in ready {
            let Some(t) = workers.get_mut(&id) else {
                continue;
            };
            if is_ready && !t.ready {
                newly = true;
                if matches!(t.way, Way::Waiting) && !t.warned {
                    t.warned = true;
                    crate::log!(
                        warn,
                        "dispatch.unsupported",
                        id = t.slot,
                        reason = "the worker did not announce it takes connections from \
                                  clusterd (a clusterd::worker library older than dispatch): \
                                  it accepts from the listeners itself, unbalanced and not sticky"
                    );
                }
            }
            t.ready = is_ready;
        }
        drop(workers);
        if newly {
            self.shared.changed.notify(usize::MAX);
        }
    }
}

/// The bytes one [`ToWorker::Connection`] record with an fd attached takes
/// in a `SOCK_SEQPACKET` send queue (what `SIOCOUTQ` counts), measured once.
fn record_size() -> io::Result<usize> {
    let (a, _b) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    crate::fdpass::send_with_fds(&a, &proto::encode(&ToWorker::Connection), &[a.as_fd()])?;
    outq(a.as_fd())
}

/// Bytes sent on `fd` that its peer has not read yet (`SIOCOUTQ`).
fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int through the pointer,
    // which points at `n`; `fd` is a valid socket for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

impl Shared {
    /// One entry per worker id that can take a connection on `listener`:
    /// its newest ready worker, with its load.
    fn candidates(&self, listener: u32, exclude: &[InstanceId]) -> Vec<(Candidate, InstanceId)> {
        let workers = self.workers.borrow();
        let mut by_slot: BTreeMap<u32, (Candidate, InstanceId)> = BTreeMap::new();
        for (&id, t) in workers.iter() {
            if !t.ready || exclude.contains(&id) {
                continue;
            }
            let load = match &t.way {
                Way::Waiting => continue,
                Way::Node(_, busy) if busy.get() => continue,
                Way::Node(..) => t.reported + t.sent_since_report,
                Way::Native(inboxes) => {
                    let Some(inbox) = inboxes.get(listener as usize) else {
                        continue;
                    };
                    let held = match (&self.board, t.cell) {
                        (Some(board), Some(cell)) => board.load(cell),
                        _ => 0,
                    };
                    if held == scoreboard::WITHDRAWN {
                        continue; // draining on its own (SIGTERM)
                    }
                    let held = if held == scoreboard::VACANT { 0 } else { held };
                    let queued = outq(inbox.as_fd()).unwrap_or(0) / self.record_size;
                    u64::from(held) + queued as u64
                }
            };
            let c = Candidate { slot: t.slot, load };
            // Instance ids grow: the later one of a slot is the newer.
            by_slot.insert(t.slot, (c, id));
        }
        by_slot.into_values().collect()
    }

    /// Sends `conn` to worker `id`; `Err` when it could not take it (full,
    /// gone), and then `conn` is still ours.
    fn send(&self, id: InstanceId, listener: u32, conn: &OwnedFd) -> io::Result<()> {
        let mut workers = self.workers.borrow_mut();
        let t = workers
            .get_mut(&id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        match &t.way {
            Way::Native(inboxes) => {
                let inbox = inboxes
                    .get(listener as usize)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                let record = proto::encode(&ToWorker::Connection);
                crate::fdpass::send_with_fds(inbox, &record, &[conn.as_fd()])?;
            }
            Way::Node(channel, busy) => {
                let line = format!(
                    "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\
                     {{\"cmd\":\"NODE_CLUSTERD_CONNECTION\",\"listener\":{listener}}}}}\n"
                );
                let sent = send_dontwait(channel, line.as_bytes(), conn.as_fd())?;
                if sent < line.len() {
                    // The fd went with the first byte: the rest must follow
                    // before anything else is written on the channel.
                    busy.set(true);
                    let rest = line.as_bytes()[sent..].to_vec();
                    let (channel, busy) = (channel.clone(), busy.clone());
                    self.ex
                        .spawn(async move {
                            write_rest(&channel, rest).await;
                            busy.set(false);
                        })
                        .detach();
                }
                t.sent_since_report += 1;
            }
            Way::Waiting => return Err(io::ErrorKind::NotFound.into()),
        }
        Ok(())
    }

    /// Sends `conn` to the worker `key` and the balance choose, or to the
    /// next one while sends fail; `Err` when no worker took it, saying
    /// whether one could have (and was full or failed) or none is ready.
    fn try_send(&self, conn: &OwnedFd, listener: u32, key: &Key<'_>) -> Result<(), NotSent> {
        let mut failed = Vec::new();
        loop {
            let candidates = self.candidates(listener, &failed);
            let pool: Vec<Candidate> = candidates.iter().map(|(c, _)| *c).collect();
            let mut turn = self.turn.get();
            let chosen = dispatch::choose(&pool, key, self.balance.get(), &mut turn);
            self.turn.set(turn);
            let Some(i) = chosen else {
                return Err(if failed.is_empty() {
                    NotSent::NoneReady
                } else {
                    NotSent::Refused
                });
            };
            let id = candidates[i].1;
            if self.send(id, listener, conn).is_ok() {
                COUNTS[0].fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            COUNTS[1].fetch_add(1, Ordering::Relaxed);
            failed.push(id);
        }
    }

    /// Passes `conn` to the worker `key` and the balance choose; waits while
    /// no worker can take it (see the module's documentation).
    async fn dispatch(&self, conn: OwnedFd, listener: u32, key: Key<'_>, tracked: InFlight) {
        let accepted = Instant::now();
        let mut holding = false;
        let release = |holding: bool| {
            if holding {
                self.held.set(self.held.get() - 1);
                COUNTS[3].fetch_sub(1, Ordering::Relaxed);
                self.room.notify(1);
            }
        };
        loop {
            let changed = self.changed.listen();
            let refused = match self.try_send(&conn, listener, &key) {
                Ok(()) => {
                    release(holding);
                    return; // our copy of the fd closes here
                }
                Err(NotSent::Refused) => true,
                Err(NotSent::NoneReady) => false,
            };
            // No worker could take it: held until one is ready.
            if !holding {
                holding = true;
                self.held.set(self.held.get() + 1);
                COUNTS[3].fetch_add(1, Ordering::Relaxed);
            }
            let mode = self.empty_pool.get();
            let now = Instant::now();
            let give_up = (mode != EmptyPool::Wait).then(|| accepted + self.ready_timeout.get());
            if give_up.is_some_and(|t| now >= t) {
                release(holding);
                // Answered here from now on: an upgrade does not take it.
                drop(tracked);
                super::fallback::take(conn, mode).await;
                return;
            }
            // A worker becoming ready says so; full queues drain without a
            // word, so then look again soon.
            let poll = refused.then(|| now + RETRY_FULL);
            match [give_up, poll].into_iter().flatten().min() {
                Some(at) => {
                    let _ = super::fallback::within(at - now, changed).await;
                }
                None => changed.await,
            }
        }
    }
}

/// Sends `bytes` with `fd` attached on a stream socket, without waiting;
/// returns how many bytes went (at least one, or an error).
fn send_dontwait(channel: &OwnedFd, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
    use std::mem::MaybeUninit;
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let n = rustix::net::sendmsg(
        channel,
        &[io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// Writes the rest of a partly sent message on a node channel (bounded:
/// a worker that does not read for a while is stuck, and its channel is
/// given up).
async fn write_rest(channel: &OwnedFd, mut rest: Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !rest.is_empty() && Instant::now() < deadline {
        match rustix::net::send(channel, &rest, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => {
                rest.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                Timer::after(Duration::from_millis(5)).await;
            }
            Err(_) => return,
        }
    }
}

/// Accepts on listener `index` for as long as clusterd runs.
async fn accept(
    listener: Rc<Async<OwnedFd>>,
    index: u32,
    shared: Rc<Shared>,
    ex: Rc<LocalExecutor<'static>>,
) {
    let mut warned = false;
    loop {
        while shared.held.get() + shared.peeking.get() >= MAX_HELD {
            let room = shared.room.listen();
            if shared.held.get() + shared.peeking.get() < MAX_HELD {
                break;
            }
            room.await;
        }
        if listener.readable().await.is_err() {
            return;
        }
        let fd = listener.get_ref().as_fd();
        super::listen::keep_nonblocking(fd, &mut warned, "dispatch.blocking");
        // Take what is queued, a bounded batch at a time.
        for _ in 0..64 {
            match rustix::net::accept_with(fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(conn) => handle(conn, index, &shared, &ex),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
                Err(e) => {
                    // Out of fds, say: do not spin.
                    crate::log!(warn, "dispatch.accept_failed", error = e);
                    Timer::after(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
        smol::future::yield_now().await;
    }
}

/// One accepted connection: its key, then the worker.
fn handle(conn: OwnedFd, listener: u32, shared: &Rc<Shared>, ex: &Rc<LocalExecutor<'static>>) {
    let sticky = shared.sticky.borrow().clone();
    match sticky {
        Some(Sticky::Ip) => {
            let ip = peer_ip(&conn);
            let key = ip.as_ref().map_or(Key::None, |ip| Key::Hash(ip));
            if let Some(conn) = try_now(shared, conn, listener, &key) {
                let key = ip.map(|ip| ip.to_vec());
                let tracked = InFlight::track(shared, &conn, listener);
                let shared = shared.clone();
                ex.spawn(async move {
                    let key = key.as_deref().map_or(Key::None, Key::Hash);
                    shared.dispatch(conn, listener, key, tracked).await;
                })
                .detach();
            }
        }
        Some(sticky) if dispatch::needs_head(Some(&sticky)) => {
            if shared.peeking.get() >= MAX_PEEKING {
                if let Some(conn) = try_now(shared, conn, listener, &Key::None) {
                    spawn_dispatch(shared, ex, conn, listener);
                }
                return;
            }
            // Often the head is there by the time the connection is
            // accepted: then no task, no wait.
            let mut buf = [0u8; MAX_PEEK];
            if let Peeked::Whole(n) = peek_now(&conn, &mut buf) {
                let key = dispatch::key(&sticky, &buf[..n]);
                if let Some(conn) = try_now(shared, conn, listener, &key) {
                    let head = buf[..n].to_vec();
                    let tracked = InFlight::track(shared, &conn, listener);
                    let shared = shared.clone();
                    ex.spawn(async move {
                        let key = dispatch::key(&sticky, &head);
                        shared.dispatch(conn, listener, key, tracked).await;
                    })
                    .detach();
                }
                return;
            }
            shared.peeking.set(shared.peeking.get() + 1);
            let tracked = InFlight::track(shared, &conn, listener);
            let shared = shared.clone();
            ex.spawn(async move {
                let head = peek(&conn).await;
                shared.peeking.set(shared.peeking.get() - 1);
                shared.room.notify(1);
                let key = dispatch::key(&sticky, &head);
                shared.dispatch(conn, listener, key, tracked).await;
            })
            .detach();
        }
        _ => {
            if let Some(conn) = try_now(shared, conn, listener, &Key::None) {
                spawn_dispatch(shared, ex, conn, listener);
            }
        }
    }
}

fn spawn_dispatch(
    shared: &Rc<Shared>,
    ex: &Rc<LocalExecutor<'static>>,
    conn: OwnedFd,
    listener: u32,
) {
    let tracked = InFlight::track(shared, &conn, listener);
    let shared = shared.clone();
    ex.spawn(async move { shared.dispatch(conn, listener, Key::None, tracked).await })
        .detach();
}

/// Passes `conn` at once if a worker takes it; gives it back otherwise.
fn try_now(shared: &Shared, conn: OwnedFd, listener: u32, key: &Key<'_>) -> Option<OwnedFd> {
    shared
        .try_send(&conn, listener, key)
        .is_err()
        .then_some(conn)
}

/// The client's address, as bytes to hash (an IPv4 address mapped into
/// IPv6 counts as IPv4); `None` for a unix socket.
fn peer_ip(conn: &OwnedFd) -> Option<Vec<u8>> {
    let addr = rustix::net::getpeername(conn).ok()??;
    let ip = std::net::SocketAddr::try_from(addr).ok()?.ip();
    Some(match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    })
}

/// The request head as far as it came within [`PEEK_TIMEOUT`] and
/// [`MAX_PEEK`] bytes, peeked (the bytes stay in the socket).
/// What one look at a connection's head found.
enum Peeked {
    /// `n` bytes that are all there is to look at: the whole head, the
    /// most peeked, or all the client sent before it closed or failed.
    Whole(usize),
    /// `n` bytes of a head still coming (0: nothing yet).
    Partial(usize),
}

/// Peeks at what `conn` holds now, without waiting or consuming.
fn peek_now(conn: &OwnedFd, buf: &mut [u8]) -> Peeked {
    match rustix::net::recv(conn, &mut *buf, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => Peeked::Whole(0), // closed: nothing is coming
        Ok((n, _)) if n >= buf.len() || dispatch::head_complete(&buf[..n]) => Peeked::Whole(n),
        Ok((n, _)) => Peeked::Partial(n),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Peeked::Partial(0),
        Err(_) => Peeked::Whole(0),
    }
}

async fn peek(conn: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_PEEK];
    let deadline = Instant::now() + PEEK_TIMEOUT;
    let mut seen = 0usize;
    let mut tick = Duration::from_millis(1);
    // A copy to wait on, made when first needed (the connection itself
    // stays ours whatever happens); without one, the pauses below do.
    let mut watched: Option<Option<Async<OwnedFd>>> = None;
    loop {
        match peek_now(conn, &mut buf) {
            Peeked::Whole(n) => {
                seen = n.max(seen);
                break;
            }
            Peeked::Partial(n) => seen = n.max(seen),
        }
        let now = Instant::now();
        if now >= deadline {
            COUNTS[2].fetch_add(1, Ordering::Relaxed);
            break;
        }
        let watched = watched.get_or_insert_with(|| conn.try_clone().and_then(Async::new).ok());
        if let (0, Some(watched)) = (seen, &watched) {
            // Nothing yet: the first bytes wake us.
            let readable = async {
                let _ = watched.readable().await;
            };
            if super::fallback::within(deadline - now, readable)
                .await
                .is_none()
            {
                COUNTS[2].fetch_add(1, Ordering::Relaxed);
                break;
            }
        } else {
            // Part of the head: readiness says nothing new (the bytes are
            // still there), so look again after a growing pause.
            Timer::after(tick.min(deadline - now)).await;
            tick = (tick * 2).min(Duration::from_millis(50));
        }
    }
    buf.truncate(seen);
    buf
}
