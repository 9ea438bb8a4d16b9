"""The Lua scripts that keep the shared slot state in Redis, and their keys.

Every script gets the same KEYS (all under one hash tag, so a Redis Cluster
keeps them on one shard) and ARGV[1] = the prefix of the owners' pub/sub
channels. Redis ``TIME`` is the only clock. Each script checks all of its
arguments before its first write (scripts have no rollback) and every loop is
bounded.

Keys (``P`` is the prefix, ``{pd}`` by default):

- ``P:total``, ``P:ext``, ``P:gen``, ``P:drain``, ``P:meta``, ``P:mark``,
  ``P:seen``: HASHes server -> slots, busy slots held by other clients,
  generation, draining flag, opaque metadata, lease number of the last
  applied reading, time of the last reading (ms).
- ``P:seq``: the one counter; lease numbers and waiter order both come from it.
- ``P:lease`` (HASH lease -> ``server|gen|num|owner|t|waited|model``),
  ``P:leases`` (ZSET lease -> expiry ms), ``P:lx`` (ZSET, lex-ordered
  ``server|gen|num``: counts a server's live leases, and those older than a
  reading's mark, in O(log N)).
- ``P:w`` (HASH waiter -> ``owner|seq|deadline|ttl|t|cand,cand,...|model``),
  ``P:q`` (ZSET waiter -> seq: the global FIFO), ``P:wd`` (ZSET waiter ->
  deadline ms), ``P:wx`` (ZSET, lex-ordered ``server|seq|waiter`` for every
  candidate of every waiter: the oldest waiter that can use a server is one
  ZRANGEBYLEX away), ``P:ox`` (ZSET, lex ``owner|waiter``).
- ``P:owners`` (ZSET owner -> heartbeat expiry ms), ``P:epoch`` (a token set
  once per Redis dataset: a new one means Redis lost its data).
- ``P:place`` (HASH model -> ``owner|expiry ms``: the one balancer placing a
  model of router-mode upstreams now), ``P:placed`` (HASH server -> ms when a
  model was last placed on it: not evicted before the minimum residency),
  ``P:placedx`` (ZSET server -> ms when its ``P:placed`` record lapses: the
  placement time plus the longer of the claim's residency and hold). Lapsed
  records are dropped by PLACE (at most DROP_BUDGET a call) and REAP (at most
  its limit), a server's record by UNREGISTER and when it is the victim of a
  placement: the two keys hold no more entries than servers placed on within
  a residency. ``P:placeq`` (ZSET model -> expiry ms of its ``P:place``
  claim): expired claims are dropped the same way (a balancer that died
  mid-load, or a claim held on after its load, leaves none behind).

Invariant kept by every script: a server with a free slot is listed by no
live waiter (every event that frees a slot hands it to the oldest waiter
that lists the server, in the same script). So ACQUIRE may take the first
free candidate without overtaking an older compatible waiter.
"""

from __future__ import annotations

from paddler.sharedstate.client import Script

KEY_NAMES = (
    "total",
    "ext",
    "gen",
    "drain",
    "meta",
    "mark",
    "seen",
    "seq",
    "leases",
    "lease",
    "lx",
    "q",
    "w",
    "wd",
    "wx",
    "owners",
    "ox",
    "epoch",
    "place",
    "placed",
    "placedx",
    "placeq",
)

# Limits, checked by the Python API and again by the scripts.
MAX_ID = 128
MAX_SLOTS = 4096
MAX_SERVERS = 4096
MAX_CANDIDATES = 256
MAX_MODEL = 256
MAX_META = 4096
MAX_TTL_MS = 86_400_000
MIN_TTL_MS = 50
MAX_WAITERS = 1_000_000
MAX_BATCH = 4096
MAX_REAP = 10_000
#: Dead or expired waiters one hand-off may drop before it stops (REAP does the rest).
DROP_BUDGET = 64

PRELUDE = r"""
local K_TOTAL, K_EXT, K_GEN, K_DRAIN, K_META, K_MARK, K_SEEN, K_SEQ,
      K_LEASES, K_LEASE, K_LX, K_Q, K_W, K_WD, K_WX, K_OWNERS, K_OX, K_EPOCH,
      K_PLACE, K_PLACED, K_PLACEDX, K_PLACEQ = unpack(KEYS)
local CHANNEL = ARGV[1]
local MAX_ID, MAX_SLOTS, MAX_SERVERS, MAX_CANDIDATES = %(MAX_ID)d, %(MAX_SLOTS)d, %(MAX_SERVERS)d, %(MAX_CANDIDATES)d
local MAX_MODEL, MAX_META, MAX_TTL_MS, MIN_TTL_MS = %(MAX_MODEL)d, %(MAX_META)d, %(MAX_TTL_MS)d, %(MIN_TTL_MS)d
local MAX_WAITERS, MAX_BATCH, MAX_REAP, DROP_BUDGET = %(MAX_WAITERS)d, %(MAX_BATCH)d, %(MAX_REAP)d, %(DROP_BUDGET)d

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n) return string.format('%%d', n) end
local function pad(n, w) return string.format('%%0' .. w .. 'd', n) end

local function valid_id(s)
  return type(s) == 'string' and #s >= 1 and #s <= MAX_ID and string.find(s, '^[%%w%%._:@/+=%%-]+$') ~= nil
end

local function int_arg(v, lo, hi)
  if type(v) ~= 'string' or #v > 17 or not string.find(v, '^%%-?%%d+$') then return nil end
  local n = tonumber(v)
  if n == nil or n < lo or n > hi then return nil end
  return n
end

local function bad(what) return redis.error_reply('PDARG ' .. what) end

-- the first n '|'-separated fields of s, then the rest (the model, which may hold '|')
local function split(s, n)
  local out, pos = {}, 1
  for i = 1, n do
    local j = string.find(s, '|', pos, true)
    if not j then out[i] = string.sub(s, pos); return out end
    out[i] = string.sub(s, pos, j - 1)
    pos = j + 1
  end
  out[n + 1] = string.sub(s, pos)
  return out
end

-- forget s's placement record (the time a model was placed on it)
local function unplace(s)
  redis.call('HDEL', K_PLACED, s)
  redis.call('ZREM', K_PLACEDX, s)
end

-- drop at most n placement records that lapsed by now; -> how many
local function prune_placed(now, n)
  local lapsed = redis.call('ZRANGEBYSCORE', K_PLACEDX, '-inf', now, 'LIMIT', 0, n)
  for _, s in ipairs(lapsed) do unplace(s) end
  local claims = redis.call('ZRANGEBYSCORE', K_PLACEQ, '-inf', now, 'LIMIT', 0, n)
  for _, m in ipairs(claims) do
    redis.call('HDEL', K_PLACE, m)
    redis.call('ZREM', K_PLACEQ, m)
  end
  return #lapsed + #claims
end

local function gen_of(s) return tonumber(redis.call('HGET', K_GEN, s) or '0') end

local function lx_prefix(s, g) return s .. '|' .. pad(g, 10) .. '|' end

local function ours(s, g)
  return redis.call('ZLEXCOUNT', K_LX, '[' .. lx_prefix(s, g), '(' .. s .. '|' .. pad(g, 10) .. '}')
end

-- free slots on s (0 when unknown or draining) and its generation
local function free_slots(s)
  local total = redis.call('HGET', K_TOTAL, s)
  if not total then return 0, nil end
  local g = gen_of(s)
  if redis.call('HEXISTS', K_DRAIN, s) == 1 then return 0, g end
  local f = tonumber(total) - tonumber(redis.call('HGET', K_EXT, s) or '0') - ours(s, g)
  if f < 0 then f = 0 end
  return f, g
end

local function heartbeat(owner, expiry)
  local cur = redis.call('ZSCORE', K_OWNERS, owner)
  if not cur or tonumber(cur) < expiry then redis.call('ZADD', K_OWNERS, expiry, owner) end
end

local function owner_alive(owner, now)
  local cur = redis.call('ZSCORE', K_OWNERS, owner)
  return cur ~= false and cur ~= nil and tonumber(cur) >= now
end

-- lease record: server|gen|num|owner|t|waited|model
local function parse_lease(rec)
  local f = split(rec, 6)
  return f[1], tonumber(f[2]), tonumber(f[3]), f[4], tonumber(f[5]), tonumber(f[6]), f[7] or ''
end

local function grant(s, g, id, owner, model, ttl, now, waited)
  local n = redis.call('INCR', K_SEQ)
  redis.call('HSET', K_LEASE, id, s .. '|' .. int(g) .. '|' .. int(n) .. '|' .. owner .. '|' .. int(now) .. '|' .. int(waited) .. '|' .. model)
  redis.call('ZADD', K_LEASES, now + ttl, id)
  redis.call('ZADD', K_LX, 0, lx_prefix(s, g) .. pad(n, 16))
  return n
end

-- waiter record: owner|seq|deadline|ttl|t|cand,cand|model
local function drop_waiter(id, rec)
  local w = split(rec, 6)
  local sq = pad(tonumber(w[2]), 16)
  for c in string.gmatch(w[6] or '', '[^,]+') do
    redis.call('ZREM', K_WX, c .. '|' .. sq .. '|' .. id)
  end
  redis.call('HDEL', K_W, id)
  redis.call('ZREM', K_Q, id)
  redis.call('ZREM', K_WD, id)
  redis.call('ZREM', K_OX, w[1] .. '|' .. id)
  return w
end

-- give free slots of s to the oldest live waiters that list s; drop dead ones met on the way
local function handoff(s, now)
  local granted, budget = 0, DROP_BUDGET
  while budget > 0 do
    local f, g = free_slots(s)
    if f <= 0 then break end
    local first = redis.call('ZRANGEBYLEX', K_WX, '[' .. s .. '|', '(' .. s .. '}', 'LIMIT', 0, 1)[1]
    if not first then break end
    local wid = string.sub(first, #s + 19)
    local rec = redis.call('HGET', K_W, wid)
    if not rec then
      redis.call('ZREM', K_WX, first)
      budget = budget - 1
    else
      local w = drop_waiter(wid, rec)
      local owner = w[1]
      if tonumber(w[3]) <= now or not owner_alive(owner, now) then
        budget = budget - 1
      else
        local waited = now - tonumber(w[5])
        local n = grant(s, g, wid, owner, w[7] or '', tonumber(w[4]), now, waited)
        redis.call('PUBLISH', CHANNEL .. owner, wid .. '|' .. s .. '|' .. int(g) .. '|' .. int(n) .. '|' .. int(waited))
        granted = granted + 1
      end
    end
  end
  return granted
end

local function drop_lease(id, rec)
  local s, g, n = parse_lease(rec)
  redis.call('HDEL', K_LEASE, id)
  redis.call('ZREM', K_LEASES, id)
  redis.call('ZREM', K_LX, lx_prefix(s, g) .. pad(n, 16))
  return s, g
end

-- 1: released (slot handed on or freed); 3: stale (older generation or unknown server): no slot added
-- running: the server goes on with the request (its client left): the slot counts as external load
-- until the next reading, instead of being handed on
local function release_lease(id, rec, now, running)
  local s, g = drop_lease(id, rec)
  if redis.call('HEXISTS', K_TOTAL, s) == 1 and gen_of(s) == g then
    if running then redis.call('HINCRBY', K_EXT, s, 1) else handoff(s, now) end
    return 1
  end
  return 3
end

local function lease_reply(rec)
  local s, g, n, o, t, waited = parse_lease(rec)
  return {1, s, g, n, waited}
end
"""

PRELUDE = PRELUDE % {
    name: value
    for name, value in globals().items()
    if name.isupper() and isinstance(value, int)
}


ACQUIRE = r"""
-- ARGV: channel, owner, id, lease ttl ms, wait ms (0: do not wait), max waiters, model, candidates...
-- -> {1, server, gen, num, waited} | {2, seq, position} | {3} no slot, not waiting | {4} buffer full
local owner, id, model = ARGV[2], ARGV[3], ARGV[7]
if not valid_id(owner) then return bad('owner id') end
if not valid_id(id) then return bad('request id') end
local ttl = int_arg(ARGV[4], MIN_TTL_MS, MAX_TTL_MS)
if not ttl then return bad('lease ttl') end
local wait = int_arg(ARGV[5], 0, MAX_TTL_MS)
if not wait then return bad('wait time') end
local max_waiting = int_arg(ARGV[6], 0, MAX_WAITERS)
if not max_waiting then return bad('max waiting') end
if type(model) ~= 'string' or #model > MAX_MODEL then return bad('model') end
if #ARGV - 7 > MAX_CANDIDATES then return bad('too many candidates') end
local cands, seen = {}, {}
for i = 8, #ARGV do
  local c = ARGV[i]
  if not valid_id(c) then return bad('candidate id') end
  if seen[c] then return bad('duplicate candidate') end
  seen[c] = true
  cands[#cands + 1] = c
end
local now = now_ms()

local rec = redis.call('HGET', K_LEASE, id)
if rec then
  local s, g, n, o = parse_lease(rec)
  if o ~= owner then return redis.error_reply('PDINUSE the request id is a lease of another owner') end
  return lease_reply(rec)
end
local wrec = redis.call('HGET', K_W, id)
if wrec then
  local w = split(wrec, 6)
  if w[1] ~= owner then return redis.error_reply('PDINUSE the request id is a waiter of another owner') end
  heartbeat(owner, now + ttl)
  -- the same waiter again: take the new candidates, keep its place in the order
  local sq = pad(tonumber(w[2]), 16)
  local joined = table.concat(cands, ',')
  if joined ~= w[6] then
    for c in string.gmatch(w[6], '[^,]+') do redis.call('ZREM', K_WX, c .. '|' .. sq .. '|' .. id) end
    for _, c in ipairs(cands) do redis.call('ZADD', K_WX, 0, c .. '|' .. sq .. '|' .. id) end
    redis.call('HSET', K_W, id, w[1] .. '|' .. w[2] .. '|' .. w[3] .. '|' .. w[4] .. '|' .. w[5] .. '|' .. joined .. '|' .. (w[7] or ''))
  end
  for _, c in ipairs(cands) do
    if free_slots(c) > 0 then
      handoff(c, now)
      local l = redis.call('HGET', K_LEASE, id)
      if l then return lease_reply(l) end
    end
  end
  return {2, tonumber(w[2]), redis.call('ZRANK', K_Q, id)}
end

heartbeat(owner, now + ttl)
for _, c in ipairs(cands) do
  if free_slots(c) > 0 then
    handoff(c, now)  -- an older waiter that lists c goes first
    local f, g = free_slots(c)
    if f > 0 then
      local n = grant(c, g, id, owner, model, ttl, now, 0)
      return {1, c, g, n, 0}
    end
  end
end
if wait == 0 or max_waiting == 0 then return {3} end
if redis.call('ZCARD', K_Q) >= max_waiting then return {4} end
local seq = redis.call('INCR', K_SEQ)
local sq = pad(seq, 16)
redis.call('HSET', K_W, id, owner .. '|' .. int(seq) .. '|' .. int(now + wait) .. '|' .. int(ttl) .. '|' .. int(now) .. '|' .. table.concat(cands, ',') .. '|' .. model)
redis.call('ZADD', K_Q, seq, id)
redis.call('ZADD', K_WD, now + wait, id)
redis.call('ZADD', K_OX, 0, owner .. '|' .. id)
for _, c in ipairs(cands) do redis.call('ZADD', K_WX, 0, c .. '|' .. sq .. '|' .. id) end
return {2, seq, redis.call('ZRANK', K_Q, id)}
"""

RELEASE = r"""
-- ARGV: channel, id[, running] -> 1 lease released, 3 stale lease dropped (no slot added), 2 waiter removed, 0 unknown
-- running '1': the client left but the server goes on with the request: the lease ends, and its slot
-- counts as external load (no hand-off) until the next reading says what the server runs.
local id = ARGV[2]
if not valid_id(id) then return bad('request id') end
local now = now_ms()
local rec = redis.call('HGET', K_LEASE, id)
if rec then return release_lease(id, rec, now, ARGV[3] == '1') end
local w = redis.call('HGET', K_W, id)
if w then
  drop_waiter(id, w)
  return 2
end
return 0
"""

RENEW = r"""
-- ARGV: channel, owner, ttl ms, epoch, lease ids... -> {0} Redis lost its data (nothing written) | {1, lost ids...}
local owner = ARGV[2]
if not valid_id(owner) then return bad('owner id') end
local ttl = int_arg(ARGV[3], MIN_TTL_MS, MAX_TTL_MS)
if not ttl then return bad('lease ttl') end
if #ARGV - 4 > MAX_BATCH then return bad('too many leases') end
for i = 5, #ARGV do if not valid_id(ARGV[i]) then return bad('lease id') end end
if redis.call('GET', K_EPOCH) ~= ARGV[4] then return {0} end
local now = now_ms()
redis.call('ZADD', K_OWNERS, now + ttl, owner)
local out = {1}
for i = 5, #ARGV do
  local id = ARGV[i]
  local rec = redis.call('HGET', K_LEASE, id)
  local ok = false
  if rec then
    local s, g, n, o = parse_lease(rec)
    if o == owner then
      redis.call('ZADD', K_LEASES, 'XX', now + ttl, id)
      ok = true
    end
  end
  if not ok then out[#out + 1] = id end
end
return out
"""

HELLO = r"""
-- ARGV: channel, owner, ttl ms, a new epoch token -> the epoch in force (the new one if Redis had none)
local owner, token = ARGV[2], ARGV[4]
if not valid_id(owner) then return bad('owner id') end
local ttl = int_arg(ARGV[3], MIN_TTL_MS, MAX_TTL_MS)
if not ttl then return bad('lease ttl') end
if not valid_id(token) then return bad('epoch token') end
local now = now_ms()
redis.call('SETNX', K_EPOCH, token)
heartbeat(owner, now + ttl)
return redis.call('GET', K_EPOCH)
"""

POLL = r"""
-- ARGV: channel, owner, epoch, ids... -> {0} Redis lost its data | {1, state per id...}, a state being
--   {1, server, gen, num, waited} a lease of owner | {2, seq, position} waiting | {0} gone
local owner = ARGV[2]
if not valid_id(owner) then return bad('owner id') end
if #ARGV - 3 > MAX_BATCH then return bad('too many ids') end
for i = 4, #ARGV do if not valid_id(ARGV[i]) then return bad('id') end end
if redis.call('GET', K_EPOCH) ~= ARGV[3] then return {0} end
local out = {1}
for i = 4, #ARGV do
  local id = ARGV[i]
  local rec = redis.call('HGET', K_LEASE, id)
  local w = redis.call('HGET', K_W, id)
  if rec and select(4, parse_lease(rec)) == owner then
    out[#out + 1] = lease_reply(rec)
  elseif w and split(w, 2)[1] == owner then
    out[#out + 1] = {2, tonumber(split(w, 2)[2]), redis.call('ZRANK', K_Q, id)}
  else
    out[#out + 1] = {0}
  end
end
return out
"""

READING = r"""
-- ARGV: channel, server, total, busy ('' unknown), mark, gen ('' any)
-- -> {1, gen, external} applied | {0} unknown server | {2, gen} other generation | {3, gen} stale mark
local s = ARGV[2]
if not valid_id(s) then return bad('server id') end
local total = int_arg(ARGV[3], 0, MAX_SLOTS)
if not total then return bad('total slots') end
local busy = nil
if ARGV[4] ~= '' then
  busy = int_arg(ARGV[4], 0, MAX_SLOTS)
  if not busy then return bad('busy slots') end
end
local mark = int_arg(ARGV[5], 0, 9007199254740991)
if not mark then return bad('mark') end
local want = nil
if ARGV[6] ~= '' then
  want = int_arg(ARGV[6], 1, 1000000000)
  if not want then return bad('generation') end
end
if redis.call('HEXISTS', K_TOTAL, s) == 0 then return {0} end
local g = gen_of(s)
if want and want ~= g then return {2, g} end
if mark > tonumber(redis.call('GET', K_SEQ) or '0') then return {3, g} end
local last = redis.call('HGET', K_MARK, s)
if last and mark < tonumber(last) then return {3, g} end
local ext = 0
if busy then
  if busy > total then busy = total end
  -- leases numbered up to the mark were out when the probe was sent: those still open were running
  local at_probe = redis.call('ZLEXCOUNT', K_LX, '[' .. lx_prefix(s, g), '[' .. lx_prefix(s, g) .. pad(mark, 16))
  ext = busy - at_probe
  if ext < 0 then ext = 0 end
end
local now = now_ms()
redis.call('HSET', K_TOTAL, s, total)
redis.call('HSET', K_EXT, s, ext)
redis.call('HSET', K_MARK, s, int(mark))
redis.call('HSET', K_SEEN, s, int(now))
handoff(s, now)
return {1, g, ext}
"""

REGISTER = r"""
-- ARGV: channel, server, total, meta, mode -> {gen, 0 known | 1 new | 2 new generation}
-- mode 0: plain; 1: the server restarted (new generation); 2: re-created after Redis lost its data:
-- a server new to Redis then counts as fully busy until its next reading (in-flight leases of
-- other owners are not adopted yet)
local s, meta = ARGV[2], ARGV[4]
if not valid_id(s) then return bad('server id') end
local total = int_arg(ARGV[3], 0, MAX_SLOTS)
if not total then return bad('total slots') end
if type(meta) ~= 'string' or #meta > MAX_META then return bad('metadata') end
if ARGV[5] ~= '0' and ARGV[5] ~= '1' and ARGV[5] ~= '2' then return bad('registration mode') end
local exists = redis.call('HEXISTS', K_TOTAL, s) == 1
if not exists and redis.call('HLEN', K_TOTAL) >= MAX_SERVERS then return bad('too many servers') end
local now = now_ms()
local g, how = gen_of(s), 0
if not exists or ARGV[5] == '1' then
  -- a new generation: leases of older ones give no slot back when released
  g = g + 1
  how = exists and 2 or 1
  redis.call('HSET', K_GEN, s, g)
  redis.call('HSET', K_EXT, s, (ARGV[5] == '2' and not exists) and total or 0)
  redis.call('HDEL', K_MARK, s)
  if not exists then redis.call('HDEL', K_DRAIN, s) end
end
redis.call('HSET', K_TOTAL, s, total)
if meta ~= '' then redis.call('HSET', K_META, s, meta) end
handoff(s, now)
return {g, how}
"""

UNREGISTER = r"""
-- ARGV: channel, server -> 1 removed | 0 unknown (its generation is kept: leases on it stay stale)
local s = ARGV[2]
if not valid_id(s) then return bad('server id') end
unplace(s)
if redis.call('HEXISTS', K_TOTAL, s) == 0 then return 0 end
for _, k in ipairs({K_TOTAL, K_EXT, K_DRAIN, K_META, K_MARK, K_SEEN}) do redis.call('HDEL', k, s) end
return 1
"""

DRAIN = r"""
-- ARGV: channel, server, 1 drain | 0 undrain -> 1 done | 0 unknown server
local s = ARGV[2]
if not valid_id(s) then return bad('server id') end
if ARGV[3] ~= '0' and ARGV[3] ~= '1' then return bad('drain flag') end
if redis.call('HEXISTS', K_TOTAL, s) == 0 then return 0 end
if ARGV[3] == '1' then
  redis.call('HSET', K_DRAIN, s, 1)
else
  redis.call('HDEL', K_DRAIN, s)
  handoff(s, now_ms())
end
return 1
"""

ADOPT = r"""
-- ARGV: channel, owner, id, server, ttl ms, model: count a request already running on server as a lease
-- -> {1, server, gen, num, waited} | {0} unknown server
local owner, id, s, model = ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if not valid_id(owner) then return bad('owner id') end
if not valid_id(id) then return bad('request id') end
if not valid_id(s) then return bad('server id') end
local ttl = int_arg(ARGV[5], MIN_TTL_MS, MAX_TTL_MS)
if not ttl then return bad('lease ttl') end
if type(model) ~= 'string' or #model > MAX_MODEL then return bad('model') end
local now = now_ms()
local rec = redis.call('HGET', K_LEASE, id)
if rec then
  local ls, g, n, o = parse_lease(rec)
  if o ~= owner then return redis.error_reply('PDINUSE the request id is a lease of another owner') end
  redis.call('ZADD', K_LEASES, now + ttl, id)
  heartbeat(owner, now + ttl)
  return lease_reply(rec)
end
if redis.call('HEXISTS', K_TOTAL, s) == 0 then return {0} end
local w = redis.call('HGET', K_W, id)
if w then
  if split(w, 2)[1] ~= owner then return redis.error_reply('PDINUSE the request id is a waiter of another owner') end
  drop_waiter(id, w)
end
heartbeat(owner, now + ttl)
local g = gen_of(s)
local n = grant(s, g, id, owner, model, ttl, now, 0)
return {1, s, g, n, 0}
"""

REAP = r"""
-- ARGV: channel, limit -> {leases released, stale leases dropped, waiters past deadline, waiters of dead owners, owners removed, slots handed on by the sweep, lapsed placement records and expired claims dropped}
local limit = int_arg(ARGV[2], 1, MAX_REAP)
if not limit then return bad('limit') end
local now = now_ms()
local released, stale, expired, orphaned, gone, swept = 0, 0, 0, 0, 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)) do
  local rec = redis.call('HGET', K_LEASE, id)
  if rec then
    if release_lease(id, rec, now) == 1 then released = released + 1 else stale = stale + 1 end
  else
    redis.call('ZREM', K_LEASES, id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_WD, '-inf', now, 'LIMIT', 0, limit)) do
  local rec = redis.call('HGET', K_W, id)
  if rec then drop_waiter(id, rec) else redis.call('ZREM', K_WD, id) end
  expired = expired + 1
end
for _, o in ipairs(redis.call('ZRANGEBYSCORE', K_OWNERS, '-inf', '(' .. int(now), 'LIMIT', 0, limit)) do
  local members = redis.call('ZRANGEBYLEX', K_OX, '[' .. o .. '|', '(' .. o .. '}', 'LIMIT', 0, limit)
  for _, m in ipairs(members) do
    local wid = string.sub(m, #o + 2)
    local rec = redis.call('HGET', K_W, wid)
    if rec then drop_waiter(wid, rec); orphaned = orphaned + 1 else redis.call('ZREM', K_OX, m) end
  end
  if #members < limit then
    redis.call('ZREM', K_OWNERS, o)
    gone = gone + 1
  end
end
-- safety net for the invariant: each server that some waiter lists, once
local cursor, visits = '-', 0
while visits < MAX_SERVERS do
  local first = redis.call('ZRANGEBYLEX', K_WX, cursor, '+', 'LIMIT', 0, 1)[1]
  if not first then break end
  local s = string.sub(first, 1, string.find(first, '|', 1, true) - 1)
  if free_slots(s) > 0 then swept = swept + handoff(s, now) end
  cursor = '[' .. s .. '}'
  visits = visits + 1
end
return {released, stale, expired, orphaned, gone, swept, prune_placed(now, limit)}
"""

SNAPSHOT = r"""
-- ARGV: channel -> {{now, seq, waiting, oldest enqueue ms (-1: none), leases, owners alive, epoch,
--                    {owner ids alive}},
--                   {server, total, external, ours, draining, gen, seen ms, mark, waiters listing it, meta}...}
local now = now_ms()
local oldest = -1
local head = redis.call('ZRANGE', K_Q, 0, 0)[1]
if head then
  local rec = redis.call('HGET', K_W, head)
  if rec then oldest = tonumber(split(rec, 6)[5]) end
end
local out = {{now, tonumber(redis.call('GET', K_SEQ) or '0'), redis.call('ZCARD', K_Q), oldest,
             redis.call('ZCARD', K_LEASES), redis.call('ZCOUNT', K_OWNERS, now, '+inf'),
             redis.call('GET', K_EPOCH) or '', redis.call('ZRANGEBYSCORE', K_OWNERS, now, '+inf', 'LIMIT', 0, 1024)}}
local function hash(key)
  local flat, t = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local total, ext, gens, drain, seen, mark, meta =
  hash(K_TOTAL), hash(K_EXT), hash(K_GEN), hash(K_DRAIN), hash(K_SEEN), hash(K_MARK), hash(K_META)
for s, t in pairs(total) do
  local g = tonumber(gens[s] or '0')
  out[#out + 1] = {
    s, tonumber(t), tonumber(ext[s] or '0'), ours(s, g), drain[s] and 1 or 0, g,
    tonumber(seen[s] or '0'), tonumber(mark[s] or '0'),
    redis.call('ZLEXCOUNT', K_WX, '[' .. s .. '|', '(' .. s .. '}'), meta[s] or ''}
end
return out
"""


PLACE = r"""
-- ARGV: channel, owner, model, server, victim ('' none), hold ms, residency ms
-- -> 1 claimed (the caller loads model on server, evicting victim) | 0 refused: another owner
-- places the model now, or the victim was placed less than the residency ago, or is being placed
local owner, model, s, victim = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not valid_id(owner) then return bad('owner id') end
if type(model) ~= 'string' or #model < 1 or #model > MAX_MODEL then return bad('model') end
if not valid_id(s) then return bad('server id') end
if victim ~= '' and not valid_id(victim) then return bad('victim server id') end
local hold = int_arg(ARGV[6], MIN_TTL_MS, MAX_TTL_MS)
if hold == nil then return bad('hold') end
local residency = int_arg(ARGV[7], 0, MAX_TTL_MS)
if residency == nil then return bad('residency') end
local now = now_ms()
prune_placed(now, DROP_BUDGET)
local rec = redis.call('HGET', K_PLACE, model)
if rec then
  local holder, expiry = string.match(rec, '^(.*)|(%d+)$')
  if holder ~= owner and tonumber(expiry) > now then return 0 end
end
if victim ~= '' then
  local at = redis.call('HGET', K_PLACED, victim)
  if at and now - tonumber(at) < residency then return 0 end
end
redis.call('HSET', K_PLACE, model, owner .. '|' .. int(now + hold))
redis.call('ZADD', K_PLACEQ, int(now + hold), model)
if victim ~= '' then unplace(victim) end
redis.call('HSET', K_PLACED, s, int(now))
redis.call('ZADD', K_PLACEDX, int(now + math.max(residency, hold)), s)
return 1
"""

FINISH_PLACE = r"""
-- ARGV: channel, owner, model, hold ms (0: at once) -> 1 | 0 not this owner's claim
local owner, model = ARGV[2], ARGV[3]
if not valid_id(owner) then return bad('owner id') end
if type(model) ~= 'string' or #model < 1 or #model > MAX_MODEL then return bad('model') end
local hold = int_arg(ARGV[4], 0, MAX_TTL_MS)
if hold == nil then return bad('hold') end
local rec = redis.call('HGET', K_PLACE, model)
if not rec or string.match(rec, '^(.*)|%d+$') ~= owner then return 0 end
if hold == 0 then
  redis.call('HDEL', K_PLACE, model)
  redis.call('ZREM', K_PLACEQ, model)
else
  local expiry = now_ms() + hold
  redis.call('HSET', K_PLACE, model, owner .. '|' .. int(expiry))
  redis.call('ZADD', K_PLACEQ, int(expiry), model)
end
return 1
"""


def _script(name: str, body: str) -> Script:
    return Script(name, PRELUDE + body)


SCRIPTS: dict[str, Script] = {
    name.lower(): _script(name.lower(), body)
    for name, body in (
        ("ACQUIRE", ACQUIRE),
        ("RELEASE", RELEASE),
        ("RENEW", RENEW),
        ("HELLO", HELLO),
        ("POLL", POLL),
        ("READING", READING),
        ("REGISTER", REGISTER),
        ("UNREGISTER", UNREGISTER),
        ("DRAIN", DRAIN),
        ("ADOPT", ADOPT),
        ("REAP", REAP),
        ("SNAPSHOT", SNAPSHOT),
        ("PLACE", PLACE),
        ("FINISH_PLACE", FINISH_PLACE),
    )
}


def key_names(prefix: str = "{pd}") -> list[str]:
    """The KEYS every script gets, in order, for C{prefix} (which must hold one hash tag)."""
    return [f"{prefix}:{name}" for name in KEY_NAMES]
