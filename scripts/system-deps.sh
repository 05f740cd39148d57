#!/usr/bin/env bash
# Install what buildcell needs from the system, or say exactly what to install.
set -euo pipefail

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
has_libseccomp() {
  { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; } ||
    compgen -G '/usr/lib*/libseccomp.so.2' >/dev/null ||
    compgen -G '/usr/lib/*/libseccomp.so.2' >/dev/null ||
    compgen -G '/lib/*/libseccomp.so.2' >/dev/null
}
has_libseccomp || missing+=(libseccomp2)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "buildcell needs these system packages: ${missing[*]}" >&2
if command -v apt-get >/dev/null 2>&1; then
  echo "install them as root:  sudo apt-get install ${missing[*]}" >&2
else
  echo "install them with your distribution's package manager (bubblewrap, libseccomp, a C compiler)" >&2
fi
exit 1
