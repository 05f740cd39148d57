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

**The source is confined.** An image named by a repository is the attacker's: its layout
directory may hold symlinks (``blobs -> /``, ``index.json -> /proc/self/environ``,
``blobs/sha256/X -> /etc/shadow``). Every file of a layout is opened with
:mod:`buildcell.confined`, beneath the layout's root: a symlink may lead elsewhere inside it,
never out; only regular files are read, and a fifo or device is refused before it is opened.
The caller passes either a path the operator gave (``--rootfs oci:PATH@...``; symlinks in
the path itself are followed) or a descriptor it opened confined itself (a spec's image),
and a label that messages use for the image.

**Layer application** parses layers with :mod:`tarfile` and does every filesystem write
itself, relative to directory file descriptors:

* names lose leading ``/`` (as Docker does); ``..`` components and NUL characters fail the
  unpack;
* every parent directory is opened component by component with ``O_NOFOLLOW``, so a symlink
  (from this layer or a lower one) is never followed: an entry below one fails the unpack;
* symlinks are created verbatim (absolute targets resolve inside the cell's root; a link such
  as ``etc -> /`` at the image's root is a plain symlink here, and only the code that mounts
  the root decides what it means);
* a hard link is made only to a regular file inside the root, reached the same way; any
  other link is skipped and logged;
* devices, fifos and unknown entry types are skipped and counted; a skipped entry changes
  nothing, so what a lower layer had at its path stays;
* ownership and extended attributes (file capabilities among them) are dropped: everything
  belongs to the unpacking user; files and directories keep at most ``0o755`` of their mode
  (no setuid, setgid or sticky bit, nothing writable by group or others: the tree is
  shared by every later build on the image, and the cell mounts it read-only anyway);
  mtimes are kept;
* sparse files (old GNU ``S`` members and PAX 0.0, 0.1 and 1.0 ones) are written sparse:
  their map is checked (ordered, not overlapping, inside the declared size, no more data
  than the member stores), the data pieces are written at their offsets and the file is
  truncated to its declared size;
* ``.wh.NAME`` and ``.wh..wh..opq`` whiteouts hide what lower layers put there.

Directories stay ``0o700`` while layers are applied and get their image modes and mtimes
only after the last layer, deepest first: a later layer may write into a directory an
earlier one made read-only, and writing would move its mtime.

**The budget.** What images may take on disk is bounded by an :class:`UnpackBudget`, one
per build and shared by every image the build unpacks (without one, each image gets
:data:`MAX_UNPACKED_SIZE`). Every entry is charged *before* it is written: one 4 KiB block
for what it creates (inode, directory entry, symlink target, a directory's block) plus, for a
file, its real size rounded up to whole blocks. The real size is the size a member declares,
which for a sparse member is the size of the file it expands to, however few bytes of the
layer it occupies: a small blob can never write more than its budget. Charges are never
given back (a whiteout or a later layer replacing a file does not refund it), so the
budget bounds everything ever written. The uncompressed layer streams are bounded by the
budget too (a gzip bomb of zeros is read only that far) and an image costs at least as
much as its streams, so the work of decompressing and hashing is bounded per build as well.
A cached image costs what its unpack cost, as its marker records; an image that a budget
has already paid for costs nothing more when the build asks for it again.

**Layer cache.** A layer is read from its tar once: its files are written to
``CACHE/oci/layers/KEY/files/N`` (KEY is the layer's diff_id, or its blob digest and
compression where the config has none) and its entries are recorded, in order, in
``layer.json``. An image is composed by replaying its layers' entries into its own tree
with the very same code and checks as reading the tar (whiteouts, entries below a lower
layer's symlink, hard links resolved in the tree being made, the same charges), each file
a hard link to the layer's copy, or a copy (holes kept) where the file system refuses the
link. Shared files are never written again: they belong to the unpacking user with at most
``0o755``. A layer's files are checked against the digest ``layer.json`` records before a
replay (once per process); a damaged layer is read from the image again and replaced.
Layers read for the first time are staged in the image's temporary directory and published
with it; a replay holds a shared lock on ``layers/KEY.lock``, which ``gc`` takes
exclusively before it removes a layer.

**Cache.** The result lives in ``CACHE/oci/HEX/rootfs`` next to a ``complete`` marker (format
version, cost, bytes, layer keys) and a ``used`` file touched at every use. It is built in
a temporary directory beside it and renamed into place under an exclusive lock
(``CACHE/oci/HEX.lock``), so it is unpacked once and never seen half-done: when the
budget, the disk or the image gives out partway, the temporary tree is
removed and nothing is published. Later calls only re-verify that the source still holds the
digest (index, manifest and config, not layers). A marker without the current version (an
unpack by an older buildcell, with other modes and no recorded cost) counts as no marker:
the image is unpacked again. No directory or file that buildcell makes in the cache is
writable by anyone but its user; directories are ``0o711`` when buildcell runs as root
(cells run as other uids and must reach the tree) and ``0o700`` otherwise.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from buildcell import _log, confined
from buildcell._fs import Closing, file_kind
from buildcell._json import reject_duplicate_keys
from buildcell.errors import ConfigError, ImageError, SandboxError, StateError
from buildcell.trees import remove_entry, remove_tree
from buildcell.units import format_size

__all__ = [
    "MAX_ENTRIES",
    "MAX_JSON_SIZE",
    "MAX_UNPACKED_SIZE",
    "PROGRESS_AFTER",
    "USED_FILE",
    "ImageSweep",
    "UnpackBudget",
    "parse_digest",
    "sweep_images",
    "unpack_image",
    "unpack_line",
]

logger = _log.get(__name__)

#: Largest JSON document (index, manifest, config, manifest.json) that is read.
MAX_JSON_SIZE = 4 << 20
#: The budget of one image when the caller gives no :class:`UnpackBudget`: what its
#: unpacked tree may take on disk, and what its uncompressed layer streams may hold.
MAX_UNPACKED_SIZE = 16 << 30
#: Most tar entries, over all layers, that an image may have.
MAX_ENTRIES = 1_000_000
#: An unpack that has taken this many seconds reports its progress (see unpack_image).
PROGRESS_AFTER = 1.0

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
# What one entry is charged for what it creates besides file data: an inode, a directory
# entry, a symlink's target, a directory's first block. File data is charged in these
# blocks too, so the charge bounds st_blocks as well as st_size.
_BLOCK = 4096
_MARKER_VERSION = 4  # of the "complete" marker; other versions are unpacked again
_MAX_MARKER_SIZE = 1 << 20
_MAX_LAYER_JOURNAL = 1 << 30  # layer.json: about 100 bytes per entry, MAX_ENTRIES of them
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_COALESCE_GAP = 64 << 10  # sparse pieces closer than this are written in one go

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if an archive was swapped for a fifo after the check, the open cannot block.
_ARCHIVE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_MODE_MASK = 0o755  # what an unpacked file or directory keeps of its image mode

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


class UnpackBudget:
    """The disk space that the images of one build may take, shared by all of them.

    Every entry an image creates is charged before it is written: one 4 KiB block, plus the
    real size of a file rounded up to whole blocks (the size it declares: for a sparse
    file, the size it expands to). An image also costs at least the bytes of its
    uncompressed layer streams. Charges are never given back. An image that is already in
    the cache costs what its unpack cost (its marker records it), so a build that brings in
    many cached images is bounded like one that unpacks them; an image this budget has
    paid for once costs nothing when it is asked for again.

    One budget may be used from several threads of one build at once.

    Args:
        limit: bytes, at least 0.

    Raises:
        ConfigError: ``limit`` is not a non-negative integer.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"invalid image unpack budget {limit!r}: expected bytes, >= 0")
        self._limit = limit
        self._used = 0
        self._images: dict[str, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UnpackBudget(limit={self._limit}, used={self._used})"

    @property
    def limit(self) -> int:
        """The budget, bytes."""
        return self._limit

    @property
    def used(self) -> int:
        """What has been charged so far, bytes."""
        with self._lock:
            return self._used

    @property
    def remaining(self) -> int:
        """What is left, bytes."""
        with self._lock:
            return self._limit - self._used

    @property
    def images(self) -> dict[str, int]:
        """What each image paid, by digest, for the images unpacked or reused so far."""
        with self._lock:
            return dict(self._images)

    def _take(self, amount: int) -> bool:
        """Charge ``amount`` if it fits; whether it did."""
        with self._lock:
            if amount > self._limit - self._used:
                return False
            self._used += amount
            return True

    def _take_cached(self, digest: str, amount: int) -> bool:
        """Charge a cached image, unless this budget has paid for it already."""
        with self._lock:
            if digest in self._images:
                return True
            if amount > self._limit - self._used:
                return False
            self._used += amount
            self._images[digest] = amount
            return True

    def _paid(self, digest: str, amount: int) -> None:
        """Note that ``digest`` was unpacked for ``amount`` (already charged)."""
        with self._lock:
            self._images.setdefault(digest, amount)


def unpack_image(
    source: Path | int,
    digest: str,
    *,
    cache_dir: Path,
    budget: UnpackBudget | None = None,
    label: str | None = None,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Verify the image ``digest`` in ``source`` and unpack it once into ``cache_dir``.

    ``source`` is an OCI image layout directory, an OCI archive, or a docker-archive
    tarball: a path the operator gave (symlinks in it are followed), or a descriptor (an
    ``O_PATH`` one will do) of a directory or regular file that the caller opened confined,
    for an image named by a repository. Either way, every file inside a layout directory
    is opened beneath it (:mod:`buildcell.confined`), and a descriptor stays the caller's
    to close. ``digest`` names the image manifest, or an image index whose manifest for
    this machine's platform is used; for a docker-archive without an OCI layout inside,
    which has no manifest, it is the sha256 of the image's config JSON (Docker's image
    ID). The returned directory is meant to be used read-only as a cell's root; it is owned
    by the unpacking user.

    A second call with the same digest returns the cached tree after re-verifying the
    index, manifest and config in ``source``, without reading layers. The cached tree
    itself is verified against the digest of its files recorded when it was unpacked, once
    per process: a damaged one is unpacked again, and ``warn`` (default: the log) is told
    so, naming it. Concurrent calls for one digest, in threads or processes, unpack it once.

    Args:
        budget: what this image may take, shared with the build's other images; without
            one, a budget of :data:`MAX_UNPACKED_SIZE` for this image alone. A cached
            image is charged what its unpack cost.
        label: how messages name the image (``images/debian``); by default the path.
        progress: called, once an unpack has taken :data:`PROGRESS_AFTER` seconds, after
            each layer with ``digest``, ``elapsed`` (seconds), ``layer``, ``layers``,
            ``layer_digest``, ``cached`` (replayed from the layer cache) and ``bytes`` (of
            files so far), and at the end with ``done: True``; never for a cached image.

    Returns:
        ``cache_dir/oci/<hex>/rootfs``.

    Raises:
        ConfigError: ``digest`` is not a sha256 digest.
        ImageError: ``source`` is not a readable image, a file of the layout is a symlink
            out of it or not a regular file, it does not contain ``digest``, a blob does
            not match its digest, a layer is malformed, hostile (a path that leaves the
            root, an entry below a symlink, a bad sparse map), compressed in an unsupported
            way, larger than ``budget`` or :data:`MAX_ENTRIES`.
        StateError: the cache directory cannot be created, locked or written, or the disk
            is full; nothing half-unpacked is left to be used.
    """
    digest = parse_digest(digest)
    if budget is None:
        budget = UnpackBudget(MAX_UNPACKED_SIZE)
    hexdigest = digest.removeprefix("sha256:")
    with _open_image(source, label) as image:
        plan = _plan_image(image, digest)
        mode = _dir_mode()
        oci_dir = _ensure_dir(_ensure_dir(cache_dir, mode) / "oci", mode)
        final = oci_dir / hexdigest
        cost = _intact_cost(final)
        if cost is None and _read_marker(final) is not None:
            (warn or _log_warning)(
                f"the unpacked image {final} was damaged (its files do not match the digest "
                "recorded when it was unpacked); unpacking it again"
            )
        if cost is None:
            with _exclusive_lock(oci_dir / f"{hexdigest}.lock", digest):
                cost = _intact_cost(final)  # another process may have finished it meanwhile
                if cost is None:
                    _discard_leftovers(oci_dir, hexdigest)
                    account = _Account(budget, f"{image.label}@{digest}")
                    report = _Progress(progress, digest)
                    _unpack(image, plan, oci_dir, final, account, report)
                    budget._paid(digest, account.charged)
                    _mark_used(final)
                    report.finished(_read_bytes_unpacked(final))
                    return final / "rootfs"
        if not budget._take_cached(digest, cost):
            raise ImageError(
                f"image {image.label}@{digest} does not fit in the unpack budget of "
                f"{format_size(budget.limit)}: the cached image takes {format_size(cost)}, "
                f"{format_size(budget.remaining)} is left"
            )
        _mark_used(final)
    return final / "rootfs"


#: In an unpacked image's directory: touched at every use, for ``buildcell gc``.
USED_FILE = "used"


def _mark_used(final: Path) -> None:
    """Note that the image in ``final`` was just used (its ``used`` file's mtime)."""
    try:
        fd = os.open(
            final / USED_FILE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.utime(fd)
        finally:
            os.close(fd)
    except OSError as e:
        logger.warning("cannot note the use of %s: %s", final, e.strerror)


def _read_bytes_unpacked(final: Path) -> int:
    try:
        doc = json.loads((final / "complete").read_bytes())
        return int(doc.get("bytes", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class _Account:
    """What one image has been charged, against its build's budget, with how to say so."""

    def __init__(self, budget: UnpackBudget, name: str) -> None:
        self.budget = budget
        self.name = name  # LABEL@DIGEST
        self.charged = 0
        # The uncompressed layer streams may hold at most what was left when this image
        # started: it pays at least that much in the end (see settle).
        self.stream_allowance = budget.remaining

    def refusal(self, where: str, what: str, amount: int) -> ImageError:
        return ImageError(
            f"image {self.name} does not fit in the unpack budget of "
            f"{format_size(self.budget.limit)}: {where}: {what} needs {format_size(amount)}, "
            f"{format_size(self.budget.remaining)} is left"
        )

    def stream_refusal(self, where: str) -> str:
        return (
            f"image {self.name} does not fit in the unpack budget of "
            f"{format_size(self.budget.limit)}: {where}: the uncompressed layer streams "
            f"hold more than the {format_size(self.stream_allowance)} that was left for it"
        )

    def take(self, amount: int) -> bool:
        """Charge ``amount`` if it fits; whether it did."""
        if not self.budget._take(amount):
            return False
        self.charged += amount
        return True

    def charge(self, amount: int, where: str, what: str) -> None:
        """Charge ``amount`` for ``what`` before it is written.

        Raises:
            ImageError: it does not fit.
        """
        if not self.take(amount):
            raise self.refusal(where, what, amount)

    def settle(self, stream_bytes: int) -> None:
        """Make the image cost at least its uncompressed layer streams."""
        if stream_bytes > self.charged:
            self.charge(
                stream_bytes - self.charged,
                "all layers",
                f"{format_size(stream_bytes)} of uncompressed layer streams",
            )


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

    def __init__(self, label: str) -> None:
        self.label = label

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
            ImageError: it exists but is not a regular file, lies behind a symlink out of
                the image, or cannot be read.
        """

    def close(self) -> None:
        """Release what the image holds open."""


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _missing(root_fd: int, name: str) -> bool:
    """Whether ``name`` is plainly absent below ``root_fd``: a component does not exist, and
    every one before it is a real directory (not a symlink)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return False
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return True
            if i == len(parts) - 1 or not stat.S_ISDIR(st.st_mode):
                return False
            sub = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = sub
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class _LayoutDir(_Image):
    """An OCI image layout directory, every file of it opened beneath its root."""

    def __init__(self, root_fd: int, label: str, *, single_link: bool) -> None:
        super().__init__(label)
        self._root = root_fd  # ours: closed by close()
        # A repository's file is only ever its own: a hard link may be another file of the
        # host (one the repository's owner could link to, on a shared machine).
        self._single_link = single_link

    def open(self, name: str) -> _Blob | None:
        # Names are ours (fixed, or built from a checked digest) or, for a docker-archive
        # laid out as a directory, from manifest.json; what they resolve to is confined.
        try:
            fd, st = confined.open_file(
                self._root,
                name,
                what=f"{name} in image {self.label}",
                resolve="beneath",
                single_link=self._single_link,
            )
        except confined.UnsafePathError as e:
            if _missing(self._root, name):
                return None
            raise ImageError(e.message) from e
        except OSError as e:
            raise ImageError(f"cannot read {name} in image {self.label}: {e.strerror}") from e
        return _Blob(os.fdopen(fd, "rb"), st.st_size)

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1


def _archive_key(name: str) -> str | None:
    key = posixpath.normpath("/" + name).lstrip("/")
    return key if key and key != "." else None


_HEADER_ERRORS = (ValueError, OverflowError, IndexError)


def _open_tar(*args: Any, **kwargs: Any) -> tarfile.TarFile:
    """``tarfile.open``, which reads the first header (see :func:`_next_entry`)."""
    try:
        return tarfile.open(*args, **kwargs)
    except _HEADER_ERRORS as e:
        raise tarfile.ReadError(f"malformed entry header ({e})") from e


def _next_entry(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """``tar.next()``; a header tarfile cannot parse is a :class:`tarfile.ReadError`.

    Besides ``TarError``, tarfile's header parsing raises ``ValueError``,
    ``OverflowError`` and ``IndexError`` on some hostile input (a GNU sparse 1.0 map
    without its newline; an old GNU sparse header that announces an extension block and
    ends): that is a malformed image, not a bug of ours.
    """
    try:
        return tar.next()
    except _HEADER_ERRORS as e:
        raise tarfile.ReadError(f"malformed entry header ({e})") from e


class _Archive(_Image):
    """A tar (optionally compressed) holding an OCI layout or a docker-archive."""

    def __init__(self, fd: int, label: str) -> None:
        super().__init__(label)
        self._file = os.fdopen(fd, "rb")  # ours: closed by close()
        try:
            # Held open until close(): blobs are read from it on demand.
            self._tar = _open_tar(fileobj=self._file, mode="r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self._file.close()
            raise ImageError(f"cannot read image archive {label}: {e}") from e
        except BaseException:
            self._file.close()
            raise
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            count = 0
            while (member := _next_entry(self._tar)) is not None:
                count += 1
                if count > _MAX_ARCHIVE_MEMBERS:
                    raise ImageError(
                        f"image archive {label} has more than {_MAX_ARCHIVE_MEMBERS} entries"
                    )
                key = _archive_key(member.name)
                if key is not None:
                    self._members[key] = member  # a later member replaces an earlier one
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self.close()
            raise ImageError(f"cannot read image archive {label}: {e}") from e
        except BaseException:
            self.close()
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
            raise ImageError(f"{name} in image {self.label} is not a regular file")
        try:
            stream = self._tar.extractfile(member)
        except (tarfile.TarError, OSError) as e:
            raise ImageError(f"cannot read {name} from image {self.label}: {e}") from e
        assert stream is not None  # regular members always have a stream
        return _Blob(stream, member.size)

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def _fd_label(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"(descriptor {fd})"


def _open_image(source: Path | int, label: str | None) -> _Image:
    """Open an image from the operator's path or the caller's (confined) descriptor."""
    if isinstance(source, int):
        return _open_image_fd(source, label or _fd_label(source), repository=True)
    shown = label or str(source)
    try:
        # O_PATH: a fifo or device is looked at, never opened.
        fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ImageError(f"image {shown} does not exist") from e
    except OSError as e:
        raise ImageError(f"cannot read image {shown}: {e.strerror}") from e
    try:
        return _open_image_fd(fd, shown, repository=False)
    finally:
        os.close(fd)


def _open_image_fd(fd: int, label: str, *, repository: bool) -> _Image:
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return _LayoutDir(
                confined.reopen(fd, os.O_RDONLY | os.O_DIRECTORY), label, single_link=repository
            )
        if stat.S_ISREG(st.st_mode):
            if repository and st.st_nlink > 1:
                raise ImageError(
                    f"image {label} is a hard link ({st.st_nlink} names for one file); "
                    "buildcell reads repository files only when they are the only name of "
                    "their file"
                )
            return _Archive(confined.reopen(fd, _ARCHIVE_FLAGS), label)
    except OSError as e:
        raise ImageError(f"cannot read image {label}: {e.strerror}") from e
    raise ImageError(f"image {label} is a {file_kind(st.st_mode)}, not a directory or archive")


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
        raise ImageError(f"image {image.label} has no {name}")
    return _parse_json(_read_small(blob, name), name)


def _read_verified(image: _Image, digest: str, what: str, size: int | None = None) -> bytes:
    """Read a JSON blob by digest and check its bytes hash to that digest."""
    label = f"{what} blob {digest}"
    blob = image.open(_blob_name(digest))
    if blob is None:
        raise ImageError(f"{label} is missing from image {image.label}")
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
            f"image {image.label} is not an OCI image layout or docker-archive "
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
        raise ImageError(f"oci-layout in image {image.label} has no imageLayoutVersion")
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


def _blocks(size: int) -> int:
    """``size`` rounded up to whole blocks."""
    return -(-size // _BLOCK) * _BLOCK


def _sparse_pieces(
    tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...], where: str
) -> list[tuple[int, int]]:
    """The (offset, size) pieces of a sparse member that hold data, checked.

    tarfile takes the map as the member says (old GNU headers and their extension blocks,
    PAX 0.0 records, the 0.1 map record, the 1.0 map in the data): pieces may overlap, go
    backwards, be negative or lie past the declared size, and claim more data than the
    member stores. Each of those is refused here; pieces without data are dropped (old
    GNU headers pad their four slots with them, GNU tar ends maps with one).

    Raises:
        ImageError: the map is not one an honest tar writes.
    """
    # typeshed says bytes; tarfile stores a list of (offset, size) pairs.
    sparse = cast("list[tuple[int, int]]", member.sparse)
    shown = f"sparse file {_show(parts)}"
    hint = "the image is malformed or hostile; nothing was unpacked"
    pieces: list[tuple[int, int]] = []
    end = 0
    for offset, size in sparse:
        if offset < 0 or size < 0:
            raise ImageError(
                f"{where}: {shown} has a negative offset or size in its map", hint=hint
            )
        if size == 0:
            continue
        if offset < end:
            raise ImageError(
                f"{where}: {shown} has overlapping or unordered pieces in its map", hint=hint
            )
        end = offset + size
        if end > member.size:
            raise ImageError(
                f"{where}: {shown} maps data up to byte {end}, past its size of {member.size}",
                hint=hint,
            )
        pieces.append((offset, size))
    # The stored data ends where tarfile will look for the next header.
    stored = tar.offset - member.offset_data
    total = sum(size for _, size in pieces)
    if total > stored:
        raise ImageError(
            f"{where}: {shown} maps {total} bytes of data but stores only {max(stored, 0)}",
            hint=hint,
        )
    return pieces


def _read_exactly(src: IO[bytes], size: int) -> bytes:
    data = src.read(size)
    while len(data) < size:
        more = src.read(size - len(data))
        if not more:
            raise tarfile.ReadError("unexpected end of data")
        data += more
    return data


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_pieces(src: IO[bytes], fd: int, pieces: list[tuple[int, int]]) -> None:
    """Write the stored data of ``pieces`` (read from ``src`` in order) at their offsets.

    Pieces a small hole apart go into one write, the hole written as zeros (inside the
    declared size, so inside what was charged): a map of a hundred thousand one-byte
    pieces costs a few system calls, not two hundred thousand.
    """
    run = bytearray()
    start = 0
    for offset, size in pieces:
        gap = offset - (start + len(run))
        if run and (gap > _COALESCE_GAP or len(run) + gap + size > _CHUNK):
            _pwrite_all(fd, run, start)
            run = bytearray()
        if size > _CHUNK:  # (the run was just written: it could not take this piece)
            for at in range(offset, offset + size, _CHUNK):
                _pwrite_all(fd, _read_exactly(src, min(_CHUNK, offset + size - at)), at)
            continue
        if run:
            run += bytes(gap)
        else:
            start = offset
        run += _read_exactly(src, size)
    if run:
        _pwrite_all(fd, run, start)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class _Stats:
    layers: int = 0
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    sparse: int = 0  # of the files, how many were sparse members
    bytes: int = 0  # real sizes of the files written (a sparse file's declared size)
    stream_bytes: int = 0  # of the uncompressed layer streams
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, what: str, path: str, reason: str, *, warn: bool = False) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1
        logger.log(_log.WARNING if warn else _log.DEBUG, "skipped %s: %s", path, reason)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {what}" for what, n in sorted(self.skipped.items()))
        return f"{self.layers} layers, {self.entries} entries, {format_size(self.bytes)}" + (
            f"; skipped {skipped}" if skipped else ""
        )


class _Unpacker(Closing):
    """Applies layers, in order, to a staging directory it holds open."""

    def __init__(self, rootfs: Path, account: _Account) -> None:
        self._root = os.open(rootfs, _DIR_FLAGS)
        # Where the layer being read from its tar is recorded (None while replaying one).
        self._journal: _LayerWriter | None = None
        self._last_stream = 0  # bytes of the uncompressed stream of the last layer read
        # Final (mode, mtime) of every directory made, applied after the last layer.
        self._dirs: dict[tuple[str, ...], tuple[int, int]] = {}
        self._account = account
        self._stream_left = account.stream_allowance
        self._where = ""  # the layer being applied, for messages
        self._max_entries = MAX_ENTRIES
        self.stats = _Stats()
        #: called after each file written (an unpack's progress within a layer)
        self.on_file: Callable[[], None] | None = None
        # The parent directory of the last entry, open: tars list a directory's entries
        # together, and walking from the root for each costs most of the time. Every
        # removal drops it, since only a removal can unlink or replace a directory on it.
        self._last_parent: tuple[tuple[str, ...], int] | None = None

    @property
    def account(self) -> _Account:
        return self._account

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
        try:
            remove_entry(dir_fd, name, shown=Path(name))
        except SandboxError as e:
            raise ImageError(f"cannot unpack: {e.message}") from e

    # -- one layer

    def apply(self, image: _Image, layer: _LayerRef, where: str, journal: _LayerWriter) -> None:
        """Apply one layer, verifying its digest (and diff_id) in the same pass, and record
        it in ``journal`` (its files' data is written there and linked into the tree)."""
        self._journal = journal
        before = self.stats.entries
        try:
            self._apply(image, layer, where)
        finally:
            self._journal = None
        journal.stream_bytes = self._last_stream
        journal.entries = self.stats.entries - before

    def _apply(self, image: _Image, layer: _LayerRef, where: str) -> None:
        compression = layer.compression
        if compression == "detect":
            compression = self._detect(image, layer, where)
        blob = image.open(layer.location)
        if blob is None:
            raise ImageError(f"{where}: blob {layer.location} is missing from image {image.label}")
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
                limit=self._stream_left,
                too_big=self._account.stream_refusal(where),
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
        self._last_stream = stream.count
        self._stream_left -= stream.count
        self.stats.stream_bytes += stream.count
        self.stats.layers += 1

    def replay(self, layer: _CachedLayer, where: str) -> None:
        """Apply a layer unpacked before from its journal: the same entries in the same
        order, charged the same, each file a hard link to the layer's copy."""
        self._where = where
        if layer.stream_bytes > self._stream_left:
            raise ImageError(self._account.stream_refusal(where))
        self.stats.entries += layer.entries
        if self.stats.entries > self._max_entries:
            raise ImageError(f"the image has more than {self._max_entries} entries")
        touched: set[tuple[str, ...]] = set()
        for op in layer.ops:
            parts = tuple(op[1].split("/"))
            self._guarded(
                parts, where, functools.partial(self._replay_op, layer, op, parts, touched)
            )
        self._stream_left -= layer.stream_bytes
        self.stats.stream_bytes += layer.stream_bytes
        self.stats.layers += 1

    def _replay_op(
        self,
        layer: _CachedLayer,
        op: list[Any],
        parts: tuple[str, ...],
        touched: set[tuple[str, ...]],
    ) -> None:
        kind, mtime = op[0], op[2]
        if kind == "w":
            self._whiteout(parts, touched, self._where)
            return
        _touch(touched, parts)
        parent = self._open_parent(parts[:-1], mtime)
        name, shown = parts[-1], _show(parts)
        try:
            if kind == "d":
                self._make_dir(parent, name, parts, op[3], mtime)
            elif kind == "f":
                _, _, _, index, size, sparse = op
                self._charge(_BLOCK + _blocks(size), "sparse file" if sparse else "file", parts)
                self._make_room(parent, name, keep_dir=False)
                _place(layer.files_fd, str(index), parent, name)
                self.stats.files += 1
                self.stats.bytes += size
                self.stats.sparse += 1 if sparse else 0
                if self.on_file is not None:
                    self.on_file()
            elif kind == "l":
                self._make_symlink(parent, name, parts, op[3], mtime)
            elif kind == "h":
                self._make_hardlink(parent, name, parts, op[3], shown)
            else:
                self.stats.skip(op[3], shown, op[4])
        finally:
            os.close(parent)

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
            raise ImageError(f"{where}: layer {layer.location} is missing from image {image.label}")
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
        self._where = where
        while (member := _next_entry(tar)) is not None:
            # Stream mode needs no index of members; tarfile keeps one anyway (and typeshed
            # does not declare it). Dropping it keeps memory flat over a million entries.
            cast(Any, tar).members.clear()
            stream.allow(member.size)
            self.stats.entries += 1
            if self.stats.entries > self._max_entries:
                raise ImageError(f"the image has more than {self._max_entries} entries")
            if member.sparse is not None and "GNU.sparse.name" in member.pax_headers:
                # GNU tar names a PAX sparse file there, and writes a placeholder path
                # (DIR/GNUSparseFile.PID/NAME) that tarfile would otherwise let win.
                member.name = member.pax_headers["GNU.sparse.name"]
            try:
                parts = _entry_parts(member.name)
            except _UnsafeName as e:
                raise ImageError(
                    f"{where}: entry {member.name!r} {e}",
                    hint="the image is malformed or hostile; nothing was unpacked",
                ) from None
            if member.size < 0:
                # A pax size record or a base-256 field can say so; charging it would
                # give budget back.
                raise ImageError(
                    f"{where}: entry {member.name[:200]!r} declares a negative size "
                    f"({member.size})",
                    hint="the image is malformed or hostile; nothing was unpacked",
                )
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
            self._guarded(
                parts, where, functools.partial(self._member, tar, member, parts, touched)
            )

    def _member(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: tuple[str, ...],
        touched: set[tuple[str, ...]],
    ) -> None:
        where = self._where
        if parts[-1].startswith(_WHITEOUT):
            self._record("w", parts, 0)
            self._whiteout(parts, touched, where)
        else:
            _touch(touched, parts)
            self._entry(tar, member, parts, where)

    def _record(self, kind: str, parts: tuple[str, ...], mtime: int, *extra: Any) -> None:
        if self._journal is not None:
            self._journal.ops.append([kind, "/".join(parts), mtime, *extra])

    def _guarded(self, parts: tuple[str, ...], where: str, action: Callable[[], None]) -> None:
        """Do what one entry says; say which entry failed, and how, if it does."""
        try:
            action()
        except _Blocked as e:
            raise ImageError(
                f"{where}: entry {_show(parts)} is below {_show(e.parts)}, which is a "
                f"{e.kind}; refusing to follow it",
                hint="the image is malformed or hostile; nothing was unpacked",
            ) from None
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise StateError(
                    f"the image cache is full: cannot unpack image {self._account.name}: "
                    f"{where}: {_show(parts)}: {e.strerror}"
                ) from e
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
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...], where: str
    ) -> None:
        mtime = _mtime_ns(member.mtime)
        parent = self._open_parent(parts[:-1], mtime)
        name, shown = parts[-1], _show(parts)
        try:
            if member.isdir():
                self._record("d", parts, mtime, member.mode)
                self._make_dir(parent, name, parts, member.mode, mtime)
            elif member.isreg():
                self._make_file(tar, member, parent, name, parts, where=where, mtime=mtime)
            elif member.issym():
                self._record("l", parts, mtime, member.linkname)
                self._make_symlink(parent, name, parts, member.linkname, mtime)
            elif member.islnk():
                self._record("h", parts, mtime, member.linkname)
                self._make_hardlink(parent, name, parts, member.linkname, shown)
            else:
                if member.isfifo():  # before isdev(), which is true for fifos too
                    what, reason = "fifos", "fifo"
                elif member.isdev():
                    what, reason = "devices", "device node"
                else:
                    what, reason = "unknown entries", f"tar entry type {member.type!r}"
                self._record("x", parts, mtime, what, reason)
                self.stats.skip(what, shown, reason)
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
                    self._charge(_BLOCK, "directory", parts[: i + 1])
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
            self._charge(_BLOCK, "directory", parts)
            os.mkdir(name, 0o700, dir_fd=parent)  # owner-only until the last layer is in
        self._dirs[parts] = (mode & _MODE_MASK, mtime)
        self.stats.directories += 1

    def _charge(self, amount: int, what: str, parts: tuple[str, ...]) -> None:
        # Once per entry: the message is made only for a refusal.
        if not self._account.take(amount):
            raise self._account.refusal(self._where, f"{what} {_show(parts)}", amount)

    def _make_file(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parent: int,
        name: str,
        parts: tuple[str, ...],
        *,
        where: str,
        mtime: int,
    ) -> None:
        # The real size (tarfile's size is the expanded one for sparse members) is charged
        # before anything is written, however little of the stream the member occupies.
        pieces = None if member.sparse is None else _sparse_pieces(tar, member, parts, where)
        kind = "file" if pieces is None else "sparse file"
        self._charge(_BLOCK + _blocks(member.size), kind, parts)
        self._make_room(parent, name, keep_dir=False)
        if pieces is None:
            src = tar.extractfile(member)
        else:
            # The stored pieces, back to back, as one plain member of that length.
            stored = tarfile.TarInfo(member.name)
            stored.offset_data = member.offset_data
            stored.size = sum(size for _, size in pieces)
            src = tar.extractfile(stored)
        assert src is not None  # regular members always have a stream
        journal = self._journal
        assert journal is not None  # files are only read from a tar while recording
        index = journal.next_file()
        fd = os.open(str(index), _CREATE_FLAGS, 0o600, dir_fd=journal.files_fd)
        try:
            if pieces is None:
                while chunk := src.read(_CHUNK):
                    _write_all(fd, chunk)
            else:
                # Written sparse: each piece at its offset, the holes never written.
                _write_pieces(src, fd, pieces)
                os.ftruncate(fd, member.size)
                self.stats.sparse += 1
            os.fchmod(fd, member.mode & _MODE_MASK)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        _place(journal.files_fd, str(index), parent, name)
        self._record("f", parts, mtime, index, member.size, pieces is not None)
        self.stats.files += 1
        self.stats.bytes += member.size
        if self.on_file is not None:
            self.on_file()

    def _make_symlink(
        self, parent: int, name: str, parts: tuple[str, ...], target: str, mtime: int
    ) -> None:
        shown = _show(parts)
        if not target or "\0" in target:
            self.stats.skip("invalid symlinks", shown, f"invalid target {target!r}", warn=True)
            return
        self._charge(_BLOCK, "symlink", parts)
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
            self._charge(_BLOCK, "hard link", parts)
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


def _place(src_dir: int, src: str, parent: int, name: str) -> None:
    """Give the layer's copy of a file the name ``name`` in the tree: a hard link, or a
    copy (holes kept) where the file system refuses one (too many links, another device).
    """
    try:
        os.link(src, name, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
        return
    except OSError as e:
        if e.errno not in (errno.EMLINK, errno.EXDEV, errno.EPERM):
            raise
        logger.debug("cannot hard-link %s (%s); copying it", name, e.strerror)
    _copy_file(src_dir, src, parent, name)


def _copy_file(src_dir: int, src: str, parent: int, name: str) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=parent)
        try:
            offset = 0
            while offset < st.st_size:
                try:
                    start = os.lseek(fd_in, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                end = os.lseek(fd_in, start, os.SEEK_HOLE)
                while start < end:
                    data = os.pread(fd_in, min(_CHUNK, end - start), start)
                    if not data:
                        break
                    _pwrite_all(fd_out, data, start)
                    start += len(data)
                offset = end
            os.ftruncate(fd_out, st.st_size)
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
            os.utime(fd_out, ns=(st.st_mtime_ns, st.st_mtime_ns))
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


class _LayerWriter(Closing):
    """A layer being read from its tar for the first time, recorded as it is applied: the
    data of its files (``files/N``, linked into the image's tree) and its entries in
    order (``layer.json``), so that another image with this layer only replays it."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.ops: list[list[Any]] = []
        self.stream_bytes = 0
        self.entries = 0
        self._files = 0
        os.mkdir(path, 0o700)
        os.mkdir(path / "files", 0o700)
        self.files_fd = os.open(path / "files", _DIR_FLAGS)

    def next_file(self) -> int:
        self._files += 1
        return self._files

    def close(self) -> None:
        if self.files_fd >= 0:
            os.close(self.files_fd)
            self.files_fd = -1

    def finish(self) -> _CachedLayer:
        """Write ``layer.json`` (with the digest of the files) and return the layer as a
        cached one, for a second use within the same image."""
        files = _files_digest(self.files_fd)
        if files is None:
            raise StateError(f"cannot read back the unpacked layer in {self.path}")
        doc = {
            "version": _MARKER_VERSION,
            "key": self.key,
            "entries": self.entries,
            "stream_bytes": self.stream_bytes,
            "files": files,
            "ops": self.ops,
        }
        fd = os.open(self.path / "layer.json", _CREATE_FLAGS, 0o644)
        try:
            _write_all(fd, json.dumps(doc, separators=(",", ":")).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return _CachedLayer(self.key, self.ops, self.entries, self.stream_bytes, self.files_fd)


@dataclass
class _CachedLayer:
    """A layer unpacked before: its entries in order, and its files' directory (open)."""

    key: str
    ops: list[list[Any]]
    entries: int
    stream_bytes: int
    files_fd: int


_OP_ARITY = {"d": 4, "f": 6, "l": 4, "h": 4, "w": 3, "x": 5}


def _layer_key(layer: _LayerRef) -> str:
    """The name of a layer in the layer cache: its diff_id where the config gives one (the
    same tree however it is compressed), else its blob digest and compression."""
    if layer.diff_id is not None:
        return layer.diff_id.removeprefix("sha256:")
    assert layer.digest is not None  # a docker-archive always has diff_ids
    return f"{layer.digest.removeprefix('sha256:')}.{layer.compression}"


def _read_layer(path: Path, key: str) -> tuple[int, int, list[list[Any]], str] | None:
    """(entries, stream bytes, ops, files digest) from ``layer.json``; None if it is
    missing, from another version, or malformed."""
    try:
        fd = os.open(
            path / "layer.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            doc = json.loads(f.read(_MAX_LAYER_JOURNAL + 1))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != _MARKER_VERSION or doc.get("key") != key:
        return None
    entries, streamed, ops, files = (
        doc.get(k) for k in ("entries", "stream_bytes", "ops", "files")
    )
    if not (_count(entries) and _count(streamed) and isinstance(ops, list)):
        return None
    if not isinstance(files, str) or not _DIGEST.fullmatch(files):
        return None
    for op in ops:
        if not (
            isinstance(op, list)
            and op
            and _OP_ARITY.get(op[0]) == len(op)
            and isinstance(op[1], str)
            and op[1]
            and all(part not in ("", ".", "..") for part in op[1].split("/"))
            and _count(op[2], signed=True)
        ):
            return None
    return cast(int, entries), cast(int, streamed), ops, files


def _count(value: Any, *, signed: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (signed or value >= 0)


def _open_cached_layer(
    layers_dir: Path, key: str, locks: contextlib.ExitStack
) -> _CachedLayer | None:
    """The layer ``key`` from the cache, held by a shared lock until ``locks`` closes, if it
    is there and its files still have the digest recorded (checked once per process)."""
    path = layers_dir / key
    if not os.path.isdir(layers_dir) or not os.path.lexists(path):
        return None
    with contextlib.ExitStack() as mine:
        mine.enter_context(_lock(layers_dir / f"{key}.lock", shared=True))
        found = _read_layer(path, key)
        if found is None:
            return None
        entries, streamed, ops, files = found
        try:
            files_fd = os.open(path / "files", _DIR_FLAGS)
        except OSError:
            return None
        mine.callback(os.close, files_fd)
        if not _layer_intact(path, files_fd, files):
            logger.warning("the cached layer %s was damaged; reading it from the image again", path)
            return None
        locks.enter_context(mine.pop_all())  # kept locked and open until the image is done
        return _CachedLayer(key, ops, entries, streamed, files_fd)


def _hash_extents(fd: int, size: int, digest: Any) -> None:
    """Feed ``digest`` the data extents of the file ``fd``, each with its offset. Holes are
    skipped, not read: a sparse file of gigabytes costs what it stores, and data written
    into a hole changes the digest as any other change does."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        digest.update(f"@{start}\0".encode())
        while start < end:
            data = os.pread(fd, min(_CHUNK, end - start), start)
            if not data:
                break
            digest.update(data)
            start += len(data)
        offset = end


def _files_digest(dir_fd: int) -> str | None:
    """The sha256 of a layer's ``files`` directory: each file's name, mode, size and the
    data of its data extents with their offsets. Holes are skipped, not read: a sparse
    file of gigabytes costs what it stores. None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        for name in sorted(os.listdir(dir_fd)):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return None
                digest.update(os.fsencode(f"{name}\0{stat.S_IMODE(st.st_mode):o}\0{st.st_size}\0"))
                _hash_extents(fd, st.st_size, digest)
                digest.update(b"\n")
            finally:
                os.close(fd)
    except OSError:
        return None
    return "sha256:" + digest.hexdigest()


def _layer_intact(path: Path, files_fd: int, files: str) -> bool:
    """Whether the files of the cached layer in ``path`` have the digest ``files``
    (checked once per process and version of its ``layer.json``)."""
    try:
        st = os.fstat(files_fd)
        mark = os.stat(path / "layer.json", follow_symlinks=False)
    except OSError:
        return False
    seen = (st.st_dev, st.st_ino, mark.st_mtime_ns)
    return _verified_once(seen, lambda: _files_digest(files_fd) == files)


def _verified_once(key: tuple[int, int, int], check: Callable[[], bool]) -> bool:
    """``check()``, remembered for this process under ``key`` (the device and inode of a
    tree, and the mtime of the marker that recorded its digest)."""
    with _verified_lock:
        intact = _verified.get(key)
        if intact is None:
            intact = check()
            _verified[key] = intact
    return intact


def _replace_damaged(layers_dir: Path, staging: Path, key: str) -> None:
    """Put our copy of layer ``key`` in place of a published one that does not verify."""
    path = layers_dir / key
    with _lock(layers_dir / f"{key}.lock", what=f"layer {key}"):
        found = _read_layer(path, key)
        try:
            files_fd = os.open(path / "files", _DIR_FLAGS)
        except OSError:
            files_fd = -1
        try:
            if found is not None and files_fd >= 0 and _layer_intact(path, files_fd, found[3]):
                return  # another unpack replaced it already
        finally:
            if files_fd >= 0:
                os.close(files_fd)
        logger.warning("replacing the damaged cached layer %s", path)
        os.rename(path, staging / f"{key}.damaged")
        os.rename(staging / key, path)


# --- the cache --------------------------------------------------------------------------


def _apply_layers(  # noqa: PLR0917 (internal: one caller)
    image: _Image,
    plan: _Plan,
    layers_dir: Path,
    tmp: Path,
    unpacker: _Unpacker,
    held: contextlib.ExitStack,
    progress: _Progress,
) -> list[str]:
    """Apply the plan's layers: replayed from the layer cache where it has them, read from
    the image (and recorded in ``tmp/layers``) where not. Returns the keys recorded."""
    staged: dict[str, _CachedLayer] = {}
    account = unpacker.account
    account.charge(_BLOCK, "before layer 1", "the root directory")  # the root is an entry
    total = len(plan.layers)
    for n, layer in enumerate(plan.layers, 1):
        where = f"layer {n}/{total} ({layer.label})"
        key = _layer_key(layer)
        cached = staged.get(key) or _open_cached_layer(layers_dir, key, held)
        unpacker.on_file = functools.partial(
            progress.within, n, total, layer.label, cached is not None, unpacker.stats
        )
        if cached is not None:
            logger.debug("applying layer %d/%d from the layer cache: %s", n, total, key)
            unpacker.replay(cached, where)
        else:
            logger.debug("applying layer %d/%d: %s", n, total, layer.label)
            try:
                writer = held.enter_context(_LayerWriter(tmp / "layers" / key, key))
            except OSError as e:
                raise StateError(f"cannot prepare {tmp}: {e.strerror}") from e
            unpacker.apply(image, layer, where, writer)
            try:
                staged[key] = writer.finish()
            except OSError as e:
                full = " (the disk is full)" if e.errno in _NO_SPACE else ""
                raise StateError(f"cannot record layer {key}{full}: {e.strerror}") from e
        progress.layer(n, total, layer.label, cached=cached is not None, done=unpacker.stats.bytes)
    return list(staged)


def _publish_layers(oci_dir: Path, staging: Path, keys: list[str]) -> None:
    """Move the layers read for the first time into the layer cache. One that another
    unpack published meanwhile is kept, and ours dropped (the tree keeps its files),
    unless it does not verify: then ours replaces it."""
    if keys:
        _ensure_dir(oci_dir / "layers", _dir_mode())
    for key in keys:
        try:
            os.rename(staging / key, oci_dir / "layers" / key)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _replace_damaged(oci_dir / "layers", staging, key)
    try:
        remove_tree(staging)
    except SandboxError as e:
        raise OSError(errno.EIO, e.message) from e


def unpack_line(report: dict[str, Any]) -> str:
    """One line of an ``image.unpack`` report (what ``progress`` of :func:`unpack_image`
    is given), as the command line prints it."""
    digest = str(report.get("digest", ""))
    short = digest.split(":", 1)[-1][:12]
    size = format_size(int(report.get("bytes", 0) or 0))
    if report.get("done"):
        return f"unpacked image {short}: {size} in {float(report.get('elapsed', 0)):.1f}s"
    cached = " (cached)" if report.get("cached") else ""
    doing = ", unpacking" if report.get("partial") else ""
    return (
        f"unpacking image {short}: layer {report.get('layer')}/{report.get('layers')}"
        f"{cached}{doing}, {size} so far"
    )


class _Progress:
    """Tells the caller how an unpack goes, once it has taken longer than
    :data:`PROGRESS_AFTER` seconds: one report per layer, and one at the end."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None, digest: str) -> None:
        self._report = report
        self._digest = digest
        self._started = self._last = time.monotonic()
        self._spoke = False

    def _send(self, **fields: Any) -> None:
        elapsed = time.monotonic() - self._started
        if self._report is None or (not self._spoke and elapsed < PROGRESS_AFTER):
            return
        self._spoke = True
        self._report({"digest": self._digest, "elapsed": round(elapsed, 3), **fields})

    def layer(self, n: int, total: int, label: str, *, cached: bool, done: int) -> None:
        self._last = time.monotonic()
        self._send(layer=n, layers=total, layer_digest=label, cached=cached, bytes=done)

    def within(self, n: int, total: int, label: str, cached: bool, stats: _Stats) -> None:
        """During layer ``n``: a report at most every :data:`PROGRESS_AFTER` seconds, so a
        large layer is not silence either (``partial: True``)."""
        now = time.monotonic()
        if now - self._last < PROGRESS_AFTER:
            return
        self._last = now
        self._send(layer=n, layers=total, layer_digest=label, cached=cached, bytes=stats.bytes,
                   partial=True)  # fmt: skip

    def finished(self, done: int) -> None:
        if self._spoke:
            self._send(done=True, bytes=done)


def _dir_mode() -> int:
    """Of the cache's own directories: search-only for others when cells run as other uids."""
    return 0o711 if os.geteuid() == 0 else 0o700


def _ensure_dir(path: Path, mode: int) -> Path:
    """Make directory ``path`` with ``mode`` if missing; check it if it exists.

    An existing one must be a directory (not a symlink) of ours; write access for group or
    others, which an older version or a careless hand may have left, is taken away.

    Raises:
        StateError: it cannot be made, or is not a directory of ours.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        _check_dir(path)
        return path
    except OSError as e:
        raise StateError(f"cannot create the image cache {path}: {e.strerror}") from e
    os.chmod(path, mode)  # mkdir's mode went through the umask
    return path


def _check_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StateError(f"cannot use the image cache {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{path} exists and is a {file_kind(st.st_mode)}, not a directory")
    if st.st_uid != os.geteuid():
        raise StateError(
            f"{path} belongs to uid {st.st_uid}, not to buildcell's user ({os.geteuid()}); "
            "refusing to use it for the image cache"
        )
    if st.st_mode & 0o022:
        logger.warning(
            "%s was writable by others (mode %04o); taking that away",
            path,
            stat.S_IMODE(st.st_mode),
        )
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022, follow_symlinks=False)
        except OSError as e:
            raise StateError(f"cannot change the mode of {path}: {e.strerror}") from e


def _log_warning(message: str) -> None:
    logger.warning("%s", message)


#: Trees verified by this process: (device, inode, marker's mtime) -> intact.
_verified: dict[tuple[int, int, int], bool] = {}
_verified_lock = threading.Lock()


def _intact_cost(final: Path) -> int | None:
    """What the complete unpack in ``final`` cost, if its marker is there and its tree
    still has the digest the marker recorded (checked once per process); else None."""
    marker = _read_marker(final)
    if marker is None:
        return None
    cost, recorded = marker
    try:
        st = os.stat(final / "complete", follow_symlinks=False)
        root = os.stat(final / "rootfs", follow_symlinks=False)
    except OSError:
        return None
    key = (root.st_dev, root.st_ino, st.st_mtime_ns)
    intact = _verified_once(key, lambda: _tree_digest(final / "rootfs") == recorded)
    return cost if intact else None


def _tree_digest(root: Path) -> str | None:
    """The sha256 of every entry below ``root``: its path, kind, mode, size and content (a
    file's data extents, holes skipped; a link's target). None if the tree cannot be
    walked."""
    digest = hashlib.sha256()
    try:
        for top, dirs, files, top_fd in os.fwalk(root, follow_symlinks=False):
            dirs.sort()
            rel = os.path.relpath(top, root)
            for name in sorted([*dirs, *files]):
                digest.update(_entry_line(f"{rel}/{name}", name, top_fd))
    except OSError:
        return None
    return "sha256:" + digest.hexdigest()


def _entry_line(rel: str, name: str, dir_fd: int) -> bytes:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    content = ""
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except PermissionError:
            content = "unreadable"  # a mode-000 file, as an unprivileged user: the same each time
        else:
            try:
                extents = hashlib.sha256()
                _hash_extents(fd, os.fstat(fd).st_size, extents)
                content = extents.hexdigest()
            finally:
                os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(name, dir_fd=dir_fd)
    kind, mode = stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)
    return os.fsencode(f"{rel}\0{kind:o}\0{mode:o}\0{st.st_size}\0{content}\n")


def _read_marker(final: Path) -> tuple[int, str] | None:
    """What the complete unpack in ``final`` cost and its tree's digest, from its marker;
    None if there is none, or it is from another version."""
    try:
        fd = os.open(final / "complete", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER_SIZE:
            return None
        data = os.read(fd, _MAX_MARKER_SIZE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("version") != _MARKER_VERSION:
        return None
    cost = doc.get("charged")
    if not isinstance(cost, int) or isinstance(cost, bool) or cost < 0:
        return None
    tree = doc.get("tree")
    if not isinstance(tree, str) or not _DIGEST.fullmatch(tree):
        return None
    return cost, tree


def _exclusive_lock(path: Path, digest: str) -> contextlib.AbstractContextManager[None]:
    return _lock(path, what=f"image {digest}")


@contextlib.contextmanager
def _lock(path: Path, *, shared: bool = False, what: str = "") -> Iterator[None]:
    """Hold ``path`` locked: exclusively to unpack or remove what it guards, shared to use
    it (a layer being linked from); waits for the other kind."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise StateError(f"cannot create lock file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise StateError(f"lock file {path} is not a regular file of buildcell's user")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process using %s", what or path)
            fcntl.flock(fd, kind)
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
                remove_tree(path)
            except SandboxError as e:
                raise StateError(f"cannot remove {path}: {e.message}") from e


def _unpack(  # noqa: PLR0917 (internal: one caller)
    image: _Image,
    plan: _Plan,
    oci_dir: Path,
    final: Path,
    account: _Account,
    progress: _Progress,
) -> None:
    hexdigest = plan.digest.removeprefix("sha256:")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{hexdigest}.tmp-", dir=oci_dir))
    except OSError as e:
        raise StateError(f"cannot create a directory in {oci_dir}: {e.strerror}") from e
    try:
        try:
            os.chmod(tmp, _dir_mode())
            os.mkdir(tmp / "rootfs", 0o700)
            os.mkdir(tmp / "layers", 0o700)
            unpacker = _Unpacker(tmp / "rootfs", account)
        except OSError as e:
            raise StateError(f"cannot prepare {tmp}: {e.strerror}") from e
        with unpacker, contextlib.ExitStack() as held:
            new = _apply_layers(image, plan, oci_dir / "layers", tmp, unpacker, held, progress)
            account.settle(unpacker.stats.stream_bytes)
            try:
                unpacker.finish()
            except OSError as e:
                raise ImageError(f"cannot set directory modes: {e.strerror}") from e
        stats = unpacker.stats
        tree = _tree_digest(tmp / "rootfs")
        if tree is None:
            raise StateError(f"cannot read back the unpacked image in {tmp}")
        marker = {
            "version": _MARKER_VERSION,
            "digest": plan.digest,
            "tree": tree,
            "manifest": plan.manifest,
            "layers": [layer.label for layer in plan.layers],
            "layer_cache": [_layer_key(layer) for layer in plan.layers],
            "charged": account.charged,
            **{k: v for k, v in asdict(stats).items() if k != "layers"},
        }
        try:
            _publish_layers(oci_dir, tmp / "layers", new)
            # Inside the temporary directory: the rename publishes tree and marker at once.
            fd = os.open(tmp / "complete", _CREATE_FLAGS, 0o644)
            try:
                _write_all(fd, json.dumps(marker, indent=2, sort_keys=True).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            full = " (the disk is full)" if e.errno in _NO_SPACE else ""
            raise StateError(
                f"cannot store the unpacked image in {final}{full}: {e.strerror}"
            ) from e
    except BaseException:
        try:
            remove_tree(tmp)
        except SandboxError as e:
            logger.warning("cannot remove %s: %s", tmp, e)
        raise
    logger.info(
        "unpacked image %s: %s, charged %s",
        account.name,
        stats.summary(),
        format_size(account.charged),
    )


# --- removing what is no longer used (buildcell gc) ------------------------------------

#: Layers and temporary trees younger than this are left alone: an unpack may be
#: publishing them right now.
_SWEEP_GRACE = 60.0
_IMAGE_DIR = re.compile(r"[0-9a-f]{64}")


@dataclass
class ImageSweep:
    """What :func:`sweep_images` removed, and what it left because it was in use."""

    images: list[str] = field(default_factory=list)  # digests of the trees removed
    layers: int = 0
    leftovers: int = 0
    busy: list[str] = field(default_factory=list)  # digests: an unpack or a build holds it
    freed: int = 0  # bytes of disk given back
    failed: list[str] = field(default_factory=list)


def sweep_images(
    cache_dir: Path, *, max_age: float, in_use: set[str], now: float | None = None
) -> ImageSweep:
    """Remove unpacked images not used for ``max_age`` seconds, then layers no remaining
    image was composed from, and what interrupted unpacks left.

    An image counts as used when :func:`unpack_image` last returned it (its ``used``
    file). One in ``in_use`` (the digests that running builds name) or locked by an unpack
    is kept whatever its age. Nothing is ever removed through a symlink.

    Returns:
        what was removed; nothing, if the cache was never made.
    """
    now = time.time() if now is None else now
    sweep = ImageSweep()
    oci_dir = cache_dir / "oci"
    if not oci_dir.is_dir() or oci_dir.is_symlink():
        return sweep
    before = _disk_use(oci_dir)
    referenced: set[str] = set()
    for entry in sorted(oci_dir.iterdir()):
        name = entry.name
        if _IMAGE_DIR.fullmatch(name):
            keys = _sweep_image(entry, max_age=max_age, in_use=in_use, now=now, sweep=sweep)
            referenced.update(keys)
        elif name.startswith(".") and ".tmp-" in name:
            hexdigest = name[1:].split(".tmp-", 1)[0]
            if _age(entry, now) > _SWEEP_GRACE and _remove_locked(
                oci_dir / f"{hexdigest}.lock", entry, sweep
            ):
                sweep.leftovers += 1
    layers_dir = oci_dir / "layers"
    if layers_dir.is_dir() and not layers_dir.is_symlink():
        for layer in sorted(layers_dir.iterdir()):
            if layer.name.endswith(".lock") or layer.name in referenced:
                continue
            if _age(layer, now) > _SWEEP_GRACE and _remove_locked(
                layers_dir / f"{layer.name}.lock", layer, sweep
            ):
                sweep.layers += 1
    sweep.freed = max(0, before - _disk_use(oci_dir))
    return sweep


def _sweep_image(
    entry: Path, *, max_age: float, in_use: set[str], now: float, sweep: ImageSweep
) -> list[str]:
    """Remove the image in ``entry`` if it is unused and old; the layer keys it keeps."""
    digest = "sha256:" + entry.name
    keys = _marker_layers(entry)
    try:
        used = os.stat(entry / USED_FILE, follow_symlinks=False).st_mtime
    except OSError:
        used = _age_mtime(entry / "complete") or _age_mtime(entry) or now
    if digest in in_use or now - used <= max_age:
        if digest in in_use:
            sweep.busy.append(digest)
        return keys
    if _remove_locked(entry.parent / f"{entry.name}.lock", entry, sweep):
        sweep.images.append(digest)
        return []
    sweep.busy.append(digest)
    return keys


def _marker_layers(final: Path) -> list[str]:
    try:
        fd = os.open(final / "complete", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(_MAX_MARKER_SIZE))
    except (OSError, ValueError):
        return []
    keys = doc.get("layer_cache") if isinstance(doc, dict) else None
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _age_mtime(path: Path) -> float | None:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return None


def _age(path: Path, now: float) -> float:
    mtime = _age_mtime(path)
    return 0.0 if mtime is None else now - mtime


def _remove_locked(lock: Path, path: Path, sweep: ImageSweep) -> bool:
    """Remove ``path`` if its lock can be had at once (no unpack or use holds it)."""
    try:
        fd = os.open(
            lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600
        )
    except OSError as e:
        sweep.failed.append(f"{path}: {e.strerror}")
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            remove_tree(path)
        except SandboxError as e:
            sweep.failed.append(f"{path}: {e.message}")
            return False
        return True
    finally:
        os.close(fd)


def _disk_use(root: Path) -> int:
    """Bytes of disk below ``root``, each file counted once however many links it has."""
    seen: set[tuple[int, int]] = set()
    total = 0
    with contextlib.suppress(OSError):
        for _top, dirs, files, top_fd in os.fwalk(root, follow_symlinks=False):
            for name in [*dirs, *files]:
                try:
                    st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total
