//! The shutdown signal: [`Shutdown`], a cloneable future that resolves once
//! the worker should drain, and [`ShutdownReason`], why.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use event_listener::{Event, EventListener};

/// Why the worker is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// clusterd sent `Drain`; it sends SIGKILL once `timeout` has passed.
    Drain {
        /// How long clusterd waits before SIGKILL.
        timeout: Duration,
    },
    /// The channel to clusterd closed (clusterd exited), or the [`Worker`](super::Worker)
    /// was dropped.
    Disconnected,
    /// SIGTERM arrived (`docker stop`, systemd, or clusterd's parent-death
    /// signal).
    Terminate,
    /// SIGINT arrived (Ctrl-C).
    Interrupt,
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Drain { timeout } => {
                write!(
                    f,
                    "DRAIN from clusterd, SIGKILL after {}",
                    crate::lifecycle::human(*timeout)
                )
            }
            ShutdownReason::Disconnected => f.write_str("the channel to clusterd closed"),
            ShutdownReason::Terminate => f.write_str("SIGTERM"),
            ShutdownReason::Interrupt => f.write_str("SIGINT"),
        }
    }
}

#[derive(Default)]
pub(super) struct ShutdownState {
    reason: OnceLock<ShutdownReason>,
    triggered: Event,
}

impl ShutdownState {
    /// Records `reason` unless a shutdown already began; wakes every waiter.
    pub(super) fn trigger(&self, reason: ShutdownReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.triggered.notify(usize::MAX);
        }
        first
    }

    pub(super) fn reason(&self) -> Option<ShutdownReason> {
        self.reason.get().copied()
    }

    pub(super) fn is_triggered(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// A future that resolves, with the reason, once the worker should drain.
///
/// Cloning is cheap; every clone resolves. Awaiting it again after it
/// resolved returns the same reason at once.
#[must_use = "futures do nothing unless awaited"]
pub struct Shutdown {
    state: Arc<ShutdownState>,
    /// Registered with `state.triggered` once polled.
    listener: Option<EventListener>,
}

impl Shutdown {
    pub(super) fn new(state: Arc<ShutdownState>) -> Shutdown {
        Shutdown {
            state,
            listener: None,
        }
    }

    /// Whether the shutdown has begun, without waiting.
    pub fn is_triggered(&self) -> bool {
        self.state.is_triggered()
    }

    /// Why the shutdown began, if it has.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.state.reason()
    }
}

impl Future for Shutdown {
    type Output = ShutdownReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ShutdownReason> {
        let this = self.get_mut();
        loop {
            if let Some(reason) = this.state.reason() {
                this.listener = None;
                return Poll::Ready(reason);
            }
            match this.listener.as_mut() {
                // Registered before the check above, so no trigger is missed.
                None => this.listener = Some(this.state.triggered.listen()),
                Some(listener) => {
                    std::task::ready!(Pin::new(listener).poll(cx));
                    this.listener = None;
                }
            }
        }
    }
}

impl Clone for Shutdown {
    fn clone(&self) -> Shutdown {
        Shutdown::new(self.state.clone())
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("reason", &self.reason())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_reasons_read_well() {
        let drain = ShutdownReason::Drain {
            timeout: Duration::from_secs(30),
        };
        assert_eq!(drain.to_string(), "DRAIN from clusterd, SIGKILL after 30s");
        assert_eq!(ShutdownReason::Terminate.to_string(), "SIGTERM");
    }
}
