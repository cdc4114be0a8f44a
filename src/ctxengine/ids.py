"""Generated identifiers: time-ordered and unique (UUIDv7 layout)."""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_last_seq = 0


def new_id() -> str:
    """A UUIDv7 string: 48 bits of Unix milliseconds, a 12-bit sequence, 62 random bits.

    Identifiers made by one process sort in the order they were made, also within one
    millisecond: the sequence counts up from a random start (RFC 9562, method 1),
    borrowing the next millisecond when it runs out.
    """
    global _last_ms, _last_seq
    rand = int.from_bytes(os.urandom(8), "big")
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            seq = (rand >> 62) << 9  # a random start in the lower half of the range
        else:
            ms, seq = _last_ms, _last_seq + 1
            if seq > 0xFFF:
                ms, seq = ms + 1, 0
        _last_ms, _last_seq = ms, seq
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= seq << 64
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
