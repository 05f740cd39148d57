"""Build container images for tests: OCI layouts, OCI archives and docker-archives.

Everything is assembled in memory with :mod:`tarfile`, :mod:`hashlib` and :mod:`json`, then
written out, so tests can also reach for the pieces (``build_oci_layout`` returns every
file and digest) to tamper with them.

A layer is a list of :class:`TarEntry` (or ready-made tar bytes, for hand-crafted
hostile layers). Entries are written in PAX format, so any name survives; an entry whose
``size`` differs from ``len(data)`` is written as declared and ends the layer there,
truncated, the way a hostile or damaged layer would be.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
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
    "TarEntry",
    "blob_path",
    "build_docker_archive",
    "build_oci_layout",
    "layer_tar",
    "make_busybox_layout",
    "make_docker_archive",
    "make_oci_archive",
    "make_oci_layout",
    "native_arch",
    "sha256_digest",
    "tar_bytes",
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


#: A layer: entries to build a tar from, or the bytes of an (uncompressed) tar.
Layer = Sequence[TarEntry] | bytes


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: Sequence[TarEntry]) -> bytes:
    """A PAX tar of ``entries``, in order; stops after the first truncated entry."""
    out = bytearray()
    for entry in entries:
        out += entry.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out += entry.data
        if entry.size is not None and entry.size != len(entry.data):
            return bytes(out)
        out += b"\0" * (-len(entry.data) % tarfile.BLOCKSIZE)
    out += b"\0" * (2 * tarfile.BLOCKSIZE)
    return bytes(out)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


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
) -> BuiltImage:
    """The files of an OCI image layout holding one image.

    Args:
        layers: the layers, bottom first.
        compress: gzip the layer blobs.
        layer_media_type: overrides the layer media type (e.g. a zstd one).
        platform_index: put the manifest in an image index, next to a manifest for another
            architecture, and return the index digest.
        with_diff_ids: list the layers' diff_ids in the config.
    """
    files: dict[str, bytes] = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"})}

    def add(data: bytes) -> str:
        digest = sha256_digest(data)
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
        return digest

    tars = [_layer_bytes(layer) for layer in layers]
    diff_ids = [sha256_digest(t) for t in tars]
    blobs = [_gzip(t) if compress else t for t in tars]
    media_type = layer_media_type or (OCI_LAYER_GZIP if compress else OCI_LAYER_TAR)
    layer_digests = [add(b) for b in blobs]
    layer_descs = [
        {"mediaType": media_type, "digest": d, "size": len(b)}
        for d, b in zip(layer_digests, blobs, strict=True)
    ]
    config: dict[str, Any] = {"architecture": native_arch(), "os": "linux", "config": {}}
    if with_diff_ids:
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
