//! `dispatch = reuseport`: one `SO_REUSEPORT` listening socket per worker
//! slot and `listen` line, each with its own accept queue; the kernel spreads
//! new connections over a port's sockets by a hash of the connection's
//! addresses.
//!
//! # Ownership
//!
//! [`Reuseport`] holds every such socket, by slot. clusterd creates a slot's
//! sockets when the slot comes into being (at start, or when scaling up) and
//! keeps them for the slot's whole life: every worker that runs in the slot
//! gets copies of the same sockets (fd 3.. and `LISTEN_FDS` for `protocol =
//! systemd` and `node`, the Hello record for `protocol = clusterd`), so a
//! restart or a crash loses nothing that queued on them — the queue outlives
//! the worker and the replacement takes it. During a rolling restart a
//! slot's replacement runs beside the worker it replaces (the pool is one
//! above its count meanwhile): both hold the slot's sockets; the old one
//! stops accepting when it drains, the new one goes on with the same queue.
//!
//! A self-upgrade of clusterd (`clusterctl upgrade`) must hand over every
//! slot's sockets with the slot number and the `listen` line each belongs to,
//! and the addresses in [`Reuseport::lines`] (the real port of a `:0` line).
//!
//! # Scaling down
//!
//! A slot scaled away loses its sockets at once (clusterd closes its copies;
//! a native worker closes its own when it drains, a `systemd` program when it
//! closes its listener or exits). When the last copy of a socket is closed,
//! the kernel takes it out of the port's group, and what was queued on it:
//!
//! - with `net.ipv4.tcp_migrate_req = 1` (Linux 5.14+, per network
//!   namespace), connections in its accept queue and handshakes in progress
//!   move to another socket of the group: nothing is lost;
//! - otherwise they are reset. clusterd logs `reuseport.no_migrate` at start
//!   when that is the case ([`migrate_req`]).
//!
//! clusterd does not change the setting itself: it is the network
//! namespace's, and belongs to whoever runs the machine or the container.
//!
//! # Limits
//!
//! Only TCP: the kernel forms no group for unix sockets (a second bind to a
//! path fails), so a `unix:` listener with `dispatch = reuseport` is a config
//! error. Any program of the same user can bind the same port with
//! `SO_REUSEPORT` and join the group (take a share of the connections).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;

use super::listen::{self, Listener};
use crate::config::{Config, Listen, ListenAddr};
use crate::lifecycle::MAX_WORKERS;
use crate::proto::ListenerInfo;

/// The file that says whether the kernel migrates a closed listener's queue.
pub const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// What [`Reuseport::handed`] gives: the lines, the backlog, each slot's sockets.
pub type Handed<'a> = (
    &'a [(String, SocketAddr)],
    u32,
    &'a BTreeMap<u32, Vec<Listener>>,
);

/// Every slot's sockets.
#[derive(Debug)]
pub struct Reuseport {
    /// Per `listen` line, in order: its name and the address each slot's
    /// socket binds (the port the first socket got when the line said 0).
    lines: Vec<(String, SocketAddr)>,
    backlog: u32,
    /// Each slot's sockets, one per line, in order.
    slots: BTreeMap<u32, Vec<Listener>>,
}

impl Reuseport {
    /// Binds the sockets of `slots` for every line of `listen` (TCP only:
    /// the config refuses `unix:` lines with `dispatch = reuseport`).
    ///
    /// # Errors
    /// A socket could not be bound (the address and name in the message).
    pub fn bind(
        listen: &[Listen],
        backlog: u32,
        slots: impl IntoIterator<Item = u32>,
    ) -> io::Result<Reuseport> {
        let mut lines = Vec::with_capacity(listen.len());
        for l in listen {
            match &l.addr {
                ListenAddr::Tcp(addr) => lines.push((l.name.clone(), *addr)),
                ListenAddr::Unix(path) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "cannot listen on unix:{} ({}): dispatch = reuseport takes TCP \
                             listeners only",
                            path.display(),
                            l.name
                        ),
                    ));
                }
            }
        }
        let mut pool = Reuseport {
            lines,
            backlog,
            slots: BTreeMap::new(),
        };
        for slot in slots {
            pool.add(slot)?;
        }
        Ok(pool)
    }

    /// Binds `slot`'s sockets. The first socket of a `:0` line fixes the
    /// port every later one binds.
    fn add(&mut self, slot: u32) -> io::Result<()> {
        let mut sockets = Vec::with_capacity(self.lines.len());
        for (name, addr) in &mut self.lines {
            let l = listen::bind_reuseport(name, *addr, self.backlog)?;
            if addr.port() == 0 {
                *addr = l.address.parse().map_err(|_| {
                    io::Error::other(format!(
                        "{name}: cannot read the bound address {}",
                        l.address
                    ))
                })?;
            }
            sockets.push(l);
        }
        self.slots.insert(slot, sockets);
        Ok(())
    }

    /// The sockets of `slot`, if it has them.
    pub fn slot(&self, slot: u32) -> Option<&[Listener]> {
        self.slots.get(&slot).map(Vec::as_slice)
    }

    /// One entry per `listen` line (every slot's socket has that address).
    pub fn infos(&self) -> Vec<ListenerInfo> {
        self.lines
            .iter()
            .map(|(name, addr)| ListenerInfo {
                name: name.clone(),
                address: addr.to_string(),
            })
            .collect()
    }

    /// The `listen` lines, name and address as bound.
    pub fn lines(&self) -> &[(String, SocketAddr)] {
        &self.lines
    }

    /// The slots that have sockets.
    pub fn slot_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.keys().copied()
    }

    /// Gives the slots in `wanted` their sockets and closes those of every
    /// other slot. Returns whether anything changed, and the slots whose
    /// sockets could not be bound (with the error).
    pub fn sync(&mut self, wanted: &BTreeSet<u32>) -> (bool, Vec<(u32, io::Error)>) {
        let gone: Vec<u32> = self
            .slots
            .keys()
            .filter(|s| !wanted.contains(s))
            .copied()
            .collect();
        let mut changed = !gone.is_empty();
        for slot in gone {
            self.slots.remove(&slot);
        }
        let mut failed = Vec::new();
        for &slot in wanted {
            if !self.slots.contains_key(&slot) {
                match self.add(slot) {
                    Ok(()) => changed = true,
                    Err(e) => failed.push((slot, e)),
                }
            }
        }
        (changed, failed)
    }

    /// What an upgrade hands over: the lines, the backlog and each slot's
    /// sockets.
    pub fn handed(&self) -> Handed<'_> {
        (&self.lines, self.backlog, &self.slots)
    }

    /// The sockets an earlier image handed over (`clusterctl upgrade`).
    pub fn taken_over(
        lines: Vec<(String, SocketAddr)>,
        backlog: u32,
        slots: BTreeMap<u32, Vec<Listener>>,
    ) -> Reuseport {
        Reuseport {
            lines,
            backlog,
            slots,
        }
    }

    /// Every slot's sockets (for `empty_pool`).
    pub fn all(&self) -> impl Iterator<Item = &Listener> {
        self.slots.values().flatten()
    }
}

/// Binds the sockets of slots `1..=config.worker_count()` and logs them
/// (`listening`, once per line) and whether a scale-down can lose what is
/// queued (`reuseport.no_migrate`).
///
/// # Errors
/// A socket could not be bound.
pub fn start(config: &Config) -> io::Result<Reuseport> {
    let slots = config.worker_count().clamp(1, MAX_WORKERS);
    let pool = Reuseport::bind(&config.listen, config.backlog, 1..=slots)?;
    for (name, addr) in pool.lines() {
        crate::log!(info, "listening", name = name, addr = addr, sockets = slots);
    }
    match migrate_req() {
        Some(true) => {}
        Some(false) => crate::log!(
            warn,
            "reuseport.no_migrate",
            reason = "net.ipv4.tcp_migrate_req is 0: scaling down resets the connections \
                      queued on the removed workers' sockets; set it to 1 to move them to \
                      the other workers"
        ),
        None => crate::log!(
            warn,
            "reuseport.no_migrate",
            reason = "this kernel cannot move queued connections between sockets (Linux \
                      5.14+ can): scaling down resets the connections queued on the removed \
                      workers' sockets"
        ),
    }
    Ok(pool)
}

/// Whether the kernel migrates the queue of a closed `SO_REUSEPORT`
/// listener to another one of its group: `None` when it cannot (no such
/// setting: Linux before 5.14).
pub fn migrate_req() -> Option<bool> {
    let text = std::fs::read_to_string(MIGRATE_REQ).ok()?;
    Some(text.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn tcp(name: &str, addr: &str) -> Listen {
        Listen {
            name: name.into(),
            addr: ListenAddr::Tcp(addr.parse().unwrap()),
        }
    }

    fn inode(l: &Listener) -> u64 {
        rustix::fs::fstat(l.fd.as_fd()).unwrap().st_ino
    }

    #[test]
    fn every_slot_gets_its_own_socket_on_the_port_the_first_one_got() {
        let listen = [tcp("http", "127.0.0.1:0"), tcp("v6", "[::1]:0")];
        let mut pool = Reuseport::bind(&listen, 16, 1..=3).unwrap();
        let infos = pool.infos();
        assert_eq!(infos.len(), 2);
        assert!(!infos[0].address.ends_with(":0"), "{infos:?}");
        assert!(infos[1].address.starts_with("[::1]:"), "{infos:?}");
        let mut seen = BTreeSet::new();
        for slot in 1..=3 {
            let sockets = pool.slot(slot).unwrap();
            assert_eq!(sockets.len(), 2);
            for (s, info) in sockets.iter().zip(&infos) {
                assert_eq!(s.address, info.address);
                assert_eq!(s.name, info.name);
                assert!(seen.insert(inode(s)), "slot {slot} shares a socket");
            }
        }
        // Scaling: 3 -> 1 closes slots 2 and 3; 1 -> 2 binds slot 2 anew
        // on the same port; slot 1 keeps its socket throughout.
        let first = inode(&pool.slot(1).unwrap()[0]);
        let (changed, failed) = pool.sync(&BTreeSet::from([1]));
        assert!(changed && failed.is_empty());
        assert!(pool.slot(2).is_none() && pool.slot(3).is_none());
        let (changed, failed) = pool.sync(&BTreeSet::from([1, 2]));
        assert!(changed && failed.is_empty());
        assert_eq!(pool.slot(2).unwrap()[0].address, infos[0].address);
        assert_eq!(inode(&pool.slot(1).unwrap()[0]), first);
        assert!(!pool.sync(&BTreeSet::from([1, 2])).0);
        assert_eq!(pool.all().count(), 4);
    }

    #[test]
    fn a_port_held_without_reuseport_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = Reuseport::bind(&[tcp("api", &addr)], 16, 1..=2).unwrap_err();
        let err = err.to_string();
        assert!(err.contains(&addr) && err.contains("(api)"), "{err}");
    }

    #[test]
    fn a_unix_listener_is_refused() {
        let listen = [Listen {
            name: "http".into(),
            addr: ListenAddr::Unix("/tmp/x.sock".into()),
        }];
        let err = Reuseport::bind(&listen, 16, 1..=2).unwrap_err().to_string();
        assert!(err.contains("TCP listeners only"), "{err}");
    }
}
