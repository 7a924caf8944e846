"""Write docs/configuration.md from the options table in rtc/config.py (of this checkout)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's rtc, whichever one the venv installed

from rtc.config import reference  # noqa: E402

target = REPO / "docs" / "configuration.md"
target.write_text(reference())
print(f"wrote {target}")
