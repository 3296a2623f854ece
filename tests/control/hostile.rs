//! Hostile control clients against the real daemon (DESIGN.md, guarantee 5):
//! malformed, oversized, truncated and silent clients, and a client of
//! another uid.

use super::*;
use clusterd::proto::{self, FRAME_HEADER, MAX_RESPONSE, Request, Response};
use std::io::{self, Read as _, Write as _};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

/// How much clusterd's memory may grow over all the hostile clients: a bound
/// against buffering what a client claims or sends, far below the 16 MiB
/// flood one of them sends.
const RSS_SLACK: u64 = 8 * 1024 * 1024;

fn connect(cluster: &Cluster) -> UnixStream {
    let stream = UnixStream::connect(&cluster.control).expect("connect to the control socket");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Reads until clusterd closes the connection; returns the response frames.
/// A reset after the replies counts as the close (clusterd hung up on bytes
/// it did not read). Panics if clusterd neither answers nor hangs up within
/// the deadline, or sends something that is not a response frame.
fn replies(stream: &mut UnixStream, what: &str) -> Vec<Response> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "{what}: clusterd neither answered nor hung up ({e}) after {} bytes",
                bytes.len()
            ),
        }
    }
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(
            rest.len() >= FRAME_HEADER,
            "{what}: a partial frame {rest:?}"
        );
        let header = rest[..FRAME_HEADER].try_into().unwrap();
        let len = proto::frame_len(header, MAX_RESPONSE)
            .unwrap_or_else(|e| panic!("{what}: bad frame header: {e}"));
        let body = &rest[FRAME_HEADER..];
        assert!(body.len() >= len, "{what}: a truncated frame");
        out.push(
            proto::decode(&body[..len], MAX_RESPONSE)
                .unwrap_or_else(|e| panic!("{what}: bad response: {e}")),
        );
        rest = &body[len..];
    }
    out
}

/// Sends `bytes`, closes the sending side (so clusterd sees the end at once
/// rather than waiting for its read deadline) and expects exactly one error
/// frame before clusterd hangs up. Returns the error's text.
fn refused(cluster: &Cluster, what: &str, bytes: &[u8]) -> String {
    let mut stream = connect(cluster);
    // clusterd may hang up before reading everything: a failed write is fine.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    match &replies(&mut stream, what)[..] {
        [Response::Error(message)] => message.clone(),
        other => panic!("{what}: expected one error, got {other:?}"),
    }
}

/// Deterministic noise (xorshift64).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A frame holding `record` as is.
fn frame_of(record: &[u8]) -> Vec<u8> {
    let mut out = (record.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(record);
    out
}

/// The hostile requests: what each is, and its bytes. Each must be refused
/// with one error frame, and none may run (two of them are a `Stop`).
fn hostile_requests() -> Vec<(&'static str, Vec<u8>)> {
    let random = noise(4096, 0x9e37_79b9_7f4a_7c15);
    assert!(
        u32::from_be_bytes(random[..4].try_into().unwrap()) > 64 * 1024,
        "the noise starts with a huge length"
    );
    let status = proto::frame(&Request::Status);
    // A valid Stop with trailing bytes inside its frame.
    let mut trailing = proto::encode(&Request::Stop);
    trailing.extend_from_slice(&[0, 0, 0]);
    // A Stop whose version header is 99 (a one-byte varint, like 1).
    let mut version = proto::encode(&Request::Stop);
    assert_eq!(
        version[0],
        proto::CONTROL_VERSION as u8,
        "the version is one byte"
    );
    version[0] = 99;
    vec![
        ("random bytes", random),
        ("a random record", frame_of(&noise(200, 42))),
        ("a 4 GiB length", vec![0xff; 4]),
        ("a partial header", vec![0, 0]),
        ("a partial frame", status[..status.len() - 1].to_vec()),
        ("trailing bytes", frame_of(&trailing)),
        ("version 99", frame_of(&version)),
    ]
}

/// A 4 GiB length prefix followed by a 16 MiB flood (written until clusterd
/// hangs up): one error, and nothing buffered.
fn flood(cluster: &Cluster) -> Vec<Response> {
    let mut stream = connect(cluster);
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![0x5a; 64 * 1024];
        let mut sent = writer.write_all(&[0xff; 4]).map(|()| 4usize);
        while let Ok(n) = sent {
            if n >= 16 * 1024 * 1024 {
                break;
            }
            sent = writer.write_all(&chunk).map(|()| n + chunk.len());
        }
    });
    let got = replies(&mut stream, "a 4 GiB length and a flood");
    flood.join().unwrap();
    got
}

/// A truncated frame, then a close without reading the answer.
fn truncate_and_close(cluster: &Cluster) {
    let status = proto::frame(&Request::Status);
    let mut stream = connect(cluster);
    let _ = stream.write_all(&status[..status.len() - 1]);
    drop(stream);
}

/// A valid request followed by bytes after its frame: one reply.
fn bytes_after_a_frame(cluster: &Cluster) {
    let mut stream = connect(cluster);
    let mut bytes = proto::frame(&Request::Status);
    bytes.extend_from_slice(b"and then some");
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let got = replies(&mut stream, "bytes after a frame");
    assert_eq!(got.len(), 1, "bytes after a frame: {got:?}");
}

/// The bad requests clusterd has judged and logged (warnings; a bare
/// connect-and-close is logged at info).
fn judged(cluster: &Cluster) -> usize {
    cluster
        .events("control.bad_request")
        .iter()
        .filter(|l| l.level == "warn")
        .count()
}

#[test]
fn hostile_clients_neither_crash_nor_block_clusterd() {
    let cluster = Cluster::testworkers("ctl-hostile", 2, "ok", "");
    cluster.wait_ready(1);
    let pid = cluster.pid();
    let before = status(&cluster);
    let rss_before = proc_bytes(pid, "VmRSS");
    let peak_before = proc_bytes(pid, "VmHWM");

    // One at a time: clusterd reads each, logs it and answers with an error
    // (it logs before it answers, so the count is exact when the answer is
    // in).
    let mut count = 0;
    for (what, bytes) in hostile_requests() {
        let message = refused(&cluster, what, &bytes);
        count += 1;
        assert_eq!(
            judged(&cluster),
            count,
            "{what}: answered {message:?} without judging the request:\n{}",
            cluster.log_text()
        );
        if what == "version 99" {
            assert!(
                message.contains("99")
                    && message.contains(&format!("version {}", proto::CONTROL_VERSION)),
                "the mismatch names both versions: {message}"
            );
        }
    }
    let got = flood(&cluster);
    assert!(matches!(&got[..], [Response::Error(_)]), "{got:?}");
    count += 1;
    assert_eq!(judged(&cluster), count, "the flood was not judged");
    truncate_and_close(&cluster);
    count += 1;
    cluster.wait_events("control.bad_request", count, |l| l.level == "warn");
    bytes_after_a_frame(&cluster);

    // Again, with 100 connections that send nothing held open throughout.
    let idle: Vec<UnixStream> = (0..100).map(|_| connect(&cluster)).collect();
    for (what, bytes) in hostile_requests() {
        refused(&cluster, what, &bytes);
    }
    let got = flood(&cluster);
    assert!(matches!(&got[..], [Response::Error(_)]), "{got:?}");
    truncate_and_close(&cluster);
    bytes_after_a_frame(&cluster);

    // With the idle connections still open: clusterd is up and a normal
    // status answers.
    assert!(alive(pid), "clusterd died:\n{}", cluster.log_text());
    let after = status(&cluster);
    assert_eq!(after["pid"], daemon_pid(&cluster), "{after:#}");
    // Memory now, and at its peak (a buffer freed when its client went
    // still counts).
    let rss_after = proc_bytes(pid, "VmRSS");
    let peak_after = proc_bytes(pid, "VmHWM");
    assert!(
        rss_after <= rss_before + RSS_SLACK,
        "clusterd grew from {rss_before} to {rss_after} bytes of RSS"
    );
    assert!(
        peak_after <= peak_before + RSS_SLACK,
        "clusterd's peak RSS grew from {peak_before} to {peak_after} bytes"
    );
    drop(idle);

    // Nothing the hostile clients sent was run: same workers, same
    // generation, no stop.
    let s = status(&cluster);
    assert!(settled(&s, 2, 1), "{s:#}");
    assert_eq!(pids(&s), pids(&before), "{s:#}");
    assert!(
        cluster.events("stopping").is_empty(),
        "a hostile Stop was run"
    );
    let resp = get(cluster.addr(), "/").expect("GET after the hostile clients");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        !cluster.log_text().contains("panicked"),
        "{}",
        cluster.log_text()
    );
}

#[test]
fn another_uid_is_refused_even_with_a_world_writable_socket() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("note: skipped: running a client as another uid needs root");
        return;
    }
    let cluster = Cluster::testworkers("ctl-uid", 1, "ok", "");
    cluster.wait_ready(1);
    let sock = cluster.control.clone();
    let dir = sock.parent().unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of clusterctl that uid 65534 can surely run (the build folder
    // may not be open to it).
    let bin = dir.join("clusterctl");
    std::fs::copy(ctl_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let run_as_nobody = |args: &[&str]| {
        let mut all = vec!["-s", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        // Until every process forked while the copy was being written has
        // exec'd, running it fails with ETXTBSY.
        let out = wait_for("clusterctl to be runnable as uid 65534", || {
            let run = Command::new(&bin)
                .args(&all)
                .uid(65534)
                .gid(65534)
                .current_dir("/")
                .stdin(Stdio::null())
                .output();
            match run {
                Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy => None,
                run => Some(run.expect("run clusterctl as uid 65534")),
            }
        });
        Ctl::new(&all, out)
    };
    let out = run_as_nobody(&["status"]).exit(1);
    assert!(out.stderr.contains("permission denied"), "{out}");
    assert!(out.stdout.is_empty(), "no status leaked: {out}");
    let out = run_as_nobody(&["stop", "--json"]).exit(1);
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0].0, "error", "{out}");
    assert!(
        events[0].1["message"]
            .as_str()
            .is_some_and(|m| m.contains("permission denied")),
        "{out}"
    );
    let refusals = cluster.wait_events("control.refused", 2, |l| l.num("uid") == 65534);
    assert_eq!(refusals.len(), 2);

    // Nothing was run; the owner (root) still gets answers.
    assert!(
        cluster.events("stopping").is_empty(),
        "another uid stopped clusterd"
    );
    let s = status(&cluster);
    assert!(settled(&s, 1, 1), "{s:#}");
}
