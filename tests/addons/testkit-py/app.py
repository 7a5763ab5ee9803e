"""The Python addon the end-to-end tests (tests/e2e/polyglot.rs) drive: what the example
addon must not do. Commands: count, error (raises: addon_error), trap (the SDK's trap:
addon_trap), spin (a busy loop that never ends: addon_timeout), memory (allocates until
the host refuses: addon_oom), info, close, log. ``?refuse=1`` refuses the connection.
It hibernates: ``count`` survives, which the tests watch."""

from sockhost_addon import Refusal, close, connection_info, export_addon, log, send_json, send_text, trap


class Testkit:
    def __init__(self):
        self.count = 0

    def on_open(self, info):
        if info.query_param("refuse") == "1":
            raise Refusal(4003, "refused by testkit-py")
        send_text("open")

    def on_message(self, msg):
        if msg == "count":
            self.count += 1
            send_text(str(self.count))
        elif msg == "error":
            raise RuntimeError("testkit-py: asked to fail")
        elif msg == "trap":
            trap("testkit-py: asked to trap")
        elif msg == "spin":
            while True:
                pass
        elif msg == "memory":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        elif msg == "info":
            info = connection_info()
            send_json({"id": info.id, "addon": info.addon, "path": info.path, "query": info.query})
        elif msg == "close":
            close(4000, "bye")
        elif msg == "log":
            log.info("testkit-py log line")
            send_text("logged")
        else:
            raise ValueError(f"testkit-py: unknown command {msg!r}")

    def on_close(self, code, reason):
        log.info(f"testkit-py on-close code={code} reason={reason}")


Handler, ChannelHandler, Hibernation = export_addon(Testkit, hibernate=True)
