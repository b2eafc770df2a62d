// The reference peer: a Node `ws` server that sends every message it receives
// to every connected client (the way most Node chat servers are written).
// Usage: node bench/peers/ws-broadcast.mjs <port>   (prints "LISTENING <port>")
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 0);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, clientTracking: true });
wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === 1) client.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => console.log(`LISTENING ${wss.address().port}`));
