"""The README's tour snippet runs as written (the front door stays true)."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.timeout(60)
def test_readme_tour_runs(tmp_path: pathlib.Path) -> None:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    code = code.replace("/tmp/app.bus", str(tmp_path / "app.bus"))
    script = tmp_path / "tour.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["alice says 'hello' 1", "5"]
