"""Build container images for tests: OCI layouts, OCI archives and docker-archives.

Everything is assembled in memory with :mod:`tarfile`, :mod:`hashlib` and :mod:`json`, then
written out, so tests can also reach for the pieces (``build_oci_layout`` returns every
file and digest) to tamper with them.

A layer is a list of members (or ready-made tar bytes, for hand-crafted hostile layers).
A :class:`TarEntry` is written in PAX format, so any name survives; an entry whose ``size``
differs from ``len(data)`` is written as declared and ends the layer there, truncated, the
way a hostile or damaged layer would be. A :class:`SparseEntry` is a sparse file in one of
the four formats GNU tar writes (old GNU ``S`` members, PAX 0.0, 0.1 and 1.0), which
:mod:`tarfile` reads but cannot write: its headers are assembled here byte by byte, with
checksums, so tests can also declare what no honest tar would (a map past the real size,
overlapping or negative pieces, more data than stored). :class:`RawMember` is any bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUSYBOX_APPLETS",
    "DEFAULT_MTIME",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "BuiltImage",
    "Layer",
    "Member",
    "RawMember",
    "SparseEntry",
    "SparseFormat",
    "TarEntry",
    "blob_path",
    "build_docker_archive",
    "build_oci_layout",
    "gnu_longname",
    "gzip_zeros",
    "host_tool_entries",
    "layer_tar",
    "make_busybox_layout",
    "make_docker_archive",
    "make_host_tools_layout",
    "make_oci_archive",
    "make_oci_layout",
    "native_arch",
    "pax_header",
    "pax_records",
    "sha256_digest",
    "tar_bytes",
    "tar_header",
    "write_dir",
    "write_tar",
]

DEFAULT_MTIME = 1_600_000_000

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]

_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


@dataclass(frozen=True)
class TarEntry:
    """One member of a layer tar.

    Attributes:
        name: the member name, verbatim (``..``, leading ``/`` and NUL are all allowed).
        kind: the member type.
        data: file content.
        mode: permission bits; 0o644 for files, 0o755 for directories by default.
        linkname: target of a symlink or hard link.
        mtime: modification time, seconds.
        size: the declared size when it should differ from ``len(data)``.
        pax: extra PAX header records.
    """

    name: str
    kind: EntryKind = "file"
    data: bytes = b""
    mode: int | None = None
    linkname: str = ""
    mtime: int = DEFAULT_MTIME
    size: int | None = None
    pax: Mapping[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = _TYPES[self.kind]
        info.mode = self.mode if self.mode is not None else _DEFAULT_MODES.get(self.kind, 0o644)
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.size = (
            (len(self.data) if self.size is None else self.size) if self.kind == "file" else 0
        )
        info.uid = info.gid = 4242  # to show that ownership is ignored
        info.uname = info.gname = "nobody"
        if self.kind in ("char", "block"):
            info.devmajor, info.devminor = 1, 3
        pax = dict(self.pax)
        if "\0" in self.name:
            pax["path"] = self.name  # a ustar name would be cut at the NUL
        info.pax_headers = pax
        return info


# --- hand-made headers ---------------------------------------------------------------------

_BLOCK = tarfile.BLOCKSIZE
SparseFormat = Literal["gnu", "pax0.0", "pax0.1", "pax1.0"]


def _number(value: int, width: int) -> bytes:
    """A numeric header field: octal with a NUL when it fits, else GNU base-256.

    Negative values are written in base-256 too (two's complement after an 0xff byte), as
    GNU tar reads them: hostile headers use them.
    """
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value >= 0:
        if value >= 1 << (8 * (width - 1)):
            raise ValueError(f"{value} does not fit in {width} bytes")
        return b"\x80" + value.to_bytes(width - 1, "big")
    if -value > 1 << (8 * (width - 1)):
        raise ValueError(f"{value} does not fit in {width} bytes")
    complement = (1 << (8 * (width - 1))) + value
    return b"\xff" + complement.to_bytes(width - 1, "big")


def _field(text: str | bytes, width: int) -> bytes:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return data[:width].ljust(width, b"\0")


def tar_header(
    name: str | bytes,
    *,
    type: bytes = tarfile.REGTYPE,
    size: int = 0,
    mode: int = 0o644,
    mtime: int = DEFAULT_MTIME,
    linkname: str | bytes = "",
    gnu: bool = False,
    extra: Mapping[int, bytes] | None = None,
) -> bytes:
    """One 512-byte tar header with a correct checksum.

    Args:
        name: at most 100 bytes are kept (longer names need :func:`gnu_longname` or a
            ``path`` record in :func:`pax_header`).
        gnu: the old GNU magic (``ustar  \\0``) instead of POSIX ``ustar\\0`` ``00``.
        extra: raw bytes to place at offsets of the header (old GNU sparse fields).
    """
    block = bytearray(_BLOCK)
    block[0:100] = _field(name, 100)
    block[100:108] = _number(mode, 8)
    block[108:116] = _number(4242, 8)
    block[116:124] = _number(4242, 8)
    block[124:136] = _number(size, 12)
    block[136:148] = _number(mtime, 12)
    block[156:157] = type
    block[157:257] = _field(linkname, 100)
    block[257:265] = b"ustar  \0" if gnu else b"ustar\x0000"
    block[265:297] = _field("nobody", 32)
    block[297:329] = _field("nobody", 32)
    for offset, data in (extra or {}).items():
        block[offset : offset + len(data)] = data
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % _BLOCK)


def gnu_longname(name: str | bytes, *, link: bool = False) -> bytes:
    """A GNU ``L`` (or, with ``link``, ``K``) member carrying the next member's long name."""
    data = (name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name) + b"\0"
    kind = tarfile.GNUTYPE_LONGLINK if link else tarfile.GNUTYPE_LONGNAME
    return tar_header("././@LongLink", type=kind, size=len(data), gnu=True) + _padded(data)


def pax_records(records: Sequence[tuple[str, str]]) -> bytes:
    """``"%d %s=%s\\n"`` records, in order, repeated keys kept (PAX 0.0 repeats some)."""
    out = bytearray()
    for key, value in records:
        body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return bytes(out)


def pax_header(records: Sequence[tuple[str, str]], *, name: str = "PaxHeaders/x") -> bytes:
    """A PAX extended header member (type ``x``) holding ``records``."""
    data = pax_records(records)
    return tar_header(name, type=tarfile.XHDTYPE, size=len(data)) + _padded(data)


@dataclass(frozen=True)
class SparseEntry:
    """A sparse regular file, written in one of GNU tar's sparse formats.

    Attributes:
        name: the member name (any length: a long one goes into a GNU ``L`` member or a
            PAX record, as ``long_name`` says).
        realsize: the size the file declares (what unpacking it would write).
        chunks: (offset, data) pieces with data; the rest of the file is holes.
        fmt: ``gnu`` (old GNU, type ``S``), ``pax0.0``, ``pax0.1`` or ``pax1.0``.
        sparse_map: the (offset, size) map to declare instead of the one ``chunks`` imply
            (hostile maps: overlapping, past ``realsize``, negative, claiming more data
            than stored). The implied map ends with ``(realsize, 0)`` when the file ends
            in a hole, as GNU tar writes it.
        long_name: how a name over 100 bytes is carried: ``gnu`` (an ``L`` member, any
            format), ``path`` (a PAX ``path`` record) or ``sparse-name`` (PAX
            ``GNU.sparse.name``, followed by a ``path`` record of the placeholder name, as
            GNU tar writes 0.1 and 1.0); by default ``gnu`` for old GNU members,
            ``sparse-name`` for 1.0 and ``path`` otherwise.
        mode: permission bits.
        mtime: modification time, seconds.
        records: more PAX records, after the sparse ones (PAX formats only).
    """

    name: str
    realsize: int
    chunks: Sequence[tuple[int, bytes]] = ()
    fmt: SparseFormat = "gnu"
    sparse_map: Sequence[tuple[int, int]] | None = None
    long_name: Literal["gnu", "path", "sparse-name"] | None = None
    mode: int = 0o644
    mtime: int = DEFAULT_MTIME
    records: Sequence[tuple[str, str]] = ()

    @property
    def data(self) -> bytes:
        """What the member stores: the chunks' data, concatenated."""
        return b"".join(data for _, data in self.chunks)

    @property
    def map(self) -> list[tuple[int, int]]:
        if self.sparse_map is not None:
            return list(self.sparse_map)
        pieces = [(offset, len(data)) for offset, data in self.chunks]
        end = pieces[-1][0] + pieces[-1][1] if pieces else 0
        return [*pieces, (self.realsize, 0)] if end < self.realsize else pieces

    def tobuf(self) -> bytes:
        """The member's bytes: headers, then the stored data padded to a block."""
        how = self.long_name or {"gnu": "gnu", "pax1.0": "sparse-name"}.get(self.fmt, "path")
        long = len(self.name.encode("utf-8", "surrogateescape")) > 100
        prefix = gnu_longname(self.name) if long and how == "gnu" else b""
        if self.fmt == "gnu":
            return prefix + self._old_gnu()
        records: list[tuple[str, str]] = []
        data = self.data
        ustar_name = self.name
        if self.fmt == "pax0.0":
            records += [
                ("GNU.sparse.size", str(self.realsize)),
                ("GNU.sparse.numblocks", str(len(self.map))),
            ]
            for offset, size in self.map:
                records += [("GNU.sparse.offset", str(offset)), ("GNU.sparse.numbytes", str(size))]
        elif self.fmt == "pax0.1":
            records += [
                ("GNU.sparse.size", str(self.realsize)),
                ("GNU.sparse.numblocks", str(len(self.map))),
                ("GNU.sparse.map", ",".join(f"{o},{n}" for o, n in self.map)),
            ]
        else:
            records += [
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.realsize", str(self.realsize)),
            ]
            lines = [str(len(self.map))] + [f"{n}" for pair in self.map for n in pair]
            data = _padded("".join(f"{line}\n" for line in lines).encode()) + data
        if how == "sparse-name" and self.fmt != "pax0.0":
            head, _, base = self.name.rpartition("/")
            ustar_name = (head + "/" if head else "") + "GNUSparseFile.0/" + base
            records.append(("GNU.sparse.name", self.name))
            if len(ustar_name.encode("utf-8", "surrogateescape")) > 100:
                records.append(("path", ustar_name))
        elif long and how == "path":
            records.append(("path", self.name))
        records += list(self.records)
        header = tar_header(ustar_name, size=len(data), mode=self.mode, mtime=self.mtime)
        return prefix + pax_header(records) + header + _padded(data)

    def _old_gnu(self) -> bytes:
        pieces = self.map
        extra = {483: _number(self.realsize, 12)}

        def entry(offset: int, size: int) -> bytes:
            return _number(offset, 12) + _number(size, 12)

        head, rest = pieces[:4], pieces[4:]
        extra[386] = b"".join(entry(o, n) for o, n in head)
        extra[482] = b"\1" if rest else b"\0"
        blocks = bytearray()
        while rest:
            part, rest = rest[:21], rest[21:]
            block = bytearray(_BLOCK)
            block[0 : 24 * len(part)] = b"".join(entry(o, n) for o, n in part)
            block[504] = 1 if rest else 0
            blocks += block
        header = tar_header(
            self.name,
            type=tarfile.GNUTYPE_SPARSE,
            size=len(self.data),
            mode=self.mode,
            mtime=self.mtime,
            gnu=True,
            extra=extra,
        )
        return header + bytes(blocks) + _padded(self.data)


@dataclass(frozen=True)
class RawMember:
    """Bytes to put into a layer as they are (headers made with :func:`tar_header`)."""

    data: bytes

    def tobuf(self) -> bytes:
        return self.data


Member = TarEntry | SparseEntry | RawMember

#: A layer: members to build a tar from, or the bytes of an (uncompressed) tar.
Layer = Sequence[Member] | bytes


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: Sequence[Member]) -> bytes:
    """A tar of ``entries``, in order; stops after the first truncated entry."""
    out = bytearray()
    for entry in entries:
        if not isinstance(entry, TarEntry):
            out += entry.tobuf()
            continue
        out += entry.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out += entry.data
        if entry.size is not None and entry.size != len(entry.data):
            return bytes(out)
        out += b"\0" * (-len(entry.data) % tarfile.BLOCKSIZE)
    out += b"\0" * (2 * tarfile.BLOCKSIZE)
    return bytes(out)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def gzip_zeros(head: bytes, zeros: int) -> bytes:
    """A gzip stream of ``head`` followed by ``zeros`` zero bytes (whole MiB), built from
    repeated gzip members so that neither it nor its input is ever in memory whole: 1 GiB
    of zeros takes about 1 MiB."""
    chunk = 1 << 20
    if zeros % chunk:
        raise ValueError("zeros must be whole MiB")
    return _gzip(head) + _gzip(b"\0" * chunk) * (zeros // chunk)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def native_arch() -> str:
    """This machine's GOARCH name, as OCI platforms spell it."""
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "386"}.get(machine, machine)


def _other_arch() -> str:
    return "s390x" if native_arch() != "s390x" else "riscv64"


@dataclass
class BuiltImage:
    """The files of an image (name inside the image -> bytes) and its digests.

    ``digest`` is what to pin: the manifest (or index) digest, or the config digest for
    a docker-archive without an OCI layout.
    """

    files: dict[str, bytes]
    digest: str
    manifest_digest: str | None
    config_digest: str
    layer_digests: list[str]  # of the blobs as stored
    diff_ids: list[str]  # of the uncompressed tars


def _layer_bytes(layer: Layer) -> bytes:
    return layer if isinstance(layer, bytes) else layer_tar(layer)


def build_oci_layout(
    layers: Sequence[Layer],
    *,
    compress: bool = True,
    layer_media_type: str | None = None,
    platform_index: bool = False,
    with_diff_ids: bool = True,
    blobs: Sequence[bytes] = (),
) -> BuiltImage:
    """The files of an OCI image layout holding one image.

    Args:
        layers: the layers, bottom first.
        compress: gzip the layer blobs.
        layer_media_type: overrides the layer media type (e.g. a zstd one).
        platform_index: put the manifest in an image index, next to a manifest for another
            architecture, and return the index digest.
        with_diff_ids: list the layers' diff_ids in the config.
        blobs: ready-made layer blobs (compressed as ``compress`` says) stored as they
            are after ``layers``, e.g. a gzip bomb too big to build in memory; an image
            with any has no diff_ids.
    """
    files: dict[str, bytes] = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"})}

    def add(data: bytes) -> str:
        digest = sha256_digest(data)
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
        return digest

    tars = [_layer_bytes(layer) for layer in layers]
    diff_ids = [sha256_digest(t) for t in tars]
    stored = [_gzip(t) if compress else t for t in tars] + list(blobs)
    media_type = layer_media_type or (OCI_LAYER_GZIP if compress else OCI_LAYER_TAR)
    layer_digests = [add(b) for b in stored]
    layer_descs = [
        {"mediaType": media_type, "digest": d, "size": len(b)}
        for d, b in zip(layer_digests, stored, strict=True)
    ]
    config: dict[str, Any] = {"architecture": native_arch(), "os": "linux", "config": {}}
    if with_diff_ids and not blobs:
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_data = _json(config)
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": add(config_data),
                "size": len(config_data),
            },
            "layers": layer_descs,
        }
    )
    manifest_digest = add(manifest)
    top = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
    digest = manifest_digest
    if platform_index:
        # A decoy for another architecture, whose layer does not even exist.
        decoy_config = _json({"architecture": _other_arch(), "os": "linux", "config": {}})
        decoy = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": add(decoy_config),
                    "size": len(decoy_config),
                },
                "layers": [
                    {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:" + "0" * 64, "size": 1}
                ],
            }
        )
        index = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": add(decoy),
                        "size": len(decoy),
                        "platform": {"os": "linux", "architecture": _other_arch()},
                    },
                    {**top, "platform": {"os": "linux", "architecture": native_arch()}},
                ],
            }
        )
        digest = add(index)
        top = {"mediaType": OCI_INDEX, "digest": digest, "size": len(index)}
    top["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    files["index.json"] = _json({"schemaVersion": 2, "manifests": [top]})
    return BuiltImage(
        files=files,
        digest=digest,
        manifest_digest=manifest_digest,
        config_digest=sha256_digest(config_data),
        layer_digests=layer_digests,
        diff_ids=diff_ids,
    )


def build_docker_archive(
    layers: Sequence[Layer], *, oci_layout: bool = False, gzip_layers: bool = False
) -> BuiltImage:
    """The files of a ``docker save`` tarball.

    Without ``oci_layout`` it is the classic format (``<id>/layer.tar``, ``<id>.json``,
    ``manifest.json``) and ``digest`` is the config digest; with it, the Docker 25+ format
    (an OCI layout with uncompressed layers plus ``manifest.json`` naming its blobs) and
    ``digest`` is the manifest digest.
    """
    if oci_layout:
        image = build_oci_layout(layers, compress=False)
        config_name = "blobs/sha256/" + image.config_digest.removeprefix("sha256:")
        layer_names = ["blobs/sha256/" + d.removeprefix("sha256:") for d in image.layer_digests]
        image.files["manifest.json"] = _json(
            [{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}]
        )
        return image
    files: dict[str, bytes] = {}
    tars = [_layer_bytes(layer) for layer in layers]
    diff_ids = [sha256_digest(t) for t in tars]
    layer_names = []
    for tar_bytes, diff_id in zip(tars, diff_ids, strict=True):
        name = diff_id.removeprefix("sha256:") + "/layer.tar"
        files[name] = _gzip(tar_bytes) if gzip_layers else tar_bytes
        files[name.replace("layer.tar", "VERSION")] = b"1.0"
        layer_names.append(name)
    config_data = _json(
        {
            "architecture": native_arch(),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    config_digest = sha256_digest(config_data)
    files[config_digest.removeprefix("sha256:") + ".json"] = config_data
    files["manifest.json"] = _json(
        [
            {
                "Config": config_digest.removeprefix("sha256:") + ".json",
                "RepoTags": ["test:latest"],
                "Layers": layer_names,
            }
        ]
    )
    return BuiltImage(
        files=files,
        digest=config_digest,
        manifest_digest=None,
        config_digest=config_digest,
        layer_digests=[sha256_digest(files[n]) for n in layer_names],
        diff_ids=diff_ids,
    )


def write_dir(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` below ``directory``."""
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def tar_bytes(files: Mapping[str, bytes]) -> bytes:
    """A tar of regular ``files`` (name -> content), all with :data:`DEFAULT_MTIME`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = DEFAULT_MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, files: Mapping[str, bytes], *, compress: bool = False) -> None:
    """Write ``files`` as a tar (gzip-compressed with ``compress``) at ``path``."""
    data = tar_bytes(files)
    path.write_bytes(_gzip(data) if compress else data)


def blob_path(layout: Path, digest: str) -> Path:
    """Where blob ``digest`` lives in the OCI layout directory ``layout``."""
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def make_oci_layout(directory: Path, layers: Sequence[Layer], **options: Any) -> str:
    """Write an OCI image layout into ``directory``; return the digest to pin.

    ``options`` are those of :func:`build_oci_layout`.
    """
    image = build_oci_layout(layers, **options)
    write_dir(directory, image.files)
    return image.digest


def make_oci_archive(
    path: Path, layers: Sequence[Layer], *, compress_archive: bool = False, **options: Any
) -> str:
    """Write an OCI archive (a tar of a layout) at ``path``; return the digest to pin."""
    image = build_oci_layout(layers, **options)
    write_tar(path, image.files, compress=compress_archive)
    return image.digest


def make_docker_archive(path: Path, layers: Sequence[Layer], **options: Any) -> str:
    """Write a ``docker save`` tarball at ``path``; return the digest to pin.

    That is the config digest (Docker's image ID), or the manifest digest when
    ``oci_layout=True``; ``options`` are those of :func:`build_docker_archive`.
    """
    image = build_docker_archive(layers, **options)
    write_tar(path, image.files)
    return image.digest


#: Applets linked to busybox in the image built by :func:`make_busybox_layout`.
BUSYBOX_APPLETS = (
    "sh", "ash", "cat", "cp", "echo", "env", "false", "id", "ls", "mkdir", "mv", "rm",
    "sleep", "test", "touch", "true", "uname", "wc",
)  # fmt: skip


def make_busybox_layout(directory: Path) -> str | None:
    """Write a one-layer OCI layout with the host's ``/bin/busybox``; None without one.

    The image has ``/bin/busybox`` (0o755), ``/bin/<applet> -> busybox`` symlinks for
    :data:`BUSYBOX_APPLETS`, ``/usr/bin/env -> /bin/busybox``, and empty ``/etc``,
    ``/tmp`` (1777) and ``/root``.
    """
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        return None
    entries = [
        TarEntry("bin/", "dir"),
        TarEntry("bin/busybox", data=busybox.read_bytes(), mode=0o755),
        *(TarEntry(f"bin/{applet}", "symlink", linkname="busybox") for applet in BUSYBOX_APPLETS),
        TarEntry("usr/", "dir"),
        TarEntry("usr/bin/", "dir"),
        TarEntry("usr/bin/env", "symlink", linkname="/bin/busybox"),
        TarEntry("etc/", "dir"),
        TarEntry("tmp/", "dir", mode=0o1777),
        TarEntry("root/", "dir", mode=0o700),
    ]
    return make_oci_layout(directory, [entries])


def _ldd_paths(binary: str) -> list[str]:
    """The shared libraries ``binary`` loads, as absolute paths (none when static)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    out = subprocess.run([ldd, binary], capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                found.append(word)
    return found


def host_tool_entries(tools: Sequence[str]) -> list[TarEntry]:
    """Members copying host programs, with the libraries they load, to the same paths.

    Symlinks on the way (``/bin -> usr/bin``, ``/lib64/ld-linux... -> ...``) become the same
    symlinks in the image, so every path the programs and the loader use resolves there.
    """
    entries: dict[str, TarEntry] = {}

    def add(path: str, hops: int = 0) -> None:
        if hops > 16:
            raise ValueError(f"too many symlinks resolving {path}")
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            here = "/" + "/".join(parts[:i])
            if os.path.islink(here):
                target = os.readlink(here)
                entries.setdefault(here[1:], TarEntry(here[1:], "symlink", linkname=target))
                resolved = os.path.normpath(os.path.join(os.path.dirname(here), target))
                add("/".join([resolved, *parts[i:]]), hops + 1)
                return
        with open(path, "rb") as f:
            data = f.read()
        mode = os.stat(path).st_mode & 0o755
        entries.setdefault(path[1:], TarEntry(path[1:], "file", data, mode=mode))

    for tool in tools:
        add(tool)
        for lib in _ldd_paths(tool):
            add(lib)
    return list(entries.values())


def make_host_tools_layout(
    directory: Path,
    layers: Sequence[Layer] = (),
    *,
    tools: Sequence[str] = ("/usr/bin/true", "/bin/sh"),
    **options: Any,
) -> str:
    """An OCI layout whose first layer holds host ``tools`` (and their libraries), then
    ``layers``; returns the digest to pin. The image has ``/etc``, ``/tmp`` and ``/usr``."""
    base: list[Member] = [TarEntry("etc/", "dir"), TarEntry("tmp/", "dir", mode=0o1777)]
    base += host_tool_entries(tools)
    return make_oci_layout(directory, [base, *layers], **options)
