-- Reserve one unit on each counter of a recipient, or on none (SPEC 3.4), for each of a batch
-- of reservations in order: the answer is what they would get one script each, one after the
-- other. Atomic.
-- ARGV: now_ms, then per reservation: hold, expiry_ms, number of counters; then per counter:
--       max, window_ms, bucket_ms, enforce (1/0), member ('' unless unique counting).
-- KEYS per counter: counts (hash bucket -> settled units), held (zset hold -> expiry_ms);
--       with a member also a scratch key and the window's 24 HyperLogLogs, oldest first.
-- Returns, per reservation in order, {0, reserved per counter (1/0)...} or {index of the
-- counter at its limit}, flattened into one list.
-- A batch reads each key once: the expired holds of a sorted set are removed and its size
-- read at its first use, then kept current as holds are added; a hash of settled units is
-- summed at its first use (nothing in a reservation changes it); each sorted set's expiry is
-- extended once, at the end.
local now = tonumber(ARGV[1])
local out = {}
local held_size, settled, latest, extended = {}, {}, {}, {}
local a, k = 2, 1
while a <= #ARGV do
  local hold, expiry, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local reserved, held_keys, refused = {}, {}, nil
  for c = 1, n do
    local max, bucket = tonumber(ARGV[a]), tonumber(ARGV[a + 2])
    local enforce, member = ARGV[a + 3] == '1', ARGV[a + 4]
    a = a + 5
    local counts, held = KEYS[k], KEYS[k + 1]
    k = k + 2
    local hlls = nil
    if member ~= '' then
      hlls = k
      k = k + 25
    end
    -- After a refusal the reservation's other counters are not looked at (their keys and
    -- arguments are still stepped over).
    if refused == nil then
      if held_size[held] == nil then
        redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
        held_size[held] = redis.call('ZCARD', held)
      end
      local used = held_size[held]
      local needed = true
      if hlls then
        local scratch = KEYS[hlls]
        local window = {}
        for i = 1, 24 do window[i] = KEYS[hlls + i] end
        redis.call('PFMERGE', scratch, unpack(window))
        needed = redis.call('PFADD', scratch, member) == 1
        local distinct = redis.call('PFCOUNT', scratch)
        if needed then distinct = distinct - 1 end
        used = used + distinct
        redis.call('DEL', scratch)
      else
        if settled[counts] == nil then
          local first = math.floor(now / bucket) - 23
          local sum = 0
          local fields = redis.call('HGETALL', counts)
          for i = 1, #fields, 2 do
            if tonumber(fields[i]) < first then
              redis.call('HDEL', counts, fields[i])
            else
              sum = sum + tonumber(fields[i + 1])
            end
          end
          settled[counts] = sum
        end
        used = used + settled[counts]
      end
      if enforce and needed and used >= max then
        refused = c
      else
        reserved[c] = needed and 1 or 0
        if needed then held_keys[#held_keys + 1] = held end
      end
    end
  end
  if refused then
    out[#out + 1] = refused
  else
    out[#out + 1] = 0
    for c = 1, n do out[#out + 1] = reserved[c] end
    for _, held in ipairs(held_keys) do
      redis.call('ZADD', held, expiry, hold)
      held_size[held] = held_size[held] + 1
      if latest[held] == nil then extended[#extended + 1] = held end
      latest[held] = math.max(latest[held] or 0, expiry)
    end
  end
end
for _, held in ipairs(extended) do
  if redis.call('PTTL', held) < latest[held] + 1000 - now then
    redis.call('PEXPIREAT', held, latest[held] + 1000)
  end
end
return out
