//! [`Stream`]: an accepted connection, and the wait between two requests of
//! a keep-alive connection ([`Stream::next_request`]).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smol::future::{self, FutureExt as _};
use smol::io::{AsyncRead, AsyncWrite};
use smol::{Async, Timer};

use super::listener::unix_address;
use super::shutdown::Shutdown;

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
    /// The worker was at its in-flight limit with a new connection waiting,
    /// and closed this idle one to admit it
    /// ([`IdlePolicy::evict_at_limit`](super::IdlePolicy::evict_at_limit)).
    Evicted,
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
    /// The peer's address, as [`Listener::accept`](super::Listener::accept) writes it.
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
    ///
    /// This wait knows nothing of the worker's in-flight limit: prefer
    /// [`Accepted::next_request`](super::Accepted::next_request), which also
    /// gives a new connection a shorter deadline for its first byte and lets
    /// a worker at its limit close the idle connection to admit a new one.
    pub async fn next_request(&self, shutdown: Option<&Shutdown>, idle_timeout: Duration) -> Idle {
        self.wait_idle(shutdown, idle_timeout, future::pending())
            .await
    }

    /// [`Stream::next_request`], also ended by `evicted`.
    pub(super) async fn wait_idle(
        &self,
        shutdown: Option<&Shutdown>,
        idle_timeout: Duration,
        evicted: impl Future<Output = Idle>,
    ) -> Idle {
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
                request.or(evicted).or(drain).or(timeout).await
            }
            None => request.or(evicted).or(timeout).await,
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
