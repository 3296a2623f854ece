//! 12. Fleet: three hosts behind HAProxy, restarted and replaced one after another.
//!
//! Three network namespaces each run clusterd with two shop workers; a fourth, the load
//! balancer's, holds a bridge with a veth to each host and runs HAProxy, health-checking
//! `/healthz` on each host's metrics port, with its frontend on 127.0.0.1 of the suite's own
//! namespace. No interface is added to the suite's namespace and nothing is routed out of the
//! load balancer's. Under the four loads at once, through HAProxy: a rolling restart on every
//! host in turn, then every host replaced in turn (TERM, exit, a fresh clusterd, HAProxy sees
//! it UP) with `shutdown_delay`, then without. Needs root, `ip` and `haproxy`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterd_bench::{Report, Running};

use super::procs::{Daemon, Proc, TempDir, free_port, poll_until};
use super::{Check, Ctx, Route, Section, Table, failure_classes, fmt_ms, median, mode, ms};

/// The lame duck of the "with" replacement: four times what HAProxy needs to notice
/// (`fall 2` × `inter 250ms`).
const DELAY: &str = "2s";
const HOSTS: usize = 3;
const CONNECTIONS: usize = 4;
const LOADS: [(Route, bool); 4] = [
    (Route::Products, true),
    (Route::Products, false),
    (Route::Checkout, true),
    (Route::Checkout, false),
];

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespace names, deleted on drop (the suite's own is only named, not deleted).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

struct Host {
    name: String,
    ns: String,
    ip: String,
    daemon: Option<Daemon>,
}

struct Lb {
    _proc: Proc,
    stats: PathBuf,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Lb {
    /// (status, sessions in total) of server `name`, from `show stat`.
    fn server(&self, name: &str) -> Option<(String, u64)> {
        let mut s = UnixStream::connect(&self.stats).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let mut lines = text.lines();
        let cols: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |c: &str| cols.iter().position(|x| *x == c);
        let (sv, st, stot) = (col("svname")?, col("status")?, col("stot")?);
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > stot && f[0] == "shop" && f[sv] == name)
            .map(|f| (f[st].to_string(), f[stot].parse().unwrap_or(0)))
    }

    fn wait_up(&self, name: &str) -> Result<(), String> {
        poll_until(Duration::from_secs(30), || {
            self.server(name).filter(|(st, _)| st == "UP").map(|_| ())
        })
        .ok_or_else(|| format!("HAProxy never saw {name} UP"))
    }
}

fn start_host(ctx: &Ctx, host: &mut Host, extra: &str) -> Result<(), String> {
    let config = format!(
        "exec = {}\nworkers = 2\nlisten = {ip}:3000\nmetrics = {ip}:9464\nbake = 0\n\
         drain_timeout = 10s\n{extra}\n",
        ctx.shop().display(),
        ip = host.ip
    );
    let d = Daemon::start_wrapped(
        &["ip", "netns", "exec", &host.ns],
        &ctx.clusterd(),
        &ctx.clusterctl(),
        &format!("fleet-{}", host.name),
        &config,
    )?;
    d.wait_pool_ready(1, Duration::from_secs(30))?;
    host.daemon = Some(d);
    Ok(())
}

/// What one host's replacement measured.
struct Replaced {
    /// TERM → HAProxy shows it DOWN (None: it had exited first).
    down: Option<Duration>,
    /// Connections HAProxy sent it after the TERM.
    sent_after_term: u64,
}

fn replace_host(ctx: &Ctx, lb: &Lb, host: &mut Host, extra: &str) -> Result<Replaced, String> {
    let old = host.daemon.take().ok_or("no clusterd on the host")?;
    let before = lb.server(&host.name).map_or(0, |(_, n)| n);
    let term = Instant::now();
    let mut down = None;
    let mut at_down = before;
    super::procs::signal(old.pid(), "TERM")?;
    let exited = poll_until(Duration::from_secs(60), || {
        if let Some((st, n)) = lb.server(&host.name) {
            if down.is_none() && st.starts_with("DOWN") {
                down = Some(term.elapsed());
                at_down = n;
            }
        }
        old.exited()
    });
    match exited {
        Some(status) if status.success() => {}
        Some(status) => return Err(format!("{}: clusterd exited with {status}", host.name)),
        None => return Err(format!("{}: clusterd did not exit", host.name)),
    }
    let last = lb.server(&host.name).map_or(at_down, |(_, n)| n);
    drop(old);
    start_host(ctx, host, extra)?;
    lb.wait_up(&host.name)?;
    Ok(Replaced {
        down,
        sent_after_term: if down.is_some() { at_down } else { last } - before,
    })
}

fn start_loads(addr: SocketAddr) -> Result<Vec<Running>, String> {
    LOADS
        .iter()
        .map(|&(route, keep_alive)| {
            let mut spec = route.spec(addr, keep_alive);
            spec.connections = CONNECTIONS;
            spec.threads = 1;
            let running = clusterd_bench::start(spec).map_err(|e| format!("load: {e}"))?;
            if running.wait_for_ok(20, Duration::from_secs(30)) {
                Ok(running)
            } else {
                Err(format!("the load never got going: {}", running.snapshot()))
            }
        })
        .collect()
}

/// Lets every load complete `n` more requests.
fn let_run(loads: &[Running], n: u64) {
    for l in loads {
        let target = l.ok_so_far() + n;
        l.wait_for_ok(target, Duration::from_secs(30));
    }
}

fn setup(ctx: &Ctx, ns: &mut Namespaces, hosts: &mut Vec<Host>) -> Result<Lb, String> {
    let tag = format!("cdb{}", std::process::id());
    let own = format!("{tag}-bench");
    let lb_ns = format!("{tag}-lb");
    ip(&["netns", "attach", &own, &std::process::id().to_string()])?;
    ns.0.push(own.clone());
    ip(&["netns", "add", &lb_ns])?;
    ns.0.push(lb_ns.clone());
    ip(&["-n", &lb_ns, "link", "set", "lo", "up"])?;
    ip(&["-n", &lb_ns, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &lb_ns, "addr", "add", "10.213.1.1/24", "dev", "br0"])?;
    ip(&["-n", &lb_ns, "link", "set", "br0", "up"])?;
    for k in 1..=HOSTS {
        let name = format!("h{k}");
        let host_ns = format!("{tag}-{name}");
        let addr = format!("10.213.1.{}", 10 + k);
        ip(&["netns", "add", &host_ns])?;
        ns.0.push(host_ns.clone());
        ip(&["-n", &host_ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &lb_ns, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns",
            &host_ns,
        ])?;
        ip(&["-n", &lb_ns, "link", "set", &name, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &host_ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &host_ns, "link", "set", "eth0", "up"])?;
        let mut host = Host {
            name,
            ns: host_ns,
            ip: addr,
            daemon: None,
        };
        start_host(ctx, &mut host, &format!("shutdown_delay = {DELAY}"))?;
        hosts.push(host);
    }
    let dir = TempDir::new("haproxy")?;
    let port = free_port()?;
    let stats = dir.path().join("stats.sock");
    let mut cfg = format!(
        "global\n  maxconn 2000\n  stats socket {}\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  \
         timeout server 30s\n  timeout http-keep-alive 5s\n  retries 3\n  option redispatch\n\
         frontend web\n  bind 127.0.0.1:{port} namespace {own}\n  default_backend shop\n\
         backend shop\n  balance roundrobin\n  option httpchk GET /healthz\n  \
         http-check expect status 200\n  \
         default-server check port 9464 inter 250ms fall 2 rise 2\n",
        stats.display()
    );
    for h in hosts.iter() {
        cfg.push_str(&format!("  server {} {}:3000\n", h.name, h.ip));
    }
    let cfg_path = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).map_err(|e| format!("cannot write haproxy.cfg: {e}"))?;
    let log = std::fs::File::create(dir.path().join("haproxy.log"))
        .map_err(|e| format!("haproxy.log: {e}"))?;
    let proc = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &lb_ns, "haproxy", "-db", "-f"])
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log),
        "haproxy",
    )?;
    let lb = Lb {
        _proc: proc,
        stats,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: dir,
    };
    for h in hosts.iter() {
        lb.wait_up(&h.name)?;
    }
    Ok(lb)
}

fn which(prog: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| std::path::Path::new(d).join(prog).is_file())
}

/// Whether the suite runs as root (the effective uid in /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            super::procs::status_field(&t, "Uid")
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn summary(reports: &[Report]) -> (u64, u64, String) {
    let total: u64 = reports.iter().map(|r| r.total).sum();
    let failed: u64 = reports.iter().map(|r| r.failed()).sum();
    let classes: Vec<String> = LOADS
        .iter()
        .zip(reports)
        .filter(|(_, r)| r.failed() > 0)
        .map(|((route, ka), r)| format!("{} {}: {}", route.label(), mode(*ka), failure_classes(r)))
        .collect();
    let classes = if classes.is_empty() {
        "none".into()
    } else {
        classes.join("; ")
    };
    (total, failed, classes)
}

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("fleet");
    if !is_root() || !which("ip") || !which("haproxy") {
        s.fail(
            "fleet",
            "needs root (network namespaces), `ip` (iproute2) and `haproxy`",
        );
        return s;
    }
    let mut ns = Namespaces(Vec::new());
    let mut hosts = Vec::new();
    let lb = match setup(ctx, &mut ns, &mut hosts) {
        Ok(lb) => lb,
        Err(e) => {
            s.fail("setting up the fleet", &e);
            return s;
        }
    };
    let mut table = Table::new(&[
        "operation, host by host",
        "requests",
        "failed",
        "failures by class",
        "TERM → HAProxy DOWN, median (max)",
        "connections sent to a host after its TERM",
        "target",
    ]);
    let scenarios: [(&str, Option<&str>); 3] = [
        ("rolling restart (`clusterctl restart`)", None),
        ("replacement, `shutdown_delay = 2s`", Some("")),
        ("replacement, no `shutdown_delay`", Some("")),
    ];
    for (i, (label, replace)) in scenarios.iter().enumerate() {
        println!("  -- {label}");
        let loads = match start_loads(lb.addr) {
            Ok(l) => l,
            Err(e) => {
                s.fail(label, &e);
                break;
            }
        };
        let mut seen = Vec::new();
        let mut error = None;
        for host in hosts.iter_mut() {
            let step = match replace {
                None => host
                    .daemon
                    .as_ref()
                    .ok_or_else(|| "no clusterd".to_string())
                    .and_then(|d| d.restart(Duration::from_secs(120)).map(|_| ())),
                Some(extra) => replace_host(ctx, &lb, host, extra).map(|r| seen.push(r)),
            };
            if let Err(e) = step {
                error = Some(e);
                break;
            }
            let_run(&loads, 50);
        }
        let reports: Vec<Report> = loads.into_iter().map(Running::stop).collect();
        if let Some(e) = error {
            s.fail(label, &e);
        }
        let (total, failed, classes) = summary(&reports);
        let downs: Vec<f64> = seen.iter().filter_map(|r| r.down.map(ms)).collect();
        let sent: Vec<String> = seen.iter().map(|r| r.sent_after_term.to_string()).collect();
        let target = if i < 2 { "0" } else { "reported" };
        table.row(vec![
            label.to_string(),
            total.to_string(),
            failed.to_string(),
            classes,
            if seen.is_empty() {
                String::new()
            } else if downs.is_empty() {
                "exited first".into()
            } else {
                format!(
                    "{} ({}){}",
                    fmt_ms(median(&downs)),
                    fmt_ms(super::max(&downs)),
                    if downs.len() < seen.len() {
                        format!("; {} exited first", seen.len() - downs.len())
                    } else {
                        String::new()
                    }
                )
            },
            sent.join(", "),
            target.into(),
        ]);
        let pass = (i < 2).then_some(failed == 0);
        s.check(Check::new(
            &format!("failed requests at the load balancer, fleet-wide {label}"),
            target,
            failed.to_string(),
            pass,
        ));
    }
    for host in hosts.iter_mut() {
        if let Some(d) = host.daemon.take() {
            let _ = d.stop(Duration::from_secs(30));
        }
    }
    drop(lb);
    drop(ns);
    s.md(&format!(
        "Three hosts (network namespaces on this machine, two shop workers each) behind \
         HAProxy {haproxy}, which health-checks `/healthz` on each host's metrics port \
         (`inter 250ms fall 2 rise 2`, `retries 3`, `option redispatch`). Four loads through \
         HAProxy at once ({CONNECTIONS} connections each: GET and POST, keep-alive and new \
         connection). Host by host: a rolling restart; then a replacement (SIGTERM, clusterd \
         exits, a fresh clusterd starts, HAProxy sees it UP before the next host) while the \
         stopping clusterd has `shutdown_delay = {DELAY}`; then the same without \
         `shutdown_delay`, where the drain begins while HAProxy still sends new connections \
         to the host. \"TERM → HAProxy DOWN\" is when HAProxy's stats first showed the host \
         DOWN, polled from the suite.\n",
        haproxy = haproxy_version()
    ));
    s.table(&table);
    s
}

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_string)
        })
        .unwrap_or_default()
}
