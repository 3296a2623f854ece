//! Issue 12 against the real binaries: `clusterctl stop` when nothing has
//! to drain, `control.busy` once per burst, and clusterctl refusing a
//! control socket served by another user.

use super::*;
use clusterd::proto::{self, FRAME_HEADER, MAX_RESPONSE, Response, RestartOutcome};
use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;

fn connect(cluster: &Cluster) -> UnixStream {
    let stream = UnixStream::connect(&cluster.control).expect("connect to the control socket");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Reads until clusterd hangs up; returns the response frames.
fn replies(stream: &mut UnixStream) -> Vec<Response> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("clusterd neither answered nor hung up: {e}"),
        }
    }
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= FRAME_HEADER {
        let len = proto::frame_len(rest[..FRAME_HEADER].try_into().unwrap(), MAX_RESPONSE).unwrap();
        out.push(proto::decode(&rest[FRAME_HEADER..FRAME_HEADER + len], MAX_RESPONSE).unwrap());
        rest = &rest[FRAME_HEADER + len..];
    }
    out
}

#[test]
fn stop_exits_0_when_every_worker_is_in_backoff() {
    // Workers that fail at once, and a backoff far longer than the test.
    let mut cluster = Cluster::start(
        "ctl-stop-backoff",
        "exec = /bin/false\nworkers = 2\nlisten = 127.0.0.1:0\n\
         restart_delay = 10m\nrestart_delay_max = 10m\nmin_uptime = 1h\n",
    );
    wait_status(&cluster, "every worker in backoff", |s| {
        let list = s["workers"].as_array().expect("workers");
        list.len() == 2 && list.iter().all(|w| w["state"] == "backoff")
    });
    // Nothing has to drain: clusterd exits right after accepting the stop,
    // and its answer must still reach clusterctl.
    let out = ctl(&cluster, &["stop"]).ok();
    assert!(out.stdout.starts_with("stopping"), "{out}");
    assert_eq!(
        cluster.wait_exit().code(),
        Some(0),
        "{}",
        cluster.log_text()
    );
}

#[test]
fn stop_json_exits_0_when_no_worker_has_to_drain() {
    let mut cluster = Cluster::start(
        "ctl-stop-backoff-json",
        "exec = /bin/false\nworkers = 1\nlisten = 127.0.0.1:0\n\
         restart_delay = 10m\nrestart_delay_max = 10m\nmin_uptime = 1h\n",
    );
    wait_status(&cluster, "the worker in backoff", |s| {
        s["workers"][0]["state"] == "backoff"
    });
    let out = ctl(&cluster, &["stop", "--json"]).ok();
    let events = out.events();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0].0, "stopping", "{out}");
    assert_eq!(
        cluster.wait_exit().code(),
        Some(0),
        "{}",
        cluster.log_text()
    );
}

#[test]
fn control_busy_is_logged_once_per_burst() {
    let cluster = Cluster::testworkers("ctl-busy", 1, "ok", "");
    cluster.wait_ready(1);
    let max = clusterd::daemon::control::MAX_CLIENTS;
    let closed = || {
        cluster
            .events("control.bad_request")
            .iter()
            .filter(|l| l.level == "info")
            .count()
    };
    // Every slot taken by a client that sends nothing.
    let mut idle: VecDeque<UnixStream> = (0..max).map(|_| connect(&cluster)).collect();
    for _ in 0..5 {
        // One more: the oldest idle client is dropped to make room.
        idle.push_back(connect(&cluster));
        let mut oldest = idle.pop_front().unwrap();
        let got = replies(&mut oldest);
        assert!(matches!(&got[..], [Response::Error(_)]), "{got:?}");
        // One goes away by itself, so a slot is free for a moment, and is
        // taken again.
        let before = closed();
        drop(idle.pop_back());
        wait_for("clusterd to see a client go", || {
            (closed() > before).then_some(())
        });
        idle.push_back(connect(&cluster));
    }
    // Still one burst: logged once.
    let busy = cluster.events("control.busy");
    assert_eq!(busy.len(), 1, "{}", cluster.log_text());
    drop(idle);
    // The operator is still served.
    status(&cluster);
}

/// A fake control server run as uid 65534: it answers every connection with
/// `reply`, whatever was asked. Returns the child (kill it when done).
fn fake_server_as_nobody(dir: &Path, reply: &Response) -> (std::process::Child, PathBuf) {
    // A shared sticky folder, like /tmp: anyone may put a socket there.
    let folder = dir.join("shared");
    std::fs::create_dir(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = folder.join("fake.sock");
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
                  s.bind(sys.argv[1])\n\
                  s.listen(8)\n\
                  reply = bytes.fromhex(sys.argv[2])\n\
                  while True:\n    \
                      c, _ = s.accept()\n    \
                      c.settimeout(5)\n    \
                      try:\n        \
                          c.recv(65536)\n        \
                          c.sendall(reply)\n    \
                      except Exception:\n        \
                          pass\n    \
                      c.close()\n";
    let hex: String = proto::frame(reply)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .arg(hex)
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .stdin(Stdio::null())
        .spawn()
        .expect("run python3 as uid 65534");
    wait_for("the fake server's socket", || path.exists().then_some(()));
    (child, path)
}

#[test]
fn clusterctl_refuses_a_server_of_another_user() {
    if !rustix::process::geteuid().is_root() || !Path::new("/usr/bin/python3").exists() {
        eprintln!("note: skipped: needs root and /usr/bin/python3 to run a server as uid 65534");
        return;
    }
    let dir = TempDir::new("ctl-peer");
    for (command, reply, lie) in [
        (
            "restart",
            Response::Restarted(RestartOutcome::Done {
                generation: 2,
                replaced: 1,
                elapsed_ms: 5,
            }),
            "restart done",
        ),
        ("stop", Response::Stopping, "stopping"),
    ] {
        let sub = TempDir::new("ctl-peer-sub");
        let (mut server, path) = fake_server_as_nobody(sub.path(), &reply);
        let out = ctl_raw(&[OsStr::new("-s"), path.as_os_str(), OsStr::new(command)]);
        let _ = server.kill();
        let _ = server.wait();
        let out = out.exit(3);
        assert!(!out.stdout.contains(lie), "believed the fake server: {out}");
        let message = out.error_message();
        assert!(
            message.contains(&*path.to_string_lossy()) && message.contains("uid 65534"),
            "{out}"
        );
    }
    drop(dir);
}
