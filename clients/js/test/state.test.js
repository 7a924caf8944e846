// The client's state machine without a server: a fake WebSocket and an injected clock.
import { test } from "node:test";
import assert from "node:assert/strict";

import { RtcClient, backoffDelay, closeAction, tokenExpiry } from "../src/rtc-client.js";

class FakeClock {
  constructor() {
    this.t = 0;
    this.timers = [];
    this.scheduled = []; // every delay asked for, in order
  }
  now() {
    return this.t;
  }
  setTimeout(fn, ms) {
    const timer = { at: this.t + ms, fn };
    this.timers.push(timer);
    this.scheduled.push(ms);
    return timer;
  }
  clearTimeout(timer) {
    this.timers = this.timers.filter((t) => t !== timer);
  }
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      const due = this.timers.filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.timers = this.timers.filter((t) => t !== due);
      this.t = due.at;
      due.fn();
    }
    this.t = end;
  }
}

function fakeSockets() {
  const made = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      made.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close() {}
    deliver(frame) {
      this.onmessage({ data: JSON.stringify(frame) });
    }
    drop(code, reason = "") {
      this.onclose({ code, reason });
    }
  }
  return { FakeSocket, made };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeSocket, made } = fakeSockets();
  const client = new RtcClient("ws://rtc.test/ws", {
    token: "t0",
    WebSocket: FakeSocket,
    clock,
    random: () => 0.5,
    pingInterval: 0,
    ...options,
  });
  return { client, clock, made };
}

function welcome(socket, extra = {}) {
  socket.deliver({ type: "welcome", session: "S1", user: "ann", node: "n", resumed: false, ...extra });
}

test("full jitter: random in [0, min(cap, base * 2^attempt))", () => {
  assert.equal(backoffDelay(0, () => 0.999999), 499);
  assert.equal(backoffDelay(3, () => 0.5), 2000);
  assert.equal(backoffDelay(10, () => 0.999999), 19999); // capped at 20 s
  assert.equal(backoffDelay(60, () => 0.999999), 19999);
  assert.equal(backoffDelay(5, () => 0), 0);
});

test("close codes: no retry on 1008 or an application code, 4001 only with getToken", () => {
  assert.equal(closeAction(1001, false), "reconnect");
  assert.equal(closeAction(1006, false), "reconnect");
  assert.equal(closeAction(1013, false), "reconnect");
  assert.equal(closeAction(1008, true), "stop");
  assert.equal(closeAction(4001, false), "stop");
  assert.equal(closeAction(4001, true), "refresh");
  assert.equal(closeAction(4003, true), "stop");
});

test("tokenExpiry reads exp without verifying", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "a", exp: 1234 })).toString("base64url");
  assert.equal(tokenExpiry(`x.${payload}.y`), 1234000);
  assert.equal(tokenExpiry("garbage"), null);
});

test("reconnect schedule: delays follow the full-jitter backoff and reset after a welcome", async () => {
  const { client, clock, made } = setup();
  client.connect();
  assert.equal(made.length, 1);
  for (let attempt = 0; attempt < 8; attempt++) {
    made.at(-1).drop(1006);
    const delay = clock.scheduled.at(-1);
    assert.equal(delay, backoffDelay(attempt, () => 0.5), `attempt ${attempt}`);
    clock.advance(delay - 1);
    await tick();
    assert.equal(made.length, attempt + 1, "no reconnect before the delay");
    clock.advance(1);
    await tick();
    assert.equal(made.length, attempt + 2);
  }
  assert.equal(clock.scheduled.at(-1), 10000); // 0.5 * 20 s cap
  welcome(made.at(-1));
  made.at(-1).drop(1006);
  assert.equal(clock.scheduled.at(-1), 250, "attempts reset after a welcome");
});

test("migrating: reconnect_after is honoured and new_endpoint used, with the session", async () => {
  const { client, clock, made } = setup();
  client.connect();
  welcome(made[0]);
  made[0].deliver({
    type: "status",
    status: "migrating",
    details: { new_endpoint: "ws://other.test/ws", reconnect_after: 1234, session: "S1" },
  });
  made[0].drop(1001, "draining");
  assert.equal(clock.scheduled.at(-1), 1234);
  clock.advance(1233);
  await tick();
  assert.equal(made.length, 1);
  clock.advance(1);
  await tick();
  const url = new URL(made[1].url);
  assert.equal(url.host, "other.test");
  assert.equal(url.searchParams.get("session"), "S1");
  assert.equal(url.searchParams.get("positions"), "1");
});

test("no reconnect after 1008, nor after 4001 with a fixed token; 4001 with getToken fetches a new one", async () => {
  for (const code of [1008, 4001, 4003]) {
    const { client, clock, made } = setup();
    const closed = [];
    client.on("closed", (e) => closed.push(e.code));
    client.connect().catch(() => {});
    welcome(made[0]);
    made[0].drop(code);
    clock.advance(60000);
    await tick();
    assert.equal(made.length, 1, `code ${code}`);
    assert.deepEqual(closed, [code]);
    assert.equal(client.state, "closed");
  }
  let tokens = 0;
  const { client, clock, made } = setup({ token: undefined, getToken: async () => `tok${++tokens}` });
  client.connect();
  await tick();
  welcome(made[0]);
  made[0].drop(4001, "token expired");
  clock.advance(60000);
  await tick();
  assert.equal(made.length, 2);
  assert.equal(new URL(made[1].url).searchParams.get("token"), "tok2");
});

test("publishes while disconnected are queued and sent once joined, with the same id until acked", async () => {
  const { client, clock, made } = setup();
  client.connect();
  welcome(made[0]);
  const joining = client.join("news");
  const join = made[0].sent.find((f) => f.type === "join");
  made[0].deliver({ type: "joined", room: "news", seq: 4, epoch: "E", recovered: true, id: join.id });
  const room = await joining;
  made[0].drop(1006);
  const first = room.publish({ n: 1 });
  const second = room.publish({ n: 2 });
  clock.advance(20000);
  await tick();
  const socket = made[1];
  welcome(socket, { resumed: true }); // an older server: no `rooms`, so a `join since` follows
  const rejoin = socket.sent.find((f) => f.type === "join");
  assert.deepEqual([rejoin.since, rejoin.epoch], [4, "E"]);
  assert.equal(socket.sent.filter((f) => f.type === "publish").length, 0, "held until joined");
  socket.deliver({ type: "joined", room: "news", seq: 4, epoch: "E", recovered: true, id: rejoin.id });
  const sent = socket.sent.filter((f) => f.type === "publish");
  assert.deepEqual(
    sent.map((f) => f.data),
    [{ n: 1 }, { n: 2 }],
  );
  socket.drop(1006); // no ack yet: retried on the next connection with the same ids
  clock.advance(20000);
  await tick();
  welcome(made[2], { resumed: true });
  const again = made[2].sent.find((f) => f.type === "join");
  made[2].deliver({ type: "joined", room: "news", seq: 4, epoch: "E", recovered: true, id: again.id });
  const retried = made[2].sent.filter((f) => f.type === "publish");
  assert.deepEqual(
    retried.map((f) => f.id),
    sent.map((f) => f.id),
  );
  made[2].deliver({ type: "ack", room: "news", seq: 5, id: retried[0].id });
  made[2].deliver({ type: "ack", room: "news", seq: 6, id: retried[1].id });
  assert.deepEqual(await Promise.all([first, second]), [5, 6]);
});

test("each seq once and in order: duplicates dropped, an unannounced hole replayed, a gap announced", async () => {
  const { client, made } = setup();
  client.connect();
  welcome(made[0]);
  const joining = client.join("r");
  const join = made[0].sent.find((f) => f.type === "join");
  made[0].deliver({ type: "joined", room: "r", seq: 0, epoch: "E", recovered: true, id: join.id });
  const room = await joining;
  const seen = [];
  const gaps = [];
  room.on("message", (m) => seen.push(m.seq));
  room.on("gap", (g) => gaps.push([g.from, g.to]));
  const msg = (seq) => made[0].deliver({ type: "message", room: "r", seq, from: "x", data: seq, ts: 0 });
  msg(1);
  msg(2);
  msg(2);
  msg(1);
  msg(5); // 3 and 4 never came: ask for them from our position
  const repair = made[0].sent.filter((f) => f.type === "join").at(-1);
  assert.equal(repair.since, 2);
  msg(6); // not used until the repair's reply
  made[0].deliver({ type: "joined", room: "r", seq: 6, epoch: "E", recovered: true, id: repair.id });
  for (const seq of [3, 4, 5, 6, 7]) msg(seq);
  made[0].deliver({ type: "gap", room: "r", from: 8, to: 9 });
  msg(10);
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 10]);
  assert.deepEqual(gaps, [[8, 9]]);
});

test("resume with positions: a `resume` frame with the client's own seqs", async () => {
  const { client, clock, made } = setup();
  client.connect();
  welcome(made[0]);
  const joining = client.join("a");
  const join = made[0].sent.find((f) => f.type === "join");
  made[0].deliver({ type: "joined", room: "a", seq: 7, epoch: "EA", recovered: true, id: join.id });
  await joining;
  made[0].deliver({ type: "direct", from: "bob", seq: 3, data: 1, ts: 0 });
  made[0].drop(1006);
  clock.advance(20000);
  await tick();
  const resumedEvents = [];
  client.on("resumed", (w) => resumedEvents.push(w.session));
  welcome(made[1], { resumed: true, rooms: ["a", "@ann", "old"] });
  const resume = made[1].sent.find((f) => f.type === "resume");
  assert.deepEqual(resume.rooms, { "@ann": 3, a: 7 });
  assert.deepEqual(resume.epochs, { a: "EA" });
  assert.ok(made[1].sent.some((f) => f.type === "leave" && f.room === "old"));
  assert.deepEqual(resumedEvents, ["S1"]);
});

test("the queue is bounded", async () => {
  const { client, made } = setup({ maxQueue: 2 });
  client.connect();
  welcome(made[0]);
  const joining = client.join("q");
  const join = made[0].sent.find((f) => f.type === "join");
  made[0].deliver({ type: "joined", room: "q", seq: 0, epoch: "E", recovered: true, id: join.id });
  const room = await joining;
  room.publish(1);
  room.publish(2);
  await assert.rejects(room.publish(3), { code: "queue_full" });
});
