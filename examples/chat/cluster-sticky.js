// For comparison (the benchmark's `socketio` section): the same chat under
// Node's `cluster` module with `@socket.io/sticky`, set up the way its README
// documents it: the primary owns the port and passes each connection's
// first bytes to a worker over IPC (setupMaster), the workers feed them to
// their server (setupWorker). The Redis adapter as in index.js. Workers:
// WORKERS (default: one per CPU); port: PORT (default 3000).
const cluster = require('node:cluster');
const http = require('node:http');
const { join } = require('node:path');
const numCPUs = Number(process.env.WORKERS) || require('node:os').availableParallelism();
const { setupMaster, setupWorker } = require('@socket.io/sticky');

if (cluster.isPrimary) {
  const httpServer = http.createServer();
  setupMaster(httpServer, {
    loadBalancingMethod: 'least-connection',
  });
  httpServer.listen(process.env.PORT || 3000);
  cluster.setupPrimary({
    serialization: 'advanced', // prevents conversion of Node.js Buffer to string over IPC
  });
  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }
  cluster.on('exit', (worker) => {
    console.log(`Worker ${worker.process.pid} died`);
    cluster.fork();
  });
} else {
  const express = require('express');
  const { Server } = require('socket.io');
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');

  (async () => {
    const pubClient = createClient({ url: process.env.REDIS_URL || 'redis://localhost:6379' });
    const subClient = pubClient.duplicate();
    await Promise.all([pubClient.connect(), subClient.connect()]);

    const app = express();
    const httpServer = http.createServer(app);
    const io = new Server(httpServer, {
      adapter: createAdapter(pubClient, subClient),
    });
    setupWorker(io);

    app.get('/', (req, res) => {
      res.sendFile(join(__dirname, 'index.html'));
    });

    io.on('connection', (socket) => {
      socket.on('chat message', (msg) => {
        io.emit('chat message', msg);
      });
    });
  })();
}
