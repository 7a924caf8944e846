// Node.js `ws` baseline: the same protocol subset as bench/baselines/bare_aiohttp.py
// (welcome; join -> joined; publish -> ack + message with a per-room seq; direct ->
// ack + direct with a per-user inbox seq; ping), no auth, no Redis, compression off.
// It shows what one single-threaded non-Python event loop does with the same work.
// Each message is serialized once and the same Buffer is sent to every member.
//
//   node bench/baselines/node_ws/server.js --host 127.0.0.1 --port 8093
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

function option(name, fallback) {
  const index = process.argv.indexOf(`--${name}`);
  return index > 0 ? process.argv[index + 1] : fallback;
}

const host = option('host', '127.0.0.1');
const port = Number(option('port', '8093'));

const rooms = new Map(); // room -> Set<ws>
const roomSeq = new Map();
const inboxes = new Map(); // user -> Set<ws>
const inboxSeq = new Map();
let anonymous = 0;

// The token's `sub`, unverified (no auth here), like the bare baseline.
function userOf(url) {
  const token = url.searchParams.get('token');
  if (token) {
    try {
      const claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
      if (claims.sub || claims.user_id) return String(claims.sub || claims.user_id);
    } catch (_err) {
      // fall through to an anonymous name
    }
  }
  anonymous += 1;
  return `anon-${anonymous}`;
}

function sendAll(members, payload) {
  if (!members) return;
  for (const ws of members) ws.send(payload, { binary: false });
}

function reply(ws, msg, request) {
  if (request.id !== undefined) msg.id = request.id;
  ws.send(JSON.stringify(msg));
}

function leave(ws, room) {
  ws.rooms.delete(room);
  const members = rooms.get(room);
  if (members) {
    members.delete(ws);
    if (members.size === 0) rooms.delete(room);
  }
}

function handle(ws, request) {
  const kind = request.type;
  if (kind === 'publish' && ws.rooms.has(request.room)) {
    const room = request.room;
    const seq = (roomSeq.get(room) || 0) + 1;
    roomSeq.set(room, seq);
    reply(ws, { type: 'ack', room, seq }, request);
    const message = { type: 'message', room, seq, from: ws.user, data: request.data, ts: Date.now() };
    sendAll(rooms.get(room), Buffer.from(JSON.stringify(message)));
  } else if (kind === 'direct' && typeof request.to === 'string') {
    const to = request.to;
    const seq = (inboxSeq.get(to) || 0) + 1;
    inboxSeq.set(to, seq);
    reply(ws, { type: 'ack', to, seq }, request);
    const message = { type: 'direct', from: ws.user, seq, data: request.data, ts: Date.now() };
    sendAll(inboxes.get(to), Buffer.from(JSON.stringify(message)));
  } else if (kind === 'join' && typeof request.room === 'string') {
    const room = request.room;
    if (!rooms.has(room)) rooms.set(room, new Set());
    rooms.get(room).add(ws);
    ws.rooms.add(room);
    reply(ws, { type: 'joined', room, seq: roomSeq.get(room) || 0, epoch: 'node', recovered: true }, request);
  } else if (kind === 'leave' && ws.rooms.has(request.room)) {
    leave(ws, request.room);
    reply(ws, { type: 'left', room: request.room }, request);
  } else if (kind === 'ping') {
    reply(ws, { type: 'pong' }, request);
  } else {
    const code = kind === 'publish' || kind === 'leave' ? 'not_joined' : 'bad_request';
    reply(ws, { type: 'error', code, message: `cannot ${kind}` }, request);
  }
}

const server = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"status":"ok"}');
  } else {
    res.writeHead(404);
    res.end();
  }
});

const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false, maxPayload: 65536 });

wss.on('connection', (ws, req) => {
  ws.user = userOf(new URL(req.url, 'http://localhost'));
  ws.rooms = new Set();
  if (!inboxes.has(ws.user)) inboxes.set(ws.user, new Set());
  inboxes.get(ws.user).add(ws);
  ws.send(JSON.stringify({ type: 'welcome', session: ws.user, user: ws.user, node: 'node', resumed: false }));
  ws.on('message', (data, isBinary) => {
    let request = {};
    try {
      request = isBinary ? {} : JSON.parse(data.toString());
    } catch (_err) {
      request = {};
    }
    handle(ws, request && typeof request === 'object' ? request : {});
  });
  ws.on('close', () => {
    for (const room of [...ws.rooms]) leave(ws, room);
    const inbox = inboxes.get(ws.user);
    inbox.delete(ws);
    if (inbox.size === 0) inboxes.delete(ws.user);
  });
});

function stop() {
  for (const ws of wss.clients) ws.terminate();
  server.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

// A deep accept queue, as for the Python servers: connect storms are part of the test.
server.listen({ host, port, backlog: 4096 });
