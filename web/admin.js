// The /admin page: GET /v1/stats every 2 s, drawn as tiles and tables. With API keys set
// (FANOUT_API_KEYS) /v1/stats answers 401/403 without one: the page asks for a key and keeps
// it for this tab only (sessionStorage).

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("fanout-admin-key") || "";

const number = (n, digits = 0) =>
  n === null || n === undefined ? "—" : Number(n).toLocaleString("en", { maximumFractionDigits: digits });
const rate = (n) => (n === null || n === undefined ? "—" : number(n, n < 10 ? 1 : 0));
const bytes = (n) => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${number(n, i ? 1 : 0)} ${units[i]}`;
};
const duration = (secs) => {
  const d = Math.floor(secs / 86400), h = Math.floor((secs % 86400) / 3600);
  const m = Math.floor((secs % 3600) / 60), s = secs % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
};

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function status(state, text) {
  $("conn").dataset.state = state;
  $("state").textContent = text;
}

function draw(stats) {
  const t = stats.totals;
  $("t-nodes").textContent = number(t.nodes);
  $("t-connections").textContent = number(t.connections);
  $("t-events-in").textContent = rate(t.events_in_per_sec);
  $("t-delivered").textContent = rate(t.frames_delivered_per_sec);
  $("t-slow").textContent = rate(t.slow_consumer_disconnects_per_sec);
  $("t-slow-total").textContent = `${number(t.slow_consumer_disconnects)} since start`;
  $("t-nats").textContent = stats.api.nats.state;
  const stream = stats.api.stream;
  $("t-stream").textContent = stats.api.nats.stream_ready ? "ready" : "not ready";
  $("t-stream-sub").textContent = stream
    ? `${stats.api.nats.stream}: ${number(stream.messages)} events, ${bytes(stream.bytes)}, last seq ${number(stream.last_seq)}`
    : stats.api.nats.stream;

  $("regions-card").hidden = stats.regions.length === 0;
  fill($("regions").tBodies[0], stats.regions.map((r) => {
    const tr = document.createElement("tr");
    tr.append(cell(r.region), cell(number(r.nodes), "num"), cell(number(r.connections), "num"),
      cell(rate(r.frames_delivered_per_sec), "num"));
    return tr;
  }));

  $("nodes-empty").hidden = stats.nodes.length > 0;
  fill($("nodes").tBodies[0], stats.nodes.map((n) => {
    const tr = document.createElement("tr");
    tr.dataset.node = n.id;
    const state = document.createElement("span");
    state.className = "state";
    state.dataset.state = n.state;
    state.textContent = n.state.replace("_", " ");
    if (n.reason) state.title = n.reason;
    const stateCell = document.createElement("td");
    stateCell.append(state);
    tr.append(cell(n.id), cell(n.region || "—"), stateCell, cell(number(n.connections), "num"),
      cell(number(n.subscriptions), "num"), cell(number(n.channels), "num"),
      cell(rate(n.rates.events_received_per_sec), "num"), cell(rate(n.rates.frames_delivered_per_sec), "num"),
      cell(number(n.totals.slow_consumer_disconnects), "num"),
      cell(`${n.nats.state}${n.nats.stream_ready ? "" : ", stream not ready"}`), cell(duration(n.uptime_secs)));
    return tr;
  }));

  $("channels-empty").hidden = stats.channels.length > 0;
  fill($("channels").tBodies[0], stats.channels.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.channel = c.channel;
    tr.append(cell(c.channel), cell(number(c.subscribers), "num"), cell(number(c.nodes), "num"));
    return tr;
  }));

  const at = new Date(stats.generated_at).toLocaleTimeString();
  $("updated").textContent = `updated ${at}`;
  status(stats.partial ? "connecting" : "open",
    stats.partial ? "live · partial: a node did not answer" : "live");
}

async function refresh() {
  try {
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const response = await fetch("v1/stats", { headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      $("key-form").hidden = false;
      $("key-error").hidden = !key;
      $("key-error").textContent = body.error ? body.error.message : "refused";
      status("closed", "needs an API key");
      return;
    }
    const body = await response.json();
    if (!response.ok) {
      status("closed", body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${response.status}`);
      return;
    }
    $("key-form").hidden = true;
    draw(body);
  } catch (err) {
    status("closed", `cannot reach the API: ${err.message}`);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("fanout-admin-key", key);
  $("key-error").hidden = true;
});

refresh();
