"""The README's tour snippet runs as written (the front door stays true)."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


RUNNABLE = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
            if 'if __name__ == "__main__":' in block]
EXPECTED = {0: ["alice says 'hello' 1", "5"], 1: ["5"],
            2: ["5 2 ['add', 'div']", "calc.div() failed: ZeroDivisionError: division by zero"]}


def test_readme_has_runnable_snippets() -> None:
    assert len(RUNNABLE) >= 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_snippet_runs(tmp_path: pathlib.Path, index: int) -> None:
    code = RUNNABLE[index].replace("/tmp/app.bus", str(tmp_path / "app.bus"))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == EXPECTED[index]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("example", ["pool_workers.py", "direct_channel.py"])
def test_examples_run_as_is(example: str) -> None:
    path = README.parent / "examples" / example
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=80)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the example printed nothing"
