"""Pinned inputs: fetched on the host, verified against their sha256, kept content-addressed.

An input is a URI and the sha256 its content must have. Nothing reaches a cell unverified:

* a download or local copy is written to a temporary file inside the store while it is
  hashed, and becomes a store entry (by an atomic ``rename``) only when the digest matches;
  on any failure, including ``KeyboardInterrupt``, the temporary file is removed;
* a store entry is re-hashed every time it is used, so a corrupted entry is discarded and
  fetched again rather than trusted.

The store lays entries out as ``<root>/sha256/<first two hex digits>/<hex digest>``. Files
in the fan-out directories whose names start with ``.`` are partial writes that a killed
process left behind; they are never served and are safe to delete.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import logging
import os
import re
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from buildcell import __version__
from buildcell._fs import Closing, file_kind
from buildcell.audit import EventLog
from buildcell.errors import InputError, StateError
from buildcell.units import format_size

__all__ = [
    "MAX_INPUT_SIZE",
    "ContentStore",
    "InputRequest",
    "ResolvedInput",
    "resolve_inputs",
]

logger = logging.getLogger(__name__)

#: The largest input buildcell fetches or copies, in bytes.
MAX_INPUT_SIZE = 8 << 30

_CHUNK = 1 << 20
_DEFAULT_TIMEOUT = 60.0
_PROGRESS_INTERVAL = 0.1
_DIR_MODE = 0o711
# Entries must be readable by the unprivileged uids that cells run as.
_ENTRY_MODE = 0o644
_HTTP_SCHEMES = frozenset({"http", "https"})
_USER_AGENT = f"buildcell/{__version__}"
_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")
# The authority's userinfo runs up to the last "@" before the path, query or fragment.
_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_MISMATCH_HINT = "if the new content is intended, pin the new digest"
# O_NONBLOCK: a fifo opens at once instead of waiting for a writer, so fstat can reject it;
# O_NOCTTY: a terminal never becomes our controlling tty.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class InputRequest:
    """One pinned input of a build.

    Args:
        uri: ``http://``, ``https://`` or ``file:///absolute/path``.
        sha256: the digest the content must have: 64 hex digits, stored lowercased.
        path: where the input goes, relative to ``/workspace``; carried through unchecked.

    Raises:
        InputError: the uri or the digest is malformed.
    """

    uri: str
    sha256: str
    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", _normalize_digest(self.sha256))
        _check_uri(self.uri)


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

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            _make_dir(root, parents=True)
            _make_dir(root / "sha256")
        except OSError as e:
            raise StateError(f"cannot create the content store at {root}: {_os_reason(e)}") from e

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

    def add_file(self, source: Path, sha256: str) -> Path:
        """Copy the regular file ``source`` into the store, verifying it while copying.

        Raises:
            InputError: ``sha256`` is malformed; ``source`` is missing, unreadable or not a
                regular file; its digest does not match; or the store cannot be written.
        """
        return self._add_file(source, _normalize_digest(sha256), str(source))[0]

    def fetch(
        self,
        url: str,
        sha256: str,
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download ``url`` into the store, verifying it while downloading.

        The store is not consulted first (use :meth:`lookup`). Redirects are followed to
        ``http`` and ``https`` only; proxies are taken from the environment as urllib does.
        A ``user:password@`` in the URL is sent as HTTP basic authentication to the first
        server only, never across a redirect.

        Args:
            url: an ``http`` or ``https`` URL.
            sha256: the digest the content must have.
            timeout: seconds to wait for the connection and for each read; there is no
                overall limit, large inputs take as long as they take.
            progress: called with ``(bytes so far, Content-Length or None)`` at most every
                0.1 s, and once more when the body is complete.

        Raises:
            InputError: the URL or digest is malformed; the server cannot be reached, fails,
                times out, redirects elsewhere than http(s), sends a truncated or too large
                body; the digest does not match; or the store cannot be written.
        """
        digest = _normalize_digest(sha256)
        if _check_uri(url) not in _HTTP_SCHEMES:
            raise InputError(f"cannot fetch {_redact(url)}: only http and https URLs are fetched")
        return self._download(url, digest, timeout, progress)[0]

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
                logger.warning("content store entry %s is a symlink; removed it", path)
                return None
            raise InputError(f"cannot read content store entry {path}: {_os_reason(e)}") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                logger.warning("content store entry %s is a %s", path, file_kind(info.st_mode))
                _discard_entry(path, info)
                return None
            try:
                actual, size = _hash_fd(fd)
            except OSError as e:
                raise InputError(f"cannot read content store entry {path}: {_os_reason(e)}") from e
        finally:
            os.close(fd)
        if actual != digest:
            logger.warning(
                "content store entry %s is corrupt (its sha256 is %s); removing it", path, actual
            )
            _discard_entry(path, info)
            return None
        return path, size

    def _add_file(self, source: Path, digest: str, label: str) -> tuple[Path, int]:
        try:
            fd = os.open(source, _READ_FLAGS)
        except FileNotFoundError as e:
            raise InputError(f"input file {source} does not exist") from e
        except OSError as e:
            raise InputError(f"cannot open input file {source}: {_os_reason(e)}") from e
        try:
            try:
                info = os.fstat(fd)
            except OSError as e:
                raise InputError(f"cannot stat input file {source}: {_os_reason(e)}") from e
            if not stat.S_ISREG(info.st_mode):
                kind = file_kind(info.st_mode)
                raise InputError(f"input {source} is a {kind}, not a regular file")
            if info.st_size > MAX_INPUT_SIZE:
                raise InputError(
                    f"input file {source} is larger than the limit of {format_size(MAX_INPUT_SIZE)}"
                )
            with _Staging(self, digest, label) as staging:
                while True:
                    try:
                        chunk = os.read(fd, _CHUNK)
                    except OSError as e:
                        raise InputError(f"cannot read input file {source}: {_os_reason(e)}") from e
                    if not chunk:
                        break
                    staging.write(chunk)
                return staging.commit()
        finally:
            os.close(fd)

    def _download(
        self,
        url: str,
        digest: str,
        timeout: float,
        progress: Callable[[int, int | None], None] | None,
    ) -> tuple[Path, int]:
        label = _redact(url)
        request_url, authorization = _split_credentials(url)
        # The scheme was checked to be http or https, and redirects are held to the same.
        request = urllib.request.Request(  # noqa: S310
            request_url,
            # identity: a transparently compressed body would not be the pinned bytes.
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
        if authorization is not None:
            # Unredirected: credentials go to the host the user named and nowhere else.
            request.add_unredirected_header("Authorization", authorization)
        opener = _opener(label)
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            raise InputError(f"cannot fetch {label}: HTTP {e.code} {_one_line(e.reason)}") from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise InputError(f"cannot fetch {label}: {_net_reason(e, timeout)}") from e
        with response:
            if not isinstance(response, http.client.HTTPResponse):
                raise InputError(f"cannot fetch {label}: not an HTTP response")
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
                        f"cannot fetch {label}: body truncated after {staging.size} of "
                        f"{total} bytes"
                    )
                if progress is not None and reported != staging.size:
                    progress(staging.size, total)
                return staging.commit()


def resolve_inputs(
    requests: Sequence[InputRequest],
    store: ContentStore,
    *,
    events: EventLog | None = None,
    step: str | None = None,
) -> list[ResolvedInput]:
    """Make every input present and verified in ``store``, in order.

    Each input comes from the store if a verified entry exists, otherwise it is fetched
    (or copied, for ``file:`` URIs). An ``input`` event records each one with its uri
    (without credentials), sha256, path, size and source (``store`` or ``fetched``).

    Raises:
        InputError: an input cannot be fetched or does not match its digest; the build
            must not go on.
    """
    resolved: list[ResolvedInput] = []
    for request in requests:
        digest = _normalize_digest(request.sha256)
        scheme = _check_uri(request.uri)
        label = _redact(request.uri)
        found = store._lookup(digest)
        fetched = found is None
        if found is None:
            if scheme == "file":
                found = store._add_file(_file_path(request.uri), digest, label)
            else:
                found = store._download(request.uri, digest, _DEFAULT_TIMEOUT, None)
        store_path, size = found
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

    def _store_error(self, e: OSError) -> InputError:
        return InputError(
            f"cannot write {self._label} to the content store at {self._final.parent}: "
            f"{_os_reason(e)}"
        )


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only, and says so in our terms otherwise."""

    def __init__(self, label: str) -> None:
        self._label = label

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
    ) -> IO[bytes] | None:
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urllib.parse.urljoin(req.full_url, str(location).strip())
            try:
                scheme = urllib.parse.urlsplit(target).scheme.lower()
            except ValueError:
                scheme = ""
            if scheme not in _HTTP_SCHEMES:
                fp.close()
                raise InputError(
                    f"cannot fetch {self._label}: refusing redirect to {_redact(target)} "
                    "(only http and https are followed)"
                )
            if _redact(target) != target:
                # urllib would take the userinfo for part of the host and echo it in errors.
                fp.close()
                raise InputError(
                    f"cannot fetch {self._label}: refusing redirect to {_redact(target)} "
                    "(it carries credentials)"
                )
        result: IO[bytes] | None = super().http_error_302(req, fp, code, msg, headers)
        return result

    # The base class binds these names to its own http_error_302, not to the override.
    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(label: str) -> urllib.request.OpenerDirector:
    # Built by hand rather than with build_opener so that no file:, ftp: or data: handler
    # exists at all; ProxyHandler() reads the environment's proxies as urllib does.
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(label),
        urllib.request.HTTPErrorProcessor(),
    ]
    for handler in handlers:
        opener.add_handler(handler)
    return opener


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


def _make_dir(path: Path, *, parents: bool = False) -> None:
    try:
        path.mkdir(mode=_DIR_MODE, parents=parents)
    except FileExistsError:
        return
    # mkdir's mode is filtered by the umask; cells need o+x to reach their entries.
    os.chmod(path, _DIR_MODE)


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
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(e, urllib.error.URLError):
        return _one_line(str(e.reason))
    if isinstance(e, OSError):
        return _os_reason(e)
    return _one_line(str(e) or type(e).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"
