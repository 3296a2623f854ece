//! The example shop against hostile and strict HTTP clients (issue 12):
//!
//! - clients that take connections and send nothing (item 4): real requests
//!   must keep being served. A worker's in-flight limit counts idle
//!   connections, so without a first-byte deadline and eviction at the
//!   limit, 512 silent sockets locked a 2-worker shop out for the 30 s
//!   keep-alive idle time, again and again for a client that reopens them;
//! - clients that say `Connection: close` (item 19): the response must say
//!   it back (RFC 9112 §9.6), or a client such as wrk reuses the connection
//!   the shop then closes.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::util::*;

/// How long a probe may wait for its answer. Far above a probe's latency on
/// a loaded machine (milliseconds), far below how long the silent sockets
/// held the shop before the fix (30 s, the keep-alive idle time).
const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// `n` connections that never send a byte, each reopened as soon as the
/// server closes it, on a thread of their own until dropped.
struct Silent {
    stop: Arc<AtomicBool>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    /// Connections the server closed (and that were reopened).
    closed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Silent {
    fn hold(addr: SocketAddr, n: usize) -> Silent {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, open, closed) = (stop.clone(), open.clone(), closed.clone());
            move || {
                let connect = || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok();
                let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| connect()).collect();
                let tick = Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                while !stop.load(Ordering::Relaxed) {
                    for sock in &mut socks {
                        if sock.is_none() {
                            *sock = connect();
                        }
                    }
                    open.store(socks.iter().flatten().count(), Ordering::Relaxed);
                    // Readable means closed: the shop sends nothing else.
                    let mut fds: Vec<PollFd<'_>> = socks
                        .iter()
                        .flatten()
                        .map(|s| PollFd::new(s, PollFlags::IN))
                        .collect();
                    let _ = rustix::event::poll(&mut fds, Some(&tick));
                    let gone: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
                    drop(fds);
                    let mut gone = gone.into_iter();
                    for sock in &mut socks {
                        if sock.is_some() && gone.next() == Some(true) {
                            let mut buf = [0u8; 64];
                            let _ = sock.as_mut().map(|s| s.read(&mut buf));
                            *sock = None;
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Silent {
            stop,
            open,
            closed,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET /healthz` on a new connection, answered within [`PROBE_LIMIT`].
fn probe(addr: SocketAddr) -> Result<u16, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, PROBE_LIMIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PROBE_LIMIT))
        .map_err(|e| e.to_string())?;
    s.write_all(&request("GET", "/healthz", b"", true))
        .map_err(|e| format!("write: {e}"))?;
    read_response(&mut s)
        .map(|r| r.status)
        .map_err(|e| format!("no answer: {e}"))
}

#[test]
fn six_hundred_silent_connections_do_not_lock_real_clients_out_of_the_shop() {
    let cluster = Cluster::shop("silent", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let silent = Silent::hold(addr, 600);
    wait_for("600 silent connections open", || {
        (silent.open.load(Ordering::Relaxed) == 600).then_some(())
    });
    // Both workers hold all they may (InFlight::DEFAULT_LIMIT each), the
    // rest wait in the accept queue.
    wait_for("both workers at their in-flight limit", || {
        let status = cluster.status_json();
        let workers = status["workers"].as_array()?;
        workers
            .iter()
            .all(|w| w["active"].as_u64() >= Some(256))
            .then_some(())
    });
    for i in 0..20 {
        match probe(addr) {
            Ok(200) => {}
            other => panic!(
                "probe {i} while 600 silent connections are held: {other:?} ({} closed by the shop so far)",
                silent.closed.load(Ordering::Relaxed)
            ),
        }
    }
    println!(
        "20 probes answered; the shop closed {} silent connections",
        silent.closed.load(Ordering::Relaxed)
    );
}

/// Sends `req` on a new connection; the response, and whether the shop then
/// closed the connection (end of file rather than more bytes or a timeout).
fn one_exchange(addr: SocketAddr, req: &[u8]) -> (RawResponse, bool) {
    let mut s = connect(addr);
    s.write_all(req).unwrap();
    let response = read_response(&mut s).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let closed = matches!(s.read(&mut [0u8; 1]), Ok(0));
    (response, closed)
}

#[test]
fn connection_close_is_said_back_and_http_1_0_is_refused_with_it() {
    let cluster = Cluster::shop("conn-close", 1, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();

    let (res, closed) = one_exchange(addr, &request("GET", "/products/7", b"", true));
    assert_eq!(res.status, 200);
    assert_eq!(res.header("connection"), Some("close"), "{res:?}");
    assert!(closed, "the connection is closed after it");

    // A token list and a POST with a body: the same.
    let mut post = request("POST", "/checkout", CART, false);
    let at = post.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    post.splice(
        at + 2..at + 2,
        b"Connection: keep-alive, Close\r\n".iter().copied(),
    );
    let (res, closed) = one_exchange(addr, &post);
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("connection"), Some("close"), "{res:?}");
    assert!(closed);

    // Without it, the connection stays open and the response says nothing.
    let mut s = connect(addr);
    for _ in 0..2 {
        s.write_all(&request("GET", "/healthz", b"", false))
            .unwrap();
        let res = read_response(&mut s).unwrap();
        assert_eq!((res.status, res.header("connection")), (200, None));
    }

    // HTTP/1.0 (async-h1 parses only 1.1): a 505 that says it closes,
    // rather than a connection closed without a word.
    let (res, closed) = one_exchange(addr, b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
    assert_eq!(res.status, 505);
    assert_eq!(res.header("connection"), Some("close"), "{res:?}");
    assert_eq!(res.body, br#"{"error":"HTTP/1.1 is required here"}"#);
    assert!(closed);
}
