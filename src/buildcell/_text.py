"""How untrusted values appear in messages: one line, escaped, never a wall."""

from __future__ import annotations

from pathlib import PurePath

__all__ = ["printable", "show"]


def show(value: object, limit: int | None = 80) -> str:
    """``repr`` of ``value`` (a path as its text), a string cut after ``limit`` characters.

    ``repr`` escapes newlines, control characters and undecodable bytes, so a name chosen
    by an attacker can neither break a message into lines nor hide in it; ``...`` after
    the closing quote says that the string was cut.
    """
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str) and limit is not None and len(value) > limit:
        return repr(value[:limit]) + "..."
    text = repr(value)
    if limit is not None and len(text) > limit + 2:
        return text[:limit] + "..."
    return text


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on escaped (``\\n``, ``\\x1b``):
    for names an attacker chose, shown in tables and lines of buildcell's own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
