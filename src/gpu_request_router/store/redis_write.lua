#!lua
-- One batch of the router's changes, all or nothing (RedisStore.write; see redis_store.py).
--
-- KEYS: none declared (the store is one Redis primary, not a cluster: every key of a prefix is
-- written here). ARGV[1] the key prefix, ARGV[2] this router's owner token, ARGV[3] the batch id,
-- ARGV[4] the batch as JSON (every number as a string, so that no value passes through Lua's
-- doubles and loses digits), ARGV[5] the epoch of this router's lease, ARGV[6] the lease in ms,
-- ARGV[7] the id of the last batch whose answer arrived ('' if none: its marker goes),
-- ARGV[8] the replica id of a router sharing the prefix ('' for the one owner of a prefix):
--   d  batches in doubt: {batch id, {{id, user, idempotency field|false, admission, charges}}}
--   c  creations: {id, fixed, state, status, user, created_at, model, priority,
--                  idempotency field|false, terminal, admission member, version,
--                  limits {requests per minute, max queued, max queued total, GPU-seconds per
--                  hour (each |false)}, sort key in the queue|false}
--   u  updates: {id, status, state, terminal, version}
--   cl claims (shared), of the requests dispatched in the batch that end it dispatching or
--      running: {id, {{gpu, MiB, limit, slots}...}, max concurrent|false, user,
--      GPU-seconds per hour|false, GPU-seconds charged, charge field|false}
--   t  audit entries: {id, seq, json}
--   ch charges: {field, at, gpu_seconds, request id}
--   o  overrides: {user, json|false}
--   pr {admissions cutoff, charges cutoff, retention cutoff|false, batch limit,
--       terminal statuses} | false
-- It answers {finished requests deleted, charges deleted, refusals as JSON}: a prune that
-- reached the batch limit in either runs again with the next write.
--
-- Routers sharing a prefix (ARGV[8] set) are checked against each other here, atomically: a
-- creation over its user's rate or queue limits, or whose user's GPU-seconds in the hour (every
-- router's) reached the hourly limit, or whose idempotency key another router took, is refused
-- (none of its changes is written); a dispatch whose GPUs would hold more than their
-- limit with every router's reservations (the ledger), or one another router holds for a
-- starving request (<prefix>:hold:<gpu>, set by the shared view), or whose user would exceed
-- max_concurrent or GPU-seconds per hour (every router's charges of the user in the hour,
-- <prefix>:gsu:<user>, and their running total <prefix>:gst:<user>), is written without its
-- reservation or charge and refused: its router queues it again.
-- Windows are timed by Redis's own clock (TIME), the same for every router.
--
-- Every check comes before the first write, so a refused batch writes nothing; the shebang
-- makes Redis refuse the whole script up front when it is out of memory.
local p, token, batch = ARGV[1], ARGV[2], ARGV[3]
local replica = ARGV[8]
local shared = replica ~= ''
local b = cjson.decode(ARGV[4])

-- Checks ------------------------------------------------------------------------------------

-- The fence. One owner: the lease is this router's, or lapsed with nobody having taken the
-- prefix since (the epoch is still its own: Redis was down past the lease). Shared: this
-- replica's lease is its own, or lapsed while it is still listed among the replicas (adopting
-- its requests delists it, for good). A lapsed lease is taken back below.
local lease_key = shared and (p .. ':replica:' .. replica) or (p .. ':owner')
local holder = redis.call('GET', lease_key)
if holder ~= token then
  local taken
  if shared then
    taken = holder or redis.call('HGET', p .. ':replicas', replica) ~= token
  else
    taken = holder or redis.call('GET', p .. ':epoch') ~= ARGV[5]
  end
  if taken then
    return redis.error_reply('FENCED this router no longer owns its part of the prefix ' .. p)
  end
end

-- A batch whose answer was lost (the connection broke) may have been written: the router
-- refused its creations (503), so they are taken back below. Their ids and keys count as free.
local undone, free_ids, free_keys = {}, {}, {}
for _, doubt in ipairs(b.d) do
  if redis.call('EXISTS', p .. ':batch:' .. doubt[1]) == 1 then
    table.insert(undone, doubt)
    for _, c in ipairs(doubt[2]) do
      free_ids[c[1]] = true
      if c[3] then free_keys[c[3]] = true end
    end
  end
end

-- refused: by id; dropped: refused creations (none of the request's changes is written)
local refusals, refused, dropped = {}, {}, {}
local function refuse(id, kind, message, retry_after, extra)
  local r = extra or {}
  r.id, r.kind, r.message, r.retry_after = id, kind, message, tostring(retry_after or 0)
  table.insert(refusals, r)
  refused[id] = true
end
local function refuse_creation(id, kind, message, retry_after, extra)
  local r = extra or {}
  r.creation = true
  refuse(id, kind, message, retry_after, r)
end

local now
-- hour_stored(p, user, now), the user's GPU-seconds in the hour as stored, is defined before
-- this script's first line (redis_store.py's _HOUR_STORED, which the shared view runs too).
-- When the user's hour will have room for ``excess`` more GPU-seconds: the oldest charges
-- leave it first (the first 1000 looked at; past them, when the 1000th leaves). 0: never.
local function frees_in(user, excess)
  local window = redis.call('ZRANGEBYSCORE', p .. ':gsu:' .. user, '(' .. (now - 3600), '+inf',
    'WITHSCORES', 'LIMIT', 0, 1000)
  local last = now
  for i = 1, #window, 2 do
    last = tonumber(window[i + 1])
    excess = excess - tonumber(redis.call('HGET', p .. ':charge_gs', window[i]) or 0)
    if excess <= 0 then break end
  end
  return math.max(last + 3600 - now, 0.001)
end
-- What waits counts the batch's own changes: creations add, requests leaving the queue free.
local rate_added, waiting_added, waiting_total_added = {}, {}, 0
if shared then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  for _, u in ipairs(b.u) do
    if u[2] ~= 'queued' and redis.call('SISMEMBER', p .. ':waiting', u[1]) == 1 then
      local user = redis.call('HGET', p .. ':req:' .. u[1], 'user')
      waiting_added[user] = (waiting_added[user] or 0) - 1
      waiting_total_added = waiting_total_added - 1
    end
  end
end

for _, c in ipairs(b.c) do
  local id, user = c[1], c[5]
  if not free_ids[id] and redis.call('EXISTS', p .. ':req:' .. id) == 1 then
    return redis.error_reply('REFUSED request ' .. id .. ' is stored already')
  end
  if c[9] and not free_keys[c[9]] and redis.call('HEXISTS', p .. ':idem', c[9]) == 1 then
    if not shared then
      return redis.error_reply('REFUSED the idempotency key of request ' .. id .. ' is taken')
    end
    refuse_creation(id, 'idempotency_key', 'another router took the idempotency key first', 0,
      {existing = redis.call('HGET', p .. ':idem', c[9])})
    dropped[id] = true
  elseif shared then
    local limits = c[13]
    local rpm, max_queued, max_total, per_hour = limits[1], limits[2], limits[3], limits[4]
    if rpm then
      local key = p .. ':rate:' .. user
      local window = redis.call('ZRANGEBYSCORE', key, '(' .. (now - 60), '+inf', 'WITHSCORES')
      local count = #window / 2 + (rate_added[user] or 0)
      if count >= tonumber(rpm) then
        -- As many must leave the window as are over the limit, and one more (a limit lowered
        -- since may leave several to wait for); this batch's own are the newest.
        local k = count - tonumber(rpm) + 1
        local leaving = k <= #window / 2 and tonumber(window[2 * k]) or now
        refuse_creation(id, 'requests_per_minute',
          'you sent ' .. count .. ' requests in the last minute; your limit is ' .. rpm,
          math.max(leaving + 60 - now, 0.001))
      end
    end
    if not refused[id] and max_queued then
      local count = redis.call('SCARD', p .. ':waiting:' .. user) + (waiting_added[user] or 0)
      if count >= tonumber(max_queued) then
        refuse_creation(id, 'max_queued',
          'you have ' .. count .. ' requests waiting; your limit is ' .. max_queued, 0)
      end
    end
    if not refused[id] and max_total then
      local count = redis.call('SCARD', p .. ':waiting') + waiting_total_added
      if count >= tonumber(max_total) then
        refuse_creation(id, 'max_queued_total',
          count .. ' requests are waiting; the limit is ' .. max_total, 0,
          {waiting = tostring(count), limit = tostring(max_total)})
      end
    end
    if not refused[id] and per_hour then
      local used = hour_stored(p, user, now)
      if used >= tonumber(per_hour) then
        local retry = frees_in(user, used - tonumber(per_hour) + 1e-6)
        refuse_creation(id, 'gpu_seconds_per_hour',
          string.format('you used %.0f of %.0f GPU-seconds in the last hour', used,
            tonumber(per_hour)), retry,
          {user = user, used = tostring(used), until_at = tostring(now + retry)})
      end
    end
    if refused[id] then
      dropped[id] = true
    else
      if rpm then rate_added[user] = (rate_added[user] or 0) + 1 end
      if c[4] == 'queued' then  -- one dispatched in the batch waits no more
        waiting_added[user] = (waiting_added[user] or 0) + 1
        waiting_total_added = waiting_total_added + 1
      end
    end
  end
end
for _, u in ipairs(b.u) do
  if free_ids[u[1]] or redis.call('EXISTS', p .. ':req:' .. u[1]) == 0 then
    return redis.error_reply('REFUSED request ' .. u[1] .. ' was never created')
  end
end

-- Claims (shared): each GPU's ledger, less what this batch releases, plus what it claims
-- before, must stay within the claim's limit; the user's slots likewise.
local reserve, claimed = {}, {}  -- claims confirmed; every claim's request
if shared then
  for _, claim in ipairs(b.cl) do claimed[claim[1]] = true end
  local released = {}  -- request id -> true: its reservation goes with this batch
  for _, u in ipairs(b.u) do
    if u[2] ~= 'dispatching' and u[2] ~= 'running' then released[u[1]] = true end
  end
  for _, claim in ipairs(b.cl) do released[claim[1]] = true end
  local claimed_mb, claimed_n, claimed_users, claimed_gs = {}, {}, {}, {}
  -- The batch's charges by user (field -> GPU-seconds: the last one of a field wins), except
  -- the claims' own: those count once confirmed (claimed_gs).
  local claim_fields, batch_gs = {}, {}
  for _, claim in ipairs(b.cl) do
    if claim[7] then claim_fields[claim[7]] = true end
  end
  for _, ch in ipairs(b.ch) do
    if not claim_fields[ch[1]] and not dropped[ch[4]] then
      local user = cjson.decode(ch[1])[1]
      batch_gs[user] = batch_gs[user] or {}
      batch_gs[user][ch[1]] = tonumber(ch[3])
    end
  end
  -- The user's GPU-seconds in the hour (hour_stored), with this batch's charges and confirmed
  -- claims, less the claim's own charge if stored (a batch carried again).
  local function hour_of(user, own)
    local key, cutoff = p .. ':gsu:' .. user, now - 3600
    local used = hour_stored(p, user, now)
    local function stored(field)  -- its GPU-seconds if counted in the hour, else nil
      local at = redis.call('ZSCORE', key, field)
      if at and tonumber(at) > cutoff then
        return tonumber(redis.call('HGET', p .. ':charge_gs', field) or 0)
      end
    end
    for field, amount in pairs(batch_gs[user] or {}) do
      if field ~= own then used = used + amount - (stored(field) or 0) end
    end
    if own then used = used - (stored(own) or 0) end
    return math.max(used, 0) + (claimed_gs[user] or 0)
  end
  local function ledger_sum(gpu)  -- MiB and executions
    local sum, n = claimed_mb[gpu] or 0, claimed_n[gpu] or 0
    local held = redis.call('HGETALL', p .. ':ledger:' .. gpu)
    for i = 1, #held, 2 do
      if not released[held[i]] then sum, n = sum + tonumber(held[i + 1]), n + 1 end
    end
    return sum, n
  end
  local function ledger_of(claim)
    local out = {}
    for _, g in ipairs(claim[2]) do
      local entries, held = {}, redis.call('HGETALL', p .. ':ledger:' .. g[1])
      for i = 1, #held, 2 do entries[held[i]] = tonumber(held[i + 1]) end
      out[g[1]] = entries
    end
    return out
  end
  for _, claim in ipairs(b.cl) do
    local id = claim[1]
    if not dropped[id] then
      local over
      local held = {}
      for _, g in ipairs(claim[2]) do
        local hold = redis.call('GET', p .. ':hold:' .. g[1])
        if hold and string.sub(hold, 1, #replica + 1) ~= replica .. ' ' then
          table.insert(held, g[1])
        end
      end
      if #held > 0 then
        over = 'GPU ' .. held[1] .. ' is held for a starving request of another router'
      end
      for _, g in ipairs(claim[2]) do
        if over then break end
        local sum, n = ledger_sum(g[1])
        if sum + tonumber(g[2]) > tonumber(g[3]) then
          over = 'GPU ' .. g[1] .. ' holds ' .. sum .. ' MiB of reservations; ' .. g[2] ..
            ' more would pass its limit of ' .. g[3] .. ' MiB'
          break
        end
        if n + 1 > tonumber(g[4]) then
          over = 'GPU ' .. g[1] .. ' runs ' .. n .. ' executions, as many as its slots'
          break
        end
      end
      local max_concurrent, user = claim[3], claim[4]
      local slots = p .. ':active:' .. user
      if #held > 0 then
        refuse(id, 'gpu_held', over, 0, {ledger = ledger_of(claim), held = held})
      elseif over then
        refuse(id, 'gpu_memory', over, 0, {ledger = ledger_of(claim)})
      elseif max_concurrent then
        local count = claimed_users[user] or 0
        for _, holder in ipairs(redis.call('SMEMBERS', slots)) do
          if not released[holder] then count = count + 1 end
        end
        if count >= tonumber(max_concurrent) then
          refuse(id, 'max_concurrent',
            'you have ' .. count .. ' requests running; your limit is ' .. max_concurrent, 0,
            {active = redis.call('SMEMBERS', slots)})
        end
      end
      local per_hour = claim[5]
      if not refused[id] and per_hour then
        local used = hour_of(user, claim[7])
        local amount, limit = tonumber(claim[6]), tonumber(per_hour)
        if used + amount > limit then
          -- Retry once enough of the oldest charges have left the hour (never, alone: 0).
          local retry = amount <= limit and frees_in(user, used + amount - limit) or 0
          refuse(id, 'gpu_seconds_per_hour',
            string.format('you used %.0f GPU-seconds in the last hour; %.0f more would pass ' ..
              'your limit of %.0f', used, amount, limit), retry,
            {user = user, used = tostring(used), until_at = tostring(now + retry)})
        end
      end
      if not refused[id] then
        claimed_gs[user] = (claimed_gs[user] or 0) + tonumber(claim[6])
        for _, g in ipairs(claim[2]) do
          claimed_mb[g[1]] = (claimed_mb[g[1]] or 0) + tonumber(g[2])
          claimed_n[g[1]] = (claimed_n[g[1]] or 0) + 1
        end
        claimed_users[user] = (claimed_users[user] or 0) + 1
        reserve[id] = claim
      end
    end
  end
end

-- Writes ------------------------------------------------------------------------------------

if holder ~= token then redis.call('SET', lease_key, token, 'PX', ARGV[6]) end

-- Shared: which requests wait (the users' queue limits) and who holds what (the claims).
-- <prefix>:queue orders every router's queued requests by their sort key (queue positions).
local function waiting(id, user, status)
  if status == 'queued' then
    redis.call('SADD', p .. ':waiting:' .. user, id)
    redis.call('SADD', p .. ':waiting', id)
    local key = redis.call('HGET', p .. ':req:' .. id, 'qkey')
    if key then redis.call('ZADD', p .. ':queue', key, id) end
  else
    redis.call('SREM', p .. ':waiting:' .. user, id)
    redis.call('SREM', p .. ':waiting', id)
    redis.call('ZREM', p .. ':queue', id)
  end
end
local function release(id, user)
  local held = redis.call('HGET', p .. ':req:' .. id, 'held')
  if held then
    for _, gpu in ipairs(cjson.decode(held)) do redis.call('HDEL', p .. ':ledger:' .. gpu, id) end
    redis.call('HDEL', p .. ':req:' .. id, 'held')
  end
  redis.call('SREM', p .. ':active:' .. user, id)
end

local function forget(id, user, key)
  if shared then
    release(id, user)
    waiting(id, user, 'gone')
    local owner = redis.call('HGET', p .. ':req:' .. id, 'owner')
    if owner then redis.call('ZREM', p .. ':owned:' .. owner, id) end
    redis.call('ZREM', p .. ':rate:' .. user, id)
  end
  redis.call('DEL', p .. ':req:' .. id, p .. ':trail:' .. id)
  redis.call('ZREM', p .. ':created', id)
  redis.call('ZREM', p .. ':user:' .. user, id)
  redis.call('ZREM', p .. ':unfinished', id)
  redis.call('ZREM', p .. ':finished', id)
  if key then redis.call('HDEL', p .. ':idem', key) end
end

-- Shared: each user's charges of the hour (<prefix>:gsu:<user>, by Redis time) and their running
-- total (<prefix>:gst:<user>); a charge leaves both once older than the hour or taken back.
local function hour_drop(user, field)
  local key = p .. ':gsu:' .. user
  if redis.call('ZREM', key, field) == 1 then
    local amount = tonumber(redis.call('HGET', p .. ':charge_gs', field) or 0)
    redis.call('INCRBYFLOAT', p .. ':gst:' .. user, -amount)
  end
end
local function hour_prune(user)
  local key = p .. ':gsu:' .. user
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now - 3600)) do
    hour_drop(user, field)
  end
  if redis.call('EXISTS', key) == 0 then redis.call('DEL', p .. ':gst:' .. user) end
end
local function hour_charge(user, field, amount)
  local key, total = p .. ':gsu:' .. user, p .. ':gst:' .. user
  hour_prune(user)
  if redis.call('ZSCORE', key, field) then  -- replaced: keeps its time
    amount = amount - tonumber(redis.call('HGET', p .. ':charge_gs', field) or 0)
  else
    redis.call('ZADD', key, now, field)
  end
  redis.call('INCRBYFLOAT', total, amount)
  redis.call('PEXPIRE', key, 3601000)
  redis.call('PEXPIRE', total, 3601000)
end

local function uncharge(field)
  if shared then hour_drop(cjson.decode(field)[1], field) end
  redis.call('ZREM', p .. ':charges', field)
  redis.call('HDEL', p .. ':charge_gs', field)
end

for _, doubt in ipairs(undone) do
  for _, c in ipairs(doubt[2]) do
    forget(c[1], c[2], c[3])
    redis.call('ZREM', p .. ':admissions', c[4])
    for _, field in ipairs(c[5]) do uncharge(field) end
  end
  redis.call('DEL', p .. ':batch:' .. doubt[1])
end
if ARGV[7] ~= '' then redis.call('DEL', p .. ':batch:' .. ARGV[7]) end

local function next_seq()
  return redis.call('INCR', p .. ':seq')
end

for _, c in ipairs(b.c) do
  local id = c[1]
  if not dropped[id] then
    local key = p .. ':req:' .. id
    redis.call('HSET', key, 'fixed', c[2], 'state', c[3], 'status', c[4],
      'user', c[5], 'model', c[7], 'priority', c[8], 'version', c[12])
    if c[9] then redis.call('HSET', key, 'idem', c[9]) end
    redis.call('ZADD', p .. ':created', c[6], id)
    redis.call('ZADD', p .. ':user:' .. c[5], c[6], id)
    if c[9] then redis.call('HSET', p .. ':idem', c[9], id) end
    if c[10] then
      redis.call('ZADD', p .. ':finished', c[6], id)
    else
      local seq = next_seq()
      redis.call('ZADD', p .. ':unfinished', seq, id)
      if shared then
        redis.call('HSET', key, 'owner', replica)
        redis.call('ZADD', p .. ':owned:' .. replica, seq, id)
      end
    end
    redis.call('ZADD', p .. ':admissions', c[6], c[11])
    if shared then
      local rpm = c[13][1]
      if rpm then
        local rate = p .. ':rate:' .. c[5]
        redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - 60)
        redis.call('ZADD', rate, now, id)
        redis.call('PEXPIRE', rate, 61000)
      end
      if c[14] then redis.call('HSET', key, 'qkey', c[14]) end
      waiting(id, c[5], c[4])
    end
  end
end

-- A change carried again after a lost answer is written once: a row only moves forward in
-- version, an audit entry is appended only where the trail has not reached it.
for _, u in ipairs(b.u) do
  local key = p .. ':req:' .. u[1]
  local version = tonumber(redis.call('HGET', key, 'version'))
  if version == nil or tonumber(u[5]) > version then
    redis.call('HSET', key, 'status', u[2], 'state', u[3], 'version', u[5])
    if shared then
      local user = redis.call('HGET', key, 'user')
      if claimed[u[1]] or u[2] ~= 'dispatching' and u[2] ~= 'running' then
        release(u[1], user)
      end
      waiting(u[1], user, u[2])
      if u[4] then
        local owner = redis.call('HGET', key, 'owner')
        if owner then redis.call('ZREM', p .. ':owned:' .. owner, u[1]) end
      end
    end
    if u[4] then
      redis.call('ZREM', p .. ':unfinished', u[1])
      redis.call('ZADD', p .. ':finished', redis.call('ZSCORE', p .. ':created', u[1]), u[1])
    end
  end
end
-- The claims confirmed above: the ledger, each request's GPUs (to release), the user's slots.
for id, claim in pairs(reserve) do
  local gpus = {}
  for _, g in ipairs(claim[2]) do
    redis.call('HSET', p .. ':ledger:' .. g[1], id, g[2])
    table.insert(gpus, g[1])
  end
  redis.call('HSET', p .. ':req:' .. id, 'held', cjson.encode(gpus))
  redis.call('SADD', p .. ':active:' .. claim[4], id)
end

for _, t in ipairs(b.t) do
  if not dropped[t[1]] then
    local key = p .. ':trail:' .. t[1]
    if tonumber(t[2]) >= redis.call('LLEN', key) then redis.call('RPUSH', key, t[3]) end
  end
end

-- A refused claim's charge is not written (its request charges nothing until dispatched again).
local refused_fields = {}
if shared then
  for _, claim in ipairs(b.cl) do
    if refused[claim[1]] and claim[7] then refused_fields[claim[7]] = true end
  end
end
for _, ch in ipairs(b.ch) do
  if not dropped[ch[4]] and not refused_fields[ch[1]] then
    -- A replaced charge keeps its time; routers sharing the prefix date theirs by Redis's clock.
    redis.call('ZADD', p .. ':charges', 'NX', shared and now or ch[2], ch[1])
    if shared then hour_charge(cjson.decode(ch[1])[1], ch[1], tonumber(ch[3])) end
    redis.call('HSET', p .. ':charge_gs', ch[1], ch[3])
  end
end

for _, o in ipairs(b.o) do
  if o[2] then
    redis.call('HSET', p .. ':overrides', o[1], o[2])
    if not redis.call('ZSCORE', p .. ':override_order', o[1]) then
      redis.call('ZADD', p .. ':override_order', next_seq(), o[1])
    end
  else
    redis.call('HDEL', p .. ':overrides', o[1])
    redis.call('ZREM', p .. ':override_order', o[1])
  end
end

local deleted, charges = 0, 0
if b.pr then
  local limit = tonumber(b.pr[4])
  redis.call('ZREMRANGEBYSCORE', p .. ':admissions', '-inf', b.pr[1])
  local old = redis.call('ZRANGEBYSCORE', p .. ':charges', '-inf', b.pr[2], 'LIMIT', 0, limit)
  charges = #old
  for _, field in ipairs(old) do uncharge(field) end
  if b.pr[3] then
    -- Finished requests created before the retention cutoff, oldest first.
    local ids = redis.call('ZRANGEBYSCORE', p .. ':finished', '-inf', '(' .. b.pr[3],
      'LIMIT', 0, limit)
    deleted = #ids
    for _, id in ipairs(ids) do
      local row = redis.call('HMGET', p .. ':req:' .. id, 'user', 'idem')
      forget(id, row[1] or '', row[2])
    end
  end
end

if #b.c > 0 then redis.call('SET', p .. ':batch:' .. batch, '1', 'EX', 3600) end
return {deleted, charges, #refusals > 0 and cjson.encode(refusals) or ''}
