// The demo page: pins this tab to a ws node, shows what arrives, and calls the HTTP API.
import { FanoutClient, TRANSPORTS, defaultTransports } from "./fanout.js";

const $ = (id) => document.getElementById(id);
const MAX_LOG = 200;
let jaegerUi = "";

/** Node URLs may say `{host}`: the host this page was loaded from. */
function resolve(url) {
  return url.replaceAll("{host}", location.hostname);
}

/**
 * Which URLs this tab connects to: `?ws=<url>` (that one only), `?node=<n or name>` (that node
 * first; the others are where the tab fails over to when it goes away, so a pinned tab misses
 * nothing when its node dies), else every node.
 */
function choose(nodes, params) {
  if (params.get("ws")) return { urls: [params.get("ws")], pinned: "ws", name: null };
  const wanted = params.get("node");
  if (wanted) {
    const index = /^\d+$/.test(wanted) ? Number(wanted) - 1 : nodes.findIndex((n) => n.name === wanted);
    if (nodes[index]) {
      const others = nodes.filter((_, i) => i !== index).map((n) => n.url);
      return { urls: [nodes[index].url, ...others], pinned: String(index + 1), name: nodes[index].name };
    }
  }
  return { urls: nodes.map((n) => n.url), pinned: null };
}

/**
 * Beside the node this tab is on: the node it is pinned to. With discovery a node's name is
 * its id, so a tab that failed over to another node says so; with `FANOUT_WS_URLS` the names
 * are labels and only the label is shown.
 */
function showPin(name, node, discovered, bound) {
  const pin = $("pin");
  pin.dataset.pinned = name ?? "";
  if (!name) {
    pin.textContent = bound ? "bound to this URL alone" : "";
    delete pin.dataset.away;
    return;
  }
  const away = discovered && node !== undefined && node !== name;
  pin.textContent = away ? `pinned to ${name}, which is away: failed over` : `pinned to ${name}`;
  if (away) pin.dataset.away = "true";
  else delete pin.dataset.away;
}

/**
 * The transports this tab may use: `?transport=webtransport` (or websocket, sse, poll) forces
 * one; by default WebTransport first where the browser has it.
 */
function transports(params) {
  const forced = params.get("transport");
  if (!forced) return { list: defaultTransports(), forced: null };
  if (TRANSPORTS.includes(forced)) return { list: [forced], forced };
  return { list: defaultTransports(), forced: null, unknown: forced };
}

function renderNodes(nodes, pinned, forced) {
  const nav = $("nodes");
  nav.replaceChildren();
  const link = (label, href, active, title) => {
    const a = document.createElement("a");
    a.textContent = label;
    a.href = href;
    a.title = title;
    a.className = "node-button" + (active ? " active" : "");
    if (active) a.setAttribute("aria-current", "page");
    nav.append(a);
  };
  // The node buttons keep the forced transport and the protocol; with regions, they come
  // grouped by region.
  const protocol = new URLSearchParams(location.search).get("protocol") === "msgpack" ? "protocol=msgpack" : "";
  const keep = [forced ? `transport=${forced}` : "", protocol].filter(Boolean).join("&");
  link("any node", `?${keep}`, pinned === null, "fail over across all nodes");
  const regions = [...new Set(nodes.map((n) => n.region ?? ""))];
  for (const region of regions) {
    if (region) {
      const label = document.createElement("span");
      label.className = "region-label";
      label.textContent = region;
      nav.append(label);
    }
    nodes.forEach((node, i) => {
      if ((node.region ?? "") !== region) return;
      link(node.name, `?node=${i + 1}${keep ? `&${keep}` : ""}`, pinned === String(i + 1), node.url);
    });
  }
}

const TRANSPORT_NAMES = {
  webtransport: "WebTransport",
  websocket: "WebSocket",
  sse: "server-sent events",
  poll: "long-polling",
};

function showState({ state, attempt, delay, url, transport }) {
  if (transport) {
    $("transport").textContent = TRANSPORT_NAMES[transport] ?? transport;
    $("transport").dataset.transport = transport;
  }
  const labels = {
    connecting: `connecting to ${url}…`,
    open: "connected",
    reconnecting: delay !== undefined
      ? `reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${attempt})`
      : `reconnecting to ${url}… (attempt ${attempt})`,
    closed: "closed",
  };
  $("conn").dataset.state = state;
  $("state").textContent = labels[state] ?? state;
  if (state !== "open") $("node").textContent = "—";
}

function addEvent(event) {
  const latency = Date.now() - event.ts;
  const li = document.createElement("li");
  li.className = "event";
  li.dataset.channel = event.channel;
  // A volatile event has no seq: it is shown as such.
  const position = event.volatile ? "volatile" : `#${event.seq}`;
  if (!event.volatile) li.dataset.seq = event.seq;
  const head = document.createElement("div");
  head.className = "event-head";
  const channel = document.createElement("span");
  channel.className = "channel" + (event.channel === "broadcast" ? " broadcast" : "");
  channel.textContent = event.channel;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = position;
  if (event.region) {
    // With regions, seqs count per region: the event says where it was published.
    li.dataset.region = event.region;
    seq.textContent = `${event.region} ${position}`;
    seq.title = `published in region ${event.region}`;
  }
  const lat = document.createElement("span");
  lat.className = "latency";
  lat.textContent = `${Math.max(0, latency)} ms`;
  lat.title = "receive time − publish time (ts)";
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  head.append(channel, seq, lat, time);
  if (event.trace && jaegerUi) {
    const link = document.createElement("a");
    link.className = "trace";
    link.href = `${jaegerUi}/trace/${event.trace}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = "trace";
    link.title = `open trace ${event.trace} in Jaeger`;
    head.append(link);
  }
  const data = document.createElement("code");
  data.className = "data";
  // Bytes (a Uint8Array): their length and first bytes in hex.
  data.textContent = event.data instanceof Uint8Array
    ? `${event.data.length} bytes: ${[...event.data.subarray(0, 16)].map((b) => b.toString(16).padStart(2, "0")).join(" ")}${event.data.length > 16 ? " …" : ""}`
    : JSON.stringify(event.data);
  li.append(head, data);
  const log = $("log");
  log.prepend(li);
  while (log.children.length > MAX_LOG) log.lastElementChild.remove();
  $("empty").hidden = true;
  $("count").textContent = `(${log.children.length})`;
}

function result(text, ok) {
  const p = $("result");
  p.textContent = text;
  p.className = "result " + (ok ? "ok" : "bad");
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body,
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = answer.error ?? { code: response.status, message: response.statusText };
    throw new Error(`${error.code}: ${error.message}`);
  }
  return answer;
}

function renderChannels(client) {
  const list = $("channels");
  list.replaceChildren();
  for (const channel of client.channels) {
    const li = document.createElement("li");
    li.textContent = channel;
    const x = document.createElement("button");
    x.type = "button";
    x.textContent = "×";
    x.title = `unsubscribe from ${channel}`;
    x.onclick = async () => {
      await client.unsubscribe(channel).catch(() => {});
      renderChannels(client);
    };
    li.append(x);
    list.append(li);
  }
}

/**
 * Moving cursors (the virtual-headquarters idea): each tab publishes where its pointer is as
 * volatile events in the lobby, at most 8 a second (within the publish rate,
 * FANOUT_PUBLISH_RATE_PER_SEC); every other tab draws them. The latest
 * position is what matters: a lost one is replaced by the next, none is stored.
 */
function followPointer(client) {
  let last = 0;
  let pending = null;
  const send = () => {
    pending = null;
    last = Date.now();
    if (client.state !== "open" || !client.conn) return;
    client
      .publish(LOBBY, { cursor: { x: pointer.x, y: pointer.y }, conn: client.conn, name: $("name").value.trim() || client.conn.slice(0, 8) }, { volatile: true })
      .catch(() => {});
  };
  const pointer = { x: 0, y: 0 };
  document.addEventListener("mousemove", (e) => {
    pointer.x = Math.round((e.clientX / window.innerWidth) * 1000) / 1000;
    pointer.y = Math.round((e.clientY / window.innerHeight) * 1000) / 1000;
    if (pending) return;
    pending = setTimeout(send, Math.max(0, 125 - (Date.now() - last)));
  });
}

/** Draws another tab's cursor where it says it is (the page's share of width and height). */
function moveCursor({ cursor, conn, name }, client) {
  if (!conn || conn === client.conn) return;
  const layer = $("cursors");
  let dot = layer.querySelector(`[data-conn="${CSS.escape(conn)}"]`);
  if (!dot) {
    dot = document.createElement("div");
    dot.className = "cursor";
    dot.dataset.conn = conn;
    layer.append(dot);
  }
  dot.textContent = String(name ?? "").slice(0, 24);
  dot.style.left = `${Math.min(1, Math.max(0, Number(cursor.x))) * 100}%`;
  dot.style.top = `${Math.min(1, Math.max(0, Number(cursor.y))) * 100}%`;
  dot.dataset.seen = String(Date.now());
}

// A cursor not heard from for 10 s (its tab closed, or moved away) fades out.
setInterval(() => {
  for (const dot of document.querySelectorAll("#cursors .cursor")) {
    if (Date.now() - Number(dot.dataset.seen) > 10000) dot.remove();
  }
}, 2000);

/** The lobby's members, by connection, kept current by presence changes. */
const LOBBY = "lobby";
const members = new Map();
/**
 * The changes seen while a presence query is out, one list per query. Its answer and the
 * changes travel separately, so the answer may be older or newer than any of them: the answer
 * replaces the list, then those changes apply again on top, in order (the last change of a
 * member is its newest state).
 */
const recording = new Set();

function applyChange(change) {
  if (change.op === "leave") members.delete(change.conn);
  else members.set(change.conn, change);
}

function renderMembers(client, partial = false) {
  const list = $("members");
  list.replaceChildren();
  const sorted = [...members.values()].sort((a, b) => a.joined_at - b.joined_at);
  for (const member of sorted) {
    const li = document.createElement("li");
    // Generated anonymous ids are long; their start is enough to tell tabs apart.
    const user = member.user.length > 16 ? `${member.user.slice(0, 13)}…` : member.user;
    li.textContent = `${member.info?.name ?? user} · ${member.node}`;
    li.title = `user ${member.user}, connection ${member.conn}`;
    if (member.conn === client.conn) li.className = "me";
    list.append(li);
  }
  // Partial: a node did not answer in time; the list may miss its members.
  $("here-count").textContent = partial ? `(${members.size}, partial)` : `(${members.size})`;
}

async function refreshMembers(client) {
  const seen = [];
  recording.add(seen);
  try {
    const answer = await client.presence(LOBBY);
    members.clear();
    for (const member of answer.members) members.set(member.conn, member);
    for (const change of seen) applyChange(change);
    renderMembers(client, answer.partial);
    // A node did not answer (one just started or died): ask again once discovery settles.
    if (answer.partial) setTimeout(() => refreshMembers(client), 3000);
  } catch {
    // Not connected: the next welcome asks again.
  } finally {
    recording.delete(seen);
  }
}

/**
 * The live ws nodes (discovery). Right after the API starts it may not have heard every node
 * yet (`partial`): asked again for a few seconds while the node this tab is pinned to is not
 * among them, so that `?node=2` never quietly lands on another node.
 */
async function liveNodes(params) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const live = await fetch("/v1/nodes")
      .then((r) => (r.ok ? r.json() : { nodes: [] }))
      .catch(() => ({ nodes: [] }));
    const nodes = live.nodes.map((n) => ({ name: n.id, url: n.url, region: n.region, webtransport: n.webtransport }));
    const wanted = params.get("node");
    const found = !wanted || choose(nodes, params).pinned !== null;
    if (!live.partial || found || Date.now() > deadline) return nodes;
    await new Promise((done) => setTimeout(done, 250));
  }
}

async function main() {
  const config = await fetch("/v1/config").then((r) => r.json());
  const params = new URLSearchParams(location.search);
  // Live discovery first; the configured list (FANOUT_WS_URLS) when no node announced itself.
  const live = await liveNodes(params);
  const listed = live.length ? live : config.nodes;
  const nodes = listed.map((n) => ({ name: n.name, url: resolve(n.url), region: n.region, webtransport: n.webtransport }));
  jaegerUi = config.jaeger_ui ? resolve(config.jaeger_ui) : "";
  const { urls, pinned, name } = choose(nodes, params);
  const allowed = transports(params);
  renderNodes(nodes, pinned, allowed.forced);
  const discovered = live.length > 0 && pinned !== "ws";
  const bound = pinned === "ws";
  showPin(name, undefined, discovered, bound);
  if (allowed.unknown) {
    result(`no transport ${allowed.unknown}: use ${TRANSPORTS.join(", ")}`, false);
  }
  if (params.get("node") && pinned === null) {
    result(`no node ${params.get("node")} is running: this tab fails over across all nodes`, false);
  }
  if (urls.length === 0) {
    showState({ state: "closed" });
    result("The API knows no ws nodes: set FANOUT_WS_URLS, or open ?ws=ws://host:port/ws", false);
    return;
  }

  // Each node's WebTransport listener, by its URL, as discovery announced it.
  const webtransport = Object.fromEntries(
    nodes.filter((n) => n.webtransport).map((n) => [n.url, n.webtransport]),
  );
  // `?protocol=msgpack`: MessagePack frames on WebSocket and WebTransport (fanout.msgpack).
  const protocol = params.get("protocol") === "msgpack" ? "msgpack" : "json";
  const client = new FanoutClient(urls, { transports: allowed.list, webtransport, protocol });
  // For the console (and the browser tests): the tab's client.
  window.fanoutClient = client;
  client.on("state", (s) => {
    showState(s);
    $("url").textContent = s.url ? `(${s.url})` : "";
  });
  client.on("welcome", (w) => {
    // A long-poll has no node of its own: each poll may reach another.
    $("node").textContent = w.node ?? "stateless polls";
    if (w.node) showPin(name, w.node, discovered, bound);
    $("region").textContent = w.region ? `in region ${w.region}` : "";
    document.title = `fanout · ${w.node ?? "long-polling"}`;
  });
  client.on("event", (event) => {
    // The tabs' cursors are volatile events in the lobby: drawn, not logged.
    if (event.volatile && event.channel === LOBBY && event.data?.cursor) return moveCursor(event.data, client);
    addEvent(event);
  });
  followPointer(client);
  client.on("resumed", ({ channel, recovered, replayed }) => {
    result(
      recovered
        ? `resumed ${channel}, ${replayed} replayed`
        : `resumed ${channel}, ${replayed} replayed: older events are gone (history window)`,
      recovered,
    );
  });
  client.on("error", (e) => result(`${e.code ?? "error"}: ${e.message ?? e}`, false));
  client.on("presence", (change) => {
    if (change.channel !== LOBBY) return;
    for (const seen of recording) seen.push(change);
    applyChange(change);
    renderMembers(client);
  });
  // Changes are not replayed: after every (re)connect, ask who is here.
  client.on("welcome", () => {
    client.subscribe(LOBBY, null, { presence: true }).then(() => refreshMembers(client), () => {});
  });
  client.subscribe(LOBBY, null, { presence: true });
  client.connect();
  // Long-polling receives no presence changes: it asks who is here now and then.
  setInterval(() => {
    if (client.transport === "poll" && client.state === "open") refreshMembers(client);
  }, 5000);
  $("name-form").onsubmit = async (e) => {
    e.preventDefault();
    const name = $("name").value.trim();
    try {
      await client.setInfo(name ? { name } : null);
      result(name ? `others now see you as ${name}` : "name cleared", true);
    } catch (error) {
      result(`${error.code ?? "error"}: ${error.message}`, false);
    }
  };

  $("call-api").onclick = async () => {
    try {
      await post("/ping", "");
      result("POST /ping → pong", true);
    } catch (error) {
      result(`POST /ping failed: ${error.message}`, false);
    }
  };
  $("subscribe-form").onsubmit = async (e) => {
    e.preventDefault();
    const channel = $("sub-channel").value.trim();
    try {
      await client.subscribe(channel);
      result(`subscribed to ${channel}`, true);
      $("sub-channel").value = "";
      if (!$("pub-channel").value) $("pub-channel").value = channel;
    } catch (error) {
      result(`${error.code ?? "error"}: ${error.message}`, false);
    }
    renderChannels(client);
  };
  $("publish-form").onsubmit = async (e) => {
    e.preventDefault();
    const channel = $("pub-channel").value.trim();
    try {
      const answer = await post(`/v1/channels/${encodeURIComponent(channel)}/events`, $("pub-data").value);
      result(`published to ${answer.channel} as #${answer.seq}`, true);
    } catch (error) {
      result(`publish failed: ${error.message}`, false);
    }
  };
  $("clear").onclick = () => {
    $("log").replaceChildren();
    $("count").textContent = "";
    $("empty").hidden = false;
  };
}

main().catch((error) => {
  showState({ state: "closed" });
  result(`cannot start: ${error.message}`, false);
});
