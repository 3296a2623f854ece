//! Binding the listening sockets. They belong to clusterd for its whole life:
//! workers get copies, so a worker that restarts, crashes or is scaled away
//! never closes the port, and connections queue in the kernel meanwhile.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};

use crate::config::{Listen, ListenAddr};
use crate::proto::ListenerInfo;

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// The address as bound (with the real port when the config said 0).
    pub address: String,
    pub fd: OwnedFd,
    /// A unix socket's path, removed when clusterd exits.
    unix_path: Option<PathBuf>,
}

/// Makes a shared listener non-blocking again when a worker made it blocking
/// (the file status flags belong to the socket, shared by every copy; an old
/// worker that accepts itself may set them): clusterd, accepting on it, must
/// never block. Logs `event` the first time, as `warned` records.
pub fn keep_nonblocking(fd: BorrowedFd<'_>, warned: &mut bool, event: &str) {
    match rustix::fs::fcntl_getfl(fd) {
        Ok(flags) if !flags.contains(rustix::fs::OFlags::NONBLOCK) => {
            let _ = rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK);
            if !std::mem::replace(warned, true) {
                crate::log!(
                    warn,
                    event,
                    reason =
                        "a worker made a listener blocking; clusterd set it non-blocking again"
                );
            }
        }
        _ => {}
    }
}

impl Listener {
    pub fn info(&self) -> ListenerInfo {
        ListenerInfo {
            name: self.name.clone(),
            address: self.address.clone(),
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Listener {
    /// A unix socket's path (removed when clusterd exits).
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        self.unix_path.as_deref()
    }

    /// A listener an earlier image of clusterd bound (`clusterctl upgrade`).
    pub fn taken_over(
        name: String,
        address: String,
        fd: OwnedFd,
        unix_path: Option<PathBuf>,
    ) -> Listener {
        Listener {
            name,
            address,
            fd,
            unix_path,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds and listens on `listen` with `backlog`.
///
/// # Errors
/// The OS error, with the address and name in the message.
pub fn bind(listen: &Listen, backlog: u32) -> io::Result<Listener> {
    let describe = |e: io::Error, addr: &dyn std::fmt::Display| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} ({}): {e}", listen.name),
        )
    };
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    match &listen.addr {
        ListenAddr::Tcp(addr) => {
            let (fd, address) = bind_tcp(*addr, backlog, false).map_err(|e| describe(e, addr))?;
            Ok(Listener {
                name: listen.name.clone(),
                address,
                fd,
                unix_path: None,
            })
        }
        ListenAddr::Unix(path) => {
            let shown = format!("unix:{}", path.display());
            let fd = bind_unix(path, backlog).map_err(|e| describe(e, &shown))?;
            Ok(Listener {
                name: listen.name.clone(),
                address: shown,
                fd,
                unix_path: Some(path.clone()),
            })
        }
    }
}

/// Binds and listens on the TCP address `addr` with `SO_REUSEPORT`, so that
/// several such sockets (one per worker slot, [`super::reuseport`]) share
/// the port, each with its own accept queue.
///
/// # Errors
/// The OS error, with the address and name in the message.
pub fn bind_reuseport(name: &str, addr: SocketAddr, backlog: u32) -> io::Result<Listener> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    let (fd, address) = bind_tcp(addr, backlog, true)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({name}): {e}")))?;
    Ok(Listener {
        name: name.to_string(),
        address,
        fd,
        unix_path: None,
    })
}

fn bind_tcp(addr: SocketAddr, backlog: i32, reuseport: bool) -> io::Result<(OwnedFd, String)> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if reuseport {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    if addr.is_ipv6() {
        // `[::]:80` and `0.0.0.0:80` may then both be listed.
        sockopt::set_ipv6_v6only(&fd, true)?;
    }
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, backlog)?;
    let bound = SocketAddr::try_from(rustix::net::getsockname(&fd)?)
        .map_err(|_| io::Error::other("getsockname returned a non-IP address"))?;
    Ok((fd, bound.to_string()))
}

fn bind_unix(path: &std::path::Path, backlog: i32) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::bind(&fd, &addr) {
        Err(rustix::io::Errno::ADDRINUSE) if is_stale_socket(path) => {
            std::fs::remove_file(path)?;
            rustix::net::bind(&fd, &addr)?;
        }
        other => other?,
    }
    rustix::net::listen(&fd, backlog)?;
    Ok(fd)
}

/// A socket file nobody listens on (left by a process that died).
fn is_stale_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && matches!(
            std::os::unix::net::UnixStream::connect(path),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_tcp_port_is_reported_and_a_busy_one_is_an_error_naming_it() {
        let listen = Listen {
            name: "http".into(),
            addr: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        };
        let l = bind(&listen, 16).unwrap();
        assert!(
            l.address.starts_with("127.0.0.1:") && !l.address.ends_with(":0"),
            "{}",
            l.address
        );
        let taken = Listen {
            name: "api".into(),
            addr: ListenAddr::Tcp(l.address.parse().unwrap()),
        };
        let err = bind(&taken, 16).unwrap_err().to_string();
        assert!(
            err.contains(&l.address) && err.contains("(api)") && err.contains("in use"),
            "{err}"
        );
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_and_removed_on_drop() {
        let dir = std::env::temp_dir().join(format!("clusterd-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves the file behind
        let listen = Listen {
            name: "http".into(),
            addr: ListenAddr::Unix(path.clone()),
        };
        let l = bind(&listen, 16).unwrap();
        assert_eq!(l.address, format!("unix:{}", path.display()));
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
