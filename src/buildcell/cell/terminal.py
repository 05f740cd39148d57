"""A cell's own pseudo-terminal, relayed to the caller's (``CellConfig.tty``).

The cell gets the slave side as its stdin, stdout and stderr, and as the controlling
terminal of the session its command leads inside the sandbox (it opens the slave there,
see ``supervisor.TERMINAL_SESSION``); the supervisor keeps the master side. Output is
read from the master by the supervision loop (``_spawn.pump``) like the pipes of a cell
without a terminal, so it goes through the same redaction and sinks. Input is copied from
the caller's stdin to the master by a thread of its own, which alone waits when the cell
does not read; the caller's terminal is in raw mode meanwhile (keys such as Ctrl-C reach
the cell's line discipline, which signals the cell's foreground job), and its window size
follows the caller's.

The cell never holds a descriptor of the caller's terminal: what it does to its
terminal (TIOCSTI, job control, changing modes) happens to its own pseudo-terminal only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import termios
import threading
import tty
from typing import Any

from buildcell._fs import Closing

__all__ = ["Terminal"]

#: The character that ends input on a terminal in canonical mode (Ctrl-D).
_EOF = b"\x04"


class Terminal(Closing):
    """A pseudo-terminal for one cell.

    ``slave`` is handed to the cell's first process; :meth:`start` is called once it holds
    it, and :meth:`close` (idempotent) stops the relay and gives the caller's terminal its
    modes back.

    Args:
        stdin: the caller's input, copied to the cell.
        stdout: where the caller's window size is read when ``stdin`` is not a terminal.

    Raises:
        OSError: no pseudo-terminal could be opened (callers translate it).
    """

    def __init__(self, *, stdin: int = 0, stdout: int = 1) -> None:
        self.master, slave = os.openpty()
        self.slave: int | None = slave
        self._stdin = stdin
        self._size_from = next((fd for fd in (stdin, stdout) if os.isatty(fd)), None)
        self._saved_modes: list[Any] | None = None
        self._winch_installed = False
        self._previous_winch: Any = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._closed = False
        self.follow_size()

    def follow_size(self) -> None:
        """Give the cell's terminal the caller's window size (the cell's foreground job
        gets SIGWINCH from its terminal when it changes)."""
        if self._size_from is None or self._closed:
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(self._size_from, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def start(self) -> None:
        """The cell holds the slave: close ours (the master then reads as ended once the
        cell's last process is gone), put the caller's terminal in raw mode, relay."""
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None
        if os.isatty(self._stdin):
            self._saved_modes = termios.tcgetattr(self._stdin)
            tty.setraw(self._stdin, termios.TCSANOW)
        if threading.current_thread() is threading.main_thread():
            self._previous_winch = signal.signal(
                signal.SIGWINCH, lambda signum, frame: self.follow_size()
            )
            self._winch_installed = True
        self._thread = threading.Thread(target=self._forward, name="cell-terminal", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        """Copy the caller's input to the master until stopped, or the input ends (then
        the cell reads end of input once), or the cell's terminal is gone."""
        pending = b""
        ended = False
        while True:
            reading = [self._stop_r] + ([] if pending or ended else [self._stdin])
            try:
                writing = [self.master] if pending else []
                readable, _, _ = select.select(reading, writing, [])
            except (OSError, ValueError):
                return
            if self._stop_r in readable:
                return
            if self._stdin in readable:
                try:
                    data = os.read(self._stdin, 65536)
                except OSError:
                    data = b""  # the caller's terminal is gone (EIO): input has ended
                if not data:
                    ended, data = True, _EOF
                pending += data
            if pending:
                try:
                    pending = pending[os.write(self.master, pending) :]
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno in (errno.EIO, errno.EBADF):
                        return  # the cell's side is closed: nothing more to deliver
                    raise
            if ended and not pending:
                return

    def close(self) -> None:
        """Stop relaying, restore the caller's terminal and SIGWINCH handler, close the
        pseudo-terminal. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._winch_installed:
            previous = self._previous_winch
            signal.signal(signal.SIGWINCH, previous if previous is not None else signal.SIG_DFL)
            self._winch_installed = False
        if self._saved_modes is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._stdin, termios.TCSADRAIN, self._saved_modes)
            self._saved_modes = None
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.slave = None
