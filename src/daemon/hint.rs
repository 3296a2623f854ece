//! Advice for mistakes only run time can show: a program that is not a
//! clusterd worker run with `protocol = clusterd`, a program that never
//! reports READY under `protocol = systemd`. Each is one `worker.hint` line
//! that says what to change; config warnings found at start-up or on a
//! reload are `config.warning` lines.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use crate::config::{ConfigError, Protocol};
use crate::lifecycle::human;

/// Logs the warnings of a config being put to use (start-up or reload).
pub fn config_warnings(path: &Path, warnings: &[ConfigError]) {
    for w in warnings {
        log!(
            warn,
            "config.warning",
            file = path.display(),
            line = w.line,
            warning = w.message
        );
    }
}

/// What a worker that has not reported READY did on its channel, as far as
/// clusterd can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// `protocol = clusterd`: the Hello clusterd sent is still unread.
    HelloUnread,
    /// `protocol = clusterd`: it read the Hello (or it is gone) but sent
    /// nothing.
    NothingSent,
    /// `protocol = systemd`: no READY=1 by any of the three means.
    NoReady,
    /// `protocol = node`: the adapter never said a word (Node did not load
    /// it, or the program is not Node.js).
    NodeSilent,
    /// `protocol = node`: the adapter runs, but the app did not listen on
    /// every listener.
    NodeNotListening,
}

impl Silence {
    /// How a starting worker of `protocol` that has sent nothing was silent;
    /// `ipc` is clusterd's end of its channel, if still open.
    pub fn of(protocol: Protocol, ipc: Option<BorrowedFd<'_>>) -> Silence {
        match protocol {
            Protocol::Systemd => Silence::NoReady,
            Protocol::Node => Silence::NodeSilent,
            Protocol::Clusterd if ipc.is_some_and(|fd| unread_bytes(fd) > 0) => {
                Silence::HelloUnread
            }
            Protocol::Clusterd => Silence::NothingSent,
        }
    }
}

/// The advice for worker `id`, silent as `silence`, when it missed
/// `ready_timeout` (`Some(timeout)`) or exited before READY (`None`).
pub fn not_ready(id: u32, silence: Silence, missed: Option<Duration>) -> String {
    let when = match missed {
        Some(t) => format!("within ready_timeout ({})", human(t)),
        None => "before it exited".into(),
    };
    match silence {
        Silence::HelloUnread => format!(
            "worker {id} never read its Hello on fd 3 {when}: is this a clusterd worker? \
             For any other program use protocol = systemd"
        ),
        Silence::NothingSent => format!(
            "worker {id} sent nothing on fd 3 {when}: a clusterd worker reports READY \
             once it serves; if this program is not one, use protocol = systemd"
        ),
        Silence::NoReady => format!(
            "worker {id} did not report READY {when}: send READY=1 on $NOTIFY_SOCKET \
             (sd_notify) or write \"READY=1\\n\" to the fd in $CLUSTERD_READY_FD, or set \
             ready_after = DURATION for a program that cannot; a wrapper (npm, a shell) \
             that runs the server as its child cannot pass on the listeners"
        ),
        Silence::NodeSilent => format!(
            "worker {id} did not report READY {when}, and clusterd's Node adapter never \
             spoke: is exec a Node.js program (18 or later), run directly (not through npm \
             or a shell script)? The adapter is loaded with NODE_OPTIONS=--require"
        ),
        Silence::NodeNotListening => format!(
            "worker {id} did not report READY {when}: the adapter reports READY once the \
             app listens on every listener clusterd passes; listen(PORT) maps by port"
        ),
    }
}

/// Logs [`not_ready`].
pub fn log_not_ready(id: u32, pid: u32, silence: Silence, missed: Option<Duration>) {
    let hint = not_ready(id, silence, missed);
    log!(warn, "worker.hint", id = id, pid = pid, hint = hint);
}

/// Bytes clusterd sent on `fd` that the peer has not read (`SIOCOUTQ`); 0
/// if that cannot be told.
fn unread_bytes(fd: BorrowedFd<'_>) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one c_int through the pointer,
    // which points at `n`; the fd is borrowed, so it is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r == 0 { n } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn an_unread_hello_is_seen() {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert_eq!(
            Silence::of(Protocol::Clusterd, Some(ours.as_fd())),
            Silence::NothingSent
        );
        ours.send(b"hello").unwrap();
        assert_eq!(
            Silence::of(Protocol::Clusterd, Some(ours.as_fd())),
            Silence::HelloUnread
        );
        let mut buf = [0; 16];
        theirs.recv(&mut buf).unwrap();
        assert_eq!(
            Silence::of(Protocol::Clusterd, Some(ours.as_fd())),
            Silence::NothingSent
        );
        assert_eq!(Silence::of(Protocol::Clusterd, None), Silence::NothingSent);
        assert_eq!(
            Silence::of(Protocol::Systemd, Some(ours.as_fd())),
            Silence::NoReady
        );
    }

    #[test]
    fn the_advice_names_the_fix() {
        let t = Some(Duration::from_secs(10));
        assert_eq!(
            not_ready(1, Silence::HelloUnread, t),
            "worker 1 never read its Hello on fd 3 within ready_timeout (10s): is this a \
             clusterd worker? For any other program use protocol = systemd"
        );
        assert!(not_ready(2, Silence::NothingSent, None).starts_with(
            "worker 2 sent nothing on fd 3 before it exited: a clusterd worker reports READY"
        ));
        assert!(
            not_ready(4, Silence::NodeSilent, t).contains("NODE_OPTIONS=--require"),
            "{}",
            not_ready(4, Silence::NodeSilent, t)
        );
        assert!(not_ready(5, Silence::NodeNotListening, None).contains("before it exited"));
        let systemd = not_ready(3, Silence::NoReady, t);
        for needle in [
            "within ready_timeout (10s)",
            "NOTIFY_SOCKET",
            "CLUSTERD_READY_FD",
            "ready_after",
        ] {
            assert!(systemd.contains(needle), "{needle}: {systemd}");
        }
    }
}
