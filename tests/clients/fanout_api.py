"""What the Python client tests share: publishing through fanout's HTTP API (stdlib only)."""

import json
import urllib.request

TIMEOUT = 15


def post(api, channel, data):
    """Publishes `data` on `channel` through the API at `api`; the 202 answer."""
    request = urllib.request.Request(
        f"{api}/v1/channels/{channel}/events",
        data=json.dumps(data).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 202, response.status
        return json.load(response)


def post_bytes(api, channel, data, volatile=False):
    """Publishes the bytes `data` (`application/octet-stream`) on `channel`, stored or
    volatile; the 202 answer."""
    kind = "volatile" if volatile else "events"
    request = urllib.request.Request(
        f"{api}/v1/channels/{channel}/{kind}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 202, response.status
        return json.load(response)
