//! A minimal HTTP/1.1 client: just enough to load-test our own servers, but correct about
//! framing, since a framing mistake would show up as a false reset or a false success.
//!
//! Requests are written in one `write`. Responses are read with [`read_response`], which works on
//! any [`BufRead`] so that framing is unit-tested on byte slices: status line and headers
//! (names case-insensitive, size-capped), interim `1xx` responses skipped, the body framed by
//! `Transfer-Encoding: chunked`, `Content-Length`, or the end of the connection (RFC 9112 §6.3),
//! and `Connection: close` (or HTTP/1.0 without keep-alive) honoured.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest status line, header line or chunk-size line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted in one response head.
const MAX_HEADERS: usize = 256;
/// Largest body [`get`] keeps in memory.
const MAX_BODY: u64 = 64 * 1024 * 1024;
/// Timeout of [`get`].
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// The request method. Only what the benchmarks need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`: idempotent, so it may be retried when a reused connection turns out closed.
    Get,
    /// `POST` with [`Spec::body`](crate::Spec::body): never retried.
    Post,
}

impl Method {
    /// The method's name as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// A response read by [`get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 200.
    pub status: u16,
    /// Header fields in the order received, names as sent by the server.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a new connection (`Connection: close`) and reads the whole response.
/// For tests: `get(addr, "/healthz")?.status == 200`. Times out after 10 s.
///
/// # Errors
///
/// A non-loopback `addr` or a bad `path` (`InvalidInput`), a connect or I/O error, a timeout
/// (`TimedOut`), a malformed response (`InvalidData`), or the connection ending before the
/// response does (`UnexpectedEof`). A non-2xx status is not an error.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    crate::spec::check_loopback(addr)?;
    crate::spec::check_path(path)?;
    let deadline = Instant::now() + GET_TIMEOUT;
    let stream = TcpStream::connect_timeout(&addr, GET_TIMEOUT)?;
    stream.set_nodelay(true)?;
    let mut conn = BufReader::new(Timed { stream, deadline });
    conn.get_mut()
        .write_all(&request_bytes(Method::Get, addr, path, b"", true))?;
    let mut headers = Vec::new();
    let mut body = Vec::new();
    let parsed = read_response(
        &mut conn,
        &mut Sink::Keep {
            headers: &mut headers,
            body: &mut body,
        },
    )
    .map_err(|e| e.error)?;
    Ok(Response {
        status: parsed.status,
        headers,
        body,
    })
}

/// The bytes of one request, head and body, ready for a single `write_all`.
pub(crate) fn request_bytes(
    method: Method,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut req = format!("{} {path} HTTP/1.1\r\nHost: {addr}\r\n", method.as_str());
    if close {
        req.push_str("Connection: close\r\n");
    }
    if method == Method::Post {
        // What a browser or an API client says of a JSON body; frameworks
        // (Express, Fastify) parse it only then.
        if body.first().is_some_and(|b| matches!(b, b'{' | b'[')) {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A TCP stream whose every read and write must finish by `deadline`.
///
/// Each call sets the socket timeout to the time left, so a server that trickles bytes cannot
/// stretch a request past its deadline. A timed-out call fails with `TimedOut` (std reports a
/// socket timeout as `WouldBlock` on Unix).
#[derive(Debug)]
pub(crate) struct Timed {
    /// The connection.
    pub(crate) stream: TcpStream,
    /// When the current request times out.
    pub(crate) deadline: Instant,
}

impl Timed {
    /// Time left before the deadline, or a `TimedOut` error.
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(timed_out())
        } else {
            Ok(left)
        }
    }
}

/// The error of a read or write that missed its deadline.
fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// Turns std's `WouldBlock` (a socket timeout) into `TimedOut`.
fn map_timeout<T>(r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => timed_out(),
        _ => e,
    })
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        map_timeout(self.stream.read(buf))
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        map_timeout(self.stream.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where [`read_response`] puts what the caller wants to keep.
pub(crate) enum Sink<'a> {
    /// Load generation: keep only the `X-Worker` value and discard the body.
    Discard,
    /// [`get`]: keep every header and the body.
    Keep {
        /// Filled with the header fields.
        headers: &'a mut Vec<(String, String)>,
        /// Filled with the de-chunked body.
        body: &'a mut Vec<u8>,
    },
}

/// What [`read_response`] learnt from a complete response.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The final (non-1xx) status code.
    pub(crate) status: u16,
    /// The `X-Worker` header value, if any.
    pub(crate) worker: Option<String>,
    /// The server will close the connection after this response: it said `Connection: close`,
    /// it is HTTP/1.0 without keep-alive, or the body ran to the end of the connection.
    pub(crate) close: bool,
    /// The server announced the close with `Connection: close`, so its FIN is on the way.
    pub(crate) announced_close: bool,
}

/// A failed [`read_response`].
#[derive(Debug)]
pub(crate) struct ReadError {
    /// The cause: `UnexpectedEof` when the connection ended early, `InvalidData` when the
    /// response is malformed, or the I/O error.
    pub(crate) error: io::Error,
    /// At least one byte of the response had arrived.
    pub(crate) started: bool,
}

/// Reads one complete response (skipping interim 1xx responses) from `r`.
///
/// # Errors
///
/// See [`ReadError`].
pub(crate) fn read_response<R: BufRead>(
    r: &mut R,
    sink: &mut Sink<'_>,
) -> Result<Parsed, ReadError> {
    // Nothing at all from the server is told apart from a partial response: on a reused
    // connection it is the idle-close race that a GET may retry (see `load`).
    match r.fill_buf() {
        Ok([]) => {
            return Err(ReadError {
                error: eof("connection closed before the response"),
                started: false,
            });
        }
        Ok(_) => {}
        Err(error) => {
            return Err(ReadError {
                error,
                started: false,
            });
        }
    }
    read_started(r, sink).map_err(|error| ReadError {
        error,
        started: true,
    })
}

/// [`read_response`] once the first byte has arrived.
fn read_started<R: BufRead>(r: &mut R, sink: &mut Sink<'_>) -> io::Result<Parsed> {
    let mut line = Vec::with_capacity(256);
    loop {
        let head = read_head(r, &mut line, sink)?;
        // 1xx responses are interim (RFC 9110 §15.2): the final response follows. 101 would
        // switch protocols, which we never ask for, so it ends the exchange.
        if (100..200).contains(&head.status) && head.status != 101 {
            if let Sink::Keep { headers, .. } = sink {
                headers.clear();
            }
            continue;
        }
        let close_delimited = read_body(r, &head, &mut line, sink)?;
        let close = head.status == 101
            || close_delimited
            || head.connection_close
            || (head.http10 && !head.connection_keep_alive);
        return Ok(Parsed {
            status: head.status,
            worker: head.worker,
            close,
            announced_close: head.connection_close,
        });
    }
}

/// The parts of a response head that matter to us.
#[derive(Debug, Default)]
struct Head {
    /// Status code.
    status: u16,
    /// The response is HTTP/1.0 (keep-alive only when asked for).
    http10: bool,
    /// `Content-Length`, if present.
    content_length: Option<u64>,
    /// `Transfer-Encoding`'s last coding is `chunked`.
    chunked: bool,
    /// `Transfer-Encoding` is present (chunked or not).
    transfer_encoding: bool,
    /// `Connection` has the `close` option.
    connection_close: bool,
    /// `Connection` has the `keep-alive` option.
    connection_keep_alive: bool,
    /// `X-Worker` value.
    worker: Option<String>,
}

/// Reads a status line and header fields up to the blank line.
fn read_head<R: BufRead>(r: &mut R, line: &mut Vec<u8>, sink: &mut Sink<'_>) -> io::Result<Head> {
    read_line(r, line)?;
    let mut head = parse_status_line(line)?;
    for n in 0.. {
        read_line(r, line)?;
        if line.is_empty() {
            return Ok(head);
        }
        if n == MAX_HEADERS {
            return Err(bad("too many header fields"));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("obsolete header line folding"));
        }
        let text = std::str::from_utf8(line).map_err(|_| bad("header field is not UTF-8"))?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| bad("header field without a colon"))?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ') {
            return Err(bad("malformed header field name"));
        }
        let value = value.trim_matches([' ', '\t']);
        parse_header(&mut head, name, value)?;
        if let Sink::Keep { headers, .. } = sink {
            headers.push((name.to_string(), value.to_string()));
        }
    }
    unreachable!()
}

/// Parses `HTTP/1.x SSS reason`.
fn parse_status_line(line: &[u8]) -> io::Result<Head> {
    let bad_line = || {
        bad(&format!(
            "bad status line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(bad_line)?;
    let (&minor, rest) = rest.split_first().ok_or_else(bad_line)?;
    let http10 = match minor {
        b'0' => true,
        b'1' => false,
        _ => return Err(bad_line()),
    };
    let code = match rest {
        [b' ', a, b, c] | [b' ', a, b, c, b' ', ..] => [*a, *b, *c],
        _ => return Err(bad_line()),
    };
    if !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
        return Err(bad_line());
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    Ok(Head {
        status,
        http10,
        ..Head::default()
    })
}

/// Records what one header field means for framing, connection reuse or worker counts.
fn parse_header(head: &mut Head, name: &str, value: &str) -> io::Result<()> {
    if name.eq_ignore_ascii_case("content-length") {
        // A repeated Content-Length must agree (RFC 9112 §6.3).
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("bad Content-Length"));
            }
            let n: u64 = part.parse().map_err(|_| bad("bad Content-Length"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(bad("conflicting Content-Length values"));
            }
            head.content_length = Some(n);
        }
    } else if name.eq_ignore_ascii_case("transfer-encoding") {
        head.transfer_encoding = true;
        // Only the last coding decides whether the body is chunked.
        head.chunked = value
            .rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
    } else if name.eq_ignore_ascii_case("connection") {
        for option in value.split(',').map(str::trim) {
            head.connection_close |= option.eq_ignore_ascii_case("close");
            head.connection_keep_alive |= option.eq_ignore_ascii_case("keep-alive");
        }
    } else if name.eq_ignore_ascii_case("x-worker") {
        head.worker = Some(value.to_string());
    }
    Ok(())
}

/// Reads (and keeps or discards) the body framed as `head` says. Returns whether the body was
/// delimited by the end of the connection.
fn read_body<R: BufRead>(
    r: &mut R,
    head: &Head,
    line: &mut Vec<u8>,
    sink: &mut Sink<'_>,
) -> io::Result<bool> {
    // RFC 9112 §6.3, in order. We only send GET and POST, so no HEAD or CONNECT cases.
    if matches!(head.status, 101 | 204 | 304) {
        return Ok(false);
    }
    if head.transfer_encoding {
        if !head.chunked {
            copy_body(r, sink, None)?;
            return Ok(true);
        }
        read_chunked(r, line, sink)?;
        return Ok(false);
    }
    match head.content_length {
        Some(n) => {
            copy_body(r, sink, Some(n))?;
            Ok(false)
        }
        None => {
            copy_body(r, sink, None)?;
            Ok(true)
        }
    }
}

/// Reads a chunked body, chunk extensions and trailer fields ignored.
fn read_chunked<R: BufRead>(r: &mut R, line: &mut Vec<u8>, sink: &mut Sink<'_>) -> io::Result<()> {
    loop {
        read_line(r, line)?;
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && s.len() <= 15)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad("bad chunk size"))?;
        if size == 0 {
            // Trailer section, up to the blank line.
            for _ in 0..=MAX_HEADERS {
                read_line(r, line)?;
                if line.is_empty() {
                    return Ok(());
                }
            }
            return Err(bad("too many trailer fields"));
        }
        copy_body(r, sink, Some(size))?;
        read_line(r, line)?;
        if !line.is_empty() {
            return Err(bad("chunk not followed by CRLF"));
        }
    }
}

/// Copies `len` bytes (or everything up to EOF when `None`) of body to the sink.
fn copy_body<R: BufRead>(r: &mut R, sink: &mut Sink<'_>, len: Option<u64>) -> io::Result<()> {
    let limit = match sink {
        Sink::Discard => u64::MAX,
        Sink::Keep { body, .. } => MAX_BODY.saturating_sub(body.len() as u64),
    };
    if len.is_some_and(|n| n > limit) {
        return Err(bad("response body too large"));
    }
    let want = len.unwrap_or(limit.saturating_add(1));
    let mut taken = r.take(want);
    let copied = match sink {
        Sink::Discard => io::copy(&mut taken, &mut io::sink())?,
        Sink::Keep { body, .. } => io::copy(&mut taken, *body)?,
    };
    match len {
        Some(n) if copied < n => Err(eof("connection closed in the middle of the body")),
        None if copied > limit => Err(bad("response body too large")),
        _ => Ok(()),
    }
}

/// Reads one line ending in LF into `line`, without the CRLF or LF. Fails with
/// `UnexpectedEof` if the connection ends first and `InvalidData` past [`MAX_LINE`].
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> io::Result<()> {
    line.clear();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', line)?;
    if line.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            bad("line too long")
        } else {
            eof("connection closed in the middle of the response")
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(())
}

/// A malformed-response error.
fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {msg}"))
}

/// An early-EOF error.
fn eof(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<(Parsed, Response), ReadError> {
        let mut r = bytes;
        let mut headers = Vec::new();
        let mut body = Vec::new();
        let parsed = read_response(
            &mut r,
            &mut Sink::Keep {
                headers: &mut headers,
                body: &mut body,
            },
        )?;
        assert!(
            r.is_empty(),
            "unread bytes: {:?}",
            String::from_utf8_lossy(r)
        );
        let status = parsed.status;
        Ok((
            parsed,
            Response {
                status,
                headers,
                body,
            },
        ))
    }

    fn err(bytes: &[u8]) -> (io::ErrorKind, bool) {
        let e = parse(bytes).expect_err("should fail");
        (e.error.kind(), e.started)
    }

    #[test]
    fn request_bytes_get_post_close() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            request_bytes(Method::Get, addr, "/a?b=1", b"", false),
            b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
        );
        assert_eq!(
            request_bytes(Method::Post, addr, "/", b"hi", true),
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
        );
        assert_eq!(
            request_bytes(Method::Post, addr, "/", b"{}", false),
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(
            request_bytes(Method::Get, v6, "/", b"", false)
                .starts_with(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n")
        );
    }

    #[test]
    fn content_length_keep_alive_and_two_in_a_row() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 5\r\nX-Worker:  3 \r\n\r\nhelloHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let mut r = &two[..];
        let p = read_response(&mut r, &mut Sink::Discard).unwrap();
        assert_eq!(
            p,
            Parsed {
                status: 200,
                worker: Some("3".into()),
                close: false,
                announced_close: false
            }
        );
        let p = read_response(&mut r, &mut Sink::Discard).unwrap();
        assert_eq!(p.status, 404);
        assert!(r.is_empty());
        let (_, resp) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello").unwrap();
        assert_eq!(resp.text(), "hello");
        assert_eq!(resp.header("CONTENT-length"), Some("5, 5"));
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let (p, resp) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(resp.text(), "hello, world");
        assert!(!p.close);
        // Transfer-Encoding wins over Content-Length.
        let (_, resp) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n").unwrap();
        assert_eq!(resp.text(), "a");
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            (io::ErrorKind::InvalidData, true)
        );
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"),
            (io::ErrorKind::InvalidData, true)
        );
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            (io::ErrorKind::UnexpectedEof, true)
        );
    }

    #[test]
    fn close_delimited_and_connection_options() {
        let (p, resp) = parse(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").unwrap();
        assert_eq!(resp.text(), "until the end");
        assert!(p.close && !p.announced_close);
        let (p, _) =
            parse(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        assert!(p.close && p.announced_close);
        let (p, _) = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(p.close, "HTTP/1.0 closes by default");
        let (p, _) =
            parse(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        assert!(!p.close);
        let (p, resp) = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert!(!p.close && resp.body.is_empty());
        // A non-chunked Transfer-Encoding runs to EOF.
        let (p, resp) = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz").unwrap();
        assert!(p.close);
        assert_eq!(resp.text(), "zz");
    }

    #[test]
    fn interim_responses_are_skipped() {
        let (p, resp) = parse(
            b"HTTP/1.1 100 Continue\r\nX-Worker: 0\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Worker: 7\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(p.status, 201);
        assert_eq!(p.worker.as_deref(), Some("7"));
        assert_eq!(resp.headers.len(), 2);
    }

    #[test]
    fn eof_before_and_during_the_response() {
        assert_eq!(err(b""), (io::ErrorKind::UnexpectedEof, false));
        assert_eq!(err(b"HTTP/1.1 200"), (io::ErrorKind::UnexpectedEof, true));
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"),
            (io::ErrorKind::UnexpectedEof, true)
        );
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            (io::ErrorKind::UnexpectedEof, true)
        );
    }

    #[test]
    fn malformed_responses() {
        for bytes in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"hello\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            assert_eq!(
                err(bytes),
                (io::ErrorKind::InvalidData, true),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [
            b"HTTP/1.1 200 OK\r\nA: ".as_slice(),
            &[b'x'; MAX_LINE],
            b"\r\n\r\n",
        ]
        .concat();
        assert_eq!(err(&long), (io::ErrorKind::InvalidData, true));
        // A bare status line with no reason phrase is fine, and LF-only line ends too.
        let (p, _) = parse(b"HTTP/1.1 503\nContent-Length: 0\n\n").unwrap();
        assert_eq!(p.status, 503);
    }
}
