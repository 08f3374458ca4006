"""The whole fanout protocol through a third-party WebSocket client: Python's `websockets`
(PyPI), run by tests/third_party.rs against a live tier. Exits 0 when every step holds.

usage: websockets_client.py WS_BASE_URL API_BASE_URL
"""

import asyncio
import json
import sys
import urllib.request

from websockets.asyncio.client import connect

from fanout_api import TIMEOUT, post as post_to

WS, API = sys.argv[1], sys.argv[2]


def post(channel, data):
    return post_to(API, channel, data)


async def until(ws, match):
    """The next frame for which match(frame) holds; others are skipped."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = json.loads(await ws.recv())
            if match(frame):
                return frame


def reply(id_):
    return lambda f: f.get("id") == id_


async def main():
    async with connect(f"{WS}/ws?user=py") as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["op"] == "welcome" and welcome["user"] == "py", welcome
        epoch = welcome["epoch"]

        await ws.send(json.dumps({"op": "subscribe", "channel": "py", "id": 1, "presence": True}))
        subscribed = await until(ws, reply(1))
        assert subscribed["op"] == "subscribed", subscribed

        # An event published over HTTP arrives.
        accepted = post("py", {"from": "http"})
        event = await until(ws, lambda f: f.get("op") == "event" and f["seq"] == accepted["seq"])
        assert event["data"] == {"from": "http"}, event

        # A client publish: its reply and its event, in whatever order they come.
        await ws.send(json.dumps({"op": "publish", "channel": "py", "data": {"from": "ws"}, "id": 2}))
        seen = {}
        async with asyncio.timeout(TIMEOUT):
            while len(seen) < 2:
                frame = json.loads(await ws.recv())
                if frame.get("id") == 2:
                    assert frame["op"] == "published", frame
                    seen["published"] = frame
                elif frame.get("op") == "event" and frame["data"] == {"from": "ws"}:
                    seen["event"] = frame
        assert seen["published"]["seq"] == seen["event"]["seq"], seen
        last = seen["event"]["seq"]

        # Presence: this client is a member.
        await ws.send(json.dumps({"op": "presence", "channel": "py", "id": 3}))
        presence = await until(ws, reply(3))
        assert any(m["user"] == "py" for m in presence["members"]), presence

        # Requests: ping, a fragmented request (the library sends an iterable as fragments),
        # a WebSocket ping, bad input answered with an error frame, unsubscribe.
        await ws.send(json.dumps({"op": "ping", "id": 4}))
        assert (await until(ws, reply(4)))["op"] == "pong"
        await ws.send(['{"op":"ping",', '"id":5}'])
        assert (await until(ws, reply(5)))["op"] == "pong"
        async with asyncio.timeout(TIMEOUT):
            await (await ws.ping(b"hello"))
        await ws.send(json.dumps({"op": "dance", "id": 6}))
        error = await until(ws, reply(6))
        assert error["op"] == "error", error
        await ws.send(json.dumps({"op": "unsubscribe", "channel": "py", "id": 7}))
        assert (await until(ws, reply(7)))["op"] == "unsubscribed"
    # A normal close, answered with 1000.
    assert ws.close_code == 1000, ws.close_code

    # Resume: what was published while away arrives after reconnecting with the position.
    missed = post("py", {"while": "away"})
    async with connect(f"{WS}/ws?user=py") as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"op": "subscribe", "channel": "py", "since": last, "epoch": epoch, "id": 8}))
        event = await until(ws, lambda f: f.get("op") == "event")
        assert event["seq"] == missed["seq"] and event["data"] == {"while": "away"}, event

    await compressed()
    print("websockets client: every step held")


def bytes_out():
    """What the ws node wrote to its clients so far (its metric), bytes."""
    url = WS.replace("ws://", "http://", 1) + "/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("fanout_ws_bytes_out_total "):
                return float(line.split()[1])
    return 0.0


async def compressed():
    """permessage-deflate, as `websockets` offers it: negotiated without context takeover
    either way; a large event arrives compressed (fewer bytes written than its JSON) and
    whole; the client's own compressed publish is inflated and published."""
    async with connect(f"{WS}/ws?user=pyz", max_size=2**20) as ws:
        [deflate] = ws.protocol.extensions
        assert deflate.name == "permessage-deflate", deflate
        assert deflate.remote_no_context_takeover and deflate.local_no_context_takeover, vars(deflate)
        json.loads(await ws.recv())
        await ws.send(json.dumps({"op": "subscribe", "channel": "py:zip", "id": 1}))
        assert (await until(ws, reply(1)))["op"] == "subscribed"
        big = {"rows": [{"i": i, "name": f"row {i}", "ok": True} for i in range(200)]}
        before = bytes_out()
        post("py:zip", big)
        event = await until(ws, lambda f: f.get("op") == "event")
        assert event["data"] == big, event
        # The node counts what it wrote once the write is done: the event may arrive first.
        async with asyncio.timeout(TIMEOUT):
            while (written := bytes_out() - before) == 0:
                await asyncio.sleep(0.02)
        assert 0 < written < len(json.dumps(big)) / 3, (written, len(json.dumps(big)))
        await ws.send(json.dumps({"op": "publish", "channel": "py:zip", "data": big, "id": 2}))
        assert (await until(ws, reply(2)))["op"] == "published"


asyncio.run(main())
