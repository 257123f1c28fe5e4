#!/bin/sh
# devd setup script for Conductor and apps like it: provisions the workspace the app has
# just created and returns once it is ready (exit 1 if provisioning failed).
#   setup.sh [WORKSPACE]
# The workspace is the argument, else $CONDUCTOR_WORKSPACE_PATH (exported by Conductor),
# else the current directory (Conductor runs setup scripts inside the new workspace).
set -eu
workspace=${1:-${CONDUCTOR_WORKSPACE_PATH:-$PWD}}
if ! command -v devd >/dev/null 2>&1; then
  echo "devd: not found on PATH; install devd or remove this setup step" >&2
  exit 127
fi
# --background --wait: the daemon owns the work, so an app that kills a slow setup script
# does not interrupt provisioning half-way; the script still waits for the result.
exec devd provision --background --wait "$workspace"
