//! [`Stats`]: the load figures a worker reports to clusterd (requests
//! served, active connections), and the link between the tracked
//! [`InFlight`] count and the scoreboard.
//!
//! Every change of a figure notifies [`StatsCells::changed`], which is what
//! the background thread waits for: an idle worker's figures do not change,
//! so it is never woken to look at them (no periodic tick).

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_listener::Event;

use super::inflight::InFlight;
use super::lock;
use crate::scoreboard::Board;

/// A cloneable handle for the load figures reported to clusterd.
///
/// Record as often as you like (each call is an atomic operation and a
/// cheap notification); the background thread sends the latest values at
/// most once a second, after they changed, and sleeps while they do not.
#[derive(Clone, Default)]
pub struct Stats {
    pub(super) cells: Arc<StatsCells>,
}

#[derive(Default)]
pub(super) struct StatsCells {
    requests: AtomicU64,
    failed: AtomicU64,
    active: AtomicU32,
    /// When set, `active` is read from here instead.
    tracked: Mutex<Option<InFlight>>,
    /// The scoreboard, when clusterd passed one.
    pub(super) board: OnceLock<Board>,
    /// Notified when a reported figure may have changed (a request counted,
    /// the active count set, a tracked connection opened or closed, `Ready`
    /// sent): the background thread's only reason to look at the figures.
    pub(super) changed: Arc<Event>,
}

impl Stats {
    /// Counts one served request.
    pub fn count_request(&self) {
        self.add_requests(1);
    }

    /// Counts `n` served requests.
    pub fn add_requests(&self, n: u64) {
        self.cells.requests.fetch_add(n, Ordering::Relaxed);
        self.cells.changed.notify(1);
    }

    /// Counts one request that failed: answered with a server error (a 5xx),
    /// or not answered because of one. Count it with
    /// [`count_request`](Self::count_request) too. A rolling restart's
    /// canary that fails far more of its requests than the workers it
    /// replaces fails the restart (see `bake` in clusterd.conf(5)).
    pub fn count_failure(&self) {
        self.cells.failed.fetch_add(1, Ordering::Relaxed);
        self.cells.changed.notify(1);
    }

    /// Failed requests counted so far.
    pub fn failed(&self) -> u64 {
        self.cells.failed.load(Ordering::Relaxed)
    }

    /// Sets the number of active connections (ignored while an [`InFlight`]
    /// is tracked).
    pub fn set_active(&self, active: u32) {
        self.cells.active.store(active, Ordering::Relaxed);
        self.cells.changed.notify(1);
    }

    /// Reports `in_flight.active()` as the active count from now on: to
    /// clusterd (`status`, `/metrics`) and, under clusterd, to the sibling
    /// workers, whose accept loops then leave new connections to whichever
    /// worker holds fewest (see [balanced accepting](super#balanced-accepting)).
    /// Track the counter your [`Acceptor`](super::Acceptor)s use.
    pub fn track(&self, in_flight: &InFlight) {
        *lock(&self.cells.tracked) = Some(in_flight.clone());
        let _ = in_flight.inner.changed.set(self.cells.changed.clone());
        if let Some(board) = self.cells.board.get() {
            let _ = in_flight.inner.board.set(*board);
        }
        self.cells.changed.notify(1);
    }

    /// Publishes the tracked count on the scoreboard, if both exist.
    pub(super) fn join_board(&self) {
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
            .field("failed", &self.failed())
            .finish()
    }
}
