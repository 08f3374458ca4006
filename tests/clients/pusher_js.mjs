// pusher-js (npm, its Node build) against three fanout nodes' Pusher endpoints, with Pusher's
// own server library publishing through fanout's API and signing private and presence
// channels. Prints one JSON line of what it saw (or the step that failed).
// Usage: node pusher_js.mjs <ws host:port,host:port,host:port> <api base URL> <id> <key> <secret>
import { createRequire } from "node:module";
const require = createRequire(process.env.NPM_PREFIX + "/node_modules/");
const Pusher = require("pusher");
const PusherJs = require("pusher-js");

const [, , wsAddrs, api, appId, key, secret] = process.argv;
const nodes = wsAddrs.split(",");
const url = new URL(api);
const server = new Pusher({ appId, key, secret, host: url.hostname, port: url.port, useTLS: false });
const seen = { events: [], step: "start", times: {} };
const t0 = Date.now();
// Each wait is bounded; the timers do not keep Node alive once everything is done.
const bound = (ms, what) =>
  new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms).unref());
const within = (promise, what) => Promise.race([promise, bound(15000, what)]);
const clients = [];

/// A pusher-js client on node `n`; presence channels sign it in as `user`.
const connect = async (n, user) => {
  const [wsHost, wsPort] = nodes[n].split(":");
  const client = new PusherJs(key, {
    wsHost, wsPort: Number(wsPort), forceTLS: false, enabledTransports: ["ws"], cluster: "local",
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        try {
          callback(null, server.authenticateUser(socketId, { id: user, name: user.toUpperCase() }));
        } catch (error) {
          callback(error, null);
        }
      },
    },
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        try {
          const member = channelName.startsWith("presence-")
            ? { user_id: user, user_info: { name: user.toUpperCase() } }
            : undefined;
          callback(null, server.authorizeChannel(socketId, channelName, member));
        } catch (error) {
          callback(error, null);
        }
      },
    },
  });
  clients.push(client);
  await within(new Promise((resolve) => client.connection.bind("connected", resolve)), `${user} connected`);
  return client;
};
const subscribed = (client, name) =>
  within(
    new Promise((resolve, reject) => {
      const channel = client.subscribe(name);
      channel.bind("pusher:subscription_succeeded", () => resolve(channel));
      channel.bind("pusher:subscription_error", (error) => reject(new Error(JSON.stringify(error))));
    }),
    `subscribed to ${name}`,
  );
/// The next `name` event on `channel`, with everything `channel` got before it.
const next = (channel, name) => {
  const before = [];
  const all = (event) => before.push(event);
  channel.bind_global(all);
  return within(
    new Promise((resolve) =>
      channel.bind(name, function got(data) {
        channel.unbind(name, got);
        channel.unbind_global(all);
        resolve({ data, before: before.filter((e) => e !== name) });
      }),
    ),
    name,
  );
};
/// Waits until fanout counts `count` connections in `channel` (its own API).
const connections = async (channel, count) => {
  for (;;) {
    const answer = await (await fetch(`${api}/v1/channels/${channel}/presence?count_only=true`)).json();
    if (answer.count === count) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
};

try {
  const ada = await connect(0, "ada");
  seen.socketId = ada.connection.socket_id;

  seen.step = "public channel";
  const orders = await subscribed(ada, "orders");
  const one = next(orders, "order-placed");
  await server.trigger("orders", "order-placed", { id: 1 });
  seen.events.push((await one).data);

  seen.step = "private channel";
  const bo = await connect(1, "bo");
  const room = await subscribed(ada, "private-room");
  const boRoom = await subscribed(bo, "private-room");
  const whisper = next(room, "whisper");
  await server.trigger("private-room", "whisper", "psst");
  seen.events.push((await whisper).data);

  seen.step = "client events";
  // Bo gets ada's client event; ada does not (it is not echoed): a marker published after it
  // reaches her with nothing before it.
  const typing = next(boRoom, "client-typing");
  room.trigger("client-typing", { who: "ada" });
  seen.clientEvent = (await typing).data;
  const marker = next(room, "marker");
  await server.trigger("private-room", "marker", "1");
  seen.adaBeforeMarker = (await marker).before;

  seen.step = "socket_id";
  // An event that leaves ada's connection out: bo gets it, ada only the marker after it.
  const boSkip = next(boRoom, "skip");
  const adaMarker = next(room, "marker");
  await server.trigger("private-room", "skip", "not for ada", { socket_id: ada.connection.socket_id });
  await server.trigger("private-room", "marker", "2");
  seen.boSkip = (await boSkip).data;
  seen.adaBeforeSkipMarker = (await adaMarker).before;

  seen.step = "presence on three nodes";
  const lobby = await subscribed(ada, "presence-lobby");
  seen.alone = lobby.members.count;
  let added = next(lobby, "pusher:member_added");
  const boLobby = await subscribed(bo, "presence-lobby");
  seen.added = [(await added).data.id];
  seen.boSees = Object.keys(boLobby.members.members).sort();
  added = next(lobby, "pusher:member_added");
  const cy = await connect(2, "cy");
  const cyLobby = await subscribed(cy, "presence-lobby");
  seen.added.push((await added).data.id);
  seen.cySees = Object.keys(cyLobby.members.members).sort();
  seen.cyMe = cyLobby.members.me.id;
  // Bo's second connection (on the third node): bo is one member, not two.
  const bo2 = await connect(2, "bo");
  const bo2Lobby = await subscribed(bo2, "presence-lobby");
  seen.bo2Count = bo2Lobby.members.count;
  await connections("presence-lobby", 4);
  // Bo's second connection goes: bo stays. Then cy goes: the first removal ada sees is cy's.
  bo2.disconnect();
  await connections("presence-lobby", 3);
  let removed = next(lobby, "pusher:member_removed");
  cy.disconnect();
  seen.removed = [(await removed).data.id];
  removed = next(lobby, "pusher:member_removed");
  bo.disconnect();
  seen.removed.push((await removed).data.id);
  seen.adaCount = lobby.members.count;

  seen.times.presence = Date.now() - t0;
  seen.step = "reconnect";
  // fanout's API closes ada's connection with "reconnect" (4005; Pusher's 4100): pusher-js
  // connects again, with a new socket id, subscribes again, and gets what comes next.
  const reconnected = within(
    new Promise((resolve) =>
      ada.connection.bind("state_change", ({ current }) => current === "connected" && resolve()),
    ),
    "reconnected",
  );
  const resubscribed = within(
    new Promise((resolve) => orders.bind("pusher:subscription_succeeded", resolve)),
    "subscribed again",
  );
  const user = `pusher-${seen.socketId}`;
  const closed = await fetch(`${api}/v1/users/${user}/disconnect`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ reconnect: true }),
  });
  seen.disconnectStatus = closed.status;
  await reconnected;
  await resubscribed;
  seen.newSocketId = ada.connection.socket_id !== seen.socketId;
  const two = next(orders, "order-placed");
  await server.trigger("orders", "order-placed", { id: 2 });
  seen.events.push((await two).data);

  seen.times.reconnect = Date.now() - t0;
  seen.step = "sign-in";
  // Ada signs in: what the app sends her (sendToUser) reaches her; then the app ends her
  // connections (terminateUserConnections), and pusher-js does not come back.
  ada.signin();
  await within(
    (async () => {
      while (!ada.user.serverToUserChannel?.subscribed) await new Promise((r) => setTimeout(r, 10));
    })(),
    "signed in",
  );
  const notice = within(new Promise((resolve) => ada.user.bind("notice", resolve)), "notice");
  await server.sendToUser("ada", "notice", { hello: "ada" });
  seen.notice = await notice;
  const ended = within(
    new Promise((resolve) =>
      ada.connection.bind("state_change", ({ current }) => current !== "connected" && resolve(current)),
    ),
    "terminated",
  );
  const closes = [];
  ada.connection.bind("error", (error) => closes.push(error?.data?.code ?? error?.type));
  seen.terminate = (await server.terminateUserConnections("ada")).status;
  seen.stateAfterTerminate = await ended;
  seen.times.done = Date.now() - t0;
  seen.step = "done";
  console.log(JSON.stringify(seen));
} catch (error) {
  console.log(JSON.stringify({ ...seen, error: String(error) }));
} finally {
  for (const client of clients) client.disconnect();
  // A connection the app ended leaves pusher-js's timers behind (30 s): done is done.
  process.exit(0);
}
