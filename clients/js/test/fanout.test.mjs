// Unit tests for fanout.js with a fake WebSocket and fake timers: `node --test web/`.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { FanoutClient, backoff, decodeCursor, defaultTransports, directive, encodeCursor, endpoint, nodeUrl, pack, shouldReconnect, unframe, unpack, varint } from "../fanout.js";

/** A WebSocket stand-in that records what is sent and lets the test play the server. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code = 1005, reason = "") { this.closed = { code, reason }; }
  // server side
  frame(value) { this.onmessage?.({ data: JSON.stringify(value) }); }
  welcome(node) { this.frame({ op: "welcome", node, conn: `c-${node}`, heartbeat: 25 }); }
  drop(code = 1006, reason = "") { this.onclose?.({ code, reason }); }
}

function setup(urls, options = {}) {
  FakeSocket.all = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  const client = new FanoutClient(urls, { WebSocket: FakeSocket, ...options });
  const states = [];
  client.on("state", (s) => states.push(s));
  return { client, states, sockets: FakeSocket.all, last: () => FakeSocket.all.at(-1) };
}

test("backoff grows exponentially, is capped, and jitters within the upper half", () => {
  const low = () => 0;
  const high = () => 1;
  assert.deepEqual([1, 2, 3, 4].map((a) => backoff(a, 500, 15000, low)), [250, 500, 1000, 2000]);
  assert.deepEqual([1, 2, 3, 4].map((a) => backoff(a, 500, 15000, high)), [500, 1000, 2000, 4000]);
  assert.equal(backoff(30, 500, 15000, high), 15000);
  // 1,000 clients dropped by one node restart: their first retries spread over the window.
  const delays = Array.from({ length: 1000 }, () => backoff(1));
  const buckets = new Set(delays.map((d) => Math.floor(d / 25)));
  assert.ok(Math.min(...delays) >= 250 && Math.max(...delays) <= 500);
  assert.ok(buckets.size >= 9, `delays bunch up: ${[...buckets]}`);
});

test("close codes: reconnect unless 1000 or 4500-4999", () => {
  for (const code of [1001, 1006, 1009, 1011, 4001, 4002, 4499]) assert.ok(shouldReconnect(code), code);
  for (const code of [1000, 4500, 4999]) assert.ok(!shouldReconnect(code), code);
});

test("reconnects with growing delays, failing over to the next URL each attempt", () => {
  const { client, states, sockets, last } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 100 });
  try {
    client.connect();
    assert.equal(last().url, "ws://a/ws");
    last().welcome("ws-a");
    assert.equal(client.state, "open");
    assert.equal(client.node, "ws-a");

    last().drop(1001, "server shutting down");
    const waiting = states.at(-1);
    assert.equal(waiting.state, "reconnecting");
    assert.equal(waiting.next, "ws://b/ws");
    assert.ok(waiting.delay >= 50 && waiting.delay <= 100, waiting.delay);
    mock.timers.tick(100);
    assert.equal(last().url, "ws://b/ws");

    last().drop(1006); // b is down too: back to a, after a longer wait
    const second = states.at(-1);
    assert.ok(second.delay >= 100 && second.delay <= 200, second.delay);
    mock.timers.tick(200);
    assert.equal(last().url, "ws://a/ws");
    last().welcome("ws-a");
    assert.equal(client.attempt, 0, "a welcome resets the backoff");
    assert.equal(sockets.length, 3);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("subscriptions are renewed after every reconnect; events reach their callbacks", async () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    const seen = [];
    client.connect();
    client.subscribe("maths", (e) => seen.push(e.seq)); // before welcome: sent on welcome
    last().welcome("ws-1");
    assert.deepEqual(last().sent.map((f) => [f.op, f.channel]), [["subscribe", "maths"]]);
    const id = last().sent[0].id;
    last().frame({ op: "subscribed", channel: "maths", id });
    last().frame({ op: "event", channel: "maths", seq: 7, id: "e", ts: 1, data: 1 });
    last().frame({ op: "event", channel: "other", seq: 8, id: "f", ts: 1, data: 2 });
    assert.deepEqual(seen, [7]);

    last().drop(4001, "slow consumer");
    mock.timers.tick(10);
    last().welcome("ws-1");
    assert.deepEqual(last().sent.map((f) => [f.op, f.channel]), [["subscribe", "maths"]]);

    // A refused subscription rejects with the error frame and is forgotten.
    const refused = client.subscribe("bad channel");
    const request = last().sent.at(-1);
    last().frame({ op: "error", code: "invalid_channel", message: "no", ref: "subscribe", id: request.id });
    await assert.rejects(refused, (e) => e.code === "invalid_channel");
    assert.deepEqual(client.channels, ["maths"]);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("a subscription whose reply was lost with the connection is renewed", () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    client.connect();
    last().welcome("ws-1");
    const pending = client.subscribe("maths"); // no reply before the connection drops
    pending.catch(() => {}); // rejects with "connection lost"; the channel is kept
    last().drop(1006);
    mock.timers.tick(10);
    last().welcome("ws-1");
    assert.deepEqual(last().sent.map((f) => f.channel), ["maths"]);
    assert.deepEqual(client.channels, ["maths"]);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("terminal close codes and close() stop reconnecting", () => {
  const { client, sockets, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    client.connect();
    last().welcome("ws-1");
    last().drop(4500, "forbidden");
    assert.equal(client.state, "closed");
    mock.timers.tick(60_000);
    assert.equal(sockets.length, 1);

    client.connect();
    assert.equal(sockets.length, 2);
    client.close();
    assert.deepEqual(last().closed, { code: 1000, reason: "client closed" });
    mock.timers.tick(60_000);
    assert.equal(sockets.length, 2);
  } finally {
    mock.timers.reset();
  }
});

test("an attempt that gets no welcome in time is abandoned and retried", () => {
  const { client, sockets, last } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 10, connectTimeout: 1000 });
  try {
    client.connect();
    mock.timers.tick(1000);
    assert.ok(last().closed, "the silent attempt was closed");
    last().drop(1006); // what the browser reports after close()
    mock.timers.tick(10);
    assert.equal(sockets.length, 2);
    assert.equal(last().url, "ws://b/ws");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("after a reconnect it resumes each channel from the last seq, broadcast included", () => {
  const { client, last } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 10 });
  try {
    const seen = [];
    const resumed = [];
    client.on("event", (e) => seen.push(`${e.channel}#${e.seq}`));
    client.on("resumed", (r) => resumed.push(r));
    client.subscribe("maths");
    client.connect();
    last().frame({ op: "welcome", node: "ws-a", conn: "c1", heartbeat: 25, epoch: "E1" });
    last().frame({ op: "event", channel: "maths", seq: 5, id: "x", ts: 1, data: 1 });
    last().frame({ op: "event", channel: "broadcast", seq: 6, id: "y", ts: 1, data: 2 });
    last().frame({ op: "event", channel: "maths", seq: 5, id: "x", ts: 1, data: 1 }); // duplicate
    assert.deepEqual(seen, ["maths#5", "broadcast#6"]);

    last().drop(1001, "server shutting down: reconnect elsewhere");
    mock.timers.tick(10);
    last().frame({ op: "welcome", node: "ws-b", conn: "c2", heartbeat: 25, epoch: "E1" });
    const sent = last().sent.map(({ id, ...rest }) => rest);
    assert.deepEqual(sent, [
      { op: "subscribe", channel: "maths", since: 5, epoch: "E1" },
      { op: "subscribe", channel: "broadcast", since: 6, epoch: "E1" },
    ]);
    const [maths, broadcast] = last().sent;
    last().frame({ op: "subscribed", channel: "maths", recovered: true, replayed: 2, epoch: "E1", id: maths.id });
    last().frame({ op: "subscribed", channel: "broadcast", recovered: true, replayed: 0, epoch: "E1", id: broadcast.id });
    return Promise.resolve().then(() => {
      assert.deepEqual(resumed, [
        { channel: "maths", recovered: true, replayed: 2 },
        { channel: "broadcast", recovered: true, replayed: 0 },
      ]);
    });
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("a new stream epoch resets the remembered sequences", async () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    const seen = [];
    client.subscribe("maths", (e) => seen.push(e.seq));
    client.connect();
    last().frame({ op: "welcome", node: "n", conn: "c", heartbeat: 25, epoch: "E1" });
    last().frame({ op: "event", channel: "maths", seq: 900, id: "x", ts: 1, data: 1 });
    last().drop(1006);
    mock.timers.tick(10);
    last().frame({ op: "welcome", node: "n", conn: "c", heartbeat: 25, epoch: "E2" });
    const request = last().sent[0];
    assert.deepEqual([request.since, request.epoch], [900, "E1"]);
    last().frame({ op: "subscribed", channel: "maths", recovered: false, replayed: 0, epoch: "E2", id: request.id });
    // Frames are separate tasks in a browser: the reply's continuation runs before the next.
    await new Promise((resolve) => setImmediate(resolve));
    // The recreated stream counts from 1 again: seq 1 is new, not a duplicate of 900.
    last().frame({ op: "event", channel: "maths", seq: 1, id: "y", ts: 1, data: 2 });
    assert.deepEqual(seen, [900, 1]);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("getToken: a token for every connection attempt, and a refresh before it expires", async () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    const exp = Math.floor(Date.now() / 1000) + 100;
    const jwt = (n) => `h.${btoa(JSON.stringify({ sub: "ada", exp, n }))}.s`;
    let issued = 0;
    client.options.getToken = () => jwt(++issued);
    client.connect();
    client.connect(); // a second call while the token is on its way opens nothing more
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(issued, 1);
    assert.equal(last().url, `ws://a/ws?token=${encodeURIComponent(jwt(1))}`);
    last().welcome("ws-1");
    // 80% of the 100 s left: the refresh goes out with a new token.
    mock.timers.tick(80_000);
    await new Promise((resolve) => setImmediate(resolve));
    const refresh = last().sent.find((f) => f.op === "refresh");
    assert.equal(refresh.token, jwt(2));
    last().frame({ op: "refreshed", expires_at: exp, id: refresh.id });
    // Token expired (4004): the reconnect asks for a new token.
    last().drop(4004, "token expired");
    mock.timers.tick(10);
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(last().url, `ws://a/ws?token=${encodeURIComponent(jwt(3))}`);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("presence: changes come as events; info and presence flags survive a reconnect", async () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    const changes = [];
    client.on("presence", (change) => changes.push([change.op, change.user]));
    client.connect();
    client.subscribe("room", null, { presence: true });
    client.subscribe("quiet");
    client.setInfo({ name: "Ada" });
    last().welcome("ws-1");
    const sent = () => last().sent.map((f) => [f.op, f.channel ?? f.info?.name, f.presence]);
    assert.deepEqual(sent(), [["info", "Ada", undefined], ["subscribe", "room", true], ["subscribe", "quiet", undefined]]);
    last().frame({ op: "join", channel: "room", user: "bob", conn: "c", node: "ws-2", info: null, joined_at: 1 });
    last().frame({ op: "leave", channel: "room", user: "bob", conn: "c", node: "ws-2", info: null, joined_at: 1 });
    assert.deepEqual(changes, [["join", "bob"], ["leave", "bob"]]);

    const asked = client.presence("room", { countOnly: true });
    const query = last().sent.at(-1);
    assert.deepEqual([query.op, query.channel, query.count_only], ["presence", "room", true]);
    last().frame({ op: "presence", channel: "room", count: 2, partial: false, id: query.id });
    assert.equal((await asked).count, 2);

    last().drop(1001);
    mock.timers.tick(10);
    last().welcome("ws-2");
    assert.deepEqual(sent(), [["info", "Ada", undefined], ["subscribe", "room", true], ["subscribe", "quiet", undefined]]);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("publish resolves with its reply whether the own event comes before or after it", async () => {
  const { client, last } = setup("ws://a/ws");
  try {
    const events = [];
    client.connect();
    last().welcome("ws-1");
    client.subscribe("room", (e) => events.push(e.id));
    last().frame({ op: "subscribed", channel: "room", id: last().sent[0].id });
    for (const [n, eventFirst] of [[1, true], [2, false]]) {
      const published = client.publish("room", { n });
      const request = last().sent.at(-1);
      assert.deepEqual([request.op, request.channel, request.data], ["publish", "room", { n }]);
      const event = { op: "event", channel: "room", seq: 10 + n, id: `e${n}`, ts: 1, data: { n } };
      const reply = { op: "published", channel: "room", seq: 10 + n, event: `e${n}`, id: request.id };
      if (eventFirst) last().frame(event);
      last().frame(reply);
      if (!eventFirst) last().frame(event);
      const answer = await published;
      assert.equal(answer.event, `e${n}`);
    }
    assert.deepEqual(events, ["e1", "e2"], "each own event delivered once, by id");
    const refused = client.publish("room", 3);
    last().frame({ op: "error", code: "rate_limited", message: "slow down", ref: "publish", id: last().sent.at(-1).id });
    await assert.rejects(refused, (e) => e.code === "rate_limited");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("volatile events reach the handlers and move no position; publish({volatile}) asks for one", async () => {
  const { client, last } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 10 });
  try {
    const seen = [];
    client.subscribe("lobby", (e) => seen.push(e.volatile ? `v:${e.id}` : `#${e.seq}`));
    client.connect();
    last().frame({ op: "welcome", node: "ws-a", conn: "c1", heartbeat: 25, epoch: "E1" });
    last().frame({ op: "subscribed", channel: "lobby", id: last().sent[0].id });
    last().frame({ op: "event", channel: "lobby", seq: 4, id: "s4", ts: 1, data: 1 });
    last().frame({ op: "event", channel: "lobby", volatile: true, id: "v1", ts: 1, data: { x: 1 } });
    last().frame({ op: "event", channel: "lobby", volatile: true, id: "v2", ts: 1, data: { x: 2 } });
    assert.deepEqual(seen, ["#4", "v:v1", "v:v2"], "every volatile event, none taken for a duplicate");

    const published = client.publish("lobby", { x: 3 }, { volatile: true });
    const request = last().sent.at(-1);
    assert.deepEqual([request.op, request.volatile], ["publish", true]);
    last().frame({ op: "published", channel: "lobby", volatile: true, event: "v3", id: request.id });
    assert.equal((await published).volatile, true);

    // A reconnect resumes from the last stored event: volatile ones moved nothing.
    last().drop(1001, "going away");
    mock.timers.tick(10);
    last().frame({ op: "welcome", node: "ws-b", conn: "c2", heartbeat: 25, epoch: "E1" });
    assert.equal(last().sent[0].since, 4);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

/** A WebTransport stand-in: the test plays the node through `frame`, `datagram` and `end`. */
class FakeWebTransport {
  static all = [];
  constructor(url, options) {
    this.url = url;
    this.options = options;
    this.written = [];
    let closed;
    this.closed = new Promise((resolve) => { closed = resolve; });
    this._closed = closed;
    let readable;
    this._readable = new ReadableStream({ start: (c) => { readable = c; } });
    this._toClient = readable;
    let datagrams;
    this.datagrams = { readable: new ReadableStream({ start: (c) => { datagrams = c; } }) };
    this._datagrams = datagrams;
    this.ready = Promise.resolve();
    FakeWebTransport.all.push(this);
  }
  async createBidirectionalStream() {
    const written = this.written;
    return {
      readable: this._readable,
      writable: new WritableStream({ write(chunk) { written.push(...chunk); } }),
    };
  }
  /** What the client wrote: its frames, parsed. */
  sent() { return unframe(new Uint8Array(this.written)).frames.map((f) => JSON.parse(new TextDecoder().decode(f))); }
  frame(value) {
    const bytes = new TextEncoder().encode(JSON.stringify(value));
    this._toClient.enqueue(new Uint8Array([...varint(bytes.length), ...bytes]));
  }
  datagram(value) { this._datagrams.enqueue(new TextEncoder().encode(JSON.stringify(value))); }
  end(closeCode, reason) { this._closed({ closeCode, reason }); }
  close() {}
}

const tick = () => new Promise((done) => setImmediate(done));

test("WebTransport first where the node offers it: frames on a stream, volatile datagrams, close codes", async () => {
  FakeWebTransport.all = [];
  FakeSocket.all = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  assert.deepEqual(defaultTransports({}), ["websocket", "sse", "poll"]);
  assert.deepEqual(defaultTransports({ WebTransport: FakeWebTransport }), ["webtransport", "websocket", "sse", "poll"]);
  const webtransport = { "ws://a:8081/ws?user=ada": { url: "https://{host}:8443/wt", cert_hashes: ["00ff"] } };
  const client = new FanoutClient(["ws://a:8081/ws?user=ada", "ws://b:8081/ws"], {
    WebSocket: FakeSocket,
    WebTransport: FakeWebTransport,
    transports: defaultTransports({ WebTransport: FakeWebTransport }),
    webtransport,
    minDelay: 10,
  });
  try {
    const closes = [];
    const seen = [];
    client.on("close", (c) => closes.push(c));
    client.subscribe("news", (e) => seen.push(e.volatile ? "volatile" : e.seq));
    client.connect();
    const wt = FakeWebTransport.all[0];
    assert.equal(wt.url, "https://localhost:8443/wt?user=ada");
    assert.deepEqual([...wt.options.serverCertificateHashes[0].value], [0, 255]);
    await tick();
    assert.equal(wt.written[0], 0, "an empty frame opens the stream");
    wt.frame({ op: "welcome", node: "ws-1", conn: "c1", heartbeat: 25, epoch: "E" });
    await tick();
    assert.equal(client.state, "open");
    assert.equal(client.transport, "webtransport");
    const subscribe = wt.sent().find((f) => f.op === "subscribe");
    assert.equal(subscribe.channel, "news");
    wt.frame({ op: "subscribed", channel: "news", id: subscribe.id });
    wt.frame({ op: "event", channel: "news", seq: 3, id: "e3", ts: 1, data: 1 });
    wt.datagram({ op: "event", channel: "news", volatile: true, id: "v1", ts: 1, data: { x: 1 } });
    await tick();
    // A datagram and the stream are read apart: no order between them.
    assert.deepEqual(seen.map(String).sort(), ["3", "volatile"]);

    // Closed with a code: reconnects (4001), to the next node, which offers no WebTransport:
    // WebSocket at once.
    wt.end(4001, "slow consumer");
    await tick();
    assert.deepEqual(closes.map((c) => [c.code, c.transport]), [[4001, "webtransport"]]);
    mock.timers.tick(100);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(FakeSocket.all[0].url, "ws://b:8081/ws");
    assert.equal(client.transport, "websocket");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

// --- the HTTP transports -------------------------------------------------------------------

/** An EventSource stand-in: the test plays the server with `emit`. */
class FakeEventSource {
  static all = [];
  constructor(url) {
    this.url = url;
    this.listeners = new Map();
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  addEventListener(name, callback) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(callback);
  }
  close() { this.closed = true; }
  // server side
  emit(name, data, lastEventId = "") {
    for (const callback of this.listeners.get(name) ?? []) callback({ data: JSON.stringify(data), lastEventId });
  }
  fail() { this.onerror?.(); }
}

/** A fetch stand-in: every call waits until the test answers it. */
function fakeFetch() {
  const calls = [];
  const fetch = (url, options = {}) =>
    new Promise((resolve, reject) => {
      const call = { url: new URL(url), options, body: options.body && JSON.parse(options.body) };
      call.answer = (status, body) =>
        resolve({ ok: status < 300, status, json: async () => body, text: async () => JSON.stringify(body) });
      call.fail = (error) => reject(error);
      options.signal?.addEventListener("abort", () => reject(new Error("aborted")));
      calls.push(call);
    });
  return { fetch, calls };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));
/** A cursor as a node writes it: base64url (no padding) of UTF-8 JSON. */
const cursor = (e, c = {}, s = {}, t = 0) =>
  Buffer.from(JSON.stringify({ v: 1, e, t, c, s })).toString("base64url");

test("endpoint: one node URL serves every transport; cursors read and write", () => {
  assert.deepEqual(endpoint("ws://a:1/ws?user=ada", "websocket").url, "ws://a:1/ws?user=ada");
  const sse = endpoint("ws://a:1/ws?user=ada", "sse");
  assert.equal(sse.base, "http://a:1");
  assert.equal(sse.query.toString(), "user=ada");
  assert.equal(endpoint("wss://b/edge/ws", "poll").base, "https://b/edge");
  assert.equal(endpoint("https://b/edge", "websocket").url, "wss://b/edge/ws");
  const text = cursor("E1", { "room:é": 4 }, { broadcast: 9 }, 5);
  assert.deepEqual(decodeCursor(text), { v: 1, e: "E1", t: 5, c: { "room:é": 4 }, s: { broadcast: 9 } });
  assert.deepEqual(decodeCursor(encodeCursor({ e: "E1", t: 5, c: { "room:é": 4 }, s: { broadcast: 9 } })), decodeCursor(text));
  assert.equal(decodeCursor("!!"), null);
});

test("falls back to SSE after 2 failed WebSocket attempts, then to long-polling", async () => {
  FakeEventSource.all = [];
  const { fetch, calls } = fakeFetch();
  const { client, states, sockets } = setup(["ws://a/ws?user=ada", "ws://b/ws?user=ada"], {
    minDelay: 10,
    EventSource: FakeEventSource,
    fetch,
  });
  try {
    client.connect();
    sockets.at(-1).drop(1006); // a proxy breaks the upgrade
    mock.timers.tick(20);
    sockets.at(-1).drop(1006);
    assert.equal(states.at(-1).nextTransport, "sse");
    mock.timers.tick(40);
    assert.equal(sockets.length, 2, "no third WebSocket");
    const source = FakeEventSource.all.at(-1);
    assert.equal(source.url, "http://a/sse?user=ada");
    assert.equal(client.transport, "sse");
    source.fail();
    mock.timers.tick(80);
    FakeEventSource.all.at(-1).fail();
    mock.timers.tick(160);
    assert.equal(client.transport, "poll");
    const first = calls.at(-1);
    assert.equal(first.url.pathname, "/poll");
    assert.equal(first.url.searchParams.get("timeout"), "0", "the first poll answers at once");
    const welcomes = [];
    client.on("welcome", (w) => welcomes.push(w.transport));
    first.answer(200, { events: [], cursor: cursor("E1", {}, { broadcast: 3 }), resumed: [] });
    await settle();
    assert.equal(client.state, "open");
    assert.equal(states.at(-1).transport, "poll");
    assert.deepEqual(welcomes, ["poll"]);
    const next = calls.at(-1);
    assert.equal(next.url.searchParams.get("timeout"), "25");
    assert.deepEqual(decodeCursor(next.url.searchParams.get("cursor")).s, { broadcast: 3 });
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("SSE: requests go to the session; a reconnect resumes from the last event's cursor", async () => {
  FakeEventSource.all = [];
  const { fetch, calls } = fakeFetch();
  const { client, last } = setup("ws://a/ws", {
    minDelay: 10,
    transports: ["sse"],
    EventSource: FakeEventSource,
    fetch,
  });
  try {
    const seen = [];
    const resumed = [];
    client.on("resumed", (r) => resumed.push(r));
    client.subscribe("maths", (e) => seen.push(e.seq));
    client.connect();
    let source = FakeEventSource.all.at(-1);
    assert.equal(source.url, "http://a/sse?", "nothing to resume yet");
    source.emit("welcome", { op: "welcome", node: "ws-1", conn: "c1", epoch: "E1", session: "S" });
    assert.equal(client.state, "open");
    const subscribe = calls.at(-1);
    assert.equal(subscribe.url.toString(), "http://a/session/c1");
    assert.equal(subscribe.options.headers.Authorization, "Bearer S");
    assert.deepEqual([subscribe.body.op, subscribe.body.channel], ["subscribe", "maths"]);
    subscribe.answer(200, { op: "subscribed", channel: "maths", id: subscribe.body.id });
    await settle();
    source.emit("event", { op: "event", channel: "maths", seq: 7, data: 1 }, cursor("E1", { maths: 7 }, { broadcast: 2 }, 99));
    assert.deepEqual(seen, [7]);

    // A refused publish rejects with the error frame; an HTTP failure, with the JSON error.
    const published = client.publish("maths", 2);
    calls.at(-1).answer(200, { op: "error", code: "rate_limited", message: "m", id: calls.at(-1).body.id });
    await assert.rejects(published, (e) => e.code === "rate_limited");
    const lost = client.presence("maths");
    calls.at(-1).answer(404, { error: { code: "unknown_session", message: "gone" } });
    await assert.rejects(lost, (e) => e.code === "unknown_session");

    source.emit("disconnect", { code: 1001, reason: "draining" });
    const closes = [];
    client.on("close", (c) => closes.push(c.code));
    source.fail();
    assert.deepEqual(closes, [1001]);
    mock.timers.tick(10);
    source = FakeEventSource.all.at(-1);
    const resume = decodeCursor(new URL(source.url).searchParams.get("last_event_id"));
    assert.deepEqual(resume, { v: 1, e: "E1", t: 99, c: { maths: 7 }, s: { broadcast: 2 } });
    const before = calls.length;
    source.emit("welcome", { op: "welcome", node: "ws-2", conn: "c2", epoch: "E1", session: "T" });
    assert.equal(calls.length, before, "the stream follows both channels already");
    source.emit("resumed", { channel: "maths", recovered: true, replayed: 1 });
    source.emit("event", { op: "event", channel: "maths", seq: 7, data: 1 }, "x"); // had it
    source.emit("event", { op: "event", channel: "maths", seq: 8, data: 1 }, "y");
    assert.deepEqual(seen, [7, 8]);
    assert.deepEqual(resumed, [{ channel: "maths", recovered: true, replayed: 1 }]);
    assert.equal(last(), undefined, "no WebSocket at all");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("long-polling: the cursor goes with every poll; subscribe, publish and refusals", async () => {
  const { fetch, calls } = fakeFetch();
  const { client } = setup("ws://a/ws?user=ada", { minDelay: 10, transports: ["poll"], fetch });
  try {
    const seen = [];
    client.subscribe("maths", (e) => seen.push(e.seq));
    client.connect();
    let poll = calls.at(-1);
    assert.deepEqual(poll.url.searchParams.getAll("channel"), ["maths"]);
    poll.answer(200, { events: [], cursor: cursor("E1", {}, { broadcast: 5, maths: 5 }), resumed: [] });
    await settle();
    poll = calls.at(-1);
    assert.deepEqual(poll.url.searchParams.getAll("channel"), [], "the cursor names them");
    assert.deepEqual(decodeCursor(poll.url.searchParams.get("cursor")).s, { broadcast: 5, maths: 5 });
    poll.answer(200, {
      events: [{ op: "event", channel: "maths", seq: 6, data: 1 }],
      cursor: cursor("E1", { maths: 6 }, { broadcast: 5 }),
      resumed: [{ channel: "maths", recovered: true, replayed: 1 }],
    });
    await settle();
    assert.deepEqual(seen, [6]);

    // A subscribe asks at once: the waiting poll is abandoned and asked again with the channel.
    const art = client.subscribe("art");
    await settle();
    poll = calls.at(-1);
    assert.deepEqual(poll.url.searchParams.getAll("channel"), ["art"]);
    poll.answer(200, { events: [], cursor: cursor("E1", { maths: 6 }, { broadcast: 5, art: 9 }), resumed: [] });
    assert.equal((await art).op, "subscribed");
    await settle();
    const refused = client.subscribe("secret");
    await settle();
    calls.at(-1).answer(403, { error: { code: "forbidden", message: "no" } });
    await assert.rejects(refused, (e) => e.code === "forbidden");
    assert.deepEqual(client.channels, ["maths", "art"]);
    await settle();

    const published = client.publish("maths", { x: 1 });
    const request = calls.find((c) => c.url.pathname === "/request");
    assert.equal(request.url.searchParams.get("user"), "ada");
    assert.deepEqual([request.body.op, request.body.channel], ["publish", "maths"]);
    request.answer(200, { op: "published", channel: "maths", seq: 10, event: "e", id: request.body.id });
    assert.equal((await published).seq, 10);
    assert.equal((await client.setInfo({ name: "Ada" })).op, "pending", "a poll is no member");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("a subscribe refused with bus_unavailable keeps the channel and asks again", async () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    client.connect();
    last().welcome("ws-1");
    const first = client.subscribe("maths");
    last().frame({ op: "error", code: "bus_unavailable", message: "later", ref: "subscribe", id: last().sent[0].id });
    await assert.rejects(first, (e) => e.code === "bus_unavailable");
    assert.deepEqual(client.channels, ["maths"]);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("switching transports resumes where the last one left each channel", async () => {
  FakeEventSource.all = [];
  const { fetch } = fakeFetch();
  const { client, last } = setup("ws://a/ws", {
    minDelay: 10,
    fallbackAfter: 1,
    EventSource: FakeEventSource,
    fetch,
  });
  try {
    client.subscribe("maths");
    client.connect();
    last().frame({ op: "welcome", node: "n", conn: "c", heartbeat: 25, epoch: "E1" });
    last().frame({ op: "event", channel: "maths", seq: 5, id: "x", ts: 1, data: 1 });
    last().frame({ op: "event", channel: "broadcast", seq: 6, id: "y", ts: 1, data: 1 });
    last().drop(1006);
    mock.timers.tick(10); // back on WebSocket: it had connected
    last().drop(1006);
    mock.timers.tick(20); // that attempt failed: SSE
    const source = FakeEventSource.all.at(-1);
    const resume = decodeCursor(new URL(source.url).searchParams.get("last_event_id"));
    assert.deepEqual(resume, { v: 1, e: "E1", t: 0, c: { maths: 5, broadcast: 6 }, s: {} });
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("regions: positions per region, resumed with an object `since`, cursors of version 2", () => {
  const { client, last } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 100 });
  try {
    const got = [];
    client.subscribe("room", (event) => got.push(`${event.region}:${event.seq}`));
    client.connect();
    last().frame({ op: "welcome", node: "a", conn: "c", epoch: "eu-1.us-2", region: "us" });
    const reply = last().sent.find((f) => f.op === "subscribe");
    last().frame({ op: "subscribed", channel: "room", id: reply.id });
    const event = (region, seq) => last().frame({ op: "event", channel: "room", region, seq, data: {} });
    event("us", 7);
    event("eu", 3);
    event("us", 7); // twice: dropped
    event("eu", 2); // older than what it has of eu: dropped
    event("us", 9);
    assert.deepEqual(got, ["us:7", "eu:3", "us:9"]);
    last().drop(1006);
    mock.timers.tick(200);
    last().frame({ op: "welcome", node: "b", conn: "c2", epoch: "eu-1.us-2", region: "eu" });
    const resume = last().sent.find((f) => f.op === "subscribe");
    assert.deepEqual(resume.since, { us: 9, eu: 3 });
    assert.equal(resume.epoch, "eu-1.us-2");
    // The cursor an HTTP transport would send: version 2.
    const cursor = decodeCursor(client._cursorFor(["room"]));
    assert.equal(cursor.v, 2);
    assert.deepEqual(cursor.c, { room: { us: 9, eu: 3 } });
    assert.equal(decodeCursor(encodeCursor({ e: "x", c: { room: 4 } })).v, 1);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("URLs by region: the nearest region first, the others to fail over to", async () => {
  FakeSocket.all = [];
  const rtts = { "ws://eu-1/ws": 80, "ws://us-1/ws": 12, "ws://ap-1/ws": Promise.reject(new Error("down")) };
  const client = new FanoutClient(
    { eu: ["ws://eu-1/ws", "ws://eu-2/ws"], us: ["ws://us-1/ws"], ap: ["ws://ap-1/ws"] },
    { WebSocket: FakeSocket, measure: async (url) => rtts[url] },
  );
  try {
    client.connect();
    await new Promise((resolve) => setTimeout(resolve, 0));
    assert.deepEqual(client.regions.map((r) => r.region), ["us", "eu", "ap"]);
    assert.deepEqual(client.urls, ["ws://us-1/ws", "ws://eu-1/ws", "ws://eu-2/ws", "ws://ap-1/ws"]);
    assert.equal(FakeSocket.all.at(-1).url, "ws://us-1/ws");
  } finally {
    client.close();
  }
});

test("MessagePack: the bytes Python's msgpack makes, both ways", () => {
  // Each value with its encoding by PyPI's msgpack 1.1.2 (`packb(v, use_bin_type=True)`).
  const golden = [
    [{ op: "publish", channel: "a", data: new Uint8Array([0, 1, 255]), id: 7 },
     "84a26f70a77075626c697368a76368616e6e656ca161a464617461c4030001ffa2696407"],
    [[0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53 - 1)],
     "dc0014007fcc80ccffcd0100cdffffce00010000ceffffffffcf0000000100000000cf001fffffffffffffffe0d0dfd080d1ff7fd18000d2ffff7fffd280000000d3ffffffff7fffffffd3ffe0000000000001"],
    [1.5,
     "cb3ff8000000000000"],
    [-0.25,
     "cbbfd0000000000000"],
    ["x".repeat(31),
     "bf78787878787878787878787878787878787878787878787878787878787878"],
    ["y".repeat(32),
     "d9207979797979797979797979797979797979797979797979797979797979797979"],
    ["z".repeat(256),
     "da01007a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a"],
    [new Uint8Array(256).fill(98),
     "c5010062626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262"],
    [Array.from({ length: 16 }, (_, i) => i),
     "dc0010000102030405060708090a0b0c0d0e0f"],
    [Object.fromEntries(Array.from({ length: 16 }, (_, i) => [String(i), i])),
     "de0010a13000a13101a13202a13303a13404a13505a13606a13707a13808a13909a231300aa231310ba231320ca231330da231340ea231350f"],
    [null,
     "c0"],
    [true,
     "c3"],
    [false,
     "c2"],
    ["héllo",
     "a668c3a96c6c6f"],
  ];
  const hex = (bytes) => Buffer.from(bytes).toString("hex");
  for (const [value, expected] of golden) {
    assert.equal(hex(pack(value)), expected, JSON.stringify(value));
    assert.deepEqual(unpack(new Uint8Array(Buffer.from(expected, "hex"))), value);
  }
  assert.equal(unpack(new Uint8Array(Buffer.from("cf0020000000000001", "hex"))), 2n ** 53n + 1n);
  for (const bad of ["c1", "a3616263ff", "81c0c0", "d40000", "c403aa", "90c0"]) {
    assert.throws(() => unpack(new Uint8Array(Buffer.from(bad, "hex"))), bad);
  }
});

test("bytes: Uint8Array data over MessagePack (bin) and JSON (base64); published both ways", async () => {
  // A WebSocket offered fanout.msgpack, whose node chose it.
  class PackedSocket extends FakeSocket {
    constructor(url, protocols) {
      super(url);
      this.protocols = protocols;
      this.protocol = protocols?.[0] ?? "";
    }
    send(bytes) { this.sent.push(unpack(bytes)); }
    frame(value) { this.onmessage?.({ data: pack(value).buffer }); }
  }
  const { client, last } = setup("ws://a/ws", { WebSocket: PackedSocket, protocol: "msgpack" });
  const got = [];
  client.subscribe("files", (event) => got.push(event.data));
  client.connect();
  assert.deepEqual(last().protocols, ["fanout.msgpack"]);
  assert.equal(last().binaryType, "arraybuffer");
  last().welcome("n1");
  last().frame({ op: "event", channel: "files", seq: 1, data: new Uint8Array([1, 2]) });
  last().frame({ op: "event", channel: "files", seq: 2, data: "AwQ=", encoding: "base64" });
  last().frame({ op: "event", channel: "files", seq: 3, data: { json: true } });
  assert.deepEqual(got, [new Uint8Array([1, 2]), new Uint8Array([3, 4]), { json: true }]);
  client.publish("files", new Uint8Array([9])).catch(() => {});
  assert.deepEqual(last().sent.at(-1).data, new Uint8Array([9]));
  client.close();
  mock.timers.reset();

  const json = setup("ws://a/ws");
  const plain = [];
  json.client.subscribe("files", (event) => plain.push(event));
  json.client.connect();
  json.last().welcome("n1");
  json.last().frame({ op: "event", channel: "files", seq: 1, data: "/3sA", encoding: "base64" });
  assert.deepEqual(plain[0].data, new Uint8Array([255, 123, 0]));
  assert.equal(plain[0].encoding, undefined);
  json.client.publish("files", new Uint8Array([255, 123, 0]).buffer).catch(() => {});
  const sent = json.last().sent.at(-1);
  assert.equal(sent.data, "/3sA");
  assert.equal(sent.encoding, "base64");
  assert.throws(() => new FanoutClient("ws://a/ws", { protocol: "cbor" }), /protocol/);
  json.client.close();
  mock.timers.reset();
});

test("rpc resolves with the backend's result; the app's subscriptions are followed and resumed", async () => {
  const { client, last } = setup(["ws://a/ws"]);
  try {
    const server = [];
    client.on("subscribed", (s) => server.push(["subscribed", s]));
    client.on("unsubscribed", (s) => server.push(["unsubscribed", s]));
    client.connect();
    last().welcome("ws-a");
    const answer = client.rpc("getProfile", { id: 7 });
    const sent = last().sent.at(-1);
    assert.deepEqual({ ...sent, id: undefined }, { op: "rpc", method: "getProfile", data: { id: 7 }, id: undefined });
    last().frame({ op: "rpc", id: sent.id, result: { name: "Ada" } });
    assert.deepEqual(await answer, { name: "Ada" });
    const refused = client.rpc("nope");
    last().frame({ op: "error", code: "bad_input", message: "no", ref: "rpc", id: last().sent.at(-1).id });
    await assert.rejects(refused, (error) => error.code === "bad_input");

    // The app subscribes this connection: followed, and resumed after a reconnect.
    last().frame({ op: "subscribed", channel: "news" });
    assert.deepEqual(server, [["subscribed", { channel: "news", server: true }]]);
    assert.deepEqual(client.channels, ["news"]);
    last().frame({ op: "event", channel: "news", seq: 5, id: "e", ts: 1, data: 1 });
    last().drop(1006);
    mock.timers.tick(60000);
    last().welcome("ws-a");
    const resubscribe = last().sent.find((f) => f.op === "subscribe" && f.channel === "news");
    assert.equal(resubscribe.since, 5);
    last().frame({ op: "unsubscribed", channel: "news" });
    assert.deepEqual(client.channels, []);
    assert.equal(server.at(-1)[0], "unsubscribed");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("deltas: asked for and renewed; whole, then applied; a replay resets; one that does not apply asks again", () => {
  const { client, last } = setup("ws://a/ws", { minDelay: 10 });
  try {
    const seen = [];
    const errors = [];
    client.on("error", (e) => errors.push(e.code));
    client.connect();
    client.subscribe("scores", (e) => seen.push(e.data), { delta: "fossil" });
    last().welcome("ws-1");
    assert.equal(last().sent[0].delta, "fossil");
    last().frame({ op: "subscribed", channel: "scores", id: last().sent[0].id, delta: "fossil" });
    // The first whole (its data as published, a string), then a fossil delta of it (made by
    // npm's fossil-delta: `createStringDelta`).
    const first = '{"minute":1,"score":[0,0],"home":"Home United","away":"Away City"}';
    last().frame({ op: "event", channel: "scores", seq: 1, id: "a", ts: 1, delta: false, data: first });
    last().frame({ op: "event", channel: "scores", seq: 2, id: "b", ts: 1, delta: true, data: '12\nM:{"minute":2,"score":[1h@M,2ZWSVw;' });
    // A replayed event comes plain: taken as it is.
    last().frame({ op: "event", channel: "scores", seq: 3, id: "c", ts: 1, data: { minute: 3 } });
    assert.deepEqual(seen, [
      { minute: 1, score: [0, 0], home: "Home United", away: "Away City" },
      { minute: 2, score: [1, 0], home: "Home United", away: "Away City" },
      { minute: 3 },
    ]);
    // A delta with nothing to apply it to: an error, and the channel asked for again from seq 3.
    last().frame({ op: "event", channel: "scores", seq: 4, id: "d", ts: 1, delta: true, data: '12\nM:{"minute":2,"score":[1h@M,2ZWSVw;' });
    assert.deepEqual(errors, ["invalid_delta"]);
    const again = last().sent.at(-1);
    assert.deepEqual([again.op, again.channel, again.since, again.delta], ["subscribe", "scores", 3, "fossil"]);
    assert.equal(seen.length, 3);
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("a node over capacity: the next attempt waits at least its Retry-After, jittered, and goes to the next node", async () => {
  const { fetch, calls } = fakeFetch();
  const { client, states } = setup(["ws://a/ws", "ws://b/ws"], { minDelay: 10, transports: ["poll"], fetch });
  try {
    client.connect();
    calls.at(-1).answer(503, { error: { code: "over_capacity", message: "full", retry_after_ms: 5000 } });
    await settle();
    await settle();
    const waiting = states.at(-1);
    assert.equal(waiting.state, "reconnecting");
    assert.ok(waiting.delay >= 5000 && waiting.delay <= 7500, `${waiting.delay}`);
    assert.equal(waiting.next, "ws://b/ws");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("server-directed reconnects: the close reason's JSON (or SSE's fields) says when and where", () => {
  assert.equal(directive({ code: 1001, reason: "server shutting down" }), null);
  assert.equal(directive({ code: 1001, reason: "{not json" }), null);
  assert.deepEqual(directive({ code: 1001, reason: '{"reason":"bye","reconnect_after_ms":1200,"nodes":["ws://{host}:8082/ws"]}' }), {
    reason: "bye", after: 1200, nodes: ["ws://{host}:8082/ws"], regions: [],
  });
  // SSE's `disconnect` event and a poll's `disconnect` carry the fields as they are.
  assert.deepEqual(directive({ code: 1001, reason: "region evacuated", reconnect_after_ms: 5, regions: ["us"] }), {
    reason: "region evacuated", after: 5, nodes: [], regions: ["us"],
  });
  assert.equal(nodeUrl("ws://{host}:8082/ws", "ws://10.0.0.7:8081/ws"), "ws://10.0.0.7:8082/ws");
  assert.equal(nodeUrl("wss://b.example/ws", "ws://a/ws"), "wss://b.example/ws");
});

test("a drained node's client waits as told and goes to the node it was sent to, then back to its list", () => {
  const { client, states, last } = setup(["ws://127.0.0.1:8081/ws", "ws://127.0.0.1:8082/ws"], { minDelay: 100 });
  const closes = [];
  client.on("close", (c) => closes.push(c));
  try {
    client.connect();
    last().welcome("ws-1");
    last().drop(1001, JSON.stringify({ reason: "server shutting down", reconnect_after_ms: 4321, nodes: ["ws://{host}:8083/ws"] }));
    assert.equal(closes.at(-1).reason, "server shutting down");
    assert.equal(closes.at(-1).reconnectAfter, 4321);
    const waiting = states.at(-1);
    assert.equal(waiting.delay, 4321);
    assert.equal(waiting.next, "ws://127.0.0.1:8083/ws");
    mock.timers.tick(4320);
    assert.equal(last().url, "ws://127.0.0.1:8081/ws", "not before it was told");
    mock.timers.tick(1);
    assert.equal(last().url, "ws://127.0.0.1:8083/ws");
    last().drop(1006); // that node is gone too: the list again
    mock.timers.tick(200);
    assert.equal(last().url, "ws://127.0.0.1:8082/ws");
    // A terminal close is never directed, whatever its reason says.
    last().welcome("ws-2");
    last().drop(4500, JSON.stringify({ reason: "go", reconnect_after_ms: 1 }));
    assert.equal(client.state, "closed");
  } finally {
    client.close();
    mock.timers.reset();
  }
});

test("an evacuated region's client goes to the nearest of the regions it is sent to, and stays out", async () => {
  FakeSocket.all = [];
  const rtts = { "ws://eu-1/ws": 10, "ws://us-1/ws": 50, "ws://ap-1/ws": 30 };
  const client = new FanoutClient(
    { eu: ["ws://eu-1/ws", "ws://eu-2/ws"], us: ["ws://us-1/ws"], ap: ["ws://ap-1/ws"] },
    { WebSocket: FakeSocket, measure: async (url) => rtts[url], minDelay: 100 },
  );
  const states = [];
  client.on("state", (s) => states.push(s));
  try {
    client.connect();
    await new Promise((resolve) => setTimeout(resolve, 0));
    assert.equal(FakeSocket.all.at(-1).url, "ws://eu-1/ws");
    mock.timers.enable({ apis: ["setTimeout"] });
    FakeSocket.all.at(-1).welcome("eu-1");
    const reason = { reason: "region evacuated", reconnect_after_ms: 700, regions: ["us", "ap"] };
    FakeSocket.all.at(-1).drop(1001, JSON.stringify(reason));
    assert.equal(states.at(-1).next, "ws://ap-1/ws", "ap is nearer than us");
    mock.timers.tick(700);
    assert.equal(FakeSocket.all.at(-1).url, "ws://ap-1/ws");
    assert.deepEqual(client.urls, ["ws://ap-1/ws", "ws://us-1/ws", "ws://eu-1/ws", "ws://eu-2/ws"]);
    FakeSocket.all.at(-1).drop(1006); // ap fails: us next, not back to eu
    mock.timers.tick(200);
    assert.equal(FakeSocket.all.at(-1).url, "ws://us-1/ws");
  } finally {
    client.close();
    mock.timers.reset();
  }
});
