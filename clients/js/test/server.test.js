// The client against a real rtc (started by tests/test_sdk_js.py, which runs this file):
// RTC_WS (ws://host:port/ws), RTC_HTTP, RTC_JWT_SECRET and RTC_API_KEY in the environment.
import { test } from "node:test";
import assert from "node:assert/strict";

import { RtcClient } from "../src/rtc-client.js";
import { mint } from "../tools/jwt.js";

const WS = process.env.RTC_WS;
const HTTP = process.env.RTC_HTTP;
const FAST = { backoffBase: 50, backoffCap: 500 };

if (!WS) throw new Error("RTC_WS is not set: run this file through tests/test_sdk_js.py");

function client(user, options = {}) {
  return new RtcClient(WS, { token: mint(user), ...FAST, ...options });
}

/** Resolves with the first `count` values an event gives. */
function collect(emitter, event, count) {
  const values = [];
  return new Promise((resolve) => {
    const off = emitter.on(event, (value) => {
      values.push(value);
      if (values.length === count) {
        off();
        resolve(values);
      }
    });
  });
}

function once(emitter, event) {
  return collect(emitter, event, 1).then(([value]) => value);
}

async function api(path, body) {
  const response = await fetch(HTTP + path, {
    method: "POST",
    headers: { "X-API-Key": process.env.RTC_API_KEY, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.json();
}

test("publish reaches every member once, in order, with the acked seqs", async () => {
  const ann = client("ann");
  const bob = client("bob");
  await Promise.all([ann.connect(), bob.connect()]);
  const [roomA, roomB] = await Promise.all([ann.join("js-order"), bob.join("js-order")]);
  const gotA = collect(roomA, "message", 20);
  const gotB = collect(roomB, "message", 20);
  const seqs = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 ? roomA : roomB).publish({ i })));
  for (const got of [await gotA, await gotB]) {
    assert.deepEqual(
      got.map((m) => m.seq),
      [...seqs].sort((a, b) => a - b),
    );
  }
  ann.close();
  bob.close();
});

test("members, direct and presence", async () => {
  const ann = client("ann");
  const bob = client("bob");
  await Promise.all([ann.connect(), bob.connect()]);
  const roomA = await ann.join("js-members");
  const joinedB = once(roomA, "presence");
  await bob.join("js-members");
  assert.deepEqual(await joinedB, { type: "presence", room: "js-members", user: "bob", event: "join" });
  assert.deepEqual(await roomA.members(), { users: ["ann", "bob"], count: 2 });
  const direct = once(bob, "direct");
  const seq = await ann.direct("bob", { hi: 1 });
  const got = await direct;
  assert.equal(got.seq, seq);
  assert.deepEqual([got.from, got.data], ["ann", { hi: 1 }]);
  ann.close();
  bob.close();
});

test("a dropped socket resumes: nothing missed, nothing twice, publishes made meanwhile sent once", async () => {
  const ann = client("ann");
  const bob = client("bob");
  await Promise.all([ann.connect(), bob.connect()]);
  const [roomA, roomB] = await Promise.all([ann.join("js-resume"), bob.join("js-resume")]);
  const got = collect(roomA, "message", 12);
  await roomB.publish("before");
  const resumed = once(ann, "resumed");
  ann._ws.close(3000); // as if the network dropped it: a code that allows reconnecting
  const meanwhile = [roomA.publish("queued-1"), roomA.publish("queued-2")];
  for (let i = 0; i < 8; i++) await roomB.publish(`while-${i}`);
  const welcome = await resumed;
  assert.equal(welcome.session, ann.session);
  assert.ok(Array.isArray(welcome.rooms), "resumed from the client's own positions (positions=1)");
  const seqs = await Promise.all(meanwhile);
  await roomB.publish("after");
  const messages = await got;
  const list = messages.map((m) => m.seq);
  assert.deepEqual(
    list,
    [...new Set(list)].sort((a, b) => a - b),
  );
  assert.equal(list.length, 12);
  assert.ok(seqs.every((s) => list.includes(s)));
  assert.equal(messages.filter((m) => m.data === "queued-1").length, 1);
  ann.close();
  bob.close();
});

test("server API disconnect (4003) is final; getToken refreshes before exp", async () => {
  let minted = 0;
  const eve = new RtcClient(WS, {
    ...FAST,
    getToken: () => {
      minted += 1;
      return mint("eve", 6);
    },
  });
  const errors = [];
  eve.on("error", (e) => errors.push(e));
  await eve.connect();
  const closed = once(eve, "closed");
  await new Promise((resolve) => setTimeout(resolve, 5500)); // refresh is due 1.2 s before exp
  assert.ok(minted >= 2, `getToken called ${minted} times`);
  assert.deepEqual(errors, []);
  assert.equal((await api("/api/disconnect", { user: "eve" })).closed, 1);
  assert.equal((await closed).code, 4003);
  await new Promise((resolve) => setTimeout(resolve, 800));
  assert.equal(eve.state, "closed");
});
