//! Load generation for clusterd's tests and benchmarks: a small HTTP/1.1 load tool, loopback
//! only.
//!
//! A fixed number of connections (tasks on one or a few event-loop threads) send `GET`s, or `POST`s with a body, over
//! keep-alive connections or a new connection per request, until a duration, a request count
//! or [`Running::stop`]. Every request is counted once in a [`Report`], under one outcome: ok
//! (2xx), non-2xx by status, or an error (connect error, reset, EOF before or in the middle of
//! the response, idle close, timeout, bad response); plus latency percentiles and the count of
//! responses per `X-Worker` header value.
//!
//! The integration tests use it in the background while they restart workers:
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn restart_everything() {}
//! let addr = "127.0.0.1:3000".parse().unwrap();
//! let load = clusterd_bench::start(clusterd_bench::Spec { connections: 8, ..clusterd_bench::Spec::new(addr) })?;
//! assert!(load.wait_for_ok(100, Duration::from_secs(10)), "load is not flowing");
//! restart_everything();
//! let report = load.stop();
//! println!("{report}");
//! assert_eq!(report.failed(), 0);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! and the `loadgen` binary runs it from the command line for the benchmark suite.
//!
//! # Layout
//!
//! - [`spec`](Spec): what to run, and the loopback-only check.
//! - `load`: [`run`], [`start`], [`Running`], [`Stop`]; the event loops and connection tasks,
//!   and how a failure is classified.
//! - `http`: writing requests and reading responses (status line, headers, bodies framed by
//!   `Content-Length`, chunked encoding or EOF; `Connection: close`), and the [`get`] helper.
//! - `report`: [`Report`], its table ([`Display`](std::fmt::Display)) and JSON.
//! - `histogram`: [`Histogram`], log buckets accurate to about 1%.
//! - [`hostile`]: idle and slowloris connections held against a port (tests and `bench`).
//!
//! # Connections
//!
//! In keep-alive mode a connection is reused until the server ends it: `Connection: close` on
//! a response (as a draining clusterd worker sends), an HTTP/1.0 response, or a body delimited
//! by EOF. The next request then opens a new connection; that is not an error. With
//! [`Spec::keep_alive`] off, every request opens a connection and sends `Connection: close`.
//!
//! # Idle keep-alive close
//!
//! A server may close an idle keep-alive connection at any time, and a draining worker must
//! (DESIGN.md, guarantee 3). If our next request is already on its way, it reaches a closed
//! socket and we see EOF, or a reset, before any byte of a response. That is an unavoidable
//! race of HTTP/1.1, not a lost request, and it has a clear signature: the connection had
//! carried a complete exchange before, and not one byte of the response arrived. It is counted
//! as [`Report::idle_close`], apart from `eof_before_response` (a new connection closed
//! without a word: a real failure) and `eof_mid_response`.
//!
//! With [`Spec::retry_idle_close`] (the default) a `GET` that hits this race is sent again,
//! once, on a new connection, and counted in [`Report::retried`]; only the retry's outcome is
//! counted against the request. This is what real clients do (Go's `net/http` retries
//! idempotent requests on a reused connection that fails before any response; browsers do the
//! same), and RFC 9110 §9.2.2 allows automatic retries of idempotent requests. It is safe for
//! `GET` even in the rare case where the server did read the request before the connection
//! went (a worker that crashed after reading it), because `GET` is idempotent; `POST` is not,
//! so a `POST` is never retried and the race counts as a failure. A new connection never
//! qualifies, so there is at most one retry per request. A test that wants to prove that idle
//! connections are closed without any race can assert `retried == 0`, or turn retries off.
//!
//! # Limits
//!
//! Loopback only (127.0.0.0/8, `::1`): [`run`], [`start`] and [`get`] refuse other addresses.
//! At most [`MAX_CONNECTIONS`] connections. Plain HTTP/1.1 only: no TLS, no pipelining, no
//! redirects, no `Expect: 100-continue`.

mod histogram;
pub mod hostile;
mod http;
mod load;
mod report;
mod spec;

pub use histogram::Histogram;
pub use http::{Method, Response, get};
pub use load::{Running, Stop, run, start};
pub use report::{OTHER_WORKERS, Report};
pub use spec::{MAX_CONNECTIONS, MAX_THREADS, Spec};
