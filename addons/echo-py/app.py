"""The example addon in Python: the same behaviour as addons/echo (Rust). Echoes every
frame back, and answers chat messages with a reply streamed in chunks, the way a chat
backend would."""

from sockhost_addon import ChatStream, ClientMessage, ProtocolError, export_addon, send, send_error, send_text


class Echo:
    """Keeps no state: it hibernates as ``{}``, and an idle echo connection costs the
    server no instance."""

    def on_message(self, msg):
        if not isinstance(msg, str):
            return send(msg)
        try:
            chat = ClientMessage.parse(msg)
        except ProtocolError as e:
            # Not the chat envelope at all: plain text is echoed unchanged.
            if e.code == "bad_json":
                return send_text(msg)
            return send_error(e.code, str(e))
        if not chat.is_chat():
            return send_error("unsupported_action", f"unsupported action `{chat.action or ''}`")
        reply(chat)


def reply(msg):
    """Streams "Echo: <message>" back in about four chunks, then the closing chunk."""
    chat = ChatStream(msg.session_id or "")
    text = f"Echo: {msg.message}"
    size = -(-len(text) // 4)
    for at in range(0, len(text), size):
        chat.send(text[at:at + size])
    chat.finish()


Handler, ChannelHandler, Hibernation = export_addon(Echo, hibernate=True)
