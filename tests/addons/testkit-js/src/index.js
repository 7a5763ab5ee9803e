// The JavaScript addon the end-to-end tests (tests/e2e/polyglot.rs) drive: what the
// example addon must not do. Commands: count, error (throws: addon_error), trap (the
// SDK's trap: addon_trap), spin (a busy loop that never ends: addon_timeout), memory
// (allocates until the host refuses: addon_oom), info, close, log. `?refuse=1` refuses
// the connection. It hibernates: `count` survives, which the tests watch.

import { Refusal, close, connectionInfo, exportAddon, log, sendJson, sendText, trap } from "@sockhost/addon-sdk";

class Testkit {
  count = 0;

  onOpen(info) {
    if (info.queryParam("refuse") === "1") throw new Refusal(4003, "refused by testkit-js");
    sendText("open");
  }

  onMessage(msg) {
    switch (msg) {
      case "count":
        this.count += 1;
        return sendText(String(this.count));
      case "error":
        throw new Error("testkit-js: asked to fail");
      case "trap":
        return trap("testkit-js: asked to trap");
      case "spin":
        for (;;) {}
      case "memory": {
        const hoard = [];
        for (;;) hoard.push(new Array(1 << 16).fill(hoard.length));
      }
      case "info": {
        const info = connectionInfo();
        return sendJson({ id: Number(info.id), addon: info.addon, path: info.path, query: info.query });
      }
      case "close":
        return close(4000, "bye");
      case "log":
        log.info("testkit-js log line");
        return sendText("logged");
      default:
        throw new Error(`testkit-js: unknown command ${JSON.stringify(msg)}`);
    }
  }

  onClose(code, reason) {
    log.info(`testkit-js on-close code=${code} reason=${reason}`);
  }
}

export const { handler, channelHandler, hibernation } = exportAddon(Testkit, { hibernate: true });
