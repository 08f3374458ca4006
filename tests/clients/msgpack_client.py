"""The `fanout.msgpack` subprotocol through third-party code: Python's `websockets` and
`msgpack` (PyPI), run by tests/third_party.rs against a live tier. Exits 0 when every step
holds.

usage: msgpack_client.py WS_BASE_URL API_BASE_URL
"""

import asyncio
import sys

import msgpack
from websockets.asyncio.client import connect

from fanout_api import TIMEOUT, post as post_to

WS, API = sys.argv[1], sys.argv[2]


def post(channel, data):
    return post_to(API, channel, data)


async def frame(ws):
    """The next frame: a binary message holding one MessagePack map."""
    async with asyncio.timeout(TIMEOUT):
        message = await ws.recv()
    assert isinstance(message, bytes), f"a text frame on fanout.msgpack: {message!r}"
    return msgpack.unpackb(message)


async def until(ws, match):
    while True:
        f = await frame(ws)
        if match(f):
            return f


async def main():
    async with connect(f"{WS}/ws?user=pyro", subprotocols=["fanout.msgpack"]) as ws:
        assert ws.subprotocol == "fanout.msgpack", ws.subprotocol
        welcome = await frame(ws)
        assert welcome["op"] == "welcome" and welcome["user"] == "pyro", welcome
        print("welcome:", welcome["node"])

        await ws.send(msgpack.packb({"op": "subscribe", "channel": "packed", "id": 1}))
        subscribed = await until(ws, lambda f: f.get("id") == 1)
        assert subscribed["op"] == "subscribed", subscribed

        data = {"text": "héllo", "n": [1, 2.5, None], "deep": {"ok": True}}
        stored = post("packed", data)
        event = await until(ws, lambda f: f.get("op") == "event")
        assert event["seq"] == stored["seq"] and isinstance(event["seq"], int), event
        assert event["data"] == data, event
        print("event:", event["seq"])

        await ws.send(msgpack.packb({"op": "publish", "channel": "packed", "data": {"from": "py"}, "id": 2}))
        published = await until(ws, lambda f: f.get("id") == 2)
        assert published["op"] == "published" and isinstance(published["seq"], int), published

        await ws.send(b"\xc1 not msgpack")
        error = await until(ws, lambda f: f.get("op") == "error")
        assert error["code"] == "invalid_json", error
        print("error:", error["code"])

        # The same session still works.
        await ws.send(msgpack.packb({"op": "ping", "id": 3}))
        pong = await until(ws, lambda f: f.get("id") == 3)
        assert pong["op"] == "pong", pong
    print("every step held")


asyncio.run(main())
