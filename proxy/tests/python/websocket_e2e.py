"""WebSocket peers for proxy/tests/protocols.rs, with the `websockets` package.

server LOG: an echo server on a free loopback port (printed as the first
  line of stdout). Each connection greets with "welcome <path> <caller>"
  (the caller from x-weft-peer-id), echoes every message, and appends
  "open <path>" and "closed <code>" lines to LOG.
client PORT PATH: connects to ws://api<PATH> through the sidecar listening
  on 127.0.0.1:PORT, checks the greeting, a text and a 1 MiB binary echo and
  the close handshake; prints OK.
denied PORT PATH: the same connection must be refused with HTTP 403; prints
  the status.
"""

import asyncio
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

MIB = 1 << 20


def log_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


async def server(log):
    async def handler(ws):
        path = ws.request.path
        caller = ws.request.headers.get("x-weft-peer-id", "")
        log_line(log, f"open {path}")
        await ws.send(f"welcome {path} {caller}")
        try:
            async for msg in ws:
                await ws.send(msg)
        finally:
            log_line(log, f"closed {ws.close_code}")

    async with serve(handler, "127.0.0.1", 0, max_size=2 * MIB) as srv:
        port = srv.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


def open_ws(port, path):
    return connect(f"ws://api{path}", host="127.0.0.1", port=int(port), proxy=None, max_size=2 * MIB, open_timeout=10)


async def client(port, path):
    async with open_ws(port, path) as ws:
        greeting = await asyncio.wait_for(ws.recv(), 10)
        assert greeting.startswith(f"welcome {path} spiffe://"), greeting
        await ws.send("hello through two sidecars")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello through two sidecars"
        # Random bytes: permessage-deflate cannot shrink them, so 1 MiB crosses the wire.
        big = os.urandom(MIB)
        await ws.send(big)
        back = await asyncio.wait_for(ws.recv(), 20)
        assert back == big, f"1 MiB echo differs ({len(back)} bytes back)"
        await ws.close()
        assert ws.close_code == 1000, ws.close_code
    print("OK", flush=True)


async def denied(port, path):
    try:
        async with open_ws(port, path):
            pass
    except InvalidStatus as e:
        print(e.response.status_code, flush=True)
        return
    print("opened", flush=True)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    coro = {"server": server, "client": client, "denied": denied}[mode](*args)
    asyncio.run(coro)


if __name__ == "__main__":
    main()
