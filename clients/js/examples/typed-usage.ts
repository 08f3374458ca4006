// A typed use of @fanout/client: type-checked by `tsc -p clients/js` in make test (it is
// never run). The lines marked @ts-expect-error must stay errors: the declarations are
// strict enough to catch those mistakes.
import {
  FanoutClient,
  State,
  type EventFrame,
  type Json,
  type Member,
  type PresenceChange,
  decodeCursor,
} from "@fanout/client";

interface Order {
  order: number;
  status: "paid" | "shipped";
}

const client = new FanoutClient(["ws://localhost:8081/ws", "ws://localhost:8082/ws"], {
  transports: ["websocket", "sse"],
  maxDelay: 10_000,
  getToken: async () => "eyJ...",
});

client.on("state", ({ state, transport, attempt }) => {
  if (state === State.RECONNECTING) console.log(`reconnecting over ${transport} (#${attempt})`);
});
client.on("welcome", (welcome) => console.log(welcome.node, welcome.conn, welcome.transport));
client.on("resumed", ({ channel, recovered, replayed }) => {
  if (!recovered) console.warn(`${channel}: events lost to the history window`);
  console.log(`${channel}: ${replayed} replayed`);
});
client.on("presence", (change: PresenceChange) => console.log(change.op, change.user, change.channel));
client.on("error", (error) => console.error(error));

// Events with the payload type the app publishes.
await client.subscribe<Order>("orders", (event: EventFrame<Order>) => {
  const status: "paid" | "shipped" = event.data.status;
  // A stored event has a seq; a volatile one (`volatile: true`) has none.
  const position: number | "volatile" = event.volatile ? "volatile" : event.seq;
  console.log(position, event.id, event.ts, event.region ?? "", status);
});
await client.subscribe("room:maths", undefined, { presence: true });
const scores = await client.subscribe<{ minute: number }>("scores:final", (event) => event.data.minute, { delta: "fossil" });
if (scores.op === "subscribed" && scores.delta === "fossil") console.log("deltas on");
client.connect();

const published = await client.publish("orders", { order: 17, status: "shipped" });
const seq: number = published.seq;
const eventId: string = published.event;
const cursorMoved = await client.publish("room:maths", { x: 10, y: 20 }, { volatile: true });
const volatile: true = cursorMoved.volatile;

// Bytes: a Uint8Array both ways, on every transport; MessagePack frames where they go.
const packed = new FanoutClient("ws://localhost:8081/ws", { protocol: "msgpack" });
await packed.subscribe("files", (event) => {
  if (event.data instanceof Uint8Array) console.log(event.data.byteLength, "bytes");
});
await packed.publish("files", new Uint8Array([0, 1, 2]));
// @ts-expect-error: the protocols are "json" and "msgpack"
new FanoutClient("ws://localhost:8081/ws", { protocol: "cbor" });

const answer = await client.presence("room:maths");
const members: Member[] = answer.members ?? [];
const names = members.map((m) => m.user);
const counted = await client.presence("room:maths", { countOnly: true });
const count: number = counted.count;

await client.setInfo({ name: "Ada" });
const cursor = decodeCursor("eyJ2IjoxfQ");
const version: 1 | 2 | undefined = cursor?.v;
const data: Json = { seq, eventId, volatile, names, count, version: version ?? null };
console.log(data, client.channels, client.state);
client.close();

// @ts-expect-error: there is no such event
client.on("message", () => {});
// @ts-expect-error: data must be JSON (a function is not)
await client.publish("orders", () => 1);
// @ts-expect-error: not a transport
new FanoutClient("ws://localhost:8081/ws", { transports: ["carrier-pigeon"] });
// @ts-expect-error: `seq` is a number
const wrong: string = published.seq;
console.log(wrong);
