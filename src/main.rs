//! `clusterd`: parse the command line, load the config, run the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
clusterd: a tiny supervisor for pre-fork network servers

Usage: clusterd -c FILE [--check]

Binds the listening sockets of FILE, starts the workers, restarts crashed
ones with backoff, and replaces them one by one without dropping a request
(HUP or `clusterctl restart`). Runs in the foreground; logs to stderr.

Options:
  -c, --config FILE  the config file (see clusterd.conf(5))
      --check        validate the config and exit: 0 if valid (warnings,
                     FILE:LINE: warning: ..., are printed), 2 if not
      --upgrade-formats
                     print the version and the state hand-off formats this
                     binary can take over from (`clusterctl upgrade` runs
                     it before re-executing clusterd in place)
  -h, --help         print this help
  -V, --version      print the version

Signals: TERM/INT graceful stop, QUIT fast stop, HUP rolling restart,
TTIN/TTOU one worker more/less, USR2 upgrade clusterd in place (keeping
the workers), USR1 reopen log_file.
Exit status: 0 after a clean stop, 1 on a runtime failure, 2 on a usage or
config error.";

struct Args {
    config: PathBuf,
    check: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut config = None;
    let mut check = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Some("-V" | "--version") => {
                println!("clusterd {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Some("--check") => check = true,
            Some(clusterd::daemon::upgrade::FORMATS_FLAG) => {
                println!("{}", clusterd::daemon::upgrade::formats_text());
                return Ok(None);
            }
            Some("-c" | "--config") => {
                let value = args.next().ok_or("-c needs a FILE")?;
                config = Some(PathBuf::from(value));
            }
            Some(s) if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]))
            }
            _ => return Err(format!("unexpected argument {:?}", arg)),
        }
    }
    let config = config.ok_or("no config file given: use -c FILE")?;
    Ok(Some(Args { config, check }))
}

fn main() -> ExitCode {
    // The new image of `clusterctl upgrade`: it takes over the running
    // clusterd's state and workers instead of starting from its arguments.
    if let Some(code) = clusterd::daemon::upgrade::take_over() {
        return ExitCode::from(code as u8);
    }
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clusterd: {e}\nTry 'clusterd --help'.");
            return ExitCode::from(2);
        }
    };
    use clusterd::config::Purpose;
    let purpose = if args.check {
        Purpose::Check
    } else {
        Purpose::Run
    };
    let loaded = match clusterd::config::load_for(&args.config, purpose) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let path = &loaded.config.path;
    if args.check {
        // Mistakes that may still work: FILE:LINE: warning: message.
        for w in &loaded.warnings {
            eprintln!("{}", w.warning(path));
        }
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    clusterd::daemon::hint::config_warnings(path, &loaded.warnings);
    ExitCode::from(clusterd::daemon::run(loaded.config) as u8)
}
