"""Hostile OCI images, as a pull request commits and pins them, against the real tool.

Each test builds its image in Python at test time and plays the attacker: a few hundred
bytes of sparse headers that declare gigabytes, a layout whose blobs are symlinks to host
files, directories another local user could write into, links at the image's root that
point at the host. Where the behaviour is end to end, the image goes through
``buildcell run --rootfs oci:DIR@sha256:...`` as root; where a build's budget is shared by
several images or the disk has to fill up, through the library. Every test asserts a
containment:

* a refusal is exit 125 (or :class:`~buildcell.errors.Error`) with one line saying why;
* no byte is written beyond the budget: after a refusal nothing is left in the cache but
  the lock file, and an accepted image takes no more blocks or bytes than it was charged;
* nothing outside the cache is read or written;
* no other local user can write into any directory of the cache, and nothing in it is
  setuid, setgid, or writable by group or others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import UNPRIVILEGED, RunCLI, _system_python, root_only
from tests.oci_images import (
    OCI_LAYER_TAR,
    Member,
    SparseEntry,
    SparseFormat,
    TarEntry,
    blob_path,
    build_oci_layout,
    gzip_zeros,
    layer_tar,
    make_docker_archive,
    make_host_tools_layout,
    make_oci_layout,
    write_dir,
)

from buildcell.errors import Error, ImageError, StateError
from buildcell.supply.images import UnpackBudget, unpack_image

MiB = 1 << 20
GiB = 1 << 30
FORMATS: list[SparseFormat] = ["gnu", "pax0.0", "pax0.1", "pax1.0"]
LONG = "opt/" + "a-rather-long-directory-name/" * 4 + "and-a-long-file-name"  # > 100 bytes
TRUE = "/usr/bin/true"


def sparse(name: str, size: int, fmt: SparseFormat = "gnu", **kw: Any) -> SparseEntry:
    return SparseEntry(name, size, ((0, b"x"),), fmt=fmt, **kw)


def F(name: str, data: bytes = b"", **kw: Any) -> TarEntry:
    return TarEntry(name, "file", data, **kw)


def D(name: str, **kw: Any) -> TarEntry:
    return TarEntry(name, "dir", **kw)


def disk_use(path: Path) -> tuple[int, int]:
    """(st_blocks in bytes, st_size) of the files below ``path``, each inode once, lock
    files (empty, and kept on purpose) left out."""
    blocks = sizes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if name.endswith(".lock") or (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            blocks += info.st_blocks * 512
            sizes += info.st_size
    return blocks, sizes


def not_locks(oci_dir: Path) -> list[str]:
    """What the image cache holds besides lock files (nothing, if it was never made)."""
    if not oci_dir.exists():
        return []
    return sorted(p.name for p in oci_dir.iterdir() if not p.name.endswith(".lock"))


_PROGRESS = re.compile(r"buildcell: (\[[^]]*\] )?unpack(ing|ed) image [0-9a-f]{12}: ")


def error_lines(stderr: str) -> list[str]:
    """What stderr says besides an unpack's progress (an image that takes a second)."""
    return [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.match(line)]


@pytest.fixture
def images(state_root: Path) -> Path:
    """Where images go: under the state root, which the cells' uids can traverse."""
    path = state_root / "images"
    path.mkdir()
    return path


@pytest.fixture
def oci_cache(state_root: Path) -> Path:
    return state_root / "state" / "cache" / "oci"


def run_image(bc: RunCLI, image: Path, digest: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``buildcell run --rootfs oci:IMAGE@DIGEST -- ARGV``, from an empty directory."""
    work = image.parent / "work"
    work.mkdir(exist_ok=True)
    res: subprocess.CompletedProcess[str] = bc(
        "run", "--rootfs", f"oci:{image}@{digest}", "--", *(argv or (TRUE,)), cwd=work
    )
    return res


def assert_refused(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 125 and exactly one line on stderr, with ``words`` in it; returns the line."""
    lines = error_lines(res.stderr)
    assert res.returncode == 125, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- real bytes counted ------------------------------------------------------------------


@root_only
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sparse_bomb_is_refused_before_a_byte_is_written(
    bc: RunCLI, images: Path, oci_cache: Path, fmt: SparseFormat
) -> None:
    """Twelve 1.5 GiB sparse members (long names, so the name headers are in play too)
    in a blob of a few kilobytes declare 18 GiB: refused at the member that crosses the
    16 GiB default, and nothing of the ones before it stays on disk."""
    members = [sparse(f"{LONG}-{n}", 1536 * MiB, fmt) for n in range(12)]
    image = images / "bomb"
    built = build_oci_layout([members])
    write_dir(image, built.files)
    assert len(built.files[str(blob_path(Path(), built.layer_digests[0]))]) < 16 << 10
    line = assert_refused(
        run_image(bc, image, built.digest),
        f"image {image}@{built.digest} does not fit in the unpack budget of 16.0 GiB",
        f"sparse file '{LONG}-10' needs 1.5 GiB",
    )
    assert line.startswith("buildcell: error: ")
    assert not_locks(oci_cache) == []
    assert disk_use(oci_cache) == (0, 0)


@root_only
def test_sparse_members_within_the_budget_are_written_sparse(
    bc: RunCLI, images: Path, oci_cache: Path
) -> None:
    """The issue's blob (three 600 MiB sparse members) fits the default budget: it is
    unpacked, runs, and takes a few kilobytes of disk instead of 1.8 GiB."""
    image = images / "three"
    formats: list[SparseFormat] = ["gnu", "pax0.1", "pax1.0"]
    sparse_layer: list[Member] = [sparse(f"srv/{fmt}/{LONG}", 600 * MiB, fmt) for fmt in formats]
    sparse_layer.append(TarEntry("srv/hard", "hardlink", linkname=f"srv/gnu/{LONG}"))
    digest = make_host_tools_layout(image, [sparse_layer])
    res = run_image(bc, image, digest)
    assert res.returncode == 0, res.stderr
    rootfs = oci_cache / digest[7:] / "rootfs"
    blocks, sizes = disk_use(rootfs / "srv")
    assert sizes >= 3 * 600 * MiB
    assert blocks < MiB
    assert (rootfs / "srv/hard").stat().st_ino == (rootfs / f"srv/gnu/{LONG}").stat().st_ino
    marker = json.loads((rootfs.parent / "complete").read_text())
    assert marker["sparse"] == 3
    assert marker["charged"] >= 3 * 600 * MiB


@root_only
@pytest.mark.parametrize(
    ("members", "words"),
    [
        pytest.param(
            [SparseEntry("f", MiB, ((0, b"data"),), fmt="pax0.1", sparse_map=[(0, 4), (2, 4)])],
            ["overlapping or unordered pieces"],
            id="overlapping-map",
        ),
        pytest.param(
            [SparseEntry("f", MiB, ((0, b"data"),), fmt="gnu", sparse_map=[(1 << 60, 4)])],
            ["past its size"],
            id="huge-offset",
        ),
        pytest.param(
            [SparseEntry("f", 4096, ((0, b"data"),), fmt="pax1.0", sparse_map=[(4000, 1000)])],
            ["maps data up to byte 5000, past its size of 4096"],
            id="map-beyond-realsize",
        ),
        pytest.param(
            [SparseEntry("f", MiB, ((0, b"data"),), fmt="gnu", sparse_map=[(0, -4096)])],
            ["negative offset or size"],
            id="negative-piece",
        ),
        pytest.param(
            [SparseEntry("f", -1, (), fmt="pax1.0")],
            ["declares a negative size (-1)"],
            id="negative-realsize",
        ),
        pytest.param(
            [F("f", b"", pax={"size": "-512"})],
            ["declares a negative size (-512)"],
            id="negative-pax-size",
        ),
        pytest.param(
            [SparseEntry("f", 10**40, (), fmt="pax0.0")],
            ["does not fit in the unpack budget of 16.0 GiB", "sparse file 'f' needs"],
            id="absurd-realsize",
        ),
        pytest.param(
            [sparse(f"many/f{n}", MiB, FORMATS[n % 4]) for n in range(17_000)],
            ["does not fit in the unpack budget of 16.0 GiB"],
            id="seventeen-thousand-tiny-sparse-members",
        ),
    ],
)
def test_hostile_sparse_headers_are_refused_end_to_end(
    bc: RunCLI, images: Path, oci_cache: Path, members: list[Any], words: list[str]
) -> None:
    image = images / "hostile"
    digest = make_oci_layout(image, [[F("keep", b"k"), *members]])
    res = run_image(bc, image, digest)
    assert res.returncode == 125, res.stderr
    assert "Traceback" not in res.stderr
    first = error_lines(res.stderr)[0]
    for word in words:
        assert word in first, first
    assert not_locks(oci_cache) == []
    assert disk_use(oci_cache) == (0, 0)


@root_only
def test_a_member_repeated_in_many_layers_is_charged_each_time(
    bc: RunCLI, images: Path, oci_cache: Path
) -> None:
    """Only one 1.5 GiB file exists at a time (each layer whites out the last one), but
    every copy was written: twelve of them do not fit in 16 GiB."""
    layers: list[Any] = [[sparse("f", 1536 * MiB)]]
    layers += [[F(".wh.f"), sparse("f", 1536 * MiB)] for _ in range(11)]
    image = images / "repeat"
    digest = make_oci_layout(image, layers)
    assert_refused(run_image(bc, image, digest), "layer 11/12", "sparse file 'f' needs 1.5 GiB")
    assert not_locks(oci_cache) == []


@root_only
def test_whiteouts_of_sparse_files_and_their_links(
    bc: RunCLI, images: Path, oci_cache: Path
) -> None:
    image = images / "whiteouts"
    lower: list[Member] = [
        D("d/"),
        sparse("d/big", GiB, "pax0.0"),
        TarEntry("d/link", "hardlink", linkname="d/big"),
    ]
    upper = [F("d/.wh.big"), F("d/.wh..wh..opq"), F("d/new", b"n")]
    digest = make_host_tools_layout(image, [lower, upper])
    res = run_image(bc, image, digest)
    assert res.returncode == 0, res.stderr
    assert os.listdir(oci_cache / digest[7:] / "rootfs" / "d") == ["new"]


@root_only
@pytest.mark.parametrize("kind", ["oci-media-type", "docker-archive"])
def test_zstd_layers_are_refused_unread(
    bc: RunCLI, images: Path, oci_cache: Path, kind: str
) -> None:
    zstd_frame = b"\x28\xb5\x2f\xfd" + b"\0" * 64  # the magic, then anything
    if kind == "oci-media-type":
        image = images / "zstd"
        digest = make_oci_layout(
            image,
            [zstd_frame],
            compress=False,
            layer_media_type="application/vnd.oci.image.layer.v1.tar+zstd",
        )
    else:
        image = images / "zstd.tar"
        digest = make_docker_archive(image, [zstd_frame])
    res = run_image(bc, image, digest)
    assert res.returncode == 125, res.stderr
    assert "zstd" in error_lines(res.stderr)[0]
    assert not_locks(oci_cache) == []


def test_a_gzip_bomb_of_zeros_is_read_only_as_far_as_the_budget(tmp_path: Path) -> None:
    """A tar of one file and 8 GiB of zeros gzips to about 8 MiB; what is decompressed
    (and hashed) stops at the budget, long before the end of the blob."""
    image = tmp_path / "image"
    bomb = gzip_zeros(layer_tar([F("a", b"a")]), 8 * GiB)
    built = build_oci_layout([], blobs=[bomb])
    write_dir(image, built.files)
    digest = built.digest
    budget = UnpackBudget(64 * MiB)
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"uncompressed layer streams hold more than"):
        unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=budget)
    assert time.monotonic() - started < 10
    assert not_locks(tmp_path / "cache" / "oci") == []


def test_an_uncompressed_bomb_costs_what_it_holds(tmp_path: Path) -> None:
    """Zeros after the end of a tar write nothing, but reading them is work: the image is
    charged its stream, so a build cannot bring in such images without bound."""
    image = tmp_path / "image"
    padded = layer_tar([F("a", b"a")]) + b"\0" * (40 * MiB)
    digest = make_oci_layout(image, [padded], compress=False, layer_media_type=OCI_LAYER_TAR)
    budget = UnpackBudget(100 * MiB)
    unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=budget)
    assert budget.used >= 40 * MiB
    other = tmp_path / "other"
    again = make_oci_layout(other, [padded + b"\0" * 512], compress=False)
    unpack_image(other, again, cache_dir=tmp_path / "cache", budget=budget)
    third = make_oci_layout(tmp_path / "third", [padded + b"\0" * 1024], compress=False)
    with pytest.raises(ImageError, match=r"does not fit in the unpack budget of 100\.0 MiB"):
        unpack_image(tmp_path / "third", third, cache_dir=tmp_path / "cache", budget=budget)


def test_one_budget_bounds_a_build_s_images_cached_or_not(tmp_path: Path) -> None:
    """A build that names many images, each one small as a blob and within the per-image
    default, is bounded by its one budget, whether the images are unpacked now or were
    cached by earlier builds."""
    cache = tmp_path / "cache"
    digests = []
    for n in range(10):
        digests.append(
            make_oci_layout(tmp_path / f"i{n}", [[F("n", str(n).encode()), sparse("big", 2 * GiB)]])
        )
    for n in range(0, 10, 2):  # half of them cached by an earlier build
        unpack_image(tmp_path / f"i{n}", digests[n], cache_dir=cache)
    budget = UnpackBudget(9 * GiB)
    refused: dict[int, str] = {}
    for n, digest in enumerate(digests):
        try:
            unpack_image(tmp_path / f"i{n}", digest, cache_dir=cache, budget=budget, label=f"i{n}")
        except ImageError as e:
            refused[n] = str(e)
    assert list(refused) == [4, 5, 6, 7, 8, 9]
    for n, message in refused.items():
        assert f"image i{n}@{digests[n]} does not fit in the unpack budget of 9.0 GiB" in message
    # A refused image's charges stay (its build fails); the accepted ones are listed.
    assert len(budget.images) == 4
    assert sum(budget.images.values()) <= budget.used <= budget.limit


# --- nothing another user can write --------------------------------------------------------

_PROBE = """
import json, os, sys
hits = []
for kind, path in json.load(sys.stdin):
    try:
        if kind == "dir":
            new = os.path.join(path, ".written-by-nobody")
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        pass
    else:
        os.close(fd)
        hits.append(path)
    if kind == "dir":
        try:
            os.mkdir(os.path.join(path, ".dir-by-nobody"))
        except OSError:
            pass
        else:
            hits.append(path + "/")
print(json.dumps(hits))
"""


def writable_by_nobody(root: Path) -> list[str]:
    """What uid 65534 (no groups) manages to create a file in, or open for writing."""
    python, setpriv = _system_python(), shutil.which("setpriv")
    if python is None or setpriv is None:
        pytest.skip("needs setpriv and a system Python")
    targets: list[tuple[str, str]] = [("dir", str(root))]
    for dirpath, dirnames, filenames in os.walk(root):
        targets += [("dir", os.path.join(dirpath, d)) for d in dirnames]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                targets.append(("file", path))
    res = subprocess.run(
        [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
         "--", python, "-c", _PROBE],
        input=json.dumps(targets),
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    hits: list[str] = json.loads(res.stdout)
    return hits


def loose_modes(root: Path) -> list[str]:
    """Entries below ``root`` that are setuid, setgid, sticky or group/other-writable."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [Path(dirpath), *(Path(dirpath, name) for name in dirnames + filenames)]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue  # a symlink's own mode means nothing
            if info.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022):
                found.append(f"{path} {stat.S_IMODE(info.st_mode):04o}")
    return sorted(set(found))


@root_only
def test_no_other_user_can_write_into_a_cached_image(
    bc: RunCLI, images: Path, state_root: Path, oci_cache: Path
) -> None:
    """The issue's finding: a 0777 directory of an image kept its mode in the root-owned
    cache, and an unprivileged user wrote a file there that every later build saw."""
    hostile = [
        D("usr/ww/", mode=0o777),
        D("tmp2/", mode=0o1777),
        D("grp/", mode=0o2775),
        D("setgid/", mode=0o2755),
        F("usr/ww/file", b"w", mode=0o666),
        F("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755),
        F("usr/bin/sgid", b"#!/bin/sh\n", mode=0o2711),
        F("grp/f", b"g", mode=0o664),
        F("all", b"a", mode=0o7777),
        D("private/", mode=0o700),
        F("private/f", b"p", mode=0o600),
    ]
    image = images / "ww"
    digest = make_host_tools_layout(image, [hostile])
    res = run_image(bc, image, digest)
    assert res.returncode == 0, res.stderr
    cache = state_root / "state" / "cache"
    assert (oci_cache / digest[7:] / "rootfs" / "usr/ww/file").exists()
    assert writable_by_nobody(cache) == []
    assert loose_modes(cache) == []
    # What cells need is still there: other uids traverse and read the tree.
    rootfs = oci_cache / digest[7:] / "rootfs"
    assert stat.S_IMODE((rootfs / "usr/ww").stat().st_mode) == 0o755
    assert stat.S_IMODE((rootfs / "usr/ww/file").stat().st_mode) == 0o644
    assert stat.S_IMODE(rootfs.stat().st_mode) == 0o755


@root_only
def test_the_cache_is_not_writable_by_others_after_a_refusal_either(
    bc: RunCLI, images: Path, state_root: Path
) -> None:
    image = images / "bomb"
    digest = make_oci_layout(image, [[D("ww/", mode=0o777), sparse("ww/f", 20 * GiB)]])
    assert_refused(run_image(bc, image, digest), "does not fit in the unpack budget")
    cache = state_root / "state" / "cache"
    assert writable_by_nobody(cache) == []
    assert loose_modes(cache) == []


# --- the layout directory opened confined --------------------------------------------------


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host file with a secret, as /etc/shadow would be."""
    path = tmp_path / "host-secret"
    path.write_text("canary-secret-of-the-host\n")
    return path


def _layout_attacks() -> list[str]:
    return [
        "blobs -> /",
        "index.json -> /proc/self/environ",
        "layer blob -> host file",
        "manifest blob -> host file",
        "oci-layout -> host file",
        "blobs/sha256 -> ../../..",
        "layer blob is a fifo",
        "layer blob -> /dev/zero",
    ]


@root_only
@pytest.mark.parametrize("attack", _layout_attacks())
def test_layout_files_are_opened_beneath_the_layout(
    bc: RunCLI, images: Path, oci_cache: Path, canary: Path, attack: str
) -> None:
    image = images / "layout"
    built = build_oci_layout([[F("etc/os-release", b"ID=x\n")]])
    write_dir(image, built.files)
    layer = blob_path(image, built.layer_digests[0])
    if attack == "blobs -> /":
        shutil.rmtree(image / "blobs")
        (image / "blobs").symlink_to("/")
    elif attack == "index.json -> /proc/self/environ":
        (image / "index.json").unlink()
        (image / "index.json").symlink_to("/proc/self/environ")
    elif attack == "layer blob -> host file":
        layer.unlink()
        layer.symlink_to(canary)
    elif attack == "manifest blob -> host file":
        blob_path(image, built.digest).unlink()
        blob_path(image, built.digest).symlink_to(canary)
    elif attack == "oci-layout -> host file":
        (image / "oci-layout").unlink()
        (image / "oci-layout").symlink_to(canary)
    elif attack == "blobs/sha256 -> ../../..":
        shutil.rmtree(image / "blobs" / "sha256")
        (image / "blobs" / "sha256").symlink_to("../../..")
    elif attack == "layer blob is a fifo":
        layer.unlink()
        os.mkfifo(layer)
    else:
        layer.unlink()
        layer.symlink_to("/dev/zero")
    res = run_image(bc, image, built.digest)
    line = assert_refused(res)
    assert any(
        why in line for why in ("outside the root", "leads above the root", "not a regular file")
    ), line
    assert "canary-secret" not in res.stderr + res.stdout
    assert not_locks(oci_cache) == []


# --- symlinks at the image's root -----------------------------------------------------------


ROOT_LINKS = [
    ("etc", "/"),
    ("etc", "/etc"),
    ("usr", "/"),
    ("bin", "/usr/bin"),
    ("lib64", "../../.."),
    ("etc", "../../../../../../etc"),
]


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, Any]]:
    found: dict[str, tuple[int, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            detail: Any = os.readlink(path) if stat.S_ISLNK(info.st_mode) else info.st_mtime_ns
            if stat.S_ISREG(info.st_mode):
                detail = (path.read_bytes(), info.st_nlink)
            found[str(path.relative_to(root))] = (info.st_mode, detail)
    return found


@pytest.mark.parametrize(("name", "target"), ROOT_LINKS)
def test_root_symlinks_are_stored_as_plain_symlinks(tmp_path: Path, name: str, target: str) -> None:
    """Unpacking never follows a link at the image's root: it is a symlink in the cache,
    and whatever mounts the tree decides what it means (resolved inside the root)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "passwd").write_text("host\n")
    image = tmp_path / "image"
    layers: list[Any] = [
        [D("var/"), F("var/keep", b"k"), TarEntry(name, "symlink", linkname=target)],
        [TarEntry(f"{name}-too", "symlink", linkname=target)],
    ]
    digest = make_oci_layout(image, layers)
    cache = tmp_path / "cache"
    before = _snapshot(tmp_path, cache)
    rootfs = unpack_image(image, digest, cache_dir=cache)
    assert _snapshot(tmp_path, cache) == before
    for link in (name, f"{name}-too"):
        assert stat.S_ISLNK((rootfs / link).lstat().st_mode)
        assert os.readlink(rootfs / link) == target
    assert sorted(os.listdir(rootfs)) == sorted([name, f"{name}-too", "var"])


@pytest.mark.parametrize(("name", "target"), ROOT_LINKS)
@pytest.mark.parametrize("same_layer", [True, False])
@pytest.mark.parametrize("below", ["passwd", "ssh/sshd_config", ".wh.passwd", ".wh..wh..opq", "x/"])
def test_nothing_is_written_through_a_root_symlink(
    tmp_path: Path, name: str, target: str, same_layer: bool, below: str
) -> None:
    link = TarEntry(name, "symlink", linkname=target)
    data = b"" if ".wh." in below else b"pwned"
    entry = D(f"{name}/{below}") if below.endswith("/") else F(f"{name}/{below}", data)
    layers: list[Any] = [[link, entry]] if same_layer else [[link], [entry]]
    image = tmp_path / "image"
    digest = make_oci_layout(image, layers)
    cache = tmp_path / "cache"
    before = _snapshot(tmp_path, cache)
    with pytest.raises(ImageError, match=f"is below '{name}', which is a symlink"):
        unpack_image(image, digest, cache_dir=cache)
    assert _snapshot(tmp_path, cache) == before
    assert not_locks(cache / "oci") == []


def test_a_hard_link_through_a_root_symlink_is_not_made(tmp_path: Path) -> None:
    image = tmp_path / "image"
    layer = [
        TarEntry("etc", "symlink", linkname="/etc"),
        TarEntry("shadow", "hardlink", linkname="etc/shadow"),
        TarEntry("passwd", "hardlink", linkname="/etc/passwd"),
    ]
    digest = make_oci_layout(image, [layer])
    rootfs = unpack_image(image, digest, cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(rootfs)) == ["etc"]


# --- nothing half-unpacked when the disk runs out -------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the cache directory; unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "cache"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.parametrize("where", ["layer 1", "layer 2"])
def test_a_full_disk_is_an_error_and_leaves_nothing_half_done(
    tmp_path: Path, small_disk: Path, where: str
) -> None:
    filler = [F(f"data/f{n}", os.urandom(256 << 10)) for n in range(12)]  # 3 MiB, random
    layers: list[Any] = [filler] if where == "layer 1" else [[F("a", b"a")], filler]
    image = tmp_path / "image"
    digest = make_oci_layout(image, layers)
    with pytest.raises(StateError) as info:
        unpack_image(image, digest, cache_dir=small_disk)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert message.startswith("the image cache is full: cannot unpack image ")
    assert not_locks(small_disk / "oci") == []
    assert disk_use(small_disk / "oci") == (0, 0)
    # With room, the next attempt unpacks it whole.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    rootfs = unpack_image(image, digest, cache_dir=small_disk)
    assert len(os.listdir(rootfs / "data")) == 12
    assert json.loads((rootfs.parent / "complete").read_text())["version"] == 4


@root_only
def test_a_full_disk_end_to_end_is_one_line(bc: RunCLI, images: Path, state_root: Path) -> None:
    image = images / "big"
    digest = make_oci_layout(image, [[F(f"f{n}", os.urandom(MiB)) for n in range(4)]])
    cache = state_root / "state" / "cache"
    cache.mkdir(parents=True)
    os.chmod(state_root / "state", 0o711)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0711", "tmpfs", str(cache)], check=True
    )
    try:
        assert_refused(run_image(bc, image, digest), "the image cache is full")
        assert not_locks(cache / "oci") == []
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_errors_are_one_line_for_every_refusal_here(tmp_path: Path) -> None:
    """Every refusal of this module is an Error whose message is one line."""
    image = tmp_path / "image"
    digest = make_oci_layout(image, [[sparse("f", 2 * GiB)]])
    with pytest.raises(Error) as info:
        unpack_image(image, digest, cache_dir=tmp_path / "cache", budget=UnpackBudget(GiB))
    assert "\n" not in str(info.value) and info.value.exit_code == 125


# --- one budget per build, from the configuration file -----------------------------------


@root_only
def test_the_build_s_image_budget_comes_from_the_configuration(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    proj = tmp_path / "p"
    members = [sparse(f"big-{n}", 8 * MiB, "gnu") for n in range(4)]
    built = build_oci_layout([[*members, F("bin/marker", b"x")]])
    write_dir(proj / "image", built.files)  # inside the spec's directory: opened confined
    (proj / "buildcell.yaml").write_text(
        f'version: 1\nname: img\nrootfs: {{oci: image, digest: "{built.digest}"}}\n'
        "steps: [{name: s, run: 'true'}]\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text("images: {max_size: 16MiB}\n")
    res = bc("build", cwd=proj, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 125
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("buildcell: error:")]
    assert "does not fit in the unpack budget of 16.0 MiB" in line
    assert "image image@sha256:" in line
    assert "big-" in line
    assert disk_use(state_root / "state" / "cache" / "oci") == (0, 0)
    # The policy context shows the budget.
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: small-images\n"
        "    expr: invocation.image_budget <= 16777216\n"
    )
    config.write_text("images: {max_size: 1GiB}\n")
    res = bc("build", "--policy", str(policy), cwd=proj, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 125
    assert "small-images" in res.stderr


# --- the layer cache: one image's layer replayed on another's -----------------------------


@root_only
def test_a_cached_layer_replayed_on_a_symlinked_lower_layer_writes_nothing_outside(
    bc: RunCLI, images: Path, oci_cache: Path, tmp_path: Path
) -> None:
    """An honest image puts ``usr/bin/tool`` in the layer cache; a second image reuses that
    layer on top of its own ``usr -> /host/dir``. Replaying must walk the tree it is
    composing, not trust the cached layer: refused, and nothing lands on the host."""
    host = tmp_path / "host-dir"
    host.mkdir()
    upper = [
        TarEntry("usr/bin/tool", "file", b"#!/bin/sh\n"),
        TarEntry("usr/bin/again", "hardlink", linkname="usr/bin/tool"),
    ]
    honest = images / "honest"
    digest = make_host_tools_layout(honest, [upper])
    assert run_image(bc, honest, digest).returncode == 0
    evil = images / "evil"
    evil_digest = make_oci_layout(evil, [[TarEntry("usr", "symlink", linkname=str(host))], upper])
    res = run_image(bc, evil, evil_digest)
    assert res.returncode == 125 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("buildcell: error:")]
    assert "entry 'usr/bin/tool' is below 'usr', which is a symlink" in line
    assert list(host.iterdir()) == []
    assert not_locks(oci_cache) == sorted(["layers", digest[7:]])


@root_only
def test_files_shared_through_the_layer_cache_are_not_writable_in_a_cell(
    bc: RunCLI, images: Path, oci_cache: Path
) -> None:
    """One inode serves the layer cache and every image made from it: a cell (uid 1000,
    read-only root) must not be able to change it for the next image."""
    layer = [TarEntry("data/shared", "file", b"original", mode=0o777)]
    first, second = images / "first", images / "second"
    one = make_host_tools_layout(first, [layer])
    two = make_host_tools_layout(second, [layer, [TarEntry("x", "file")]])
    res = run_image(bc, first, one, "/bin/sh", "-c", "echo evil > /data/shared; echo $?")
    assert run_image(bc, second, two).returncode == 0
    assert res.stdout.strip() != "0"
    for digest in (one, two):
        shared = oci_cache / digest[7:] / "rootfs" / "data" / "shared"
        assert shared.read_bytes() == b"original"
        st = shared.stat()
        assert st.st_nlink >= 3 and st.st_mode & 0o022 == 0 and st.st_uid == 0
