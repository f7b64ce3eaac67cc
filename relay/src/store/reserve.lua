-- Reserve one unit on each counter of a recipient, or on none (SPEC 3.4). Atomic.
-- ARGV: now_ms, hold, expiry_ms, then per counter: max, window_ms, bucket_ms, enforce (1/0),
--       member ('' unless unique counting).
-- KEYS per counter: counts (hash bucket -> settled units), held (zset hold -> expiry_ms);
--       with a member also a scratch key and the window's 24 HyperLogLogs, oldest first.
-- Returns {0, reserved per counter (1/0)...}, or {index of the counter at its limit}.
local now = tonumber(ARGV[1])
local hold = ARGV[2]
local expiry = tonumber(ARGV[3])
local a, k, c = 4, 1, 0
local reserved, held_keys = {}, {}
while a <= #ARGV do
  c = c + 1
  local max, bucket = tonumber(ARGV[a]), tonumber(ARGV[a + 2])
  local enforce, member = ARGV[a + 3] == '1', ARGV[a + 4]
  a = a + 5
  local counts, held = KEYS[k], KEYS[k + 1]
  k = k + 2
  redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
  local used = redis.call('ZCARD', held)
  local needed = true
  if member ~= '' then
    local scratch = KEYS[k]
    local hlls = {}
    for i = 1, 24 do hlls[i] = KEYS[k + i] end
    k = k + 25
    redis.call('PFMERGE', scratch, unpack(hlls))
    needed = redis.call('PFADD', scratch, member) == 1
    local distinct = redis.call('PFCOUNT', scratch)
    if needed then distinct = distinct - 1 end
    used = used + distinct
    redis.call('DEL', scratch)
  else
    local first = math.floor(now / bucket) - 23
    local fields = redis.call('HGETALL', counts)
    for i = 1, #fields, 2 do
      if tonumber(fields[i]) < first then
        redis.call('HDEL', counts, fields[i])
      else
        used = used + tonumber(fields[i + 1])
      end
    end
  end
  if enforce and needed and used >= max then
    return {c}
  end
  reserved[c] = needed and 1 or 0
  if needed then held_keys[#held_keys + 1] = held end
end
for _, held in ipairs(held_keys) do
  redis.call('ZADD', held, expiry, hold)
  if redis.call('PTTL', held) < expiry + 1000 - now then
    redis.call('PEXPIREAT', held, expiry + 1000)
  end
end
return {0, unpack(reserved)}
