"""The import-linter contracts of setup.cfg hold: imports point down, the pure core does no I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept() -> None:
    # --no-cache: the check leaves no .import_linter_cache behind in the work tree.
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "setup.cfg"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
