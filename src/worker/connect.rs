//! How a worker gets its channel and its listeners: the IPC fd named by
//! `CLUSTERD_FD` and clusterd's `Hello` record under clusterd, or the
//! fallback addresses bound by the worker itself when run alone.

use std::ffi::OsStr;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, RecvFlags, SocketType};

use super::listener::Kind;
use super::with_context;
use crate::fdpass;
use crate::proto::{self, Hello, ToWorker};

/// The environment variable naming the IPC fd clusterd passes to a worker.
pub const ENV_FD: &str = "CLUSTERD_FD";

/// How long [`Worker::connect`] waits for clusterd's `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once the fd named by `CLUSTERD_FD` has been taken over, so that two
/// `OwnedFd`s can never own it.
static IPC_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Parses `CLUSTERD_FD` and takes ownership of that fd, once per process.
pub(super) fn take_env_fd(value: &OsStr) -> io::Result<OwnedFd> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ENV_FD}={}: {why}", value.to_string_lossy()),
        )
    };
    let raw: RawFd = value
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&fd: &RawFd| fd >= 0)
        .ok_or_else(|| invalid("not a file descriptor number"))?;
    if IPC_FD_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(invalid(
            "the IPC channel was already taken by another Worker",
        ));
    }
    // SAFETY: clusterd starts the worker with this fd open and nothing else in
    // the process owns it; `IPC_FD_TAKEN` guarantees we claim it at most once.
    // If the variable lies (the fd is closed or is something else, e.g. the
    // variable was inherited from a parent worker), the check below gives the
    // number back without closing it, so no fd we do not own is ever closed.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match check_ipc_socket(&fd) {
        Ok(()) => Ok(fd),
        Err(e) => {
            let _ = fd.into_raw_fd();
            Err(invalid(&format!(
                "not a clusterd IPC socket ({e}); was the variable inherited from another process?"
            )))
        }
    }
}

pub(super) fn check_ipc_socket(fd: &OwnedFd) -> io::Result<()> {
    let kind = sockopt::socket_type(fd)?;
    let domain = sockopt::socket_domain(fd)?;
    if kind != SocketType::SEQPACKET || domain != AddressFamily::UNIX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected a unix SOCK_SEQPACKET socket",
        ));
    }
    Ok(())
}

/// Receives the first record, which must be `Hello` with one fd per listener
/// (and the scoreboard's after them, when it names a cell).
pub(super) fn receive_hello(fd: &OwnedFd) -> io::Result<(Hello, Vec<OwnedFd>, Option<OwnedFd>)> {
    // Blocking with a deadline; the fd may have been created non-blocking.
    rustix::io::ioctl_fionbio(fd, false)?;
    sockopt::set_socket_timeout(fd, Timeout::Recv, Some(HELLO_TIMEOUT))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let received = loop {
        match fdpass::recv_with_fds(fd, &mut buf, RecvFlags::empty()) {
            Ok(received) => break received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted && Instant::now() < deadline => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no Hello from clusterd within {HELLO_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(with_context(e, format_args!("cannot receive Hello"))),
        }
    };
    sockopt::set_socket_timeout(fd, Timeout::Recv, None)?;
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if received.len == 0 && received.fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "clusterd closed the IPC channel before sending Hello",
        ));
    }
    if received.truncated {
        return Err(invalid(format!(
            "clusterd IPC: first record exceeds {} bytes",
            proto::MAX_IPC_RECORD
        )));
    }
    match proto::decode::<ToWorker>(&buf[..received.len], proto::MAX_IPC_RECORD) {
        Ok(ToWorker::Hello(hello))
            if hello.listeners.len() + usize::from(hello.scoreboard.is_some())
                == received.fds.len() =>
        {
            let mut fds = received.fds;
            let board = hello.scoreboard.and_then(|_| fds.pop());
            Ok((hello, fds, board))
        }
        Ok(ToWorker::Hello(hello)) => Err(invalid(format!(
            "clusterd IPC: Hello names {} listeners{} but {} fds are attached",
            hello.listeners.len(),
            if hello.scoreboard.is_some() {
                " and a scoreboard"
            } else {
                ""
            },
            received.fds.len()
        ))),
        Ok(other) => Err(invalid(format!(
            "clusterd IPC: expected Hello as the first record, got {other:?}"
        ))),
        Err(e) => Err(invalid(format!("clusterd IPC: {e}"))),
    }
}

/// Checks that `fd` is a listening stream socket and says which kind.
pub(super) fn listener_kind(fd: &OwnedFd) -> io::Result<Kind> {
    let not_listening = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening TCP or unix stream socket",
        )
    };
    if sockopt::socket_type(fd)? != SocketType::STREAM || !sockopt::socket_acceptconn(fd)? {
        return Err(not_listening());
    }
    match sockopt::socket_domain(fd)? {
        AddressFamily::INET | AddressFamily::INET6 => Ok(Kind::Tcp),
        AddressFamily::UNIX => Ok(Kind::Unix),
        _ => Err(not_listening()),
    }
}

/// Binds a standalone listener; returns it with the address actually bound.
pub(super) fn bind(address: &str) -> io::Result<(Kind, OwnedFd, String)> {
    if let Some(path) = address.strip_prefix("unix:") {
        let listener = bind_unix(path)?;
        Ok((Kind::Unix, listener.into(), address.to_owned()))
    } else {
        let addrs: Vec<_> = address.to_socket_addrs()?.collect();
        let listener = std::net::TcpListener::bind(&addrs[..])?;
        let bound = listener.local_addr()?.to_string();
        Ok((Kind::Tcp, listener.into(), bound))
    }
}

/// Binds a unix listener, replacing a stale socket file that nobody listens on.
fn bind_unix(path: &str) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)?.file_type().is_socket();
            let refused = matches!(UnixStream::connect(path),
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused);
            if !(is_socket && refused) {
                return Err(e);
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::super::Worker;
    use super::super::testing::*;
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn version_mismatch_names_both_versions() {
        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut record = hello_record(&listener);
        const { assert!(proto::IPC_VERSION < 251, "one-byte varint") };
        record[0] = 99;
        fdpass::send_with_fds(&ours, &record, &[listener.as_fd()]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            text.contains("version 99")
                && text.contains(&format!("version {}", proto::IPC_VERSION)),
            "{text}"
        );
    }

    #[test]
    fn hello_must_come_first_and_match_its_fds() {
        let (ours, theirs) = pair();
        drop(ours);
        let err = Worker::from_fd(theirs).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("0 fds"), "{err}");

        let (ours, theirs) = pair();
        ours_send(&ours, &proto::encode(&ToWorker::Drain { timeout_ms: 1 }));
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("expected Hello"), "{err}");

        // An fd that is not a listening socket.
        let (ours, theirs) = pair();
        let (r, _w) = std::io::pipe().unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[r.as_fd()]).unwrap();
        let err = Worker::from_fd(theirs).unwrap_err();
        assert!(err.to_string().contains("listener http="), "{err}");

        // Not a seqpacket socket at all.
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Worker::from_fd(stream.into()).is_err());
    }

    fn ours_send(fd: &OwnedFd, bytes: &[u8]) {
        fdpass::send_with_fds(fd, bytes, &[]).unwrap();
    }

    #[test]
    fn env_fd_must_be_a_number() {
        for value in ["", "abc", "-1", "3x"] {
            let err = take_env_fd(OsStr::new(value)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().starts_with(ENV_FD), "{err}");
        }
    }
}
