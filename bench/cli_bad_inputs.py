"""Replays tests/test_cli.py::BAD_INPUTS and prints the markdown table of docs/cli.md (the exit code
and the one stderr line of each bad input, paths shortened).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/cli_bad_inputs.py > table.md
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import tempfile
from pathlib import Path

from diffmem.cli import main

NAMES = {"tmp": "out", "txt": "prompts.txt", "file": "notes.txt", "empty": "empty",
         "emptytxt": "blank.txt", "csv": "table.csv", "tiny": "sd-folder",
         "other": "kandinsky-folder"}


def _tests_module(name: str, relpath: str):
    """A module of the tests folder, loaded by its path (tests/ is no package)."""
    path = Path(__file__).parents[1] / "tests" / relpath
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases() -> list:
    return _tests_module("test_cli", "test_cli.py").BAD_INPUTS


def _places(d: Path, tiny: Path) -> dict:
    for sub in ("scratch", "empty", "other"):
        (d / sub).mkdir()
    (d / "p.txt").write_text("a red circle\n")
    (d / "exists.txt").write_text("x")
    (d / "none.txt").write_text("\n")
    (d / "t.csv").write_text("id,text\n1,a red circle\n")
    (d / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    return {"tmp": d / "scratch", "txt": d / "p.txt", "file": d / "exists.txt",
            "empty": d / "empty", "emptytxt": d / "none.txt", "csv": d / "t.csv", "tiny": tiny,
            "other": d / "other"}


def main_table() -> str:
    base = Path(tempfile.mkdtemp(prefix="cli-doc-"))
    try:
        tiny = base / "tiny"
        tiny_models = _tests_module("tiny_models", "fixtures/tiny_models.py")
        tiny_models.make_tiny_pipeline("sd1").save_pretrained(tiny)
        rows = []
        for case_id, argv, _ in _cases():
            d = base / case_id
            d.mkdir()
            places = _places(d, tiny)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main([a.format(**places) for a in argv])
            line = next(ln for ln in err.getvalue().splitlines() if ln.strip())
            for key, value in places.items():
                line = line.replace(str(value), NAMES[key])
            shown = " ".join(a.format(**NAMES) for a in argv)
            line = line.replace("|", "\\|")
            rows.append(f"| `{case_id}` | `diffmem {shown}` | {rc} | {line} |")
        return "\n".join(rows)
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    print(main_table())
