"""The configuration reference, `rtc serve --help` and the settings cannot drift apart."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from rtc.config import Settings, reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(--[a-z-]+)` \| (.+?) \| (.+?) \| (.+) \|$", re.MULTILINE)
# Settings that come from the environment systemd sets, never from a flag.
ENVIRONMENT_ONLY = {"notify_socket", "watchdog_usec"}


def rows() -> list[tuple[str, list[str], str, str]]:
    return [
        (flag, re.findall(r"`([A-Z_]+)`", env), default, meaning)
        for flag, env, default, meaning in ROW.findall(DOC.read_text())
    ]


def help_text(*command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "rtc", *command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    return "".join(out.split())  # argparse wraps lines (and at hyphens): compare without blanks


def test_reference_is_generated_from_the_options_table() -> None:
    assert DOC.read_text() == reference(), "docs/configuration.md is stale: run `python scripts/configdoc.py`"


def test_every_setting_has_a_documented_flag_and_variable() -> None:
    documented = {flag for flag, *_ in rows()}
    settable = {f.name for f in dataclasses.fields(Settings)} - ENVIRONMENT_ONLY
    assert {"--" + name.replace("_", "-") for name in settable} <= documented
    for flag, env, default, meaning in rows():
        assert env[0] == "RTC_" + flag[2:].replace("-", "_").upper(), flag
        assert default and meaning, flag


def test_serve_help_shows_each_default_and_variable() -> None:
    shown = help_text("serve")
    for flag, env, default, meaning in rows():
        described = f"{meaning} [default: {default}; env {', '.join(env)}]"
        assert flag in shown and "".join(described.split()) in shown, flag


def test_token_help_describes_each_option() -> None:
    shown = help_text("token").replace("`", "")
    for described in (
        "--userUSERthesubject(subclaim):whoconnects",
        "roomsthetokenmayjoin,asglobpatterns(news,team.*);default:noclaim,anyroom",
        "--adminaddadmin:true:the/adminAPIandthedashboard",
        "--ttlTTLlifetimeinseconds(default3600)",
        "--jwt-secret-fileFILEreadtheHMACsecretfromFILE",
    ):
        assert described in shown, described
