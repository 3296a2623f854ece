//! The scoreboard: how many connections each worker holds, shared between
//! the workers so that a new connection goes to the one holding fewest.
//!
//! All workers accept from the same listening socket, and the kernel wakes
//! every waiting worker for each new connection; whichever calls `accept`
//! first wins. When a burst of keep-alive connections arrives (a load
//! balancer opening its pool, a load test starting), that race splits them
//! unevenly, 45 / 19 between two workers here, and with keep-alive the split
//! lasts as long as the connections do.
//!
//! clusterd creates one small shared memory file (a sealed `memfd`: it can
//! be neither shrunk nor grown, so a mapping of it can never fault) and
//! gives every `protocol = clusterd` worker a copy of its fd and the index
//! of its own cell. The worker library maps it and keeps the number of
//! connections it holds in its cell. A worker takes pending connections
//! while it holds less than its fair share ([`Board::over_share`]); past it,
//! a worker that sees another one holding fewer waits a moment
//! ([`DEFER_MAX`]) so that the other one takes the connection. The wait is
//! bounded, so a sibling that is stuck or gone costs a new connection at
//! most that much latency, never the connection.
//!
//! A cell holds a count, or [`VACANT`] (no worker, or one that has not begun
//! accepting), or [`WITHDRAWN`] (the worker is draining). Each cell has one
//! writer at a time: clusterd writes [`VACANT`] before it hands the cell to a
//! new worker and after that worker has been reaped; in between only the
//! worker writes it. A worker only reads the others' cells, so whatever a
//! misbehaving worker writes can only skew the balance, and only by
//! [`DEFER_MAX`] per connection.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};

/// Cells in the scoreboard: one per worker process alive at once (workers
/// plus those still draining). A worker spawned when all are taken runs
/// without one: it accepts as it would without the scoreboard.
pub const CELLS: u32 = 1024;

/// Bytes per cell.
const CELL_SIZE: usize = size_of::<u32>();

/// The cell of no worker, or of one that is not accepting yet.
pub const VACANT: u32 = u32::MAX;

/// The cell of a worker that has begun to drain and no longer accepts.
pub const WITHDRAWN: u32 = u32::MAX - 1;

/// Counts at or above this are not counts (see [`VACANT`], [`WITHDRAWN`]).
const NOT_A_COUNT: u32 = WITHDRAWN;

/// The longest a worker defers a pending connection to a sibling that
/// holds fewer, before it accepts the connection itself.
pub const DEFER_MAX: Duration = Duration::from_millis(2);

/// How often a deferring worker checks whether the connection was taken.
pub const DEFER_TICK: Duration = Duration::from_micros(200);

// ---------------------------------------------------------------------------
// clusterd's side

/// Creates the scoreboard: a sealed memfd of [`CELLS`] vacant cells.
///
/// # Errors
///
/// As `memfd_create(2)`, `ftruncate(2)`, `pwrite(2)` and `fcntl(2)`.
pub fn create() -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        "clusterd-scoreboard",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let len = CELLS as usize * CELL_SIZE;
    rustix::fs::ftruncate(&fd, len as u64)?;
    write_all_at(&fd, &vec![0xff; len], 0)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Marks `cell` vacant: before it is handed to a new worker, and after its
/// worker has been reaped.
///
/// # Errors
///
/// As `pwrite(2)`.
pub fn vacate(board: impl AsFd, cell: u32) -> io::Result<()> {
    write_all_at(
        board,
        &VACANT.to_ne_bytes(),
        u64::from(cell) * CELL_SIZE as u64,
    )
}

fn write_all_at(fd: impl AsFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(&fd, buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Which cells are free: lowest first, so a steady cluster keeps using the
/// same few.
#[derive(Debug)]
pub struct Cells {
    /// Free cells, highest first (popped from the end).
    free: Vec<u32>,
}

impl Cells {
    /// All `n` cells free.
    pub fn new(n: u32) -> Cells {
        Cells {
            free: (0..n).rev().collect(),
        }
    }

    /// The free cells, highest first (handed over by `clusterctl upgrade`).
    pub fn free(&self) -> &[u32] {
        &self.free
    }

    /// The cells `free` lists free, the others taken.
    pub fn from_free(mut free: Vec<u32>) -> Cells {
        free.sort_unstable_by(|a, b| b.cmp(a));
        free.dedup();
        Cells { free }
    }

    /// Takes the lowest free cell, if any.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives `cell` back.
    pub fn give_back(&mut self, cell: u32) {
        debug_assert!(!self.free.contains(&cell), "cell {cell} given back twice");
        let at = self.free.partition_point(|&c| c > cell);
        self.free.insert(at, cell);
    }
}

// ---------------------------------------------------------------------------
// The worker's side

/// A worker's view of the scoreboard: every cell, and which one is its own.
#[derive(Debug, Clone, Copy)]
pub struct Board {
    cells: &'static [AtomicU32],
    mine: usize,
}

impl Board {
    /// Maps the scoreboard clusterd passed; `cell` is this worker's.
    ///
    /// The mapping lives as long as the process (a worker connects once).
    ///
    /// # Errors
    ///
    /// `fd` is not a sealed memfd of whole cells (a mapping of a file that
    /// can shrink could fault), `cell` is out of range, or `mmap(2)` fails.
    pub fn map(fd: &OwnedFd, cell: u32) -> io::Result<Board> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let seals = rustix::fs::fcntl_get_seals(fd)
            .map_err(|e| invalid(format!("scoreboard is not a memfd ({e})")))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(invalid(format!(
                "scoreboard may change size (seals {seals:?})"
            )));
        }
        let len = usize::try_from(rustix::fs::fstat(fd)?.st_size).unwrap_or(0);
        let cells = len / CELL_SIZE;
        if len == 0 || len % CELL_SIZE != 0 || len > CELLS as usize * CELL_SIZE {
            return Err(invalid(format!("scoreboard has a bad size ({len} bytes)")));
        }
        if cell as usize >= cells {
            return Err(invalid(format!(
                "scoreboard cell {cell} out of range (0..{cells})"
            )));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel, of a file we
        // checked cannot shrink (so no access within `len` can fault), and
        // never unmapped, so the slice below may be 'static. `AtomicU32` has
        // the size and alignment of `u32`, the mapping is page-aligned, and
        // every access to the memory goes through atomics (the other
        // processes sharing it are other workers and clusterd's `pwrite`).
        let cells = unsafe {
            let ptr = rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )?;
            std::slice::from_raw_parts(ptr.cast::<AtomicU32>(), cells)
        };
        Ok(Board::over(cells, cell as usize))
    }

    /// A board over `cells` (tests use a plain array).
    pub fn over(cells: &'static [AtomicU32], mine: usize) -> Board {
        Board { cells, mine }
    }

    /// What cell `cell` holds (a count, [`VACANT`] or [`WITHDRAWN`]);
    /// [`VACANT`] out of range. clusterd reads the workers' counts so.
    pub fn load(&self, cell: u32) -> u32 {
        self.cells
            .get(cell as usize)
            .map_or(VACANT, |c| c.load(Ordering::Acquire))
    }

    fn cell(&self) -> &AtomicU32 {
        &self.cells[self.mine]
    }

    /// Joins with `count` connections held, unless the worker has already
    /// joined or withdrawn.
    pub fn join(&self, count: usize) {
        let _ = self.cell().compare_exchange(
            VACANT,
            as_count(count),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Publishes `count`, if the worker has joined and not withdrawn.
    pub fn publish(&self, count: usize) {
        let new = as_count(count);
        let _ = self
            .cell()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (old < NOT_A_COUNT).then_some(new)
            });
    }

    /// Withdraws for good: the worker is draining and accepts no more.
    pub fn withdraw(&self) {
        self.cell().store(WITHDRAWN, Ordering::Release);
    }

    /// What this worker's cell holds.
    pub fn own(&self) -> u32 {
        self.cell().load(Ordering::Acquire)
    }

    /// Whether this worker, holding `count` connections, should leave the
    /// next pending connection to a sibling: it already holds its fair share
    /// of every connection the accepting workers hold plus the `pending`
    /// ones still in the accept queue (at least the one being decided on),
    /// and some accepting sibling holds fewer.
    ///
    /// Counting what is pending lets each worker take its share of a burst
    /// back to back: when 64 connections arrive at two idle workers, each
    /// takes 32 without waiting, instead of the two taking turns one
    /// connection at a time, which costs a busy worker a round of its tasks
    /// per turn. With nothing else pending it is the plain rule: defer to a
    /// sibling that holds fewer (between two workers, exactly that).
    ///
    /// `pending` is asked only when some sibling holds fewer (reading the
    /// accept queue is a system call, and most accepts need no answer).
    pub fn over_share(&self, count: usize, pending: impl FnOnce() -> usize) -> bool {
        let count = u64::from(as_count(count));
        let siblings = self.siblings();
        if siblings.fewest >= count {
            return false;
        }
        let total = count + siblings.held + u64::from(as_count(pending().max(1)));
        count >= total.div_ceil(siblings.workers + 1)
    }

    /// How many connections this worker, holding `count`, holds beyond its
    /// fair share of what every accepting worker holds, plus a tolerance of
    /// one in 32 (at least one): how many of its keep-alive connections it
    /// should close after their current response, so that their clients
    /// reconnect and [`Board::over_share`] sends them to the workers holding
    /// fewer. After a crash the survivors hold the connections of the dead
    /// worker, and after a scale-up the new workers hold none; without this
    /// they would stay so for as long as the clients keep their
    /// connections. 0 when the worker is alone.
    pub fn excess(&self, count: usize) -> usize {
        let count = u64::from(as_count(count));
        let siblings = self.siblings();
        let share = (count + siblings.held).div_ceil(siblings.workers + 1);
        let tolerance = (share / 32).max(1);
        usize::try_from(count.saturating_sub(share + tolerance)).unwrap_or(usize::MAX)
    }

    /// The other accepting workers' cells, summed up.
    fn siblings(&self) -> Siblings {
        let mut siblings = Siblings {
            workers: 0,
            held: 0,
            fewest: u64::MAX,
        };
        for (i, cell) in self.cells.iter().enumerate() {
            let c = cell.load(Ordering::Acquire);
            if i != self.mine && c < NOT_A_COUNT {
                siblings.workers += 1;
                siblings.held += u64::from(c);
                siblings.fewest = siblings.fewest.min(u64::from(c));
            }
        }
        siblings
    }
}

/// What [`Board::siblings`] found.
struct Siblings {
    /// Accepting workers other than this one.
    workers: u64,
    /// The connections they hold.
    held: u64,
    /// The fewest any of them holds (`u64::MAX` when there are none).
    fewest: u64,
}

/// A count as stored, kept below the markers.
fn as_count(count: usize) -> u32 {
    u32::try_from(count)
        .unwrap_or(u32::MAX)
        .min(NOT_A_COUNT - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(cells: &[u32]) -> &'static [AtomicU32] {
        cells
            .iter()
            .map(|&c| AtomicU32::new(c))
            .collect::<Vec<_>>()
            .leak()
    }

    #[test]
    fn a_worker_joins_publishes_and_withdraws_once() {
        let cells = board(&[VACANT, VACANT]);
        let me = Board::over(cells, 0);
        me.publish(3);
        assert_eq!(me.own(), VACANT, "no count before joining");
        me.join(2);
        assert_eq!(me.own(), 2);
        me.join(7);
        assert_eq!(me.own(), 2, "joining twice keeps the count");
        me.publish(5);
        assert_eq!(me.own(), 5);
        me.withdraw();
        me.publish(1);
        me.join(1);
        assert_eq!(me.own(), WITHDRAWN, "withdrawn for good");
        assert_eq!(
            cells[1].load(Ordering::Relaxed),
            VACANT,
            "the sibling's untouched"
        );
    }

    #[test]
    fn defers_only_to_an_accepting_sibling_holding_fewer() {
        let cells = board(&[VACANT, VACANT, VACANT]);
        let me = Board::over(cells, 0);
        me.join(4);
        assert!(!me.over_share(4, || 1), "alone: never defer");
        assert!(!me.over_share(4, || 100), "alone, however many are pending");
        assert!(
            !me.over_share(4, || unreachable!("the queue is read only when it matters")),
            "alone"
        );
        cells[1].store(WITHDRAWN, Ordering::Relaxed);
        assert!(!me.over_share(4, || 1), "a draining sibling does not count");
        cells[2].store(4, Ordering::Relaxed);
        assert!(!me.over_share(4, || 1), "a tie: both accept");
        cells[2].store(3, Ordering::Relaxed);
        assert!(me.over_share(4, || 1));
        assert!(
            me.over_share(4, || 0),
            "the connection decided on is pending"
        );
        assert!(!me.over_share(3, || 1));
        assert!(!me.over_share(0, || 1), "nobody holds fewer than none");
    }

    #[test]
    fn a_burst_is_shared_out_without_taking_turns() {
        let cells = board(&[VACANT, VACANT]);
        let me = Board::over(cells, 0);
        me.join(0);
        cells[1].store(0, Ordering::Relaxed);
        // 64 pending at two idle workers: this one may take 32 in a row.
        let mut pending = 64;
        let mut taken = 0;
        while pending > 0 && !me.over_share(taken, || pending) {
            taken += 1;
            pending -= 1;
        }
        assert_eq!(taken, 32, "its share, then it leaves the rest");
        // The sibling takes the rest the same way.
        let sibling = Board::over(cells, 1);
        cells[0].store(32, Ordering::Relaxed);
        let mut theirs = 0;
        while pending > 0 && !sibling.over_share(theirs, || pending) {
            theirs += 1;
            pending -= 1;
        }
        assert_eq!((theirs, pending), (32, 0));
        // Settled at 32 / 32, one more arrives: either may take it, and
        // whoever then holds 33 leaves the next to the other.
        cells[1].store(32, Ordering::Relaxed);
        assert!(!me.over_share(32, || 1));
        cells[1].store(33, Ordering::Relaxed);
        assert!(!me.over_share(32, || 1));
        cells[1].store(32, Ordering::Relaxed);
        assert!(me.over_share(33, || 1));
    }

    #[test]
    fn three_workers_share_by_the_average() {
        let cells = board(&[VACANT, 10, 2]);
        let me = Board::over(cells, 0);
        // 10 + 2 + 6 held and 1 pending: a share is 7.
        assert!(!me.over_share(6, || 1));
        assert!(me.over_share(7, || 1));
        // 10 + 2 + 4 held and 8 pending: a share is 8.
        assert!(!me.over_share(4, || 8));
    }

    #[test]
    fn the_excess_is_what_lies_beyond_a_share_and_a_tolerance() {
        let cells = board(&[VACANT, VACANT, VACANT]);
        let me = Board::over(cells, 0);
        assert_eq!(me.excess(64), 0, "alone: never crowded");
        cells[2].store(WITHDRAWN, Ordering::Relaxed);
        assert_eq!(me.excess(64), 0, "a draining sibling does not count");
        // A crash: the survivor holds all 64, the replacement none. A share
        // is 32, the tolerance 1: close 31 so that they move.
        cells[1].store(0, Ordering::Relaxed);
        assert_eq!(me.excess(64), 31);
        cells[1].store(31, Ordering::Relaxed);
        assert_eq!(me.excess(33), 0, "33 / 31 is within the tolerance");
        cells[1].store(30, Ordering::Relaxed);
        assert_eq!(me.excess(34), 1);
        // Small counts: the tolerance is one connection.
        cells[1].store(1, Ordering::Relaxed);
        assert_eq!(me.excess(4), 0, "a share of 3 (5 / 2, rounded up), and 1");
        assert_eq!(me.excess(5), 1);
        // Large counts: one in 32. 1000 + 1000 over two: share 1000, 31.
        cells[1].store(969, Ordering::Relaxed);
        assert_eq!(me.excess(1031), 0);
        cells[1].store(900, Ordering::Relaxed);
        assert_eq!(me.excess(1100), 1100 - 1000 - 31);
        assert!(me.excess(usize::MAX) > 0, "no overflow");
    }

    #[test]
    fn huge_counts_stay_counts() {
        let cells = board(&[VACANT, VACANT]);
        let me = Board::over(cells, 1);
        me.join(usize::MAX);
        assert_eq!(me.own(), NOT_A_COUNT - 1);
        cells[0].store(5, Ordering::Relaxed);
        assert!(me.over_share(usize::MAX, || 1));
        assert!(!me.over_share(usize::MAX, || usize::MAX), "no overflow");
        cells[0].store(NOT_A_COUNT - 1, Ordering::Relaxed);
        assert!(!me.over_share(usize::MAX, || 1), "no sibling holds fewer");
    }

    #[test]
    fn cells_are_taken_lowest_first_and_reused() {
        let mut cells = Cells::new(3);
        assert_eq!(cells.take(), Some(0));
        assert_eq!(cells.take(), Some(1));
        assert_eq!(cells.take(), Some(2));
        assert_eq!(cells.take(), None, "all taken");
        cells.give_back(1);
        cells.give_back(0);
        assert_eq!(cells.take(), Some(0));
        assert_eq!(cells.take(), Some(1));
        assert_eq!(cells.take(), None);
    }

    #[test]
    fn clusterd_and_a_worker_share_the_memfd() {
        let fd = create().unwrap();
        let a = Board::map(&fd, 0).unwrap();
        let b = Board::map(&fd, 1).unwrap();
        assert_eq!(a.own(), VACANT, "created vacant");
        a.join(3);
        b.join(1);
        assert!(
            a.over_share(3, || 1),
            "a sees b's count through the mapping"
        );
        vacate(&fd, 1).unwrap();
        assert!(!a.over_share(3, || 1), "and clusterd's vacate");
        assert_eq!(b.own(), VACANT);
        let err = Board::map(&fd, CELLS).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        let err = rustix::fs::ftruncate(&fd, 4).unwrap_err();
        assert_eq!(err, rustix::io::Errno::PERM, "sealed against shrinking");
    }

    #[test]
    fn refuses_what_could_fault_or_is_not_a_board() {
        let unsealed = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 64).unwrap();
        let err = Board::map(&unsealed, 0).unwrap_err();
        assert!(err.to_string().contains("may change size"), "{err}");

        let (pipe, _w) = rustix::pipe::pipe().unwrap();
        let err = Board::map(&pipe, 0).unwrap_err();
        assert!(err.to_string().contains("not a memfd"), "{err}");

        let odd = rustix::fs::memfd_create("t", MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&odd, 6).unwrap();
        rustix::fs::fcntl_add_seals(&odd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let err = Board::map(&odd, 0).unwrap_err();
        assert!(err.to_string().contains("bad size"), "{err}");
    }
}
