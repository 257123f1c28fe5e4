#!/usr/bin/env bash
# Offline Redis image for tests (no container registry is reachable on these machines):
# builds local/redis:7 from Debian's redis-server package if it is missing. It behaves like
# the official redis image for what tests use: `redis-server` as the command, data in the
# /data volume, `redis-cli` inside, port 6379, running as the redis user.
# The base is the Debian rootfs ../shared/ci/docker-postgres.sh imports (bookworm minbase,
# the machine's apt mirror and proxy); without it, a minbase rootfs is made with debootstrap.
#
# Usage: bash .ci/docker-redis.sh        Env: IMAGE (local/redis:7), WORK (/tmp/docker-redis)
set -euo pipefail
IMAGE=${IMAGE:-local/redis:7}
WORK=${WORK:-/tmp/docker-redis}
export DEBIAN_FRONTEND=noninteractive DOCKER_BUILDKIT=0
say() { printf 'docker-redis: %s\n' "$*" >&2; }
t0=$SECONDS
docker image inspect "$IMAGE" >/dev/null 2>&1 && { say "ready: $IMAGE (already built)"; exit 0; }

BASE=local/postgres-rootfs:15
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  BASE=local/debian-rootfs:bookworm
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    say "making a Debian rootfs with debootstrap (about a minute)"
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    mkdir -p "$WORK"
    R=$WORK/rootfs
    rm -rf "$R"
    MIRROR=${MIRROR:-$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    debootstrap --variant=minbase bookworm "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
      { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    { grep -lis proxy /etc/apt/apt.conf.d/* || true; } | xargs -r cp -t "$R/etc/apt/apt.conf.d/"
    tar --numeric-owner -C "$R" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
      docker import - "$BASE" >/dev/null
    rm -rf "$R"
  fi
fi

say "building $IMAGE from Debian's redis-server on $BASE"
docker build -q -t "$IMAGE" - >/dev/null <<EOF
FROM $BASE
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]
EOF
say "ready: $IMAGE, $((SECONDS - t0)) s"
