#!/usr/bin/env bash
# Set up and run the whole default test suite (slow suites: RTC_SLOW=1, see docs/testing.md).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
