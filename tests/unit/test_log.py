"""Loggers that import logging only once a message could be shown (buildcell._log): the
messages that can be seen are the same as with logging itself. Each case is a fresh
interpreter, as the command is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        check=True,
    )


def test_unconfigured_debug_is_dropped_without_importing_logging() -> None:
    res = _run(
        "import sys\n"
        "from buildcell import _log\n"
        "log = _log.get('buildcell.x')\n"
        "log.debug('quiet %s', 1); log.info('quiet too')\n"
        "print('logging' in sys.modules)\n"
        "log.warning('shown %s', 2)\n"
        "print('logging' in sys.modules)\n"
    )
    assert res.stdout.split() == ["False", "True"]
    assert res.stderr == "shown 2\n"  # Python's last-resort handler, as with logging


@pytest.mark.parametrize(
    ("level", "shown"),
    [("ERROR", ["buildcell: ERROR: buildcell.x: bad 3"]),
     ("DEBUG", ["buildcell: DEBUG: buildcell.x: detail 1", "buildcell: WARNING: buildcell.x: "
                "careful 2", "buildcell: ERROR: buildcell.x: bad 3"])],
)  # fmt: skip
def test_the_command_line_level_and_format(level: str, shown: list[str]) -> None:
    res = _run(
        "import sys\n"
        "from buildcell import _log\n"
        f"_log.configure(level=_log.{level}, format='buildcell: %(levelname)s: %(name)s: "
        "%(message)s')\n"
        "log = _log.get('buildcell.x')\n"
        "log.debug('detail %s', 1)\n"
        "log.warning('careful %s', 2)\n"
        "print('logging' in sys.modules)\n"
        "log.error('bad %s', 3)\n"
    )
    assert res.stderr.splitlines() == shown
    assert res.stdout.strip() == str(level == "DEBUG")  # ERROR: not imported for a warning


def test_a_caller_s_handler_gets_every_message_with_the_caller_s_line() -> None:
    res = _run(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,\n"
        "                    format='%(levelname)s %(filename)s:%(lineno)d %(message)s')\n"
        "from buildcell import _log\n"
        "log = _log.get('buildcell.x')\n"
        "log.debug('one')\n"
        "log.log(_log.INFO, 'two')\n"
        "log.error('three', exc_info=False)\n"
    )
    assert res.stdout.splitlines() == [
        "DEBUG <string>:6 one",
        "INFO <string>:7 two",
        "ERROR <string>:8 three",
    ]
