"""The layers of docs/architecture.md hold: the dependency contracts of ``.importlinter`` (run by
``make lint``) pass on the package and fail when an import against the direction is added; no import
cycles; no module imports the package root; no oversized files in src/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffmem"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is a dev dependency")


def _lint(src_root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(src_root), "PATH": "/usr/bin:/bin"}
    shutil.copy(ROOT / ".importlinter", src_root / ".importlinter")  # found in the working folder
    return subprocess.run([str(LINT), "--no-cache"], capture_output=True, text=True, env=env,
                          cwd=src_root, timeout=300)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(SRC, tmp_path / "diffmem", ignore=shutil.ignore_patterns(
        "weights", "weights_graded", "*.jsonl", "__pycache__", "static"))
    return tmp_path


def test_contracts_hold_on_the_package(tmp_path):
    proc = _lint(_copy(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "BROKEN" not in proc.stdout


def test_an_import_against_the_direction_fails_the_lint(tmp_path):
    root = _copy(tmp_path)
    target = root / "diffmem" / "models" / "profile.py"
    # an import inside a function counts as much as one at the top of the module
    target.write_text(target.read_text() + "\n\ndef _upward():\n"
                      "    from diffmem.testbed import testbed_path\n\n    return testbed_path\n")
    proc = _lint(root)
    assert proc.returncode != 0
    assert "diffmem.models is not allowed to import diffmem.testbed" in proc.stdout


def _graph():
    grimp = pytest.importorskip("grimp")
    # imports under `if TYPE_CHECKING:` (annotations only) are no dependency at run time
    return grimp.build_graph("diffmem", exclude_type_checking_imports=True)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_module_imports_the_package_root():
    graph = _graph()
    assert sorted(graph.find_modules_that_directly_import("diffmem")) == []


#: Files allowed over 400 lines, each with the reason docs/architecture.md gives.
LONG_FILES: set[str] = set()


def test_no_file_over_400_lines():
    long = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
            if len(p.read_text(encoding="utf-8").splitlines()) > 400}
    assert long <= LONG_FILES, sorted(long - LONG_FILES)
