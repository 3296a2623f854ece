//! What a worker costs in memory, for `max_memory`.
//!
//! The measure is the PSS (proportional set size) of the worker and of
//! every process below it, plus their swapped-out share (`SwapPss`), from
//! `/proc/PID/smaps_rollup`: private pages count in full, pages shared with
//! other processes (the program's text, copy-on-write pages of a preloading
//! master) only in part. So a worker is not charged for what its siblings
//! share with it, and a leak, which is private, counts byte for byte.
//!
//! # Implementation
//!
//! Descendants are found through `/proc/PID/task/TID/children` (the kernel
//! keeps the list; no scan of `/proc`), at most [`MAX_PROCESSES`] of them.
//! A process that exits between two reads is skipped.

use std::fs;

/// Processes measured per worker at most (a fork bomb stops the walk, not
/// clusterd).
pub const MAX_PROCESSES: usize = 256;

/// The memory of `pid` and its descendants, in bytes; `None` when `pid`
/// itself cannot be read (gone).
pub fn worker_bytes(pid: u32) -> Option<u64> {
    let mut total = process_bytes(pid)?;
    let mut queue = children(pid);
    let mut seen = 1;
    while let Some(child) = queue.pop() {
        if seen >= MAX_PROCESSES {
            break;
        }
        seen += 1;
        total += process_bytes(child).unwrap_or(0);
        queue.extend(children(child));
    }
    Some(total)
}

/// `Pss` + `SwapPss` of one process, in bytes.
fn process_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(parse_rollup(&text))
}

/// The sum of the `Pss:` and `SwapPss:` lines (kB) of a `smaps_rollup`, in
/// bytes.
fn parse_rollup(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            matches!(key, "Pss" | "SwapPss").then_some(rest)
        })
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_and_swap_pss_are_summed() {
        let text = "00400000-7fff [rollup]\nRss:    2000 kB\nPss:    1500 kB\n\
                    Pss_Anon:  700 kB\nSwap: 40 kB\nSwapPss: 20 kB\nLocked: 0 kB\n";
        assert_eq!(parse_rollup(text), 1520 * 1024);
        assert_eq!(parse_rollup("garbage"), 0);
    }

    #[test]
    fn a_live_process_is_measured_and_a_gone_one_is_none() {
        assert!(worker_bytes(std::process::id()).expect("readable") > 0);
        assert_eq!(worker_bytes(u32::MAX), None);
    }
}
