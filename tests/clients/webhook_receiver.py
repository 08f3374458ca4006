"""A webhook receiver over HTTPS with Python's own `http.server`, `ssl` and `hmac`: run by
tests/integration/webhooks.rs. It verifies every request's `X-Fanout-Signature` (one `v1`
per secret, HMAC-SHA256 of "<t>.<body>", `t` within five minutes) and prints one JSON line
per request: {"valid": bool, "id": X-Fanout-Webhook-Id, "events": [...]}; the first line is
{"port": N}. Answers 200 to a valid request, 401 otherwise.

usage: webhook_receiver.py CERT KEY SECRET[,SECRET...]
"""

import hashlib
import hmac
import http.server
import json
import ssl
import sys
import time

CERT, KEY, SECRETS = sys.argv[1], sys.argv[2], sys.argv[3].split(",")


def valid(header, body):
    fields = header.split(",")
    if not fields or not fields[0].startswith("t="):
        return False
    t = fields[0][2:]
    if abs(time.time() - int(t)) > 300:
        return False
    got = [f[3:] for f in fields[1:] if f.startswith("v1=")]
    want = [hmac.new(s.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest() for s in SECRETS]
    return len(got) == len(want) and all(hmac.compare_digest(w, g) for w, g in zip(want, got))


class Hooks(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = valid(self.headers.get("X-Fanout-Signature", ""), body)
        events = json.loads(body)["events"] if ok else []
        print(json.dumps({"valid": ok, "id": self.headers.get("X-Fanout-Webhook-Id"), "events": events}), flush=True)
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Hooks)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
