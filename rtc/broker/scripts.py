"""The Lua scripts that make Redis the single point of truth for seq, history and membership.

Each script touches only keys of one room (one hash tag), so it is atomic on a single
server and valid on Redis Cluster. Each script that adds data makes a write that may grow
memory (HSET, HINCRBY) its first write, so a full Redis (`maxmemory`, `noeviction`)
refuses the whole script instead of letting it run past the limit. The scripts that fan
out publish to the room's channel, which carries the same hash tag: with PUBLISH on one
server, with SPUBLISH (legal in a script whose keys share the channel's slot) on Redis
Cluster. `texts` fills that in.
"""

from __future__ import annotations

from string import Template

__all__ = ["texts"]

# Ensures the room has an epoch, returns {seq, epoch}. A room whose meta is gone (never
# used, expired, or Redis lost its data) gets a fresh epoch and an empty history, so a
# resume can tell "recovered" from "gap". HSET comes before DEL on purpose: Redis checks
# `maxmemory` only at a script's first write, and only if that write is one that may grow
# memory (DEL is not); a script that deleted first would then write past a full Redis.
_ENSURE_EPOCH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
"""

# KEYS: meta, log   ARGV: ttl
_OPEN_ROOM = (
    _ENSURE_EPOCH
    + """
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {tonumber(redis.call('HGET', KEYS[1], 'seq')), epoch}
"""
)

# KEYS: meta, log, dedup keys...   ARGV: channel, maxlen, ttl, n, then per message
# head, tail, ts, dedup key index (0: none). Sequences a batch: HINCRBY, XADD and one
# (S)PUBLISH of all new records, `<seq> <ts> <frame>` joined by newlines. A retried publish
# (same dedup key) gets its earlier seq back and is not published twice.
_SEQUENCE = (
    _ENSURE_EPOCH
    + """
local channel, maxlen, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local result = {epoch}
local records = {}
for i = 0, n - 1 do
  local head, tail, ts, d = ARGV[5 + i * 4], ARGV[6 + i * 4], ARGV[7 + i * 4], tonumber(ARGV[8 + i * 4])
  local seq = false
  if d > 0 then seq = redis.call('GET', KEYS[d]) end
  if seq then
    seq = tonumber(seq)
  else
    seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    local frame = head .. seq .. tail
    redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, seq .. '-1', 'f', frame)
    records[#records + 1] = seq .. ' ' .. ts .. ' ' .. frame
    if d > 0 then redis.call('SET', KEYS[d], seq, 'EX', 120) end
  end
  result[#result + 1] = seq
end
if #records > 0 then redis.call('$publish', channel, table.concat(records, '\\n')) end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return result
"""
)

# KEYS: my members hash, slots set, presence hash
# ARGV: user, slot, ttl, members-key prefix, channel, presence frame, presence max,
# room-state ttl. Counts the connection; publishes a presence `join` when the user was not
# present anywhere in the cluster and the room is small enough. Returns the member estimate.
# The slots set and presence hash live `room-state ttl` past the last join or refresh.
_JOIN = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[8])
local estimate = 0
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  estimate = estimate + redis.call('HLEN', ARGV[4] .. slot)
end
local new = redis.call('HSETNX', KEYS[3], ARGV[1], 1) == 1
redis.call('EXPIRE', KEYS[3], ARGV[8])
if new then
  if estimate <= tonumber(ARGV[7]) then
    redis.call('$publish', ARGV[5], '0 0 ' .. ARGV[6])
  end
end
return estimate
"""

# KEYS: my members hash   ARGV: user
# Returns 1 when this slot has no more connections of the user in the room.
_LEAVE = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: slots set, presence hash   ARGV: user, members-key prefix, channel, frame, max
# Run a few seconds after a user's last local connection left: publishes the presence
# `leave` only if no slot has the user any more (so a drain or resume does not flap).
_PRESENCE_GONE = """
local estimate = 0
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. slot
  if redis.call('HEXISTS', key, ARGV[1]) == 1 then return 0 end
  estimate = estimate + redis.call('HLEN', key)
end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 and estimate < tonumber(ARGV[5]) then
  redis.call('$publish', ARGV[3], '0 0 ' .. ARGV[4])
  return 1
end
return 0
"""

# KEYS: slots set   ARGV: members-key prefix, limit
# Distinct users with a connection in the room anywhere, sorted; prunes dead slots.
_MEMBERS = """
local seen = {}
local users = {}
for _, slot in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. slot
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], slot)
  else
    for _, user in ipairs(redis.call('HKEYS', key)) do
      if not seen[user] then
        seen[user] = true
        users[#users + 1] = user
      end
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


_SOURCES = {
    "OPEN_ROOM": _OPEN_ROOM,
    "SEQUENCE": _SEQUENCE,
    "JOIN": _JOIN,
    "LEAVE": _LEAVE,
    "PRESENCE_GONE": _PRESENCE_GONE,
    "MEMBERS": _MEMBERS,
}


def texts(publish: str) -> dict[str, str]:
    """Every script by name, fanning out with `publish`: PUBLISH, or SPUBLISH on a cluster."""
    return {name: Template(source).substitute(publish=publish) for name, source in _SOURCES.items()}
