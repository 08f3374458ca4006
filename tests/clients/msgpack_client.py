"""The `fanout.msgpack` subprotocol through third-party code: Python's `websockets` and
`msgpack` (PyPI), run by tests/third_party.rs against a live tier. Exits 0 when every step
holds.

usage: msgpack_client.py WS_BASE_URL API_BASE_URL
"""

import asyncio
import base64
import json
import sys

import msgpack
from websockets.asyncio.client import connect

from fanout_api import TIMEOUT, post as post_to, post_bytes

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


async def text_until(ws, match):
    """The next JSON text frame that `match`es (a JSON client's)."""
    while True:
        async with asyncio.timeout(TIMEOUT):
            message = await ws.recv()
        assert isinstance(message, str), f"a binary frame without fanout.msgpack: {message!r}"
        f = json.loads(message)
        if match(f):
            return f


async def binary_data(ws, js):
    """Bytes, both ways: MessagePack clients get bin, JSON clients base64 with
    "encoding":"base64", whoever published them (the API or either kind of client)."""
    for sub in (ws.send(msgpack.packb({"op": "subscribe", "channel": "bytes", "id": 10})),
                js.send(json.dumps({"op": "subscribe", "channel": "bytes", "id": 10}))):
        await sub
    await until(ws, lambda f: f.get("id") == 10)
    await text_until(js, lambda f: f.get("id") == 10)

    raw = bytes(range(256))
    stored = post_bytes(API, "bytes", raw)
    event = await until(ws, lambda f: f.get("op") == "event")
    assert event["data"] == raw and "encoding" not in event, event
    assert event["seq"] == stored["seq"], event
    seen = await text_until(js, lambda f: f.get("op") == "event")
    assert seen["encoding"] == "base64" and base64.b64decode(seen["data"]) == raw, seen
    print("bytes from the API:", len(raw))

    volatile = b"\x00volatile\xff"
    post_bytes(API, "bytes", volatile, volatile=True)
    event = await until(ws, lambda f: f.get("op") == "event")
    assert event["volatile"] is True and event["data"] == volatile and "seq" not in event, event
    seen = await text_until(js, lambda f: f.get("op") == "event")
    assert seen["volatile"] is True and base64.b64decode(seen["data"]) == volatile, seen

    # A MessagePack client publishes bin; a JSON client publishes base64. Each connection
    # then gets its reply and both events, in an order the protocol does not fix.
    await ws.send(msgpack.packb({"op": "publish", "channel": "bytes", "data": b"\x01\x02", "id": 11}))
    await js.send(json.dumps({"op": "publish", "channel": "bytes", "data": "AwQ=",
                              "encoding": "base64", "id": 12}))
    replies, got = [], set()
    while not (replies and len(got) == 2):
        f = await frame(ws)
        if f.get("id") == 11:
            replies.append(f)
        elif f.get("op") == "event":
            assert "encoding" not in f, f
            got.add(f["data"])
    assert replies[0]["op"] == "published", replies
    assert got == {b"\x01\x02", b"\x03\x04"}, got
    replies, got = [], set()
    while not (replies and len(got) == 2):
        f = await text_until(js, lambda f: True)
        if f.get("id") == 12:
            replies.append(f)
        elif f.get("op") == "event":
            assert f["encoding"] == "base64", f
            got.add(f["data"])
    assert replies[0]["op"] == "published", replies
    assert got == {"AQI=", "AwQ="}, got

    # Bytes anywhere but "data" cannot be said in JSON: an error, the session goes on.
    await ws.send(msgpack.packb({"op": "info", "info": b"\x00", "id": 13}))
    error = await until(ws, lambda f: f.get("op") == "error")
    assert error["code"] == "invalid_json", error
    await js.send(json.dumps({"op": "publish", "channel": "bytes", "data": "!!", "encoding": "base64", "id": 14}))
    error = await text_until(js, lambda f: f.get("op") == "error")
    assert error["code"] == "invalid_request" and error["id"] == 14, error
    print("bytes from clients: bin and base64")


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

        async with connect(f"{WS}/ws?user=jason") as js:
            await binary_data(ws, js)
    print("every step held")


asyncio.run(main())
