//! Records with file descriptors attached (`SCM_RIGHTS`) over a unix socket.
//!
//! Thin wrappers over rustix's `sendmsg`/`recvmsg`. Received fds are
//! `OwnedFd`s with `CLOEXEC` set (`MSG_CMSG_CLOEXEC`), so none can leak into a
//! process spawned later; any fds a caller did not ask for are closed.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::proto::MAX_LISTENERS;

/// Sends one record with `fds` attached.
pub fn send_with_fds(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short send of a record",
        ));
    }
    Ok(())
}

/// One received record.
#[derive(Debug)]
pub struct Received {
    /// Bytes received (at most the buffer's length).
    pub len: usize,
    /// The record was longer than the buffer (the rest is lost).
    pub truncated: bool,
    /// Attached fds, in order.
    pub fds: Vec<OwnedFd>,
}

/// Receives one record into `buf`, with up to [`MAX_LISTENERS`] attached fds.
/// `len == 0` with no fds means the peer closed the socket.
pub fn recv_with_fds(sock: impl AsFd, buf: &mut [u8], flags: RecvFlags) -> io::Result<Received> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = cmsg {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many fds attached to a record",
        ));
    }
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    use std::io::{Read, Write};

    #[test]
    fn fds_travel_with_the_record() {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (mut r, w) = std::io::pipe().unwrap();
        send_with_fds(&a, b"hello", &[w.as_fd()]).unwrap();
        drop(w);
        let mut buf = [0u8; 16];
        let got = recv_with_fds(&b, &mut buf, RecvFlags::empty()).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert!(!got.truncated);
        assert_eq!(got.fds.len(), 1);
        let mut w2 = std::fs::File::from(got.fds.into_iter().next().unwrap());
        w2.write_all(b"x").unwrap();
        drop(w2);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "x");
    }

    #[test]
    fn oversized_records_are_reported_truncated() {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        send_with_fds(&a, &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        let got = recv_with_fds(&b, &mut buf, RecvFlags::empty()).unwrap();
        assert!(got.truncated);
        drop(a);
        let got = recv_with_fds(&b, &mut buf, RecvFlags::empty()).unwrap();
        assert_eq!((got.len, got.fds.len()), (0, 0));
    }
}
