"""Verified, safe, cached unpacking of container images into a root filesystem directory.

An image comes in one of three shapes:

* an **OCI image layout** directory (``oci-layout``, ``index.json``, ``blobs/sha256/...``);
* an **OCI archive**, a tar (optionally compressed) of such a layout;
* a **docker-archive**, as ``docker save`` writes it (``manifest.json``, config JSON, layer
  tars). Newer Docker also writes an OCI layout into the same tar; it is preferred.

**What the digest names.** For an OCI layout it is the digest of the manifest blob, or of an
image index, from which the manifest for this machine's platform (linux and the GOARCH name
of ``os.uname().machine``) is picked. A docker-archive without an OCI layout has no manifest
blob, so there the digest is the sha256 of the image's **config** JSON, which is what Docker
calls the image ID.

**Verification.** Trust flows from the pinned digest only: every blob (index, manifest,
config, layer) is hashed and compared with the digest that references it before what it
says is used, and layers are also checked against the config's ``rootfs.diff_ids`` (the
only chain a docker-archive has). A layer is hashed in the same pass that applies it, so the
bytes checked are the bytes unpacked; a mismatch fails the whole unpack, and nothing built
from it survives. ``index.json`` and ``manifest.json`` are not content-addressed and are only
used to find blobs.

**Layer application** parses layers with :mod:`tarfile` and does every filesystem write
itself, relative to directory file descriptors:

* names lose leading ``/`` (as Docker does); ``..`` components and NUL characters fail the
  unpack;
* every parent directory is opened component by component with ``O_NOFOLLOW``, so a symlink
  (from this layer or a lower one) is never followed: an entry below one fails the unpack;
* symlinks are created verbatim (absolute targets resolve inside the cell's root);
* a hard link is made only to a regular file inside the root, reached the same way; any
  other link is skipped and logged;
* devices, fifos and unknown entry types are skipped and counted; a skipped entry changes
  nothing, so what a lower layer had at its path stays;
* ownership and extended attributes (file capabilities among them) are dropped: everything
  belongs to the unpacking user; setuid and setgid bits are cleared; mtimes are kept;
* ``.wh.NAME`` and ``.wh..wh..opq`` whiteouts hide what lower layers put there.

Directories stay ``0o700`` while layers are applied and get their image modes and mtimes
only after the last layer, deepest first: a later layer may write into a directory an
earlier one made read-only, and writing would move its mtime.

**Cache.** The result lives in ``CACHE/oci/HEX/rootfs`` next to a ``complete`` marker. It is
built in a temporary directory beside it and renamed into place under an exclusive lock
(``CACHE/oci/HEX.lock``), so it is unpacked once and never seen half-done; later calls only
re-verify that the source still holds the digest (index, manifest and config, not layers).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from buildcell._fs import Closing, file_kind
from buildcell._json import reject_duplicate_keys
from buildcell.errors import ConfigError, ImageError, StateError
from buildcell.units import format_size

__all__ = [
    "MAX_ENTRIES",
    "MAX_JSON_SIZE",
    "MAX_UNPACKED_SIZE",
    "parse_digest",
    "unpack_image",
]

logger = logging.getLogger(__name__)

#: Largest JSON document (index, manifest, config, manifest.json) that is read.
MAX_JSON_SIZE = 4 << 20
#: Largest total size of an image's uncompressed layer streams (file contents included).
MAX_UNPACKED_SIZE = 16 << 30
#: Most tar entries, over all layers, that an image may have.
MAX_ENTRIES = 1_000_000

_MAX_LAYERS = 1024
_MAX_DEPTH = 256  # path components of one entry; also bounds recursion and open descriptors
_MAX_INDEX_DEPTH = 4  # image indexes nested in image indexes
_MAX_ARCHIVE_MEMBERS = 100_000
_MAX_LINK_HOPS = 8  # symlinks and hard links between members of an image archive
# What a layer may spend between two entries on headers (pax records, long names) that
# tarfile reads into memory; legitimate ones are far smaller.
_MAX_HEADER_BYTES = 1 << 20
_TAR_BUFSIZE = 64 << 10  # below _MAX_HEADER_BYTES: tarfile reads ahead this much
_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo in an image directory opens at once (and is refused) instead of hanging.
_BLOB_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_TYPES = frozenset({_OCI_MANIFEST, _DOCKER_MANIFEST})
_INDEX_TYPES = frozenset({_OCI_INDEX, _DOCKER_LIST})
_CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
_Compression = Literal["none", "gzip", "detect"]
# Foreign and non-distributable layers are their base type; their blobs must be present.
_LAYER_TYPES: dict[str, _Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "none",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RECOMPRESS_HINT = "re-export the image with gzip or uncompressed layers"

# os.uname().machine -> (GOARCH, variant) as OCI platforms name them.
_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
    "mips64": ("mips64", None),
}


def parse_digest(text: str) -> str:
    """Check that ``text`` is an image digest, ``sha256:`` and 64 lowercase hex digits.

    Returns:
        ``text`` unchanged.

    Raises:
        ConfigError: it is anything else (another algorithm, upper case, wrong length).
    """
    if not isinstance(text, str) or not _DIGEST.fullmatch(text):
        raise ConfigError(
            f"invalid image digest {text!r}: expected 'sha256:' and 64 lowercase hex digits",
            hint="pin the image's manifest digest, e.g. as 'skopeo inspect' shows it",
        )
    return text


def unpack_image(source: Path, digest: str, *, cache_dir: Path) -> Path:
    """Verify the image ``digest`` in ``source`` and unpack it once into ``cache_dir``.

    ``source`` is an OCI image layout directory, an OCI archive, or a docker-archive
    tarball. ``digest`` names the image manifest, or an image index whose manifest for this
    machine's platform is used; for a docker-archive without an OCI layout inside, which has
    no manifest, it is the sha256 of the image's config JSON (Docker's image ID). The
    returned directory is meant to be used read-only as a cell's root; it is owned by the
    unpacking user.

    A second call with the same digest returns the cached tree after re-verifying the
    index, manifest and config in ``source``, without reading layers. Concurrent calls for
    one digest, in threads or processes, unpack it once.

    Returns:
        ``cache_dir/oci/<hex>/rootfs``.

    Raises:
        ConfigError: ``digest`` is not a sha256 digest.
        ImageError: ``source`` is not a readable image, does not contain ``digest``, a blob
            does not match its digest, a layer is malformed, hostile (a path that leaves
            the root, an entry below a symlink), compressed in an unsupported way, or
            larger than the limits (:data:`MAX_UNPACKED_SIZE`, :data:`MAX_ENTRIES`).
        StateError: the cache directory cannot be created, locked or written.
    """
    digest = parse_digest(digest)
    hexdigest = digest.removeprefix("sha256:")
    with _open_image(source) as image:
        plan = _plan_image(image, digest)
        oci_dir = _ensure_dir(_ensure_dir(cache_dir) / "oci")
        final = oci_dir / hexdigest
        if _is_complete(final):
            return final / "rootfs"
        with _exclusive_lock(oci_dir / f"{hexdigest}.lock", digest):
            if _is_complete(final):  # another process finished it while we waited
                return final / "rootfs"
            _discard_leftovers(oci_dir, hexdigest)
            _unpack(image, plan, oci_dir, final)
    return final / "rootfs"


# --- wire formats ------------------------------------------------------------------------


def _check_digest(value: str) -> str:
    if not _DIGEST.fullmatch(value):
        raise ValueError(f"unsupported digest {value[:80]!r}: expected sha256 and 64 hex digits")
    return value


class _Model(BaseModel):
    # OCI documents are extensible: unknown fields (annotations, history, ...) are allowed.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, populate_by_name=True)


class _Platform(_Model):
    os: str = ""
    architecture: str = ""
    variant: str | None = None


class _Descriptor(_Model):
    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    platform: _Platform | None = None
    annotations: dict[str, str] | None = None

    @field_validator("digest")
    @classmethod
    def check_digest(cls, value: str) -> str:
        return _check_digest(value)

    def describe(self) -> str:
        """The digest, with its platform or reference name when the descriptor has one."""
        extras: list[str] = []
        if self.platform is not None and self.platform.os:
            extras.append(
                "/".join(
                    p
                    for p in (self.platform.os, self.platform.architecture, self.platform.variant)
                    if p
                )
            )
        name = (self.annotations or {}).get("org.opencontainers.image.ref.name")
        if name:
            extras.append(name)
        return f"{self.digest} ({', '.join(extras)})" if extras else self.digest


class _Index(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[_Descriptor]


class _Manifest(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    config: _Descriptor
    layers: list[_Descriptor] = Field(max_length=_MAX_LAYERS)


class _RootFs(_Model):
    type: str
    diff_ids: list[str] = Field(max_length=_MAX_LAYERS)

    @field_validator("diff_ids")
    @classmethod
    def check_diff_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            _check_digest(item)
        return value


class _Config(_Model):
    rootfs: _RootFs | None = None


class _DockerEntry(_Model):
    config: str = Field(alias="Config")
    layers: list[str] = Field(alias="Layers", max_length=_MAX_LAYERS)


_DOCKER_MANIFEST_LIST = TypeAdapter(list[_DockerEntry])

_M = TypeVar("_M", bound=BaseModel)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data, object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise ImageError(f"{what} is not valid JSON: {e}") from e


def _validate(model: type[_M], data: Any, what: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ImageError(f"{what} is malformed: {_first_error(e)}") from e


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


# --- plans (what to unpack), as plain data --------------------------------------------


@dataclass(frozen=True)
class _LayerRef:
    """One layer to apply: where it is, and what its bytes must hash to."""

    location: str  # the name of its file inside the image
    label: str  # how messages name it
    digest: str | None  # of the blob as stored; a docker-archive has none
    size: int | None  # of the blob as stored, when a descriptor declares it
    compression: _Compression
    diff_id: str | None  # of the uncompressed tar, from the config


@dataclass(frozen=True)
class _Plan:
    digest: str
    manifest: str | None  # the manifest picked (differs from digest for an index)
    layers: tuple[_LayerRef, ...]


def _native_platform() -> tuple[str, str | None]:
    machine = os.uname().machine
    return _GOARCH.get(machine, (machine, None))


def _select_platform(
    manifests: list[_Descriptor], arch: str, variant: str | None
) -> _Descriptor | None:
    """Pick the linux/``arch`` manifest of an index, preferring the exact ``variant``."""
    candidates = [
        d
        for d in manifests
        if d.platform is not None and d.platform.os == "linux" and d.platform.architecture == arch
    ]
    for want in (variant, None):
        for d in candidates:
            assert d.platform is not None
            if d.platform.variant == want:
                return d
    return candidates[0] if candidates else None


def _layer_compression(media_type: str, label: str) -> _Compression:
    compression = _LAYER_TYPES.get(media_type)
    if compression is None:
        raise ImageError(
            f"unsupported layer media type {media_type!r} (layer {label})",
            hint=_RECOMPRESS_HINT if "zstd" in media_type else None,
        )
    return compression


def _document_kind(doc: Any, media_type: str | None, what: str) -> Literal["manifest", "index"]:
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    declared = declared if isinstance(declared, str) else media_type
    if declared in _MANIFEST_TYPES:
        return "manifest"
    if declared in _INDEX_TYPES:
        return "index"
    if declared is None and isinstance(doc, dict):
        if "manifests" in doc:
            return "index"
        if "layers" in doc:
            return "manifest"
    raise _NotAManifest(
        f"{what} is not an image manifest or index (media type {declared!r})",
        hint="pin the digest of the image manifest or index, not of its config or a layer",
    )


class _NotAManifest(ImageError):
    """A blob was read as a manifest or index and is neither."""


class _NotInImage(ImageError):
    """The image does not contain the requested digest; lists what it has instead."""

    def __init__(self, digest: str, available: list[str]) -> None:
        have = ", ".join(available) if available else "nothing usable"
        super().__init__(
            f"image digest mismatch: expected {digest}, the image has: {have}",
            hint="pin the digest of the image manifest (or index) you verified",
        )
        self.available = available


# --- image sources ---------------------------------------------------------------------


class _ByteSource(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass
class _Blob:
    """An open file of an image and its size; closing it is the caller's job."""

    stream: IO[bytes]
    size: int


class _Image(Closing):
    """Read access to the files of an image, by their names inside the image."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def has(self, name: str) -> bool:
        """Whether the image has a file called ``name``."""
        blob = self.open(name)
        if blob is None:
            return False
        blob.stream.close()
        return True

    @abc.abstractmethod
    def open(self, name: str) -> _Blob | None:
        """Open the regular file ``name``; None when it does not exist.

        Raises:
            ImageError: it exists but is not a regular file, or cannot be read.
        """

    def close(self) -> None:
        """Release what the image holds open."""


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


class _LayoutDir(_Image):
    """An OCI image layout directory."""

    def open(self, name: str) -> _Blob | None:
        path = self.source / name  # names are ours: fixed, or built from a checked digest
        try:
            fd = os.open(path, _BLOB_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError(f"{path} is a {file_kind(st.st_mode)}, not a regular file")
        return _Blob(os.fdopen(fd, "rb"), st.st_size)


def _archive_key(name: str) -> str | None:
    key = posixpath.normpath("/" + name).lstrip("/")
    return key if key and key != "." else None


def _open_tar(*args: Any, **kwargs: Any) -> tarfile.TarFile:
    """``tarfile.open``, which reads the first header (see :func:`_next_entry`)."""
    try:
        return tarfile.open(*args, **kwargs)
    except (ValueError, OverflowError) as e:
        raise tarfile.ReadError(f"malformed entry header ({e})") from e


def _next_entry(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """``tar.next()``; a header tarfile cannot parse is a :class:`tarfile.ReadError`.

    Besides ``TarError``, tarfile's header parsing raises ``ValueError`` and
    ``OverflowError`` on some hostile input (a GNU sparse 1.0 map without its newline,
    say): that is a malformed image, not a bug of ours.
    """
    try:
        return tar.next()
    except (ValueError, OverflowError) as e:
        raise tarfile.ReadError(f"malformed entry header ({e})") from e


class _Archive(_Image):
    """A tar (optionally compressed) holding an OCI layout or a docker-archive."""

    def __init__(self, source: Path) -> None:
        super().__init__(source)
        try:
            # Held open until close(): blobs are read from it on demand.
            self._tar = _open_tar(source, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ImageError(f"cannot read image archive {source}: {e}") from e
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            count = 0
            while (member := _next_entry(self._tar)) is not None:
                count += 1
                if count > _MAX_ARCHIVE_MEMBERS:
                    raise ImageError(
                        f"image archive {source} has more than {_MAX_ARCHIVE_MEMBERS} entries"
                    )
                key = _archive_key(member.name)
                if key is not None:
                    self._members[key] = member  # a later member replaces an earlier one
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self._tar.close()
            raise ImageError(f"cannot read image archive {source}: {e}") from e
        except BaseException:
            self._tar.close()
            raise

    def open(self, name: str) -> _Blob | None:
        key: str | None = name
        member = self._members.get(name)
        # Links between archive members (docker save links duplicate layers) stay inside
        # the archive: they only select another member.
        for _ in range(_MAX_LINK_HOPS):
            if member is None or not (member.issym() or member.islnk()):
                break
            assert key is not None
            target = member.linkname
            if member.issym():
                target = posixpath.join(posixpath.dirname(key), target)
            key = _archive_key(target)
            member = self._members.get(key) if key is not None else None
        if member is None:
            return None
        if not member.isreg():
            raise ImageError(f"{name} in {self.source} is not a regular file")
        try:
            stream = self._tar.extractfile(member)
        except (tarfile.TarError, OSError) as e:
            raise ImageError(f"cannot read {name} from {self.source}: {e}") from e
        assert stream is not None  # regular members always have a stream
        return _Blob(stream, member.size)

    def close(self) -> None:
        self._tar.close()


def _open_image(source: Path) -> _Image:
    try:
        st = os.stat(source)
    except FileNotFoundError as e:
        raise ImageError(f"image {source} does not exist") from e
    except OSError as e:
        raise ImageError(f"cannot read image {source}: {e.strerror}") from e
    if stat.S_ISDIR(st.st_mode):
        return _LayoutDir(source)
    if stat.S_ISREG(st.st_mode):
        return _Archive(source)
    raise ImageError(f"image {source} is a {file_kind(st.st_mode)}, not a directory or archive")


# --- reading and verifying blobs --------------------------------------------------------


class _Reader:
    """Pass bytes through from ``src``, hashing and counting them, up to ``limit``.

    ``window`` additionally bounds what may be read before the next :meth:`allow`; it is
    how a layer's tar headers, which tarfile reads into memory, are kept small.
    """

    def __init__(
        self, src: _ByteSource, *, limit: int, too_big: str, window: int | None = None
    ) -> None:
        self._src = src
        self._limit = limit
        self._too_big = too_big
        self._window_end = limit if window is None else min(limit, window)
        self.count = 0
        self.hash = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self._limit - self.count

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def allow(self, size: int) -> None:
        """Let reads go ``size`` bytes (plus room for the next headers) past this point."""
        self._window_end = min(self._limit, self.count + size + _MAX_HEADER_BYTES)

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if self.count > self._window_end:
            raise self._overrun()
        # One byte past the window tells "too much" from "exactly enough". What was read
        # is hashed even then, so that a digest taken after drain() covers every byte.
        data = self._src.read(min(size, self._window_end - self.count + 1))
        self.count += len(data)
        self.hash.update(data)
        if self.count > self._window_end:
            raise self._overrun()
        return data

    def _overrun(self) -> ImageError:
        if self._window_end >= self._limit:
            return ImageError(self._too_big)
        return ImageError(
            f"a tar header is larger than {format_size(_MAX_HEADER_BYTES)}; "
            "the layer is malformed or hostile"
        )

    def seek(self, offset: int, /) -> int:
        raise io.UnsupportedOperation("layer streams are read once, front to back")

    def drain(self) -> None:
        """Read (and hash) everything that is left."""
        self._window_end = self._limit
        while self.read(_CHUNK):
            pass


def _mismatch(what: str, expected: str, actual: str) -> ImageError:
    return ImageError(
        f"{what} does not match its digest: expected {expected}, got {actual}",
        hint="the image was modified or corrupted after it was pinned",
    )


def _read_small(blob: _Blob, what: str) -> bytes:
    """Read a JSON-sized file whole, refusing anything larger than MAX_JSON_SIZE."""
    with blob.stream:
        if blob.size > MAX_JSON_SIZE:
            raise ImageError(f"{what} is larger than {format_size(MAX_JSON_SIZE)}")
        try:
            return _Reader(blob.stream, limit=MAX_JSON_SIZE, too_big=f"{what} is too large").read()
        except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
            raise ImageError(f"cannot read {what}: {e}") from e


def _read_file_json(image: _Image, name: str) -> Any:
    blob = image.open(name)
    if blob is None:
        raise ImageError(f"{image.source} has no {name}")
    return _parse_json(_read_small(blob, name), name)


def _read_verified(image: _Image, digest: str, what: str, size: int | None = None) -> bytes:
    """Read a JSON blob by digest and check its bytes hash to that digest."""
    label = f"{what} blob {digest}"
    blob = image.open(_blob_name(digest))
    if blob is None:
        raise ImageError(f"{label} is missing from {image.source}")
    data = _read_small(blob, label)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise _mismatch(label, digest, actual)
    if size is not None and len(data) != size:
        raise ImageError(f"{label} is {len(data)} bytes, its descriptor says {size}")
    return data


# --- planning ---------------------------------------------------------------------------


def _plan_image(image: _Image, digest: str) -> _Plan:
    """Find and verify the manifest (or config) that ``digest`` names, and list its layers."""
    has_oci = image.has("index.json")
    has_docker = image.has("manifest.json")
    if not has_oci and not has_docker:
        raise ImageError(
            f"{image.source} is not an OCI image layout or docker-archive "
            "(it has neither index.json nor manifest.json)"
        )
    if not has_oci:
        return _plan_docker(image, digest)
    try:
        return _plan_oci(image, digest)
    except (_NotInImage, _NotAManifest) as e:
        if not has_docker:
            raise
        oci_error = e
    # Docker writes both formats; its image ID (the config digest, which is also a blob of
    # the layout) is found through manifest.json.
    try:
        return _plan_docker(image, digest)
    except _NotInImage as e:
        if isinstance(oci_error, _NotInImage):
            raise _NotInImage(digest, oci_error.available + e.available) from None
        raise oci_error from None


def _plan_oci(image: _Image, digest: str) -> _Plan:
    layout = _read_file_json(image, "oci-layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise ImageError(f"oci-layout in {image.source} has no imageLayoutVersion")
    index = _validate(_Index, _read_file_json(image, "index.json"), "index.json")
    if not image.has(_blob_name(digest)):
        available = _available(image, index)
        if any(d.digest == digest for d in index.manifests):
            raise ImageError(f"manifest blob {digest} is listed in index.json but missing")
        raise _NotInImage(digest, available)
    media_type = next((d.media_type for d in index.manifests if d.digest == digest), None)
    manifest_digest, manifest = _resolve_manifest(image, digest, media_type, None, 0)
    config_label = f"config blob {manifest.config.digest}"
    if manifest.config.media_type not in _CONFIG_TYPES:
        raise ImageError(
            f"manifest {manifest_digest} is not a container image "
            f"(config media type {manifest.config.media_type!r})"
        )
    if manifest.config.size > MAX_JSON_SIZE:
        raise ImageError(f"{config_label} is larger than {format_size(MAX_JSON_SIZE)}")
    config_data = _read_verified(image, manifest.config.digest, "config", manifest.config.size)
    config = _validate(_Config, _parse_json(config_data, config_label), config_label)
    diff_ids: list[str | None] = [None] * len(manifest.layers)
    if config.rootfs is not None:
        if len(config.rootfs.diff_ids) != len(manifest.layers):
            raise ImageError(
                f"{config_label} lists {len(config.rootfs.diff_ids)} layers, "
                f"manifest {manifest_digest} has {len(manifest.layers)}"
            )
        diff_ids = list(config.rootfs.diff_ids)
    layers = tuple(
        _LayerRef(
            location=_blob_name(d.digest),
            label=d.digest,
            digest=d.digest,
            size=d.size,
            compression=_layer_compression(d.media_type, d.digest),
            diff_id=diff_id,
        )
        for d, diff_id in zip(manifest.layers, diff_ids, strict=True)
    )
    return _Plan(digest=digest, manifest=manifest_digest, layers=layers)


def _resolve_manifest(
    image: _Image, digest: str, media_type: str | None, size: int | None, depth: int
) -> tuple[str, _Manifest]:
    """Read blob ``digest``; if it is an index, descend to this platform's manifest."""
    data = _read_verified(image, digest, "manifest", size)
    label = f"manifest {digest}"
    doc = _parse_json(data, label)
    if _document_kind(doc, media_type, label) == "manifest":
        return digest, _validate(_Manifest, doc, label)
    label = f"image index {digest}"
    index = _validate(_Index, doc, label)
    if depth >= _MAX_INDEX_DEPTH:
        raise ImageError(f"{label} nests image indexes more than {_MAX_INDEX_DEPTH} deep")
    arch, variant = _native_platform()
    chosen = _select_platform(index.manifests, arch, variant)
    if chosen is None:
        have = ", ".join(d.describe() for d in index.manifests) or "no manifests"
        raise ImageError(f"{label} has no manifest for linux/{arch}; it has: {have}")
    logger.debug("image index %s: using %s", digest, chosen.describe())
    return _resolve_manifest(image, chosen.digest, chosen.media_type, chosen.size, depth + 1)


def _available(image: _Image, index: _Index) -> list[str]:
    """What index.json offers, with the manifests of nested indexes, for error messages."""
    found: list[str] = []
    for d in index.manifests:
        found.append(d.describe())
        if d.media_type not in _INDEX_TYPES or d.size > MAX_JSON_SIZE:
            continue
        with contextlib.suppress(ImageError):
            nested = _validate(
                _Index, _parse_json(_read_verified(image, d.digest, "index", d.size), ""), ""
            )
            found.extend(n.describe() for n in nested.manifests)
    return found


def _plan_docker(image: _Image, digest: str) -> _Plan:
    try:
        entries = _DOCKER_MANIFEST_LIST.validate_python(_read_file_json(image, "manifest.json"))
    except ValidationError as e:
        raise ImageError(f"manifest.json is malformed: {_first_error(e)}") from e
    available: list[str] = []
    for entry in entries[:_MAX_LAYERS]:
        key = _archive_key(entry.config)
        blob = image.open(key) if key is not None else None
        if blob is None:
            raise ImageError(f"config {entry.config!r} named by manifest.json is missing")
        data = _read_small(blob, f"config {entry.config}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        available.append(actual)
        if actual == digest:
            return _plan_docker_entry(entry, data, digest)
    raise _NotInImage(digest, available)


def _plan_docker_entry(entry: _DockerEntry, config_data: bytes, digest: str) -> _Plan:
    label = f"config {digest}"
    config = _validate(_Config, _parse_json(config_data, label), label)
    if config.rootfs is None:
        raise ImageError(f"{label} has no rootfs.diff_ids; its layers cannot be verified")
    if len(config.rootfs.diff_ids) != len(entry.layers):
        raise ImageError(
            f"{label} lists {len(config.rootfs.diff_ids)} layers, "
            f"manifest.json has {len(entry.layers)}"
        )
    layers: list[_LayerRef] = []
    for path, diff_id in zip(entry.layers, config.rootfs.diff_ids, strict=True):
        key = _archive_key(path)
        if key is None:
            raise ImageError(f"manifest.json names an invalid layer path {path!r}")
        # No digest covers the stored blob; the diff_id covers what it unpacks to.
        layers.append(_LayerRef(key, path, None, None, "detect", diff_id))
    return _Plan(digest=digest, manifest=None, layers=tuple(layers))


# --- layer application ------------------------------------------------------------------


class _UnsafeName(ValueError):
    """A tar name that cannot be placed inside the root."""


def _entry_parts(name: str) -> tuple[str, ...]:
    """Split a tar name into components; ``()`` is the root itself.

    Leading ``/`` are stripped (as Docker does), ``.`` and empty components dropped.

    Raises:
        _UnsafeName: it contains NUL or a ``..`` component.
    """
    if "\0" in name:
        raise _UnsafeName("contains a NUL character")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _UnsafeName("has a '..' component")
    return parts


def _show(parts: tuple[str, ...]) -> str:
    return repr("/".join(parts) or "/")


def _mtime_ns(value: float) -> int:
    # pax mtimes are arbitrary decimals; clamp to what utimensat takes.
    if not math.isfinite(value):
        return 0
    return max(-(1 << 62), min(1 << 62, int(value * 1_000_000_000)))


def _touch(touched: set[tuple[str, ...]], parts: tuple[str, ...]) -> None:
    """Add ``parts`` and its ancestors; a present entry's ancestors are all present."""
    for i in range(len(parts), 0, -1):
        if parts[:i] in touched:
            return
        touched.add(parts[:i])


class _Blocked(Exception):
    """A path component is not a directory (a symlink, or a file)."""

    def __init__(self, parts: tuple[str, ...], kind: str) -> None:
        super().__init__(f"{_show(parts)} is a {kind}")
        self.parts = parts
        self.kind = kind


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and, for a directory, all below it; never follows."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if st.st_mode & 0o700 != 0o700:
        # Needed to list and empty it when we are not root. fchmodat without following
        # refuses a symlink rather than follow it.
        os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _remove_entry(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` (a tree, a file or a symlink) without following symlinks in it.

    Directories without owner permissions (``0o000``) are made accessible first.
    """
    try:
        parent = os.open(path.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        _remove_entry(parent, path.name)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)


@dataclass
class _Stats:
    layers: int = 0
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, what: str, path: str, reason: str, *, warn: bool = False) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1
        logger.log(logging.WARNING if warn else logging.DEBUG, "skipped %s: %s", path, reason)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {what}" for what, n in sorted(self.skipped.items()))
        return f"{self.layers} layers, {self.entries} entries, {format_size(self.bytes)}" + (
            f"; skipped {skipped}" if skipped else ""
        )


class _Unpacker(Closing):
    """Applies layers, in order, to a staging directory it holds open."""

    def __init__(self, rootfs: Path) -> None:
        self._root = os.open(rootfs, _DIR_FLAGS)
        # Final (mode, mtime) of every directory made, applied after the last layer.
        self._dirs: dict[tuple[str, ...], tuple[int, int]] = {}
        self._budget = MAX_UNPACKED_SIZE
        self._max_entries = MAX_ENTRIES
        self.stats = _Stats()
        # The parent directory of the last entry, open: tars list a directory's entries
        # together, and walking from the root for each costs most of the time. Every
        # removal drops it, since only a removal can unlink or replace a directory on it.
        self._last_parent: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        self._forget_parent()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _forget_parent(self) -> None:
        if self._last_parent is not None:
            os.close(self._last_parent[1])
            self._last_parent = None

    def _open_parent(self, parts: tuple[str, ...], mtime: int) -> int:
        """A new descriptor for directory ``parts``, made if missing (see :meth:`_walk`)."""
        if self._last_parent is not None and self._last_parent[0] == parts:
            return os.dup(self._last_parent[1])
        fd = self._walk(parts, create=True, mtime=mtime)
        assert fd is not None
        self._forget_parent()
        self._last_parent = (parts, os.dup(fd))
        return fd

    def _remove(self, dir_fd: int, name: str) -> None:
        self._forget_parent()
        _remove_entry(dir_fd, name)

    # -- one layer

    def apply(self, image: _Image, layer: _LayerRef, where: str) -> None:
        """Apply one layer, verifying its digest (and diff_id) in the same pass."""
        compression = layer.compression
        if compression == "detect":
            compression = self._detect(image, layer, where)
        blob = image.open(layer.location)
        if blob is None:
            raise ImageError(f"{where}: blob {layer.location} is missing from {image.source}")
        with blob.stream:
            if layer.size is not None and blob.size != layer.size:
                raise ImageError(
                    f"{where}: blob is {blob.size} bytes, its descriptor says {layer.size}"
                )
            raw = _Reader(blob.stream, limit=blob.size, too_big=f"{where}: blob grew while read")
            src: _ByteSource = raw
            if compression == "gzip":
                src = gzip.GzipFile(fileobj=raw, mode="rb")
            stream = _Reader(
                src,
                limit=self._budget,
                too_big=f"the image unpacks to more than {format_size(MAX_UNPACKED_SIZE)}",
                window=_MAX_HEADER_BYTES,
            )
            try:
                # Stream mode reads the layer once, front to back, like the hash does.
                with _open_tar(
                    fileobj=cast(IO[bytes], stream), mode="r|", bufsize=_TAR_BUFSIZE
                ) as tar:
                    self._apply_members(tar, stream, where)
                stream.drain()  # the diff_id covers the whole uncompressed stream
                raw.drain()
            except (ImageError, tarfile.TarError, OSError, EOFError, zlib.error) as e:
                # A tampered blob usually breaks parsing first; say what the cause was.
                mismatch = self._find_mismatch(layer, raw, stream)
                if mismatch is not None:
                    raise mismatch from e
                if isinstance(e, ImageError):
                    raise
                kind = "gzip-compressed tar" if compression == "gzip" else "tar"
                raise ImageError(f"{where}: not a valid {kind}: {e}") from e
        if layer.digest is not None and raw.digest() != layer.digest:
            raise _mismatch(f"layer blob {layer.label}", layer.digest, raw.digest())
        if layer.diff_id is not None and stream.digest() != layer.diff_id:
            raise _mismatch(f"uncompressed layer {layer.label}", layer.diff_id, stream.digest())
        self._budget -= stream.count
        self.stats.layers += 1

    @staticmethod
    def _find_mismatch(layer: _LayerRef, raw: _Reader, stream: _Reader) -> ImageError | None:
        """After a failure: read what is left, and say whether the layer was tampered with."""
        stream_complete = False
        with contextlib.suppress(ImageError, OSError, EOFError, zlib.error):
            stream.drain()
            stream_complete = True
        with contextlib.suppress(ImageError, OSError, EOFError, zlib.error):
            raw.drain()
            if layer.digest is not None and raw.digest() != layer.digest:
                return _mismatch(f"layer blob {layer.label}", layer.digest, raw.digest())
        if stream_complete and layer.diff_id is not None and stream.digest() != layer.diff_id:
            return _mismatch(f"uncompressed layer {layer.label}", layer.diff_id, stream.digest())
        return None

    def _detect(self, image: _Image, layer: _LayerRef, where: str) -> _Compression:
        # docker-archive layers carry no media type: look at their first bytes.
        blob = image.open(layer.location)
        if blob is None:
            raise ImageError(f"{where}: layer {layer.location} is missing from {image.source}")
        with blob.stream:
            try:
                head = blob.stream.read(4)
            except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
                raise ImageError(f"{where}: cannot read the layer: {e}") from e
        if head.startswith(_GZIP_MAGIC):
            return "gzip"
        if head.startswith(_ZSTD_MAGIC):
            raise ImageError(
                f"unsupported layer media type (zstd-compressed tar) ({where})",
                hint=_RECOMPRESS_HINT,
            )
        return "none"

    def _apply_members(self, tar: tarfile.TarFile, stream: _Reader, where: str) -> None:
        # What this layer put in place (with the parents of each), so that its whiteouts
        # remove only what lower layers made, whatever order the entries come in.
        touched: set[tuple[str, ...]] = set()
        while (member := _next_entry(tar)) is not None:
            # Stream mode needs no index of members; tarfile keeps one anyway (and typeshed
            # does not declare it). Dropping it keeps memory flat over a million entries.
            cast(Any, tar).members.clear()
            stream.allow(member.size)
            self.stats.entries += 1
            if self.stats.entries > self._max_entries:
                raise ImageError(f"the image has more than {self._max_entries} entries")
            try:
                parts = _entry_parts(member.name)
            except _UnsafeName as e:
                raise ImageError(
                    f"{where}: entry {member.name!r} {e}",
                    hint="the image is malformed or hostile; nothing was unpacked",
                ) from None
            if member.size and (not parts or parts[-1].startswith(_WHITEOUT) or not member.isreg()):
                # Only files carry data. Anything else claiming some would make tarfile skip
                # that much of the stream, 64 KiB at a time, for as long as the claim says.
                raise ImageError(
                    f"{where}: entry {member.name[:200]!r} claims {member.size} bytes of data "
                    "but is not a file",
                    hint="the image is malformed or hostile; nothing was unpacked",
                )
            if not parts:
                continue  # the root itself: its mode is ours to choose
            if len(parts) > _MAX_DEPTH:
                raise ImageError(f"{where}: entry {_show(parts[:8])}... is nested too deep")
            try:
                if parts[-1].startswith(_WHITEOUT):
                    self._whiteout(parts, touched, where)
                else:
                    _touch(touched, parts)
                    self._entry(tar, member, parts, stream, where)
            except _Blocked as e:
                raise ImageError(
                    f"{where}: entry {_show(parts)} is below {_show(e.parts)}, which is a "
                    f"{e.kind}; refusing to follow it",
                    hint="the image is malformed or hostile; nothing was unpacked",
                ) from None
            except OSError as e:
                raise ImageError(f"{where}: cannot unpack {_show(parts)}: {e.strerror or e}") from e

    def _whiteout(self, parts: tuple[str, ...], touched: set[tuple[str, ...]], where: str) -> None:
        parent, name = parts[:-1], parts[-1]
        _touch(touched, parent)
        if name != _OPAQUE and name[len(_WHITEOUT) :].startswith(_WHITEOUT):
            self.stats.skip("aufs metadata", _show(parts), "aufs bookkeeping entry")
            return
        victim = name[len(_WHITEOUT) :]
        if name != _OPAQUE and victim in ("", ".", ".."):
            raise ImageError(f"{where}: invalid whiteout {_show(parts)}")
        fd = self._walk(parent, create=False)
        if fd is None:
            return  # nothing below to hide
        self.stats.whiteouts += 1
        try:
            if name == _OPAQUE:
                self._clear_lower(fd, parent, touched)
                return
            try:
                st = os.stat(victim, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            target = (*parent, victim)
            if target not in touched:
                self._remove(fd, victim)
            elif stat.S_ISDIR(st.st_mode):
                # This layer also made it: hide only what lower layers had inside.
                sub = os.open(victim, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._clear_lower(sub, target, touched)
                finally:
                    os.close(sub)
        finally:
            os.close(fd)

    def _clear_lower(self, fd: int, parts: tuple[str, ...], touched: set[tuple[str, ...]]) -> None:
        """Remove everything below ``fd`` that the current layer did not put there."""
        for child in os.listdir(fd):
            here = (*parts, child)
            if here not in touched:
                self._remove(fd, child)
                continue
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._clear_lower(sub, here, touched)
                finally:
                    os.close(sub)

    def _entry(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: tuple[str, ...],
        stream: _Reader,
        where: str,
    ) -> None:
        mtime = _mtime_ns(member.mtime)
        parent = self._open_parent(parts[:-1], mtime)
        name, shown = parts[-1], _show(parts)
        try:
            if member.isdir():
                self._make_dir(parent, name, parts, member.mode, mtime)
            elif member.isreg():
                self._make_file(tar, member, parent, name, stream=stream, where=where, mtime=mtime)
            elif member.issym():
                self._make_symlink(parent, name, member.linkname, shown, mtime)
            elif member.islnk():
                self._make_hardlink(parent, name, parts, member.linkname, shown)
            elif member.isfifo():  # before isdev(), which is true for fifos too
                self.stats.skip("fifos", shown, "fifo")
            elif member.isdev():
                self.stats.skip("devices", shown, "device node")
            else:
                self.stats.skip("unknown entries", shown, f"tar entry type {member.type!r}")
        finally:
            os.close(parent)

    def _walk(self, parts: tuple[str, ...], *, create: bool, mtime: int = 0) -> int | None:
        """Open directory ``parts`` below the root, one component at a time, never following.

        Missing directories are made (mode 0o755 in the end) when ``create``, else the
        result is None.

        Raises:
            _Blocked: a component is a symlink or not a directory.
        """
        fd = os.dup(self._root)
        try:
            for i, component in enumerate(parts):
                try:
                    sub = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(component, 0o700, dir_fd=fd)
                    self._dirs[parts[: i + 1]] = (0o755, mtime)
                    sub = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    st = os.stat(component, dir_fd=fd, follow_symlinks=False)
                    raise _Blocked(parts[: i + 1], file_kind(st.st_mode)) from None
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_room(self, parent: int, name: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``name``, unless it is a directory and ``keep_dir``.

        Returns:
            whether a directory was kept.
        """
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(parent, name)
        return False

    def _make_dir(
        self, parent: int, name: str, parts: tuple[str, ...], mode: int, mtime: int
    ) -> None:
        if not self._make_room(parent, name, keep_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent)  # owner-only until the last layer is in
        self._dirs[parts] = (mode & 0o1777, mtime)  # no setuid/setgid
        self.stats.directories += 1

    def _make_file(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parent: int,
        name: str,
        *,
        stream: _Reader,
        where: str,
        mtime: int,
    ) -> None:
        if member.size > stream.remaining:
            raise ImageError(
                f"the image unpacks to more than {format_size(MAX_UNPACKED_SIZE)} "
                f"({where}: {member.name!r} alone is {format_size(member.size)})"
            )
        self._make_room(parent, name, keep_dir=False)
        src = tar.extractfile(member)
        assert src is not None  # regular members always have a stream
        fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=parent)
        try:
            while chunk := src.read(_CHUNK):
                _write_all(fd, chunk)
            os.fchmod(fd, member.mode & 0o777)  # no setuid, setgid or sticky bit
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += member.size

    def _make_symlink(self, parent: int, name: str, target: str, shown: str, mtime: int) -> None:
        if not target or "\0" in target:
            self.stats.skip("invalid symlinks", shown, f"invalid target {target!r}", warn=True)
            return
        self._make_room(parent, name, keep_dir=False)
        # Verbatim, absolute or not: inside the cell it resolves within the root, and
        # nothing here ever follows it.
        os.symlink(target, name, dir_fd=parent)
        os.utime(name, dir_fd=parent, follow_symlinks=False, ns=(mtime, mtime))
        self.stats.symlinks += 1

    def _make_hardlink(
        self, parent: int, name: str, parts: tuple[str, ...], linkname: str, shown: str
    ) -> None:
        def skip(reason: str) -> None:
            self.stats.skip("hard links", shown, f"hard link to {linkname!r}: {reason}", warn=True)

        try:
            target = _entry_parts(linkname)
        except _UnsafeName as e:
            skip(f"the target {e}")
            return
        if not target:
            skip("the target is the root")
            return
        if target[: len(parts)] == parts:
            skip("the target is the link itself or below it")
            return
        try:
            tdir = self._walk(target[:-1], create=False)
        except _Blocked as e:
            skip(f"the target is below {_show(e.parts)}, a {e.kind}")
            return
        if tdir is None:
            skip("the target does not exist")
            return
        try:
            try:
                st = os.stat(target[-1], dir_fd=tdir, follow_symlinks=False)
            except FileNotFoundError:
                skip("the target does not exist")
                return
            if not stat.S_ISREG(st.st_mode):
                skip(f"the target is a {file_kind(st.st_mode)}")
                return
            self._make_room(parent, name, keep_dir=False)
            # linkat without AT_SYMLINK_FOLLOW, from a descriptor inside the root.
            os.link(target[-1], name, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tdir)
        self.stats.hardlinks += 1

    # -- after the last layer

    def finish(self) -> None:
        """Give directories their image modes and mtimes, deepest first, then the root."""
        for parts, (mode, mtime) in sorted(self._dirs.items(), key=lambda kv: -len(kv[0])):
            try:
                fd = self._walk(parts, create=False)
            except _Blocked:
                continue  # replaced by a later layer
            if fd is None:
                continue  # removed by a later layer
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        os.fchmod(self._root, 0o755)


# --- the cache --------------------------------------------------------------------------


def _ensure_dir(path: Path) -> Path:
    """Make ``path`` (0o711: cells run as other users and must traverse it) if missing."""
    try:
        os.mkdir(path, 0o711)
    except FileExistsError:
        if not path.is_dir():
            raise StateError(f"{path} exists and is not a directory") from None
        return path
    except OSError as e:
        raise StateError(f"cannot create the image cache {path}: {e.strerror}") from e
    os.chmod(path, 0o711)  # noqa: S103 -- search only; mkdir's mode went through the umask
    return path


def _is_complete(final: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(final / "complete").st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path, digest: str) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"cannot create lock file {path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process unpacking image %s", digest)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _discard_leftovers(oci_dir: Path, hexdigest: str) -> None:
    """Remove what an interrupted unpack of this digest left; we hold its lock."""
    stale = [oci_dir / hexdigest]
    with contextlib.suppress(OSError):
        stale += [p for p in oci_dir.iterdir() if p.name.startswith(f".{hexdigest}.tmp-")]
    for path in stale:
        if os.path.lexists(path):
            logger.info("removing leftovers of an interrupted unpack: %s", path)
            try:
                _remove_tree(path)
            except OSError as e:
                raise StateError(f"cannot remove {path}: {e.strerror}") from e


def _unpack(image: _Image, plan: _Plan, oci_dir: Path, final: Path) -> None:
    hexdigest = plan.digest.removeprefix("sha256:")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{hexdigest}.tmp-", dir=oci_dir))
    except OSError as e:
        raise StateError(f"cannot create a directory in {oci_dir}: {e.strerror}") from e
    try:
        try:
            os.chmod(tmp, 0o711)  # noqa: S103 -- search only, for cells run as other users
            os.mkdir(tmp / "rootfs", 0o700)
            unpacker = _Unpacker(tmp / "rootfs")
        except OSError as e:
            raise StateError(f"cannot prepare {tmp}: {e.strerror}") from e
        with unpacker:
            for n, layer in enumerate(plan.layers, 1):
                logger.debug("applying layer %d/%d: %s", n, len(plan.layers), layer.label)
                unpacker.apply(image, layer, f"layer {n}/{len(plan.layers)} ({layer.label})")
            try:
                unpacker.finish()
            except OSError as e:
                raise ImageError(f"cannot set directory modes: {e.strerror}") from e
        stats = unpacker.stats
        marker = {
            "digest": plan.digest,
            "manifest": plan.manifest,
            "layers": [layer.label for layer in plan.layers],
            **{k: v for k, v in asdict(stats).items() if k != "layers"},
        }
        try:
            # Inside the temporary directory: the rename publishes tree and marker at once.
            fd = os.open(tmp / "complete", _CREATE_FLAGS, 0o644)
            try:
                _write_all(fd, json.dumps(marker, indent=2, sort_keys=True).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            raise StateError(f"cannot store the unpacked image in {final}: {e.strerror}") from e
    except BaseException:
        try:
            _remove_tree(tmp)
        except OSError as e:
            logger.warning("cannot remove %s: %s", tmp, e)
        raise
    logger.info("unpacked image %s: %s", plan.digest, stats.summary())
