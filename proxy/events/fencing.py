"""Fenced writes: Redis commands that run only while the caller still holds the fleet's lease.

A forwarder that was frozen (SIGSTOP, a long pause, a partition) may wake up after another
instance took the lease over. Whatever it then writes for the pipeline (the fallback list, the
done markers, the checkpoint markers) must not land: each such write goes to Redis as one
``EVAL`` of :data:`FENCED`, which compares the lease key with the caller's holder value
(``<instance> <token>``) and runs the commands only when they match, atomically. In cluster mode
the lease key shares the fallback list's hash tag, so the script's keys live on one slot.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Command", "FENCED", "fenced"]

Command = Sequence[bytes | str | int]

# KEYS: lease, then the keys the commands touch. ARGV: holder value, then per command its
# argument count and arguments. Runs the commands only while the lease is the caller's.
FENCED = b"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease of this forwarder is gone')
end
local out = {}
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  out[#out + 1] = redis.pcall(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return out
"""


def fenced(lease: bytes, holder: bytes, keys: Sequence[bytes], commands: Sequence[Command]) -> Command:
    """One ``EVAL`` running ``commands`` only while ``lease`` holds ``holder`` (its reply: theirs)."""
    argv: list[bytes | str | int] = [holder]
    for command in commands:
        argv.append(len(command))
        argv.extend(command)
    return (b"EVAL", FENCED, 1 + len(keys), lease, *keys, *argv)
