//! `loadgen`: the command-line face of `clusterd_bench`, for the benchmark suite.
//!
//! Exit status: 0 when every request got a 2xx, 1 when any failed, 2 on a usage error (bad
//! arguments, a non-loopback address).

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clusterd_bench::{MAX_CONNECTIONS, MAX_THREADS, Method, Spec};

const USAGE: &str = "\
usage: loadgen URL [-c CONNS] [-t THREADS] [-d DURATION] [-n REQUESTS] [--new-conn] [--post BODY]
               [--timeout DURATION] [--no-retry] [--json]

HTTP/1.1 load generator for clusterd's benchmarks. Loopback addresses only.

  URL                     http://HOST[:PORT]/PATH, HOST a loopback address or name
  -c, --connections N     concurrent connections, 1 to 512 (default 10)
  -t, --threads N         threads sharing the connections, each an event loop,
                          1 to 64 (default 1)
  -d, --duration D        stop after this long (default 10s when -n is not given)
  -n, --requests N        stop after N requests in total
      --new-conn          open a new connection per request (Connection: close)
      --post BODY         send POST with BODY instead of GET
      --timeout D         per-request timeout (default 10s)
      --no-retry          do not retry a GET whose reused keep-alive connection the
                          server closed before answering (counted as idle close)
      --json              print the report as one JSON object
  -h, --help              print this help

Durations take ms, s, m or h, e.g. 500ms, 10s, 2m.
Exit status: 0 no failed request, 1 some requests failed, 2 usage error.";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    /// `--help`.
    Help,
    /// Generate load.
    Run {
        /// The load.
        spec: Spec,
        /// The URL as given, for the heading.
        url: String,
        /// Print JSON instead of the table.
        json: bool,
    },
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Run { spec, url, json }) => run(&spec, &url, json),
        Err(msg) => {
            eprintln!("loadgen: {msg}\n(see loadgen --help)");
            ExitCode::from(2)
        }
    }
}

/// Runs the load and prints the report.
fn run(spec: &Spec, url: &str, json: bool) -> ExitCode {
    let report = match clusterd_bench::run(spec) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("loadgen: {err}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", report.to_json());
    } else {
        let mode = if spec.keep_alive {
            "keep-alive"
        } else {
            "new connection per request"
        };
        let mut bounds = Vec::new();
        if let Some(d) = spec.duration {
            bounds.push(format!("for {d:?}"));
        }
        if let Some(n) = spec.max_requests {
            bounds.push(format!("at most {n} requests"));
        }
        println!(
            "{} {url}: {} connections, {mode}, {}\n",
            spec.method.as_str(),
            spec.connections,
            bounds.join(", ")
        );
        print!("{report}");
    }
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Parses the arguments after the program name.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut url = None;
    let mut connections = None;
    let mut threads = None;
    let mut duration = None;
    let mut max_requests = None;
    let mut keep_alive = true;
    let mut post = None;
    let mut timeout = None;
    let mut retry = true;
    let mut json = false;
    while let Some(arg) = args.next() {
        // `--name=value` is the same as `--name value`.
        let (name, mut inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .take()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-c" | "--connections" => connections = Some(number(&name, &value("a number")?)?),
            "-t" | "--threads" => threads = Some(number(&name, &value("a number")?)?),
            "-d" | "--duration" => duration = Some(parse_duration(&value("a duration")?)?),
            "-n" | "--requests" => max_requests = Some(number(&name, &value("a number")?)?),
            "--new-conn" => keep_alive = false,
            "--post" => post = Some(value("a body")?),
            "--timeout" => timeout = Some(parse_duration(&value("a duration")?)?),
            "--no-retry" => retry = false,
            "--json" => json = true,
            _ if name.starts_with('-') && name != "-" => {
                return Err(format!("unknown option {name}"));
            }
            _ if url.is_none() => url = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
        if inline.is_some() {
            return Err(format!("{name} takes no value"));
        }
    }
    let url = url.ok_or("missing URL")?;
    let (addr, path) = parse_url(&url)?;
    let mut spec = Spec::new(addr);
    spec.path = path;
    spec.keep_alive = keep_alive;
    spec.retry_idle_close = retry;
    if let Some(body) = post {
        spec.method = Method::Post;
        spec.body = body.into_bytes();
    }
    if let Some(c) = connections {
        if c == 0 || c > MAX_CONNECTIONS as u64 {
            return Err(format!("-c must be 1 to {MAX_CONNECTIONS}"));
        }
        spec.connections = c as usize;
    }
    if let Some(t) = threads {
        if t == 0 || t > MAX_THREADS as u64 {
            return Err(format!("-t must be 1 to {MAX_THREADS}"));
        }
        spec.threads = t as usize;
    }
    if let Some(t) = timeout {
        spec.timeout = t;
    }
    spec.max_requests = max_requests;
    spec.duration = match (duration, max_requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    Ok(Command::Run { spec, url, json })
}

/// Parses a positive whole number.
fn number(name: &str, s: &str) -> Result<u64, String> {
    match s.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} needs a positive whole number, not {s:?}")),
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "invalid duration {s:?}: expected a whole number and a unit (ms, s, m, h), e.g. 10s"
        )
    };
    let digits = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let n: u64 = s[..digits].parse().map_err(|_| err())?;
    let duration = match &s[digits..] {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if duration.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    Ok(duration)
}

/// Splits `http://HOST[:PORT][/PATH]` into a loopback address and a request target.
fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("unsupported URL {url:?}: expected http://HOST[:PORT]/PATH"))?;
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("bad host in URL {url:?}"));
    }
    // The port is after the last colon, unless that colon is inside [v6].
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("bad port in URL {url:?}"))?;
            (host, port)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.ip().to_canonical().is_loopback())
        .ok_or_else(|| {
            format!(
                "refusing to load {host}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
            )
        })?;
    Ok((*addr, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Command, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    fn spec(s: &str) -> Spec {
        match args(s) {
            Ok(Command::Run { spec, .. }) => spec,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_options() {
        let s = spec("http://127.0.0.1:3000/products/1");
        assert_eq!(s.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(s.path, "/products/1");
        assert_eq!(s.connections, 10);
        assert_eq!(s.duration, Some(Duration::from_secs(10)));
        assert_eq!(s.max_requests, None);
        assert!(s.keep_alive && s.retry_idle_close);
        assert_eq!(s.method, Method::Get);

        let s = spec(
            "-c 64 -n 1000 --new-conn --post {\"a\":1} --timeout=500ms --no-retry http://[::1]:8080",
        );
        assert_eq!(s.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(s.path, "/");
        assert_eq!(s.connections, 64);
        assert_eq!(s.duration, None, "-n alone is the bound");
        assert_eq!(s.max_requests, Some(1000));
        assert!(!s.keep_alive && !s.retry_idle_close);
        assert_eq!(s.method, Method::Post);
        assert_eq!(s.body, b"{\"a\":1}");
        assert_eq!(s.timeout, Duration::from_millis(500));

        let s = spec("http://localhost:9/x?y=1#frag -d 2m");
        assert!(s.addr.ip().is_loopback());
        assert_eq!(s.path, "/x?y=1");
        assert_eq!(s.duration, Some(Duration::from_secs(120)));
        assert_eq!(spec("http://127.0.0.1?q").path, "/?q");
        assert_eq!(spec("http://127.0.0.1").addr.port(), 80);
        assert!(matches!(
            args("--json http://127.0.0.1/"),
            Ok(Command::Run { json: true, .. })
        ));
        assert_eq!(args("x -h"), Ok(Command::Help));
    }

    #[test]
    fn usage_errors() {
        for (line, want) in [
            ("", "missing URL"),
            ("http://10.0.0.1/", "only loopback"),
            ("https://127.0.0.1/", "unsupported URL"),
            ("127.0.0.1:80", "unsupported URL"),
            ("http://127.0.0.1:99999/", "bad port"),
            ("http://u@127.0.0.1/", "bad host"),
            ("http://127.0.0.1/ -c 0", "positive whole number"),
            ("http://127.0.0.1/ -c 513", "1 to 512"),
            ("http://127.0.0.1/ -d 10", "invalid duration"),
            ("http://127.0.0.1/ -d 0s", "more than zero"),
            ("http://127.0.0.1/ --timeout 1x", "invalid duration"),
            ("http://127.0.0.1/ -n", "-n needs a number"),
            ("http://127.0.0.1/ --bogus", "unknown option --bogus"),
            ("http://127.0.0.1/ --json=yes", "takes no value"),
            ("http://127.0.0.1/ http://127.0.0.1/", "unexpected argument"),
        ] {
            let err = args(line).expect_err(line);
            assert!(err.contains(want), "{line:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "1.5s", "-1s", "10", "10 s", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
