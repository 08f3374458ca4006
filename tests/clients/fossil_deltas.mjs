// Fossil deltas checked across three implementations, and fanout.js taking a channel's
// deltas from a live node. Reads cases ({base, target, delta}, base64; `delta` made by the
// node's fossil-delta crate) from the file named first; checks that fanout.js's applyDelta
// and npm's fossil-delta (dchest's port of Fossil's delta.c) both turn each base into its
// target, and makes npm's own deltas of the same pairs for the Rust side to apply. Then
// fanout.js (in Node, with its WebSocket) subscribes with {delta: "fossil"} and gets each
// published event whole. Prints one JSON line.
// Usage: node --experimental-websocket fossil_deltas.mjs <cases.json> <ws URL> <api URL> <channel> <count>
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [, , casesFile, wsUrl, api, channel, count] = process.argv;
const npm = await import(pathToFileURL(`${process.env.NPM_PREFIX}/node_modules/fossil-delta/fossil-delta.js`));
const { FanoutClient, applyDelta } = await import(pathToFileURL(process.env.FANOUT_JS));
const bytes = (b64) => new Uint8Array(Buffer.from(b64, "base64"));
const same = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
const seen = { cases: 0, fanoutJs: 0, npm: 0, npmDeltas: [], events: [] };

for (const c of JSON.parse(readFileSync(casesFile, "utf8"))) {
  const [base, target, delta] = [bytes(c.base), bytes(c.target), bytes(c.delta)];
  seen.cases += 1;
  if (same(applyDelta(base, delta), target)) seen.fanoutJs += 1;
  if (same(npm.applyDelta(base, delta), target)) seen.npm += 1;
  seen.npmDeltas.push(Buffer.from(npm.createDelta(base, target)).toString("base64"));
}
// fanout.js refuses a delta that does not apply.
try {
  applyDelta(new TextEncoder().encode("not the base at all"), bytes(JSON.parse(readFileSync(casesFile, "utf8"))[0].delta));
  seen.wrongBase = "applied";
} catch (error) {
  seen.wrongBase = "refused";
}

const client = new FanoutClient([`${wsUrl}/ws?user=js`], { transports: ["websocket"] });
try {
  const got = [];
  let done;
  const all = new Promise((resolve) => (done = resolve));
  const bound = (what) => new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), 15000).unref());
  const reply = await Promise.race([bound("subscribed"), new Promise((resolve, reject) => {
    client.on("state", ({ state }) => {
      if (state !== "open") return;
      client
        .subscribe(channel, (event) => {
          got.push(event.data);
          if (got.length === Number(count)) done();
        }, { delta: "fossil" })
        .then(resolve, reject);
    });
    client.connect();
  })]);
  seen.reply = reply.delta;
  for (let minute = 0; minute < Number(count); minute++) {
    const state = { id: 7, minute, score: [minute % 3, minute % 2], note: "é ∆ 中".repeat(minute + 1), players: Array.from({ length: 22 }, (_, n) => ({ n, name: `player ${n}` })) };
    seen.events.push(state);
    const answer = await fetch(`${api}/v1/channels/${channel}/events`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(state) });
    if (answer.status !== 202) throw new Error(`publish: ${answer.status}`);
  }
  await Promise.race([all, bound("every event")]);
  seen.same = JSON.stringify(got) === JSON.stringify(seen.events);
  delete seen.events;
  console.log(JSON.stringify(seen));
} catch (error) {
  console.log(JSON.stringify({ ...seen, events: undefined, error: String(error) }));
} finally {
  client.close();
  process.exit(0);
}
