#!/usr/bin/env bash
# Prepare this checkout on a Debian machine with only Python: the system programs rtc and
# its tests use (installed with apt-get when missing) and a virtualenv with rtc in it.
#
#   scripts/setup.sh server   redis-server only (what `rtc serve` needs)
#   scripts/setup.sh test     everything the test suite drives: redis, haproxy, nginx,
#                             promtool, chromium, systemd-analyze, debootstrap and
#                             systemd-nspawn (a real systemd test), and Autobahn's wstest
# Idempotent: a second run installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-server}"

# program -> Debian package
declare -A packages=([redis-server]=redis-server [redis-cli]=redis-tools)
if [ "$mode" = test ]; then
    packages+=([haproxy]=haproxy [nginx]=nginx [promtool]=prometheus [chromium]=chromium
               [systemd-analyze]=systemd [ip]=iproute2 [jq]=jq [curl]=curl [node]=nodejs
               [debootstrap]=debootstrap [systemd-nspawn]=systemd-container)
fi
missing=()
for program in "${!packages[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${packages[$program]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # Debian starts packaged daemons on install; the tests start their own on free ports.
    for service in redis-server haproxy nginx prometheus; do
        $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
        $sudo service "$service" stop >/dev/null 2>&1 || true
    done
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.rtc-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ clients/python/pyproject.toml -nt "$stamp" ]; then
    # rtc with its test tools, and the Python SDK (clients/python) that its tests drive.
    if ! { .venv/bin/python -m pip install -q --upgrade pip \
            && .venv/bin/python -m pip install -q -e '.[dev]' -e ./clients/python; } >.venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        echo "setup: pip install failed (whole log: .venv/pip.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
if [ "$mode" = test ]; then
    scripts/autobahn-setup.sh >/dev/null
fi
