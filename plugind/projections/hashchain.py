"""The event log's hash chain: each row's hash covers the previous hash and the row's event.

``hash = sha256(previous_hash ‖ canonical_event_bytes)``, starting from 32 zero bytes. The
canonical bytes are the stored event (``payload``) re-encoded with sorted keys and no whitespace,
so anyone can recompute the chain from ``event_log`` alone: editing, dropping or reordering a row
breaks every hash after it.

The projector canonicalises the event *as Postgres stores it* (jsonb normalises numbers, e.g.
``1e16`` comes back as ``10000000000000000``), which is exactly what a verifier reads back later.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from typing import Final, NamedTuple

import orjson

from plugind.projections._db import Conn

GENESIS: Final = bytes(32)


def canonical(event_json: bytes | str) -> bytes:
    """``event_json`` re-encoded with sorted keys and no whitespace."""
    return orjson.dumps(orjson.loads(event_json), option=orjson.OPT_SORT_KEYS)


def chain_hash(prev: bytes, event_json: bytes | str) -> bytes:
    """The hash of the row holding ``event_json`` whose predecessor's hash is ``prev``."""
    return chain_hash_canonical(prev, canonical(event_json))


def chain_hash_canonical(prev: bytes, canonical_bytes: bytes) -> bytes:
    """:func:`chain_hash` of an event whose :func:`canonical` bytes are already known."""
    if len(prev) != 32:
        raise ValueError(f"previous hash must be 32 bytes, got {len(prev)}")
    return hashlib.sha256(prev + canonical_bytes).digest()


class ChainRow(NamedTuple):
    position: int
    payload: bytes | str
    hash: bytes


class VerifyResult(NamedTuple):
    ok: bool
    checked: int
    head_position: int
    head_hash: bytes
    bad_position: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head_position": self.head_position,
            "head_hash": self.head_hash.hex(),
            "bad_position": self.bad_position,
            "reason": self.reason,
        }


def verify_chain(
    rows: Iterable[ChainRow | tuple[int, bytes | str, bytes]],
    *,
    prev_hash: bytes = GENESIS,
    prev_position: int = 0,
) -> VerifyResult:
    """Check that ``rows`` (by position) extend the chain ending at ``prev_position``.

    Stops at the first problem: a position gap, a payload that is not JSON, or a hash mismatch.
    Pass the returned head back in to verify a long log batch by batch.
    """
    checked = 0
    for position, payload, stored in rows:
        if position != prev_position + 1:
            return VerifyResult(
                False,
                checked,
                prev_position,
                prev_hash,
                position,
                f"position {position} follows {prev_position}: the log has a gap",
            )
        try:
            expected = chain_hash(prev_hash, payload)
        except orjson.JSONDecodeError as exc:
            return VerifyResult(
                False, checked, prev_position, prev_hash, position, f"payload is not JSON: {exc}"
            )
        if bytes(stored) != expected:
            return VerifyResult(
                False,
                checked,
                prev_position,
                prev_hash,
                position,
                f"hash mismatch at position {position}: stored {bytes(stored).hex()}, "
                f"computed {expected.hex()}",
            )
        prev_position, prev_hash = position, expected
        checked += 1
    return VerifyResult(True, checked, prev_position, prev_hash)


async def _chain_rows(conn: Conn, batch_size: int) -> AsyncIterator[list[ChainRow]]:
    after = 0
    while True:
        records = await conn.fetch(
            "SELECT position, payload::text AS payload, hash FROM event_log"
            " WHERE position > $1 ORDER BY position LIMIT $2",
            after,
            batch_size,
        )
        if not records:
            return
        yield [ChainRow(r["position"], r["payload"], r["hash"]) for r in records]
        after = records[-1]["position"]


async def verify_event_log(
    conn: Conn, *, checkpoint: str | None = "event_log", batch_size: int = 5000
) -> VerifyResult:
    """Verify the whole ``event_log`` from genesis, and that ``checkpoint``'s head matches it."""
    result = VerifyResult(True, 0, 0, GENESIS)
    async for rows in _chain_rows(conn, batch_size):
        step = verify_chain(rows, prev_hash=result.head_hash, prev_position=result.head_position)
        result = step._replace(checked=result.checked + step.checked)
        if not result.ok:
            return result
    if checkpoint is not None:
        row = await conn.fetchrow(
            "SELECT last_position, head_hash FROM projection_checkpoints WHERE name = $1",
            checkpoint,
        )
        if row is not None and (
            row["last_position"] != result.head_position
            or bytes(row["head_hash"]) != result.head_hash
        ):
            return result._replace(
                ok=False,
                reason=f"checkpoint {checkpoint!r} is at position {row['last_position']} "
                f"({bytes(row['head_hash']).hex()}), the log ends at {result.head_position} "
                f"({result.head_hash.hex()})",
            )
    return result
