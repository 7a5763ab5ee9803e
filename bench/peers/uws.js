// uWebSockets.js peer for bench/run (the npm repack @trufflesuite/uws-js-unofficial): an
// echo server, or with --stream N a server that answers each text message with N frames
// "<i>:<message>" (like the streamer test addon).
// Usage: NODE_PATH=<dir with node_modules> node uws.js --port 9003 [--stream 10]
'use strict';
const uWS = require('@trufflesuite/uws-js-unofficial');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const port = Number(arg('--port', '9003'));
const frames = Number(arg('--stream', '1'));

uWS.App()
  .ws('/*', {
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
  })
  .listen('127.0.0.1', port, (token) => {
    if (!token) {
      console.error(`uws: cannot listen on 127.0.0.1:${port}`);
      process.exit(1);
    }
    console.error(`uws: listening on 127.0.0.1:${port} (stream ${frames})`);
  });
