// Node `ws` peer for bench/run: an echo server, or with --stream N a server that answers
// each text message with N frames "<i>:<message>" (like the streamer test addon), or with
// --fanout the fanout test addon's protocol the way a plain `ws` application does it: a
// connection to any path with `?sub=<topic>` joins <topic> (a Map of topic -> Set of
// sockets), and every message a `?pub=<topic>` connection sends is sent, unchanged, to each
// socket in that set in a loop.
// Usage: NODE_PATH=<dir with node_modules/ws> node node-ws.js --port 9002 [--stream 10 | --fanout]
'use strict';
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const port = Number(arg('--port', '9002'));
const frames = Number(arg('--stream', '1'));
const fanout = process.argv.includes('--fanout');
const topics = new Map(); // topic -> Set of sockets (--fanout)

// No compression (the default for a ws server), the same 16 MiB message limit as sockhost.
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, maxPayload: 16 << 20 });
wss.on('connection', (ws, req) => {
  ws.on('error', () => {});
  if (fanout) {
    const query = new URL(req.url, 'ws://localhost').searchParams;
    const sub = query.get('sub');
    const pub = query.get('pub');
    if (sub) {
      let set = topics.get(sub);
      if (!set) topics.set(sub, (set = new Set()));
      set.add(ws);
      ws.on('close', () => set.delete(ws));
    }
    if (pub) {
      ws.on('message', (data, isBinary) => {
        const set = topics.get(pub);
        if (!set) return;
        for (const peer of set) peer.send(data, { binary: isBinary });
      });
    }
    return;
  }
  ws.on('message', (data, isBinary) => {
    if (frames > 1 && !isBinary) {
      const text = data.toString();
      for (let i = 0; i < frames; i++) ws.send(`${i}:${text}`);
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => {
  console.error(
    `node-ws: listening on 127.0.0.1:${port} (ws ${require('ws/package.json').version}, ${fanout ? 'fanout' : `stream ${frames}`})`,
  );
});
