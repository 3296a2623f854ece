//! The readiness pipe of a `protocol = systemd` worker (`CLUSTERD_READY_FD`,
//! s6 style): a line `READY=1` means ready.
//!
//! The read end is read until the first `READY=1`, a line longer than
//! [`MAX_LINE`], or [`MAX_BEFORE_READY`] bytes without READY, and then no
//! more: it is not polled again, so a worker that goes on writing (even
//! `/dev/zero`) costs clusterd nothing; its writes block once the pipe is
//! full. The fd is kept, not closed, until the worker is reaped (closing it
//! earlier would give a worker's stray write EPIPE, or kill it with SIGPIPE),
//! and closed then even if a helper of the worker still holds the write end.

use std::io;
use std::os::fd::OwnedFd;

use smol::Async;
use smol::channel::{Receiver, Sender};

use super::{Event, WorkerEvent};
use crate::lifecycle::InstanceId;
use crate::proto::FromWorker;

/// The longest line looked at.
pub const MAX_LINE: usize = 1024;

/// What is read, at most, before READY.
pub const MAX_BEFORE_READY: usize = 64 * 1024;

/// What the bytes read so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// The pipe is not listened to any more, for this reason.
    Bad(&'static str),
}

/// Finds `READY=1` lines in a byte stream, within the bounds.
#[derive(Debug, Default)]
pub struct Scanner {
    line: Vec<u8>,
    seen: usize,
}

impl Scanner {
    /// Feeds bytes; `Some` once the verdict is in (nothing more need be fed).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Verdict> {
        for &b in bytes {
            self.seen += 1;
            if b == b'\n' {
                if self.line == b"READY=1" {
                    return Some(Verdict::Ready);
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                return Some(Verdict::Bad(
                    "readiness pipe: a line longer than 1 KiB (pipe ignored)",
                ));
            }
            if self.seen >= MAX_BEFORE_READY {
                return Some(Verdict::Bad(
                    "readiness pipe: 64 KiB without READY=1 (pipe ignored)",
                ));
            }
        }
        None
    }
}

/// Reads worker `id`'s pipe until the verdict, reports it, then holds the
/// fd without reading until `reaped` ends (the worker was reaped). Ends at
/// once on EOF.
pub(super) async fn read(
    id: InstanceId,
    pipe: std::rc::Rc<Async<OwnedFd>>,
    reaped: Receiver<()>,
    tx: Sender<Event>,
) {
    let mut scanner = Scanner::default();
    let mut buf = [0u8; 4096];
    let verdict = loop {
        // Reaped, or EOF (no writer is left): the fd goes.
        let Some(n) = read_until_reaped(&pipe, &mut buf, &reaped).await else {
            return;
        };
        if let Some(v) = scanner.feed(&buf[..n]) {
            break v;
        }
    };
    let event = match verdict {
        Verdict::Ready => WorkerEvent::Message(FromWorker::Ready),
        Verdict::Bad(why) => WorkerEvent::Bad(why.into()),
    };
    if tx.send(Event::Worker(id, event)).await.is_err() {
        return;
    }
    // Not polled any more; the fd is kept until the worker is reaped.
    let _ = reaped.recv().await;
    drop(pipe);
}

/// The next read of `fd` into `buf`: the byte count, or `None` at end of
/// file, on an error, or once `reaped` says the worker was reaped (the
/// caller then drops the fd, whoever else still holds its other end).
pub(super) async fn read_until_reaped(
    fd: &Async<OwnedFd>,
    buf: &mut [u8],
    reaped: &Receiver<()>,
) -> Option<usize> {
    let read = smol::future::or(
        async {
            Some(
                fd.read_with(|fd| rustix::io::read(fd, &mut *buf).map_err(io::Error::from))
                    .await,
            )
        },
        async {
            let _ = reaped.recv().await;
            None
        },
    )
    .await;
    match read {
        None | Some(Ok(0)) | Some(Err(_)) => None,
        Some(Ok(n)) => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_found_after_other_lines_and_split_reads() {
        let mut s = Scanner::default();
        assert_eq!(s.feed(b"hello\nREA"), None);
        assert_eq!(s.feed(b"DY=1"), None);
        assert_eq!(s.feed(b"\nmore"), Some(Verdict::Ready));
        let mut s = Scanner::default();
        assert_eq!(s.feed(b"READY=10\nxREADY=1\n"), None);
    }

    #[test]
    fn a_long_line_or_endless_newlines_end_the_listening() {
        let mut s = Scanner::default();
        assert!(matches!(s.feed(&[b'x'; 2000]), Some(Verdict::Bad(_))));
        let mut s = Scanner::default();
        let newlines = vec![b'\n'; MAX_BEFORE_READY - 1];
        assert_eq!(s.feed(&newlines), None);
        assert!(matches!(s.feed(b"\n"), Some(Verdict::Bad(_))));
        // READY exactly within the budget still counts.
        let mut s = Scanner::default();
        let mut bytes = vec![b'\n'; MAX_BEFORE_READY - 8];
        bytes.extend_from_slice(b"READY=1\n");
        assert_eq!(s.feed(&bytes), Some(Verdict::Ready));
    }
}
