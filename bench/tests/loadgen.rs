//! The load tool against `util::TestServer`: counting, classification, bounds, start/stop,
//! and the `loadgen` binary. Every test is bounded by `max_requests` or `duration` and by
//! short request timeouts; waits poll with a deadline.

mod util;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use clusterd_bench::{Method, Report, Spec};
use util::{Reply, TestServer};

/// A spec for `server` with `connections` connections and `n` requests, a 5 s timeout.
fn spec(server: &TestServer, connections: usize, n: u64) -> Spec {
    Spec {
        connections,
        max_requests: Some(n),
        timeout: Duration::from_secs(5),
        ..Spec::new(server.addr())
    }
}

/// Runs `spec`, printing the report so that a failing test shows it.
fn run(spec: &Spec) -> Report {
    let report = clusterd_bench::run(spec).expect("run");
    println!("{report}");
    report
}

/// A raw HTTP/1.1 200 response with this (raw) body framing.
fn raw(bytes: &str, close: bool) -> Reply {
    Reply::Raw {
        bytes: bytes.as_bytes().to_vec(),
        close,
    }
}

#[test]
fn counts_ok_and_responses_per_worker() {
    let server = TestServer::start(|req| Reply::from_worker(req.n % 4));
    let r = run(&spec(&server, 4, 400));
    assert_eq!((r.total, r.ok, r.failed()), (400, 400, 0));
    assert_eq!(r.workers.len(), 4);
    assert!(r.workers.values().all(|&n| n == 100), "{:?}", r.workers);
    assert_eq!(server.requests(), 400);
    // At most one per connection thread: a thread may find the budget spent before it starts.
    assert!(
        server.connections() <= 4,
        "keep-alive connections are reused"
    );
    assert_eq!(r.latency.count(), 400);
    assert!(r.p50() <= r.p99() && r.p99() <= r.max_latency());
    assert!(r.max_latency() > Duration::ZERO);
    assert!(r.requests_per_sec() > 0.0);
}

#[test]
fn non_2xx_are_counted_by_status() {
    let server = TestServer::start(|req| match req.n % 4 {
        0 => Reply::status(503),
        1 => Reply::status(404),
        2 => Reply::status(204),
        _ => Reply::status(200),
    });
    let r = run(&spec(&server, 2, 100));
    assert_eq!((r.total, r.ok, r.failed()), (100, 50, 50));
    assert_eq!(r.non_2xx.get(&503), Some(&25));
    assert_eq!(r.non_2xx.get(&404), Some(&25));
    assert_eq!(r.non_2xx_total(), 50);
    assert_eq!(r.errors_total(), 0);
    assert_eq!(
        r.latency.count(),
        100,
        "non-2xx responses have a latency too"
    );
}

#[test]
fn chunked_bodies_keep_the_connection() {
    let server = TestServer::start(|_| {
        raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Worker: c\r\n\r\n\
             5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n",
            false,
        )
    });
    let r = run(&spec(&server, 2, 50));
    assert_eq!((r.ok, r.failed()), (50, 0));
    assert_eq!(r.workers.get("c"), Some(&50));
    assert!(server.connections() <= 2, "each body was read to its end");
}

#[test]
fn bodies_delimited_by_eof_end_the_connection() {
    let server = TestServer::start(|_| raw("HTTP/1.1 200 OK\r\n\r\nuntil the end", true));
    let r = run(&spec(&server, 2, 20));
    assert_eq!((r.ok, r.failed(), r.retried), (20, 0, 0));
    assert_eq!(server.connections(), 20);
}

#[test]
fn connection_close_from_the_server_is_not_an_error() {
    // Each connection serves three requests, the third with `Connection: close`, as a
    // draining worker does.
    let server = TestServer::start(|req| Reply::Respond {
        status: 200,
        headers: Vec::new(),
        body: b"ok".to_vec(),
        close: req.on_conn == 2,
    });
    let r = run(&spec(&server, 2, 60));
    assert_eq!((r.ok, r.failed(), r.retried), (60, 0, 0));
    let conns = server.connections();
    assert!((20..=21).contains(&conns), "{conns} connections");
}

#[test]
fn new_connection_per_request() {
    let server = TestServer::start(|req| {
        if req.close {
            Reply::from_worker(1)
        } else {
            Reply::status(400)
        }
    });
    let r = run(&Spec {
        keep_alive: false,
        ..spec(&server, 3, 30)
    });
    assert_eq!((r.ok, r.failed()), (30, 0));
    assert_eq!(server.connections(), 30);
}

#[test]
fn post_sends_the_body() {
    let server = TestServer::start(|req| {
        if req.method == "POST" && req.path == "/orders?x=1" && req.body == b"{\"id\":7}" {
            Reply::status(201)
        } else {
            Reply::status(400)
        }
    });
    let r = run(&Spec {
        method: Method::Post,
        path: "/orders?x=1".into(),
        body: b"{\"id\":7}".to_vec(),
        ..spec(&server, 2, 20)
    });
    assert_eq!((r.ok, r.failed()), (20, 0));
}

#[test]
fn connect_errors() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let r = run(&Spec {
        connections: 1,
        max_requests: Some(5),
        ..Spec::new(addr)
    });
    assert_eq!((r.total, r.connect_error, r.failed()), (5, 5, 5));
    assert_eq!(r.latency.count(), 0);
    assert!(
        r.errors.keys().any(|e| e.starts_with("connect: ")),
        "{:?}",
        r.errors
    );
}

#[test]
fn a_server_that_never_answers_times_out() {
    let server = TestServer::start(|_| Reply::Hang);
    let timeout = Duration::from_millis(200);
    let r = run(&Spec {
        timeout,
        ..spec(&server, 1, 2)
    });
    assert_eq!((r.total, r.timeout, r.failed()), (2, 2, 2));
    assert!(r.elapsed >= 2 * timeout, "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[test]
fn a_reset_connection_is_a_reset() {
    // Closing a socket with unread data makes the kernel send RST: accept, wait for the
    // request to arrive, and drop the connection without reading it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..3 {
            let (stream, _) = listener.accept().unwrap();
            let _ = stream.peek(&mut [0; 1]);
        }
    });
    let r = run(&Spec {
        connections: 1,
        max_requests: Some(3),
        timeout: Duration::from_secs(5),
        ..Spec::new(addr)
    });
    server.join().unwrap();
    assert_eq!((r.total, r.reset, r.failed()), (3, 3, 3));
}

#[test]
fn eof_in_the_middle_of_the_response() {
    let server =
        TestServer::start(|_| raw("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", true));
    let r = run(&spec(&server, 1, 4));
    assert_eq!((r.total, r.eof_mid_response, r.failed()), (4, 4, 4));
}

#[test]
fn eof_before_the_response_on_a_new_connection_is_not_retried() {
    let server = TestServer::start(|_| Reply::Close);
    let r = run(&spec(&server, 1, 4));
    assert_eq!(
        (r.total, r.eof_before_response, r.idle_close, r.retried),
        (4, 4, 0, 0)
    );
    assert_eq!(server.requests(), 4);
}

#[test]
fn a_bad_response_is_counted() {
    let server = TestServer::start(|_| raw("HTTP/1.1 2OO OK\r\n\r\n", true));
    let r = run(&spec(&server, 1, 3));
    assert_eq!((r.total, r.bad_response), (3, 3));
}

/// Answers the first request of each connection, then reads the second and closes without a
/// word: what a client sees when its request crosses the server's close of an idle
/// keep-alive connection.
fn closes_idle_connections() -> TestServer {
    TestServer::start(|req| {
        if req.on_conn == 0 {
            Reply::from_worker(1)
        } else {
            Reply::Close
        }
    })
}

#[test]
fn idle_close_get_is_retried_on_a_new_connection() {
    let server = closes_idle_connections();
    let r = run(&spec(&server, 1, 10));
    // Request 1 opens a connection; each later one finds its connection closed, is retried on
    // a new one, and gets its answer there.
    assert_eq!((r.total, r.ok, r.failed(), r.retried), (10, 10, 0, 9));
    assert_eq!(server.requests(), 19);
    assert_eq!(server.connections(), 10);
}

#[test]
fn idle_close_post_is_not_retried() {
    let server = closes_idle_connections();
    let r = run(&Spec {
        method: Method::Post,
        body: b"x".to_vec(),
        ..spec(&server, 1, 10)
    });
    assert_eq!((r.total, r.ok, r.idle_close, r.retried), (10, 5, 5, 0));
    assert_eq!(r.failed(), 5);
    assert_eq!(server.requests(), 10);
}

#[test]
fn idle_close_retry_can_be_turned_off() {
    let server = closes_idle_connections();
    let r = run(&Spec {
        retry_idle_close: false,
        ..spec(&server, 1, 10)
    });
    assert_eq!((r.ok, r.idle_close, r.retried), (5, 5, 0));
}

#[test]
fn idle_close_racing_the_next_request_is_retried() {
    // The server closes right after each response, without saying so: the next request is
    // written to a connection that is closing or closed, and fails with EOF or a reset.
    let server = TestServer::start(|_| raw("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true));
    let r = run(&spec(&server, 1, 20));
    assert_eq!((r.ok, r.failed()), (20, 0));
    assert_eq!(r.retried, 19, "all but the first request");
}

#[test]
fn max_requests_is_exact() {
    let server = TestServer::start(|_| Reply::status(200));
    let r = run(&spec(&server, 8, 1000));
    assert_eq!((r.total, r.ok), (1000, 1000));
    assert_eq!(server.requests(), 1000);
}

#[test]
fn duration_bounds_the_run() {
    let server = TestServer::start(|_| Reply::status(200));
    let duration = Duration::from_millis(300);
    let r = run(&Spec {
        connections: 2,
        duration: Some(duration),
        timeout: Duration::from_secs(5),
        ..Spec::new(server.addr())
    });
    assert!(r.total > 0);
    assert_eq!(r.failed(), 0);
    assert!(r.elapsed >= duration, "{:?}", r.elapsed);
    assert!(
        r.elapsed < duration + Duration::from_secs(5),
        "{:?}",
        r.elapsed
    );
    assert_eq!(server.requests(), r.total);
}

#[test]
fn start_snapshot_stop() {
    let server = TestServer::start(|req| Reply::from_worker(req.n % 2));
    let load = clusterd_bench::start(Spec {
        connections: 2,
        timeout: Duration::from_secs(5),
        ..Spec::new(server.addr())
    })
    .unwrap();
    assert!(
        load.wait_for_ok(50, Duration::from_secs(10)),
        "load is not flowing"
    );
    let snapshot = load.snapshot();
    assert!(snapshot.ok >= 50);
    assert!(!load.is_finished());
    let report = load.stop();
    println!("{report}");
    assert!(report.ok >= snapshot.ok);
    assert_eq!(report.failed(), 0);
    assert_eq!(
        report.total,
        server.requests(),
        "requests in flight were finished and counted"
    );
    assert_eq!(report.workers.values().sum::<u64>(), report.total);
}

#[test]
fn stop_handle_from_another_thread() {
    let server = TestServer::start(|_| Reply::status(200));
    let load = clusterd_bench::start(Spec {
        connections: 1,
        ..Spec::new(server.addr())
    })
    .unwrap();
    let stop = load.stop_handle();
    assert!(load.wait_for_ok(10, Duration::from_secs(10)));
    thread::spawn(move || stop.trigger()).join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !load.is_finished() {
        assert!(Instant::now() < deadline, "the load did not stop");
        thread::sleep(Duration::from_millis(1));
    }
    let report = load.wait();
    assert_eq!(report.failed(), 0);
    assert_eq!(report.total, server.requests());
}

#[test]
fn wait_for_ok_gives_up_when_the_run_ends() {
    let server = TestServer::start(|_| Reply::status(500));
    let load = clusterd_bench::start(spec(&server, 1, 3)).unwrap();
    let started = Instant::now();
    assert!(!load.wait_for_ok(1, Duration::from_secs(10)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(load.wait().non_2xx.get(&500), Some(&3));
}

#[test]
fn get_reads_one_response() {
    let server = TestServer::start(|req| {
        if req.path == "/healthz" && req.close {
            raw(
                "HTTP/1.1 200 OK\r\nx-worker: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nyes\r\n0\r\n\r\n",
                true,
            )
        } else {
            Reply::status(404)
        }
    });
    let resp = clusterd_bench::get(server.addr(), "/healthz").unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("X-Worker"), Some("3"));
    assert_eq!(resp.text(), "yes");
    assert_eq!(
        clusterd_bench::get(server.addr(), "/nope").unwrap().status,
        404
    );
}

#[test]
fn refuses_what_it_should() {
    let remote: SocketAddr = "192.0.2.1:80".parse().unwrap();
    let mut spec = Spec::new(remote);
    spec.max_requests = Some(1);
    for err in [
        clusterd_bench::run(&spec).unwrap_err(),
        clusterd_bench::start(spec).err().unwrap(),
        clusterd_bench::get(remote, "/").unwrap_err(),
    ] {
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("only loopback"), "{err}");
    }
    let unbounded = Spec::new("127.0.0.1:1".parse().unwrap());
    assert_eq!(
        clusterd_bench::run(&unbounded).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
}

/// Runs the `loadgen` binary; returns its exit code and stdout.
fn loadgen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    println!("loadgen {args:?}: {:?}\n{stdout}{stderr}", out.status);
    (out.status.code().expect("exit code"), stdout, stderr)
}

#[test]
fn cli_table_json_and_exit_codes() {
    let server = TestServer::start(|req| {
        if req.path == "/fail" {
            Reply::status(503)
        } else {
            Reply::from_worker(req.n % 2)
        }
    });
    let url = format!("http://{}/products/1", server.addr());

    let (code, out, _) = loadgen(&[&url, "-c", "2", "-n", "20"]);
    assert_eq!(code, 0);
    assert!(out.contains("GET http://"), "{out}");
    assert!(out.contains("ok           20"), "{out}");
    assert!(out.contains("workers      0: 10  1: 10"), "{out}");

    let (code, out, _) = loadgen(&[&url, "-n", "10", "--new-conn", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["ok"], 10);
    assert_eq!(v["failed"], 0);

    let fail = format!("http://{}/fail", server.addr());
    let (code, out, _) = loadgen(&[&fail, "-n", "3", "-c", "1"]);
    assert_eq!(code, 1);
    assert!(out.contains("503: 3"), "{out}");

    let (code, out, _) = loadgen(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("usage: loadgen URL"));

    let (code, _, err) = loadgen(&[&url, "-c"]);
    assert_eq!(code, 2);
    assert!(err.contains("-c needs a number"), "{err}");
    let (code, _, err) = loadgen(&["http://192.0.2.1/"]);
    assert_eq!(code, 2);
    assert!(err.contains("only loopback"), "{err}");
}
