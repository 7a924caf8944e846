"""rtc's distributions carry `/client.js` itself, not the repository's symlink to it.

`rtc/static/client.js` is a symlink to the JavaScript SDK (`clients/js/src/rtc-client.js`),
so the SDK has one source. Whatever is built from a copy of the tree must hold the file:
the sdist, the wheel (built from the sdist, as `python -m build` does) and the container
image, whose build stage copies only what `deploy/k8s/Containerfile` names; a link left
dangling there is skipped without an error, and the image then answers `/client.js` 500.
Built offline with the setuptools of this environment (`build_py` is the step of a wheel
build that puts the package's files in place).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
SDK = REPO / "clients" / "js" / "src" / "rtc-client.js"
CONTAINERFILE = REPO / "deploy" / "k8s" / "Containerfile"


def setuptools(tree: Path, *args: str) -> None:
    """Run a setuptools command in `tree` (its setup.cfg), as a PEP 517 build would."""
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", *args],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=100,
    )


def built_client_js(tree: Path, out: Path) -> Path:
    """`rtc/static/client.js` as a wheel built from `tree` would install it."""
    setuptools(tree, "build_py", "--build-lib", str(out))
    return out / "rtc" / "static" / "client.js"


def test_the_repository_keeps_one_source_of_the_sdk() -> None:
    link = REPO / "rtc" / "static" / "client.js"
    assert link.is_symlink() and link.resolve() == SDK


def test_sdist_and_the_wheel_built_from_it_carry_client_js(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(".*", "*.egg-info", "__pycache__")
    )
    setuptools(tree, "sdist", "--dist-dir", str(tmp_path / "dist"))
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        (member,) = [m for m in archive.getmembers() if m.name.endswith("/rtc/static/client.js")]
        assert member.isfile(), "a link in the sdist: unpacked elsewhere it points at nothing"
        reader = archive.extractfile(member)
        assert reader is not None and reader.read() == SDK.read_bytes()
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    installed = built_client_js(unpacked, tmp_path / "wheel")
    assert not installed.is_symlink() and installed.read_bytes() == SDK.read_bytes()


def test_the_container_build_stage_carries_client_js(tmp_path: Path) -> None:
    """Copy what the Containerfile's build stage copies (links as links, like COPY) and build."""
    build_stage = CONTAINERFILE.read_text().split("\nFROM ")[1]  # the first FROM's lines
    context = tmp_path / "src"
    context.mkdir()
    for line in re.findall(r"^COPY (.+)$", build_stage, re.MULTILINE):
        *sources, target = line.split()
        for source in sources:
            origin = REPO / source
            destination = context / target / origin.name if target.endswith("/") else context / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(
                    origin, destination, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(origin, destination, follow_symlinks=False)
    installed = built_client_js(context, tmp_path / "wheel")
    assert installed.is_file(), "the image would have no /client.js"
    assert installed.read_bytes() == SDK.read_bytes()
