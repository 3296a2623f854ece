//! The daemon: the imperative shell around [`crate::lifecycle`].
//!
//! # Implementation
//!
//! One thread runs a `smol::LocalExecutor`. Small tasks turn every source of
//! input into an [`Event`] on one channel: the signal stream (TERM, INT, QUIT,
//! HUP, TTIN, TTOU, CHLD), one reader per worker IPC channel, and one task
//! per control client. The main loop ([`Daemon::run`]) only waits for the
//! next event or the state machine's next deadline, hands it to the
//! [`Supervisor`], and carries out the actions that come back. Signals and
//! control commands go through the same functions.
//!
//! Children are reaped by one `waitpid(-1, WNOHANG)` loop on SIGCHLD, orphans
//! included: clusterd is a correct PID 1, and a child subreaper otherwise.

#[macro_use]
pub mod log;
pub mod cgroup;
pub mod control;
pub mod dispatch;
pub mod fallback;
pub mod hint;
pub mod listen;
pub mod logcap;
pub mod logsink;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod ready_pipe;
pub mod reuseport;
pub mod spawn;
pub mod tree;
pub mod upgrade;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};
use smol::{Async, LocalExecutor};

use crate::config::{self, Config, Protocol};
use crate::lifecycle::{Action, Exit, InstanceId, Notice, ScaleTo, Supervisor, Timing, human};
use crate::proto::{self, FromWorker, Response, ToWorker};
use crate::scoreboard;
use control::{ControlRequest, ControlSocket};
use listen::Listener;
use spawn::Spec;

/// Malformed IPC records tolerated from one worker before its channel is
/// ignored (each one is logged).
const MAX_BAD_RECORDS: u32 = 16;

/// Records of an exited worker read before its exit is handled (a worker
/// sends one or two a second: Stats, Ready, Drained).
const MAX_LAST_RECORDS: u32 = 64;

/// Events already queued that the loop handles before it judges deadlines
/// (bounded, so a flood cannot hold off the deadlines for ever).
const MAX_QUEUED_EVENTS: usize = 1024;

/// Something the main loop must handle.
#[derive(Debug)]
enum Event {
    Signal(async_signal::Signal),
    Worker(InstanceId, WorkerEvent),
    Control(ControlRequest),
    /// An sd_notify datagram (`protocol = systemd`).
    Notify(notify::Notification),
    /// A scrape of `/metrics` or `/healthz`.
    Metrics(metrics::Query),
}

#[derive(Debug)]
enum WorkerEvent {
    Message(FromWorker),
    /// A record that could not be used (logged, then ignored).
    Bad(String),
    /// The worker closed its end of the channel.
    Closed,
    /// What a node worker says about itself (`None`: nothing to say).
    Note(Option<String>),
    /// `dispatch = clusterd`: a native worker's inboxes, one per listener
    /// ([`FromWorker::TakesConnections`] with its fds).
    Inboxes(Vec<OwnedFd>),
}

/// What clusterd knows about one running worker process beyond the state
/// machine's view.
#[derive(Debug)]
struct Proc {
    pid: u32,
    protocol: Protocol,
    ipc: Option<Rc<Async<OwnedFd>>>,
    stats: Option<(u64, u32)>,
    /// The last `STATUS=` a systemd-protocol worker sent.
    note: Option<String>,
    /// The worker's cell in the scoreboard, vacated when it is reaped.
    cell: Option<u32>,
    /// Its captured stdout and stderr (`log_capture = on`).
    output: Option<logcap::Capture>,
    /// Its process tree: group, cgroup, kill; dropped when it is reaped.
    tree: tree::Worker,
    /// Node's IPC channel (`protocol = node`).
    node: Option<node::Channel>,
    /// The readiness pipe (`protocol = systemd` and `node`), read by its
    /// own task.
    ready_pipe: Option<Rc<Async<OwnedFd>>>,
}

/// Runs clusterd with `config` until it stops; returns the exit code.
pub fn run(config: Config) -> i32 {
    spawn::cloexec_inherited_fds();
    // First of all: a TERM that arrives while clusterd is still starting
    // (a quick `docker stop`) must be a graceful stop, not a kill by the
    // default action. Signals are queued until the loop reads them.
    let signals = match upgrade::signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clusterd: cannot install signal handlers: {e}");
            return 1;
        }
    };
    if let Err(e) = logsink::configure(
        config.log_format,
        config.log_file.clone(),
        usize::try_from(config.log_buffer).unwrap_or(usize::MAX),
    ) {
        eprintln!("clusterd: log_file: {e}");
        return 1;
    }
    let mut listeners = Vec::new();
    let reuseport = match config.dispatch {
        config::Dispatch::Reuseport => match reuseport::start(&config) {
            Ok(pool) => Some(pool),
            Err(e) => {
                log!(error, "listen.failed", error = e);
                eprintln!("clusterd: {e}");
                return 1;
            }
        },
        _ => None,
    };
    for listen in config.listen.iter().filter(|_| reuseport.is_none()) {
        match listen::bind(listen, config.backlog) {
            Ok(l) => {
                log!(info, "listening", name = l.name, addr = l.address);
                listeners.push(l);
            }
            Err(e) => {
                log!(error, "listen.failed", error = e);
                eprintln!("clusterd: {e}");
                return 1;
            }
        }
    }
    let control_path = config.control_path();
    let control = match ControlSocket::bind(&control_path) {
        Ok(c) => c,
        Err(e) => {
            log!(error, "control.failed", error = e);
            eprintln!("clusterd: {e}");
            return 1;
        }
    };
    log!(info, "control", path = control_path.display());
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        // Orphaned grandchildren are re-parented to us, and reaped.
        let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    }

    let notify = match notify::NotifySocket::bind() {
        Ok(n) => Rc::new(n),
        Err(e) => {
            log!(error, "notify.failed", error = e);
            eprintln!("clusterd: cannot create the worker notification socket: {e}");
            return 1;
        }
    };
    let metrics_listener = match config.metrics.map(metrics::bind).transpose() {
        Ok(m) => m,
        Err(e) => {
            log!(error, "metrics.failed", error = e);
            eprintln!("clusterd: {e}");
            return 1;
        }
    };
    if let Some(addr) = metrics_listener
        .as_ref()
        .and_then(|l| l.get_ref().local_addr().ok())
    {
        log!(info, "metrics", addr = addr);
    }
    let ex = Rc::new(LocalExecutor::new());
    let (tx, rx) = smol::channel::unbounded();
    let mut daemon = Daemon::new(config, listeners, notify.clone(), ex.clone(), tx.clone());
    if let Some(pool) = reuseport {
        daemon.fallback.set_listeners(pool.all());
        daemon.reuseport = Some(pool);
    }
    let shell = Shell {
        signals,
        control,
        metrics: metrics_listener,
        notify,
    };
    serve(shell, daemon, ex, tx, rx)
}

/// What the main loop's tasks serve: bound by [`run`], or taken over from
/// an earlier image ([`upgrade`]).
struct Shell {
    signals: async_signal::Signals,
    control: ControlSocket,
    metrics: Option<Async<std::net::TcpListener>>,
    notify: Rc<notify::NotifySocket>,
}

/// Runs the main loop and its tasks until clusterd stops; the exit code.
fn serve(
    shell: Shell,
    mut daemon: Daemon,
    ex: Rc<LocalExecutor<'static>>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
) -> i32 {
    let Shell {
        signals,
        control,
        metrics: metrics_listener,
        notify,
    } = shell;
    {
        use std::os::fd::AsRawFd as _;
        daemon.image.control_fd = control.as_fd().as_raw_fd();
        daemon.image.metrics_fd = metrics_listener.as_ref().map(|l| l.as_raw_fd());
    }
    smol::block_on(ex.run(async {
        let tx_signals = tx.clone();
        ex.spawn(async move {
            use smol::stream::StreamExt;
            let mut signals = signals;
            while let Some(Ok(sig)) = signals.next().await {
                if tx_signals.send(Event::Signal(sig)).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        if let Some(listener) = metrics_listener {
            let (q_tx, q_rx) = smol::channel::unbounded::<metrics::Query>();
            ex.spawn(metrics::serve(listener, ex.clone(), q_tx))
                .detach();
            let tx_metrics = tx.clone();
            ex.spawn(async move {
                while let Ok(q) = q_rx.recv().await {
                    if tx_metrics.send(Event::Metrics(q)).await.is_err() {
                        break;
                    }
                }
            })
            .detach();
        }
        let tx_notify = tx.clone();
        ex.spawn(async move {
            while let Ok(n) = notify.recv().await {
                if tx_notify.send(Event::Notify(n)).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        let (ctl_tx, ctl_rx) = smol::channel::unbounded::<ControlRequest>();
        let tx_ctl = tx.clone();
        ex.spawn(async move {
            while let Ok(req) = ctl_rx.recv().await {
                if tx_ctl.send(Event::Control(req)).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        // Serves until the loop ends, then writes the replies it queued (the
        // answer to a Stop when nothing had to drain); the socket file goes
        // when `control` is dropped.
        control.serve_while(ctl_tx, daemon.run(rx)).await
    }))
}

struct Daemon {
    config: Config,
    /// The listeners every worker gets (empty with `dispatch = reuseport`).
    listeners: Vec<Listener>,
    /// `dispatch = reuseport`: each slot's own listeners.
    reuseport: Option<reuseport::Reuseport>,
    /// `NOTIFY_SOCKET` for systemd-protocol workers.
    notify_name: String,
    /// The socket itself, read by its own task; [`Daemon::reap`] reads what
    /// is queued first.
    notify: Rc<notify::NotifySocket>,
    /// The config and worker spec of every generation still in use: a
    /// rollback needs the previous one's.
    gens: BTreeMap<u64, Generation>,
    next_generation: u64,
    sup: Supervisor,
    procs: HashMap<InstanceId, Proc>,
    pids: HashMap<u32, InstanceId>,
    ex: Rc<LocalExecutor<'static>>,
    tx: Sender<Event>,
    /// Control clients following the rolling restart in progress.
    restart_watchers: Vec<Sender<Response>>,
    started: Instant,
    exit_code: Option<i32>,
    /// For the metrics.
    counters: metrics::Counters,
    /// The service manager to tell READY=1 / RELOADING=1 / STOPPING=1, if any.
    manager: Option<notify::Manager>,
    /// The connections each worker holds, for balanced accepting; `None`
    /// if it could not be created (workers then accept unbalanced).
    scoreboard: Option<Scoreboard>,
    /// `empty_pool`: answers clients itself while no worker is ready.
    fallback: fallback::Fallback,
    /// Every process clusterd started, and what they left behind.
    tree: tree::Tree,
    /// When workers' memory is measured next (`max_memory`).
    memory_check: Option<Instant>,
    /// The last stderr line of each worker id's last crashed worker.
    last_words: HashMap<u32, String>,
    /// `protocol = node`: the adapter, written at the first node worker's
    /// spawn, removed when clusterd exits.
    node_adapter: Option<node::AdapterFile>,
    /// `dispatch = clusterd`: clusterd accepts and passes connections.
    dispatch: Option<dispatch::Dispatcher>,
    /// This image of clusterd, and the upgrade it is about to make.
    image: upgrade::Image,
}

/// What one generation runs: its config (with the keys that only a new
/// clusterd changes kept as they were at start) and the spec derived from it.
struct Generation {
    config: Config,
    spec: Spec,
}

impl Generation {
    fn new(config: Config) -> Generation {
        Generation {
            spec: Spec::from_config(&config),
            config,
        }
    }
}

/// The scoreboard's memfd (passed to every native worker) and its free cells.
struct Scoreboard {
    fd: OwnedFd,
    cells: scoreboard::Cells,
}

impl Scoreboard {
    fn create() -> Option<Scoreboard> {
        match scoreboard::create() {
            Ok(fd) => Some(Scoreboard {
                fd,
                cells: scoreboard::Cells::new(scoreboard::CELLS),
            }),
            Err(e) => {
                log!(warn, "scoreboard.failed", error = e);
                None
            }
        }
    }

    /// A vacant cell for a new worker, if one is free (a worker without one
    /// accepts unbalanced).
    fn take(&mut self) -> Option<u32> {
        let cell = self.cells.take()?;
        match scoreboard::vacate(&self.fd, cell) {
            Ok(()) => Some(cell),
            Err(e) => {
                log!(warn, "scoreboard.failed", error = e);
                self.cells.give_back(cell);
                None
            }
        }
    }

    /// Vacates the cell of a worker that is gone and frees it for the next.
    fn give_back(&mut self, cell: u32) {
        match scoreboard::vacate(&self.fd, cell) {
            Ok(()) => self.cells.give_back(cell),
            // Not reused: a stale count in it would skew the balance.
            Err(e) => log!(warn, "scoreboard.failed", error = e),
        }
    }
}

fn timing(config: &Config) -> Timing {
    Timing {
        ready_timeout: config.ready_timeout,
        drain_timeout: config.drain_timeout,
        restart_delay: config.restart_delay,
        restart_delay_max: config.restart_delay_max,
        min_uptime: config.min_uptime,
        fast_stop_grace: Duration::from_secs(1),
        ready_after: config.ready_after,
        bake: config.bake,
        rollback_window: if config.rollback {
            rollback_window(config.bake)
        } else {
            Duration::ZERO
        },
        watchdog: config.watchdog,
        watchdog_grace: WATCHDOG_GRACE.min(config.drain_timeout),
        max_requests: config.max_requests,
        max_age: config.max_age,
        crash_loop: Some(config.crash_loop),
        exit_on_crash_loop: config.exit_on_crash_loop,
    }
}

/// Between a hung worker's diagnostic signal and its SIGKILL (at most
/// `drain_timeout`): time for a runtime to write its stacks.
const WATCHDOG_GRACE: Duration = Duration::from_secs(5);

/// How often workers' memory is measured with `max_memory` set.
const MEMORY_CHECK: Duration = Duration::from_millis(500);

/// How long a finished restart's generation is watched for crashes
/// (`rollback = auto`): a minute, or ten bakes if that is longer.
pub fn rollback_window(bake: Duration) -> Duration {
    Duration::from_secs(60).max(bake.saturating_mul(10))
}

impl Daemon {
    fn new(
        config: Config,
        listeners: Vec<Listener>,
        notify: Rc<notify::NotifySocket>,
        ex: Rc<LocalExecutor<'static>>,
        tx: Sender<Event>,
    ) -> Daemon {
        let sup = Supervisor::new(timing(&config), config.worker_count(), 1);
        let gens = BTreeMap::from([(1, Generation::new(config.clone()))]);
        let fallback = fallback::Fallback::new(&ex, &config, &listeners);
        let scoreboard = Scoreboard::create();
        let dispatch = dispatch::Dispatcher::start(
            &ex,
            &config,
            &listeners,
            scoreboard.as_ref().map(|b| &b.fd),
        );
        Daemon {
            config,
            listeners,
            reuseport: None,
            notify_name: notify.name.clone(),
            notify,
            gens,
            next_generation: 2,
            sup,
            procs: HashMap::new(),
            pids: HashMap::new(),
            ex,
            tx,
            restart_watchers: Vec::new(),
            started: Instant::now(),
            exit_code: None,
            counters: metrics::Counters::default(),
            manager: notify::Manager::from_env(),
            scoreboard,
            fallback,
            tree: tree::Tree::new(),
            memory_check: None,
            last_words: HashMap::new(),
            node_adapter: None,
            dispatch,
            image: upgrade::Image::first(),
        }
    }

    async fn run(&mut self, rx: Receiver<Event>) -> i32 {
        if self.image.resumed.is_some() {
            self.resumed();
        } else {
            log!(
                info,
                "started",
                version = env!("CARGO_PKG_VERSION"),
                pid = rustix::process::getpid().as_raw_nonzero(),
                workers = self.sup.desired(),
                config = self.config.path.display()
            );
            self.sup.start(Instant::now());
        }
        self.execute();
        while self.exit_code.is_none() {
            let memory_check = self.memory_check();
            let deadline = match (self.sup.next_deadline(), memory_check) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = match deadline {
                Some(deadline) => {
                    let timer = async {
                        smol::Timer::at(deadline).await;
                        None
                    };
                    smol::future::or(async { rx.recv().await.ok() }, timer).await
                }
                None => rx.recv().await.ok(),
            };
            if let Some(event) = event {
                self.handle(event);
                self.execute();
            }
            // What already arrived is handled before any deadline is
            // judged: after clusterd was stopped (SIGSTOP) or starved, a
            // READY waiting in a queue counts.
            for _ in 0..MAX_QUEUED_EVENTS {
                let Ok(event) = rx.try_recv() else { break };
                self.handle(event);
                self.execute();
            }
            if self
                .sup
                .next_deadline()
                .is_some_and(|d| d <= Instant::now())
            {
                self.read_queued_before_deadlines();
            }
            self.sup.tick(Instant::now());
            if memory_check.is_some_and(|t| t <= Instant::now()) {
                self.check_memory();
            }
            self.execute();
            let (ready, stopping) = (self.sup.ready(), self.sup.is_stopping());
            self.fallback.update(&self.config, ready, stopping);
            if let Some(d) = &self.dispatch {
                d.update(self.sup.instances().map(|i| {
                    let serving = i.state == crate::lifecycle::State::Ready && !i.hung;
                    (i.id, serving)
                }));
            }
            if self.image.pending.is_some() && self.exit_code.is_none() {
                upgrade::perform(self, &rx).await;
            }
        }
        let code = self.exit_code.unwrap_or(1);
        self.tree.end_all();
        log!(info, "exit", code = code);
        logsink::unfollow_all();
        code
    }

    fn handle(&mut self, event: Event) {
        use async_signal::Signal as S;
        match event {
            Event::Signal(S::Child) => self.reap(),
            Event::Signal(sig @ (S::Term | S::Int)) => {
                log!(info, "signal", name = format!("{sig:?}").to_uppercase());
                self.sup
                    .stop_after(Instant::now(), self.config.shutdown_delay);
            }
            Event::Signal(S::Quit) => {
                log!(info, "signal", name = "QUIT");
                self.sup.stop(Instant::now(), true);
            }
            Event::Signal(S::Hup) => {
                log!(info, "signal", name = "HUP");
                self.restart(None);
            }
            Event::Signal(S::Ttin) => self.scale(ScaleTo::Up(1), None),
            Event::Signal(S::Ttou) => self.scale(ScaleTo::Down(1), None),
            Event::Signal(S::Usr2) => {
                log!(info, "signal", name = "USR2");
                self.upgrade(None, None);
            }
            Event::Signal(S::Usr1) => match logsink::reopen() {
                Ok(Some(path)) => log!(info, "log.reopened", path = path.display()),
                Ok(None) => log!(info, "signal", name = "USR1", effect = "none: no log_file"),
                Err(e) => log!(error, "log.reopen_failed", error = e),
            },
            Event::Signal(other) => log!(warn, "signal.unexpected", name = format!("{other:?}")),
            Event::Worker(id, ev) => self.worker_event(id, ev),
            Event::Control(req) => self.control(req),
            Event::Notify(n) => self.notification(n),
            Event::Metrics(metrics::Query::Metrics(reply)) => {
                let _ = reply.try_send(metrics::render(&self.status(), &self.counters));
            }
            Event::Metrics(metrics::Query::Health(reply)) => {
                let _ = reply.try_send(metrics::health(&self.status(), self.sup.is_stopping()));
            }
        }
    }

    /// Reaps every child that has exited, workers and orphans alike. Before
    /// a worker is reaped (while its pid is still taken), what is left of
    /// its process group and cgroup is killed ([`tree`]).
    fn reap(&mut self) {
        self.read_queued_notifications();
        let mut worker_exited = false;
        loop {
            match tree::exited_child() {
                Ok(Some(pid)) => {
                    match self.pids.get(&pid).and_then(|id| self.procs.get_mut(id)) {
                        Some(p) => self.tree.worker_exited(&mut p.tree),
                        None => self.tree.orphan_exited(pid),
                    }
                    let Some(status) = tree::reap(pid) else {
                        // Reported exited yet not reapable: left for the
                        // next SIGCHLD rather than asked about again.
                        log!(error, "reap.failed", error = format!("pid {pid}"));
                        break;
                    };
                    let exit = match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => Exit::Code(code),
                        (_, Some(sig)) => Exit::Signal(sig),
                        _ => continue, // stopped or continued: not an exit
                    };
                    match self.pids.remove(&pid) {
                        Some(id) => {
                            self.read_last_records(id);
                            self.read_node_channel(id);
                            // Its last words before the line of its exit.
                            if let Some(out) = self.procs.get(&id).and_then(|p| p.output.as_ref()) {
                                out.drain();
                            }
                            self.hint_silent_exit(id, &exit);
                            if let Some(d) = &self.dispatch {
                                d.gone(id);
                            }
                            if let Some(cell) = self.procs.remove(&id).and_then(|p| p.cell) {
                                if let Some(board) = self.scoreboard.as_mut() {
                                    board.give_back(cell);
                                }
                            }
                            self.sup.exited(Instant::now(), id, exit);
                            worker_exited = true;
                        }
                        None => log!(info, "reaped", pid = pid, status = exit),
                    }
                }
                Ok(None) => break,
                Err(rustix::io::Errno::CHILD) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    log!(error, "reap.failed", error = e);
                    break;
                }
            }
        }
        if worker_exited {
            let pids = &self.pids;
            self.tree.sweep(|pid| pids.contains_key(&pid));
        }
        self.tree.tidy();
    }

    /// When to measure the workers' memory next; `None` without
    /// `max_memory` (no wake-up at all).
    fn memory_check(&mut self) -> Option<Instant> {
        if self.config.max_memory.is_none() {
            self.memory_check = None;
            return None;
        }
        Some(
            *self
                .memory_check
                .get_or_insert_with(|| Instant::now() + MEMORY_CHECK),
        )
    }

    /// Measures every ready worker against `max_memory`; one above it is
    /// recycled (see [`crate::lifecycle`]).
    fn check_memory(&mut self) {
        let now = Instant::now();
        self.memory_check = Some(now + MEMORY_CHECK);
        let Some(limit) = self.config.max_memory else {
            return;
        };
        let ready: Vec<(InstanceId, u32)> = self
            .sup
            .instances()
            .filter(|i| i.state == crate::lifecycle::State::Ready && !i.recycling && !i.hung)
            .filter_map(|i| Some((i.id, i.pid?)))
            .collect();
        for (id, pid) in ready {
            if let Some(bytes) = memory::worker_bytes(pid).filter(|&b| b > limit) {
                self.sup.memory_exceeded(now, id, bytes, limit);
            }
        }
    }

    /// Before deadlines are judged: the records and datagrams that starting
    /// workers sent and that their reader tasks have not read yet (they run
    /// only when the loop waits). A READY sent in time counts even if
    /// clusterd could not read it in time.
    fn read_queued_before_deadlines(&mut self) {
        self.read_queued_notifications();
        let starting: Vec<InstanceId> = self
            .sup
            .instances()
            .filter(|i| i.state == crate::lifecycle::State::Starting)
            .map(|i| i.id)
            .collect();
        for id in starting {
            self.read_last_records(id);
            self.read_node_channel(id);
        }
    }

    /// A native worker that exits while starting without having said a
    /// word on fd 3 may not be a clusterd worker at all: say what to change.
    fn hint_silent_exit(&self, id: InstanceId, exit: &Exit) {
        let Some(p) = self.procs.get(&id) else { return };
        let silent = p.protocol == Protocol::Clusterd && p.stats.is_none();
        let starting = inst_state(&self.sup, id) == "starting";
        // (A SIGKILL was clusterd's, at ready_timeout: hinted then.)
        if silent && starting && *exit != Exit::Signal(libc::SIGKILL) && !self.sup.is_stopping() {
            let slot = self.sup.instance(id).map_or(0, |i| i.slot);
            hint::log_not_ready(slot, p.pid, hint::Silence::NothingSent, None);
        }
    }

    /// Handles the sd_notify datagrams queued on the notification socket
    /// that its reader task has not read yet, while their senders' pids
    /// still name workers: a `protocol = systemd` worker that sends
    /// `STATUS=…` or `STOPPING=1` and exits at once is heard. Bounded by
    /// [`MAX_LAST_RECORDS`] datagrams, well-formed or not.
    fn read_queued_notifications(&mut self) {
        for n in self.notify.drain_queued(MAX_LAST_RECORDS as usize) {
            self.notification(n);
        }
    }

    /// Handles the records an exited worker sent that its reader task has
    /// not read yet, before the exit: a worker that sends DRAINED and exits
    /// at once is drained, whichever of SIGCHLD and the record clusterd's
    /// loop sees first. Bounded: at most [`MAX_LAST_RECORDS`], and up to the
    /// first malformed one (the worker can send no more).
    fn read_last_records(&mut self, id: InstanceId) {
        let Some(ipc) = self.procs.get(&id).and_then(|p| p.ipc.clone()) else {
            return;
        };
        let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
        for _ in 0..MAX_LAST_RECORDS {
            let received = crate::fdpass::recv_with_fds(
                ipc.get_ref(),
                &mut buf,
                rustix::net::RecvFlags::DONTWAIT,
            );
            if matches!(&received, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                return;
            }
            match worker_record(ipc.get_ref().as_fd(), received, &buf) {
                // The reader task sees the end of the channel too, and
                // reports it.
                WorkerEvent::Closed => return,
                // Logged once; garbage as a worker's last words needs no
                // more reading.
                bad @ WorkerEvent::Bad(_) => return self.worker_event(id, bad),
                event => self.worker_event(id, event),
            }
        }
    }

    fn worker_event(&mut self, id: InstanceId, ev: WorkerEvent) {
        let Some(inst) = self.sup.instance(id) else {
            return;
        };
        let (slot, pid) = (inst.slot, inst.pid.unwrap_or(0));
        match ev {
            WorkerEvent::Message(FromWorker::Ready) => {
                if !self.sup.ready_reported(Instant::now(), id) {
                    log!(
                        info,
                        "worker.ready_ignored",
                        id = slot,
                        pid = pid,
                        state = inst_state(&self.sup, id)
                    );
                }
            }
            WorkerEvent::Message(FromWorker::Drained) => {
                if self.sup.drained_reported(id) {
                    log!(info, "worker.drained", id = slot, pid = pid);
                } else {
                    log!(
                        warn,
                        "worker.protocol",
                        id = slot,
                        pid = pid,
                        error = "DRAINED before DRAIN (ignored)"
                    );
                }
            }
            WorkerEvent::Message(FromWorker::Stats { requests, active }) => {
                self.stats(id, requests, active, 0);
            }
            WorkerEvent::Message(FromWorker::StatsWithFailures {
                requests,
                active,
                failed,
            }) => self.stats(id, requests, active, failed),
            WorkerEvent::Message(FromWorker::Heartbeat) => self.sup.heartbeat(Instant::now(), id),
            WorkerEvent::Message(FromWorker::TakesConnections { .. }) => log!(
                warn,
                "worker.protocol",
                id = slot,
                pid = pid,
                error = "TakesConnections without its inboxes (ignored)"
            ),
            WorkerEvent::Inboxes(fds) => match &self.dispatch {
                Some(d) => d.takes_connections(id, fds, self.listeners.len()),
                None => log!(
                    warn,
                    "worker.protocol",
                    id = slot,
                    pid = pid,
                    error = "inboxes announced, but the pool does not have dispatch = clusterd"
                ),
            },
            WorkerEvent::Bad(why) => {
                log!(warn, "worker.protocol", id = slot, pid = pid, error = why)
            }
            WorkerEvent::Closed => {
                log!(info, "worker.ipc_closed", id = slot, pid = pid);
                if let Some(p) = self.procs.get_mut(&id) {
                    p.ipc = None;
                }
            }
            WorkerEvent::Note(note) => {
                if let Some(p) = self.procs.get_mut(&id) {
                    p.note.clone_from(&note);
                }
                self.sup.noted(id, note);
            }
        }
    }

    fn stats(&mut self, id: InstanceId, requests: u64, active: u32, failed: u64) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.stats = Some((requests, active));
            if let (Some(d), Protocol::Node) = (&self.dispatch, p.protocol) {
                d.reported(id, active);
            }
        }
        let outcomes = crate::lifecycle::Outcomes { requests, failed };
        self.sup.outcomes_reported(Instant::now(), id, outcomes);
    }

    /// Carries out the state machine's actions until it has no more.
    fn execute(&mut self) {
        loop {
            let actions = self.sup.take_actions();
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.act(action);
            }
        }
        for reason in self.sup.take_replacements() {
            let labels = crate::lifecycle::HealthReason::ALL;
            if let Some(i) = labels.iter().position(|l| *l == reason.as_str()) {
                self.counters.replacements[i] += 1;
            }
        }
        self.forget_unused_generations();
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Spawn {
                instance,
                slot,
                generation,
            } => self.spawn(instance, slot, generation),
            Action::Drain { instance, timeout } => {
                // No connection is passed to it from now on (before the
                // drain, so every one passed is in its inbox by then).
                if let Some(d) = &self.dispatch {
                    d.draining(instance);
                }
                let Some(p) = self.procs.get(&instance) else {
                    return;
                };
                let slot = self.sup.instance(instance).map_or(0, |i| i.slot);
                log!(
                    info,
                    "worker.drain",
                    id = slot,
                    pid = p.pid,
                    timeout = human(timeout)
                );
                let sent = match (&p.ipc, p.protocol) {
                    (Some(ipc), Protocol::Clusterd) => {
                        let msg = proto::encode(&ToWorker::Drain {
                            timeout_ms: timeout.as_millis() as u64,
                        });
                        crate::fdpass::send_with_fds(ipc.get_ref(), &msg, &[]).is_ok()
                    }
                    _ => false,
                };
                if !sent {
                    spawn::signal_group(p.pid, rustix::process::Signal::TERM);
                }
            }
            Action::Terminate { instance } => {
                if let Some(d) = &self.dispatch {
                    d.draining(instance);
                }
                if let Some(p) = self.procs.get(&instance) {
                    p.tree.signal(rustix::process::Signal::TERM);
                }
            }
            Action::Signal { instance } => {
                if let Some(p) = self.procs.get(&instance) {
                    let slot = self.sup.instance(instance).map_or(0, |i| i.slot);
                    let signal = self.config.watchdog_signal;
                    log!(
                        warn,
                        "worker.signal",
                        id = slot,
                        pid = p.pid,
                        signal = signal.name,
                        reason = "watchdog"
                    );
                    // The process itself, not its group: the diagnosis is of
                    // the worker, and its helpers go with it at SIGKILL.
                    if let Some(pid) = rustix::process::Pid::from_raw(p.pid as i32) {
                        // SAFETY: from_raw_unchecked takes any number; the
                        // config allows only real signals (SIGABRT, SIGQUIT…).
                        let sig =
                            unsafe { rustix::process::Signal::from_raw_unchecked(signal.number) };
                        let _ = rustix::process::kill_process(pid, sig);
                    }
                }
            }
            Action::Kill { instance, reason } => {
                if let Some(d) = &self.dispatch {
                    d.draining(instance);
                }
                if let Some(p) = self.procs.get(&instance) {
                    let slot = self.sup.instance(instance).map_or(0, |i| i.slot);
                    log!(
                        warn,
                        "worker.kill",
                        id = slot,
                        pid = p.pid,
                        reason = reason.as_str()
                    );
                    let node = p.protocol == Protocol::Node;
                    if reason == crate::lifecycle::KillReason::ReadyTimeout
                        && (p.stats.is_none() || node)
                    {
                        let ipc = p.ipc.as_ref().map(|ipc| ipc.get_ref().as_fd());
                        let mut silence = hint::Silence::of(p.protocol, ipc);
                        if node && (p.stats.is_some() || p.note.is_some()) {
                            silence = hint::Silence::NodeNotListening;
                        }
                        hint::log_not_ready(slot, p.pid, silence, Some(self.config.ready_timeout));
                    }
                    p.tree.kill(&self.ex);
                }
            }
            Action::Notice(n) => self.notice(n),
            Action::Exit { code } => self.exit_code = Some(code),
        }
    }

    fn spawn(&mut self, instance: InstanceId, slot: u32, generation: u64) {
        if self
            .reuseport
            .as_ref()
            .is_some_and(|p| p.slot(slot).is_none())
        {
            self.sync_reuseport();
        }
        let adapter = match self
            .gens
            .get(&generation)
            .map(|g| (g.spec.protocol, g.spec.uid))
        {
            Some((Protocol::Node, uid)) => self.node_adapter(uid),
            _ => None,
        };
        let Some(spec) = self.gens.get(&generation).map(|g| &g.spec) else {
            self.sup.spawn_failed(
                Instant::now(),
                instance,
                format!("generation {generation} is unknown"),
            );
            return;
        };
        let protocol = spec.protocol;
        let with_adapter;
        let spec = if protocol == Protocol::Node {
            with_adapter = Spec {
                node_adapter: adapter,
                ..spec.clone()
            };
            &with_adapter
        } else {
            spec
        };
        let sockets = match &self.reuseport {
            Some(pool) => match pool.slot(slot) {
                Some(sockets) => sockets,
                None => {
                    let why = format!("cannot start worker {slot}: its sockets are not bound");
                    self.sup.spawn_failed(Instant::now(), instance, why);
                    return;
                }
            },
            None => &self.listeners,
        };
        let inherit: Vec<spawn::Inherit<'_>> = sockets
            .iter()
            .map(|l| spawn::Inherit {
                name: &l.name,
                fd: l.fd.as_fd(),
            })
            .collect();
        let cell = match protocol {
            // With a queue of its own, a worker has no sibling to defer to.
            Protocol::Clusterd if self.reuseport.is_none() => {
                self.scoreboard.as_mut().and_then(Scoreboard::take)
            }
            Protocol::Clusterd => None,
            Protocol::Systemd | Protocol::Node => None,
        };
        let spawned = logcap::pipes(self.config.log_capture)
            .map_err(|e| {
                let program = spec.program.display();
                io::Error::new(
                    e.kind(),
                    format!("cannot start {program}: cannot create the output pipes: {e}"),
                )
            })
            .and_then(|pipes| {
                let (ours, theirs) = pipes.unzip();
                let notify = Some(self.notify_name.as_str());
                self.tree
                    .spawn(spec, slot, generation, &inherit, notify, theirs)
                    .map(|(s, tree)| (s, tree, ours))
            });
        match spawned {
            Ok((spawned, tree, output)) => {
                let pid = spawned.pid;
                let tag = logcap::Tag {
                    id: slot,
                    pid,
                    generation,
                };
                let output =
                    output.and_then(|pipes| match logcap::Capture::start(&self.ex, pipes, tag) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            log!(
                                error,
                                "worker.output_failed",
                                id = slot,
                                pid = pid,
                                error = e
                            );
                            None
                        }
                    });
                self.sup.spawned(instance, pid);
                self.pids.insert(pid, instance);
                log!(
                    info,
                    "worker.spawn",
                    id = slot,
                    pid = pid,
                    generation = generation
                );
                let ipc = spawned.ipc.and_then(|fd| match Async::new(fd) {
                    Ok(a) => Some(Rc::new(a)),
                    Err(e) => {
                        log!(error, "worker.ipc_failed", id = slot, pid = pid, error = e);
                        None
                    }
                });
                if let Some(ipc) = &ipc {
                    match self.hello(ipc.get_ref(), slot, generation, cell) {
                        // The worker exited before reading it: its exit is
                        // logged when it is reaped.
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                        Err(e) => log!(
                            error,
                            "worker.hello_failed",
                            id = slot,
                            pid = pid,
                            error = e
                        ),
                        Ok(()) => {}
                    }
                    self.ex
                        .spawn(read_worker(instance, ipc.clone(), self.tx.clone()))
                        .detach();
                }
                let mut ready_fd = None;
                if let Some(pipe) = spawned.ready_pipe {
                    match Async::new(pipe) {
                        Ok(pipe) => {
                            let pipe = Rc::new(pipe);
                            ready_fd = Some(pipe.clone());
                            let reaped = tree.reaped();
                            let reader = ready_pipe::read(instance, pipe, reaped, self.tx.clone());
                            self.ex.spawn(reader).detach();
                        }
                        Err(e) => {
                            log!(
                                error,
                                "worker.ready_pipe_failed",
                                id = slot,
                                pid = pid,
                                error = e
                            )
                        }
                    }
                }
                let node = spawned
                    .node_channel
                    .and_then(|fd| match node::Channel::new(fd) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            log!(error, "worker.ipc_failed", id = slot, pid = pid, error = e);
                            None
                        }
                    });
                if let Some(d) = &self.dispatch {
                    match &node {
                        Some(channel) => d.node(instance, slot, channel.as_fd()),
                        None => d.native(instance, slot, cell),
                    }
                }
                if let Some(channel) = &node {
                    let reader =
                        node::read(instance, channel.clone(), tree.reaped(), self.tx.clone());
                    self.ex.spawn(reader).detach();
                }
                let proc = Proc {
                    node,
                    pid,
                    protocol,
                    ipc,
                    stats: None,
                    note: None,
                    cell,
                    output,
                    tree,
                    ready_pipe: ready_fd,
                };
                self.procs.insert(instance, proc);
            }
            Err(e) => {
                if let Some(cell) = cell {
                    if let Some(board) = self.scoreboard.as_mut() {
                        board.give_back(cell);
                    }
                }
                log!(
                    error,
                    "worker.spawn_failed",
                    id = slot,
                    generation = generation,
                    error = e
                );
                self.sup
                    .spawn_failed(Instant::now(), instance, e.to_string());
            }
        }
    }

    /// The Node adapter's file (written at the first call), readable by a
    /// worker running as `uid`; `None` if it cannot be written (logged).
    fn node_adapter(&mut self, uid: Option<u32>) -> Option<std::path::PathBuf> {
        if self.node_adapter.is_none() {
            let mut parents = vec![std::env::temp_dir()];
            parents.extend(self.config.control_path().parent().map(Into::into));
            match node::AdapterFile::create(&parents) {
                Ok(file) => {
                    log!(info, "node.adapter", path = file.path().display());
                    self.node_adapter = Some(file);
                }
                Err(e) => {
                    log!(error, "node.adapter_failed", error = e);
                    return None;
                }
            }
        }
        let file = self.node_adapter.as_mut()?;
        file.allow(uid);
        Some(file.path().to_path_buf())
    }

    /// Handles what a node worker sent on its channel that its reader task
    /// has not read yet (before its exit, or before deadlines are judged).
    fn read_node_channel(&mut self, id: InstanceId) {
        let Some(channel) = self.procs.get(&id).and_then(|p| p.node.clone()) else {
            return;
        };
        for event in channel.read_queued() {
            self.worker_event(id, event);
        }
    }

    /// An sd_notify message: READY=1, STOPPING=1 and STATUS=… are understood;
    /// messages from processes that are not workers are ignored.
    fn notification(&mut self, n: notify::Notification) {
        let Some(&id) = self.pids.get(&n.pid) else {
            return;
        };
        let slot = self.sup.instance(id).map_or(0, |i| i.slot);
        for (key, value) in n.fields {
            match (key.as_str(), value.as_str()) {
                ("READY", "1") => self.worker_event(id, WorkerEvent::Message(FromWorker::Ready)),
                ("WATCHDOG", "1") => self.sup.heartbeat(Instant::now(), id),
                ("WATCHDOG", "trigger") => self.sup.watchdog_triggered(Instant::now(), id),
                ("EXTEND_TIMEOUT_USEC", usec) => {
                    if let Ok(usec) = usec.parse::<u64>() {
                        let by = Duration::from_micros(usec);
                        self.sup.extend_deadline(Instant::now(), id, by);
                    }
                }
                ("STOPPING", "1") => log!(info, "worker.stopping", id = slot, pid = n.pid),
                ("STATUS", _) => {
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.note = Some(value.chars().take(200).collect());
                    }
                }
                _ => {}
            }
        }
    }

    /// The listeners a worker of `slot` gets.
    fn slot_listeners(&self, slot: u32) -> &[Listener] {
        match &self.reuseport {
            Some(pool) => pool.slot(slot).unwrap_or_default(),
            None => &self.listeners,
        }
    }

    /// `dispatch = reuseport`: binds the sockets of new slots and closes
    /// those of slots scaled away (their queue migrates to the other slots'
    /// sockets when the kernel allows it: see [`reuseport`]).
    fn sync_reuseport(&mut self) {
        let Some(pool) = &mut self.reuseport else {
            return;
        };
        let wanted = self.sup.slots().map(|s| s.id).collect();
        let (changed, failed) = pool.sync(&wanted);
        for (slot, e) in failed {
            log!(error, "reuseport.failed", id = slot, error = e);
        }
        if changed {
            self.fallback.set_listeners(pool.all());
        }
    }

    fn hello(
        &self,
        ipc: &OwnedFd,
        slot: u32,
        generation: u64,
        cell: Option<u32>,
    ) -> io::Result<()> {
        let hello = ToWorker::Hello(proto::Hello {
            worker_id: slot,
            generation,
            listeners: self
                .slot_listeners(slot)
                .iter()
                .map(Listener::info)
                .collect(),
            scoreboard: cell,
        });
        let mut fds: Vec<BorrowedFd<'_>> = self
            .slot_listeners(slot)
            .iter()
            .map(|l| l.fd.as_fd())
            .collect();
        if let (Some(_), Some(board)) = (cell, &self.scoreboard) {
            fds.push(board.fd.as_fd());
        }
        crate::fdpass::send_with_fds(ipc, &proto::encode(&hello), &fds)
    }

    fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::Ready {
                slot,
                pid,
                generation,
                took,
            } => {
                log!(
                    info,
                    "worker.ready",
                    id = slot,
                    pid = opt(pid),
                    generation = generation,
                    took_ms = took.as_millis()
                );
            }
            Notice::Exited {
                slot,
                pid,
                generation,
                exit,
                expected,
                uptime,
                killed,
            } => {
                let words = pid.and_then(logsink::take_last_stderr);
                if !expected {
                    match words {
                        Some(w) => self.last_words.insert(slot, w),
                        None => self.last_words.remove(&slot),
                    };
                    let reason = match (&exit, killed) {
                        (_, Some(crate::lifecycle::KillReason::ReadyTimeout)) => 2,
                        (Exit::SpawnFailed(_), _) => 3,
                        (Exit::Signal(_), _) => 1,
                        (Exit::Code(_), _) => 0,
                    };
                    self.counters.exits[reason] += 1;
                }
                if expected {
                    log!(
                        info,
                        "worker.exit",
                        id = slot,
                        pid = opt(pid),
                        generation = generation,
                        status = exit,
                        uptime_ms = uptime.as_millis()
                    );
                } else {
                    log!(
                        warn,
                        "worker.crash",
                        id = slot,
                        pid = opt(pid),
                        generation = generation,
                        status = exit,
                        uptime_ms = uptime.as_millis()
                    );
                }
            }
            Notice::Backoff {
                slot,
                delay,
                restarts,
            } => {
                log!(
                    warn,
                    "worker.backoff",
                    id = slot,
                    delay_ms = delay.as_millis(),
                    restarts = restarts
                );
            }
            Notice::AllReady {
                workers,
                generation,
            } => {
                log!(
                    info,
                    "pool.ready",
                    workers = workers,
                    generation = generation
                );
                if let Some(m) = &mut self.manager {
                    m.all_ready(&format!("{workers} workers ready"));
                }
            }
            Notice::RestartBegun {
                generation,
                total,
                worker,
            } => match worker {
                Some(id) => log!(info, "restart.begin", generation = generation, id = id),
                None => {
                    log!(
                        info,
                        "restart.begin",
                        generation = generation,
                        workers = total
                    );
                    if let Some(m) = &mut self.manager {
                        m.reload_begun();
                    }
                }
            },
            Notice::Baking {
                slot,
                pid,
                generation,
                bake,
                role,
            } => {
                log!(
                    info,
                    "restart.bake",
                    id = slot,
                    pid = opt(pid),
                    generation = generation,
                    role = role,
                    bake = human(bake)
                );
                let baking = proto::Baking {
                    worker_id: slot,
                    pid: pid.unwrap_or(0),
                    generation,
                    role: role.into(),
                    bake_ms: bake.as_millis() as u64,
                };
                self.tell_watchers(Response::Baking(baking), false);
            }
            Notice::RestartProgress {
                slot,
                done,
                total,
                old_pid,
                new_pid,
                took,
            } => {
                log!(
                    info,
                    "restart.progress",
                    id = slot,
                    done = done,
                    total = total,
                    old_pid = opt(old_pid),
                    new_pid = opt(new_pid),
                    took_ms = took.as_millis()
                );
                let progress = proto::Progress {
                    worker_id: slot,
                    done,
                    total,
                    old_pid,
                    new_pid: new_pid.unwrap_or(0),
                    elapsed_ms: took.as_millis() as u64,
                };
                self.tell_watchers(Response::Progress(progress), false);
            }
            Notice::RestartDone {
                generation,
                replaced,
                took,
                worker,
            } => {
                match worker {
                    Some(id) => log!(
                        info,
                        "restart.done",
                        generation = generation,
                        id = id,
                        took_ms = took.as_millis()
                    ),
                    None => {
                        log!(
                            info,
                            "restart.done",
                            generation = generation,
                            replaced = replaced,
                            took_ms = took.as_millis()
                        );
                        self.counters.restarts_done += 1;
                        self.counters.restart_seconds_sum += took.as_secs_f64();
                        if let Some(m) = &mut self.manager {
                            m.reload_ended(&format!("generation {generation} serving"));
                        }
                    }
                }
                let outcome = proto::RestartOutcome::Done {
                    generation,
                    replaced,
                    elapsed_ms: took.as_millis() as u64,
                };
                self.tell_watchers(Response::Restarted(outcome), true);
            }
            Notice::RestartAborted {
                generation,
                reason,
                replaced,
                total,
                worker,
            } => {
                match worker {
                    Some(id) => log!(
                        error,
                        "restart.aborted",
                        generation = generation,
                        id = id,
                        reason = reason
                    ),
                    None => {
                        log!(
                            error,
                            "restart.aborted",
                            generation = generation,
                            replaced = replaced,
                            total = total,
                            reason = reason
                        );
                        self.counters.restarts_aborted += 1;
                        if let Some(m) = &mut self.manager {
                            m.reload_ended(&format!("restart aborted: {reason}"));
                        }
                    }
                }
                self.serve_config_of(self.sup.generation());
                let outcome = proto::RestartOutcome::Aborted {
                    reason,
                    replaced,
                    total,
                };
                self.tell_watchers(Response::Restarted(outcome), true);
            }
            Notice::RollbackBegun {
                from,
                to,
                reason,
                slots,
                after_restart,
            } => {
                log!(
                    error,
                    "restart.rollback",
                    generation = to,
                    from = from,
                    workers = slots,
                    after_restart = after_restart,
                    reason = reason
                );
                self.counters.rollbacks += 1;
                self.serve_config_of(to);
                if let Some(m) = &mut self.manager {
                    m.reload_begun();
                    m.notify(&format!(
                        "STATUS=rolling back to generation {to}: generation {from} failed"
                    ));
                }
            }
            Notice::RolledBack {
                from,
                to,
                reason,
                replaced,
                restored,
                total,
                took,
                complete,
                after_restart,
            } => {
                if complete {
                    log!(
                        warn,
                        "restart.rolled_back",
                        generation = to,
                        from = from,
                        restored = restored,
                        took_ms = took.as_millis()
                    );
                } else {
                    log!(
                        error,
                        "restart.rollback_failed",
                        generation = to,
                        from = from,
                        restored = restored,
                        total = total,
                        reason = reason
                    );
                }
                if !after_restart {
                    self.counters.restarts_aborted += 1;
                }
                if let Some(m) = &mut self.manager {
                    m.reload_ended(&format!("rolled back to generation {to}: {reason}"));
                }
                let outcome = proto::RestartOutcome::RolledBack {
                    reason,
                    generation: to,
                    failed_generation: from,
                    replaced,
                    restored,
                    total,
                    complete,
                };
                self.tell_watchers(Response::Restarted(outcome), true);
            }
            Notice::Scaled { from, to } => log!(info, "scale", from = from, to = to),
            Notice::Hung {
                slot,
                pid,
                silent,
                never,
            } => {
                if never && !silent.is_zero() {
                    let hint = "it never sent a heartbeat: with watchdog set, a native worker \
                                runs Worker::watchdog() on its executor, any other program \
                                sends WATCHDOG=1 to $NOTIFY_SOCKET every WATCHDOG_USEC/2";
                    log!(
                        error,
                        "worker.hung",
                        id = slot,
                        pid = opt(pid),
                        silent_ms = silent.as_millis(),
                        hint = hint
                    );
                } else if silent.is_zero() {
                    log!(
                        error,
                        "worker.hung",
                        id = slot,
                        pid = opt(pid),
                        reason = "WATCHDOG=trigger"
                    );
                } else {
                    log!(
                        error,
                        "worker.hung",
                        id = slot,
                        pid = opt(pid),
                        silent_ms = silent.as_millis()
                    );
                }
            }
            Notice::RecycleQueued { slot, pid, reason } => {
                log!(
                    info,
                    "worker.recycle",
                    id = slot,
                    pid = opt(pid),
                    reason = reason
                );
            }
            Notice::Recycled {
                slot,
                reason,
                old_pid,
                new_pid,
                took,
            } => {
                log!(
                    info,
                    "worker.recycled",
                    id = slot,
                    reason = reason.as_str(),
                    old_pid = opt(old_pid),
                    new_pid = opt(new_pid),
                    took_ms = took.as_millis()
                );
            }
            Notice::RecycleFailed { slot, reason, why } => {
                log!(
                    warn,
                    "worker.recycle_failed",
                    id = slot,
                    reason = reason.as_str(),
                    error = why
                );
            }
            Notice::CrashLoop {
                slot,
                streak,
                last,
                exiting,
            } => {
                log!(
                    error,
                    "pool.crash_loop",
                    id = slot,
                    crashes = streak,
                    last_exit = last,
                    action = if exiting { "exit" } else { "backoff" }
                );
            }
            Notice::LameDuck { delay } => {
                log!(info, "stopping", mode = "lame_duck", delay = human(delay));
                if let Some(m) = &mut self.manager {
                    m.stopping();
                }
            }
            Notice::Stopping { fast, workers } => {
                log!(
                    info,
                    "stopping",
                    mode = if fast { "fast" } else { "graceful" },
                    workers = workers
                );
                if let Some(m) = &mut self.manager {
                    m.stopping();
                }
            }
        }
    }

    fn tell_watchers(&mut self, response: Response, last: bool) {
        self.restart_watchers
            .retain(|w| w.try_send(response.clone()).is_ok());
        if last {
            self.restart_watchers.clear();
        }
    }

    /// A rolling restart (HUP or `clusterctl restart`): re-read the config,
    /// then replace every worker with the new generation.
    fn restart(&mut self, watcher: Option<Sender<Response>>) {
        let refuse = |watcher: Option<Sender<Response>>, why: String| {
            log!(error, "restart.refused", reason = why);
            if let Some(w) = watcher {
                let _ = w.try_send(Response::Error(format!("restart refused: {why}")));
            }
        };
        let config = match config::load_for(&self.config.path, config::Purpose::Run) {
            Ok(loaded) => {
                hint::config_warnings(&self.config.path, &loaded.warnings);
                loaded.config
            }
            Err(e) => return refuse(watcher, format!("the config has errors:\n{e}")),
        };
        for (key, changed) in [
            ("listen", config.listen != self.config.listen),
            ("backlog", config.backlog != self.config.backlog),
            (
                "control",
                config.control_path() != self.config.control_path(),
            ),
            ("metrics", config.metrics != self.config.metrics),
            ("workers", config.workers != self.config.workers),
        ] {
            if changed {
                log!(
                    warn,
                    "config.not_reloaded",
                    key = key,
                    reason = "takes effect when clusterd is started again (use clusterctl scale for workers)"
                );
            }
        }
        let generation = self.next_generation;
        // The keys only a new clusterd changes stay as they are.
        let config = Config {
            listen: self.config.listen.clone(),
            backlog: self.config.backlog,
            control: self.config.control.clone(),
            metrics: self.config.metrics,
            workers: self.config.workers,
            ..config
        };
        self.gens
            .insert(generation, Generation::new(config.clone()));
        // The replacements start with the new timeouts; a refusal, an abort
        // or a rollback puts the old ones back.
        self.sup.set_timing(timing(&config));
        match self.sup.restart(Instant::now(), generation) {
            Ok(()) => {
                if let Some(d) = &self.dispatch {
                    d.configure(&config);
                }
                self.next_generation += 1;
                self.config = config;
                self.restart_watchers.extend(watcher);
            }
            Err(why) => {
                self.gens.remove(&generation);
                self.sup.set_timing(timing(&self.config));
                refuse(watcher, why);
            }
        }
    }

    /// `clusterctl restart --worker ID`: one worker replaced by a new
    /// instance of its generation, READY-gated and baked. The config is not
    /// re-read.
    fn restart_worker(&mut self, id: u32, watcher: Sender<Response>) {
        match self.sup.restart_worker(Instant::now(), id) {
            Ok(()) => self.restart_watchers.push(watcher),
            Err(why) => {
                log!(warn, "restart.refused", id = id, reason = why);
                let _ = watcher.try_send(Response::Error(format!("restart refused: {why}")));
            }
        }
    }

    /// Puts generation `generation`'s config (and so its timeouts) back in
    /// force: the pool serves it again after an abort or a rollback.
    fn serve_config_of(&mut self, generation: u64) {
        if let Some(g) = self.gens.get(&generation) {
            self.config = g.config.clone();
            self.sup.set_timing(timing(&self.config));
            if let Some(d) = &self.dispatch {
                d.configure(&self.config);
            }
        }
    }

    fn scale(&mut self, to: ScaleTo, reply: Option<&Sender<Response>>) {
        match self.sup.scale(Instant::now(), to) {
            Ok((from, to)) => {
                self.sync_reuseport();
                if let Some(r) = reply {
                    let _ = r.try_send(Response::Scaled { from, to });
                }
            }
            Err(why) => {
                log!(warn, "scale.refused", reason = why);
                if let Some(r) = reply {
                    let _ = r.try_send(Response::Error(why));
                }
            }
        }
    }

    fn control(&mut self, req: ControlRequest) {
        use proto::{Request, Scale};
        match req.request {
            Request::Status => {
                let _ = req
                    .reply
                    .try_send(Response::Status(Box::new(self.status())));
            }
            Request::Restart => self.restart(Some(req.reply)),
            Request::Scale(s) => {
                let to = match s {
                    Scale::To(n) => ScaleTo::Exactly(n),
                    Scale::Up(n) => ScaleTo::Up(n),
                    Scale::Down(n) => ScaleTo::Down(n),
                };
                self.scale(to, Some(&req.reply));
            }
            Request::Stop => {
                let _ = req.reply.try_send(Response::Stopping);
                self.sup
                    .stop_after(Instant::now(), self.config.shutdown_delay);
            }
            Request::RestartWorker(id) => self.restart_worker(id, req.reply),
            Request::Logs {
                lines,
                follow,
                worker,
            } => {
                let tail = logsink::tail(lines as usize, worker);
                let _ = req.reply.try_send(Response::Logs(tail));
                if follow {
                    logsink::follow(req.reply, worker);
                }
            }
            Request::Upgrade { binary } => self.upgrade(binary, Some(req.reply)),
        }
    }

    fn status(&self) -> proto::Status {
        let now = Instant::now();
        let mut workers = Vec::new();
        for slot in self.sup.slots() {
            let mut any = false;
            for inst in self.sup.instances().filter(|i| i.slot == slot.id) {
                any = true;
                let proc = self.procs.get(&inst.id);
                workers.push(proto::WorkerStatus {
                    id: slot.id,
                    pid: inst.pid,
                    generation: inst.generation,
                    state: if inst.hung {
                        "hung".into()
                    } else {
                        inst.state.as_str().into()
                    },
                    uptime_ms: now.saturating_duration_since(inst.started).as_millis() as u64,
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    rss_bytes: inst.pid.and_then(spawn::rss_bytes),
                    requests: proc.and_then(|p| p.stats.map(|s| s.0)),
                    active: proc.and_then(|p| p.stats.map(|s| s.1)),
                    note: proc.and_then(|p| p.note.clone()),
                    last_words: self.last_words.get(&slot.id).cloned(),
                });
            }
            if !any {
                workers.push(proto::WorkerStatus {
                    id: slot.id,
                    pid: None,
                    generation: slot.generation,
                    state: "backoff".into(),
                    uptime_ms: 0,
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    rss_bytes: None,
                    requests: None,
                    active: None,
                    note: None,
                    last_words: self.last_words.get(&slot.id).cloned(),
                });
            }
        }
        // Workers of slots scaled away, still draining.
        for inst in self
            .sup
            .instances()
            .filter(|i| !self.sup.slots().any(|s| s.id == i.slot))
        {
            workers.push(proto::WorkerStatus {
                id: inst.slot,
                pid: inst.pid,
                generation: inst.generation,
                state: inst.state.as_str().into(),
                uptime_ms: now.saturating_duration_since(inst.started).as_millis() as u64,
                restarts: 0,
                last_exit: None,
                rss_bytes: inst.pid.and_then(spawn::rss_bytes),
                requests: None,
                active: None,
                note: None,
                last_words: None,
            });
        }
        proto::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            uptime_ms: now.duration_since(self.started).as_millis() as u64,
            config: self.config.path.display().to_string(),
            protocol: self.config.protocol.as_str().into(),
            listeners: match &self.reuseport {
                Some(pool) => pool.infos(),
                None => self.listeners.iter().map(Listener::info).collect(),
            },
            desired: self.sup.desired(),
            ready: self.sup.ready(),
            generation: self.sup.generation(),
            operation: self.sup.operation(),
            phase: self.sup.phase().as_str().into(),
            last_restart: self.sup.last_restart().map(|l| proto::LastRestart {
                outcome: l.outcome.as_str().into(),
                generation: l.generation,
                reason: l.reason.clone(),
                ago_ms: now.saturating_duration_since(l.at).as_millis() as u64,
            }),
            crash_loop: self.sup.crash_loop(now).map(|(slot, streak)| {
                let last = self
                    .sup
                    .slots()
                    .find(|s| s.id == slot)
                    .and_then(|s| s.last_exit.clone())
                    .unwrap_or_default();
                format!("worker {slot}: {streak} crashes in a row, the last {last}")
            }),
            workers,
            image_uptime_ms: now.duration_since(self.image.started).as_millis() as u64,
            upgrades: self.image.upgrades,
        }
    }

    fn forget_unused_generations(&mut self) {
        if self.gens.len() > 1 {
            let used = self.sup.generations_in_use();
            self.gens.retain(|g, _| used.contains(g));
        }
    }
}

fn inst_state(sup: &Supervisor, id: InstanceId) -> &'static str {
    sup.instance(id).map_or("gone", |i| i.state.as_str())
}

fn opt(pid: Option<u32>) -> String {
    pid.map_or_else(|| "-".into(), |p| p.to_string())
}

/// Reads one worker's IPC records and forwards them as events until the
/// channel closes (or the worker has sent too much garbage).
async fn read_worker(id: InstanceId, ipc: Rc<Async<OwnedFd>>, tx: Sender<Event>) {
    let mut buf = vec![0u8; proto::MAX_IPC_RECORD];
    let mut bad = 0;
    loop {
        let received = ipc
            .read_with(|fd| {
                crate::fdpass::recv_with_fds(fd, &mut buf, rustix::net::RecvFlags::DONTWAIT)
            })
            .await;
        let event = worker_record(ipc.get_ref().as_fd(), received, &buf);
        let closed = matches!(event, WorkerEvent::Closed);
        if let WorkerEvent::Bad(_) = event {
            bad += 1;
        }
        if tx.send(Event::Worker(id, event)).await.is_err() || closed {
            return;
        }
        if bad >= MAX_BAD_RECORDS {
            let _ = tx
                .send(Event::Worker(
                    id,
                    WorkerEvent::Bad(
                        "too many malformed records: its channel is now ignored".into(),
                    ),
                ))
                .await;
            return;
        }
    }
}

/// What one receive on a worker's IPC channel `ipc` amounts to.
///
/// On SOCK_SEQPACKET an empty record and the end of the channel both
/// receive 0 bytes (Linux sets no `MSG_EOR` on unix sockets to tell them
/// apart). Only the end comes with the peer shut down (`POLLRDHUP`), so 0
/// bytes while the worker's end is open are an empty record: a protocol
/// error. (An empty record sent just before the worker closes counts as the
/// end, which it then is.)
fn worker_record(
    ipc: BorrowedFd<'_>,
    received: io::Result<crate::fdpass::Received>,
    buf: &[u8],
) -> WorkerEvent {
    match received {
        Ok(r) if r.len == 0 && r.fds.is_empty() && peer_closed(ipc) => WorkerEvent::Closed,
        Ok(r) if r.len == 0 && r.fds.is_empty() => WorkerEvent::Bad("an empty record".into()),
        Ok(r) if r.truncated => WorkerEvent::Bad(format!(
            "record larger than {} bytes",
            proto::MAX_IPC_RECORD
        )),
        Ok(r) if !r.fds.is_empty() => {
            match proto::decode::<FromWorker>(&buf[..r.len], proto::MAX_IPC_RECORD) {
                Ok(FromWorker::TakesConnections { listeners })
                    if listeners as usize == r.fds.len() =>
                {
                    WorkerEvent::Inboxes(r.fds)
                }
                _ => WorkerEvent::Bad("unexpected fds attached (closed)".into()),
            }
        }
        Ok(r) => match proto::decode::<FromWorker>(&buf[..r.len], proto::MAX_IPC_RECORD) {
            Ok(msg) => WorkerEvent::Message(msg),
            Err(e) => WorkerEvent::Bad(e.to_string()),
        },
        // A killed worker resets the channel when records were left unread.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => WorkerEvent::Closed,
        Err(e) => WorkerEvent::Bad(format!("receive failed: {e}")),
    }
}

/// Whether the other end of `sock` is closed or shut down for writing.
fn peer_closed(sock: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&sock, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
        // Cannot tell: the end, so that a dead channel is not read for ever.
        Err(_) => true,
    }
}
