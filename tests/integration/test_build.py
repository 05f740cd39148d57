"""`buildcell build` and friends against the real sandbox."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import REPO, RunCLI, derived_project


class _Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A loopback server is a non-public destination: fetching from it is the
        # operator's grant.
        self.grant = ("--allow-fetch", f"127.0.0.1:{self.httpd.server_address[1]}")
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _spec(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "buildcell.yaml"
    path.write_text(text)
    return path


def test_multi_step_build_with_a_fetched_input(bc: RunCLI, tmp_path: Path, server: _Server) -> None:
    payload = b"dependency contents\n"
    server.files["/dep.txt"] = payload
    sha = hashlib.sha256(payload).hexdigest()
    spec = _spec(
        tmp_path / "proj",
        f"""
version: 1
name: multi
inputs:
  - url: {server.url}/dep.txt
    sha256: {sha}
    path: vendor/dep.txt
steps:
  - name: one
    run: |
      cat vendor/dep.txt > made-by-one
      echo scratch > /tmp/scratch
      echo in-home > $HOME/h
  - name: two
    run: |
      test -f made-by-one
      test ! -e /tmp/scratch
      test ! -e $HOME/h
      ! touch vendor/dep.txt 2>/dev/null
      mkdir -p dist && cp made-by-one dist/result.txt
outputs: ["dist/*"]
""",
    )
    out = tmp_path / "out"
    res = bc("build", "-f", str(spec), "--out", str(out), "--json", cwd=tmp_path)
    assert res.returncode == 125  # without the grant, not even one request is made
    assert "--allow-fetch" in res.stderr
    assert server.hits.get("/dep.txt", 0) == 0
    # A ref: what a ref's builds fetch, its later builds may take from the store.
    ref = ("--ref", "refs/heads/main")
    res = bc(
        "build", "-f", str(spec), "--out", str(out), "--json", *server.grant, *ref, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["status"] == "succeeded"
    assert [s["status"] for s in result["steps"]] == ["succeeded", "succeeded"]
    assert (out / "dist" / "result.txt").read_bytes() == payload
    manifest = json.loads((out / "outputs.json").read_text())
    assert manifest["outputs"] == [{"path": "dist/result.txt", "sha256": sha, "size": len(payload)}]
    assert result["inputs"][0]["source"] == "fetched"
    assert server.hits["/dep.txt"] == 1
    # The second build takes the input from the content-addressed store.
    res = bc(
        "build", "-f", str(spec), "--out", str(out), "--json", *server.grant, *ref, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["inputs"][0]["source"] == "store"
    assert server.hits["/dep.txt"] == 1
    assert not (tmp_path / "proj" / "made-by-one").exists()


def test_digest_mismatch_stops_before_any_step(bc: RunCLI, tmp_path: Path, server: _Server) -> None:
    server.files["/x"] = b"tampered"
    wrong = "0" * 64
    spec = _spec(
        tmp_path / "p",
        f"""
version: 1
name: mismatch
inputs: [{{url: "{server.url}/x", sha256: "{wrong}", path: x}}]
steps: [{{name: s, run: "touch /workspace/ran"}}]
""",
    )
    res = bc("build", "-f", str(spec), *server.grant, cwd=tmp_path)
    assert res.returncode == 125
    assert wrong in res.stderr
    assert hashlib.sha256(b"tampered").hexdigest() in res.stderr
    ls = json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout)
    assert ls[0]["status"] == "error"
    assert ls[0]["steps"][0]["status"] == "skipped"


def test_failing_step_stops_the_build_with_its_status(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: failing
steps:
  - {name: ok, run: "mkdir -p dist && echo 1 > dist/a"}
  - {name: bad, run: "echo about to fail; exit 3"}
  - {name: never, run: "echo never"}
outputs: ["dist/*"]
""",
    )
    out = tmp_path / "out"
    res = bc("build", "-f", str(spec), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 3
    assert "[bad] about to fail" in res.stdout
    assert "[never]" not in res.stdout
    assert not out.exists()  # nothing is published from a failed build
    show = json.loads(
        bc(
            "show",
            "--project",
            derived_project(tmp_path / "p"),
            "--json",
            json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout)[0][
                "id"
            ],
        ).stdout
    )
    assert [s["status"] for s in show["steps"]] == ["succeeded", "failed", "skipped"]


def test_sh_e_semantics(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: errexit
steps: [{name: s, run: "false\\necho not reached"}]
""",
    )
    res = bc("build", "-f", str(spec), cwd=tmp_path)
    assert res.returncode == 1
    assert "not reached" not in res.stdout


def test_spec_errors_exit_125_before_anything_runs(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path / "p",
        """version: 1
name: bad
steps:
  - name: s
    run: "touch /workspace/x"
    limits: {timeout: ten minutes}
""",
    )
    res = bc("build", "-f", str(spec), cwd=tmp_path)
    assert res.returncode == 125
    first = res.stderr.splitlines()[0]
    assert "buildcell.yaml:6" in first
    assert "steps[0].limits.timeout" in first
    assert json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout) == []


def test_missing_spec_file(bc: RunCLI, tmp_path: Path) -> None:
    res = bc("build", cwd=tmp_path)
    assert res.returncode == 125
    assert "buildcell.yaml" in res.stderr


def test_records_ls_show_logs(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: logged
steps:
  - {name: first, run: "echo out-one; echo err-one >&2"}
  - {name: second, run: "echo out-two"}
""",
    )
    assert bc("build", "-f", str(spec), cwd=tmp_path).returncode == 0
    builds = json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout)
    assert len(builds) == 1
    build_id = builds[0]["id"]
    assert "logged" in bc("ls", "--project", derived_project(tmp_path / "p")).stdout
    show = bc("show", "--project", derived_project(tmp_path / "p"), build_id[:18])
    assert show.returncode == 0
    assert "succeeded" in show.stdout
    logs = bc("logs", "--project", derived_project(tmp_path / "p"), build_id).stdout.splitlines()
    assert "[first] out-one" in logs
    assert "[first] err-one" in logs
    assert "[second] out-two" in logs
    assert (
        bc(
            "logs", "--project", derived_project(tmp_path / "p"), build_id, "--step", "second"
        ).stdout
        == "out-two\n"
    )
    bad = bc("logs", "--project", derived_project(tmp_path / "p"), build_id, "--step", "third")
    assert bad.returncode == 125
    assert "first, second" in bad.stderr
    assert bc("show", "--project", derived_project(tmp_path / "p"), "nope").returncode == 125

    record_dir = Path(
        json.loads(
            bc("show", "--project", derived_project(tmp_path / "p"), "--json", build_id).stdout
        )["spec_path"]
    ).parent
    assert record_dir == tmp_path / "p"


def test_build_events_and_spec_are_recorded(bc: RunCLI, tmp_path: Path, state_root: Path) -> None:
    spec = _spec(tmp_path / "p", "version: 1\nname: ev\nsteps: [{name: s, run: 'true'}]\n")
    assert bc("build", "-f", str(spec), cwd=tmp_path).returncode == 0
    (record,) = (state_root / "state" / "builds").iterdir()
    assert (record / "spec.yaml").read_text() == spec.read_text()
    events = [json.loads(x) for x in (record / "events.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "build.start"
    assert names[-1] == "build.finish"
    assert "cell.start" in names
    assert all(e["build"] == record.name for e in events)
    assert {e.get("step") for e in events if e["event"] == "cell.start"} == {"s"}


def test_example_c_build_twice(bc: RunCLI, tmp_path: Path) -> None:
    src = tmp_path / "examples"
    shutil.copytree(REPO / "examples", src)
    spec = src / "hello-c" / "buildcell.yaml"
    for expected_source in ("fetched", "store"):
        out = tmp_path / "out"
        res = bc("build", "-f", str(spec), "--out", str(out), "--json", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout)
        assert result["inputs"][0]["source"] == expected_source
        assert [s["name"] for s in result["steps"]] == ["configure", "compile", "test", "package"]
        assert {o["path"] for o in result["outputs"]} == {
            "build/hello",
            "dist/hello.tar",
            "hello-c.tar.gz",
        }
    assert (tmp_path / "out" / "build" / "hello").stat().st_mode & 0o111


def test_example_python_wheel_build(bc: RunCLI, tmp_path: Path) -> None:
    src = tmp_path / "python-wheel"
    shutil.copytree(REPO / "examples" / "python-wheel", src)
    for _ in range(2):
        res = bc(
            "build",
            "-f",
            str(src / "buildcell.yaml"),
            "--out",
            str(tmp_path / "o"),
            "--json",
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
    wheel = tmp_path / "o" / "dist" / "greet-0.1.0-py3-none-any.whl"
    import zipfile

    assert "greet/__init__.py" in zipfile.ZipFile(wheel).namelist()


def test_oci_rootfs_build(bc: RunCLI, tmp_path: Path) -> None:
    from tests.oci_images import make_busybox_layout

    # Inside the spec's directory: the host reads the image, the cells its unpacked copy.
    digest = make_busybox_layout(tmp_path / "p" / "image")
    if digest is None:
        pytest.skip("/bin/busybox (busybox-static) is not installed")
    spec = _spec(
        tmp_path / "p",
        f"""
version: 1
name: oci
rootfs: {{oci: image, digest: "{digest}"}}
steps:
  - name: s
    run: "busybox echo from-busybox; test ! -e /usr/bin/python3 && echo no-host-usr"
""",
    )
    res = bc("build", "-f", str(spec), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "[s] from-busybox" in res.stdout
    assert "[s] no-host-usr" in res.stdout
    wrong = "sha256:" + "1" * 64
    spec.write_text(spec.read_text().replace(digest, wrong))
    res = bc("build", "-f", str(spec), cwd=tmp_path)
    assert res.returncode == 125
    assert wrong in res.stderr


def test_run_with_oci_rootfs(bc: RunCLI, tmp_path: Path, state_root: Path) -> None:
    from tests.oci_images import make_busybox_layout

    image = state_root / "image"
    digest = make_busybox_layout(image)
    if digest is None:
        pytest.skip("/bin/busybox (busybox-static) is not installed")
    res = bc(
        "run", "--rootfs", f"oci:{image}@{digest}", "--", "busybox", "uname", "-n", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "buildcell\n"


@pytest.mark.parametrize(
    ("marker", "kind", "expect"),
    [
        ("Makefile", "Makefile", "make -j2"),
        ("pyproject.toml", "Python", "pip wheel"),
        ("package.json", "npm", "npm run build"),
        (None, "generic", "replace me"),
    ],
)
def test_init_writes_a_valid_spec(
    bc: RunCLI, tmp_path: Path, marker: str | None, kind: str, expect: str
) -> None:
    from buildcell.build.spec import load_spec

    if marker:
        (tmp_path / marker).write_text("check:\n\ttrue\n" if marker == "Makefile" else "{}")
    res = bc("init", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert kind in res.stdout
    text = (tmp_path / "buildcell.yaml").read_text()
    assert expect in text
    load_spec(tmp_path / "buildcell.yaml")
    again = bc("init", cwd=tmp_path)
    assert again.returncode == 125
    assert "--force" in again.stderr
    assert bc("init", "--force", cwd=tmp_path).returncode == 0


def test_schema_is_json_schema(bc: RunCLI) -> None:
    schema = json.loads(bc("schema").stdout)
    assert "steps" in schema["properties"]
    assert schema.get("additionalProperties") is False


def test_a_build_without_outputs_attests_nothing(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(tmp_path / "p", "version: 1\nname: none\nsteps: [{name: s, run: 'true'}]\n")
    out = tmp_path / "out"
    res = bc("build", "-f", str(spec), "--out", str(out), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["provenance"]["path"] is None
    assert not (out / "provenance.intoto.jsonl").exists()
