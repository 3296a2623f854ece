"""The shop as an ASGI app served by uvicorn, as a clusterd worker with
`protocol = systemd`. Loses no request across rolling restarts.

    exec = python3 app.py
    protocol = systemd
    listen = 127.0.0.1:8000
    ready_after = 1s

uvicorn never reports READY, so the config needs `ready_after` (with the
plain CLI, `uvicorn app:app --fd 3`, too). Its own graceful shutdown closes
idle keep-alive connections at once, racing a request that is already on
its way (clients retry a GET, never a POST): this program runs uvicorn from
Python so that SIGTERM first stops accepting and, for a grace period,
answers every request with `Connection: close` (so each busy connection
closes after its next response), and only then starts uvicorn's shutdown,
which closes the connections that stayed idle through the grace and waits
for the requests in flight. Exit 0 is DRAINED.

Alone (no LISTEN_FDS) it binds 127.0.0.1:8000.
"""

import asyncio
import json
import os
import socket

import uvicorn

# How long, once draining, busy keep-alive connections get to come back for
# a last request (answered with Connection: close) before uvicorn closes the
# idle ones.
DRAIN_GRACE = 1.0


async def shop(scope, receive, send):
    """The app: GET /products/:id, POST /checkout, GET /healthz."""
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if method == "GET" and path.startswith("/products/") and path[10:].isdigit():
        status, payload = 200, {"id": int(path[10:]), "name": "Teapot"}
    elif method == "POST" and path == "/checkout":
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.05)  # the payment provider's round trip
        status, payload = 200, {"status": "confirmed", "worker": os.getpid()}
    elif path == "/healthz":
        status, payload = 200, "ok"
    else:
        status, payload = 404, {"error": "not found"}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    """uvicorn, with a lossless start to its graceful shutdown."""

    draining = False

    def handle_exit(self, sig, frame):
        if self.draining:
            return  # already draining; clusterd sends SIGKILL at drain_timeout
        self.draining = True
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(self.begin_drain, loop)

    def begin_drain(self, loop):
        # Stop accepting: the other workers take the queue. Not with
        # asyncio's Server.close(): a connection accepted in this turn of the
        # loop gets its transport in a task that runs after this callback,
        # and on a closed server that task fails (Server._attach asserts) and
        # drops the connection unanswered. uvicorn's own shutdown closes the
        # servers after the grace.
        for server in self.servers:
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
        loop.call_later(DRAIN_GRACE, setattr, self, "should_exit", True)


def app_for(server):
    """`shop`, with Connection: close on every response once draining."""
    async def app(scope, receive, send):
        async def send_closing(message):
            if message["type"] == "http.response.start" and server.draining:
                headers = list(message.get("headers", []))
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)
        await shop(scope, receive, send_closing)
    return app


def main():
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        sock = socket.socket(fileno=3)  # clusterd's listener
    else:
        sock = socket.create_server(("127.0.0.1", 8000))
    # loop="asyncio": begin_drain relies on asyncio's selector loop.
    config = uvicorn.Config(app=None, loop="asyncio", lifespan="off", access_log=False,
                            log_level="warning")
    server = DrainingServer(config)
    config.app = app_for(server)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
