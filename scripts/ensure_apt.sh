#!/usr/bin/env bash
# Install the Debian packages named, those not installed yet; nothing when all are there.
#
#   scripts/ensure_apt.sh PACKAGE...      e.g. scripts/ensure_apt.sh redis-tools
#
# Runs `apt-get update` once (only when something is missing), then `apt-get install -y`.
# Needs root when it has something to install; says so in one line otherwise. .ci/run
# calls it for what the test suite needs from Debian (redis-tools: redis-cli and
# redis-benchmark, which tests/e2e/test_resp.py drives).
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PACKAGE..." >&2
    exit 2
fi

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "ensure_apt: already installed: $*"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_apt: ${missing[*]} not installed, and installing needs root (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "ensure_apt: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "ensure_apt: installed ${missing[*]}"
