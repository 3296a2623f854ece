//! BENCHMARKS.md: machine facts, the summary of targets, each section, the issue's
//! comparison figures.

use std::fmt::Write as _;
use std::time::Duration;

use super::machine::{Machine, loadavg};
use super::{Check, Section, Table, mark};

/// Everything the report needs besides the sections.
pub struct Run<'a> {
    pub machine: &'a Machine,
    pub quick: bool,
    /// The command line as run.
    pub command: String,
    /// The build command the suite ran first, if it did.
    pub build: Option<String>,
    pub took: Duration,
    /// Sections not run (`--only`).
    pub skipped: Vec<&'static str>,
}

pub fn markdown(run: &Run<'_>, sections: &[Section]) -> String {
    let m = run.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# clusterd benchmarks\n");
    if run.quick {
        let _ = writeln!(
            out,
            "> **Quick smoke run (`--quick`)**: short runs and few repetitions. These figures \
             show that the suite works, not how fast clusterd is.\n"
        );
    }
    let _ = writeln!(
        out,
        "Measured on {} by the benchmark suite in `bench/src/bin/bench.rs`, in {:.0} s \
         (after the build). \
         Everything runs on this one machine over 127.0.0.1: the load generator \
         (`clusterd_bench`, the library behind `loadgen`) competes with the servers for the \
         same CPUs.\n",
        m.date,
        run.took.as_secs_f64()
    );
    let _ = writeln!(out, "## How to reproduce\n");
    let _ = writeln!(
        out,
        "```sh\ncargo run --release -p clusterd-bench --bin bench              # {:.0} minutes after the build in this run; writes BENCHMARKS.md\n\
         cargo run --release -p clusterd-bench --bin bench -- --quick   # a 1-2 minute smoke run\n```\n",
        (run.took.as_secs_f64() / 60.0).ceil()
    );
    let _ = writeln!(out, "This report: `{}`.", run.command);
    if let Some(build) = &run.build {
        let _ = writeln!(out, "The suite first ran `{build}`.");
    }
    if !run.skipped.is_empty() {
        let _ = writeln!(
            out,
            "Sections not run (`--only`): {}.",
            run.skipped.join(", ")
        );
    }
    let _ = writeln!(out, "\n## Machine\n");
    let mut facts = Table::new(&["", ""]);
    let cpus = if m.available == m.cores {
        format!("{} × {}", m.cores, m.cpu)
    } else {
        format!(
            "{} × {} ({} available to the suite)",
            m.cores, m.cpu, m.available
        )
    };
    for (k, v) in [
        ("CPU", cpus),
        ("memory", m.memory.clone()),
        ("kernel", m.kernel.clone()),
        ("rustc", m.rustc.clone()),
        ("commit", m.commit.clone()),
        ("date", m.date.clone()),
        (
            "load average (1, 5, 15 min)",
            format!("{} before, {} after", m.load_before, loadavg()),
        ),
    ] {
        facts.rows.push(vec![k.to_string(), v]);
    }
    out.push_str(&facts.markdown());

    let _ = writeln!(out, "\n## Targets\n");
    let mut summary = Table::new(&["section", "measure", "target", "measured", ""]);
    let mut missed: Vec<&Check> = Vec::new();
    let mut unmeasured: Vec<&Check> = Vec::new();
    for s in sections {
        for c in &s.checks {
            match c.pass {
                Some(false) => missed.push(c),
                None => unmeasured.push(c),
                Some(true) => {}
            }
            summary.rows.push(vec![
                s.title.clone(),
                c.what.clone(),
                c.target.clone(),
                c.measured.clone(),
                mark(c.pass).to_string(),
            ]);
        }
    }
    out.push_str(&summary.markdown());
    let met = sections
        .iter()
        .flat_map(|s| &s.checks)
        .filter(|c| c.pass == Some(true))
        .count();
    let _ = writeln!(
        out,
        "\n{met} targets met, {} missed, {} not measured.",
        missed.len(),
        unmeasured.len()
    );
    if !missed.is_empty() {
        let _ = writeln!(out, "\nMissed:\n");
        for c in &missed {
            let _ = writeln!(out, "- {}: {} (target {})", c.what, c.measured, c.target);
        }
        let notes: Vec<&str> = WHY
            .iter()
            .filter(|(prefix, _)| missed.iter().any(|c| c.what.starts_with(prefix)))
            .map(|(_, why)| *why)
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\nWhat limits them, as far as we know:\n");
            for why in notes {
                let _ = writeln!(out, "- {why}");
            }
        }
    }
    let errors: Vec<(&str, &String)> = sections
        .iter()
        .flat_map(|s| s.errors.iter().map(move |e| (s.title.as_str(), e)))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nSteps that failed (their rows are marked):\n");
        for (section, e) in errors {
            let first = e.lines().next().unwrap_or_default();
            let _ = writeln!(out, "- {section}: {first}");
        }
    }

    for s in sections {
        let _ = writeln!(out, "\n## {}\n", s.title);
        out.push_str(&s.body);
        if !s.errors.is_empty() {
            let _ = writeln!(out, "\n**Failed steps in this section:**\n");
            for e in &s.errors {
                let _ = writeln!(out, "```text\n{}\n```", e.trim_end());
            }
        }
        let _ = writeln!(out, "\n_Section time: {}._", super::fmt_secs(s.took));
    }

    let _ = writeln!(
        out,
        "\n## For comparison (reported in the issue, not measured here)\n"
    );
    let _ = writeln!(
        out,
        "The same shop routes on a 2-core machine, `wrk -c64`, 20 s of load with 5 rolling \
         restarts, as reported in issue 4; these programs were not run by this suite:\n"
    );
    let mut cmp = Table::new(&["", "figure"]);
    for (what, figure) in [
        (
            "Node `cluster` (Black Friday tutorial design): keep-alive GETs lost",
            "19,394 (and refused connections while its port was briefly closed)",
        ),
        (
            "PM2 cluster `reload`: requests lost",
            "418 (413 with `wait_ready`)",
        ),
        ("gunicorn: requests lost", "0"),
        ("PM2 daemon memory", "56 MiB"),
        ("`pm2 jlist` round trip", "154 ms"),
        ("gunicorn master memory", "24 MiB, wakes every second"),
        (
            "crashed worker serving again",
            "29 ms (gunicorn) to 172 ms (PM2)",
        ),
    ] {
        cmp.rows.push(vec![what.to_string(), figure.to_string()]);
    }
    out.push_str(&cmp.markdown());
    out
}

/// What is known to limit a missed target, by the start of the check's name.
const WHY: &[(&str, &str)] = &[
    (
        "throughput, 1 worker vs bare",
        "**Overhead.** The worker accepts straight from the kernel's queue and serves \
         without clusterd on the request path, and the shop runs the same library code \
         bare. The per-round ranges (*runs (min-max)*) overlap: the load generator's two \
         threads compete with the server for the same 2 CPUs, and the cheapest route \
         (`/products/1`, a few microseconds a request) is the noisiest. A small cost on the \
         cheapest route is not ruled out; separating it from the noise needs the load \
         generator on other CPUs than the server.",
    ),
    (
        "balance max/min",
        "**Balance.** With keep-alive, a worker serves the connections it accepted when the \
         load began for the whole run. The scoreboard splits them evenly (a worker past its \
         fair share leaves a new connection to a sibling holding fewer), so what remains is how much CPU each \
         worker gets next to the load generator's threads on the same 2 CPUs: the scheduler, \
         not the accept loop. Compare the rows with the scoreboard off.",
    ),
    (
        "RSS, 2 workers",
        "**RSS, dynamic build.** clusterd itself writes about 0.4 MiB (`RssAnon`); the rest \
         is resident pages of mapped files, named in the row: glibc's `libc.so.6` alone is \
         about 1.4 MiB of it, pages every process on the machine that uses glibc shares \
         (the PSS figure charges clusterd its share only), then the binary's own code and \
         the dynamic loader. The kernel maps file pages in 64 KiB blocks around each one \
         touched (fault-around), so a program that calls into libc at all has most of it \
         resident. A glibc-linked binary cannot get under 2 MiB this way; the static build \
         (what the scratch image runs: no libc.so, no loader) meets the target, see its \
         row.",
    ),
];
