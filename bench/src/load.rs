//! Running the load: a few event-loop threads, each driving its share of the connections.
//!
//! # Implementation
//!
//! The connections are dealt round-robin to [`Spec::threads`] threads, each running a smol
//! executor with one task per connection (as wrk does): 64 connections cost 64 small tasks,
//! not 64 threads for the scheduler to juggle on the same CPUs as the server under test.
//! Each connection task loops: take a ticket from the shared budget (`max_requests`, the
//! `duration` deadline and the stop flag all end the loop), run one request under one timer
//! for its deadline, classify it, and count it in the connection's own [`Report`] behind a
//! mutex that only [`Running::snapshot`] ever contends for. A request in flight when the run
//! is stopped is finished (bounded by the timeout) and counted, never abandoned.
//!
//! Responses are parsed by the same blocking parser as [`get`](crate::get), over the bytes
//! received so far: when it runs out of bytes before the connection ended it reports
//! `WouldBlock`, the task reads more and parses again (responses here are a few hundred bytes,
//! so the re-parse costs nothing next to a system call).

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use smol::future::FutureExt as _;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::net::TcpStream;
use smol::{LocalExecutor, Timer};

use crate::http::{self, Parsed, Sink};
use crate::report::Outcome;
use crate::{Method, Report, Spec};

/// How often [`Running::wait_for_ok`] looks at the counts.
const POLL: Duration = Duration::from_millis(2);
/// Longest wait for the server's FIN after it announced `Connection: close`.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Bytes read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;

/// Runs `spec` to the end and returns the report. Blocks.
///
/// # Errors
///
/// `InvalidInput` when the spec is invalid (see [`Spec`]: a non-loopback address, no
/// `duration` and no `max_requests`, ...), or the error of spawning a thread. Failed requests
/// are not errors: they are counted in the report.
pub fn run(spec: &Spec) -> io::Result<Report> {
    if spec.duration.is_none() && spec.max_requests.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "run needs a duration or max_requests (or use start and stop)",
        ));
    }
    Ok(start(spec.clone())?.wait())
}

/// Starts `spec` in the background and returns at once.
///
/// The load runs until `duration` or `max_requests` (if set) or [`Running::stop`], whichever
/// comes first. Dropping the [`Running`] stops it too.
///
/// # Errors
///
/// As [`run`], except that an unbounded spec is allowed.
pub fn start(spec: Spec) -> io::Result<Running> {
    spec.check()?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        request: http::request_bytes(
            spec.method,
            spec.addr,
            &spec.path,
            &spec.body,
            !spec.keep_alive,
        ),
        end: spec.duration.map(|d| started + d),
        stop: Stop::new(),
        issued: AtomicU64::new(0),
        spec,
    });
    let reports: Vec<Arc<Mutex<Report>>> = (0..shared.spec.connections)
        .map(|_| Arc::new(Mutex::new(Report::default())))
        .collect();
    let threads = shared.spec.threads.min(shared.spec.connections);
    let mut running = Running {
        shared: Arc::clone(&shared),
        threads: Vec::with_capacity(threads),
        reports: reports.clone(),
        started,
    };
    for t in 0..threads {
        // Connections t, t + threads, t + 2 * threads, ...
        let mine: Vec<Arc<Mutex<Report>>> =
            reports.iter().skip(t).step_by(threads).cloned().collect();
        let thread_shared = Arc::clone(&shared);
        // On error, dropping `running` stops and joins the threads already started.
        let thread = thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || drive(&thread_shared, mine, started))?;
        running.threads.push(thread);
    }
    Ok(running)
}

/// One thread: runs its connections' tasks until all have ended.
fn drive(shared: &Shared, reports: Vec<Arc<Mutex<Report>>>, started: Instant) {
    let ex = LocalExecutor::new();
    let tasks: Vec<_> = reports
        .iter()
        .map(|report| ex.spawn(connection(shared, report, started)))
        .collect();
    smol::block_on(ex.run(async {
        for task in tasks {
            task.await;
        }
    }));
}
/// A handle that stops a run: no new request starts once it is triggered. Cheap to clone and
/// to send to another thread.
/// Get one from [`Running::stop_handle`].
#[derive(Clone, Debug)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// A handle not yet triggered.
    pub(crate) fn new() -> Stop {
        Stop(Arc::new(AtomicBool::new(false)))
    }

    /// Stops the run: requests in flight finish, no new one starts.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Stop::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A load running in the background, from [`start`]. Dropping it stops it and waits for the
/// connection threads.
#[derive(Debug)]
pub struct Running {
    /// What the threads share.
    shared: Arc<Shared>,
    /// One per connection; empty once joined.
    threads: Vec<JoinHandle<()>>,
    /// Each thread's counts, index for index.
    reports: Vec<Arc<Mutex<Report>>>,
    /// When the run started.
    started: Instant,
}

impl Running {
    /// Stops the run (requests in flight finish, which takes at most the timeout), waits for
    /// every connection thread and returns the final report.
    ///
    /// # Panics
    ///
    /// If a connection thread panicked (a bug), with its panic.
    pub fn stop(self) -> Report {
        self.shared.stop.trigger();
        self.wait()
    }

    /// Waits until the run ends by itself (`duration`, `max_requests`, or a [`Stop`] handle)
    /// and returns the final report. Never returns for an unbounded spec nobody stops.
    ///
    /// # Panics
    ///
    /// If a connection thread panicked (a bug), with its panic.
    pub fn wait(mut self) -> Report {
        let mut panic = None;
        for thread in std::mem::take(&mut self.threads) {
            if let Err(payload) = thread.join() {
                panic = Some(payload);
            }
        }
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
        self.snapshot()
    }

    /// The counts so far, with `elapsed` up to now (or to the end, once the run is over).
    pub fn snapshot(&self) -> Report {
        let mut total = Report::default();
        for report in &self.reports {
            total.merge(&lock(report));
        }
        // Each thread stamps its `elapsed` when it ends; until all have, the run is going on.
        if !self.is_finished() {
            total.elapsed = self.started.elapsed();
        }
        total
    }

    /// Requests answered with a 2xx so far; cheaper than a [`snapshot`](Running::snapshot).
    pub fn ok_so_far(&self) -> u64 {
        self.reports.iter().map(|r| lock(r).ok).sum()
    }

    /// Waits until at least `n` requests got a 2xx, or the run ended, or `timeout` passed.
    /// Returns whether `n` was reached. For tests: "load is flowing, now restart".
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ok_so_far() >= n {
                return true;
            }
            if self.is_finished() || Instant::now() >= deadline {
                return self.ok_so_far() >= n;
            }
            thread::sleep(POLL);
        }
    }

    /// Whether every connection thread has ended.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// A handle that stops this run from anywhere, e.g. another thread.
    pub fn stop_handle(&self) -> Stop {
        self.shared.stop.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.stop.trigger();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    /// The load.
    spec: Spec,
    /// The request, written as is for every request.
    request: Vec<u8>,
    /// When no new request may start (`duration`).
    end: Option<Instant>,
    /// Set to stop the run.
    stop: Stop,
    /// Requests started, for `max_requests`.
    issued: AtomicU64,
}

impl Shared {
    /// Takes a ticket for one more request, or returns false when the run is over.
    fn next(&self) -> bool {
        if self.stop.is_triggered() || self.end.is_some_and(|end| Instant::now() >= end) {
            return false;
        }
        match self.spec.max_requests {
            // Exact: the counter may pass `max`, but only tickets below it are used.
            Some(max) => self.issued.fetch_add(1, Ordering::Relaxed) < max,
            None => true,
        }
    }

    /// Whether an idle-close failure may be retried (see the crate docs).
    fn may_retry(&self) -> bool {
        self.spec.retry_idle_close && self.spec.method == Method::Get
    }
}

/// A connection and the bytes received on it not yet parsed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server closed its side.
    eof: bool,
}

/// One connection: requests until the run is over.
async fn connection(shared: &Shared, report: &Mutex<Report>, started: Instant) {
    let mut conn: Option<Conn> = None;
    while shared.next() {
        let start = Instant::now();
        let deadline = start + shared.spec.timeout;
        let mut retried = false;
        let mut fresh;
        let result = loop {
            let reused = conn.is_some();
            fresh = !reused;
            match exchange(shared, &mut conn, deadline).await {
                Ok(parsed) => break Ok(parsed),
                Err(failure) => {
                    let outcome = failure.classify(reused);
                    if outcome == Outcome::IdleClose && !retried && shared.may_retry() {
                        retried = true;
                        continue;
                    }
                    break Err((outcome, failure));
                }
            }
        };
        count(&mut lock(report), &result, start.elapsed(), fresh, retried);
        if let Ok(parsed) = result {
            if parsed.close || !shared.spec.keep_alive {
                if let Some(closing) = conn.take() {
                    if parsed.announced_close && !closing.eof {
                        await_close(closing, shared.spec.timeout).await;
                    }
                }
            }
        }
    }
    lock(report).elapsed = started.elapsed();
}

/// Counts one request's result; `fresh` says it opened its connection.
fn count(
    counts: &mut Report,
    result: &Result<Parsed, (Outcome, Failure)>,
    latency: Duration,
    fresh: bool,
    retried: bool,
) {
    match result {
        Ok(parsed) => {
            if let (true, Some(worker)) = (fresh, &parsed.worker) {
                counts.record_connection(worker);
            }
            counts.record(
                Outcome::Status(parsed.status),
                latency,
                parsed.worker.as_deref(),
                retried,
            )
        }
        Err((outcome, failure)) => {
            counts.record(*outcome, latency, None, retried);
            counts.sample_error(&failure.to_string());
        }
    }
}

/// Sends the request on `conn` (connecting first if it is `None`) and reads the response, all
/// by `deadline`. On failure the connection is dropped.
async fn exchange(
    shared: &Shared,
    conn: &mut Option<Conn>,
    deadline: Instant,
) -> Result<Parsed, Failure> {
    // Where the exchange got to, for the failure if the deadline passes first.
    let at = Cell::new((Phase::Connect, false));
    let result = async {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(connect(shared.spec.addr).await?),
        };
        at.set((Phase::Write, false));
        c.stream
            .write_all(&shared.request)
            .await
            .map_err(|error| Failure {
                phase: Phase::Write,
                error,
                started: false,
            })?;
        at.set((Phase::Read, false));
        read_response(c, &at).await
    }
    .or(async {
        Timer::at(deadline).await;
        let (phase, started) = at.get();
        Err(Failure {
            phase,
            error: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            started,
        })
    })
    .await;
    if result.is_err() {
        *conn = None;
    }
    result
}

/// Reads until the bytes received hold one complete response, and returns it; leaves what
/// follows it in the buffer.
async fn read_response(c: &mut Conn, at: &Cell<(Phase, bool)>) -> Result<Parsed, Failure> {
    let failure = |error, started| Failure {
        phase: Phase::Read,
        error,
        started,
    };
    loop {
        let mut received = Received {
            buf: &c.buf,
            pos: 0,
            eof: c.eof,
        };
        match http::read_response(&mut received, &mut Sink::Discard) {
            Ok(parsed) => {
                let used = received.pos;
                c.buf.drain(..used);
                return Ok(parsed);
            }
            Err(e) if e.error.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(failure(e.error, e.started)),
        }
        let started = !c.buf.is_empty();
        at.set((Phase::Read, started));
        let len = c.buf.len();
        c.buf.resize(len + READ_SIZE, 0);
        let n = c.stream.read(&mut c.buf[len..]).await;
        c.buf.truncate(len + *n.as_ref().unwrap_or(&0));
        match n {
            Ok(0) => c.eof = true,
            Ok(_) => {}
            Err(error) => return Err(failure(error, started)),
        }
    }
}

/// The bytes received so far, as a reader that says `WouldBlock` where they end, or EOF if
/// the server has closed.
struct Received<'a> {
    buf: &'a [u8],
    pos: usize,
    eof: bool,
}

impl Read for Received<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Received<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() && !self.eof {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(rest)
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// Opens a connection.
async fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
    let failure = |error| Failure {
        phase: Phase::Connect,
        error,
        started: false,
    };
    let stream = TcpStream::connect(addr).await.map_err(failure)?;
    stream.set_nodelay(true).map_err(failure)?;
    Ok(Conn {
        stream,
        buf: Vec::with_capacity(READ_SIZE),
        eof: false,
    })
}

/// After a response with `Connection: close`, waits (briefly) for the server's FIN before
/// dropping the socket, so that the server closes first and holds the TIME_WAIT state: with a
/// new connection per request, TIME_WAIT sockets on our side would use up the ephemeral ports.
async fn await_close(mut conn: Conn, timeout: Duration) {
    let mut buf = [0; 512];
    let drain = async { while matches!(conn.stream.read(&mut buf).await, Ok(n) if n > 0) {} };
    drain
        .or(async {
            Timer::after(timeout.min(CLOSE_WAIT)).await;
        })
        .await;
}

/// Where in a request an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Opening the connection.
    Connect,
    /// Writing the request.
    Write,
    /// Reading the response.
    Read,
}

/// A request that got no complete response.
#[derive(Debug)]
struct Failure {
    /// Where it failed.
    phase: Phase,
    /// Why.
    error: io::Error,
    /// At least one byte of the response had arrived.
    started: bool,
}

impl Failure {
    /// The outcome this failure is counted as; `reused` says the connection had already
    /// carried a complete exchange.
    fn classify(&self, reused: bool) -> Outcome {
        use io::ErrorKind::*;
        if self.phase == Phase::Connect {
            return Outcome::ConnectError;
        }
        let kind = self.error.kind();
        let closed = matches!(kind, ConnectionReset | ConnectionAborted | BrokenPipe);
        match kind {
            TimedOut => Outcome::Timeout,
            InvalidData => Outcome::BadResponse,
            _ if (closed || kind == UnexpectedEof) && reused && !self.started => Outcome::IdleClose,
            _ if closed => Outcome::Reset,
            UnexpectedEof if self.started => Outcome::EofMidResponse,
            UnexpectedEof => Outcome::EofBeforeResponse,
            _ => Outcome::OtherError,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match self.phase {
            Phase::Connect => "connect",
            Phase::Write => "write",
            Phase::Read => "read",
        };
        write!(f, "{phase}: {}", self.error)
    }
}

/// Locks a report; a poisoned lock (a panicked thread) still has valid counts.
fn lock(report: &Mutex<Report>) -> MutexGuard<'_, Report> {
    report.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(phase: Phase, kind: io::ErrorKind, started: bool) -> Failure {
        Failure {
            phase,
            error: kind.into(),
            started,
        }
    }

    #[test]
    fn classification() {
        use Phase::*;
        use io::ErrorKind::*;
        let cases = [
            (
                Connect,
                ConnectionRefused,
                false,
                false,
                Outcome::ConnectError,
            ),
            (Connect, TimedOut, false, false, Outcome::ConnectError),
            (Read, TimedOut, true, false, Outcome::Timeout),
            (Read, TimedOut, false, true, Outcome::Timeout),
            (Read, InvalidData, true, true, Outcome::BadResponse),
            (Read, UnexpectedEof, false, true, Outcome::IdleClose),
            (Read, ConnectionReset, false, true, Outcome::IdleClose),
            (Write, BrokenPipe, false, true, Outcome::IdleClose),
            (
                Read,
                UnexpectedEof,
                false,
                false,
                Outcome::EofBeforeResponse,
            ),
            (Read, UnexpectedEof, true, true, Outcome::EofMidResponse),
            (Read, ConnectionReset, true, true, Outcome::Reset),
            (Read, ConnectionReset, false, false, Outcome::Reset),
            (Write, BrokenPipe, false, false, Outcome::Reset),
            (Read, OutOfMemory, true, true, Outcome::OtherError),
        ];
        for (phase, kind, started, reused, want) in cases {
            assert_eq!(
                failure(phase, kind, started).classify(reused),
                want,
                "{phase:?} {kind:?} started={started} reused={reused}"
            );
        }
    }

    #[test]
    fn budget_is_exact_and_stop_ends_it() {
        let mut spec = Spec::new("127.0.0.1:1".parse().unwrap());
        spec.max_requests = Some(3);
        let shared = Shared {
            request: Vec::new(),
            end: None,
            stop: Stop::new(),
            issued: AtomicU64::new(0),
            spec,
        };
        assert!((0..3).all(|_| shared.next()));
        assert!(!shared.next());
        assert!(!shared.next());
        let unbounded = Shared {
            spec: Spec::new("127.0.0.1:1".parse().unwrap()),
            ..shared
        };
        assert!(unbounded.next());
        unbounded.stop.trigger();
        assert!(!unbounded.next());
    }
}
