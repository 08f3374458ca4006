// fanout.js: a small, dependency-free client for fanout's WebSocket protocol.
// Copy it into your app, or import it from a fanout API server (`/fanout.js`).
//
//   import { FanoutClient } from "./fanout.js";
//   const client = new FanoutClient(["ws://localhost:8081/ws", "ws://localhost:8082/ws"]);
//   client.on("state", ({ state }) => console.log(state));
//   client.subscribe("maths", (event) => console.log(event.seq, event.data));
//   client.connect();
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
 * Delay before reconnect attempt `attempt` (1, 2, ...): exponential from `minDelay`, capped at
 * `maxDelay`, with "equal jitter" (a random point in the upper half), so clients that lost
 * the same node spread out instead of returning together.
 */
export function backoff(attempt, minDelay = 500, maxDelay = 15000, random = Math.random) {
  const base = Math.min(maxDelay, minDelay * 2 ** Math.max(0, attempt - 1));
  return Math.round(base / 2 + random() * (base / 2));
}

export class FanoutClient {
  /**
   * @param {string|string[]} urls  WebSocket URLs of fanout nodes (`ws://host:port/ws`).
   * @param {object} [options]
   * @param {number} [options.minDelay=500]        first reconnect delay (ms, before jitter)
   * @param {number} [options.maxDelay=15000]      longest reconnect delay (ms)
   * @param {number} [options.connectTimeout=10000] give up on a connection attempt without `welcome` (ms)
   * @param {typeof WebSocket} [options.WebSocket] WebSocket implementation (default: the global one)
   * @param {() => (string|Promise<string>)} [options.getToken] returns a JWT, for nodes with
   *   `FANOUT_AUTH=jwt`: called for every connection attempt (sent as `?token=`) and before
   *   the token expires (sent as a `refresh`)
   */
  constructor(urls, options = {}) {
    this.urls = (Array.isArray(urls) ? urls : [urls]).filter(Boolean);
    if (this.urls.length === 0) throw new Error("fanout: give at least one WebSocket URL");
    this.options = {
      minDelay: 500,
      maxDelay: 15000,
      connectTimeout: 10000,
      WebSocket: globalThis.WebSocket,
      ...options,
    };
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
    this._watching = new Set(); // channels subscribed with presence: true
    this._info = undefined; // presence info set with setInfo, re-applied on reconnect
    /** The stream epoch the remembered sequences belong to (from `welcome`). */
    this.epoch = null;
  }

  /**
   * Listens to `state` ({state, attempt, delay?, url}), `welcome` (the frame), `event` (every
   * event frame, `broadcast` included), `resumed` ({channel, recovered, replayed} after a
   * reconnect), `presence` (a `join`, `leave` or `update` frame: {op, channel, user, conn,
   * node, info, joined_at}), `close` ({code, reason, url}) and `error` (error frames, and
   * failures). Presence changes are not replayed: after a reconnect (`welcome`), ask
   * {@link presence} again.
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
   */
  subscribe(channel, callback, { presence = false } = {}) {
    if (!this._channels.has(channel)) this._channels.set(channel, new Set());
    if (callback) this._channels.get(channel).add(callback);
    if (presence) this._watching.add(channel);
    else this._watching.delete(channel);
    if (this.state !== State.OPEN) return Promise.resolve({ op: "pending", channel });
    return this.request({ op: "subscribe", channel, ...(presence ? { presence } : {}) }).catch(
      (error) => {
        // Forget the channel only if the node refused it; a lost connection re-subscribes.
        if (error.op === "error") {
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
   * again after every reconnect. Resolves with the `info_updated` reply (at once when not
   * connected).
   */
  setInfo(info) {
    this._info = info;
    if (this.state !== State.OPEN) return Promise.resolve({ op: "pending", info });
    return this.request({ op: "info", info });
  }

  /**
   * Publishes `data` (any JSON value) to `channel` through the node (the token's `publish`
   * patterns must allow it). Resolves with the `published` reply `{channel, seq, event}` once
   * the event is stored; rejects with the error frame (`forbidden`, `rate_limited`, ...).
   * If this client is subscribed to `channel`, its own copy of the event may arrive before or
   * after the reply (docs/protocol.md, "Ordering"): match them by `event.id === reply.event`.
   */
  publish(channel, data) {
    return this.request({ op: "publish", channel, data });
  }

  /** Leaves `channel`. Resolves with the `unsubscribed` reply (at once when not connected). */
  unsubscribe(channel) {
    this._channels.delete(channel);
    this._watching.delete(channel);
    this._last.delete(channel);
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
      this._socket.send(JSON.stringify({ ...frame, id }));
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
    this._emit("state", { state, attempt: this.attempt, url: this.url, ...extra });
  }

  _open() {
    this._timer = null;
    this.url = this.urls[this._urlIndex % this.urls.length];
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
        const separator = this.url.includes("?") ? "&" : "?";
        this._connect(`${this.url}${separator}token=${encodeURIComponent(token)}`);
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

  _connect(url) {
    let socket;
    try {
      socket = new this.options.WebSocket(url);
    } catch (error) {
      this._emit("error", { code: "connect_failed", message: String(error) });
      this._scheduleReconnect();
      return;
    }
    this._socket = socket;
    const timeout = setTimeout(() => socket.close(), this.options.connectTimeout);
    socket.onmessage = (message) => {
      if (socket === this._socket) this._onFrame(message.data, timeout);
    };
    socket.onclose = (event) => {
      clearTimeout(timeout);
      if (socket === this._socket) this._onClose(event);
    };
  }

  _onFrame(text, connectTimeout) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", { code: "invalid_frame", message: "the server sent invalid JSON" });
      return;
    }
    switch (frame.op) {
      case "welcome": {
        clearTimeout(connectTimeout);
        this.node = frame.node;
        this.conn = frame.conn;
        this.attempt = 0;
        // Remembered sequences belong to the epoch we had; the node judges them against it.
        const epoch = this.epoch;
        this.epoch = frame.epoch ?? null;
        this._setState(State.OPEN);
        this._emit("welcome", frame);
        this._scheduleRefresh();
        // Before the subscriptions, so that this connection's joins carry its info.
        if (this._info !== undefined) {
          this.request({ op: "info", info: this._info }).catch((error) => {
            if (error.op === "error") this._emit("error", error);
          });
        }
        const channels = new Set(this._channels.keys());
        if (this._last.has("broadcast")) channels.add("broadcast");
        for (const channel of channels) this._resubscribe(channel, epoch);
        return;
      }
      case "event": {
        const last = this._last.get(frame.channel);
        if (last !== undefined && frame.seq <= last) return; // had it already
        this._last.set(frame.channel, frame.seq);
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

  /** Subscribes again after a reconnect, resuming from the last seq received if any. */
  _resubscribe(channel, epoch) {
    const since = this._last.get(channel);
    const request = { op: "subscribe", channel };
    if (this._watching.has(channel)) request.presence = true;
    if (since !== undefined) Object.assign(request, { since, ...(epoch ? { epoch } : {}) });
    this.request(request)
      .then((reply) => {
        if (since === undefined) return;
        // A new epoch means the stream was recreated: old sequences mean nothing now.
        if (reply.epoch !== undefined && reply.epoch !== epoch) this._last.delete(channel);
        this._emit("resumed", { channel, recovered: reply.recovered, replayed: reply.replayed });
      })
      .catch((error) => {
        // A refusal drops the channel; a lost connection will re-subscribe on the next welcome.
        if (error.op === "error") {
          this._channels.delete(channel);
          this._emit("error", error);
        }
      });
  }

  _onClose(event) {
    this._socket = null;
    clearTimeout(this._refreshTimer);
    this._failPending(new Error("fanout: connection lost"));
    this._emit("close", { code: event.code, reason: event.reason, url: this.url });
    if (!this._wanted) return;
    if (!shouldReconnect(event.code)) {
      this._wanted = false;
      this._setState(State.CLOSED, { code: event.code, reason: event.reason });
      return;
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    this.attempt += 1;
    this._urlIndex += 1; // fail over: the next attempt goes to the next URL of the list
    const delay = backoff(this.attempt, this.options.minDelay, this.options.maxDelay);
    this._setState(State.RECONNECTING, { delay, next: this.urls[this._urlIndex % this.urls.length] });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _failPending(error) {
    for (const { reject } of this._pending.values()) reject(error);
    this._pending.clear();
  }
}
