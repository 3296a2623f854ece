//! The `clusterd-worker` thread: it reads clusterd's records (`Drain`, or
//! the end of the channel), turns SIGTERM and SIGINT into the shutdown, and
//! sends the [`Stats`](super::Stats) when they changed.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_signal::{Signal, Signals};
use rustix::net::RecvFlags;
use smol::future::{self, FutureExt as _};
use smol::stream::StreamExt as _;
use smol::{Async, Timer};

use super::inflight::until;
use super::shutdown::ShutdownReason;
use super::{Shared, lock};
use crate::fdpass;
use crate::proto::{self, FromWorker, ToWorker};

/// How long a message to clusterd may wait for room in the socket buffer.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the background thread lets the [`Stats`](super::Stats) change
/// after a first change before it sends them: a busy worker's figures
/// change with every request, and this coalesces them into one record a
/// second. Idle, nothing changes and nothing is sent or woken.
const STATS_DELAY: Duration = Duration::from_secs(1);

/// What the `clusterd-worker` thread owns.
pub(super) struct Background {
    pub(super) ipc: Option<Arc<Async<OwnedFd>>>,
    pub(super) signals: Option<Signals>,
    pub(super) shared: Arc<Shared>,
    /// Closed when the [`Worker`] is dropped.
    pub(super) stopped: smol::channel::Receiver<()>,
}

impl Background {
    pub(super) fn run(self) {
        let Background {
            ipc,
            signals,
            shared,
            stopped,
        } = self;
        let shared = &*shared;
        let records = async {
            match &ipc {
                Some(ipc) => read_records(ipc, shared).await,
                None => future::pending().await,
            }
        };
        let stats = async {
            match &ipc {
                Some(ipc) => report_stats(ipc, shared).await,
                None => future::pending().await,
            }
        };
        let watch = async {
            match &signals {
                Some(signals) => watch_signals(signals, shared).await,
                None => future::pending().await,
            }
        };
        let work = future::zip(records, future::zip(stats, watch));
        smol::block_on(
            async {
                let _ = stopped.recv().await;
            }
            .or(async {
                work.await;
            }),
        );
        // The worker is gone: close our copy of the channel, but keep
        // watching the signals, since dropping them would leave SIGTERM and
        // SIGINT ignored (the handler stays installed). Behave as the default
        // action would, exiting with the shell's 128 + signal number.
        drop(ipc);
        if let Some(signals) = signals {
            smol::block_on(async {
                let mut signals = &signals;
                while let Some(signal) = signals.next().await {
                    match signal {
                        Ok(Signal::Term) => std::process::exit(128 + 15),
                        Ok(Signal::Int) => std::process::exit(128 + 2),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    }
}

/// Reads records from clusterd until the channel closes.
async fn read_records(ipc: &Async<OwnedFd>, shared: &Shared) {
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let mut complained = false;
    let mut complain = |why: fmt::Arguments<'_>| {
        if !complained {
            complained = true;
            shared.log(format_args!(
                "ignoring a bad record from clusterd: {why} (further bad records are ignored silently)"
            ));
        }
    };
    loop {
        let received = ipc
            .read_with(|fd| fdpass::recv_with_fds(fd, &mut buf, RecvFlags::empty()))
            .await;
        let received = match received {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Too many fds attached: they were closed, the record is bad.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                complain(format_args!("{e}"));
                continue;
            }
            Err(e) => {
                shared.log(format_args!("the IPC channel failed ({e}); draining"));
                shared.begin_shutdown(ShutdownReason::Disconnected);
                return;
            }
        };
        if received.len == 0 && received.fds.is_empty() {
            shared.begin_shutdown(ShutdownReason::Disconnected);
            return;
        }
        if received.truncated {
            complain(format_args!(
                "record exceeds {} bytes",
                proto::MAX_IPC_RECORD
            ));
            continue;
        }
        // Any fds attached to a record other than Hello are dropped (closed).
        match proto::decode::<ToWorker>(&buf[..received.len], proto::MAX_IPC_RECORD) {
            Ok(ToWorker::Drain { timeout_ms }) => {
                shared.begin_shutdown(ShutdownReason::Drain {
                    timeout: Duration::from_millis(timeout_ms),
                });
            }
            Ok(ToWorker::Hello(_)) => complain(format_args!("a second Hello")),
            // Connections come on the inboxes, never here (its fd is closed).
            Ok(ToWorker::Connection) => complain(format_args!("a connection on the IPC channel")),
            Err(e) => complain(format_args!("{e}")),
        }
    }
}

/// Sends the latest [`Stats`](super::Stats) when they changed, at most once
/// a [`STATS_DELAY`], until the drain is reported or the channel closes.
///
/// No periodic tick: it sleeps on the figures' change notification, so an
/// idle worker's thread is never woken. A change starts a [`STATS_DELAY`]
/// wait (coalescing a burst into one record), then the values of that
/// moment are sent. A full socket buffer skips a report rather than
/// waiting; the values still differ from the last sent, so the next
/// attempt follows a [`STATS_DELAY`] later.
async fn report_stats(ipc: &Async<OwnedFd>, shared: &Shared) {
    let stats = &shared.stats;
    let mut last = None;
    let current = || (stats.requests(), stats.active(), stats.failed());
    loop {
        // Registered before the check (in `until`), so a change between
        // the check and the wait is not lost.
        until(&stats.cells.changed, || {
            shared.ready_sent.load(Ordering::Acquire) && last != Some(current())
        })
        .await;
        Timer::after(STATS_DELAY).await;
        let _order = lock(&shared.send_lock);
        if shared.drained.load(Ordering::Acquire)
            || shared.shutdown.reason() == Some(ShutdownReason::Disconnected)
        {
            return;
        }
        let now = current();
        if last == Some(now) {
            continue;
        }
        let record = proto::encode(&match now {
            (requests, active, 0) => FromWorker::Stats { requests, active },
            (requests, active, failed) => FromWorker::StatsWithFailures {
                requests,
                active,
                failed,
            },
        });
        if fdpass::send_with_fds(ipc, &record, &[]).is_ok() {
            last = Some(now);
        }
    }
}

/// Turns SIGTERM and SIGINT into the shutdown; a SIGINT during the shutdown
/// exits at once.
async fn watch_signals(mut signals: &Signals, shared: &Shared) {
    while let Some(signal) = signals.next().await {
        let reason = match signal {
            Ok(Signal::Term) => ShutdownReason::Terminate,
            Ok(Signal::Int) => ShutdownReason::Interrupt,
            Ok(_) => continue,
            Err(e) => {
                shared.log(format_args!("cannot watch signals: {e}"));
                return;
            }
        };
        if !shared.begin_shutdown(reason) && reason == ShutdownReason::Interrupt {
            shared.log(format_args!(
                "SIGINT during shutdown: exiting without waiting for the drain"
            ));
            std::process::exit(130);
        }
    }
}

/// Sends one record, waiting (up to [`SEND_TIMEOUT`]) for buffer space.
pub(super) async fn send(ipc: &Async<OwnedFd>, msg: &FromWorker) -> io::Result<()> {
    let record = proto::encode(msg);
    ipc.write_with(|fd| fdpass::send_with_fds(fd, &record, &[]))
        .or(async {
            Timer::after(SEND_TIMEOUT).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("clusterd did not read for {SEND_TIMEOUT:?}"),
            ))
        })
        .await
}

pub(super) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::super::InFlight;
    use super::super::testing::*;
    use super::*;
    use crate::proto::MAX_IPC_RECORD;
    use std::os::fd::AsFd;

    #[test]
    fn bad_records_are_ignored() {
        let (worker, clusterd) = connected();
        clusterd.send(&[0xff; 40]);
        clusterd.send(&[1, 200]);
        clusterd.send(&vec![1u8; MAX_IPC_RECORD + 100]);
        clusterd.send(&hello_record(&clusterd.listener));
        let mut wrong_version = proto::encode(&ToWorker::Drain { timeout_ms: 1 });
        wrong_version[0] = 99;
        clusterd.send(&wrong_version);
        // A record with an fd attached that nobody asked for.
        let (r, _w) = std::io::pipe().unwrap();
        fdpass::send_with_fds(&clusterd.fd, &[7, 7], &[r.as_fd()]).unwrap();
        // Still listening: the Drain below is what ends it, not the garbage.
        clusterd.send(&proto::encode(&ToWorker::Drain { timeout_ms: 2 }));
        assert_eq!(
            within(worker.shutdown()),
            ShutdownReason::Drain {
                timeout: Duration::from_millis(2)
            }
        );
    }

    #[test]
    fn stats_are_reported_after_ready() {
        let (worker, clusterd) = connected();
        let stats = worker.stats();
        stats.count_request();
        stats.add_requests(2);
        let in_flight = InFlight::default();
        let _guard = in_flight.enter();
        stats.set_active(9); // overridden by the tracked counter
        stats.track(&in_flight);
        within(worker.ready()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Ready));
        assert_eq!(
            clusterd.recv(),
            Some(FromWorker::Stats {
                requests: 3,
                active: 1
            })
        );
        within(worker.drained()).unwrap();
        // Nothing after Drained but the end of the channel.
        assert_eq!(clusterd.recv(), Some(FromWorker::Drained));
        assert_eq!(clusterd.recv(), None);
    }

    #[test]
    fn each_change_is_reported_without_a_periodic_tick() {
        let (worker, clusterd) = connected();
        let stats = worker.stats();
        let in_flight = InFlight::default();
        stats.track(&in_flight);
        within(worker.ready()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Ready));
        let zero = FromWorker::Stats {
            requests: 0,
            active: 0,
        };
        assert_eq!(clusterd.recv(), Some(zero));
        // The reporter sleeps on the change notification: a connection
        // opening, a request, and the connection closing each wake it.
        let guard = in_flight.enter();
        let open = FromWorker::Stats {
            requests: 0,
            active: 1,
        };
        assert_eq!(clusterd.recv(), Some(open));
        stats.count_request();
        drop(guard);
        let done = FromWorker::Stats {
            requests: 1,
            active: 0,
        };
        assert_eq!(clusterd.recv(), Some(done));
        within(worker.drained()).unwrap();
        assert_eq!(clusterd.recv(), Some(FromWorker::Drained));
    }
}
