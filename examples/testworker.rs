//! testworker: a worker with scripted (mis)behaviour, for clusterd's
//! integration tests.
//!
//! ```text
//! testworker MODE [ARG]
//! ```
//!
//! Modes:
//!
//! - `ok`: a well-behaved worker. Serves every listener clusterd passes with a
//!   tiny HTTP/1.1 responder, reports Ready, reports stats, and drains like
//!   the shop: on DRAIN (or clusterd going away, or SIGTERM) it closes the
//!   listeners at once, closes idle keep-alive connections, answers requests
//!   in flight with `Connection: close`, reports Drained and exits 0.
//! - `ignore-drain`: like `ok`, but ignores DRAIN (and SIGTERM) forever:
//!   keeps accepting and serving until SIGKILL.
//! - `never-ready`: takes the listeners but never accepts and never reports
//!   Ready; drains (Drained, exit 0) when told to.
//! - `exit-before-ready`: exits 1 right after receiving Hello.
//! - `close-ipc`: receives Hello, closes the IPC channel (fd 3) without
//!   reporting Ready, then sleeps (until killed).
//! - `garbage`: sends clusterd eight records of random bytes (including one
//!   longer than the IPC record limit) that are never a valid message, then
//!   behaves as `ok`.
//! - `wrong-version`: sends a Ready record whose header says protocol version
//!   99 instead of Ready, then serves as `ok` does (so it never becomes
//!   ready in clusterd's eyes).
//! - `ready-twice`: reports Ready twice, then behaves as `ok`.
//! - `drained-early`: reports Ready, then Drained before any DRAIN, then
//!   behaves as `ok` (and reports Drained again when really drained).
//! - `empty-record`: sends clusterd an empty (zero-length) record, then
//!   behaves as `ok` (clusterd must not take it for the channel closing).
//! - `crash-after MS`: behaves as `ok`, but exits with status 3 MS
//!   milliseconds after reporting Ready.
//!
//! Options, after the mode (for bad deploys that fail after READY):
//!
//! - `--ready-delay MS`: waits MS milliseconds before reporting Ready.
//! - `--crash-on-request N`: exits with status 3 when the Nth request
//!   arrives, before answering it.
//! - `--fail-when PATH`: exits with status 3 as soon as PATH exists (looked
//!   at every 50 ms from its start): a generation that starts failing later.
//! - `--fail-requests`: answers every request `500 Internal Server Error`
//!   and counts it as failed in its stats.
//! - `--hang-when PATH`: once PATH holds this worker's pid, blocks its
//!   executor for good (a CPU loop would do the same to the watchdog). A
//!   SIGABRT then writes `testworker: worker ID: SIGABRT, dumping stacks` and
//!   returns, as a runtime that dumps its stacks would.
//! - `--leak-when PATH`: once PATH holds this worker's pid, allocates and
//!   touches 50 MiB a second (5 MiB every 100 ms), never freed.
//!
//! With `watchdog` set, every mode heartbeats (`Worker::watchdog`) from its
//! executor.
//!
//! The responder answers every request on a keep-alive connection with
//! `200 OK`, headers `X-Worker: ID`, `X-Pid: PID`, `X-Generation: GEN` and the
//! body `worker ID`. `GET /sleep/MS` waits MS milliseconds first (a request
//! in flight, for drain tests). Request bodies (`Content-Length`) are read
//! and discarded; `Connection: close` and HTTP/1.0 close after the response.
//!
//! Run without clusterd, it listens on `$TESTWORKER_LISTEN` (default
//! `127.0.0.1:0`, printed at start).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use clusterd::fdpass;
use clusterd::proto::{self, FromWorker};
use clusterd::worker::{Accepted, Acceptor, Idle, InFlight, Listener, Shutdown, Stats, Worker};
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::{LocalExecutor, Timer};

/// Writes one line to stderr in a single `write`, so it never interleaves
/// with clusterd's log lines or another worker's (`eprintln!` may write a
/// line in several pieces).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

const USAGE: &str = "usage: testworker ok|ignore-drain|never-ready|exit-before-ready|close-ipc|garbage|wrong-version|ready-twice|drained-early|empty-record|crash-after MS [--ready-delay MS] [--crash-on-request N] [--fail-when PATH] [--fail-requests] [--hang-when PATH] [--leak-when PATH]";

/// Requests received so far, for `--crash-on-request`.
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Largest request head the responder reads.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    IgnoreDrain,
    NeverReady,
    ExitBeforeReady,
    CloseIpc,
    Garbage,
    WrongVersion,
    ReadyTwice,
    EmptyRecord,
    DrainedEarly,
    CrashAfter(Duration),
}

/// The options after the mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Opts {
    ready_delay: Option<Duration>,
    crash_on_request: Option<u64>,
    fail_when: Option<std::path::PathBuf>,
    fail_requests: bool,
    hang_when: Option<std::path::PathBuf>,
    leak_when: Option<std::path::PathBuf>,
}

fn parse_opts(args: &[String]) -> Result<(Mode, Opts), String> {
    let split = args
        .iter()
        .position(|a| a.starts_with("--"))
        .unwrap_or(args.len());
    let mode = parse(&args[..split])?;
    let mut opts = Opts::default();
    let mut rest = args[split..].iter();
    while let Some(name) = rest.next() {
        if name == "--fail-requests" {
            opts.fail_requests = true;
            continue;
        }
        let value = rest.next().ok_or_else(|| format!("{name} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name}: {value:?} is not a number"))
        };
        match name.as_str() {
            "--ready-delay" => opts.ready_delay = Some(Duration::from_millis(number()?)),
            "--crash-on-request" => opts.crash_on_request = Some(number()?),
            "--fail-when" => opts.fail_when = Some(value.into()),
            "--hang-when" => opts.hang_when = Some(value.into()),
            "--leak-when" => opts.leak_when = Some(value.into()),
            _ => return Err(format!("unknown option {name:?}")),
        }
    }
    Ok((mode, opts))
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(match args[..] {
        ["ok"] => Mode::Ok,
        ["ignore-drain"] => Mode::IgnoreDrain,
        ["never-ready"] => Mode::NeverReady,
        ["exit-before-ready"] => Mode::ExitBeforeReady,
        ["close-ipc"] => Mode::CloseIpc,
        ["garbage"] => Mode::Garbage,
        ["wrong-version"] => Mode::WrongVersion,
        ["ready-twice"] => Mode::ReadyTwice,
        ["drained-early"] => Mode::DrainedEarly,
        ["empty-record"] => Mode::EmptyRecord,
        ["crash-after", ms] => {
            Mode::CrashAfter(Duration::from_millis(ms.parse().map_err(|_| {
                format!("crash-after: {ms:?} is not a number of milliseconds")
            })?))
        }
        _ => return Err(format!("unknown arguments {args:?}")),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, opts) = match parse_opts(&args) {
        Ok(parsed) => parsed,
        Err(why) => {
            say!("testworker: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match mode {
        Mode::CloseIpc => close_ipc(),
        mode => run(mode, opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("testworker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mode: Mode, opts: Opts) -> io::Result<()> {
    let listen = std::env::var("TESTWORKER_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let mut worker = Worker::connect(&[("http", &listen)])?;
    let (id, generation) = (worker.id(), worker.generation());
    let addresses: Vec<String> = worker
        .listeners()
        .iter()
        .map(|l| format!("{}={}", l.name, l.address))
        .collect();
    say!(
        "testworker: worker {id} gen {generation} pid {} mode {mode:?} listening on {}",
        std::process::id(),
        addresses.join(", ")
    );
    if mode == Mode::ExitBeforeReady {
        std::process::exit(1);
    }
    let mut names: Vec<String> = worker.listeners().iter().map(|l| l.name.clone()).collect();
    names.dedup();
    let listeners = names
        .iter()
        .map(|name| worker.take_listener(name))
        .collect::<io::Result<Vec<Listener>>>()?;

    let in_flight = InFlight::default();
    let stats = worker.stats();
    stats.track(&in_flight);
    let shutdown = worker.shutdown();
    let info = Rc::new(Info {
        headers: format!(
            "X-Worker: {id}\r\nX-Pid: {}\r\nX-Generation: {generation}\r\n",
            std::process::id()
        ),
        body: format!("worker {id}"),
        stats,
        crash_on_request: opts.crash_on_request,
        fail_requests: opts.fail_requests,
        // `ignore-drain` serves as if the drain never came.
        shutdown: (mode != Mode::IgnoreDrain).then(|| shutdown.clone()),
    });

    // Accept loops spawn connection tasks, so they hold the executor too.
    let ex = Rc::new(LocalExecutor::new());
    ex.spawn(worker.watchdog()).detach();
    if let Some(path) = opts.hang_when.clone() {
        on_sigabrt_say_so(id);
        ex.spawn(async move {
            wait_for_pid(&path).await;
            say!("testworker: worker {id} hanging as asked (its executor blocks)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        })
        .detach();
    }
    if let Some(path) = opts.leak_when.clone() {
        ex.spawn(async move {
            wait_for_pid(&path).await;
            say!("testworker: worker {id} leaking 50 MiB/s as asked");
            let mut kept: Vec<Vec<u8>> = Vec::new();
            loop {
                kept.push(vec![1u8; 5 << 20]);
                Timer::after(Duration::from_millis(100)).await;
            }
        })
        .detach();
    }
    smol::block_on(ex.run(async {
        if let Some(delay) = opts.ready_delay {
            Timer::after(delay).await;
        }
        if let Some(path) = opts.fail_when.clone() {
            ex.spawn(async move {
                while !path.exists() {
                    Timer::after(Duration::from_millis(50)).await;
                }
                say!(
                    "testworker: worker {id} failing: {} exists (exit 3)",
                    path.display()
                );
                std::process::exit(3);
            })
            .detach();
        }
        match mode {
            Mode::NeverReady => {
                let reason = shutdown.clone().await;
                say!("testworker: worker {id} never ready, stopping ({reason})");
                drop(listeners);
                return worker.drained().await;
            }
            Mode::Garbage => {
                send_garbage(&worker)?;
                worker.ready().await?;
            }
            Mode::WrongVersion => {
                let mut record = proto::encode(&FromWorker::Ready);
                // The version is a one-byte varint while it is below 251.
                record[0] = 99;
                send_raw(&worker, &record)?;
            }
            Mode::EmptyRecord => {
                send_raw(&worker, &[])?;
                worker.ready().await?;
            }
            Mode::ReadyTwice => {
                worker.ready().await?;
                send_raw(&worker, &proto::encode(&FromWorker::Ready))?;
            }
            Mode::DrainedEarly => {
                worker.ready().await?;
                send_raw(&worker, &proto::encode(&FromWorker::Drained))?;
            }
            Mode::CrashAfter(after) => {
                worker.ready().await?;
                ex.spawn(async move {
                    Timer::after(after).await;
                    say!("testworker: worker {id} crashing as asked (exit 3)");
                    std::process::exit(3);
                })
                .detach();
            }
            _ => worker.ready().await?,
        }
        say!("testworker: worker {id} gen {generation} reported ready");

        let loops: Vec<_> = listeners
            .into_iter()
            .map(|listener| {
                let (ex2, info, in_flight) = (ex.clone(), info.clone(), in_flight.clone());
                let shutdown = info.shutdown.clone();
                ex.spawn(async move {
                    match shutdown {
                        Some(shutdown) => {
                            let mut acceptor = Acceptor::new(listener, in_flight, shutdown);
                            while let Some(conn) = acceptor.accept().await? {
                                ex2.spawn(serve(conn, info.clone())).detach();
                            }
                        }
                        None => loop {
                            let conn = listener.accept_limited(&in_flight).await?;
                            ex2.spawn(serve(conn, info.clone())).detach();
                        },
                    }
                    io::Result::Ok(())
                })
            })
            .collect();
        for accept_loop in loops {
            accept_loop.await?;
        }
        let reason = shutdown.reason().map_or("?".into(), |r| r.to_string());
        say!("testworker: worker {id} draining: {reason}");
        in_flight.wait_idle().await;
        worker.drained().await?;
        say!("testworker: worker {id} drained");
        Ok(())
    }))
}

/// `close-ipc`: receive Hello, close the channel, sleep until killed.
fn close_ipc() -> io::Result<()> {
    let raw = std::env::var(clusterd::worker::ENV_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd >= 0)
        .ok_or_else(|| io::Error::other("close-ipc needs clusterd (CLUSTERD_FD)"))?;
    // SAFETY: clusterd passed us this fd open, and in this mode nothing else
    // in the process (no `Worker`) refers to it, so we may own and close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let hello = fdpass::recv_with_fds(&fd, &mut buf, rustix::net::RecvFlags::empty())?;
    drop(hello.fds);
    drop(fd);
    say!("testworker: closed the IPC channel; sleeping");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Waits until `path` holds this process's pid (looked at every 50 ms): a
/// replacement of the same worker id is not affected.
async fn wait_for_pid(path: &std::path::Path) {
    let pid = std::process::id().to_string();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == pid) {
            return;
        }
        Timer::after(Duration::from_millis(50)).await;
    }
}

/// The message the SIGABRT handler writes (set once, before it is installed).
static ABRT_MESSAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

extern "C" fn on_sigabrt(_: libc::c_int) {
    if let Some(message) = ABRT_MESSAGE.get() {
        // SAFETY: write(2) is async-signal-safe; the buffer is a 'static
        // string that is never changed once set.
        unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
    }
}

/// Makes SIGABRT write a line and return, as a runtime dumping its stacks.
fn on_sigabrt_say_so(id: u32) {
    let _ = ABRT_MESSAGE.set(format!(
        "testworker: worker {id}: SIGABRT, dumping stacks\n"
    ));
    // SAFETY: an all-zero sigaction is valid (no flags, empty mask); the
    // handler only calls write(2), which is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigabrt as *const () as usize;
        libc::sigaction(libc::SIGABRT, &action, std::ptr::null_mut());
    }
}

fn send_raw(worker: &Worker, record: &[u8]) -> io::Result<()> {
    match worker.ipc_fd() {
        Some(fd) => fdpass::send_with_fds(fd, record, &[]),
        None => Ok(()), // standalone: nobody to send it to
    }
}

/// Records that are never a valid message: either a valid version header
/// followed by an unknown message tag, or a bad version byte, and one longer
/// than the record limit. Never empty (an empty record reads as end of file).
fn send_garbage(worker: &Worker) -> io::Result<()> {
    let mut seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..8 {
        let len = if i == 7 {
            proto::MAX_IPC_RECORD + 1
        } else {
            1 + (random() % 200) as usize
        };
        let mut record: Vec<u8> = (0..len).map(|_| random() as u8).collect();
        if i % 2 == 0 && len >= 2 {
            record[0] = 1; // our version...
            record[1] = 3 + (random() % 248) as u8; // ...and no such message (0..=2 exist)
        } else if record[0] == 1 {
            record[0] = 0; // version 0 does not exist
        }
        send_raw(worker, &record)?;
    }
    Ok(())
}

/// What the responder tells every client.
struct Info {
    /// `X-Worker`, `X-Pid`, `X-Generation` lines.
    headers: String,
    body: String,
    stats: Stats,
    /// `--crash-on-request N`.
    crash_on_request: Option<u64>,
    /// `--fail-requests`.
    fail_requests: bool,
    /// `None` in `ignore-drain`.
    shutdown: Option<Shutdown>,
}

/// One parsed request head.
struct Head {
    content_length: usize,
    close: bool,
    sleep: Option<Duration>,
}

async fn serve(conn: Accepted, info: Rc<Info>) {
    let Accepted {
        mut stream, guard, ..
    } = conn;
    let mut buf = Vec::new();
    loop {
        if buf.is_empty() {
            // Idle between requests: closed when the drain begins (after
            // the library's short grace for a request on its way).
            let idle = stream
                .next_request(info.shutdown.as_ref(), Duration::from_secs(3600))
                .await;
            if idle != Idle::Request {
                break;
            }
        }
        let Some(head) = read_head(&mut stream, &mut buf).await else {
            break;
        };
        let n = REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if info.crash_on_request == Some(n) {
            say!("testworker: crashing on request {n} as asked (exit 3)");
            std::process::exit(3);
        }
        if !skip(&mut stream, &mut buf, head.content_length).await {
            break;
        }
        if let Some(delay) = head.sleep {
            Timer::after(delay).await;
        }
        let close = head.close || info.shutdown.as_ref().is_some_and(Shutdown::is_triggered);
        let status = if info.fail_requests {
            info.stats.count_failure();
            "500 Internal Server Error"
        } else {
            "200 OK"
        };
        let response = format!(
            "HTTP/1.1 {status}\r\n{}Content-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
            info.headers,
            info.body.len(),
            if close { "Connection: close\r\n" } else { "" },
            info.body
        );
        info.stats.count_request();
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    drop(guard);
}

/// Reads up to the end of a request head; `None` on end of file, error, or a
/// head that is too large. Bytes after the head stay in `buf`.
async fn read_head(stream: &mut clusterd::worker::Stream, buf: &mut Vec<u8>) -> Option<Head> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (_method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    let mut parsed = Head {
        content_length: 0,
        close: version != "HTTP/1.1",
        sleep: path
            .strip_prefix("/sleep/")
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => parsed.content_length = value.parse().ok()?,
            "connection" => {
                if value.eq_ignore_ascii_case("close") {
                    parsed.close = true;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    parsed.close = false;
                }
            }
            // Not supported by this responder: answer, then close.
            "transfer-encoding" => parsed.close = true,
            _ => {}
        }
    }
    Some(parsed)
}

/// Reads and discards `len` body bytes, some of which may be in `buf`.
async fn skip(stream: &mut clusterd::worker::Stream, buf: &mut Vec<u8>, len: usize) -> bool {
    let buffered = len.min(buf.len());
    buf.drain(..buffered);
    let mut left = len - buffered;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let want = left.min(chunk.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => left -= n,
        }
    }
    true
}
