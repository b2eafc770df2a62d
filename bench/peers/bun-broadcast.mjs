// Bun's built-in WebSocket pub/sub (uWebSockets inside), written the way its docs show a
// broadcast server: every client subscribes to one topic, every message is published to it.
// Usage: bun bench/peers/bun-broadcast.mjs <port>   (prints "LISTENING <port>")
// The binary comes from the npm package @oven/bun-linux-x64 (node_modules/@oven/bun-linux-x64/bin/bun).
const port = Number(process.argv[2] ?? 0);
const server = Bun.serve({
  hostname: '127.0.0.1',
  port,
  fetch(req, srv) {
    if (srv.upgrade(req)) return undefined;
    return new Response('upgrade required', { status: 426 });
  },
  websocket: {
    perMessageDeflate: false,
    open(ws) {
      ws.subscribe('all');
    },
    message(ws, message) {
      server.publish('all', message);
    },
  },
});
console.log(`LISTENING ${server.port}`);
