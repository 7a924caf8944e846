#!/usr/bin/env bash
# Set up and run rtc with its embedded Redis: http://127.0.0.1:8081/demo to try it.
# Extra arguments go to `rtc serve` (see `rtc serve --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh server
if [ -z "${JWT_SECRET:-}${RTC_JWT_SECRET:-}${RTC_JWT_SECRET_FILE:-}" ]; then
    export JWT_SECRET="rtc-development-secret-change-me-0123456789"
    echo "serve: JWT_SECRET not set: using a development secret (never in production)" >&2
fi
exec .venv/bin/rtc serve "$@"
