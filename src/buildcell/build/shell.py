"""``buildcell shell``: an interactive cell on the kept workspace of a failed build.

The cell is the failed step's, rebuilt from the build's record and the spec as it ran
(``builds/<id>/spec.yaml``): the same rootfs, environment, ``SOURCE_DATE_EPOCH``, inputs
(from the content store), memory, pids and CPU limits, disk budget and network allowlist
(the operator's pins and grants as the build recorded them). Not the same:

- it runs ``/bin/sh -i`` on a pseudo-terminal of its own (``CellConfig.tty``) instead of
  the step's command, and without the step's wall clock: it lasts until the shell exits;
- it works on a *copy* of the kept workspace: what the shell changes is gone when it
  exits, and the kept workspace stays as the build left it, for the next shell (``gc``
  removes it when it expires, ``shell --discard`` at once);
- it gets a secret the step declares only when it is bound again (``--secret``); the
  build's values are never stored;
- it has no caches, and leaves no build record: it is not a build.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from buildcell import _log
from buildcell.errors import ConfigError, Error

if TYPE_CHECKING:
    from buildcell.build.spec import LoadedSpec, StepSpec
    from buildcell.cell.config import Bind, CellConfig, Limits
    from buildcell.cell.storage import CellStorage
    from buildcell.redact import Secret
    from buildcell.settings import Settings
    from buildcell.state import StateDir
    from buildcell.supply.records import BuildRecord, RecordStore, StepRecord

__all__ = ["SHELL_ARGV", "ShellPlan", "TerminalFilter", "open_shell", "plan_shell"]

log = _log.get(__name__)

#: What the shell cell runs: the shell every step runs in, interactive.
SHELL_ARGV = ("/bin/sh", "-i")

#: What the build's environment may not set for the shell: a file the shell runs before
#: anyone types (``ENV``, ``BASH_ENV``), commands run at each prompt, and the prompts (a
#: build could make its shell look like the host's).
_SHELL_OWNED = frozenset({"ENV", "BASH_ENV", "PROMPT_COMMAND", "PS0", "PS1", "PS2", "PS3", "PS4"})

#: Terminal escape strings that do more than draw: OSC (window title, clipboard with
#: OSC 52, hyperlinks, palette), DCS, APC, PM and SOS. What the cell prints is relayed
#: without them; cursor movement and colours (CSI) pass.
_STRING_INTRODUCERS = frozenset(b"]P_^X")
_ESC, _BEL, _BACKSLASH = 0x1B, 0x07, 0x5C


class TerminalFilter:
    """A sink that drops escape strings (:data:`_STRING_INTRODUCERS`) from what the cell
    prints, even split across reads; everything else passes as it came. A string ends at
    BEL or ST (ESC backslash)."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._state = "text"  # "text", "esc" (after ESC), "string", "string-esc"

    def __call__(self, data: bytes) -> None:
        out = bytearray()
        for byte in data:
            if self._state == "text":
                if byte == _ESC:
                    self._state = "esc"
                else:
                    out.append(byte)
            elif self._state == "esc":
                if byte in _STRING_INTRODUCERS:
                    self._state = "string"
                elif byte == _ESC:
                    out.append(_ESC)  # the first of two: the second may start a string
                else:
                    out += bytes((_ESC, byte))
                    self._state = "text"
            elif self._state == "string":
                if byte == _BEL:
                    self._state = "text"
                elif byte == _ESC:
                    self._state = "string-esc"
            else:  # "string-esc": ESC backslash ends the string
                self._state = "text" if byte == _BACKSLASH else "string"
        if out:
            self._sink(bytes(out))


@dataclass(frozen=True)
class ShellPlan:
    """What ``shell`` will start: the cell, and the step it stands in for.

    Attributes:
        step: the step whose cell this is.
        config: the cell (without the workspace: :func:`open_shell` copies it in).
        disk: the build's disk budget, for the copy of the workspace.
        unused_secrets: names bound with ``--secret`` that the step does not declare.
    """

    step: str
    config: CellConfig
    disk: int | None
    unused_secrets: tuple[str, ...] = ()


def load_run_spec(store: RecordStore, record: BuildRecord) -> LoadedSpec:
    """The spec exactly as ``record``'s build ran it.

    Raises:
        Error: it is not in the record's directory, or no longer valid.
    """
    from buildcell.build.spec import parse_spec

    where = store.dir(record.id) / "spec.yaml"
    try:
        text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Error(
            f"the spec build {record.id} ran is unreadable ({where}): {e}",
            hint="rebuild with `buildcell build --keep-failed`",
        ) from e
    return parse_spec(text, path=Path(record.spec_path))


def plan_shell(
    loaded: LoadedSpec,
    record: BuildRecord,
    *,
    step: str,
    secrets: Sequence[Secret] = (),
    settings: Settings,
    limits_of: Callable[[Limits], Limits],
    binds: tuple[Bind, ...] = (),
) -> ShellPlan:
    """The shell's cell for ``step`` of ``record``'s build (pure: nothing is opened).

    Args:
        limits_of: the operator's defaults applied to limits the step leaves unset (for a
            step the build never ran, whose record holds no effective limits).
        binds: the build's inputs, where they are on the host.

    Raises:
        Error: the build has no step ``step``.
        ConfigError: the spec's rootfs or network is not granted to it any more.
    """
    import dataclasses

    from buildcell.build.runner import BuildOptions, _check_grants, _rootfs, _step_policy
    from buildcell.cell.config import CellConfig, CellSecret, OciRootfs
    from buildcell.secrets import SecretDelivery

    spec = loaded.spec
    names = [s.name for s in spec.steps]
    if step not in names:
        raise Error(
            f"build {record.id} has no step {step!r}", hint="its steps are: " + ", ".join(names)
        )
    step_spec = spec.steps[names.index(step)]
    step_record = next((s for s in record.steps if s.name == step), None)
    invocation = record.invocation or {}
    pins = tuple(_pin(text) for text in invocation.get("pinnedHosts", ()))
    allow = tuple(str(a) for a in invocation.get("allow", ()))
    _check_grants(spec, allow)
    rootfs = _rootfs(spec, Path(loaded.path).parent, settings.rootfs_dirs)
    disk = spec.limits.disk if spec.limits.disk is not None else settings.limits.disk
    limits = dataclasses.replace(_limits(loaded, step_spec, step_record, limits_of), disk=disk)
    by_name = {s.name: s for s in secrets}
    options = BuildOptions(pinned_hosts=pins, allow=allow)
    image_budget = None
    if isinstance(rootfs, OciRootfs):
        from buildcell.supply.images import UnpackBudget

        image_budget = UnpackBudget(settings.image_max_size)
    config = CellConfig(
        argv=SHELL_ARGV,
        rootfs=rootfs,
        env={
            **{k: v for k, v in {**spec.env, **step_spec.env}.items() if k not in _SHELL_OWNED},
            "PS1": f"[{step}] $ ",
        },
        limits=dataclasses.replace(limits, timeout=None),
        tty=True,
        source_date_epoch=record.source_date_epoch or 0,
        binds=binds,
        secrets=tuple(
            CellSecret(SecretDelivery(use.name, use.env), by_name[use.name])
            for use in step_spec.secrets
            if use.name in by_name
        ),
        redact=tuple(secrets),
        network=_step_policy(step_spec, options),
        pinned_hosts=pins,
        image_budget=image_budget,
    )
    declared = {use.name for use in step_spec.secrets}
    unused = tuple(sorted(set(by_name) - declared))
    return ShellPlan(step, config, disk, unused)


def _pin(text: object) -> tuple[str, str]:
    from buildcell.allowlist import parse_pinned_host

    return parse_pinned_host(str(text))


def _limits(
    loaded: LoadedSpec,
    step: StepSpec,
    step_record: StepRecord | None,
    limits_of: Callable[[Limits], Limits],
) -> Limits:
    """The limits the step ran with (its record's), else what it would run with now."""
    from buildcell.build.runner import cell_limits
    from buildcell.cell.config import Limits

    ran = step_record.limits if step_record is not None else None
    if ran:
        return Limits(
            memory=_int(ran.get("memory")),
            pids=_int(ran.get("pids")),
            cpus=_float(ran.get("cpus")),
            disk=_int(ran.get("disk")),
            timeout=_float(ran.get("timeout")),
        )
    return limits_of(cell_limits(loaded.spec.step_limits(step)))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _float(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None  # type: ignore[arg-type]


def input_binds(
    state: StateDir, record: BuildRecord, warn: Callable[[str], None]
) -> tuple[Bind, ...]:
    """The build's inputs as its steps saw them, from the content store (verified); one
    that is no longer there is left out, with a warning."""
    from buildcell.cell.config import Bind
    from buildcell.supply.inputs import ContentStore

    if not record.inputs:
        return ()
    store = ContentStore(state.root / "cas", warn=warn)
    binds = []
    for item in record.inputs:
        sha256, path = item.get("sha256"), item.get("path")
        if not (isinstance(sha256, str) and isinstance(path, str)):
            continue
        found = store.lookup(sha256)
        if found is None:
            warn(f"input {path} is no longer in the content store; the shell has no {path}")
            continue
        binds.append(Bind(found, f"/workspace/{path}"))
    return tuple(binds)


def open_shell(
    state: StateDir,
    store: RecordStore,
    record: BuildRecord,
    *,
    step: str | None = None,
    secrets: Sequence[Secret] = (),
    settings: Settings,
    warn: Callable[[str], None] = log.warning,
    say: Callable[[str], None] = log.info,
) -> int:
    """Run an interactive shell in the cell of ``step`` (default: the step that failed) of
    ``record``'s build, on a copy of its kept workspace, relaying the caller's terminal;
    return the shell's exit status. The cell and the copy are gone when it returns.

    Raises:
        Error: the build kept no workspace (exit 125: rebuild with ``--keep-failed``), it
            was removed, the step does not exist, or the cell cannot be set up.
    """
    from buildcell.build.kept import using_kept
    from buildcell.cell._spawn import fd_writer
    from buildcell.cell.limits import with_defaults
    from buildcell.cell.storage import CellStorage, new_cell_id
    from buildcell.cell.supervisor import Cell, find_bwrap, limits_backend

    with using_kept(state, record) as kept:
        failed_step = kept.step  # refused here, before anything is prepared, if none
    step = step or failed_step
    loaded = load_run_spec(store, record)
    backend = limits_backend(state.host)
    plan = plan_shell(
        loaded,
        record,
        step=step,
        secrets=secrets,
        settings=settings,
        limits_of=lambda limits: with_defaults(limits, settings.limits, backend),
        binds=input_binds(state, record, warn),
    )
    for name in plan.unused_secrets:
        warn(f"secret {name!r} is bound but step {step!r} does not declare it; not given")
    bwrap = find_bwrap(state.host)
    with CellStorage(state, cell_id=new_cell_id(), bwrap=bwrap, disk=plan.disk) as storage:
        # Held against gc only while it is copied: the shell works on its own copy.
        with using_kept(state, record) as kept:
            _copy_in(storage, kept.path)
        say(
            f"a shell in the cell of step {step!r} of build {record.id}, on a copy of its "
            "kept workspace: `exit` ends it, and nothing of it is kept"
        )
        sink = TerminalFilter(fd_writer(1))
        try:
            with Cell(plan.config, state=state, step=step, storage=storage, stdout=sink) as cell:
                result = cell.run()
        finally:
            # Whatever the cell left the terminal in: the main screen, plain text, a cursor.
            os.write(1, b"\x1b[?1049l\x1b[0m\x1b[?25h")
    say(f"left the shell of build {record.id} (exit {result.exit_code}): back on the host")
    return result.exit_code


def _copy_in(storage: CellStorage, kept: Path) -> None:
    try:
        # A copy, never an overlay: the kept directory may be removed (gc, --discard)
        # while the shell runs.
        storage.populate(kept, [], mode="copy")
    except ConfigError as e:
        raise ConfigError(
            f"the kept workspace does not fit in the build's disk budget: {e.message}",
            hint=e.hint,
        ) from e
