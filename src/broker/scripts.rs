//! Lua scripts that make multi-step broker operations atomic.
//!
//! kombu pops with BRPOP and then records the message in `unacked` with a
//! second command, so a worker (or connection) dying between the two loses
//! the message. While messages are waiting we instead pop and record in
//! one script: either both happen or neither does. Only the idle wake-up
//! (BRPOP, which Lua cannot do) keeps kombu's window.

use std::sync::LazyLock;

use redis::Script;

/// Pops up to `max` messages, fairly across queues, and records each in
/// `unacked`/`unacked_index` exactly as kombu does — or, if it is not a
/// kombu envelope at all, moves it to the dead-letter list. Also reserves
/// one message already popped by BRPOP (ARGV[5], from list ARGV[6]).
///
/// KEYS: unacked, unacked_index, dead_letter, then the queue lists
/// step-major (see `keys::consume_keys`).
/// ARGV: now (the lease score, `lease_score`), max, number of queues, worker name, preset message, preset
/// list index (1-based), dead-letter cap (0 = none), a random hex nonce
/// the dead-letter record ids are derived from.
/// Returns a flat array: first how many old dead-letter records the cap
/// trimmed, then (queue index 1-based, message, 1 reserved |
/// 0 dead-lettered, delivery tag or '', exchange, routing key) per item —
/// the tag, exchange and routing key it recorded in `unacked`.
///
/// Decoding the whole envelope with `cjson` was about 6 µs of Redis time
/// per message, the largest single cost of a reservation. kombu writes
/// `properties` last, with `delivery_tag` as its last key, so the tag is
/// read from the end of the text and `delivery_info` just before it with
/// plain (not pattern) searches, when the values hold no quote or
/// backslash. Anything else takes the `cjson` path. The text search can be
/// fooled by a layout kombu never writes (another object ending the
/// envelope with a `delivery_tag` key): the caller parses every message
/// anyway, compares what was recorded, and re-records it if they differ.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = ARGV[1]
local max = tonumber(ARGV[2])
local nq = tonumber(ARGV[3])
local nlists = #KEYS - 3
local nsteps = nlists / nq
local order = {}
for q = 1, nq do order[q] = q end
-- out[1]: dead-letter records trimmed by the cap (see the end).
local out = {0}
local count = 0
local dl_max = tonumber(ARGV[7]) or 0
local dl_written = 0

local find, sub = string.find, string.sub
local TAG_KEY = '"delivery_tag": "'
local INFO_KEY = '"delivery_info": {"exchange": "'
local RK_KEY = '", "routing_key": "'

-- A plain JSON string value starting at i: its text up to the closing
-- quote, if it holds no backslash (so text and value are the same).
local function plain_string(msg, i)
  local e = find(msg, '"', i, true)
  if not e then return nil end
  local v = sub(msg, i, e - 1)
  if find(v, '\\', 1, true) then return nil end
  return v, e
end

-- kombu's layout: ... "delivery_info": {"exchange": "E", "routing_key": "R"},
-- ... "delivery_tag": "T"}} at the very end.
local function fast_fields(msg)
  local n = #msg
  if sub(msg, n - 2) ~= '"}}' then return nil end
  local from = n - 300
  if from < 1 then from = 1 end
  local t = find(msg, TAG_KEY, from, true)
  if not t then return nil end
  local before = sub(msg, t - 1, t - 1)
  if before ~= ' ' and before ~= '{' then return nil end
  local tag, te = plain_string(msg, t + #TAG_KEY)
  if not tag or te ~= n - 2 or tag == '' then return nil end
  local from2 = t - 600
  if from2 < 1 then from2 = 1 end
  local d = find(msg, INFO_KEY, from2, true)
  if not d or d > t then return nil end
  local ex, ee = plain_string(msg, d + #INFO_KEY)
  if not ex or sub(msg, ee, ee + #RK_KEY - 1) ~= RK_KEY then return nil end
  local rk, re = plain_string(msg, ee + #RK_KEY)
  if not rk or sub(msg, re, re + 1) ~= '"}' then return nil end
  return tag, '"' .. ex .. '"', '"' .. rk .. '"', ex, rk
end

local function reserve(list_index, msg)
  local q = ((list_index - 1) % nq) + 1
  local tag, ex_json, rk_json, ex, rk = fast_fields(msg)
  local ok, env = true, nil
  if not tag then
    ex, rk = '', ''
    ok, env = pcall(cjson.decode, msg)
    if ok and type(env) == 'table' and type(env['properties']) == 'table' and type(env['body']) == 'string' then
      local p = env['properties']
      tag = p['delivery_tag']
      local di = p['delivery_info']
      if type(di) == 'table' then
        if type(di['exchange']) == 'string' then ex = di['exchange'] end
        if type(di['routing_key']) == 'string' then rk = di['routing_key'] end
      end
    end
    ex_json, rk_json = cjson.encode(ex), cjson.encode(rk)
  end
  if type(tag) == 'string' and tag ~= '' then
    redis.call('ZADD', KEYS[2], now, tag)
    redis.call('HSET', KEYS[1], tag, '[' .. msg .. ', ' .. ex_json .. ', ' .. rk_json .. ']')
    out[#out + 1] = q; out[#out + 1] = msg; out[#out + 1] = 1; out[#out + 1] = tag
    out[#out + 1] = ex; out[#out + 1] = rk
  else
    local reason
    if not ok then reason = 'envelope is not JSON'
    elseif type(env) ~= 'table' then reason = 'envelope is not a JSON object'
    elseif type(env['body']) ~= 'string' then reason = 'envelope has no string body'
    else reason = 'envelope has no properties.delivery_tag' end
    -- A unique id without a random source in Lua: the caller's nonce
    -- and the record's position in this call.
    dl_written = dl_written + 1
    local id = sub(redis.sha1hex(ARGV[8] .. ':' .. dl_written), 1, 32)
    redis.call('LPUSH', KEYS[3], cjson.encode({id = id, reason = reason, queue = KEYS[3 + list_index],
      received_at = tonumber(now), worker = ARGV[4], raw = msg}))
    out[#out + 1] = q; out[#out + 1] = msg; out[#out + 1] = 0; out[#out + 1] = ''
    out[#out + 1] = ''; out[#out + 1] = ''
  end
  count = count + 1
  for i = 1, nq do
    if order[i] == q then table.remove(order, i); break end
  end
  order[#order + 1] = q
end

if ARGV[5] ~= '' then reserve(tonumber(ARGV[6]), ARGV[5]) end

while count < max do
  local got = false
  for s = 0, nsteps - 1 do
    for _, q in ipairs(order) do
      local idx = s * nq + q
      local msg = redis.call('RPOP', KEYS[3 + idx])
      if msg then reserve(idx, msg); got = true; break end
    end
    if got then break end
  end
  if not got then break end
end
-- The cap, in the same atomic step as the pushes: keep the newest.
if dl_written > 0 and dl_max > 0 then
  local len = redis.call('LLEN', KEYS[3])
  if len > dl_max then
    redis.call('LTRIM', KEYS[3], 0, dl_max - 1)
    out[1] = len - dl_max
  end
end
return out
"#,
    )
});

/// Puts an unacked message back on its queue(s), but only if the stored
/// entry is still the one we read (a compare-and-swap standing in for
/// kombu's WATCH/MULTI, which a multiplexed connection cannot do).
///
/// KEYS: unacked, unacked_index, destination lists...
/// ARGV: tag, expected unacked value, message to push, 'R' (RPUSH, next
/// to be consumed: restore) or 'L' (LPUSH, back of the queue: requeue).
/// Returns 1 restored, 0 entry already gone, -1 entry changed.
pub static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if cur ~= ARGV[2] then return -1 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
for i = 3, #KEYS do
  if ARGV[4] == 'L' then
    redis.call('LPUSH', KEYS[i], ARGV[3])
  else
    redis.call('RPUSH', KEYS[i], ARGV[3])
  end
end
return 1
"#,
    )
});

/// Moves an unacked message to the dead-letter list, but only while it is
/// still ours: if a sweep (ours or another worker's) restored it in the
/// meantime it is back on its queue and will be delivered again, and
/// dead-lettering it too would leave one message in two places.
/// The list is trimmed to the newest `cap` records in the same step.
/// KEYS: unacked, unacked_index, dead_letter. ARGV: tag, record, cap
/// (0 = none).
/// Returns {1, records trimmed} when dead-lettered, {0, 0} when the
/// message was no longer ours.
pub static DEAD_LETTER_OWNED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {0, 0} end
local len = redis.call('LPUSH', KEYS[3], ARGV[2])
local max = tonumber(ARGV[3]) or 0
if max > 0 and len > max then
  redis.call('LTRIM', KEYS[3], 0, max - 1)
  return {1, len - max}
end
return {1, 0}
"#,
    )
});

/// Moves an unacked message to the ETA parking set (score = due time).
/// KEYS: unacked, unacked_index, eta set. ARGV: tag, due epoch, member.
/// Returns 1 when parked, 0 when the message was no longer ours.
pub static PARK_ETA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// Moves parked ETA messages that are due (or nearly) back to the consuming
/// end of their queue. Safe to run from many workers at once.
/// KEYS: eta set. ARGV: due-before epoch, max count.
/// Members are JSON `[list_key, message]`.
pub static RELEASE_DUE_ETA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local ok, entry = pcall(cjson.decode, member)
  if ok and type(entry) == 'table' and type(entry[1]) == 'string' and type(entry[2]) == 'string' then
    redis.call('RPUSH', entry[1], entry[2])
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"#,
    )
});

/// Releases the sweep mutex only if we still hold it (redis-py's Lock).
/// KEYS: mutex. ARGV: token.
pub static RELEASE_MUTEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});
