-- Extend an open hold on each of its counters, or on none: it must still be held (not
-- expired, not ended) on all of them. Atomic.
-- ARGV: now_ms, hold, expiry_ms. KEYS: the held sorted set of each counter it reserved on.
-- Returns 1 when extended, 0 when the hold is gone.
local now, hold, expiry = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for _, held in ipairs(KEYS) do
  local score = redis.call('ZSCORE', held, hold)
  if not score or tonumber(score) <= now then return 0 end
end
for _, held in ipairs(KEYS) do
  redis.call('ZADD', held, expiry, hold)
  if redis.call('PTTL', held) < expiry + 1000 - now then
    redis.call('PEXPIREAT', held, expiry + 1000)
  end
end
return 1
