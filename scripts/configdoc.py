"""Write docs/configuration.md from the options table in rtc/config.py."""

from pathlib import Path

from rtc.config import reference

target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
target.write_text(reference())
print(f"wrote {target}")
