// clusterd's adapter for `protocol = node`: runs an unmodified Node.js server
// as a clusterd worker. clusterd writes this file into a private folder of
// its own and starts each worker with `--require <this file>` appended to
// NODE_OPTIONS, so Node loads it before the app. Plain JavaScript, no
// dependencies, Node 18 or later.
//
// What it does, in the worker process clusterd started (LISTEN_PID is this
// process; anywhere else, a child process or a worker thread, it does
// nothing):
//
// - Listening. `net.Server.prototype.listen` is patched: the app's
//   `listen(port[, host])` (http, https, net, Express, Fastify, Koa,
//   Socket.IO, ws ...) serves clusterd's listener instead of binding a
//   socket of its own: the listener with that port; or, when clusterd
//   passes a single listener, that one whatever the port. A unix path maps
//   the same way. `listen()` with no port (or 0) takes the single listener
//   if it is still free, else binds an ephemeral port as usual; `{ fd }` and
//   `{ handle }` are left alone. A listen that cannot be mapped fails with
//   an 'error' event (code ERR_CLUSTERD_LISTEN) whose message names the call
//   and the listeners clusterd passes.
// - READY. Once the app listens on every listener clusterd passes, a line
//   `READY=1` goes to the pipe in CLUSTERD_READY_FD.
// - Draining on SIGTERM, without losing a request: the listeners close at
//   once (the other workers and clusterd keep the port); each response still
//   to be sent carries `Connection: close` and ends its connection; an idle
//   keep-alive connection is closed after a grace (a request may already be
//   on its way on it: it is served, with `Connection: close`); WebSockets
//   (and other upgraded connections) get a close frame with code 1012
//   "Service Restart", spread over a window so that their clients do not all
//   reconnect in the same instant. When no connection is left, the worker
//   exits. The app's own SIGTERM handlers run as usual; its `server.close()`
//   closes idle connections after the same grace (Node's closes them at
//   once), and a `process.exit()` it calls while connections are open waits
//   until they are closed. If the app has SIGTERM handlers of its own, its
//   cleanup gets up to APP_EXIT_GRACE_MS after the last connection closed to
//   end the process (by `process.exit` or by having nothing left to do)
//   before the adapter exits.
// - Socket.IO: engine.io's session ids start with the worker's id
//   (CLUSTERD_WORKER_ID), `2.hQ8c...`, which clusterd's `sticky = socket.io`
//   routes on; on drain, long-polling sessions get engine.io's close packet
//   and WebSockets that engine.io itself closes (an app's `io.close()`) get
//   code 1012 too (see "engine.io" below).
// - Stats and heartbeats: every HEARTBEAT_MS (less with clusterd's
//   `watchdog`), from a timer on the event loop, a message with the requests
//   served and the connections open. A blocked event loop sends nothing, so
//   clusterd sees it.
// - Status: what it waits for before READY, and the error that stops the
//   app (an exception at start-up, a listen it cannot map) go to clusterd,
//   which shows them in `clusterctl status` and in a failed restart's reason.
//
// The channel to clusterd is Node's own IPC channel (NODE_CHANNEL_FD, JSON
// lines): messages `{"cmd":"CLUSTERD_HEARTBEAT",...}` and
// `{"cmd":"CLUSTERD_STATUS",...}` go out with process.send().
//
// - dispatch = clusterd (CLUSTERD_DISPATCH=clusterd): clusterd accepts the
//   connections and passes each one on the same channel, as Node's own
//   handle message (NODE_HANDLE, the socket's fd attached; Node answers
//   NODE_HANDLE_ACK) whose inner message is
//   `{"cmd":"NODE_CLUSTERD_CONNECTION","listener":N}`. Its `cmd` starts
//   with NODE_, so Node emits it as `internalMessage`, never as the app's
//   `message`. The adapter hands the socket to the app's server for
//   listener N as Node's own accept would (`server.emit('connection')`).
//   The app's listen() then binds a private abstract unix socket nobody
//   connects to (so it is `listening`, and READY follows as usual), its
//   `address()` says clusterd's address, and clusterd's listening fds are
//   closed: this worker never accepts itself. Draining, the adapter exits
//   only after `{"cmd":"NODE_CLUSTERD_DISPATCH_END"}` (clusterd sends it
//   before SIGTERM, after the last connection it passes), so no connection
//   sent is left unread.

'use strict';

(function clusterdAdapter() {
  const env = process.env;
  if (!env.CLUSTERD_NODE_LISTENERS) {
    return; // not started by clusterd with protocol = node
  }
  let mainThread = true;
  try {
    mainThread = require('worker_threads').isMainThread;
  } catch (_) {
    // no worker_threads: the main thread
  }
  if (!mainThread) {
    return;
  }
  const fs = require('fs');
  const http = require('http');
  const https = require('https');
  const net = require('net');
  const tls = require('tls');

  const TAG = 'clusterd node adapter';
  if (env.LISTEN_PID !== String(process.pid)) {
    // A child of the worker, or a wrapper (npm, a shell) ran node as its
    // child: the listeners were passed to another process.
    process.stderr.write(`${TAG}: LISTEN_PID is ${env.LISTEN_PID}, not this process (${process.pid}): ` +
      'inactive here; run node itself in `exec` (not npm or a shell script), so that the listeners reach the server\n');
    return;
  }

  // --- settings -------------------------------------------------------------

  // While draining, how long an idle keep-alive connection may still deliver
  // a request before it is closed (the Rust library's DRAIN_IDLE_GRACE).
  const IDLE_GRACE_MS = 500;
  // WebSocket closes are spread at this pace (so 1000 sockets over 5 s)...
  const CLOSE_SPREAD_PER_SOCKET_MS = 5;
  // ... over at most this long (and at most a quarter of drain_timeout).
  const CLOSE_SPREAD_MAX_MS = 5000;
  // A WebSocket whose peer has not closed this long after the 1012 close
  // frame is destroyed.
  const CLOSE_WAIT_MS = 2000;
  // After the last connection closed, how long an app with SIGTERM handlers
  // of its own may take to end the process itself.
  const APP_EXIT_GRACE_MS = 5000;
  const HEARTBEAT_MS = 1000;

  const drainTimeoutMs = Number(env.CLUSTERD_DRAIN_TIMEOUT_MS) || 30000;
  const dispatched = env.CLUSTERD_DISPATCH === 'clusterd';
  const backlog = Number(env.CLUSTERD_BACKLOG) || 1024;
  const readyFd = env.CLUSTERD_READY_FD === undefined ? null : Number(env.CLUSTERD_READY_FD);
  const watchdogMs = Number(env.WATCHDOG_USEC) / 1000 || 0;
  const heartbeatMs = watchdogMs > 0 ? Math.max(10, Math.min(HEARTBEAT_MS, Math.floor(watchdogMs / 3))) : HEARTBEAT_MS;

  let listeners;
  try {
    listeners = JSON.parse(env.CLUSTERD_NODE_LISTENERS);
  } catch (e) {
    process.stderr.write(`${TAG}: CLUSTERD_NODE_LISTENERS is not JSON (${e.message}); inactive\n`);
    return;
  }
  for (const l of listeners) {
    l.server = null; // the app's server that took it
    l.call = null; // how, for messages
  }

  // Not for the app's own child processes.
  for (const key of ['LISTEN_FDS', 'LISTEN_FDNAMES', 'LISTEN_PID', 'CLUSTERD_READY_FD',
    'CLUSTERD_NODE_LISTENERS', 'CLUSTERD_BACKLOG', 'CLUSTERD_DRAIN_TIMEOUT_MS', 'CLUSTERD_DISPATCH']) {
    delete env[key];
  }
  if (env.NODE_OPTIONS) {
    // clusterd appended `--require "<this file>"`.
    const options = env.NODE_OPTIONS.replace(/\s*--require\s+("(?:[^"\\]|\\.)*"|\S+)\s*$/, (m) =>
      (m.includes('clusterd') ? '' : m));
    if (options.trim()) {
      env.NODE_OPTIONS = options;
    } else {
      delete env.NODE_OPTIONS;
    }
  }

  // --- the channel to clusterd ----------------------------------------------

  function send(message) {
    if (typeof process.send !== 'function' || !process.connected) {
      return;
    }
    try {
      process.send(message, () => {}); // a closed channel is not an error here
    } catch (_) {
      // clusterd went away: the parent-death signal drains us
    }
  }

  let lastStatus = null;
  function status(text) {
    if (text === lastStatus) {
      return;
    }
    lastStatus = text;
    send({ cmd: 'CLUSTERD_STATUS', status: text });
  }

  // An error for a human: its first line, and where it was thrown.
  function describe(err) {
    if (!(err instanceof Error)) {
      return `${typeof err === 'string' ? err : safeInspect(err)}`.slice(0, 300);
    }
    const lines = String(err.stack || err).split('\n');
    let text = lines[0] || String(err);
    const frame = lines.slice(1).map((l) => l.trim()).find((l) => l.startsWith('at ') &&
      !l.includes('node:internal') && !l.includes(__filename));
    if (frame) {
      text += ` (${frame})`;
    }
    return text.slice(0, 300);
  }

  function safeInspect(v) {
    try {
      return require('util').inspect(v, { depth: 1, breakLength: Infinity });
    } catch (_) {
      return String(v);
    }
  }

  function showListener(l) {
    return `${l.name} (${l.path !== undefined ? `unix:${l.path}` : `${l.host}:${l.port}`})`;
  }

  // --- listening --------------------------------------------------------------

  let ready = false;
  let draining = false;

  function waitingFor() {
    const missing = listeners.filter((l) => !l.server || !l.server.listening);
    if (missing.length === 0) {
      return null;
    }
    const started = listeners.filter((l) => l.server);
    const what = missing.map(showListener).join(', ');
    return started.length === 0
      ? `the app has not called listen() yet: nothing listens on ${what}`
      : `nothing listens on ${what} yet`;
  }

  let readyCheck = null;
  function checkReady() {
    if (ready || draining) {
      return;
    }
    const waiting = waitingFor();
    if (waiting) {
      status(waiting);
      return;
    }
    // Once what the app's start-up queued has run: an error it throws
    // right after listen() fails the worker before READY.
    if (!readyCheck) {
      readyCheck = setImmediate(() => {
        readyCheck = null;
        reportReady();
      });
    }
  }

  function reportReady() {
    if (ready || draining || waitingFor()) {
      return;
    }
    ready = true;
    status('');
    heartbeat();
    if (readyFd !== null && Number.isInteger(readyFd)) {
      try {
        fs.writeSync(readyFd, 'READY=1\n');
        fs.closeSync(readyFd);
      } catch (e) {
        process.stderr.write(`${TAG}: cannot report READY on fd ${readyFd}: ${e.message}\n`);
      }
    }
  }

  // The listen() arguments as Node reads them: the options and the callback.
  function readListenArgs(args) {
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : null;
    const a0 = args[0];
    let options;
    if (a0 !== null && typeof a0 === 'object') {
      options = a0._handle || a0.handle || a0;
    } else if (typeof a0 === 'string' && !(Number(a0) >= 0)) {
      options = { path: a0 };
    } else {
      options = { port: a0 };
      if (args.length > 1 && typeof args[1] === 'string') {
        options.host = args[1];
      }
    }
    return { options, cb };
  }

  // How the app called listen, for messages: `listen(3000, "0.0.0.0")`.
  function showCall(args) {
    const shown = args.filter((a) => typeof a !== 'function').map((a) => {
      if (a !== null && typeof a === 'object') {
        const fields = ['port', 'host', 'path'].filter((k) => a[k] !== undefined)
          .map((k) => `${k}: ${JSON.stringify(a[k])}`);
        return `{ ${fields.join(', ')} }`;
      }
      return JSON.stringify(a);
    });
    return `listen(${shown.join(', ')})`;
  }

  // The listener for these options; null = not ours (bind as usual); a
  // string = the reason it cannot be mapped.
  function choose(options) {
    if (typeof options.fd === 'number' || (options.port === undefined && options.path === undefined &&
      options.constructor !== Object)) {
      return null; // a handle or an fd of the app's own
    }
    const free = listeners.filter((l) => !l.server);
    const single = listeners.length === 1 ? listeners[0] : null;
    const passed = `clusterd passes ${listeners.map(showListener).join(', ')}`;
    if (options.path !== undefined && options.path !== null) {
      const match = listeners.find((l) => l.path === options.path);
      const l = match || (single && !single.server ? single : null);
      if (!l) {
        return `no clusterd listener has path ${options.path} (${passed})`;
      }
      return l.server ? `${showListener(l)} is already served by ${l.call}` : l;
    }
    const port = options.port === undefined || options.port === null ? 0 : Number(options.port);
    if (!Number.isInteger(port) || port < 0 || port > 65535) {
      return null; // Node reports it as usual
    }
    if (port === 0) {
      return single && free.length === 1 ? single : null;
    }
    const match = listeners.find((l) => l.port === port);
    if (match) {
      return match.server ? `${showListener(match)} is already served by ${match.call}` : match;
    }
    if (single) {
      return single.server ? `${showListener(single)} is already served by ${single.call}` : single;
    }
    return `no clusterd listener has port ${port} (${passed}; ` +
      'add a `listen = NAME=HOST:PORT` line to the config, or listen on one of these ports)';
  }

  const netListen = net.Server.prototype.listen;
  net.Server.prototype.listen = function listen(...args) {
    const { options, cb } = readListenArgs(args);
    const chosen = draining ? null : choose(options);
    if (chosen === null) {
      if (draining && choose(options) !== null) {
        return this; // too late to start serving clusterd's listeners
      }
      return netListen.apply(this, args);
    }
    if (typeof chosen === 'string') {
      const err = new Error(`clusterd: cannot map ${showCall(args)}: ${chosen}`);
      err.code = 'ERR_CLUSTERD_LISTEN';
      status(err.message);
      process.nextTick(() => this.emit('error', err));
      return this;
    }
    chosen.server = this;
    chosen.call = showCall(args);
    adopt(this);
    this.once('listening', checkReady);
    const rest = cb ? [cb] : [];
    if (dispatched) {
      return listenDispatched(this, chosen, rest);
    }
    // Node calls listen(2) again on the fd with this backlog: keep clusterd's.
    return netListen.call(this, { fd: chosen.fd }, backlog, ...rest);
  };

  // dispatch = clusterd: clusterd passes the connections; the server
  // listens on a private abstract unix socket, and says clusterd's address.
  function listenDispatched(server, l, rest) {
    try {
      fs.closeSync(l.fd);
    } catch (_) {
      // already closed
    }
    const shown = l.path !== undefined ? l.path
      : { address: l.host, family: String(l.host).includes(':') ? 'IPv6' : 'IPv4', port: l.port };
    server.address = function address() {
      return this.listening ? shown : null;
    };
    const name = `\0clusterd-dispatch-${process.pid}-${l.name}-${Math.random().toString(36).slice(2)}`;
    return netListen.call(server, { path: name }, ...rest);
  }

  // --- connections ------------------------------------------------------------

  const kAdopted = Symbol('clusterd.adopted');
  const kClosedByDrain = Symbol('clusterd.closedByDrain');
  const kCloseEmitted = Symbol('clusterd.closeEmitted');
  const servers = new Set(); // the app's servers on clusterd's listeners
  const conns = new Map(); // socket -> its state
  let requests = 0;

  function isHttp(server) {
    return server instanceof http.Server || server instanceof https.Server;
  }

  function adopt(server) {
    if (server[kAdopted]) {
      return;
    }
    server[kAdopted] = true;
    servers.add(server);
    const httpish = isHttp(server);
    // TLS: the socket HTTP sees is the one after the handshake.
    const event = server instanceof tls.Server ? 'secureConnection' : 'connection';
    server.on(event, (socket) => track(socket, server, httpish));
    server.once('close', () => {
      server[kCloseEmitted] = true;
    });
    if (httpish) {
      server.prependListener('request', onRequest);
      const emit = server.emit;
      server.emit = function emitWatched(name, ...rest) {
        if (name === 'upgrade') {
          onUpgrade(rest[0], rest[1]);
        }
        return emit.call(this, name, ...rest);
      };
      // Node's closeIdleConnections closes idle keep-alive connections at
      // once (server.close() calls it since Node 19), racing a request on
      // its way: give them the grace instead.
      server.closeIdleConnections = function closeIdleGracefully() {
        for (const c of conns.values()) {
          if (c.server === this) {
            c.closing = true;
            closeWhenIdle(c);
          }
        }
      };
    }
    const close = server.close;
    server.close = function closeAfterDrain(cb) {
      if (this[kClosedByDrain] && !this.listening) {
        // The adapter closed the listener already: what the app waits for
        // is the end of the connections, as if its own close had done it.
        if (typeof cb === 'function') {
          if (this[kCloseEmitted]) {
            process.nextTick(cb);
          } else {
            this.once('close', () => cb());
          }
        }
        if (typeof this.closeIdleConnections === 'function') {
          this.closeIdleConnections();
        }
        return this;
      }
      return close.apply(this, arguments);
    };
  }

  function track(socket, server, httpish) {
    const c = {
      socket,
      server,
      httpish,
      inFlight: 0,
      responses: new Set(),
      upgraded: null,
      websocket: false,
      closing: draining,
      grace: null,
      verdict: null,
      closeAt: null,
    };
    conns.set(socket, c);
    socket.once('close', () => {
      cancelGrace(c);
      clearTimeout(c.closeAt);
      conns.delete(socket);
      exitIfDrained();
    });
    if (draining) {
      // Accepted just before the listener closed: it may carry one request.
      settle(c);
    }
  }

  function connOf(socket) {
    return conns.get(socket) || (socket && conns.get(socket._parent)) || null;
  }

  function onRequest(req, res) {
    requests += 1;
    const c = connOf(req.socket);
    if (!c) {
      return;
    }
    c.server = this;
    c.inFlight += 1;
    c.responses.add(res);
    if (draining) {
      lastResponse(res);
    }
    let done = false;
    const finished = () => {
      if (done) {
        return;
      }
      done = true;
      c.inFlight -= 1;
      c.responses.delete(res);
      if (c.closing) {
        closeWhenIdle(c);
      }
    };
    res.once('finish', finished);
    res.once('close', finished);
  }

  function onUpgrade(req, socket) {
    requests += 1;
    const c = connOf(socket) || connOf(req.socket);
    if (!c) {
      return;
    }
    c.upgraded = socket;
    c.websocket = String(req.headers.upgrade || '').toLowerCase() === 'websocket';
    cancelGrace(c);
    if (draining) {
      // Upgraded while the drain had begun: close it at once.
      closeUpgraded(c, 0);
    }
  }

  // The response carries `Connection: close`, and Node closes the
  // connection once it is sent.
  function lastResponse(res) {
    if (res.headersSent) {
      return;
    }
    res.shouldKeepAlive = false;
    try {
      res.setHeader('Connection', 'close');
    } catch (_) {
      // headers already on their way
    }
  }

  // What a connection needs at the start of the drain (or when it arrives
  // during it).
  function settle(c) {
    c.closing = true;
    if (c.upgraded) {
      return; // spread out by drain()
    }
    if (!c.httpish) {
      return; // the app's own protocol: its connections are its business
    }
    for (const res of c.responses) {
      lastResponse(res);
    }
    closeWhenIdle(c);
  }

  // Closes the connection once it has been idle (nothing in flight, nothing
  // new read) for the grace period.
  //
  // The verdict waits for setImmediate: a turn of the event loop runs its
  // timers before it polls for I/O, so after a stall (a loaded machine, a long
  // GC) the bytes of a request that arrived meanwhile are still unread when
  // the timer fires; the poll phase between the two reads them.
  function closeWhenIdle(c) {
    if (c.grace || c.verdict || c.upgraded || c.inFlight > 0 || c.socket.destroyed) {
      return;
    }
    const readSoFar = c.socket.bytesRead;
    c.grace = setTimeout(() => {
      c.grace = null;
      c.verdict = setImmediate(() => {
        c.verdict = null;
        if (c.inFlight > 0 || c.upgraded || c.socket.destroyed) {
          return; // a request came: served with Connection: close
        }
        if (c.socket.bytesRead > readSoFar) {
          closeWhenIdle(c); // a request's head is arriving: wait for it
          return;
        }
        c.socket.destroy();
      });
    }, IDLE_GRACE_MS);
  }

  function cancelGrace(c) {
    clearTimeout(c.grace);
    clearImmediate(c.verdict);
    c.grace = null;
    c.verdict = null;
  }

  // A WebSocket close frame, server to client (unmasked): 1012 Service Restart.
  const SERVICE_RESTART = (() => {
    const reason = Buffer.from('Service Restart');
    return Buffer.concat([Buffer.from([0x88, 2 + reason.length, 0x03, 0xf4]), reason]);
  })();

  function closeUpgraded(c, delay) {
    clearTimeout(c.closeAt);
    c.closeAt = setTimeout(() => {
      const socket = c.upgraded;
      if (!socket || socket.destroyed) {
        return;
      }
      if (!c.websocket) {
        socket.end(); // another protocol: nothing better to say
      } else if (socket.writable) {
        socket.write(SERVICE_RESTART);
      }
      // The peer answers the close and the app's WebSocket library ends the
      // connection; one that does not is cut.
      c.closeAt = setTimeout(() => socket.destroy(), CLOSE_WAIT_MS);
    }, delay);
  }

  // --- connections clusterd passes (dispatch = clusterd) ----------------------

  let dispatchEnded = !dispatched;
  if (dispatched) {
    process.on('internalMessage', (msg, socket) => {
      if (msg === null || typeof msg !== 'object') {
        return;
      }
      if (msg.cmd === 'NODE_CLUSTERD_DISPATCH_END') {
        dispatchEnded = true;
        exitIfDrained();
        return;
      }
      if (msg.cmd !== 'NODE_CLUSTERD_CONNECTION' || !socket) {
        return;
      }
      const l = listeners[msg.listener];
      const server = l && l.server;
      if (!server) {
        socket.destroy(); // the app serves no listener by that number
        return;
      }
      // As Node's own accept (net.Server's onconnection) does it.
      if (server.maxConnections && server._connections >= server.maxConnections) {
        socket.destroy();
        return;
      }
      socket.server = server;
      socket._server = server;
      server._connections += 1;
      if (server.noDelay && typeof socket.setNoDelay === 'function') {
        socket.setNoDelay(true);
      }
      server.emit('connection', socket);
    });
  }

  // --- draining ---------------------------------------------------------------

  let drainStarted = 0;
  let exitCode = null; // a process.exit() the app called while draining
  let exiting = false;

  function openCount() {
    return conns.size;
  }

  function drain() {
    if (draining) {
      return;
    }
    draining = true;
    drainStarted = Date.now();
    status(`draining: ${openCount()} connections open`);
    for (const s of servers) {
      if (s.listening) {
        s[kClosedByDrain] = true;
        net.Server.prototype.close.call(s); // the listener only
      }
    }
    const upgraded = [];
    for (const c of conns.values()) {
      if (c.upgraded) {
        upgraded.push(c);
      }
      settle(c);
    }
    const window = Math.min(upgraded.length * CLOSE_SPREAD_PER_SOCKET_MS, CLOSE_SPREAD_MAX_MS,
      Math.floor(drainTimeoutMs / 4));
    upgraded.forEach((c, i) => closeUpgraded(c, Math.floor((window * i) / upgraded.length)));
    for (const hook of drainHooks) {
      hook();
    }
    // Past this, give up (clusterd sends SIGKILL at drain_timeout).
    const giveUp = Math.max(drainTimeoutMs - 1000, Math.floor(drainTimeoutMs * 0.9));
    setTimeout(() => {
      process.stderr.write(`${TAG}: ${openCount()} connections still open after ${giveUp} ms of draining, exiting\n`);
      realExit(exitCode === null ? 1 : exitCode);
    }, giveUp).unref();
    // Checked after the app's own SIGTERM handlers have run.
    setImmediate(exitIfDrained);
  }

  function exitIfDrained() {
    if (!draining || exiting || openCount() > 0) {
      return;
    }
    if (!dispatchEnded && process.connected) {
      return; // connections clusterd passed may still be on their way
    }
    exiting = true;
    heartbeat();
    if (exitCode !== null) {
      realExit(exitCode); // the app asked for it during the drain
      return;
    }
    if (process.listenerCount('SIGTERM') > 1) {
      // The app has cleanup of its own: let it end the process.
      setTimeout(() => realExit(process.exitCode || 0), APP_EXIT_GRACE_MS).unref();
      return;
    }
    realExit(process.exitCode || 0);
  }

  const realExit = process.exit.bind(process);
  process.exit = function exitAfterDrain(code) {
    if (draining && !exiting && openCount() > 0) {
      // Exiting now would cut the requests in flight: once they are done.
      exitCode = code === undefined ? (process.exitCode || 0) : code;
      return undefined;
    }
    return realExit(code);
  };

  process.on('SIGTERM', drain);

  // --- engine.io (Socket.IO) -------------------------------------------------
  //
  // Sticky sessions without a shared table: engine.io session ids become
  // `<CLUSTERD_WORKER_ID>.<random>`, so that clusterd's `sticky = socket.io`
  // routes every later request of a session (the `sid` query parameter) to
  // the worker that created it. Nothing changes in the app: engine.io's
  // default generateId is replaced when the module loads (an app that sets
  // its own keeps it). On drain, sessions on HTTP long-polling get
  // engine.io's close packet (their clients reconnect at once, to another
  // worker) and a WebSocket engine.io closes itself (the app's io.close())
  // says 1012 "Service Restart" as the adapter's own close frames do.

  const workerId = /^[0-9]{1,9}$/.test(env.CLUSTERD_WORKER_ID || '') ? env.CLUSTERD_WORKER_ID : null;
  const kEnginePatched = Symbol('clusterd.enginePatched');
  const engineServers = new Set(); // engine.io servers that made a session
  const drainHooks = []; // run by drain(), after every connection is settled

  function patchEngineIo(eio) {
    if (!eio || eio[kEnginePatched] || typeof eio.Server !== 'function' || !eio.transports ||
      typeof eio.uServer !== 'function') {
      return;
    }
    eio[kEnginePatched] = true;
    // BaseServer's (Server's and uServer's base), the default.
    let proto = eio.Server.prototype;
    while (proto && !Object.prototype.hasOwnProperty.call(proto, 'generateId')) {
      proto = Object.getPrototypeOf(proto);
    }
    if (proto && workerId !== null) {
      const generateId = proto.generateId;
      proto.generateId = function generateWorkerId(req) {
        engineServers.add(this);
        const id = generateId.call(this, req);
        return typeof id === 'string' ? `${workerId}.${id}`
          : Promise.resolve(id).then((random) => `${workerId}.${random}`);
      };
    }
    const ws = eio.transports.websocket && eio.transports.websocket.prototype;
    if (ws && typeof ws.doClose === 'function') {
      const doClose = ws.doClose;
      ws.doClose = function doCloseServiceRestart(fn) {
        if (!draining || !this.socket || typeof this.socket.close !== 'function') {
          return doClose.call(this, fn);
        }
        this.socket.close(1012, 'Service Restart');
        if (fn) {
          fn();
        }
        return undefined;
      };
    }
  }

  drainHooks.push(() => {
    for (const server of engineServers) {
      for (const session of Object.values(server.clients || {})) {
        const transport = session.transport;
        if (transport && transport.name === 'polling') {
          try {
            session.close(); // a close packet on the pending (or next) poll
          } catch (_) {
            // the session ends anyway with its connection
          }
        }
      }
    }
  });

  {
    const Module = require('module');
    const load = Module._load;
    Module._load = function loadWatched(request, ...rest) {
      const exports = load.call(this, request, ...rest);
      if (typeof request === 'string' && request.includes('engine.io')) {
        try {
          patchEngineIo(exports);
        } catch (e) {
          process.stderr.write(`${TAG}: cannot hook engine.io (${e.message}); its session ids stay as they are\n`);
        }
      }
      return exports;
    };
  }

  // --- reports ----------------------------------------------------------------

  function heartbeat() {
    send({ cmd: 'CLUSTERD_HEARTBEAT', requests, active: openCount() });
  }
  setInterval(heartbeat, heartbeatMs).unref();

  process.on('uncaughtExceptionMonitor', (err, origin) => {
    const fatal = process.listenerCount('uncaughtException') === 0 &&
      (origin !== 'unhandledRejection' || process.listenerCount('unhandledRejection') === 0);
    if (fatal || !ready) {
      status(`the app failed: ${describe(err)}`);
    }
  });

  // Before the app's first line runs: what READY waits for.
  status(waitingFor() || '');
}());
