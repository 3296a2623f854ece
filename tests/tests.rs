//! clusterd's end-to-end tests: the real `clusterd` and `clusterctl`
//! binaries, real worker processes (examples/shop, examples/testworker and
//! plain programs), real sockets on 127.0.0.1 with ephemeral ports.
//!
//! One integration binary (as ripgrep does); each module says what belongs
//! in it. `util` is the harness.

mod util;

/// examples/chat: Socket.IO on four workers (dispatch = clusterd, sticky =
/// socket.io, the Redis adapter) through rolling restarts.
mod chat;
/// clusterctl against a real daemon: every command, human and JSON output,
/// scaling and restarts under load, hostile control clients.
mod control;
/// Serving, crashes, backoff, rolling restarts, drain deadlines, stop, config
/// errors: the core guarantees of DESIGN.md.
mod core;
/// Deploy targets for real: the scratch image under dockerd, a fleet of
/// network namespaces behind HAProxy, the systemd unit and its notifications.
mod deploy;
mod dispatch;
/// The man pages and the README checked against the code: the docs cannot drift.
mod docs;
/// Faults and leaks: bad programs, misbehaving workers, rlimits, HUP storms, 200 restarts.
mod faults;
/// Worker health: hung, leaking and aging workers, crash loops.
mod health;
/// Hostile clients: the metrics port under idle and slowloris connections;
/// `empty_pool`.
mod hostile;
/// Idle workers stay asleep: no periodic wake-ups in the worker library.
mod idle;
/// Worker log capture: tags, whole lines, last words, a dead log reader.
mod logs;
/// `protocol = node`: unmodified Node.js apps (http, Express 4 and 5,
/// Fastify, Socket.IO, ws) from the npm registry through the adapter.
mod node;
/// Operability: metrics and health, PID 1, systemd Type=notify, the static
/// build in an empty root.
mod ops;
/// Process hygiene: what workers leave behind (children, escapees, pipes),
/// workers that hop process groups, empty IPC records.
mod procs;
/// Property tests: config, wire, control and sd_notify parsers never panic; codecs round-trip.
mod props;
/// The recipes for Python (http.server, gunicorn, uvicorn) and Go, as
/// complete programs against the real runtimes: nothing lost across restarts.
mod recipes;
/// `dispatch = reuseport`: a listener per worker slot; restarts, crashes,
/// scaling and `empty_pool` with them.
mod reuseport;
/// `protocol = systemd`: the Node.js shop and Python programs as workers.
mod systemd;
/// `clusterctl upgrade` and SIGUSR2: clusterd re-executes itself in place,
/// keeping every worker, as PID 1 too; binaries that cannot take over.
mod upgrade;
