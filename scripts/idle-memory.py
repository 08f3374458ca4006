#!/usr/bin/env python3
"""Idle memory per WebSocket connection of one fanout-ws node.

Starts nats-server and a fanout-ws node (release build), opens N raw WebSocket connections
from 127.0.0.x (loopback only), waits for each `welcome`, and prints the node's RSS growth
per connection.

    cargo build --release -p fanout-ws && python3 scripts/idle-memory.py 10000
"""
import base64, glob, json, os, socket, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
NATS = os.environ.get("NATS_SERVER_BIN", ".tools/bin/nats-server")
WS = os.environ.get("FANOUT_WS_BIN", "target/release/fanout-ws")
PORT = int(os.environ.get("PORT", "18181"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1])


def connect(i):
    # At most ~28,000 ephemeral ports per source address: spread over 127.0.0.2, .3, ...
    s = socket.create_connection(("127.0.0.1", PORT), source_address=(f"127.0.0.{2 + i // 20000}", 0))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return s


def welcomed(s):
    buf = b""
    while b"welcome" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("a connection closed before its welcome")
        buf += chunk


def main():
    tmp = tempfile.mkdtemp()
    nats = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", f"{tmp}/js",
                             "--ports_file_dir", tmp], stderr=subprocess.DEVNULL)
    ws = None
    try:
        while not glob.glob(f"{tmp}/*.ports"):
            time.sleep(0.05)
        time.sleep(0.1)
        url = json.load(open(glob.glob(f"{tmp}/*.ports")[0]))["nats"][0]
        ws = subprocess.Popen([WS], env={"FANOUT_NATS_URL": url, "FANOUT_LISTEN": f"127.0.0.1:{PORT}",
                                         "FANOUT_NODE_ID": "idle", "RUST_LOG": "warn"})
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", PORT)).close()
                break
            except OSError:
                time.sleep(0.05)
        warm = [connect(0) for _ in range(100)]  # one-off allocations are not per connection
        for s in warm:
            welcomed(s)
        time.sleep(0.5)
        before = rss_kib(ws.pid)
        conns = [connect(i) for i in range(N)]
        for s in conns:
            welcomed(s)
        time.sleep(1.0)
        after = rss_kib(ws.pid)
        print(f"{N} idle connections: RSS {before} KiB -> {after} KiB: "
              f"{(after - before) / N:.2f} KiB per connection")
    finally:
        if ws:
            ws.terminate()
            ws.wait()
        nats.terminate()
        nats.wait()


if __name__ == "__main__":
    main()
