//! Serving: workers accept from the one listener clusterd bound and handed
//! them (guarantee 1), and inherit nothing else of clusterd's.

use std::collections::BTreeSet;

use crate::util::*;

#[test]
fn the_shop_cluster_serves() {
    let cluster = Cluster::shop("serves", 2, "");
    cluster.wait_ready(1);
    let resp = get(cluster.addr(), "/products/1").unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.header("x-worker").is_some());
}

/// N worker processes, children of clusterd, each in its own process group;
/// exactly one listening socket on the port, bound by clusterd, and every
/// worker holds that same socket (none binds the port itself); requests are
/// answered by every worker.
#[test]
fn workers_serve_from_the_listener_clusterd_handed_them() {
    let cluster = Cluster::shop("listener", 2, "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let pids: BTreeSet<u32> = [1, 2].map(|id| cluster.ready_pid(id, 1)).into();
    assert_eq!(pids.len(), 2, "two distinct worker pids");

    let children: BTreeSet<u32> = cluster.worker_pids().into_iter().collect();
    assert_eq!(children, pids, "the workers are clusterd's children");
    for &pid in &pids {
        assert_eq!(pgid(pid), pid, "worker {pid} leads its own process group");
    }

    let listening = tcp_listen_inodes(addr);
    assert_eq!(
        listening.len(),
        1,
        "exactly one socket listens on {addr}: {listening:?}"
    );
    let listener = listening[0];
    assert!(
        socket_inodes(cluster.pid()).contains(&listener),
        "clusterd holds the listener (inode {listener}): {:?}",
        fds(cluster.pid())
    );
    for &pid in &pids {
        assert!(
            socket_inodes(pid).contains(&listener),
            "worker {pid} holds clusterd's listener (inode {listener}): {:?}",
            fds(pid)
        );
    }

    // New connections spread over the workers (DESIGN.md: the accept loop
    // accepts only below the in-flight limit, so idle workers win).
    let running = load(addr, 4, false, Method::Get);
    wait_for("responses from both workers", || {
        (running.snapshot().workers.len() >= 2).then_some(())
    });
    let report = running.stop();
    println!("{report}");
    assert_no_failures("new-connection GET", &report);
    let ids: BTreeSet<&str> = report.workers.keys().map(String::as_str).collect();
    assert_eq!(ids, BTreeSet::from(["1", "2"]), "X-Worker values\n{report}");
}

/// A worker holds fds 0-2, its IPC channel at fd 3, the listener, and what
/// its own runtime opens: none of clusterd's other fds (the control socket,
/// clusterd's ends of the IPC channels, another worker's channel).
#[test]
fn a_worker_inherits_only_its_channel_and_the_listener() {
    let cluster = Cluster::testworkers("fds", 2, "ok", "");
    cluster.wait_ready(1);
    let listener = tcp_listen_inodes(cluster.addr());
    assert_eq!(listener.len(), 1, "one listening socket: {listener:?}");
    let listener = listener[0];
    let control = unix_socket_inode(&cluster.control).expect("the control socket is listed");
    let pids = [1, 2].map(|id| cluster.ready_pid(id, 1));

    // What this test process holds was inherited from the environment that
    // started the tests (and so by clusterd and its workers too): not ours.
    let inherited: BTreeSet<(i32, String)> = fds(std::process::id()).into_iter().collect();
    let clusterd_sockets = socket_inodes(cluster.pid());
    assert!(clusterd_sockets.contains(&control));

    for (i, &pid) in pids.iter().enumerate() {
        let worker_fds = fds(pid);
        let numbers: BTreeSet<i32> = worker_fds.iter().map(|(fd, _)| *fd).collect();
        for fd in [0, 1, 2, 3] {
            assert!(
                numbers.contains(&fd),
                "worker {pid} has fd {fd}: {worker_fds:?}"
            );
        }
        let ipc = worker_fds
            .iter()
            .find(|(fd, _)| *fd == 3)
            .and_then(|(_, t)| socket_inode(t))
            .unwrap_or_else(|| panic!("fd 3 of worker {pid} is a socket: {worker_fds:?}"));
        assert_ne!(ipc, listener, "fd 3 is the IPC channel, not the listener");
        assert!(
            worker_fds
                .iter()
                .any(|(_, t)| socket_inode(t) == Some(listener)),
            "worker {pid} holds the listener: {worker_fds:?}"
        );

        let others: BTreeSet<u64> = pids
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .flat_map(|(_, &p)| socket_inodes(p))
            .collect();
        for (fd, target) in &worker_fds {
            if *fd <= 2 || target.starts_with("anon_inode:") {
                continue; // stdio; the runtime's epoll, eventfd, timerfd
            }
            if inherited.contains(&(*fd, target.clone())) {
                continue; // from the environment, not from clusterd
            }
            let Some(inode) = socket_inode(target) else {
                panic!("worker {pid} has an unexpected fd {fd} -> {target}: {worker_fds:?}");
            };
            if inode == listener {
                continue;
            }
            assert_ne!(
                inode, control,
                "worker {pid} holds the control socket (fd {fd})"
            );
            assert!(
                !clusterd_sockets.contains(&inode),
                "worker {pid} fd {fd} ({target}) is one of clusterd's sockets: {:?}",
                fds(cluster.pid())
            );
            assert!(
                !others.contains(&inode),
                "worker {pid} fd {fd} ({target}) is also held by another worker"
            );
        }
    }
}

/// Opens a keep-alive connection, sends one request on it and returns it,
/// still open, with the id of the worker that accepted it.
fn held_connection(addr: std::net::SocketAddr) -> (std::net::TcpStream, String) {
    use std::io::Write;
    let mut s = connect(addr);
    s.write_all(&request("GET", "/", b"", false)).expect("send");
    let resp = read_response(&mut s).expect("response");
    let id = resp.header("x-worker").expect("X-Worker").to_owned();
    (s, id)
}

/// How many of `conns` the worker `id` accepted.
fn accepted_by(conns: &[(std::net::TcpStream, String)], id: &str) -> usize {
    conns.iter().filter(|(_, w)| w == id).count()
}

/// The scoreboard (DESIGN.md, balanced accepting): a new connection goes to
/// the worker holding fewest, whichever worker the kernel wakes first. One
/// at a time, so each connection is a clean race between the two workers.
/// The losing worker defers only a moment, so a connection or two may go
/// astray on a loaded machine; without the scoreboard the split would follow
/// the kernel's wake-up order, not the counts.
#[test]
fn new_connections_go_to_the_worker_holding_fewest() {
    const N: usize = 10;
    let cluster = Cluster::testworkers("fewest", 1, "ok", "");
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let first: Vec<_> = (0..N).map(|_| held_connection(addr)).collect();
    assert_eq!(accepted_by(&first, "1"), N, "worker 1 is alone");

    // Worker 2 starts holding none: the next ones go to it.
    let out = cluster.ctl(&["scale", "2"]);
    assert!(out.status.success(), "{out:?}");
    cluster.ready_pid(2, 1);
    let second: Vec<_> = (0..N).map(|_| held_connection(addr)).collect();
    let to_2 = accepted_by(&second, "2");
    assert!(
        to_2 >= N - 2,
        "worker 2 held fewer, yet accepted only {to_2} of {N}"
    );

    // Worker 1 lets go of its connections: now it holds fewest.
    let holds = |id: u64| -> Option<u64> {
        cluster.status_json()["workers"]
            .as_array()?
            .iter()
            .find(|w| w["id"] == id)?["active"]
            .as_u64()
    };
    let on_1 = accepted_by(&second, "1") as u64;
    drop(first);
    wait_for("worker 1 to report its connections closed", || {
        (holds(1) == Some(on_1)).then_some(())
    });
    let third: Vec<_> = (0..N).map(|_| held_connection(addr)).collect();
    let to_1 = accepted_by(&third, "1");
    assert!(
        to_1 >= N - 2,
        "worker 1 held fewer, yet accepted only {to_1} of {N}"
    );
}
