//! A cgroup (v2) per worker, where clusterd may create one.
//!
//! A process group only holds what stays in it: a worker's helper that calls
//! `setsid` or `setpgid` leaves it. A cgroup cannot be left without write
//! access to the cgroup files, so where clusterd can create cgroups (root, or
//! a delegated subtree as in most containers and `Delegate=yes` units) every
//! worker runs in its own, and what is left of it is killed with
//! `cgroup.kill` (Linux 5.14).
//!
//! Layout: clusterd's own cgroup `C` (from `/proc/self/cgroup`, under the
//! cgroup2 mount from `/proc/self/mountinfo`) gets `C/clusterd.PID`, and each
//! worker `C/clusterd.PID/worker.N`. No controller is enabled, so the "no
//! internal processes" rule never bites. The worker moves itself into its
//! cgroup between fork and exec (writing `0` to `cgroup.procs`, opened by
//! clusterd before the fork, so the check is against clusterd's credentials
//! even for a worker dropped to another user), and clusterd writes its pid
//! there again after the fork, so nothing the worker starts can be outside
//! it.
//!
//! `CLUSTERD_CGROUP=off` in clusterd's environment turns this off (the
//! fallback: process groups and the subreaper's children).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The environment variable that turns per-worker cgroups off.
pub const ENV_SWITCH: &str = "CLUSTERD_CGROUP";

/// `C/clusterd.PID`: the cgroup every worker's cgroup is created in.
#[derive(Debug)]
pub struct Parent {
    dir: PathBuf,
    next: u64,
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing (the child writes `0` to it) until
    /// the worker is in ([`Group::adopt`] closes it: no fd per worker).
    procs: Option<OwnedFd>,
}

impl Parent {
    /// Creates `clusterd.PID` in clusterd's own cgroup, or says why not.
    pub fn create() -> Result<Parent, String> {
        if std::env::var_os(ENV_SWITCH).is_some_and(|v| v == "off") {
            return Err(format!("{ENV_SWITCH}=off"));
        }
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let own = unified_path(&own).ok_or("not in a cgroup v2 hierarchy")?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let base = cgroup2_dir(&mountinfo, own).ok_or("no cgroup2 mount holds its cgroup")?;
        let pid = std::process::id();
        let dir = base.join(format!("clusterd.{pid}"));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by an earlier clusterd with this pid in this cgroup (a
            // container's PID 1 killed and started again): whatever still
            // runs in it is that one's leftovers.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = kill_dir(&dir);
            }
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        if !dir.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&dir);
            return Err("no cgroup.kill (Linux 5.14 or later needed)".into());
        }
        Ok(Parent { dir, next: 1 })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its folder and the number of the next worker's group, to hand over
    /// (`clusterctl upgrade`).
    pub fn handed(&self) -> (PathBuf, u64) {
        (self.dir.clone(), self.next)
    }

    /// The parent an earlier image of clusterd created.
    pub fn taken_over(dir: PathBuf, next: u64) -> Parent {
        Parent { dir, next }
    }

    /// A new, empty cgroup for the next worker.
    pub fn group(&mut self) -> io::Result<Group> {
        let dir = self.dir.join(format!("worker.{}", self.next));
        self.next += 1;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = kill_dir(&dir);
            }
            Err(e) => return Err(e),
        }
        let procs = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"));
        match procs {
            Ok(f) => Ok(Group {
                dir,
                procs: Some(f.into()),
            }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Kills every process in every worker's cgroup.
    pub fn kill_all(&self) {
        let _ = kill_dir(&self.dir);
    }

    /// Whether any process is left in any worker's cgroup.
    pub fn populated(&self) -> bool {
        populated(&self.dir)
    }

    /// Removes the worker cgroups that are empty, and the parent too if
    /// they all are; returns whether it is gone.
    pub fn remove(&self) -> bool {
        if let Ok(dir) = fs::read_dir(&self.dir) {
            for entry in dir.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        fs::remove_dir(&self.dir).is_ok()
    }
}

impl Group {
    /// A group an earlier image of clusterd created (`clusterctl upgrade`);
    /// its worker is in it already.
    pub fn taken_over(dir: PathBuf) -> Group {
        Group { dir, procs: None }
    }

    /// `cgroup.procs`, for the child to write `0` to between fork and exec.
    pub fn procs(&self) -> Option<BorrowedFd<'_>> {
        self.procs.as_ref().map(|fd| fd.as_fd())
    }

    /// Moves `pid` (and, from then on, whatever it starts) into this
    /// cgroup, and closes `cgroup.procs`.
    pub fn adopt(&mut self, pid: u32) -> io::Result<()> {
        let procs = self
            .procs
            .take()
            .ok_or_else(|| io::Error::other("cgroup.procs already closed"))?;
        File::from(procs).write_all(pid.to_string().as_bytes())
    }

    /// Kills every process in this cgroup.
    pub fn kill(&self) {
        let _ = kill_dir(&self.dir);
    }

    /// Removes the cgroup if it is empty; returns whether it is gone.
    pub fn remove(&self) -> bool {
        match fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Writes `1` to `dir/cgroup.kill`: SIGKILL to every process in `dir` and
/// the cgroups below it.
fn kill_dir(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.kill"), b"1")
}

/// `populated 1` in `dir/cgroup.events`.
fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|e| e.lines().any(|l| l.trim() == "populated 1"))
}

/// The cgroup v2 path in `/proc/self/cgroup` (the `0::PATH` line).
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// The folder of cgroup `path` under the cgroup2 mount in `mountinfo` (the
/// one whose root is a prefix of `path`).
pub fn cgroup2_dir(mountinfo: &str, path: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS…] - FSTYPE SOURCE SUPER
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mountpoint)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        // Spaces and the like are octal-escaped; such a mount is not used.
        if mountpoint.contains('\\') || root.contains('\\') {
            continue;
        }
        let rest = if *root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rest) = rest {
            let rest = rest.trim_start_matches('/');
            return Some(if rest.is_empty() {
                PathBuf::from(mountpoint)
            } else {
                Path::new(mountpoint).join(rest)
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_is_found_among_v1_lines() {
        let text = "9:name=systemd:/\n4:memory:/x/y\n0::/user.slice/app.service\n";
        assert_eq!(unified_path(text), Some("/user.slice/app.service"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
        assert_eq!(unified_path("0::/\n"), Some("/"));
    }

    #[test]
    fn the_cgroup2_mount_is_found_hybrid_or_unified() {
        let hybrid = "\
25 20 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
30 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
34 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_dir(hybrid, "/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_dir(hybrid, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        // A container that sees its own cgroup mounted as the root.
        let bind = "40 30 0:31 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_dir(bind, "/docker/abc/sub"),
            Some(PathBuf::from("/sys/fs/cgroup/sub"))
        );
        assert_eq!(cgroup2_dir(bind, "/docker/abcdef"), None);
        assert_eq!(
            cgroup2_dir("1 0 0:1 / / rw - ext4 /dev/sda rw\n", "/"),
            None
        );
    }
}
