#!/usr/bin/env bash
# `make test-aarch64`: build and test seqshare for arm64 under qemu-user, on an x86-64 Debian host, as root.
#
#   1. host tools from apt (qemu-user-static, binfmt-support, mmdebstrap, arch-test); binfmt_misc
#      mounted and qemu-aarch64 enabled where it is not;
#   2. an arm64 Debian rootfs of the host's own release, from the mirror the host's apt sources name,
#      cached in $SEQSHARE_AARCH64_CACHE (default /var/cache/seqshare/aarch64) with a venv of the
#      project's dependencies;
#   3. this checkout copied in and pip-installed there (an emulated build of the native module);
#   4. under each emulated CPU model, the kernel tests (ARM variants against the scalar reference) and
#      one greedy `seqshare generate` on the default model compiled to f32, whose token ids must equal
#      the x86 run's.
# qemu says nothing about speed: this checks correctness and kernel selection only.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
CACHE=${SEQSHARE_AARCH64_CACHE:-/var/cache/seqshare/aarch64}
# Emulated CPU = the kernel level it must select: NEON only (Cortex-A72), + dotprod (Neoverse N1),
# + i8mm (qemu's max with SVE off).
CPUS=${SEQSHARE_AARCH64_CPUS:-"cortex-a72=neon neoverse-n1=dotprod max,sve=off=i8mm"}
PACKAGES=python3,python3-venv,python3-dev,g++,make,cmake,pkg-config,libsystemd-dev,redis-server,ca-certificates
PIP_DEPS=(numpy "redis>=5" "rq>=2.0,<3" "transformers>=4.46" "tokenizers>=0.20" "jinja2>=3.1" "gguf>=0.10"
  "cryptography>=42" "systemd-python>=235" "pydantic>=2.6" "pydantic-settings>=2.2" "click>=8.1" "tqdm>=4.66"
  "safetensors>=0.4" "pytest>=8" "hypothesis>=6.100" "scikit-build-core>=0.10" "pybind11>=2.13")
PROMPT="The capital of France is"
TOKENS=12

say() { echo "test-aarch64: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (apt, binfmt_misc, chroot)"
[ "$(uname -m)" = x86_64 ] || die "runs on an x86-64 host (on an arm64 box, run make test itself)"
command -v apt-get >/dev/null || die "needs a Debian host (apt-get)"

host_tools() {
  local p missing=()
  for p in qemu-user-static binfmt-support mmdebstrap arch-test; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  arch-test arm64 >/dev/null || die "arm64 binaries do not run here even with qemu-aarch64 enabled"
}

# The first deb mirror of the host's own release in its apt sources (one-line or deb822 format).
mirror() {
  local codename uri
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || die "cannot tell the host's release from /etc/os-release"
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v s="$codename" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) break;
                                        if ($(i + 1) == s) { print $i; exit } }' || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$codename" '
      /^$/ { if (deb && suite) { print u; exit } deb = suite = 0; u = "" }
      /^Types:/ { deb = ($0 ~ / deb( |$)/) }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) suite = 1 }
      END { if (deb && suite) print u }' | head -1 || true)
  fi
  [ -n "$uri" ] || die "no deb source for '$codename' in /etc/apt/sources.list{,.d}"
  echo "$codename $uri"
}

ROOT=""
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  mounted=()
}
trap cleanup EXIT

mount_run() {
  local d
  for d in proc dev; do
    mountpoint -q "$ROOT/$d" && continue
    if [ $d = proc ]; then mount -t proc proc "$ROOT/proc"; else mount --rbind /dev "$ROOT/dev"; fi
    mounted+=("$ROOT/$d")
  done
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
}

# Run a command inside the rootfs with a clean environment (the host's pip and BLAS settings stay out).
inside() {
  local cpu=$1; shift
  env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu" \
    SEQSHARE_HOME=/root/seqshare-home PIP_DISABLE_PIP_VERSION_CHECK=1 chroot "$ROOT" "$@"
}

rootfs() {
  local codename uri key
  read -r codename uri < <(mirror)
  key=$(echo "$codename $uri $PACKAGES ${PIP_DEPS[*]}" | sha256sum | cut -c1-12)
  ROOT=$CACHE/rootfs-$codename-$key
  if [ -e "$ROOT/opt/venv/.deps-installed" ]; then
    say "rootfs: cached $ROOT"
    return
  fi
  # A run killed outright may have left /proc and /dev mounted in a half-built rootfs: never delete
  # through them.
  for d in "$ROOT" "$ROOT.tmp"; do umount -R -l "$d/dev" "$d/proc" 2>/dev/null || true; done
  rm -rf --one-file-system "$ROOT" "$ROOT.tmp"
  mkdir -p "$CACHE"
  say "rootfs: mmdebstrap arm64 $codename from $uri (a few minutes, emulated)"
  mmdebstrap --quiet --arch=arm64 --variant=apt --include="$PACKAGES" "$codename" "$ROOT.tmp" "$uri"
  mv "$ROOT.tmp" "$ROOT"
  mount_run
  say "rootfs: venv with the project's dependencies (pip, emulated)"
  inside max python3 -m venv /opt/venv
  inside max pip install -q "${PIP_DEPS[@]}"
  touch "$ROOT/opt/venv/.deps-installed"
}

install_project() {
  say "installing this checkout into the rootfs venv (an emulated build of the native module)"
  rm -rf "$ROOT/opt/src"
  mkdir -p "$ROOT/opt/src"
  (cd "$REPO" && git ls-files -co --exclude-standard -z | grep -zv '^build/' | xargs -0 tar -c) | tar -x -C "$ROOT/opt/src"
  inside max pip install -q --no-deps --no-build-isolation /opt/src
}

# The default model as an f32 bundle, and the greedy token ids of PROMPT on this (x86) machine.
reference() {
  local gguf bundle=$ROOT/root/seqshare-home/default-f32.bundle
  [ -x "$VENV/bin/seqshare" ] || die "no $VENV/bin/seqshare: run make install first"
  gguf=$("$VENV/bin/seqshare" model fetch-default --quiet)
  mkdir -p "$(dirname "$bundle")"
  "$VENV/bin/seqshare" model compile "$gguf" --out "$bundle" --quant f32 --quiet >/dev/null
  "$VENV/bin/seqshare" generate "$bundle" --prompt "$PROMPT" --max-new-tokens $TOKENS --json | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["token_ids"])'
}

main() {
  host_tools
  rootfs
  mount_run
  install_project
  local want got pair cpu level isas
  want=$(reference)
  say "x86 greedy token ids: $want"
  for pair in $CPUS; do
    cpu=${pair%=*} level=${pair##*=}
    isas=$(inside "$cpu" python -c 'from seqshare import _native; print(_native.best_isa(), _native.runnable_isas())')
    say "QEMU_CPU=$cpu: kernels $isas"
    [ "${isas%% *}" = "$level" ] || die "QEMU_CPU=$cpu selected ${isas%% *}, not $level"
    inside "$cpu" sh -c 'cd /opt/src && python -m pytest -q -p no:cacheprovider tests/native' ||
      die "kernel tests failed under QEMU_CPU=$cpu"
    got=$(inside "$cpu" seqshare generate /root/seqshare-home/default-f32.bundle --prompt "$PROMPT" \
      --max-new-tokens $TOKENS --threads 2 --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["token_ids"])')
    [ "$got" = "$want" ] || die "QEMU_CPU=$cpu: greedy token ids $got differ from x86's $want"
    say "QEMU_CPU=$cpu: kernel tests pass; greedy answer equals x86's"
  done
  say "ok"
}

case "${1:-all}" in
  all) main ;;
  rootfs) host_tools; rootfs ;;
  shell) host_tools; rootfs; mount_run; inside "${QEMU_CPU:-max}" bash ;;
  *) die "usage: $0 [all|rootfs|shell]" ;;
esac
