"""Fault injection for the Ray engine's recovery test: a scan actor whose process dies once.

``crashing_scan_actor(marker, when)`` is a :class:`diffmem.scale.ray_engine.ScanActor` that, on
the first shard it scores while ``marker`` does not exist, creates ``marker`` and kills its own
process (``os._exit``) right before (``when="before"``: after scoring) or right after
(``when="after"``) writing the shard file. The test puts it in place of ``ScanActor``
(``monkeypatch.setattr(ray_engine, "ScanActor", ...)``). The class is made inside a function, so
Ray ships it to the workers by value: they need not import this test module.
"""

from __future__ import annotations

from pathlib import Path

from diffmem.scale.ray_engine import ScanActor


def crashing_scan_actor(marker: str | Path, when: str) -> type:
    if when not in ("before", "after"):
        raise ValueError(f"when must be 'before' or 'after', got {when!r}")
    marker = str(marker)

    class CrashingScanActor(ScanActor):
        def __init__(self, job, scorer):
            super().__init__(job, scorer)
            scorer = self.scorer
            # "before": the shard is scored but not written; "after": it is written (renamed)
            method = "score_records" if when == "before" else "run_shard"
            inner = getattr(scorer, method)

            def crash_after(*args, **kwargs):
                import os
                from pathlib import Path

                result = inner(*args, **kwargs)
                if not Path(marker).exists():
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(17)
                return result

            setattr(scorer, method, crash_after)

    return CrashingScanActor
