// @sockhost/addon-sdk: write sockhost addons in JavaScript.
//
// An addon is a class whose instance is one connection's state; `exportAddon` turns it
// into the exports of the WIT world `sockhost:addon/addon` (or `hibernating`), which the
// module re-exports for componentize-js:
//
//     import { exportAddon, sendText } from "@sockhost/addon-sdk";
//
//     class Shout {
//       seen = 0;
//       onMessage(msg) {
//         this.seen += 1;
//         if (typeof msg === "string") sendText(`${this.seen}: ${msg.toUpperCase()}`);
//       }
//     }
//
//     export const { handler, channelHandler } = exportAddon(Shout);
//
// The model is the Rust SDK's (addon-sdk/src/lib.rs), in JavaScript's terms:
// - The server makes one instance of the component per connection, so the class
//   instance, and every module-level variable, belongs to one connection. It is made
//   with `new` when the connection opens.
// - Callbacks never overlap: `onOpen(info)` once, `onMessage(msg)` once per client
//   message in arrival order, `onChannelMessage(channel, msg)` per channel delivery,
//   `onClose(code, reason)` once. Every one is optional. A message is a `string` (text
//   frame) or a `Uint8Array` (binary frame). Callbacks are synchronous functions, as are
//   the host calls: a returned Promise is not awaited.
// - `send`, `sendText`, `sendBinary`, `sendJson` push a frame to the client at once, from
//   any callback, any number of times: that is how replies stream.
// - An exception thrown by `onMessage` is reported to the client as
//   `{"type":"error","message":<its message>,"code":"addon_error"}` and the connection
//   stays open (the Rust SDK's `Err`). `trap(reason)` is the Rust SDK's panic: the
//   instance stops, the client gets `"code":"addon_trap"` and close 1011. An exception in
//   `onChannelMessage` or `onClose`, which have no error result, is such a trap too.
// - `onOpen` refuses the connection by throwing a `Refusal` (close code and reason).
//
// The host calls are the WIT imports `sockhost:addon/*@0.1.4`, which componentize-js
// links to the host; this module is bundled into the addon by scripts/build-addons.

import * as session from "sockhost:addon/session@0.1.4";
import * as hostLog from "sockhost:addon/log@0.1.4";
import * as hostKv from "sockhost:addon/kv@0.1.4";
import * as hostConfig from "sockhost:addon/config@0.1.4";
import * as hostChannels from "sockhost:addon/channels@0.1.4";

// ---- sending ---------------------------------------------------------------------------

/** Why a frame could not be sent: `code` is `"closed"` or `"too-large"`. */
export class SendError extends Error {
  constructor(code) {
    super(code === "closed" ? "the connection is closed" : "the frame is too large to send");
    this.name = "SendError";
    this.code = code;
  }
}

// A host call that returns `result<_, E>` throws an error whose `payload` is `E`.
function hostCall(call, toError) {
  try {
    return call();
  } catch (e) {
    if (e && Object.prototype.hasOwnProperty.call(e, "payload")) throw toError(e.payload);
    throw e;
  }
}

/** Sends one text frame; waits while the client is slow to read. Throws `SendError`. */
export function sendText(text) {
  hostCall(() => session.sendText(String(text)), (code) => new SendError(code));
}

/** Sends one binary frame (a `Uint8Array`, `ArrayBuffer` or typed array). Throws `SendError`. */
export function sendBinary(data) {
  hostCall(() => session.sendBinary(toBytes(data)), (code) => new SendError(code));
}

/** Sends a string as a text frame, anything binary as a binary frame. */
export function send(message) {
  if (typeof message === "string") sendText(message);
  else sendBinary(message);
}

/** Sends `value` as JSON in one text frame. */
export function sendJson(value) {
  const json = JSON.stringify(value);
  if (json === undefined) throw new TypeError("sendJson: the value cannot be written as JSON");
  sendText(json);
}

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("sendBinary: expected a Uint8Array, an ArrayBuffer or a typed array");
}

/** Starts closing the connection; later sends throw `SendError("closed")`. */
export function close(code, reason = "") {
  session.close({ code, reason });
}

/** The connection's info, as `onOpen` received it. */
export function connectionInfo() {
  return new ConnectionInfo(session.info());
}

// ---- connection life cycle ---------------------------------------------------------------

/** What the host knows about the connection. */
export class ConnectionInfo {
  constructor(raw) {
    /** Unique within one server process (a BigInt); the host's log calls it `conn`. */
    this.id = raw.id;
    this.addon = raw.addon;
    this.path = raw.path;
    this.query = raw.query;
    this.remoteAddress = raw.remoteAddress;
    /** `[name, value]` pairs, names in lowercase, in request order. */
    this.headers = raw.headers;
  }

  /** The first value of header `name` (any case), or `undefined`. */
  header(name) {
    const lower = name.toLowerCase();
    const found = this.headers.find(([n]) => n.toLowerCase() === lower);
    return found ? found[1] : undefined;
  }

  /** The first value of query parameter `name`, percent-decoded (`+` is a space), or `undefined`. */
  queryParam(name) {
    for (const pair of this.query.split("&")) {
      const at = pair.indexOf("=");
      const [key, value] = at < 0 ? [pair, ""] : [pair.slice(0, at), pair.slice(at + 1)];
      if (percentDecode(key) === name) return percentDecode(value);
    }
    return undefined;
  }
}

function percentDecode(text) {
  const bytes = [];
  const raw = new TextEncoder().encode(text.replace(/\+/g, " "));
  for (let i = 0; i < raw.length; i++) {
    const hex = i + 2 < raw.length ? String.fromCharCode(raw[i + 1], raw[i + 2]) : "";
    if (raw[i] === 0x25 && /^[0-9a-fA-F]{2}$/.test(hex)) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(raw[i]);
    }
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

/** Thrown from `onOpen` to refuse the connection with a close code and reason. */
export class Refusal extends Error {
  constructor(code, reason) {
    super(reason);
    this.name = "Refusal";
    this.code = code;
    this.reason = reason;
  }

  /** 1008 (policy violation): the generic "not allowed". */
  static policyViolation(reason) {
    return new Refusal(1008, reason);
  }
}

/** Thrown by `trap`; never caught by the SDK. */
class Trap extends Error {}

/**
 * Stops this instance at once, like a panic in Rust: the client gets an `addon_trap`
 * error frame and close 1011, and the instance is never entered again. For states the
 * addon cannot go on from; for a failed message, throw an ordinary error instead.
 */
export function trap(reason) {
  hostLog.log("error", `trap: ${reason}`);
  throw new Trap(reason);
}

// A WIT `message` is `{tag: "text", val: string}` or `{tag: "binary", val: Uint8Array}`;
// the addon sees the value, and tells the two apart by its type.
function message(raw) {
  return raw.val;
}

/**
 * The exports of the world `addon` for the class `Addon`: `{ handler, channelHandler }`,
 * plus `hibernation` with `{ hibernate: true }` (build with the world `hibernating`).
 * Re-export them from the addon's entry module:
 *
 *     export const { handler, channelHandler } = exportAddon(MyAddon);
 *
 * Hibernation saves the instance's own enumerable fields as JSON and assigns them to a
 * `new Addon()` on wake; fields that must not be saved can be recomputed in `onWake()`,
 * called after a wake when the class has one.
 */
export function exportAddon(Addon, options = {}) {
  let addon = null;
  const current = () => addon ?? (addon = new Addon());

  const handler = {
    onOpen(info) {
      const fresh = new Addon();
      try {
        if (fresh.onOpen) fresh.onOpen(new ConnectionInfo(info));
      } catch (e) {
        if (e instanceof Refusal) throw { payload: { code: e.code, reason: String(e.reason) } };
        throw e;
      }
      addon = fresh;
    },
    onMessage(raw) {
      const target = current();
      if (!target.onMessage) return;
      try {
        target.onMessage(message(raw));
      } catch (e) {
        if (e instanceof Trap) throw e;
        // The engine reports memory it could not get (the host refused to grow it past
        // the manifest's memory_limit) as a catchable "out of memory". The instance is
        // at its limit, so it ends as a Rust addon would: a trap the host names addon_oom.
        if (errorText(e) === "out of memory") throw new Trap("out of memory");
        // A plain (non-Error) payload is the `err` of on-message: the addon_error frame.
        throw { payload: errorText(e) };
      }
    },
    onClose(code, reason) {
      const target = addon ?? new Addon();
      addon = null;
      if (target.onClose) target.onClose(code, reason);
    },
  };

  const channelHandler = {
    onChannelMessage(channel, raw) {
      const target = current();
      if (target.onChannelMessage) target.onChannelMessage(channel, message(raw));
    },
  };

  if (!options.hibernate) return { handler, channelHandler };

  const name = Addon.name || "addon";
  const hibernation = {
    hibernate() {
      if (addon === null) return new Uint8Array();
      const json = JSON.stringify(addon);
      if (json === undefined) trap(`hibernate: the state of ${name} cannot be written as JSON`);
      return new TextEncoder().encode(json);
    },
    wake(bytes) {
      if (bytes.length === 0) {
        addon = null;
        return;
      }
      let state;
      try {
        state = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
      } catch (e) {
        trap(`wake: ${bytes.length} bytes are not a state of ${name} (${errorText(e)})`);
      }
      addon = Object.assign(new Addon(), state);
      if (addon.onWake) addon.onWake();
    },
  };
  return { handler, channelHandler, hibernation };
}

function errorText(e) {
  if (e instanceof Error) return e.message;
  return String(e);
}

// ---- the chat envelope (the Rust SDK's `protocol` module) ---------------------------------

/** Why a text frame is not a valid client message: `code` is `"bad_json"` or `"missing_field"`. */
export class ProtocolError extends Error {
  constructor(code, detail) {
    super(code === "bad_json" ? `invalid JSON message: ${detail}` : `missing field \`${detail}\``);
    this.name = "ProtocolError";
    this.code = code;
  }
}

// What serde_json, which the Rust SDK parses with, checks: the JSON syntax, and for the
// object's own keys and its four fields (not for values it ignores, however deep or odd),
// that strings hold no lone surrogate and that no field comes twice.
const FIELDS = ["message", "token", "session_id", "action"];

/**
 * A message from a chat client: `{"message", "token"?, "session_id"?, "action"?}`.
 * `ClientMessage.parse(text)` accepts exactly what the Rust SDK's `ClientMessage::parse`
 * accepts, so addons in every language agree on what is a chat message.
 */
export class ClientMessage {
  constructor({ message, token = null, sessionId = null, action = null }) {
    /** What the user typed. */
    this.message = message;
    /** The user's credential, when the client sends one; checking it is up to the addon. */
    this.token = token;
    /** The conversation this message belongs to; replies carry it back. */
    this.sessionId = sessionId;
    /** What the client asks for; clients send `"chat"`. */
    this.action = action;
  }

  /** Parses one text frame; throws `ProtocolError`. */
  static parse(text) {
    // serde_json allows only JSON's four whitespace characters around the object;
    // JSON.parse here also skips others (a byte order mark), so the edges are checked first.
    if (!/^[ \t\n\r]*\{/.test(text) || !/\}[ \t\n\r]*$/.test(text)) {
      throw new ProtocolError("bad_json", "not a JSON object");
    }
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new ProtocolError("bad_json", errorText(e));
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new ProtocolError("bad_json", "not a JSON object");
    }
    for (const key of Object.keys(value)) {
      if (!isWellFormed(key)) throw new ProtocolError("bad_json", "lone surrogate in a key");
    }
    const duplicate = duplicateField(text);
    if (duplicate) throw new ProtocolError("bad_json", `duplicate field \`${duplicate}\``);
    for (const field of FIELDS) {
      const v = value[field];
      if (v !== undefined && v !== null && typeof v !== "string") {
        throw new ProtocolError("bad_json", `invalid type for \`${field}\`, expected a string`);
      }
      if (typeof v === "string" && !isWellFormed(v)) {
        throw new ProtocolError("bad_json", `lone surrogate in \`${field}\``);
      }
    }
    if (value.message === undefined || value.message === null) throw new ProtocolError("missing_field", "message");
    return new ClientMessage({
      message: value.message,
      token: value.token ?? null,
      sessionId: value.session_id ?? null,
      action: value.action ?? null,
    });
  }

  /** Whether the client asks for a chat reply: `action` is `"chat"` or absent. */
  isChat() {
    return this.action === null || this.action === "chat";
  }
}

// No lone UTF-16 surrogate (String.prototype.isWellFormed, written out: the engine
// componentize-js uses has no Unicode property escapes in regular expressions).
function isWellFormed(s) {
  for (let i = 0; i < s.length; i++) {
    const unit = s.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff) {
      const next = s.charCodeAt(i + 1);
      if (!(next >= 0xdc00 && next <= 0xdfff)) return false;
      i += 1;
    } else if (unit >= 0xdc00 && unit <= 0xdfff) {
      return false;
    }
  }
  return true;
}

// JSON.parse keeps the last of repeated keys; serde refuses a repeated known field. This
// walks the top-level keys of text that JSON.parse already accepted.
function duplicateField(text) {
  const seen = new Set();
  let level = 0;
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let end = i + 1;
      while (text[end] !== '"') end += text[end] === "\\" ? 2 : 1;
      if (level === 1 && expectKey) {
        const key = JSON.parse(text.slice(i, end + 1));
        if (FIELDS.includes(key)) {
          if (seen.has(key)) return key;
          seen.add(key);
        }
        expectKey = false;
      }
      i = end;
    } else if (c === "{" || c === "[") {
      level += 1;
      expectKey = level === 1;
    } else if (c === "}" || c === "]") {
      level -= 1;
    } else if (c === "," && level === 1) {
      expectKey = true;
    }
  }
  return null;
}

/** A chat reply chunk: `{"type":"chat","message","session_id","complete"}`. */
export function chatMessage(sessionId, message, complete) {
  return { type: "chat", message, session_id: sessionId, complete };
}

/** An error frame: `{"type":"error","message","code"}`. */
export function errorMessage(code, message) {
  return { type: "error", message, code };
}

/** A system notice: `{"type":"system","message"}`. */
export function systemMessage(message) {
  return { type: "system", message };
}

/** Sends one chunk of a chat reply (`complete` marks the reply's last chunk). */
export function sendChatChunk(sessionId, text, complete) {
  sendJson(chatMessage(sessionId, text, complete));
}

/** Sends an error frame, e.g. `sendError("unsupported_action", "unknown action: ping")`. */
export function sendError(code, message) {
  sendJson(errorMessage(code, message));
}

/** Sends a system notice. */
export function sendSystem(message) {
  sendJson(systemMessage(message));
}

/**
 * A chat reply streamed in chunks for one session: `send` each piece as it is ready,
 * then `finish()`, which sends the empty `complete:true` chunk that ends the reply.
 */
export class ChatStream {
  constructor(sessionId) {
    this.sessionId = sessionId;
  }

  send(text) {
    sendChatChunk(this.sessionId, text, false);
  }

  finish() {
    sendChatChunk(this.sessionId, "", true);
  }
}

// ---- host capabilities -----------------------------------------------------------------
// Each is denied unless the addon's manifest (addons/<name>.toml) grants it; see
// wit/addon.wit for the rules and limits.

/** The host's log, tagged with the addon and connection: `log.info("...")`. */
export const log = {
  trace: (text) => hostLog.log("trace", String(text)),
  debug: (text) => hostLog.log("debug", String(text)),
  info: (text) => hostLog.log("info", String(text)),
  warn: (text) => hostLog.log("warn", String(text)),
  error: (text) => hostLog.log("error", String(text)),
};

/** Why a kv or channel call failed: `kind` is the WIT variant's case, `message` its text. */
export class HostError extends Error {
  constructor(payload) {
    const kind = typeof payload === "string" ? payload : payload.tag;
    const detail = typeof payload === "string" ? undefined : payload.val;
    super(detail === undefined ? kind : `${kind}: ${detail}`);
    this.name = "HostError";
    this.kind = kind;
  }
}

const hostError = (payload) => new HostError(payload);
const encoder = new TextEncoder();
const asBytes = (value) => (typeof value === "string" ? encoder.encode(value) : toBytes(value));

/** Storage shared by the addon's connections (`kv = true`). Values are bytes; strings are stored as UTF-8. */
export const kv = {
  /** The value (`Uint8Array`) or `undefined`. */
  get: (key) => hostCall(() => hostKv.get(key), hostError) ?? undefined,
  /** The value as text, or `undefined`. */
  getText: (key) => {
    const value = kv.get(key);
    return value === undefined ? undefined : new TextDecoder().decode(value);
  },
  set: (key, value, ttlMs) =>
    hostCall(() => hostKv.set(key, asBytes(value), ttlMs === undefined ? undefined : BigInt(ttlMs)), hostError),
  delete: (key) => hostCall(() => hostKv.delete(key), hostError),
  listKeys: (prefix, startAfter, limit = 1000) => hostCall(() => hostKv.listKeys(prefix, startAfter, limit), hostError),
};

/** The manifest's `[config]` table: strings as they are, other values as JSON text. */
export const config = {
  get: (key) => hostConfig.get(key) ?? undefined,
  keys: () => hostConfig.keys(),
};

/** Channels shared by the addon's connections (`[channels]` grants); deliveries reach `onChannelMessage`. */
export const channels = {
  subscribe: (channel) => hostCall(() => hostChannels.subscribe(channel), hostError),
  unsubscribe: (channel) => hostChannels.unsubscribe(channel),
  publish: (channel, message) =>
    hostCall(
      () =>
        hostChannels.publish(
          channel,
          typeof message === "string" ? { tag: "text", val: message } : { tag: "binary", val: toBytes(message) },
        ),
      hostError,
    ),
};
