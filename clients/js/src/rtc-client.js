// rtc JavaScript client: an ES module with no dependencies (browsers, Node >= 22 or
// Node 20 with --experimental-websocket, or any WebSocket passed in `options.WebSocket`).
//
//   import { RtcClient } from "/client.js";
//   const client = new RtcClient("wss://host/ws", { getToken: async () => jwt });
//   await client.connect();
//   const room = await client.join("news");
//   room.on("message", (msg) => console.log(msg.seq, msg.data));
//   const seq = await room.publish({ n: 1 });
//
// Delivery rules (docs/clients.md): the application sees each seq of a room once and in
// order; a hole the server announces, or history that no longer reaches back, is a `gap`
// event, never silent. Publishes made while disconnected wait in a bounded queue and are
// retried with the same `id` on the same session until acked, so each is sequenced once.

/** Full-jitter exponential backoff: a random delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, random = Math.random, base = 500, cap = 20000) {
  return Math.floor(random() * Math.min(cap, base * 2 ** Math.min(attempt, 30)));
}

/**
 * What a close code allows: "reconnect", "refresh" (reconnect with a new token), or
 * "stop". The one place that decides it (centrifuge-js keeps the same single switch).
 */
export function closeAction(code, canRefresh) {
  if (code === 4001) return canRefresh ? "refresh" : "stop"; // token expired
  if (code === 1008 || code === 1009) return "stop"; // policy: abuse; a frame over the limit
  if (code >= 4000 && code <= 4999) return "stop"; // the application disconnected this user
  return "reconnect"; // 1001 drain, 1006 dropped, 1011, 1012, 1013 slow consumer, ...
}

/** The `exp` claim of a JWT in ms, or null (the token is not verified here, only read). */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** Errors a publish or request is rejected with: `code` is the server's error code. */
export class RtcError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "RtcError";
    this.code = code;
  }
}

const RETRY_CODES = new Set(["unavailable", "rate_limited", "internal"]);
const RETRY_DELAY = 500;

const realClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
};

class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  /** Add a handler; returns a function that removes it. */
  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }
  off(event, handler) {
    this._handlers.get(event)?.delete(handler);
  }
  _emit(event, value) {
    for (const handler of [...(this._handlers.get(event) || [])]) {
      try {
        handler(value);
      } catch (error) {
        if (event !== "error") this._emit("error", error);
      }
    }
  }
}

/** One joined room: `publish`, `members`, `leave`, and events message / presence / gap. */
export class Room extends Emitter {
  constructor(client, name) {
    super();
    this.client = client;
    this.name = name;
    this.seq = null; // last seq delivered to the application
    this.epoch = null;
    this.joinedOn = 0; // the connection number whose `joined` we last saw
    this.repairing = null; // id of a `join since` in flight: frames until its reply are not used
    this.gapOk = false; // after `recovered:false` the next jump is a known gap
    this.left = false;
  }
  /** Publish; resolves to the seq once the server acked it (retried across reconnects). */
  publish(data) {
    return this.client._publish(this, data);
  }
  /** `{users, count}`: users with a connection in this room, cluster-wide. */
  members() {
    return this.client._request({ type: "members", room: this.name }).then((r) => ({ users: r.users, count: r.count }));
  }
  /** Leave the room; no further events. */
  async leave() {
    this.left = true;
    this.client._forget(this);
    if (this.client.state === "connected") await this.client._request({ type: "leave", room: this.name });
  }
}

/** The client: one WebSocket at a time, reconnecting and resuming until `close()`. */
export class RtcClient extends Emitter {
  /**
   * @param {string} url  ws:// or wss:// URL of /ws
   * @param {object} options  token | getToken, and for tests: WebSocket, clock, random
   */
  constructor(url, options = {}) {
    super();
    if (!options.token && !options.getToken) throw new TypeError("RtcClient needs a token or getToken");
    this.url = url;
    this.options = options;
    this.state = "disconnected"; // connecting, connected, closed
    this.session = null;
    this.user = null;
    this.rooms = new Map(); // name -> Room, including "@user" for direct messages
    this.attempt = 0;
    this._clock = options.clock || realClock;
    this._random = options.random || Math.random;
    this._base = options.backoffBase ?? 500;
    this._cap = options.backoffCap ?? 20000;
    this._maxQueue = options.maxQueue ?? 1000;
    this._maxBytes = options.maxMessageBytes ?? 65536;
    this._pingInterval = options.pingInterval ?? 25000;
    this._token = options.token || null;
    this._ws = null;
    this._conn = 0; // connection number: replies from an older socket are ignored
    this._endpoint = url;
    this._migrating = null; // {new_endpoint, reconnect_after} from the server
    this._queue = []; // unacked publishes, in order: {room, frame, resolve, reject, sentOn}
    this._pending = new Map(); // request id -> {resolve, reject, frame}
    this._next = 0;
    this._prefix = Math.random().toString(36).slice(2, 10);
    this._timers = new Set();
    this._positions = true; // the server takes `positions=1` (cleared when it does not)
    this._firstConnect = null;
    this._pingTimer = null;
    this._lastFrameAt = 0;
    this._refreshTimer = null;
  }

  /** Connect; resolves on the first `welcome`, rejects if the client stops before that. */
  connect() {
    if (!this._firstConnect) {
      this._firstConnect = new Promise((resolve, reject) => {
        this._connected = resolve;
        this._failed = reject;
      });
      this._open();
    }
    return this._firstConnect;
  }

  /** Join a room; resolves to its handle once the server said `joined`. */
  join(name) {
    if (this.state === "closed") return Promise.reject(new RtcError("closed", "client closed"));
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(this, name);
      this.rooms.set(name, room);
    }
    if (room.joinedOn === this._conn && this.state === "connected") return Promise.resolve(room);
    return new Promise((resolve, reject) => {
      room._waiters = room._waiters || [];
      room._waiters.push({ resolve, reject });
      if (this.state === "connected" && room._waiters.length === 1) this._sendJoin(room);
    });
  }

  /** Send to every connection of `user`; resolves to the seq in that user's inbox. */
  direct(user, data) {
    return this._request({ type: "direct", to: user, data }).then((r) => r.seq);
  }

  /** Publishes not acked yet (queued while disconnected, or in flight). */
  get queued() {
    return this._queue.length;
  }

  /** Drop the current socket and reconnect at once, resuming the session. */
  reconnect() {
    const ws = this._ws;
    if (this.state === "closed" || !ws) return;
    ws.onclose = ws.onmessage = null;
    ws.close(1000);
    this._onClose(1000, "reconnect asked by the application");
  }

  /** Close for good: no reconnect; queued publishes are rejected. */
  close() {
    this._stop(1000, "closed by the application", new RtcError("closed", "client closed"));
  }

  // -- connection lifecycle -------------------------------------------------------------

  async _open() {
    if (this.state === "closed") return;
    this.state = "connecting";
    let token;
    try {
      token = this.options.getToken ? await this.options.getToken() : this._token;
    } catch (error) {
      this._emit("error", error);
      this._scheduleReconnect(null);
      return;
    }
    if (this.state === "closed") return;
    this._token = token;
    const params = new URLSearchParams({ token });
    if (this.session) {
      params.set("session", this.session);
      if (this._positions) params.set("positions", "1");
    }
    const endpoint = this._endpoint;
    // Looked up on every connect, not once: pages and tools may wrap the global later.
    const WebSocketImpl = this.options.WebSocket || globalThis.WebSocket;
    const ws = new WebSocketImpl(endpoint + (endpoint.includes("?") ? "&" : "?") + params);
    const conn = ++this._conn;
    this._ws = ws;
    ws.onmessage = (event) => conn === this._conn && this._onFrame(event.data);
    ws.onclose = (event) => conn === this._conn && this._onClose(event.code, event.reason);
    ws.onerror = () => {}; // a close event follows
  }

  _onClose(code, reason) {
    this._ws = null;
    this._clearConnectionTimers();
    const wasConnected = this.state === "connected";
    if (this.state === "closed") return;
    this.state = "disconnected";
    for (const request of this._pending.values()) request.reject(new RtcError("disconnected", "connection lost"));
    this._pending.clear(); // joins are sent again on the next welcome
    for (const item of this._queue) item.sentOn = 0;
    const action = closeAction(code, Boolean(this.options.getToken));
    const willReconnect = action !== "stop";
    if (wasConnected) this._emit("disconnected", { code, reason, willReconnect });
    if (!willReconnect) {
      this._stop(code, reason, new RtcError("closed", `closed by the server: ${code} ${reason}`));
      return;
    }
    this._scheduleReconnect(code);
  }

  _scheduleReconnect(code) {
    let delay;
    if (this._migrating && code === 1001) {
      delay = this._migrating.reconnect_after || 0;
      if (this._migrating.new_endpoint) this._endpoint = this._migrating.new_endpoint;
    } else {
      delay = backoffDelay(this.attempt, this._random, this._base, this._cap);
    }
    this._migrating = null;
    this.attempt += 1;
    this._later(() => this._open(), delay);
  }

  _stop(code, reason, error) {
    if (this.state === "closed") return;
    const ws = this._ws;
    this.state = "closed";
    this._ws = null;
    this._conn += 1;
    for (const timer of this._timers) this._clock.clearTimeout(timer);
    this._timers.clear();
    this._clearConnectionTimers();
    if (ws) ws.close(1000);
    for (const item of this._queue.splice(0)) item.reject(error);
    for (const request of this._pending.values()) request.reject(error);
    this._pending.clear();
    for (const room of this.rooms.values()) for (const w of room._waiters || []) w.reject(error);
    if (this._failed) this._failed(error);
    this._emit("closed", { code, reason });
  }

  _later(fn, ms) {
    const timer = this._clock.setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clearConnectionTimers() {
    for (const name of ["_pingTimer", "_refreshTimer"]) {
      if (this[name] !== null) {
        this._clock.clearTimeout(this[name]);
        this._timers.delete(this[name]);
        this[name] = null;
      }
    }
  }

  _send(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  _id(kind) {
    this._next += 1;
    return `${kind}:${this._prefix}:${this._next}`;
  }

  _request(frame) {
    if (this.state !== "connected") return Promise.reject(new RtcError("disconnected", "not connected"));
    const id = this._id("r");
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, frame });
      this._send({ ...frame, id });
    });
  }

  // -- frames ---------------------------------------------------------------------------

  _onFrame(text) {
    this._lastFrameAt = this._clock.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "joined":
        return this._onJoined(frame);
      case "message":
        return this._onSequenced(this.rooms.get(frame.room), frame);
      case "direct":
        return this._onSequenced(this._inbox(), frame);
      case "ack":
        return this._onAck(frame);
      case "gap":
        return this._onGap(frame);
      case "presence":
        return this.rooms.get(frame.room)?._emit("presence", frame);
      case "status":
        if (frame.status === "migrating") this._migrating = frame.details || {};
        return undefined;
      case "error":
        return this._onError(frame);
      case "refreshed":
        return this._scheduleRefresh();
      default:
        return this._resolve(frame);
    }
  }

  _inbox() {
    const name = `@${this.user}`;
    let inbox = this.rooms.get(name);
    if (!inbox) {
      inbox = new Room(this, name);
      this.rooms.set(name, inbox);
    }
    return inbox;
  }

  _onWelcome(frame) {
    const resumed = Boolean(frame.resumed) && frame.session === this.session;
    this.session = frame.session;
    this.user = frame.user;
    this.state = "connected";
    this.attempt = 0;
    const inbox = this._inbox();
    inbox.joinedOn = this._conn;
    const rooms = [...this.rooms.values()].filter((r) => r !== inbox);
    if (resumed && Array.isArray(frame.rooms)) {
      // The server waits for our positions and replays each room from them.
      const known = new Set(frame.rooms);
      const positions = {};
      const epochs = {};
      for (const room of [inbox, ...rooms]) {
        if (room.seq !== null && (known.has(room.name) || room === inbox)) {
          positions[room.name] = room.seq;
          if (room.epoch) epochs[room.name] = room.epoch;
        }
      }
      this._send({ type: "resume", rooms: positions, epochs });
      for (const room of rooms) if (!known.has(room.name)) this._sendJoin(room);
      for (const name of known) if (!this.rooms.has(name)) this._send({ type: "leave", room: name });
    } else {
      if (resumed) this._positions = false; // an older server: it ignored positions=1
      // Replay each room from our own position: whatever the server sends for a room
      // before the reply to this join is not used (it may start past our position).
      if (inbox.seq !== null) this._sendJoin(inbox);
      for (const room of rooms) this._sendJoin(room);
    }
    this._schedulePing();
    this._scheduleRefresh();
    if (resumed) this._emit("resumed", frame);
    this._emit("connected", frame);
    if (this._connected) {
      this._connected(this);
      this._connected = null;
      this._failed = null;
    }
    this._flushQueue();
  }

  _sendJoin(room) {
    const id = this._id("j");
    const frame = { type: "join", room: room.name, id };
    if (room.seq !== null) {
      frame.since = room.seq;
      if (room.epoch) frame.epoch = room.epoch;
      room.repairing = id;
    }
    this._pending.set(id, { frame, resolve: () => {}, reject: () => {} });
    this._send(frame);
  }

  _onJoined(frame) {
    const room = this.rooms.get(frame.room);
    if (frame.id) this._pending.delete(frame.id);
    if (!room || room.left) return;
    if (room.repairing && frame.id !== room.repairing) return; // superseded by our own join
    room.repairing = null;
    room.joinedOn = this._conn;
    if (room.seq === null) {
      room.seq = frame.seq;
    } else if (room.epoch && frame.epoch !== room.epoch) {
      // History was lost (Redis restarted): seqs start over in the new epoch.
      room._emit("gap", { room: room.name, from: room.seq + 1, to: null, epoch: frame.epoch });
      room.seq = 0;
      room.gapOk = true;
    } else if (frame.recovered === false) {
      room.gapOk = true; // what history lost shows as a jump: announce it, do not repair
    }
    room.epoch = frame.epoch;
    room._emit("joined", frame);
    for (const waiter of (room._waiters || []).splice(0)) waiter.resolve(room);
    this._flushQueue();
  }

  _onSequenced(room, frame) {
    if (!room || room.left) return;
    if (room.seq === null) {
      room.seq = frame.seq - 1; // the inbox: its first direct message sets the position
    }
    if (room.repairing || frame.seq <= room.seq) return; // replayed again, or superseded
    if (frame.seq > room.seq + 1) {
      if (!room.gapOk && this.state === "connected") {
        this._sendJoin(room); // a hole nobody announced: replay it from our position
        return;
      }
      room._emit("gap", { room: room.name, from: room.seq + 1, to: frame.seq - 1 });
    }
    room.gapOk = false;
    room.seq = frame.seq;
    if (frame.type === "direct") this._emit("direct", frame);
    else room._emit("message", frame);
  }

  _onGap(frame) {
    const room = this.rooms.get(frame.room);
    if (!room || room.seq === null || frame.to <= room.seq) return;
    room._emit("gap", { room: frame.room, from: Math.max(frame.from, room.seq + 1), to: frame.to });
    room.seq = frame.to;
  }

  _onAck(frame) {
    const index = this._queue.findIndex((item) => item.frame.id === frame.id);
    if (index >= 0) {
      const [item] = this._queue.splice(index, 1);
      item.resolve(frame.seq);
      return;
    }
    this._resolve(frame);
  }

  _resolve(frame) {
    const request = frame.id !== undefined && this._pending.get(frame.id);
    if (request) {
      this._pending.delete(frame.id);
      request.resolve(frame);
    }
  }

  _onError(frame) {
    const error = new RtcError(frame.code, frame.message);
    const item = this._queue.find((entry) => entry.frame.id === frame.id);
    if (item) {
      if (RETRY_CODES.has(frame.code) || (frame.code === "not_joined" && !item.room.left)) {
        item.sentOn = 0; // sent again shortly, with the same id
        this._later(() => this._flushQueue(), RETRY_DELAY);
      } else {
        this._queue.splice(this._queue.indexOf(item), 1);
        item.reject(error);
      }
      return;
    }
    const request = frame.id !== undefined && this._pending.get(frame.id);
    if (!request) {
      this._emit("error", error);
      return;
    }
    this._pending.delete(frame.id);
    const room = request.frame.type === "join" && this.rooms.get(request.frame.room);
    if (!room) {
      request.reject(error);
    } else if (RETRY_CODES.has(frame.code)) {
      const conn = this._conn; // Redis or the owner was busy: ask again on this connection
      this._later(() => conn === this._conn && this.state === "connected" && this._sendJoin(room), RETRY_DELAY);
    } else {
      for (const waiter of (room._waiters || []).splice(0)) waiter.reject(error);
      this._forget(room);
      room._emit("error", error);
      this._emit("error", error);
    }
  }

  // -- publishing -------------------------------------------------------------------------

  _publish(room, data) {
    if (room.left || this.state === "closed") return Promise.reject(new RtcError("closed", "room left or client closed"));
    if (this._queue.length >= this._maxQueue) return Promise.reject(new RtcError("queue_full", "too many unacked publishes"));
    const frame = { type: "publish", room: room.name, data, id: this._id("p") };
    if (JSON.stringify(frame).length > this._maxBytes) return Promise.reject(new RtcError("too_large", "message too large"));
    return new Promise((resolve, reject) => {
      this._queue.push({ room, frame, resolve, reject, sentOn: 0 });
      this._flushQueue();
    });
  }

  _flushQueue() {
    if (this.state !== "connected") return;
    for (const item of this._queue) {
      if (item.sentOn !== this._conn && item.room.joinedOn === this._conn && !item.room.repairing) {
        item.sentOn = this._conn;
        this._send(item.frame);
      }
    }
  }

  _forget(room) {
    this.rooms.delete(room.name);
    room.left = true;
    for (const item of this._queue.filter((entry) => entry.room === room)) {
      this._queue.splice(this._queue.indexOf(item), 1);
      item.reject(new RtcError("not_joined", "room left"));
    }
  }

  // -- keeping the connection alive and authorized ----------------------------------------

  _schedulePing() {
    if (!this._pingInterval) return;
    const conn = this._conn;
    let pingedAt = this._clock.now();
    const tick = () => {
      if (conn !== this._conn || this.state !== "connected") return;
      if (this._lastFrameAt < pingedAt) {
        const ws = this._ws; // no answer to the last ping: a dead path, start over
        ws.onclose = ws.onmessage = null;
        ws.close();
        this._onClose(1006, "ping timeout");
        return;
      }
      pingedAt = this._clock.now();
      this._send({ type: "ping" });
      this._pingTimer = this._later(tick, this._pingInterval);
    };
    this._pingTimer = this._later(tick, this._pingInterval);
  }

  _scheduleRefresh() {
    if (!this.options.getToken || this.state !== "connected") return;
    const exp = tokenExpiry(this._token);
    if (exp === null) return;
    const lifetime = exp - this._clock.now();
    const delay = Math.max(1000, lifetime - Math.min(60000, lifetime / 5));
    if (this._refreshTimer !== null) this._clock.clearTimeout(this._refreshTimer);
    const conn = this._conn;
    this._refreshTimer = this._later(async () => {
      this._refreshTimer = null;
      try {
        const token = await this.options.getToken();
        if (conn !== this._conn || this.state !== "connected") return;
        this._token = token;
        this._send({ type: "refresh", token, id: this._id("t") });
      } catch (error) {
        this._emit("error", error);
      }
    }, delay);
  }
}
