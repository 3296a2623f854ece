//! `dispatch = clusterd`: connections clusterd accepted and passes to this
//! worker, one inbox per listener.
//!
//! When clusterd sets [`ENV_DISPATCH`](crate::proto::ENV_DISPATCH), the
//! worker makes one `SOCK_SEQPACKET` socketpair per listener right after
//! `Hello`, sends one end of each to clusterd with
//! [`FromWorker::TakesConnections`] and closes the listening sockets it
//! received: from then on its [`Listener`](super::Listener)s yield the
//! connections clusterd sends to the inboxes (a [`ToWorker::Connection`]
//! record with the connection's fd attached), the same way they yielded
//! accepted ones. If the announcement cannot be sent, the worker keeps the
//! listening sockets and accepts from them as before.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};
use smol::Async;

use super::listener::unix_address;
use super::stream::Stream;
use crate::fdpass;
use crate::proto::{self, FromWorker};

/// Records are tiny; a larger one is not clusterd's.
const MAX_RECORD: usize = 64;

/// One listener's inbox: the worker's end of the socketpair.
#[derive(Debug)]
pub struct Inbox {
    sock: Async<OwnedFd>,
    /// The listener's address, as `Hello` gave it.
    address: String,
}

/// Makes `n` inboxes and announces them on the IPC channel `ipc`
/// (blocking: the channel is empty this early). Returns the worker's ends.
pub(super) fn announce(ipc: &OwnedFd, n: usize) -> io::Result<Vec<OwnedFd>> {
    let mut ours = Vec::with_capacity(n);
    let mut theirs = Vec::with_capacity(n);
    for _ in 0..n {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        ours.push(a);
        theirs.push(b);
    }
    let record = proto::encode(&FromWorker::TakesConnections {
        listeners: n as u32,
    });
    let fds: Vec<BorrowedFd<'_>> = theirs.iter().map(|fd| fd.as_fd()).collect();
    fdpass::send_with_fds(ipc, &record, &fds)?;
    Ok(ours)
}

impl Inbox {
    pub(super) fn new(fd: OwnedFd, address: &str) -> io::Result<Inbox> {
        Ok(Inbox {
            sock: Async::new(fd)?,
            address: address.to_owned(),
        })
    }

    pub(super) fn address(&self) -> &str {
        &self.address
    }

    pub(super) async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// The next connection clusterd sent. Once clusterd has closed the
    /// inbox (it exited), none comes again: this waits for ever, and the
    /// worker's shutdown (which the closed IPC channel starts) ends it.
    pub(super) async fn accept(&self) -> io::Result<(Stream, String)> {
        loop {
            let got = self.sock.read_with(receive).await?;
            match got {
                Some(conn) => return Ok(conn),
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// A connection already in the inbox, without waiting (`WouldBlock`
    /// when there is none).
    pub(super) fn try_accept(&self) -> io::Result<(Stream, String)> {
        match receive(self.sock.get_ref())? {
            Some(conn) => Ok(conn),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsFd for Inbox {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Receives one record: `Ok(None)` once clusterd closed its end. A record
/// without a connection attached is skipped (`EINTR`, which the accept
/// loop retries).
fn receive(fd: &OwnedFd) -> io::Result<Option<(Stream, String)>> {
    let mut buf = [0u8; MAX_RECORD];
    let got = fdpass::recv_with_fds(fd, &mut buf, RecvFlags::DONTWAIT)?;
    if got.len == 0 && got.fds.is_empty() {
        return Ok(None);
    }
    // What the record says is not needed (it is `Connection`); the fd is
    // the connection. Anything that is not a stream socket is dropped.
    let Some(conn) = got.fds.into_iter().next() else {
        return Err(io::Error::from_raw_os_error(libc::EINTR));
    };
    stream(conn).map(Some)
}

/// The connection `fd` as a [`Stream`], with its peer's address.
fn stream(fd: OwnedFd) -> io::Result<(Stream, String)> {
    let aborted = || io::Error::from_raw_os_error(libc::ECONNABORTED);
    if rustix::net::sockopt::socket_type(&fd).map_err(|_| aborted())? != SocketType::STREAM {
        return Err(aborted());
    }
    match rustix::net::sockopt::socket_domain(&fd).map_err(|_| aborted())? {
        AddressFamily::INET | AddressFamily::INET6 => {
            let tcp = std::net::TcpStream::from(fd);
            // A peer that reset meanwhile: a connection that failed.
            let peer = tcp.peer_addr()?;
            let _ = tcp.set_nodelay(true);
            Ok((Stream::Tcp(Async::new(tcp)?.into()), peer.to_string()))
        }
        AddressFamily::UNIX => {
            let unix = std::os::unix::net::UnixStream::from(fd);
            let peer = unix
                .peer_addr()
                .map_or_else(|_| "unix:(unnamed)".to_owned(), |a| unix_address(&a));
            Ok((Stream::Unix(Async::new(unix)?.into()), peer))
        }
        _ => Err(aborted()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Acceptor, InFlight, Worker};
    use super::*;
    use crate::proto::ToWorker;
    use std::io::{Read, Write};

    /// A dispatched worker: it announces one inbox for its one listener;
    /// returns it with the fake clusterd and clusterd's end of the inbox.
    fn dispatched() -> (Worker, Clusterd, OwnedFd) {
        let (ours, theirs) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fdpass::send_with_fds(&ours, &hello_record(&listener), &[listener.as_fd()]).unwrap();
        let worker = Worker::from_fd_dispatched(theirs).unwrap();
        let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
        let got = fdpass::recv_with_fds(&ours, &mut buf, RecvFlags::empty()).unwrap();
        assert_eq!(
            proto::decode::<FromWorker>(&buf[..got.len], proto::MAX_IPC_RECORD).unwrap(),
            FromWorker::TakesConnections { listeners: 1 }
        );
        let mut fds = got.fds;
        assert_eq!(fds.len(), 1);
        let inbox = fds.pop().unwrap();
        (worker, Clusterd { fd: ours, listener }, inbox)
    }

    /// clusterd's side: accepts a client on the listener and passes it.
    fn pass(clusterd: &Clusterd, inbox: &OwnedFd) -> std::net::TcpStream {
        let address = clusterd.listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(address).unwrap();
        let (conn, _) = clusterd.listener.accept().unwrap();
        let record = proto::encode(&ToWorker::Connection);
        fdpass::send_with_fds(inbox, &record, &[conn.as_fd()]).unwrap();
        client // clusterd's copy of the connection closes here
    }

    #[test]
    fn passed_connections_are_yielded_like_accepted_ones_bytes_untouched() {
        let (mut worker, clusterd, inbox) = dispatched();
        let listener = worker.take_listener("http").unwrap();
        assert!(listener.is_dispatched());
        assert_eq!(
            listener.local_addr().unwrap(),
            clusterd.listener.local_addr().unwrap().to_string()
        );
        let mut client = pass(&clusterd, &inbox);
        client.write_all(b"GET / HTTP/1.1\r\n\r\nrest").unwrap();
        let (mut stream, peer) = within(listener.accept()).unwrap();
        assert_eq!(peer, client.local_addr().unwrap().to_string());
        let mut buf = [0u8; 22];
        within(smol::io::AsyncReadExt::read_exact(&mut stream, &mut buf)).unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n\r\nrest");
        within(smol::io::AsyncWriteExt::write_all(&mut stream, b"ok")).unwrap();
        drop(stream);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "ok");
        // A record without a connection is skipped, not fatal.
        fdpass::send_with_fds(&inbox, b"junk", &[]).unwrap();
        assert!(listener.try_accept().is_err());
    }

    /// Connections clusterd passed before it sent the drain are served:
    /// the acceptor yields them before it ends.
    #[test]
    fn a_drain_yields_what_is_already_in_the_inbox_first() {
        let (mut worker, clusterd, inbox) = dispatched();
        let in_flight = InFlight::default();
        let mut acceptor = Acceptor::new(
            worker.take_listener("http").unwrap(),
            in_flight.clone(),
            worker.shutdown(),
        );
        let _clients: Vec<_> = (0..3).map(|_| pass(&clusterd, &inbox)).collect();
        clusterd.send(&proto::encode(&ToWorker::Drain { timeout_ms: 1000 }));
        within(worker.shutdown());
        let mut served = Vec::new();
        while let Some(conn) = within(acceptor.accept()).unwrap() {
            served.push(conn);
        }
        assert_eq!(served.len(), 3);
        assert_eq!(in_flight.active(), 3);
        assert!(acceptor.is_closed());
    }

    #[test]
    fn without_dispatch_nothing_is_announced() {
        let (_worker, clusterd) = connected();
        // The next record would be the announcement: there is none.
        rustix::net::sockopt::set_socket_timeout(
            &clusterd.fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_millis(50)),
        )
        .unwrap();
        let mut buf = [0u8; 64];
        assert!(fdpass::recv_with_fds(&clusterd.fd, &mut buf, RecvFlags::empty()).is_err());
    }
}
