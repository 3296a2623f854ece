// Chat clients for tests and benchmarks (not part of the app): socket.io-
// client with its default transports (HTTP long-polling, then the upgrade to
// WebSocket), the way a browser on index.html connects.
//
//   node clients.js chat URL N
//     N chat clients. Each prints one JSON line per event on stdout:
//       {"event":"connect","client":I,"sid":SID,"worker":W}  (W: the part of
//            the engine.io session id before the dot, clusterd's worker id)
//       {"event":"upgrade","client":I,"sid":SID}       now on WebSocket
//       {"event":"connect_error","client":I,"message":TEXT}
//       {"event":"disconnect","client":I,"sid":SID,"reason":R,"code":CODE,
//        "detail":TEXT}  (CODE: the WebSocket close code, null on long-polling;
//            TEXT: for a transport error, what failed: "xhr poll error 400")
//     and reads commands on stdin, one a line:
//       send R    every connected client says {"from":I,"round":R}
//                 -> {"event":"sent","round":R,"from":[I...]}
//       check R   -> {"event":"check","round":R,"sent":S,"missing":M,
//                     "examples":[[CLIENT,FROM]...]}: M messages of round R
//                 that some client has not received (yet)
//       status    -> {"event":"status","connected":C,"websocket":W}
//     Clients reconnect by themselves (Socket.IO's defaults). Ends when stdin
//     closes. CHAT_TRANSPORTS=polling (or websocket) limits the transports.
//
//   node clients.js handshakes URL SECONDS CONCURRENCY
//     For SECONDS, CONCURRENCY loops each connect a client, wait until it is
//     upgraded to WebSocket, and disconnect it; prints
//       {"handshakes":N,"errors":{WHAT:COUNT...},"seconds":S,"rate":N/S}
//     (N: the clients upgraded within the SECONDS)
'use strict';
const { io } = require('socket.io-client');

const [mode, url, ...rest] = process.argv.slice(2);

function out(fields) {
  process.stdout.write(`${JSON.stringify(fields)}\n`);
}

function workerOf(sid) {
  const dot = typeof sid === 'string' ? sid.indexOf('.') : -1;
  return dot > 0 ? sid.slice(0, dot) : null;
}

function chat(n) {
  // CHAT_TRANSPORTS=polling or =websocket: one transport only (for tests).
  const transports = process.env.CHAT_TRANSPORTS ? process.env.CHAT_TRANSPORTS.split(',') : null;
  const clients = [];
  const sent = new Map(); // round -> senders
  for (let i = 0; i < n; i++) {
    const socket = io(url, transports ? { forceNew: true, transports } : { forceNew: true });
    const c = { socket, got: new Map(), sid: null }; // got: round -> Set of senders received
    clients.push(c);
    socket.on('connect', () => {
      const engine = socket.io.engine;
      c.sid = engine.id;
      out({ event: 'connect', client: i, sid: engine.id, worker: workerOf(engine.id) });
      engine.once('upgrade', () => out({ event: 'upgrade', client: i, sid: engine.id }));
    });
    socket.on('connect_error', (err) => out({
      event: 'connect_error', client: i, message: `${err && err.message} ${err && err.description}`,
    }));
    socket.on('disconnect', (reason, details) => {
      const code = details && details.context && typeof details.context.code === 'number'
        ? details.context.code : null;
      // What failed, for a transport error: "xhr poll error 400".
      const detail = details instanceof Error ? `${details.message} ${details.description}` : null;
      out({ event: 'disconnect', client: i, sid: c.sid, reason, code, detail });
    });
    socket.on('chat message', (msg) => {
      if (!msg || typeof msg !== 'object') {
        return;
      }
      let set = c.got.get(msg.round);
      if (!set) {
        set = new Set();
        c.got.set(msg.round, set);
      }
      set.add(msg.from);
    });
  }
  const commands = require('readline').createInterface({ input: process.stdin });
  commands.on('line', (line) => {
    const [cmd, arg] = line.trim().split(/\s+/);
    const round = Number(arg);
    if (cmd === 'send') {
      const from = [];
      clients.forEach((c, i) => {
        if (c.socket.connected) {
          c.socket.emit('chat message', { from: i, round });
          from.push(i);
        }
      });
      sent.set(round, from);
      out({ event: 'sent', round, from });
    } else if (cmd === 'check') {
      const from = sent.get(round) || [];
      let missing = 0;
      const examples = [];
      clients.forEach((c, i) => {
        const got = c.got.get(round) || new Set();
        for (const f of from) {
          if (!got.has(f)) {
            missing += 1;
            if (examples.length < 10) {
              examples.push([i, f]);
            }
          }
        }
      });
      out({ event: 'check', round, sent: from.length, missing, examples });
    } else if (cmd === 'status') {
      const connected = clients.filter((c) => c.socket.connected);
      const websocket = connected.filter((c) => c.socket.io.engine.transport.name === 'websocket');
      out({ event: 'status', connected: connected.length, websocket: websocket.length });
    }
  });
  commands.on('close', () => process.exit(0));
}

function handshakes(seconds, concurrency) {
  const started = Date.now();
  const end = started + seconds * 1000;
  let done = 0; // upgraded within the window
  const errors = {}; // what went wrong -> how many times
  let running = 0;
  const finishAll = () => {
    out({ handshakes: done, errors, seconds, rate: done / seconds });
    process.exit(0);
  };
  const one = () => {
    if (Date.now() >= end) {
      running -= 1;
      if (running === 0) {
        finishAll();
      }
      return;
    }
    const socket = io(url, { forceNew: true, reconnection: false });
    let finished = false;
    const finish = (error) => {
      if (finished) {
        return;
      }
      finished = true;
      clearTimeout(timer);
      if (error === null) {
        if (Date.now() <= end) {
          done += 1;
        }
      } else {
        errors[error] = (errors[error] || 0) + 1;
      }
      socket.disconnect();
      setImmediate(one);
    };
    const timer = setTimeout(() => finish('no upgrade within 10 s'), 10000);
    socket.on('connect', () => {
      const engine = socket.io.engine;
      if (engine.transport.name === 'websocket') {
        finish(null);
      } else {
        engine.once('upgrade', () => finish(null));
        engine.once('upgradeError', (e) => finish(`upgrade error: ${e && e.message}`));
      }
    });
    socket.on('connect_error', (e) => finish(`connect_error: ${e && e.message}`));
    socket.on('disconnect', (reason) => finish(`disconnect: ${reason}`));
  };
  for (let i = 0; i < concurrency; i++) {
    running += 1;
    one();
  }
  // Stragglers past the window do not hold the report for long.
  setTimeout(finishAll, seconds * 1000 + 12000).unref();
}

if (mode === 'chat') {
  chat(Number(rest[0]));
} else if (mode === 'handshakes') {
  handshakes(Number(rest[0]), Number(rest[1]));
} else {
  process.stderr.write('usage: node clients.js chat URL N | handshakes URL SECONDS CONCURRENCY\n');
  process.exit(2);
}
