//! A blocking control connection: one request, then the responses until
//! clusterd closes the connection.

use clusterd::proto::{self, FRAME_HEADER, MAX_RESPONSE, Request, Response};
use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How a response could not be read.
#[derive(Debug)]
pub enum RecvError {
    /// The socket failed, or timed out (`WouldBlock`/`TimedOut`).
    Io(io::Error),
    /// clusterd closed the connection in the middle of a frame.
    Truncated,
    /// The bytes are not a response this clusterctl understands.
    Protocol(proto::Error),
}

/// One connection to clusterd.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
}

impl Conn {
    /// Connects to the socket at `path`, giving up after `timeout`.
    ///
    /// A unix `connect` only waits when the listener's backlog is full (a
    /// clusterd that is alive but stuck); std has no connect timeout for unix
    /// sockets, so the connect runs on a helper thread that is abandoned if it
    /// does not finish in time.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Conn> {
        let (tx, rx) = mpsc::channel();
        let target = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(UnixStream::connect(target));
        });
        let stream = match rx.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting timed out after {} s", timeout.as_secs()),
                ));
            }
        };
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream })
    }

    /// The uid of the process that serves the socket (`SO_PEERCRED`, as
    /// the kernel recorded it when it listened).
    pub fn peer_uid(&self) -> io::Result<u32> {
        Ok(rustix::net::sockopt::socket_peercred(&self.stream)?
            .uid
            .as_raw())
    }

    /// The pid of the process serving the socket (it listened on it; an
    /// upgrade of clusterd keeps it, a new clusterd has another).
    pub fn peer_pid(&self) -> io::Result<u32> {
        Ok(rustix::net::sockopt::socket_peercred(&self.stream)?
            .pid
            .as_raw_nonzero()
            .get() as u32)
    }

    /// How long one read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Sends the request frame.
    pub fn send(&mut self, request: &Request) -> io::Result<()> {
        self.stream.write_all(&proto::frame(request))
    }

    /// Reads the next response; `Ok(None)` when clusterd closed the
    /// connection between frames.
    pub fn recv(&mut self) -> Result<Option<Response>, RecvError> {
        let mut header = [0u8; FRAME_HEADER];
        let mut got = 0;
        while got < FRAME_HEADER {
            match self.stream.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(RecvError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
        let len = proto::frame_len(header, MAX_RESPONSE).map_err(RecvError::Protocol)?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => RecvError::Truncated,
                _ => RecvError::Io(e),
            })?;
        proto::decode(&body, MAX_RESPONSE)
            .map(Some)
            .map_err(RecvError::Protocol)
    }
}
