//! Idle connections: how long a connection may wait for its first byte and
//! between two requests ([`IdlePolicy`]), and which idle connection makes
//! room when a worker at its in-flight limit has a new connection waiting.
//!
//! An idle connection holds an in-flight slot like a busy one, so without a
//! bound a few hundred sockets that never send a byte fill every worker's
//! limit, and the accept loops stop taking connections: the site is down for
//! everyone else until the sockets time out. Two bounds keep it up:
//!
//! - a new connection has [`IdlePolicy::first_byte`] to start its first
//!   request, much less than the keep-alive idle time a client that has been
//!   served gets ([`IdlePolicy::keep_alive`]);
//! - a worker at its limit with a connection waiting in the accept queue
//!   closes one of its idle connections to admit it
//!   ([`IdlePolicy::evict_at_limit`]): the oldest one that has not sent a
//!   byte yet, else the one idle longest between two requests. Closing an
//!   idle connection is what its idle timeout would do anyway, only sooner;
//!   a busy connection is never closed.
//!
//! Both apply to connections that wait through [`Accepted::next_request`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event;
use smol::future;

use super::inflight::{InFlight, until};
use super::listener::Accepted;
use super::lock;
use super::shutdown::Shutdown;
use super::stream::Idle;

/// How long connections may stay idle, and whether a worker at its limit
/// closes an idle one to admit a new connection. Set it on the [`InFlight`]
/// counter ([`InFlight::set_idle_policy`]); [`Accepted::next_request`] and
/// the accept loops follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdlePolicy {
    /// How long a new connection may take to send the first byte of its
    /// first request. Default [`IdlePolicy::DEFAULT_FIRST_BYTE`].
    pub first_byte: Duration,
    /// How long a keep-alive connection may wait for its next request once
    /// it has sent one. Default [`IdlePolicy::DEFAULT_KEEP_ALIVE`].
    pub keep_alive: Duration,
    /// Whether a worker at its in-flight limit, with a connection waiting to
    /// be accepted, closes one of its idle connections to admit it (the
    /// oldest that has not sent its first byte, else the one idle longest).
    /// Default `true`. Has no effect on a counter without a limit.
    pub evict_at_limit: bool,
}

impl IdlePolicy {
    /// The default first-byte deadline, 5 s: a real client sends its
    /// request right after connecting (a browser that preconnects and then
    /// finds the socket closed opens another one).
    pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(5);

    /// The default keep-alive idle time, 30 s.
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
}

impl Default for IdlePolicy {
    fn default() -> IdlePolicy {
        IdlePolicy {
            first_byte: IdlePolicy::DEFAULT_FIRST_BYTE,
            keep_alive: IdlePolicy::DEFAULT_KEEP_ALIVE,
            evict_at_limit: true,
        }
    }
}

impl Accepted {
    /// Waits for the connection's next request to begin arriving (its first
    /// one included), under the [`IdlePolicy`] of the [`InFlight`] counter
    /// it was accepted against.
    ///
    /// Returns [`Idle::Request`] once a byte is there; [`Idle::TimedOut`]
    /// when nothing came within [`IdlePolicy::first_byte`] (no request yet)
    /// or [`IdlePolicy::keep_alive`] (after one); [`Idle::Evicted`] when the
    /// worker, at its limit, closed this idle connection to admit a new one;
    /// [`Idle::Closed`] and [`Idle::Draining`] as [`Stream::next_request`]
    /// (see there why a drain closes an idle connection only after a short
    /// grace). Anything but [`Idle::Request`] means: close the connection
    /// and drop this value.
    ///
    /// [`Stream::next_request`]: super::Stream::next_request
    pub async fn next_request(&mut self, shutdown: Option<&Shutdown>) -> Idle {
        let in_flight = self.guard.in_flight().clone();
        let policy = in_flight.idle_policy();
        let first = !self.guard.begun;
        let timeout = if first {
            policy.first_byte
        } else {
            policy.keep_alive
        };
        let waiting = (policy.evict_at_limit && in_flight.limit().is_some())
            .then(|| Waiting::enter(&in_flight, first));
        let evicted = async {
            match &waiting {
                Some(waiting) => waiting.evicted().await,
                None => future::pending().await,
            }
        };
        let idle = self.stream.wait_idle(shutdown, timeout, evicted).await;
        if idle == Idle::Request {
            self.guard.begun = true;
        }
        idle
    }
}

/// The idle connections of one [`InFlight`] counter, the ones to evict
/// first first: those that have not sent a byte yet (`false` sorts first),
/// then by how long they have been waiting.
#[derive(Default)]
pub(super) struct IdleSet {
    inner: Mutex<IdleSetInner>,
}

#[derive(Default)]
struct IdleSetInner {
    /// Numbers the waits in the order they begin.
    next: u64,
    /// `(has sent a request, number) -> the wait's eviction signal`.
    waits: BTreeMap<(bool, u64), Arc<Eviction>>,
}

#[derive(Default)]
struct Eviction {
    evicted: AtomicBool,
    event: Event,
}

impl IdleSet {
    /// Whether some connection is idle (and could be evicted).
    pub(super) fn any(&self) -> bool {
        !lock(&self.inner).waits.is_empty()
    }

    /// Evicts the idle connection that goes first; whether there was one.
    pub(super) fn evict_first(&self) -> bool {
        let Some((_, eviction)) = lock(&self.inner).waits.pop_first() else {
            return false;
        };
        eviction.evicted.store(true, Ordering::Release);
        eviction.event.notify(usize::MAX);
        true
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.inner).waits.len()
    }
}

/// One connection's wait in the [`IdleSet`], removed when dropped.
struct Waiting {
    in_flight: InFlight,
    key: (bool, u64),
    eviction: Arc<Eviction>,
}

impl Waiting {
    fn enter(in_flight: &InFlight, first: bool) -> Waiting {
        let eviction = Arc::new(Eviction::default());
        let key = {
            let mut set = lock(&in_flight.inner.idle_set.inner);
            let key = (!first, set.next);
            set.next += 1;
            set.waits.insert(key, eviction.clone());
            key
        };
        // An accept loop waiting at the limit for something to evict.
        in_flight.idle_connection_appeared();
        Waiting {
            in_flight: in_flight.clone(),
            key,
            eviction,
        }
    }

    async fn evicted(&self) -> Idle {
        let eviction = &self.eviction;
        until(&eviction.event, || eviction.evicted.load(Ordering::Acquire)).await;
        Idle::Evicted
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.in_flight.inner.idle_set.inner)
            .waits
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use smol::LocalExecutor;
    use smol::future::poll_once;
    use smol::io::AsyncReadExt as _;
    use std::io::Write as _;

    /// Lets the executor's other tasks run until `cond` holds.
    async fn until_true(cond: impl Fn() -> bool) {
        while !cond() {
            future::yield_now().await;
        }
    }

    /// Reads the one byte a client sent.
    async fn read_byte(conn: &mut Accepted) {
        let mut byte = [0u8; 1];
        conn.stream.read_exact(&mut byte).await.unwrap();
    }

    #[test]
    fn a_new_connection_gets_the_first_byte_deadline_and_then_the_keep_alive_one() {
        // Only the first wait has the short deadline...
        let in_flight = InFlight::default().with_idle_policy(IdlePolicy {
            first_byte: Duration::from_millis(1),
            keep_alive: Duration::from_secs(3600),
            evict_at_limit: true,
        });
        let (mut acceptor, _worker, _clusterd, address) = acceptor(&in_flight);
        let _silent = clients(address, 1);
        let mut conn = within(acceptor.accept()).unwrap().unwrap();
        assert_eq!(within(conn.next_request(None)), Idle::TimedOut);

        // ... and only the waits after a request have the long one.
        in_flight.set_idle_policy(IdlePolicy {
            first_byte: Duration::from_secs(3600),
            keep_alive: Duration::from_millis(1),
            evict_at_limit: true,
        });
        let mut client = clients(address, 1).pop().unwrap();
        let mut conn = within(acceptor.accept()).unwrap().unwrap();
        client.write_all(b"x").unwrap();
        assert_eq!(within(conn.next_request(None)), Idle::Request);
        within(read_byte(&mut conn));
        assert_eq!(within(conn.next_request(None)), Idle::TimedOut);
        assert_eq!(in_flight.inner.idle_set.len(), 0, "waits leave the set");
    }

    #[test]
    fn at_the_limit_the_oldest_silent_connection_then_the_longest_idle_makes_room() {
        let in_flight = InFlight::new(2);
        let (mut acceptor, _worker, _clusterd, address) = acceptor(&in_flight);
        let ex = LocalExecutor::new();
        within(ex.run(async {
            // `served` has had a request and idles between two; `silent`
            // never sent a byte, though it came later.
            let mut served_client = clients(address, 1).pop().unwrap();
            let mut served = acceptor.accept().await.unwrap().unwrap();
            served_client.write_all(b"x").unwrap();
            assert_eq!(served.next_request(None).await, Idle::Request);
            read_byte(&mut served).await;
            let _silent_client = clients(address, 1);
            let mut silent = acceptor.accept().await.unwrap().unwrap();
            let served = ex.spawn(async move { (served.next_request(None).await, served) });
            let silent = ex.spawn(async move { (silent.next_request(None).await, silent) });
            until_true(|| in_flight.inner.idle_set.len() == 2).await;

            // At the limit, a new connection is admitted by closing the
            // silent one first...
            let _third_client = clients(address, 1);
            let third = acceptor.accept().await.unwrap().unwrap();
            let (idle, silent) = silent.await;
            assert_eq!(idle, Idle::Evicted);
            drop(silent);
            assert_eq!(in_flight.active(), 2);

            // ... then the one idle longest. `third` is busy (not waiting
            // through next_request): never closed.
            let _fourth_client = clients(address, 1);
            let _fourth = acceptor.accept().await.unwrap().unwrap();
            let (idle, served) = served.await;
            assert_eq!(idle, Idle::Evicted);
            drop(served);

            // Nothing idle is left: the next client waits for a slot.
            let _fifth_client = clients(address, 1);
            let mut fifth = Box::pin(acceptor.accept());
            for _ in 0..10 {
                assert!(poll_once(&mut fifth).await.is_none());
                future::yield_now().await;
            }
            drop(third);
            assert!(fifth.await.unwrap().is_some());
        }));
    }

    #[test]
    fn without_eviction_an_idle_connection_keeps_its_slot() {
        let in_flight = InFlight::new(1).with_idle_policy(IdlePolicy {
            evict_at_limit: false,
            ..IdlePolicy::default()
        });
        let (mut acceptor, _worker, _clusterd, address) = acceptor(&in_flight);
        let ex = LocalExecutor::new();
        within(ex.run(async {
            let _silent_client = clients(address, 1);
            let mut silent = acceptor.accept().await.unwrap().unwrap();
            let _waiting = ex.spawn(async move { (silent.next_request(None).await, silent) });
            let _second_client = clients(address, 1);
            let mut second = Box::pin(acceptor.accept());
            for _ in 0..10 {
                assert!(poll_once(&mut second).await.is_none());
                future::yield_now().await;
            }
            assert_eq!(in_flight.inner.idle_set.len(), 0, "not even listed");
        }));
    }
}
