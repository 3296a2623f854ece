//! The supervisor's guarantees (DESIGN.md, guarantees 1 to 4 and 6), end to
//! end: the real `clusterd`, real workers (examples/shop, examples/testworker
//! and plain programs such as /bin/false), real sockets on 127.0.0.1.
//!
//! Each test keeps its pool small (1 or 2 workers) so that the suite stays
//! fast and steady on a loaded 2-core machine running two tests at a time.

/// Config errors and the command line.
mod config;
/// kill -9 of a worker, crash loops and their backoff.
mod crashes;
/// Rolling restarts (HUP): under load, aborted, with clients that go away.
mod restart;
/// TTIN / TTOU.
mod scaling;
/// Serving from the listener clusterd hands out; what a worker inherits.
mod serving;
/// Drain deadlines, TERM, QUIT, and clusterd itself killed.
mod stop;
