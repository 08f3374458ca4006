// Type declarations for @fanout/client (fanout.js). The protocol: docs/protocol.md.

/** Any JSON value: an event's `data`, a member's `info`. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** An event's data: JSON, or bytes (published as `application/octet-stream`, or as a
 * `Uint8Array`), which reach handlers as a `Uint8Array` on every transport and protocol. */
export type Data = Json | Uint8Array;

/** A position in a channel: a seq, or with regions a seq per region. */
export type Position = number | Record<string, number>;

/** Connection states, as reported by the `state` event and `client.state`. */
export declare const State: Readonly<{
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;
export type ConnectionState = (typeof State)[keyof typeof State];

/** The transports, in the default order of preference. */
export type Transport = "webtransport" | "websocket" | "sse" | "poll";
export declare const TRANSPORTS: readonly Transport[];

/** What every event frame carries. */
interface EventFrameBase<T = Data> {
  op: "event";
  channel: string;
  /** The event id (a UUID). */
  id: string;
  /** Publish time, unix milliseconds. */
  ts: number;
  /** The JSON exactly as published, or its bytes as a `Uint8Array`. */
  data: T;
  /** With regions: where it was published. */
  region?: string;
  /** With FANOUT_EVENT_TRACE_ID: the trace id. */
  trace?: string;
}

/** A stored event: it has a place in the stream, and a resume replays it. */
export interface StoredEventFrame<T = Data> extends EventFrameBase<T> {
  /** The stream sequence (with regions: of `region`'s stream). */
  seq: number;
  volatile?: undefined;
}

/** A volatile event: not stored, no `seq`, at most once, never replayed. */
export interface VolatileEventFrame<T = Data> extends EventFrameBase<T> {
  volatile: true;
  seq?: undefined;
}

/** An event as delivered: the `event` frame (`if (!event.volatile)` narrows to a stored one). */
export type EventFrame<T = Data> = StoredEventFrame<T> | VolatileEventFrame<T>;

/** The first frame of every connection. */
export interface WelcomeFrame {
  op: "welcome";
  node: string;
  conn: string;
  user: string;
  /** Ping interval, seconds. */
  heartbeat: number;
  /** The event stream's identity: seqs compare only within one epoch. */
  epoch: string;
  region?: string;
  /** SSE only: the secret of `POST /session/{conn}`. */
  session?: string;
}

/** A presence member. */
export interface Member {
  user: string;
  conn: string;
  node: string;
  region?: string;
  info: Json;
  /** Unix milliseconds. */
  joined_at: number;
}

/** A presence change of a channel subscribed with `{ presence: true }`. */
export interface PresenceChange extends Member {
  op: "join" | "leave" | "update";
  channel: string;
}

/** A `presence` answer. `members` is absent with `countOnly`. */
export interface PresenceAnswer {
  op: "presence";
  channel: string;
  count: number;
  members?: Member[];
  /** A node that should have answered did not within 1 s: members may be missing. */
  partial: boolean;
}

/** A refused request: the node's error frame (docs/protocol.md, "Errors"). */
export interface ErrorFrame {
  op: "error";
  code: string;
  message: string;
  /** The op of the refused request, or null. */
  ref: string | null;
  id?: number | string;
}

export interface SubscribedReply {
  op: "subscribed";
  channel: string;
  id?: number;
  /** `"fossil"` when the node sends this channel's events as deltas (asked for, and allowed). */
  delta?: "fossil";
}
/** `subscribe` before the connection is open: sent once it is. */
export interface PendingReply {
  op: "pending";
  channel?: string;
  info?: Json;
}
export interface UnsubscribedReply {
  op: "unsubscribed";
  channel: string;
  id?: number;
}
/** The reply to a volatile publish: NATS has it; nothing stores it. */
export interface VolatilePublishedReply {
  op: "published";
  channel: string;
  volatile: true;
  /** The event's id: match your own copy by `event.id === reply.event`. */
  event: string;
  region?: string;
  id?: number;
}
export interface PublishedReply {
  op: "published";
  channel: string;
  seq: number;
  /** The stored event's id: match your own copy by `event.id === reply.event`. */
  event: string;
  region?: string;
  id?: number;
}
export interface InfoUpdatedReply {
  op: "info_updated";
  info: Json;
  id?: number;
}

/** After a (re)subscription that resumed: how the gap was filled. */
export interface Resumed {
  channel: string;
  /** False when some events were no longer in the history. */
  recovered: boolean;
  replayed: number;
}

export interface StateChange {
  state: ConnectionState;
  attempt: number;
  /** Milliseconds until the next attempt, while reconnecting. */
  delay?: number;
  url: string | null;
  transport: Transport;
}

export interface CloseInfo {
  code: number;
  reason: string;
  url: string | null;
  /** A close the server decided: how long the client waits before it reconnects (ms). */
  reconnectAfter?: number;
  /** Nodes the server sent it to (their announced URLs), best first. */
  nodes?: string[];
  /** Regions the server sent it to (its own is evacuated); it goes to the nearest. */
  regions?: string[];
}

/** The app subscribed (or unsubscribed) this connection, server-side. */
export interface ServerSubscription {
  channel: string;
  server: true;
}

/** What `client.on(name, ...)` delivers for each name. */
export interface ClientEvents {
  state: StateChange;
  welcome: WelcomeFrame & { transport: Transport };
  event: EventFrame;
  resumed: Resumed;
  presence: PresenceChange;
  /** The app subscribed this connection to a channel (it is followed from now on). */
  subscribed: ServerSubscription;
  /** The app took this connection out of a channel. */
  unsubscribed: ServerSubscription;
  close: CloseInfo;
  error: ErrorFrame | Error;
}

export interface ClientOptions {
  /** The transports to use, in order of preference (default: WebTransport where the runtime has it, then WebSocket, SSE, long-polling). */
  transports?: readonly Transport[];
  /** Failed attempts in a row before the next transport (default 2). */
  fallbackAfter?: number;
  /** How long one long-poll waits for events, seconds (default 25). */
  pollTimeout?: number;
  /** First reconnect delay, ms before jitter (default 500). */
  minDelay?: number;
  /** Longest reconnect delay, ms (default 15000). */
  maxDelay?: number;
  /** Give up on an attempt without `welcome` after this many ms (default 10000). */
  connectTimeout?: number;
  /** For nodes with FANOUT_AUTH=jwt: a token for every attempt, and before expiry. */
  getToken?: () => string | Promise<string>;
  /** Round trip to a node in ms (URLs by region; default: two `GET /healthz`). */
  measure?: (url: string) => Promise<number>;
  /** Implementations to use instead of the globals (Node.js, tests). */
  WebSocket?: unknown;
  /** WebTransport implementation (default: the global one). */
  WebTransport?: unknown;
  /**
   * Each node's WebTransport listener by the node's URL, as `GET /v1/nodes` announces it
   * (`{host}` in `url` is this page's host): a node without one is reached over the next
   * transport.
   */
  webtransport?: Record<string, WebTransportInfo>;
  /**
   * How WebSocket and WebTransport frames are encoded: JSON text (default), or MessagePack
   * (the `fanout.msgpack` subprotocol). SSE and long-polling speak JSON either way.
   */
  protocol?: "json" | "msgpack";
  EventSource?: unknown;
  fetch?: typeof fetch;
}

/** A client of fanout's protocol: reconnects, fails over, resumes every channel. */
export declare class FanoutClient {
  /**
   * @param urls node URLs (`ws://host:8081/ws`; the HTTP transports use the same host and
   *   query), or URLs by region (`{eu: [...], us: [...]}`: the nearest region first).
   */
  constructor(urls: string | readonly string[] | Record<string, readonly string[]>, options?: ClientOptions);

  readonly urls: string[];
  readonly options: Required<Pick<ClientOptions, "minDelay" | "maxDelay" | "connectTimeout" | "fallbackAfter" | "pollTimeout">> & ClientOptions;
  /** One of {@link State}. */
  readonly state: ConnectionState;
  /** The transport of the current (or last) attempt. */
  readonly transport: Transport;
  /** From the last `welcome`. */
  readonly node: string | null;
  readonly conn: string | null;
  readonly url: string | null;
  readonly attempt: number;
  readonly epoch: string | null;
  /** With URLs by region: the regions by round trip, once measured. */
  readonly regions: { region: string; rtt: number }[] | null;
  /** The channels this client is (or will be, once connected) subscribed to. */
  readonly channels: string[];

  /** Listens to one kind of event; returns a function that removes the listener. */
  on<K extends keyof ClientEvents>(name: K, callback: (value: ClientEvents[K]) => void): () => void;
  /** Opens the connection and keeps it open until {@link close}. */
  connect(): this;
  /** Closes for good (no reconnect). */
  close(): void;
  /**
   * Subscribes to `channel`; `callback` gets its events. Renewed after every reconnect. With
   * `delta: "fossil"` the node sends them as fossil deltas where it allows it (the reply's
   * `delta`); they reach `callback` whole.
   */
  subscribe<T = Data>(
    channel: string,
    callback?: (event: EventFrame<T>) => void,
    options?: { presence?: boolean; delta?: "fossil" },
  ): Promise<SubscribedReply | PendingReply>;
  unsubscribe(channel: string): Promise<UnsubscribedReply>;
  /** Publishes `data` (JSON, or bytes) through the node; resolves once stored. */
  publish(channel: string, data: Data | ArrayBuffer, options?: { volatile?: false }): Promise<PublishedReply>;
  /** Publishes a volatile event (not stored, at most once); resolves once NATS has it. */
  publish(channel: string, data: Data | ArrayBuffer, options: { volatile: true }): Promise<VolatilePublishedReply>;
  /** Who is in `channel`, across every node. */
  presence(channel: string, options?: { countOnly?: boolean }): Promise<PresenceAnswer>;
  /**
   * A request to the app's backend through this connection (`FANOUT_PROXY_RPC_URL` on the
   * node): resolves with its `result`, rejects with the error frame.
   */
  rpc<T = Json>(method: string, data?: Json): Promise<T>;
  /** What other members see of this connection (kept across reconnects). */
  setInfo(info: { [key: string]: Json } | null): Promise<InfoUpdatedReply | PendingReply>;
  /** Sends a protocol request with a fresh id; resolves with its reply. */
  request(frame: { op: string; [key: string]: unknown }): Promise<{ op: string; [key: string]: unknown }>;

  /** The `exp` claim of a JWT (unix seconds), or undefined. */
  static tokenExpiry(token: string): number | undefined;
}

/** Whether a close code asks the client to reconnect. */
/** A node's WebTransport listener, as `GET /v1/nodes` announces it. */
export interface WebTransportInfo {
  /** e.g. `https://{host}:8443/wt`. */
  url: string;
  /** SHA-256 (hex) of each self-signed certificate it may present: pinned by the browser. */
  cert_hashes?: string[];
}

/** The transports a client tries by default: WebTransport first where the runtime has it. */
export declare function defaultTransports(runtime?: { WebTransport?: unknown }): Transport[];
/** `n` as a QUIC variable-length integer (RFC 9000, 16). */
export declare function varint(n: number): number[];
/** The whole frames in `buf` (each after its varint length), and the bytes left over. */
export declare function unframe(buf: Uint8Array): { frames: Uint8Array[]; rest: Uint8Array };

/** The subprotocol of MessagePack frames: `"fanout.msgpack"`. */
export declare const MSGPACK: "fanout.msgpack";
/** A value as MessagePack (maps, arrays, strings, bin from `Uint8Array`, numbers, booleans, nil). */
export declare function pack(value: unknown): Uint8Array;
/** One MessagePack value (bin as `Uint8Array`; 64-bit integers beyond 2^53 as `bigint`). */
export declare function unpack(bytes: Uint8Array): unknown;
export declare function toBase64(bytes: Uint8Array): string;
export declare function fromBase64(text: string): Uint8Array;

/** Applies a fossil delta to `base` (both UTF-8 bytes); throws when it does not apply. */
export declare function applyDelta(base: Uint8Array, delta: Uint8Array): Uint8Array;
export declare function shouldReconnect(code: number): boolean;
/** What a close the server decided says of the reconnect, or null. */
export declare function directive(
  event: { code?: number; reason?: string; reconnect_after_ms?: number; nodes?: string[]; regions?: string[] },
): { reason: string; after: number; nodes: string[]; regions: string[] } | null;
/** A node's announced URL with `{host}` as the host of `current`; null if `current` does not parse. */
export declare function nodeUrl(announced: string, current: string): string | null;
/** Whether a refused request may succeed when asked again. */
export declare function retryable(error: unknown): boolean;
/** Reconnect delay for attempt `attempt` (1, 2, ...): exponential, capped, jittered. */
export declare function backoff(attempt: number, minDelay?: number, maxDelay?: number, random?: () => number): number;
/** Where `transport` is served on the node of `url`. */
export declare function endpoint(
  url: string,
  transport: Transport,
): { url: string; base: null; query: null } | { url: null; base: string; query: URLSearchParams };

/** An HTTP transports' cursor, decoded (docs/protocol.md, "The cursor"). */
export interface Cursor {
  v: 1 | 2;
  e: string;
  t: number;
  c: Record<string, Position>;
  s: Record<string, Position>;
}
export declare function decodeCursor(text: string): Cursor | null;
export declare function encodeCursor(cursor: { e: string; t?: number; c?: Record<string, Position>; s?: Record<string, Position> }): string;
/** Whether a client at `last` already has `frame`. */
export declare function hasEvent(last: Position | undefined, frame: { seq: number; region?: string }): boolean;
/** The position after `last` once `frame` is received. */
export declare function advance(last: Position | undefined, frame: { seq: number; region?: string }): Position;
/** Regions ordered by measured round trip, nearest first. */
export declare function nearest(
  groups: Record<string, readonly string[]>,
  measure: (url: string) => Promise<number>,
): Promise<{ region: string; rtt: number }[]>;
