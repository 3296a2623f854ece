"""The shop as a WSGI app, run by gunicorn as a clusterd worker with
`protocol = systemd`. Loses no request across rolling restarts.

    exec = gunicorn --preload --workers 2 --no-control-socket app:app
    protocol = systemd
    listen = 127.0.0.1:8000
    drain_timeout = 35s

gunicorn finds the listener itself (LISTEN_FDS; give it no --bind: with
--bind fd://3 as well it takes fd 3 twice and exits) and sends READY=1 to
$NOTIFY_SOCKET; --preload imports the app before that. --no-control-socket
(gunicorn 27 or later): otherwise every clusterd worker's gunicorn master
opens the same control socket path. SIGTERM is gunicorn's graceful
shutdown: the master closes the listener, its sync workers finish the
request in hand (a sync worker closes each connection after its response,
so no idle keep-alive connection is cut under a request) and exit
(--graceful-timeout, 30 s by default: keep drain_timeout above it).
"""

import json
import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    if method == "GET" and path.startswith("/products/") and path[10:].isdigit():
        status, payload = "200 OK", {"id": int(path[10:]), "name": "Teapot"}
    elif method == "POST" and path == "/checkout":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"].read(length)
        time.sleep(0.05)  # the payment provider's round trip
        status, payload = "200 OK", {"status": "confirmed", "worker": os.getpid()}
    elif path == "/healthz":
        status, payload = "200 OK", "ok"
    else:
        status, payload = "404 Not Found", {"error": "not found"}
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]
