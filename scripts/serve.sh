#!/usr/bin/env bash
# Set up and run rtc on this machine only, with its embedded Redis and the demo page:
# http://127.0.0.1:8081/demo to try it. Extra arguments go to `rtc serve` (see
# `rtc serve --help`) and come after the defaults here, so they win (e.g. --port 9000).
#
# Without JWT_SECRET, RTC_JWT_SECRET or RTC_JWT_SECRET_FILE, a random secret is made
# once per runtime directory ($RTC_RUNTIME_DIR, default .run/) and kept there (mode 0600),
# so tokens from `rtc token` keep working across restarts: export
# RTC_JWT_SECRET_FILE=.run/jwt-secret before running `rtc token` by hand.
# `--demo` mints tokens for anyone who can reach the port: never expose it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh server
runtime=$(realpath -m "${RTC_RUNTIME_DIR:-.run}")
mkdir -p -m 0700 "$runtime"
if [ -z "${JWT_SECRET:-}${RTC_JWT_SECRET:-}${RTC_JWT_SECRET_FILE:-}" ]; then
    secret="$runtime/jwt-secret"
    if [ ! -s "$secret" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret")
        echo "serve: no JWT secret set: made a random one in $secret" >&2
    fi
    export RTC_JWT_SECRET_FILE="$secret"
fi
exec .venv/bin/rtc serve --demo --host 127.0.0.1 --runtime-dir "$runtime" "$@"
