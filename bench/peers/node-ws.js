// Node `ws` peer for bench/run: an echo server, or with --stream N a server that answers
// each text message with N frames "<i>:<message>" (like the streamer test addon).
// Usage: NODE_PATH=<dir with node_modules/ws> node node-ws.js --port 9002 [--stream 10]
'use strict';
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const port = Number(arg('--port', '9002'));
const frames = Number(arg('--stream', '1'));

// No compression (the default for a ws server), the same 16 MiB message limit as sockhost.
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, maxPayload: 16 << 20 });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (frames > 1 && !isBinary) {
      const text = data.toString();
      for (let i = 0; i < frames; i++) ws.send(`${i}:${text}`);
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
  ws.on('error', () => {});
});
wss.on('listening', () => {
  console.error(`node-ws: listening on 127.0.0.1:${port} (ws ${require('ws/package.json').version}, stream ${frames})`);
});
