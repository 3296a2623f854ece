//! shop: the demo worker, a small HTTP/1.1 shop API built on `clusterd::worker`.
//!
//! Routes (every response carries `X-Worker: <worker id>`, 0 when run alone):
//!
//! - `GET /products/:id`: `{"id":N,"name":"...","price":N.NN}` for ids
//!   1..=10000, a 404 JSON error otherwise;
//! - `POST /checkout`: reads the body, waits 50 ms of simulated I/O (a payment
//!   call), then `{"orderId":"...","status":"confirmed"}`;
//! - `GET /cpu`: about 2 ms of CPU work (pricing a large cart), then JSON;
//! - `GET /healthz`: `ok`.
//!
//! Under clusterd it serves the `http` listener clusterd passes it:
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! target/release/clusterd -c examples/shop.conf
//! ```
//!
//! Alone it binds `--listen ADDR`, else `$SHOP_LISTEN`, else
//! `127.0.0.1:3000` (`host:port`, `[v6]:port` or `unix:/path`):
//!
//! ```text
//! cargo run --example shop -- --listen 127.0.0.1:3999
//! ```
//!
//! Rebalancing: when this worker holds clearly more keep-alive connections
//! than its share (a sibling was replaced after a crash, or the pool was
//! scaled up), a few responses carry `Connection: close`
//! ([`InFlight::crowded`]), and those clients reconnect to the workers
//! holding fewer.
//!
//! Idle and slow clients: a new connection must send its first byte within
//! 5 s and the rest of its request head within 10 s (slowloris), a
//! keep-alive connection its next request within 30 s, and a worker at its
//! in-flight limit closes its oldest silent (else longest idle) connection to
//! admit a new one (`IdlePolicy`, `Accepted::next_request`), so a few
//! hundred sockets that send nothing cannot lock real clients out.
//!
//! HTTP/1.1 only: a request that says `Connection: close` gets it said back
//! before the connection closes (RFC 9112 §9.6); an HTTP/1.0 request, which
//! async-h1 does not parse, gets a `505` with `Connection: close`.
//!
//! Draining (on clusterd's DRAIN, clusterd going away, SIGTERM or Ctrl-C):
//! the listener is closed at once, so new connections go to other workers;
//! requests in flight finish, and their responses carry `Connection: close`;
//! idle keep-alive connections are closed (after a short grace for a request
//! already on its way, `DRAIN_IDLE_GRACE`); when no connection is
//! left the worker reports DRAINED and exits 0.
//!
//! For the benchmark's balance comparison, `SHOP_INFLIGHT_LIMIT=N` sets the
//! accept limit per worker (connections held at once; 0 = none; unset =
//! `InFlight::DEFAULT_LIMIT`), and `SHOP_SCOREBOARD=off` leaves the
//! connection count untracked, so that it is neither shown in `clusterctl
//! status` nor shared with the other workers on clusterd's scoreboard.
//!
//! Access log: with `SHOP_LOG_REQUESTS=1` (unset, empty or `0`: off) the shop
//! prints one line per request to stdout, `METHOD PATH STATUS DURATION`
//! (`GET /products/1 200 0.041ms`, the time to build the response), each in a
//! single `write`; under clusterd's `log_capture = on` each becomes a
//! `worker.output` line. The benchmark's `logs` section measures what that
//! costs.
//!
//! One worker runs on one thread (clusterd runs one worker per core), so
//! `/cpu` blocks this worker's other connections while it runs, as a
//! CPU-bound request in Node.js would.

use std::cell::Cell;
use std::hint::black_box;
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_h1::server::{ConnectionStatus, Server};
use clusterd::worker::{
    Accepted, Acceptor, Idle, IdlePolicy, InFlight, Shutdown, Stats, Stream, Worker,
};
use http_types::{Method, Request, Response, StatusCode, mime};
use smol::future::FutureExt as _;
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

/// Where to listen when not run by clusterd.
const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

/// How idle connections are bounded (they hold in-flight slots like busy
/// ones): a new connection has `first_byte` to begin its first request, a
/// keep-alive one `keep_alive` between two requests, and a worker at its
/// in-flight limit closes its oldest silent (else longest idle) connection
/// to admit a new one. So a few hundred sockets that never send a byte
/// cannot lock real clients out. These are the library's defaults, spelt
/// out.
const IDLE: IdlePolicy = IdlePolicy {
    first_byte: IdlePolicy::DEFAULT_FIRST_BYTE,
    keep_alive: IdlePolicy::DEFAULT_KEEP_ALIVE,
    evict_at_limit: true,
};

/// How long a request head may take to arrive once its first byte has
/// (a client trickling its head, slowloris). async-h1's own bound is 60 s.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated payment call of `POST /checkout`.
const CHECKOUT_IO: Duration = Duration::from_millis(50);

/// How long a checkout body may take to arrive, and how big it may be.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_LIMIT: u64 = 64 * 1024;

/// Products `1..=PRODUCTS` exist.
const PRODUCTS: u64 = 10_000;

/// Cart lines priced by `GET /cpu`: about 2 ms of work in a release build.
const CPU_CART_ITEMS: u64 = 750_000;

const USAGE: &str = "usage: shop [--listen ADDR]   (or SHOP_LISTEN=ADDR; default 127.0.0.1:3000)";

fn main() -> ExitCode {
    let listen = match listen_address(std::env::args().skip(1)) {
        Ok(Some(listen)) => listen,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            say!("shop: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("shop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--listen ADDR`, else `$SHOP_LISTEN`, else the default; `None` for `--help`.
fn listen_address(mut args: impl Iterator<Item = String>) -> Result<Option<String>, String> {
    let mut listen = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => {
                listen = Some(args.next().ok_or("--listen needs an address")?);
            }
            _ => match arg.strip_prefix("--listen=") {
                Some(address) => listen = Some(address.to_owned()),
                None => return Err(format!("unexpected argument {arg:?}")),
            },
        }
    }
    Ok(Some(listen.unwrap_or_else(|| {
        std::env::var("SHOP_LISTEN")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned())
    })))
}

fn run(listen: &str) -> io::Result<()> {
    let mut worker = Worker::connect(&[("http", listen)])?;
    let in_flight = in_flight_from_env()?.with_idle_policy(IDLE);
    let stats = worker.stats();
    let scoreboard = std::env::var("SHOP_SCOREBOARD").map_or(true, |v| v != "off");
    let log_requests = log_requests_from_env()?;
    if scoreboard {
        stats.track(&in_flight);
    }
    let shutdown = worker.shutdown();
    let mut acceptor = Acceptor::new(
        worker.take_listener("http")?,
        in_flight.clone(),
        shutdown.clone(),
    );
    let id = worker.id();
    let listeners: Vec<String> = worker
        .listeners()
        .iter()
        .map(|l| format!("{}={}", l.name, l.address))
        .collect();
    say!(
        "shop: worker {id} gen {} listening on {}, in-flight limit {}, scoreboard {}",
        worker.generation(),
        listeners.join(", "),
        in_flight
            .limit()
            .map_or_else(|| "none".to_owned(), |n| n.to_string()),
        if scoreboard { "on" } else { "off" }
    );
    let app = Rc::new(App {
        worker_id: id.to_string(),
        stats,
        shutdown: shutdown.clone(),
        in_flight: in_flight.clone(),
        orders: Cell::new(0),
        log_requests,
    });

    let ex = LocalExecutor::new();
    // With `watchdog` set, heartbeats from this executor: if it blocks,
    // clusterd replaces the worker.
    ex.spawn(worker.watchdog()).detach();
    smol::block_on(ex.run(async {
        worker.ready().await?;
        let accepting = loop {
            match acceptor.accept().await {
                Ok(Some(conn)) => ex.spawn(serve(conn, app.clone())).detach(),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(acceptor);
        let why = match (&accepting, shutdown.reason()) {
            (Err(e), _) => format!("accept failed: {e}"),
            (Ok(()), Some(reason)) => reason.to_string(),
            (Ok(()), None) => "listener closed".to_owned(),
        };
        say!("shop: worker {id} draining: {why}");
        let draining = Instant::now();
        in_flight.wait_idle().await;
        // A worker that could not accept exits non-zero (clusterd replaces
        // it) rather than claiming an orderly drain.
        accepting?;
        worker.drained().await?;
        say!(
            "shop: worker {id} drained in {} ms, exiting",
            draining.elapsed().as_millis()
        );
        Ok(())
    }))
}

/// What every request handler of this worker shares.
struct App {
    /// The `X-Worker` header value.
    worker_id: String,
    /// Requests served, reported to clusterd.
    stats: Stats,
    /// Checked before each response: once draining, say `Connection: close`.
    shutdown: Shutdown,
    /// Also checked: a worker holding more than its share of the
    /// connections (after a crash or a scale-up) ends a few keep-alive
    /// connections, whose clients reconnect to the worker holding fewer.
    in_flight: InFlight,
    /// Orders confirmed by this worker, for order ids.
    orders: Cell<u64>,
    /// `SHOP_LOG_REQUESTS=1`: an access-log line per request on stdout.
    log_requests: bool,
}
/// Serves one connection's requests until it closes, errs, idles out or the
/// drain begins. The in-flight slot (`guard`) is released however it ends,
/// including when the client disconnects mid-request.
async fn serve(mut conn: Accepted, app: Rc<App>) {
    let stream = conn.stream.clone();
    // Set by the endpoint: the request head has arrived.
    let head_read = Rc::new(Cell::new(false));
    let endpoint = {
        let (app, stream, head_read) = (app.clone(), stream.clone(), head_read.clone());
        move |req: Request| {
            head_read.set(true);
            let (app, stream) = (app.clone(), stream.clone());
            async move { Ok(app.respond(req, &stream).await) }
        }
    };
    let mut server = Server::new(stream.clone(), endpoint);
    loop {
        // Before the first request and between two the connection is idle:
        // bounded by IDLE, closed at once to make room when the worker is
        // at its limit, and, on a drain, after a short grace (see
        // `Stream::next_request` for why).
        if conn.next_request(Some(&app.shutdown)).await != Idle::Request {
            break;
        }
        // The request in flight: not raced against the drain, it finishes
        // (its head within HEAD_TIMEOUT, clusterd bounds the whole drain to
        // drain_timeout).
        head_read.set(false);
        let head_timeout = async {
            Timer::after(HEAD_TIMEOUT).await;
            if head_read.get() {
                // Being answered: only the drain deadline applies.
                std::future::pending::<()>().await;
            }
            Ok(ConnectionStatus::Close)
        };
        match server.accept_one().or(head_timeout).await {
            Ok(ConnectionStatus::KeepAlive) => {}
            // Only raised while parsing the head, before any response.
            Err(e) if e.to_string().starts_with("Unsupported HTTP version") => {
                let _ = stream
                    .clone()
                    .write_all(http_1_0_refused().as_bytes())
                    .await;
                break;
            }
            // Closed by the client, by `Connection: close`, a malformed
            // request, a head that took too long, or a client that went
            // away mid-request.
            Ok(ConnectionStatus::Close) | Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    drop(conn); // gives the in-flight slot back
}

impl App {
    async fn respond(&self, mut req: Request, stream: &Stream) -> Response {
        let started = Instant::now();
        let client_closes = asks_to_close(&req);
        let path = req.url().path().to_owned();
        let mut res = match (req.method(), path.as_str()) {
            (Method::Get, "/healthz") => text(StatusCode::Ok, "ok"),
            (Method::Get, "/cpu") => cpu(),
            (Method::Post, "/checkout") => self.checkout(&mut req, stream).await,
            (Method::Get, p) if p.starts_with("/products/") => product(&p["/products/".len()..]),
            (_, "/healthz" | "/cpu") => not_allowed("GET"),
            (_, "/checkout") => not_allowed("POST"),
            (_, p) if p.starts_with("/products/") => not_allowed("GET"),
            _ => error(StatusCode::NotFound, "not found"),
        };
        self.stats.count_request();
        if res.status().is_server_error() {
            // A canary that fails far more than the old workers fails its
            // rolling restart.
            self.stats.count_failure();
        }
        res.insert_header("X-Worker", self.worker_id.as_str());
        if client_closes || self.shutdown.is_triggered() || self.in_flight.crowded() {
            // The last response on this connection: the client said so (RFC
            // 9112 §9.6: say it back, or a client may reuse a connection we
            // close), the worker is draining, or it holds more than its
            // share and lets the client move.
            res.insert_header("Connection", "close");
        }
        if self.log_requests {
            access_log(req.method(), &path, res.status(), started.elapsed());
        }
        res
    }

    async fn checkout(&self, req: &mut Request, stream: &Stream) -> Response {
        if req.len().is_some_and(|len| len as u64 > BODY_LIMIT) {
            return refuse(stream, StatusCode::PayloadTooLarge, "cart too large");
        }
        let mut body = Vec::new();
        let read = req
            .take_body()
            .take(BODY_LIMIT + 1)
            .read_to_end(&mut body)
            .or(async {
                Timer::after(BODY_TIMEOUT).await;
                Err(io::ErrorKind::TimedOut.into())
            })
            .await;
        match read {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return refuse(stream, StatusCode::RequestTimeout, "body took too long");
            }
            Err(_) => return refuse(stream, StatusCode::BadRequest, "cannot read the body"),
            Ok(_) if body.len() as u64 > BODY_LIMIT => {
                return refuse(stream, StatusCode::PayloadTooLarge, "cart too large");
            }
            Ok(_) => {}
        }
        // The payment provider's round trip.
        Timer::after(CHECKOUT_IO).await;
        let n = self.orders.get() + 1;
        self.orders.set(n);
        let order_id = format!("{}-{:x}-{n}", self.worker_id, std::process::id());
        json(
            StatusCode::Ok,
            serde_json::json!({ "orderId": order_id, "status": "confirmed" }).to_string(),
        )
    }
}

/// Prints `METHOD PATH STATUS DURATION` to stdout in one `write` (a line
/// never interleaves with another process's). Blocks while the pipe to
/// clusterd is full: a worker that logs faster than clusterd passes its lines
/// on is slowed down, and nothing is dropped.
fn access_log(method: Method, path: &str, status: StatusCode, took: Duration) {
    let line = format!(
        "{method} {path} {} {:.3}ms\n",
        u16::from(status),
        took.as_secs_f64() * 1e3
    );
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
}

/// Whether the request's `Connection` header lists `close`.
fn asks_to_close(req: &Request) -> bool {
    req.header("Connection").is_some_and(|values| {
        values
            .iter()
            .flat_map(|v| v.as_str().split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
    })
}

/// The answer to an HTTP/1.0 request, which async-h1 refuses to parse: a
/// `505` that says the connection closes, rather than closing it without a
/// word.
fn http_1_0_refused() -> String {
    let body = r#"{"error":"HTTP/1.1 is required here"}"#;
    format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `GET /products/:id`: a deterministic catalogue of products 1..=10000.
fn product(id: &str) -> Response {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return error(StatusCode::NotFound, "invalid product id");
    }
    let Some(id) = id
        .parse::<u64>()
        .ok()
        .filter(|id| (1..=PRODUCTS).contains(id))
    else {
        return error(StatusCode::NotFound, "no such product");
    };
    const ADJECTIVES: [&str; 8] = [
        "Classic", "Organic", "Deluxe", "Compact", "Vintage", "Smart", "Rugged", "Eco",
    ];
    const NOUNS: [&str; 10] = [
        "Teapot",
        "Backpack",
        "Desk Lamp",
        "Sneakers",
        "Headphones",
        "Notebook",
        "Umbrella",
        "Mug",
        "Rain Jacket",
        "Watch",
    ];
    let name = format!(
        "{} {}",
        ADJECTIVES[(id / 10 % 8) as usize],
        NOUNS[(id % 10) as usize]
    );
    let cents = 199 + id * 7919 % 19_800;
    json(
        StatusCode::Ok,
        format!(
            r#"{{"id":{id},"name":{},"price":{}}}"#,
            serde_json::Value::from(name),
            money(cents)
        ),
    )
}

/// `GET /cpu`: prices a large cart, about 2 ms of CPU in a release build.
fn cpu() -> Response {
    let total = cart_total(black_box(CPU_CART_ITEMS));
    json(
        StatusCode::Ok,
        format!(r#"{{"items":{CPU_CART_ITEMS},"total":{}}}"#, money(total)),
    )
}

/// The total of a cart of `items` lines, in cents: price times quantity,
/// 5% off lines of three or more, 8.25% sales tax. Integer arithmetic only,
/// and `black_box` keeps the compiler from folding the loop away.
fn cart_total(items: u64) -> u64 {
    let mut total = 0u64;
    for i in 0..items {
        let i = black_box(i);
        let price = 99 + i * 7919 % 10_000;
        let quantity = 1 + i % 5;
        let line = price * quantity;
        let discount = if quantity >= 3 { line * 5 / 100 } else { 0 };
        let taxed = (line - discount) * 10_825 / 10_000;
        total = total.wrapping_add(taxed);
    }
    total
}

/// Cents as a JSON number with two decimals: `1234` → `12.34`.
fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn json(status: StatusCode, body: String) -> Response {
    let mut res = Response::new(status);
    res.set_body(body);
    res.set_content_type(mime::JSON);
    res
}

fn text(status: StatusCode, body: &str) -> Response {
    let mut res = Response::new(status);
    res.set_body(body);
    res.set_content_type(mime::PLAIN);
    res
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

/// An error response to a request whose body was not read: the connection
/// is closed after it, and reading is shut down first so that async-h1 does
/// not wait for the rest of the body (a slow client must not hold a drain).
fn refuse(stream: &Stream, status: StatusCode, message: &str) -> Response {
    let _ = stream.shutdown(std::net::Shutdown::Read);
    let mut res = error(status, message);
    res.insert_header("Connection", "close");
    res
}

fn not_allowed(allow: &str) -> Response {
    let mut res = error(StatusCode::MethodNotAllowed, "method not allowed");
    res.insert_header("Allow", allow);
    res
}

/// `SHOP_LOG_REQUESTS`: `1` prints an access-log line per request; unset,
/// empty or `0` does not.
fn log_requests_from_env() -> io::Result<bool> {
    match std::env::var("SHOP_LOG_REQUESTS") {
        Err(_) => Ok(false),
        Ok(v) => match v.trim() {
            "" | "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SHOP_LOG_REQUESTS must be 1 (on) or 0 (off), not {v:?}"),
            )),
        },
    }
}

/// `SHOP_INFLIGHT_LIMIT`: the accept limit per worker (connections held at
/// once, see `clusterd::worker::InFlight`); 0 = no limit; unset = the
/// library's default.
fn in_flight_from_env() -> io::Result<InFlight> {
    match std::env::var("SHOP_INFLIGHT_LIMIT") {
        Err(_) => Ok(InFlight::default()),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(0) => Ok(InFlight::unlimited()),
            Ok(n) => Ok(InFlight::new(n)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SHOP_INFLIGHT_LIMIT must be a whole number (0 = no limit), not {v:?}"),
            )),
        },
    }
}
