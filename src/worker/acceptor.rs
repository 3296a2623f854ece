//! [`Acceptor`]: the accept loop, which balances load, retries transient
//! errors, backs off when out of fds and stops at once on shutdown.

use std::io;
use std::time::Duration;

use rustix::io::Errno;
use smol::Timer;
use smol::future::{self, FutureExt as _};

use super::inflight::InFlight;
use super::listener::{Accepted, Listener};
use super::shutdown::Shutdown;

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
                    // Connections clusterd passed before it sent the drain
                    // are this worker's: served, not dropped with the inbox.
                    if current.is_dispatched() {
                        match current.try_accept() {
                            Ok((stream, peer)) => {
                                *batch += 1;
                                let guard = in_flight.enter();
                                return Ok(Some(Accepted {
                                    stream,
                                    peer,
                                    guard,
                                }));
                            }
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => continue,
                            Err(_) => {}
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::proto::{self, ToWorker};
    use crate::scoreboard::{self, Board};
    use smol::future::poll_once;
    use std::sync::atomic::{AtomicU32, Ordering};

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
}
