//! clusterd: a tiny supervisor for pre-fork network servers.
//!
//! # Layout
//!
//! - [`config`]: the config file, parsed into a [`config::Config`] (pure, with
//!   every error at once as `FILE:LINE: message`).
//! - [`proto`]: the wire protocols, clusterd ↔ worker and clusterctl ↔
//!   clusterd: bincode records with a version header and a size cap (pure).
//! - [`dispatch`]: `dispatch = clusterd`'s choice of a worker for a
//!   connection: the session key in a request head, balance and sticky
//!   routing (pure).
//! - [`fdpass`]: records with file descriptors attached (`SCM_RIGHTS`).
//! - [`lifecycle`]: the supervisor as a pure state machine. Events and the time
//!   go in, actions come out: spawn, drain, kill, log. Worker lifecycle, crash
//!   backoff, rolling restart, scaling and stop all live here, unit-tested as
//!   scripts of events without processes or clocks.
//! - [`scoreboard`]: the connections each worker holds, in shared memory, so
//!   that a new connection goes to the worker holding fewest.
//! - `daemon` (private): the imperative shell. It binds the listeners, spawns
//!   workers, reaps children, reads signals, worker messages and control
//!   clients, feeds them to the state machine and carries out its actions.
//! - [`worker`]: the library a Rust worker embeds: listeners by name, `ready()`,
//!   the drain signal, `drained()`, and a load-balancing accept loop; one
//!   module per concept under `src/worker/` (the [`worker::Worker`] in
//!   `mod.rs`, `connect`, `background`, `shutdown`, `stats`, `inflight`,
//!   `listener`, `stream`, `acceptor`).

pub mod config;
pub mod dispatch;
pub mod fdpass;
pub mod lifecycle;
pub mod proto;
pub mod scoreboard;
pub mod users;
pub mod worker;

#[doc(hidden)]
pub mod daemon;

/// The README's Rust examples compile (they run as doctests).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
