//! Deploy targets, for real: the scratch image of examples/container/ built
//! and run by a real dockerd; a fleet of three hosts (network namespaces)
//! behind a real HAProxy; the systemd unit verified, and the RELOADING=1 /
//! READY=1 sequence a rolling restart reports to the service manager.
//!
//! The docker and fleet tests need root, `docker`/`dockerd`, `ip` and
//! `haproxy` (`.ci/run` installs Debian's `docker.io`, `iproute2` and
//! `haproxy` when missing). Where one cannot run they say so loudly and
//! skip: they never pass by pretending. Everything they start (dockerd,
//! containers, images, namespaces, HAProxy, clusterd) they stop, by pid or
//! by its unique name. Traffic stays on 127.0.0.1, a bridge the test
//! creates, and veths that live only inside the test's own namespaces.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::util::*;

/// Says loudly why a test does not run here.
fn skip(test: &str, why: &str) {
    let bar = "#".repeat(78);
    eprintln!("\n{bar}\n# SKIPPED {test}: {why}\n{bar}\n");
}

/// `prog` found in `PATH` or the sbin folders (not always in a test's PATH).
fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(prog))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs a command to completion; panics (with its output) if it fails.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `sig` to `child` (by its pid), waits for it, and KILLs it if it
/// has not exited within `grace`.
fn stop_child(child: &mut Child, sig: Signal, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    kill(child.id(), sig);
    if !eventually(grace, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The README's static build (`--workspace --bins --examples`, crt-static),
/// release, in a target folder of its own, once per test run; returns the
/// folder the binaries are in.
fn static_release() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = root.join("target").join("static-release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run_ok(
                Command::new(cargo)
                    .current_dir(root)
                    .env("RUSTFLAGS", "-C target-feature=+crt-static")
                    .env("CARGO_TARGET_DIR", &target)
                    .args(["build", "--quiet", "--release"])
                    .args(["--target", "x86_64-unknown-linux-gnu"])
                    .args(["--workspace", "--bins", "--examples"]),
            );
            target.join("x86_64-unknown-linux-gnu").join("release")
        })
        .clone()
}

// ---------------------------------------------------------------- docker --

/// A docker engine to talk to: the one already running, or a dockerd this
/// test started (its own data root, socket and bridge, no iptables rules, no
/// forwarding), which it stops on drop.
struct Docker {
    cli: PathBuf,
    host: Option<String>,
    own: Option<OwnDockerd>,
    /// Containers and images to remove on drop (on a daemon we did not start).
    containers: Vec<String>,
    images: Vec<String>,
}

struct OwnDockerd {
    child: Child,
    bridge: String,
    _dir: TempDir,
}

impl Docker {
    fn connect() -> Result<Docker, String> {
        let cli = which("docker").ok_or("no docker client (Debian: apt-get install docker.io)")?;
        let mut docker = Docker {
            cli,
            host: None,
            own: None,
            containers: Vec::new(),
            images: Vec::new(),
        };
        if docker.answers() {
            return Ok(docker);
        }
        let dockerd = which("dockerd").ok_or("no dockerd answers and none is installed")?;
        if !is_root() {
            return Err("no dockerd answers, and starting one needs root".into());
        }
        let dir = TempDir::new("dockerd");
        let sock = dir.path().join("docker.sock");
        // A bridge of our own (docker0 would be left behind), on a private
        // subnet that differs between concurrent test runs.
        let n = std::process::id() % 200 + 20;
        let bridge = format!("cdt{}", std::process::id());
        run_ok(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        let setup = Command::new("ip")
            .args(["addr", "add", &format!("10.213.{n}.1/24"), "dev", &bridge])
            .status()
            .and_then(|_| {
                Command::new("ip")
                    .args(["link", "set", &bridge, "up"])
                    .status()
            });
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--bridge", &bridge])
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        let child = match (setup, child) {
            (Ok(_), Ok(child)) => child,
            (_, child) => {
                if let Ok(mut c) = child {
                    stop_child(&mut c, Signal::TERM, Duration::from_secs(20));
                }
                let _ = Command::new("ip").args(["link", "del", &bridge]).status();
                return Err("could not start dockerd".into());
            }
        };
        docker.host = Some(format!("unix://{}", sock.display()));
        docker.own = Some(OwnDockerd {
            child,
            bridge,
            _dir: dir,
        });
        if !eventually(DEADLINE, || docker.answers()) {
            let log = docker
                .own
                .as_ref()
                .map(|o| o._dir.path().join("dockerd.log"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            return Err(format!(
                "the dockerd this test started never answered:\n{log}"
            ));
        }
        Ok(docker)
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.cli);
        if let Some(host) = &self.host {
            cmd.args(["-H", host]);
        }
        // The classic builder: no buildx plugin needed, nothing pulled.
        cmd.env("DOCKER_BUILDKIT", "0");
        cmd
    }

    fn answers(&self) -> bool {
        self.cmd()
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        run_ok(self.cmd().args(args)).trim().to_string()
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run docker")
    }

    /// clusterd's log lines in a container's output.
    fn log(&self, container: &str) -> Vec<LogLine> {
        let out = self.output(&["logs", container]);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text.lines().filter_map(LogLine::parse).collect()
    }

    fn wait_log(&self, container: &str, event: &str, pred: impl Fn(&LogLine) -> bool) -> LogLine {
        wait_for(
            &format!("{event} in the log of container {container}"),
            || {
                self.log(container)
                    .into_iter()
                    .find(|l| l.event == event && pred(l))
            },
        )
    }

    /// The host address a container port is published on.
    fn port(&self, container: &str, port: &str) -> SocketAddr {
        let out = self.ok(&["port", container, port]);
        out.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("docker port {container} {port}: {out:?}"))
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                let out = self.output(&["logs", c]);
                eprintln!(
                    "---- docker logs {c} ----\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for c in &self.containers {
            let _ = self.output(&["rm", "-f", c]);
        }
        for i in &self.images {
            let _ = self.output(&["rmi", "-f", i]);
        }
        if let Some(own) = &mut self.own {
            stop_child(&mut own.child, Signal::TERM, Duration::from_secs(30));
            let _ = Command::new("ip")
                .args(["link", "del", &own.bridge])
                .status();
        }
    }
}

/// Copies `src` to `dst`, creating `dst`'s folder.
fn copy_into(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

#[test]
fn the_scratch_image_serves_restarts_on_hup_reaps_orphans_and_stops_on_docker_stop() {
    const TEST: &str = "deploy::the_scratch_image_…";
    let docker = match Docker::connect() {
        Ok(d) => d,
        Err(why) => return skip(TEST, &why),
    };
    let mut docker = docker;
    let built = static_release();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The build context the repository's .dockerignore leaves: the three
    // static binaries and the config, at the paths the Dockerfile names.
    let ctx = TempDir::new("docker-ctx");
    let release = ctx.path().join("target/x86_64-unknown-linux-gnu/release");
    for bin in ["clusterd", "clusterctl", "examples/shop"] {
        copy_into(&built.join(bin), &release.join(bin));
    }
    copy_into(
        &root.join("examples/container/shop.conf"),
        &ctx.path().join("examples/container/shop.conf"),
    );
    let image = format!("clusterd-test-shop:{}", std::process::id());
    docker.images.push(image.clone());
    let dockerfile = root.join("examples/container/Dockerfile.scratch");
    docker.ok(&[
        "build",
        "--quiet",
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        &image,
        ctx.path().to_str().unwrap(),
    ]);

    // A second container of the same image whose worker leaves an orphan:
    // the test worker (static too) and a config of its own, mounted in.
    let orphan_conf = ctx.path().join("orphan.conf");
    std::fs::write(
        &orphan_conf,
        "exec = /app/testworker ok --orphan\nworkers = 1\nlisten = 0.0.0.0:3000\nuser = 65534\ngroup = 65534\n",
    )
    .unwrap();
    let orphans = format!("clusterd-test-orphans-{}", std::process::id());
    docker.containers.push(orphans.clone());
    docker.ok(&[
        "run",
        "-d",
        "--name",
        &orphans,
        "-v",
        &format!(
            "{}:/app/testworker:ro",
            built.join("examples/testworker").display()
        ),
        "-v",
        &format!("{}:/etc/clusterd/shop.conf:ro", orphan_conf.display()),
        &image,
    ]);

    let shop = format!("clusterd-test-shop-{}", std::process::id());
    docker.containers.push(shop.clone());
    docker.ok(&[
        "run",
        "-d",
        "--name",
        &shop,
        "--stop-timeout",
        "45",
        "-p",
        "127.0.0.1::3000",
        "-p",
        "127.0.0.1::9464",
        &image,
    ]);
    let started = docker.wait_log(&shop, "started", |_| true);
    assert_eq!(started.num("pid"), 1, "clusterd is the container's PID 1");
    docker.wait_log(&shop, "pool.ready", |_| true);
    let http = docker.port(&shop, "3000/tcp");
    let metrics = docker.port(&shop, "9464/tcp");
    assert!(http.ip().is_loopback() && metrics.ip().is_loopback());
    wait_for("/healthz 200 through the published port", || {
        get(metrics, "/healthz").ok().filter(|r| r.status == 200)
    });
    let product = wait_for("the shop through the published port", || {
        get(http, "/products/42").ok().filter(|r| r.status == 200)
    });
    assert!(product.header("x-worker").is_some(), "a worker answered");

    // HUP: a rolling restart under load, nothing failed.
    let loads = mixed_load(http);
    let_loads_run(&loads, 20);
    docker.ok(&["kill", "-s", "HUP", &shop]);
    let done = docker.wait_log(&shop, "restart.done", |_| true);
    assert_eq!(done.num("generation"), 2, "{}", done.raw);
    let_loads_run(&loads, 20);
    finish_loads(loads);

    // Orphans are reaped by PID 1.
    let reaped = docker.wait_log(&orphans, "reaped", |_| true);
    assert_eq!(reaped.get("status"), Some("exit 0"), "{}", reaped.raw);
    docker.ok(&["stop", "-t", "30", &orphans]);

    // docker stop: TERM, a drain, exit 0 well within the grace (an exit
    // by SIGKILL would be 137).
    docker.ok(&["stop", "-t", "45", &shop]);
    let code = docker.ok(&["inspect", "-f", "{{.State.ExitCode}}", &shop]);
    assert_eq!(code, "0", "clusterd exited by itself, 0");
    let log = docker.log(&shop);
    assert!(
        log.iter()
            .any(|l| l.event == "stopping" && l.get("mode") == Some("graceful")),
        "a graceful stop"
    );
    assert!(
        log.iter()
            .any(|l| l.event == "exit" && l.get("code") == Some("0"))
    );
    let code = docker.ok(&["inspect", "-f", "{{.State.ExitCode}}", &orphans]);
    assert_eq!(code, "0");
}

// ----------------------------------------------------------------- fleet --

/// Network namespaces, deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) {
        run_ok(Command::new("ip").args(["netns", "add", name]));
        self.0.push(name.to_string());
        run_ok(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
    }
}

impl Namespaces {
    /// A name for the network namespace this test runs in (`ip netns
    /// attach`), so that HAProxy, run inside the load balancer's namespace,
    /// can bind its frontend here. Deleting the name leaves the namespace.
    fn attach_own(&mut self, name: &str) {
        let pid = std::process::id().to_string();
        run_ok(Command::new("ip").args(["netns", "attach", name, &pid]));
        self.0.push(name.to_string());
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// HAProxy, started by the test; TERM (by pid) on drop.
struct Haproxy {
    child: Child,
    stats: PathBuf,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::TERM, Duration::from_secs(10));
    }
}

impl Haproxy {
    /// `show stat` on the stats socket: (server, status, sessions in total).
    fn servers(&self) -> Vec<(String, String, u64)> {
        let Ok(mut s) = UnixStream::connect(&self.stats) else {
            return Vec::new();
        };
        let _ = s.write_all(b"show stat\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let mut lines = text.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| cols.iter().position(|c| *c == name).unwrap();
        let (px, sv, status, stot) = (col("pxname"), col("svname"), col("status"), col("stot"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > stot && f[px] == "shop" && f[sv].starts_with('h'))
            .map(|f| {
                (
                    f[sv].to_string(),
                    f[status].to_string(),
                    f[stot].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    fn status(&self, server: &str) -> Option<(String, u64)> {
        self.servers()
            .into_iter()
            .find(|(s, _, _)| s == server)
            .map(|(_, st, n)| (st, n))
    }

    fn wait_status(&self, server: &str, up: bool) {
        let want = if up { "UP" } else { "DOWN" };
        wait_for(&format!("HAProxy to see {server} {want}"), || {
            self.status(server).filter(|(st, _)| st == want).map(|_| ())
        });
    }
}

/// One host of the fleet: its namespace, address and the clusterd in it.
struct Host {
    name: String,
    ns: String,
    ip: String,
    cluster: Option<Cluster>,
}

const HOSTS: usize = 3;

/// The config of every host: the shop, two workers, metrics for the health
/// check.
fn host_config(ip: &str, extra: &str) -> String {
    format!(
        "exec = {}\nworkers = 2\nlisten = {ip}:3000\nmetrics = {ip}:9464\ndrain_timeout = 10s\n{extra}\n",
        example("shop").display()
    )
}

fn start_host(host: &mut Host, extra: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns]).arg(clusterd_bin());
    let tag = format!("fleet-{}", host.name);
    let cluster = Cluster::start_in(TempDir::new(&tag), &tag, &host_config(&host.ip, extra), cmd);
    cluster.wait_ready(1);
    host.cluster = Some(cluster);
}

/// A host replaced: TERM (and its `shutdown_delay`, if any), its exit 0,
/// and a fresh clusterd started in its place. Returns how long after the
/// TERM HAProxy marked it DOWN (if it saw it down before the exit), and how
/// many connections HAProxy sent it after the TERM.
fn replace_host(lb: &Haproxy, host: &mut Host, extra: &str) -> (Option<Duration>, u64) {
    let mut old = host.cluster.take().expect("a running clusterd");
    let before = lb.status(&host.name).map_or(0, |(_, n)| n);
    let term = Instant::now();
    old.signal(Signal::TERM);
    let mut down = None;
    let mut after = before;
    wait_for("the old clusterd to exit", || {
        if let Some((st, n)) = lb.status(&host.name) {
            if down.is_none() && st.starts_with("DOWN") {
                down = Some(term.elapsed());
                after = n;
            }
        }
        old.peek_exit_status()
    });
    assert!(old.wait_exit().success(), "clusterd exits 0 after a TERM");
    if down.is_none() {
        after = lb.status(&host.name).map_or(after, |(_, n)| n);
    }
    start_host(host, extra);
    lb.wait_status(&host.name, true);
    (down, after - before)
}

trait PeekExit {
    fn peek_exit_status(&self) -> Option<()>;
}

impl PeekExit for Cluster {
    /// Whether clusterd has exited (a zombie, or gone).
    fn peek_exit_status(&self) -> Option<()> {
        (!alive(self.pid())).then_some(())
    }
}

fn loads_report(phase: &str, loads: Vec<(&str, clusterd_bench::Running)>) -> u64 {
    let mut failed = 0;
    for (name, load) in loads {
        let report = load.stop();
        println!("---- fleet {phase}: {name} ----\n{report}");
        assert!(report.ok > 0, "{phase}: {name}: nothing succeeded");
        failed += report.failed();
    }
    failed
}

#[test]
fn a_fleet_behind_haproxy_restarts_and_replaces_hosts_without_failing_requests() {
    const TEST: &str = "deploy::a_fleet_behind_haproxy_…";
    if !is_root() {
        return skip(TEST, "network namespaces need root");
    }
    let Some(haproxy) = which("haproxy") else {
        return skip(TEST, "no haproxy (Debian: apt-get install haproxy)");
    };
    if which("ip").is_none() {
        return skip(TEST, "no ip (Debian: apt-get install iproute2)");
    }
    // Namespaces: the load balancer's network (a bridge) and three hosts,
    // each with a veth into the bridge. Nothing of it is in the test's own
    // namespace. HAProxy runs in the `lb` namespace, which has no route but
    // to the hosts, and binds its frontend on 127.0.0.1 of the test's.
    let tag = format!("cdt{}", std::process::id());
    let lb_ns = format!("{tag}-lb");
    let own_ns = format!("{tag}-test");
    let mut namespaces = Namespaces(Vec::new());
    namespaces.attach_own(&own_ns);
    namespaces.add(&lb_ns);
    let ip_lb = |args: &[&str]| run_ok(Command::new("ip").args(["-n", &lb_ns]).args(args));
    ip_lb(&["link", "add", "br0", "type", "bridge"]);
    ip_lb(&["addr", "add", "10.213.1.1/24", "dev", "br0"]);
    ip_lb(&["link", "set", "br0", "up"]);
    let mut hosts = Vec::new();
    for k in 1..=HOSTS {
        let name = format!("h{k}");
        let ns = format!("{tag}-{name}");
        let ip = format!("10.213.1.{}", 10 + k);
        namespaces.add(&ns);
        ip_lb(&[
            "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip_lb(&["link", "set", &name, "master", "br0", "up"]);
        let ip_host = |args: &[&str]| run_ok(Command::new("ip").args(["-n", &ns]).args(args));
        ip_host(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ip_host(&["link", "set", "eth0", "up"]);
        hosts.push(Host {
            name,
            ns,
            ip,
            cluster: None,
        });
    }
    // Every host starts with a lame duck (used in b; a restart is not a stop).
    let delay = "shutdown_delay = 2s";
    for host in &mut hosts {
        start_host(host, delay);
    }

    // HAProxy on 127.0.0.1, health-checking /healthz on each host's metrics
    // port as a production config would (a few checks a second, two in a
    // row to change state), with its usual retries and redispatch.
    let dir = TempDir::new("haproxy");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let stats = dir.path().join("stats.sock");
    let mut cfg = format!(
        "global\n  maxconn 2000\n  stats socket {}\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  \
         timeout http-keep-alive 5s\n  retries 3\n  option redispatch\n\
         frontend web\n  bind 127.0.0.1:{port} namespace {own_ns}\n  default_backend shop\n\
         backend shop\n  balance roundrobin\n  option httpchk GET /healthz\n  \
         http-check expect status 200\n  \
         default-server check port 9464 inter 250ms fall 2 rise 2\n",
        stats.display()
    );
    for host in &hosts {
        cfg.push_str(&format!("  server {} {}:3000\n", host.name, host.ip));
    }
    let cfg_path = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lb_ns])
        .arg(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start haproxy");
    let lb = Haproxy {
        child,
        stats,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: dir,
    };
    for host in &hosts {
        lb.wait_status(&host.name, true);
    }
    wait_for("the shop through HAProxy", || {
        get(lb.addr, "/products/1").ok().filter(|r| r.status == 200)
    });

    // a. A rolling restart on every host in turn.
    let loads = mixed_load(lb.addr);
    for host in &hosts {
        let cluster = host.cluster.as_ref().unwrap();
        let out = cluster.ctl(&["restart"]);
        assert!(
            out.status.success(),
            "restart on {}: {}",
            host.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let_loads_run(&loads, 10);
    }
    let failed = loads_report("rolling restart", loads);
    assert_eq!(failed, 0, "a fleet-wide rolling restart fails no request");

    // b. Every host replaced in turn, with a lame duck first (the fresh
    // clusterds have none: they are the ones c stops).
    let loads = mixed_load(lb.addr);
    let mut seen = Vec::new();
    for host in &mut hosts {
        seen.push(replace_host(&lb, host, ""));
        let_loads_run(&loads, 10);
    }
    let failed = loads_report("replacement with shutdown_delay", loads);
    for (host, (down, after)) in hosts.iter().zip(&seen) {
        println!(
            "fleet: {} with {delay}: HAProxy saw it DOWN {:?} after TERM; {after} connections sent to it after TERM",
            host.name, down
        );
    }
    assert_eq!(
        failed, 0,
        "replacing every host with a lame duck fails nothing"
    );

    // c. The same without shutdown_delay: the drain begins at TERM while
    // HAProxy still sends to the host. Whatever fails is reported.
    let loads = mixed_load(lb.addr);
    let mut seen = Vec::new();
    for host in &mut hosts {
        seen.push(replace_host(&lb, host, ""));
        let_loads_run(&loads, 10);
    }
    let failed = loads_report("replacement without shutdown_delay", loads);
    for (host, (down, after)) in hosts.iter().zip(&seen) {
        println!(
            "fleet: {} without shutdown_delay: HAProxy saw it DOWN {:?} after TERM; {after} connections sent to it after TERM",
            host.name, down
        );
    }
    println!("fleet: replacing every host without shutdown_delay: {failed} failed requests");

    for host in &mut hosts {
        if let Some(mut c) = host.cluster.take() {
            c.signal(Signal::TERM);
            c.wait_exit();
        }
    }
    drop(lb);
    drop(namespaces);
}

// --------------------------------------------------------------- systemd --

#[test]
fn the_systemd_unit_verifies() {
    const TEST: &str = "deploy::the_systemd_unit_verifies";
    let Some(analyze) = which("systemd-analyze") else {
        return skip(TEST, "no systemd-analyze (Debian: apt-get install systemd)");
    };
    // The unit as shipped, with the binaries where this build has them
    // (verify checks that ExecStart and ExecReload can be run).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("examples/container/clusterd-shop.service"))
        .unwrap()
        .replace("/usr/local/bin/", &format!("{}/", bin_dir().display()));
    assert!(unit.contains("ExecReload=") && unit.contains("clusterctl"));
    let dir = TempDir::new("unit");
    let path = dir.path().join("clusterd-shop.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads one datagram from the fake service manager.
fn recv(manager: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = manager
        .recv(&mut buf)
        .expect("a notification from clusterd");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `CLOCK_MONOTONIC` in microseconds.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; the call only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[test]
fn a_rolling_restart_reports_reloading_then_ready_to_the_service_manager() {
    let dir = TempDir::new("reload-notify");
    let manager_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&manager_path).unwrap();
    manager.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut cmd = Command::new(clusterd_bin());
    cmd.env("NOTIFY_SOCKET", &manager_path);
    let testworker = example("testworker");
    let config = format!(
        "exec = {} ok\nworkers = 2\nlisten = 127.0.0.1:0\nready_timeout = 2s\n",
        testworker.display()
    );
    let mut cluster = Cluster::start_in(dir, "reload-notify", &config, cmd);
    let first = recv(&manager);
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");

    // A restart that succeeds: RELOADING=1 with the monotonic clock, then
    // READY=1.
    let before = monotonic_usec();
    let out = cluster.ctl(&["restart"]);
    assert!(out.status.success(), "{out:?}");
    let reloading = recv(&manager);
    let after = monotonic_usec();
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading}");
    let usec: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC ({before}..{after})"
    );
    let ready = recv(&manager);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    // A restart that aborts (the new program never gets READY): a failed
    // reload for systemd (clusterctl exits 1), and READY=1 all the same.
    cluster.set_config("exec", &format!("{} never-ready", testworker.display()));
    let out = cluster.ctl(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let reloading = recv(&manager);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = recv(&manager);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let status = ready
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or("");
    assert!(status.contains("aborted"), "{ready}");

    // A stop: STOPPING=1, once, and nothing after it.
    cluster.signal(Signal::TERM);
    assert_eq!(recv(&manager), "STOPPING=1");
    assert!(cluster.wait_exit().success());
    manager.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(manager.recv(&mut buf).is_err(), "nothing after STOPPING=1");
}
