"""The {{name}} addon: echoes plain text, and answers chat messages
(``{"message":"...","session_id":"..."}``) with a reply streamed word by word."""

from sockhost_addon import ChatStream, ClientMessage, ProtocolError, export_addon, send, send_error

from reply import reply_chunks


class App:
    """One connection's state: one instance of the component serves one connection."""

    def on_message(self, msg):
        if not isinstance(msg, str):
            return send(msg)
        try:
            chat = ClientMessage.parse(msg)
        except ProtocolError as e:
            return send(msg) if e.code == "bad_json" else send_error(e.code, str(e))
        reply = ChatStream(chat.session_id or "")
        for chunk in reply_chunks(chat.message):
            reply.send(chunk)
        reply.finish()


Handler, ChannelHandler = export_addon(App)
