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

  cluster.on('exit', (worker, code, signal) => {
    if (!worker.exitedAfterDisconnect) {
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
  require(path.resolve(process.argv[2]));
}
