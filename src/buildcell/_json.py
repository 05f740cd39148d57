"""Strict JSON parsing helpers shared by the parsers of untrusted documents."""

from __future__ import annotations

from typing import Any

__all__ = ["DuplicateKeyError", "reject_duplicate_keys"]


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key (``key`` says which)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key[:60]!r}")
        self.key = key


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses repeated keys.

    Two parsers may keep different copies of a duplicated key (first or last wins), so a
    document that is signed or pinned by digest must be unambiguous.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result
