"""Command-line interface: argument parsing and presentation only.

Every command maps onto a library call; an ``Error`` becomes one line on stderr and its
exit code. Imports are lazy so that ``buildcell run`` starts quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from buildcell.build.invocation import Invocation
    from buildcell.build.policy import Policy
    from buildcell.build.repro import ReproReport
    from buildcell.cell.config import CellConfig
    from buildcell.redact import Secret
    from buildcell.supply.records import RecordStore

__all__ = ["main"]

# pydantic loads every installed distribution's "pydantic" entry points into the first
# model it builds: other packages' code in a supervisor that often runs as root, after a
# scan of every package's metadata at each start. The command wants none of them.
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"

if TYPE_CHECKING:
    _AddParser = Callable[[argparse._SubParsersAction["_Parser"]], None]
    _Handler = Callable[[argparse.Namespace], int]

PROG = "buildcell"

RUN_EPILOG = """\
examples:
  buildcell run -- make                          build the current directory in a cell
  buildcell run --source src --output 'dist/*.whl' -- python3 -m build --no-isolation
  buildcell run --memory 1G --pids 256 --cpus 1.5 --timeout 10m -- ./ci.sh
  buildcell run --rootfs dir:/srv/rootfs/bookworm --events ev.jsonl -- sh -c 'id; ls /'
  buildcell run --allow pypi.example.org --allow '*.files.example.org' -- pip download -d v x

inside the cell: uid/gid 1000 (builder), cwd /workspace (an ephemeral view of --source),
HOME=/home/builder, PATH=/usr/local/bin:/usr/bin:/bin, TZ=UTC, LANG=C.UTF-8,
SOURCE_DATE_EPOCH; read-only root; no host environment variable unless named with
--env/--pass-env.

network: none at all (loopback only) unless --allow names a destination. Then the cell
still has only loopback, where an HTTP proxy (127.0.0.1:3128, set in HTTP_PROXY and
HTTPS_PROXY) and a resolver (127.0.0.1:53) answer for the host side: allowed names
resolve to addresses local to the cell that lead, on an allowed port, to the real host;
everything else is refused and recorded (net.allow, net.deny, dns.query events).
DEST is HOST (ports 80 and 443), HOST:PORT, *.DOMAIN[:PORT] (subdomains only), or an
IP or CIDR with a port (10.0.0.5:8080, [::1]:8080). Names never reach loopback,
private, link-local or cloud metadata addresses unless that address is allowed literally.

exit status: the command's own; 124 timeout; 125 buildcell could not do what was asked;
126/127 command not executable / not found; 128+N killed by signal N (137 also on
out-of-memory).
"""

MAIN_EPILOG = """\
`buildcell COMMAND --help` says more of each.

state directory: $BUILDCELL_STATE_DIR, else /var/lib/buildcell (root) or
$XDG_STATE_HOME/buildcell.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 125 with one line, as every buildcell error does."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n  hint: see `{self.prog} --help`\n")
        raise SystemExit(125)


def _ref(value: str) -> str:
    """``--ref``: a ref, never an empty one (an unset CI variable would name one cache
    scope shared by every build given it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "an empty ref names no source; leave out --ref for a build of no ref"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or len(value) > 1024:
        raise argparse.ArgumentTypeError(
            "a ref is at most 1024 characters, without control characters"
        )
    return value


def _build_parser(only: str | None = None) -> _Parser:
    """The parser of every command, or of the one named ``only`` (quicker to build)."""
    parser = _Parser(
        prog=PROG,
        description="Run every build in its own ephemeral, least-privilege cell.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="state directory (overrides the default)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add, _handler) in _COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


_PROJECT_HELP = (
    "the project whose builds to see (default: derived from the current directory's "
    "name); other projects' builds are never shown"
)


def _add_run(sub: argparse._SubParsersAction[_Parser]) -> None:
    run = sub.add_parser(
        "run",
        help="run one command in a fresh cell",
        description="Run COMMAND in a fresh cell and destroy the cell afterwards.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [OPTIONS] [--] COMMAND [ARG...]",
    )
    g = run.add_argument_group("workspace and outputs")
    g.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="directory seen as /workspace (default: the current directory): a "
        "copy-on-write view of it, or a copy where the host allows none (see doctor); "
        "the original is never modified",
    )
    g.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="GLOB",
        help="collect matching regular files from /workspace after the command "
        "(repeatable; * and ? stay within a directory, ** crosses them)",
    )
    g.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where outputs are copied (default: ./buildcell-out); its contents are replaced "
        "as a whole, and another build using it is waited for",
    )
    g.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if another build is using the output directory",
    )
    g = run.add_argument_group("sandbox")
    g.add_argument(
        "--rootfs",
        default="host",
        metavar="KIND",
        help="'host' (a minimal read-only view of the host, default), 'dir:PATH' (a root "
        "directory), or 'oci:PATH@sha256:DIGEST' (an OCI layout, OCI archive or docker-save "
        "tarball, verified against the digest and unpacked once)",
    )
    g.add_argument(
        "--seccomp-profile",
        type=Path,
        metavar="FILE",
        help="an OCI/Docker seccomp profile (JSON) instead of the built-in one",
    )
    g.add_argument(
        "--unsafe-no-seccomp",
        action="store_true",
        help="run without any syscall filter (warned about and recorded)",
    )
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set a variable in the cell (repeatable)",
    )
    g.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this host variable into the cell (repeatable)",
    )
    g.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME[=env:VAR|file:PATH]",
        help="give the cell a secret as the read-only file /run/secrets/NAME (default source: "
        "the host variable NAME); its value is redacted from the output (repeatable)",
    )
    g.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="connect stdin (default: /dev/null); the cell still has no controlling terminal",
    )
    g = run.add_argument_group("network")
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="DEST",
        help="let the cell reach DEST through its egress proxy (repeatable; see below); "
        "without any, the cell has no network at all",
    )
    g.add_argument(
        "--add-host",
        action="append",
        default=[],
        metavar="NAME:ADDRESS",
        help="resolve NAME to ADDRESS on the host side instead of asking DNS (repeatable); "
        "the address guard still applies",
    )
    g = run.add_argument_group("operator policy")
    g.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="check the command against this operator policy first (default: the "
        "configuration file's policy, if any); it sees the command as a one-step spec",
    )
    _add_invocation_args(g, secrets=False)
    g = run.add_argument_group("limits")
    g.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 512M, 2GiB")
    g.add_argument("--pids", metavar="N", help="maximum number of processes and threads")
    g.add_argument("--cpus", metavar="N", help="CPU share, fractions allowed (0.5)")
    g.add_argument(
        "--disk",
        metavar="SIZE",
        help="what the cell may write in total to /workspace, /tmp and its home "
        "(a size-capped tmpfs: it lives in memory)",
    )
    g.add_argument(
        "--timeout",
        metavar="DURATION",
        help="wall-clock limit: 90, 90s, 5m, 1h30m (exit 124 when reached)",
    )
    g = run.add_argument_group("reporting")
    g.add_argument(
        "--events",
        type=Path,
        metavar="FILE",
        help="append JSON Lines events (cell.start, cell.exit, teardown, ...)",
    )
    g.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing of buildcell's own except errors"
    )
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]", help=argparse.SUPPRESS
    )


def _add_build(sub: argparse._SubParsersAction[_Parser]) -> None:
    build = sub.add_parser(
        "build",
        help="run the build a buildcell.yaml declares, one cell per step",
        description="Run a declared, multi-step build from pinned inputs: inputs are fetched "
        "and verified on the host, each step runs with /bin/sh -e -c in its own fresh cell "
        "over a shared workspace, outputs are collected with their sha256 into --out with an "
        "outputs.json manifest. The exit status is the failing step's, else 0.",
        epilog="examples:\n  buildcell build\n  buildcell build -f ci/buildcell.yaml --out "
        "dist --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_spec_arg(build)
    build.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="the directory to build: the workspace's contents (copy-on-write), described in the "
        "provenance (default: the spec's directory); the spec's own paths (file: inputs, "
        "rootfs) stay relative to the spec",
    )
    build.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where outputs are copied (default: ./buildcell-out); its contents are replaced "
        "as a whole when the build succeeds, and another build using it is waited for",
    )
    build.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if another build is using the output directory",
    )
    build.add_argument(
        "--json",
        action="store_true",
        help="print one JSON result object on stdout (logs go to stderr)",
    )
    build.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no step output: warnings, the step that failed, and one summary line",
    )
    _add_invocation_args(build)
    build.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="check the build against this operator policy before anything runs (default: "
        "the configuration file's policy, if any)",
    )
    build.add_argument(
        "--add-host",
        action="append",
        default=[],
        metavar="NAME:ADDRESS",
        help="resolve NAME to ADDRESS on the host side for steps with a network allowlist, "
        "instead of asking DNS (repeatable); the address guard still applies",
    )
    build.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="DEST",
        help="grant a non-public destination (loopback, private, link-local, ...) that the "
        "spec's steps name in network.allow; a spec alone may name public ones only "
        "(repeatable; same syntax as run --allow)",
    )
    build.add_argument(
        "--allow-fetch",
        action="append",
        default=[],
        metavar="DEST",
        help="let the host fetch url: inputs from this non-public destination "
        "(repeatable; same syntax as --allow)",
    )
    build.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY",
        help="sign provenance.intoto.jsonl with this Ed25519 key (see `buildcell keygen`); "
        "without it the provenance is written unsigned",
    )
    build.add_argument(
        "--builder-id",
        metavar="URI",
        help="runDetails.builder.id of the provenance (default "
        "https://buildcell.dev/builders/local)",
    )
    build.add_argument(
        "--check-repro",
        action="store_true",
        help="build twice in fresh cells, varying start time, build id, environment order, "
        "umask and CPU count; compare the outputs bit for bit; exit 0 only when reproducible",
    )
    build.add_argument(
        "--keep-failed",
        action="store_true",
        help="if the build fails, keep its workspace as the failing step left it (for 7 "
        "days, or until `buildcell gc` expires it) to open with `buildcell shell ID`",
    )


def _add_keygen(sub: argparse._SubParsersAction[_Parser]) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing provenance",
        description="Write buildcell.key (private, mode 0600) and buildcell.pub (public) into "
        "DIR. The private key is used only by the supervisor and never enters a cell.",
    )
    keygen.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="where to write the pair"
    )


def _add_verify(sub: argparse._SubParsersAction[_Parser]) -> None:
    verify = sub.add_parser(
        "verify",
        help="check a provenance file offline: signature, subjects, expectations",
        description="Check the DSSE signature against KEY, the statement and predicate types "
        "and fields, that every ARTIFACT's sha256 is a subject, and the optional expectations. "
        "Exit 0 when everything holds, else 1 listing every failed check.",
    )
    verify.add_argument("artifacts", nargs="*", type=Path, metavar="ARTIFACT")
    verify.add_argument(
        "--key", type=Path, required=True, metavar="PUB", help="the public key (buildcell.pub)"
    )
    verify.add_argument(
        "--provenance", type=Path, required=True, metavar="FILE", help="provenance.intoto.jsonl"
    )
    verify.add_argument("--builder-id", metavar="URI", help="expect this builder id")
    verify.add_argument(
        "--source-digest",
        metavar="DIGEST",
        help="expect this source (sha256 of the source tree, or the git commit)",
    )
    verify.add_argument("--spec-digest", metavar="DIGEST", help="expect this spec digest")
    verify.add_argument("--no-network", action="store_true", help="expect that no step had egress")
    verify.add_argument(
        "--expect-project", metavar="NAME", help="expect this project (what the invoker chose)"
    )
    verify.add_argument("--expect-ref", metavar="REF", help="expect this ref, e.g. refs/heads/main")
    verify.add_argument(
        "--expect-trust",
        choices=("trusted", "untrusted"),
        help="expect this trust level",
    )
    verify.add_argument("--json", action="store_true", help="print the checks as JSON")


def _add_init(sub: argparse._SubParsersAction[_Parser]) -> None:
    init = sub.add_parser(
        "init",
        help="write a commented starter buildcell.yaml for the current directory",
        description="Write a commented buildcell.yaml for the current directory, recognizing "
        "autotools, CMake, Makefile, Cargo, Go, pyproject.toml and npm projects; a step that "
        "fetches dependencies is allowed the index or registry this host's pip, npm or go "
        "is configured with.",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing buildcell.yaml")


def _add_schema(sub: argparse._SubParsersAction[_Parser]) -> None:
    sub.add_parser(
        "schema",
        help="print the JSON Schema of buildcell.yaml (for editors)",
        description="Print the JSON Schema of buildcell.yaml, for editors.",
    )


def _add_ls(sub: argparse._SubParsersAction[_Parser]) -> None:
    ls = sub.add_parser(
        "ls",
        help="list recent builds (of one project)",
        description="List recent builds of one project.",
    )
    ls.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    ls.add_argument("--project", metavar="NAME", help=_PROJECT_HELP)
    ls.add_argument("--json", action="store_true", help="print JSON")


def _add_show(sub: argparse._SubParsersAction[_Parser]) -> None:
    show = sub.add_parser(
        "show",
        help="summarize one build",
        description="Summarize one build: steps, exit codes, outputs.",
    )
    show.add_argument("build_id", metavar="ID", help="a build id or a unique prefix of one")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--project", metavar="NAME", help=_PROJECT_HELP)


def _add_logs(sub: argparse._SubParsersAction[_Parser]) -> None:
    logs = sub.add_parser(
        "logs",
        help="print a build's logs",
        description="Print a build's logs, each line prefixed with its step.",
    )
    logs.add_argument("build_id", metavar="ID", help="a build id or a unique prefix of one")
    logs.add_argument("--step", metavar="NAME", help="only this step, unprefixed")
    logs.add_argument("--project", metavar="NAME", help=_PROJECT_HELP)


def _add_shell(sub: argparse._SubParsersAction[_Parser]) -> None:
    shell = sub.add_parser(
        "shell",
        help="open an interactive shell on a failed build's kept workspace",
        description="Open /bin/sh on a pseudo-terminal in the cell of a failed step: the "
        "step's rootfs, environment, inputs, limits (not its wall clock) and network "
        "allowlist, on a copy of the workspace `build --keep-failed` kept. What the shell "
        "changes is discarded when it exits; the kept workspace stays as the build left "
        "it. A secret the step declares is given only when bound again with --secret.",
        epilog="examples:\n  buildcell build --keep-failed\n  buildcell shell ID\n  "
        "buildcell shell ID --step test --secret TOKEN=env:TOKEN\n  buildcell shell ID "
        "--discard",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shell.add_argument("build_id", metavar="ID", help="a build id or a unique prefix of one")
    shell.add_argument(
        "--step", metavar="NAME", help="the step whose cell to open (default: the one that failed)"
    )
    shell.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME[=env:VAR|file:PATH]",
        help="bind a secret the step declares (default env:NAME); without it the shell has "
        "none (repeatable)",
    )
    shell.add_argument(
        "--discard",
        action="store_true",
        help="remove the kept workspace now instead of opening a shell",
    )
    shell.add_argument("--project", metavar="NAME", help=_PROJECT_HELP)


def _add_policy(sub: argparse._SubParsersAction[_Parser]) -> None:
    policy = sub.add_parser(
        "policy",
        help="check a spec against an operator policy (CEL rules) without running it",
        description="Operator policies: CEL rules every build must pass before anything runs.",
    )
    policy_sub = policy.add_subparsers(
        dest="policy_command", metavar="SUBCOMMAND", parser_class=_Parser
    )
    check = policy_sub.add_parser(
        "check",
        help="evaluate a policy against a spec without running anything",
        description="Evaluate every rule of the policy against the spec and the invocation; "
        "print each rule's verdict. Exits 0 when the build would be allowed, 125 when denied "
        "or when the policy or spec is malformed.",
    )
    check.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="the policy (default: from the configuration file)",
    )
    _add_spec_arg(check)
    _add_invocation_args(check)
    check.add_argument("--json", action="store_true", help="print the decision as JSON")


def _add_doctor(sub: argparse._SubParsersAction[_Parser]) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check what this host supports: bubblewrap, namespaces, seccomp, limits",
        description="Check bubblewrap, user namespaces, seccomp, the limits backend and the "
        "state directory, then make one real cell. Exits 1 if no cell can be made.",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")


def _add_gc(sub: argparse._SubParsersAction[_Parser]) -> None:
    gc = sub.add_parser(
        "gc",
        help="remove what dead builds left in the state directory, and expired caches",
        description="Remove cells whose supervisor is gone: leftover processes are killed, "
        "their cgroups and workspaces removed. Cells still running are left alone. Then "
        "remove old build records, unused images and their layers, and content store "
        "entries no remaining record lists as an input.",
    )
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.add_argument(
        "--cache-max-age",
        metavar="DURATION",
        help="remove build caches unused for longer (default: the configuration file's "
        "caches.max_age, else 336h)",
    )
    gc.add_argument(
        "--records-max-age",
        metavar="DURATION",
        help="remove build records that finished longer ago (default: records.max_age, "
        "else 720h); running builds are never removed",
    )
    gc.add_argument(
        "--records-keep",
        metavar="N",
        help="keep at most the N newest build records (default: records.keep, else 200)",
    )
    gc.add_argument(
        "--images-max-age",
        metavar="DURATION",
        help="remove unpacked images unused for longer (default: images.max_age, else 720h); "
        "then layers and content store entries nothing uses any more",
    )
    gc.add_argument(
        "--kept-max-age",
        metavar="DURATION",
        help="remove workspaces kept by `build --keep-failed` this long after their build "
        "(they go 7 days after it in any case, and with their build's record)",
    )


def _add_spec_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=Path("buildcell.yaml"),
        metavar="FILE",
        help="the spec (default: ./buildcell.yaml)",
    )


def _add_invocation_args(parser: argparse._ActionsContainer, *, secrets: bool = True) -> None:
    parser.add_argument(
        "--project",
        metavar="NAME",
        help="the project the build belongs to (default: derived from the spec's directory); "
        "records and caches are per project",
    )
    parser.add_argument(
        "--trust",
        choices=("trusted", "untrusted"),
        default="untrusted",
        help="trusted builds never read caches untrusted builds wrote (default: untrusted)",
    )
    parser.add_argument(
        "--ref",
        type=_ref,
        metavar="REF",
        help="the source ref being built (refs/pull/7/head): untrusted builds of one ref share "
        "caches, and policies see it",
    )
    if not secrets:
        return
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME[=env:VAR|file:PATH]",
        help="bind a secret the spec declares to its source (default env:NAME); only the "
        "steps that declare it get it (repeatable)",
    )


def _parse_env(items: Sequence[str], pass_names: Sequence[str]) -> dict[str, str]:
    from buildcell.errors import UsageError

    env: dict[str, str] = {}
    for name in pass_names:
        if name in os.environ:
            env[name] = os.environ[name]
        else:
            _warn(f"--pass-env {name}: not set on the host, not passed")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --env {item!r}: expected K=V")
        env[key] = value
    return env


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from buildcell.build.command import run_command
    from buildcell.cell import CellConfig, Limits, parse_rootfs
    from buildcell.errors import UsageError
    from buildcell.events import EventLog
    from buildcell.state import StateDir
    from buildcell.units import parse_cpus, parse_duration, parse_size

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given", hint="buildcell run [OPTIONS] -- COMMAND [ARG...]")
    pids = None
    if args.pids is not None:
        if not args.pids.isdigit() or int(args.pids) < 1:
            raise UsageError(f"invalid --pids {args.pids!r}: expected a positive integer")
        pids = int(args.pids)
    from buildcell.cell.limits import with_defaults
    from buildcell.cell.supervisor import limits_backend
    from buildcell.settings import load_settings

    settings = load_settings(host=args.host)
    limits = with_defaults(
        Limits(
            memory=parse_size(args.memory, what="--memory") if args.memory else None,
            pids=pids,
            cpus=parse_cpus(args.cpus) if args.cpus else None,
            disk=parse_size(args.disk, what="--disk") if args.disk else None,
            timeout=parse_duration(args.timeout, what="--timeout") if args.timeout else None,
        ),
        settings.limits,
        limits_backend(args.host),
    )
    source = (args.source or Path.cwd()).absolute()
    if not source.is_dir():
        raise UsageError(f"--source {source} is not a directory")
    if args.seccomp_profile is not None and args.unsafe_no_seccomp:
        raise UsageError("--seccomp-profile and --unsafe-no-seccomp contradict each other")
    outputs: tuple[str, ...] = ()
    if args.output:
        from buildcell.supply.outputs import validate_patterns

        outputs = validate_patterns(args.output)
    secrets = _secrets(args.secret)
    if secrets:
        from buildcell.cell.config import CellSecret
        from buildcell.secrets import SecretDelivery

        delivered = tuple(CellSecret(SecretDelivery(s.name), s) for s in secrets)
    else:
        delivered = ()
    config = CellConfig(
        secrets=delivered,
        redact=tuple(secrets),
        argv=tuple(cmd),
        source=source,
        outputs=outputs,
        out_dir=args.out,
        rootfs=parse_rootfs(args.rootfs),
        env=_parse_env(args.env, args.pass_env),
        limits=limits,
        seccomp_profile=args.seccomp_profile,
        seccomp=not args.unsafe_no_seccomp,
        interactive=args.interactive,
        source_date_epoch=args.host.source_date_epoch or 0,
        # A sparse file claims what it likes: what is copied out is bounded too.
        output_max_size=limits.disk if limits.disk is not None else settings.output_max_size,
        wait_for_out_dir=not args.no_wait,
        image_budget=_image_budget(args.rootfs, settings.image_max_size),
        **_network_options(args.allow, args.add_host),
    )
    state = StateDir(host=args.host)
    events = EventLog(args.events, build="")
    with events:
        if not args.quiet:
            events.subscribe(_print_warnings)
            events.subscribe(_print_denial)
            events.subscribe(_print_unpack)
        result = run_command(
            config,
            invocation=_run_invocation(args, config, secrets, settings.image_max_size),
            policies=list(_policies(args.policy, settings.policy)),
            state=state,
            events=events,
        )
        report = result.outputs
        if report is not None and not args.quiet and report.collected:
            out = config.resolved_out_dir()
            n = len(report.collected)
            sys.stderr.write(f"{PROG}: collected {n} output{'s' * (n != 1)} into {out}\n")
        if result.reason == "timeout" and not args.quiet:
            sys.stderr.write(f"{PROG}: timed out after {args.timeout}; the cell was killed\n")
        elif result.reason == "oom" and not args.quiet:
            sys.stderr.write(f"{PROG}: out of memory (limit {args.memory}); the cell was killed\n")
        if result.egress and not args.quiet:
            from buildcell.cli.console import render_egress

            render_egress(result.egress, _stderr_console())
        events.check()  # the audit trail asked for is whole, or the run is an error
    return result.exit_code


def _run_invocation(
    args: argparse.Namespace, config: CellConfig, secrets: Sequence[Secret], image_budget: int
) -> Invocation:
    from buildcell.build.admission import invocation_for

    unsafe = (["no-seccomp"] if args.unsafe_no_seccomp else []) + (
        ["seccomp-profile"] if args.seccomp_profile is not None else []
    )
    return invocation_for(
        source=config.resolved_source() or Path.cwd(),
        project=args.project,
        ref=args.ref,
        trust=args.trust,
        secrets=[s.name for s in secrets],
        unsafe=unsafe,
        pinned_hosts=list(args.add_host),
        allow=config.network.describe() if config.network is not None else (),
        image_budget=image_budget if config.rootfs.describe().startswith("oci:") else None,
    )


def _policies(given: Path | None, configured: Path | None) -> tuple[Policy, ...]:
    """The policies that apply, loaded (the policy engine only when there is one).

    Raises:
        PolicyError: one cannot be loaded.
    """
    paths = _policy_paths(given, configured)
    if not paths:
        return ()
    from buildcell.build.policy import load_policy

    return tuple(load_policy(p) for p in paths)


def _policy_paths(given: Path | None, configured: Path | None) -> list[Path]:
    """The configured policy always applies; ``--policy`` adds one, never replaces it."""
    paths = [p.absolute() for p in (configured, given) if p is not None]
    return list(dict.fromkeys(paths))


def _network_options(allow: Sequence[str], add_host: Sequence[str]) -> dict[str, Any]:
    """``network`` and ``pinned_hosts`` of a CellConfig from --allow and --add-host.

    Raises:
        ConfigError: an entry does not parse.
    """
    if not allow and not add_host:
        return {}
    from buildcell.allowlist import EgressPolicy

    policy = EgressPolicy.from_strings(allow)
    pinned = _pinned_hosts(add_host)
    # run's allowlist is the operator's own: a pin it also allows exactly is granted.
    return {"network": policy.with_pins(pinned, granted=policy), "pinned_hosts": pinned}


def _pinned_hosts(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    if not items:
        return ()
    from buildcell.allowlist import parse_pinned_host

    return tuple(parse_pinned_host(item) for item in items)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _print_unpack(event: dict[str, Any]) -> None:
    """How far an image unpack that takes a while has come."""
    if event.get("event") == "image.unpack":
        from buildcell.supply.images import unpack_line

        sys.stderr.write(f"{PROG}: {unpack_line(event)}\n")
        sys.stderr.flush()


def _print_denial(event: dict[str, Any]) -> None:
    """The first denial of each destination, as it happens (clients often retry quietly)."""
    if event.get("event") == "net.deny" and event.get("first"):
        from buildcell.egress.audit import denial_line

        sys.stderr.write(f"{PROG}: {denial_line(event)}\n")
        sys.stderr.flush()


def _print_warnings(event: dict[str, Any]) -> None:
    if event.get("event") in ("warning", "limit.degraded", "security.unsafe") or str(
        event.get("event", "")
    ).startswith("output."):
        _warn(str(event.get("message", "")))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from buildcell.build.doctor import run_checks
    from buildcell.cli.console import render_doctor

    report = run_checks(args.host)
    render_doctor(report, as_json=args.json)
    return 0 if report.cell_ok else 1


def _cmd_gc(args: argparse.Namespace) -> int:
    import json

    from buildcell.build.gc import Retention, collect_garbage
    from buildcell.settings import parse_keep
    from buildcell.state import StateDir
    from buildcell.units import parse_duration

    def age(value: str | None, flag: str) -> float | None:
        return parse_duration(value, what=flag) if value else None

    retention = Retention(
        cache_max_age=age(args.cache_max_age, "--cache-max-age"),
        records_max_age=age(args.records_max_age, "--records-max-age"),
        records_keep=None
        if args.records_keep is None
        else parse_keep(args.records_keep, what="--records-keep"),
        images_max_age=age(args.images_max_age, "--images-max-age"),
        kept_max_age=age(args.kept_max_age, "--kept-max-age"),
    )
    report = collect_garbage(StateDir(host=args.host), retention=retention)
    for build_id in report.finalized:
        sys.stderr.write(
            f"{PROG}: warning: build {build_id}: its supervisor is gone; recorded as interrupted\n"
        )
    for line in report.warnings:
        sys.stderr.write(f"{PROG}: warning: {line}\n")
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from buildcell.build.runner import (
        DEFAULT_BUILDER_ID,
        BuildOptions,
        check_reproducible,
        run_build,
    )
    from buildcell.build.spec import load_spec
    from buildcell.cli.console import (
        LiveReporter,
        PlainReporter,
        QuietReporter,
        render_record,
        render_summary_line,
    )
    from buildcell.settings import load_settings
    from buildcell.state import StateDir

    loaded = load_spec(args.file)
    settings = load_settings(host=args.host)
    key = None
    if args.sign_key is not None:
        from buildcell.supply.provenance import KeyFile

        # Checked now, read only once the build's last cell is gone.
        key = KeyFile(args.sign_key.absolute())
        key.check()
    secrets = tuple(_secrets(args.secret))
    allow = _canonical_entries([*args.allow, *settings.network_allow])
    allow_fetch = _canonical_entries([*args.allow_fetch, *settings.fetch_allow])
    invocation = _invocation(
        args,
        args.source or loaded.path.absolute().parent,
        [s.name for s in secrets],
        allow=allow,
        allow_fetch=allow_fetch,
        image_budget=settings.image_max_size,
    )
    policies = _policies(args.policy, settings.policy)
    options = BuildOptions(
        sign_key=key,
        source=args.source,
        builder_id=args.builder_id or DEFAULT_BUILDER_ID,
        secrets=secrets,
        pinned_hosts=_pinned_hosts(args.add_host),
        invocation=invocation,
        policies=policies,
        cache_max_size=settings.cache_max_size,
        rootfs_dirs=settings.rootfs_dirs,
        default_limits=settings.limits,
        log_max_size=settings.log_max_size,
        output_max_size=settings.output_max_size,
        image_max_size=settings.image_max_size,
        wait_for_out_dir=not args.no_wait,
        allow=allow,
        allow_fetch=allow_fetch,
        keep_failed=args.keep_failed,
    )
    out_dir = (args.out or Path("buildcell-out")).absolute()
    state = StateDir(host=args.host)
    live = not args.json and not args.quiet and sys.stderr.isatty()
    reporter: Any
    if live:
        reporter = LiveReporter(Console(stderr=True, highlight=False))
    elif args.quiet and not args.json:
        reporter = QuietReporter(out=sys.stdout)
    else:
        reporter = PlainReporter(out=sys.stderr if args.json else sys.stdout)
    repro = None
    with reporter if live else contextlib.nullcontext():
        if args.check_repro:
            result, _, repro = check_reproducible(
                loaded, out_dir=out_dir, state=state, reporter=reporter, options=options
            )
        else:
            result = run_build(
                loaded, out_dir=out_dir, state=state, reporter=reporter, options=options
            )
    if args.json:
        data = result.to_dict()
        if args.check_repro:
            data["reproducibility"] = repro.to_dict() if repro is not None else None
        print(json.dumps(data, indent=2))
    elif args.quiet:
        print(render_summary_line(result.record))
    else:
        render_record(result.record, _stdout_console(), result=result)
        if args.check_repro and repro is not None:
            _render_repro(repro)
    if not args.json:
        _print_kept(result.record)
    if result.exit_code != 0:
        return result.exit_code
    if args.check_repro and (repro is None or not repro.reproducible):
        return 1
    return 0


def _print_kept(record: Any) -> None:
    """Where a failed build's workspace was kept, and how to open it."""
    from buildcell.build.kept import KeptWorkspace

    kept = KeptWorkspace.from_record(record.kept_workspace)
    if kept is not None:
        print(
            f"kept the workspace of step {kept.step} in {kept.path}: "
            f"`{PROG} shell {record.id}` opens a shell on it"
        )


def _image_budget(rootfs: str, limit: int) -> Any:
    """What ``run``'s image may unpack to (``images.max_size``); None without an image."""
    if not rootfs.startswith("oci:"):
        return None
    from buildcell.supply.images import UnpackBudget

    return UnpackBudget(limit)


def _canonical_entries(items: Sequence[str]) -> tuple[str, ...]:
    """Allowlist entries in canonical form, repeats dropped.

    Raises:
        ConfigError: an entry does not parse.
    """
    if not items:
        return ()
    from buildcell.allowlist import parse_allow

    return tuple(dict.fromkeys(parse_allow(item).describe() for item in items))


def _invocation(
    args: argparse.Namespace,
    source: Path,
    secrets: Sequence[str],
    *,
    allow: Sequence[str] = (),
    allow_fetch: Sequence[str] = (),
    image_budget: int | None = None,
) -> Invocation:
    from buildcell.build.admission import invocation_for

    return invocation_for(
        source=source.absolute(),
        project=args.project,
        ref=args.ref,
        trust=args.trust,
        secrets=secrets,
        pinned_hosts=getattr(args, "add_host", ()) or (),
        allow=allow,
        allow_fetch=allow_fetch,
        image_budget=image_budget,
    )


def _cmd_policy(args: argparse.Namespace) -> int:
    import json

    from buildcell.build.policy import check, load_policy
    from buildcell.build.spec import load_spec
    from buildcell.errors import PolicyError, UsageError
    from buildcell.settings import load_settings

    if args.policy_command != "check":
        raise UsageError("policy needs a subcommand", hint="buildcell policy check --policy FILE")
    path = args.policy or load_settings(host=args.host).policy
    if path is None:
        raise UsageError(
            "no policy given and none configured", hint="buildcell policy check --policy FILE"
        )
    from buildcell.secrets import parse_binding

    policy = load_policy(path)
    loaded = load_spec(args.file)
    # Only the names: a dry check needs no secret's value.
    names = tuple(parse_binding(item).name for item in args.secret)
    decision = check(policy, loaded.spec, _invocation(args, loaded.path.absolute().parent, names))
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2))
    else:
        for r in decision.results:
            verdict = "PASS" if r.passed else "FAIL"
            why = f": {r.error or r.message}" if not r.passed else ""
            print(f"{verdict} {r.name}{why}")
        print(f"{'allowed' if decision.allowed else 'denied'} by {path} ({decision.policy_digest})")
    if not decision.allowed:
        if not args.json:
            sys.stderr.write(f"{PROG}: error: {decision.summary()}\n")
        return PolicyError.exit_code
    return 0


def _render_repro(repro: ReproReport) -> None:
    out = sys.stdout
    if repro.reproducible:
        out.write(f"reproducible: {repro.compared} output(s) identical across two builds\n")
        return
    out.write(f"NOT reproducible: {len(repro.differences)} of {repro.compared} output(s) differ\n")
    for d in repro.differences:
        size_a = "missing" if d.size_a is None else f"{d.size_a} bytes"
        size_b = "missing" if d.size_b is None else f"{d.size_b} bytes"
        where = (
            "" if d.first_difference is None else f", first difference at byte {d.first_difference}"
        )
        out.write(f"  {d.path}: {size_a} vs {size_b}{where}\n")
        if d.archive is not None:
            from buildcell._text import show

            # Member names and link targets are the archive author's: escaped, one line.
            for m in d.archive.members:
                out.write(f"    member {show(m.name, 200)}: {'; '.join(m.differs)}\n")
            if d.archive.note:
                out.write(f"    ({d.archive.kind}: {d.archive.note})\n")
        if d.summary:
            out.write("    " + d.summary.rstrip().replace("\n", "\n    ") + "\n")


def _secrets(items: Sequence[str]) -> list[Secret]:
    if not items:
        return []
    from buildcell.secrets import parse_binding, resolve_bindings

    return resolve_bindings([parse_binding(item) for item in items])


def _cmd_keygen(args: argparse.Namespace) -> int:
    from buildcell.supply.provenance import generate_keypair

    args.out.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair(args.out)
    print(f"wrote {private} (keep it secret; buildcell build --sign-key {private})")
    print(f"wrote {public} (share it; buildcell verify --key {public} ...)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from buildcell.supply.provenance import load_public_key, verify

    report = verify(
        args.provenance,
        key=load_public_key(args.key),
        artifacts=args.artifacts,
        builder_id=args.builder_id,
        source_digest=args.source_digest,
        spec_digest=args.spec_digest,
        no_network=args.no_network,
        expect={
            name: value
            for name, value in (
                ("project", args.expect_project),
                ("ref", args.expect_ref),
                ("trust", args.expect_trust),
            )
            if value is not None
        },
    )
    if args.json:
        checks = [c.__dict__ for c in report.checks]
        print(json.dumps({"ok": report.ok, "checks": checks}, indent=2))
        return 0 if report.ok else 1
    for check in report.checks:
        sys.stdout.write(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}\n")
    failed = [c for c in report.checks if not c.ok]
    sys.stdout.write("verified\n" if report.ok else f"{len(failed)} check(s) failed\n")
    return 0 if report.ok else 1


def _stdout_console() -> Console:
    from rich.console import Console

    # Off a terminal nothing is truncated: digests and paths are copied from logs.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _cmd_init(args: argparse.Namespace) -> int:
    from buildcell.build.starter import starter_spec
    from buildcell.errors import ConfigError, UsageError

    target = Path("buildcell.yaml")
    if target.exists() and not args.force:
        raise UsageError(f"{target} already exists", hint="use --force to overwrite it")
    # The package clients' configuration (pip's index, npm's registry) is read from the
    # environment they would see: this one.
    text, kind = starter_spec(Path.cwd(), environ=os.environ)
    # The working directory is a checkout: a name made fresh, never a file (or a link) of it.
    tmp = f".buildcell.yaml.{os.urandom(6).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {target}: {e.strerror}") from e
    print(f"wrote {target} for a {kind} project; edit it, then run `buildcell build`")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from buildcell.build.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return 0


def _records(args: argparse.Namespace) -> RecordStore:
    from buildcell.state import StateDir
    from buildcell.supply.records import RecordStore, project_name

    project = (
        project_name(args.project) if args.project else project_name(str(Path.cwd()), derived=True)
    )
    return RecordStore(StateDir(host=args.host).root / "builds", project=project)


def _cmd_ls(args: argparse.Namespace) -> int:
    import json

    from buildcell.cli.console import render_records
    from buildcell.supply.records import with_twins

    store = _records(args)
    records = with_twins(store.recent(args.n))
    _warn_finalized(store)
    if args.json:
        listed = []
        for record, twin in records:
            data = record.to_dict()
            if twin is not None:
                data["twin"] = twin.to_dict()  # the --check-repro rebuild, under its build
            listed.append(data)
        print(json.dumps(listed, indent=2))
    elif not records:
        print(
            f"no builds of project {store.project!r} yet: `buildcell build` runs the "
            "buildcell.yaml of this directory"
        )
    else:
        render_records(records, _stdout_console())
    return 0


def _warn_finalized(store: RecordStore) -> None:
    for build_id in store.finalized:
        sys.stderr.write(
            f"{PROG}: warning: build {build_id}: its supervisor is gone; recorded as interrupted\n"
        )


def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from buildcell.cli.console import render_record, render_unreadable
    from buildcell.supply.records import UnreadableRecord

    store = _records(args)
    record = store.load(args.build_id)
    _warn_finalized(store)
    if args.json:
        data = record.to_dict()
        if not isinstance(record, UnreadableRecord):
            from buildcell.egress.audit import EgressStats

            # As `build --json` has it: every step's destinations summed, with reasons.
            rows = EgressStats.from_records(r for step in record.steps for r in step.egress)
            data["egress"] = [row.to_dict() for row in rows]
        print(json.dumps(data, indent=2))
    elif isinstance(record, UnreadableRecord):
        render_unreadable(record, _stdout_console())
    else:
        render_record(record, _stdout_console())
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from buildcell.errors import Error

    store = _records(args)
    record = store.load_record(args.build_id)
    _warn_finalized(store)
    names = [s.name for s in record.steps]
    if args.step is not None and args.step not in names:
        raise Error(
            f"build {record.id} has no step {args.step!r}",
            hint="its steps are: " + ", ".join(names),
        )
    from buildcell.egress.audit import denial_line

    out = sys.stdout
    for name in [args.step] if args.step else names:
        raw = store.read_log(record.id, name)
        data = "" if raw is None else raw.decode(errors="replace")
        if args.step:
            out.write(data)
        else:
            for line in data.splitlines():
                out.write(f"[{name}] {line}\n")
        # What the log cannot show: where the step was refused, and why.
        step = next(s for s in record.steps if s.name == name)
        for row in step.egress:
            if row.get("verdict") == "denied":
                note = f"{PROG}: {denial_line(row, spec=True)}"
                if args.step:
                    out.flush()
                    sys.stderr.write(note + "\n")
                else:
                    out.write(f"[{name}] {note}\n")
    return 0


def _cmd_shell(args: argparse.Namespace) -> int:
    from buildcell.build.kept import discard_kept, using_kept
    from buildcell.build.shell import open_shell
    from buildcell.errors import UsageError
    from buildcell.settings import load_settings
    from buildcell.state import StateDir

    store = _records(args)
    record = store.load_record(args.build_id)
    _warn_finalized(store)
    state = StateDir(host=args.host)
    with using_kept(state, record):
        pass  # says so (exit 125) when there is none to open or discard
    if args.discard:
        if not discard_kept(state, store, record):
            raise UsageError(
                f"the kept workspace of build {record.id} is in use by a shell",
                hint="exit that shell first; `buildcell gc` removes it once it expires",
            )
        print(f"removed the kept workspace of build {record.id}")
        return 0
    if not (os.isatty(0) and os.isatty(1)):
        raise UsageError(
            "buildcell shell needs a terminal on its stdin and stdout",
            hint="run it from an interactive terminal (or under tmux or script)",
        )
    # Closing the terminal (its window, the ssh session) unwinds too: the cell goes.
    signal.signal(signal.SIGHUP, _on_sigterm)
    return open_shell(
        state,
        store,
        record,
        step=args.step,
        secrets=_secrets(args.secret),
        settings=load_settings(host=args.host),
        warn=_warn,
        say=lambda text: print(f"{PROG}: {text}", file=sys.stderr, flush=True),
    )


def _on_sigterm(signum: int, frame: object) -> None:
    # Unwind through the context managers so the cell is torn down.
    raise SystemExit(128 + signum)


#: Each command: what adds its parser, and what runs it.
_COMMANDS: dict[str, tuple[_AddParser, _Handler]] = {
    "run": (_add_run, _cmd_run),
    "build": (_add_build, _cmd_build),
    "keygen": (_add_keygen, _cmd_keygen),
    "verify": (_add_verify, _cmd_verify),
    "init": (_add_init, _cmd_init),
    "schema": (_add_schema, _cmd_schema),
    "ls": (_add_ls, _cmd_ls),
    "show": (_add_show, _cmd_show),
    "logs": (_add_logs, _cmd_logs),
    "shell": (_add_shell, _cmd_shell),
    "policy": (_add_policy, _cmd_policy),
    "doctor": (_add_doctor, _cmd_doctor),
    "gc": (_add_gc, _cmd_gc),
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if it is a known one: only its parser need be built."""
    args = iter(argv)
    for arg in args:
        if arg == "--state-dir":
            next(args, None)
        elif arg == "--" or not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
    return None


#: Path options whose value is the operator's, but which, given relative to a checkout,
#: must not lead through the repository's symlinks (see confined.operator_path).
_PATH_OPTIONS = {
    "source": "--source",
    "file": "-f",
    "events": "--events",
    "seccomp_profile": "--seccomp-profile",
    "policy": "--policy",
    "sign_key": "--sign-key",
    "key": "--key",
    "provenance": "--provenance",
}


def _check_operator_paths(args: argparse.Namespace) -> None:
    """Every path option, and a ``dir:``/``oci:`` rootfs: refused through a checkout's
    symlink (one line, exit 125), else made absolute.

    Raises:
        UnsafePathError: one leads through a symlink below the working directory.
    """
    from buildcell.confined import operator_path

    for name, flag in _PATH_OPTIONS.items():
        value = getattr(args, name, None)
        if isinstance(value, Path):
            setattr(args, name, operator_path(value, what=flag))
    rootfs = getattr(args, "rootfs", None)
    if isinstance(rootfs, str) and rootfs.startswith(("dir:", "oci:")):
        kind, _, rest = rootfs.partition(":")
        where, at, digest = rest.rpartition("@") if kind == "oci" else (rest, "", "")
        checked = operator_path(Path(where).expanduser(), what="--rootfs")
        args.rootfs = f"{kind}:{checked}{at}{digest}"


def _standard_streams() -> None:
    """Descriptors 0, 1 and 2 open before anything else is: where the caller closed one
    (``buildcell run ... >&-``), the first file the command opened would take its number,
    and what is written to stdout (a cell's output) would land in it. A closed one is
    /dev/null instead, and Python's stream for it exists."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number, the ones below being open by now: ``fd`` itself.
            os.open(os.devnull, os.O_RDWR)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - for the process


def entry() -> None:
    """The ``buildcell`` program: :func:`main`, then a quick exit.

    Tearing down the interpreter (every module, every object) costs tens of milliseconds
    after a build; by the time ``main`` returns everything durable is written and synced.
    So with the output flushed, the exit handlers run and no other thread left, the process
    ends at once; otherwise (an exception, a thread still running, a closed pipe) it exits
    the ordinary way. Young-object collections are made rarer while it runs: a command is
    short, or spends its time waiting on its cells."""
    import atexit
    import gc
    import threading

    gc.set_threshold(20_000, 20, 20)
    _standard_streams()
    code = main()
    if threading.active_count() == 1:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            raise SystemExit(code) from None
        atexit._run_exitfuncs()
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``buildcell`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if args.version:
        from buildcell import __version__

        print(f"{PROG} {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from buildcell import _log

    _log.configure(
        level=_log.DEBUG if args.debug else _log.ERROR,
        format=f"{PROG}: %(levelname)s: %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    from buildcell.errors import Error

    handler = _COMMANDS[args.command][1]
    try:
        # The environment is read here, once: the library gets it inside every StateDir.
        from buildcell.host import HostEnv

        host = HostEnv.read()
        if args.state_dir is not None:
            host = host.replace(state_dir=args.state_dir.absolute())
        args.host = host
        _check_operator_paths(args)
        return handler(args)
    except Error as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: {e.message}\n")
        for line in e.details:
            sys.stderr.write(f"{PROG}: error: {line}\n")
        if e.hint:
            sys.stderr.write(f"  hint: {e.hint}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; the cell was torn down\n")
        return 130
