// The chat of Socket.IO's tutorial (https://socket.io/docs/v4/tutorial/),
// with the Redis adapter of its "scaling horizontally" step so that a
// message reaches the clients of every server process. Nothing in here knows
// about clusterd: run it alone with `node index.js` (port 3000, or PORT, or
// the first argument), or under clusterd, unchanged, with chat.conf.
const express = require('express');
const { createServer } = require('node:http');
const { join } = require('node:path');
const { Server } = require('socket.io');
const { createClient } = require('redis');
const { createAdapter } = require('@socket.io/redis-adapter');

const port = process.env.PORT || process.argv[2] || 3000;

async function main() {
  const pubClient = createClient({ url: process.env.REDIS_URL || 'redis://localhost:6379' });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const app = express();
  const server = createServer(app);
  const io = new Server(server, {
    adapter: createAdapter(pubClient, subClient),
  });

  app.get('/', (req, res) => {
    res.sendFile(join(__dirname, 'index.html'));
  });

  io.on('connection', (socket) => {
    socket.on('chat message', (msg) => {
      io.emit('chat message', msg);
    });
  });

  server.listen(port, () => {
    console.log(`server running at http://localhost:${port}`);
  });
}

main();
