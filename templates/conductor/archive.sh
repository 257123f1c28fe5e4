#!/bin/sh
# devd archive script for Conductor and apps like it: releases the workspace's resources
# before the app deletes the directory. Always exits 0, so archiving is never blocked.
#   archive.sh [WORKSPACE]
# Data-bearing resources (databases) are kept; `devd gc` frees them after the grace period.
workspace=${1:-${CONDUCTOR_WORKSPACE_PATH:-$PWD}}
devd release "$workspace" || echo "devd: kept $workspace's resources for \`devd gc\`" >&2
exit 0
