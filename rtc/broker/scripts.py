"""The Lua scripts that make Redis the single point of truth for seq, history and membership.

Each script touches only keys of one room (one hash tag), so it is atomic on a single
server and valid on Redis Cluster; SEQUENCE takes several rooms, which a cluster broker
only gives it when they share a hash slot. The scripts that fan out publish to the room's
channel, which carries the same hash tag: with PUBLISH on one server, with SPUBLISH (legal
in a script whose keys share the channel's slot) on Redis Cluster. `texts` fills that in.

Redis checks `maxmemory` once per script, at its first write, and only if that write may
grow memory (HSET, HINCRBY; not DEL or EXPIRE). So each script that adds data writes such
a command first, and a full Redis (`noeviction`) refuses the whole script; one script that
started may still pass the limit by what it writes (a SEQUENCE batch).
"""

from __future__ import annotations

from string import Template

__all__ = ["texts"]

# Ensures the room has an epoch and returns it. A room whose meta is gone (never used,
# expired, or Redis lost its data) gets a fresh epoch and an empty history, so a resume
# can tell "recovered" from "gap". HSET before DEL: the first write is the maxmemory check.
_ENSURE_EPOCH = """
local function ensure_epoch(meta, log)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
    redis.call('DEL', log)
  end
  return epoch
end
"""

# KEYS: meta, log   ARGV: ttl. Returns {seq, epoch}.
_OPEN_ROOM = (
    _ENSURE_EPOCH
    + """
local epoch = ensure_epoch(KEYS[1], KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {tonumber(redis.call('HGET', KEYS[1], 'seq')), epoch}
"""
)

# Sequences the batches of several rooms (or inboxes) in one call: on one server a busy
# worker's whole turn, on a cluster the rooms of one hash slot.
# KEYS: per room: meta, log, its dedup keys.   ARGV: maxlen, ttl, rooms, then per room:
# key count, channel, n, then per message head, tail, ts, and the index of its dedup key
# among the room's keys (0: none). Per room: HINCRBY, XADD and one (S)PUBLISH of all its
# new records, `<seq> <ts> <frame>` joined by newlines. A retried publish (same dedup key)
# gets its earlier seq back and is not published twice. Returns {epoch, seq...} per room.
_SEQUENCE = (
    _ENSURE_EPOCH
    + """
local maxlen, ttl, rooms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
local k, a = 1, 4
for _ = 1, rooms do
  local nkeys, channel, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local meta, log = KEYS[k], KEYS[k + 1]
  local result = {ensure_epoch(meta, log)}
  local records = {}
  for _ = 1, n do
    local head, tail, ts, d = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
    a = a + 4
    local seq = false
    if d > 0 then seq = redis.call('GET', KEYS[k + d - 1]) end
    if seq then
      seq = tonumber(seq)
    else
      seq = redis.call('HINCRBY', meta, 'seq', 1)
      local frame = head .. seq .. tail
      redis.call('XADD', log, 'MAXLEN', maxlen, seq .. '-1', 'f', frame)
      records[#records + 1] = seq .. ' ' .. ts .. ' ' .. frame
      if d > 0 then redis.call('SET', KEYS[k + d - 1], seq, 'EX', 120) end
    end
    result[#result + 1] = seq
  end
  if #records > 0 then redis.call('$publish', channel, table.concat(records, '\\n')) end
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', log, ttl)
  out[#out + 1] = result
  k = k + nkeys
end
return out
"""
)

# Now in milliseconds, from the server's clock (every worker sees the same time).
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: my members hash, slots set, presence hash, pending-leaves zset
# ARGV: user, slot, ttl, members-key prefix, channel, presence frame, presence max
# Counts the connection; publishes a presence `join` when the user was not present
# anywhere in the cluster and the room is small enough. Returns the member estimate. The
# room's membership keys all live `ttl` seconds unless refreshed: presence never outlives
# the membership it stands for.
_JOIN = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[1])
local estimate = 0
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  estimate = estimate + redis.call('HLEN', ARGV[4] .. slot)
end
if redis.call('HSETNX', KEYS[3], ARGV[1], 1) == 1 and estimate <= tonumber(ARGV[7]) then
  redis.call('$publish', ARGV[5], '0 0 ' .. ARGV[6])
end
redis.call('EXPIRE', KEYS[3], ARGV[3])
return estimate
"""

# KEYS: my members hash, pending-leaves zset   ARGV: user, delay (ms), ttl
# Returns 1 when this slot has no more connections of the user in the room; its leave is
# then pending, due after the delay (so a drain or a resume does not flap presence). Any
# worker's SWEEP announces it once due, even if this one is gone by then.
_LEAVE = (
    _NOW_MS
    + """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"""
)

# KEYS: slots set, presence hash, pending-leaves zset
# ARGV: members-key prefix, channel, presence max, leave frame head, leave frame tail
# Announces `leave` for every present user with no connection left on any live slot whose
# leave is due: pending leaves past their delay, and every user of a slot whose members
# hash expired (the worker died: nobody else would ever say it). Prunes dead slots.
# Returns the users announced gone.
_SWEEP = (
    _NOW_MS
    + """
local live, estimate, dead = {}, 0, false
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. slot
  local count = redis.call('HLEN', key)
  if count == 0 then
    redis.call('SREM', KEYS[1], slot)
    dead = true
  else
    live[#live + 1] = key
    estimate = estimate + count
  end
end
local candidates
if dead then
  candidates = redis.call('HKEYS', KEYS[2])
else
  candidates = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
end
local gone = {}
for _, user in ipairs(candidates) do
  local here = false
  for _, key in ipairs(live) do
    if redis.call('HEXISTS', key, user) == 1 then
      here = true
      break
    end
  end
  local due = redis.call('ZSCORE', KEYS[3], user)
  if here then
    redis.call('ZREM', KEYS[3], user)
  elseif not due or tonumber(due) <= now then
    redis.call('ZREM', KEYS[3], user)
    if redis.call('HDEL', KEYS[2], user) == 1 then
      gone[#gone + 1] = user
      if estimate < tonumber(ARGV[3]) then
        redis.call('$publish', ARGV[2], '0 0 ' .. ARGV[4] .. cjson.encode(user) .. ARGV[5])
      end
    end
  end
end
return gone
"""
)

# KEYS: slots set   ARGV: members-key prefix, limit
# Distinct users with a connection in the room on a live slot, sorted. Dead slots are left
# for SWEEP to prune, which announces their users' leaves.
_MEMBERS = """
local seen = {}
local users = {}
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, user in ipairs(redis.call('HKEYS', ARGV[1] .. slot)) do
    if not seen[user] then
      seen[user] = true
      users[#users + 1] = user
    end
  end
end
table.sort(users)
local count = #users
local limit = tonumber(ARGV[2])
local page = {count}
for i = 1, math.min(limit, count) do page[#page + 1] = users[i] end
return page
"""

# KEYS: my members hash, slots set, presence hash   ARGV: slot, ttl, then user, count pairs
# Renews this slot's membership of the room and puts back what Redis lost of it (a restart
# without persistence): users missing from the hash get this worker's count, and are
# present again without a `join` event (their members saw it before). A user already
# there keeps its count: JOIN and LEAVE keep it, and the other worker of this slot during a
# rolling restart counts into it too. Nothing lost, nothing written: a full Redis still
# renews the TTLs.
# Returns how many users were put back.
_RESTATE = """
local restated = 0
for i = 3, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    restated = restated + 1
  end
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[3], ARGV[i], 1)
  end
end
if #ARGV > 2 and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  redis.call('SADD', KEYS[2], ARGV[1])
end
for _, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[2])
end
return restated
"""


_SOURCES = {
    "OPEN_ROOM": _OPEN_ROOM,
    "SEQUENCE": _SEQUENCE,
    "JOIN": _JOIN,
    "LEAVE": _LEAVE,
    "SWEEP": _SWEEP,
    "MEMBERS": _MEMBERS,
    "RESTATE": _RESTATE,
}


def texts(publish: str) -> dict[str, str]:
    """Every script by name, fanning out with `publish`: PUBLISH, or SPUBLISH on a cluster."""
    return {name: Template(source).substitute(publish=publish) for name, source in _SOURCES.items()}
