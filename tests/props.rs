//! Property tests of the parsers that face untrusted input (DESIGN.md
//! guarantee 5: no input, however malformed or oversized, crashes clusterd;
//! a bad config is reported line by line, never with a panic).
//!
//! Pure functions only, no processes: [`config::parse_str`] (and
//! [`config::read`] / [`config::load`] on files of arbitrary bytes), the
//! record codec [`proto::encode`] / [`proto::decode`] for the four message
//! types, the control framing ([`proto::frame`], [`proto::frame_len`], put
//! together as the daemon reads a request) and [`notify::parse`] for sd_notify
//! datagrams. The cargo-fuzz targets in `fuzz/` drive the same functions
//! (nightly only, not in CI).
//!
//! Case counts are kept moderate so that the module runs in seconds in a
//! debug build; `PROPTEST_CASES=10000` runs every property longer. A failure
//! is shrunk to a minimal input and its seed saved by proptest in
//! `tests/props.proptest-regressions`: commit that file, so that every later
//! run replays it first.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::Union;

use clusterd::config::{self, Config, Listen, ListenAddr, Protocol, RESERVED_ENV};
use clusterd::daemon::notify;
use clusterd::proto::{
    self, Baking, CONTROL_VERSION, FRAME_HEADER, FromWorker, Hello, IPC_VERSION, LastRestart,
    ListenerInfo, LogEntry, MAX_IPC_RECORD, MAX_LISTENERS, MAX_REQUEST, MAX_RESPONSE, Progress,
    Request, Response, RestartOutcome, Scale, Status, ToWorker, WorkerStatus,
};

use crate::util::TempDir;

/// `cases` unless `PROPTEST_CASES` asks for another number.
fn cases(cases: u32) -> ProptestConfig {
    let env = std::env::var("PROPTEST_CASES").ok();
    ProptestConfig::with_cases(env.and_then(|n| n.parse().ok()).unwrap_or(cases))
}

// ===========================================================================
// The config parser

/// Config file paths, including degenerate ones (no folder, no stem).
fn conf_path() -> impl Strategy<Value = PathBuf> {
    select(&[
        "/etc/clusterd/shop.conf",
        "",
        "/",
        "shop.conf",
        "/srv/a b/é.conf",
        "/x/.conf",
    ])
    .prop_map(PathBuf::from)
}

/// What must hold for any text: no panic; a config that parses is complete;
/// errors are ordered, each on a line of the file (or 0 for the whole file).
fn check_parse(text: &str, path: &Path) -> Result<(), TestCaseError> {
    let lines = text.lines().count();
    match config::parse_str(text, path) {
        Ok(c) => {
            prop_assert!(!c.exec.is_empty() && !c.exec[0].is_empty(), "{c:?}");
            prop_assert!((1..=MAX_LISTENERS).contains(&c.listen.len()), "{c:?}");
            prop_assert!(c.workers.is_none_or(|n| (1..=1024).contains(&n)), "{c:?}");
            prop_assert!(c.restart_delay <= c.restart_delay_max, "{c:?}");
        }
        Err(errors) => {
            prop_assert!(!errors.is_empty());
            for e in &errors {
                prop_assert!(
                    e.line <= lines,
                    "error on line {} of a {lines}-line file: {e:?}",
                    e.line
                );
                prop_assert!(!e.message.is_empty(), "{e:?}");
            }
            prop_assert!(
                errors.is_sorted_by_key(|e| e.line),
                "errors out of order: {errors:?}"
            );
        }
    }
    Ok(())
}

/// Keys that are almost keys.
const NEAR_KEYS: &[&str] = &[
    "wrokers",
    "command",
    "Exec",
    "LISTEN",
    "cwd",
    "env ",
    " listen",
    "#exec",
    "exec#",
    "a b",
    "",
    "\u{feff}exec",
    "ready-timeout",
];

/// Values that sit on or next to an edge of some key's syntax.
const NEAR_VALUES: &[&str] = &[
    "auto",
    "0",
    "1",
    "007",
    "1024",
    "1025",
    "-1",
    "+1",
    "65535",
    "65536",
    "4294967294",
    "4294967295",
    "99999999999999999999",
    "10",
    "10s",
    "10 s",
    "9ms",
    "10ms",
    "0ms",
    "1d",
    "8760h",
    "8761h",
    "525600m",
    "31536000001ms",
    "systemd",
    "clusterd",
    ":80",
    ":0",
    "*:8080",
    "localhost:1",
    "example.com:80",
    "[::1]:80",
    "[::1]",
    "::1:80",
    "[zz]:1",
    "1.2.3.4:99999",
    "unix:/tmp/s.sock",
    "unix:",
    "unix:rel/s.sock",
    "a=:80",
    "=:80",
    "web=unix:/x",
    "we b=:1",
    "A=1",
    "A=",
    "A",
    "1A=2",
    "LISTEN_FDS=1",
    "PATH=/bin",
    "'unbalanced",
    "\"q\"",
    "sh -c 'echo #1'",
    "a\\",
    "''",
    "./bin/app",
    "bin/app --flag",
    "/",
    "..",
    "root",
    "a:b",
    "#",
    "a #b",
    "a#b",
    "é",
    "\u{0}",
    "\r",
    "\u{feff}",
    "=",
];

/// A line that looks like a config line, or nearly.
fn near_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        3 => select(config::KEYS).prop_map(String::from),
        1 => select(NEAR_KEYS).prop_map(String::from),
        1 => "[a-z_ ]{0,12}",
    ];
    let value = prop_oneof![
        3 => select(NEAR_VALUES).prop_map(String::from),
        1 => vec(select(NEAR_VALUES), 1..4).prop_map(|v| v.join(" ")),
        1 => "[^\n]{0,24}",
        1 => "[^\n]{60,90}",
    ];
    let ws = || select(&["", " ", "\t", "  "][..]);
    let tail = select(&["", " # note", "#x", " #", "\t# = 'x", " \""][..]);
    prop_oneof![
        8 => (ws(), key, ws(), select(&["=", "==", ""][..]), ws(), value, tail)
            .prop_map(|(a, k, b, eq, c, v, t)| format!("{a}{k}{b}{eq}{c}{v}{t}")),
        1 => Just(String::new()),
        1 => "[ \t]*#[^\n]{0,20}",
        1 => "[^\n]{0,30}",
    ]
}

/// Lines joined into a file: maybe a byte-order mark, `\n` or `\r\n`, maybe a
/// final newline.
fn join_lines(lines: &[String], bom: bool, crlf: bool, trailing: bool) -> String {
    let eol = if crlf { "\r\n" } else { "\n" };
    let mut text = String::from(if bom { "\u{feff}" } else { "" });
    text.push_str(&lines.join(eol));
    if trailing && !lines.is_empty() {
        text.push_str(eol);
    }
    text
}

fn near_config() -> impl Strategy<Value = String> {
    (
        vec(near_line(), 0..24),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(lines, bom, crlf, trailing)| join_lines(&lines, bom, crlf, trailing))
}

// --- Valid configs, generated with the values they must parse to.

/// A path segment that needs no quoting and is never `.` or `..`.
const SEGMENT: &str = "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,7}";

/// A clean path as written: absolute, or relative to the config's folder.
#[derive(Debug, Clone)]
struct PathText {
    text: String,
    absolute: bool,
}

impl PathText {
    /// What the parser makes of it in a config file in `dir`.
    fn resolve(&self, dir: &Path) -> PathBuf {
        if self.absolute {
            PathBuf::from(&self.text)
        } else {
            dir.join(&self.text)
        }
    }
}

fn path_text() -> impl Strategy<Value = PathText> {
    (vec(SEGMENT, 1..5), any::<bool>()).prop_map(|(segs, absolute)| PathText {
        text: format!("{}{}", if absolute { "/" } else { "" }, segs.join("/")),
        absolute,
    })
}

/// A duration in `min..=max` milliseconds, often a whole number of seconds,
/// minutes or hours so that every unit gets written.
fn duration(min: u64, max: u64) -> BoxedStrategy<Duration> {
    let mut options: Vec<BoxedStrategy<u64>> =
        vec![(min..=max).boxed(), (min..=max.min(min + 2_000)).boxed()];
    for unit in [1_000, 60_000, 3_600_000] {
        let (lo, hi) = (min.div_ceil(unit), max / unit);
        if lo <= hi {
            options.push((lo..=hi).prop_map(move |n| n * unit).boxed());
        }
    }
    Union::new(options).prop_map(Duration::from_millis).boxed()
}

/// `duration` as written in a config: a unit that divides it, chosen by
/// `pick`, maybe with a space before the unit.
fn write_duration(d: Duration, pick: u8) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return ["0", "0ms", "0s", "0 h", "000"][pick as usize % 5].into();
    }
    let units: Vec<_> = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)]
        .into_iter()
        .filter(|(_, per)| ms % per == 0)
        .collect();
    let (unit, per) = units[pick as usize % units.len()];
    let space = if pick & 0x80 != 0 { " " } else { "" };
    format!("{}{space}{unit}", ms / per)
}

const MAX_DURATION_MS: u64 = 365 * 24 * 3_600_000;

/// An `exec` program as written.
#[derive(Debug, Clone)]
enum Program {
    /// Looked up in `PATH` by `load`; kept as written by `parse_str`.
    Bare(String),
    /// `./name` or `a/b`, against the config's folder; or absolute.
    Path(PathText, bool),
}

fn program() -> impl Strategy<Value = Program> {
    prop_oneof![
        "[a-z][a-z0-9_.-]{0,10}".prop_map(Program::Bare),
        (path_text(), any::<bool>()).prop_map(|(p, dot)| Program::Path(p, dot)),
    ]
}

impl Program {
    fn write(&self) -> String {
        match self {
            Program::Bare(name) => name.clone(),
            Program::Path(p, true) if !p.absolute => format!("./{}", p.text),
            // A relative program needs a `/` to be a path.
            Program::Path(p, _) if !p.absolute && !p.text.contains('/') => {
                format!("bin/{}", p.text)
            }
            Program::Path(p, _) => p.text.clone(),
        }
    }

    fn resolve(&self, dir: &Path) -> String {
        let written = self.write();
        match self {
            Program::Bare(name) => name.clone(),
            Program::Path(p, _) if p.absolute => written,
            Program::Path(..) => dir
                .join(written.trim_start_matches("./"))
                .to_str()
                .expect("UTF-8")
                .to_owned(),
        }
    }
}

/// `arg` quoted the way `style` says (a shell's rules, as `exec` splits).
fn quote(arg: &str, style: u8) -> String {
    let plain = !arg.is_empty()
        && !arg.starts_with('#')
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=@%+,#".contains(&b));
    match style % 3 {
        0 if plain => arg.to_owned(),
        1 => {
            let mut out = String::from('"');
            for c in arg.chars() {
                if matches!(c, '\\' | '"' | '$' | '`') {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
            out
        }
        _ => format!("'{}'", arg.replace('\'', r"'\''")),
    }
}

/// A listening address as generated.
#[derive(Debug, Clone)]
enum AddrGen {
    /// An IPv4 address, written as `style` picks (`*`, nothing or
    /// `localhost` where they mean the same).
    V4(Ipv4Addr, u16, u8),
    V6(Ipv6Addr, u16),
    /// A unix socket path; a space after `unix:` when true.
    Unix(PathText, bool),
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        2 => any::<Ipv4Addr>(),
        1 => Just(Ipv4Addr::UNSPECIFIED),
        1 => Just(Ipv4Addr::LOCALHOST),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![1 => Just(0u16), 3 => any::<u16>()]
}

fn addr_gen() -> impl Strategy<Value = AddrGen> {
    prop_oneof![
        3 => (ipv4(), port(), any::<u8>())
            .prop_map(|(ip, port, style)| AddrGen::V4(ip, port, style)),
        1 => (any::<Ipv6Addr>(), port()).prop_map(|(ip, port)| AddrGen::V6(ip, port)),
        1 => (path_text(), any::<bool>()).prop_map(|(p, space)| AddrGen::Unix(p, space)),
    ]
}

impl AddrGen {
    fn write(&self) -> String {
        match self {
            AddrGen::V4(ip, port, style) => {
                let host = match (*ip, style % 3) {
                    (Ipv4Addr::UNSPECIFIED, 1) => "*".into(),
                    (Ipv4Addr::UNSPECIFIED, 2) => String::new(),
                    (Ipv4Addr::LOCALHOST, 1) => "localhost".into(),
                    _ => ip.to_string(),
                };
                format!("{host}:{port}")
            }
            AddrGen::V6(ip, port) => format!("[{ip}]:{port}"),
            AddrGen::Unix(p, space) => format!("unix:{}{}", if *space { " " } else { "" }, p.text),
        }
    }

    fn resolve(&self, dir: &Path) -> ListenAddr {
        match self {
            AddrGen::V4(ip, port, _) => ListenAddr::Tcp(SocketAddr::new(IpAddr::V4(*ip), *port)),
            AddrGen::V6(ip, port) => ListenAddr::Tcp(SocketAddr::new(IpAddr::V6(*ip), *port)),
            AddrGen::Unix(p, _) => ListenAddr::Unix(p.resolve(dir)),
        }
    }
}

/// A `user` or `group`.
#[derive(Debug, Clone)]
enum IdGen {
    Num(u32),
    Name(String),
}

fn id_gen() -> impl Strategy<Value = IdGen> {
    prop_oneof![
        (0..=u32::MAX - 1).prop_map(IdGen::Num),
        select(&[0, 1, 33, 65534, u32::MAX - 1][..]).prop_map(IdGen::Num),
        "[a-z_][a-z0-9_-]{0,15}".prop_map(IdGen::Name),
    ]
}

impl IdGen {
    fn write(&self) -> String {
        match self {
            IdGen::Num(n) => n.to_string(),
            IdGen::Name(s) => s.clone(),
        }
    }

    fn num(&self) -> Option<u32> {
        match self {
            IdGen::Num(n) => Some(*n),
            IdGen::Name(_) => None,
        }
    }
}

/// An `env` value: words of anything but whitespace and NUL, none starting
/// with `#` (which would start a comment).
fn env_value() -> impl Strategy<Value = String> {
    vec("[^\\s#\\x00][^\\s\\x00]{0,7}", 0..4).prop_map(|words| words.join(" "))
}

/// Everything a valid config is generated from.
#[derive(Debug, Clone)]
struct Parts {
    dir: Vec<String>,
    stem: String,
    exec: (Program, Vec<(String, u8)>),
    workers: Option<Option<u32>>,
    listen: Vec<(Option<String>, AddrGen, u8)>,
    backlog: Option<u32>,
    control: Option<PathText>,
    protocol: Option<Protocol>,
    timeouts: (Option<Duration>, Option<Duration>, Option<Duration>),
    delays: (Duration, Duration, bool, bool),
    ready_after: Option<u64>,
    user: (Option<IdGen>, Option<IdGen>),
    env: Vec<(String, String, bool)>,
    chdir: Option<PathText>,
    metrics: Option<AddrGen>,
    /// Per line: leading space, `=` and trailing comment.
    styles: Vec<u8>,
    /// Comments and blank lines to mix in.
    fillers: Vec<String>,
    /// How lines are interleaved.
    picks: Vec<usize>,
    /// Byte-order mark, CRLF, final newline.
    framing: (bool, bool, bool),
}

prop_compose! {
    fn arg()(arg in prop_oneof![any::<String>(), "[a-z0-9=#'\" $\\\\-]{0,8}"], style in any::<u8>())
        -> (String, u8)
    {
        // A NUL is refused, a newline ends the line.
        (arg.replace(['\0', '\n'], ""), style)
    }
}

prop_compose! {
    fn parts_a()(
        dir in vec(SEGMENT, 0..3),
        stem in "[a-z][a-z0-9_-]{0,7}",
        exec in (program(), vec(arg(), 0..4)),
        workers in proptest::option::of(proptest::option::of(1..=1024u32)),
        listen in vec(
            (proptest::option::of("[a-zA-Z0-9_.-]{1,64}"), addr_gen(), any::<u8>()),
            1..6,
        ),
        backlog in proptest::option::of(1..=65535u32),
        control in proptest::option::of(path_text()),
        protocol in proptest::option::of(select(&[Protocol::Clusterd, Protocol::Systemd, Protocol::Node][..])),
    ) -> (Vec<String>, String, (Program, Vec<(String, u8)>), Option<Option<u32>>,
          Vec<(Option<String>, AddrGen, u8)>, Option<u32>, Option<PathText>, Option<Protocol>)
    {
        (dir, stem, exec, workers, listen, backlog, control, protocol)
    }
}

prop_compose! {
    fn parts()(
        a in parts_a(),
        timeouts in (
            proptest::option::of(duration(1, MAX_DURATION_MS)),
            proptest::option::of(duration(1, MAX_DURATION_MS)),
            proptest::option::of(duration(0, MAX_DURATION_MS)),
        ),
        delays in (
            duration(10, MAX_DURATION_MS),
            duration(10, MAX_DURATION_MS),
            any::<bool>(),
            any::<bool>(),
        ),
        ready_after in proptest::option::of(any::<u64>()),
        user in (proptest::option::of(id_gen()), proptest::option::of(id_gen())),
        env in vec(("[A-Za-z_][A-Za-z0-9_]{0,11}", env_value(), any::<bool>()), 0..5),
        chdir in proptest::option::of(path_text()),
        metrics in proptest::option::of(addr_gen()),
        styles in vec(any::<u8>(), 32),
        fillers in vec(prop_oneof![
            Just(String::new()),
            "[ \t]{1,3}",
            "[ \t]{0,2}#[^\n]{0,30}",
            "# ?(exec|listen|workers) = [^\n]{0,10}",
        ], 0..6),
        picks in vec(any::<usize>(), 40),
        framing in (any::<bool>(), any::<bool>(), any::<bool>()),
    ) -> Parts {
        let (dir, stem, exec, workers, listen, backlog, control, protocol) = a;
        Parts {
            dir, stem, exec, workers, listen, backlog, control, protocol, timeouts, delays,
            ready_after, user, env, chdir, metrics, styles, fillers, picks, framing,
        }
    }
}

/// A generated valid config: its lines and what it must parse to.
#[derive(Debug, Clone)]
struct Valid {
    path: PathBuf,
    lines: Vec<String>,
    framing: (bool, bool, bool),
    expected: Config,
}

impl Valid {
    fn text(&self) -> String {
        let (bom, crlf, trailing) = self.framing;
        join_lines(&self.lines, bom, crlf, trailing)
    }
}

/// Longest unix socket path (`sun_path` less its NUL).
const MAX_UNIX_PATH: usize = 107;

fn build(p: Parts) -> Valid {
    let dir = PathBuf::from(format!("/{}", p.dir.join("/")));
    let path = dir.join(format!("{}.conf", p.stem));
    let mut pick = p.styles.last().copied().unwrap_or(0);
    let mut styles = p.styles.iter().cycle().copied();
    let mut line = |key: &str, value: String| {
        let style = styles.next().unwrap_or(0);
        let lead = ["", " ", "\t", ""][style as usize % 4];
        let eq = ["=", " = ", "\t=  ", " ="][(style as usize / 4) % 4];
        let tail = ["", " ", "  # a comment", "\t#", " # x = 'y'", ""][(style as usize / 16) % 6];
        format!("{lead}{key}{eq}{value}{tail}")
    };
    // One queue of lines per key (their order matters for listen and env).
    let mut queues: Vec<Vec<String>> = Vec::new();

    let (program, args) = &p.exec;
    let mut words = vec![program.write()];
    words.extend(args.iter().map(|(a, style)| quote(a, *style)));
    queues.push(vec![line("exec", words.join(" "))]);
    let mut exec = vec![program.resolve(&dir)];
    exec.extend(args.iter().map(|(a, _)| a.clone()));

    if let Some(workers) = p.workers {
        let text = workers.map_or_else(|| "auto".into(), |n| n.to_string());
        queues.push(vec![line("workers", text)]);
    }

    let mut listen: Vec<Listen> = Vec::new();
    let mut listen_lines = Vec::new();
    for (name, addr, style) in &p.listen {
        let new = Listen {
            name: name.clone().unwrap_or_else(|| "http".into()),
            addr: addr.resolve(&dir),
        };
        let ephemeral = matches!(new.addr, ListenAddr::Tcp(a) if a.port() == 0);
        let too_long =
            matches!(&new.addr, ListenAddr::Unix(p) if p.as_os_str().len() > MAX_UNIX_PATH);
        let taken = listen
            .iter()
            .any(|old| old.name == new.name || (old.addr == new.addr && !ephemeral));
        if too_long || taken {
            continue;
        }
        let text = match name {
            Some(name) => {
                let eq = ["=", " = ", "= ", " ="][*style as usize % 4];
                format!("{name}{eq}{}", addr.write())
            }
            None => addr.write(),
        };
        listen_lines.push(line("listen", text));
        listen.push(new);
    }
    if listen.is_empty() {
        listen_lines.push(line("listen", "127.0.0.1:0".into()));
        listen.push(Listen {
            name: "http".into(),
            addr: ListenAddr::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        });
    }
    queues.push(listen_lines);

    if let Some(backlog) = p.backlog {
        queues.push(vec![line("backlog", backlog.to_string())]);
    }

    let control = p
        .control
        .filter(|c| c.resolve(&dir).as_os_str().len() <= MAX_UNIX_PATH);
    if let Some(c) = &control {
        queues.push(vec![line("control", c.text.clone())]);
    }

    if let Some(protocol) = p.protocol {
        let text = protocol.as_str();
        queues.push(vec![line("protocol", text.into())]);
    }

    let mut duration_line = |queues: &mut Vec<Vec<String>>, key: &str, d: Option<Duration>| {
        if let Some(d) = d {
            pick = pick.wrapping_mul(31).wrapping_add(7);
            queues.push(vec![line(key, write_duration(d, pick))]);
        }
    };
    let (ready_timeout, drain_timeout, min_uptime) = p.timeouts;
    duration_line(&mut queues, "ready_timeout", ready_timeout);
    duration_line(&mut queues, "drain_timeout", drain_timeout);
    duration_line(&mut queues, "min_uptime", min_uptime);

    // restart_delay <= restart_delay_max, with either one left to its default.
    let (a, b, mut has_delay, mut has_max) = p.delays;
    let (delay, max) = (a.min(b), a.max(b));
    if has_delay && !has_max && delay > Duration::from_secs(30) {
        has_max = true;
    }
    if has_max && !has_delay && max < Duration::from_millis(100) {
        has_delay = true;
    }
    duration_line(&mut queues, "restart_delay", has_delay.then_some(delay));
    duration_line(&mut queues, "restart_delay_max", has_max.then_some(max));

    // ready_after: systemd and node only, and shorter than ready_timeout.
    let timeout = ready_timeout.unwrap_or(Duration::from_secs(10));
    let ready_after = p
        .ready_after
        .filter(|_| p.protocol.is_some_and(Protocol::is_socket_activation))
        .map(|n| Duration::from_millis(n % timeout.as_millis() as u64));
    duration_line(&mut queues, "ready_after", ready_after);

    let (user, group) = &p.user;
    if let Some(u) = user {
        queues.push(vec![line("user", u.write())]);
    }
    if let Some(g) = group {
        queues.push(vec![line("group", g.write())]);
    }

    let mut env: Vec<(String, String)> = Vec::new();
    let mut env_lines = Vec::new();
    for (key, value, spaced) in &p.env {
        if RESERVED_ENV.contains(&key.as_str()) || env.iter().any(|(k, _)| k == key) {
            continue;
        }
        let eq = if *spaced { " = " } else { "=" };
        env_lines.push(line("env", format!("{key}{eq}{value}")));
        env.push((key.clone(), value.clone()));
    }
    queues.push(env_lines);

    if let Some(c) = &p.chdir {
        queues.push(vec![line("chdir", c.text.clone())]);
    }

    // Not on the address of a listener (port 0 aside).
    let metrics = p.metrics.and_then(|m| match m.resolve(&dir) {
        ListenAddr::Tcp(a)
            if a.port() == 0 || !listen.iter().any(|l| l.addr == ListenAddr::Tcp(a)) =>
        {
            Some((m, a))
        }
        _ => None,
    });
    if let Some((m, _)) = &metrics {
        queues.push(vec![line("metrics", m.write())]);
    }

    for filler in &p.fillers {
        queues.push(vec![filler.clone()]);
    }

    // Interleave the queues, keeping each one's order.
    for q in &mut queues {
        q.reverse();
    }
    let mut picks = p.picks.iter().cycle();
    let mut lines = Vec::new();
    loop {
        let open: Vec<usize> = (0..queues.len())
            .filter(|&i| !queues[i].is_empty())
            .collect();
        if open.is_empty() {
            break;
        }
        let i = open[picks.next().copied().unwrap_or(0) % open.len()];
        lines.extend(queues[i].pop());
    }

    let expected = Config {
        path: path.clone(),
        name: p.stem.clone(),
        exec,
        workers: p.workers.flatten(),
        listen,
        backlog: p.backlog.unwrap_or(1024),
        control: control.map(|c| c.resolve(&dir)),
        protocol: p.protocol.unwrap_or(Protocol::Clusterd),
        ready_timeout: timeout,
        drain_timeout: drain_timeout.unwrap_or(Duration::from_secs(30)),
        restart_delay: if has_delay {
            delay
        } else {
            Duration::from_millis(100)
        },
        restart_delay_max: if has_max {
            max
        } else {
            Duration::from_secs(30)
        },
        min_uptime: min_uptime.unwrap_or(Duration::from_secs(5)),
        user: user.as_ref().and_then(IdGen::num).map(|uid| (uid, uid)),
        group: group.as_ref().and_then(IdGen::num),
        env,
        chdir: p.chdir.map_or_else(|| dir.clone(), |c| c.resolve(&dir)),
        ready_after,
        metrics: metrics.map(|(_, a)| a),
        bake: config::DEFAULT_BAKE,
        rollback: true,
        empty_pool: clusterd::config::EmptyPool::Wait,
        dispatch: clusterd::config::Dispatch::Shared,
        balance: clusterd::config::Balance::LeastConnections,
        sticky: None,
        log_capture: true,
        watchdog: None,
        watchdog_signal: clusterd::config::Signal::ABRT,
        max_memory: None,
        max_requests: None,
        max_age: None,
        crash_loop: 10,
        exit_on_crash_loop: false,
        shutdown_delay: Duration::ZERO,
        log_format: clusterd::config::LogFormat::Text,
        log_file: None,
        log_buffer: config::DEFAULT_LOG_BUFFER,
    };
    Valid {
        path,
        lines,
        framing: p.framing,
        expected,
    }
}

fn valid_config() -> impl Strategy<Value = Valid> {
    parts().prop_map(build)
}

proptest! {
    #![proptest_config(cases(256))]

    /// Arbitrary bytes, read as the daemon reads a file (lossy UTF-8).
    #[test]
    fn config_arbitrary_bytes(bytes in vec(any::<u8>(), 0..600), path in conf_path()) {
        check_parse(&String::from_utf8_lossy(&bytes), &path)?;
    }

    /// Arbitrary text, newlines included.
    #[test]
    fn config_arbitrary_text(text in "(?s).{0,400}", path in conf_path()) {
        check_parse(&text, &path)?;
    }

    /// Lines made of known keys, `=`, edge-case values, comments, quotes and
    /// blank lines.
    #[test]
    fn config_near_valid(text in near_config(), path in conf_path()) {
        check_parse(&text, &path)?;
    }

    /// A config generated from valid values parses to exactly those values
    /// (the defaults of DESIGN.md for the keys left out), whatever the
    /// spacing, comments, blank lines, line endings and order of the lines.
    #[test]
    fn config_valid_round_trips(valid in valid_config()) {
        let text = valid.text();
        let parsed = config::parse_str(&text, &valid.path);
        prop_assert_eq!(parsed, Ok(valid.expected.clone()), "{}", text);
    }

    /// A valid config with lines dropped, repeated, replaced by near-valid
    /// ones or cut in two.
    #[test]
    fn config_valid_then_damaged(
        valid in valid_config(),
        damage in vec(
            (any::<prop::sample::Index>(), 0..4u8, near_line(), any::<prop::sample::Index>()),
            1..4,
        ),
    ) {
        let mut valid = valid;
        for (at, how, near, cut) in damage {
            let lines = &mut valid.lines;
            let i = at.index(lines.len());
            match how {
                0 => { lines.remove(i); }
                1 => { let copy = lines[i].clone(); lines.insert(at.index(lines.len() + 1), copy); }
                2 => lines[i] = near,
                _ => {
                    let line = lines[i].clone();
                    let mut ends: Vec<usize> = line.char_indices().map(|(j, _)| j).collect();
                    ends.push(line.len());
                    let j = ends[cut.index(ends.len())];
                    lines[i] = format!("{}{near}", &line[..j]);
                }
            }
            if lines.is_empty() {
                break;
            }
        }
        check_parse(&valid.text(), &valid.path)?;
    }

    /// One bad line in a valid config is reported once, on its own line.
    #[test]
    fn config_error_on_the_right_line(
        valid in valid_config(),
        bad in prop_oneof!["[a-z]{1,10}", "zz[a-z]{0,6} = 1", "[ \t]*= *[a-z]{0,5}"],
        at in any::<prop::sample::Index>(),
    ) {
        let mut valid = valid;
        let at = at.index(valid.lines.len() + 1);
        valid.lines.insert(at, bad);
        let text = valid.text();
        let errors = config::parse_str(&text, &valid.path).expect_err("a bad line");
        prop_assert_eq!(errors.len(), 1, "{:?}\n{}", errors, text);
        prop_assert_eq!(errors[0].line, at + 1, "{:?}\n{}", errors, text);
    }
}

proptest! {
    #![proptest_config(cases(48))]

    /// `read` and `load` on a file of arbitrary bytes: no panic, every line
    /// number within the file (or 0).
    #[test]
    fn config_files_of_arbitrary_bytes(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..300),
            near_config().prop_map(String::into_bytes),
            // Text with a few arbitrary bytes (often invalid UTF-8) spliced in.
            (near_config(), vec(any::<u8>(), 1..4), any::<prop::sample::Index>())
                .prop_map(|(t, junk, at)| {
                    let mut b = t.into_bytes();
                    let at = at.index(b.len() + 1);
                    b.splice(at..at, junk);
                    b
                }),
        ],
    ) {
        let dir = TempDir::new("props");
        let path = dir.path().join("fuzz.conf");
        std::fs::write(&path, &bytes).unwrap();
        let lines = String::from_utf8_lossy(&bytes).lines().count();
        for result in [config::read(&path), config::load(&path)] {
            if let Err(e) = result {
                prop_assert_eq!(&e.path, &path);
                prop_assert!(!e.errors.is_empty());
                for err in &e.errors {
                    prop_assert!(err.line <= lines, "{:?} in a {}-line file", err, lines);
                }
                prop_assert!(e.errors.is_sorted_by_key(|e| e.line), "{:?}", e.errors);
            }
        }
    }
}

// ===========================================================================
// The wire protocol

/// Integers with the varint boundaries of bincode's encoding well covered.
fn int64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..300u64,
        select(
            &[
                250,
                251,
                252,
                253,
                255,
                256,
                65_535,
                65_536,
                u32::MAX as u64,
                u32::MAX as u64 + 1,
                u64::MAX - 1,
                u64::MAX,
            ][..]
        ),
    ]
}

fn int32() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        0..300u32,
        select(&[250, 251, 252, 65_535, 65_536, u32::MAX][..]),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9:.\\[\\]/_ -]{0,24}", "x{250,260}",]
}

prop_compose! {
    fn listener_info()(name in text(), address in text()) -> ListenerInfo {
        ListenerInfo { name, address }
    }
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        (
            int32(),
            int64(),
            vec(listener_info(), 0..8),
            proptest::option::of(int32())
        )
            .prop_map(|(worker_id, generation, listeners, scoreboard)| {
                ToWorker::Hello(Hello {
                    worker_id,
                    generation,
                    listeners,
                    scoreboard,
                })
            }),
        int64().prop_map(|timeout_ms| ToWorker::Drain { timeout_ms }),
    ]
}

fn from_worker() -> impl Strategy<Value = FromWorker> {
    prop_oneof![
        Just(FromWorker::Ready),
        Just(FromWorker::Drained),
        (int64(), int32()).prop_map(|(requests, active)| FromWorker::Stats { requests, active }),
        (int64(), int32(), int64()).prop_map(|(requests, active, failed)| {
            FromWorker::StatsWithFailures {
                requests,
                active,
                failed,
            }
        }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        Just(Request::Restart),
        Just(Request::Stop),
        int32().prop_map(|n| Request::Scale(Scale::To(n))),
        int32().prop_map(|n| Request::Scale(Scale::Up(n))),
        int32().prop_map(|n| Request::Scale(Scale::Down(n))),
        int32().prop_map(Request::RestartWorker),
        (int32(), any::<bool>(), proptest::option::of(int32())).prop_map(
            |(lines, follow, worker)| Request::Logs {
                lines,
                follow,
                worker
            }
        ),
    ]
}

prop_compose! {
    fn worker_status()(
        (id, pid, generation, state) in (int32(), proptest::option::of(int32()), int64(), text()),
        (uptime_ms, restarts, last_exit) in (int64(), int32(), proptest::option::of(text())),
        (rss_bytes, requests, active, note) in (
            proptest::option::of(int64()),
            proptest::option::of(int64()),
            proptest::option::of(int32()),
            proptest::option::of(text()),
        ),
        last_words in proptest::option::of(text()),
    ) -> WorkerStatus {
        WorkerStatus {
            id, pid, generation, state, uptime_ms, restarts, last_exit, rss_bytes, requests,
            active, note, last_words,
        }
    }
}

prop_compose! {
    fn status()(
        (version, pid, uptime_ms, config, protocol) in (text(), int32(), int64(), text(), text()),
        listeners in vec(listener_info(), 0..4),
        (desired, ready, generation, operation) in
            (int32(), int32(), int64(), proptest::option::of(text())),
        workers in vec(worker_status(), 0..6),
        crash_loop in proptest::option::of(text()),
        (phase, last_restart) in (text(), proptest::option::of(
            (text(), int64(), proptest::option::of(text()), int64()).prop_map(
                |(outcome, generation, reason, ago_ms)| LastRestart { outcome, generation, reason, ago_ms },
            ),
        )),
    ) -> Status {
        Status {
            version, pid, uptime_ms, config, protocol, listeners, desired, ready, generation,
            operation, phase, last_restart, crash_loop, workers,
            image_uptime_ms: uptime_ms / 2, upgrades: desired,
        }
    }
}

prop_compose! {
    fn progress()(
        (worker_id, done, total) in (int32(), int32(), int32()),
        (old_pid, new_pid, elapsed_ms) in (proptest::option::of(int32()), int32(), int64()),
    ) -> Progress {
        Progress { worker_id, done, total, old_pid, new_pid, elapsed_ms }
    }
}

fn response() -> BoxedStrategy<Response> {
    // Boxed: the nested strategy types otherwise overflow a test thread's
    // stack in debug builds.
    prop_oneof![
        status().prop_map(|s| Response::Status(Box::new(s))).boxed(),
        progress().prop_map(Response::Progress),
        (int32(), int32(), int64(), text(), int64()).prop_map(
            |(worker_id, pid, generation, role, bake_ms)| {
                Response::Baking(Baking {
                    worker_id,
                    pid,
                    generation,
                    role,
                    bake_ms,
                })
            }
        ),
        (
            text(),
            int64(),
            int64(),
            (int32(), int32(), int32()),
            any::<bool>()
        )
            .prop_map(
                |(reason, generation, failed_generation, (replaced, restored, total), complete)| {
                    Response::Restarted(RestartOutcome::RolledBack {
                        reason,
                        generation,
                        failed_generation,
                        replaced,
                        restored,
                        total,
                        complete,
                    })
                }
            ),
        (int64(), int32(), int64()).prop_map(|(generation, replaced, elapsed_ms)| {
            Response::Restarted(RestartOutcome::Done {
                generation,
                replaced,
                elapsed_ms,
            })
        }),
        (text(), int32(), int32()).prop_map(|(reason, replaced, total)| {
            Response::Restarted(RestartOutcome::Aborted {
                reason,
                replaced,
                total,
            })
        }),
        (int32(), int32()).prop_map(|(from, to)| Response::Scaled { from, to }),
        Just(Response::Stopping),
        text().prop_map(Response::Error),
        vec(
            (int64(), text(), text(), vec((text(), text()), 0..4)).prop_map(
                |(ts_ms, level, event, fields)| LogEntry {
                    ts_ms,
                    level,
                    event,
                    fields
                }
            ),
            0..4
        )
        .prop_map(Response::Logs),
    ]
    .boxed()
}

/// Arbitrary bytes, and bytes that begin like a record (our version, then a
/// small variant index).
fn record_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        (0..8u8, vec(any::<u8>(), 0..200), any::<bool>()).prop_map(|(variant, rest, ipc)| {
            let version = if ipc { IPC_VERSION } else { CONTROL_VERSION };
            let mut b = vec![version as u8, variant];
            b.extend(rest);
            b
        }),
    ]
}

/// A change to a record: overwrite, insert or remove a byte, or cut it short.
#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let index = || any::<prop::sample::Index>();
    let byte = || {
        prop_oneof![
            any::<u8>(),
            select(&[0, 1, 250, 251, 252, 253, 254, 255][..])
        ]
    };
    vec(
        prop_oneof![
            4 => (index(), byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
            2 => (index(), byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            2 => index().prop_map(Mutation::Remove),
            1 => index().prop_map(Mutation::Truncate),
        ],
        1..4,
    )
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Set(i, b) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            _ => {}
        }
    }
    bytes
}

/// Decoding `bytes` with `limit`: no panic (the call returning is the
/// check), never `Ok` above the limit, and a message that decodes re-encodes
/// to a record that decodes to the same message and is no longer than the
/// input (the encoding is the shortest).
fn check_decode<T>(bytes: &[u8], limit: usize) -> Result<Option<T>, TestCaseError>
where
    T: proto::Message + PartialEq + Debug,
{
    match proto::decode::<T>(bytes, limit) {
        Ok(msg) => {
            prop_assert!(
                bytes.len() <= limit,
                "Ok for {} > {limit} bytes",
                bytes.len()
            );
            let again = proto::encode(&msg);
            prop_assert!(
                again.len() <= bytes.len(),
                "{msg:?}: {again:?} vs {bytes:?}"
            );
            let decoded = proto::decode::<T>(&again, limit);
            prop_assert_eq!(decoded.as_ref(), Ok(&msg));
            Ok(Some(msg))
        }
        Err(proto::Error::TooLarge { len, limit: l }) => {
            prop_assert_eq!((len, l), (bytes.len(), limit));
            prop_assert!(len > limit);
            Ok(None)
        }
        Err(e) => {
            prop_assert!(bytes.len() <= limit, "{e:?} for an oversized record");
            prop_assert!(!e.to_string().is_empty());
            Ok(None)
        }
    }
}

/// All four message types, each with the limit the daemon or the worker uses.
fn check_decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    check_decode::<ToWorker>(bytes, MAX_IPC_RECORD)?;
    check_decode::<FromWorker>(bytes, MAX_IPC_RECORD)?;
    check_decode::<Request>(bytes, MAX_REQUEST)?;
    check_decode::<Response>(bytes, MAX_RESPONSE)?;
    Ok(())
}

/// The round-trip laws for one message: it decodes back; with bytes after it
/// it is `Trailing`; with another version header it is `Version`, naming both;
/// every strict prefix fails; a smaller limit than its size is `TooLarge`.
fn check_round_trip<T>(
    msg: &T,
    limit: usize,
    extra: &[u8],
    version: u64,
) -> Result<(), TestCaseError>
where
    T: proto::Message + PartialEq + Debug,
{
    let record = proto::encode(msg);
    prop_assert!(record.len() <= limit, "{} bytes: {msg:?}", record.len());
    let decoded = proto::decode::<T>(&record, limit);
    prop_assert_eq!(decoded.as_ref(), Ok(msg));

    if !extra.is_empty() {
        let mut longer = record.clone();
        longer.extend_from_slice(extra);
        prop_assert_eq!(
            proto::decode::<T>(&longer, limit),
            Err(proto::Error::Trailing { extra: extra.len() })
        );
    }

    // The header is the version as a varint: one byte for small versions.
    prop_assert_eq!(record[0] as u64, T::VERSION as u64);
    if version != T::VERSION as u64 {
        let mut other =
            bincode::serde::encode_to_vec(version, bincode::config::standard()).expect("a varint");
        other.extend_from_slice(&record[1..]);
        let err = proto::decode::<T>(&other, limit).unwrap_err();
        prop_assert_eq!(
            &err,
            &proto::Error::Version {
                theirs: version,
                ours: T::VERSION
            }
        );
        let text = err.to_string();
        prop_assert!(
            text.contains(&format!("version {version}"))
                && text.contains(&format!("version {}", T::VERSION)),
            "{}",
            text
        );
    }

    // Every cut of a short record; of a long one (long strings), the first
    // and last 64 and a spread between, which keeps the run short.
    let n = record.len();
    let step = (n / 128).max(1);
    let cuts = (0..n).filter(|&c| c < 64 || c + 64 >= n || c % step == 0);
    for cut in cuts {
        let prefix = &record[..cut];
        prop_assert!(
            proto::decode::<T>(prefix, limit).is_err(),
            "prefix of {cut} bytes of {msg:?} decoded"
        );
    }

    if !record.is_empty() {
        prop_assert_eq!(
            proto::decode::<T>(&record, record.len() - 1),
            Err(proto::Error::TooLarge {
                len: record.len(),
                limit: record.len() - 1
            })
        );
    }
    Ok(())
}

fn other_version() -> impl Strategy<Value = u64> {
    // Either protocol's own version is skipped where it would match.
    int64()
}

proptest! {
    #![proptest_config(cases(512))]

    /// Arbitrary bytes never panic any decoder, nor decode above the limit.
    #[test]
    fn decode_arbitrary_bytes(bytes in record_bytes()) {
        check_decode_all(&bytes)?;
    }

    /// Same, with a limit of any size (the limit is checked first).
    #[test]
    fn decode_respects_any_limit(bytes in record_bytes(), limit in 0..260usize) {
        check_decode::<ToWorker>(&bytes, limit)?;
        check_decode::<FromWorker>(&bytes, limit)?;
        check_decode::<Request>(&bytes, limit)?;
        check_decode::<Response>(&bytes, limit)?;
    }

    /// Valid records with bytes changed, added or removed: still no panic,
    /// and whatever decodes re-encodes consistently.
    #[test]
    fn decode_mutated_records(
        msgs in (to_worker(), from_worker(), request(), response()),
        m in mutations(),
    ) {
        let (a, b, c, d) = msgs;
        for record in [proto::encode(&a), proto::encode(&b), proto::encode(&c), proto::encode(&d)] {
            check_decode_all(&mutate(record, &m))?;
        }
    }

    #[test]
    fn round_trip_to_worker(
        msg in to_worker(), extra in vec(any::<u8>(), 0..4), version in other_version(),
    ) {
        check_round_trip(&msg, MAX_IPC_RECORD, &extra, version)?;
    }

    #[test]
    fn round_trip_from_worker(
        msg in from_worker(), extra in vec(any::<u8>(), 0..4), version in other_version(),
    ) {
        check_round_trip(&msg, MAX_IPC_RECORD, &extra, version)?;
    }

    #[test]
    fn round_trip_request(
        msg in request(), extra in vec(any::<u8>(), 0..4), version in other_version(),
    ) {
        check_round_trip(&msg, MAX_REQUEST, &extra, version)?;
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// Responses are the biggest messages (every worker of a status).
    #[test]
    fn round_trip_response(
        msg in response(), extra in vec(any::<u8>(), 0..4), version in other_version(),
    ) {
        check_round_trip(&msg, MAX_RESPONSE, &extra, version)?;
    }
}

/// The largest `Hello` a valid config can produce fits in one IPC record:
/// [`MAX_LISTENERS`] listeners, each with the longest name the config allows
/// (64 bytes) and the longest address (`unix:` and a 107-byte path).
#[test]
fn the_largest_hello_fits_in_a_record() {
    let hello = ToWorker::Hello(Hello {
        worker_id: u32::MAX,
        generation: u64::MAX,
        scoreboard: Some(u32::MAX),
        listeners: vec![
            ListenerInfo {
                name: "n".repeat(64),
                address: format!("unix:/{}", "p".repeat(106)),
            };
            MAX_LISTENERS
        ],
    });
    let record = proto::encode(&hello);
    assert!(
        record.len() <= MAX_IPC_RECORD,
        "{} > {MAX_IPC_RECORD}",
        record.len()
    );
    assert_eq!(proto::decode(&record, MAX_IPC_RECORD), Ok(hello));
}

// ===========================================================================
// Control frames

/// Why a frame could not be read.
#[derive(Debug, PartialEq)]
enum FrameError {
    /// The stream ended first (the daemon's `BadRequest::Closed`).
    Closed,
    /// A refused length or a bad record (`BadRequest::Invalid`).
    Invalid(proto::Error),
}

/// What the daemon's `read_request` (src/daemon/control.rs) does, without the
/// socket: read the header, check it with `frame_len`, read that many bytes,
/// decode them. Returns the message and the bytes consumed; what follows in
/// `stream` is never read.
fn read_frame<T: proto::Message>(stream: &[u8], limit: usize) -> Result<(T, usize), FrameError> {
    let header: [u8; FRAME_HEADER] = stream
        .get(..FRAME_HEADER)
        .ok_or(FrameError::Closed)?
        .try_into()
        .expect("4 bytes");
    let len = proto::frame_len(header, limit).map_err(FrameError::Invalid)?;
    let body = stream
        .get(FRAME_HEADER..FRAME_HEADER + len)
        .ok_or(FrameError::Closed)?;
    let msg = proto::decode(body, limit).map_err(FrameError::Invalid)?;
    Ok((msg, FRAME_HEADER + len))
}

fn check_read_frame<T>(stream: &[u8], limit: usize) -> Result<(), TestCaseError>
where
    T: proto::Message + PartialEq + Debug,
{
    if let Ok((msg, used)) = read_frame::<T>(stream, limit) {
        prop_assert!(used <= stream.len() && used - FRAME_HEADER <= limit);
        let again = proto::frame(&msg);
        prop_assert_eq!(read_frame::<T>(&again, limit), Ok((msg, again.len())));
    }
    Ok(())
}

/// A stream that starts with a plausible header more often than chance.
fn frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        (0..64u32, vec(any::<u8>(), 0..80)).prop_map(|(len, rest)| {
            let mut b = len.to_be_bytes().to_vec();
            b.extend([CONTROL_VERSION as u8]);
            b.extend(rest);
            b
        }),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    /// Any header: `frame_len` is the big-endian length if within the
    /// limit, else `TooLarge` (before anything is allocated).
    #[test]
    fn frame_len_any_header(header in any::<[u8; 4]>(), limit in prop_oneof![
        select(&[0, MAX_REQUEST, MAX_RESPONSE, u32::MAX as usize, usize::MAX][..]),
        any::<usize>(),
    ]) {
        let len = u32::from_be_bytes(header) as usize;
        let got = proto::frame_len(header, limit);
        if len <= limit {
            prop_assert_eq!(got, Ok(len));
        } else {
            prop_assert_eq!(got, Err(proto::Error::TooLarge { len, limit }));
        }
    }

    /// Arbitrary streams, read as the daemon reads a request and as
    /// clusterctl reads a response: no panic, and whatever is read frames
    /// back to itself.
    #[test]
    fn read_frame_arbitrary_streams(stream in frame_bytes()) {
        check_read_frame::<Request>(&stream, MAX_REQUEST)?;
        check_read_frame::<Response>(&stream, MAX_RESPONSE)?;
    }

    /// A framed request is read back exactly, whatever follows it; cut short
    /// anywhere, it is `Closed` (waiting for more), never a wrong message.
    #[test]
    fn frame_round_trips(msg in request(), after in vec(any::<u8>(), 0..8)) {
        let frame = proto::frame(&msg);
        prop_assert_eq!(
            proto::frame_len(frame[..4].try_into().unwrap(), MAX_REQUEST),
            Ok(frame.len() - FRAME_HEADER)
        );
        let mut stream = frame.clone();
        stream.extend(&after);
        prop_assert_eq!(read_frame::<Request>(&stream, MAX_REQUEST), Ok((msg, frame.len())));
        for cut in 0..frame.len() {
            prop_assert_eq!(
                read_frame::<Request>(&frame[..cut], MAX_REQUEST),
                Err(FrameError::Closed)
            );
        }
    }

    /// A header that lies about the length: too short a body is an invalid
    /// record; a longer one waits for bytes (then reads the next frame's
    /// bytes as part of the body, which is an error, not a panic).
    #[test]
    fn frame_with_a_wrong_length(
        msg in request(),
        delta in 1..8u32,
        longer in any::<bool>(),
        after in vec(any::<u8>(), 0..16),
    ) {
        let frame = proto::frame(&msg);
        let len = (frame.len() - FRAME_HEADER) as u32;
        let lie = if longer { len + delta } else { len.saturating_sub(delta) };
        let mut stream = lie.to_be_bytes().to_vec();
        stream.extend(&frame[FRAME_HEADER..]);
        stream.extend(&after);
        match read_frame::<Request>(&stream, MAX_REQUEST) {
            Err(FrameError::Closed) => prop_assert!(longer && after.len() < delta as usize),
            Err(FrameError::Invalid(_)) => {}
            Ok((got, _)) => prop_assert!(
                false,
                "{:?} read from a header saying {} for {} bytes",
                got,
                lie,
                len
            ),
        }
    }

    #[test]
    fn frame_round_trips_response(msg in response()) {
        let frame = proto::frame(&msg);
        prop_assert_eq!(read_frame::<Response>(&frame, MAX_RESPONSE), Ok((msg, frame.len())));
    }
}

// ===========================================================================
// sd_notify datagrams

/// What `notify::parse` must return: every non-empty line `KEY=VALUE`, KEY
/// of `A-Z`, `0-9` and `_`; else nothing.
fn notify_fields(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let eq = line.find('=')?;
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        let ok = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return None;
        }
        fields.push((key.to_owned(), value.to_owned()));
    }
    (!fields.is_empty()).then_some(fields)
}

const NOTIFY_GOOD: &[&str] = &[
    "READY=1",
    "STOPPING=1",
    "STATUS=serving 3 carts",
    "MAINPID=42",
    "WATCHDOG=1",
    "A=",
    "X==1",
];

const NOTIFY_BAD: &[&str] = &[
    "",
    "READY",
    "ready=1",
    "=1",
    "READY 1",
    " READY=1",
    "RÉADY=1",
    "READY\r=1",
];

fn notify_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ("[A-Z0-9_]{1,12}", "[^\n]{0,20}").prop_map(|(k, v)| format!("{k}={v}")),
        2 => select(NOTIFY_GOOD).prop_map(String::from),
        1 => select(NOTIFY_BAD).prop_map(String::from),
        1 => "[^\n]{0,12}",
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    /// Arbitrary datagrams: no panic; `Some` exactly when every line is an
    /// assignment.
    #[test]
    fn notify_arbitrary_bytes(bytes in vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(notify::parse(&bytes), notify_fields(&bytes));
    }

    /// Datagrams made of assignments and near-assignments.
    #[test]
    fn notify_near_valid(lines in vec(notify_line(), 0..8), trailing in any::<bool>()) {
        let mut text = lines.join("\n");
        if trailing {
            text.push('\n');
        }
        let got = notify::parse(text.as_bytes());
        prop_assert_eq!(&got, &notify_fields(text.as_bytes()));
        if let Some(fields) = got {
            // Some only if every line is KEY=VALUE.
            let assignments = text.split('\n').filter(|l| !l.is_empty()).count();
            prop_assert_eq!(fields.len(), assignments);
            // And written back, they parse the same.
            let back: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            prop_assert_eq!(notify::parse(back.join("\n").as_bytes()), Some(fields));
        }
    }
}
