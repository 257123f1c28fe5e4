#!/usr/bin/env bash
# Follow README.md as a newcomer on a fresh Debian 12 (docs/walkthrough-debian.md): in a
# throw-away container of local/devd-walkthrough:12 (debian-image.sh), as the user
# `newcomer` and then as root, every Quick start line and the first "Service and hooks"
# block, from a clone of this checkout's HEAD (commit first). Stops at the first failing
# line. About 2-4 min a user (apt and PyPI downloads); not part of the default suite.
#   bash tests/walkthrough/run.sh            # both users
#   USERS=newcomer FULL=1 bash tests/walkthrough/run.sh   # the whole test suite too
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
IMAGE=${IMAGE:-local/devd-walkthrough:12}
USERS=${USERS:-newcomer root}
bash "$HERE/debian-image.sh"
WALK=$(mktemp -d /tmp/devd-walkthrough.XXXXXX)
trap 'rm -rf "$WALK"' EXIT
git -C "$ROOT" bundle create "$WALK/devd.bundle" HEAD 2>/dev/null
python3 "$HERE/steps.py" "$ROOT/README.md" >"$WALK/steps.sh"
# The newcomer's own repository: one commit, as any repo they would try devd in has.
cat >"$WALK/repo.sh" <<'EOS'
git config --global user.name Newcomer && git config --global user.email new@example.com
mkdir -p ~/shop && cd ~/shop && git init -q -b main && echo shop >README && git add README &&
  git commit -qm init
EOS
# This machine reaches PyPI through a TLS-inspecting proxy whose CA is in the host's bundle
# (and its /etc/pip.conf): the container gets the same two, nothing of devd's.
cp /etc/ssl/certs/ca-certificates.crt "$WALK/host-ca.crt"
printf '[global]\ncert = /walk/host-ca.crt\n' >"$WALK/pip.conf"
chmod -R a+rX "$WALK"
status=0
for user in $USERS; do
  echo "=== walkthrough as $user ==="
  pytest_args=()
  [ -n "${FULL:-}" ] && pytest_args=(-e PYTEST_ARGS=-q)
  # A login shell of that user, as a newcomer's terminal is (git for repo.sh comes from
  # the README's apt line: steps.sh runs repo.sh only after it).
  docker run --rm -v "$WALK:/walk:ro" -v "$WALK/pip.conf:/etc/pip.conf:ro" \
    "${pytest_args[@]}" "$IMAGE" \
    su - "$user" -c 'bash /walk/steps.sh' || status=1
done
exit $status
