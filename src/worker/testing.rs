//! What the unit tests of the worker modules share: a fake clusterd on the
//! other end of an IPC channel, connected workers and queued clients.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType, socketpair};
use smol::future::{self, FutureExt as _};
use smol::{LocalExecutor, Timer};

use super::{Acceptor, InFlight, ListenerInfo, Worker};
use crate::fdpass;
use crate::proto::{self, FromWorker, Hello, MAX_IPC_RECORD, ToWorker};

/// Fails the test instead of hanging it.
pub(super) fn within<T>(fut: impl Future<Output = T>) -> T {
    smol::block_on(fut.or(async {
        Timer::after(Duration::from_secs(10)).await;
        panic!("timed out");
    }))
}

/// The clusterd end of an IPC channel.
pub(super) struct Clusterd {
    pub(super) fd: OwnedFd,
    /// The listener whose fd was sent in `Hello` (our own copy).
    pub(super) listener: std::net::TcpListener,
}

impl Clusterd {
    pub(super) fn send(&self, bytes: &[u8]) {
        fdpass::send_with_fds(&self.fd, bytes, &[]).unwrap();
    }

    pub(super) fn recv(&self) -> Option<FromWorker> {
        let mut buf = vec![0u8; MAX_IPC_RECORD];
        let got = fdpass::recv_with_fds(&self.fd, &mut buf, RecvFlags::empty()).unwrap();
        (got.len > 0).then(|| proto::decode(&buf[..got.len], MAX_IPC_RECORD).unwrap())
    }
}

pub(super) fn pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    // Never let a broken test hang on a receive.
    sockopt::set_socket_timeout(&a, Timeout::Recv, Some(Duration::from_secs(10))).unwrap();
    (a, b)
}

pub(super) fn hello_record(listener: &std::net::TcpListener) -> Vec<u8> {
    proto::encode(&ToWorker::Hello(Hello {
        worker_id: 3,
        generation: 7,
        listeners: vec![ListenerInfo {
            name: "http".into(),
            address: listener.local_addr().unwrap().to_string(),
        }],
        scoreboard: None,
    }))
}

/// A worker connected to a fake clusterd that sent `Hello` with one TCP
/// listener named `http`.
pub(super) fn connected() -> (Worker, Clusterd) {
    let (ours, theirs) = pair();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fdpass::send_with_fds(&ours, &hello_record(&listener), &[listener.as_fd()]).unwrap();
    let worker = Worker::from_fd(theirs).unwrap();
    (worker, Clusterd { fd: ours, listener })
}

/// An [`Acceptor`] counting in `in_flight` on a connected worker's
/// listener, with the worker and the fake clusterd (keep them alive) and
/// the listener's address.
pub(super) fn acceptor(in_flight: &InFlight) -> (Acceptor, Worker, Clusterd, std::net::SocketAddr) {
    let (mut worker, clusterd) = connected();
    let acceptor = Acceptor::new(
        worker.take_listener("http").unwrap(),
        in_flight.clone(),
        worker.shutdown(),
    );
    let address = clusterd.listener.local_addr().unwrap();
    (acceptor, worker, clusterd, address)
}

/// `n` clients connected to `address` (waiting in its accept queue).
pub(super) fn clients(address: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| std::net::TcpStream::connect(address).unwrap())
        .collect()
}

/// Runs `body` on a local executor beside a task that counts how often
/// it gets to run (it yields after each count); returns what `body`
/// returned and the count of the rounds it let happen.
pub(super) fn with_busy_neighbour<T>(body: impl Future<Output = T>) -> (T, u64) {
    let ex = LocalExecutor::new();
    let rounds = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let done = std::rc::Rc::new(std::cell::Cell::new(false));
    let neighbour = ex.spawn({
        let (rounds, done) = (rounds.clone(), done.clone());
        async move {
            // Bounded: a broken test ends instead of spinning.
            for _ in 0..10_000_000 {
                if done.get() {
                    break;
                }
                rounds.set(rounds.get() + 1);
                future::yield_now().await;
            }
        }
    });
    let out = within(ex.run(async {
        // Let the neighbour start, so that it is queued from now on.
        future::yield_now().await;
        let before = rounds.get();
        let out = body.await;
        let spent = rounds.get() - before;
        done.set(true);
        (out, spent)
    }));
    within(ex.run(neighbour));
    out
}
