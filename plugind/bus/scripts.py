"""Lua scripts for the steps that must be atomic (docs/architecture.md, "Delivery guarantees").

Redis runs a script without interleaving other commands, so "mark done if absent, append the
terminal event, acknowledge" cannot be split by a racing consumer or a crash: either all of it
happened or none of it did. All keys share the namespace hash tag, so this is legal on a cluster.
"""

from __future__ import annotations

from typing import Final

# One request's terminal commit, as a Lua function the two scripts below share.
# Returns the event's stream id, or false when the request had already ended (only XACKed).
_COMMIT_FUNCTION: Final = """
local function commit(stream, events, done, installed, out, group, entry, event, ttl, marker,
                      op, field, value, out_ttl)
  if marker == '1' then
    if redis.call('EXISTS', done) == 1 then
      redis.call('XACK', stream, group, entry)
      return false
    end
  elseif redis.call('XACK', stream, group, entry) == 0 then
    return false
  end
  local id = redis.call('XADD', events, '*', 'event', event)
  if marker == '1' then
    redis.call('SET', done, id, 'EX', tonumber(ttl))
    redis.call('XACK', stream, group, entry)
  end
  if op == 'set' then
    redis.call('HSET', installed, field, value)
  elseif op == 'del' then
    redis.call('HDEL', installed, field)
  end
  if out_ttl ~= '0' then
    redis.call('XADD', out, '*', 'end', event)
    redis.call('EXPIRE', out, tonumber(out_ttl))
  end
  return id
end
"""

# KEYS: 1 command stream, 2 events stream, 3 done marker, 4 installed registry, 5 output stream
# ARGV: 1 group, 2 entry id, 3 event json, 4 dedupe ttl (s), 5 use marker ("1"/"0"),
#       6 registry op (""/"set"/"del"), 7 registry field, 8 registry value, 9 output ttl ("0": none)
# Returns the event's stream id, or false when the request had already ended (only XACKed).
TERMINAL_COMMIT: Final = (
    _COMMIT_FUNCTION
    + """
return commit(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
              ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
"""
)

TERMINAL_COMMIT_KEYS: Final = 5
TERMINAL_COMMIT_ARGS: Final = 9

# The terminal commits of several requests in one call: KEYS and ARGV are those of
# TERMINAL_COMMIT for each request in turn (5 keys and 9 arguments each). Each request is
# committed exactly as TERMINAL_COMMIT would, in order; the whole call is atomic too. Returns one
# reply per request: its event's stream id, or 0 when it had already ended.
TERMINAL_COMMIT_MANY: Final = (
    _COMMIT_FUNCTION
    + """
local replies = {}
for i = 0, #KEYS / 5 - 1 do
  local k, a = i * 5, i * 9
  replies[i + 1] = commit(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
                          ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5],
                          ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]) or 0
end
return replies
"""
)

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
