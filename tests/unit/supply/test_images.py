"""Unpacking container images: formats, verification, whiteouts, caching, and attacks.

Hostile layers are attacks with an expected containment: each runs next to a sentinel
directory outside the cache and asserts it is exactly as it was.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import root_only
from tests.oci_images import (
    BUSYBOX_APPLETS,
    DEFAULT_MTIME,
    SparseEntry,
    SparseFormat,
    TarEntry,
    blob_path,
    build_docker_archive,
    build_oci_layout,
    layer_tar,
    make_busybox_layout,
    make_docker_archive,
    make_oci_archive,
    make_oci_layout,
    native_arch,
    sha256_digest,
    write_dir,
    write_tar,
)

from buildcell.errors import ConfigError, ImageError, StateError
from buildcell.supply import images as oci
from buildcell.supply.images import UnpackBudget, parse_digest, unpack_image
from buildcell.trees import remove_tree

REPO = Path(__file__).resolve().parents[3]


def F(name: str, data: bytes = b"", **kw: Any) -> TarEntry:
    return TarEntry(name, "file", data, **kw)


def D(name: str, **kw: Any) -> TarEntry:
    return TarEntry(name, "dir", **kw)


def L(name: str, target: str, **kw: Any) -> TarEntry:
    return TarEntry(name, "symlink", linkname=target, **kw)


def H(name: str, target: str) -> TarEntry:
    return TarEntry(name, "hardlink", linkname=target)


BASE = [D("etc/"), F("etc/os-release", b"ID=test\n"), D("usr/"), D("usr/bin/")]


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything below ``root``, without following symlinks: type, mode, content."""
    found: dict[str, tuple[Any, ...]] = {}
    if not os.path.lexists(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                detail: Any = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                detail = (path.read_bytes(), st_.st_nlink)
            else:
                detail = None
            found[str(path.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_mode, detail)
    return found


def leftovers(cache: Path) -> list[str]:
    """What the cache holds besides lock files and the layer cache."""
    oci_dir = cache / "oci"
    if not oci_dir.exists():
        return []
    return sorted(
        p.name for p in oci_dir.iterdir() if not p.name.endswith(".lock") and p.name != "layers"
    )


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel directory next to the cache that no layer may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "file").write_text("precious\n")
    (path / "sub").mkdir()
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def unpack_layers(
    tmp_path: Path, layers: list[Any], budget: UnpackBudget | None = None, **options: Any
) -> Path:
    image = tmp_path / "image"
    digest = make_oci_layout(image, layers, **options)
    return unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=budget)


def expect_contained(
    tmp_path: Path, outside: Path, layers: list[Any], match: str | None = None
) -> Path | None:
    """Unpack ``layers``; the sentinel must be unchanged. Returns the rootfs, or None
    when unpacking failed (with ImageError matching ``match``, when given)."""
    before = snapshot(outside)
    rootfs: Path | None = None
    if match is None:
        rootfs = unpack_layers(tmp_path, layers)
    else:
        with pytest.raises(ImageError, match=re.escape(match)):
            unpack_layers(tmp_path, layers)
        assert leftovers(tmp_path / "cache") == []
    assert snapshot(outside) == before
    return rootfs


# --- parse_digest ------------------------------------------------------------------------


def test_parse_digest_accepts_sha256() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    assert parse_digest(digest) == digest


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 128,
        "a" * 64,
        "sha256:" + "a" * 64 + "\n",
        " sha256:" + "a" * 64,
        "sha256:" + "g" * 64,
    ],
)
def test_parse_digest_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid image digest"):
        parse_digest(text)


def test_unpack_rejects_a_malformed_digest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        unpack_image(tmp_path, "sha256:nope", cache_dir=tmp_path / "cache")


# --- happy paths -------------------------------------------------------------------------

CONTENT = [
    *BASE,
    D("bin/", mode=0o755, mtime=1_500_000_000),
    F("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755, mtime=1_400_000_000),
    F("bin/suid", b"x", mode=0o4755),
    F("bin/sgid", b"x", mode=0o2711),
    F("etc/secret", b"s", mode=0o600),
    L("bin/abs", "/usr/bin/env", mtime=1_300_000_000),
    L("bin/rel", "tool"),
    L("bin/dangling", "../nowhere/at/all"),
    H("bin/tool-again", "bin/tool"),
    D("ro/", mode=0o555),
    F("ro/inside", b"written before the directory became read-only"),
    D("sticky/", mode=0o1777),
    D("ww/", mode=0o777),
    F("ww/file", b"w", mode=0o666),
    F("etc/group-writable", b"g", mode=0o2775),
    F("./dotted", b"leading ./ is dropped"),
]


def check_content(rootfs: Path) -> None:
    assert (rootfs / "etc/os-release").read_bytes() == b"ID=test\n"
    assert (rootfs / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((rootfs / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((rootfs / "bin/suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((rootfs / "bin/sgid").stat().st_mode) == 0o711
    assert stat.S_IMODE((rootfs / "etc/secret").stat().st_mode) == 0o600
    assert os.readlink(rootfs / "bin/abs") == "/usr/bin/env"
    assert os.readlink(rootfs / "bin/rel") == "tool"
    assert os.readlink(rootfs / "bin/dangling") == "../nowhere/at/all"
    assert (rootfs / "bin/tool-again").stat().st_ino == (rootfs / "bin/tool").stat().st_ino
    assert stat.S_IMODE((rootfs / "ro").stat().st_mode) == 0o555
    assert (rootfs / "ro/inside").is_file()
    # Nothing is writable by group or others, nothing sticky: the cache is shared by every
    # later build on the image, and the cell mounts it read-only anyway.
    assert stat.S_IMODE((rootfs / "sticky").stat().st_mode) == 0o755
    assert stat.S_IMODE((rootfs / "ww").stat().st_mode) == 0o755
    assert stat.S_IMODE((rootfs / "ww/file").stat().st_mode) == 0o644
    assert stat.S_IMODE((rootfs / "etc/group-writable").stat().st_mode) == 0o755
    assert (rootfs / "dotted").read_bytes() == b"leading ./ is dropped"
    # mtimes come from the tar, for files, directories and symlinks alike
    assert (rootfs / "bin/tool").stat().st_mtime == 1_400_000_000
    assert (rootfs / "bin").stat().st_mtime == 1_500_000_000
    assert (rootfs / "bin/abs").lstat().st_mtime == 1_300_000_000
    assert (rootfs / "etc").stat().st_mtime == DEFAULT_MTIME
    # ownership is the unpacking user's, whatever the tar says
    assert (rootfs / "bin/tool").stat().st_uid == os.geteuid()
    assert stat.S_IMODE(rootfs.stat().st_mode) == 0o755


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "tar"])
def test_oci_layout(tmp_path: Path, cache: Path, compress: bool) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT], compress=compress)
    rootfs = unpack_image(image, digest, cache_dir=cache)
    assert rootfs == cache / "oci" / digest.removeprefix("sha256:") / "rootfs"
    check_content(rootfs)
    marker = json.loads((rootfs.parent / "complete").read_text())
    assert marker["digest"] == digest
    assert marker["hardlinks"] == 1
    assert marker["version"] == 4 and marker["charged"] > marker["bytes"] > 0
    # Search-only for the cells' uids when root; private otherwise.
    expected = 0o711 if os.geteuid() == 0 else 0o700
    for directory in (cache, cache / "oci", rootfs.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == expected
    assert stat.S_IMODE((cache / "oci" / (rootfs.parent.name + ".lock")).stat().st_mode) == 0o600
    assert leftovers(cache) == [digest.removeprefix("sha256:")]


@pytest.mark.parametrize("compress_archive", [False, True], ids=["tar", "tar.gz"])
def test_oci_archive(tmp_path: Path, cache: Path, compress_archive: bool) -> None:
    archive = tmp_path / "image.tar"
    digest = make_oci_archive(archive, [CONTENT], compress_archive=compress_archive)
    check_content(unpack_image(archive, digest, cache_dir=cache))


@pytest.mark.parametrize("gzip_layers", [False, True], ids=["tar", "gzip"])
def test_docker_archive_is_pinned_by_config_digest(
    tmp_path: Path, cache: Path, gzip_layers: bool
) -> None:
    archive = tmp_path / "image.tar"
    image = build_docker_archive([BASE, CONTENT], gzip_layers=gzip_layers)
    write_tar(archive, image.files)
    assert image.digest == image.config_digest
    check_content(unpack_image(archive, image.digest, cache_dir=cache))


def test_docker_archive_with_oci_layout(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "image.tar"
    image = build_docker_archive([CONTENT], oci_layout=True)
    write_tar(archive, image.files)
    # The manifest digest exists only in the OCI layout: it is what is read.
    assert image.digest == image.manifest_digest
    check_content(unpack_image(archive, image.digest, cache_dir=cache))
    # Docker's image ID (the config digest) is found through manifest.json.
    check_content(unpack_image(archive, image.config_digest, cache_dir=tmp_path / "c2"))


def test_docker_archive_with_symlinked_duplicate_layer(tmp_path: Path, cache: Path) -> None:
    # docker save stores a repeated layer once and links the other path to it.
    layer = layer_tar([F("same", b"same")])
    built = build_docker_archive([layer, layer])
    manifest = json.loads(built.files["manifest.json"])
    first = manifest[0]["Layers"][0]
    manifest[0]["Layers"][1] = "dup/layer.tar"
    built.files["manifest.json"] = json.dumps(manifest).encode()
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in built.files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dup/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = "../" + first
        tar.addfile(link)
    rootfs = unpack_image(archive, built.digest, cache_dir=cache)
    assert (rootfs / "same").read_bytes() == b"same"


def test_pinning_a_config_digest_of_an_oci_layout(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    with pytest.raises(ImageError, match="is not an image manifest or index") as info:
        unpack_image(image, built.config_digest, cache_dir=cache)
    assert info.value.hint is not None and "not of its config" in info.value.hint


def test_platform_index_picks_the_native_manifest(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT], platform_index=True)
    write_dir(image, built.files)
    assert built.digest != built.manifest_digest
    check_content(unpack_image(image, built.digest, cache_dir=cache))
    marker = json.loads((cache / "oci" / built.digest[7:] / "complete").read_text())
    assert marker["manifest"] == built.manifest_digest
    # The manifest inside the index can be pinned directly too.
    check_content(unpack_image(image, built.manifest_digest or "", cache_dir=tmp_path / "c2"))


def test_index_without_native_platform(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT], platform_index=True)
    monkeypatch.setattr(oci, "_native_platform", lambda: ("mips64le", None))
    with pytest.raises(ImageError, match=r"no manifest for linux/mips64le; it has: .*linux/"):
        unpack_image(image, digest, cache_dir=cache)


def test_config_without_diff_ids_is_accepted_for_oci(tmp_path: Path) -> None:
    rootfs = unpack_layers(tmp_path, [CONTENT], with_diff_ids=False)
    check_content(rootfs)


def test_ownership_bits_and_xattrs_are_dropped(tmp_path: Path) -> None:
    entry = F(
        "bin/ping",
        b"x",
        mode=0o4755,
        pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02 \x00\x00\x00"},
    )
    rootfs = unpack_layers(tmp_path, [[entry]])
    assert stat.S_IMODE((rootfs / "bin/ping").stat().st_mode) == 0o755
    assert os.listxattr(rootfs / "bin/ping") == []


def test_select_platform_prefers_the_exact_variant() -> None:
    def desc(arch: str, variant: str | None = None, os_: str = "linux") -> oci._Descriptor:
        platform: dict[str, Any] = {"os": os_, "architecture": arch}
        if variant:
            platform["variant"] = variant
        n = len(arch) + len(variant or "") + len(os_)
        return oci._Descriptor.model_validate(
            {"mediaType": "m", "digest": f"sha256:{n:064x}", "size": 1, "platform": platform}
        )

    v6, v7, plain = desc("arm", "v6"), desc("arm", "v7"), desc("arm")
    windows = desc("amd64", os_="windows")
    assert oci._select_platform([v6, v7, plain], "arm", "v7") is v7
    assert oci._select_platform([v6, plain], "arm", "v7") is plain
    assert oci._select_platform([v6], "arm", "v7") is v6
    assert oci._select_platform([windows], "amd64", None) is None
    assert oci._select_platform([], "amd64", None) is None


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b", ("a", "b")),
        ("/a//b/", ("a", "b")),
        ("./a/./b", ("a", "b")),
        ("", ()),
        ("./", ()),
        ("/", ()),
        ("...", ("...",)),
        ("a/..b", ("a", "..b")),
    ],
)
def test_entry_parts(name: str, parts: tuple[str, ...]) -> None:
    assert oci._entry_parts(name) == parts


@pytest.mark.parametrize("name", ["..", "a/..", "../a", "/../a", "a/../b", "a\0b"])
def test_entry_parts_refuses(name: str) -> None:
    with pytest.raises(oci._UnsafeName):
        oci._entry_parts(name)


# --- caching -----------------------------------------------------------------------------


def test_second_call_is_cached_without_reading_layers(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([BASE, CONTENT])
    write_dir(image, built.files)
    first = unpack_image(image, built.digest, cache_dir=cache)
    for digest in built.layer_digests:
        blob_path(image, digest).unlink()
    assert unpack_image(image, built.digest, cache_dir=cache) == first
    check_content(first)


def test_cached_image_is_still_checked_against_the_source(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    unpack_image(image, digest, cache_dir=cache)
    other = tmp_path / "other"
    make_oci_layout(other, [BASE])
    with pytest.raises(ImageError, match="expected " + digest):
        unpack_image(other, digest, cache_dir=cache)
    blob = blob_path(image, digest)
    blob.write_bytes(blob.read_bytes() + b" ")
    with pytest.raises(ImageError, match="does not match its digest"):
        unpack_image(image, digest, cache_dir=cache)


def count_applies(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[str]:
    applied: list[str] = []
    original = oci._Unpacker.apply

    def spy(self: Any, image: Any, layer: Any, where: str, journal: Any) -> None:
        applied.append(layer.label)
        if delay:
            threading.Event().wait(delay)
        original(self, image, layer, where, journal)

    monkeypatch.setattr(oci._Unpacker, "apply", spy)
    return applied


def test_concurrent_threads_unpack_once(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [BASE, CONTENT])
    applied = count_applies(monkeypatch, delay=0.2)
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(unpack_image(image, digest, cache_dir=cache))
        except BaseException as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1, results
    assert isinstance(results[0], Path)
    assert len(applied) == 2  # two layers, applied by one thread only
    check_content(results[0])


def test_concurrent_processes_unpack_once(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [BASE, CONTENT])
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from buildcell.supply.images import unpack_image\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(message)s')\n"
        "print(unpack_image(Path(sys.argv[1]), sys.argv[2], cache_dir=Path(sys.argv[3])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(image), digest, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len({out for out, _ in outputs}) == 1
    unpackers = [err for _, err in outputs if "applying layer 1/2" in err]
    assert len(unpackers) == 1, outputs


def test_leftovers_of_an_interrupted_unpack_are_removed(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    hexdigest = digest.removeprefix("sha256:")
    stale_tmp = cache / "oci" / f".{hexdigest}.tmp-crashed"
    (stale_tmp / "rootfs" / "locked").mkdir(parents=True)
    (stale_tmp / "rootfs" / "locked").chmod(0)
    (cache / "oci" / hexdigest / "rootfs").mkdir(parents=True)  # no "complete" marker
    rootfs = unpack_image(image, digest, cache_dir=cache)
    check_content(rootfs)
    assert leftovers(cache) == [hexdigest]


def test_remove_tree_never_follows_and_handles_closed_dirs(tmp_path: Path, outside: Path) -> None:
    before = snapshot(outside)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "a" / "to-outside").symlink_to(outside)
    (tree / "a" / "to-file").symlink_to(outside / "file")
    (tree / "a" / "b").chmod(0)
    (tree / "a").chmod(0o500)
    remove_tree(tree)
    assert not os.path.lexists(tree)
    assert snapshot(outside) == before
    remove_tree(tree)  # idempotent


# --- multi-layer semantics ---------------------------------------------------------------


def test_whiteouts_and_replacements(tmp_path: Path) -> None:
    lower = [
        *BASE,
        F("etc/gone", b"x"),
        D("var/"),
        D("var/cache/"),
        F("var/cache/a", b"a"),
        D("var/cache/sub/"),
        F("var/cache/sub/b", b"b"),
        D("opaque/"),
        F("opaque/old", b"old"),
        D("opaque/keepdir/"),
        F("opaque/keepdir/old", b"old"),
        F("file-to-dir", b"f"),
        D("dir-to-file/"),
        F("dir-to-file/x", b"x"),
        D("dir-to-link/"),
        F("dir-to-link/x", b"x"),
        L("link-to-dir", "etc"),
    ]
    upper = [
        F("etc/.wh.gone"),
        F("var/.wh.cache"),
        F("etc/.wh.never-existed"),
        F("nowhere/.wh.thing"),
        F("opaque/new", b"new"),  # before the marker: still kept
        F("opaque/.wh..wh..opq"),
        F("opaque/keepdir/new", b"new"),
        D("file-to-dir/"),
        F("file-to-dir/inside", b"i"),
        F("dir-to-file", b"now a file"),
        L("dir-to-link", "etc"),
        D("link-to-dir/"),
        F(".wh..wh.plnk"),  # aufs bookkeeping: ignored
    ]
    rootfs = unpack_layers(tmp_path, [lower, upper])
    assert not os.path.lexists(rootfs / "etc/gone")
    assert (rootfs / "etc/os-release").exists()
    assert not os.path.lexists(rootfs / "var/cache")
    assert (rootfs / "var").is_dir()
    assert not os.path.lexists(rootfs / "nowhere")
    assert sorted(os.listdir(rootfs / "opaque")) == ["keepdir", "new"]
    assert os.listdir(rootfs / "opaque/keepdir") == ["new"]
    assert (rootfs / "file-to-dir/inside").read_bytes() == b"i"
    assert (rootfs / "dir-to-file").read_bytes() == b"now a file"
    assert os.readlink(rootfs / "dir-to-link") == "etc"
    assert (rootfs / "link-to-dir").is_dir() and not (rootfs / "link-to-dir").is_symlink()
    assert os.listdir(rootfs / "link-to-dir") == []
    assert not os.path.lexists(rootfs / ".wh..wh.plnk")
    assert not any(".wh." in name for _, _, names in os.walk(rootfs) for name in names)


def test_whiteout_of_a_path_this_layer_also_adds(tmp_path: Path) -> None:
    lower = [D("d/"), F("d/old", b"old"), F("f", b"old")]
    upper = [D("d/"), F("d/new", b"new"), F("f", b"new"), F(".wh.d"), F(".wh.f")]
    rootfs = unpack_layers(tmp_path, [lower, upper])
    assert os.listdir(rootfs / "d") == ["new"]
    assert (rootfs / "f").read_bytes() == b"new"


def test_opaque_root(tmp_path: Path) -> None:
    rootfs = unpack_layers(tmp_path, [BASE, [F(".wh..wh..opq"), F("only", b"1")]])
    assert os.listdir(rootfs) == ["only"]


def test_read_only_dir_from_a_lower_layer_can_be_written(tmp_path: Path) -> None:
    lower = [D("ro/", mode=0o500, mtime=1_000), F("ro/a", b"a")]
    upper = [F("ro/b", b"b"), F("ro/.wh.a")]
    rootfs = unpack_layers(tmp_path, [lower, upper])
    assert os.listdir(rootfs / "ro") == ["b"]
    assert stat.S_IMODE((rootfs / "ro").stat().st_mode) == 0o500
    assert (rootfs / "ro").stat().st_mtime == 1_000


def test_implicit_parents_are_created(tmp_path: Path) -> None:
    rootfs = unpack_layers(tmp_path, [[F("a/b/c/file", b"x")]])
    assert (rootfs / "a/b/c/file").read_bytes() == b"x"
    assert stat.S_IMODE((rootfs / "a/b").stat().st_mode) == 0o755


# --- verification failures ---------------------------------------------------------------


def test_wrong_digest_names_expected_and_available(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    wanted = "sha256:" + "1" * 64
    with pytest.raises(ImageError) as info:
        unpack_image(image, wanted, cache_dir=cache)
    message = str(info.value)
    assert f"expected {wanted}, the image has: {digest} (latest)" in message
    assert "\n" not in message
    assert leftovers(cache) == []


def test_wrong_digest_in_a_platform_index_lists_nested_manifests(tmp_path: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT], platform_index=True)
    write_dir(image, built.files)
    with pytest.raises(ImageError) as info:
        unpack_image(image, "sha256:" + "1" * 64, cache_dir=tmp_path / "cache")
    assert built.digest in str(info.value)
    assert f"{built.manifest_digest} (linux/{native_arch()})" in str(info.value)


def test_wrong_digest_in_docker_archive(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    digest = make_docker_archive(archive, [CONTENT])
    with pytest.raises(ImageError, match=f"the image has: {digest}"):
        unpack_image(archive, "sha256:" + "2" * 64, cache_dir=tmp_path / "cache")


def test_tampered_layer_blob(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([BASE, CONTENT])
    write_dir(image, built.files)
    blob = blob_path(image, built.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        unpack_image(image, built.digest, cache_dir=cache)
    message = str(info.value)
    assert f"layer blob {built.layer_digests[1]} does not match its digest" in message
    assert f"expected {built.layer_digests[1]}, got sha256:" in message
    assert leftovers(cache) == []


def test_tampered_uncompressed_layer_with_same_length(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT], compress=False)
    write_dir(image, built.files)
    blob = blob_path(image, built.layer_digests[0])
    blob.write_bytes(blob.read_bytes().replace(b"echo hi", b"echo HI"))
    with pytest.raises(ImageError, match="does not match its digest"):
        unpack_image(image, built.digest, cache_dir=cache)
    assert leftovers(cache) == []


def test_layer_not_matching_diff_id(tmp_path: Path, cache: Path) -> None:
    # The blob digest is right (the manifest was rebuilt), the config's diff_id is not.
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    good_config = built.files["blobs/sha256/" + built.config_digest[7:]]
    config = json.loads(good_config)
    config["rootfs"]["diff_ids"] = ["sha256:" + "3" * 64]
    bad = json.dumps(config).encode()
    files = dict(built.files)
    files["blobs/sha256/" + sha256_digest(bad)[7:]] = bad
    manifest = json.loads(files["blobs/sha256/" + built.digest[7:]])
    manifest["config"].update(digest=sha256_digest(bad), size=len(bad))
    manifest_bytes = json.dumps(manifest).encode()
    files["blobs/sha256/" + sha256_digest(manifest_bytes)[7:]] = manifest_bytes
    write_dir(image, files)
    with pytest.raises(ImageError, match=r"uncompressed layer .* does not match its digest"):
        unpack_image(image, sha256_digest(manifest_bytes), cache_dir=cache)
    assert leftovers(cache) == []


def test_tampered_docker_layer(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "image.tar"
    built = build_docker_archive([CONTENT])
    name = next(n for n in built.files if n.endswith("layer.tar"))
    built.files[name] = built.files[name].replace(b"echo hi", b"echo HI")
    write_tar(archive, built.files)
    with pytest.raises(ImageError, match="does not match its digest"):
        unpack_image(archive, built.digest, cache_dir=cache)
    assert leftovers(cache) == []


def test_tampered_manifest(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    blob = blob_path(image, digest)
    blob.write_bytes(blob.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    with pytest.raises(ImageError, match=f"manifest blob {digest} does not match its digest"):
        unpack_image(image, digest, cache_dir=cache)
    assert leftovers(cache) == []


def test_tampered_config(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    blob = blob_path(image, built.config_digest)
    blob.write_bytes(blob.read_bytes().replace(b"linux", b"LINUX"))
    with pytest.raises(ImageError, match=f"config blob {built.config_digest} does not match"):
        unpack_image(image, built.digest, cache_dir=cache)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("index.json", b"{not json", "index.json is not valid JSON"),
        ("index.json", b'{"schemaVersion": 2}', "index.json is malformed: manifests"),
        ("index.json", b'{"schemaVersion":2,"schemaVersion":2,"manifests":[]}', "duplicate"),
        ("oci-layout", b"[]", "imageLayoutVersion"),
    ],
)
def test_malformed_layout_files(
    tmp_path: Path, cache: Path, name: str, content: bytes, match: str
) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    (image / name).write_bytes(content)
    with pytest.raises(ImageError, match=match):
        unpack_image(image, digest, cache_dir=cache)


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (b"\xff not json", "is not valid JSON"),
        (b'{"schemaVersion": 2, "mediaType": "' + b'application/vnd.oci.image.manifest.v1+json"}',
         "is malformed: config"),
        (b'{"schemaVersion": 1, "mediaType": "application/vnd.oci.image.manifest.v1+json"}',
         "is malformed"),
        (b'{"mediaType": "application/vnd.docker.distribution.manifest.v1+json"}',
         "not an image manifest or index"),
    ],
)  # fmt: skip
def test_malformed_manifest_with_valid_digest(
    tmp_path: Path, cache: Path, manifest: bytes, match: str
) -> None:
    image = tmp_path / "image"
    make_oci_layout(image, [CONTENT])
    digest = sha256_digest(manifest)
    blob_path(image, digest).write_bytes(manifest)
    with pytest.raises(ImageError, match=match):
        unpack_image(image, digest, cache_dir=cache)


def test_unsupported_digest_algorithm_in_manifest(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    manifest = json.loads(built.files["blobs/sha256/" + built.digest[7:]])
    manifest["layers"][0]["digest"] = "sha512:" + "0" * 128
    data = json.dumps(manifest).encode()
    write_dir(image, built.files)
    blob_path(image, sha256_digest(data)).write_bytes(data)
    with pytest.raises(ImageError, match="unsupported digest 'sha512"):
        unpack_image(image, sha256_digest(data), cache_dir=cache)


def test_missing_layer_blob(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([BASE, CONTENT])
    write_dir(image, built.files)
    blob_path(image, built.layer_digests[1]).unlink()
    with pytest.raises(ImageError, match=r"layer 2/2 .* is missing"):
        unpack_image(image, built.digest, cache_dir=cache)
    assert leftovers(cache) == []


def test_missing_manifest_blob_listed_in_index(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    blob_path(image, digest).unlink()
    with pytest.raises(ImageError, match=r"listed in index\.json but missing"):
        unpack_image(image, digest, cache_dir=cache)


def test_missing_config_blob(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    blob_path(image, built.config_digest).unlink()
    with pytest.raises(ImageError, match=f"config blob {built.config_digest} is missing"):
        unpack_image(image, built.digest, cache_dir=cache)


def test_layer_size_differs_from_descriptor(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    with blob_path(image, built.layer_digests[0]).open("ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ImageError, match="descriptor says"):
        unpack_image(image, built.digest, cache_dir=cache)


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "text/plain",
    ],
)
def test_unsupported_layer_media_type(tmp_path: Path, cache: Path, media_type: str) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT], layer_media_type=media_type)
    with pytest.raises(ImageError, match=re.escape(f"unsupported layer media type '{media_type}'")):
        unpack_image(image, digest, cache_dir=cache)


def test_zstd_docker_layer_is_refused(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "image.tar"
    zstd_frame = b"\x28\xb5\x2f\xfd" + b"\0" * 60
    digest = make_docker_archive(archive, [zstd_frame])
    with pytest.raises(ImageError, match="unsupported layer media type"):
        unpack_image(archive, digest, cache_dir=cache)


def test_foreign_layer_types_are_their_base_type(tmp_path: Path) -> None:
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    check_content(unpack_layers(tmp_path, [CONTENT], layer_media_type=foreign))


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("missing", "does not exist"),
        ("empty-dir", "neither index.json nor manifest.json"),
        ("not-a-tar", "cannot read image archive"),
    ],
)
def test_not_an_image(tmp_path: Path, source: str, match: str) -> None:
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "not-a-tar").write_bytes(b"hello" * 300)
    with pytest.raises(ImageError, match=match):
        unpack_image(tmp_path / source, "sha256:" + "0" * 64, cache_dir=tmp_path / "cache")


def test_json_size_limit(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    monkeypatch.setattr(oci, "MAX_JSON_SIZE", 64)
    with pytest.raises(ImageError, match="larger than 64 B"):
        unpack_image(image, digest, cache_dir=cache)


def test_blob_that_is_a_fifo_does_not_hang(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    digest = make_oci_layout(image, [CONTENT])
    (image / "index.json").unlink()
    os.mkfifo(image / "index.json")
    with pytest.raises(ImageError, match="fifo, not a regular file"):
        unpack_image(image, digest, cache_dir=cache)


# --- hostile layers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../escape", "..", "a/b/../../../escape", "/../escape"]
)
def test_dotdot_names_are_refused(tmp_path: Path, outside: Path, name: str) -> None:
    expect_contained(tmp_path, outside, [[F(name, b"pwned")]], match="has a '..' component")
    assert not (tmp_path / "escape").exists()


def test_absolute_names_land_inside(tmp_path: Path, outside: Path) -> None:
    rootfs = expect_contained(
        tmp_path, outside, [[F("/escape", b"in"), F("//etc//x", b"y"), D("/abs/")]]
    )
    assert rootfs is not None
    assert (rootfs / "escape").read_bytes() == b"in"
    assert (rootfs / "etc/x").read_bytes() == b"y"
    assert (rootfs / "abs").is_dir()


@pytest.mark.parametrize("target", ["OUTSIDE", "../../../../outside", "../../../..", "/"])
@pytest.mark.parametrize("same_layer", [True, False])
def test_writes_through_a_symlink_are_refused(
    tmp_path: Path, outside: Path, target: str, same_layer: bool
) -> None:
    target = str(outside) if target == "OUTSIDE" else target
    link = L("evil", target)
    attacks = [F("evil/pwned", b"pwned"), D("evil/newdir/"), F("evil/file", b"overwritten")]
    for attack in attacks:
        layers = [[link, attack]] if same_layer else [[link], [attack]]
        expect_contained(tmp_path, outside, layers, match="which is a symlink")
        shutil.rmtree(tmp_path / "image")
    assert not (tmp_path / "pwned").exists()


def test_symlink_replacing_a_directory_is_not_followed_later(tmp_path: Path, outside: Path) -> None:
    layers = [
        [D("lib/"), F("lib/a", b"a")],
        [L("lib", str(outside))],
        [F("lib/pwned", b"pwned")],
    ]
    expect_contained(tmp_path, outside, layers, match="'lib', which is a symlink")


def test_whiteout_through_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    layers = [[L("evil", str(outside))], [F("evil/.wh.file"), F("evil/.wh..wh..opq")]]
    expect_contained(tmp_path, outside, layers, match="which is a symlink")


def test_replacing_a_symlink_replaces_the_link_not_its_target(
    tmp_path: Path, outside: Path
) -> None:
    layers = [[L("evil", str(outside / "file"))], [F("evil", b"new"), F(".wh.evil")]]
    rootfs = expect_contained(tmp_path, outside, layers)
    assert rootfs is not None
    assert (rootfs / "evil").read_bytes() == b"new"


@pytest.mark.parametrize(
    "target",
    [
        "/etc/passwd",
        "../../outside/file",
        "OUTSIDE/file",
        "to-outside/file",
        "abs-link",
        "rel-link",
        "missing",
        "dir",
        "fifo",
        "self",
        "",
    ],
)
def test_hard_links_are_only_made_to_files_inside(
    tmp_path: Path, outside: Path, target: str
) -> None:
    target = str(outside) + "/file" if target == "OUTSIDE/file" else target
    layer = [
        L("to-outside", str(outside)),
        L("abs-link", str(outside / "file")),
        L("rel-link", "../outside/file"),
        D("dir/"),
        TarEntry("fifo", "fifo"),
        H("self", "self"),
        H("link", target),
    ]
    rootfs = expect_contained(tmp_path, outside, [layer])
    assert rootfs is not None
    assert not os.path.lexists(rootfs / "link")
    assert (outside / "file").stat().st_nlink == 1


def test_hard_link_to_etc_passwd_links_the_image_s_own_file(tmp_path: Path, outside: Path) -> None:
    layer = [D("etc/"), F("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), H("copy", "/etc/passwd")]
    rootfs = expect_contained(tmp_path, outside, [layer])
    assert rootfs is not None
    assert (rootfs / "copy").read_bytes() == b"root:x:0:0::/:/bin/sh\n"
    assert (rootfs / "copy").stat().st_ino == (rootfs / "etc/passwd").stat().st_ino


def test_hard_link_to_a_file_of_a_lower_layer(tmp_path: Path, outside: Path) -> None:
    rootfs = expect_contained(tmp_path, outside, [[F("a", b"a")], [H("b", "a")]])
    assert rootfs is not None
    assert (rootfs / "b").stat().st_ino == (rootfs / "a").stat().st_ino


def test_hard_link_replacing_its_own_parent_is_skipped(tmp_path: Path, outside: Path) -> None:
    rootfs = expect_contained(tmp_path, outside, [[D("d/"), F("d/f", b"f"), H("d", "d/f")]])
    assert rootfs is not None
    assert (rootfs / "d/f").read_bytes() == b"f"


def test_devices_and_fifos_are_skipped(tmp_path: Path, outside: Path) -> None:
    layer = [
        D("dev/"),
        TarEntry("dev/null", "char"),
        TarEntry("dev/sda", "block"),
        TarEntry("run-fifo", "fifo"),
        F("kept", b"k"),
    ]
    rootfs = expect_contained(tmp_path, outside, [layer])
    assert rootfs is not None
    assert os.listdir(rootfs / "dev") == []
    assert not os.path.lexists(rootfs / "run-fifo")
    marker = json.loads((rootfs.parent / "complete").read_text())
    assert marker["skipped"] == {"devices": 2, "fifos": 1}


def test_name_with_nul_is_refused(tmp_path: Path, outside: Path) -> None:
    expect_contained(tmp_path, outside, [[F("a\0b", b"x")]], match="NUL")


def test_invalid_whiteouts_are_refused(tmp_path: Path, outside: Path) -> None:
    expect_contained(tmp_path, outside, [[F("a/.wh..."), F("x")]], match="invalid whiteout")
    expect_contained(tmp_path, outside, [[F("a/.wh.")]], match="invalid whiteout")


def test_truncated_file_is_an_error_not_a_hang(tmp_path: Path, outside: Path) -> None:
    huge = F("big", b"only a little", size=1 << 30)
    expect_contained(tmp_path, outside, [[F("a", b"a"), huge]], match="unexpected end of data")


@pytest.mark.parametrize("name", [".wh.x", "a/.wh..wh..opq", "./"])
def test_entries_that_are_not_files_cannot_claim_data(
    tmp_path: Path, outside: Path, name: str
) -> None:
    """Regression (found by make stress): a whiteout or the root claiming 1 TiB of data made
    tarfile skip that much of a tiny stream, for minutes. Refused at once now."""
    hostile = F(name, b"", size=1 << 40)
    expect_contained(tmp_path, outside, [[F("a/keep", b"k"), hostile]], match="but is not a file")


@pytest.mark.parametrize("first", [True, False])
def test_a_header_tarfile_cannot_parse_is_a_malformed_layer(
    tmp_path: Path, outside: Path, first: bool
) -> None:
    """Regression (found by make stress): a GNU sparse 1.0 map without its newline made
    tarfile raise ValueError, which escaped as a crash instead of a clean error. As the
    first entry it fails while the tar is opened, later while it is read."""
    sparse = F("f", b"abc", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
    layer = [sparse] if first else [F("a/keep", b"k"), sparse]
    expect_contained(tmp_path, outside, [layer], match="malformed entry header")


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("cut", [512, 600, 1024])
def test_an_old_gnu_sparse_header_cut_before_its_extension_block(
    tmp_path: Path, outside: Path, first: bool, cut: int
) -> None:
    """Regression: a type S header announcing an extension block, at the end of the
    stream, made tarfile raise IndexError, which escaped as a crash."""
    entry = sparse("f", MiB, [(0, b"x")], fmt="gnu", sparse_map=[(n * 10, 1) for n in range(30)])
    cut_off = entry.tobuf()[:cut]
    layer = cut_off if first else layer_tar([F("a/keep", b"k")])[:-1024] + cut_off
    expect_contained(tmp_path, outside, [layer], match="malformed entry header")


def test_an_image_archive_member_tarfile_cannot_parse_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("index.json")
        info.size = 3
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ImageError, match="malformed entry header"):
        unpack_image(archive, "sha256:" + "0" * 64, cache_dir=tmp_path / "cache")


def test_declared_size_over_the_limit(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oci, "MAX_UNPACKED_SIZE", 1 << 20)
    huge = F("big", b"x" * 100, size=10 << 30)
    expect_contained(
        tmp_path,
        outside,
        [[huge]],
        match="does not fit in the unpack budget of 1.0 MiB: layer 1/1 (sha256:",
    )


def test_total_size_limit_spans_layers(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oci, "MAX_UNPACKED_SIZE", 1 << 20)
    layer = [F("f", b"\0" * (600 << 10))]
    expect_contained(
        tmp_path,
        outside,
        [layer, layer],
        match="does not fit in the unpack budget of 1.0 MiB: layer 2/2",
    )


def test_gzip_bomb_is_bounded(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oci, "MAX_UNPACKED_SIZE", 4 << 20)
    # A valid tar followed by 64 MiB of zeros: tiny compressed, big uncompressed.
    bomb = layer_tar([F("a", b"a")]) + b"\0" * (64 << 20)
    expect_contained(
        tmp_path, outside, [bomb], match="the uncompressed layer streams hold more than"
    )


def test_huge_pax_header_is_refused(tmp_path: Path, outside: Path) -> None:
    entry = F("a", b"a", pax={"comment": "x" * (2 << 20)})
    expect_contained(tmp_path, outside, [[entry]], match="tar header is larger than")


def test_entry_count_limit(tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci, "MAX_ENTRIES", 5)
    layer = [F(f"f{i}", b"") for i in range(6)]
    expect_contained(tmp_path, outside, [layer], match="more than 5 entries")


def test_depth_limit(tmp_path: Path, outside: Path) -> None:
    deep = "/".join(["d"] * 300) + "/f"
    expect_contained(tmp_path, outside, [[F(deep, b"x")]], match="nested too deep")


def test_overlong_name_component(tmp_path: Path, outside: Path) -> None:
    expect_contained(tmp_path, outside, [[F("x" * 300, b"x")]], match="cannot unpack")


def test_empty_layer_blob_is_an_error(tmp_path: Path, outside: Path) -> None:
    expect_contained(tmp_path, outside, [b""], match="not a valid")


def test_all_zero_layer_is_empty(tmp_path: Path, outside: Path) -> None:
    rootfs = expect_contained(tmp_path, outside, [BASE, b"\0" * 1024])
    assert rootfs is not None
    assert (rootfs / "etc/os-release").exists()


def test_symlinked_image_blob_is_not_followed(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    blob = blob_path(image, built.layer_digests[0])
    moved = tmp_path / "moved"
    blob.rename(moved)
    blob.symlink_to(moved)
    with pytest.raises(ImageError, match=r"is a symlink to .*, outside the root"):
        unpack_image(image, built.digest, cache_dir=cache)


# --- sparse members and the unpack budget ------------------------------------------------

SPARSE_FORMATS: list[SparseFormat] = ["gnu", "pax0.0", "pax0.1", "pax1.0"]
LONG = "deep/" + "long-name-" * 14 + "end"  # over the 100 bytes of a ustar name
MiB = 1 << 20
GiB = 1 << 30


def sparse(name: str, realsize: int, chunks: Any = ((0, b"head"),), **kw: Any) -> SparseEntry:
    return SparseEntry(name, realsize, tuple(chunks), **kw)


def disk_use(path: Path) -> tuple[int, int]:
    """(st_blocks in bytes, st_size) summed over the files below ``path``, each inode once
    (hard links share theirs), lock files left out (they are empty and outlive every
    unpack)."""
    blocks = sizes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            if name.endswith(".lock") or (st_.st_dev, st_.st_ino) in seen:
                continue
            seen.add((st_.st_dev, st_.st_ino))
            blocks += st_.st_blocks * 512
            sizes += st_.st_size
    return blocks, sizes


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_tarfile_gives_sparse_members_their_expanded_size(fmt: SparseFormat) -> None:
    """What the budget is charged rests on this: TarInfo.size is the real size."""
    entry = sparse("f", 600 * MiB, [(0, b"a"), (MiB, b"b")], fmt=fmt)
    with tarfile.open(fileobj=io.BytesIO(layer_tar([entry]))) as tar:
        member = tar.next()
        assert member is not None and member.isreg()
        assert member.size == 600 * MiB
        pieces: Any = member.sparse  # typeshed says bytes; it is a list of pairs
        assert [p for p in pieces if p[1]] == [(0, 1), (MiB, 1)]


LONG_NAME_WAYS = [
    ("gnu", "gnu"),
    ("pax0.0", "gnu"),
    ("pax0.0", "path"),
    ("pax0.1", "gnu"),
    ("pax0.1", "path"),
    ("pax0.1", "sparse-name"),
    ("pax1.0", "gnu"),
    ("pax1.0", "path"),
    ("pax1.0", "sparse-name"),
]


@pytest.mark.parametrize(("fmt", "long_name"), LONG_NAME_WAYS)
def test_sparse_member_is_written_sparse_under_its_long_name(
    tmp_path: Path, fmt: SparseFormat, long_name: Any
) -> None:
    realsize = 64 * MiB
    chunks = [(0, b"head"), (8 * MiB, b"middle" * 1000), (realsize - 5, b"tail!")]
    entry = sparse(LONG, realsize, chunks, fmt=fmt, long_name=long_name, mode=0o4777)
    rootfs = unpack_layers(tmp_path, [[entry]])
    path = rootfs / LONG
    info = path.stat()
    assert info.st_size == realsize
    assert stat.S_IMODE(info.st_mode) == 0o755
    with path.open("rb") as f:
        for offset, data in chunks:
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(4 * MiB)
        assert f.read(4096) == b"\0" * 4096
    assert info.st_blocks * 512 < MiB  # the holes were not written
    assert os.listdir(rootfs) == ["deep"]
    marker = json.loads((rootfs.parent / "complete").read_text())
    assert (marker["sparse"], marker["files"], marker["bytes"]) == (1, 1, realsize)
    assert marker["charged"] >= realsize


GNU_TAR = shutil.which("tar")
_GNU_TAR_OK = (
    GNU_TAR is not None
    and "GNU tar"
    in subprocess.run([GNU_TAR, "--version"], capture_output=True, text=True, check=False).stdout
)


@pytest.mark.skipif(not _GNU_TAR_OK, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_gnu_tar_s_sparse_archives_unpack_like_the_hand_made_ones(
    tmp_path: Path, fmt: SparseFormat
) -> None:
    """The hand-made headers are the formats GNU tar writes, long names included."""
    realsize = 3 * MiB
    chunks = [(0, b"A" * 4096), (MiB, b"B" * 4096)]
    src = tmp_path / "src"
    (src / LONG).parent.mkdir(parents=True)
    fd = os.open(src / LONG, os.O_WRONLY | os.O_CREAT, 0o644)
    for offset, data in chunks:
        os.pwrite(fd, data, offset)
    os.ftruncate(fd, realsize)
    os.close(fd)
    args = (
        ["--format=oldgnu"] if fmt == "gnu" else ["--format=posix", f"--sparse-version={fmt[3:]}"]
    )
    assert GNU_TAR is not None
    made_by_tar = subprocess.run(
        [GNU_TAR, "-c", "--sparse", *args, "--mtime=@1600000000", "-f", "-", "-C", str(src), LONG],
        capture_output=True,
        check=True,
    ).stdout
    hand_made = layer_tar([sparse(LONG, realsize, chunks, fmt=fmt)])
    trees = []
    for n, layer in enumerate([made_by_tar, hand_made]):
        rootfs = unpack_layers(tmp_path / str(n), [layer])
        path = rootfs / LONG
        assert path.stat().st_size == realsize
        assert path.stat().st_blocks * 512 <= 64 << 10
        trees.append((sorted(os.listdir(rootfs / "deep")), path.read_bytes()))
    assert trees[0] == trees[1]
    assert trees[0][1] == (src / LONG).read_bytes()


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_sparse_members_are_charged_their_real_size(tmp_path: Path, fmt: SparseFormat) -> None:
    """The issue's attack: three 600 MiB sparse members in a blob of a few hundred bytes
    wrote 1.8 GiB of zeros under a 1 GiB cap. Now the second one is refused before it is
    written, in one line naming the image, the member and the budget."""
    image = tmp_path / "image"
    built = build_oci_layout([[sparse(f"f{i}", 600 * MiB, fmt=fmt) for i in range(3)]])
    write_dir(image, built.files)
    assert len(built.files["blobs/sha256/" + built.layer_digests[0][7:]]) < 2048
    cache = tmp_path / "cache"
    with pytest.raises(ImageError) as info:
        unpack_image(image, built.digest, cache_dir=cache, budget=UnpackBudget(GiB))
    message = str(info.value)
    assert "\n" not in message and info.value.hint is None
    assert f"image {image}@{built.digest} does not fit in the unpack budget of 1.0 GiB" in message
    assert "sparse file 'f1' needs 600.0 MiB" in message
    assert info.value.exit_code == 125
    assert leftovers(cache) == []
    assert disk_use(cache / "oci") == (0, 0)  # no byte written beyond the budget


def test_a_budget_just_large_enough(tmp_path: Path) -> None:
    layers: list[Any] = [
        [
            D("d/"),
            sparse("d/a", 300 * MiB, [(0, b"a" * 5000), (100 * MiB, b"b")], fmt="gnu"),
            F("d/plain", os.urandom(10_000)),
            L("d/link", "a"),
            H("d/hard", "d/a"),
            F("implicit/parents/file", b"x"),
        ],
        [sparse("e", 100 * MiB, fmt="pax1.0"), sparse(LONG, 5 * MiB, fmt="pax0.1")],
    ]
    image = tmp_path / "image"
    digest = make_oci_layout(image, layers)
    roomy = UnpackBudget(1 << 40)
    unpack_image(image, digest, cache_dir=tmp_path / "c0", budget=roomy)
    cost = roomy.used
    marker = json.loads((tmp_path / "c0/oci" / digest[7:] / "complete").read_text())
    assert marker["charged"] == cost == roomy.images[digest]
    assert marker["bytes"] == 300 * MiB + 10_000 + 1 + 100 * MiB + 5 * MiB

    exact = UnpackBudget(cost)
    rootfs = unpack_image(image, digest, cache_dir=tmp_path / "c1", budget=exact)
    assert exact.remaining == 0
    blocks, sizes = disk_use(rootfs)
    assert blocks <= cost and sizes <= cost
    assert (rootfs / "d/hard").stat().st_ino == (rootfs / "d/a").stat().st_ino

    with pytest.raises(ImageError, match="does not fit in the unpack budget"):
        unpack_image(image, digest, cache_dir=tmp_path / "c2", budget=UnpackBudget(cost - 1))
    assert leftovers(tmp_path / "c2") == []
    assert disk_use(tmp_path / "c2" / "oci") == (0, 0)


def test_what_an_entry_costs(tmp_path: Path) -> None:
    """One 4 KiB block per entry made (the root, directories made on the way, links) and a
    file's real size in whole blocks; a hard link to a sparse file costs one block."""
    layer = [sparse("big", 512 * MiB + 1, fmt="pax0.0"), H("again", "big"), H("third", "big")]
    layer += [F("a/b/small", b"x"), L("link", "/etc"), D("a/")]  # "a" exists: free
    budget = UnpackBudget(1 << 40)
    unpack_layers(tmp_path, [layer], budget=budget)
    block = 4096
    expected = block  # the root
    expected += block + 512 * MiB + block  # big, rounded up to whole blocks
    expected += 2 * block  # two hard links
    expected += 2 * block + 2 * block  # a/, a/b/ made on the way; small and its block
    expected += block  # the symlink
    assert budget.used == expected


@pytest.mark.parametrize(
    ("fmts", "sparse_map", "match"),
    [
        (SPARSE_FORMATS, [(0, 4), (2, 4)], "overlapping or unordered pieces"),
        (SPARSE_FORMATS, [(100, 4), (0, 4)], "overlapping or unordered pieces"),
        (SPARSE_FORMATS, [(0, 4), (MiB, 4)], "past its size of 1048576"),
        (SPARSE_FORMATS, [(1 << 62, 4)], "past its size"),
        (SPARSE_FORMATS, [(0, 4096)], "maps 4096 bytes of data but stores only 512"),
        (["gnu", "pax0.1", "pax1.0"], [(-4096, 4)], "negative offset or size"),
        (["gnu", "pax0.1", "pax1.0"], [(0, -4)], "negative offset or size"),
    ],
)
def test_hostile_sparse_maps_are_refused(
    tmp_path: Path, outside: Path, fmts: list[SparseFormat], sparse_map: Any, match: str
) -> None:
    for fmt in fmts:
        entry = sparse("f", MiB, [(0, b"data")], fmt=fmt, sparse_map=sparse_map)
        expect_contained(tmp_path, outside, [[F("keep", b"k"), entry]], match=match)
        shutil.rmtree(tmp_path / "image")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (F("f", b"", pax={"size": "-1"}), "declares a negative size (-1)"),
        (sparse("f", -5, (), fmt="pax1.0"), "declares a negative size (-5)"),
        (sparse("f", 10**30, (), fmt="pax0.1"), "does not fit in the unpack budget"),
        (sparse("f", 10**30, (), fmt="pax0.0"), "does not fit in the unpack budget"),
        (sparse("f", (1 << 88) - 1, (), fmt="gnu"), "does not fit in the unpack budget"),
        (F("f", b"", pax={"size": "9" * 40}), "does not fit in the unpack budget"),
        (sparse("f", 4096, (), fmt="pax1.0", long_name="sparse-name",
                records=[("GNU.sparse.name", "../escape")]), "has a '..' component"),
    ],
)  # fmt: skip
def test_absurd_sizes_and_names_in_headers(
    tmp_path: Path, outside: Path, entry: Any, match: str
) -> None:
    expect_contained(tmp_path, outside, [[F("keep", b"k"), entry]], match=match)
    assert not (tmp_path / "escape").exists()


_gaps = st.sampled_from([0, 1, 100, 4096, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 3 * MiB])
_sizes = st.sampled_from([1, 7, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.lists(st.tuples(_gaps, _sizes), max_size=12), tail=st.sampled_from([0, 5, MiB]))
def test_sparse_pieces_land_where_the_map_says(layout: list[tuple[int, int]], tail: int) -> None:
    """Pieces written together (small holes as zeros) or apart give the same file."""
    pieces, at = [], 0
    for gap, size in layout:
        pieces.append((at + gap, size))
        at += gap + size
    data = os.urandom(sum(size for _, size in pieces))
    with tempfile.TemporaryFile() as f:
        oci._write_pieces(io.BufferedReader(io.BytesIO(data)), f.fileno(), pieces)
        os.ftruncate(f.fileno(), at + tail)
        f.seek(0)
        got = f.read()
    want, used = bytearray(at + tail), 0
    for offset, size in pieces:
        want[offset : offset + size] = data[used : used + size]
        used += size
    assert got == bytes(want)


@pytest.mark.parametrize("fmt", ["gnu", "pax0.1", "pax1.0"])
def test_a_map_of_many_tiny_pieces(tmp_path: Path, fmt: SparseFormat) -> None:
    count = 30_000
    pieces = [(n * 3, 1) for n in range(count)]
    data = bytes(n % 251 + 1 for n in range(count))
    entry = sparse("f", 3 * count, [(0, data)], fmt=fmt, sparse_map=pieces)
    started = time.monotonic()
    rootfs = unpack_layers(tmp_path, [[entry]])
    assert time.monotonic() - started < 10
    content = (rootfs / "f").read_bytes()
    assert content[::3] == data and content.count(0) == 2 * count


def test_thousands_of_tiny_sparse_members_are_bounded(tmp_path: Path, outside: Path) -> None:
    members = [sparse(f"d/f{i}", MiB, (), fmt=SPARSE_FORMATS[i % 4]) for i in range(4000)]
    image = tmp_path / "image"
    digest = make_oci_layout(image, [members])
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"does not fit in the unpack budget of 512\.0 MiB"):
        unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=UnpackBudget(512 * MiB))
    assert time.monotonic() - started < 60
    assert leftovers(tmp_path / "cache") == []


def test_a_member_repeated_in_layers_is_charged_each_time(tmp_path: Path) -> None:
    """Whiteouts and replacements never give budget back, so repeating a member cannot
    write more than the budget over the layers."""
    big = sparse("f", 300 * MiB)
    layers: list[Any] = [[big], [F(".wh.f")], [big], [big, big], [F(".wh.f"), big]]
    with pytest.raises(ImageError, match=r"layer 4/5 .*: sparse file 'f' needs 300.0 MiB"):
        unpack_layers(tmp_path, layers, budget=UnpackBudget(GiB))
    assert leftovers(tmp_path / "cache") == []
    budget = UnpackBudget(2 * GiB)
    shutil.rmtree(tmp_path / "image")
    rootfs = unpack_layers(tmp_path, layers, budget=budget)
    assert budget.used > 5 * 300 * MiB
    assert (rootfs / "f").stat().st_size == 300 * MiB


@pytest.mark.parametrize("opaque", [False, True])
def test_whiteout_of_a_sparse_file(tmp_path: Path, opaque: bool) -> None:
    lower = [D("d/"), sparse("d/f", 100 * MiB, fmt="pax0.1"), F("d/keep", b"k")]
    upper = [F("d/.wh..wh..opq")] if opaque else [F("d/.wh.f")]
    rootfs = unpack_layers(tmp_path, [lower, upper])
    assert not os.path.lexists(rootfs / "d/f")
    assert os.listdir(rootfs / "d") == ([] if opaque else ["keep"])


def test_budget_running_out_in_layer_2_publishes_nothing(tmp_path: Path) -> None:
    layers = [
        [F("a", os.urandom(50_000))],
        [F("b1", os.urandom(50_000)), sparse("b2", 10 * MiB), F("b3", b"never")],
    ]
    with pytest.raises(ImageError, match=r"layer 2/2 .*: sparse file 'b2' needs 10.0 MiB"):
        unpack_layers(tmp_path, layers, budget=UnpackBudget(2 * MiB))
    # The lock outlives the unpack; no directory, temporary or final, is left.
    left = os.listdir(tmp_path / "cache" / "oci")
    assert len(left) == 1 and left[0].endswith(".lock")
    assert disk_use(tmp_path / "cache" / "oci") == (0, 0)


def test_gzip_bomb_is_read_only_as_far_as_the_budget(tmp_path: Path, outside: Path) -> None:
    bomb = layer_tar([F("a", b"a")]) + b"\0" * (256 * MiB)
    image = tmp_path / "image"
    digest = make_oci_layout(image, [bomb])
    assert os.path.getsize(blob_path(image, build_oci_layout([bomb]).layer_digests[0])) < MiB
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"uncompressed layer streams hold more than the 8\.0 MiB"):
        unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=UnpackBudget(8 * MiB))
    assert time.monotonic() - started < 10


def test_an_image_costs_at_least_its_layer_streams(tmp_path: Path) -> None:
    """Padding costs the work of reading it: an image of little but zeros (inside the
    stream allowance) pays for them, so many such images cannot make a build read without
    bound."""
    padded = layer_tar([F("a", b"a")]) + b"\0" * (3 * MiB)
    budget = UnpackBudget(8 * MiB)
    unpack_layers(tmp_path, [padded], budget=budget)
    assert budget.used >= 3 * MiB


# --- the budget across the images of a build ----------------------------------------------


def sparse_image(directory: Path, size: int, tag: str) -> str:
    return make_oci_layout(directory, [[F("tag", tag.encode()), sparse("big", size)]])


def test_one_budget_is_shared_by_the_images_of_a_build(tmp_path: Path) -> None:
    first = sparse_image(tmp_path / "one", 300 * MiB, "one")
    second = sparse_image(tmp_path / "two", 300 * MiB, "two")
    budget = UnpackBudget(500 * MiB)
    unpack_image(tmp_path / "one", first, cache_dir=tmp_path / "cache", budget=budget, label="a")
    with pytest.raises(ImageError) as info:
        unpack_image(
            tmp_path / "two", second, cache_dir=tmp_path / "cache", budget=budget, label="b"
        )
    assert str(info.value).startswith(f"image b@{second} does not fit in the unpack budget")
    assert list(budget.images) == [first]
    assert leftovers(tmp_path / "cache") == [first[7:]]


def test_a_cached_image_is_charged_what_its_unpack_cost(tmp_path: Path) -> None:
    digest = sparse_image(tmp_path / "img", 300 * MiB, "x")
    cache = tmp_path / "cache"
    first = UnpackBudget(GiB)
    unpack_image(tmp_path / "img", digest, cache_dir=cache, budget=first)
    cost = first.used
    with pytest.raises(ImageError) as info:
        unpack_image(tmp_path / "img", digest, cache_dir=cache, budget=UnpackBudget(cost - 1))
    assert "the cached image takes 300." in str(info.value)
    again = UnpackBudget(cost)
    unpack_image(tmp_path / "img", digest, cache_dir=cache, budget=again)
    assert again.used == cost
    # Asked for twice in one build, an image is paid for once.
    unpack_image(tmp_path / "img", digest, cache_dir=cache, budget=again)
    assert again.used == cost and again.images == {digest: cost}


def test_many_cached_images_are_bounded_by_one_budget(tmp_path: Path) -> None:
    """The issue's other half: nothing bounded how many images one build brings in."""
    cache = tmp_path / "cache"
    digests = []
    for n in range(20):
        digest = sparse_image(tmp_path / f"i{n}", GiB, str(n))
        unpack_image(tmp_path / f"i{n}", digest, cache_dir=cache)  # each alone: fits
        digests.append(digest)
    budget = UnpackBudget(8 * GiB)
    refused: dict[int, str] = {}
    for n, digest in enumerate(digests):
        try:
            unpack_image(tmp_path / f"i{n}", digest, cache_dir=cache, budget=budget)
        except ImageError as e:
            refused[n] = str(e)
    assert list(refused) == list(range(7, 20))
    assert all("the cached image takes 1.0 GiB" in message for message in refused.values())
    assert len(budget.images) == 7 and budget.used <= budget.limit


def test_budget_is_thread_safe(tmp_path: Path) -> None:
    digests = [sparse_image(tmp_path / f"i{n}", 100 * MiB, str(n)) for n in range(8)]
    budget = UnpackBudget(450 * MiB)
    outcomes: list[str] = []

    def worker(n: int) -> None:
        try:
            unpack_image(tmp_path / f"i{n}", digests[n], cache_dir=tmp_path / "c", budget=budget)
            outcomes.append("ok")
        except ImageError:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 4 and budget.used <= budget.limit
    assert len(budget.images) == 4


@pytest.mark.parametrize("limit", [-1, 1.5, "1G", True])
def test_budget_limit_must_be_bytes(limit: Any) -> None:
    with pytest.raises(ConfigError, match="invalid image unpack budget"):
        UnpackBudget(limit)


def test_an_unpack_by_an_older_version_is_done_again(tmp_path: Path, cache: Path) -> None:
    """Trees from before the marker recorded a cost (and before modes were masked) are not
    reused: one may hold a world-writable directory another user has written into."""
    image = tmp_path / "image"
    digest = make_oci_layout(image, [[D("ww/", mode=0o777), F("ww/f", b"f")]])
    rootfs = unpack_image(image, digest, cache_dir=cache)
    marker = rootfs.parent / "complete"
    old = json.loads(marker.read_text())
    del old["version"], old["charged"]
    marker.write_text(json.dumps(old))
    (rootfs / "ww").chmod(0o777)
    (rootfs / "ww" / "planted").write_text("by another user")
    rootfs = unpack_image(image, digest, cache_dir=cache)
    assert not (rootfs / "ww" / "planted").exists()
    assert stat.S_IMODE((rootfs / "ww").stat().st_mode) == 0o755
    assert json.loads(marker.read_text())["version"] == 4


# --- the source, opened confined ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["layout", "oci-archive", "docker-archive"])
def test_image_from_a_descriptor(tmp_path: Path, cache: Path, kind: str) -> None:
    path = tmp_path / ("image" if kind == "layout" else "image.tar")
    if kind == "layout":
        digest = make_oci_layout(path, [CONTENT])
    elif kind == "oci-archive":
        digest = make_oci_archive(path, [CONTENT])
    else:
        digest = make_docker_archive(path, [CONTENT])
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        check_content(unpack_image(fd, digest, cache_dir=cache, label="images/x"))
        os.fstat(fd)  # still the caller's, still open
        with pytest.raises(ImageError, match=r"^image digest mismatch"):
            unpack_image(fd, "sha256:" + "1" * 64, cache_dir=cache, label="images/x")
    finally:
        os.close(fd)


def test_the_label_names_the_image(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image"
    built = build_oci_layout([BASE, CONTENT])
    write_dir(image, built.files)
    blob_path(image, built.layer_digests[1]).unlink()
    with pytest.raises(ImageError, match=r"layer 2/2 .* is missing from image images/debian$"):
        unpack_image(image, built.digest, cache_dir=cache, label="images/debian")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "socket-like"])
def test_a_descriptor_of_neither_directory_nor_file_is_refused(
    tmp_path: Path, cache: Path, kind: str
) -> None:
    target = tmp_path / "thing"
    if kind == "symlink":
        target.symlink_to(tmp_path)
        fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    elif kind == "fifo":
        os.mkfifo(target)
        fd = os.open(target, os.O_PATH | os.O_CLOEXEC)
    else:
        fd = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(ImageError, match="not a directory or archive"):
            unpack_image(fd, "sha256:" + "0" * 64, cache_dir=cache, label="images/x")
    finally:
        os.close(fd)


def _layout(tmp_path: Path) -> tuple[Path, Any]:
    image = tmp_path / "image"
    built = build_oci_layout([CONTENT])
    write_dir(image, built.files)
    return image, built


@pytest.mark.parametrize(
    "attack",
    [
        "blobs -> /",
        "blobs -> a copy outside",
        "index.json -> /proc/self/environ",
        "oci-layout -> /etc/os-release",
        "layer blob -> /etc/shadow",
        "manifest blob -> ../../../outside",
        "blobs/sha256 -> ../..",
    ],
)
@pytest.mark.parametrize("as_fd", [False, True], ids=["path", "fd"])
def test_layout_symlinks_out_of_the_image_are_refused(
    tmp_path: Path, cache: Path, attack: str, as_fd: bool
) -> None:
    image, built = _layout(tmp_path)
    layer = blob_path(image, built.layer_digests[0])
    if attack == "blobs -> /":
        shutil.rmtree(image / "blobs")
        (image / "blobs").symlink_to("/")
    elif attack == "blobs -> a copy outside":
        (image / "blobs").rename(tmp_path / "copy")
        (image / "blobs").symlink_to(tmp_path / "copy")  # the right content, but outside
    elif attack == "index.json -> /proc/self/environ":
        (image / "index.json").unlink()
        (image / "index.json").symlink_to("/proc/self/environ")
    elif attack == "oci-layout -> /etc/os-release":
        (image / "oci-layout").unlink()
        (image / "oci-layout").symlink_to("/etc/os-release")
    elif attack == "layer blob -> /etc/shadow":
        layer.unlink()
        layer.symlink_to("/etc/shadow")
    elif attack == "manifest blob -> ../../../outside":
        manifest = blob_path(image, built.digest)
        manifest.rename(tmp_path / "outside-manifest")
        manifest.symlink_to("../../../outside-manifest")
    else:
        shutil.rmtree(image / "blobs" / "sha256")
        (image / "blobs" / "sha256").symlink_to("../..")
    fd = os.open(image, os.O_PATH | os.O_CLOEXEC) if as_fd else None
    try:
        with pytest.raises(ImageError) as info:
            unpack_image(image if fd is None else fd, built.digest, cache_dir=cache)
    finally:
        if fd is not None:
            os.close(fd)
    message = str(info.value)
    assert "\n" not in message
    assert re.search("outside the root|leads above the root|not a regular file", message), message
    assert leftovers(cache) == []


def test_symlinks_inside_the_layout_are_followed(tmp_path: Path, cache: Path) -> None:
    image, built = _layout(tmp_path)
    layer = blob_path(image, built.layer_digests[0])
    (image / "store").mkdir()
    layer.rename(image / "store" / "layer")
    layer.symlink_to("../../store/layer")
    check_content(unpack_image(image, built.digest, cache_dir=cache))


def test_a_hard_linked_blob_is_refused_from_a_repository_descriptor(
    tmp_path: Path, cache: Path
) -> None:
    image, built = _layout(tmp_path)
    layer = blob_path(image, built.layer_digests[0])
    os.link(layer, tmp_path / "elsewhere")
    fd = os.open(image, os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(ImageError, match="is a hard link"):
            unpack_image(fd, built.digest, cache_dir=cache)
    finally:
        os.close(fd)
    # A path the operator gave is the operator's own: links there are theirs to make.
    check_content(unpack_image(image, built.digest, cache_dir=cache))


def test_a_hard_linked_archive_is_refused_from_a_repository_descriptor(
    tmp_path: Path, cache: Path
) -> None:
    archive = tmp_path / "image.tar"
    digest = make_oci_archive(archive, [CONTENT])
    os.link(archive, tmp_path / "elsewhere.tar")
    fd = os.open(archive, os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(ImageError, match="is a hard link"):
            unpack_image(fd, digest, cache_dir=cache, label="image.tar")
    finally:
        os.close(fd)
    check_content(unpack_image(archive, digest, cache_dir=cache))


def test_a_blob_that_is_a_directory(tmp_path: Path, cache: Path) -> None:
    image, built = _layout(tmp_path)
    layer = blob_path(image, built.layer_digests[0])
    layer.unlink()
    layer.mkdir()
    with pytest.raises(ImageError, match="is a directory, not a regular file"):
        unpack_image(image, built.digest, cache_dir=cache)


# --- the cache's own directories ----------------------------------------------------------


def test_cache_directories_writable_by_others_are_fixed(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (cache / "oci").mkdir(parents=True)
    os.chmod(cache / "oci", 0o777)
    image = tmp_path / "image"
    digest = make_oci_layout(image, [BASE])
    unpack_image(image, digest, cache_dir=cache)
    assert stat.S_IMODE((cache / "oci").stat().st_mode) == 0o755
    assert "was writable by others" in caplog.text


def test_cache_directory_that_is_a_symlink_is_refused(tmp_path: Path, cache: Path) -> None:
    cache.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (cache / "oci").symlink_to(tmp_path / "elsewhere")
    image = tmp_path / "image"
    digest = make_oci_layout(image, [BASE])
    with pytest.raises(StateError, match="is a symlink, not a directory"):
        unpack_image(image, digest, cache_dir=cache)
    assert os.listdir(tmp_path / "elsewhere") == []


@root_only
def test_cache_directory_of_another_user_is_refused(tmp_path: Path, cache: Path) -> None:
    (cache / "oci").mkdir(parents=True)
    os.chown(cache / "oci", 65534, 65534)
    image = tmp_path / "image"
    digest = make_oci_layout(image, [BASE])
    with pytest.raises(StateError, match="belongs to uid 65534"):
        unpack_image(image, digest, cache_dir=cache)


# --- property: whatever the layers, nothing outside changes ------------------------------

# Weighted towards names that collide, so that symlinks get written through and whiteouts
# hit something; ".." (always refused) is rarer to leave room for the rest.
_COMPONENTS = ["a", "a", "b", "evil", "evil", "evil", "..", ".", ""]
_COMPONENTS += [".wh.a", ".wh.evil", ".wh..wh..opq", "@OUT"]
_TARGETS = ["a", "b", "..", "../..", "../../..", "/", "@OUT", "@OUT/file", "/evil", "evil/a", ""]

_names = st.one_of(
    st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4).map("/".join),
    st.sampled_from(["/a", "/evil/x", "../x", "a/../../x", "evil/file", "@OUT/file"]),
)
_plain_entries = st.builds(
    lambda kind, name, target, data: TarEntry(name, kind, data=data, linkname=target),
    kind=st.sampled_from(["file", "dir", "symlink", "hardlink"]),
    name=_names,
    target=st.sampled_from(_TARGETS),
    data=st.sampled_from([b"", b"pwned"]),
)
_symlink_attacks = st.sampled_from(
    [TarEntry("evil", "symlink", linkname=t) for t in ("@OUT", "../../..", "/", "@OUT/file")]
    + [TarEntry("a", "symlink", linkname="evil"), TarEntry("b", "symlink", linkname="a/..")]
)
_entries = st.one_of(_plain_entries, _symlink_attacks)
_layers = st.lists(st.lists(_entries, max_size=8), min_size=1, max_size=3)


def _resolve_placeholders(layers: list[list[TarEntry]], out: Path) -> list[list[TarEntry]]:
    def fix(text: str) -> str:
        return text.replace("@OUT", str(out))

    return [
        [TarEntry(fix(e.name), e.kind, data=e.data, linkname=fix(e.linkname)) for e in layer]
        for layer in layers
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=_layers)
def test_random_layers_never_touch_the_host(layers: list[list[TarEntry]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        out = base / "outside"
        (out / "sub").mkdir(parents=True)
        (out / "file").write_text("precious\n")
        image = base / "image"
        digest = make_oci_layout(image, _resolve_placeholders(layers, out))
        image_before = snapshot(image)
        before = snapshot(base)
        try:
            rootfs = unpack_image(image, digest, cache_dir=base / "cache")
        except ImageError:
            assert leftovers(base / "cache") == []
        else:
            assert rootfs.is_dir() and not rootfs.is_symlink()
        after = snapshot(base)
        cache_prefix = "cache" + os.sep
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert {k for k in changed if not k.startswith(cache_prefix) and k != "cache"} == set()
        assert snapshot(image) == image_before
        assert (out / "file").stat().st_nlink == 1


# --- a real image ------------------------------------------------------------------------


def test_busybox_image(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "busybox"
    digest = make_busybox_layout(image)
    if digest is None:
        pytest.skip("/bin/busybox is not installed")
    rootfs = unpack_image(image, digest, cache_dir=cache)
    busybox = rootfs / "bin/busybox"
    assert busybox.is_file() and not busybox.is_symlink()
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.access(busybox, os.X_OK)
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755
    for applet in BUSYBOX_APPLETS:
        assert os.readlink(rootfs / "bin" / applet) == "busybox"
    assert os.readlink(rootfs / "usr/bin/env") == "/bin/busybox"
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o755  # no sticky, no o+w
    # Static or not, it runs from the unpacked tree.
    result = subprocess.run(
        [str(busybox), "echo", "hello"], capture_output=True, text=True, check=False
    )
    assert result.stdout == "hello\n"


# --- the cached tree is verified when it is used -------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra", "removed", "mode", "link"])
def test_a_damaged_unpacked_image_is_unpacked_again_with_a_warning(
    tmp_path: Path, cache: Path, damage: str
) -> None:
    from buildcell.supply import images

    image = tmp_path / "image"
    payload = bytes(range(256)) * 16
    digest = make_oci_layout(
        image, [[D("bin/"), F("bin/tool", payload, mode=0o755), L("bin/alias", "tool")]]
    )
    rootfs = unpack_image(image, digest, cache_dir=cache)
    tool = rootfs / "bin" / "tool"
    if damage == "flip":
        data = bytearray(tool.read_bytes())
        data[1000] ^= 0x10
        tool.write_bytes(bytes(data))
    elif damage == "truncate":
        tool.write_bytes(payload[:-1])
    elif damage == "extra":
        (rootfs / "bin" / "planted").write_bytes(b"")
    elif damage == "removed":
        tool.unlink()
    elif damage == "mode":
        tool.chmod(0o4755)
    else:
        (rootfs / "bin" / "alias").unlink()
        (rootfs / "bin" / "alias").symlink_to("/elsewhere")
    images._verified.clear()  # a new process: nothing verified yet
    warnings: list[str] = []
    again = unpack_image(image, digest, cache_dir=cache, warn=warnings.append)
    assert again == rootfs
    assert (again / "bin" / "tool").read_bytes() == payload
    assert stat.S_IMODE((again / "bin" / "tool").stat().st_mode) == 0o755
    assert os.readlink(again / "bin" / "alias") == "tool"
    assert not (again / "bin" / "planted").exists()
    assert len(warnings) == 1 and str(rootfs.parent) in warnings[0], warnings
    images._verified.clear()
    quiet: list[str] = []
    unpack_image(image, digest, cache_dir=cache, warn=quiet.append)
    assert quiet == []  # the new tree verifies


@pytest.mark.parametrize("where", ["in a hole", "at the end", "hole punched"])
def test_a_sparse_file_changed_in_its_holes_is_damage_too(tmp_path: Path, where: str) -> None:
    """The tree digest skips holes rather than reading them; data written into one, or a
    hole punched into data, still tells a damaged cache from an intact one."""
    digest = make_oci_layout(
        tmp_path / "img", [[F("tag", b"t"), sparse("big", 64 * MiB), F("data", b"x" * 65536)]]
    )
    cache = tmp_path / "cache"
    rootfs = unpack_image(tmp_path / "img", digest, cache_dir=cache)
    recorded = json.loads((rootfs.parent / "complete").read_text())["tree"]
    assert oci._tree_digest(rootfs) == recorded
    if where == "hole punched":
        fd = os.open(rootfs / "data", os.O_WRONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            mode = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
            assert libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(4096)) == 0
        finally:
            os.close(fd)
        assert (rootfs / "data").read_bytes()[:4096] == bytes(4096)
    else:
        offset = 32 * MiB if where == "in a hole" else 64 * MiB - 1
        with open(rootfs / "big", "r+b") as f:
            f.seek(offset)
            f.write(b"\0")  # a zero, as the hole read: only the extent map tells
    assert oci._tree_digest(rootfs) != recorded


def test_an_intact_unpacked_image_is_verified_once_per_process(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from buildcell.supply import images

    image = tmp_path / "image"
    digest = make_oci_layout(image, [[F("f", b"x")]])
    unpack_image(image, digest, cache_dir=cache)
    images._verified.clear()
    walks: list[Path] = []
    real = images._tree_digest

    def counted(root: Path) -> str | None:
        walks.append(root)
        return real(root)

    monkeypatch.setattr(images, "_tree_digest", counted)
    for _ in range(3):
        unpack_image(image, digest, cache_dir=cache)
    assert len(walks) == 1


# --- the layer cache: a layer unpacked once, shared by every image made from it ------------


def _digest_of(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def test_images_sharing_a_layer_store_it_once(tmp_path: Path) -> None:
    """The issue: three images with one big layer in common took three times its size."""
    shared = [F(f"usr/lib/big{i}", os.urandom(MiB)) for i in range(4)]
    cache = tmp_path / "cache"
    rootfs = []
    for n in range(3):
        digest = make_oci_layout(tmp_path / f"i{n}", [shared, [F(f"etc/own{n}", b"x")]])
        rootfs.append(unpack_image(tmp_path / f"i{n}", digest, cache_dir=cache))
    blocks, _ = disk_use(cache / "oci")
    assert 4 * MiB <= blocks < 5 * MiB
    inodes = {(r / "usr/lib/big0").stat().st_ino for r in rootfs}
    assert len(inodes) == 1
    for n, r in enumerate(rootfs):
        assert sorted(os.listdir(r / "etc")) == [f"own{n}"]
        marker = json.loads((r.parent / "complete").read_text())
        assert oci._tree_digest(r) == marker["tree"]
    keys = sorted(p.name for p in (cache / "oci" / "layers").iterdir() if p.is_dir())
    assert len(keys) == 4  # one shared, three own


def test_shared_files_cannot_be_written_by_the_cell_s_uid(tmp_path: Path) -> None:
    """A file is one inode in the layer cache and in every image made from it: it belongs
    to the unpacking user and nobody else may write it (the root is bound read-only too)."""
    layer = [F("bin/tool", b"#!/bin/sh\n", mode=0o777), F("etc/conf", b"c", mode=0o666)]
    digest = make_oci_layout(tmp_path / "img", [layer])
    rootfs = unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "cache")
    for name in ("bin/tool", "etc/conf"):
        st_ = (rootfs / name).stat()
        assert st_.st_nlink == 2 and st_.st_uid == os.geteuid()
        assert st_.st_mode & 0o022 == 0
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o711)
        code = (
            "import os,sys\nos.setgid(1000); os.setuid(1000)\n"
            "try:\n    os.open(sys.argv[1], os.O_WRONLY)\nexcept PermissionError:\n"
            "    sys.exit(0)\nsys.exit(1)\n"
        )
        for name in ("bin/tool", "etc/conf"):
            done = subprocess.run([sys.executable, "-c", code, str(rootfs / name)], check=False)
            assert done.returncode == 0, name


# Pairs of images whose upper layers are the same layer on different lower ones: what the
# cache replays must be what unpacking from the tar gives, whiteouts and links included.
_UPPER = [
    F("etc/.wh.os-release"),
    F("opt/.wh..wh..opq"),
    F("opt/new", b"n"),
    H("usr/bin/again", "usr/bin/lower"),
    H("usr/bin/self", "opt/new"),
    L("usr/bin/sh", "/bin/busybox"),
    D("var/", mode=0o700),
    TarEntry("dev/null", "char"),
    TarEntry("run/fifo", "fifo"),
]
_LOWERS: list[list[Any]] = [
    [*BASE, F("usr/bin/lower", b"l"), D("opt/"), F("opt/old", b"o")],
    [*BASE, D("opt/"), F("opt/x/y", b"y"), F("var", b"a file, not a directory")],
    [D("etc/", mode=0o555), F("usr/bin/lower", b"other")],
]


@pytest.mark.parametrize("lower", range(len(_LOWERS)))
def test_a_replayed_layer_gives_the_tree_unpacking_gives(tmp_path: Path, lower: int) -> None:
    warm = tmp_path / "warm"
    seed = make_oci_layout(tmp_path / "seed", [[F("seed", b"s")], _UPPER])
    unpack_image(tmp_path / "seed", seed, cache_dir=warm)
    digest = make_oci_layout(tmp_path / "img", [_LOWERS[lower], _UPPER])
    fresh_budget, warm_budget = UnpackBudget(GiB), UnpackBudget(GiB)
    fresh = unpack_image(
        tmp_path / "img", digest, cache_dir=tmp_path / "fresh", budget=fresh_budget
    )
    applied: list[str] = []
    original = oci._Unpacker.apply

    def spy(self: Any, image: Any, layer: Any, where: str, journal: Any) -> None:
        applied.append(layer.label)
        original(self, image, layer, where, journal)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oci._Unpacker, "apply", spy)
        replayed = unpack_image(tmp_path / "img", digest, cache_dir=warm, budget=warm_budget)
    assert len(applied) == 1  # only the lower layer was read from its tar
    assert oci._tree_digest(replayed) == oci._tree_digest(fresh)
    assert snapshot(replayed).keys() == snapshot(fresh).keys()
    assert warm_budget.used == fresh_budget.used  # a replayed layer costs what it did
    fresh_marker = json.loads((fresh.parent / "complete").read_text())
    warm_marker = json.loads((replayed.parent / "complete").read_text())
    for key in ("files", "hardlinks", "symlinks", "whiteouts", "entries", "bytes", "skipped"):
        assert warm_marker[key] == fresh_marker[key], key


def test_a_replayed_layer_never_writes_through_a_lower_symlink(
    tmp_path: Path, outside: Path
) -> None:
    cache = tmp_path / "cache"
    upper = [F("usr/bin/tool", b"t"), H("usr/bin/again", "usr/bin/tool")]
    seed = make_oci_layout(tmp_path / "seed", [BASE, upper])
    unpack_image(tmp_path / "seed", seed, cache_dir=cache)
    before = snapshot(outside)
    digest = make_oci_layout(tmp_path / "evil", [[L("usr", str(outside))], upper])
    with pytest.raises(ImageError, match="which is a symlink; refusing to follow it"):
        unpack_image(tmp_path / "evil", digest, cache_dir=cache)
    assert snapshot(outside) == before
    assert leftovers(cache) == [seed[7:]]


def test_a_damaged_cached_layer_is_read_again_and_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layer = [F("data", b"good" * 1000)]
    first = make_oci_layout(tmp_path / "one", [layer])
    unpack_image(tmp_path / "one", first, cache_dir=cache)
    (layer_dir,) = [p for p in (cache / "oci" / "layers").iterdir() if p.is_dir()]
    stored = layer_dir / "files" / "1"
    os.chmod(stored, 0o644)
    stored.write_bytes(b"evil" * 1000)
    oci._verified.clear()  # as a new process would
    second = make_oci_layout(tmp_path / "two", [layer, [F("more", b"m")]])
    rootfs = unpack_image(tmp_path / "two", second, cache_dir=cache)
    assert (rootfs / "data").read_bytes() == b"good" * 1000
    assert (layer_dir / "files" / "1").read_bytes() == b"good" * 1000
    oci._verified.clear()
    again = unpack_image(tmp_path / "one", first, cache_dir=cache)  # its tree was damaged too
    assert (again / "data").read_bytes() == b"good" * 1000


def test_a_layer_repeated_in_one_image_is_read_once(tmp_path: Path) -> None:
    layer = [F("f", b"x" * 5000)]
    digest = make_oci_layout(tmp_path / "img", [layer, [F(".wh.f")], layer])
    rootfs = unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "cache")
    assert (rootfs / "f").read_bytes() == b"x" * 5000


def test_a_file_is_copied_when_it_cannot_be_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMLINK (a file with as many links as the file system allows) or EXDEV: a copy,
    holes kept."""
    real_link = os.link

    def no_links(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("dst_dir_fd") is not None:
            raise OSError(errno.EMLINK, "Too many links")
        real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", no_links)
    layers: list[Any] = [
        [sparse("s", 64 * MiB, [(0, b"head"), (32 * MiB, b"mid")]), F("p", b"plain")]
    ]
    digest = make_oci_layout(tmp_path / "img", layers)
    rootfs = unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "cache")
    st_ = (rootfs / "s").stat()
    assert st_.st_nlink == 1 and st_.st_size == 64 * MiB
    assert st_.st_blocks * 512 <= 1 * MiB
    with open(rootfs / "s", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(32 * MiB)
        assert f.read(3) == b"mid"
    assert (rootfs / "p").read_bytes() == b"plain"


# --- progress ------------------------------------------------------------------------------


def test_progress_is_reported_per_layer_once_an_unpack_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = make_oci_layout(tmp_path / "img", [BASE, [F("a", b"a")]])
    events: list[dict[str, Any]] = []
    unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "c0", progress=events.append)
    assert events == []  # fast: silent
    monkeypatch.setattr(oci, "PROGRESS_AFTER", 0.0)
    unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "c1", progress=events.append)
    assert [e.get("layer") for e in events if not e.get("partial")] == [1, 2, None]
    assert [e["layer"] for e in events if e.get("partial")] == [1, 2]  # a file each
    assert all(e["digest"] == digest for e in events)
    assert events[0]["layers"] == 2 and events[-1]["done"] is True
    assert events[0]["cached"] is False
    events.clear()
    unpack_image(tmp_path / "img", digest, cache_dir=tmp_path / "c1", progress=events.append)
    assert events == []  # a cached image is not unpacked


# --- sweep_images (buildcell gc) ------------------------------------------------------------


def test_sweep_removes_unused_images_and_the_layers_only_they_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shared = [F("big", os.urandom(MiB))]
    digests = []
    for n in range(3):
        digest = make_oci_layout(tmp_path / f"i{n}", [shared, [F(f"own{n}", os.urandom(MiB))]])
        unpack_image(tmp_path / f"i{n}", digest, cache_dir=cache)
        digests.append(digest)
    now = time.time()
    old = now - 40 * 86400
    for digest in digests[:2]:
        os.utime(cache / "oci" / digest[7:] / "used", (old, old))
    layers = cache / "oci" / "layers"
    for p in layers.iterdir():
        os.utime(p, (old, old), follow_symlinks=False)
    sweep = oci.sweep_images(cache, max_age=30 * 86400, in_use={digests[1]}, now=now)
    assert sweep.images == [digests[0]]
    assert sweep.busy == [digests[1]]
    assert sweep.layers == 1  # digests[0]'s own layer; the shared one is still used
    assert sweep.freed >= MiB
    assert leftovers(cache) == sorted(d[7:] for d in digests[1:])
    # What is left still verifies, and the removed image unpacks again.
    oci._verified.clear()
    for n in (1, 2):
        assert (unpack_image(tmp_path / f"i{n}", digests[n], cache_dir=cache) / "big").exists()
    rootfs = unpack_image(tmp_path / "i0", digests[0], cache_dir=cache)
    assert (rootfs / "own0").stat().st_size == MiB


def test_sweep_leaves_an_image_an_unpack_holds(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    digest = make_oci_layout(tmp_path / "img", [[F("a", b"a")]])
    unpack_image(tmp_path / "img", digest, cache_dir=cache)
    old = time.time() - 40 * 86400
    os.utime(cache / "oci" / digest[7:] / "used", (old, old))
    with oci._exclusive_lock(cache / "oci" / f"{digest[7:]}.lock", digest):
        sweep = oci.sweep_images(cache, max_age=86400, in_use=set())
    assert sweep.images == [] and sweep.busy == [digest]
    assert oci.sweep_images(cache, max_age=86400, in_use=set()).images == [digest]


def test_sweep_never_follows_a_symlink(tmp_path: Path, outside: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "oci" / "layers").mkdir(parents=True)
    before = snapshot(outside)
    os.symlink(outside, cache / "oci" / ("a" * 64))
    os.symlink(outside, cache / "oci" / "layers" / "b")
    old = time.time() - 40 * 86400
    for link in (cache / "oci" / ("a" * 64), cache / "oci" / "layers" / "b"):
        os.utime(link, (old, old), follow_symlinks=False)
    oci.sweep_images(cache, max_age=1, in_use=set())
    assert snapshot(outside) == before
