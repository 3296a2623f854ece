//! `dispatch = clusterd`: which worker gets a connection (pure).
//!
//! clusterd accepts each connection itself, peeks at the request head
//! (without consuming a byte), and hands the connection to one ready worker.
//! This module is the decision, without sockets or clocks:
//!
//! - [`key`]: the session key a request head carries for the configured
//!   [`Sticky`] (a query parameter, a header, a cookie, engine.io's `sid`),
//!   found in at most the bytes peeked. Malformed heads yield no key, never
//!   an error.
//! - [`choose`]: the worker for a connection. A key picks the worker of its
//!   session; a connection without one (or whose worker is gone) goes by
//!   [`Balance`]: the worker holding the fewest connections, or in turn.
//!
//! # Sessions without a shared table
//!
//! Nothing is remembered between connections, so routing survives a
//! restart of clusterd itself:
//!
//! - `sticky = socket.io`: the Node adapter makes engine.io session ids
//!   `<worker id>.<random>`, so the id names the worker that created the
//!   session. A request whose `sid` names a worker id with a ready worker
//!   goes there; otherwise (the worker was drained, crashed, scaled away)
//!   it goes by balance, the worker that gets it answers `400` (unknown
//!   session), and the Socket.IO client reconnects with a new session.
//! - `cookie:`, `header:`, `query:`, `ip`: rendezvous (highest random
//!   weight) hashing of the value over the ids of the ready workers. A
//!   value maps to the same worker id for as long as that id has a ready
//!   worker, whatever clusterd or the workers restarted in between, and
//!   when one id goes only the sessions that were on it move (spread over
//!   the others). The hash is fixed (FNV-1a, then a 64-bit finalizer): a
//!   new version of clusterd maps values the same way.

use crate::config::{Balance, Sticky};

/// The most bytes of a request head clusterd peeks at.
pub const MAX_PEEK: usize = 8 * 1024;

/// A worker that may receive a connection, as [`choose`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The worker id (slot, `CLUSTERD_WORKER_ID`), 1..=N.
    pub slot: u32,
    /// Connections it holds (open, and passed but not yet taken).
    pub load: u64,
}

/// What the session key of a request is, once the head was looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    /// No session: choose by balance.
    None,
    /// The worker id a socket.io `sid` names.
    Worker(u32),
    /// A value to hash (a cookie, header or query value, an address).
    Hash(&'a [u8]),
}

/// Whether `sticky` needs the request head (everything but `ip`).
pub fn needs_head(sticky: Option<&Sticky>) -> bool {
    matches!(
        sticky,
        Some(Sticky::SocketIo | Sticky::Cookie(_) | Sticky::Header(_) | Sticky::Query(_))
    )
}

/// Whether `head` (the bytes peeked so far) holds the whole request head,
/// so that peeking can stop.
pub fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The session key `head` carries for `sticky` (not `ip`: the caller passes
/// the address as [`Key::Hash`] itself). Only complete lines count: a head
/// cut by [`MAX_PEEK`] or by the peek deadline yields what its complete
/// lines hold.
pub fn key<'a>(sticky: &Sticky, head: &'a [u8]) -> Key<'a> {
    let mut lines = head.split(|&b| b == b'\n');
    let Some(request_line) = lines.next() else {
        return Key::None;
    };
    // The request line must be complete (a '\n' followed it).
    if request_line.len() == head.len() {
        return Key::None;
    }
    let found = match sticky {
        Sticky::SocketIo => {
            return query_param(request_line, b"sid")
                .and_then(socket_io_worker)
                .map_or(Key::None, Key::Worker);
        }
        Sticky::Query(name) => query_param(request_line, name.as_bytes()),
        Sticky::Header(name) => header(head, name.as_bytes()),
        Sticky::Cookie(name) => cookie(head, name.as_bytes()),
        Sticky::Ip => None,
    };
    match found {
        Some(v) if !v.is_empty() => Key::Hash(v),
        _ => Key::None,
    }
}

/// The worker id at the start of an engine.io id made by the adapter,
/// `<worker id>.<random>`.
pub fn socket_io_worker(sid: &[u8]) -> Option<u32> {
    let dot = sid.iter().position(|&b| b == b'.')?;
    let digits = &sid[..dot];
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The value of query parameter `name` in an HTTP request line
/// (`GET /path?a=1&sid=x HTTP/1.1`), raw (not percent-decoded).
pub fn query_param<'a>(request_line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut parts = request_line.split(|&b| b == b' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    let query = &target[target.iter().position(|&b| b == b'?')? + 1..];
    let query = query.split(|&b| b == b'#').next().unwrap_or(query);
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (k == name).then_some(v)
    })
}

/// The value of the first header `name` (lower case) in `head`, trimmed.
/// Only complete lines after the request line count, up to the blank line.
pub fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    headers(head).find_map(|(k, v)| k.eq_ignore_ascii_case(name).then_some(v))
}

/// The value of cookie `name` in the `Cookie` headers of `head`.
pub fn cookie<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    headers(head)
        .filter(|(k, _)| k.eq_ignore_ascii_case(b"cookie"))
        .flat_map(|(_, v)| v.split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = trim(pair);
            let i = pair.iter().position(|&b| b == b'=')?;
            let v = trim(&pair[i + 1..]);
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            (trim(&pair[..i]) == name).then_some(v)
        })
}

/// The complete header lines of `head` as `(name, value)`.
fn headers(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    // Complete lines only: drop what follows the last '\n'.
    let end = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    head[..end]
        .split(|&b| b == b'\n')
        .skip(1)
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let i = l.iter().position(|&b| b == b':')?;
            Some((trim(&l[..i]), trim(&l[i + 1..])))
        })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A fixed 64-bit hash of `key` for worker id `slot`: FNV-1a over both,
/// then the murmur3 finalizer (FNV alone mixes the last bytes poorly).
/// Fixed forever: changing it would move every session.
pub fn weight(key: &[u8], slot: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.iter().chain(&slot.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Round-robin state: the worker id chosen last.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    last: u32,
}

/// The index in `candidates` of the worker for a connection with `key`;
/// `None` when there is no candidate. `candidates` holds one entry per
/// worker id (the caller picks the newest ready worker of each id).
pub fn choose(
    candidates: &[Candidate],
    key: &Key<'_>,
    balance: Balance,
    turn: &mut Turn,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    match key {
        Key::Worker(slot) => {
            if let Some(i) = candidates.iter().position(|c| c.slot == *slot) {
                return Some(i);
            }
        }
        Key::Hash(value) => {
            return candidates
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| (weight(value, c.slot), c.slot))
                .map(|(i, _)| i);
        }
        Key::None => {}
    }
    Some(by_balance(candidates, balance, turn))
}

/// The worker for a connection no session ties to one.
fn by_balance(candidates: &[Candidate], balance: Balance, turn: &mut Turn) -> usize {
    let i = match balance {
        // Ties go to the next worker after the last one chosen, so that
        // equally loaded workers take turns (a burst does not all land on
        // the lowest id before its count moves).
        Balance::LeastConnections => {
            let fewest = candidates.iter().map(|c| c.load).min().unwrap_or(0);
            next_after(candidates, turn.last, |c| c.load == fewest)
        }
        Balance::RoundRobin => next_after(candidates, turn.last, |_| true),
    };
    turn.last = candidates[i].slot;
    i
}

/// The candidate with the lowest id above `last` that `ok` accepts, else
/// the lowest such id (wrapping around).
fn next_after(candidates: &[Candidate], last: u32, ok: impl Fn(&Candidate) -> bool) -> usize {
    let eligible = || candidates.iter().enumerate().filter(|(_, c)| ok(c));
    eligible()
        .filter(|(_, c)| c.slot > last)
        .min_by_key(|(_, c)| c.slot)
        .or_else(|| eligible().min_by_key(|(_, c)| c.slot))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(slot: u32, load: u64) -> Candidate {
        Candidate { slot, load }
    }

    const HEAD: &[u8] = b"GET /socket.io/?EIO=4&transport=polling&sid=3.AbC-d_9&t=x HTTP/1.1\r\n\
Host: example.com\r\n\
X-Session:  abc123 \r\n\
Cookie: theme=dark; SID=\"s-42\" ; other=1\r\n\
Cookie: late=2\r\n\
\r\n\
body bytes: Cookie: SID=nope\r\n";

    #[test]
    fn keys_are_found_in_the_head() {
        assert_eq!(key(&Sticky::SocketIo, HEAD), Key::Worker(3));
        assert_eq!(
            key(&Sticky::Query("transport".into()), HEAD),
            Key::Hash(b"polling")
        );
        assert_eq!(key(&Sticky::Query("t".into()), HEAD), Key::Hash(b"x"));
        assert_eq!(key(&Sticky::Query("EIO=4".into()), HEAD), Key::None);
        assert_eq!(
            key(&Sticky::Header("x-session".into()), HEAD),
            Key::Hash(b"abc123")
        );
        assert_eq!(key(&Sticky::Cookie("SID".into()), HEAD), Key::Hash(b"s-42"));
        assert_eq!(key(&Sticky::Cookie("late".into()), HEAD), Key::Hash(b"2"));
        assert_eq!(key(&Sticky::Cookie("sid".into()), HEAD), Key::None);
        assert_eq!(
            key(&Sticky::Cookie("theme".into()), HEAD),
            Key::Hash(b"dark")
        );
        // Bare LF heads, and a query with a fragment.
        let lf = b"GET /?a=1#frag HTTP/1.0\nCookie: a=b\n\n";
        assert_eq!(key(&Sticky::Query("a".into()), lf), Key::Hash(b"1"));
        assert_eq!(key(&Sticky::Cookie("a".into()), lf), Key::Hash(b"b"));
        assert!(head_complete(lf) && head_complete(HEAD));
    }

    #[test]
    fn incomplete_or_hostile_heads_yield_no_key() {
        // The request line is cut: nothing.
        assert_eq!(key(&Sticky::SocketIo, b"GET /?sid=1.x HT"), Key::None);
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        // A header line cut short does not count; complete ones do.
        let cut = b"GET / HTTP/1.1\r\nX-A: 1\r\nX-B: 2";
        assert_eq!(key(&Sticky::Header("x-a".into()), cut), Key::Hash(b"1"));
        assert_eq!(key(&Sticky::Header("x-b".into()), cut), Key::None);
        // Empty values are no key.
        let empty = b"GET /?q= HTTP/1.1\r\nX-A:\r\nCookie: c=\r\n\r\n";
        for s in [
            Sticky::Query("q".into()),
            Sticky::Header("x-a".into()),
            Sticky::Cookie("c".into()),
        ] {
            assert_eq!(key(&s, empty), Key::None, "{s}");
        }
        // sids not made by the adapter.
        for sid in [&b"abc"[..], b".x", b"x.1", b"12345678901.x", b"-1.x", b"1"] {
            assert_eq!(socket_io_worker(sid), None, "{sid:?}");
        }
        assert_eq!(socket_io_worker(b"007.x.y"), Some(7));
        // Garbage of every byte value: no panic.
        let garbage: Vec<u8> = (0..=255u8).cycle().take(MAX_PEEK).collect();
        for s in [
            Sticky::SocketIo,
            Sticky::Query("a".into()),
            Sticky::Header("a".into()),
            Sticky::Cookie("a".into()),
        ] {
            let _ = key(&s, &garbage);
            let _ = key(&s, b"");
            let _ = key(&s, b"\n");
            let _ = key(&s, b"\n\n\n:\n=;\n");
        }
        assert_eq!(key(&Sticky::Ip, HEAD), Key::None);
        assert!(!needs_head(Some(&Sticky::Ip)) && !needs_head(None));
        assert!(needs_head(Some(&Sticky::SocketIo)));
    }

    #[test]
    fn least_connections_with_ties_in_turn() {
        let mut turn = Turn::default();
        let pool = [c(1, 5), c(2, 3), c(3, 3), c(4, 9)];
        let pick = |turn: &mut Turn| {
            pool[choose(&pool, &Key::None, Balance::LeastConnections, turn).unwrap()].slot
        };
        assert_eq!(pick(&mut turn), 2);
        assert_eq!(pick(&mut turn), 3);
        assert_eq!(pick(&mut turn), 2);
        assert_eq!(
            choose(&[], &Key::None, Balance::LeastConnections, &mut turn),
            None
        );
    }

    #[test]
    fn round_robin_takes_every_worker_in_turn_whatever_the_order() {
        let mut turn = Turn::default();
        let pool = [c(3, 0), c(1, 100), c(2, 0)];
        let picks: Vec<u32> = (0..6)
            .map(|_| pool[choose(&pool, &Key::None, Balance::RoundRobin, &mut turn).unwrap()].slot)
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        // A worker gone: the others keep their turns.
        let fewer = [c(3, 0), c(1, 0)];
        let next = choose(&fewer, &Key::None, Balance::RoundRobin, &mut turn).unwrap();
        assert_eq!(fewer[next].slot, 1);
    }

    #[test]
    fn socket_io_sessions_go_to_their_worker_or_by_balance() {
        let mut turn = Turn::default();
        let pool = [c(1, 0), c(2, 7), c(3, 1)];
        let i = choose(&pool, &Key::Worker(2), Balance::LeastConnections, &mut turn);
        assert_eq!(pool[i.unwrap()].slot, 2, "the busiest, but its session");
        // Worker 9 is gone: the least loaded gets it.
        let i = choose(&pool, &Key::Worker(9), Balance::LeastConnections, &mut turn);
        assert_eq!(pool[i.unwrap()].slot, 1);
    }

    #[test]
    fn hashing_is_stable_and_moves_only_the_sessions_of_a_worker_gone() {
        let mut turn = Turn::default();
        let all = [c(1, 0), c(2, 0), c(3, 0), c(4, 0)];
        let keys: Vec<String> = (0..2000).map(|i| format!("session-{i}")).collect();
        let place = |pool: &[Candidate], k: &str, turn: &mut Turn| {
            let i = choose(
                pool,
                &Key::Hash(k.as_bytes()),
                Balance::LeastConnections,
                turn,
            );
            pool[i.unwrap()].slot
        };
        let before: Vec<u32> = keys.iter().map(|k| place(&all, k, &mut turn)).collect();
        // Loads and order do not matter.
        let shuffled = [c(4, 9), c(2, 1), c(3, 0), c(1, 5)];
        for (k, &w) in keys.iter().zip(&before) {
            assert_eq!(place(&shuffled, k, &mut turn), w);
        }
        // Spread roughly evenly.
        for w in 1..=4 {
            let n = before.iter().filter(|&&b| b == w).count();
            assert!((400..600).contains(&n), "worker {w}: {n} of 2000");
        }
        // Worker 3 gone: only its sessions move.
        let without = [c(1, 0), c(2, 0), c(4, 0)];
        for (k, &w) in keys.iter().zip(&before) {
            let now = place(&without, k, &mut turn);
            if w == 3 {
                assert_ne!(now, 3);
            } else {
                assert_eq!(now, w, "{k} moved from {w}");
            }
        }
        // The hash itself is fixed (a new clusterd maps the same way).
        assert_eq!(weight(b"session-1", 1), weight(b"session-1", 1));
        assert_eq!(weight(b"session-1", 3), PINNED);
    }

    /// `weight(b"session-1", 3)` as clusterd computes it, for ever.
    const PINNED: u64 = 13_278_736_362_915_736_416;
}
