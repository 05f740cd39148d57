"""Where this host's package clients fetch from, read from their own configuration.

``buildcell init`` gives a starter spec's fetching step the network allowlist of what pip,
npm and the go command on this host are configured to use. The configuration is read the
way each client reads it (its files in their order of precedence, then its environment
variables), but by parsing, never by running a client: a client run in a checkout would
read the repository's own configuration on the host, and one that hangs or fails must not
make ``init`` hang or fail. Whatever cannot be read is left out; the caller then writes a
commented placeholder.

Nothing here reads the process environment: the caller passes the variables (the command
line passes its own). URLs lose their credentials, query and fragment before they leave
this module, so a token in an index URL never reaches a spec.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from buildcell import _log
from buildcell.errors import ConfigError

__all__ = ["Source", "Sources", "go_sources", "npm_sources", "pip_sources"]

logger = _log.get(__name__)

_MAX_CONFIG = 256 << 10  # of one configuration file
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_TRUE = frozenset({"y", "yes", "t", "true", "on", "1"})
_ENV_REF = re.compile(r"\$\{([^${}?]+)(\?)?\}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Source:
    """One place a client fetches from.

    Attributes:
        url: the configured URL without credentials, query or fragment.
        setting: the setting that names it (``index-url``, ``extra-index-url``,
            ``find-links``, ``registry``, ``@scope:registry``, ``GOPROXY``).
        origin: where the setting was read: an environment variable or a file's path.
        allow: the ``HOST:PORT`` allowlist entry that reaches it.
        credentials: whether the configured URL carried credentials (left out of ``url``).
    """

    url: str
    setting: str
    origin: str
    allow: str
    credentials: bool = False


@dataclass(frozen=True)
class Sources:
    """What a client is configured to fetch from.

    Attributes:
        found: the http and https sources, in the client's order.
        notes: one line for each setting that is configured but cannot be reached from a
            cell (a local path, a ``file:`` URL, an unreadable value).
    """

    found: tuple[Source, ...] = ()
    notes: tuple[str, ...] = ()

    def by_setting(self, *settings: str) -> tuple[Source, ...]:
        """The sources named by any of ``settings``."""
        return tuple(s for s in self.found if s.setting in settings)


# --- reading -----------------------------------------------------------------------------


def _read_config(path: Path) -> str | None:
    """The text of a client's configuration file, or None if it is not a readable file.

    These are the host's files (the user's and the system's), not the repository's; a
    fifo or device is never read, and only the first 256 KiB count.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _MAX_CONFIG).decode("utf-8", errors="replace")
    except OSError as e:
        logger.debug("cannot read %s: %s", path, e)
        return None
    finally:
        os.close(fd)


def _under(root: Path, path: str) -> Path:
    """A system-wide path looked up below ``root`` (``/`` on a real host)."""
    return root / path.lstrip("/")


def _home(environ: Mapping[str, str]) -> Path | None:
    home = environ.get("HOME")
    return Path(home) if home and os.path.isabs(home) else None


def _config_home(environ: Mapping[str, str]) -> Path | None:
    xdg = environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = _home(environ)
    return None if home is None else home / ".config"


# --- URLs --------------------------------------------------------------------------------


def _source(raw: str, setting: str, origin: str) -> Source | str:
    """The :class:`Source` a configured URL stands for, or a note on why it is none."""
    where = f"{setting} ({origin})"
    if _PRINTABLE.fullmatch(raw) is None:
        return f"{where}: not a printable URL; left out"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        return f"{where}: not a URL; left out"
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme == "file" or not scheme:
        return f"{where}: {_strip(raw)} is a local path, which a cell does not see"
    if scheme not in _DEFAULT_PORTS or not host:
        return f"{where}: {_strip(raw)} is not an http or https URL; left out"
    bracketed = f"[{host}]" if ":" in host else host
    netloc = bracketed if port is None else f"{bracketed}:{port}"
    url = f"{scheme}://{netloc}{parts.path}"
    entry = f"{bracketed}:{port or _DEFAULT_PORTS[scheme]}"
    from buildcell.allowlist import parse_allow

    try:
        allow = parse_allow(entry).describe()
    except ConfigError:
        return f"{where}: {url} names no host an allowlist can hold; left out"
    credentials = parts.username is not None or parts.password is not None
    return Source(url, setting, origin, allow, credentials)


def _strip(raw: str) -> str:
    """``raw`` without what may be a credential (user info, query, fragment)."""
    head, _, _ = raw.partition("#")
    head, _, _ = head.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"
    return head


def _collect(values: Iterable[tuple[str, str, str]]) -> Sources:
    found: list[Source] = []
    notes: list[str] = []
    for raw, setting, origin in values:
        result = _source(raw, setting, origin)
        if isinstance(result, Source):
            if result not in found:
                found.append(result)
        else:
            notes.append(result)
    return Sources(tuple(found), tuple(notes))


# --- pip ---------------------------------------------------------------------------------


def _pip_files(
    environ: Mapping[str, str], system_root: Path, python_prefix: Path
) -> list[Path] | None:
    """pip's configuration files, lowest precedence first; None when pip reads none.

    Global (``$XDG_CONFIG_DIRS/pip/pip.conf``, ``/etc/pip.conf``), user (``~/.pip/pip.conf``,
    ``$XDG_CONFIG_HOME/pip/pip.conf``, skipped when ``PIP_CONFIG_FILE`` names an existing
    file), site (``sys.prefix/pip.conf``), then ``PIP_CONFIG_FILE``, as pip orders them.
    """
    env_file = environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return None
    files: list[Path] = []
    xdg_dirs = environ.get("XDG_CONFIG_DIRS")
    dirs = (
        [Path(d) for d in xdg_dirs.split(":") if os.path.isabs(d)]
        if xdg_dirs
        else [_under(system_root, "/etc/xdg")]
    )
    files += [d / "pip" / "pip.conf" for d in dirs]
    files.append(_under(system_root, "/etc/pip.conf"))
    if not (env_file and os.path.isfile(env_file)):
        home, config_home = _home(environ), _config_home(environ)
        if home is not None:
            files.append(home / ".pip" / "pip.conf")
        if config_home is not None:
            files.append(config_home / "pip" / "pip.conf")
    files.append(python_prefix / "pip.conf")
    if env_file:
        files.append(Path(env_file))
    return files


def _pip_options(
    files: Sequence[Path], command: str
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """pip's options from its files: {name: (value, file)}, and notes on unreadable files.

    A later file overrides an earlier one; ``[COMMAND]`` overrides ``[global]``.
    """
    merged: dict[tuple[str, str], tuple[str, str]] = {}
    notes: list[str] = []
    for path in files:
        text = _read_config(path)
        if text is None:
            continue
        # pip reads its files with RawConfigParser too: no interpolation of values.
        parser = configparser.RawConfigParser(strict=False)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error:
            notes.append(f"{path}: pip cannot parse it either; left out")
            continue
        for section in parser.sections():
            for key, value in parser.items(section):
                name = key.lower().replace("_", "-").removeprefix("--")
                merged[(section, name)] = (value, str(path))
    options: dict[str, tuple[str, str]] = {}
    for section in ("global", command):
        for (where, name), setting in merged.items():
            if where == section:
                options[name] = setting
    return options, notes


def pip_sources(
    environ: Mapping[str, str],
    *,
    command: str = "wheel",
    system_root: Path = Path("/"),
    python_prefix: Path | None = None,
) -> Sources:
    """The indexes and find-links pages ``pip COMMAND`` on this host would use.

    ``index-url``, ``extra-index-url`` and ``find-links`` (and ``no-index``) from pip's
    configuration files and ``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``,
    ``PIP_NO_INDEX``, with pip's precedence. pip's own default index is not reported: only
    what this host configures.

    Args:
        environ: the environment pip would see.
        command: the pip command whose section of the files applies.
        system_root: where system-wide files are looked up (``/``; tests use a tree).
        python_prefix: where pip's site file lives (``sys.prefix``).
    """
    files = _pip_files(environ, system_root, python_prefix or Path(sys.prefix))
    options, notes = _pip_options(files or [], command)
    for name in ("index-url", "extra-index-url", "find-links", "no-index"):
        variable = "PIP_" + name.upper().replace("-", "_")
        if environ.get(variable):
            options[name] = (environ[variable], variable)
    values: list[tuple[str, str, str]] = []
    no_index = options.get("no-index", ("", ""))[0].strip().lower() in _TRUE
    for name in ("index-url", "extra-index-url", "find-links"):
        if name not in options or (no_index and name != "find-links"):
            continue
        value, origin = options[name]
        values += [(item, name, origin) for item in value.split()]
    collected = _collect(values)
    return Sources(collected.found, (*notes, *collected.notes))


# --- npm ---------------------------------------------------------------------------------


def _npmrc(
    text: str, environ: Mapping[str, str] | None, origin: str
) -> tuple[dict[str, str], list[str]]:
    """The registry settings of an ``.npmrc`` (``registry``, ``@scope:registry``), and notes.

    npm's ini format: ``key = value`` lines, ``;`` and ``#`` comments, quoted values,
    ``${VAR}`` replaced from the environment. Every other key (tokens among them) is
    skipped unread. With ``environ`` None (a project's file, which its author wrote) a
    value that names a variable is left out: replacing it would carry this host's
    environment (a token, say) into the host name or path the spec is written with.
    """
    settings: dict[str, str] = {}
    notes: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in ";#[":
            continue
        written, sep, value = line.partition("=")
        key = written.strip() if environ is None else _expand(written.strip(), environ)
        if not sep or key is None or not _registry_key(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if environ is None:
            if "${" in value:
                notes.append(
                    f"{key} ({origin}) names an environment variable, which is not "
                    "replaced from this host; left out"
                )
                settings.pop(key, None)
            else:
                settings[key] = value
            continue
        expanded = _expand(value, environ)
        if expanded is not None:
            settings[key] = expanded
    return settings, notes


def _registry_key(key: str) -> bool:
    return key == "registry" or (key.startswith("@") and key.endswith(":registry"))


def _expand(text: str, environ: Mapping[str, str]) -> str | None:
    """``${VAR}`` replaced as npm does; None if a variable without ``?`` is unset."""
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        value = environ.get(match.group(1))
        if value is None and not match.group(2):
            missing = True
        return value or ""

    expanded = _ENV_REF.sub(one, text)
    return None if missing else expanded


def _npm_system_files(environ: Mapping[str, str]) -> list[Path]:
    """npm's builtin and global configuration files, lowest precedence first."""
    files: list[Path] = []
    # Absolute entries only: a relative one is looked up in the working directory, which
    # is the project, and a project's `npm` would pick which npmrc is read.
    search = os.pathsep.join(
        d for d in environ.get("PATH", "").split(os.pathsep) if os.path.isabs(d)
    )
    npm = shutil.which("npm", path=search) if search else None
    if npm is not None:
        real = Path(os.path.realpath(npm))
        package = next((p for p in real.parents if p.name == "npm"), None)
        if package is not None:
            files.append(package / "npmrc")
    global_config = _env_lower(environ, "npm_config_globalconfig")
    if global_config:
        files.append(Path(global_config))
        return files
    prefix = _env_lower(environ, "npm_config_prefix")
    if not prefix:
        node = shutil.which("node", path=search) if search else None
        if node is None:
            return files
        prefix = str(Path(os.path.realpath(node)).parent.parent)
    files.append(Path(prefix) / "etc" / "npmrc")
    return files


def _env_lower(environ: Mapping[str, str], name: str) -> str | None:
    """An ``npm_config_*`` variable, whose name npm reads in any case."""
    for key, value in environ.items():
        if key.lower() == name and value:
            return value
    return None


def npm_sources(
    environ: Mapping[str, str],
    *,
    project_npmrc: str | None = None,
) -> Sources:
    """The registries ``npm`` on this host would use for the project.

    ``registry`` and ``@scope:registry`` from npm's builtin and global ``npmrc``, the user's
    (``NPM_CONFIG_USERCONFIG``, else ``~/.npmrc``), the project's ``.npmrc`` (its text, as
    ``project_npmrc``) and ``npm_config_registry``, in npm's order of precedence. The main
    registry comes first. npm's own default registry is not reported.
    """
    layers = _npm_system_files(environ)
    user = _env_lower(environ, "npm_config_userconfig")
    home = _home(environ)
    if user:
        layers.append(Path(user))
    elif home is not None:
        layers.append(home / ".npmrc")
    settings: dict[str, tuple[str, str]] = {}
    notes: list[str] = []
    for path in layers:
        text = _read_config(path)
        if text is not None:
            found, _ = _npmrc(text, environ, str(path))
            settings.update((k, (v, str(path))) for k, v in found.items())
    if project_npmrc is not None:
        origin = ".npmrc of this project"
        found, notes = _npmrc(project_npmrc, None, origin)
        settings.update((k, (v, origin)) for k, v in found.items())
    for key, value in environ.items():
        lower = key.lower()
        if lower.startswith("npm_config_") and _registry_key(lower[11:]) and value:
            settings[lower[11:]] = (value, key)
    ordered = sorted(settings.items(), key=lambda item: (item[0] != "registry", item[0]))
    collected = _collect((value, key, origin) for key, (value, origin) in ordered)
    return Sources(collected.found, (*notes, *collected.notes))


# --- go ----------------------------------------------------------------------------------


def _go_env_file(environ: Mapping[str, str]) -> Path | None:
    goenv = environ.get("GOENV")
    if goenv == "off":
        return None
    if goenv:
        return Path(goenv)
    config_home = _config_home(environ)
    return None if config_home is None else config_home / "go" / "env"


def go_sources(environ: Mapping[str, str]) -> Sources:
    """The module proxies ``go`` on this host would use: ``GOPROXY`` from the environment,
    else from the user's ``go env -w`` file (``$GOENV``, ``~/.config/go/env``).

    Go's own default proxy is not reported; ``direct`` and ``off`` become notes.
    """
    value, origin = environ.get("GOPROXY"), "GOPROXY"
    if not value:
        path = _go_env_file(environ)
        text = None if path is None else _read_config(path)
        for line in (text or "").splitlines():
            key, sep, rest = line.strip().partition("=")
            if sep and key == "GOPROXY":
                value, origin = rest.strip(), str(path)
    if not value:
        return Sources()
    values: list[tuple[str, str, str]] = []
    notes: list[str] = []
    for entry in re.split(r"[,|]", value):
        item = entry.strip()
        if item == "direct":
            notes.append(
                f"GOPROXY ({origin}) ends in 'direct': modules the proxy lacks come from their "
                "own hosts, which need entries of their own (and git in the rootfs)"
            )
        elif item and item != "off":
            values.append((item, "GOPROXY", origin))
    collected = _collect(values)
    return Sources(collected.found, (*collected.notes, *notes))
