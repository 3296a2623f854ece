//! The `NOTIFY_SOCKET` of `protocol = systemd` workers (sd_notify).
//!
//! A datagram socket clusterd owns, in the abstract namespace (no file to
//! create, clean up or give permissions to, so workers running as another
//! user can reach it). `SO_PASSCRED` makes the kernel attach the sender's
//! pid to each datagram; clusterd uses that pid to attribute a message to a
//! worker, and ignores messages from any other process. Datagrams larger
//! than [`MAX_DATAGRAM`] and ones that are not `KEY=VALUE` lines are ignored.
//!
//! Abstract names have no owner or permissions: any local user may bind any
//! free name. The name is therefore `clusterd/` and 128 random bits, drawn
//! again if it is taken, so nobody can take it before clusterd starts (a
//! predictable name such as one with the pid could be squatted, failing every
//! start).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use smol::Async;

/// The largest notification accepted (systemd's own limit is about 4 KiB).
pub const MAX_DATAGRAM: usize = 4096;

/// The socket and its `NOTIFY_SOCKET` value.
#[derive(Debug)]
pub struct NotifySocket {
    sock: Async<OwnedFd>,
    /// The `NOTIFY_SOCKET` value: `@` and the abstract name.
    pub name: String,
}

/// One notification: the sender's pid and its `KEY=VALUE` assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub pid: u32,
    pub fields: Vec<(String, String)>,
}

impl NotifySocket {
    /// Binds `@clusterd/` and 32 random hex digits; a name that is taken
    /// (by chance or by someone who guessed it) is drawn again, up to
    /// [`BIND_ATTEMPTS`] times.
    pub fn bind() -> io::Result<NotifySocket> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let mut attempt = 0;
        let name = loop {
            attempt += 1;
            let name = format!("clusterd/{}", random_hex()?);
            match rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?) {
                Ok(()) => break name,
                Err(rustix::io::Errno::ADDRINUSE) if attempt < BIND_ATTEMPTS => {}
                Err(e) => return Err(e.into()),
            }
        };
        sockopt::set_socket_passcred(&fd, true)?;
        Ok(NotifySocket {
            sock: Async::new(fd)?,
            name: format!("@{name}"),
        })
    }

    /// The socket an earlier image of clusterd bound, with its
    /// `NOTIFY_SOCKET` value (`clusterctl upgrade`).
    pub fn taken_over(fd: OwnedFd, name: String) -> io::Result<NotifySocket> {
        Ok(NotifySocket {
            sock: Async::new(fd)?,
            name,
        })
    }

    /// The socket, to hand over.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.sock.get_ref())
    }

    /// Reads up to `max` datagrams already queued, without waiting, and
    /// returns the well-formed notifications among them.
    pub fn drain_queued(&self, max: usize) -> Vec<Notification> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut out = Vec::new();
        for _ in 0..max {
            match receive(self.sock.get_ref(), &mut buf) {
                Ok(Some(n)) => out.push(n),
                Ok(None) => {}
                Err(_) => break, // WouldBlock: nothing more queued
            }
        }
        out
    }

    /// Receives the next well-formed notification from a process whose
    /// credentials the kernel attached. Yields to the other tasks after each
    /// datagram it ignores, so a flood of garbage (any local process can
    /// send to an abstract socket) cannot hold the event loop.
    pub async fn recv(&self) -> io::Result<Notification> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let got = self.sock.read_with(|fd| receive(fd, &mut buf)).await?;
            if let Some(n) = got {
                return Ok(n);
            }
            smol::future::yield_now().await;
        }
    }
}

/// How many random names [`NotifySocket::bind`] tries.
const BIND_ATTEMPTS: u32 = 8;

/// 128 bits from the kernel's random pool (`getrandom(2)`, no file needed:
/// clusterd may run in an empty root), as 32 hex digits.
fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // buffer; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The service manager's `NOTIFY_SOCKET` (clusterd run by systemd with
/// `Type=notify`): clusterd reports `READY=1` once its workers first are all
/// ready, `RELOADING=1` (with `MONOTONIC_USEC`) when a rolling restart or a
/// rollback begins and `READY=1` again when it ends, however it ends, and
/// `STOPPING=1` when it begins to stop (after which it reports nothing else).
#[derive(Debug)]
pub struct Manager {
    addr: SocketAddrUnix,
    state: ManagerState,
}

/// What the service manager has been told: which messages are still due.
/// Pure (no socket, no clock), so its sequences are unit-tested.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ManagerState {
    ready: bool,
    reloading: bool,
    stopping: bool,
}

impl ManagerState {
    /// Every worker is ready: the first `READY=1`, once.
    pub fn all_ready(&mut self, status: &str) -> Option<String> {
        if self.ready || self.stopping {
            return None;
        }
        self.ready = true;
        Some(format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// A rolling restart (or a rollback) begins: `RELOADING=1`, unless one
    /// is already reported, clusterd has not reported READY yet, or it is
    /// stopping. `now_usec` is `CLOCK_MONOTONIC` in microseconds.
    pub fn reload_begun(&mut self, now_usec: u64) -> Option<String> {
        if !self.ready || self.reloading || self.stopping {
            return None;
        }
        self.reloading = true;
        Some(format!("RELOADING=1\nMONOTONIC_USEC={now_usec}"))
    }

    /// The restart ended (done, aborted or rolled back): `READY=1` again.
    pub fn reload_ended(&mut self, status: &str) -> Option<String> {
        if !self.reloading || self.stopping {
            return None;
        }
        self.reloading = false;
        Some(format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// A stop begins: `STOPPING=1`, once.
    pub fn stopping(&mut self) -> Option<String> {
        if self.stopping {
            return None;
        }
        self.stopping = true;
        Some("STOPPING=1".to_string())
    }
}

impl Manager {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Option<Manager> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddrUnix::new_abstract_name(name).ok()?,
            None => SocketAddrUnix::new(bytes).ok()?,
        };
        Some(Manager {
            addr,
            state: ManagerState::default(),
        })
    }

    /// Every worker is ready for the first time: `READY=1`.
    pub fn all_ready(&mut self, status: &str) {
        if let Some(msg) = self.state.all_ready(status) {
            self.notify(&msg);
        }
    }

    /// A rolling restart or a rollback begins: `RELOADING=1`.
    pub fn reload_begun(&mut self) {
        if let Some(msg) = self.state.reload_begun(monotonic_usec()) {
            self.notify(&msg);
        }
    }

    /// It ended, however: `READY=1` with `status`.
    pub fn reload_ended(&mut self, status: &str) {
        if let Some(msg) = self.state.reload_ended(status) {
            self.notify(&msg);
        }
    }

    /// A stop begins: `STOPPING=1`.
    pub fn stopping(&mut self) {
        if let Some(msg) = self.state.stopping() {
            self.notify(&msg);
        }
    }

    /// Sends `state` (e.g. `STATUS=...`); failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        let sent = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .and_then(|fd| {
            rustix::net::sendto(
                &fd,
                state.as_bytes(),
                rustix::net::SendFlags::DONTWAIT,
                &self.addr,
            )
        });
        if let Err(e) = sent {
            crate::log!(
                warn,
                "notify.manager_failed",
                state = state.replace('\n', " "),
                error = e
            );
        }
    }
}

/// A `STATUS=` value: one line (a reason may hold a newline, which would
/// start a bogus assignment).
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd wants in `MONOTONIC_USEC`
/// (the clock `Instant` reads, which std does not expose as a number).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; CLOCK_MONOTONIC is always
    // available on Linux, so the call only writes `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// One datagram: `Ok(None)` for one that is ignored.
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<Notification>> {
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmCredentials(1), ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd,
        &mut [io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut pid = None;
    for cmsg in control.drain() {
        match cmsg {
            RecvAncillaryMessage::ScmCredentials(cred) => {
                pid = Some(cred.pid.as_raw_nonzero().get() as u32)
            }
            RecvAncillaryMessage::ScmRights(fds) => fds.for_each(drop), // fd store is not supported
            _ => {}
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Ok(None);
    }
    Ok(pid.and_then(|pid| parse(&buf[..msg.bytes]).map(|fields| Notification { pid, fields })))
}

/// Parses newline-separated `KEY=VALUE` assignments; `None` if any line is
/// not one (the whole datagram is then ignored).
pub fn parse(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=')?;
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return None;
        }
        fields.push((key.to_string(), value.to_string()));
    }
    (!fields.is_empty()).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_hears_ready_reloading_ready_and_stopping_once_each() {
        let mut m = ManagerState::default();
        assert_eq!(m.reload_begun(5), None, "no RELOADING=1 before READY=1");
        assert_eq!(m.reload_ended("x"), None);
        assert_eq!(
            m.all_ready("2 workers ready").as_deref(),
            Some("READY=1\nSTATUS=2 workers ready")
        );
        assert_eq!(m.all_ready("again"), None, "the first READY=1 only");
        assert_eq!(
            m.reload_begun(1234).as_deref(),
            Some("RELOADING=1\nMONOTONIC_USEC=1234")
        );
        assert_eq!(m.reload_begun(1300), None, "a rollback within the restart");
        assert_eq!(
            m.reload_ended("aborted:\nbad").as_deref(),
            Some("READY=1\nSTATUS=aborted: bad"),
            "a reason's newline does not start an assignment"
        );
        assert_eq!(m.reload_ended("twice"), None);
        assert!(m.reload_begun(2000).is_some());
        assert_eq!(m.stopping().as_deref(), Some("STOPPING=1"));
        assert_eq!(m.stopping(), None, "lame duck, then the drain: once");
        assert_eq!(
            m.reload_ended("cut short"),
            None,
            "nothing after STOPPING=1"
        );
        assert_eq!(m.reload_begun(3000), None);
    }

    #[test]
    fn monotonic_usec_is_the_clock_instant_reads() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a, "{a} {b}");
    }

    #[test]
    fn assignments_parse_and_garbage_does_not() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 3 carts\n"),
            Some(vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "serving 3 carts".into())
            ])
        );
        assert_eq!(
            parse(b"STOPPING=1"),
            Some(vec![("STOPPING".into(), "1".into())])
        );
        for bad in [
            &b""[..],
            b"\n",
            b"READY",
            b"ready=1",
            b"=1",
            &[0xff, 0xfe],
            b"READY=1\ngarbage",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// A datagram socket of this process, and the address of `sock`.
    fn client_of(
        sock: &NotifySocket,
    ) -> (
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::SocketAddr,
    ) {
        use std::os::linux::net::SocketAddrExt;
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(&sock.name.as_bytes()[1..]).unwrap();
        (client, addr)
    }

    #[test]
    fn a_datagram_is_attributed_to_its_sender() {
        let sock = NotifySocket::bind().unwrap();
        let (client, addr) = client_of(&sock);
        client.send_to_addr(b"READY=1\nSTATUS=hi", &addr).unwrap();
        client
            .send_to_addr(&[b'x'; MAX_DATAGRAM + 10], &addr)
            .unwrap();
        client.send_to_addr(b"not an assignment", &addr).unwrap();
        client.send_to_addr(b"STOPPING=1", &addr).unwrap();
        let first = smol::block_on(sock.recv()).unwrap();
        assert_eq!(first.pid, std::process::id());
        assert_eq!(first.fields[0], ("READY".into(), "1".into()));
        let second = smol::block_on(sock.recv()).unwrap();
        assert_eq!(
            second.fields,
            vec![("STOPPING".into(), "1".into())],
            "oversized and garbage ones were skipped"
        );
    }

    #[test]
    fn a_squatted_name_does_not_stop_the_bind() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        // Abstract names have no permissions: anyone may take the name a
        // clusterd with a given pid would choose, before it starts.
        let predictable = format!("clusterd/{}/notify", std::process::id());
        let squatter = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(predictable.as_bytes()).unwrap(),
        );
        let first = NotifySocket::bind().expect("bind despite the squatter");
        let second = NotifySocket::bind().expect("a second socket");
        assert_ne!(first.name, second.name, "each socket has its own name");
        if squatter.is_ok() {
            assert_ne!(first.name, format!("@{predictable}"));
        }
        // The name is not guessable: 128 random bits.
        assert!(
            first.name.len() >= "@clusterd/".len() + 32,
            "{}",
            first.name
        );
        let (client, addr) = client_of(&first);
        client.send_to_addr(b"READY=1", &addr).unwrap();
        let n = smol::block_on(first.recv()).unwrap();
        assert_eq!(n.pid, std::process::id(), "the sender is still known");
    }

    #[test]
    fn queued_datagrams_are_drained_without_waiting_and_boundedly() {
        let sock = NotifySocket::bind().unwrap();
        assert!(sock.drain_queued(8).is_empty(), "nothing queued: no wait");
        let (client, addr) = client_of(&sock);
        for datagram in [
            &b"garbage"[..],
            b"STATUS=a",
            b"junk",
            b"STATUS=b",
            b"STATUS=c",
        ] {
            client.send_to_addr(datagram, &addr).unwrap();
        }
        let first = sock.drain_queued(4);
        let notes: Vec<&str> = first.iter().map(|n| n.fields[0].1.as_str()).collect();
        assert_eq!(notes, ["a", "b"], "four datagrams read, garbage among them");
        let rest = sock.drain_queued(8);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].fields[0].1, "c");
    }
}
