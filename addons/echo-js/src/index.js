// The example addon in JavaScript: the same behaviour as addons/echo (Rust). Echoes every
// frame back, and answers chat messages with a reply streamed in chunks, the way a chat
// backend would.

import {
  ChatStream,
  ClientMessage,
  ProtocolError,
  exportAddon,
  send,
  sendError,
  sendText,
} from "@sockhost/addon-sdk";

// Echo keeps no state: it hibernates as `{}`, and an idle echo connection costs the server
// no instance.
class Echo {
  onMessage(msg) {
    if (typeof msg !== "string") return send(msg);
    let chat;
    try {
      chat = ClientMessage.parse(msg);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      // Not the chat envelope at all: plain text is echoed unchanged.
      if (e.code === "bad_json") return sendText(msg);
      return sendError(e.code, e.message);
    }
    if (!chat.isChat()) return sendError("unsupported_action", `unsupported action \`${chat.action ?? ""}\``);
    reply(chat);
  }
}

// Streams "Echo: <message>" back in about four chunks, then the closing chunk.
function reply(msg) {
  const chat = new ChatStream(msg.sessionId ?? "");
  // Split by code points, not UTF-16 units: every chunk must be valid UTF-8 on its own.
  const chars = Array.from(`Echo: ${msg.message}`);
  const size = Math.ceil(chars.length / 4);
  for (let at = 0; at < chars.length; at += size) chat.send(chars.slice(at, at + size).join(""));
  chat.finish();
}

export const { handler, channelHandler, hibernation } = exportAddon(Echo, { hibernate: true });
