"""Python `websockets` peer for bench/run: an echo server, or with --stream N a server that
answers each text message with N frames "<i>:<message>" (like the streamer test addon).
Runs on uvloop when it is installed.

Usage: python py_websockets.py --port 9004 [--stream 10]
"""

import argparse
import asyncio
import sys

import websockets
from websockets.asyncio.server import serve


async def main(port: int, frames: int, loop_name: str) -> None:
    async def handler(ws):
        async for message in ws:
            if frames > 1 and isinstance(message, str):
                for i in range(frames):
                    await ws.send(f"{i}:{message}")
            else:
                await ws.send(message)

    # No compression (websockets enables permessage-deflate by default) and no keepalive
    # pings, so every server in the suite does the same work.
    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=None, max_size=16 << 20):
        print(
            f"py-websockets: listening on 127.0.0.1:{port} "
            f"(websockets {websockets.__version__}, {loop_name}, stream {frames})",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9004)
    parser.add_argument("--stream", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.port, args.stream, "asyncio"))
    else:
        uvloop.run(main(args.port, args.stream, f"uvloop {uvloop.__version__}"))
