//! Config errors (`FILE:LINE: message` on stderr, exit 2, with `--check` and
//! without) and the command line (`--help`, `--version`, usage errors).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use crate::util::*;

/// A config that is valid but for the lines in `bad`: the case's name and
/// text, and every message expected on stderr as `(line, text)`.
struct Case {
    name: &'static str,
    text: String,
    errors: Vec<(usize, &'static str)>,
}

fn case(name: &'static str, text: &str, errors: &[(usize, &'static str)]) -> Case {
    Case {
        name,
        text: text.to_string(),
        errors: errors.to_vec(),
    }
}

/// Runs `clusterd ARGS -c FILE`; asserts exit 2 and that stderr has exactly
/// the expected `FILE:LINE: message` lines (each containing its text).
#[track_caller]
fn assert_rejected(file: &Path, check: bool, expected: &[(usize, &str)], what: &str) {
    let mut args: Vec<&OsStr> = Vec::new();
    if check {
        args.push(OsStr::new("--check"));
    }
    args.extend([OsStr::new("-c"), file.as_os_str()]);
    let out = run_clusterd(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mode = if check { "--check" } else { "run" };
    assert_eq!(out.status.code(), Some(2), "{what} ({mode}): {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len(),
        "{what} ({mode}): one line per error:\n{stderr}"
    );
    for (line, (n, text)) in lines.iter().zip(expected) {
        let prefix = if *n == 0 {
            format!("{}: ", file.display())
        } else {
            format!("{}:{n}: ", file.display())
        };
        assert!(
            line.starts_with(&prefix) && line.contains(text),
            "{what} ({mode}): expected {prefix:?}...{text:?}, got:\n{stderr}"
        );
    }
    assert!(
        out.stdout.is_empty(),
        "{what} ({mode}): nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn each_class_of_config_error_is_reported_with_its_line_and_exit_2() {
    let dir = TempDir::new("badconf");
    // Line 1 and 2 are valid; the cases add their lines after.
    let ok = "exec = /bin/true\nlisten = 127.0.0.1:0\n";
    let cases = [
        case(
            "unknown key, with a suggestion",
            &format!("{ok}wokers = 2\n"),
            &[(3, r#"unknown key "wokers" (did you mean "workers"?)"#)],
        ),
        case(
            "unknown key, another tool's name for it",
            &format!("{ok}bind = 127.0.0.1:1\n"),
            &[(3, r#"unknown key "bind" (did you mean "listen"?)"#)],
        ),
        case(
            "bad duration (unknown unit)",
            &format!("{ok}drain_timeout = 10 seconds\n"),
            &[(3, "drain_timeout: unknown unit")],
        ),
        case(
            "bad duration (no unit)",
            &format!("{ok}ready_timeout = 10\n"),
            &[(3, r#"ready_timeout: "10" needs a unit"#)],
        ),
        case(
            "bad listen address (no port)",
            "exec = /bin/true\nlisten = 127.0.0.1\n",
            &[(2, "listen: expected host:port")],
        ),
        case(
            "bad listen address (port out of range)",
            "exec = /bin/true\nlisten = 127.0.0.1:99999\n",
            &[(2, "listen: port must be a number from 0 to 65535")],
        ),
        case(
            "duplicate key",
            &format!("{ok}workers = 2\nworkers = 3\n"),
            &[(4, r#"duplicate key "workers" (first set on line 3)"#)],
        ),
        case(
            "missing exec",
            "listen = 127.0.0.1:0\nworkers = 2\n",
            &[(0, r#"missing required key "exec""#)],
        ),
        case(
            "missing listen",
            "exec = /bin/true\nworkers = 2\n",
            &[(0, r#"missing required key "listen""#)],
        ),
        case(
            "bad workers (a word)",
            &format!("{ok}workers = lots\n"),
            &[(
                3,
                r#"workers: expected "auto" or a number from 1 to 1024, found "lots""#,
            )],
        ),
        case(
            "bad workers (zero)",
            &format!("{ok}workers = 0\n"),
            &[(
                3,
                r#"workers: expected "auto" or a number from 1 to 1024, found "0""#,
            )],
        ),
        case(
            "a line that is not key = value",
            &format!("{ok}workers 2\n"),
            &[(3, r#"expected "key = value""#)],
        ),
        case(
            "several errors at once, all reported in line order",
            "# a comment\nexec = /bin/true\nlisten = 127.0.0.1\nwokers = 2\n\
             drain_timeout = soon\nworkers = many\nworkers = 4\n",
            &[
                (3, "listen: expected host:port"),
                (4, r#"unknown key "wokers""#),
                (5, r#"drain_timeout: expected a duration, found "soon""#),
                (6, r#"workers: expected "auto""#),
                (7, r#"duplicate key "workers" (first set on line 6)"#),
            ],
        ),
        case(
            "a program that does not exist",
            "exec = /nonexistent/shop --port 1\nlisten = 127.0.0.1:0\n",
            &[(1, r#"exec: program "/nonexistent/shop" not found"#)],
        ),
        case(
            "a relative program that does not exist",
            "exec = ./no-such-shop\nlisten = 127.0.0.1:0\n",
            &[(1, r#"exec: program "./no-such-shop" not found"#)],
        ),
        case(
            "a program not in PATH",
            "exec = no-such-shop-program\nlisten = 127.0.0.1:0\n",
            &[(
                1,
                r#"exec: program "no-such-shop-program" not found in PATH"#,
            )],
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        let file = dir.path().join(format!("case{i}.conf"));
        std::fs::write(&file, &c.text).unwrap();
        assert_rejected(&file, true, &c.errors, c.name);
        assert_rejected(&file, false, &c.errors, c.name);
    }
    // The relative program is looked for beside the config file, and the
    // message says where.
    let relative = cases
        .iter()
        .position(|c| c.name == "a relative program that does not exist")
        .unwrap();
    let file = dir.path().join(format!("case{relative}.conf"));
    let out = run_clusterd(&[OsStr::new("--check"), OsStr::new("-c"), file.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let beside = dir.path().join("no-such-shop");
    assert!(
        stderr.contains(&format!("looked for {}", beside.display())),
        "{stderr}"
    );
    // A config file that cannot be read.
    let missing = dir.path().join("missing.conf");
    assert_rejected(
        &missing,
        true,
        &[(0, "cannot read the config file")],
        "no file",
    );
    assert_rejected(
        &missing,
        false,
        &[(0, "cannot read the config file")],
        "no file",
    );
}

#[test]
fn check_help_version_and_usage_errors() {
    let dir = TempDir::new("cli");
    let file = dir.path().join("good.conf");
    std::fs::write(
        &file,
        format!(
            "# the shop\nexec = {} --listen 127.0.0.1:1\nlisten = 127.0.0.1:0\nworkers = 2\n\
             drain_timeout = 5s\n",
            example("shop").display()
        ),
    )
    .unwrap();
    let out = run_clusterd(&[OsStr::new("--check"), OsStr::new("-c"), file.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "--check of a valid config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for flag in ["--help", "-h"] {
        let out = run_clusterd(&[OsStr::new(flag)]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: clusterd -c FILE"),
            "{flag}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for flag in ["--version", "-V"] {
        let out = run_clusterd(&[OsStr::new(flag)]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("clusterd {}", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }

    let usage_errors: [&[&OsStr]; 3] = [
        &[],
        &[OsStr::new("--check")],
        &[OsStr::new("-c"), file.as_os_str(), OsStr::new("--bogus")],
    ];
    for args in usage_errors {
        let out = run_clusterd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("clusterd: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--help"),
            "{args:?} points at --help: {stderr}"
        );
    }
    let out = run_clusterd(&[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-c FILE"),
        "no -c says what is missing"
    );
}

/// What sits at the config path when clusterd re-reads it (HUP or
/// `clusterctl restart`) cannot block it or swamp the answer: a FIFO (which
/// blocked the loop until someone opened it), a file of garbage (200,000
/// errors once made a 10 MB reply that clusterctl refused as too large).
#[test]
fn a_reload_of_a_fifo_or_of_garbage_is_refused_at_once() {
    let cluster = Cluster::shop("reload-fifo", 1, "");
    cluster.wait_ready(1);

    std::fs::write(&cluster.config, "oops\n".repeat(200_000)).unwrap();
    let out = cluster.ctl(&["restart"]);
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    let path = cluster.config.display().to_string();
    assert!(
        shown.contains(&format!("{path}: missing required key \"exec\"")),
        "{shown}"
    );
    assert!(shown.contains(&format!("{path}:18: expected")), "{shown}");
    assert!(!shown.contains(&format!("{path}:19: ")), "{shown}");
    assert!(
        shown.contains(&format!("{path}: ... and 199982 more errors")),
        "{shown}"
    );

    std::fs::remove_file(&cluster.config).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &cluster.config,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    cluster.signal(rustix::process::Signal::HUP);
    let refused = cluster.wait_event("restart.refused", |l| {
        l.get("reason").is_some_and(|r| r.contains("FIFO"))
    });
    assert!(
        refused
            .get("reason")
            .unwrap()
            .contains("cannot read the config file: it is a FIFO (named pipe), not a regular file"),
        "{}",
        refused.raw
    );
    let status = cluster.status_json();
    assert_eq!(status["ready"], 1, "{status}");
    assert_eq!(status["generation"], 1, "{status}");
}

/// Mistakes that pass as valid config but crash-loop: what `--check` can
/// tell is a warning naming the fix (exit 0), also logged at start-up.
#[test]
fn check_warns_about_a_wrapper_under_protocol_systemd() {
    let dir = TempDir::new("wrapper");
    // An "npm" that is really sleep: only its name matters here.
    std::os::unix::fs::symlink("/bin/sleep", dir.path().join("npm")).unwrap();
    let config = "exec = ./npm 3600\nprotocol = systemd\nready_after = 100ms\n\
                  listen = 127.0.0.1:0\nworkers = 1\n";
    let file = dir.path().join("wrapper.conf");
    std::fs::write(&file, config).unwrap();
    let out = run_clusterd(&[OsStr::new("--check"), OsStr::new("-c"), file.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", file.display())
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:1: warning: exec: npm runs the server as a child process",
            file.display()
        )) && lines[0].contains("exec = node server.js"),
        "{stderr}"
    );

    let cluster = Cluster::start_in(dir, "wrapper", config, Command::new(clusterd_bin()));
    let warning = cluster.wait_event("config.warning", |_| true);
    assert_eq!(warning.level, "warn");
    assert_eq!(warning.get("line"), Some("1"), "{}", warning.raw);
    assert!(
        warning
            .get("warning")
            .is_some_and(|w| w.starts_with("exec: npm runs the server")),
        "{}",
        warning.raw
    );
}

/// What only run time can tell: a program that is not a clusterd worker run
/// with the default protocol (it never reads its Hello, or exits without a
/// word on fd 3), a systemd-protocol program that never reports READY. The
/// log says what to change.
#[test]
fn a_worker_that_never_speaks_gets_a_hint_naming_the_fix() {
    let hint = |tag: &str, extra: &str, exec: &str| -> String {
        let config = format!(
            "exec = {exec}\nlisten = 127.0.0.1:0\nworkers = 1\nready_timeout = 1s\n\
             restart_delay = 1s\nrestart_delay_max = 1s\n{extra}"
        );
        let cluster = Cluster::start(tag, &config);
        let line = cluster.wait_event("worker.hint", |_| true);
        assert_eq!(line.level, "warn");
        assert_eq!(line.get("id"), Some("1"), "{}", line.raw);
        line.get("hint").unwrap_or_default().to_string()
    };
    let sleeper = hint("hint-hello", "", "/bin/sleep 3600");
    assert_eq!(
        sleeper,
        "worker 1 never read its Hello on fd 3 within ready_timeout (1s): is this a \
         clusterd worker? For any other program use protocol = systemd"
    );
    let quitter = hint("hint-exit", "", "/bin/false");
    assert!(
        quitter.starts_with("worker 1 sent nothing on fd 3 before it exited")
            && quitter.ends_with("if this program is not one, use protocol = systemd"),
        "{quitter}"
    );
    let silent = hint("hint-systemd", "protocol = systemd\n", "/bin/sleep 3600");
    assert!(
        silent.starts_with("worker 1 did not report READY within ready_timeout (1s)")
            && silent.contains("NOTIFY_SOCKET")
            && silent.contains("CLUSTERD_READY_FD")
            && silent.contains("ready_after"),
        "{silent}"
    );
}
