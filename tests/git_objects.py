"""Git object databases made by hand at test time: packs, deltas and ids.

Shared by the reader's unit tests and the attacks on it, which craft databases that loop,
explode or lie.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

__all__ = ["Entry", "delta", "oid_of", "write_pack"]


def _entry_header(kind: int, size: int) -> bytes:
    out = [(kind << 4) | (size & 0x0F)]
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


def _ofs(distance: int) -> bytes:
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.insert(0, 0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def delta(base_size: int, result_size: int, ops: bytes) -> bytes:
    return _varint(base_size) + _varint(result_size) + ops


Entry = tuple[bytes, int, bytes, "int | bytes | None"]  # oid, kind, payload, base


def write_pack(objects: Path, entries: list[Entry], *, large: bool = False) -> None:
    """A pack and its version 2 index. ``base`` is an entry index (OFS_DELTA) or an oid
    (REF_DELTA). With ``large`` every offset goes through the 64-bit table."""
    hash_len = len(entries[0][0])
    body = bytearray(b"PACK" + struct.pack(">II", 2, len(entries)))
    offsets: list[int] = []
    for _oid, kind, payload, base in entries:
        offsets.append(len(body))
        if isinstance(base, int):
            header = _entry_header(6, len(payload)) + _ofs(offsets[-1] - offsets[base])
        elif isinstance(base, bytes):
            header = _entry_header(7, len(payload)) + base
        else:
            header = _entry_header(kind, len(payload))
        body += header + zlib.compress(payload)
    body += b"\0" * hash_len
    order = sorted(range(len(entries)), key=lambda i: entries[i][0])
    fanout = [0] * 256
    for i in order:
        fanout[entries[i][0][0]] += 1
    for b in range(1, 256):
        fanout[b] += fanout[b - 1]
    idx = bytearray(b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *fanout))
    for i in order:
        idx += entries[i][0]
    idx += b"\0\0\0\0" * len(entries)
    for n, i in enumerate(order):
        idx += struct.pack(">I", 0x80000000 | n) if large else struct.pack(">I", offsets[i])
    if large:
        for i in order:
            idx += struct.pack(">Q", offsets[i])
    idx += b"\0" * (2 * hash_len)
    name = (
        hashlib.sha1(bytes(body), usedforsecurity=False).hexdigest() if hash_len == 20 else "a" * 64
    )
    pack_dir = objects / "pack"
    pack_dir.mkdir(parents=True, exist_ok=True)
    (pack_dir / f"pack-{name}.pack").write_bytes(body)
    (pack_dir / f"pack-{name}.idx").write_bytes(idx)


def oid_of(kind: str, data: bytes, algorithm: str = "sha1") -> bytes:
    return hashlib.new(algorithm, f"{kind} {len(data)}\0".encode() + data).digest()
