//! The README's recipes for other languages, as the complete programs in
//! examples/recipes, against the real runtimes under `protocol = systemd`:
//! Python's http.server, gunicorn, uvicorn, Go's net/http, and the README's
//! hand-written Node.js server (fd 3, the READY pipe, its own drain). Each goes
//! through rolling restarts under the four loads (keep-alive and
//! new-connection GET and POST) without a failed request.
//!
//! Needs `python3` (with venv) and `go` on the PATH (`.ci/run` installs
//! Debian's golang-go when it is missing). gunicorn and uvicorn come from
//! PyPI, pinned in examples/recipes/requirements.txt, installed once into a
//! virtualenv under target/tmp (again only when that file changes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::util::*;

/// Rolling restarts per recipe.
const RESTARTS: u64 = 5;

fn recipes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/recipes")
}

fn tmp() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf()
}

#[track_caller]
fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A virtualenv under target/tmp with examples/recipes/requirements.txt.
fn venv() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp().join("recipes-venv");
        let requirements = recipes().join("requirements.txt");
        let wanted = std::fs::read(&requirements).expect("requirements.txt");
        let stamp = dir.join(".clusterd-installed-requirements");
        let lock = tmp().join("recipes-venv.lock");
        let lock = std::fs::File::create(lock).expect("the venv's lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        if std::fs::read(&stamp).ok() != Some(wanted.clone()) {
            let _ = std::fs::remove_dir_all(&dir);
            run(
                "python3 -m venv (the recipe tests need python3 with venv)",
                Command::new("python3").arg("-m").arg("venv").arg(&dir),
            );
            run(
                "pip install -r examples/recipes/requirements.txt",
                Command::new(dir.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                    .arg(&requirements),
            );
            std::fs::write(&stamp, &wanted).expect("write the venv stamp");
        }
        dir
    })
}

/// examples/recipes/go built under target/tmp.
fn go_shop() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = tmp().join("recipes-go-shop");
        run(
            "go build examples/recipes/go (the recipe tests need Go: Debian's golang-go)",
            Command::new("go")
                .args(["build", "-o"])
                .arg(&bin)
                .arg(".")
                .current_dir(recipes().join("go"))
                .env("GOCACHE", tmp().join("go-cache"))
                .env("GOPATH", tmp().join("go-path"))
                .env("GOTOOLCHAIN", "local")
                .env("GOPROXY", "off")
                .env("GOFLAGS", "-mod=mod"),
        );
        bin
    })
}

/// Two workers running `exec` (from examples/recipes/`folder`) through
/// [`RESTARTS`] rolling restarts under keep-alive and new-connection GET and
/// POST load: nothing fails, and every old worker left by draining (no
/// SIGKILL, no crash).
fn recipe_loses_nothing(tag: &str, folder: &str, exec: &str, extra: &str) {
    let config = format!(
        "exec = {exec}\nchdir = {}\nprotocol = systemd\nworkers = 2\n\
         listen = 127.0.0.1:0\ndrain_timeout = 40s\n{extra}\n",
        recipes().join(folder).display()
    );
    let cluster = Cluster::start(tag, &config);
    cluster.wait_ready(1);
    let addr = cluster.addr();
    let response = get(addr, "/products/7").expect("GET /products/7");
    assert_eq!(response.status, 200);
    let loads = mixed_load(addr);
    for generation in 2..=RESTARTS + 1 {
        let out = cluster.ctl(&["restart"]);
        assert!(
            out.status.success(),
            "restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ready(generation);
        let_loads_run(&loads, 20);
    }
    finish_loads(loads);
    cluster.wait_events("worker.exit", 2 * RESTARTS as usize, |_| true);
    for l in cluster.lines() {
        assert!(
            !matches!(l.event.as_str(), "worker.kill" | "worker.crash"),
            "{}",
            l.raw
        );
    }
}

#[test]
fn python_http_server_recipe_loses_nothing() {
    recipe_loses_nothing("recipe-python-http", "python-http", "python3 server.py", "");
}

#[test]
fn gunicorn_recipe_loses_nothing() {
    let exec = format!(
        "{} --preload --workers 2 --no-control-socket app:app",
        venv().join("bin/gunicorn").display()
    );
    recipe_loses_nothing("recipe-gunicorn", "gunicorn", &exec, "");
}

/// uvicorn stops accepting by unregistering its listener: asyncio's
/// `Server.close()` dropped a connection accepted in the same turn of the
/// loop (a reset new-connection GET, once in three loaded full runs).
#[test]
fn uvicorn_recipe_loses_nothing() {
    let exec = format!("{} app.py", venv().join("bin/python").display());
    recipe_loses_nothing("recipe-uvicorn", "uvicorn", &exec, "ready_after = 1s");
}

/// The drain's idle check looks after the event loop's poll phase: checked
/// from the timer, a request that arrived during a stall was still unread
/// and its connection closed (two new-connection POSTs, once in three
/// loaded full runs).
#[test]
fn node_fd3_recipe_loses_nothing() {
    recipe_loses_nothing("recipe-node-fd3", "node-fd3", "node server.js", "");
}

#[test]
fn go_recipe_loses_nothing() {
    let exec = go_shop().display().to_string();
    recipe_loses_nothing("recipe-go", "go", &exec, "");
}
