// The {{name}} addon: echoes plain text, and answers chat messages
// ({"message":"...","session_id":"..."}) with a reply streamed word by word.

import { ChatStream, ClientMessage, ProtocolError, exportAddon, send, sendError } from "@sockhost/addon-sdk";
import { replyChunks } from "./reply.js";

// One connection's state: one instance of the component serves one connection.
class App {
  onMessage(msg) {
    if (typeof msg !== "string") return send(msg);
    let chat;
    try {
      chat = ClientMessage.parse(msg);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      return e.code === "bad_json" ? send(msg) : sendError(e.code, e.message);
    }
    const reply = new ChatStream(chat.sessionId ?? "");
    for (const chunk of replyChunks(chat.message)) reply.send(chunk);
    reply.finish();
  }
}

export const { handler, channelHandler } = exportAddon(App);
