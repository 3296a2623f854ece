//! `TestServer`: a small threaded HTTP/1.1 server on 127.0.0.1:0 whose every answer is chosen
//! by the test, including the misbehaviour (hang, close, truncate) the load tool must classify.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

/// A request as the server read it.
#[derive(Debug)]
pub struct Req {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target.
    pub path: String,
    /// The body (by Content-Length).
    pub body: Vec<u8>,
    /// The client sent `Connection: close`.
    pub close: bool,
    /// Index of this request on its connection, from 0.
    pub on_conn: u64,
    /// Index of this request over the whole server, from 0.
    pub n: u64,
}

/// What the server does with a request.
#[derive(Debug)]
pub enum Reply {
    /// A well-formed response with `Content-Length`; with `Connection: close` (and the
    /// connection closed after it) when `close` is set or the client asked.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        close: bool,
    },
    /// These bytes as they are; then close the connection if `close`, else read the next
    /// request.
    Raw { bytes: Vec<u8>, close: bool },
    /// Close without answering.
    Close,
    /// Never answer; keep reading until the client goes away.
    Hang,
}

impl Reply {
    /// A response with this status, an empty body and nothing else.
    pub fn status(status: u16) -> Reply {
        Reply::Respond {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
        }
    }

    /// A 200 response with an `X-Worker` header and a short body.
    pub fn from_worker(worker: impl ToString) -> Reply {
        Reply::Respond {
            status: 200,
            headers: vec![("X-Worker", worker.to_string())],
            body: b"hello".to_vec(),
            close: false,
        }
    }
}

/// The server; stops accepting when dropped (connections in progress end when their client
/// goes away).
pub struct TestServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server that answers each request with `handler(&request)`.
    pub fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let accept = {
            let (requests, connections, stop) =
                (requests.clone(), connections.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (requests, handler) = (requests.clone(), handler.clone());
                    thread::spawn(move || serve(stream, &requests, &*handler));
                }
            })
        };
        TestServer {
            addr,
            requests,
            connections,
            stop,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Serves one connection until it ends.
fn serve(stream: TcpStream, requests: &AtomicU64, handler: &(dyn Fn(&Req) -> Reply + Send + Sync)) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for on_conn in 0.. {
        let Some((method, path, body, close)) = read_request(&mut reader) else {
            return;
        };
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let req = Req {
            method,
            path,
            body,
            close,
            on_conn,
            n,
        };
        let (bytes, close) = match handler(&req) {
            Reply::Respond {
                status,
                headers,
                body,
                close,
            } => {
                let close = close || req.close;
                let mut head = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                if close {
                    head.push_str("Connection: close\r\n");
                }
                head.push_str("\r\n");
                ([head.into_bytes(), body].concat(), close)
            }
            Reply::Raw { bytes, close } => (bytes, close),
            Reply::Close => return,
            Reply::Hang => {
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return;
            }
        };
        if writer.write_all(&bytes).is_err() || close {
            return;
        }
    }
}

/// Reads one request: method, target, body, whether it asked for `Connection: close`. `None`
/// at EOF or on anything malformed.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut length = 0;
    let mut close = false;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    Some((method, path, body, close))
}
