//! Worker log capture (`log_capture = on`, the default): each worker's
//! stdout and stderr are pipes clusterd owns, and every line a worker
//! writes is passed on whole, as one `worker.output` event line tagged with
//! the worker's id, pid, generation and stream:
//!
//! ```text
//! 2025-11-21T09:34:56.789Z info worker.output id=2 pid=812 generation=1 stream=stderr line="GET /cart 200"
//! ```
//!
//! A worker never writes to clusterd's own stderr, so a dead reader there
//! cannot kill it with SIGPIPE: clusterd's writes fail with EPIPE (ignored)
//! and it keeps draining the pipes.
//!
//! # Implementation
//!
//! [`pipes`] makes the two pipes before the fork; the worker gets the write
//! ends as fds 1 and 2 and clusterd keeps the read ends ([`Capture`]). A task
//! on the daemon's executor per stream waits until its pipe is readable,
//! reads at most [`BUDGET`] bytes, writes the complete lines and yields, so
//! one chatty worker neither starves the loop nor makes clusterd buffer its
//! output: what clusterd has not read stays in the pipe, and a worker that
//! writes faster than that blocks in `write` (the pipe throttles it).
//! Memory per stream is the unfinished line, at most [`MAX_LINE`] bytes: a
//! longer line is passed on in pieces of that size, each with `part=N`, and
//! every piece but the last with `more=1`. A line is cut at a character
//! boundary; bytes that are not UTF-8 become U+FFFD.
//!
//! The task reads until end of file, when the worker and every process that
//! inherited its stdout/stderr have closed them; the unfinished last line is
//! then passed on too. When clusterd reaps a worker it first reads what its
//! pipes still hold ([`Capture::drain`]), so a worker's last words come
//! before the line that reports its exit.
//!
//! Every line goes through [`Record`], so other formats (JSON Lines), a log
//! file or an in-memory ring for `clusterctl logs` can take records from
//! the one place where they are made ([`Stream::emit`]).

use std::cell::{Cell, RefCell};
use std::fmt::Display;
use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::SystemTime;

use smol::{Async, LocalExecutor};

use crate::proto::LogEntry;

/// The event of a captured line.
pub const EVENT: &str = "worker.output";

/// The longest line passed on in one piece, in bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// The most bytes read from one pipe before the task yields to the loop.
pub const BUDGET: usize = 64 * 1024;

/// The most bytes read from a reaped worker's pipe by [`Capture::drain`]
/// (the task reads the rest).
const DRAIN_BUDGET: usize = 256 * 1024;

/// One read.
const READ_CHUNK: usize = 16 * 1024;

/// Which of the worker's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        })
    }
}

/// Who wrote a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The worker's id (its slot).
    pub id: u32,
    pub pid: u32,
    pub generation: u64,
}

/// One captured line (or piece of a long one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub tag: Tag,
    pub stream: StreamKind,
    /// The text, without its newline.
    pub text: &'a str,
    /// For a piece of a line longer than [`MAX_LINE`]: its number (from 1)
    /// and whether another piece follows.
    pub part: Option<(u32, bool)>,
}

impl Record<'_> {
    /// The record as a log entry: a `worker.output` event.
    pub fn entry(&self, now: SystemTime) -> LogEntry {
        let t = &self.tag;
        let mut fields = vec![
            ("id".to_string(), t.id.to_string()),
            ("pid".to_string(), t.pid.to_string()),
            ("generation".to_string(), t.generation.to_string()),
            ("stream".to_string(), self.stream.to_string()),
        ];
        if let Some((part, more)) = self.part {
            fields.push(("part".into(), part.to_string()));
            if more {
                fields.push(("more".into(), "1".into()));
            }
        }
        fields.push(("line".into(), self.text.to_string()));
        LogEntry {
            ts_ms: now
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            level: "info".into(),
            event: EVENT.into(),
            fields,
        }
    }

    /// The record as a `log_format = text` event line (no newline).
    pub fn text_line(&self, now: SystemTime) -> String {
        super::logsink::text_line(&self.entry(now))
    }
}

/// Takes each line (or piece) [`Lines`] cuts: its text, and for a piece
/// its number and whether another follows.
pub type LineSink<'a> = dyn FnMut(&str, Option<(u32, bool)>) + 'a;

/// Cuts a byte stream into lines and pieces of at most [`MAX_LINE`] bytes
/// (pure: the pipes feed it).
#[derive(Debug, Default)]
pub struct Lines {
    /// The unfinished line.
    partial: Vec<u8>,
    /// Pieces of the current line already passed on.
    parts: u32,
}

impl Lines {
    /// Feeds `bytes`; calls `out(text, part)` for every complete line or
    /// piece, in order.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut LineSink<'_>) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            match bytes[..bytes.len().min(room + 1)]
                .iter()
                .position(|&b| b == b'\n')
            {
                Some(nl) => {
                    self.partial.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    self.line(out);
                }
                None if bytes.len() <= room => {
                    self.partial.extend_from_slice(bytes);
                    bytes = &[];
                }
                None => {
                    self.partial.extend_from_slice(&bytes[..room]);
                    bytes = &bytes[room..];
                    self.piece(out);
                }
            }
        }
    }

    /// End of file: passes on the unfinished line, if any.
    pub fn finish(&mut self, out: &mut LineSink<'_>) {
        if !self.partial.is_empty() || self.parts > 0 {
            self.line(out);
        }
    }

    /// The bytes held (at most [`MAX_LINE`]).
    pub fn held(&self) -> usize {
        self.partial.len()
    }

    /// `partial` is a whole line.
    fn line(&mut self, out: &mut LineSink<'_>) {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        let part = (self.parts > 0).then_some((self.parts + 1, false));
        out(&String::from_utf8_lossy(&self.partial), part);
        self.partial.clear();
        self.parts = 0;
    }

    /// `partial` is full: passes on a piece, cut before a character whose
    /// bytes are not all there yet.
    fn piece(&mut self, out: &mut LineSink<'_>) {
        let full = self.partial.len();
        let last_start = (full.saturating_sub(4)..full)
            .rev()
            .find(|&i| self.partial[i] & 0xC0 != 0x80);
        let cut = match last_start {
            Some(start) if start > 0 => {
                let len = match self.partial[start] {
                    0xC0..=0xDF => 2,
                    0xE0..=0xEF => 3,
                    0xF0..=0xF7 => 4,
                    _ => 1,
                };
                if start + len > full { start } else { full }
            }
            _ => full,
        };
        self.parts += 1;
        out(
            &String::from_utf8_lossy(&self.partial[..cut]),
            Some((self.parts, true)),
        );
        self.partial.drain(..cut);
    }
}

/// clusterd's ends of a worker's output pipes.
#[derive(Debug)]
pub struct Pipes {
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Pipes {
    /// Pipes an earlier image of clusterd read (`clusterctl upgrade`).
    pub fn taken_over(stdout: OwnedFd, stderr: OwnedFd) -> Pipes {
        Pipes { stdout, stderr }
    }
}

/// The worker's ends: they become its fds 1 and 2.
#[derive(Debug)]
pub struct ChildEnds {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The two pipes of a worker to be spawned, if `capture` is on.
///
/// # Errors
/// A pipe could not be created (fds exhausted).
pub fn pipes(capture: bool) -> io::Result<Option<(Pipes, ChildEnds)>> {
    if !capture {
        return Ok(None);
    }
    let flags = rustix::pipe::PipeFlags::CLOEXEC;
    let (out_r, out_w) = rustix::pipe::pipe_with(flags)?;
    let (err_r, err_w) = rustix::pipe::pipe_with(flags)?;
    Ok(Some((
        Pipes {
            stdout: out_r,
            stderr: err_r,
        },
        ChildEnds {
            stdout: out_w,
            stderr: err_w,
        },
    )))
}

/// One captured stream of one worker.
#[derive(Debug)]
struct Stream {
    pipe: Async<OwnedFd>,
    tag: Tag,
    kind: StreamKind,
    lines: RefCell<Lines>,
    /// End of file was read (or the pipe failed): nothing more comes.
    done: Cell<bool>,
}

impl Stream {
    /// Reads what the pipe holds now, up to `budget` bytes, and passes on
    /// its complete lines. Returns whether the stream is done.
    fn pump(&self, budget: usize) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        let mut read = 0;
        while read < budget && !self.done.get() {
            match rustix::io::read(self.pipe.get_ref(), &mut buf) {
                Ok(0) => self.finish(),
                Ok(n) => {
                    read += n;
                    let mut out = Vec::new();
                    self.lines
                        .borrow_mut()
                        .push(&buf[..n], &mut |text, part| self.emit(&mut out, text, part));
                    self.write_out(&out);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => self.finish(),
            }
        }
        self.done.get()
    }

    fn finish(&self) {
        self.done.set(true);
        let mut out = Vec::new();
        self.lines
            .borrow_mut()
            .finish(&mut |text, part| self.emit(&mut out, text, part));
        self.write_out(&out);
    }

    /// Where every record goes: appended to `out` as a log entry.
    fn emit(&self, out: &mut Vec<LogEntry>, text: &str, part: Option<(u32, bool)>) {
        let record = Record {
            tag: self.tag,
            stream: self.kind,
            text,
            part,
        };
        out.push(record.entry(SystemTime::now()));
    }

    /// Writes captured lines in one write, through the log sink (format,
    /// `log_file`, `clusterctl logs`). A failure (EPIPE: the reader is gone)
    /// is ignored: the lines are dropped, the pipes still drained.
    fn write_out(&self, entries: &[LogEntry]) {
        let stderr_of = (self.kind == StreamKind::Stderr).then_some(self.tag.pid);
        super::logsink::write(entries, stderr_of);
    }
}

/// A worker's captured stdout and stderr, read by tasks of their own.
#[derive(Debug)]
pub struct Capture {
    streams: [Rc<Stream>; 2],
}

impl Capture {
    /// Starts reading `pipes` for the worker `tag`, on `ex`.
    ///
    /// # Errors
    /// A pipe could not be registered with the reactor.
    pub fn start(ex: &LocalExecutor<'static>, pipes: Pipes, tag: Tag) -> io::Result<Capture> {
        let stream = |fd, kind| -> io::Result<Rc<Stream>> {
            Ok(Rc::new(Stream {
                pipe: Async::new(fd)?,
                tag,
                kind,
                lines: RefCell::default(),
                done: Cell::new(false),
            }))
        };
        let streams = [
            stream(pipes.stdout, StreamKind::Stdout)?,
            stream(pipes.stderr, StreamKind::Stderr)?,
        ];
        for s in &streams {
            ex.spawn(read(s.clone())).detach();
        }
        Ok(Capture { streams })
    }

    /// The stdout and stderr pipes, to hand over (`clusterctl upgrade`).
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd as _;
        [
            self.streams[0].pipe.get_ref().as_fd(),
            self.streams[1].pipe.get_ref().as_fd(),
        ]
    }

    /// Passes on what the pipes hold now (bounded): called when the worker
    /// is reaped, so that its last lines come before its exit.
    pub fn drain(&self) {
        for s in &self.streams {
            s.pump(DRAIN_BUDGET);
        }
    }
}

/// Reads one stream until end of file.
async fn read(stream: Rc<Stream>) {
    while !stream.done.get() {
        if stream.pipe.readable().await.is_err() {
            stream.finish();
            break;
        }
        if stream.pump(BUDGET) {
            break;
        }
        smol::future::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn split(chunks: &[&[u8]], eof: bool) -> Vec<(String, Option<(u32, bool)>)> {
        let mut lines = Lines::default();
        let mut got = Vec::new();
        for chunk in chunks {
            lines.push(chunk, &mut |t, p| got.push((t.to_string(), p)));
            assert!(lines.held() <= MAX_LINE);
        }
        if eof {
            lines.finish(&mut |t, p| got.push((t.to_string(), p)));
        }
        got
    }

    fn whole(text: &str) -> (String, Option<(u32, bool)>) {
        (text.to_string(), None)
    }

    #[test]
    fn lines_come_whole_however_the_bytes_are_cut() {
        let text = b"one\ntwo\r\n\nthree\nfour";
        let expected = [whole("one"), whole("two"), whole(""), whole("three")];
        for cut in 0..text.len() {
            let got = split(&[&text[..cut], &text[cut..]], false);
            assert_eq!(got, expected, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(split(&bytewise, false), expected);
        // At end of file the unfinished line comes too.
        let mut with_last = expected.to_vec();
        with_last.push(whole("four"));
        assert_eq!(split(&[text], true), with_last);
        assert_eq!(split(&[b"a\n"], true), [whole("a")]);
        assert_eq!(split(&[], true), []);
    }

    #[test]
    fn a_long_line_is_split_into_marked_pieces() {
        let long = vec![b'x'; 2 * MAX_LINE + 10];
        let mut text = long.clone();
        text.extend_from_slice(b"\nnext\n");
        for chunks in [vec![&text[..]], text.chunks(1000).collect()] {
            let got = split(&chunks, false);
            assert_eq!(
                got.len(),
                4,
                "{:?}",
                got.iter().map(|g| g.1).collect::<Vec<_>>()
            );
            assert_eq!(got[0].0.len(), MAX_LINE);
            assert_eq!(got[0].1, Some((1, true)));
            assert_eq!(got[1].0.len(), MAX_LINE);
            assert_eq!(got[1].1, Some((2, true)));
            assert_eq!(got[2], ("x".repeat(10), Some((3, false))));
            assert_eq!(got[3], whole("next"));
        }
        // Exactly MAX_LINE bytes and a newline: one line.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(split(&[&exact], false), [whole(&"y".repeat(MAX_LINE))]);
        // A long last line without a newline at end of file.
        let got = split(&[&long[..MAX_LINE + 1]], true);
        assert_eq!(got[1], ("x".to_string(), Some((2, false))));
    }

    #[test]
    fn pieces_are_cut_between_characters() {
        // 'é' is 2 bytes, '€' 3: no cut falls inside one.
        for pad in 0..4 {
            let mut text = "a".repeat(pad);
            while text.len() < 3 * MAX_LINE {
                text.push_str("é€");
            }
            text.push('\n');
            let got = split(&[text.as_bytes()], false);
            let joined: String = got.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(joined, text.trim_end(), "pad {pad}");
            assert!(got.iter().all(|(t, _)| !t.contains('\u{fffd}')));
            assert!(got.iter().all(|(t, _)| t.len() <= MAX_LINE));
        }
        // Not UTF-8 at all: cut at the bound, shown as U+FFFD.
        let got = split(&[&vec![0xff; MAX_LINE + 1]], true);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.chars().count(), MAX_LINE);
    }

    #[test]
    fn records_are_event_lines_that_parse_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_763_717_696_789);
        let tag = Tag {
            id: 2,
            pid: 812,
            generation: 3,
        };
        let record = Record {
            tag,
            stream: StreamKind::Stderr,
            text: "GET /cart \"200\"\u{1b}[2J",
            part: None,
        };
        let line = record.text_line(t);
        assert_eq!(
            line,
            r#"2025-11-21T09:34:56.789Z info worker.output id=2 pid=812 generation=3 stream=stderr line="GET /cart \"200\"\u{1b}[2J""#
        );
        let parsed = super::super::log::Line::parse(&line).unwrap();
        assert_eq!(parsed.get("line"), Some(record.text));
        let piece = Record {
            part: Some((2, true)),
            stream: StreamKind::Stdout,
            ..record
        };
        let parsed = super::super::log::Line::parse(&piece.text_line(t)).unwrap();
        assert_eq!(parsed.get("stream"), Some("stdout"));
        assert_eq!(parsed.num("part"), Some(2));
        assert_eq!(parsed.num("more"), Some(1));
        let last = Record {
            part: Some((3, false)),
            ..record
        };
        assert!(!last.text_line(t).contains("more="));
    }
}
