#!/usr/bin/env python3
"""The shop on Python's standard library (http.server), as a clusterd worker
with `protocol = systemd`. Loses no request across rolling restarts.

    exec = python3 server.py
    protocol = systemd
    listen = 127.0.0.1:8000

- The listener is fd 3 (LISTEN_FDS); READY=1 goes to $NOTIFY_SOCKET once
  the server is set up.
- A thread per connection; responses are HTTP/1.0 style (the connection
  closes after each one), so no idle keep-alive connection can be closed
  under a request on its way.
- SIGTERM: stop accepting (connections still queued are served by the
  other workers), finish the requests in flight (non-daemon threads, joined
  by server_close), exit 0: exiting is DRAINED.

Alone (no LISTEN_FDS) it binds 127.0.0.1:8000.
"""

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Shop(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/products/") and self.path[10:].isdigit():
            self.reply(200, {"id": int(self.path[10:]), "name": "Teapot"})
        elif self.path == "/healthz":
            self.reply(200, "ok")
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path != "/checkout":
            return self.reply(404, {"error": "not found"})
        time.sleep(0.05)  # the payment provider's round trip
        self.reply(200, {"status": "confirmed", "worker": os.getpid()})

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # no access log


class Server(ThreadingHTTPServer):
    # Requests in flight finish before the process exits: server_close()
    # joins their threads.
    daemon_threads = False


def listener():
    """clusterd's listener (fd 3), or a socket of our own when run alone."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return socket.socket(fileno=3)
    return socket.create_server(("127.0.0.1", 8000))


def notify(message):
    """sd_notify: one datagram to $NOTIFY_SOCKET ("@name" is abstract)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


def main():
    server = Server(("", 0), Shop, bind_and_activate=False)
    server.socket.close()
    server.socket = listener()

    # serve_forever() returns at its next poll once shutdown() is called
    # (from another thread: shutdown waits for it).
    def drain(*_):
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    notify("READY=1")
    server.serve_forever(poll_interval=0.1)
    server.server_close()  # closes our copy of the listener, joins requests


if __name__ == "__main__":
    main()
