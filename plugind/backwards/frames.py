"""Dify's length-prefixed frames: how its inner API streams an answer (pure, no I/O).

Each frame is a 4-byte prefix (magic ``0x0F``, a reserved byte, the header length as a
little-endian u16, always 10), the header (the data length as a little-endian u32, then 6
reserved bytes) and the data: one JSON object ``{"data": ..., "error": "..."}``. dify-api labels
the answer ``text/event-stream`` all the same (``libs/helper.py``: ``length_prefixed_response``).
"""

from __future__ import annotations

import struct
from typing import Final

from plugind.backwards.errors import FrameError

MAGIC: Final = 0x0F
HEADER_LENGTH: Final = 0x0A
_PREFIX: Final = struct.Struct("<BBH")
_LENGTH: Final = struct.Struct("<I")


def encode_frame(data: bytes, *, magic: int = MAGIC) -> bytes:
    """One frame around ``data``, as dify-api writes it (for tests and fakes)."""
    return _PREFIX.pack(magic, 0, HEADER_LENGTH) + _LENGTH.pack(len(data)) + bytes(6) + data


class FrameDecoder:
    """Splits a byte stream into the data of its frames, whatever the reads' boundaries."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every frame completed by ``chunk``; raises :class:`FrameError`."""
        buffer = self._buffer
        buffer += chunk
        out: list[bytes] = []
        start = 0
        while len(buffer) - start >= 4:
            magic, _reserved, header_length = _PREFIX.unpack_from(buffer, start)
            if magic != MAGIC:
                raise FrameError(
                    f"not a Dify frame: magic byte {magic:#04x}, expected {MAGIC:#04x}"
                )
            if header_length < _LENGTH.size:
                raise FrameError(f"a Dify frame header of {header_length} bytes is too short")
            if len(buffer) - start < 4 + header_length:
                break
            (length,) = _LENGTH.unpack_from(buffer, start + 4)
            if length > self.max_frame:
                raise FrameError(
                    f"a Dify frame of {length} bytes is over the {self.max_frame}-byte limit"
                )
            end = start + 4 + header_length + length
            if len(buffer) < end:
                break
            out.append(bytes(buffer[start + 4 + header_length : end]))
            start = end
        del buffer[:start]
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet (not zero at the end: the answer was cut off)."""
        return len(self._buffer)
