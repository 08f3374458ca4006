// Laravel Echo (npm, with its Pusher connector and pusher-js's Node build) against two fanout
// nodes, the way a Laravel app uses it: events named as Laravel names them, published by
// Pusher's server library through fanout's API; private and presence channels signed by an
// auth endpoint (`/broadcasting/auth`, here a small HTTP server using the library's
// `authorizeChannel`); whispers; who is here, joining and leaving. Prints one JSON line of
// what it saw (or the step that failed).
// Usage: node laravel_echo.mjs <ws host:port,host:port> <api base URL> <id> <key> <secret>
import { createRequire } from "node:module";
import http from "node:http";
import { pathToFileURL } from "node:url";
const modules = process.env.NPM_PREFIX + "/node_modules/";
const require = createRequire(modules);
const Pusher = require("pusher");
const PusherJs = require("pusher-js");
const { default: Echo } = await import(pathToFileURL(modules + "laravel-echo/dist/echo.js"));

const [, , wsAddrs, api, appId, key, secret] = process.argv;
const nodes = wsAddrs.split(",");
const url = new URL(api);
const server = new Pusher({ appId, key, secret, host: url.hostname, port: url.port, useTLS: false });
const seen = { step: "start", authRequests: 0 };
const bound = (ms, what) =>
  new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms).unref());
const within = (promise, what) => Promise.race([promise, bound(15000, what)]);

// The app's auth endpoint: the signed-in user is the X-User header (a Laravel session's).
const auth = http.createServer((request, response) => {
  let body = "";
  request.on("data", (chunk) => (body += chunk));
  request.on("end", () => {
    seen.authRequests += 1;
    const form = new URLSearchParams(body);
    const user = request.headers["x-user"];
    const channel = form.get("channel_name");
    const member = channel.startsWith("presence-") ? { user_id: user, user_info: { name: user } } : undefined;
    response.setHeader("content-type", "application/json");
    response.end(JSON.stringify(server.authorizeChannel(form.get("socket_id"), channel, member)));
  });
});
await new Promise((resolve) => auth.listen(0, "127.0.0.1", resolve));
const authEndpoint = `http://127.0.0.1:${auth.address().port}/broadcasting/auth`;

const echos = [];
const echo = (n, user) => {
  const [wsHost, wsPort] = nodes[n].split(":");
  const client = new Echo({
    broadcaster: "pusher", key, wsHost, wsPort: Number(wsPort), forceTLS: false,
    enabledTransports: ["ws"], cluster: "local", Pusher: PusherJs,
    authEndpoint, auth: { headers: { "X-User": user } },
  });
  echos.push(client);
  return client;
};
const once = (register, what) => within(new Promise((resolve) => register(resolve)), what);

try {
  const ada = echo(0, "ada");
  const bo = echo(1, "bo");

  seen.step = "public channel";
  const orders = ada.channel("orders");
  await once((done) => orders.subscribed(done), "subscribed to orders");
  const shipped = once((done) => orders.listen("OrderShipped", done), "OrderShipped");
  await server.trigger("orders", "App\\Events\\OrderShipped", { order: { id: 3 } });
  seen.shipped = await shipped;

  seen.step = "private channel and whispers";
  // Each one's handler bound as its subscription starts (it may succeed while the other waits).
  const adaRoom = ada.private("room");
  const adaIn = once((done) => adaRoom.subscribed(done), "ada in private-room");
  const boRoom = bo.private("room");
  const boIn = once((done) => boRoom.subscribed(done), "bo in private-room");
  await adaIn;
  await boIn;
  const whispered = once((done) => adaRoom.listenForWhisper("typing", done), "whisper");
  boRoom.whisper("typing", { name: "bo" });
  seen.whisper = await whispered;
  const update = once((done) => boRoom.listen(".room.updated", done), "room.updated");
  await server.trigger("private-room", "room.updated", { topic: "fanout" });
  seen.roomUpdated = await update;

  seen.step = "presence";
  const here = once((done) => ada.join("lobby").here(done), "ada here");
  seen.adaHere = (await here).map((u) => u.name);
  const joining = once((done) => ada.join("lobby").joining(done), "bo joining");
  const boHere = once((done) => bo.join("lobby").here(done), "bo here");
  seen.joining = (await joining).name;
  seen.boHere = (await boHere).map((u) => u.name).sort();
  const leaving = once((done) => ada.join("lobby").leaving(done), "bo leaving");
  bo.leave("lobby");
  seen.leaving = (await leaving).name;
  seen.step = "done";
  console.log(JSON.stringify(seen));
} catch (error) {
  console.log(JSON.stringify({ ...seen, error: String(error) }));
} finally {
  for (const client of echos) client.disconnect();
  auth.close();
}
