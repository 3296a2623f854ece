//! Hostile clients, for the tests and the `hostile` benchmark section: a fixed number of
//! connections to one address that never send a complete request. Loopback TCP and unix
//! sockets only, bounded in count and in reconnect rate.
//!
//! Half of them (`idle`) send nothing at all; the others (`slowloris`) trickle one byte of a
//! request head that never ends (`GET /healthz HTTP/1.1\r\nX-Slow: aaaa…`) per connection every
//! [`ROUND`]. A connection the server closes (or answers) is opened again on a later round, as
//! an attacker who wants to keep the server's slots would: at most [`RECONNECTS_PER_ROUND`]
//! a round, so the pressure is steady and bounded (at most 2,500 connects a second).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most connections one [`Attack`] holds.
pub const MAX_HOSTILE: usize = 4096;
/// One pass over the connections: a slowloris byte each, reconnects, closed ones noticed.
pub const ROUND: Duration = Duration::from_millis(100);
/// Most connections opened in one round.
pub const RECONNECTS_PER_ROUND: usize = 250;

/// What the attack connects to.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn open(target: &Target) -> io::Result<Conn> {
        let conn = match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, Duration::from_millis(500))?;
                s.set_nonblocking(true)?;
                Conn::Tcp(s)
            }
            Target::Unix(path) => {
                // Non-blocking: a unix connect blocks while the backlog is full.
                let connect = async { smol::Async::<UnixStream>::connect(path).await.map(Some) };
                let timeout = async {
                    smol::Timer::after(Duration::from_millis(500)).await;
                    Ok(None)
                };
                match smol::block_on(smol::future::or(connect, timeout))? {
                    Some(s) => {
                        let s = s.into_inner()?;
                        s.set_nonblocking(true)?;
                        Conn::Unix(s)
                    }
                    None => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
        };
        Ok(conn)
    }

    /// Whether the server has closed it (or answered: it is done with it either way).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        let read = match self {
            Conn::Tcp(s) => s.read(&mut buf),
            Conn::Unix(s) => s.read(&mut buf),
        };
        !matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends one byte: whether it went, or `None` if the connection is gone.
    fn trickle(&mut self, byte: u8) -> Option<bool> {
        let written = match self {
            Conn::Tcp(s) => s.write(&[byte]),
            Conn::Unix(s) => s.write(&[byte]),
        };
        match written {
            Ok(n) => Some(n == 1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(false),
            Err(_) => None,
        }
    }
}

/// The slowloris request head, byte `at`: a header line that never ends.
fn slow_byte(at: usize) -> u8 {
    const PREFIX: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    PREFIX.get(at).copied().unwrap_or(b'a')
}

/// Hostile connections held in the background until [`Attack::stop`] (or drop).
pub struct Attack {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    holding: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Attack {
    /// Starts holding `idle` silent and `slowloris` trickling connections to `target`.
    ///
    /// # Errors
    /// A target that is not on loopback, or more than [`MAX_HOSTILE`] connections.
    pub fn start(target: Target, idle: usize, slowloris: usize) -> io::Result<Attack> {
        if let Target::Tcp(addr) = &target {
            if !addr.ip().is_loopback() {
                return Err(io::Error::other(format!(
                    "{addr} is not a loopback address"
                )));
            }
        }
        if idle + slowloris > MAX_HOSTILE {
            return Err(io::Error::other(format!(
                "at most {MAX_HOSTILE} hostile connections"
            )));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let holding = Arc::new(AtomicUsize::new(0));
        let (s, o, h) = (stop.clone(), opened.clone(), holding.clone());
        let thread = std::thread::Builder::new()
            .name("hostile".into())
            .spawn(move || run(&target, idle, slowloris, &s, &o, &h))?;
        Ok(Attack {
            stop,
            opened,
            holding,
            thread: Some(thread),
        })
    }

    /// Connections opened so far (the first ones and every reconnect).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Connections open at the end of the last round, as far as this side knows.
    pub fn holding(&self) -> usize {
        self.holding.load(Ordering::Relaxed)
    }

    /// Closes every connection and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(
    target: &Target,
    idle: usize,
    slowloris: usize,
    stop: &AtomicBool,
    opened: &AtomicU64,
    holding: &AtomicUsize,
) {
    // (connection, bytes of the slowloris head sent)
    let mut conns: Vec<Option<(Conn, usize)>> = (0..idle + slowloris).map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        let mut budget = RECONNECTS_PER_ROUND;
        for (i, slot) in conns.iter_mut().enumerate() {
            if slot.as_mut().is_some_and(|(c, _)| c.closed()) {
                *slot = None;
            }
            if slot.is_none() && budget > 0 {
                budget -= 1;
                if let Ok(c) = Conn::open(target) {
                    opened.fetch_add(1, Ordering::Relaxed);
                    *slot = Some((c, 0));
                }
            }
            if i >= idle {
                if let Some((c, sent)) = slot {
                    match c.trickle(slow_byte(*sent)) {
                        Some(true) => *sent += 1,
                        Some(false) => {}
                        None => *slot = None,
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        holding.store(conns.iter().flatten().count(), Ordering::Relaxed);
        // Paced, not waiting for a condition: one byte per connection per round.
        if let Some(rest) = ROUND.checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}
