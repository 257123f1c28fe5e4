#!/usr/bin/env bash
# A fresh Debian 12 as a newcomer has it, as a local Docker image (default
# local/devd-walkthrough:12): debootstrap's base system plus what a standard install adds
# and devd's README takes for granted (the system python3, sudo), and a user `newcomer`
# who may sudo. Nothing else: git, venv, pipx, PostgreSQL come from the README's own lines.
# Idempotent; the base tarball is cached under /var/tmp (reruns take a second).
set -euo pipefail
IMAGE=${IMAGE:-local/devd-walkthrough:12}
CACHE=${CACHE:-/var/tmp/devd-walkthrough}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
docker image inspect "$IMAGE" >/dev/null 2>&1 && exit 0
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
mkdir -p "$CACHE"
if [ ! -s "$CACHE/debian12.tar" ]; then
  R=$CACHE/rootfs
  rm -rf "$R"
  echo "walkthrough: debootstrap bookworm (a few minutes, once)" >&2
  debootstrap bookworm "$R" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  cp /etc/resolv.conf "$R/etc/resolv.conf"
  mount -t proc proc "$R/proc"
  trap 'umount "$R/proc" 2>/dev/null || true' EXIT
  chroot "$R" /bin/sh -ec '
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 sudo
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    useradd -m -s /bin/bash -G sudo newcomer
    echo "newcomer ALL=(ALL) NOPASSWD:ALL" >/etc/sudoers.d/newcomer
    rm -f /etc/resolv.conf' >"$CACHE/chroot.log" 2>&1 || { tail -20 "$CACHE/chroot.log" >&2; exit 1; }
  umount "$R/proc"
  trap - EXIT
  tar -C "$R" -cf "$CACHE/debian12.tar.tmp" . && mv "$CACHE/debian12.tar.tmp" "$CACHE/debian12.tar"
  rm -rf "$R"
fi
docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' "$CACHE/debian12.tar" "$IMAGE" >/dev/null
