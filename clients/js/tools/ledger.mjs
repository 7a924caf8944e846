// The ledger workload of tests/sdk_ledger.py on the JavaScript SDK (driven by
// tests/test_sdk_ledger.py, which disrupts the servers meanwhile).
//
// Env: RTC_WS, RTC_JWT_SECRET, LEDGER_PREFIX. Prints `ready <node of the first publisher>`
// once every client joined every room, publishes until a line `stop` arrives on stdin, then
// waits for every ack and for every client to catch up and prints the ledger as one JSON line.
// A line `flow N` meanwhile is answered `flowed` once every client has received every room up
// to N past what was acked when it came (traffic reaches everyone), or `stalled <who>` after 30 s.
import { createInterface } from "node:readline";

import { RtcClient } from "../src/rtc-client.js";
import { mint } from "./jwt.js";

const ROOMS = 3;
const CLIENTS = 4;
const PUBLISHERS = 4;
const INTERVAL = 20;
const IN_FLIGHT = 200;

const prefix = process.env.LEDGER_PREFIX || "js-ledger";
const rooms = Array.from({ length: ROOMS }, (_, i) => `${prefix}-${i}`);
const ledger = {
  acked: Object.fromEntries(rooms.map((r) => [r, {}])),
  received: {},
  start: {},
  published: 0,
  offline: 0,
  disconnects: 0,
  resumed: 0,
  positions: 0,
  gaps: [],
  failed: [],
};
const clients = [];
const acks = [];
let stopping = false;
let firstNode = null;

for (let i = 0; i < CLIENTS; i++) {
  const name = `c${i}`;
  const client = new RtcClient(process.env.RTC_WS, { token: mint(name), backoffBase: 100, backoffCap: 2000 });
  client.on("disconnected", () => (ledger.disconnects += 1));
  client.on("resumed", (w) => {
    ledger.resumed += 1;
    if (Array.isArray(w.rooms)) ledger.positions += 1;
  });
  client.on("connected", (w) => (firstNode = firstNode || (i === 0 ? w.node : null)));
  await client.connect();
  clients.push(client);
  ledger.received[name] = Object.fromEntries(rooms.map((r) => [r, []]));
  ledger.start[name] = {};
  for (const roomName of rooms) {
    const room = await client.join(roomName);
    ledger.start[name][roomName] = room.seq || 0;
    room.on("message", (m) => ledger.received[name][roomName].push([m.seq, `${m.data.p}:${m.data.n}`]));
    room.on("gap", (g) => ledger.gaps.push(g));
  }
}

function publisher(index) {
  const client = clients[index];
  let n = 0;
  return new Promise((resolve) => {
    const tick = () => {
      if (stopping) return resolve();
      if (client.queued < IN_FLIGHT) {
        const room = client.rooms.get(rooms[n % ROOMS]);
        if (client.state !== "connected") ledger.offline += 1;
        const who = `p${index}:${n}`;
        ledger.published += 1;
        acks.push(
          room.publish({ p: `p${index}`, n }).then(
            (seq) => (ledger.acked[room.name][seq] = who),
            (error) => ledger.failed.push(`${who}: ${error.code} ${error.message}`),
          ),
        );
        n += 1;
      }
      setTimeout(tick, INTERVAL);
    };
    tick();
  });
}

const lastAcked = (room) => Math.max(0, ...Object.keys(ledger.acked[room]).map(Number));

// The clients and rooms not yet received up to `target[room]`, as `client/room@last seq`.
const behind = (target) =>
  Object.entries(ledger.received).flatMap(([name, byRoom]) =>
    rooms
      .map((room) => [room, byRoom[room].length ? byRoom[room][byRoom[room].length - 1][0] : 0])
      .filter(([room, last]) => last < target[room])
      .map(([room, last]) => `${name}/${room}@${last}`),
  );

async function reach(target, ms) {
  const deadline = Date.now() + ms;
  while (behind(target).length && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  return behind(target);
}

const publishing = Array.from({ length: PUBLISHERS }, (_, i) => publisher(i));
console.log(`ready ${firstNode}`);

const input = createInterface({ input: process.stdin });
for await (const line of input) {
  const [command, more] = line.trim().split(" ");
  if (command === "stop") break;
  if (command === "flow") {
    const left = await reach(Object.fromEntries(rooms.map((r) => [r, lastAcked(r) + Number(more)])), 30000);
    console.log(left.length ? `stalled ${left.join(" ")}` : "flowed");
  }
}
stopping = true;
await Promise.all(publishing);
await Promise.all(acks);

await reach(Object.fromEntries(rooms.map((r) => [r, lastAcked(r)])), 60000);
for (const client of clients) client.close();
// Exit only once the pipe took it all: a large ledger is written in several chunks.
process.stdout.write(`${JSON.stringify(ledger)}\n`, () => process.exit(0));
