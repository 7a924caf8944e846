// The ledger workload of tests/sdk_ledger.py on the JavaScript SDK (driven by
// tests/test_sdk_ledger.py, which disrupts the servers meanwhile).
//
// Env: RTC_WS, RTC_JWT_SECRET, LEDGER_PREFIX. Prints `ready <node of the first publisher>`
// once every client joined every room, publishes until a line `stop` arrives on stdin, then
// waits for every ack and for every client to catch up and prints the ledger as one JSON line.
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

const publishing = Array.from({ length: PUBLISHERS }, (_, i) => publisher(i));
console.log(`ready ${firstNode}`);

const input = createInterface({ input: process.stdin });
for await (const line of input) {
  if (line.trim() === "stop") break;
}
stopping = true;
await Promise.all(publishing);
await Promise.all(acks);

const caughtUp = () =>
  Object.values(ledger.received).every((byRoom) =>
    rooms.every((room) => {
      const last = Math.max(0, ...Object.keys(ledger.acked[room]).map(Number));
      const got = byRoom[room];
      return last === 0 || (got.length > 0 && got[got.length - 1][0] >= last);
    }),
  );
const deadline = Date.now() + 60000;
while (!caughtUp() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
for (const client of clients) client.close();
// Exit only once the pipe took it all: a large ledger is written in several chunks.
process.stdout.write(`${JSON.stringify(ledger)}\n`, () => process.exit(0));
