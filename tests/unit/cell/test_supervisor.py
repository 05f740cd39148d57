"""The launch plan of a cell: plain data, decided without touching the OS."""

from __future__ import annotations

from buildcell.cell.bwrap import Mount, SandboxPlan, bwrap_argv, split_options
from buildcell.cell.supervisor import plan_launch

BASE = SandboxPlan(
    mounts=(Mount("ro-bind", "/usr", src="/usr"), Mount("remount-ro", "/")),
    argv=("/bin/sh", "-c", "true"),
    env=(("PATH", "/usr/bin"),),
    cwd="/workspace",
    hostname="buildcell",
    uid=1000,
    gid=1000,
)


def test_secrets_go_before_the_root_is_made_read_only() -> None:
    secret = Mount("ro-bind-data", "/run/secrets/t", src="9", mode=0o400)
    launch = plan_launch(BASE, secret_mounts=[Mount("tmpfs", "/run/secrets"), secret])
    kinds = [m.kind for m in launch.sandbox.mounts]
    assert kinds == ["ro-bind", "tmpfs", "ro-bind-data", "remount-ro"]
    assert launch.netns is None
    assert launch.netns_mode == "none"


def test_descriptors_reach_bubblewrap_as_options() -> None:
    launch = plan_launch(BASE, seccomp_fd=5, status_fd=6, block_fd=7)
    argv = bwrap_argv(launch.sandbox, "/usr/bin/bwrap")
    options, tail = split_options(argv)
    assert b"--seccomp\x005\x00" in options
    assert b"--json-status-fd\x006\x00" in options
    assert b"--block-fd\x007\x00" in options
    assert tail == ["--", "/bin/sh", "-c", "true"]
    assert b"/usr" in options  # host paths travel in the options, never in argv


def test_who_makes_the_network_namespace() -> None:
    ports = frozenset({443})
    root = plan_launch(BASE, network_ports=ports, rootless=False, anchored=False)
    assert root.netns_mode == "thread"
    assert root.netns is not None
    assert not root.netns.own_userns
    rootless = plan_launch(BASE, network_ports=ports, rootless=True, anchored=False)
    assert rootless.netns_mode == "child"
    assert rootless.netns is not None
    assert rootless.netns.own_userns
    anchored = plan_launch(BASE, network_ports=ports, rootless=True, anchored=True)
    assert anchored.netns_mode == "child"
    assert anchored.netns is not None
    assert not anchored.netns.own_userns  # it joins the anchor's user namespace
    assert plan_launch(BASE, network_ports=ports, anchored=True).netns_mode == "child"
