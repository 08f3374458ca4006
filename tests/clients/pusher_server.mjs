// Pusher's own server library (npm `pusher`) against fanout's API: trigger, triggerBatch and
// get, signed as it signs; a wrong secret and a stale timestamp refused. Prints one JSON line
// of what it saw. Usage: node pusher_server.mjs <api base URL> <app id> <key> <secret>
import { createRequire } from "node:module";
const require = createRequire(process.env.NPM_PREFIX + "/node_modules/");
const Pusher = require("pusher");

const [, , api, appId, key, secret] = process.argv;
const url = new URL(api);
const options = { appId, key, secret, host: url.hostname, port: url.port, useTLS: false };
const pusher = new Pusher(options);
const seen = {};

const answer = async (promise) => {
  try {
    const response = await promise;
    return { status: response.status, body: await response.json() };
  } catch (error) {
    return { status: error.status ?? 0, body: error.body ?? String(error) };
  }
};

seen.trigger = await answer(pusher.trigger("orders", "order-placed", { id: 1 }));
seen.many = await answer(pusher.trigger(["orders", "audit"], "note", "plain text"));
seen.batch = await answer(pusher.triggerBatch([{ channel: "orders", name: "batched", data: { n: 2 } }]));
seen.channels = await answer(pusher.get({ path: "/channels" }));
seen.channel = await answer(pusher.get({ path: "/channels/orders", params: { info: "subscription_count" } }));
seen.wrongSecret = await answer(new Pusher({ ...options, secret: "not-the-secret" }).trigger("orders", "x", 1));
seen.unknownApp = await answer(new Pusher({ ...options, appId: "999" }).trigger("orders", "x", 1));
// A request signed 11 minutes ago (Pusher's window is 600 s).
const now = Date.now;
Date.now = () => now() - 660_000;
seen.stale = await answer(pusher.trigger("orders", "x", 1));
Date.now = now;
// The library checks the form; fanout also checks that it names a connection.
seen.badSocketId = await answer(pusher.trigger("orders", "x", 1, { socket_id: "99999999999999999999999.1" }));
seen.users = await answer(pusher.get({ path: "/channels/presence-lobby/users" }));
console.log(JSON.stringify(seen));
