"""Write sockhost addons in Python.

An addon is a class whose instance is one connection's state; ``export_addon`` turns it
into the classes componentize-py looks for in the app module (``Handler``,
``ChannelHandler`` and, for the world ``hibernating``, ``Hibernation``)::

    from sockhost_addon import export_addon, send_text

    class Shout:
        def __init__(self):
            self.seen = 0

        def on_message(self, msg):
            self.seen += 1
            if isinstance(msg, str):
                send_text(f"{self.seen}: {msg.upper()}")

    Handler, ChannelHandler = export_addon(Shout)

The model is the Rust SDK's (``addon-sdk/src/lib.rs``), in Python's terms:

- The server makes one instance of the component per connection, so the class instance,
  and every module global, belongs to one connection. It is made (``Shout()``) when the
  connection opens.
- Callbacks never overlap: ``on_open(info)`` once, ``on_message(msg)`` once per client
  message in arrival order, ``on_channel_message(channel, msg)`` per channel delivery,
  ``on_close(code, reason)`` once. Every one is optional. A message is a ``str`` (text
  frame) or ``bytes`` (binary frame).
- ``send``, ``send_text``, ``send_binary`` and ``send_json`` push a frame to the client at
  once, from any callback, any number of times: that is how replies stream.
- An exception raised by ``on_message`` is reported to the client as
  ``{"type":"error","message":<str(exception)>,"code":"addon_error"}``, and the connection
  stays open (the Rust SDK's ``Err``). ``trap(reason)`` is the Rust SDK's panic: the
  instance stops, the client gets ``"code":"addon_trap"`` and close 1011. An exception in
  ``on_channel_message`` or ``on_close``, which have no error result, is such a trap too.
- ``on_open`` refuses the connection by raising ``Refusal(code, reason)``.

The host calls are the WIT imports of ``sockhost:addon@0.1.4``, bound by componentize-py
as the ``wit_world`` package when the addon is built (``scripts/build-addons``).
"""

import json
import re

from componentize_py_types import Err
from wit_world.imports import channels as _channels
from wit_world.imports import config as _config
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import session as _session
from wit_world.imports import sockhost_addon_types as _types

__all__ = [
    "ChatStream", "ClientMessage", "ConnectionInfo", "HostError", "ProtocolError", "Refusal",
    "SendError", "channels", "chat_message", "close", "config", "connection_info",
    "error_message", "export_addon", "kv", "log", "send", "send_binary", "send_chat_chunk",
    "send_error", "send_json", "send_system", "send_text", "system_message", "trap",
]

# ---- sending ------------------------------------------------------------------------------


class SendError(Exception):
    """Why a frame could not be sent: ``code`` is ``"closed"`` or ``"too-large"``."""

    def __init__(self, code):
        super().__init__("the connection is closed" if code == "closed" else "the frame is too large to send")
        self.code = code


def _send_error(err):
    return SendError("closed" if err.value == _session.SendError.CLOSED else "too-large")


def send_text(text):
    """Sends one text frame; waits while the client is slow to read. Raises ``SendError``."""
    try:
        _session.send_text(str(text))
    except Err as e:
        raise _send_error(e) from None


def send_binary(data):
    """Sends one binary frame (``bytes``, ``bytearray`` or ``memoryview``). Raises ``SendError``."""
    try:
        _session.send_binary(bytes(data))
    except Err as e:
        raise _send_error(e) from None


def send(message):
    """Sends a ``str`` as a text frame, anything else as a binary frame."""
    if isinstance(message, str):
        send_text(message)
    else:
        send_binary(message)


def send_json(value):
    """Sends ``value`` as JSON in one text frame (compact, UTF-8 as is: what serde_json writes)."""
    send_text(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))


def close(code, reason=""):
    """Starts closing the connection; later sends raise ``SendError("closed")``."""
    _session.close(_types.CloseFrame(code=code, reason=reason))


def connection_info():
    """The connection's info, as ``on_open`` received it."""
    return ConnectionInfo(_session.info())


# ---- connection life cycle ----------------------------------------------------------------


class ConnectionInfo:
    """What the host knows about the connection."""

    def __init__(self, raw):
        #: Unique within one server process; the host's log calls it ``conn``.
        self.id = raw.id
        self.addon = raw.addon
        self.path = raw.path
        self.query = raw.query
        self.remote_address = raw.remote_address
        #: ``(name, value)`` pairs, names in lowercase, in request order.
        self.headers = list(raw.headers)

    def header(self, name):
        """The first value of header ``name`` (any case), or ``None``."""
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)

    def query_param(self, name):
        """The first value of query parameter ``name``, percent-decoded (``+`` is a space), or ``None``."""
        for pair in self.query.split("&"):
            key, _, value = pair.partition("=")
            if _percent_decode(key) == name:
                return _percent_decode(value)
        return None


def _percent_decode(text):
    raw = text.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        hexdigits = raw[i + 1:i + 3]
        if byte == 0x2B:
            out.append(0x20)
        elif byte == 0x25 and i + 2 < len(raw) and all(chr(b) in "0123456789abcdefABCDEF" for b in hexdigits):
            out.append(int(hexdigits, 16))
            i += 2
        else:
            out.append(byte)
        i += 1
    return out.decode("utf-8", errors="replace")


class Refusal(Exception):
    """Raised from ``on_open`` to refuse the connection with a close code and reason."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @classmethod
    def policy_violation(cls, reason):
        """1008 (policy violation): the generic "not allowed"."""
        return cls(1008, reason)


class _Trap(BaseException):
    """Raised by ``trap``; a BaseException, so ``except Exception`` in addons lets it pass."""


def trap(reason):
    """Stops this instance at once, like a panic in Rust: the client gets an ``addon_trap``
    error frame and close 1011, and the instance is never entered again. For states the
    addon cannot go on from; for a failed message, raise an ordinary exception instead."""
    _log.log(_log.Level.ERROR, f"trap: {reason}")
    raise _Trap(reason)


def _message(raw):
    return raw.value if isinstance(raw, _types.Message_Text) else bytes(raw.value)


def export_addon(addon_class, hibernate=False):
    """The classes componentize-py exports for ``addon_class``: ``(Handler, ChannelHandler)``,
    or ``(Handler, ChannelHandler, Hibernation)`` with ``hibernate=True`` (build with the
    world ``hibernating``). Bind them in the app module::

        Handler, ChannelHandler = export_addon(MyAddon)

    Hibernation saves the instance's ``__dict__`` as JSON and restores it into a fresh
    ``addon_class.__new__`` object on wake (``__init__`` is not called again); an
    ``on_wake()`` method, when there is one, runs after that.
    """
    state = {"addon": None}

    def current():
        if state["addon"] is None:
            state["addon"] = addon_class()
        return state["addon"]

    class Handler:
        def on_open(self, info):
            fresh = addon_class()
            if hasattr(fresh, "on_open"):
                try:
                    fresh.on_open(ConnectionInfo(info))
                except Refusal as refusal:
                    raise Err(_types.CloseFrame(code=refusal.code, reason=str(refusal.reason))) from None
            state["addon"] = fresh

        def on_message(self, msg):
            target = current()
            if not hasattr(target, "on_message"):
                return
            try:
                target.on_message(_message(msg))
            except MemoryError:
                # The host refused to grow memory past the manifest's memory_limit: the
                # instance is at its limit, so it ends as a Rust addon would, in a trap the
                # host names addon_oom.
                raise
            except Exception as e:  # noqa: BLE001 - every other exception is the message's error frame
                raise Err(str(e)) from None

        def on_close(self, code, reason):
            target = state["addon"] or addon_class()
            state["addon"] = None
            if hasattr(target, "on_close"):
                target.on_close(code, reason)

    class ChannelHandler:
        def on_channel_message(self, channel, msg):
            target = current()
            if hasattr(target, "on_channel_message"):
                target.on_channel_message(channel, _message(msg))

    if not hibernate:
        return Handler, ChannelHandler

    name = addon_class.__name__

    class Hibernation:
        def hibernate(self):
            if state["addon"] is None:
                return b""
            try:
                return json.dumps(vars(state["addon"]), ensure_ascii=False, allow_nan=False).encode()
            except (TypeError, ValueError) as e:
                trap(f"hibernate: the state of {name} cannot be written as JSON: {e}")

        def wake(self, data):
            if not data:
                state["addon"] = None
                return
            try:
                saved = json.loads(bytes(data).decode())
            except ValueError as e:
                trap(f"wake: {len(data)} bytes are not a state of {name} ({e})")
            addon = addon_class.__new__(addon_class)
            vars(addon).update(saved)
            state["addon"] = addon
            if hasattr(addon, "on_wake"):
                addon.on_wake()

    return Handler, ChannelHandler, Hibernation


# ---- the chat envelope (the Rust SDK's ``protocol`` module) ----------------------------------


class ProtocolError(Exception):
    """Why a text frame is not a valid client message: ``code`` is ``"bad_json"`` or ``"missing_field"``."""

    def __init__(self, code, detail):
        super().__init__(f"invalid JSON message: {detail}" if code == "bad_json" else f"missing field `{detail}`")
        self.code = code


# What serde_json, which the Rust SDK parses with, checks: the JSON syntax, and for the
# object's own keys and its four fields (not for values it ignores, however deep or odd),
# that strings hold no lone surrogate and that no field comes twice.
_FIELDS = ("message", "token", "session_id", "action")
_OBJECT_TEXT = re.compile(r"[ \t\n\r]*\{.*\}[ \t\n\r]*\Z", re.DOTALL)


class _Object(dict):
    """A JSON object that remembers which of the envelope's fields it saw twice."""

    duplicate = None


def _object(pairs):
    obj = _Object()
    for key, value in pairs:
        if key in obj and key in _FIELDS and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _well_formed(text):
    try:
        text.encode("utf-8")  # a lone surrogate does not encode
    except UnicodeEncodeError:
        return False
    return True


class ClientMessage:
    """A message from a chat client: ``{"message", "token"?, "session_id"?, "action"?}``.

    ``ClientMessage.parse(text)`` accepts exactly what the Rust SDK's
    ``ClientMessage::parse`` accepts, so addons in every language agree on what is a chat
    message."""

    def __init__(self, message, token=None, session_id=None, action=None):
        self.message = message  #: What the user typed.
        self.token = token  #: The user's credential, when sent; checking it is up to the addon.
        self.session_id = session_id  #: The conversation; replies carry it back.
        self.action = action  #: What the client asks for; clients send ``"chat"``.

    @classmethod
    def parse(cls, text):
        """Parses one text frame; raises ``ProtocolError``."""
        # serde_json allows only JSON's four whitespace characters around the object.
        if not _OBJECT_TEXT.match(text):
            raise ProtocolError("bad_json", "not a JSON object")
        try:
            value = json.loads(
                text,
                object_pairs_hook=_object,
                # Numbers are only ever in values serde_json ignores, which it does not
                # convert either: none is refused for its size.
                parse_float=lambda _: 0.0,
                parse_int=lambda _: 0,
                parse_constant=_refuse_constant,
            )
        except (ValueError, RecursionError) as e:
            raise ProtocolError("bad_json", str(e)) from None
        if not isinstance(value, dict):
            raise ProtocolError("bad_json", "not a JSON object")
        if not all(_well_formed(key) for key in value):
            raise ProtocolError("bad_json", "lone surrogate in a key")
        if value.duplicate is not None:
            raise ProtocolError("bad_json", f"duplicate field `{value.duplicate}`")
        for field in _FIELDS:
            if value.get(field) is not None and not isinstance(value[field], str):
                raise ProtocolError("bad_json", f"invalid type for `{field}`, expected a string")
            if isinstance(value.get(field), str) and not _well_formed(value[field]):
                raise ProtocolError("bad_json", f"lone surrogate in `{field}`")
        if value.get("message") is None:
            raise ProtocolError("missing_field", "message")
        return cls(value["message"], value.get("token"), value.get("session_id"), value.get("action"))

    def is_chat(self):
        """Whether the client asks for a chat reply: ``action`` is ``"chat"`` or absent."""
        return self.action is None or self.action == "chat"


def chat_message(session_id, message, complete):
    """A chat reply chunk: ``{"type":"chat","message","session_id","complete"}``."""
    return {"type": "chat", "message": message, "session_id": session_id, "complete": complete}


def error_message(code, message):
    """An error frame: ``{"type":"error","message","code"}``."""
    return {"type": "error", "message": message, "code": code}


def system_message(message):
    """A system notice: ``{"type":"system","message"}``."""
    return {"type": "system", "message": message}


def send_chat_chunk(session_id, text, complete):
    """Sends one chunk of a chat reply (``complete`` marks the reply's last chunk)."""
    send_json(chat_message(session_id, text, complete))


def send_error(code, message):
    """Sends an error frame, e.g. ``send_error("unsupported_action", "unknown action: ping")``."""
    send_json(error_message(code, message))


def send_system(message):
    """Sends a system notice."""
    send_json(system_message(message))


class ChatStream:
    """A chat reply streamed in chunks for one session: ``send`` each piece as it is ready,
    then ``finish()``, which sends the empty ``complete: true`` chunk that ends the reply."""

    def __init__(self, session_id):
        self.session_id = session_id

    def send(self, text):
        send_chat_chunk(self.session_id, text, False)

    def finish(self):
        send_chat_chunk(self.session_id, "", True)


# ---- host capabilities -------------------------------------------------------------------
# Each is denied unless the addon's manifest (addons/<name>.toml) grants it; see
# wit/addon.wit for the rules and limits.


class HostError(Exception):
    """Why a kv or channel call failed: ``kind`` is the WIT variant's case (``denied``,
    ``invalid``, ``backend``, ``too-large``, ``unavailable``)."""

    def __init__(self, payload):
        kind = type(payload).__name__.split("_", 1)[-1].lower().replace("toolarge", "too-large")
        detail = getattr(payload, "value", None)
        super().__init__(kind if detail is None else f"{kind}: {detail}")
        self.kind = kind


def _host(call, *args):
    try:
        return call(*args)
    except Err as e:
        raise HostError(e.value) from None


class _Log:
    """The host's log, tagged with the addon and connection: ``log.info("...")``."""

    def trace(self, text):
        _log.log(_log.Level.TRACE, str(text))

    def debug(self, text):
        _log.log(_log.Level.DEBUG, str(text))

    def info(self, text):
        _log.log(_log.Level.INFO, str(text))

    def warn(self, text):
        _log.log(_log.Level.WARN, str(text))

    def error(self, text):
        _log.log(_log.Level.ERROR, str(text))


log = _Log()


def _bytes(value):
    return value.encode() if isinstance(value, str) else bytes(value)


class _Kv:
    """Storage shared by the addon's connections (``kv = true``). Values are bytes; a ``str``
    is stored as UTF-8."""

    def get(self, key):
        return _host(_kv.get, key)

    def set(self, key, value, ttl_ms=None):
        _host(_kv.set, key, _bytes(value), ttl_ms)

    def delete(self, key):
        return _host(_kv.delete, key)

    def list_keys(self, prefix, start_after=None, limit=1000):
        return _host(_kv.list_keys, prefix, start_after, limit)


kv = _Kv()


class _Config:
    """The manifest's ``[config]`` table: strings as they are, other values as JSON text."""

    def get(self, key):
        return _config.get(key)

    def keys(self):
        return _config.keys()


config = _Config()


class _Channels:
    """Channels shared by the addon's connections (``[channels]`` grants); deliveries reach
    ``on_channel_message``."""

    def subscribe(self, channel):
        _host(_channels.subscribe, channel)

    def unsubscribe(self, channel):
        _channels.unsubscribe(channel)

    def publish(self, channel, message):
        msg = _types.Message_Text(message) if isinstance(message, str) else _types.Message_Binary(bytes(message))
        _host(_channels.publish, channel, msg)


channels = _Channels()
