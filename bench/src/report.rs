//! The result of a run: counts per outcome, latency, per-worker counts; as a table or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::Histogram;

/// Distinct `X-Worker` values counted; further values are counted under [`OTHER_WORKERS`].
const MAX_WORKERS: usize = 1024;
/// The key in [`Report::workers`] that counts responses from workers beyond the first 1024
/// distinct `X-Worker` values.
pub const OTHER_WORKERS: &str = "(other)";
/// Distinct error messages kept as samples.
const MAX_ERROR_SAMPLES: usize = 16;

/// How one request ended. Each request is counted exactly once, under its final outcome: a GET
/// retried after an idle close counts once, as whatever the retry got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A complete response with this status.
    Status(u16),
    /// See [`Report::connect_error`].
    ConnectError,
    /// See [`Report::reset`].
    Reset,
    /// See [`Report::eof_before_response`].
    EofBeforeResponse,
    /// See [`Report::idle_close`].
    IdleClose,
    /// See [`Report::eof_mid_response`].
    EofMidResponse,
    /// See [`Report::timeout`].
    Timeout,
    /// See [`Report::bad_response`].
    BadResponse,
    /// See [`Report::other_error`].
    OtherError,
}

/// What a run (or a [`snapshot`](crate::Running::snapshot) of one) did.
///
/// `total = ok + non-2xx + every error count`; [`Report::failed`] is everything but `ok`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests finished, whatever the outcome.
    pub total: u64,
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests answered with another status, by status code.
    pub non_2xx: BTreeMap<u16, u64>,
    /// Requests that could not connect (refused, or no answer to the SYN within the timeout).
    pub connect_error: u64,
    /// Requests whose connection was reset (ECONNRESET, EPIPE, ECONNABORTED), except the idle
    /// case counted by `idle_close`.
    pub reset: u64,
    /// Requests on a new connection that the server closed without sending a byte.
    pub eof_before_response: u64,
    /// Requests on a reused keep-alive connection that the server closed (EOF or reset) before
    /// sending a byte of the response, and that were not retried (POST, a retry that hit the
    /// same, or `retry_idle_close` off).
    pub idle_close: u64,
    /// Requests whose connection ended after part of the response.
    pub eof_mid_response: u64,
    /// Requests that did not finish within the timeout (after connecting).
    pub timeout: u64,
    /// Requests answered with something that is not valid HTTP/1.x.
    pub bad_response: u64,
    /// Requests that failed with any other I/O error.
    pub other_error: u64,
    /// GETs retried on a new connection after an idle close. Informational: the request
    /// itself is counted once, under what the retry got.
    pub retried: u64,
    /// Latency of every request that got a complete response (2xx or not), from the start of
    /// the request (connect included, retries included) to the last byte of the response.
    pub latency: Histogram,
    /// Complete responses (any status) per `X-Worker` header value.
    pub workers: BTreeMap<String, u64>,
    /// Connections per `X-Worker` value of their first response: which worker accepted
    /// them. With keep-alive, the split of the connections among the workers.
    pub connections: BTreeMap<String, u64>,
    /// Sample error messages (`phase: error`) with counts, for diagnosis; at most 16 distinct.
    pub errors: BTreeMap<String, u64>,
    /// Time from the start of the run to its end (or to the snapshot).
    pub elapsed: Duration,
}

impl Report {
    /// Requests that did not get a 2xx: non-2xx responses plus every error. A GET that was
    /// retried after an idle close and then succeeded is not a failure.
    pub fn failed(&self) -> u64 {
        self.total - self.ok
    }

    /// Requests answered with a status outside 2xx.
    pub fn non_2xx_total(&self) -> u64 {
        self.non_2xx.values().sum()
    }

    /// Requests that got no complete response.
    pub fn errors_total(&self) -> u64 {
        self.failed() - self.non_2xx_total()
    }

    /// Finished requests per second of `elapsed`.
    pub fn requests_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.total as f64 / secs
        } else {
            0.0
        }
    }

    /// Median latency, to about 1%.
    pub fn p50(&self) -> Duration {
        self.latency.quantile(0.5)
    }

    /// 99th percentile latency, to about 1%.
    pub fn p99(&self) -> Duration {
        self.latency.quantile(0.99)
    }

    /// Largest latency, exact to the microsecond.
    pub fn max_latency(&self) -> Duration {
        self.latency.max()
    }

    /// Counts one connection, by the worker that answered its first response.
    pub(crate) fn record_connection(&mut self, worker: &str) {
        count_capped(&mut self.connections, worker, MAX_WORKERS, OTHER_WORKERS);
    }

    /// Counts one finished request.
    pub(crate) fn record(
        &mut self,
        outcome: Outcome,
        latency: Duration,
        worker: Option<&str>,
        retried: bool,
    ) {
        self.total += 1;
        self.retried += u64::from(retried);
        let counter = match outcome {
            Outcome::Status(status) => {
                self.latency.record(latency);
                if let Some(worker) = worker {
                    count_capped(&mut self.workers, worker, MAX_WORKERS, OTHER_WORKERS);
                }
                if (200..300).contains(&status) {
                    &mut self.ok
                } else {
                    self.non_2xx.entry(status).or_default()
                }
            }
            Outcome::ConnectError => &mut self.connect_error,
            Outcome::Reset => &mut self.reset,
            Outcome::EofBeforeResponse => &mut self.eof_before_response,
            Outcome::IdleClose => &mut self.idle_close,
            Outcome::EofMidResponse => &mut self.eof_mid_response,
            Outcome::Timeout => &mut self.timeout,
            Outcome::BadResponse => &mut self.bad_response,
            Outcome::OtherError => &mut self.other_error,
        };
        *counter += 1;
    }

    /// Keeps `message` as a sample error.
    pub(crate) fn sample_error(&mut self, message: &str) {
        count_capped(
            &mut self.errors,
            message,
            MAX_ERROR_SAMPLES,
            "(other errors)",
        );
    }

    /// Adds the counts of `other`; `elapsed` becomes the longer of the two.
    pub(crate) fn merge(&mut self, other: &Report) {
        self.elapsed = self.elapsed.max(other.elapsed);
        self.total += other.total;
        self.ok += other.ok;
        for (status, n) in &other.non_2xx {
            *self.non_2xx.entry(*status).or_default() += n;
        }
        self.connect_error += other.connect_error;
        self.reset += other.reset;
        self.eof_before_response += other.eof_before_response;
        self.idle_close += other.idle_close;
        self.eof_mid_response += other.eof_mid_response;
        self.timeout += other.timeout;
        self.bad_response += other.bad_response;
        self.other_error += other.other_error;
        self.retried += other.retried;
        self.latency.merge(&other.latency);
        for (worker, n) in &other.workers {
            *self.workers.entry(worker.clone()).or_default() += n;
        }
        for (worker, n) in &other.connections {
            *self.connections.entry(worker.clone()).or_default() += n;
        }
        for (message, n) in &other.errors {
            *self.errors.entry(message.clone()).or_default() += n;
        }
    }

    /// The report as one JSON object, all latencies in microseconds:
    ///
    /// ```json
    /// {"total":1000,"ok":998,"failed":2,"non_2xx":{"503":1},"connect_error":0,"reset":0,
    ///  "eof_before_response":0,"idle_close":0,"eof_mid_response":1,"timeout":0,
    ///  "bad_response":0,"other_error":0,"retried":3,
    ///  "latency_us":{"p50":850,"p90":1200,"p99":2100,"max":5300,"mean":900},
    ///  "workers":{"1":500,"2":499},"connections":{"1":5,"2":5},"errors":{"read: ...":1},
    ///  "elapsed_s":1.02,"requests_per_sec":980.4}
    /// ```
    pub fn to_json(&self) -> String {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let non_2xx: serde_json::Map<String, serde_json::Value> = self
            .non_2xx
            .iter()
            .map(|(status, n)| (status.to_string(), (*n).into()))
            .collect();
        serde_json::json!({
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed(),
            "non_2xx": non_2xx,
            "connect_error": self.connect_error,
            "reset": self.reset,
            "eof_before_response": self.eof_before_response,
            "idle_close": self.idle_close,
            "eof_mid_response": self.eof_mid_response,
            "timeout": self.timeout,
            "bad_response": self.bad_response,
            "other_error": self.other_error,
            "retried": self.retried,
            "latency_us": {
                "p50": us(self.p50()),
                "p90": us(self.latency.quantile(0.9)),
                "p99": us(self.p99()),
                "max": us(self.max_latency()),
                "mean": us(self.latency.mean()),
            },
            "workers": self.workers,
            "connections": self.connections,
            "errors": self.errors,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_sec": self.requests_per_sec(),
        })
        .to_string()
    }
}

/// Adds one to `map[key]`, or to `map[overflow]` once `cap` keys exist.
fn count_capped(map: &mut BTreeMap<String, u64>, key: &str, cap: usize, overflow: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < cap {
        map.insert(key.to_string(), 1);
    } else {
        *map.entry(overflow.to_string()).or_default() += 1;
    }
}

/// A latency for people: `850µs`, `12.3ms`, `1.20s`.
struct Human(Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us < 1000 {
            write!(f, "{us}µs")
        } else if us < 100_000 {
            write!(f, "{:.2}ms", us as f64 / 1e3)
        } else if us < 1_000_000 {
            write!(f, "{:.1}ms", us as f64 / 1e3)
        } else {
            write!(f, "{:.2}s", us as f64 / 1e6)
        }
    }
}

/// The human table, e.g.:
///
/// ```text
/// requests     12000 in 2.00s (6000.0/s)
/// ok           11998
/// failed       2
///   non-2xx                 1 (503: 1)
///   timeout                 1
/// retried      3 (idle keep-alive closed by the server; GET retried on a new connection)
/// latency      p50 850µs  p90 1.20ms  p99 2.10ms  max 5.30ms
/// workers      1: 6000  2: 5999
/// ```
///
/// Error lines appear only when non-zero.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests     {} in {:.2}s ({:.1}/s)",
            self.total,
            self.elapsed.as_secs_f64(),
            self.requests_per_sec()
        )?;
        writeln!(f, "ok           {}", self.ok)?;
        writeln!(f, "failed       {}", self.failed())?;
        if !self.non_2xx.is_empty() {
            let by_status: Vec<String> = self
                .non_2xx
                .iter()
                .map(|(status, n)| format!("{status}: {n}"))
                .collect();
            writeln!(
                f,
                "  non-2xx                 {} ({})",
                self.non_2xx_total(),
                by_status.join(", ")
            )?;
        }
        for (label, n) in [
            ("connect error", self.connect_error),
            ("reset", self.reset),
            ("eof before response", self.eof_before_response),
            ("idle close, not retried", self.idle_close),
            ("eof mid-response", self.eof_mid_response),
            ("timeout", self.timeout),
            ("bad response", self.bad_response),
            ("other error", self.other_error),
        ] {
            if n > 0 {
                writeln!(f, "  {label:<23} {n}")?;
            }
        }
        if self.retried > 0 {
            writeln!(
                f,
                "retried      {} (idle keep-alive closed by the server; GET retried on a new connection)",
                self.retried
            )?;
        }
        if self.latency.count() > 0 {
            writeln!(
                f,
                "latency      p50 {}  p90 {}  p99 {}  max {}",
                Human(self.p50()),
                Human(self.latency.quantile(0.9)),
                Human(self.p99()),
                Human(self.max_latency())
            )?;
        }
        if !self.workers.is_empty() {
            let counts: Vec<String> = self
                .workers
                .iter()
                .map(|(worker, n)| format!("{worker}: {n}"))
                .collect();
            writeln!(f, "workers      {}", counts.join("  "))?;
        }
        if !self.connections.is_empty() && self.connections != self.workers {
            let counts: Vec<String> = self
                .connections
                .iter()
                .map(|(worker, n)| format!("{worker}: {n}"))
                .collect();
            writeln!(f, "connections  {}", counts.join("  "))?;
        }
        for (message, n) in &self.errors {
            writeln!(f, "error        {n} × {message}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::default();
        let ms = Duration::from_millis;
        r.record(Outcome::Status(200), ms(1), Some("1"), false);
        r.record(Outcome::Status(204), ms(2), Some("2"), true);
        r.record(Outcome::Status(503), ms(3), Some("2"), false);
        r.record(Outcome::Timeout, ms(10), None, false);
        r.record(Outcome::IdleClose, ms(1), None, true);
        r.sample_error("read: timed out");
        r.elapsed = Duration::from_secs(2);
        r
    }

    #[test]
    fn counts_and_failed() {
        let r = sample();
        assert_eq!((r.total, r.ok, r.failed(), r.retried), (5, 2, 3, 2));
        assert_eq!(r.non_2xx_total(), 1);
        assert_eq!(r.errors_total(), 2);
        assert_eq!(
            r.latency.count(),
            3,
            "only complete responses have a latency"
        );
        assert_eq!(r.max_latency(), Duration::from_millis(3));
        assert_eq!(r.requests_per_sec(), 2.5);
        let mut merged = Report::default();
        merged.merge(&r);
        merged.merge(&r);
        assert_eq!((merged.total, merged.ok, merged.timeout), (10, 4, 2));
        assert_eq!(merged.workers["2"], 4);
        assert_eq!(merged.non_2xx[&503], 2);
    }

    #[test]
    fn caps_distinct_keys() {
        let mut r = Report::default();
        for i in 0..MAX_WORKERS + 5 {
            r.record(
                Outcome::Status(200),
                Duration::ZERO,
                Some(&i.to_string()),
                false,
            );
        }
        assert_eq!(r.workers.len(), MAX_WORKERS + 1);
        assert_eq!(r.workers[OTHER_WORKERS], 5);
    }

    #[test]
    fn json_round_trips() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["total"], 5);
        assert_eq!(v["failed"], 3);
        assert_eq!(v["non_2xx"]["503"], 1);
        assert_eq!(v["idle_close"], 1);
        assert_eq!(v["retried"], 2);
        assert_eq!(v["workers"]["2"], 2);
        assert_eq!(v["latency_us"]["max"], 3000);
        assert_eq!(v["errors"]["read: timed out"], 1);
        assert_eq!(v["requests_per_sec"], 2.5);
    }

    #[test]
    fn table() {
        let text = sample().to_string();
        for want in [
            "requests     5 in 2.00s (2.5/s)",
            "failed       3",
            "  non-2xx                 1 (503: 1)",
            "  timeout                 1",
            "  idle close, not retried 1",
            "retried      2",
            "max 3.00ms",
            "workers      1: 1  2: 2",
            "error        1 × read: timed out",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(
            !text.contains("reset"),
            "zero counts are not shown:\n{text}"
        );
    }
}
