#!/usr/bin/env bash
# Manual check, not run by .ci/run (building the image takes ~4 minutes on a new machine):
# a real systemd user manager (Debian, systemd as PID 1 in a container, as
# ../shared/ci/README.md describes) takes over from a daemon the CLI started, both through
# `devd service install` and through `systemctl --user restart devd.socket`.
#     bash .ci/systemd-handover.sh        # run from the repository root, as root
# Removes its container and image at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/devd-systemd-handover}
image=local/devd-systemd-handover:1
name=devd-systemd-handover
mkdir -p "$work/wheelhouse"
if [ ! -d "$work/rootfs" ]; then
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,dbus-user-session,python3,\
python3-venv,git,procps,ca-certificates,libpam-systemd bookworm "$work/rootfs" \
    http://deb.debian.org/debian >"$work/debootstrap.log"
fi
python3 -m pip wheel -q --no-deps . -w "$work/wheelhouse"
python3 -m pip download -q . -d "$work/wheelhouse" --only-binary=:all:
tar -C "$work/rootfs" -c . | docker import - "$image" >/dev/null
trap 'docker rm -f "$name" >/dev/null 2>&1; docker rmi "$image" >/dev/null 2>&1' EXIT
docker run -d --name "$name" --cap-add ALL --cap-drop SYS_RESOURCE \
  --security-opt seccomp=unconfined --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  --tmpfs /run --tmpfs /run/lock -v "$work/wheelhouse:/wheelhouse:ro" "$image" /sbin/init >/dev/null
sleep 5
docker exec "$name" sh -c 'useradd -m u && python3 -m venv /opt/devd &&
  /opt/devd/bin/pip install -q --no-index -f /wheelhouse devd && loginctl enable-linger u'
as_u() {
  docker exec -u u "$name" sh -c "export XDG_RUNTIME_DIR=/run/user/\$(id -u) HOME=/home/u \
    PATH=/opt/devd/bin:\$PATH DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/\$(id -u)/bus; \
    cd /home/u; $1"
}
sleep 2
as_u 'devd status >/dev/null 2>&1; devd service status' | grep -q 'started by the CLI'
as_u 'devd service install' | grep -q 'the daemon the CLI had started (pid [0-9]*) stopped'
as_u 'devd service status' | grep -q 'run by systemd'
# The issue's case: a CLI-started daemon runs while devd.socket is (re)started.
as_u 'systemctl --user stop devd.socket devd.service; devd status >/dev/null 2>&1'
as_u 'devd service status' | grep -q 'started by the CLI'
as_u 'systemctl --user restart devd.socket; DEVD_TIMEOUT=30 devd status >/dev/null'
as_u 'devd service status' | grep -q 'run by systemd'
echo "systemd hand-over: ok"
