"""Lua scripts for the steps that must be atomic (docs/architecture.md, "Delivery guarantees").

Redis runs a script without interleaving other commands, so "mark done if absent, append the
terminal event, acknowledge" cannot be split by a racing consumer or a crash: either all of it
happened or none of it did. All keys share the namespace hash tag, so this is legal on a cluster.
"""

from __future__ import annotations

from typing import Final

# KEYS: 1 command stream, 2 events stream, 3 done marker, 4 installed registry, 5 output stream
# ARGV: 1 group, 2 entry id, 3 event json, 4 dedupe ttl (s), 5 use marker ("1"/"0"),
#       6 registry op (""/"set"/"del"), 7 registry field, 8 registry value, 9 output ttl ("0": none)
# Returns the event's stream id, or false when the request had already ended (only XACKed).
TERMINAL_COMMIT: Final = """
local stream, events, done, installed, out = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, entry, event = ARGV[1], ARGV[2], ARGV[3]
if ARGV[5] == '1' then
  if redis.call('EXISTS', done) == 1 then
    redis.call('XACK', stream, group, entry)
    return false
  end
elseif redis.call('XACK', stream, group, entry) == 0 then
  return false
end
local id = redis.call('XADD', events, '*', 'event', event)
if ARGV[5] == '1' then
  redis.call('SET', done, id, 'EX', tonumber(ARGV[4]))
  redis.call('XACK', stream, group, entry)
end
if ARGV[6] == 'set' then
  redis.call('HSET', installed, ARGV[7], ARGV[8])
elseif ARGV[6] == 'del' then
  redis.call('HDEL', installed, ARGV[7])
end
if ARGV[9] ~= '0' then
  redis.call('XADD', out, '*', 'end', event)
  redis.call('EXPIRE', out, tonumber(ARGV[9]))
end
return id
"""

# KEYS: 1 command stream, 2 events stream, 3 done marker, 4 dead-letter stream
# ARGV: 1 group, 2 entry id, 3 event json, 4 dedupe ttl, 5 use marker, 6 original fields json,
#       7 deliveries, 8 error json
# Moves an entry to the dead letters exactly once: the XACK result gates the whole step.
DEAD_LETTER: Final = """
local stream, events, done, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, entry = ARGV[1], ARGV[2]
if redis.call('XACK', stream, group, entry) == 0 then
  return false
end
redis.call('XADD', dead, '*', 'stream', stream, 'entry_id', entry, 'fields', ARGV[6],
  'deliveries', ARGV[7], 'error', ARGV[8])
if ARGV[5] == '1' and redis.call('EXISTS', done) == 1 then
  return false
end
local id = redis.call('XADD', events, '*', 'event', ARGV[3])
if ARGV[5] == '1' then
  redis.call('SET', done, id, 'EX', tonumber(ARGV[4]))
end
return id
"""
