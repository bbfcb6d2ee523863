"""The README runs as printed: every python block is a complete program (run here, extracted
from the README at test time), a test module (run with pytest and the ipcbus plugin), or
visibly a fragment; and the reference docstrings list every parameter with its default."""
from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys
from typing import Any, Callable

import pytest

from ipcbus import IpcBusBridge, IpcBusBroker, IpcBusClient
from ipcbus.broker import HubOptions

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
MAIN_GUARD = 'if __name__ == "__main__":'
FRAGMENT = "# fragment:"
TEST_MODULE = re.compile(r"# (test_\w+\.py)")

PROGRAMS = [b for b in BLOCKS if MAIN_GUARD in b]
TESTS = [b for b in BLOCKS if TEST_MODULE.match(b)]
# The stdout of each complete program, in README order (a new program needs its line here).
EXPECTED = [
    ["alice says 'hello' 1", "5"],                                            # the tour
    ["5"],                                                                    # the bridge
    ["[0, 0, 1, 3, 6, 10, 15, 21, 28, 36, 45, 55]"],                          # worker pools
    ["[[0, 0], [1, 1], [2, 2], [0, 3]]"],                                     # request groups
    ["['w0', 'w1', 'w2']", "True 30.0"],                                      # gathering
    ["5 2 ['add', 'div']", "calc.div() failed: ZeroDivisionError: division by zero"],  # services
    ["['0 by w1', '1 by w0', '2 by w1']", "True"],                           # service pools
    ["True True"],                                                            # reconnection
    ["True []"],                                                              # the broker
]


def test_every_block_is_a_program_a_test_or_a_fragment() -> None:
    assert len(BLOCKS) >= 7
    for block in BLOCKS:
        kinds = [MAIN_GUARD in block, bool(TEST_MODULE.match(block)),
                 block.startswith(FRAGMENT)]
        assert sum(kinds) == 1, f"unclassified README block:\n{block}"
    assert len(PROGRAMS) == len(EXPECTED), "a README program without its expected output"
    assert TESTS, "the testing kit's example test is missing"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("index", range(len(PROGRAMS)))
def test_readme_program_runs(tmp_path: pathlib.Path, index: int) -> None:
    code = PROGRAMS[index].replace("/tmp/app.bus", str(tmp_path / "app.bus"))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=80, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == EXPECTED[index]
    assert not (tmp_path / "app.bus").exists(), "the program left its socket file behind"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("index", range(len(TESTS)))
def test_readme_test_module_passes(tmp_path: pathlib.Path, index: int) -> None:
    match = TEST_MODULE.match(TESTS[index])
    assert match is not None
    (tmp_path / match.group(1)).write_text(TESTS[index])
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ipcbus.pytest_plugin",
                          "-p", "no:cacheprovider", match.group(1)],
                         capture_output=True, text=True, timeout=80, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\b[1-9]\d* passed\b", out.stdout), out.stdout


# what an example must print (its lines, a prefix of the last one for what varies)
EXAMPLE_OUTPUT = {
    "pool_jobs.py": [f"job {j}: 10 steps done" for j in range(6)] + ["job 99: cancelled after "],
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("example", ["pool_workers.py", "direct_channel.py", "pool_jobs.py"])
def test_examples_run_as_is(example: str) -> None:
    path = README.parent / "examples" / example
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=80)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the example printed nothing"
    expected = EXAMPLE_OUTPUT.get(example)
    if expected is not None:
        lines = out.stdout.splitlines()
        assert lines[:-1] == expected[:-1], out.stdout
        assert lines[-1].startswith(expected[-1]), out.stdout


# -- help() carries the reference ----------------------------------------------------------------
def _documented(func: Callable[..., Any], names: list[str]) -> None:
    doc = inspect.getdoc(func) or ""
    assert "README" not in doc, f"{func.__qualname__} sends the reader elsewhere"
    for name in names:
        # each parameter has an entry "- ``name``..." that says its default
        entry = re.search(rf"^- (``\w+``, )*``{name}``.*?(?=^- |^\S|\Z)", doc, re.M | re.S)
        assert entry is not None, f"{func.__qualname__}: {name} is not documented"
        assert "default" in entry.group(0).lower(), f"{func.__qualname__}: {name}'s default"


def _parameters(func: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(func).parameters.values()
            if p.name != "self" and p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("func", [IpcBusClient.connect, IpcBusBroker.connect,
                                  IpcBusBridge.connect])
def test_connect_docstrings_list_every_parameter(func: Callable[..., Any]) -> None:
    _documented(func, _parameters(func))


def test_create_docstrings_list_every_option() -> None:
    options = _parameters(HubOptions.__init__)
    _documented(IpcBusBroker.create, options + ["context"])
    _documented(IpcBusBridge.create, [o for o in options
                                      if o not in ("allowed_uids", "traffic_log", "links", "ecipc",
                                                   "federation", "bus", "federation_options")])
    for unit in ("bytes", "seconds"):
        assert unit in (IpcBusBroker.create.__doc__ or "")
