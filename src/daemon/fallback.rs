//! `empty_pool`: what new connections get once the pool has had no ready
//! worker for `ready_timeout`.
//!
//! With the default, `wait`, nothing happens here: connections queue in the
//! kernel's backlog until a worker is ready, as they always did. With `503`
//! or `reset`, once no worker has been ready for `ready_timeout` (counted
//! from start-up, or from the moment the last ready worker went), clusterd
//! accepts from the listeners itself:
//!
//! - `503`: reads the request head (at most [`HEAD_TIMEOUT`], and bytes
//!   are discarded as they come, so memory does not grow), answers
//!   `503 Service Unavailable` with `Retry-After` and `Connection: close`,
//!   shuts its side down and reads what the client still sends for at most
//!   [`LINGER`] (so the answer is not lost to a reset), then closes. At most
//!   [`MAX_ANSWERING`] connections are answered at once; beyond that a new
//!   one is reset at once.
//! - `reset`: closes each connection at once with a reset (`SO_LINGER` 0).
//!
//! The moment a worker is ready again (the main loop calls
//! [`Fallback::update`] after every event), clusterd stops accepting, before
//! its next accept: what is queued from then on goes to the workers.
//!
//! clusterd accepts without blocking: the listeners are made non-blocking
//! as soon as the mode is on, and each accept checks that no worker cleared
//! the flag (they share it: it belongs to the open socket, not the fd).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::net::SocketFlags;
use smol::{Async, LocalExecutor, Task, Timer};

use super::listen::Listener;
use crate::config::{Config, EmptyPool};

/// Longest wait for a request head before the 503 goes anyway.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait to write the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the answer, how long the rest of what the client sends is read
/// and discarded before the connection is closed.
pub const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read from one connection, head and linger together.
pub const MAX_READ: usize = 64 * 1024;
/// Most connections being answered a 503 at once.
pub const MAX_ANSWERING: usize = 256;
/// `Retry-After`, in seconds.
pub const RETRY_AFTER: u32 = 5;

/// Connections answered 503, and connections reset, since clusterd started.
static ANSWERED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// `(connections answered 503, connections reset)` since clusterd started.
pub fn counts() -> (u64, u64) {
    (
        ANSWERED[0].load(Ordering::Relaxed),
        ANSWERED[1].load(Ordering::Relaxed),
    )
}

/// The daemon's handle: it reports readiness, a task of its own does the rest.
pub struct Fallback {
    shared: Rc<Shared>,
    _task: Task<()>,
}

struct Shared {
    state: Cell<State>,
    changed: event_listener::Event,
    /// Copies of the listeners' fds (one open socket each: the same queue;
    /// with `dispatch = reuseport`, every slot's sockets).
    fds: RefCell<Vec<OwnedFd>>,
    /// Bumped when `fds` is replaced.
    version: Cell<u64>,
    /// Connections being answered.
    answering: Cell<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: EmptyPool,
    ready_timeout: Duration,
    /// Since when no worker has been ready (`None` while one is, or while
    /// clusterd is stopping).
    empty_since: Option<Instant>,
}

impl State {
    /// When clusterd starts (or started) answering, if it must.
    fn due(&self) -> Option<Instant> {
        match (self.mode, self.empty_since) {
            (EmptyPool::Wait, _) | (_, None) => None,
            (_, Some(since)) => Some(since + self.ready_timeout),
        }
    }

    fn answering_at(&self, now: Instant) -> bool {
        self.due().is_some_and(|due| now >= due)
    }
}

impl Fallback {
    /// Starts the fallback for `listeners`; no worker is ready yet.
    pub fn new(
        ex: &Rc<LocalExecutor<'static>>,
        config: &Config,
        listeners: &[Listener],
    ) -> Fallback {
        let fds = copies(listeners);
        let shared = Rc::new(Shared {
            state: Cell::new(State {
                mode: config.empty_pool,
                ready_timeout: config.ready_timeout,
                empty_since: Some(Instant::now()),
            }),
            changed: event_listener::Event::new(),
            fds: RefCell::new(fds),
            version: Cell::new(0),
            answering: Cell::new(0),
        });
        let task = ex.spawn(run(shared.clone(), ex.clone()));
        Fallback {
            shared,
            _task: task,
        }
    }

    /// Replaces the listeners (`dispatch = reuseport`: slots came or went);
    /// the copies of the old ones are closed at once.
    pub fn set_listeners<'a>(&self, listeners: impl IntoIterator<Item = &'a Listener>) {
        *self.shared.fds.borrow_mut() = copies(listeners);
        self.shared.version.set(self.shared.version.get() + 1);
        self.shared.changed.notify(usize::MAX);
    }

    /// Tells the fallback how many workers are ready (after every event of
    /// the main loop; cheap when nothing changed).
    pub fn update(&self, config: &Config, ready: u32, stopping: bool) {
        let old = self.shared.state.get();
        let empty_since = match (ready == 0 && !stopping, old.empty_since) {
            (false, _) => None,
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
        };
        let new = State {
            mode: config.empty_pool,
            ready_timeout: config.ready_timeout,
            empty_since,
        };
        if new != old {
            self.shared.state.set(new);
            self.shared.changed.notify(usize::MAX);
        }
    }
}

/// Copies of `listeners`' fds (a failure is logged, that listener left out).
fn copies<'a>(listeners: impl IntoIterator<Item = &'a Listener>) -> Vec<OwnedFd> {
    listeners
        .into_iter()
        .filter_map(|l| match l.fd.try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                crate::log!(error, "empty_pool.failed", listener = l.name, error = e);
                None
            }
        })
        .collect()
}

/// The fallback's task: waits until it is due, then accepts on every
/// listener until a worker is ready again.
async fn run(shared: Rc<Shared>, ex: Rc<LocalExecutor<'static>>) {
    let mut listeners: Vec<Rc<Async<OwnedFd>>> = Vec::new();
    // Since when clusterd answers, and how many it had answered then.
    let mut episode: Option<(Instant, (u64, u64))> = None;
    let mut watched = shared.version.get();
    loop {
        let changed = shared.changed.listen();
        let state = shared.state.get();
        if watched != shared.version.get() {
            // Closes the copies of sockets that are gone.
            listeners.clear();
            watched = shared.version.get();
        }
        if state.mode != EmptyPool::Wait && listeners.is_empty() {
            listeners = watch(&shared.fds.borrow());
        }
        let now = Instant::now();
        if !state.answering_at(now) {
            if let Some((since, (a0, r0))) = episode.take() {
                let (a, r) = counts();
                crate::log!(
                    info,
                    "empty_pool.end",
                    answered = a - a0,
                    reset = r - r0,
                    took_ms = since.elapsed().as_millis()
                );
            }
            match state.due() {
                Some(due) => {
                    let timer = async {
                        Timer::at(due).await;
                    };
                    smol::future::or(changed, timer).await;
                }
                None => changed.await,
            }
            continue;
        }
        if episode.is_none() {
            crate::log!(
                warn,
                "empty_pool.begin",
                mode = match state.mode {
                    EmptyPool::Http503 => "503",
                    _ => "reset",
                },
                reason = format!(
                    "no worker ready for {}: clusterd answers new connections itself",
                    crate::lifecycle::human(state.ready_timeout)
                )
            );
            episode = Some((now, counts()));
        }
        // Dropped (cancelled, never polled again) when the state changes.
        let _accepting: Vec<Task<()>> = listeners
            .iter()
            .map(|l| ex.spawn(accept(l.clone(), shared.clone(), ex.clone())))
            .collect();
        changed.await;
    }
}

/// The listeners, registered with the reactor (which makes them
/// non-blocking).
fn watch(fds: &[OwnedFd]) -> Vec<Rc<Async<OwnedFd>>> {
    fds.iter()
        .filter_map(|fd| match fd.try_clone().and_then(Async::new) {
            Ok(a) => Some(Rc::new(a)),
            Err(e) => {
                crate::log!(error, "empty_pool.failed", error = e);
                None
            }
        })
        .collect()
}

/// Accepts on `listener` while clusterd must answer.
async fn accept(listener: Rc<Async<OwnedFd>>, shared: Rc<Shared>, ex: Rc<LocalExecutor<'static>>) {
    let mut warned = false;
    loop {
        if listener.readable().await.is_err() {
            return;
        }
        let state = shared.state.get();
        if !state.answering_at(Instant::now()) {
            // A worker is ready: this task is about to be cancelled.
            std::future::pending::<()>().await;
        }
        let fd = listener.get_ref().as_fd();
        super::listen::keep_nonblocking(fd, &mut warned, "empty_pool.blocking");
        match rustix::net::accept_with(fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
            Ok(conn) => {
                if state.mode == EmptyPool::Http503 && shared.answering.get() < MAX_ANSWERING {
                    shared.answering.set(shared.answering.get() + 1);
                    ANSWERED[0].fetch_add(1, Ordering::Relaxed);
                    let shared = shared.clone();
                    ex.spawn(async move {
                        let _ = answer(conn).await;
                        shared.answering.set(shared.answering.get() - 1);
                    })
                    .detach();
                } else {
                    ANSWERED[1].fetch_add(1, Ordering::Relaxed);
                    reset(conn);
                }
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::CONNABORTED) => {}
            Err(e) => {
                // Out of fds, say: do not spin.
                crate::log!(warn, "empty_pool.accept_failed", error = e);
                Timer::after(Duration::from_millis(100)).await;
            }
        }
        smol::future::yield_now().await;
    }
}

/// `empty_pool` for a connection `dispatch = clusterd` held for
/// `ready_timeout` without a worker to take it: a 503 or a reset (`wait`
/// never gives up, so never comes here).
pub(super) async fn take(conn: OwnedFd, mode: EmptyPool) {
    if mode == EmptyPool::Http503 {
        ANSWERED[0].fetch_add(1, Ordering::Relaxed);
        let _ = answer(conn).await;
    } else {
        ANSWERED[1].fetch_add(1, Ordering::Relaxed);
        reset(conn);
    }
}

/// Closes `conn` with a reset (for TCP; a unix socket is just closed).
fn reset(conn: OwnedFd) {
    let _ = rustix::net::sockopt::set_socket_linger(&conn, Some(Duration::ZERO));
    drop(conn);
}

/// The answer, head and body.
fn response(head_only: bool) -> String {
    let body =
        "503 Service Unavailable: no worker is ready to serve this request; try again shortly\n";
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: {RETRY_AFTER}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    out
}

/// `fut`, or `None` if it takes longer than `limit`.
pub(super) async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        Timer::after(limit).await;
        None
    })
    .await
}

/// Reads the request head (or until the deadline, EOF, or [`MAX_READ`]),
/// answers 503, and lingers briefly so the client reads the answer.
async fn answer(conn: OwnedFd) -> io::Result<()> {
    let conn = Async::new(conn)?;
    let mut buf = [0u8; 1024];
    let mut read = 0usize;
    // The first bytes (to tell HEAD) and the last three (to find the blank
    // line across reads).
    let mut first = [0u8; 5];
    let mut tail: Vec<u8> = Vec::with_capacity(1024 + 3);
    let mut eof = false;
    let _ = within(HEAD_TIMEOUT, async {
        while read < MAX_READ {
            let n = conn
                .read_with(|fd| rustix::io::read(fd, &mut buf).map_err(io::Error::from))
                .await?;
            if n == 0 {
                eof = true;
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                if read + i < first.len() {
                    first[read + i] = b;
                }
            }
            read += n;
            let keep = tail.len().saturating_sub(3);
            tail.drain(..keep);
            tail.extend_from_slice(&buf[..n]);
            if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
                break;
            }
        }
        io::Result::Ok(())
    })
    .await;
    let out = response(&first == b"HEAD ");
    let mut out = out.as_bytes();
    within(WRITE_TIMEOUT, async {
        while !out.is_empty() {
            let n = conn
                .write_with(|fd| rustix::io::write(fd, out).map_err(io::Error::from))
                .await?;
            out = &out[n..];
        }
        io::Result::Ok(())
    })
    .await
    .unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()))?;
    let _ = rustix::net::shutdown(conn.get_ref(), rustix::net::Shutdown::Write);
    if !eof {
        let _ = within(LINGER, async {
            while read < MAX_READ {
                let n = conn
                    .read_with(|fd| rustix::io::read(fd, &mut buf).map_err(io::Error::from))
                    .await?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            io::Result::Ok(())
        })
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_once_the_pool_has_been_empty_for_ready_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let state = |mode, empty_since| State {
            mode,
            ready_timeout: timeout,
            empty_since,
        };
        let s = state(EmptyPool::Http503, Some(t0));
        assert!(!s.answering_at(t0));
        assert!(!s.answering_at(t0 + timeout - Duration::from_millis(1)));
        assert!(s.answering_at(t0 + timeout));
        assert_eq!(s.due(), Some(t0 + timeout));
        assert!(state(EmptyPool::Reset, Some(t0)).answering_at(t0 + timeout));
        // A ready worker, or the default mode: never.
        assert!(!state(EmptyPool::Http503, None).answering_at(t0 + timeout));
        assert!(!state(EmptyPool::Wait, Some(t0)).answering_at(t0 + timeout * 100));
        assert_eq!(state(EmptyPool::Wait, Some(t0)).due(), None);
    }

    #[test]
    fn the_answer_is_a_complete_503_that_closes() {
        let full = response(false);
        assert!(full.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(full.contains("\r\nRetry-After: 5\r\n"));
        assert!(full.contains("\r\nConnection: close\r\n"));
        let (head, body) = full.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let head_only = response(true);
        assert!(head_only.ends_with("\r\n\r\n"));
        assert!(head_only.contains(&format!("Content-Length: {}", body.len())));
    }
}
