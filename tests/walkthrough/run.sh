#!/usr/bin/env bash
# Follow README.md as a newcomer on a fresh Debian 12 (docs/walkthrough-debian.md): in a
# throw-away container of local/devd-walkthrough:12 (debian-image.sh), as the user
# `newcomer` and then as root, every Quick start line, the first "Service and hooks" block
# and the Postgres, Compose and Services try-outs, from a clone of this checkout's HEAD
# (commit first). Stops at the first failing line. About 8 min a user (apt, PyPI and npm
# downloads); not part of the default suite.
#   bash tests/walkthrough/run.sh            # both users
#   USERS=newcomer FULL=1 bash tests/walkthrough/run.sh   # the whole test suite too
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
IMAGE=${IMAGE:-local/devd-walkthrough:12}
USERS=${USERS:-newcomer root}
bash "$HERE/debian-image.sh"
WALK=$(mktemp -d /tmp/devd-walkthrough.XXXXXX)
git -C "$ROOT" bundle create "$WALK/devd.bundle" HEAD 2>/dev/null
[ -n "${FULL:-}" ] && export PYTEST_ARGS=-q
python3 "$HERE/steps.py" "$ROOT/README.md" "$WALK"
cp "$HERE/docker-forward.py" "$WALK/"
# The newcomer's own repository: one commit, as any repo they would try devd in has.
cat >"$WALK/repo.sh" <<'EOS'
git config --global user.name Newcomer && git config --global user.email new@example.com
mkdir -p ~/shop && cd ~/shop && git init -q -b main && echo shop >README && git add README &&
  git commit -qm init
EOS
# This machine reaches PyPI and npm through a TLS-inspecting proxy whose CA is in the host's
# bundle: the container gets that bundle, an /etc/pip.conf and an /etc/npmrc naming it.
cp /etc/ssl/certs/ca-certificates.crt "$WALK/host-ca.crt"
printf '[global]\ncert = /walk/host-ca.crt\n' >"$WALK/pip.conf"
printf 'cafile=/walk/host-ca.crt\n' >"$WALK/npmrc"
chmod -R a+rX "$WALK"
# The Compose try-out runs on the host's engine (see docker-forward.py): remove what it
# made there, by the Compose project of each user's worktree (exact names, nothing else).
cleanup() {
  # Every worktree made after [compose] was added has a project: shop-c and shop-web.
  for tree in /home/newcomer/shop-c /home/newcomer/shop-web /root/shop-c /root/shop-web; do
    id=$(cd "$ROOT" && python3 -c 'import sys; from pathlib import Path; from devd import naming
print(naming.worktree_id(Path(sys.argv[1]), Path(sys.argv[2])))' "${tree%/*}/shop" "$tree")
    label=com.docker.compose.project=devd-$id
    docker ps -aq --filter "label=$label" | xargs -r docker rm -fv >/dev/null
    docker volume ls -q --filter "label=$label" | xargs -r docker volume rm >/dev/null
    docker network ls -q --filter "label=$label" | xargs -r docker network rm >/dev/null
  done
  rm -rf "$WALK"
}
trap cleanup EXIT
status=0
for user in $USERS; do
  echo "=== walkthrough as $user ==="
  # Login shells of that user, as a newcomer's terminals are; part 2 is the new login the
  # README asks for after `usermod -aG docker`. Before them, as root, what stands in for
  # the Docker engine a stock Debian runs after `apt-get install docker.io`: the host's,
  # through a root:docker socket (an empty system group `docker` made first: apt keeps it).
  docker run --rm -v "$WALK:/walk:ro" -v "$WALK/pip.conf:/etc/pip.conf:ro" \
    -v "$WALK/npmrc:/etc/npmrc:ro" -v /var/run/docker.sock:/host-docker.sock "$IMAGE" \
    sh -c 'groupadd --system docker && { python3 /walk/docker-forward.py & } &&
      su - "$1" -c "bash /walk/part1.sh" && su - "$1" -c "bash /walk/part2.sh"' sh "$user" ||
    status=1
done
exit $status
