#!/usr/bin/env bash
# What `make bench` compares against: podman (with runc, which this kind of host may need)
# and a static busybox for its image. Installed as root; otherwise said, and skipped.
set -uo pipefail
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bench: installing ${missing[*]} to compare against"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    echo "bench: could not install ${missing[*]}; those comparisons are reported as not measured"
else
  echo "bench: ${missing[*]} not installed; those comparisons are reported as not measured"
fi
exit 0
