// fanout.js (@fanout/client, clients/js): a small, dependency-free client for fanout's protocol,
// over WebSocket, server-sent events or long-polling. Install the package, or import it from
// a fanout API server (`/fanout.js`); fanout.d.ts declares its types.
//
//   import { FanoutClient } from "./fanout.js";
//   const client = new FanoutClient(["ws://localhost:8081/ws", "ws://localhost:8082/ws"]);
//   client.on("state", ({ state, transport }) => console.log(state, transport));
//   client.subscribe("maths", (event) => console.log(event.seq, event.data));
//   client.connect();
//
// Transports: option `transports` (default ["websocket", "sse", "poll"]). The client starts
// with the first and falls back to the next when one cannot connect (`fallbackAfter`, 2
// failed attempts in a row, each to the next URL); the same node URLs serve all three
// (`ws://host/ws` becomes `http://host/sse` and `http://host/poll`). Events, `resumed`, and
// every method work the same on each, with two exceptions over long-polling, which holds no
// connection: the client is not a presence member (`setInfo` is kept for the other
// transports) and receives no `presence` change events (`presence()` queries work).
// Switching transports resumes every channel where the last one left it.
//
// Presence: `client.subscribe("room:maths", cb, { presence: true })` adds `presence` events
// (join, leave, update of any member on any node), `client.presence("room:maths")` lists the
// members, and `client.setInfo({ name: "Ada" })` changes what others see of this client (it
// is set again after every reconnect).
//
// It reconnects by itself with exponential backoff and jitter (so a node's restart does not
// make all its clients reconnect at the same instant), moves to the next URL of the list on
// every attempt (fail-over), and subscribes again to every channel after each reconnect,
// resuming from the last `seq` it received on each (broadcast included): the node replays
// what was missed, so nothing is lost within the history window. A `resumed` event says how
// many events were replayed, and `recovered: false` when some could not be.
//
// Regions: on a tier with regions, events carry `region` and the client keeps its position
// per region (`since: {eu: 41, us: 17}`, cursors of version 2), so it resumes on a node of any
// region. `new FanoutClient({eu: [...], us: [...]})` connects to the region with the lowest
// measured round trip (`client.regions`) and fails over to the others.
// The protocol itself is described in docs/protocol.md.

/** Connection states, as reported by the `state` event and `client.state`. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** Whether a close code asks the client to reconnect (docs/protocol.md, "Close codes"). */
export function shouldReconnect(code) {
  return !(code === 1000 || (code >= 4500 && code <= 4999));
}

/**
 * What a close the server decided says of the reconnect (docs/protocol.md, "Server-directed
 * reconnects"): `{reason, after, nodes, regions}`, or null. A WebSocket's or WebTransport's
 * close reason is then JSON (`{"reason", "reconnect_after_ms", "nodes"?, "regions"?}`); SSE's
 * `disconnect` event and a poll's `disconnect` carry the same fields.
 */
export function directive(event) {
  let said = event;
  if (typeof event?.reconnect_after_ms !== "number") {
    if (typeof event?.reason !== "string" || !event.reason.startsWith("{")) return null;
    try {
      said = JSON.parse(event.reason);
    } catch {
      return null;
    }
    if (typeof said?.reconnect_after_ms !== "number") return null;
  }
  const names = (list) => (Array.isArray(list) ? list.filter((x) => typeof x === "string") : []);
  return {
    reason: typeof said.reason === "string" ? said.reason : "",
    after: Math.max(0, said.reconnect_after_ms),
    nodes: names(said.nodes),
    regions: names(said.regions),
  };
}

/**
 * A node's announced URL (`ws://{host}:8082/ws`) for a client that reached `current`: `{host}`
 * is the host it reached.
 */
export function nodeUrl(announced, current) {
  if (!announced.includes("{host}")) return announced;
  let host;
  try {
    host = new URL(current, globalThis.location?.href).hostname;
  } catch {
    return null;
  }
  if (host.includes(":")) host = `[${host}]`;
  return announced.replaceAll("{host}", host);
}

/** Whether a refused request may succeed when asked again (the node lost the bus for now). */
export function retryable(error) {
  return error?.code === "bus_unavailable";
}

/**
 * Delay before reconnect attempt `attempt` (1, 2, ...): exponential from `minDelay`, capped at
 * `maxDelay`, with "equal jitter" (a random point in the upper half), so clients that lost
 * the same node spread out instead of returning together.
 */
/** The transports, in the default order of preference. */
export const TRANSPORTS = Object.freeze(["webtransport", "websocket", "sse", "poll"]);

/**
 * The transports a client tries by default, in order: WebTransport first where this runtime
 * has it (it is skipped for a node that does not offer it), then WebSocket, SSE, long-polling.
 */
export function defaultTransports(runtime = globalThis) {
  return TRANSPORTS.filter((t) => t !== "webtransport" || typeof runtime.WebTransport === "function");
}

/**
 * Where `transport` is served on the node of `url` (a node URL as given to the client,
 * `ws://host:port/ws?user=ada`): the WebSocket URL itself, or the node's HTTP base
 * (`http://host:port`) and the query to keep (`user=ada`) for the HTTP transports.
 */
export function endpoint(url, transport) {
  if (transport === "websocket" && /^wss?:/.test(url)) return { url, base: null, query: null };
  const parsed = new URL(url, globalThis.location?.href);
  if (transport === "websocket") {
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (!/\/ws\/?$/.test(parsed.pathname)) parsed.pathname = parsed.pathname.replace(/\/?$/, "/ws");
    return { url: parsed.toString(), base: null, query: null };
  }
  if (parsed.protocol === "ws:") parsed.protocol = "http:";
  if (parsed.protocol === "wss:") parsed.protocol = "https:";
  const path = parsed.pathname.replace(/\/(ws|sse|poll)\/?$/, "").replace(/\/$/, "");
  const query = new URLSearchParams(parsed.search);
  return { url: null, base: `${parsed.origin}${path}`, query };
}

/** Reads a cursor of the HTTP transports (base64url JSON, docs/protocol.md), or null. */
export function decodeCursor(text) {
  try {
    const base64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (char) => char.charCodeAt(0));
    const cursor = JSON.parse(new TextDecoder().decode(bytes));
    return cursor && (cursor.v === 1 || cursor.v === 2) ? cursor : null;
  } catch {
    return null;
  }
}

/**
 * Writes a cursor: version 1 with a seq per channel, version 2 (a tier with regions) with
 * `{region: seq}` per channel.
 */
export function encodeCursor({ e, t = 0, c = {}, s = {} }) {
  const regions = [...Object.values(c), ...Object.values(s)].some((p) => typeof p === "object");
  const json = JSON.stringify({ v: regions ? 2 : 1, e, t, c, s });
  const bytes = new TextEncoder().encode(json);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Whether a client at position `last` (a seq, or `{region: seq}` with regions) already has
 * event `frame` (its `seq`, and its `region` with regions).
 */
export function hasEvent(last, frame) {
  if (last === undefined) return false;
  if (frame.region === undefined) return typeof last === "number" && frame.seq <= last;
  return typeof last === "object" && last[frame.region] >= frame.seq;
}

/** The position after `last` once `frame` is received (seqs of each region only grow). */
export function advance(last, frame) {
  if (frame.region === undefined) return Math.max(frame.seq, typeof last === "number" ? last : 0);
  const positions = typeof last === "object" && last !== null ? { ...last } : {};
  positions[frame.region] = Math.max(frame.seq, positions[frame.region] ?? 0);
  return positions;
}

/** `a` and `b` merged, the later position of each region kept (or the later seq). */
function latest(a, b) {
  if (a === undefined) return b;
  if (typeof a === "number" || typeof b === "number") return Math.max(Number(a) || 0, Number(b) || 0);
  const merged = { ...a };
  for (const [region, seq] of Object.entries(b)) merged[region] = Math.max(seq, merged[region] ?? 0);
  return merged;
}

/**
 * Orders the regions of `groups` (`{region: [urls]}`) by round trip, nearest first, as
 * `measure(url)` (a promise of milliseconds, or a rejection) finds for each region's first
 * URL; regions that do not answer come last, in the order given. Returns the regions with
 * their round trips.
 */
export async function nearest(groups, measure) {
  const regions = Object.keys(groups);
  const rtts = await Promise.all(
    regions.map(async (region) => {
      try {
        return await measure(groups[region][0]);
      } catch {
        return Infinity;
      }
    }),
  );
  return regions
    .map((region, i) => ({ region, rtt: rtts[i], order: i }))
    .sort((a, b) => a.rtt - b.rtt || a.order - b.order)
    .map(({ region, rtt }) => ({ region, rtt }));
}

/** The round trip to a node (ms): the better of two `GET /healthz`. */
async function roundTrip(url, fetchImpl) {
  const { base } = endpoint(url, "sse");
  let best = Infinity;
  for (let i = 0; i < 2; i++) {
    const start = performance.now();
    await fetchImpl(`${base}/healthz`, { mode: "no-cors", cache: "no-store" });
    best = Math.min(best, performance.now() - start);
  }
  return best;
}

/** The digits of fossil's delta integers: 64 of them, most significant first. */
const FOSSIL_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/** Fossil's checksum of `bytes` (delta.c): 32-bit sums of the bytes by position mod 4. */
function fossilChecksum(bytes) {
  let [s0, s1, s2, s3] = [0, 0, 0, 0];
  let z = 0;
  let n = bytes.length;
  for (; n >= 16; z += 16, n -= 16) {
    s0 = (s0 + bytes[z] + bytes[z + 4] + bytes[z + 8] + bytes[z + 12]) | 0;
    s1 = (s1 + bytes[z + 1] + bytes[z + 5] + bytes[z + 9] + bytes[z + 13]) | 0;
    s2 = (s2 + bytes[z + 2] + bytes[z + 6] + bytes[z + 10] + bytes[z + 14]) | 0;
    s3 = (s3 + bytes[z + 3] + bytes[z + 7] + bytes[z + 11] + bytes[z + 15]) | 0;
  }
  for (; n >= 4; z += 4, n -= 4) {
    s0 = (s0 + bytes[z]) | 0;
    s1 = (s1 + bytes[z + 1]) | 0;
    s2 = (s2 + bytes[z + 2]) | 0;
    s3 = (s3 + bytes[z + 3]) | 0;
  }
  s3 = (s3 + (s2 << 8) + (s1 << 16) + (s0 << 24)) | 0;
  if (n === 3) s3 = (s3 + (bytes[z + 2] << 8)) | 0;
  if (n >= 2) s3 = (s3 + (bytes[z + 1] << 16)) | 0;
  if (n >= 1) s3 = (s3 + (bytes[z] << 24)) | 0;
  return s3 >>> 0;
}

/**
 * Applies a fossil delta (the format of Fossil SCM's delta.c, which the node makes with the
 * fossil-delta crate) to `base`; both are bytes (UTF-8). Throws on a delta that does not
 * apply (a wrong base, a broken delta): the size or the checksum does not match.
 */
export function applyDelta(base, delta) {
  let at = 0;
  const integer = () => {
    let value = 0;
    for (; at < delta.length; at++) {
      const digit = FOSSIL_DIGITS.indexOf(String.fromCharCode(delta[at]));
      if (digit < 0) break;
      value = value * 64 + digit;
    }
    return value;
  };
  const fail = (why) => {
    throw new Error(`fanout: a delta that does not apply: ${why}`);
  };
  const size = integer();
  if (delta[at++] !== 0x0a) fail("no size");
  const out = new Uint8Array(size);
  let written = 0;
  while (at < delta.length) {
    const count = integer();
    const op = delta[at++];
    if (op === 0x40) {
      // "@": copy `count` bytes of the base from `offset`.
      const offset = integer();
      if (delta[at++] !== 0x2c) fail("a copy without its ','");
      if (offset + count > base.length || written + count > size) fail("a copy out of bounds");
      out.set(base.subarray(offset, offset + count), written);
      written += count;
    } else if (op === 0x3a) {
      // ":": `count` bytes of the delta itself.
      if (at + count > delta.length || written + count > size) fail("a literal out of bounds");
      out.set(delta.subarray(at, at + count), written);
      written += count;
      at += count;
    } else if (op === 0x3b) {
      // ";": the end, with the checksum of the result.
      if (written !== size) fail("the size does not match");
      if (count !== fossilChecksum(out)) fail("the checksum does not match");
      return out;
    } else {
      fail("an unknown command");
    }
  }
  return fail("no end");
}

export function backoff(attempt, minDelay = 500, maxDelay = 15000, random = Math.random) {
  const base = Math.min(maxDelay, minDelay * 2 ** Math.max(0, attempt - 1));
  return Math.round(base / 2 + random() * (base / 2));
}

export class FanoutClient {
  /**
   * @param {string|string[]|Object<string,string[]>} urls  URLs of fanout nodes
   *   (`ws://host:port/ws`; the HTTP transports use the same host and query), or URLs by
   *   region (`{eu: [...], us: [...]}`): the client connects to the region with the lowest
   *   measured round trip and fails over to the next
   * @param {(url: string) => Promise<number>} [options.measure] measures the round trip to a
   *   node in ms (default: the better of two `GET /healthz`)
   * @param {object} [options]
   * @param {string[]} [options.transports] the transports to use, in order of preference
   *   (default: `webtransport` where the runtime has it, then `websocket`, `sse`, `poll`)
   * @param {Object<string,{url: string, cert_hashes?: string[]}>} [options.webtransport] each
   *   node's WebTransport listener by the node's URL, as `GET /v1/nodes` gives it
   *   (`{url, cert_hashes}`; `{host}` is this page's host): a node without an entry is
   *   reached over the next transport
   * @param {typeof WebTransport} [options.WebTransport] WebTransport implementation (default:
   *   the global one)
   * @param {"json"|"msgpack"} [options.protocol="json"] how WebSocket and WebTransport frames
   *   are encoded: JSON text, or MessagePack (`fanout.msgpack`: smaller frames, bytes as bin).
   *   SSE and long-polling speak JSON either way. Whatever the protocol, an event whose data
   *   is bytes reaches handlers with `data` a `Uint8Array`, and `publish` takes one.
   * @param {number} [options.fallbackAfter=2]     failed attempts in a row before the next transport
   * @param {number} [options.pollTimeout=25]      how long one long-poll waits for events (s)
   * @param {number} [options.minDelay=500]        first reconnect delay (ms, before jitter)
   * @param {number} [options.maxDelay=15000]      longest reconnect delay (ms)
   * @param {number} [options.connectTimeout=10000] give up on a connection attempt without `welcome` (ms)
   * @param {typeof WebSocket} [options.WebSocket] WebSocket implementation (default: the global one)
   * @param {typeof EventSource} [options.EventSource] EventSource implementation (default: the global one)
   * @param {typeof fetch} [options.fetch] fetch implementation (default: the global one)
   * @param {() => (string|Promise<string>)} [options.getToken] returns a JWT, for nodes with
   *   `FANOUT_AUTH=jwt`: called for every connection attempt (sent as `?token=`) and before
   *   the token expires (sent as a `refresh`)
   */
  constructor(urls, options = {}) {
    // URLs grouped by region (`{eu: [...], us: [...]}`): the nearest region first, measured
    // when connecting; the others are where it fails over to.
    this._groups = urls && typeof urls === "object" && !Array.isArray(urls) ? urls : null;
    /** With URLs by region: the regions by round trip ({region, rtt}), once measured. */
    this.regions = null;
    this.urls = this._groups
      ? Object.values(this._groups).flat().filter(Boolean)
      : (Array.isArray(urls) ? urls : [urls]).filter(Boolean);
    if (this.urls.length === 0) throw new Error("fanout: give at least one node URL");
    this.options = {
      minDelay: 500,
      maxDelay: 15000,
      connectTimeout: 10000,
      transports: defaultTransports(),
      fallbackAfter: 2,
      pollTimeout: 25,
      protocol: "json",
      WebSocket: globalThis.WebSocket,
      WebTransport: globalThis.WebTransport,
      EventSource: globalThis.EventSource,
      fetch: globalThis.fetch?.bind(globalThis),
      ...options,
    };
    if (!["json", "msgpack"].includes(this.options.protocol)) {
      throw new Error(`fanout: protocol is "json" or "msgpack", not ${this.options.protocol}`);
    }
    const unknown = this.options.transports.filter((t) => !TRANSPORTS.includes(t));
    if (unknown.length || this.options.transports.length === 0) {
      throw new Error(`fanout: transports are some of ${TRANSPORTS.join(", ")}, not ${unknown}`);
    }
    /** The transport of the current (or last) connection attempt. */
    this.transport = this.options.transports[0];
    this._transportIndex = 0;
    this._failures = 0; // attempts in a row that got no welcome, on this transport
    /** One of {@link State}. */
    this.state = State.CLOSED;
    /** From the last `welcome`: the node's id and this connection's id. */
    this.node = null;
    this.conn = null;
    /** The URL of the current (or last) connection attempt. */
    this.url = null;
    /** Reconnect attempts since the last `welcome`. */
    this.attempt = 0;
    this._urlIndex = 0;
    this._socket = null;
    this._timer = null;
    this._wanted = false;
    this._channels = new Map(); // channel -> Set of callbacks
    this._listeners = new Map(); // event name -> Set of callbacks
    this._pending = new Map(); // request id -> { resolve, reject }
    this._nextId = 1;
    this._last = new Map(); // channel -> last seq received
    this._after = new Map(); // channel -> stream seq it is followed from, before its first event
    this._vouched = 0; // when a node last vouched for these positions (cursor time, unix ms)
    this._cursor = null; // the last cursor an HTTP stream gave (SSE event id), not yet read
    this._resuming = new Set(); // channels whose resuming subscribe awaits its reply
    this._watching = new Set(); // channels subscribed with presence: true
    this._deltas = new Set(); // channels subscribed with delta: "fossil"
    this._bases = new Map(); // channel -> the last event's data (UTF-8), what a delta is from
    this._info = undefined; // presence info set with setInfo, re-applied on reconnect
    /** The stream epoch the remembered sequences belong to (from `welcome`). */
    this.epoch = null;
  }

  /**
   * Listens to `state` ({state, attempt, delay?, url, transport}), `welcome` (the frame, with
   * `transport`), `event` (every
   * event frame, `broadcast` included), `resumed` ({channel, recovered, replayed} after a
   * reconnect), `presence` (a `join`, `leave` or `update` frame: {op, channel, user, conn,
   * node, info, joined_at}), `subscribed` / `unsubscribed` ({channel}: the app subscribed or
   * unsubscribed this connection, server-side; a channel the app subscribed is followed, and
   * resumed after a reconnect, like the client's own), `close` ({code, reason, url}) and
   * `error` (error frames, and failures). Presence changes are not replayed: after a
   * reconnect (`welcome`), ask {@link presence} again.
   * Returns a function that removes the listener.
   */
  on(name, callback) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(callback);
    return () => this._listeners.get(name)?.delete(callback);
  }

  /** Opens the connection (and keeps it open until {@link close}). */
  connect() {
    this._wanted = true;
    if (this._groups && !this.regions) {
      if (this._measuring) return this;
      this._measuring = true;
      const measure = this.options.measure ?? ((url) => roundTrip(url, this.options.fetch));
      nearest(this._groups, measure).then((regions) => {
        this._measuring = false;
        this.regions = regions;
        this.urls = regions.flatMap(({ region }) => this._groups[region]).filter(Boolean);
        this._urlIndex = 0;
        if (this._wanted && !this._socket && !this._timer && !this._opening) this._open();
      });
      return this;
    }
    if (!this._socket && !this._timer && !this._opening) this._open();
    return this;
  }

  /** The `exp` claim of a JWT (unix seconds), or undefined. */
  static tokenExpiry(token) {
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(payload)).exp;
    } catch {
      return undefined;
    }
  }

  /** Closes the connection for good (no reconnect). */
  close() {
    this._wanted = false;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    this._timer = null;
    const socket = this._socket;
    this._socket = null;
    if (socket) socket.close(1000, "client closed");
    this._resuming.clear();
    this._failPending(new Error("fanout: connection closed"));
    this._setState(State.CLOSED);
  }

  /**
   * Subscribes to `channel`; `callback` (optional) receives that channel's events. The
   * subscription is renewed after every reconnect. Resolves with the `subscribed` reply once
   * the node confirms (immediately if not connected: it is sent on connect); rejects with the
   * error frame if the node refuses (and the channel is dropped), or with an Error if the
   * connection is lost first (the channel is kept and renewed on reconnect).
   * With `{ presence: true }`, the channel's join/leave/update frames come as `presence` events.
   * With `{ delta: "fossil" }`, the node sends the channel's events as fossil deltas of the
   * one before, where it allows it (the reply's `delta` says whether): they arrive whole,
   * applied here.
   */
  subscribe(channel, callback, { presence = false, delta } = {}) {
    if (!this._channels.has(channel)) this._channels.set(channel, new Set());
    if (callback) this._channels.get(channel).add(callback);
    if (presence) this._watching.add(channel);
    else this._watching.delete(channel);
    if (delta === "fossil") this._deltas.add(channel);
    else this._deltas.delete(channel);
    this._bases.delete(channel);
    if (this.state !== State.OPEN) return Promise.resolve({ op: "pending", channel });
    const request = { op: "subscribe", channel, ...(presence ? { presence } : {}) };
    if (this._deltas.has(channel)) request.delta = "fossil";
    return this.request(request).catch(
      (error) => {
        // Forget the channel only if the node refused it; a lost connection re-subscribes,
        // and so does a node that could not reach the bus now (bus_unavailable).
        if (error.op === "error" && !retryable(error)) {
          this._channels.delete(channel);
          this._watching.delete(channel);
        }
        throw error;
      },
    );
  }

  /**
   * Who is in `channel` across every node: resolves with `{channel, count, members:[{user,
   * conn, node, info, joined_at}], partial}` (`partial: true` when a node did not answer), or
   * with `{channel, count, partial}` when `countOnly`.
   */
  presence(channel, { countOnly = false } = {}) {
    return this.request({ op: "presence", channel, ...(countOnly ? { count_only: true } : {}) });
  }

  /**
   * Sets what other members see of this connection (a JSON object, or null). Kept and set
   * again after every reconnect. Resolves with the `info_updated` reply (at once, `pending`,
   * when not connected or long-polling: a poll is no presence member).
   */
  setInfo(info) {
    this._info = info;
    if (this.state !== State.OPEN || this.transport === "poll") {
      return Promise.resolve({ op: "pending", info });
    }
    return this.request({ op: "info", info });
  }

  /**
   * Publishes `data` (any JSON value) to `channel` through the node (the token's `publish`
   * patterns must allow it). Resolves with the `published` reply `{channel, seq, event}` once
   * the event is stored; rejects with the error frame (`forbidden`, `rate_limited`, ...).
   * If this client is subscribed to `channel`, its own copy of the event may arrive before or
   * after the reply (docs/protocol.md, "Ordering"): match them by `event.id === reply.event`.
   * With `{volatile: true}` the event is not stored: no `seq`, at most once, never replayed
   * (a cursor position, say); the reply, `{channel, volatile: true, event}`, comes once NATS
   * has it, and subscribers get it as an `event` with `volatile: true`.
   */
  publish(channel, data, options = {}) {
    if (data instanceof ArrayBuffer) data = new Uint8Array(data);
    const frame = { op: "publish", channel, data };
    if (options.volatile) frame.volatile = true;
    return this.request(frame);
  }

  /**
   * Asks the app's backend through this connection (the node's `FANOUT_PROXY_RPC_URL`):
   * resolves with the backend's `result`; rejects with the error frame (the app's own code
   * and message, `proxy_timeout`, `proxy_unavailable`, or `unsupported_op` on a node without
   * the hook). Works on every transport.
   */
  rpc(method, data = null) {
    return this.request({ op: "rpc", method, data }).then((reply) => reply.result);
  }

  /** Leaves `channel`. Resolves with the `unsubscribed` reply (at once when not connected). */
  unsubscribe(channel) {
    this._channels.delete(channel);
    this._watching.delete(channel);
    this._deltas.delete(channel);
    this._bases.delete(channel);
    this._last.delete(channel);
    this._after.delete(channel);
    if (this.state !== State.OPEN) return Promise.resolve({ op: "unsubscribed", channel });
    return this.request({ op: "unsubscribe", channel });
  }

  /** The channels this client is (or will be, once connected) subscribed to. */
  get channels() {
    return [...this._channels.keys()];
  }

  /** Sends a request with a fresh `id`; resolves with the reply, rejects with an error frame. */
  request(frame) {
    if (this.state !== State.OPEN) return Promise.reject(new Error("fanout: not connected"));
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this._socket.send({ ...frame, id });
    });
  }

  _emit(name, value) {
    for (const callback of this._listeners.get(name) ?? []) {
      try {
        callback(value);
      } catch (error) {
        console.error("fanout: listener failed", error);
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", {
      state,
      attempt: this.attempt,
      url: this.url,
      transport: this.transport,
      ...extra,
    });
  }

  _open() {
    this._timer = null;
    this.url = this._nextUrl ?? this.urls[this._urlIndex % this.urls.length];
    this._nextUrl = null;
    const { transports } = this.options;
    this.transport = transports[this._transportIndex % transports.length];
    this._setState(this.attempt === 0 ? State.CONNECTING : State.RECONNECTING);
    if (!this.options.getToken) {
      this._connect(this.url);
      return;
    }
    this._opening = true;
    Promise.resolve()
      .then(() => this.options.getToken())
      .finally(() => {
        this._opening = false;
      })
      .then((token) => {
        if (!this._wanted) return;
        this._token = token;
        this._connect(this.url, token);
      })
      .catch((error) => {
        this._emit("error", { code: "token_unavailable", message: String(error) });
        if (this._wanted) this._scheduleReconnect();
      });
  }

  /** Sends a fresh token at 80% of the current one's remaining lifetime. */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const exp = this._token && FanoutClient.tokenExpiry(this._token);
    if (!exp || !this.options.getToken) return;
    const left = exp * 1000 - Date.now();
    this._refreshTimer = setTimeout(async () => {
      try {
        const token = await this.options.getToken();
        await this.request({ op: "refresh", token });
        this._token = token;
        this._scheduleRefresh();
      } catch (error) {
        // If it cannot be refreshed, the node closes with 4004 at expiry and we reconnect.
        this._emit("error", { code: "refresh_failed", message: error.message ?? String(error) });
      }
    }, Math.max(0, left * 0.8));
  }

  /** Opens a connection to `url` over the current transport (with `token`, if any). */
  _connect(url, token) {
    let link;
    if (this.transport === "webtransport" && !webTransportOf(this, url)) {
      if (this.options.transports.length > 1) {
        // This node offers no WebTransport: straight to the next transport, not a failure.
        this._transportIndex += 1;
        this._open();
        return;
      }
      this._emit("error", { code: "connect_failed", message: "this node offers no WebTransport", transport: this.transport });
      this._failures += 1;
      this._scheduleReconnect();
      return;
    }
    try {
      const Link = { webtransport: WebTransportLink, websocket: SocketLink, sse: SseLink, poll: PollLink }[this.transport];
      link = new Link(this, url, token);
    } catch (error) {
      this._emit("error", { code: "connect_failed", message: String(error), transport: this.transport });
      this._failures += 1;
      this._scheduleReconnect();
      return;
    }
    this._socket = link;
    link.timeout = setTimeout(() => link.close(), this.options.connectTimeout);
  }

  /**
   * What a link received: a frame (its JSON text, its MessagePack bytes, or the object), while
   * it is current. Bytes in an event's data (JSON's base64) become a `Uint8Array`.
   */
  _received(link, frame) {
    if (link !== this._socket) return;
    if (typeof frame === "string" || frame instanceof ArrayBuffer || frame instanceof Uint8Array) {
      try {
        frame = typeof frame === "string" ? JSON.parse(frame) : unpack(new Uint8Array(frame));
      } catch {
        const message = `the server sent invalid ${typeof frame === "string" ? "JSON" : "MessagePack"}`;
        this._emit("error", { code: "invalid_frame", message });
        return;
      }
    }
    if (frame?.op === "event" && frame.encoding === "base64" && typeof frame.data === "string") {
      frame.data = fromBase64(frame.data);
      delete frame.encoding;
    }
    if (frame.op === "welcome") clearTimeout(link.timeout);
    this._onFrame(frame, link);
  }

  /** A link ended ({code, reason}), while it is current. */
  _closed(link, event) {
    clearTimeout(link.timeout);
    if (link === this._socket) this._onClose(event);
  }

  /** Fails request `id` of a link without a reply frame (its HTTP request failed). */
  _requestFailed(id, error) {
    const pending = this._pending.get(id);
    if (!pending) return;
    this._pending.delete(id);
    pending.reject(error);
  }

  /** Where this client is on `channels`, as a cursor for an HTTP transport, or null. */
  _cursorFor(channels) {
    this._readCursor();
    if (!this.epoch) return null;
    const c = {};
    const s = {};
    for (const channel of channels) {
      const last = this._last.get(channel);
      const after = this._after.get(channel);
      if (last !== undefined) c[channel] = last;
      if (after !== undefined && typeof after === "object") {
        // With regions: the regions of the channel it has seen nothing of yet.
        const rest = Object.fromEntries(Object.entries(after).filter(([r]) => !(last?.[r] >= 0)));
        if (Object.keys(rest).length) s[channel] = rest;
      } else if (after !== undefined && last === undefined) {
        s[channel] = after;
      }
    }
    if (Object.keys(c).length + Object.keys(s).length === 0) return null;
    return encodeCursor({ e: this.epoch, t: this._vouched, c, s });
  }

  /** Takes in a cursor a node gave: its epoch, its positions, its time. */
  _takeCursor(text) {
    const cursor = decodeCursor(text);
    if (!cursor) return;
    if (cursor.e !== this.epoch) {
      // A recreated stream: old sequences mean nothing now.
      this._last.clear();
      this._after.clear();
      this.epoch = cursor.e;
    }
    for (const [channel, seq] of Object.entries(cursor.c ?? {})) {
      this._last.set(channel, latest(this._last.get(channel), seq));
      if (typeof seq !== "object") this._after.delete(channel);
    }
    for (const [channel, seq] of Object.entries(cursor.s ?? {})) {
      if (typeof seq === "object") this._after.set(channel, { ...this._after.get(channel), ...seq });
      else if (!this._last.has(channel)) this._after.set(channel, seq);
    }
    this._vouched = Math.max(this._vouched, cursor.t ?? 0);
  }

  /** Reads the last SSE event id, if not read yet (events carry one each: read lazily). */
  _readCursor() {
    if (this._cursor === null) return;
    const text = this._cursor;
    this._cursor = null;
    this._takeCursor(text);
  }

  /** The channels to follow: those subscribed, and broadcast once anything came of it. */
  _following() {
    this._readCursor();
    const channels = new Set(this._channels.keys());
    if (this._last.has("broadcast") || this._after.has("broadcast")) channels.add("broadcast");
    return channels;
  }

  _onFrame(frame, link) {
    switch (frame.op) {
      case "welcome": {
        this.node = frame.node ?? null;
        this.conn = frame.conn ?? null;
        this.attempt = 0;
        this._failures = 0;
        this._readCursor();
        // Remembered sequences belong to the epoch we had; the node judges them against it.
        const epoch = this.epoch;
        this.epoch = frame.epoch || epoch; // (a node that has not read the stream yet says "")
        if (epoch && this.epoch !== epoch) {
          // The stream was recreated: what a resuming HTTP stream follows starts afresh.
          for (const channel of this._following()) {
            if (!link.covers(channel)) continue;
            this._last.delete(channel);
            this._after.delete(channel);
          }
        }
        this._setState(State.OPEN);
        this._emit("welcome", { ...frame, transport: this.transport });
        this._scheduleRefresh();
        // Before the subscriptions, so that this connection's joins carry its info.
        if (this._info !== undefined && this.transport !== "poll") {
          this.request({ op: "info", info: this._info }).catch((error) => {
            if (error.op === "error") this._emit("error", error);
          });
        }
        for (const channel of this._following()) {
          // Channels the stream already follows from this client's position need no
          // request, unless their presence changes are wanted too.
          const covered = link.covers(channel);
          if (covered && (!this._watching.has(channel) || this.transport === "poll")) continue;
          this._resubscribe(channel, epoch, { quiet: covered });
        }
        return;
      }
      case "resumed":
        this._emit("resumed", { channel: frame.channel, recovered: frame.recovered, replayed: frame.replayed });
        return;
      case "event": {
        // A volatile event has no seq: it moves no position and is never replayed.
        if (!frame.volatile) {
          // A live broadcast event can come before the reply of the broadcast resume (every
          // connection receives broadcast from its start): the replay has it, in order.
          if (this._resuming.has(frame.channel) && frame.channel === "broadcast") return;
          const last = this._last.get(frame.channel);
          if (hasEvent(last, frame)) return; // had it already
          if (!this._undelta(frame)) return;
          this._last.set(frame.channel, advance(last, frame));
          const after = this._after.get(frame.channel);
          if (frame.region !== undefined && typeof after === "object") {
            delete after[frame.region];
            if (Object.keys(after).length === 0) this._after.delete(frame.channel);
          } else {
            this._after.delete(frame.channel);
          }
        }
        for (const callback of this._channels.get(frame.channel) ?? []) {
          try {
            callback(frame);
          } catch (error) {
            console.error("fanout: subscriber failed", error);
          }
        }
        this._emit("event", frame);
        return;
      }
      case "join":
      case "leave":
      case "update":
        this._emit("presence", frame);
        return;
      case "subscribed":
      case "unsubscribed":
        if (frame.id === undefined) {
          // The app's doing (server-side), not a reply: follow (or stop following) it.
          if (frame.op === "subscribed") {
            if (!this._channels.has(frame.channel)) this._channels.set(frame.channel, new Set());
          } else {
            this._channels.delete(frame.channel);
            this._watching.delete(frame.channel);
            this._last.delete(frame.channel);
            this._after.delete(frame.channel);
          }
          this._emit(frame.op, { channel: frame.channel, server: true });
          return;
        }
      // falls through: a reply
      default: {
        const pending = frame.id !== undefined && this._pending.get(frame.id);
        if (pending) {
          this._pending.delete(frame.id);
          if (frame.op === "error") pending.reject(frame);
          else pending.resolve(frame);
        } else if (frame.op === "error") {
          this._emit("error", frame);
        }
      }
    }
  }

  /**
   * An event of a channel taken as deltas, made whole: `data` as published (`"delta":false`)
   * or the delta applied to the event before (`true`), parsed. An event without `delta` (a
   * replay) is as it is, and the next one comes whole. False, with an `error` event, when a
   * delta does not apply (the event is dropped and the channel subscribed again from the last
   * seq, so nothing is lost).
   */
  _undelta(frame) {
    if (frame.delta === undefined || typeof frame.data !== "string") {
      this._bases.delete(frame.channel);
      return true;
    }
    const text = new TextEncoder().encode(frame.data);
    try {
      const base = this._bases.get(frame.channel);
      if (frame.delta && base === undefined) throw new Error("no event before it to apply it to");
      const data = frame.delta ? applyDelta(base, text) : text;
      this._bases.set(frame.channel, data);
      frame.data = JSON.parse(new TextDecoder().decode(data));
      delete frame.delta;
      return true;
    } catch (error) {
      this._bases.delete(frame.channel);
      this._emit("error", { code: "invalid_delta", message: String(error.message ?? error), channel: frame.channel });
      this._resubscribe(frame.channel, this.epoch, { quiet: true });
      return false;
    }
  }

  /**
   * Subscribes again after a reconnect, resuming from the last seq received if any (`quiet`:
   * a stream that already follows the channel, asked for its presence changes too: no
   * `resumed` event).
   */
  _resubscribe(channel, epoch, { quiet = false } = {}) {
    const since = this._last.get(channel);
    const request = { op: "subscribe", channel };
    if (this._watching.has(channel)) request.presence = true;
    if (this._deltas.has(channel)) request.delta = "fossil";
    this._bases.delete(channel);
    if (since !== undefined) Object.assign(request, { since, ...(epoch ? { epoch } : {}) });
    if (since !== undefined && !quiet) this._resuming.add(channel);
    const link = this._socket;
    this.request(request)
      .then((reply) => {
        this._resuming.delete(channel);
        if (since === undefined || quiet) return;
        // A new epoch means the stream was recreated: old sequences mean nothing now.
        if (reply.epoch !== undefined && reply.epoch !== epoch) this._last.delete(channel);
        this._emit("resumed", { channel, recovered: reply.recovered, replayed: reply.replayed });
      })
      .catch((error) => {
        this._resuming.delete(channel);
        // A refusal drops the channel; a lost connection will re-subscribe on the next
        // welcome; a node that cannot reach the bus now is asked again in a while.
        if (error.op !== "error") return;
        this._emit("error", error);
        if (!retryable(error)) {
          this._channels.delete(channel);
        } else {
          setTimeout(() => {
            if (this._socket === link && this.state === State.OPEN) this._resubscribe(channel, epoch);
          }, backoff(1, this.options.minDelay, this.options.maxDelay));
        }
      });
  }

  _onClose(event) {
    const opened = this.state === State.OPEN;
    this._socket = null;
    this._resuming.clear();
    clearTimeout(this._refreshTimer);
    if (!opened) this._failures += 1;
    this._failPending(new Error("fanout: connection lost"));
    const directed = shouldReconnect(event.code) ? directive(event) : null;
    const reason = directed ? directed.reason : event.reason;
    const told = directed ? { reconnectAfter: directed.after, nodes: directed.nodes, regions: directed.regions } : {};
    this._emit("close", { code: event.code, reason, url: this.url, transport: this.transport, ...told });
    if (!this._wanted) return;
    if (!shouldReconnect(event.code)) {
      this._wanted = false;
      this._setState(State.CLOSED, { code: event.code, reason });
      return;
    }
    this._scheduleReconnect(directed);
  }

  /**
   * Where the server told the client to go (`directed`): the first node it named, or the
   * nearest of the regions it named (and the client's list reordered so that those regions'
   * URLs come first: later fail-overs stay out of the region it left). Null: anywhere.
   */
  _directedUrl(directed) {
    if (directed.nodes.length) return nodeUrl(directed.nodes[0], this.url);
    if (!directed.regions.length || !this._groups) return null;
    const order = (this.regions ?? []).map(({ region }) => region);
    for (const region of Object.keys(this._groups)) if (!order.includes(region)) order.push(region);
    const to = order.filter((region) => directed.regions.includes(region) && this._groups[region]?.length);
    if (!to.length) return null;
    const rest = order.filter((region) => !to.includes(region));
    this.urls = [...to, ...rest].flatMap((region) => this._groups[region] ?? []);
    this._urlIndex = 0;
    return this.urls[0];
  }

  _scheduleReconnect(directed = null) {
    this.attempt += 1;
    if (directed) {
      // The server said when (already jittered) and maybe where: obeyed as it is. Sent off
      // the list, the client fails over from where it was if that node fails.
      this._nextUrl = this._directedUrl(directed);
      if (!this._nextUrl) this._urlIndex += 1;
      const nextTransport = this.options.transports[this._transportIndex % this.options.transports.length];
      this._setState(State.RECONNECTING, {
        delay: directed.after,
        next: this._nextUrl ?? this.urls[this._urlIndex % this.urls.length],
        nextTransport,
      });
      this._timer = setTimeout(() => this._open(), directed.after);
      return;
    }
    this._urlIndex += 1; // fail over: the next attempt goes to the next URL of the list
    const { transports, fallbackAfter } = this.options;
    if (this._failures >= fallbackAfter && transports.length > 1) {
      // This transport cannot connect from here (a proxy that breaks upgrades, say).
      this._failures = 0;
      this._transportIndex += 1;
    }
    // A node over capacity said when to come back: at least that, jittered (up to half as
    // long again), so that its refused clients do not all come back at once.
    const floor = this._retryAfter ? this._retryAfter * (1 + Math.random() / 2) : 0;
    this._retryAfter = 0;
    const delay = Math.max(backoff(this.attempt, this.options.minDelay, this.options.maxDelay), floor);
    const nextTransport = transports[this._transportIndex % transports.length];
    this._setState(State.RECONNECTING, {
      delay,
      next: this.urls[this._urlIndex % this.urls.length],
      nextTransport,
    });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _failPending(error) {
    for (const { reject } of this._pending.values()) reject(error);
    this._pending.clear();
  }
}

// MessagePack (https://github.com/msgpack/msgpack/blob/master/spec.md), as much of it as
// fanout's frames use, without a dependency: maps with string keys, arrays, strings, bin
// (`Uint8Array`), integers, floats, booleans and nil. Ext types are refused.

/** The subprotocol of MessagePack frames, on WebSocket and WebTransport. */
export const MSGPACK = "fanout.msgpack";

/** `value` as MessagePack bytes. */
export function pack(value) {
  const out = [];
  const bytes = (array) => { for (let i = 0; i < array.length; i++) out.push(array[i]); };
  const be = (n, width) => { for (let i = width - 1; i >= 0; i--) out.push(Number((BigInt(n) >> BigInt(8 * i)) & 0xffn)); };
  const head = (small, base, n) => {
    if (small !== null && n < 16) out.push(small | n);
    else if (n < 0x10000) { out.push(base + 1); be(n, 2); }
    else { out.push(base + 2); be(n, 4); }
  };
  const write = (v) => {
    if (v === null || v === undefined) out.push(0xc0);
    else if (v === false) out.push(0xc2);
    else if (v === true) out.push(0xc3);
    else if (typeof v === "number" && Number.isInteger(v) && Math.abs(v) <= Number.MAX_SAFE_INTEGER) {
      if (v >= 0 && v < 0x80) out.push(v);
      else if (v < 0 && v >= -32) out.push(v & 0xff);
      else if (v >= 0) {
        if (v < 0x100) out.push(0xcc, v);
        else if (v < 0x10000) { out.push(0xcd); be(v, 2); }
        else if (v < 0x100000000) { out.push(0xce); be(v, 4); }
        else { out.push(0xcf); be(v, 8); }
      } else if (v >= -0x80) out.push(0xd0, v & 0xff);
      else if (v >= -0x8000) { out.push(0xd1); be(v & 0xffff, 2); }
      else if (v >= -0x80000000) { out.push(0xd2); be(v >>> 0, 4); }
      else { out.push(0xd3); be(BigInt.asUintN(64, BigInt(v)), 8); }
    } else if (typeof v === "number") {
      const view = new DataView(new ArrayBuffer(8));
      view.setFloat64(0, v);
      out.push(0xcb);
      bytes(new Uint8Array(view.buffer));
    } else if (typeof v === "bigint") {
      out.push(v < 0n ? 0xd3 : 0xcf);
      be(BigInt.asUintN(64, v), 8);
    } else if (typeof v === "string") {
      const utf8 = new TextEncoder().encode(v);
      if (utf8.length < 32) out.push(0xa0 | utf8.length);
      else if (utf8.length < 0x100) out.push(0xd9, utf8.length);
      else head(null, 0xd9, utf8.length);
      bytes(utf8);
    } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
      const bin = new Uint8Array(v);
      if (bin.length < 0x100) out.push(0xc4, bin.length);
      else head(null, 0xc4, bin.length);
      bytes(bin);
    } else if (Array.isArray(v)) {
      head(0x90, 0xdc - 1, v.length);
      for (const item of v) write(item);
    } else if (typeof v === "object") {
      const entries = Object.entries(v).filter(([, item]) => item !== undefined);
      head(0x80, 0xde - 1, entries.length);
      for (const [key, item] of entries) { write(key); write(item); }
    } else {
      throw new TypeError(`fanout: cannot encode ${typeof v} as MessagePack`);
    }
  };
  write(value);
  return new Uint8Array(out);
}

/** One MessagePack value from `bytes` (all of them); bin becomes a `Uint8Array`. */
export function unpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const utf8 = new TextDecoder("utf-8", { fatal: true });
  let at = 0;
  const take = (n) => {
    if (at + n > bytes.length) throw new RangeError("fanout: a MessagePack value ends early");
    const start = at;
    at += n;
    return start;
  };
  const uint = (width) => {
    const i = take(width);
    if (width === 1) return view.getUint8(i);
    if (width === 2) return view.getUint16(i);
    if (width === 4) return view.getUint32(i);
    const n = view.getBigUint64(i);
    return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
  };
  const int = (width) => {
    const i = take(width);
    if (width === 1) return view.getInt8(i);
    if (width === 2) return view.getInt16(i);
    if (width === 4) return view.getInt32(i);
    const n = view.getBigInt64(i);
    return n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
  };
  const str = (n) => utf8.decode(bytes.subarray(take(n), at));
  const bin = (n) => bytes.slice(take(n), at);
  const array = (n) => Array.from({ length: n }, () => read());
  const map = (n) => {
    const object = {};
    for (let i = 0; i < n; i++) {
      const key = read();
      if (typeof key !== "string") throw new TypeError("fanout: a MessagePack map key is not a string");
      object[key] = read();
    }
    return object;
  };
  const read = () => {
    const b = uint(1);
    if (b < 0x80) return b;
    if (b < 0x90) return map(b & 0x0f);
    if (b < 0xa0) return array(b & 0x0f);
    if (b < 0xc0) return str(b & 0x1f);
    if (b >= 0xe0) return b - 0x100;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(uint(1));
      case 0xc5: return bin(uint(2));
      case 0xc6: return bin(uint(4));
      case 0xca: return view.getFloat32(take(4));
      case 0xcb: return view.getFloat64(take(8));
      case 0xcc: return uint(1);
      case 0xcd: return uint(2);
      case 0xce: return uint(4);
      case 0xcf: return uint(8);
      case 0xd0: return int(1);
      case 0xd1: return int(2);
      case 0xd2: return int(4);
      case 0xd3: return int(8);
      case 0xd9: return str(uint(1));
      case 0xda: return str(uint(2));
      case 0xdb: return str(uint(4));
      case 0xdc: return array(uint(2));
      case 0xdd: return array(uint(4));
      case 0xde: return map(uint(2));
      case 0xdf: return map(uint(4));
      default: throw new TypeError(`fanout: MessagePack type 0x${b.toString(16)} is not used`);
    }
  };
  const value = read();
  if (at !== bytes.length) throw new RangeError("fanout: bytes after a MessagePack value");
  return value;
}

/** `bytes` as base64 (RFC 4648, padded). */
export function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** The bytes of base64 `text`. */
export function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A request as JSON text: bytes in `data` as base64 with `"encoding":"base64"`. */
function jsonFrame(frame) {
  if (!(frame.data instanceof Uint8Array)) return JSON.stringify(frame);
  return JSON.stringify({ ...frame, data: toBase64(frame.data), encoding: "base64" });
}

/** A WebSocket connection (`/ws`): requests and frames both ways on one socket. */
class SocketLink {
  constructor(client, url, token) {
    let target = endpoint(url, "websocket").url;
    if (token) target += `${target.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
    const packed = client.options.protocol === "msgpack";
    this.socket = packed
      ? new client.options.WebSocket(target, [MSGPACK])
      : new client.options.WebSocket(target);
    if (packed) this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (message) => client._received(this, message.data);
    this.socket.onclose = (event) => client._closed(this, { code: event.code, reason: event.reason });
  }

  send(frame) {
    // The node chose MessagePack only if this socket offered it.
    if (this.socket.protocol === MSGPACK) this.socket.send(pack(frame));
    else this.socket.send(jsonFrame(frame));
  }

  /** A fresh WebSocket follows nothing but broadcast, and that from now. */
  covers() {
    return false;
  }

  close(code, reason) {
    this.socket.close(code, reason);
  }
}

/** The WebTransport listener of the node at `url` (`{url, cert_hashes}`), if it has one. */
function webTransportOf(client, url) {
  if (typeof client.options.WebTransport !== "function") return null;
  return client.options.webtransport?.[url] ?? null;
}

/** `n` as a QUIC variable-length integer (RFC 9000, 16): 1, 2, 4 or 8 bytes. */
export function varint(n) {
  if (n < 0x40) return [n];
  if (n < 0x4000) return [0x40 | (n >> 8), n & 0xff];
  if (n < 0x40000000) return [0x80 | (n >>> 24), (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
  const high = Math.floor(n / 2 ** 32);
  return [0xc0 | (high >>> 24), (high >>> 16) & 0xff, (high >>> 8) & 0xff, high & 0xff,
    (n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
}

/** The frames whole in `buf` (each after its varint length), and the bytes left over. */
export function unframe(buf) {
  const frames = [];
  let at = 0;
  while (at < buf.length) {
    const len = 1 << (buf[at] >> 6);
    if (at + len > buf.length) break;
    let n = buf[at] & 0x3f;
    for (let i = 1; i < len; i++) n = n * 256 + buf[at + i];
    if (at + len + n > buf.length) break;
    if (n > 0) frames.push(buf.subarray(at + len, at + len + n));
    at += len + n;
  }
  return { frames, rest: buf.subarray(at) };
}

/**
 * WebTransport (`https://<node>/wt`, HTTP/3): frames both ways on one bidirectional stream,
 * each after its length as a QUIC varint; volatile events also come as datagrams. A
 * self-signed node is pinned by the hashes it announces (`serverCertificateHashes`).
 */
class WebTransportLink {
  constructor(client, url, token) {
    const info = webTransportOf(client, url);
    const host = globalThis.location?.hostname ?? "localhost";
    const target = new URL(info.url.replace("{host}", host));
    for (const [key, value] of endpoint(url, "sse").query) target.searchParams.set(key, value);
    if (token) target.searchParams.set("token", token);
    const hashes = (info.cert_hashes ?? []).map((hex) => ({
      algorithm: "sha-256",
      value: new Uint8Array(hex.match(/../g).map((h) => parseInt(h, 16))),
    }));
    this.client = client;
    this.queue = [];
    this.ended = false;
    const options = hashes.length ? { serverCertificateHashes: hashes } : {};
    if (client.options.protocol === "msgpack") options.protocols = [MSGPACK];
    this.session = new client.options.WebTransport(target.toString(), options);
    this.packed = false; // known once the session is ready (`session.protocol`)
    this.session.closed.then(
      (info) => this._end({ code: info?.closeCode ?? 1000, reason: info?.reason ?? "" }),
      (error) => this._end({ code: 1006, reason: String(error?.message ?? error) }),
    );
    this._start().catch((error) => {
      try {
        this.session.close({ closeCode: 1006, reason: "" });
      } catch {
        // already closed
      }
      this._end({ code: 1006, reason: String(error?.message ?? error) });
    });
  }

  async _start() {
    await this.session.ready;
    // A browser without `protocols` offers nothing, and the node then speaks JSON.
    this.packed = this.session.protocol === MSGPACK;
    const stream = await this.session.createBidirectionalStream();
    this.writer = stream.writable.getWriter();
    // A stream reaches the node with its first bytes: an empty frame, then what waited.
    await this.writer.write(new Uint8Array([0]));
    for (const frame of this.queue.splice(0)) this._write(frame);
    this._read(stream.readable.getReader());
    this._readDatagrams(this.session.datagrams.readable.getReader());
  }

  /** One frame's payload as `_received` takes it: JSON text or MessagePack bytes. */
  _payload(bytes, decoder) {
    return this.packed ? bytes : decoder.decode(bytes);
  }

  async _read(reader) {
    const decoder = new TextDecoder();
    let buf = new Uint8Array(0);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const joined = new Uint8Array(buf.length + value.length);
      joined.set(buf);
      joined.set(value, buf.length);
      const { frames, rest } = unframe(joined);
      buf = rest.slice();
      for (const frame of frames) this.client._received(this, this._payload(frame, decoder));
    }
  }

  async _readDatagrams(reader) {
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      this.client._received(this, this._payload(value, decoder));
    }
  }

  _write(frame) {
    const bytes = this.packed ? pack(frame) : new TextEncoder().encode(jsonFrame(frame));
    this.writer.write(new Uint8Array([...varint(bytes.length), ...bytes])).catch(() => {});
  }

  send(frame) {
    if (this.writer) this._write(frame);
    else this.queue.push(frame);
  }

  /** A fresh session follows nothing but broadcast, and that from now (as a WebSocket). */
  covers() {
    return false;
  }

  _end(event) {
    if (this.ended) return;
    this.ended = true;
    this.client._closed(this, event);
  }

  close(code = 1000, reason = "") {
    try {
      this.session.close({ closeCode: code, reason });
    } catch {
      // already closed
    }
    this._end({ code, reason });
  }
}

/** Identity for an HTTP request: the node URL's query (`user=`), and the token if any. */
function identityQuery(query, token) {
  const params = new URLSearchParams(query);
  if (token) params.set("token", token);
  return params;
}

/** The JSON error body of an HTTP answer as an error frame for request `id`. */
async function errorFrame(response, id, op) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // no JSON body
  }
  return {
    op: "error",
    code: body?.error?.code ?? `http_${response.status}`,
    message: body?.error?.message ?? `HTTP ${response.status}`,
    ref: op,
    id,
    // A node over capacity says when it takes a client again (`Retry-After`, in ms here).
    retryAfter:
      body?.error?.retry_after_ms ?? (Number(response.headers?.get?.("retry-after")) * 1000 || undefined),
  };
}

/**
 * Server-sent events (`GET /sse`): frames come as events, requests go as
 * `POST /session/{conn}`. The stream opens where this client is on every channel it has a
 * position on (a cursor); other channels are subscribed after the welcome.
 */
class SseLink {
  constructor(client, url, token) {
    if (!client.options.EventSource) throw new Error("no EventSource here");
    if (!client.options.fetch) throw new Error("no fetch here");
    const { base, query } = endpoint(url, "sse");
    this.client = client;
    this.base = base;
    this.params = identityQuery(query, token);
    const wanted = client._following();
    const cursor = client._cursorFor(wanted);
    this.following = new Set();
    if (cursor) {
      const positions = decodeCursor(cursor);
      for (const channel of [...Object.keys(positions.c), ...Object.keys(positions.s)]) {
        this.following.add(channel);
      }
    }
    const params = new URLSearchParams(this.params);
    if (cursor) params.set("last_event_id", cursor);
    this.source = new client.options.EventSource(`${base}/sse?${params}`);
    this.secret = null;
    this.conn = null;
    this.ended = null;
    const on = (name, handler) => this.source.addEventListener(name, handler);
    on("welcome", (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return client._received(this, message.data);
      }
      this.secret = frame.session;
      this.conn = frame.conn;
      client._received(this, frame);
    });
    on("event", (message) => {
      // Every event's id is the stream's cursor: kept, read when it is needed.
      if (this === client._socket && message.lastEventId) client._cursor = message.lastEventId;
      client._received(this, message.data);
    });
    for (const name of ["resumed", "join", "leave", "update", "subscribed", "unsubscribed", "refused"]) {
      on(name, (message) => {
        try {
          client._received(this, { op: name, ...JSON.parse(message.data) });
        } catch {
          client._received(this, message.data);
        }
      });
    }
    on("disconnect", (message) => {
      try {
        this.ended = JSON.parse(message.data);
      } catch {
        this.ended = { code: 1006, reason: "" };
      }
    });
    // EventSource would reconnect by itself, to the same URL; this client does it instead
    // (backoff, fail-over, fallback).
    this.source.onerror = () => this.close();
  }

  covers(channel) {
    return this.following.has(channel);
  }

  send(frame) {
    if (!this.conn) {
      this.client._requestFailed(frame.id, new Error("fanout: not connected"));
      return;
    }
    const post = this.client.options.fetch(`${this.base}/session/${this.conn}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${this.secret}`, "Content-Type": "application/json" },
      body: jsonFrame(frame),
    });
    post
      .then(async (response) => {
        if (response.ok) this.client._received(this, await response.text());
        else this.client._received(this, await errorFrame(response, frame.id, frame.op));
      })
      .catch((error) => this.client._requestFailed(frame.id, new Error(`fanout: ${error}`)));
  }

  close(code = 1006, reason = "") {
    if (this.closed) return;
    this.closed = true;
    this.source.close();
    const ended = this.ended ?? { code, reason };
    this.client._closed(this, ended);
  }
}

/**
 * Long-polling (`GET /poll`): stateless; where this client is on every channel goes with
 * each poll as the cursor, so each poll may reach another node. Publishes and presence
 * queries go as `POST /request`; subscribing changes what the next poll asks for.
 */
class PollLink {
  constructor(client, url, token) {
    if (!client.options.fetch) throw new Error("no fetch here");
    const { base, query } = endpoint(url, "poll");
    this.client = client;
    this.base = base;
    this.query = query;
    this.token = token;
    this.closed = false;
    this.controller = null;
    this.waiting = new Map(); // channel -> subscribe request awaiting its first poll
    this.failures = 0;
    this.welcomed = false;
    this._poll();
  }

  /** Every channel is followed by each poll, from this client's position. */
  covers() {
    return true;
  }

  _url(path, extra = {}) {
    const params = identityQuery(this.query, this.token);
    for (const [key, value] of Object.entries(extra)) {
      for (const one of [].concat(value)) params.append(key, one);
    }
    return `${this.base}${path}?${params}`;
  }

  async _poll() {
    const client = this.client;
    while (!this.closed) {
      const wanted = client._following();
      for (const channel of this.waiting.keys()) wanted.add(channel);
      const cursor = client._cursorFor(wanted);
      const covered = cursor ? decodeCursor(cursor) : { c: {}, s: {} };
      const fresh = [...wanted].filter((channel) => !(channel in covered.c) && !(channel in covered.s));
      const extra = { channel: fresh, timeout: this.welcomed ? client.options.pollTimeout : 0 };
      if (cursor) extra.cursor = cursor;
      this.controller = new AbortController();
      let response;
      try {
        response = await client.options.fetch(this._url("/poll", extra), { signal: this.controller.signal });
      } catch (error) {
        if (this.closed) return;
        if (this.controller.signal.aborted) continue; // the channels changed: ask again
        return this._fail(1006, String(error));
      }
      if (this.closed) return;
      if (!response.ok) {
        const frame = await errorFrame(response, undefined, "poll");
        if (frame.retryAfter) client._retryAfter = frame.retryAfter;
        if (response.status >= 500 || response.status === 429) return this._fail(1011, frame.message);
        // A refusal of what this poll asked: a new channel's subscribe, or the client itself.
        const refused = [...this.waiting.values()].filter(({ channel }) => wanted.has(channel));
        if (refused.length) {
          for (const { id, channel } of refused) {
            this.waiting.delete(channel);
            client._channels.delete(channel);
            client._received(this, { ...frame, ref: "subscribe", id, channel });
          }
          continue;
        }
        client._emit("error", frame);
        return this._fail(frame.code === "invalid_token" || frame.code === "token_expired" ? 4004 : 4500, frame.message);
      }
      let answer;
      try {
        answer = await response.json();
      } catch {
        continue; // cut short (a node going away): the same cursor asks again
      }
      if (this.closed) return;
      this._answered(answer, wanted);
    }
  }

  /** What a poll that asked for `asked` (channels) answered. */
  _answered(answer, asked) {
    const client = this.client;
    const reconnected = !this.welcomed;
    const epoch = decodeCursor(answer.cursor ?? "")?.e ?? client.epoch;
    if (!this.welcomed) {
      this.welcomed = true;
      client._received(this, { op: "welcome", node: null, conn: null, epoch });
    } else if (epoch !== client.epoch) {
      // The stream was recreated: old sequences mean nothing now.
      client._last.clear();
      client._after.clear();
      client.epoch = epoch;
    }
    // The subscribes this poll asked for are in place (those added since wait for the next).
    for (const [channel, { id }] of this.waiting) {
      if (!asked.has(channel)) continue;
      this.waiting.delete(channel);
      client._received(this, { op: "subscribed", channel, id });
    }
    for (const resumed of answer.resumed ?? []) {
      // Every poll resumes; only the first after a reconnect, or a loss, is news.
      if (reconnected || resumed.recovered === false) client._received(this, { op: "resumed", ...resumed });
    }
    for (const event of answer.events ?? []) client._received(this, event);
    // Where the events left this client, and where it follows channels that had none.
    if (answer.cursor) client._takeCursor(answer.cursor);
    // The app closed this client (disconnect, block, revocation): as a stream's close.
    if (answer.disconnect) this._fail(answer.disconnect.code, answer.disconnect.reason, answer.disconnect);
  }

  _fail(code, reason, said = {}) {
    if (this.closed) return;
    this.closed = true;
    this.client._closed(this, { ...said, code, reason });
  }

  /** The poll asks afresh (a subscription changed). */
  _restart() {
    this.controller?.abort();
  }

  send(frame) {
    const client = this.client;
    switch (frame.op) {
      case "subscribe":
        // The next poll asks for it, from now (or from this client's position).
        this.waiting.set(frame.channel, { id: frame.id, channel: frame.channel });
        this._restart();
        return;
      case "unsubscribe":
        client._received(this, { op: "unsubscribed", channel: frame.channel, id: frame.id });
        this._restart();
        return;
      case "refresh":
        this.token = frame.token;
        client._received(this, { op: "refreshed", id: frame.id });
        return;
      case "info":
        client._received(this, { op: "info_updated", info: frame.info, id: frame.id, pending: true });
        return;
      default:
        break;
    }
    client.options
      .fetch(this._url("/request"), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: jsonFrame(frame),
      })
      .then(async (response) => {
        if (response.ok) client._received(this, await response.text());
        else client._received(this, await errorFrame(response, frame.id, frame.op));
      })
      .catch((error) => client._requestFailed(frame.id, new Error(`fanout: ${error}`)));
  }

  close(code = 1006, reason = "") {
    if (this.closed) return;
    this.controller?.abort();
    this._fail(code, reason);
  }
}
