//! 5. Footprint: clusterd's memory, idle cost, control round trip, start-up and binaries.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterd::proto::Request;

use super::machine::epoch_ms;
use super::procs::{
    Daemon, Proc, cpu_sample, free_port, kb_field, poll_until, raw_request, status_kb,
};
use super::{Check, Ctx, Route, Section, Table, fmt_ms, mark, median, mib, ms, quantile};

const MIB: u64 = 1024 * 1024;

pub fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new("footprint");
    let mut table = Table::new(&["measure", "result", "target", ""]);
    two_workers(ctx, &mut s, &mut table);
    many_workers(ctx, &mut s, &mut table);
    start_to_listening(ctx, &mut s, &mut table);
    cold_start(ctx, &mut s, &mut table);
    let (sizes, static_dir) = binaries(ctx, &mut s);
    if let Some(dir) = &static_dir {
        static_rss(ctx, dir, &mut s, &mut table);
    }
    s.md(&format!(
        "clusterd runs shop workers (`exec = target/release/examples/shop`, \
         `listen = 127.0.0.1:0` unless a fixed port is needed). Memory is clusterd's own \
         `VmRSS` (and `VmHWM`, its peak) from `/proc/PID/status`, not its workers'; *anon* \
         (`RssAnon`) is memory clusterd itself wrote, *file* (`RssFile`) the resident pages \
         of the files it maps (its binary, and libc unless it is linked statically), shared \
         with every other process that maps them; *by mapped file* is what is resident in \
         each file's mappings (`/proc/PID/smaps`, their written copy-on-write pages \
         included); *PSS* (`/proc/PID/smaps_rollup`) divides each shared page among the \
         processes mapping it. The idle \
         window reads `utime + stime` (clock ticks) from `/proc/PID/stat` and the sum of \
         `voluntary_ctxt_switches + nonvoluntary_ctxt_switches` of every thread from \
         `/proc/PID/task/*/status` before and after {idle:?} without traffic; each switch is \
         a wake-up (or a preemption). The `status` round trip is the wall time of a whole \
         `clusterctl -s SOCKET status` run (exec included), and separately one `Status` \
         request on a fresh connection to the control socket (`clusterd::proto`, no \
         process). *Start to listening*: from spawning `clusterd` to the first successful \
         TCP connect to its port (polled every 0.1 ms). *Cold start*: from spawning \
         `clusterd` (`workers = auto`) to the first `200` of `GET /products/1`.\n",
        idle = ctx.p.idle
    ));
    s.table(&table);
    s.md(&sizes.0);
    s.table(&sizes.1);
    s
}

/// clusterd's memory: `VmRSS`, and a breakdown `anon …, file …; by mapped
/// file: …; PSS …; peak VmHWM …` (the files largest first).
fn memory(pid: u32) -> (Option<u64>, String) {
    let show = |key: &str| status_kb(pid, key).map_or_else(|| "unknown".to_string(), mib);
    let files = mapped_files(pid);
    let files = if files.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = files
            .iter()
            .take(4)
            .map(|(name, bytes)| format!("{name} {}", mib(*bytes)))
            .collect();
        format!("; by mapped file: {}", list.join(", "))
    };
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| kb_field(&text, "Pss"))
        .map_or_else(|| "unknown".to_string(), mib);
    let detail = format!(
        "anon {}, file {}{files}; PSS {pss}; peak VmHWM {}",
        show("RssAnon"),
        show("RssFile"),
        show("VmHWM")
    );
    (status_kb(pid, "VmRSS"), detail)
}

/// The resident bytes of each file `pid` maps (from `/proc/PID/smaps`), by
/// file name, largest first. A file's figure includes the pages of its
/// private mappings that were written (copy-on-write, counted as anon by
/// `RssAnon`), so the figures can add up to more than `RssFile`.
fn mapped_files(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|text| files_in_smaps(&text))
        .unwrap_or_default()
}

fn files_in_smaps(text: &str) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping's header: ADDRESS PERMS OFFSET DEV INODE [PATH].
            current = words
                .nth(4)
                .filter(|path| path.starts_with('/'))
                .map(|path| path.rsplit('/').next().unwrap_or(path).to_string());
        } else if let (Some(name), Some(bytes)) = (&current, kb_field(line, "Rss")) {
            match files.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += bytes,
                None => files.push((name.clone(), bytes)),
            }
        }
    }
    files.retain(|(_, bytes)| *bytes > 0);
    files.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    files
}

/// RSS with 2 workers of the static clusterd (what a scratch container runs).
fn static_rss(ctx: &Ctx, dir: &Path, s: &mut Section, table: &mut Table) {
    let what = "RSS, 2 workers, static build";
    let config = format!(
        "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\n",
        ctx.shop().display()
    );
    let started = Daemon::start(
        &dir.join("clusterd"),
        &ctx.clusterctl(),
        "footprint-static",
        &config,
    )
    .and_then(|d| {
        d.wait_pool_ready(1, Duration::from_secs(30))?;
        Ok(d)
    });
    match started {
        Ok(d) => {
            std::thread::sleep(Duration::from_secs(1));
            let (rss, detail) = memory(d.pid());
            row(
                s,
                table,
                what,
                format!(
                    "{} ({detail})",
                    rss.map_or_else(|| "unknown".to_string(), mib)
                ),
                "≤ 2 MiB",
                rss.map(|b| b <= 2 * MIB),
            );
            let _ = d.stop(Duration::from_secs(30));
        }
        Err(e) => {
            s.fail("the static clusterd", &e);
            s.check(Check::failed(what, "≤ 2 MiB", &e));
        }
    }
}

/// Adds a table row and, when there is a target, a check.
fn row(
    s: &mut Section,
    table: &mut Table,
    what: &str,
    result: String,
    target: &str,
    pass: Option<bool>,
) {
    if target.is_empty() {
        table.row(vec![what.into(), result, String::new(), String::new()]);
    } else {
        s.check(Check::new(what, target, result.clone(), pass));
        table.row(vec![what.into(), result, target.into(), mark(pass).into()]);
    }
}

/// Starts clusterd with `workers` shop workers and waits until they are ready.
fn daemon(ctx: &Ctx, tag: &str, workers: u32) -> Result<Daemon, String> {
    let d = ctx.shop_daemon(tag, &workers.to_string(), "")?;
    d.wait_pool_ready(1, Duration::from_secs(60))?;
    Ok(d)
}

/// RSS, idle cost and status round trips with 2 workers.
fn two_workers(ctx: &Ctx, s: &mut Section, table: &mut Table) {
    let p = &ctx.p;
    let d = match daemon(ctx, "footprint-2", 2) {
        Ok(d) => d,
        Err(e) => {
            s.fail("clusterd with 2 workers", &e);
            for (what, target) in [
                ("RSS, 2 workers", "≤ 2 MiB"),
                ("idle CPU time", "0 ticks"),
                ("idle wake-ups", "≤ 1/s"),
                ("`clusterctl status` round trip, median", "≤ 2 ms"),
            ] {
                s.check(Check::failed(what, target, "clusterd did not start"));
            }
            return;
        }
    };
    let pid = d.pid();
    std::thread::sleep(Duration::from_secs(1));
    let fresh = status_kb(pid, "VmRSS");

    // Idle.
    let before = cpu_sample(pid);
    std::thread::sleep(p.idle);
    let after = cpu_sample(pid);
    match (before, after) {
        (Some(b), Some(a)) => {
            let ticks = a.ticks.saturating_sub(b.ticks);
            let switches = a.switches.saturating_sub(b.switches);
            let rate = switches as f64 / p.idle.as_secs_f64();
            row(
                s,
                table,
                "idle CPU time",
                format!("{ticks} ticks in {:?}", p.idle),
                "0 ticks",
                Some(ticks == 0),
            );
            row(
                s,
                table,
                "idle wake-ups",
                format!(
                    "{rate:.2}/s ({switches} context switches in {:?}, {} threads)",
                    p.idle, a.threads
                ),
                "≤ 1/s",
                Some(rate <= 1.0),
            );
        }
        _ => s.fail("idle window", "cannot read /proc for clusterd"),
    }

    // Status round trips: clusterctl, then raw.
    let mut walls = Vec::new();
    for _ in 0..p.status_runs {
        match d.ctl(&["status"], Duration::from_secs(15)) {
            Ok(out) if out.status.success() => walls.push(ms(out.wall)),
            Ok(out) => {
                s.fail(
                    "clusterctl status",
                    &format!("{}: {}", out.status, out.stderr),
                );
                break;
            }
            Err(e) => {
                s.fail("clusterctl status", &e);
                break;
            }
        }
    }
    let mut raw = Vec::new();
    for _ in 0..p.status_runs {
        let t = Instant::now();
        match raw_request(&d.control, &Request::Status) {
            Ok(_) => raw.push(ms(t.elapsed())),
            Err(e) => {
                s.fail("raw Status request", &e);
                break;
            }
        }
    }
    if walls.is_empty() {
        s.check(Check::failed(
            "`clusterctl status` round trip, median",
            "≤ 2 ms",
            "no successful run",
        ));
    } else {
        let med = median(&walls);
        row(
            s,
            table,
            "`clusterctl status` round trip, median",
            format!(
                "{} (p90 {}, max {}; {} runs)",
                fmt_ms(med),
                fmt_ms(quantile(&walls, 0.9)),
                fmt_ms(super::max(&walls)),
                walls.len()
            ),
            "≤ 2 ms",
            Some(med <= 2.0),
        );
    }
    if !raw.is_empty() {
        let med = median(&raw);
        row(
            s,
            table,
            "raw `Status` request on the control socket, median",
            format!(
                "{} (p90 {}, max {}; {} runs)",
                fmt_ms(med),
                fmt_ms(quantile(&raw, 0.9)),
                fmt_ms(super::max(&raw)),
                raw.len()
            ),
            "",
            None,
        );
    }

    // Some work: a burst of requests and a rolling restart, then memory again.
    let busy = d.addr().and_then(|addr| {
        let mut spec = Route::Products.spec(addr, true);
        spec.duration = Some(Duration::from_secs(1));
        clusterd_bench::run(&spec).map_err(|e| e.to_string())?;
        d.restart(Duration::from_secs(60))?;
        d.wait_settled(2, Duration::from_secs(30))?;
        Ok(())
    });
    if let Err(e) = &busy {
        s.fail("load and restart before the second RSS reading", e);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (worked, detail) = memory(pid);
    let show = |b: Option<u64>| b.map_or_else(|| "unknown".to_string(), mib);
    let rss = worked.max(fresh);
    row(
        s,
        table,
        "RSS, 2 workers",
        format!(
            "{} ({detail}; {} fresh, {} after 1 s of load, {} status calls and a restart)",
            show(rss),
            show(fresh),
            show(worked),
            walls.len() + raw.len(),
        ),
        "≤ 2 MiB",
        rss.map(|b| b <= 2 * MIB),
    );
    let _ = d.stop(Duration::from_secs(30));
}

/// RSS with the scale section's worker count (64).
fn many_workers(ctx: &Ctx, s: &mut Section, table: &mut Table) {
    let n = ctx.p.scale_workers;
    let what = format!("RSS, {n} workers");
    let d = match daemon(ctx, "footprint-many", n) {
        Ok(d) => d,
        Err(e) => {
            s.fail(&format!("clusterd with {n} workers"), &e);
            s.check(Check::failed(&what, "≤ 4 MiB", "clusterd did not start"));
            return;
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let (rss, detail) = memory(d.pid());
    match rss {
        Some(rss) => row(
            s,
            table,
            &what,
            format!("{} ({detail})", mib(rss)),
            "≤ 4 MiB",
            Some(rss <= 4 * MIB),
        ),
        None => s.fail(&what, "cannot read /proc for clusterd"),
    }
    let _ = d.stop(Duration::from_secs(60));
}

/// Spawn → the port accepts a connection, and spawn → the `listening` line.
fn start_to_listening(ctx: &Ctx, s: &mut Section, table: &mut Table) {
    let mut connect = Vec::new();
    let mut logged = Vec::new();
    for i in 0..ctx.p.start_runs {
        match one_start(ctx, i) {
            Ok((c, l)) => {
                println!(
                    "     start {}: port accepts after {}, `listening` logged after {} ms",
                    i + 1,
                    fmt_ms(c),
                    l
                );
                connect.push(c);
                logged.push(l);
            }
            Err(e) => s.fail(&format!("start {}", i + 1), &e),
        }
    }
    let what = "clusterd start to listening, median";
    if connect.is_empty() {
        s.check(Check::failed(what, "≤ 10 ms", "no successful start"));
        return;
    }
    let med = median(&connect);
    row(
        s,
        table,
        what,
        format!(
            "{} to the first accepted connect (max {}; {} runs); `listening` logged after {} (clock in ms)",
            fmt_ms(med),
            fmt_ms(super::max(&connect)),
            connect.len(),
            fmt_ms(median(&logged))
        ),
        "≤ 10 ms",
        Some(med <= 10.0),
    );
}

fn one_start(ctx: &Ctx, i: usize) -> Result<(f64, f64), String> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = format!(
        "exec = {}\nworkers = 1\nlisten = {addr}\n",
        ctx.shop().display()
    );
    let d = Daemon::start(
        &ctx.clusterd(),
        &ctx.clusterctl(),
        &format!("start-{i}"),
        &config,
    )?;
    let up = poll_connect(&d, addr, Duration::from_secs(10))?;
    let line = d.wait_event("listening", Duration::from_secs(5), |_| true)?;
    let logged = line.ts_ms.saturating_sub(epoch_ms(d.spawned_wall)) as f64;
    d.stop(Duration::from_secs(30))?;
    Ok((ms(up), logged))
}

/// Connects to `addr` until it succeeds; the time since the daemon was spawned.
fn poll_connect(d: &Daemon, addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let end = Instant::now() + timeout;
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(d.spawned.elapsed());
        }
        if let Some(status) = d.exited() {
            return Err(format!("clusterd exited ({status}):\n{}", d.tail()));
        }
        if Instant::now() >= end {
            return Err(format!("{addr} not accepting after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Spawn → the first 200.
fn cold_start(ctx: &Ctx, s: &mut Section, table: &mut Table) {
    let mut runs = Vec::new();
    for i in 0..ctx.p.cold_runs {
        let run = (|| {
            let port = free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let config = format!(
                "exec = {}\nworkers = auto\nlisten = {addr}\n",
                ctx.shop().display()
            );
            let d = Daemon::start(
                &ctx.clusterd(),
                &ctx.clusterctl(),
                &format!("cold-{i}"),
                &config,
            )?;
            let first = poll_until(Duration::from_secs(20), || {
                if d.exited().is_some() {
                    return Some(Err(format!("clusterd exited:\n{}", d.tail())));
                }
                match clusterd_bench::get(addr, "/products/1") {
                    Ok(r) if r.status == 200 => Some(Ok(d.spawned.elapsed())),
                    Ok(r) => Some(Err(format!("first response was {}", r.status))),
                    Err(_) => {
                        std::thread::sleep(Duration::from_micros(200));
                        None
                    }
                }
            })
            .unwrap_or_else(|| Err("no 200 within 20 s".into()))?;
            d.stop(Duration::from_secs(30))?;
            Ok::<_, String>(ms(first))
        })();
        match run {
            Ok(t) => {
                println!("     cold start {}: first 200 after {}", i + 1, fmt_ms(t));
                runs.push(t);
            }
            Err(e) => s.fail(&format!("cold start {}", i + 1), &e),
        }
    }
    if !runs.is_empty() {
        row(
            s,
            table,
            "cold start to the first 200 (`workers = auto`), median",
            format!(
                "{} (max {}; {} runs)",
                fmt_ms(median(&runs)),
                fmt_ms(super::max(&runs)),
                runs.len()
            ),
            "",
            None,
        );
    }
}

/// Sizes of the release binaries, and of static builds: the text and table for the report,
/// and the static binaries' folder if they were built.
fn binaries(ctx: &Ctx, s: &mut Section) -> ((String, Table), Option<PathBuf>) {
    let mut table = Table::new(&["binary", "release build", "static build (+crt-static)"]);
    let (static_dir, static_note) = if ctx.p.static_build {
        match static_build(ctx) {
            Ok(dir) => (Some(dir), None),
            Err(e) => {
                s.fail("static build", &e);
                (None, Some(format!("build failed: {e}")))
            }
        }
    } else {
        (None, Some("skipped in --quick".to_string()))
    };
    for name in ["clusterd", "clusterctl"] {
        let release = size(&ctx.bin(name));
        let stat = match (&static_dir, &static_note) {
            (Some(dir), _) => {
                let path = dir.join(name);
                format!("{} ({})", size(&path), elf_kind(&path))
            }
            (None, Some(note)) => note.lines().next().unwrap_or_default().to_string(),
            (None, None) => String::new(),
        };
        table.row(vec![format!("`{name}`"), release, stat]);
    }
    let host = host_triple().unwrap_or_else(|| "x86_64-unknown-linux-gnu".into());
    let text = format!(
        "Binary sizes (the release profile: LTO, one codegen unit, `panic = \"abort\"`, \
         stripped). The static build (the README's, for the two binaries only) is\n\n\
         ```sh\nRUSTFLAGS='-C target-feature=+crt-static' \
         cargo build --release --target {host} -p clusterd -p clusterctl --bins\n```\n"
    );
    ((text, table), static_dir)
}

/// The size of a file, in MiB and bytes.
fn size(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{} ({} bytes)", mib(m.len()), super::thousands(m.len())),
        Err(e) => format!("missing ({e})"),
    }
}

/// `rustc -vV`'s host triple.
fn host_triple() -> Option<String> {
    let out = Command::new("rustc").arg("-vV").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
}

/// Builds clusterd and clusterctl with `+crt-static`; returns their folder.
fn static_build(ctx: &Ctx) -> Result<PathBuf, String> {
    let host = host_triple().ok_or("cannot learn the host triple from rustc -vV")?;
    println!("  building static binaries for {host} (may take a few minutes the first time)…");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let dir = super::procs::TempDir::new("static-build")?;
    let log = dir.path().join("build.log");
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let proc = Proc::spawn(
        Command::new(cargo)
            .current_dir(&ctx.root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--target", &host])
            .args(["-p", "clusterd", "-p", "clusterctl", "--bins"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file),
        "cargo build (static)",
    )?;
    let status = proc.wait_exit(Duration::from_secs(20 * 60));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(6).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    match status {
        Some(st) if st.success() => {
            println!("  static build done in {:.0} s", t.elapsed().as_secs_f64());
            Ok(ctx.target.join(&host).join("release"))
        }
        Some(st) => Err(format!("cargo exited with {st}: {}", tail.join(" / "))),
        None => {
            proc.stop("TERM", Duration::from_secs(10));
            Err("cargo did not finish within 20 minutes".into())
        }
    }
}

/// What kind of ELF file `path` is: static-pie, static, or dynamically linked.
fn elf_kind(path: &Path) -> &'static str {
    let Ok(bytes) = std::fs::read(path) else {
        return "unreadable";
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    // 64-bit little-endian ELF only (what this suite builds).
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return "not a 64-bit little-endian ELF file";
    }
    let (Some(kind), Some(phoff), Some(phentsize), Some(phnum)) =
        (u16_at(16), u64_at(32), u16_at(54), u16_at(56))
    else {
        return "truncated ELF header";
    };
    let mut interp = false;
    let mut dynamic = false;
    for i in 0..usize::from(phnum) {
        let at = phoff as usize + i * usize::from(phentsize);
        match u32_at(at) {
            Some(3) => interp = true,
            Some(2) => dynamic = true,
            _ => {}
        }
    }
    match (interp, kind, dynamic) {
        (true, _, _) => "dynamically linked",
        (false, 3, _) => "static-pie",
        (false, 2, _) => "static",
        _ => "unknown ELF type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_binary_is_an_elf_file() {
        let me = std::env::current_exe().unwrap();
        let kind = elf_kind(&me);
        assert!(
            ["dynamically linked", "static-pie", "static"].contains(&kind),
            "{kind}"
        );
        assert_eq!(elf_kind(Path::new("/nonexistent")), "unreadable");
    }

    #[test]
    fn smaps_are_summed_by_file() {
        let smaps = "\
55d0c0a00000-55d0c0a20000 r--p 00000000 fe:01 1234   /srv/bin/clusterd
Rss:                 100 kB
Pss:                 100 kB
55d0c0a20000-55d0c0b00000 r-xp 00020000 fe:01 1234   /srv/bin/clusterd
Rss:                 700 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1400 kB
VmFlags: rd ex mr mw me
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Rss:                 300 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
Rss:                  36 kB
7f0000400000-7f0000401000 r--p 00000000 fe:01 98     /usr/lib/empty.so
Rss:                   0 kB
";
        assert_eq!(
            files_in_smaps(smaps),
            [
                ("libc.so.6".to_string(), 1400 * 1024),
                ("clusterd".to_string(), 800 * 1024)
            ]
        );
    }
}
