// For comparison (the benchmark's `socketio` section): index.js, unchanged,
// on Node's `cluster` module: the primary accepts and hands connections to
// the workers round-robin (Node's default scheduling on Linux). Plain HTTP
// only: without sticky sessions Socket.IO's long-polling fails on more than
// one worker. Workers: WORKERS (default: one per CPU); port: PORT.
const cluster = require('node:cluster');
const { join } = require('node:path');
const numCPUs = Number(process.env.WORKERS) || require('node:os').availableParallelism();

cluster.schedulingPolicy = cluster.SCHED_RR;
cluster.setupPrimary({ exec: join(__dirname, 'index.js') });
for (let i = 0; i < numCPUs; i++) {
  cluster.fork();
}
cluster.on('exit', (worker) => {
  console.log(`Worker ${worker.process.pid} died`);
  cluster.fork();
});
