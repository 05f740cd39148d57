from __future__ import annotations

from buildcell.cell.bwrap import Mount, SandboxPlan, bwrap_argv


def _plan(**kw: object) -> SandboxPlan:
    base: dict[str, object] = {
        "mounts": (
            Mount("ro-bind", "/usr", src="/usr"),
            Mount("symlink", "/bin", src="usr/bin"),
            Mount("tmpfs", "/tmp", mode=0o1777, size=1024),
            Mount("bind", "/workspace", src="/state/ws"),
            Mount("remount-ro", "/"),
        ),
        "argv": ("/usr/bin/make", "-j2"),
        "env": (("HOME", "/home/builder"), ("PATH", "/usr/bin")),
        "cwd": "/workspace",
        "hostname": "buildcell",
        "uid": 1000,
        "gid": 1000,
    }
    base.update(kw)
    return SandboxPlan(**base)  # type: ignore[arg-type]


def test_argv_isolates_everything_and_ends_with_the_command() -> None:
    argv = bwrap_argv(_plan(), "/usr/bin/bwrap")
    assert argv[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                 "--new-session", "--clearenv"):  # fmt: skip
        assert flag in argv
    assert "--share-net" not in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--uid") + 1] == "1000"
    assert argv[argv.index("--hostname") + 1] == "buildcell"
    assert argv[argv.index("--chdir") + 1] == "/workspace"
    assert argv[-3:] == ["--", "/usr/bin/make", "-j2"]


def test_mounts_keep_order_and_options() -> None:
    argv = bwrap_argv(_plan())
    joined = " ".join(argv)
    assert (
        "--ro-bind /usr /usr --symlink usr/bin /bin --perms 1777 --size 1024 --tmpfs /tmp" in joined
    )
    assert joined.index("--bind /state/ws /workspace") < joined.index("--remount-ro /")


def test_env_is_set_after_clearenv() -> None:
    argv = bwrap_argv(_plan())
    clear = argv.index("--clearenv")
    assert argv[clear + 1 : clear + 7] == [
        "--setenv", "HOME", "/home/builder", "--setenv", "PATH", "/usr/bin",
    ]  # fmt: skip


def test_fds_and_extra() -> None:
    argv = bwrap_argv(_plan(seccomp_fd=5, status_fd=6, extra=("--block-fd", "7")))
    assert argv[argv.index("--seccomp") + 1] == "5"
    assert argv[argv.index("--json-status-fd") + 1] == "6"
    assert argv[argv.index("--block-fd") + 1] == "7"
    assert argv.index("--block-fd") < argv.index("--")


def test_share_net() -> None:
    assert "--share-net" in bwrap_argv(_plan(share_net=True))


def test_command_starting_with_dashes_stays_after_separator() -> None:
    argv = bwrap_argv(_plan(argv=("--help",)))
    assert argv[-2:] == ["--", "--help"]
