// A Node `cluster` primary written the way Node's documentation and the
// popular tutorials write one: fork one worker per CPU, fork a new one when a
// worker dies, and on SIGHUP replace the workers one by one (fork the new one,
// wait for its 'listening', then `disconnect()` the old one, which closes its
// server, `server.close()`, and kill it if it has not exited 2 s later, as the
// docs' `worker.disconnect()` example does). The workers run the app
// unchanged: `require('./server.js')`.
//
//   WORKERS=2 node cluster-master.js APP_DIR/server.js
//
// With STYLE=tutorial it restarts instead the way the popular "zero-downtime
// with Node cluster" tutorials do: each worker in turn is sent 'shutdown',
// calls `server.close()` and exits 0 (or after 10 s, the tutorials' "force
// shutdown" timer, as `server.close()` waits for busy keep-alive
// connections), and only then is its replacement forked (the tutorial's worker code is a message handler in the app; here
// the wrapper below adds it, so the app file stays unchanged).
//
// It prints `restart done` when a rolling restart has finished.
'use strict';
const cluster = require('cluster');
const os = require('os');
const path = require('path');

if (cluster.isPrimary) {
  const count = Number(process.env.WORKERS) || os.availableParallelism();
  console.log(`primary ${process.pid}: forking ${count} workers`);
  for (let i = 0; i < count; i++) {
    cluster.fork();
  }

  const tutorial = process.env.STYLE === 'tutorial';
  cluster.on('exit', (worker, code, signal) => {
    if (tutorial ? code !== 0 || signal : !worker.exitedAfterDisconnect) {
      console.log(`worker ${worker.process.pid} died (${signal || code}), forking a new one`);
      cluster.fork();
    }
  });

  let restarting = false;
  process.on('SIGHUP', async () => {
    if (restarting) {
      return;
    }
    restarting = true;
    if (tutorial) {
      const olds = Object.values(cluster.workers);
      for (const old of olds) {
        if (old.isDead()) {
          continue;
        }
        const exited = new Promise((resolve) => old.once('exit', resolve));
        old.send('shutdown');
        await exited;
        const fresh = cluster.fork();
        await new Promise((resolve) => fresh.once('listening', resolve));
      }
      restarting = false;
      console.log('restart done');
      return;
    }
    for (const old of Object.values(cluster.workers)) {
      if (old.isDead()) {
        continue;
      }
      const fresh = cluster.fork();
      await new Promise((resolve) => fresh.once('listening', resolve));
      const killTimer = setTimeout(() => old.kill(), 2000);
      old.once('exit', () => clearTimeout(killTimer));
      old.disconnect();
      await new Promise((resolve) => old.once('exit', resolve));
    }
    restarting = false;
    console.log('restart done');
  });
} else {
  if (process.env.STYLE === 'tutorial') {
    // The tutorial's worker: on 'shutdown', close the server and exit.
    const http = require('http');
    const servers = [];
    const listen = http.Server.prototype.listen;
    http.Server.prototype.listen = function (...args) {
      servers.push(this);
      return listen.apply(this, args);
    };
    process.on('message', (msg) => {
      if (msg === 'shutdown') {
        setTimeout(() => process.exit(0), 10000).unref();
        let open = servers.length;
        for (const server of servers) {
          server.close(() => {
            open -= 1;
            if (open === 0) {
              process.exit(0);
            }
          });
        }
      }
    });
  }
  require(path.resolve(process.argv[2]));
}
