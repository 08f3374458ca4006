// pusher-js (npm, its Node build) against a fanout node's Pusher endpoint, with Pusher's own
// server library publishing through fanout's API and signing private channels. Prints one
// JSON line of what it saw. Usage: node pusher_js.mjs <ws host:port> <api base URL> <id> <key> <secret>
import { createRequire } from "node:module";
const require = createRequire(process.env.NPM_PREFIX + "/node_modules/");
const Pusher = require("pusher");
const PusherJs = require("pusher-js");

const [, , wsAddr, api, appId, key, secret] = process.argv;
const [wsHost, wsPort] = wsAddr.split(":");
const url = new URL(api);
const server = new Pusher({ appId, key, secret, host: url.hostname, port: url.port, useTLS: false });
const seen = { events: [] };
// Each wait is bounded; the timers do not keep Node alive once everything is done.
const bound = (ms, what) =>
  new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms).unref());

/// A pusher-js client; presence channels sign it in as `user`.
const connect = async (user) => {
  const client = new PusherJs(key, {
    wsHost, wsPort: Number(wsPort), forceTLS: false, enabledTransports: ["ws"], cluster: "local",
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        try {
          const member = channelName.startsWith("presence-") ? { user_id: user, user_info: { name: user.toUpperCase() } } : undefined;
          callback(null, server.authorizeChannel(socketId, channelName, member));
        } catch (error) {
          callback(error, null);
        }
      },
    },
  });
  await Promise.race([
    new Promise((resolve) => client.connection.bind("connected", resolve)),
    bound(10000, "connected"),
  ]);
  return client;
};
const subscribedOn = (client, name) =>
  Promise.race([
    new Promise((resolve, reject) => {
      const channel = client.subscribe(name);
      channel.bind("pusher:subscription_succeeded", () => resolve(channel));
      channel.bind("pusher:subscription_error", (error) => reject(new Error(JSON.stringify(error))));
    }),
    bound(10000, `subscribed to ${name}`),
  ]);

const client = await connect("ada");
let other;
try {
  seen.socketId = client.connection.socket_id;
  const subscribed = (name) => subscribedOn(client, name);
  const orders = await subscribed("orders");
  const room = await subscribed("private-room");
  const got = (channel, name) =>
    Promise.race([new Promise((resolve) => channel.bind(name, resolve)), bound(10000, name)]);
  const one = got(orders, "order-placed");
  await server.trigger("orders", "order-placed", { id: 1 });
  seen.events.push(await one);
  const two = got(room, "whisper");
  await server.trigger("private-room", "whisper", "psst");
  seen.events.push(await two);

  // Presence: members across connections, added and removed.
  const lobby = await subscribed("presence-lobby");
  seen.alone = lobby.members.count;
  const added = got(lobby, "pusher:member_added");
  other = await connect("bo");
  const theirs = await subscribedOn(other, "presence-lobby");
  const member = await added;
  seen.added = { id: member.id, info: member.info };
  seen.theyCount = theirs.members.count;
  seen.theySee = Object.keys(theirs.members.members).sort();
  const removed = got(lobby, "pusher:member_removed");
  other.disconnect();
  other = undefined;
  seen.removed = (await removed).id;
  console.log(JSON.stringify(seen));
} catch (error) {
  console.log(JSON.stringify({ ...seen, error: String(error) }));
} finally {
  client.disconnect();
  other?.disconnect();
}
