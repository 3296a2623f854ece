// node-shop: the shop demo (examples/shop.rs) as a plain Node.js `http`
// server, run by clusterd with `protocol = systemd`. No npm dependencies.
//
// Routes (every response carries `X-Worker: $CLUSTERD_WORKER_ID`, 0 alone):
//
//   GET  /products/:id  {"id":N,"name":"...","price":N.NN} for ids 1..=10000,
//                       a 404 JSON error otherwise
//   POST /checkout      reads the body, waits 50 ms (a payment call), then
//                       {"orderId":"...","status":"confirmed"}
//   GET  /cpu           about 2 ms of CPU work (pricing a large cart), JSON
//   GET  /healthz       ok
//
// Under clusterd (`protocol = systemd`):
//
// - The listeners are fds 3.. (LISTEN_FDS of them, named in LISTEN_FDNAMES);
//   we serve the one named `http` (else fd 3). LISTEN_PID must be our pid:
//   run node itself (`exec = node server.js`), not a wrapper such as `npm
//   start`, whose child would not get the fds.
// - Once listening we write `READY=1\n` to the pipe in CLUSTERD_READY_FD.
//   (Node cannot send the unix datagrams of sd_notify without a native
//   module; clusterd reads this pipe instead.)
// - SIGTERM means drain; exiting means drained. See `drain()`.
//
// Alone (LISTEN_FDS unset) it listens on 127.0.0.1:$PORT (default 3000), so
// development needs no supervisor; Ctrl-C drains the same way.

'use strict';

const fs = require('fs');
const http = require('http');
const net = require('net');

const WORKER_ID = process.env.CLUSTERD_WORKER_ID || '0';

// The simulated payment call of POST /checkout.
const CHECKOUT_IO_MS = 50;
// How big a checkout body may be, and how long it may take to arrive.
const BODY_LIMIT = 64 * 1024;
const BODY_TIMEOUT_MS = 10_000;
// Products 1..=PRODUCTS exist.
const PRODUCTS = 10_000;
// Cart lines priced by GET /cpu: about 2 ms of work.
const CPU_CART_ITEMS = 300_000;

// While draining, how long a keep-alive connection that is idle may still
// deliver a request: an HTTP/1.1 client may already have sent its next
// request when we decide to close, and it cannot tell whether we saw it, so
// it would retry a GET but lose a POST. Under load the next request follows
// the last response within microseconds; it is served (with `Connection:
// close`) instead. The same 500 ms as the Rust library's DRAIN_IDLE_GRACE.
const DRAIN_IDLE_GRACE_MS = 500;
// A drain that has not finished by then gives up (clusterd's drain_timeout
// defaults to 30 s, after which it sends SIGKILL).
const DRAIN_GIVE_UP_MS = 25_000;

// ---------------------------------------------------------------------------
// Routes

const ADJECTIVES = ['Classic', 'Organic', 'Deluxe', 'Compact', 'Vintage', 'Smart', 'Rugged', 'Eco'];
const NOUNS = [
  'Teapot', 'Backpack', 'Desk Lamp', 'Sneakers', 'Headphones',
  'Notebook', 'Umbrella', 'Mug', 'Rain Jacket', 'Watch',
];

let orders = 0;

function route(req, res) {
  const path = req.url.split('?')[0];
  const method = req.method;
  if (path === '/healthz') {
    return method === 'GET' ? send(res, 200, 'ok', 'text/plain; charset=utf-8') : notAllowed(res, 'GET');
  }
  if (path === '/cpu') {
    return method === 'GET' ? cpu(res) : notAllowed(res, 'GET');
  }
  if (path === '/checkout') {
    return method === 'POST' ? checkout(req, res) : notAllowed(res, 'POST');
  }
  if (path.startsWith('/products/')) {
    return method === 'GET' ? product(res, path.slice('/products/'.length)) : notAllowed(res, 'GET');
  }
  return error(res, 404, 'not found');
}

// GET /products/:id: the same deterministic catalogue as the Rust shop.
function product(res, text) {
  if (!/^[0-9]+$/.test(text)) {
    return error(res, 404, 'invalid product id');
  }
  const id = Number(text);
  if (!Number.isSafeInteger(id) || id < 1 || id > PRODUCTS) {
    return error(res, 404, 'no such product');
  }
  const name = `${ADJECTIVES[Math.floor(id / 10) % 8]} ${NOUNS[id % 10]}`;
  const cents = 199 + ((id * 7919) % 19_800);
  json(res, 200, `{"id":${id},"name":${JSON.stringify(name)},"price":${money(cents)}}`);
}

// POST /checkout: read the body, then the payment provider's round trip.
function checkout(req, res) {
  const chunks = [];
  let size = 0;
  let done = false;
  const timer = setTimeout(() => refuse(408, 'body took too long'), BODY_TIMEOUT_MS);
  function refuse(status, message) {
    if (done) return;
    done = true;
    clearTimeout(timer);
    // The body was not read: this connection cannot carry another request.
    res.setHeader('Connection', 'close');
    error(res, status, message);
  }
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > BODY_LIMIT) {
      refuse(413, 'cart too large');
    } else if (!done) {
      chunks.push(chunk);
    }
  });
  req.on('error', () => refuse(400, 'cannot read the body'));
  req.on('end', () => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    setTimeout(() => {
      orders += 1;
      const orderId = `${WORKER_ID}-${process.pid.toString(16)}-${orders}`;
      json(res, 200, JSON.stringify({ orderId, status: 'confirmed' }));
    }, CHECKOUT_IO_MS);
  });
}

// GET /cpu: price a large cart. Integer arithmetic in the int32 range (the
// modulo is taken before multiplying), so V8 keeps it on its fast path.
function cpu(res) {
  let total = 0;
  for (let i = 0; i < CPU_CART_ITEMS; i++) {
    const price = 99 + (((i % 10_000) * 7919) % 10_000);
    const quantity = 1 + (i % 5);
    const line = price * quantity;
    const discount = quantity >= 3 ? Math.floor((line * 5) / 100) : 0;
    total += Math.floor(((line - discount) * 10_825) / 10_000);
  }
  json(res, 200, `{"items":${CPU_CART_ITEMS},"total":${money(total)}}`);
}

// Cents as a JSON number with two decimals: 1234 -> 12.34.
function money(cents) {
  return `${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, '0')}`;
}

function json(res, status, body) {
  send(res, status, body, 'application/json');
}

function error(res, status, message) {
  json(res, status, JSON.stringify({ error: message }));
}

function notAllowed(res, allow) {
  res.setHeader('Allow', allow);
  error(res, 405, 'method not allowed');
}

// Every response goes out here.
function send(res, status, body, type) {
  if (res.destroyed || res.writableEnded) {
    return; // the client went away meanwhile
  }
  res.setHeader('Content-Type', type);
  res.setHeader('Content-Length', Buffer.byteLength(body));
  res.setHeader('X-Worker', WORKER_ID);
  if (draining) {
    // The last response on this connection: Node closes it once sent.
    res.setHeader('Connection', 'close');
  }
  res.writeHead(status);
  res.end(body);
}

// ---------------------------------------------------------------------------
// Connections, tracked by hand so that the drain knows which are idle.

const server = http.createServer(route);
const connections = new Set();
let draining = false;
let drainStarted = 0;

server.on('connection', (socket) => {
  socket.inFlight = 0; // requests received and not yet answered
  socket.graceTimer = null;
  connections.add(socket);
  // 'close' comes however the connection ends, a client that vanished in
  // the middle of a request included, so such a client cannot hold the drain.
  socket.on('close', () => {
    clearTimeout(socket.graceTimer);
    connections.delete(socket);
    exitIfDrained();
  });
  if (draining) {
    // Accepted just before the listener closed: it may carry one request.
    closeWhenIdle(socket);
  }
});

server.on('request', (req, res) => {
  const socket = req.socket;
  socket.inFlight += 1;
  let finished = false;
  const done = () => {
    if (finished) return;
    finished = true;
    socket.inFlight -= 1;
    if (draining) {
      closeWhenIdle(socket);
    }
  };
  res.on('finish', done);
  res.on('close', done);
});

// Closes `socket` once it has been idle (no request in flight, nothing new
// read) for the grace period.
function closeWhenIdle(socket) {
  if (socket.graceTimer || socket.destroyed || socket.inFlight > 0) {
    return;
  }
  const readSoFar = socket.bytesRead;
  socket.graceTimer = setTimeout(() => {
    socket.graceTimer = null;
    if (socket.inFlight > 0) {
      return; // served, with `Connection: close`; then Node closes it
    }
    if (socket.bytesRead > readSoFar) {
      closeWhenIdle(socket); // the head of a request is arriving: wait for it
      return;
    }
    socket.destroy();
  }, DRAIN_IDLE_GRACE_MS);
}

// SIGTERM (from clusterd) or Ctrl-C: stop accepting at once (clusterd and
// the other workers keep the listening socket, so new connections go to
// them), finish what is in flight with `Connection: close`, close idle
// keep-alive connections after the grace, and exit 0 when none is left.
function drain(signal) {
  if (draining) return;
  draining = true;
  drainStarted = Date.now();
  console.error(`node-shop: worker ${WORKER_ID} draining (${signal}), ${connections.size} connections open`);
  // Not server.close(): since Node 19 it also closes idle keep-alive
  // connections at once, without the grace. The net.Server one only closes
  // the listener.
  if (server.listening) {
    net.Server.prototype.close.call(server);
  }
  for (const socket of connections) {
    closeWhenIdle(socket);
  }
  setTimeout(() => {
    console.error(`node-shop: worker ${WORKER_ID}: ${connections.size} connections still open after ${DRAIN_GIVE_UP_MS} ms, exiting`);
    process.exit(1);
  }, DRAIN_GIVE_UP_MS).unref();
  exitIfDrained();
}

function exitIfDrained() {
  if (draining && connections.size === 0) {
    console.error(`node-shop: worker ${WORKER_ID} drained in ${Date.now() - drainStarted} ms, exiting`);
    process.exit(0);
  }
}

process.on('SIGTERM', drain);
process.on('SIGINT', drain);

// ---------------------------------------------------------------------------
// Listening and readiness

// The fd of the listener named `name` passed by clusterd (systemd's socket
// activation protocol), or null when run alone.
function inheritedFd(name) {
  const count = process.env.LISTEN_FDS;
  if (count === undefined) {
    return null;
  }
  if (process.env.LISTEN_PID !== String(process.pid)) {
    console.error(`node-shop: LISTEN_PID is ${process.env.LISTEN_PID}, not this process (${process.pid}): ` +
      'the listeners were meant for another process; run node directly, not through a wrapper');
    process.exit(1);
  }
  const names = (process.env.LISTEN_FDNAMES || '').split(':');
  const index = Math.max(names.indexOf(name), 0);
  if (index >= Number(count)) {
    console.error(`node-shop: LISTEN_FDS is ${count}: no listener to serve`);
    process.exit(1);
  }
  // Not for our own child processes, if we ever start any.
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  delete process.env.LISTEN_PID;
  return 3 + index;
}

// Tells clusterd we are ready: a line on the CLUSTERD_READY_FD pipe.
function notifyReady() {
  const fd = Number(process.env.CLUSTERD_READY_FD);
  if (!process.env.CLUSTERD_READY_FD || !Number.isInteger(fd)) {
    return;
  }
  try {
    fs.writeSync(fd, 'READY=1\n');
    fs.closeSync(fd);
  } catch (e) {
    console.error(`node-shop: cannot report READY on fd ${fd}: ${e.message}`);
  }
}

const fd = inheritedFd('http');
// Node calls listen(2) again on an inherited socket, which sets its backlog;
// keep clusterd's (default 1024; with another `backlog` in the config, add
// `env = BACKLOG=N`). Node would use 511, and ignores `backlog` inside the
// options object when given an fd, hence the separate argument.
const backlog = Number(process.env.BACKLOG) || 1024;
const port = Number(process.env.PORT) || 3000;
server.listen(fd === null ? { host: '127.0.0.1', port } : { fd }, backlog, () => {
  const shown = fd === null ? `127.0.0.1:${port}` : `fd ${fd}`;
  console.error(`node-shop: worker ${WORKER_ID} (pid ${process.pid}) listening on ${shown}`);
  notifyReady();
});
server.on('error', (e) => {
  console.error(`node-shop: ${e.message}`);
  process.exit(1);
});
