// Loaded with `node -r` before the unmodified app, the same way under clusterd,
// PM2 and the cluster master, so that the supervisor is the only difference:
//
// - the app's `app.listen(3000)` listens on $BENCH_PORT instead, when set (the
//   bench picks a free port: other programs on this machine may hold 3000);
//   under clusterd it is not set, and clusterd's adapter maps the listen call
//   onto clusterd's listener as it does for any app;
// - every response gets `X-Worker: <pid>`, so the load generator can tell which
//   worker answered (a new pid is a new worker serving).
'use strict';
const net = require('net');
const http = require('http');

const port = Number(process.env.BENCH_PORT);
if (port > 0) {
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function (...args) {
    if (args[0] === 3000 || args[0] === '3000') {
      args[0] = port;
      if (typeof args[1] !== 'string') {
        args.splice(1, 0, '127.0.0.1');
      }
    }
    return listen.apply(this, args);
  };
}

const emit = http.Server.prototype.emit;
const pid = String(process.pid);
http.Server.prototype.emit = function (event, req, res) {
  if (event === 'request' && res && !res.headersSent) {
    res.setHeader('X-Worker', pid);
  }
  return emit.apply(this, arguments);
};
