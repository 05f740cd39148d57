#!/usr/bin/env bash
# Install what buildcell needs from the system, or say exactly what to install.
#
#   scripts/system-deps.sh          what buildcell and `make demo` need (missing: exit 1)
#   scripts/system-deps.sh --test   also what the test suite uses; a normal user missing
#                                   only those gets the apt-get line, and the tests that
#                                   need them skip, each saying why
#
# As root with apt-get, whatever is missing is installed; otherwise one apt-get line says
# what to install.
set -euo pipefail

tests=0
[ "${1:-}" = "--test" ] && tests=1

# The interpreter the cells and the rootless tests use: the host's, not a virtualenv's.
host_python=/usr/bin/python3
[ -x "$host_python" ] || host_python=$(command -v python3 || echo python3)

has_libseccomp() {
  { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; } ||
    compgen -G '/usr/lib*/libseccomp.so.2' >/dev/null ||
    compgen -G '/usr/lib/*/libseccomp.so.2' >/dev/null ||
    compgen -G '/lib/*/libseccomp.so.2' >/dev/null
}
has_static_busybox() {
  # A rootfs directory made of busybox alone needs the static build (busybox-static);
  # ldd fails on a static executable.
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}
has_module() { "$host_python" -I -c "import $1" >/dev/null 2>&1; }

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
has_libseccomp || missing+=(libseccomp2)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

# What the tests use beyond that (each test that needs one skips without it, saying so).
test_missing=()
if [ $tests -eq 1 ]; then
  has_static_busybox || test_missing+=(busybox-static)
  # Podman's default seccomp profile (Docker's format): the real-world profile the tests
  # load when the development tree's ../shared/assets is not there.
  [ -f /usr/share/containers/seccomp.json ] || test_missing+=(golang-github-containers-common)
  command -v git >/dev/null 2>&1 || test_missing+=(git)
  command -v curl >/dev/null 2>&1 || test_missing+=(curl) # the network tests' client, in cells
  command -v diffoscope >/dev/null 2>&1 || test_missing+=(diffoscope-minimal)
  command -v tmux >/dev/null 2>&1 || test_missing+=(tmux)
  command -v setpriv >/dev/null 2>&1 || test_missing+=(util-linux)
  # The README's wheel example (tests/integration/test_readme_examples.py) runs the host's
  # `python3 -m build -n`, which needs the build frontend and the setuptools backend.
  has_module build || test_missing+=(python3-build)
  has_module setuptools || test_missing+=(python3-setuptools)
  if [ "${BUILDCELL_TEST_INSTALL:-}" = 1 ]; then
    command -v pipx >/dev/null 2>&1 || test_missing+=(pipx) # the opt-in install tests
  fi
fi

all=("${missing[@]}" "${test_missing[@]}")
if [ ${#all[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${all[*]} with apt-get (one-time, about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${all[@]}" >/dev/null
  echo "system-deps: installed ${all[*]}"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  line="sudo apt-get install ${all[*]}"
else
  line="install with your distribution's package manager: ${all[*]}"
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "buildcell needs these system packages: ${missing[*]}" >&2
  [ ${#test_missing[@]} -gt 0 ] && echo "and the tests use: ${test_missing[*]}" >&2
  echo "install them as root:  $line" >&2
  exit 1
fi
echo "system-deps: the tests use ${test_missing[*]}, not installed; the tests that need them" \
  "will be skipped, each saying why. To run them all, as root:  $line" >&2
exit 0
