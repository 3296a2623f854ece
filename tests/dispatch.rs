//! `dispatch = clusterd`: clusterd accepts, peeks at the request head and
//! passes each connection to a worker it chooses.
//!
//! Native workers (the shop) and node workers (a tiny `http` app written
//! into the test's folder, no npm needed): the four loads lose nothing over
//! 20 rolling restarts; a crash loses only what the crashed worker held;
//! every sticky mode sends a session to the same worker id every time
//! (`X-Worker`); silent and trickling clients hold up no one; pipelined
//! requests and bodies reach the worker intact; long-lived connections are
//! spread evenly; hostile heads neither crash nor block clusterd.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::util::*;

/// A node app that says which worker answered (`X-Worker`), for GET and
/// POST (the body is read and its length answered).
const NODE_APP: &str = r#"
const http = require('http');
const server = http.createServer((req, res) => {
  res.setHeader('X-Worker', process.env.CLUSTERD_WORKER_ID || '0');
  let n = 0;
  req.on('data', (d) => { n += d.length; });
  req.on('end', () => res.end(JSON.stringify({ path: req.url, bytes: n })));
});
server.listen(3000);
"#;

fn shop(tag: &str, workers: u32, extra: &str) -> Cluster {
    let cluster = Cluster::shop(tag, workers, &format!("dispatch = clusterd\n{extra}"));
    cluster.wait_ready(1);
    cluster
}

fn node(tag: &str, workers: u32, extra: &str) -> Cluster {
    let dir = TempDir::new(tag);
    let app = dir.path().join("app.js");
    std::fs::write(&app, NODE_APP).expect("write the node app");
    let config = format!(
        "exec = node {}\nprotocol = node\nworkers = {workers}\nlisten = 127.0.0.1:0\n\
         dispatch = clusterd\n{extra}\n",
        app.display()
    );
    let cluster = Cluster::start_in(
        dir,
        tag,
        &config,
        std::process::Command::new(clusterd_bin()),
    );
    cluster.wait_ready(1);
    cluster
}

/// `clusterctl restart`, which must succeed.
fn restart(cluster: &Cluster) {
    let out = cluster.ctl(&["restart"]);
    assert!(
        out.status.success(),
        "clusterctl restart failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A GET on a new connection with extra header lines; the worker that
/// answered (`X-Worker`; the shop answers 404 for paths it does not serve).
fn worker_for(addr: SocketAddr, path: &str, headers: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    let resp = exchange(addr, req.as_bytes()).expect("a response");
    assert!(resp.status < 500, "{path} {headers}: {}", resp.status);
    resp.header("x-worker").expect("X-Worker").to_string()
}

fn restarts_lose_nothing(cluster: &Cluster, restarts: u64) {
    let loads = mixed_load(cluster.addr());
    for generation in 2..=restarts + 1 {
        restart(cluster);
        cluster.wait_ready(generation);
        let_loads_run(&loads, 20);
    }
    finish_loads(loads);
    assert!(cluster.events("dispatch.unsupported").is_empty());
    for l in cluster.lines() {
        assert!(
            !matches!(l.event.as_str(), "worker.kill" | "worker.crash"),
            "{}",
            l.raw
        );
    }
}

#[test]
fn native_workers_lose_nothing_over_20_rolling_restarts() {
    let cluster = shop("dispatch-native-restarts", 2, "");
    assert_eq!(cluster.events("dispatch").len(), 1);
    restarts_lose_nothing(&cluster, 20);
}

#[test]
fn native_workers_with_sticky_sessions_lose_nothing_over_20_rolling_restarts() {
    let cluster = shop(
        "dispatch-native-sticky-restarts",
        2,
        "sticky = header:x-user",
    );
    restarts_lose_nothing(&cluster, 20);
}

#[test]
fn node_workers_lose_nothing_over_20_rolling_restarts() {
    let cluster = node("dispatch-node-restarts", 2, "drain_timeout = 30s");
    restarts_lose_nothing(&cluster, 20);
    assert!(cluster.log_text().contains("sticky=off"));
}

/// Under load on new connections, SIGKILL one of two workers: the failures
/// are at most the connections it held at that moment (the load has 2 per
/// mode), and the load goes on without any after the respawn.
#[test]
fn a_crash_loses_only_what_the_crashed_worker_held() {
    let cluster = shop("dispatch-crash", 2, "");
    let addr = cluster.addr();
    let loads = vec![
        (
            "new-connection GET",
            load(addr, 2, false, clusterd_bench::Method::Get),
        ),
        (
            "new-connection POST",
            load(addr, 2, false, clusterd_bench::Method::Post),
        ),
    ];
    let victim = cluster.ready_pid(1, 1);
    kill(victim, rustix::process::Signal::KILL);
    cluster.wait_event("worker.ready", |l| {
        l.num("id") == 1 && l.num("pid") != u64::from(victim)
    });
    let failed_by_then: Vec<u64> = loads.iter().map(|(_, l)| l.snapshot().failed()).collect();
    let_loads_run(&loads, 50);
    for ((name, l), before) in loads.into_iter().zip(failed_by_then) {
        let report = l.stop();
        println!("---- load: {name} ----\n{report}");
        assert!(
            report.failed() <= 2,
            "{name}: more lost than the worker held\n{report}"
        );
        assert_eq!(
            report.failed(),
            before,
            "{name}: failures after the respawn\n{report}"
        );
    }
}

/// Every key goes to one worker id every time; the keys spread over the
/// workers.
fn assert_sticky(addr: SocketAddr, request: impl Fn(usize) -> (String, String)) {
    let mut placed: BTreeMap<usize, String> = BTreeMap::new();
    for round in 0..3 {
        for k in 0..24 {
            let (path, headers) = request(k);
            let w = worker_for(addr, &path, &headers);
            let first = placed.entry(k).or_insert_with(|| w.clone());
            assert_eq!(*first, w, "key {k} moved in round {round}");
        }
    }
    let used: BTreeSet<&String> = placed.values().collect();
    assert!(used.len() >= 2, "every key on one worker: {placed:?}");
}

#[test]
fn query_header_and_cookie_sessions_stay_on_their_worker() {
    for (sticky, request) in [
        (
            "query:user",
            Box::new(|k: usize| (format!("/products/1?a=b&user=u{k}"), String::new()))
                as Box<dyn Fn(usize) -> (String, String)>,
        ),
        (
            "header:X-User",
            Box::new(|k: usize| ("/products/1".to_string(), format!("x-user: u{k}\r\n"))),
        ),
        (
            "cookie:sid",
            Box::new(|k: usize| {
                (
                    "/products/1".to_string(),
                    format!("Cookie: theme=x; sid=s{k}\r\n"),
                )
            }),
        ),
    ] {
        let tag = format!("dispatch-sticky-{}", sticky.split(':').next().unwrap());
        let cluster = shop(&tag, 3, &format!("sticky = {sticky}"));
        assert_sticky(cluster.addr(), request);
        // A request without the key goes by balance: every worker gets some.
        let mut seen = BTreeSet::new();
        for _ in 0..9 {
            seen.insert(worker_for(cluster.addr(), "/products/1", ""));
        }
        assert_eq!(
            seen.len(),
            3,
            "{sticky}: no key, yet not balanced: {seen:?}"
        );
    }
}

#[test]
fn node_cookie_sessions_stay_on_their_worker() {
    let cluster = node("dispatch-node-cookie", 3, "sticky = cookie:sid");
    assert_sticky(cluster.addr(), |k| {
        ("/x".into(), format!("Cookie: sid=s{k}\r\n"))
    });
}

#[test]
fn ip_sessions_stay_on_their_worker() {
    let cluster = shop("dispatch-sticky-ip", 3, "sticky = ip");
    let addr = cluster.addr();
    // One client address: always the same worker, whatever the request.
    let first = worker_for(addr, "/products/1", "");
    for k in 0..12 {
        assert_eq!(
            worker_for(addr, &format!("/products/{k}?user={k}"), ""),
            first
        );
    }
}

/// engine.io ids made by the adapter are `<worker id>.<random>`: each goes
/// to the worker it names; one naming no ready worker goes by balance (and
/// is answered, not dropped).
#[test]
fn socket_io_sids_go_to_the_worker_they_name() {
    for cluster in [
        shop("dispatch-socketio-native", 3, "sticky = socket.io"),
        node("dispatch-socketio-node", 3, "sticky = socket.io"),
    ] {
        let addr = cluster.addr();
        for round in 0..3 {
            for id in 1..=3 {
                let path = format!("/socket.io/?EIO=4&transport=polling&sid={id}.Ab-{round}_x");
                assert_eq!(worker_for(addr, &path, ""), id.to_string(), "{path}");
            }
        }
        let mut seen = BTreeSet::new();
        for k in 0..9 {
            seen.insert(worker_for(addr, &format!("/socket.io/?sid=9.gone{k}"), ""));
            seen.insert(worker_for(addr, "/socket.io/?EIO=4&transport=polling", ""));
        }
        assert_eq!(seen.len(), 3, "no session: by balance, yet {seen:?}");
    }
}

/// 50 clients that send nothing and one that trickles its head a byte at a
/// time hold up no one: requests from other clients are answered while
/// they wait, and each of them is answered too once it sends its request.
#[test]
fn silent_and_trickling_clients_do_not_block_others() {
    let cluster = shop("dispatch-slow-clients", 2, "sticky = cookie:sid");
    let addr = cluster.addr();
    let silent: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
    let mut trickler = connect(addr);
    let head = b"GET /products/3 HTTP/1.1\r\nHost: t\r\nCookie: sid=slow\r\n\r\n";
    for (i, byte) in head.iter().enumerate() {
        trickler.write_all(&[*byte]).expect("trickle");
        if i % 8 == 0 {
            // Others are served meanwhile.
            assert_eq!(
                exchange(addr, &request("GET", "/products/1", b"", true))
                    .unwrap()
                    .status,
                200
            );
        }
    }
    let resp = read_response(&mut trickler).expect("the trickler's response");
    assert_eq!(resp.status, 200);
    for mut s in silent.into_iter().take(5) {
        s.write_all(&request("GET", "/products/2", b"", true))
            .expect("send late");
        let resp = read_response(&mut s).expect("a silent client's late request");
        assert_eq!(resp.status, 200);
    }
}

/// Requests pipelined on one connection, a POST body among them, reach the
/// worker byte for byte: clusterd peeks, it does not read. (Node serves
/// pipelined requests; the shop's HTTP library answers the first of a
/// batch only, so the native check is a head and its body in one write.)
#[test]
fn pipelined_requests_and_bodies_arrive_intact() {
    let body = br#"{"cart":[1,2,3]}"#;
    let post = |close: &str| {
        let mut req = format!(
            "POST /checkout HTTP/1.1\r\nHost: t\r\nX-User: a\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{close}\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req
    };
    let native = shop("dispatch-body", 2, "sticky = header:x-user");
    let resp = exchange(native.addr(), &post("Connection: close\r\n")).expect("checkout");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(String::from_utf8_lossy(&resp.body).contains("confirmed"));

    let node = node("dispatch-pipelined-node", 2, "sticky = header:x-user");
    let mut s = connect(node.addr());
    let mut batch = Vec::new();
    batch.extend_from_slice(b"GET /one HTTP/1.1\r\nHost: t\r\nX-User: a\r\n\r\n");
    batch.extend_from_slice(&post(""));
    batch.extend_from_slice(b"GET /three HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&batch).expect("send the batch");
    // The last request closes: everything until EOF, then split.
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("the responses");
    let responses = split_responses(&all);
    assert_eq!(responses.len(), 3, "{}", String::from_utf8_lossy(&all));
    let bodies: Vec<String> = responses
        .iter()
        .map(|r| {
            assert_eq!(r.0, 200);
            String::from_utf8_lossy(&r.2).into_owned()
        })
        .collect();
    assert_eq!(
        bodies,
        [
            r#"{"path":"/one","bytes":0}"#.to_string(),
            format!(r#"{{"path":"/checkout","bytes":{}}}"#, body.len()),
            r#"{"path":"/three","bytes":0}"#.to_string(),
        ]
    );
    let w: BTreeSet<_> = responses.iter().map(|r| r.1.clone()).collect();
    assert_eq!(w.len(), 1, "one connection, one worker");
}

/// Responses framed by `Content-Length`, one after another in `bytes`:
/// `(status, X-Worker, body)`.
fn split_responses(mut bytes: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let field = |name: &str| {
            head.split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let len: usize = field("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body_start = end + 4;
        let body_end = (body_start + len).min(bytes.len());
        out.push((
            status,
            field("x-worker").unwrap_or_default(),
            bytes[body_start..body_end].to_vec(),
        ));
        bytes = &bytes[body_end..];
    }
    out
}

/// 40 long-lived keep-alive connections over 4 workers: 10 each, give or
/// take one (least-connections), exactly 10 (round-robin).
#[test]
fn long_lived_connections_are_spread_evenly() {
    for (balance, slack) in [("least-connections", 1), ("round-robin", 0)] {
        let cluster = shop(
            &format!("dispatch-balance-{balance}"),
            4,
            &format!("balance = {balance}"),
        );
        let addr = cluster.addr();
        let mut conns = Vec::new();
        let mut per: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..40 {
            let mut s = connect(addr);
            s.write_all(&request("GET", "/products/1", b"", false))
                .unwrap();
            let resp = read_response(&mut s).expect("response");
            *per.entry(resp.header("x-worker").unwrap().to_string())
                .or_default() += 1;
            conns.push(s);
        }
        assert_eq!(per.len(), 4, "{balance}: {per:?}");
        let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
        assert!(max - min <= 2 * slack, "{balance}: {per:?}");
    }
}

/// Node workers share no scoreboard: clusterd counts what it passed and
/// what the adapter reports. 30 long-lived connections over 3 workers.
#[test]
fn node_long_lived_connections_are_spread_evenly() {
    let cluster = node("dispatch-balance-node", 3, "");
    let addr = cluster.addr();
    let mut conns = Vec::new();
    let mut per: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..30 {
        let mut s = connect(addr);
        s.write_all(&request("GET", "/x", b"", false)).unwrap();
        let resp = read_response(&mut s).expect("response");
        *per.entry(resp.header("x-worker").unwrap().to_string())
            .or_default() += 1;
        conns.push(s);
    }
    assert_eq!(per.len(), 3, "{per:?}");
    let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
    assert!(max - min <= 2, "{per:?}");
}

/// Heads of garbage, heads too long to peek whole, and clients that close
/// at once: clusterd stays up and serves the next request.
#[test]
fn hostile_heads_neither_crash_nor_block_clusterd() {
    let cluster = shop("dispatch-hostile", 2, "sticky = cookie:sid");
    let addr = cluster.addr();
    let fds_before = fds(cluster.pid()).len();
    let mut junk: Vec<Vec<u8>> = vec![
        (0..=255u8).cycle().take(20_000).collect(),
        b"\r\n\r\n".to_vec(),
        b"GET /?sid=1.x HTTP/1.1\r\nCookie: ;;;===;sid\r\nCookie: sid\r\n\r\n".to_vec(),
    ];
    let mut long = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 12_000));
    long.extend_from_slice(b"\r\nCookie: sid=late\r\n\r\n");
    junk.push(long);
    for bytes in &junk {
        let mut s = connect(addr);
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    for _ in 0..20 {
        drop(connect(addr)); // gone before sending a byte
    }
    assert_eq!(
        worker_for(addr, "/products/1", "Cookie: sid=a\r\n"),
        worker_for(addr, "/products/1", "Cookie: sid=a\r\n")
    );
    assert!(alive(cluster.pid()));
    // clusterd keeps no copy of a connection it passed or dropped.
    for _ in 0..100 {
        worker_for(addr, "/products/1", "");
    }
    assert!(
        eventually(DEADLINE, || fds(cluster.pid()).len() <= fds_before),
        "clusterd holds more fds than before: {:?}",
        fds(cluster.pid())
    );
}

#[test]
fn dispatch_clusterd_with_protocol_systemd_is_refused_with_the_reason() {
    let dir = TempDir::new("dispatch-systemd");
    let config = dir.path().join("c.conf");
    std::fs::write(
        &config,
        "exec = /bin/true\nprotocol = systemd\ndispatch = clusterd\nlisten = 127.0.0.1:0\n",
    )
    .unwrap();
    let out = run_clusterd(&["--check".as_ref(), "-c".as_ref(), config.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot be handed connections") && text.contains("dispatch = reuseport"),
        "{text}"
    );
}
