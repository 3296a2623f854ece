//! [`Listener`]: a listening socket (TCP or unix) registered with the async
//! reactor, and its balanced, limited accept ([`Listener::accept_limited`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use smol::future::{self, FutureExt as _};
use smol::{Async, Timer};

use super::inbox::Inbox;
use super::inflight::{Guard, InFlight};
use super::stream::Stream;
use crate::scoreboard::{self, Board};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Tcp,
    Unix,
    /// `dispatch = clusterd`: the listener's inbox (see [`Inbox`]).
    Inbox,
}

/// A listening socket, registered with the async reactor.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener (IPv4 or IPv6).
    Tcp(Async<std::net::TcpListener>),
    /// A unix stream listener.
    Unix(Async<std::os::unix::net::UnixListener>),
    /// `dispatch = clusterd`: connections clusterd accepted on the
    /// listener and passes to this worker, yielded like accepted ones.
    Dispatched(Inbox),
}

impl Listener {
    pub(super) fn from_fd(kind: Kind, fd: OwnedFd, address: &str) -> io::Result<Listener> {
        Ok(match kind {
            Kind::Tcp => Listener::Tcp(Async::new(std::net::TcpListener::from(fd))?),
            Kind::Unix => Listener::Unix(Async::new(std::os::unix::net::UnixListener::from(fd))?),
            Kind::Inbox => Listener::Dispatched(Inbox::new(fd, address)?),
        })
    }

    /// Whether clusterd passes this listener's connections (`dispatch =
    /// clusterd`) rather than the worker accepting them.
    pub fn is_dispatched(&self) -> bool {
        matches!(self, Listener::Dispatched(_))
    }

    /// Waits until a connection is pending (another worker may still take
    /// it first).
    async fn readable(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(listener) => listener.readable().await,
            Listener::Unix(listener) => listener.readable().await,
            Listener::Dispatched(inbox) => inbox.readable().await,
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
            Listener::Unix(_) | Listener::Dispatched(_) => 1,
        }
    }

    /// Accepts a pending connection without waiting.
    pub(super) fn try_accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Dispatched(inbox) => inbox.try_accept(),
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
    /// As `accept(2)`; see [`Acceptor`](super::Acceptor) for a loop that deals with the
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
            Listener::Dispatched(inbox) => inbox.accept().await,
        }
    }

    /// Waits until `in_flight` is below its limit, then accepts one
    /// connection, counted by the returned guard.
    ///
    /// At the limit, when the counter's [`IdlePolicy`](super::IdlePolicy) evicts
    /// ([`IdlePolicy::evict_at_limit`](super::IdlePolicy::evict_at_limit), the
    /// default) and a connection is
    /// waiting in the accept queue, the idle connection that goes first
    /// (the oldest that has not sent a byte, else the one idle longest) is
    /// closed to admit it: the new connection is accepted at once, before
    /// the evicted one has closed. Under clusterd a sibling with room gets
    /// [`scoreboard::DEFER_MAX`] to take the connection first.
    ///
    /// When `in_flight` is tracked under clusterd ([`Stats::track`](super::Stats::track)) and this
    /// worker already holds its fair share ([`Board::over_share`]), a pending
    /// connection is left to a sibling that holds fewer for up to
    /// [`scoreboard::DEFER_MAX`] before this worker takes it itself.
    ///
    /// # Errors
    ///
    /// As [`Listener::accept`].
    pub async fn accept_limited(&self, in_flight: &InFlight) -> io::Result<Accepted> {
        self.make_room(in_flight).await?;
        let (stream, peer) = match in_flight.inner.board.get() {
            // clusterd balances what it passes: published, not deferred.
            Some(board) if self.is_dispatched() => {
                board.join(in_flight.active());
                self.accept().await?
            }
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

    /// Returns once `in_flight` is below its limit, or once an idle
    /// connection was evicted to admit a connection waiting in the queue.
    async fn make_room(&self, in_flight: &InFlight) -> io::Result<()> {
        loop {
            if in_flight.has_capacity() {
                return Ok(());
            }
            if !in_flight.can_evict() {
                in_flight.wait_capacity_or_evictable().await;
                continue;
            }
            // Something could be evicted: only for a connection that waits.
            let pending = async { self.readable().await.map(|()| true) }
                .or(async {
                    in_flight.wait_capacity().await;
                    Ok(false)
                })
                .await?;
            if !pending {
                continue;
            }
            // A sibling below its limit takes it without closing anything.
            if in_flight.inner.board.get().is_some() {
                let deferred = Instant::now();
                while deferred.elapsed() < scoreboard::DEFER_MAX
                    && self.is_readable_now()
                    && !in_flight.has_capacity()
                {
                    Timer::after(scoreboard::DEFER_TICK).await;
                }
            }
            if in_flight.has_capacity() {
                return Ok(());
            }
            if self.is_readable_now() && in_flight.evict_idle() {
                return Ok(());
            }
            // Taken by a sibling, or nothing idle any more: look again,
            // after the other tasks had a turn.
            future::yield_now().await;
        }
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
            Listener::Dispatched(inbox) => Ok(inbox.address().to_owned()),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener) => listener.as_fd(),
            Listener::Dispatched(inbox) => inbox.as_fd(),
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

pub(super) fn unix_address(addr: &std::os::unix::net::SocketAddr) -> String {
    use std::os::linux::net::SocketAddrExt;
    if let Some(path) = addr.as_pathname() {
        format!("unix:{}", path.display())
    } else if let Some(name) = addr.as_abstract_name() {
        format!("unix:@{}", String::from_utf8_lossy(name))
    } else {
        "unix:(unnamed)".to_owned()
    }
}

/// A connection accepted by [`Listener::accept_limited`] or [`Acceptor`](super::Acceptor).
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use smol::future::poll_once;

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
}
