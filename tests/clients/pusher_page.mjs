// A page for a real browser with pusher-js's web build (npm), and the app server behind it:
// it serves the page and pusher.min.js, signs private and presence channels at
// /pusher/auth with Pusher's server library (`authorizeChannel`), and, when the page says it
// is subscribed (POST /ready), publishes through fanout's Pusher API with the same library.
// Prints the page's URL as its first line, then serves until killed.
// Usage: node pusher_page.mjs <ws host:port> <api base URL> <id> <key> <secret>
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import http from "node:http";
const require = createRequire(process.env.NPM_PREFIX + "/node_modules/");
const Pusher = require("pusher");
const script = readFileSync(require.resolve("pusher-js/dist/web/pusher.min.js"));

const [, , wsAddr, api, appId, key, secret] = process.argv;
const [wsHost, wsPort] = wsAddr.split(":");
const url = new URL(api);
const server = new Pusher({ appId, key, secret, host: url.hostname, port: url.port, useTLS: false });

const page = `<!doctype html>
<meta charset="utf-8"><title>pusher-js on fanout</title>
<script src="/pusher.min.js"></script>
<script>
  window.seen = { events: [], errors: [] };
  const pusher = new Pusher(${JSON.stringify(key)}, {
    wsHost: ${JSON.stringify(wsHost)}, wsPort: ${Number(wsPort)}, forceTLS: false,
    enabledTransports: ["ws"], cluster: "local",
    channelAuthorization: { endpoint: "/pusher/auth", transport: "ajax" },
  });
  pusher.connection.bind("error", (e) => seen.errors.push(JSON.stringify(e)));
  const subscribed = (name) => new Promise((resolve) => {
    const channel = pusher.subscribe(name);
    channel.bind("pusher:subscription_succeeded", () => resolve(channel));
    channel.bind("pusher:subscription_error", (e) => seen.errors.push(name + " " + JSON.stringify(e)));
  });
  (async () => {
    const [orders, room, lobby] = await Promise.all(
      ["orders", "private-room", "presence-lobby"].map(subscribed));
    seen.socketId = pusher.connection.socket_id;
    seen.me = lobby.members.me;
    seen.count = lobby.members.count;
    let left = 2;
    const got = (name) => (data) => {
      seen.events.push({ name, data });
      if (--left === 0) seen.done = true;
    };
    orders.bind("order-placed", got("order-placed"));
    room.bind("whisper", got("whisper"));
    await fetch("/ready", { method: "POST" });
  })();
</script>
<p>pusher-js on fanout</p>`;

const app = http.createServer((request, response) => {
  let body = "";
  request.on("data", (chunk) => (body += chunk));
  request.on("end", async () => {
    try {
      if (request.url === "/pusher.min.js") {
        response.setHeader("content-type", "text/javascript");
        return response.end(script);
      }
      if (request.url === "/pusher/auth") {
        const form = new URLSearchParams(body);
        const channel = form.get("channel_name");
        const member = channel.startsWith("presence-") ? { user_id: "chromium", user_info: { browser: true } } : undefined;
        response.setHeader("content-type", "application/json");
        return response.end(JSON.stringify(server.authorizeChannel(form.get("socket_id"), channel, member)));
      }
      if (request.url === "/ready") {
        await server.trigger("orders", "order-placed", { id: 7 });
        await server.trigger("private-room", "whisper", "from the server");
        return response.end("{}");
      }
      response.setHeader("content-type", "text/html");
      response.end(page);
    } catch (error) {
      response.statusCode = 500;
      response.end(String(error));
    }
  });
});
app.listen(0, "127.0.0.1", () => console.log(`http://127.0.0.1:${app.address().port}/`));
