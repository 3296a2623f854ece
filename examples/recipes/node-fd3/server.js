// A Node.js server that speaks `protocol = systemd` by hand (fd 3, the
// READY pipe, its own drain) and loses no request across rolling restarts.
// With `protocol = node` none of this is needed: clusterd's adapter does it
// for an unmodified app.
const fs = require('fs');
const http = require('http');
const net = require('net');

let draining = false;
const server = http.createServer((req, res) => {
  if (draining) res.setHeader('Connection', 'close'); // the last response on this connection
  res.end(`hello from worker ${process.env.CLUSTERD_WORKER_ID}\n`);
});

// Draining: idle keep-alive connections are closed after a grace, not at
// once, as a request may already be on its way on one (a client retries a
// GET, never a POST). The process exits when no connection is left.
const sockets = new Set();
server.on('connection', (socket) => {
  socket.inFlight = 0;
  sockets.add(socket);
  socket.on('close', () => {
    sockets.delete(socket);
    if (draining && sockets.size === 0) process.exit(0);
  });
  if (draining) closeWhenIdle(socket);
});
server.on('request', (req, res) => {
  req.socket.inFlight += 1;
  res.on('close', () => {
    req.socket.inFlight -= 1;
    if (draining) closeWhenIdle(req.socket);
  });
});
function closeWhenIdle(socket) {
  const read = socket.bytesRead;
  setTimeout(() => {
    // Look after this turn's poll phase (setImmediate): timers run before
    // I/O, so after a stall a request that arrived meanwhile is still unread.
    setImmediate(() => {
      if (socket.inFlight > 0) return; // its response will call again
      if (socket.bytesRead > read) closeWhenIdle(socket); // a request is arriving
      else socket.destroy();
    });
  }, 500);
}
process.on('SIGTERM', () => {
  draining = true;
  // The listener only: http's server.close() also closes idle connections
  // at once (Node 19+).
  net.Server.prototype.close.call(server);
  for (const socket of sockets) if (socket.inFlight === 0) closeWhenIdle(socket);
  if (sockets.size === 0) process.exit(0);
});

// Under clusterd fd 3, alone a port. 1024: Node calls listen(2) again on
// the fd, and would set the backlog to 511.
server.listen(process.env.LISTEN_FDS ? { fd: 3 } : { port: 3000 }, 1024, () => {
  const ready = process.env.CLUSTERD_READY_FD;
  if (ready) fs.writeSync(Number(ready), 'READY=1\n');
});
