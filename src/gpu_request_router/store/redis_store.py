"""A durable :class:`StateStore` on Redis (redis-py with hiredis), for one router per key prefix.

Durability promise
    :meth:`RedisStore.write` runs the whole batch as one Lua script (``redis_write.lua``):
    Redis runs a script atomically, and writes it to its append-only file as one unit, so a
    batch is in Redis whole or not at all. What "in Redis" survives is Redis's setting:
    ``appendfsync always`` syncs the file before the script's reply (accepted = durable, as
    the SQLite store with ``synchronous=full``); ``everysec`` may lose the last second of
    commits if the Redis host dies; no AOF loses everything since the last snapshot. The
    store reads the settings at start and logs what they promise (docs/deployment.md).

One owner per prefix
    The store holds a lease on ``<prefix>:owner`` (a token with a :data:`LEASE_S` expiry,
    renewed every :data:`RENEW_S` by a thread of its own), taken before it reads anything, and
    every write checks it inside its script (a fencing token): a router that lost the lease
    (paused past it, cut off from Redis while another took over) can never write again; it
    reports the store unavailable. A second router on the same prefix waits up to one lease for
    the holder's to lapse (a killed router's does), then is refused with
    :class:`~gpu_request_router.exceptions.StoreInUse` naming the holder; a *standby*
    (``standby=True``) waits for as long as the holder lives and takes over when it dies. A
    clean close gives the lease up at once. Two routers on one prefix would each recover, and
    run again, the other's work.

A lost reply
    A write whose connection breaks may or may not have been applied. The router refuses the
    requests such a batch created (503, as for any failed commit) and tries its other changes
    again; so the store makes both safe. Every batch that creates requests leaves a marker
    (``<prefix>:batch:<id>``), which the next write deletes once the batch's answer arrived
    (an hour at most); the next write, or the writer's probe (``check_writable``, which is not
    writable until then) or ``close``, takes back the creations of a batch in doubt whose marker
    exists. A row is only rewritten by a change of a higher version and an audit entry only
    appended where the trail has not reached it, so a change written twice is written once.
    What is left: a router that dies between the lost answer and that next write leaves the
    batch's requests stored, and its successor runs them although their callers were told 503
    (a caller retrying by idempotency key gets them, not a second request).

Keys (``<prefix>`` is ``state.redis_prefix``)::

    <prefix>:schema           the layout version (:data:`SCHEMA_VERSION`); a newer one is refused
    <prefix>:owner            the owner's token, with its lease as expiry
    <prefix>:epoch            counts the takings of the lease (a lapsed one is taken back only
                              by its holder, and only while nobody took it since)
    <prefix>:req:<id>         hash: fixed, state (the codec's two texts), status, user, model,
                              priority, version, idem (its idempotency field, if any)
    <prefix>:trail:<id>       list: the audit entries, in order (index = seq)
    <prefix>:created          zset: every request by creation time (ties by id: the listing)
    <prefix>:user:<user>      zset: the user's requests by creation time
    <prefix>:unfinished       zset: unfinished requests in creation order (recovery)
    <prefix>:finished         zset: finished requests by creation time (retention)
    <prefix>:idem             hash: JSON [user, key] -> request id
    <prefix>:admissions       zset: JSON [user, request id] by creation time (pruned to a minute)
    <prefix>:charges          zset: JSON [user, charge id] by charge time (pruned to an hour)
    <prefix>:charge_gs        hash: JSON [user, charge id] -> GPU-seconds
    <prefix>:gsu:<user>       zset (shared): the user's charge fields by Redis time, an hour
    <prefix>:gst:<user>       (shared) their running total of GPU-seconds
    <prefix>:workers          hash (shared): registered workers, name -> URL
    <prefix>:workers_seen     zset (shared): when a router last heard from each (a day kept)
    <prefix>:workers_v        counts the changes of the worker list
    <prefix>:queue            zset (shared): every router's queued requests by sort key
    <prefix>:heads:<router>   (shared) the requests its last pass found waiting for room (a second)
    <prefix>:poll:<worker>    (shared) the router whose turn it is to read the worker (an interval)
    <prefix>:reading:<worker> (shared) "<stamp> <JSON>": its latest reading, or why it failed
                              (kept for monitor.stale_after_s)
    <prefix>:overrides        hash: user -> JSON quota override
    <prefix>:override_order   zset: users in the order their override was first set
    <prefix>:seq              the counter behind the two orders above
    <prefix>:batch:<id>       a batch that created requests, until its answer arrived (an hour)
    <prefix>:probe            written by check_writable

With ``retention_s``, a write at most every :data:`PRUNE_INTERVAL_S` also deletes finished
requests created longer ago (hash, trail, index entries, idempotency field), up to
``RETENTION_BATCH`` at a time (a full batch prunes again with the next write).

Every call has a short socket timeout (:data:`SOCKET_TIMEOUT_S`) and is not retried by the
client: while Redis is unreachable a call fails within it with
:class:`~gpu_request_router.exceptions.StoreUnavailable`, and the router answers 503.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpu_request_router.core.load_balancer import Need
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.state_store import (
    PRUNE_INTERVAL_S,
    RETENTION_BATCH,
    WRITE_PROBE_INTERVAL_S,
    Change,
    Charge,
    Claim,
    Limits,
    OverrideChange,
    Page,
    PollTurns,
    QueueHead,
    QuotaHistory,
    Refusal,
    RequestQuery,
    SharedReading,
    SharedStore,
    SharedView,
    batch_time,
    check_charge,
    check_retention,
    decode_cursor,
    encode_cursor,
)
from gpu_request_router.exceptions import StoreInUse, StoreUnavailable
from gpu_request_router.models.request import Request, RequestStatus, Task, Transition
from gpu_request_router.store.codec import (
    request_fixed_to_json,
    request_from_json,
    request_state_to_json,
    transition_from_json,
    transition_to_json,
)
from gpu_request_router.utils.every import Every

__all__ = ["LEASE_S", "RENEW_S", "SCHEMA_VERSION", "RedisStore"]

_log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
"""The key layout this code writes and reads (``<prefix>:schema``)."""

LEASE_S = 5.0
"""How long the owner's lease lasts without renewal (a killed router's lapses after it)."""

RENEW_S = 1.0
"""How often the owner renews its lease (a third of a shorter lease)."""

SOCKET_TIMEOUT_S = 0.5
"""The longest one call to Redis may take (connecting included) before it fails."""

_STANDBY_POLL_S = 0.1
_COMMANDS = 1_000  # the most cancellations one shared view takes

HOLD_S = 1.0
"""How long a router's starvation hold on a GPU lasts unless its shared view renews it."""
_MIN_REDIS = (7, 0)
_LIST_CHUNK = 256

# A user's GPU-seconds in the hour on a shared prefix p, as stored at Redis time ``now``: the
# running total (<prefix>:gst:<user>) less what has left the hour since (pruned by the next
# write). O(what expired). Put before the scripts that read it (the write script and the view).
_HOUR_STORED = """
local function hour_stored(p, user, now)
  local used = tonumber(redis.call('GET', p .. ':gst:' .. user) or 0)
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', p .. ':gsu:' .. user, '-inf', now - 3600)) do
    used = used - tonumber(redis.call('HGET', p .. ':charge_gs', field) or 0)
  end
  return used
end
"""
# The lease (KEYS[1]). One owner: each taking counts an epoch (KEYS[2]); the holder may take its
# own lapsed lease back (Redis was down past it) only while the epoch is still its own: nobody
# took the prefix since. Shared (ARGV[4] '1'): a replica may take its lapsed lease back only
# while it is still listed among the replicas (KEYS[2], field ``epoch`` = its id): adopting its
# requests delists it, for good.
_OURS = """
local function ours(lease_key, other_key, token, epoch, px, shared)
  local holder = redis.call('GET', lease_key)
  if holder == token then return true end
  if holder then return false end
  if shared == '1' then
    if redis.call('HGET', other_key, epoch) ~= token then return false end
  elseif redis.call('GET', other_key) ~= epoch then
    return false
  end
  redis.call('SET', lease_key, token, 'PX', px)
  return true
end
"""
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, tostring(epoch)}
"""
_RENEW = (
    _OURS
    + """
if ours(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, ARGV[1]}
end
return {0, redis.call('GET', KEYS[1]) or 'nobody now (adopted, or Redis lost its data)'}
"""
)
# A replica of a shared prefix joins: its lease, and its entry among the replicas (ARGV[3]).
_JOIN = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
# Adopt the requests of replica ARGV[3] of prefix ARGV[1], unless its lease lives: they become
# ARGV[2]'s (in their creation order), with the commands sent to it; it is delisted (fenced for
# good). The adopter's own lease is checked (taken back if it lapsed while it was listed).
_ADOPT = (
    _OURS
    + """
local p, me, dead = ARGV[1], ARGV[2], ARGV[3]
if not ours(p .. ':replica:' .. me, p .. ':replicas', ARGV[4], me, ARGV[5], '1') then
  return redis.error_reply('FENCED this router no longer owns its part of the prefix ' .. p)
end
if redis.call('EXISTS', p .. ':replica:' .. dead) == 1 then return {} end
redis.call('SET', p .. ':adopted:' .. dead, me, 'EX', 86400)
local ids = redis.call('ZRANGE', p .. ':owned:' .. dead, 0, -1)
for _, id in ipairs(ids) do
  redis.call('HSET', p .. ':req:' .. id, 'owner', me)
  redis.call('ZADD', p .. ':owned:' .. me, redis.call('INCR', p .. ':seq'), id)
end
redis.call('DEL', p .. ':owned:' .. dead)
redis.call('HDEL', p .. ':replicas', dead)
while redis.call('LMOVE', p .. ':cmd:' .. dead, p .. ':cmd:' .. me, 'LEFT', 'RIGHT') do end
return ids
"""
)
# Pass a cancellation (ARGV[2], JSON) of request ARGV[1] to the router owning it, in one step
# (an adoption cannot slip between finding the owner and the push); 0 if it is finished.
_CANCEL = """
local p = KEYS[1]
local row = redis.call('HMGET', p .. ':req:' .. ARGV[1], 'owner', 'status')
if not row[1] or not row[2] then return 0 end
for _, status in ipairs(cjson.decode(ARGV[3])) do
  if row[2] == status then return 0 end
end
local key = p .. ':cmd:' .. row[1]
redis.call('RPUSH', key, ARGV[2])
redis.call('EXPIRE', key, 3600)
return 1
"""
# What replica ARGV[2] of prefix ARGV[1] must know of the others: the ledger of each GPU of
# ARGV[4] (JSON list), the concurrent slots of each user of ARGV[5], the commands sent to it
# (taken), the replicas whose lease lapsed, and which GPUs of ARGV[4] other replicas hold for
# a starving request; ARGV[3] the most commands to take. ARGV[6] (JSON {gpu: [request id,
# created at]}, or '' to leave them) are its own holds now, kept ARGV[7] ms unless renewed; a
# GPU another holds stays theirs unless this one's request has waited longer (a hold's value
# is "<replica> <created at> <request id>"). ARGV[8] is its lease token (the fence, when it
# publishes holds); ARGV[9] (JSON list) the users whose charges in the hour it reads; ARGV[10]
# (JSON {name: URL}) the workers that registered with it since, ARGV[11] the version of the
# worker list it last read (the list comes back only when it changed; a worker no router heard
# from for a day is forgotten); ARGV[12] (JSON list, or '' to leave them) its queue heads, kept
# ARGV[7] ms unless renewed. The other replicas' heads come back.
_VIEW = (
    _HOUR_STORED
    + """
local p, me = ARGV[1], ARGV[2]
local mark = me .. ' '
local function ours(value) return string.sub(value, 1, #mark) == mark end
if ARGV[6] ~= '' and redis.call('GET', p .. ':replica:' .. me) ~= ARGV[8] then
  return redis.error_reply('FENCED this router no longer owns its part of the prefix ' .. p)
end
local function since(value) return tonumber(string.match(value, '^%S+ (%S+)')) end
local ledger, active, lapsed, held = {}, {}, {}, {}
if ARGV[6] ~= '' then
  local holds, mine = cjson.decode(ARGV[6]), p .. ':holds:' .. me
  for _, gpu in ipairs(redis.call('SMEMBERS', mine)) do
    if holds[gpu] == nil then
      local value = redis.call('GET', p .. ':hold:' .. gpu)
      if value and ours(value) then redis.call('DEL', p .. ':hold:' .. gpu) end
      redis.call('SREM', mine, gpu)
    end
  end
  for gpu, request in pairs(holds) do
    local key = p .. ':hold:' .. gpu
    local value = redis.call('GET', key)
    if not value or ours(value) or since(value) > tonumber(request[2]) then
      redis.call('SET', key, mark .. request[2] .. ' ' .. request[1], 'PX', ARGV[7])
      redis.call('SADD', mine, gpu)
    end
  end
  redis.call('PEXPIRE', mine, ARGV[7])
end
for _, gpu in ipairs(cjson.decode(ARGV[4])) do
  table.insert(ledger, redis.call('HGETALL', p .. ':ledger:' .. gpu))
  local value = redis.call('GET', p .. ':hold:' .. gpu)
  if value and not ours(value) then table.insert(held, {gpu, tostring(since(value))}) end
end
for _, user in ipairs(cjson.decode(ARGV[5])) do
  table.insert(active, redis.call('SMEMBERS', p .. ':active:' .. user))
end
local charges = {}
local users = cjson.decode(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, user in ipairs(users) do  -- the hour's total and its oldest charge
  local key = p .. ':gsu:' .. user
  local used = hour_stored(p, user, now)
  local oldest = redis.call('ZRANGEBYSCORE', key, '(' .. (now - 3600), '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
  if #oldest > 0 then table.insert(charges, {user, tostring(used), oldest[2]}) end
end
local commands = {}
if tonumber(ARGV[3]) > 0 then commands = redis.call('LPOP', p .. ':cmd:' .. me, ARGV[3]) or {} end
if ARGV[12] ~= '' then redis.call('SET', p .. ':heads:' .. me, ARGV[12], 'PX', ARGV[7]) end
local heads = {}
for _, replica in ipairs(redis.call('HKEYS', p .. ':replicas')) do
  if redis.call('EXISTS', p .. ':replica:' .. replica) == 0 then table.insert(lapsed, replica) end
  if replica ~= me then
    local value = redis.call('GET', p .. ':heads:' .. replica)
    if value then table.insert(heads, value) end
  end
end
local workers, seen, changed = p .. ':workers', p .. ':workers_seen', false
for name, url in pairs(cjson.decode(ARGV[10])) do
  if redis.call('HGET', workers, name) ~= url then
    redis.call('HSET', workers, name, url)
    changed = true
  end
  redis.call('ZADD', seen, now, name)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', now - 86400, 'LIMIT', 0, 100)) do
  redis.call('HDEL', workers, name)
  redis.call('ZREM', seen, name)
  changed = true
end
if changed then redis.call('INCR', p .. ':workers_v') end
local version = redis.call('GET', p .. ':workers_v') or '0'
local listed = {}
if version ~= ARGV[11] then listed = redis.call('HGETALL', workers) end
return {ledger, active, commands, lapsed, held, charges, version, listed, heads}
"""
)
# Turns to read the workers of ARGV[4] (JSON {name: stamp}) for replica ARGV[2] of prefix
# ARGV[1], each taken for ARGV[3] ms where nobody holds it; for the others, the reading last
# published if its stamp is newer than the one given. Returns the store's TIME first.
_TURNS = """
local p, me = ARGV[1], ARGV[2]
local mine, found = {}, {}
for name, stamp in pairs(cjson.decode(ARGV[4])) do
  if redis.call('SET', p .. ':poll:' .. name, me, 'NX', 'PX', ARGV[3]) then
    table.insert(mine, name)
  else
    local value = redis.call('GET', p .. ':reading:' .. name)
    if value and tonumber(string.match(value, '^(%d+) ')) > stamp then
      table.insert(found, {name, value})
    end
  end
end
local t = redis.call('TIME')
return {t[1], t[2], mine, found}
"""
# Readings of prefix ARGV[1]'s workers taken in turns stamped ARGV[2], kept ARGV[3] ms: name,
# body pairs from ARGV[4] on. A reading with a newer stamp already there stays.
_PUBLISH = """
local p, stamp = ARGV[1], tonumber(ARGV[2])
for i = 4, #ARGV, 2 do
  local key = p .. ':reading:' .. ARGV[i]
  local value = redis.call('GET', key)
  if not value or tonumber(string.match(value, '^(%d+) ')) < stamp then
    redis.call('SET', key, ARGV[2] .. ' ' .. ARGV[i + 1], 'PX', ARGV[3])
  end
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_PROBE = (
    _OURS
    + """
if not ours(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then
  return redis.error_reply('FENCED this router no longer owns the prefix')
end
redis.call('SET', KEYS[3], ARGV[1])
return 'OK'
"""
)


def _write_script() -> bytes:
    """``redis_write.lua`` with :data:`_HOUR_STORED` after its first line (its flags)."""
    text = resources.files(__package__).joinpath("redis_write.lua").read_bytes()
    flags, rest = text.split(b"\n", 1)
    return flags + _HOUR_STORED.encode() + rest


def _score(value: float) -> str:
    """A float as Redis reads it back exactly (``repr`` round-trips a double)."""
    return repr(float(value))


def _pair(a: str, b: str) -> str:
    """Two texts as one unambiguous member or field."""
    return json.dumps([a, b], ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _Doubt:
    """A batch whose reply was lost, and what it created (to take back if it was written)."""

    batch: str
    created: list[list[Any]]


class RedisStore(SharedStore):
    """Requests, audit trails, quota windows and overrides under one prefix of one Redis.

    Args:
        url: ``redis://`` or ``rediss://`` URL (database number, password, TLS as usual).
        prefix: the keys' prefix; one router owns it.
        lease_s: the owner's lease (see the module docstring).
        retention_s: finished requests created longer ago than this are deleted, with their
            audit trail and idempotency key, by the writes; ``None`` keeps them.
        standby: wait for the prefix's lease for as long as its holder lives, instead of being
            refused: a hot standby that opens (and so recovers and serves) when the holder dies.
        timeout_s: the longest one call may take (:data:`SOCKET_TIMEOUT_S`; tests that reach
            Redis through a proxy of their own give it more).
        shared: any number of routers serve on the prefix at once (see "Shared prefix" in the
            module docstring); all of them must say so.

    Raises:
        StoreInUse: another live router holds the prefix's lease (never for a standby).
        StoreUnavailable: Redis cannot be reached, is older than 7.0, holds a newer layout, or
            the prefix is used the other way (shared / one owner).
    """

    shared: bool

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gpurouter",
        lease_s: float = LEASE_S,
        retention_s: float | None = None,
        standby: bool = False,
        timeout_s: float = SOCKET_TIMEOUT_S,
        shared: bool = False,
    ) -> None:
        if not prefix or any(c.isspace() or c == ":" for c in prefix):
            raise ValueError(
                f"a Redis key prefix is a non-empty word without ':' (it separates the parts of "
                f"every key), not {prefix!r}"
            )
        if shared and standby:
            raise ValueError(
                "a standby waits for the one owner of a prefix; routers sharing a prefix all "
                "serve, and adopt the work of any that dies"
            )
        check_retention(retention_s)
        self.retention_s = retention_s
        self.standby = standby
        self.shared = shared
        # A shared prefix's replica id: the key of its lease and of the requests it owns.
        self.replica = uuid.uuid4().hex[:12] if shared else ""
        self.url = url
        self.prefix = prefix
        self.lease_s = lease_s
        self._renew_s = min(RENEW_S, lease_s / 3)
        self._px = max(1, int(lease_s * 1000))
        self._epoch = ""  # the lease's epoch, once taken
        self._where = f"Redis state store {_safe_url(url)} (prefix {prefix!r})"
        # Any: redis-py types every command as "a value or an awaitable" (its sync and asyncio
        # clients share them), which no caller of the sync client can use.
        self._redis: Any = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._write_script = self._redis.register_script(_write_script())
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._join = self._redis.register_script(_JOIN)
        self._adopt = self._redis.register_script(_ADOPT)
        self._view = self._redis.register_script(_VIEW)
        self._cancel = self._redis.register_script(_CANCEL)
        self._turns = self._redis.register_script(_TURNS)
        self._publish = self._redis.register_script(_PUBLISH)
        self._release = self._redis.register_script(_RELEASE)
        self._probe = self._redis.register_script(_PROBE)
        self._doubts: list[_Doubt] = []
        self._answered: str | None = None  # the last creating batch whose answer arrived
        self._lock = threading.Lock()  # writes, probes and their bookkeeping
        self._write_failure: str | None = None
        self._fenced: str | None = None
        self._down: str | None = None  # why Redis is unreachable, until the lease thread reaches it
        # Since when this router has reached Redis without a break (it adopts nobody for a lease
        # after an outage: the others' leases lapsed in it too, and they renew within a second).
        self._up_since = time.monotonic() - lease_s - self._renew_s
        self._workers_version = ""  # of the worker list last read (none yet)
        self._probes = Every(WRITE_PROBE_INTERVAL_S)
        self._prunes = Every(PRUNE_INTERVAL_S)
        self._closed = threading.Event()
        self._check_server()
        self._acquire()
        self._renewer = threading.Thread(
            target=self._keep_lease, name="gpurouter-redis-lease", daemon=True
        )
        self._renewer.start()

    # Start -------------------------------------------------------------------------------------

    def _check_server(self) -> None:
        info = self._call("connect", lambda: self._redis.info("server"))
        version = tuple(int(part) for part in str(info.get("redis_version", "0")).split(".")[:2])
        if version < _MIN_REDIS:
            raise StoreUnavailable(
                f"{self._where}: Redis {info.get('redis_version')} is too old; 7.0 or newer is "
                "needed (its scripts declare that they write)"
            )
        key = self._key("schema")
        self._call("check the layout", lambda: self._redis.set(key, SCHEMA_VERSION, nx=True))
        found = int(self._call("check the layout", lambda: self._redis.get(key)) or 0)
        if found > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self._where}: the keys have layout version {found}, newer than the version "
                f"{SCHEMA_VERSION} this router knows; upgrade the router or use another prefix"
            )
        mode, key = ("shared" if self.shared else "one owner"), self._key("mode")
        self._call("check the layout", lambda: self._redis.set(key, mode, nx=True))
        used = _text(self._call("check the layout", lambda: self._redis.get(key)) or b"")
        if used != mode:
            raise StoreUnavailable(
                f"{self._where}: the prefix is used with state.shared "
                f"{'true' if used == 'shared' else 'false'}; every router of a prefix must set "
                "it alike (or use another prefix)"
            )
        self._log_persistence()

    def _log_persistence(self) -> None:
        """Say what Redis's settings promise (CONFIG may be disabled, e.g. on managed Redis)."""
        try:
            config = self._redis.config_get("appendonly", "appendfsync", "maxmemory-policy")
        except redis.RedisError:
            _log.info("redis_settings_unknown", store=self._where)
            return
        values = {_text(k): _text(v) for k, v in config.items()}
        aof, fsync = values.get("appendonly"), values.get("appendfsync")
        policy = values.get("maxmemory-policy")
        if aof != "yes":
            _log.warning(
                "redis_not_durable",
                store=self._where,
                appendonly=aof,
                meaning="accepted requests are lost if Redis restarts; set appendonly yes",
            )
        elif fsync != "always":
            _log.info(
                "redis_durability",
                store=self._where,
                appendfsync=fsync,
                meaning="the last second of commits may be lost if the Redis host fails",
            )
        if policy not in (None, "noeviction"):
            _log.warning(
                "redis_may_evict",
                store=self._where,
                maxmemory_policy=policy,
                meaning="Redis may delete the router's keys when full; set noeviction",
            )

    def _acquire(self) -> None:
        """Take the prefix's lease, waiting up to one lease for a lapsed holder's to expire.

        A standby waits for as long as the holder lives (Redis unreachable meanwhile included),
        and takes the lease within :data:`_STANDBY_POLL_S` of its lapse.
        """
        if self.shared:
            self._call(
                "join the routers of the prefix",
                lambda: self._join(
                    keys=[*self._fence_keys[:1], self._key("replicas")],
                    args=[self._token, self._px, self.replica],
                ),
            )
            return
        deadline = time.monotonic() + self.lease_s + self._renew_s
        waiting_on: str | None = None
        while True:
            try:
                taken, holder = self._acquire_script(
                    keys=self._fence_keys, args=[self._token, self._px]
                )
            except redis.RedisError as exc:
                if not self.standby:
                    raise self._unavailable("take the owner's lease", exc) from exc
                time.sleep(self._renew_s)
                continue
            if taken:
                self._epoch = _text(holder)
                if waiting_on is not None:
                    _log.warning("redis_standby_taking_over", store=self._where, after=waiting_on)
                return
            holder = _text(holder)
            if self.standby:
                if holder != waiting_on:
                    _log.warning("redis_standby", store=self._where, holder=holder)
                    waiting_on = holder
                time.sleep(_STANDBY_POLL_S)
                continue
            if time.monotonic() >= deadline:
                raise StoreInUse(
                    f"{self._where} is in use by another router ({holder}): stop that router "
                    "or set state.redis_prefix to another prefix",
                    path=f"{_safe_url(self.url)} {self.prefix}",
                    holder=holder,
                    pid=_pid_of(holder),
                )
            time.sleep(0.1)

    def _renew_once(self) -> tuple[bool, str]:
        taken, holder = self._renew(keys=self._fence_keys, args=self._fence_args)
        return bool(taken), _text(holder)

    @property
    def _fence_keys(self) -> list[str]:
        if self.shared:
            return [self._key("replica", self.replica), self._key("replicas")]
        return [self._key("owner"), self._key("epoch")]

    @property
    def _fence_args(self) -> list[str | int]:
        if self.shared:
            return [self._token, self.replica, self._px, "1"]
        return [self._token, self._epoch, self._px, "0"]

    def _keep_lease(self) -> None:
        """Renew the lease until closed; report a lease another router took (fenced for good)."""
        while not self._closed.wait(self._renew_s):
            try:
                taken, holder = self._renew_once()
            except redis.RedisError as exc:
                if self._down is None:
                    _log.warning("redis_unreachable", store=self._where, error=str(exc))
                self._down = f"{self._where}: unreachable: {exc}"
                continue
            if self._down is not None:
                _log.info("redis_reachable", store=self._where)
                self._up_since = time.monotonic()
                self._down = None
            if not taken:
                self._fenced = (
                    f"{self._where}: another router ({holder}) took over the prefix; this "
                    "router no longer writes (restart it)"
                )
                _log.error("redis_lease_lost", store=self._where, holder=holder)
                return

    # Calls and errors --------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, action: str, call: Callable[[], Any]) -> Any:
        """One call to Redis; while Redis is known to be down, fail at once without one.

        A call to a host that drops packets waits out the socket timeout; the event loop makes
        such calls, so after one has failed the rest fail fast until the lease thread (every
        :data:`RENEW_S`) reaches Redis again.
        """
        if self._closed.is_set():  # a call now would open a connection nobody closes
            raise StoreUnavailable(f"{self._where}: closed")
        down = self._down
        if down is not None:
            raise StoreUnavailable(down)
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._down = f"{self._where}: unreachable: {exc}"
            raise self._unavailable(action, exc) from exc
        except redis.RedisError as exc:
            raise self._unavailable(action, exc) from exc

    def failure(self) -> str | None:
        """Why the store cannot be used now, as last seen (no call is made), or ``None``."""
        return self._fenced or self._down

    def fenced(self) -> str | None:
        """Why another router took over this router's part of the prefix, or ``None``."""
        return self._fenced

    def _unavailable(self, action: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"{self._where}: cannot {action}: {exc}")

    # Writes ------------------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> list[Refusal]:
        """Persist ``changes`` in one script (see the module docstring); return its refusals."""
        batch, created = self._batch(changes)
        now = batch_time(changes)
        with self._lock:
            prune = now is not None and self._prunes.due(now)
            if prune:
                assert now is not None
                retained = self.retention_s
                batch["pr"] = [
                    _score(now - MINUTE_S),
                    _score(now - HOUR_S),
                    False if retained is None else _score(now - retained),
                    RETENTION_BATCH,
                ]
            deleted, charges, refusals = self._run(batch, created)
            if max(deleted, charges) >= RETENTION_BATCH:
                self._prunes.again()  # a full batch of either: prune again with the next write
        return refusals

    def _run(
        self, batch: dict[str, Any], created: list[list[Any]]
    ) -> tuple[int, int, list[Refusal]]:
        """Run the write script on ``batch`` (under ``_lock``), with the batches in doubt.

        Returns what its prune deleted (finished requests, charges) and what it refused.
        """
        if self._closed.is_set():
            raise StoreUnavailable(f"{self._where}: closed")
        if self._fenced is not None:
            raise StoreUnavailable(self._fenced)
        batch["d"] = [[doubt.batch, doubt.created] for doubt in self._doubts]
        batch_id = uuid.uuid4().hex
        try:
            deleted, charges, refused = self._write_script(
                args=[
                    self.prefix,
                    self._token,
                    batch_id,
                    json.dumps(batch, ensure_ascii=False, separators=(",", ":")),
                    self._epoch,
                    self._px,
                    self._answered or "",
                    self.replica,
                ]
            )
        except redis.ResponseError as exc:
            message = str(exc)
            if message.startswith("REFUSED"):
                self._write_failure = None
                raise ValueError(message.removeprefix("REFUSED ")) from exc
            raise self._write_failed("write changes", exc) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if created:
                self._doubts.append(_Doubt(batch_id, created))
            raise self._write_failed("write changes", exc) from exc
        except redis.RedisError as exc:
            raise self._write_failed("write changes", exc) from exc
        self._doubts.clear()
        self._answered = batch_id if created else None
        self._write_failure = None
        return int(deleted), int(charges), _refusals(refused)

    def _settle(self) -> None:
        """Take back what batches in doubt created, with a write of nothing (under ``_lock``).

        Until it has run, a store that lost an answer is not writable: the router must not take
        work (or answer an idempotency key from a batch it refused) before they are gone.
        """
        if self._doubts:
            self._run({"c": [], "u": [], "cl": [], "t": [], "ch": [], "o": [], "pr": False}, [])

    def _write_failed(self, action: str, exc: BaseException) -> StoreUnavailable:
        error = self._unavailable(action, exc)
        if str(exc).startswith("FENCED"):
            error = StoreUnavailable(
                f"{self._where}: another router took over the prefix; this router no longer "
                "writes (restart it)"
            )
            self._fenced = error.message
        self._write_failure = error.message
        return error

    def _batch(self, changes: Sequence[Change]) -> tuple[dict[str, Any], list[list[Any]]]:
        """The script's batch, and what it creates (for a doubt); refuses what cannot be written.

        Raises:
            ValueError: a request created twice, two creations under one idempotency key, or a
                charge no window could hold (nothing is sent).
        """
        last: dict[str, Request] = {}
        created: dict[str, Request] = {}
        limits: dict[str, Limits | None] = {}
        queue_keys: dict[str, float | None] = {}
        claims: dict[str, tuple[Claim, Charge | None]] = {}  # with the dispatch's charge
        charge_fields: dict[str, list[str]] = {}
        entries: list[list[str]] = []
        charges: list[list[str]] = []
        overrides: list[list[Any]] = []
        keys: set[str] = set()
        for change in changes:
            if isinstance(change, OverrideChange):
                body = json.dumps(change.values, separators=(",", ":")) if change.values else False
                overrides.append([change.user, body])
                continue
            request, entry = change.request, change.entry
            if change.created:
                if request.id in created:
                    raise ValueError(f"request {request.id} is created twice in one batch")
                if request.idempotency_key is not None:
                    field = _pair(request.user, request.idempotency_key)
                    if field in keys:
                        raise ValueError(f"idempotency key {field} is taken twice in one batch")
                    keys.add(field)
                created[request.id] = request
                limits[request.id] = change.limits
                queue_keys[request.id] = change.queue_key
            if change.claim is not None:
                claims[request.id] = (change.claim, change.charge)
            last[request.id] = request
            entries.append([entry.request_id, str(entry.seq), transition_to_json(entry)])
            charge = change.charge
            if charge is not None:
                check_charge(charge.gpu_seconds)
                field = _pair(charge.user, charge.charge_id)
                charges.append([field, _score(charge.at), _score(charge.gpu_seconds), request.id])
                if request.id in created:
                    charge_fields.setdefault(request.id, []).append(field)
        creations: list[list[Any]] = []
        doubt: list[list[Any]] = []
        for request_id, request in created.items():
            final = last[request_id]
            key = request.idempotency_key
            key_field: str | bool = False if key is None else _pair(request.user, key)
            admission = _pair(request.user, request_id)
            creations.append(
                [
                    request_id,
                    request_fixed_to_json(request),
                    request_state_to_json(final),
                    final.status.value,
                    request.user,
                    _score(request.created_at),
                    request.model,
                    request.priority,
                    key_field,
                    final.status.terminal,
                    admission,
                    str(final.version),
                    _limits(limits[request_id]),
                    False if (qkey := queue_keys[request_id]) is None else _score(qkey),
                ]
            )
            doubt.append(
                [request_id, request.user, key_field, admission, charge_fields.get(request_id, [])]
            )
        updates = [
            [
                request_id,
                final.status.value,
                request_state_to_json(final),
                final.status.terminal,
                str(final.version),
            ]
            for request_id, final in last.items()
            if request_id not in created
        ]
        batch = {
            "c": creations,
            "u": updates,
            "cl": [
                [
                    request_id,
                    [
                        [gpu_id, str(memory_mb), str(limit), str(slots)]
                        for gpu_id, memory_mb, limit, slots in claim.gpus
                    ],
                    False if claim.max_concurrent is None else str(claim.max_concurrent),
                    last[request_id].user,
                    False
                    if claim.gpu_seconds_per_hour is None
                    else _score(claim.gpu_seconds_per_hour),
                    _score(0.0 if charge is None else charge.gpu_seconds),
                    False if charge is None else _pair(charge.user, charge.charge_id),
                ]
                for request_id, (claim, charge) in claims.items()
                if last[request_id].status.active
            ]
            if self.shared
            else [],
            "t": entries,
            "ch": charges,
            "o": overrides,
            "pr": False,
        }
        return batch, doubt

    # Reads -------------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""
        key = self._key("req", request_id)
        fixed, state = self._call(
            "read a request", lambda: self._redis.hmget(key, "fixed", "state")
        )
        return None if fixed is None else request_from_json(fixed, state)

    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""
        request_id = self._call(
            "read an idempotency key", lambda: self._redis.hget(self._key("idem"), _pair(user, key))
        )
        return None if request_id is None else self.get_request(_text(request_id))

    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The request's audit trail, oldest first, after entry ``after``."""
        start = max(after + 1, 0)
        bodies = self._call(
            "read an audit trail",
            lambda: self._redis.lrange(self._key("trail", request_id), start, -1),
        )
        return [entry for entry in map(transition_from_json, bodies) if entry.seq > after]

    def _requests(
        self, ids: Sequence[bytes | str], query: RequestQuery | None = None
    ) -> list[Request]:
        """The stored requests of ``ids``, in that order (those gone meanwhile left out).

        With ``query``, only those its filters (the cursor aside) let through: they are checked
        on the hash's own fields first, so a request filtered out is never decoded.
        """
        if not ids:
            return []

        def read() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.hmget(
                    self._key("req", _text(request_id)),
                    "fixed",
                    "state",
                    "status",
                    "user",
                    "model",
                    "priority",
                )
            return pipe.execute()

        rows = self._call("read requests", read)
        return [
            request_from_json(fixed, state)
            for fixed, state, *fields in rows
            if fixed is not None and (query is None or _passes(query, fields))
        ]

    def list_requests(self, query: RequestQuery) -> Page:
        """Requests matching ``query``, newest first, one page at a time.

        A listing of unfinished statuses only (the queue, what runs) reads the small index of
        unfinished requests; any other walks the user's (or everyone's) creation index newest
        first from the cursor, in chunks, checking the other filters on each request's fields.
        """
        after = decode_cursor(query.cursor) if query.cursor else None
        if query.statuses is not None and not query.statuses:
            return Page(items=[], next_cursor=None)
        if query.statuses is not None and not any(s.terminal for s in query.statuses):
            return self._list_unfinished(query, after)
        index = self._key("user", query.user) if query.user is not None else self._key("created")
        items: list[Request] = []
        for ids in self._walk(index, after):
            for request in self._requests(ids, query):
                items.append(request)
                if len(items) > query.limit:
                    page = items[: query.limit]
                    return Page(items=page, next_cursor=encode_cursor(page[-1]))
        return Page(items=items, next_cursor=None)

    def _list_unfinished(self, query: RequestQuery, after: tuple[float, str] | None) -> Page:
        """A page of unfinished requests, decoding only the page's own.

        They are ordered by their creation times and filtered on their hash fields, all read
        in one pipelined round trip after the index.
        """
        ids = self._call(
            "list requests", lambda: self._redis.zrange(self._key("unfinished"), 0, -1)
        )
        if not ids:
            return Page(items=[], next_cursor=None)

        def read() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zmscore(self._key("created"), ids)
            for request_id in ids:
                pipe.hmget(
                    self._key("req", _text(request_id)), "status", "user", "model", "priority"
                )
            return pipe.execute()

        created, *fields = self._call("list requests", read)
        found = sorted(
            (
                (float(at), _text(request_id))
                for request_id, at, row in zip(ids, created, fields, strict=True)
                if at is not None
                and _passes(query, row)
                and (after is None or (float(at), _text(request_id)) < after)
            ),
            reverse=True,
        )
        page = self._requests([request_id for _, request_id in found[: query.limit]])
        more = len(found) > query.limit and len(page) == query.limit
        return Page(items=page, next_cursor=encode_cursor(page[-1]) if more else None)

    def _walk(self, index: str, after: tuple[float, str] | None) -> Iterator[list[str]]:
        """The ids of a creation index after position ``after``, newest first, in chunks.

        Each chunk starts strictly below the last request seen, by (creation time, id): the
        rest of its creation time's ties, then the next :data:`_LIST_CHUNK` lower times. So
        requests created meanwhile never shift the walk into repeats or gaps.
        """
        position = after
        while True:
            if position is None:
                read: Callable[[], Any] = functools.partial(
                    self._redis.zrevrangebyscore,
                    index,
                    "+inf",
                    "-inf",
                    start=0,
                    num=_LIST_CHUNK,
                    withscores=True,
                )
                rows = [(float(score), _text(m)) for m, score in self._call("list requests", read)]
            else:
                at, seen = position[0], position[1]

                def below(at: float = at) -> Any:
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.zrevrangebyscore(index, _score(at), _score(at))
                    pipe.zrevrangebyscore(
                        index, f"({_score(at)}", "-inf", start=0, num=_LIST_CHUNK, withscores=True
                    )
                    return pipe.execute()

                ties, lower = self._call("list requests", below)
                rows = [(at, rid) for rid in map(_text, ties) if rid < seen]
                rows += [(float(score), _text(member)) for member, score in lower]
            if not rows:
                return
            yield [rid for _, rid in rows]
            position = rows[-1]

    def unfinished_requests(self) -> list[Request]:
        """Every request not yet in a terminal status, oldest first, ties in creation order.

        On a shared prefix: this router's own, once it adopted those of every router whose
        lease had lapsed (the routers that died while none was left to adopt their work).
        """
        if self.shared:
            for router in self._shared_view([], [], commands=0).lapsed:
                self.adopt(router)
            return self.owned()
        index = self._key("unfinished")
        ids = self._call("list unfinished requests", lambda: self._redis.zrange(index, 0, -1))
        requests = [r for r in self._requests(ids) if not r.status.terminal]
        return sorted(requests, key=lambda r: r.created_at)  # stable: creation order

    def owned(self) -> list[Request]:
        """The unfinished requests this router owns on a shared prefix, oldest first.

        Batches in doubt are settled first: what they created was refused to its callers and
        must not be listed as this router's work.
        """
        with self._lock:
            self._settle()
        index = self._key("owned", self.replica)
        ids = self._call("list owned requests", lambda: self._redis.zrange(index, 0, -1))
        requests = [r for r in self._requests(ids) if not r.status.terminal]
        return sorted(requests, key=lambda r: r.created_at)

    # Routers sharing the prefix -----------------------------------------------------------------

    def shared_view(
        self,
        gpu_ids: Sequence[str],
        users: Sequence[str],
        holds: Mapping[str, tuple[str, float]] | None = None,
        charged: Sequence[str] = (),
        heard: Mapping[str, str] | None = None,
        heads: Sequence[QueueHead] | None = None,
    ) -> SharedView:
        """Every router's reservations on ``gpu_ids`` and ``users``' slots, in one script.

        Also takes up to :data:`_COMMANDS` cancellations sent to this router, reads the
        ``charged`` users' charges in the hour, and lists the routers whose lease lapsed, but
        for a lease after this router reached Redis again from an outage: the other routers'
        leases lapsed in it too, and each renews its own (if nobody adopted it) within a second
        of Redis's return.
        """
        return self._shared_view(
            gpu_ids,
            users,
            commands=_COMMANDS,
            holds=holds,
            charged=charged,
            heard=heard,
            heads=heads,
            read_workers=True,
        )

    def _shared_view(
        self,
        gpu_ids: Sequence[str],
        users: Sequence[str],
        *,
        commands: int,
        holds: Mapping[str, tuple[str, float]] | None = None,
        charged: Sequence[str] = (),
        heard: Mapping[str, str] | None = None,
        heads: Sequence[QueueHead] | None = None,
        read_workers: bool = False,
    ) -> SharedView:
        """:meth:`shared_view`, taking up to ``commands`` cancellations (0: none).

        The worker list is read only with ``read_workers`` (else a change of it would be
        counted as read and never reach the runtime's view).
        """
        if self._fenced is not None:
            raise StoreUnavailable(self._fenced)
        ledger, active, taken, lapsed, held, charges, version, listed, others = self._call(
            "read what the other routers hold",
            lambda: self._view(
                args=[
                    self.prefix,
                    self.replica,
                    commands,
                    json.dumps(list(gpu_ids)),
                    json.dumps(list(users)),
                    ""
                    if holds is None
                    else json.dumps({gpu: [rid, _score(at)] for gpu, (rid, at) in holds.items()}),
                    int(HOLD_S * 1000),
                    self._token,
                    json.dumps(list(charged)),
                    json.dumps(dict(heard or {})),
                    self._workers_version,
                    "" if heads is None else json.dumps([_head_to_json(h) for h in heads]),
                ]
            ),
        )
        cancels = []
        for command in taken:
            request_id, actor = json.loads(command)
            cancels.append((request_id, actor))
        return SharedView(
            ledger={
                gpu_id: {_text(held[i]): int(held[i + 1]) for i in range(0, len(held), 2)}
                for gpu_id, held in zip(gpu_ids, ledger, strict=True)
            },
            active={
                user: frozenset(map(_text, members))
                for user, members in zip(users, active, strict=True)
            },
            cancels=cancels,
            held={_text(gpu): float(since) for gpu, since in held},
            charges=[
                hour_charge(_text(user), used, float(oldest) + HOUR_S)
                for user, used, oldest in charges
            ],
            workers=self._workers_read(version, listed) if read_workers else None,
            heads=[_head_from_json(item) for value in others for item in json.loads(value)],
            lapsed=[_text(router) for router in lapsed if _text(router) != self.replica]
            if time.monotonic() - self._up_since >= self.lease_s + self._renew_s
            else [],
        )

    def _workers_read(self, version: bytes, listed: list[bytes]) -> dict[str, str] | None:
        """The worker list of a view (name → URL), if it changed since the last one read."""
        if _text(version) == self._workers_version:
            return None
        self._workers_version = _text(version)
        return {_text(listed[i]): _text(listed[i + 1]) for i in range(0, len(listed), 2)}

    def queue_positions(self, request_ids: Collection[str]) -> dict[str, int]:
        """Each queued request's rank in ``<prefix>:queue`` (one pipelined round trip)."""
        ids = list(request_ids)
        if not ids:
            return {}

        def read() -> list[int | None]:
            pipe = self._redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.zrank(self._key("queue"), request_id)
            return list(pipe.execute())

        ranks = self._call("read queue positions", read)
        return {rid: int(rank) for rid, rank in zip(ids, ranks, strict=True) if rank is not None}

    def poll_turns(self, workers: Mapping[str, int], interval_s: float) -> PollTurns:
        """Take the turns to read ``workers`` nobody holds, and the others' readings (a script)."""
        seconds, micros, mine, found = self._call(
            "take turns to read the workers",
            lambda: self._turns(
                args=[
                    self.prefix,
                    self.replica,
                    max(1, round(interval_s * 1000)),
                    json.dumps(dict(workers)),
                ]
            ),
        )
        now = int(seconds) * 1000 + int(micros) // 1000
        readings = []
        for name, value in found:
            stamp, _, body = _text(value).partition(" ")
            report = json.loads(body)
            readings.append(
                SharedReading(
                    worker=_text(name),
                    stamp=int(stamp),
                    age_s=max(0, now - int(stamp)) / 1000,
                    items=report.get("items"),
                    error=str(report.get("error") or ""),
                )
            )
        return PollTurns(stamp=now, mine=[_text(name) for name in mine], readings=readings)

    def publish_readings(
        self, stamp: int, reports: Mapping[str, list[dict[str, Any]] | str], keep_s: float
    ) -> None:
        """Publish this router's readings of its turns (one script)."""
        pairs: list[str] = []
        for name, report in reports.items():
            body = {"error": report} if isinstance(report, str) else {"items": report}
            pairs += [name, json.dumps(body, ensure_ascii=False, separators=(",", ":"))]
        if pairs:
            self._call(
                "publish readings of the workers",
                lambda: self._publish(
                    args=[self.prefix, stamp, max(1, round(keep_s * 1000)), *pairs]
                ),
            )

    def adopt(self, router: str) -> list[Request]:
        """Take over the unfinished requests of ``router``, whose lease lapsed, oldest first.

        Its lease living, or another router having taken them first, it returns nothing.
        """
        if self._fenced is not None:
            raise StoreUnavailable(self._fenced)
        try:
            ids = self._call(
                "adopt a router's requests",
                lambda: self._adopt(
                    args=[self.prefix, self.replica, router, self._token, self._px]
                ),
            )
        except StoreUnavailable as exc:
            if "FENCED" in exc.message:
                self._fenced = (
                    f"{self._where}: another router adopted this router's requests; it no "
                    "longer writes (restart it)"
                )
            raise
        if ids:
            _log.warning(
                "redis_router_adopted", store=self._where, router=router, requests=len(ids)
            )
        requests = [r for r in self._requests(ids) if not r.status.terminal]
        return sorted(requests, key=lambda r: r.created_at)

    def send_cancel(self, request_id: str, actor: str) -> bool:
        """Pass a cancellation to the router owning an unfinished request (one script)."""
        terminal = [status.value for status in RequestStatus if status.terminal]
        sent = self._call(
            "pass a cancellation on",
            lambda: self._cancel(
                keys=[self.prefix],
                args=[request_id, json.dumps([request_id, actor]), json.dumps(terminal)],
            ),
        )
        return bool(sent)

    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set at run time (in the order users were first set)."""

        def read() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrange(self._key("override_order"), 0, -1)
            pipe.hgetall(self._key("overrides"))
            return pipe.execute()

        order, bodies = self._call("read quota overrides", read)
        values = {_text(user): json.loads(body) for user, body in bodies.items()}
        ordered = [_text(user) for user in order if _text(user) in values]
        return {user: values[user] for user in ordered + sorted(set(values) - set(ordered))}

    def quota_history(
        self, now: float, rate_window_s: float, charge_window_s: float
    ) -> QuotaHistory:
        """The admissions and charges still in their windows at ``now``."""

        def read() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrangebyscore(
                self._key("admissions"), f"({_score(now - rate_window_s)}", "+inf", withscores=True
            )
            pipe.zrangebyscore(
                self._key("charges"), f"({_score(now - charge_window_s)}", "+inf", withscores=True
            )
            pipe.hgetall(self._key("charge_gs"))
            return pipe.execute()

        admissions, charges, amounts = self._call("read the quota windows", read)
        kept_admissions = []
        for member, at in admissions:
            user, request_id = json.loads(member)
            kept_admissions.append((user, float(at), request_id))
        kept_charges = []
        for field, at in charges:
            amount = amounts.get(field)
            if amount is None:
                continue
            user, charge_id = json.loads(field)
            kept_charges.append(Charge(user, charge_id, float(at), float(amount)))
        return QuotaHistory(kept_admissions, kept_charges)

    # Health and lifetime -----------------------------------------------------------------------

    def ping(self) -> None:
        """Return if Redis answers, else raise ``StoreUnavailable``."""
        self._call("answer a ping", self._redis.ping)

    def check_writable(self, now: float) -> None:
        """Raise ``StoreUnavailable`` while writes fail (Redis down, out of memory, fenced).

        The answer is the outcome of the last write, the router's own or a probe; a probe (a
        fenced write of one key) is made when the last is :data:`WRITE_PROBE_INTERVAL_S` old.
        """
        with self._lock:
            if self._closed.is_set():
                raise StoreUnavailable(f"{self._where}: closed")
            failure = self.failure()
            if failure is not None:
                raise StoreUnavailable(failure)
            self._settle()
            if self._probes.due(now):
                try:
                    self._probe(keys=[*self._fence_keys, self._key("probe")], args=self._fence_args)
                    self._write_failure = None
                except redis.RedisError as exc:
                    self._write_failed("write (probe)", exc)
            if self._write_failure is not None:
                raise StoreUnavailable(self._write_failure)

    def close(self) -> None:
        """Take back batches in doubt, stop renewing, give the lease up, drop connections.

        A successor starts at once; later calls raise ``StoreUnavailable``.
        """
        with self._lock:
            if self._closed.is_set():
                return
            with contextlib.suppress(StoreUnavailable):  # else the lease lapses with them
                self._settle()
            self._closed.set()
        self._renewer.join(timeout=SOCKET_TIMEOUT_S * 4)
        if self._fenced is None:
            with contextlib.suppress(redis.RedisError):  # else it lapses by itself
                self._release(keys=self._fence_keys[:1], args=[self._token])
        self._redis.close()


def _limits(limits: Limits | None) -> list[str | bool]:
    """A creation's limits as the write script reads them (``false``: none)."""
    values = (
        (None, None, None, None)
        if limits is None
        else (
            limits.requests_per_minute,
            limits.max_queued,
            limits.max_queued_total,
            None if limits.gpu_seconds_per_hour is None else repr(limits.gpu_seconds_per_hour),
        )
    )
    return [False if value is None else str(value) for value in values]


HOUR_CHARGE_ID = "shared-hour"


def hour_charge(user: str, used: bytes | str | float, leaves_at: bytes | str | float) -> Charge:
    """A user's hour on a shared prefix as one charge, which leaves the hour at ``leaves_at``.

    Its amount is every router's GPU-seconds in the hour; ``leaves_at`` is when the hour has
    room again, or when its oldest charge leaves it. A router counts it instead of the others'
    charges one by one.
    """
    return Charge(user, HOUR_CHARGE_ID, float(leaves_at) - HOUR_S, max(float(used), 0.0))


def _head_to_json(head: QueueHead) -> list[Any]:
    need = {field.name: getattr(head.need, field.name) for field in fields(Need)}
    need.update(avoid=sorted(head.need.avoid), duration_s=dict(head.need.duration_s))
    need.update(task=head.need.task.value)
    return [head.request_id, head.key, need]


def _head_from_json(item: list[Any]) -> QueueHead:
    request_id, key, need = item
    need.update(avoid=frozenset(need["avoid"]), task=Task(need["task"]))
    return QueueHead(request_id, key, Need(**need))


def _refusals(answer: bytes | str) -> list[Refusal]:
    """The refusals of the write script's answer (JSON; empty: none)."""
    if not answer:
        return []
    refusals = []
    for item in json.loads(answer):
        ledger = item.get("ledger")
        active = item.get("active")
        refusals.append(
            Refusal(
                request_id=item["id"],
                kind=item["kind"],
                message=item["message"],
                creation=bool(item.get("creation")),
                retry_after_s=float(item["retry_after"]),
                existing=item.get("existing"),
                limit=None if item.get("limit") is None else int(item["limit"]),
                waiting=None if item.get("waiting") is None else int(item["waiting"]),
                # cjson writes an empty table as {}: a GPU without reservations, no slots
                ledger=None
                if ledger is None
                else {
                    gpu: {rid: int(mb) for rid, mb in (held or {}).items()}
                    for gpu, held in ledger.items()
                },
                active=None if active is None else frozenset(active or ()),
                held=None if item.get("held") is None else frozenset(item["held"]),
                charges=None
                if item.get("used") is None
                else (hour_charge(item["user"], item["used"], item["until_at"]),),
            )
        )
    return refusals


def _passes(query: RequestQuery, fields: Sequence[bytes | None]) -> bool:
    """Whether a request's stored status, user, model and priority pass ``query``'s filters."""
    status, user, model, priority = (None if f is None else f.decode() for f in fields)
    return (
        (query.user is None or user == query.user)
        and (query.statuses is None or any(s.value == status for s in query.statuses))
        and (query.model is None or model == query.model)
        and (query.priority is None or priority == query.priority)
    )


def _pid_of(token: str) -> int | None:
    """The process id in an owner token (``host:pid:nonce``), if it holds one."""
    parts = token.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
