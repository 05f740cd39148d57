"""The audit trail: one JSON object per line, each with ``ts``, ``build``, ``step`` and ``event``.

Events never carry secret values; callers pass names and digests only.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from buildcell._fs import Closing
from buildcell.errors import ConfigError, Error

__all__ = ["EventLog", "utc_now"]


def utc_now() -> str:
    """The current time as RFC 3339 UTC with milliseconds, the format of every ``ts``."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class EventLog(Closing):
    """Appends events to a JSON Lines file (or nowhere) and to in-process subscribers.

    Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so lines
    from concurrent cells sharing one file never interleave.

    A line that cannot be written (a full disk) does not raise where the event happened,
    which may be the middle of a cell's teardown: the log stops writing, keeps the error
    in :attr:`write_error`, and :meth:`check` raises it where the caller can stop cleanly.
    Subscribers still get every event.

    Args:
        path: the JSON Lines file, or ``None`` to keep events in-process only.
        build: the build id stamped on every event.
    """

    def __init__(self, path: Path | None = None, *, build: str) -> None:
        self.build = build
        self.path = path
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._fd: int | None = None
        #: why the file stopped being written, if it did
        self.write_error: Error | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # O_NOFOLLOW: an events file is never written through a symlink.
                self._fd = os.open(
                    path,
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as e:
                raise ConfigError(f"cannot write events to {path}: {e.strerror}") from e

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback`` with every event emitted from now on."""
        self._subscribers.append(callback)

    def emit(self, event: str, *, step: str | None = None, **fields: Any) -> dict[str, Any]:
        """Record one event and return it as written."""
        record: dict[str, Any] = {"ts": utc_now(), "build": self.build}
        if step is not None:
            record["step"] = step
        record["event"] = event
        record.update(fields)
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                self._write(line)
            for callback in self._subscribers:
                callback(record)
        return record

    def append(self, event: dict[str, Any]) -> None:
        """Write an event another log emitted, as it is (a second trail of the same events:
        subscribe this to that log)."""
        line = (json.dumps(event, sort_keys=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                self._write(line)

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        assert self.path is not None
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            from buildcell.state import write_failure

            self.write_error = write_failure(self.path, e, what="the audit trail")
            os.close(self._fd)
            self._fd = None

    def check(self) -> None:
        """Raise the error that stopped the file being written, if one did.

        Raises:
            StateError: a line could not be written; the trail is incomplete from there.
        """
        if self.write_error is not None:
            raise self.write_error

    def close(self) -> None:
        """Close the file; further events reach subscribers only."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
