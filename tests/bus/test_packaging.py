"""Packaging: the MIT license file ships in the sdist, with the metadata a user's tools read."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_license_file() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 The ipcbus authors" in text


@pytest.mark.timeout(120)
def test_sdist_ships_the_license_and_classifiers(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("setuptools")
    out = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                          "sdist", "-d", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    (archive,) = tmp_path.glob("ipcbus-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        assert {"LICENSE", "ipcbus/py.typed", "ipcbus/testing.py",
                "ipcbus/pytest_plugin.py"} <= names
        member = tar.extractfile(f"{archive.name[:-len('.tar.gz')]}/PKG-INFO")
        assert member is not None
        info = member.read().decode()
    for line in ("License-File: LICENSE", "Classifier: License :: OSI Approved :: MIT License",
                 "Classifier: Typing :: Typed", "Classifier: Programming Language :: Python :: 3.10",
                 "Classifier: Programming Language :: Python :: 3.13"):
        assert line in info, line
