//! In-flight accounting: [`InFlight`] counts a worker's connections up to a
//! limit, publishes the count on the scoreboard, and tells a worker holding
//! more than its share when to let a keep-alive client go; each connection
//! holds a [`Guard`].

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_listener::Event;

use super::idle::{IdlePolicy, IdleSet};
use super::lock;
use crate::scoreboard::Board;

/// How often [`InFlight::crowded`] looks at the scoreboard: once every this
/// many calls (responses, typically). Between two looks it asks to close at
/// most the excess it last saw, so the connections it sheds have time to
/// close before it counts again.
pub const CROWDED_EVERY: u32 = 32;

/// Counts a worker's connections (or requests) in flight, up to a limit.
///
/// [`Listener::accept_limited`](super::Listener::accept_limited) and
/// [`Acceptor`](super::Acceptor) accept only while the count is below the
/// limit, so a loaded worker leaves new connections to idle ones. Each accepted connection holds a [`Guard`] that gives its slot back
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
/// one connection it was already accepting when the limit was reached, and
/// by one it admitted by closing an idle connection that had not closed yet.
///
/// Idle connections hold slots too, so the counter also carries the
/// [`IdlePolicy`] that bounds them: a first-byte deadline for new
/// connections, the keep-alive idle time, and whether a worker at its limit
/// closes an idle connection to admit a new one (see
/// [`Accepted::next_request`](super::Accepted::next_request)). Without it a
/// few hundred sockets that never send a byte would fill every worker's
/// limit and lock everyone else out.
#[derive(Clone)]
pub struct InFlight {
    pub(super) inner: Arc<InFlightInner>,
}

pub(super) struct InFlightInner {
    active: AtomicUsize,
    /// `usize::MAX` means no limit.
    limit: usize,
    /// Notified when the count drops below the limit.
    capacity: Event,
    /// Notified when the count drops to zero.
    idle: Event,
    /// Where the count is published for the sibling workers, once tracked.
    pub(super) board: OnceLock<Board>,
    /// Notified on every change of the count, once tracked by a
    /// [`Stats`](super::Stats): wakes the background thread that reports it.
    pub(super) changed: OnceLock<Arc<Event>>,
    /// Connections [`InFlight::crowded`] may still ask to close, from its
    /// last look at the board.
    shed: AtomicUsize,
    /// Calls of [`InFlight::crowded`], to look at the board every
    /// [`CROWDED_EVERY`].
    crowded_calls: AtomicU32,
    /// How long connections may idle, and whether to evict one at the limit.
    policy: Mutex<IdlePolicy>,
    /// The connections waiting for a request now, in eviction order.
    pub(super) idle_set: IdleSet,
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
                changed: OnceLock::new(),
                shed: AtomicUsize::new(0),
                crowded_calls: AtomicU32::new(0),
                policy: Mutex::new(IdlePolicy::default()),
                idle_set: IdleSet::default(),
            }),
        }
    }

    /// Sets the [`IdlePolicy`] (for every clone), as
    /// [`InFlight::set_idle_policy`], and returns the counter.
    #[must_use]
    pub fn with_idle_policy(self, policy: IdlePolicy) -> InFlight {
        self.set_idle_policy(policy);
        self
    }

    /// Sets the [`IdlePolicy`] for every clone of this counter; waits that
    /// have begun keep the deadline they started with.
    pub fn set_idle_policy(&self, policy: IdlePolicy) {
        *lock(&self.inner.policy) = policy;
    }

    /// The [`IdlePolicy`]: [`IdlePolicy::default`] unless set.
    pub fn idle_policy(&self) -> IdlePolicy {
        *lock(&self.inner.policy)
    }

    /// Whether a connection at the limit may be admitted by evicting an
    /// idle one: there is a limit, the policy says so, and one is idle.
    pub(super) fn can_evict(&self) -> bool {
        self.limit().is_some() && self.idle_policy().evict_at_limit && self.inner.idle_set.any()
    }

    /// Closes the idle connection that goes first (see [`IdlePolicy`]);
    /// whether there was one.
    pub(super) fn evict_idle(&self) -> bool {
        self.inner.idle_set.evict_first()
    }

    /// Wakes an accept loop waiting at the limit for an idle connection to
    /// evict.
    pub(super) fn idle_connection_appeared(&self) {
        if !self.has_capacity() {
            self.inner.capacity.notify(usize::MAX);
        }
    }

    /// Waits until the count is below the limit or, when the policy evicts,
    /// some connection is idle.
    pub(super) async fn wait_capacity_or_evictable(&self) {
        until(&self.inner.capacity, || {
            self.has_capacity() || self.can_evict()
        })
        .await;
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
        if let Some(changed) = self.inner.changed.get() {
            changed.notify(1);
        }
        Guard {
            in_flight: self.clone(),
            begun: false,
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
    /// Asks for at most the excess
    /// [`Board::excess`](crate::scoreboard::Board::excess) found (the
    /// connections beyond a fair share and a tolerance of one in 32), and
    /// looks at the board once every [`CROWDED_EVERY`] calls, so calling it
    /// for every response is cheap. Always `false` unless the count is
    /// tracked under clusterd ([`Stats::track`](super::Stats::track)).
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
            .field("idle_policy", &self.idle_policy())
            .finish()
    }
}

/// One unit counted by an [`InFlight`]; dropping it gives the slot back.
#[must_use = "the slot is given back as soon as the guard is dropped"]
pub struct Guard {
    in_flight: InFlight,
    /// A request has begun on this connection, so its waits are keep-alive
    /// waits ([`Accepted::next_request`](super::Accepted::next_request)).
    pub(super) begun: bool,
}

impl Guard {
    /// The counter this guard counts in.
    pub(super) fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.in_flight.inner;
        let before = inner.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(board) = inner.board.get() {
            board.publish(before - 1);
        }
        if let Some(changed) = inner.changed.get() {
            changed.notify(1);
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
pub(super) async fn until(event: &Event, holds: impl Fn() -> bool) {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::scoreboard::{self, Board};
    use smol::future::{self, poll_once};

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
}
