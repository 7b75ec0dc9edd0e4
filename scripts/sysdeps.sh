#!/usr/bin/env bash
# Install the system packages seqshare needs to build and test (Debian/Ubuntu).
#   libsystemd-dev, pkg-config : systemd-python builds from source against them
#   systemd                    : systemd-analyze, for the unit tests (a container may lack it)
#   systemd-container          : systemd-nspawn, to boot a real systemd for the service test
#   util-linux                 : nsenter and unshare, for the same and the namespace tests
#   g++, cmake                 : the native module
set -euo pipefail
pkgs=(libsystemd-dev pkg-config systemd systemd-container util-linux g++ cmake)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "seqshare: please install the equivalents of: ${missing[*]} (no apt-get here)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "seqshare: missing system packages: ${missing[*]}" >&2
  echo "run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "seqshare: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
