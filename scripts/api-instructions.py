#!/usr/bin/env python3
"""Instructions per published event in fanout-api (user space, every thread), counted by
valgrind's callgrind: the figure to compare API changes by on a machine without hardware
counters, where CPU time drifts by tens of percent. Starts nats-server and the API under
callgrind, warms up, zeroes the counters, sends N events (one per request, or batches of
100), dumps, and divides.

usage: python3 scripts/api-instructions.py target/release/fanout-api single|batch N
(NATS_SERVER_BIN: the nats-server to use; `make nats-server` installs one in .tools/bin)"""
import http.client, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time
api_bin, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
nats = os.environ.get("NATS_SERVER_BIN", os.path.join(os.path.dirname(__file__), "..", ".tools", "bin", "nats-server"))
d = tempfile.mkdtemp()
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
np, ap = free(), free()
ns = subprocess.Popen([nats, "-a", "127.0.0.1", "-p", str(np), "-js", "-sd", d + "/js"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
out = d + "/cg.out"
env = {"FANOUT_NATS_URL": f"nats://127.0.0.1:{np}", "FANOUT_LISTEN": f"127.0.0.1:{ap}", "FANOUT_NODE_ID": "api-cg",
       "FANOUT_CANARY_INTERVAL_MS": "0", "RUST_LOG": "warn", "PATH": os.environ["PATH"]}
api = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", api_bin], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", ap, timeout=30); c.request("GET", "/readyz"); r = c.getresponse(); r.read()
        if r.status == 200: break
    except Exception: pass
    time.sleep(0.2)
c = http.client.HTTPConnection("127.0.0.1", ap, timeout=60)
def post(path, body):
    c.request("POST", path, body=body, headers={"Content-Type": "application/json"}); r = c.getresponse(); b = r.read(); assert r.status == 202, (r.status, b)
payload = json.dumps({"t": 1, "n": 1, "p": "x" * 60})
# warm up, then count only the measured part
for i in range(50): post("/v1/channels/warm/events", payload)
subprocess.run(["callgrind_control", "-z", str(api.pid)], stdout=subprocess.DEVNULL)
if mode == "single":
    for i in range(n): post(f"/v1/channels/pub{i%16}/events", payload)
else:
    for i in range(n // 100):
        post("/v1/batch", json.dumps({"events": [{"channel": f"pub{j%16}", "data": {"t": 1, "n": j, "p": "x" * 60}} for j in range(100)]}))
subprocess.run(["callgrind_control", "-d", str(api.pid)], stdout=subprocess.DEVNULL)
time.sleep(1)
api.send_signal(signal.SIGTERM); api.wait(timeout=120); ns.kill()
total = 0
for f in os.listdir(d):
    if f.startswith("cg.out."):
        for line in open(os.path.join(d, f)):
            m = re.match(r"(summary|totals): (\d+)", line)
            if m: total += int(m.group(2)) if m.group(1) == "totals" else 0
print(f"{mode}: {total/n:.0f} instructions per event (user space, {n} events)")
shutil.rmtree(d, ignore_errors=True)
