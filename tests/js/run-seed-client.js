// Preloaded (node --require) before tests/js/seed-client.js, the seed README's client
// example (section 7.1), which must run unchanged. This file only adapts the
// surroundings:
// - the example connects to ws://localhost:8080; the test server listens on
//   127.0.0.1:$SOCKHOST_TEST_PORT, so the URL is rewritten here;
// - the example never exits; once a reply is complete (or after 20 s, as a failure)
//   the process ends.
'use strict';

const port = process.env.SOCKHOST_TEST_PORT;
if (!port) {
  console.error('SOCKHOST_TEST_PORT is not set');
  process.exit(2);
}
// Node 22+ has a browser-style global WebSocket, Node 20 with --experimental-websocket.
// On an older Node the `ws` package (which .ci/run installs then) stands in: it has the
// same constructor and onopen/onmessage/onclose/onerror properties the example uses.
let BaseWebSocket = globalThis.WebSocket;
if (typeof BaseWebSocket !== 'function') {
  try {
    BaseWebSocket = require('ws');
  } catch {
    console.error('no WebSocket client: run Node 22+, Node 20 with --experimental-websocket, or npm install ws in tests/js');
    process.exit(2);
  }
}

class TestWebSocket extends BaseWebSocket {
  constructor(url, protocols) {
    super(String(url).replace('ws://localhost:8080', `ws://127.0.0.1:${port}`), protocols);
    this.addEventListener('message', (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        return;
      }
      if (data.type === 'chat' && data.complete) {
        // Let the example's own handler print first, then end.
        setTimeout(() => {
          this.close(1000, 'done');
          setTimeout(() => process.exit(0), 200);
        }, 0);
      }
    });
  }
}
globalThis.WebSocket = TestWebSocket;

setTimeout(() => {
  console.error('no complete reply within 20 s');
  process.exit(1);
}, 20000).unref();
