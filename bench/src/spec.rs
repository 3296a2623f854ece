//! What to run: [`Spec`], and the checks that keep the load on loopback.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::Method;

/// Most connections one run may open.
pub const MAX_CONNECTIONS: usize = 512;

/// Most threads one run may use.
pub const MAX_THREADS: usize = 64;

/// A load to generate. Build one with [`Spec::new`] and struct update syntax:
///
/// ```
/// # use std::time::Duration;
/// # use clusterd_bench::Spec;
/// let addr = "127.0.0.1:3000".parse().unwrap();
/// let spec = Spec {
///     connections: 4,
///     max_requests: Some(1000),
///     path: "/products/1".into(),
///     ..Spec::new(addr)
/// };
/// assert_eq!(spec.timeout, Duration::from_secs(10));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The server. Must be loopback (127.0.0.0/8 or ::1): this tool is for our own tests and
    /// benchmarks, never for loading someone else's host.
    pub addr: SocketAddr,
    /// Concurrent connections, 1 to [`MAX_CONNECTIONS`]. Default 10.
    pub connections: usize,
    /// Threads sharing the connections, each an event loop, 1 to [`MAX_THREADS`] (more than
    /// `connections` is taken as `connections`). Default 1: the load generator runs on the
    /// same CPUs as the server it measures, so it should take as little of them as it can.
    pub threads: usize,
    /// Stop starting new requests after this long. Default none.
    pub duration: Option<Duration>,
    /// Stop after this many requests in total, over all connections; exact. Default none.
    /// [`run`](crate::run) needs this or `duration`; [`start`](crate::start) can also be
    /// bounded by [`Running::stop`](crate::Running::stop) alone.
    pub max_requests: Option<u64>,
    /// Reuse each connection for many requests (the default), or open a new connection per
    /// request and send `Connection: close`.
    pub keep_alive: bool,
    /// `GET` (the default) or `POST` with `body`.
    pub method: Method,
    /// Request target, starting with `/`; may include a query. Default `/`.
    pub path: String,
    /// The `POST` body, sent with `Content-Length` (and `Content-Type: application/json` when
    /// it starts with `{` or `[`). Must be empty for `GET`.
    pub body: Vec<u8>,
    /// Time allowed for one request, from connecting (or reusing a connection) to the last
    /// byte of the response; a request that takes longer is a timeout. Default 10 s.
    pub timeout: Duration,
    /// Retry a `GET` once on a new connection when a reused keep-alive connection turns out
    /// closed by the server before any byte of the response arrived. Default true; never
    /// applies to `POST`. See the crate docs, "Idle keep-alive close", for why this is safe.
    pub retry_idle_close: bool,
}

impl Spec {
    /// A keep-alive `GET /` on 10 connections with a 10 s timeout and no bounds yet.
    pub fn new(addr: SocketAddr) -> Spec {
        Spec {
            addr,
            connections: 10,
            threads: 1,
            duration: None,
            max_requests: None,
            keep_alive: true,
            method: Method::Get,
            path: "/".to_string(),
            body: Vec::new(),
            timeout: Duration::from_secs(10),
            retry_idle_close: true,
        }
    }

    /// Checks everything that does not need a bound (`run` also needs one).
    pub(crate) fn check(&self) -> io::Result<()> {
        check_loopback(self.addr)?;
        check_path(&self.path)?;
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(invalid(format!(
                "connections must be 1 to {MAX_CONNECTIONS}, not {}",
                self.connections
            )));
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(invalid(format!(
                "threads must be 1 to {MAX_THREADS}, not {}",
                self.threads
            )));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout must be more than zero".into()));
        }
        if self.method == Method::Get && !self.body.is_empty() {
            return Err(invalid("a GET request cannot have a body".into()));
        }
        Ok(())
    }
}

/// Refuses any address that is not loopback.
///
/// # Errors
///
/// `InvalidInput` naming the address.
pub(crate) fn check_loopback(addr: SocketAddr) -> io::Result<()> {
    // `to_canonical` turns ::ffff:127.0.0.1 into 127.0.0.1.
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(invalid(format!(
            "refusing to load {addr}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
        )))
    }
}

/// Refuses a request target that is not `/...` or that would break the request line.
pub(crate) fn check_path(path: &str) -> io::Result<()> {
    if !path.starts_with('/') {
        return Err(invalid(format!("path must start with '/': {path:?}")));
    }
    if path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(invalid(format!(
            "path must be printable ASCII without spaces (percent-encode the rest): {path:?}"
        )));
    }
    Ok(())
}

/// An `InvalidInput` error.
fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_loopback_is_allowed() {
        for ok in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            check_loopback(addr(ok)).unwrap();
        }
        for no in [
            "10.0.0.1:80",
            "0.0.0.0:80",
            "[::]:80",
            "[2001:db8::1]:80",
            "192.168.1.1:80",
        ] {
            let e = check_loopback(addr(no)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("only loopback"), "{e}");
        }
    }

    #[test]
    fn spec_checks() {
        let base = Spec::new(addr("127.0.0.1:1"));
        base.check().unwrap();
        let bad = [
            Spec {
                connections: 0,
                ..base.clone()
            },
            Spec {
                connections: MAX_CONNECTIONS + 1,
                ..base.clone()
            },
            Spec {
                timeout: Duration::ZERO,
                ..base.clone()
            },
            Spec {
                body: b"x".to_vec(),
                ..base.clone()
            },
            Spec {
                path: "x".into(),
                ..base.clone()
            },
            Spec {
                path: "/a b".into(),
                ..base.clone()
            },
            Spec {
                path: "/a\r\nX: y".into(),
                ..base.clone()
            },
            Spec {
                path: "/caf\u{e9}".into(),
                ..base.clone()
            },
            Spec {
                addr: addr("10.1.1.1:80"),
                ..base.clone()
            },
        ];
        for spec in bad {
            assert_eq!(
                spec.check().unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{spec:?}"
            );
        }
        Spec {
            method: Method::Post,
            body: b"x".to_vec(),
            ..base
        }
        .check()
        .unwrap();
    }
}
