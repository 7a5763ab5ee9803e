// uWebSockets.js peer for bench/run (the npm repack @trufflesuite/uws-js-unofficial): an
// echo server, or with --stream N a server that answers each text message with N frames
// "<i>:<message>" (like the streamer test addon), or with --fanout the fanout test addon's
// protocol on its own topics: a connection to any path with `?sub=<topic>` is subscribed to
// <topic> (ws.subscribe), and every message a `?pub=<topic>` connection sends is published
// to <topic> unchanged (app.publish: every subscriber, the sender too if it subscribed).
// Usage: NODE_PATH=<dir with node_modules> node uws.js --port 9003 [--stream 10 | --fanout]
'use strict';
const uWS = require('@trufflesuite/uws-js-unofficial');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const port = Number(arg('--port', '9003'));
const frames = Number(arg('--stream', '1'));
const fanout = process.argv.includes('--fanout');

const app = uWS.App();
const behavior = {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 << 20,
  // No idle timeout: the idle-memory scenario holds connections without traffic.
  idleTimeout: 0,
  message: (ws, message, isBinary) => {
    if (frames > 1 && !isBinary) {
      const text = Buffer.from(message).toString();
      for (let i = 0; i < frames; i++) ws.send(`${i}:${text}`, false);
    } else {
      ws.send(message, isBinary);
    }
  },
};
if (fanout) {
  // The query string is only readable during the upgrade: keep sub/pub as user data.
  behavior.upgrade = (res, req, context) => {
    res.upgrade(
      { sub: req.getQuery('sub') || '', pub: req.getQuery('pub') || '' },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  };
  behavior.open = (ws) => {
    const { sub } = ws.getUserData();
    if (sub) ws.subscribe(sub);
  };
  behavior.message = (ws, message, isBinary) => {
    const { pub } = ws.getUserData();
    // app.publish copies the message before returning (the ArrayBuffer is only valid here).
    if (pub) app.publish(pub, message, isBinary);
  };
}
app.ws('/*', behavior).listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uws: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.error(`uws: listening on 127.0.0.1:${port} (${fanout ? 'fanout' : `stream ${frames}`})`);
});
