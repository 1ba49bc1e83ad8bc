#!lua
-- One batch of the router's changes, all or nothing (RedisStore.write; see redis_store.py).
--
-- KEYS: none declared (the store is one Redis primary, not a cluster: every key of a prefix is
-- written here). ARGV[1] the key prefix, ARGV[2] this router's owner token, ARGV[3] the batch id,
-- ARGV[4] the batch as JSON (every number as a string, so that no value passes through Lua's
-- doubles and loses digits), ARGV[5] the epoch of this router's lease, ARGV[6] the lease in ms,
-- ARGV[7] the id of the last batch whose answer arrived ('' if none: its marker goes):
--   d  batches in doubt: {batch id, {{id, user, idempotency field|false, admission, charges}}}
--   c  creations: {id, fixed, state, status, user, created_at, model, priority,
--                  idempotency field|false, terminal, admission member, version}
--   u  updates: {id, status, state, terminal, version}
--   t  audit entries: {id, seq, json}
--   ch charges: {field, at, gpu_seconds}
--   o  overrides: {user, json|false}
--   pr {admissions cutoff, charges cutoff, retention cutoff|false, batch limit,
--       terminal statuses} | false
-- It answers {finished requests deleted, charges deleted}: a prune that reached the batch limit
-- in either runs again with the next write.
--
-- Every check comes before the first write, so a refused batch writes nothing; the shebang
-- makes Redis refuse the whole script up front when it is out of memory.
local p, token, batch = ARGV[1], ARGV[2], ARGV[3]
local b = cjson.decode(ARGV[4])

-- Checks ------------------------------------------------------------------------------------

-- The fence: the lease is this router's, or lapsed with nobody having taken the prefix since
-- (the epoch is still its own: Redis was down past the lease); then it is taken back below.
local holder = redis.call('GET', p .. ':owner')
if holder ~= token and (holder or redis.call('GET', p .. ':epoch') ~= ARGV[5]) then
  return redis.error_reply('FENCED this router no longer owns the prefix ' .. p)
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

for _, c in ipairs(b.c) do
  if not free_ids[c[1]] and redis.call('EXISTS', p .. ':req:' .. c[1]) == 1 then
    return redis.error_reply('REFUSED request ' .. c[1] .. ' is stored already')
  end
  if c[9] and not free_keys[c[9]] and redis.call('HEXISTS', p .. ':idem', c[9]) == 1 then
    return redis.error_reply('REFUSED the idempotency key of request ' .. c[1] .. ' is taken')
  end
end
for _, u in ipairs(b.u) do
  if free_ids[u[1]] or redis.call('EXISTS', p .. ':req:' .. u[1]) == 0 then
    return redis.error_reply('REFUSED request ' .. u[1] .. ' was never created')
  end
end

-- Writes ------------------------------------------------------------------------------------

if holder ~= token then redis.call('SET', p .. ':owner', token, 'PX', ARGV[6]) end

local function forget(id, user, key)
  redis.call('DEL', p .. ':req:' .. id, p .. ':trail:' .. id)
  redis.call('ZREM', p .. ':created', id)
  redis.call('ZREM', p .. ':user:' .. user, id)
  redis.call('ZREM', p .. ':unfinished', id)
  redis.call('ZREM', p .. ':finished', id)
  if key then redis.call('HDEL', p .. ':idem', key) end
end

for _, doubt in ipairs(undone) do
  for _, c in ipairs(doubt[2]) do
    forget(c[1], c[2], c[3])
    redis.call('ZREM', p .. ':admissions', c[4])
    for _, field in ipairs(c[5]) do
      redis.call('ZREM', p .. ':charges', field)
      redis.call('HDEL', p .. ':charge_gs', field)
    end
  end
  redis.call('DEL', p .. ':batch:' .. doubt[1])
end
if ARGV[7] ~= '' then redis.call('DEL', p .. ':batch:' .. ARGV[7]) end

local function next_seq()
  return redis.call('INCR', p .. ':seq')
end

for _, c in ipairs(b.c) do
  local id = c[1]
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
    redis.call('ZADD', p .. ':unfinished', next_seq(), id)
  end
  redis.call('ZADD', p .. ':admissions', c[6], c[11])
end

-- A change carried again after a lost answer is written once: a row only moves forward in
-- version, an audit entry is appended only where the trail has not reached it.
for _, u in ipairs(b.u) do
  local key = p .. ':req:' .. u[1]
  local version = tonumber(redis.call('HGET', key, 'version'))
  if version == nil or tonumber(u[5]) > version then
    redis.call('HSET', key, 'status', u[2], 'state', u[3], 'version', u[5])
    if u[4] then
      redis.call('ZREM', p .. ':unfinished', u[1])
      redis.call('ZADD', p .. ':finished', redis.call('ZSCORE', p .. ':created', u[1]), u[1])
    end
  end
end
for _, t in ipairs(b.t) do
  local key = p .. ':trail:' .. t[1]
  if tonumber(t[2]) >= redis.call('LLEN', key) then redis.call('RPUSH', key, t[3]) end
end

for _, ch in ipairs(b.ch) do
  redis.call('ZADD', p .. ':charges', 'NX', ch[2], ch[1])  -- a replaced charge keeps its time
  redis.call('HSET', p .. ':charge_gs', ch[1], ch[3])
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
  for _, field in ipairs(old) do
    redis.call('HDEL', p .. ':charge_gs', field)
    redis.call('ZREM', p .. ':charges', field)
  end
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
return {deleted, charges}
