//! The man pages (`man/clusterd.8`, `man/clusterctl.1`, `man/clusterd.conf.5`)
//! and the README, checked against the code so that they cannot drift.
//!
//! Each page must render with `groff -man -ww` without a warning. Then the
//! page is rendered to plain text, as `man -l` shows it, and what the code
//! defines must be there: every config key (`config::KEYS`), every option and
//! command of `clusterd --help` and `clusterctl --help`, their exit codes,
//! the signals of DESIGN.md, every event the daemon logs and every metric it
//! exports. Needs groff (Debian: `groff-base`) and the built binaries
//! (`cargo build --workspace --bins`).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::{bin_dir, clusterd_bin};

/// The signals of DESIGN.md's "Signals to clusterd" table (the contract lives
/// outside the repository, so its list is copied here).
const DESIGN_SIGNALS: &[&str] = &["TERM", "INT", "QUIT", "HUP", "USR1", "TTIN", "TTOU", "CHLD"];

/// The pages.
const PAGES: &[&str] = &["clusterd.8", "clusterctl.1", "clusterd.conf.5"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn page_path(name: &str) -> PathBuf {
    repo().join("man").join(name)
}

/// Runs groff on `page` with `args`; fails with a hint when groff is missing.
fn groff(args: &[&str], page: &Path) -> Output {
    assert!(page.exists(), "{} is missing", page.display());
    match Command::new("groff")
        .args(args)
        .arg(page)
        .env("GROFF_NO_SGR", "1")
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "groff is not installed, so the man pages cannot be checked: \
             install groff-base (apt-get install groff-base) or groff"
        ),
        Err(e) => panic!("cannot run groff: {e}"),
    }
}

/// Terminal output as plain text, as `col -b` makes it: overstrikes
/// (`c\bc`, `_\bc`) and SGR escape sequences removed.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if chars.peek() == Some(&'\u{8}') {
            chars.next(); // the overstruck character and its backspace go
        } else {
            out.push(c);
        }
    }
    out
}

/// A man page rendered to text.
struct Page {
    name: &'static str,
    text: String,
}

impl Page {
    /// Renders `man/NAME` as plain ASCII text, without hyphenation (so that
    /// names are never split across lines).
    fn render(name: &'static str) -> Page {
        let out = groff(&["-man", "-Tascii", "-rHY=0"], &page_path(name));
        assert!(
            out.status.success(),
            "groff failed on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = plain(&String::from_utf8_lossy(&out.stdout));
        assert!(text.contains("NAME"), "{name} rendered to nothing:\n{text}");
        Page { name, text }
    }

    /// The section titles (unindented all-capital lines), in order.
    fn sections(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter(|l| is_section_title(l))
            .map(str::trim_end)
            .collect()
    }

    /// The text of section `title`, up to the next section.
    fn section(&self, title: &str) -> String {
        let mut lines = self.text.lines().skip_while(|l| l.trim_end() != title);
        assert!(
            lines.next().is_some(),
            "{} has no {title} section; its sections: {:?}",
            self.name,
            self.sections()
        );
        let body: Vec<&str> = lines.take_while(|l| !is_section_title(l)).collect();
        body.join("\n")
    }

    /// The tag lines of section `title`, each split into words: the lines
    /// at the body's indentation (where `.TP` tags start, and paragraphs;
    /// descriptions and nested entries are indented further, `.SS` titles
    /// less).
    fn tags(&self, title: &str) -> Vec<Vec<String>> {
        let body = self
            .section("NAME")
            .lines()
            .find(|l| !l.trim().is_empty())
            .map_or(7, indent);
        self.section(title)
            .lines()
            .filter(|l| !l.trim().is_empty() && indent(l) == body)
            .map(words)
            .collect()
    }

    /// Whether some tag line of section `title` has the word `word`.
    fn has_tag(&self, title: &str, word: &str) -> bool {
        self.tags(title)
            .iter()
            .any(|tag| tag.iter().any(|w| w == word))
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_section_title(line: &str) -> bool {
    let line = line.trim_end();
    !line.is_empty()
        && !line.starts_with(' ')
        && line.chars().all(|c| c.is_ascii_uppercase() || c == ' ')
}

/// The words of a line: split at whitespace and commas, with surrounding
/// brackets and punctuation removed; `name{labels}` counts as `name`.
fn words(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .map(|w| w.trim_matches(|c: char| "()[]:.".contains(c)))
        .map(|w| w.split('{').next().unwrap_or(w))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Runs a built binary with `--help`.
fn help(program: &Path) -> String {
    assert!(
        program.exists(),
        "{} is missing: build it first (cargo build --workspace --bins)",
        program.display()
    );
    let out = Command::new(program)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(out.status.success(), "{} --help failed", program.display());
    String::from_utf8(out.stdout).expect("--help prints UTF-8")
}

/// The lines of `help` after the line `heading` (such as `Options:`), up to
/// the next blank line.
fn help_block<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = help.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "no {heading} in:\n{help}");
    lines.take_while(|l| !l.trim().is_empty()).collect()
}

/// Every option of a `--help` text: `-c`, `--config`, ...
fn help_options(help: &str) -> Vec<String> {
    let mut options = Vec::new();
    for line in help_block(help, "Options:") {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue; // a description's second line
        }
        // The option column ends at the first run of two spaces.
        let spec = line.split("  ").next().unwrap_or(line);
        options.extend(
            spec.split([',', ' '])
                .filter(|w| w.starts_with('-'))
                .map(str::to_owned),
        );
    }
    assert!(!options.is_empty(), "no options found in:\n{help}");
    options
}

/// The paragraph of `help` that starts with `label` (such as `Signals:`).
fn help_paragraph(help: &str, label: &str) -> String {
    let start = help
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{help}"));
    let rest = &help[start + label.len()..];
    rest.split("\n\n").next().unwrap_or(rest).to_owned()
}

/// The exit codes a `--help` text lists under `Exit status:`.
fn help_exit_codes(help: &str) -> Vec<String> {
    help_paragraph(help, "Exit status:")
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
        .collect()
}

/// A source file of the crate.
fn source(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The events `log!(LEVEL, "EVENT", ...)` emits in the daemon's sources.
fn logged_events() -> BTreeSet<String> {
    let dir = repo().join("src/daemon");
    let mut events = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/daemon") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for (at, _) in text.match_indices("log!(") {
            let rest = text[at + "log!(".len()..].trim_start();
            let Some(level_end) = rest.find(|c: char| !c.is_ascii_lowercase()) else {
                continue;
            };
            if !["info", "warn", "error"].contains(&&rest[..level_end]) {
                continue; // the macro's own definition
            }
            let rest = rest[level_end..].trim_start();
            let Some(rest) = rest.strip_prefix(',').map(str::trim_start) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            if let Some(end) = rest.find('"') {
                events.insert(rest[..end].to_owned());
            }
        }
    }
    events
}

/// The metric names `src/daemon/metrics.rs` writes (`clusterd_...`).
fn exported_metrics() -> BTreeSet<String> {
    let text = source("src/daemon/metrics.rs");
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("clusterd_") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn every_page_renders_without_warnings() {
    for name in PAGES {
        let out = groff(&["-man", "-Tutf8", "-ww"], &page_path(name));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "groff -man -Tutf8 -ww man/{name}: {} with warnings:\n{stderr}",
            out.status
        );
        assert!(!out.stdout.is_empty(), "man/{name} rendered to nothing");
    }
}

#[test]
fn every_page_has_its_sections_and_refers_to_the_others() {
    let common = ["NAME", "SYNOPSIS", "DESCRIPTION", "EXAMPLES", "SEE ALSO"];
    let specific: [(&str, &[&str]); 3] = [
        (
            "clusterd.8",
            &[
                "OPTIONS",
                "THE WORKER PROTOCOLS",
                "ROLLING RESTART",
                "CRASHES AND BACKOFF",
                "SIGNALS",
                "LOGGING",
                "METRICS",
                "EXIT STATUS",
                "FILES",
                "ENVIRONMENT",
            ],
        ),
        (
            "clusterctl.1",
            &[
                "OPTIONS",
                "COMMANDS",
                "SOCKET SELECTION",
                "EXIT STATUS",
                "ENVIRONMENT",
            ],
        ),
        ("clusterd.conf.5", &["KEYS", "DURATIONS", "RELOADING"]),
    ];
    for (name, sections) in specific {
        let page = Page::render(name);
        let found = page.sections();
        for title in common.iter().chain(sections) {
            assert!(
                found.contains(title),
                "{name} has no {title} section; its sections: {found:?}"
            );
        }
        let see_also = page.section("SEE ALSO");
        let (stem, number) = name.rsplit_once('.').expect("NAME.N");
        let own = format!("{stem}({number})");
        for other in ["clusterd(8)", "clusterctl(1)", "clusterd.conf(5)"] {
            assert!(
                other == own || see_also.contains(other),
                "{name}: SEE ALSO does not name {other}"
            );
        }
    }
}

#[test]
fn clusterd_conf_5_documents_every_config_key_in_order() {
    let page = Page::render("clusterd.conf.5");
    // Each key has its entry, `KEY = VALUE`, in the order of KEYS.
    let tags = page.tags("KEYS");
    let entries: Vec<&str> = tags
        .iter()
        .filter(|tag| tag.get(1).is_some_and(|w| w == "="))
        .map(|tag| tag[0].as_str())
        .collect();
    for key in clusterd::config::KEYS {
        assert!(
            entries.contains(key),
            "clusterd.conf.5 has no entry \"{key} = ...\" under KEYS; entries: {entries:?}"
        );
    }
    let known: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| clusterd::config::KEYS.contains(e))
        .collect();
    assert_eq!(
        known,
        clusterd::config::KEYS,
        "clusterd.conf.5 lists the keys in another order than config::KEYS"
    );
    let unknown: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| !clusterd::config::KEYS.contains(e))
        .collect();
    assert!(
        unknown.is_empty(),
        "clusterd.conf.5 documents unknown keys {unknown:?}"
    );
}

#[test]
fn readme_mentions_every_config_key() {
    let readme = source("README.md");
    for key in clusterd::config::KEYS {
        assert!(
            readme.contains(&format!("`{key}`")),
            "README.md does not mention the config key `{key}`"
        );
    }
    for page in PAGES {
        assert!(
            readme.contains(&format!("man/{page}")),
            "README.md does not point to man/{page}"
        );
    }
}

#[test]
fn clusterctl_1_documents_every_command_option_and_exit_code() {
    let help = help(&bin_dir().join("clusterctl"));
    let page = Page::render("clusterctl.1");
    let synopsis = words(&page.section("SYNOPSIS"));

    // One command a line; a description's further lines are indented more.
    let block = help_block(&help, "Commands:");
    let first = block.iter().map(|l| indent(l)).min().unwrap_or(0);
    let commands: Vec<&str> = block.into_iter().filter(|l| indent(l) == first).collect();
    assert!(
        commands.len() >= 4,
        "commands in clusterctl --help: {commands:?}"
    );
    for line in commands {
        let line = line.trim_start();
        let spec = line.split("  ").next().unwrap_or(line);
        let mut spec_words = spec.split_whitespace();
        let command = spec_words.next().expect("a command");
        // `N|+N|-N` is three arguments; `[--worker ID]` is two (optional).
        let arguments: Vec<&str> = spec_words
            .flat_map(|w| w.split('|'))
            .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
            .collect();
        let tag = page
            .tags("COMMANDS")
            .into_iter()
            .find(|tag| tag.first().is_some_and(|w| w == command))
            .unwrap_or_else(|| panic!("clusterctl.1 has no entry for the command {command}"));
        for argument in arguments {
            assert!(
                tag.iter().any(|w| w == argument),
                "clusterctl.1: the {command} entry does not show its argument {argument}: {tag:?}"
            );
        }
        assert!(
            synopsis.iter().any(|w| w == command),
            "clusterctl.1: SYNOPSIS does not show {command}"
        );
    }

    for option in help_options(&help) {
        assert!(
            page.has_tag("OPTIONS", &option),
            "clusterctl.1 does not document the option {option} under OPTIONS"
        );
    }

    let codes = help_exit_codes(&help);
    assert_eq!(
        codes,
        ["0", "1", "2", "3"],
        "exit codes in clusterctl --help"
    );
    for code in codes {
        assert!(
            page.has_tag("EXIT STATUS", &code),
            "clusterctl.1 does not document exit status {code}"
        );
    }
}

#[test]
fn clusterd_8_documents_every_option_signal_and_exit_code() {
    let help = help(&clusterd_bin());
    let page = Page::render("clusterd.8");

    for option in help_options(&help) {
        assert!(
            page.has_tag("OPTIONS", &option),
            "clusterd.8 does not document the option {option} under OPTIONS"
        );
    }

    // The signals of the contract, and those `clusterd --help` names.
    let mut signals: BTreeSet<String> = DESIGN_SIGNALS.iter().map(|s| s.to_string()).collect();
    let named = help_paragraph(&help, "Signals:");
    signals.extend(
        named
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| w.len() >= 2 && w.bytes().all(|b| b.is_ascii_uppercase()))
            .map(str::to_owned),
    );
    for signal in &signals {
        assert!(
            page.has_tag("SIGNALS", &format!("SIG{signal}")),
            "clusterd.8 does not document SIG{signal} under SIGNALS"
        );
    }

    let codes = help_exit_codes(&help);
    assert_eq!(codes, ["0", "1", "2"], "exit codes in clusterd --help");
    for code in codes {
        assert!(
            page.has_tag("EXIT STATUS", &code),
            "clusterd.8 does not document exit status {code}"
        );
    }
}

#[test]
fn clusterd_8_documents_every_log_event_and_metric() {
    let page = Page::render("clusterd.8");

    let events = logged_events();
    assert!(events.len() > 30, "too few log events found: {events:?}");
    let undocumented: Vec<&String> = events
        .iter()
        .filter(|e| !page.has_tag("LOGGING", e))
        .collect();
    assert!(
        undocumented.is_empty(),
        "clusterd.8 does not document these log events under LOGGING: {undocumented:?}"
    );

    let metrics = exported_metrics();
    assert!(metrics.len() >= 10, "too few metrics found: {metrics:?}");
    let undocumented: Vec<&String> = metrics
        .iter()
        .filter(|m| !page.has_tag("METRICS", m))
        .collect();
    assert!(
        undocumented.is_empty(),
        "clusterd.8 does not document these metrics under METRICS: {undocumented:?}"
    );
}
