"""The limits script (``.ci/limits.py``) counts what the standards say, on small packages
written for each case: physical lines of a module; ``end_lineno - lineno + 1`` of a class or
function, decorators excluded, nested ones and methods included; import cycles through any
import (relative, absolute, in a function, under ``TYPE_CHECKING``); the pure modules'
imports. Then the script as ``.ci/run`` runs it: one line per violation, a summary, exit 1.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import limits

SCRIPT = Path(limits.__file__).resolve()
CLEAN_PURE = {"_protocol.py": "import struct\n", "_router.py": "from . import _protocol\n"}


def make_package(root: Path, files: dict[str, str], name: str = "pkg") -> Path:
    """A package ``root/name`` with the pure modules (clean) and ``files`` (relative paths)."""
    package = root / name
    for rel, text in {"__init__.py": "", **CLEAN_PURE, **files}.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def function(name: str, lines: int, indent: str = "", decorators: int = 0) -> str:
    """A function whose def statement spans exactly ``lines`` lines (decorators apart)."""
    assert lines >= 2
    head = [f"{indent}@staticmethod"] * decorators + [f"{indent}def {name}() -> None:"]
    body = [f"{indent}    x = {i}" for i in range(lines - 1)]
    return "\n".join(head + body) + "\n"


def rendered(package: Path) -> list[str]:
    return [v.render(package.parent) for v in limits.check(package)]


# -- sizes -------------------------------------------------------------------------------------
def test_a_module_is_measured_in_physical_lines(tmp_path: Path) -> None:
    ok = "# comment\n\n" * 300  # 600 lines, blank and comment lines count
    assert limits.physical_lines(ok) == 600
    assert limits.physical_lines(ok + "x = 1") == 601  # a last line without its newline
    assert limits.physical_lines("") == 0
    package = make_package(tmp_path, {"ok.py": ok, "big.py": ok + "x = 1\n"})
    assert rendered(package) == ["pkg/big.py:1 module 601>600"]


def test_a_function_of_80_lines_passes_and_81_does_not(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"f.py": function("fine", 80) + "\n" + function("long", 81)})
    assert rendered(package) == ["pkg/f.py:82 function long 81>80"]


def test_decorators_are_not_counted(tmp_path: Path) -> None:
    text = "class C:\n" + function("m", 80, indent="    ", decorators=3)
    package = make_package(tmp_path, {"d.py": text})
    assert rendered(package) == []
    text = "class C:\n" + function("m", 81, indent="    ", decorators=3)
    package = make_package(tmp_path / "again", {"d.py": text})
    assert rendered(package) == ["pkg/d.py:5 function C.m 81>80"]


def test_methods_nested_functions_and_async_ones_are_counted(tmp_path: Path) -> None:
    inner = function("inner", 81, indent="        ")
    text = ("class Outer:\n"
            "    def method(self) -> None:\n"
            + inner +
            "    class Inner:\n"
            + function("deep", 90, indent="        ")
            + function("top", 85).replace("def top", "async def top"))
    package = make_package(tmp_path, {"n.py": text})
    assert rendered(package) == [
        "pkg/n.py:2 function Outer.method 82>80",  # its nested function's lines are its own
        "pkg/n.py:3 function Outer.method.inner 81>80",
        "pkg/n.py:85 function Outer.Inner.deep 90>80",
        "pkg/n.py:175 function top 85>80",
    ]


def test_a_class_of_350_lines_passes_and_351_does_not(tmp_path: Path) -> None:
    def klass(name: str, lines: int) -> str:
        return f"class {name}:\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    package = make_package(tmp_path, {"c.py": klass("Fine", 350), "d.py": klass("Big", 351)})
    assert rendered(package) == ["pkg/d.py:1 class Big 351>350"]


def test_subpackages_are_checked(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"sub/__init__.py": "", "sub/deep/m.py": function("f", 99)})
    assert rendered(package) == ["pkg/sub/deep/m.py:1 function f 99>80"]


# -- import cycles -----------------------------------------------------------------------------
def test_every_kind_of_import_makes_an_edge(tmp_path: Path) -> None:
    package = make_package(tmp_path, {
        "a.py": "def f() -> None:\n    from . import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import X\n",
        "c.py": "import pkg.sub.d\nimport os\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import f\nfrom .e import g\nfrom pkg import b\n",
        "sub/e.py": "from . import d as _d\n",
    })
    graph = limits.import_graph(package)
    assert graph["a"] == {"b": 2}
    assert graph["b"] == {"c": 3}
    assert graph["c"] == {"sub": 1, "sub.d": 1}
    assert graph["sub.d"] == {"a": 1, "sub.e": 2, "b": 3}
    assert graph["sub.e"] == {"sub.d": 1}  # not its own package, imported already
    assert graph[""] == {}  # the package's __init__
    assert limits.find_cycle(graph) == ["a", "b", "c", "sub.d", "a"]
    assert rendered(package) == [
        "pkg/a.py:2 import cycle a -> b -> c -> sub.d -> a"
        " (one of 5 modules importing each other: a, b, c, sub.d, sub.e)",
    ]


def test_each_group_of_modules_in_a_cycle_is_reported_once(tmp_path: Path) -> None:
    package = make_package(tmp_path, {
        "a.py": "from . import b\n", "b.py": "from . import a\n",
        "c.py": "import pkg.d\n", "d.py": "\n\nfrom pkg.c import x\n",
        "e.py": "from . import a, c\n",  # imports both cycles, is in none
    })
    assert rendered(package) == ["pkg/a.py:1 import cycle a -> b -> a",
                                 "pkg/c.py:1 import cycle c -> d -> c"]


def test_a_subpackage_and_its_modules(tmp_path: Path) -> None:
    """``from . import module`` inside a subpackage depends on that module only (the
    subpackage is being imported already); ``from . import name`` depends on its
    ``__init__``, and a cycle through it is one."""
    package = make_package(tmp_path, {"sub/__init__.py": "from .m import run\n",
                                      "sub/m.py": "from . import helper\nrun = 1\n",
                                      "sub/helper.py": "",
                                      "user.py": "from .sub.helper import x\n"})
    graph = limits.import_graph(package)
    assert graph["sub"] == {"sub.m": 1}
    assert graph["sub.m"] == {"sub.helper": 1}
    assert graph["user"] == {"sub": 1, "sub.helper": 1}  # importing sub.helper runs sub
    assert rendered(package) == []
    (package / "sub" / "helper.py").write_text("from . import run\n")
    assert rendered(package) == ["pkg/sub/__init__.py:1 import cycle sub -> sub.m -> sub.helper"
                                 " -> sub"]


def test_importing_the_package_itself_is_not_a_cycle(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"__init__.py": "from .a import A\nfrom .b import B\n",
                                      "a.py": "from pkg import b\nA = 1\n",
                                      "b.py": "import pkg\nB = 2\n"})
    assert limits.import_graph(package)[""] == {"a": 1, "b": 2}
    assert rendered(package) == []


# -- the pure modules --------------------------------------------------------------------------
@pytest.mark.parametrize("line", ["import socket", "from threading import Lock",
                                  "import select as s", "import ctypes.util",
                                  "from selectors import DefaultSelector"])
def test_the_pure_modules_import_no_io(tmp_path: Path, line: str) -> None:
    text = f"import struct\n\n\ndef f() -> None:\n    {line}\n"
    package = make_package(tmp_path, {"_router.py": text})
    module = line.split()[1]
    assert rendered(package) == [f"pkg/_router.py:5 imports {module} (the module must stay pure)"]


def test_a_missing_pure_module_is_reported(tmp_path: Path) -> None:
    package = make_package(tmp_path, {})
    (package / "_protocol.py").unlink()
    assert rendered(package) == ["pkg/_protocol.py:0 missing: the pure module cannot be checked"]


def test_other_modules_may_do_io(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"_transport.py": "import socket\nimport threading\n",
                                      "_router.py": "from ._transport import socket\n"})
    assert rendered(package) == []


# -- the script, as .ci/run runs it ------------------------------------------------------------
def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_the_script_prints_each_violation_and_a_summary_and_exits_1(tmp_path: Path) -> None:
    package = make_package(tmp_path, {
        "big.py": "x = 1\n" * 601,
        "a.py": "from . import b\n" + function("long", 81),
        "b.py": "from .a import long\n",
        "_protocol.py": "import socket\n",
    })
    done = run(package, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "pkg/a.py:2 function long 81>80",
        "pkg/big.py:1 module 601>600",
        "pkg/a.py:1 import cycle a -> b -> a",
        "pkg/_protocol.py:1 imports socket (the module must stay pure)",
        "limits: 4 violation(s) in pkg/ (6 modules; modules <= 600 lines, classes <= 350,"
        " functions <= 80; no import cycle; _protocol and _router pure)",
    ]


def test_the_script_exits_0_on_a_clean_package(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"fine.py": function("f", 80)})
    done = run(package, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("limits: ok, pkg/ (4 modules;")


def test_the_script_refuses_bad_arguments(tmp_path: Path) -> None:
    assert run("--help", cwd=tmp_path).returncode == 2
    assert run(tmp_path / "nothing", cwd=tmp_path).returncode == 2
    assert run("a", "b", cwd=tmp_path).returncode == 2


def test_the_script_checks_the_real_package_by_default() -> None:
    """What ``.ci/run`` runs: the package next to ``.ci/`` (its verdict is the package's
    business; here: it ran over every module, and what it printed is what ``check`` finds)."""
    done = run(cwd=SCRIPT.parent.parent)
    assert done.returncode in (0, 1), done.stderr
    *lines, summary = done.stdout.splitlines()
    modules = len(list(limits.PACKAGE.rglob("*.py")))
    assert summary.startswith("limits: ") and f"ipcbus/ ({modules} modules;" in summary
    assert lines == [v.render(limits.PACKAGE.parent) for v in limits.check()]
    assert done.returncode == (1 if lines else 0)
