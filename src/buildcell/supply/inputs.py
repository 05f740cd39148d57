"""Pinned inputs: fetched on the host, verified against their sha256, kept content-addressed.

An input is a source and the sha256 its content must have. Nothing reaches a cell unverified:

* a download or local copy is written to a temporary file inside the store while it is
  hashed, and becomes a store entry (by an atomic ``rename``) only when the digest matches;
  on any failure, including ``KeyboardInterrupt``, the temporary file is removed;
* a store entry is re-hashed every time it is used, so a corrupted entry is discarded and
  fetched again rather than trusted.

The sources are chosen by the spec, that is by whoever controls the repository, and the
host handles them as an attacker's:

* **Local files** are read beneath a root (the spec's directory) through
  :mod:`buildcell.confined`, never by handing a path to the kernel: an absolute path, a
  ``..`` above the root, a symlink leading out of it (the file itself or a directory on
  the way), a magic link, or anything but a regular file with a single hard link is
  refused before a byte is read. A fifo or device is never opened for reading. A refused
  file is never hashed, so no error can tell its digest. A local file is read and checked
  on every use, even when the store already holds its digest: what a build gets is what
  its directory holds.
* **Downloads** reach public addresses only, unless the operator granted the destination
  (:class:`FetchPolicy`, from ``--allow-fetch`` and the configuration file's
  ``fetch: {allow: [...]}``). The host name of every request, the first and each redirect,
  is resolved here with :func:`socket.getaddrinfo`; every address it resolves to is
  checked with the egress proxy's guard (:func:`buildcell.allowlist.guarded_reason`:
  loopback, private, carrier-grade NAT, link-local, cloud metadata, reserved, ...), and
  the connection goes to those checked addresses, never to a second lookup. TLS still
  verifies the certificate against the host name, which is also the SNI and ``Host``. A
  name with even one guarded address is refused (a rebinding server would answer a public
  address first). Redirects are followed to ``http`` and ``https`` only, at most 10.
* **Proxies.** ``http_proxy``/``https_proxy``/``no_proxy`` in the environment are honoured
  as urllib does; they are the operator's configuration. With a proxy the target is still
  resolved and checked here, by the same rules, before anything is sent: a guarded target
  is refused unless granted, and never reaches the proxy. The proxy's own address is not
  guarded (the operator chose it, and it is often on loopback or a private network), and
  it resolves the target again itself: what it lets through beyond that is the operator's
  proxy policy. Only ``http://`` proxies are supported; ``https`` is tunnelled with
  ``CONNECT`` and verified end to end against the target's name.

A store hit needs no source at all: an entry whose digest a spec names is used without a
fetch, so without a destination being contacted or checked.

The store lays entries out as ``<root>/sha256/<first two hex digits>/<hex digest>``. Files
in the fan-out directories whose names start with ``.`` are partial writes that a killed
process left behind; they are never served and are safe to delete.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import ipaddress
import os
import re
import socket
import ssl
import stat
import string
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from buildcell import __version__, _log, confined
from buildcell._fs import Closing, file_kind
from buildcell._text import show
from buildcell.allowlist import (
    AllowEntry,
    EgressPolicy,
    guarded_reason,
    normalize_host,
    suggest_allow,
)
from buildcell.confined import UnsafePathError
from buildcell.errors import ConfigError, Error, InputError, StateError
from buildcell.events import EventLog
from buildcell.state import NO_SPACE, write_failure
from buildcell.units import format_size

__all__ = [
    "MAX_INPUT_SIZE",
    "MAX_REDIRECTS",
    "ContentStore",
    "FetchPolicy",
    "InputRefusedError",
    "InputRequest",
    "ResolvedInput",
    "resolve_inputs",
]

logger = _log.get(__name__)

#: The largest input buildcell fetches or copies, in bytes.
MAX_INPUT_SIZE = 8 << 30
#: The most redirects one fetch follows.
MAX_REDIRECTS = 10

_CHUNK = 1 << 20
_DEFAULT_TIMEOUT = 60.0
_PROGRESS_INTERVAL = 0.1
_DIR_MODE = 0o711
# Entries must be readable by the unprivileged uids that cells run as.
_ENTRY_MODE = 0o644
_HTTP_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = f"buildcell/{__version__}"
_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")
# The authority's userinfo runs up to the last "@" before the path, query or fragment.
_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_MISMATCH_HINT = "if the new content is intended, pin the new digest"
_GRANT_HINT = (
    "an operator grants a non-public destination with --allow-fetch DEST or "
    "fetch: {allow: [DEST]} in the configuration file"
)
# O_NONBLOCK: a fifo opens at once instead of waiting for a writer, so fstat can reject it;
# O_NOCTTY: a terminal never becomes our controlling tty.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class InputRefusedError(InputError):
    """buildcell will not use an input as the spec names it (exit 125).

    A local file that cannot be read confined to its root (outside it, through a symlink
    leading out, missing, not a regular file, a hard link), or a download from a
    destination that is not public and that the operator did not grant.
    """


# -- what the operator grants ----------------------------------------------------------


@dataclass(frozen=True)
class FetchPolicy:
    """The non-public destinations that host-side input fetches may reach: operator grants.

    Public addresses need no grant. Entries have the syntax of ``--allow``
    (:func:`buildcell.allowlist.parse_allow`), and mean:

    * ``IP:PORT``, ``IP/PREFIX:PORT``, ``[IPv6]:PORT``, ...: those addresses on that port,
      whatever name led to them (an IPv4-mapped IPv6 address counts as its IPv4 address);
    * ``HOST``, ``HOST:PORT``, ``*.DOMAIN[:PORT]``: URLs naming that host (or a strict
      subdomain) on the port (80 and 443 without one), whatever it resolves to: the
      operator vouches for the name and its DNS.

    An empty policy (the default) grants nothing.
    """

    allow: EgressPolicy = field(default_factory=EgressPolicy)

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> FetchPolicy:
        """Parse grants (``--allow-fetch`` values, ``fetch.allow`` entries), in order.

        Raises:
            ConfigError: an entry does not parse; the message names it.
            TypeError: ``items`` is a single string rather than a collection of them.
        """
        return cls(EgressPolicy.from_strings(items))

    @property
    def entries(self) -> tuple[AllowEntry, ...]:
        """The grants, repeats dropped, in order."""
        return self.allow.entries

    def describe(self) -> list[str]:
        """The canonical text of each grant, in order."""
        return self.allow.describe()

    def merged(self, other: FetchPolicy) -> FetchPolicy:
        """Both sets of grants (for the command line's and the configuration file's)."""
        return FetchPolicy(self.allow.merged(other.allow))

    def refusal(self, host: str, port: int, addresses: Sequence[str]) -> str | None:
        """Why a fetch from ``host:port`` must not connect to ``addresses``; None if it may.

        ``host`` is the URL's host (an IPv6 literal without brackets), ``addresses`` what it
        resolved to (a literal resolves to itself). Every address must be public, or
        covered by an IP grant on ``port``, unless a name grant covers ``host`` on
        ``port``. Pure: no lookups. The reason is one line and says how to grant it.
        """
        literal = _ip(host)
        if literal is None:
            entry = self.allow.match(host, port)
            if entry is not None and entry.kind != "network":
                return None
        if not addresses:
            return f"{host} resolves to no address"
        for text in addresses:
            address = _ip(text)
            if address is None:
                return f"{host} resolves to {text!r}, which is not an IP address"
            reason = guarded_reason(address)
            if reason is None or self.allow.literal_entry(address, port) is not None:
                continue
            if literal is not None:
                subject = f"{host} is {reason}"
            else:
                subject = f"{host} resolves to {text}, which is {reason}"
            return (
                f"{subject}; a spec may fetch only from public addresses (an operator can "
                f"allow it: --allow-fetch {_suggestion(host, port, address)})"
            )
        return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _suggestion(
    host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> str:
    """The grant for ``host``: its name where it is one (all its addresses), else the address."""
    if _ip(host) is None:
        with suppress(ConfigError):
            return f"{normalize_host(host)}:{port}"
    return suggest_allow(str(address), port)


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class InputRequest:
    """One pinned input of a build.

    A download names its URL; a local file names the directory it is confined to and its
    path below it (make one with :meth:`local`), and its ``uri`` is the ``file://`` URI of
    that path made absolute lexically, a label for records and messages only.

    Args:
        uri: ``http://`` or ``https://`` URL, or the ``file:///`` label of a local file.
        sha256: the digest the content must have: 64 hex digits, stored lowercased.
        path: where the input goes, relative to ``/workspace``; carried through unchecked.
        root: for a local file, the directory it must lie in (the spec's directory).
        rel: for a local file, its path below ``root`` as the spec wrote it; it is
            resolved beneath ``root`` when the input is read.

    Raises:
        InputError: the uri or the digest is malformed, or a ``file:`` uri comes without
            ``root`` and ``rel``.
        ValueError: ``root``/``rel`` are given for a URL, or ``uri`` is not their label.
    """

    uri: str
    sha256: str
    path: str
    root: Path | None = None
    rel: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", _normalize_digest(self.sha256))
        scheme = _check_uri(self.uri)
        if scheme != "file":
            if self.root is not None or self.rel is not None:
                raise ValueError(f"input {_redact(self.uri)}: root and rel are for local files")
            return
        if self.root is None or self.rel is None:
            raise InputError(
                f"cannot read input {self.uri}: a local file is read only beneath its "
                "directory, and none was given"
            )
        if self.uri != _file_label(self.root, self.rel):
            raise ValueError(
                f"input {self.uri} does not name {self.rel!r} in {self.root}; "
                "use InputRequest.local"
            )

    @classmethod
    def local(cls, root: Path, rel: str, *, sha256: str, path: str) -> InputRequest:
        """A local file ``rel`` below ``root``, labelled with its lexical ``file://`` URI.

        Raises:
            InputError: the digest is malformed, or ``rel`` holds a NUL byte.
        """
        return cls(_file_label(root, rel), sha256, path, root=root, rel=rel)


def _file_label(root: Path, rel: str) -> str:
    # Lexical, as a reader of the spec would take it: symlinks are resolved only confined.
    return Path(os.path.abspath(root / rel)).as_uri()


@dataclass(frozen=True)
class ResolvedInput:
    """An input verified and present in the store.

    ``uri`` has any ``user:password@`` removed; ``fetched`` is ``False`` when the content
    was already in the store.
    """

    path: str
    sha256: str
    uri: str
    store_path: Path
    size: int
    fetched: bool


class ContentStore:
    """Files addressed by their sha256, verified on the way in and on every use.

    Entries are written once, atomically, with mode 0644; concurrent writers of the same
    digest are harmless because they place identical content.

    Args:
        root: the store directory (for example ``<state>/cas``); created if missing.

    Raises:
        StateError: the store directories cannot be created.
    """

    def __init__(self, root: Path, *, warn: Callable[[str], None] | None = None) -> None:
        self.root = root
        #: told of every repair (an entry removed to be fetched again); default: the log
        self._warn = warn or (lambda message: logger.warning("%s", message))
        try:
            _make_dir(root, parents=True)
            _make_dir(root / "sha256")
        except OSError as e:
            raise StateError(f"cannot create the content store at {root}: {_os_reason(e)}") from e

    def _scope_dir(self, scope: str) -> Path:
        name = hashlib.sha256(scope.encode(errors="surrogateescape")).hexdigest()[:32]
        return self.root / "index" / name

    def _seen(self, scope: str | None, digest: str) -> bool:
        """Whether ``scope`` has had ``digest`` in this store before (always, without one)."""
        if scope is None:
            return True
        try:
            return stat.S_ISREG(os.lstat(self._scope_dir(scope) / digest).st_mode)
        except OSError:
            return False

    def _remember(self, scope: str | None, digest: str) -> None:
        """Note that ``scope`` fetched or copied ``digest`` itself (an empty marker)."""
        if scope is None:
            return
        where = self._scope_dir(scope)
        try:
            _make_dir(where.parent)
            _make_dir(where, private=True)
            fd = os.open(
                where / digest,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            os.close(fd)
        except OSError as e:
            raise StateError(
                f"cannot write the content store's index at {where}: {_os_reason(e)}"
            ) from e

    def path_for(self, sha256: str) -> Path:
        """Where the entry for ``sha256`` lives (whether or not it exists).

        Raises:
            InputError: ``sha256`` is not 64 hex digits.
        """
        digest = _normalize_digest(sha256)
        return self.root / "sha256" / digest[:2] / digest

    def lookup(self, sha256: str) -> Path | None:
        """The entry for ``sha256`` after re-hashing it, or ``None`` if there is none.

        An entry whose content does not match its name is removed (with a warning) and
        reported as missing, so the caller fetches it again.

        Raises:
            InputError: ``sha256`` is malformed, or the entry exists but cannot be read.
        """
        found = self._lookup(_normalize_digest(sha256))
        return None if found is None else found[0]

    def add_file(self, root: Path, rel: str, sha256: str) -> Path:
        """Copy the file ``rel`` below ``root`` into the store, verifying it while copying.

        ``rel`` is resolved confined to ``root`` (see the module documentation).

        Raises:
            InputRefusedError: ``rel`` leaves ``root``, is missing, or is not a regular file
                with a single link.
            InputError: ``sha256`` is malformed, the file cannot be read, its digest does
                not match, or the store cannot be written.
        """
        digest = _normalize_digest(sha256)
        fd, info = _open_local(root, rel)
        try:
            return self._copy(fd, info, digest, _file_label(root, rel))[0]
        finally:
            os.close(fd)

    def fetch(
        self,
        url: str,
        sha256: str,
        *,
        fetch_policy: FetchPolicy | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download ``url`` into the store, verifying it while downloading.

        The store is not consulted first (use :meth:`lookup`). Each request, the first and
        every redirect (``http`` and ``https`` only, at most :data:`MAX_REDIRECTS`), goes
        to the checked addresses of its host: public ones, or ones ``fetch_policy`` grants.
        Proxies are taken from the environment as urllib does; the target is checked all
        the same. A ``user:password@`` in the URL is sent as HTTP basic authentication to
        the first server only, never across a redirect.

        Args:
            url: an ``http`` or ``https`` URL.
            sha256: the digest the content must have.
            fetch_policy: the operator's grants; None grants nothing.
            timeout: seconds to wait for the connection and for each read; there is no
                overall limit, large inputs take as long as they take.
            progress: called with ``(bytes so far, Content-Length or None)`` at most every
                0.1 s, and once more when the body is complete.

        Raises:
            InputRefusedError: a host of the request or of a redirect resolves to an
                address that is not public and not granted; nothing was sent to it.
            InputError: the URL or digest is malformed; the server cannot be reached, fails,
                times out, redirects elsewhere than http(s) or too often, sends a truncated
                or too large body; the digest does not match; or the store cannot be
                written.
        """
        digest = _normalize_digest(sha256)
        if _check_uri(url) not in _HTTP_SCHEMES:
            raise InputError(f"cannot fetch {_redact(url)}: only http and https URLs are fetched")
        return self._download(url, digest, timeout, progress, fetch_policy or FetchPolicy())[0]

    # -- internals ---------------------------------------------------------------------

    def _lookup(self, digest: str) -> tuple[Path, int] | None:
        path = self.path_for(digest)
        try:
            fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            # ELOOP: something put a symlink where an entry belongs; it is never followed.
            if e.errno == errno.ELOOP and _discard_entry(path, None):
                self._warn(f"content store entry {path} was a symlink; removed it")
                return None
            raise InputError(f"cannot read content store entry {path}: {_os_reason(e)}") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self._warn(
                    f"content store entry {path} was a {file_kind(info.st_mode)}; removed it"
                )
                _discard_entry(path, info)
                return None
            try:
                actual, size = _hash_fd(fd)
            except OSError as e:
                raise InputError(f"cannot read content store entry {path}: {_os_reason(e)}") from e
        finally:
            os.close(fd)
        if actual != digest:
            self._warn(
                f"content store entry {path} was corrupt (its sha256 is {actual}); removed it, "
                "to be fetched or copied again"
            )
            _discard_entry(path, info)
            return None
        return path, size

    def _local(self, request: InputRequest, digest: str, label: str) -> tuple[Path, int, bool]:
        """A local input: (entry, size, whether it was copied). The file is always checked."""
        assert request.root is not None
        assert request.rel is not None
        fd, info = _open_local(request.root, request.rel)
        try:
            found = self._lookup(digest)
            if found is None:
                return (*self._copy(fd, info, digest, label), True)
            try:
                actual, _ = _hash_fd(fd)
            except OSError as e:
                raise InputError(f"cannot read input file {label}: {_os_reason(e)}") from e
            if actual != digest:
                raise InputError(
                    f"sha256 mismatch for {label}: expected {digest}, got {actual}",
                    hint=_MISMATCH_HINT,
                )
            return (*found, False)
        finally:
            os.close(fd)

    def _copy(self, fd: int, info: os.stat_result, digest: str, label: str) -> tuple[Path, int]:
        if info.st_size > MAX_INPUT_SIZE:
            raise InputError(
                f"input file {label} is larger than the limit of {format_size(MAX_INPUT_SIZE)}"
            )
        with _Staging(self, digest, label) as staging:
            while True:
                try:
                    chunk = os.read(fd, _CHUNK)
                except OSError as e:
                    raise InputError(f"cannot read input file {label}: {_os_reason(e)}") from e
                if not chunk:
                    break
                staging.write(chunk)
            return staging.commit()

    def _download(
        self,
        url: str,
        digest: str,
        timeout: float,
        progress: Callable[[int, int | None], None] | None,
        fetch_policy: FetchPolicy,
    ) -> tuple[Path, int]:
        label = _redact(url)
        current, authorization = _split_credentials(url)
        hop: str | None = None  # the redirect being followed, for messages
        for _ in range(MAX_REDIRECTS + 1):
            connection, response = _request(
                current, authorization, fetch_policy, timeout, label=label, hop=hop
            )
            try:
                if response.status not in _REDIRECT_CODES:
                    return self._receive(response, digest, label, timeout, progress)
                current = _redirect_target(current, response, label)
            finally:
                response.close()
                connection.close()
            # Credentials go to the host the user named and nowhere else.
            authorization = None
            hop = _redact(current)
        raise InputError(f"cannot fetch {label}: more than {MAX_REDIRECTS} redirects")

    def _receive(
        self,
        response: http.client.HTTPResponse,
        digest: str,
        label: str,
        timeout: float,
        progress: Callable[[int, int | None], None] | None,
    ) -> tuple[Path, int]:
        if response.status >= 300:
            raise InputError(
                f"cannot fetch {label}: HTTP {response.status} {_one_line(response.reason)}"
            )
        if response.status != 200:
            raise InputError(f"cannot fetch {label}: unexpected HTTP status {response.status}")
        total = _content_length(response, label)
        with _Staging(self, digest, label) as staging:
            last_report = -_PROGRESS_INTERVAL
            reported = -1
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise InputError(f"cannot fetch {label}: {_net_reason(e, timeout)}") from e
                if not chunk:
                    break
                staging.write(chunk)
                now = time.monotonic()
                if progress is not None and now - last_report >= _PROGRESS_INTERVAL:
                    last_report, reported = now, staging.size
                    progress(staging.size, total)
            if total is not None and staging.size < total:
                raise InputError(
                    f"cannot fetch {label}: body truncated after {staging.size} of {total} bytes"
                )
            if progress is not None and reported != staging.size:
                progress(staging.size, total)
            return staging.commit()


def resolve_inputs(
    requests: Sequence[InputRequest],
    store: ContentStore,
    *,
    fetch_policy: FetchPolicy | None = None,
    events: EventLog | None = None,
    step: str | None = None,
    scope: str | None = None,
) -> list[ResolvedInput]:
    """Make every input present and verified in ``store``, in order.

    A download comes from the store if a verified entry exists and (with ``scope``) that
    scope has had it before, otherwise it is fetched,
    reaching only public addresses and those ``fetch_policy`` grants. A local file is
    always read, confined to its root, and checked against its digest; it is copied into
    the store unless the store already has that digest. An ``input`` event records each
    one with its uri (without credentials), sha256, path, size and source (``store`` or
    ``fetched``).

    Args:
        fetch_policy: the operator's grants for non-public destinations; None grants none.
        scope: whose inputs these are (a project and its trust level or ref). The store is
            shared, but a digest is not a capability: a spec that names the digest of
            another project's private input must not get it from the store without ever
            reaching a server that has it. So a download is taken from the store only
            where the same scope fetched or copied that digest before.

    Raises:
        InputRefusedError: a local file is outside its root or not a regular file of its
            own, or a download would reach a destination that is not public and not
            granted; the message names the input and why.
        InputError: an input cannot be fetched or does not match its digest; the build
            must not go on.
    """
    policy = fetch_policy or FetchPolicy()
    resolved: list[ResolvedInput] = []
    for request in requests:
        digest = _normalize_digest(request.sha256)
        scheme = _check_uri(request.uri)
        label = _redact(request.uri)
        if scheme == "file":
            store_path, size, fetched = store._local(request, digest, label)
        else:
            found = store._lookup(digest) if store._seen(scope, digest) else None
            fetched = found is None
            if found is None:
                found = store._download(request.uri, digest, _DEFAULT_TIMEOUT, None, policy)
            store_path, size = found
        store._remember(scope, digest)
        item = ResolvedInput(
            path=request.path,
            sha256=digest,
            uri=label,
            store_path=store_path,
            size=size,
            fetched=fetched,
        )
        if events is not None:
            events.emit(
                "input",
                step=step,
                uri=label,
                sha256=digest,
                path=request.path,
                size=size,
                source="fetched" if fetched else "store",
            )
        resolved.append(item)
    return resolved


# -- local files -----------------------------------------------------------------------


def _open_local(root: Path, rel: str) -> tuple[int, os.stat_result]:
    """Open ``rel`` confined below ``root``: (descriptor, its fstat), or a refusal."""
    what = f"input file {_show(rel)} (in {root})"
    hint = f"a file input must be a regular file inside {root}, with no symlink leading out"
    try:
        root_fd = confined.open_root(root, what=f"the directory of input file {_show(rel)},")
    except UnsafePathError as e:
        raise InputRefusedError(e.message) from e
    try:
        return confined.open_file(root_fd, rel, what=what, single_link=True)
    except UnsafePathError as e:
        raise InputRefusedError(e.message, hint=e.hint or hint) from e
    finally:
        os.close(root_fd)


def _show(text: str) -> str:
    return show(text, 120)


# -- downloads -------------------------------------------------------------------------


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """Connects to addresses resolved and checked beforehand, never to a new lookup.

    ``host`` stays the name of the URL, so ``Host`` (and for TLS, SNI and the certificate
    check, in :class:`_CheckedHTTPSConnection`) still use it.
    """

    checked: tuple[tuple[int, Any], ...] = ()

    def connect(self) -> None:
        self.sock = _connect(self.checked, self.timeout)
        with suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _CheckedHTTPSConnection(http.client.HTTPSConnection, _CheckedHTTPConnection):
    """HTTPS over :class:`_CheckedHTTPConnection`'s socket.

    ``HTTPSConnection.connect`` calls the next ``connect`` in the MRO for the socket (ours),
    then wraps it with ``server_hostname=self.host``: the URL's name.
    """


def _connect(checked: Sequence[tuple[int, Any]], timeout: float | None) -> socket.socket:
    """A TCP connection to the first of the checked socket addresses that answers."""
    last: OSError | None = None
    for family, sockaddr in checked:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        return sock
    raise last if last is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")


def _resolve(host: str, port: int) -> list[tuple[int, Any]]:
    """Every (family, socket address) ``host`` resolves to, in order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: set[tuple[int, Any]] = set()
    result: list[tuple[int, Any]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        key = (int(family), sockaddr)
        if family in (socket.AF_INET, socket.AF_INET6) and key not in seen:
            seen.add(key)
            result.append(key)
    return result


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    authorization: str | None


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The environment's proxy for a URL, as urllib picks it (``no_proxy`` respected)."""
    proxies = urllib.request.getproxies()
    text = proxies.get(scheme)
    if not text or urllib.request.proxy_bypass(host):
        return None
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise InputError(f"invalid {scheme}_proxy {_redact(text)}: {e}") from e
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise InputError(
            f"unsupported {scheme}_proxy {_redact(text)}: expected http://HOST:PORT",
            hint="unset it, or add the host to no_proxy",
        )
    authorization = None
    if parts.username is not None:
        pair = (
            f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        )
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return _Proxy(parts.hostname, port or 80, authorization)


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _request(
    url: str,
    authorization: str | None,
    fetch_policy: FetchPolicy,
    timeout: float,
    *,
    label: str,
    hop: str | None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one GET for ``url`` (checked as the module says); (connection, response)."""
    where = f"cannot fetch {label}: " + (f"redirected to {hop}: " if hop is not None else "")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    assert host, "URLs are checked to have a host"
    port = parts.port or _DEFAULT_PORTS[scheme]
    try:
        checked = _resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise InputError(f"{where}cannot resolve {host}: {_net_reason(e, timeout)}") from e
    problem = fetch_policy.refusal(host, port, [str(sockaddr[0]) for _, sockaddr in checked])
    if problem is not None:
        raise InputRefusedError(where + problem, hint=_GRANT_HINT)
    headers = {
        "User-Agent": _USER_AGENT,
        # identity: a transparently compressed body would not be the pinned bytes.
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    if authorization is not None:
        headers["Authorization"] = authorization
    selector = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = _proxy_for(scheme, host)
    connection: http.client.HTTPConnection
    if proxy is None:
        if scheme == "https":
            connection = _CheckedHTTPSConnection(
                host, port, timeout=timeout, context=_tls_context()
            )
        else:
            connection = _CheckedHTTPConnection(host, port, timeout=timeout)
        connection.checked = tuple(checked)
    elif scheme == "https":
        # The proxy only relays bytes: TLS runs end to end and is verified against ``host``.
        connection = http.client.HTTPSConnection(
            proxy.host, proxy.port, timeout=timeout, context=_tls_context()
        )
        tunnel = {} if proxy.authorization is None else {"Proxy-Authorization": proxy.authorization}
        connection.set_tunnel(host, port, headers=tunnel)
    else:
        connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        selector = urllib.parse.urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        if proxy.authorization is not None:
            headers["Proxy-Authorization"] = proxy.authorization
    try:
        connection.request("GET", selector, headers=headers)
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException, ValueError) as e:
        connection.close()
        raise InputError(f"{where}{_net_reason(e, timeout)}") from e


def _redirect_target(current: str, response: http.client.HTTPResponse, label: str) -> str:
    """Where a redirect leads, if it may be followed (its destination is checked later)."""
    location = response.getheader("Location") or response.getheader("URI")
    if not location:
        raise InputError(f"cannot fetch {label}: HTTP {response.status} without a Location")
    # As urllib: a Location with spaces or non-ASCII characters is percent-encoded.
    target = urllib.parse.quote(
        urllib.parse.urljoin(current, location.strip()), safe=string.punctuation
    )
    shown = _redact(target)
    try:
        parts = urllib.parse.urlsplit(target)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError as e:
        raise InputError(f"cannot fetch {label}: refusing redirect to {shown} ({e})") from e
    if parts.scheme.lower() not in _HTTP_SCHEMES:
        raise InputError(
            f"cannot fetch {label}: refusing redirect to {shown} (only http and https are followed)"
        )
    if shown != target:
        raise InputError(
            f"cannot fetch {label}: refusing redirect to {shown} (it carries credentials)"
        )
    if not parts.hostname:
        raise InputError(f"cannot fetch {label}: refusing redirect to {shown} (no host)")
    return target


class _Staging(Closing):
    """A temporary file in the store that becomes an entry only if its digest matches.

    Closing it before :meth:`commit` (any failure, including ``KeyboardInterrupt``) removes
    the temporary file.
    """

    def __init__(self, store: ContentStore, digest: str, label: str) -> None:
        self._digest = digest
        self._label = label
        self._final = store.path_for(digest)
        self._hash = hashlib.sha256()
        self.size = 0
        self._tmp: Path | None = None
        try:
            _make_dir(self._final.parent)
            # Same directory as the entry: the rename is atomic and never crosses devices.
            fd, name = tempfile.mkstemp(
                prefix=f".{digest[:16]}.", suffix=".partial", dir=self._final.parent
            )
        except OSError as e:
            raise InputError(
                f"cannot write {label} to the content store at {store.root}: {_os_reason(e)}"
            ) from e
        self._tmp = Path(name)
        self._file: IO[bytes] = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > MAX_INPUT_SIZE:
            raise InputError(
                f"cannot fetch {self._label}: larger than the limit of "
                f"{format_size(MAX_INPUT_SIZE)}"
            )
        self._hash.update(data)
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as e:
            raise self._store_error(e) from e

    def commit(self) -> tuple[Path, int]:
        """Place the file as the store entry if its digest matches; else raise."""
        assert self._tmp is not None, "staging file already closed"
        actual = self._hash.hexdigest()
        if actual != self._digest:
            raise InputError(
                f"sha256 mismatch for {self._label}: expected {self._digest}, got {actual}",
                hint=_MISMATCH_HINT,
            )
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), _ENTRY_MODE)
            self._file.close()
            # A concurrent writer may have placed the same content already; replacing it
            # with identical bytes is harmless.
            os.rename(self._tmp, self._final)
            self._tmp = None
            _fsync_dir(self._final.parent)
        except OSError as e:
            raise self._store_error(e) from e
        return self._final, self.size

    def close(self) -> None:
        self._file.close()
        if self._tmp is not None:
            with suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None

    def _store_error(self, e: OSError) -> Error:
        if e.errno in NO_SPACE:
            return write_failure(self._final, e, what=f"{self._label} (the content store)")
        return InputError(
            f"cannot write {self._label} to the content store at {self._final.parent}: "
            f"{_os_reason(e)}"
        )


def _content_length(response: http.client.HTTPResponse, label: str) -> int | None:
    # With chunked transfer coding a Content-Length header is meaningless (RFC 9112 6.3).
    if response.chunked:
        return None
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"cannot fetch {label}: invalid Content-Length {value!r}")
    total = int(text)
    if total > MAX_INPUT_SIZE:
        raise InputError(
            f"cannot fetch {label}: Content-Length {total} exceeds the limit of "
            f"{format_size(MAX_INPUT_SIZE)}"
        )
    return total


def _normalize_digest(sha256: object) -> str:
    if not isinstance(sha256, str) or _DIGEST_RE.fullmatch(sha256) is None:
        shown = sha256 if isinstance(sha256, str) and sha256.isprintable() else None
        raise InputError(
            f"invalid sha256 {shown!r}: expected 64 hex digits"
            if shown is not None and len(shown) <= 80
            else "invalid sha256: expected 64 hex digits"
        )
    return sha256.lower()


def _check_uri(uri: object) -> str:
    """Validate an input uri and return its (lowercased) scheme."""
    if not isinstance(uri, str) or not uri:
        raise InputError("invalid input uri: expected a non-empty string")
    label = _redact(uri)
    if not uri.isprintable() or any(c.isspace() for c in uri):
        raise InputError(f"invalid input uri {label!r}: contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError as e:
        raise InputError(f"invalid input uri {label}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme in _HTTP_SCHEMES:
        if not uri.isascii():
            raise InputError(f"invalid input uri {label}: percent-encode non-ASCII characters")
        if not parts.hostname:
            raise InputError(f"invalid input uri {label}: no host")
    elif scheme == "file":
        _file_path(uri)
    else:
        raise InputError(
            f"unsupported input uri {label}: only http, https and file are allowed",
            hint="use https://..., or file:///absolute/path for a local file",
        )
    return scheme


def _file_path(uri: str) -> Path:
    parts = urllib.parse.urlsplit(uri)
    label = _redact(uri)
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"invalid input uri {label}: file uris must not name a host")
    if parts.query or parts.fragment:
        raise InputError(
            f"invalid input uri {label}: a file uri has no query or fragment "
            "(percent-encode ? and #)"
        )
    # surrogateescape: bytes that are not UTF-8 still name the file the OS has.
    path = urllib.parse.unquote(parts.path, errors="surrogateescape")
    if not path.startswith("/"):
        raise InputError(
            f"invalid input uri {label}: the path must be absolute (file:///absolute/path)"
        )
    if "\0" in path:
        raise InputError(f"invalid input uri {label}: the path contains a NUL byte")
    return Path(path)


def _redact(url: str) -> str:
    """``url`` without any ``user:password@``, safe for events and messages."""
    return _USERINFO_RE.sub(r"\1", url)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """The URL to request, and a basic Authorization header for its userinfo, if any."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    token = base64.b64encode(pair.encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport)), f"Basic {token}"


def _make_dir(path: Path, *, parents: bool = False, private: bool = False) -> None:
    mode = 0o700 if private else _DIR_MODE
    try:
        path.mkdir(mode=mode, parents=parents)
    except FileExistsError:
        return
    # mkdir's mode is filtered by the umask; cells need o+x to reach their entries.
    os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _discard_entry(path: Path, seen: os.stat_result | None) -> bool:
    """Remove a bad store entry; report whether it is gone.

    If ``seen`` is given, only the very file that was examined is removed: a concurrent
    process may already have replaced it with a good entry.
    """
    try:
        current = os.lstat(path)
        if seen is not None and (current.st_dev, current.st_ino) != (seen.st_dev, seen.st_ino):
            return True
        if stat.S_ISDIR(current.st_mode):
            return False
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as e:
        logger.warning("cannot remove content store entry %s (%s)", path, _os_reason(e))
        return False
    return True


def _os_reason(e: OSError) -> str:
    return _one_line(e.strerror or str(e) or type(e).__name__)


def _net_reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {_one_line(str(e.verify_message))}"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed: {_one_line(e.reason or str(e))}"
    if isinstance(e, socket.gaierror):
        return _one_line(e.strerror or str(e))
    if isinstance(e, OSError):
        return _os_reason(e)
    return _one_line(str(e) or type(e).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"
