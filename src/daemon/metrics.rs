//! `metrics = host:port`: Prometheus text at `/metrics`, readiness at
//! `/healthz`.
//!
//! A deliberately small HTTP/1.1 responder (no HTTP library in the daemon):
//! one request per connection, then `Connection: close`. The numbers come
//! from the main loop, from the same snapshot `clusterctl status` shows, so
//! the two never disagree.
//!
//! # Hostile clients
//!
//! The port is what an orchestrator probes (`/healthz` for readiness and
//! liveness), so connections that send nothing, or trickle a byte at a
//! time, must not lock the probes out. The bounds:
//!
//! - at most [`MAX_CONNECTIONS`] connections are open at once (fds and
//!   memory stay bounded: at most [`MAX_HEAD`] bytes buffered for each);
//! - a request head must be complete within [`READ_TIMEOUT`] of the accept,
//!   and the answer written within [`WRITE_TIMEOUT`];
//! - when every slot is taken, a new connection takes the slot of the
//!   *oldest connection still waiting for its request head* (which is
//!   closed). A probe sends its request as soon as it is connected, so it is
//!   the newest and is answered; idle and slowloris connections are the old
//!   ones and go first. Connections whose request is complete are answered,
//!   never evicted; only when all of them are being answered is a new
//!   connection closed at once;
//! - the accept loop yields after every accept, so the requests of the
//!   connections it accepted are read before it takes more.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smol::channel::Sender;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::{Async, LocalExecutor, Task, Timer};

use crate::proto::Status;

pub const MAX_HEAD: usize = 8 * 1024;
/// A request head must be complete this long after the accept.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer must be written within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 64;
/// A burst of evictions ends (and the next one is logged) after this long
/// without one.
const BURST_GAP: Duration = Duration::from_secs(10);

/// Connections closed to make room for newer ones, since clusterd started.
static EVICTED: AtomicU64 = AtomicU64::new(0);

/// What a scrape asks the main loop for.
#[derive(Debug)]
pub enum Query {
    Metrics(Sender<String>),
    /// `(ready, reason)`.
    Health(Sender<(bool, String)>),
}

/// Counters the daemon keeps for the metrics (everything else is in
/// [`Status`]).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Unexpected worker exits by reason: exit, signal, ready_timeout,
    /// spawn_failed.
    pub exits: [u64; 4],
    pub restarts_done: u64,
    pub restarts_aborted: u64,
    /// Rollbacks begun: after a restart failed, or after its generation
    /// failed once it had finished.
    pub rollbacks: u64,
    /// Health replacements begun, by reason, in the order of
    /// [`crate::lifecycle::HealthReason::ALL`].
    pub replacements: [u64; 4],
    pub restart_seconds_sum: f64,
    /// In-place upgrades refused or failed (`upgrade.refused`,
    /// `upgrade.failed`).
    pub upgrades_refused: u64,
}

pub const EXIT_REASONS: [&str; 4] = ["exit", "signal", "ready_timeout", "spawn_failed"];

/// Binds the metrics address.
///
/// # Errors
/// The OS error, naming the address.
pub fn bind(addr: SocketAddr) -> io::Result<Async<TcpListener>> {
    Async::<TcpListener>::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} (metrics): {e}")))
}

/// Serves scrapes until dropped.
pub async fn serve(
    listener: Async<TcpListener>,
    ex: Rc<LocalExecutor<'static>>,
    queries: Sender<Query>,
) {
    let mut conns = Connections::default();
    let mut failing = false;
    // When the last burst of evictions was logged, and the last eviction.
    let mut burst: Option<(Instant, u64)> = None;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => {
                failing = false;
                s
            }
            Err(e) => {
                // Out of fds, say: do not spin, and log once per burst.
                if !failing {
                    crate::log!(warn, "metrics.accept_failed", error = e);
                    failing = true;
                }
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        match conns.admit() {
            Admit::Room => {}
            Admit::Evicted => {
                let now = Instant::now();
                let total = EVICTED.fetch_add(1, Ordering::Relaxed) + 1;
                match &mut burst {
                    Some((last, _)) if now.duration_since(*last) < BURST_GAP => *last = now,
                    _ => {
                        crate::log!(
                            warn,
                            "metrics.busy",
                            connections = MAX_CONNECTIONS,
                            evicted_total = total,
                            reason = "all connections taken: the oldest without a complete request is closed for each new one"
                        );
                        burst = Some((now, total));
                    }
                }
            }
            Admit::Full => {
                drop(stream); // closed at once: every slot is answering
                smol::future::yield_now().await;
                continue;
            }
        }
        let answering = Rc::new(Cell::new(false));
        let task = ex.spawn(connection(stream, queries.clone(), answering.clone()));
        conns.push(task, answering);
        // Let the new connection read its request before more are accepted.
        smol::future::yield_now().await;
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    open: VecDeque<(Task<()>, Rc<Cell<bool>>)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// A slot is free.
    Room,
    /// The oldest connection still reading its request was closed.
    Evicted,
    /// Every connection is being answered: the new one must be closed.
    Full,
}

impl Connections {
    /// Makes room for one more connection, if it can.
    fn admit(&mut self) -> Admit {
        self.open.retain(|(task, _)| !task.is_finished());
        if self.open.len() < MAX_CONNECTIONS {
            return Admit::Room;
        }
        match self.open.iter().position(|(_, answering)| !answering.get()) {
            Some(oldest) => {
                // Dropping the task cancels it, which closes the connection.
                self.open.remove(oldest);
                Admit::Evicted
            }
            None => Admit::Full,
        }
    }

    fn push(&mut self, task: Task<()>, answering: Rc<Cell<bool>>) {
        self.open.push_back((task, answering));
    }
}

/// Connections closed to make room for newer ones since clusterd started.
pub fn evicted() -> u64 {
    EVICTED.load(Ordering::Relaxed)
}

/// `fut`, or `None` if it takes longer than `limit`.
async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        Timer::after(limit).await;
        None
    })
    .await
}

/// One connection: its request head within [`READ_TIMEOUT`] (marked as
/// answering from then on), its answer within [`WRITE_TIMEOUT`].
async fn connection(
    mut stream: Async<TcpStream>,
    queries: Sender<Query>,
    answering: Rc<Cell<bool>>,
) {
    let head = match within(READ_TIMEOUT, read_head(&mut stream)).await {
        Some(Ok(Some(head))) => head,
        _ => return, // timed out, closed or failed
    };
    answering.set(true);
    let _ = within(WRITE_TIMEOUT, respond(&mut stream, head, &queries)).await;
}

/// What was read of a request head.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    Complete(Vec<u8>),
    TooLarge,
}

/// Reads until the end of the request head (a blank line), at most
/// [`MAX_HEAD`] bytes; `None` if the peer closed first.
async fn read_head(stream: &mut Async<TcpStream>) -> io::Result<Option<Head>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        let scanned = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head_complete(&head, scanned) {
            return Ok(Some(Head::Complete(head)));
        }
        if head.len() > MAX_HEAD {
            return Ok(Some(Head::TooLarge));
        }
    }
}

/// Whether `head` ends its request head at or after byte `from` (what is
/// before was searched already: a trickled head costs linear time).
fn head_complete(head: &[u8], from: usize) -> bool {
    let tail = &head[from.min(head.len())..];
    tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n")
}

async fn respond(
    stream: &mut Async<TcpStream>,
    head: Head,
    queries: &Sender<Query>,
) -> io::Result<()> {
    let head = match head {
        Head::Complete(head) => head,
        Head::TooLarge => {
            return write(
                stream,
                431,
                "text/plain",
                "request header too large\n",
                false,
            )
            .await;
        }
    };
    let (status, content_type, body) = match route(&head) {
        Route::Metrics => {
            let (tx, rx) = smol::channel::bounded(1);
            queries
                .send(Query::Metrics(tx))
                .await
                .map_err(|_| io::ErrorKind::BrokenPipe)?;
            let text = rx.recv().await.map_err(|_| io::ErrorKind::BrokenPipe)?;
            (200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        Route::Health => {
            let (tx, rx) = smol::channel::bounded(1);
            queries
                .send(Query::Health(tx))
                .await
                .map_err(|_| io::ErrorKind::BrokenPipe)?;
            let (ready, why) = rx.recv().await.map_err(|_| io::ErrorKind::BrokenPipe)?;
            (
                if ready { 200 } else { 503 },
                "text/plain; charset=utf-8",
                format!("{why}\n"),
            )
        }
        Route::NotFound => (
            404,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
        Route::BadMethod => (405, "text/plain", "only GET and HEAD\n".into()),
        Route::BadRequest => (400, "text/plain", "bad request\n".into()),
    };
    let head_only = head.starts_with(b"HEAD ");
    write(stream, status, content_type, &body, head_only).await
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    NotFound,
    BadMethod,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" && method != "HEAD" {
        return Route::BadMethod;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        Some("/healthz") => Route::Health,
        _ => Route::NotFound,
    }
}

async fn write(
    stream: &mut Async<TcpStream>,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

/// `/healthz`: ready while at least one worker is ready and clusterd is not
/// stopping.
pub fn health(status: &Status, stopping: bool) -> (bool, String) {
    let crash_loop = status
        .crash_loop
        .as_ref()
        .map_or(String::new(), |c| format!("; crash loop: {c}"));
    if stopping {
        (false, "stopping".into())
    } else if status.ready == 0 {
        (
            false,
            format!("not ready: 0/{} workers ready{crash_loop}", status.desired),
        )
    } else {
        (
            true,
            format!(
                "ok: {}/{} workers ready{crash_loop}",
                status.ready, status.desired
            ),
        )
    }
}

/// The Prometheus text exposition of `status` and `counters`.
pub fn render(status: &Status, counters: &Counters) -> String {
    let mut out = String::with_capacity(2048 + status.workers.len() * 300);
    family(
        &mut out,
        "clusterd_build_info",
        "gauge",
        "clusterd's version, as a label; always 1.",
    );
    let _ = writeln!(
        out,
        "clusterd_build_info{{version=\"{}\"}} 1",
        escape(&status.version)
    );
    family(
        &mut out,
        "clusterd_uptime_seconds",
        "gauge",
        "Seconds since clusterd started.",
    );
    let _ = writeln!(
        out,
        "clusterd_uptime_seconds {}",
        status.uptime_ms as f64 / 1000.0
    );
    family(
        &mut out,
        "clusterd_generation",
        "gauge",
        "The generation new workers get (one more per completed rolling restart).",
    );
    let _ = writeln!(out, "clusterd_generation {}", status.generation);
    family(
        &mut out,
        "clusterd_phase",
        "gauge",
        "What the pool is doing: 1 for the current phase, 0 for the others.",
    );
    for phase in crate::lifecycle::Phase::ALL.map(crate::lifecycle::Phase::as_str) {
        let _ = writeln!(
            out,
            "clusterd_phase{{phase=\"{phase}\"}} {}",
            u8::from(status.phase == phase)
        );
    }
    family(
        &mut out,
        "clusterd_workers_desired",
        "gauge",
        "The configured number of workers.",
    );
    let _ = writeln!(out, "clusterd_workers_desired {}", status.desired);
    family(
        &mut out,
        "clusterd_workers",
        "gauge",
        "Worker processes (and slots waiting in backoff) by state.",
    );
    for state in ["starting", "ready", "draining", "backoff"] {
        let n = status.workers.iter().filter(|w| w.state == state).count();
        let _ = writeln!(out, "clusterd_workers{{state=\"{state}\"}} {n}");
    }
    family(
        &mut out,
        "clusterd_worker_exits_total",
        "counter",
        "Unexpected worker exits (crashes), by reason.",
    );
    for (reason, n) in EXIT_REASONS.iter().zip(counters.exits) {
        let _ = writeln!(
            out,
            "clusterd_worker_exits_total{{reason=\"{reason}\"}} {n}"
        );
    }
    family(
        &mut out,
        "clusterd_worker_restarts_total",
        "counter",
        "Crash restarts of each worker id.",
    );
    let mut seen = std::collections::BTreeMap::new();
    for w in &status.workers {
        seen.entry(w.id).or_insert(w.restarts);
    }
    for (id, restarts) in seen {
        let _ = writeln!(
            out,
            "clusterd_worker_restarts_total{{worker=\"{id}\"}} {restarts}"
        );
    }
    family(
        &mut out,
        "clusterd_rolling_restarts_total",
        "counter",
        "Rolling restarts by result (a restart that rolled back counts as aborted).",
    );
    let _ = writeln!(
        out,
        "clusterd_rolling_restarts_total{{result=\"done\"}} {}",
        counters.restarts_done
    );
    let _ = writeln!(
        out,
        "clusterd_rolling_restarts_total{{result=\"aborted\"}} {}",
        counters.restarts_aborted
    );
    family(
        &mut out,
        "clusterd_upgrades_total",
        "counter",
        "In-place upgrades of clusterd itself (clusterctl upgrade, SIGUSR2) by result: done, or refused (or failed) with the old image carrying on.",
    );
    let _ = writeln!(
        out,
        "clusterd_upgrades_total{{result=\"done\"}} {}",
        status.upgrades
    );
    let _ = writeln!(
        out,
        "clusterd_upgrades_total{{result=\"refused\"}} {}",
        counters.upgrades_refused
    );
    family(
        &mut out,
        "clusterd_image_uptime_seconds",
        "gauge",
        "Seconds since this image of clusterd took over (its start, or its last in-place upgrade).",
    );
    let _ = writeln!(
        out,
        "clusterd_image_uptime_seconds {}",
        status.image_uptime_ms as f64 / 1000.0
    );
    family(
        &mut out,
        "clusterd_worker_replacements_total",
        "counter",
        "Workers replaced while they still ran, by reason: watchdog (hung), max_memory, max_requests, max_age.",
    );
    for (reason, n) in crate::lifecycle::HealthReason::ALL
        .iter()
        .zip(counters.replacements)
    {
        let _ = writeln!(
            out,
            "clusterd_worker_replacements_total{{reason=\"{reason}\"}} {n}"
        );
    }
    family(
        &mut out,
        "clusterd_crash_loop",
        "gauge",
        "1 while a worker id is crash-looping (its crash streak reached crash_loop), else 0.",
    );
    let _ = writeln!(
        out,
        "clusterd_crash_loop {}",
        u8::from(status.crash_loop.is_some())
    );
    family(
        &mut out,
        "clusterd_rollbacks_total",
        "counter",
        "Rollbacks to the previous generation: a restart that failed after its new workers served, or a generation that failed right after its restart.",
    );
    let _ = writeln!(out, "clusterd_rollbacks_total {}", counters.rollbacks);
    family(
        &mut out,
        "clusterd_rolling_restart_seconds",
        "summary",
        "Duration of completed rolling restarts.",
    );
    let _ = writeln!(
        out,
        "clusterd_rolling_restart_seconds_sum {}",
        counters.restart_seconds_sum
    );
    let _ = writeln!(
        out,
        "clusterd_rolling_restart_seconds_count {}",
        counters.restarts_done
    );
    family(
        &mut out,
        "clusterd_metrics_connections_evicted_total",
        "counter",
        "Connections to this endpoint closed before their request was complete, to make room for newer ones.",
    );
    let _ = writeln!(
        out,
        "clusterd_metrics_connections_evicted_total {}",
        evicted()
    );
    family(
        &mut out,
        "clusterd_empty_pool_connections_total",
        "counter",
        "Connections clusterd answered itself (empty_pool) while no worker was ready, by action.",
    );
    let (answered, reset) = super::fallback::counts();
    let _ = writeln!(
        out,
        "clusterd_empty_pool_connections_total{{action=\"503\"}} {answered}"
    );
    let _ = writeln!(
        out,
        "clusterd_empty_pool_connections_total{{action=\"reset\"}} {reset}"
    );
    family(
        &mut out,
        "clusterd_dispatch_connections_total",
        "counter",
        "dispatch = clusterd: connections passed to a worker, sends that failed and went to another worker, and heads not complete within the peek deadline.",
    );
    let (passed, retried, peek_timeouts, held) = super::dispatch::counts();
    for (outcome, n) in [
        ("passed", passed),
        ("retried", retried),
        ("peek_timeout", peek_timeouts),
    ] {
        let _ = writeln!(
            out,
            "clusterd_dispatch_connections_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    family(
        &mut out,
        "clusterd_dispatch_held_connections",
        "gauge",
        "dispatch = clusterd: connections clusterd holds because no worker can take them yet.",
    );
    let _ = writeln!(out, "clusterd_dispatch_held_connections {held}");
    let processes: Vec<_> = status
        .workers
        .iter()
        .filter_map(|w| w.pid.map(|pid| (w, pid)))
        .collect();
    family(
        &mut out,
        "clusterd_worker_rss_bytes",
        "gauge",
        "Resident memory of each worker process.",
    );
    for (w, pid) in &processes {
        if let Some(rss) = w.rss_bytes {
            let _ = writeln!(
                out,
                "clusterd_worker_rss_bytes{{worker=\"{}\",pid=\"{pid}\"}} {rss}",
                w.id
            );
        }
    }
    family(
        &mut out,
        "clusterd_worker_requests_total",
        "counter",
        "Requests served, as reported by the worker.",
    );
    for (w, pid) in &processes {
        if let Some(n) = w.requests {
            let _ = writeln!(
                out,
                "clusterd_worker_requests_total{{worker=\"{}\",pid=\"{pid}\"}} {n}",
                w.id
            );
        }
    }
    family(
        &mut out,
        "clusterd_worker_active_connections",
        "gauge",
        "Open connections, as reported by the worker.",
    );
    for (w, pid) in &processes {
        if let Some(n) = w.active {
            let _ = writeln!(
                out,
                "clusterd_worker_active_connections{{worker=\"{}\",pid=\"{pid}\"}} {n}",
                w.id
            );
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ListenerInfo, WorkerStatus};

    fn worker(id: u32, pid: Option<u32>, state: &str) -> WorkerStatus {
        WorkerStatus {
            id,
            pid,
            generation: 2,
            state: state.into(),
            uptime_ms: 1000,
            restarts: id,
            last_exit: None,
            rss_bytes: pid.map(|_| 4096),
            requests: pid.map(|_| 10),
            active: pid.map(|_| 1),
            note: None,
            last_words: None,
        }
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            pid: 1,
            uptime_ms: 1500,
            config: "/x.conf".into(),
            protocol: "clusterd".into(),
            listeners: vec![ListenerInfo {
                name: "http".into(),
                address: "127.0.0.1:1".into(),
            }],
            desired: 3,
            ready: 2,
            generation: 2,
            operation: None,
            phase: "running".into(),
            last_restart: None,
            crash_loop: None,
            workers: vec![
                worker(1, Some(11), "ready"),
                worker(1, Some(12), "draining"),
                worker(2, Some(21), "ready"),
                worker(3, None, "backoff"),
            ],
            image_uptime_ms: 1500,
            upgrades: 0,
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_are_well_formed() {
        let text = render(
            &status(),
            &Counters {
                exits: [1, 2, 0, 3],
                ..Counters::default()
            },
        );
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let (name_labels, value) = line.rsplit_once(' ').unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
                let name = name_labels.split('{').next().unwrap();
                let base = name.trim_end_matches("_sum").trim_end_matches("_count");
                assert!(
                    declared.iter().any(|d| d == name || d == base),
                    "{line} before its TYPE"
                );
            }
        }
        assert!(text.contains("clusterd_workers{state=\"draining\"} 1"));
        assert!(text.contains("clusterd_workers{state=\"backoff\"} 1"));
        assert!(text.contains("clusterd_worker_exits_total{reason=\"spawn_failed\"} 3"));
        assert!(text.contains("clusterd_worker_restarts_total{worker=\"3\"} 3"));
        assert!(text.contains("clusterd_worker_rss_bytes{worker=\"1\",pid=\"12\"} 4096"));
        assert!(
            !text.contains("pid=\"\""),
            "slots in backoff have no process series"
        );
    }

    #[test]
    fn health_follows_readiness_and_stopping() {
        let mut s = status();
        assert!(health(&s, false).0);
        assert!(!health(&s, true).0);
        s.ready = 0;
        assert_eq!(
            health(&s, false),
            (false, "not ready: 0/3 workers ready".into())
        );
    }

    #[test]
    fn a_head_is_complete_at_its_blank_line_wherever_the_reads_split_it() {
        let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        // Trickled one byte at a time: complete exactly at the last byte.
        let mut head = Vec::new();
        for (i, &b) in req.iter().enumerate() {
            let scanned = head.len().saturating_sub(3);
            head.push(b);
            assert_eq!(head_complete(&head, scanned), i == req.len() - 1, "{i}");
        }
        assert!(head_complete(b"GET / HTTP/1.0\n\n", 0));
        assert!(!head_complete(b"GET / HTTP/1.0\r\n", 0));
    }

    #[test]
    fn a_full_table_evicts_the_oldest_connection_still_reading() {
        let ex = LocalExecutor::new();
        let mut conns = Connections::default();
        let mut flags = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            assert_eq!(conns.admit(), Admit::Room);
            let flag = Rc::new(Cell::new(false));
            conns.push(ex.spawn(std::future::pending()), flag.clone());
            flags.push(flag);
        }
        // The two oldest are being answered: the third oldest goes.
        flags[0].set(true);
        flags[1].set(true);
        assert_eq!(conns.admit(), Admit::Evicted);
        assert_eq!(conns.open.len(), MAX_CONNECTIONS - 1);
        assert!(conns.open.iter().take(2).all(|(_, a)| a.get()));
        assert!(Rc::ptr_eq(&conns.open[2].1, &flags[3]));
        // When every connection is answering, a new one is refused.
        conns.push(ex.spawn(std::future::pending()), Rc::new(Cell::new(true)));
        for (_, answering) in &conns.open {
            answering.set(true);
        }
        assert_eq!(conns.admit(), Admit::Full);
        // A finished connection frees its slot.
        let done = ex.spawn(async {});
        while !done.is_finished() {
            ex.try_tick();
        }
        conns.open[5].0 = done;
        assert_eq!(conns.admit(), Admit::Room);
    }

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"HEAD /healthz?x=1 HTTP/1.0\r\n\r\n"), Route::Health);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"\xff\xfe garbage"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
    }
}
