"""Library code draws with matplotlib's object-oriented API: it never picks or changes the user's
backend (no ``matplotlib.use``, no pyplot); only the command line might."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import diffmem

SRC = Path(diffmem.__file__).parent

_PLOT_ALL = """
import matplotlib
matplotlib.use("svg")
import sys
import numpy as np
from diffmem.eval.detection import plot_roc
from diffmem.explain import TokenAttribution
from diffmem.explain._render import _png

attr = TokenAttribution("a red circle", ("a", "red", "circle"), np.array([0.2, 0.5, 0.3]),
                        ("a", "red", "circle"), np.array([0.2, 0.5, 0.3]), np.ones(3), 1.0)
fig = attr.plot()
fig.savefig(sys.argv[1] + "/attr.png")
assert _png(fig)
plot_roc([True, False, True, False], [0.9, 0.1, 0.7, 0.4], sys.argv[1] + "/roc.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_plots_leave_the_backend_alone(tmp_path):
    # a fresh interpreter: whether pyplot got imported must not depend on other tests
    res = subprocess.run([sys.executable, "-c", _PLOT_ALL, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["svg", "False"]
    assert (tmp_path / "attr.png").stat().st_size > 0 and (tmp_path / "roc.png").stat().st_size > 0


def test_no_backend_choice_in_library_code():
    pattern = re.compile(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import "
                         r"pyplot")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.parent != SRC / "cli"
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    assert (SRC / "cli").is_dir()  # the one place allowed to choose (it does not need to)
