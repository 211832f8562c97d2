"""Generation through diffmem's sampling core (the function behind ``diffmem generate``), with the
hooks a run is given by name (:func:`build_hooks`: ``--detect NAME``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diffmem.core.sampling import Hook, SampleResult, sample, seeded_generators
from diffmem.errors import PromptError
from diffmem.models.adapter import ModelAdapter, load_adapter


def check_hook_names(*, detect: str | None = None, mitigate: str | None = None) -> None:
    """One clear error for an unknown detector or a bad mitigation spec, before any work."""
    if detect is not None:
        from diffmem.detect.registry import DETECTORS
        from diffmem.naming import lookup

        lookup(DETECTORS, detect, "detector")
    if mitigate is not None:
        from diffmem.mitigate import parse_spec

        parse_spec(mitigate)


def build_hooks(*, detect: str | None = None, mitigate: str | None = None,
                adapter: ModelAdapter | None = None, index=None, threshold: float | None = None,
                seed: int = 0, num_inference_steps: int = 50,
                guidance_scale: float = 7.5) -> list[Hook]:
    """The hooks of a generation run, made from registry names; the one place names become hooks.

    ``mitigate``: a spec of :mod:`diffmem.mitigate` (``"ren"``, ``"ren:1.5,amg"``, ``"auto"``);
    needs ``adapter`` (and ``index`` for AMG, ``threshold`` for models other than the testbed).
    What each method did to each prompt lands in ``result.records["mitigation.NAME"]``.
    ``detect``: a detector of :data:`diffmem.detect.registry.DETECTORS` (``noise_magnitude`` or
    ``noise-magnitude``, ...), configured for a run of ``num_inference_steps`` at
    ``guidance_scale``; its per-prompt scores land in ``result.records[hook.name]``.
    """
    hooks: list[Hook] = []
    if mitigate is not None:
        from diffmem.errors import ConfigError
        from diffmem.mitigate import MitigationContext, build_mitigations

        if adapter is None:
            raise ConfigError("build_hooks(mitigate=...) needs the adapter")
        if isinstance(index, (str, Path)):
            from diffmem.similarity.index import TrainingIndex

            index = TrainingIndex.load(index)
        hooks.extend(build_mitigations(mitigate, MitigationContext(
            adapter, threshold=threshold, index=index, seed=seed)))
    if detect is not None:
        from diffmem.detect.registry import make_detector

        hooks.append(make_detector(detect, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale))
    return hooks


def generate(prompts: Sequence[str], *, model: str | Path | ModelAdapter = "testbed",
             seed: int = 0, steps: int = 50, guidance_scale: float = 7.5,
             scheduler: str | None = None, hooks: Sequence[Hook] = (),
             batch_size: int = 16) -> list[SampleResult]:
    """Generate one image per prompt; prompt ``i`` uses generator seed ``seed + i``.

    Returns one :class:`SampleResult` per batch of ``batch_size`` prompts.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    adapter = load_adapter(model, scheduler=scheduler)
    results = []
    for k in range(0, len(prompts), batch_size):
        chunk = prompts[k : k + batch_size]
        gens = seeded_generators(range(seed + k, seed + k + len(chunk)), adapter.device)
        results.append(sample(adapter, chunk, num_inference_steps=steps,
                              guidance_scale=guidance_scale, generator=gens, hooks=hooks))
    return results


def save_results(prompts: Sequence[str], results: Sequence[SampleResult], out: str | Path,
                 *, seed: int = 0) -> list[Path]:
    """Write ``out/NNNN.png`` per image and ``out/generations.jsonl`` (prompt, seed, file, records)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with (out / "generations.jsonl").open("w", encoding="utf-8") as f:
        k = 0
        for res in results:
            for j, img in enumerate(res.pil()):
                path = out / f"{k:04d}.png"
                img.save(path)
                paths.append(path)
                row = {"prompt": prompts[k], "seed": seed + k, "file": path.name,
                       "truncated": res.truncated[j]}
                row.update(_records_row(res.records, j))
                f.write(json.dumps(row) + "\n")
                k += 1
    return paths


def _records_row(records: dict, j: int) -> dict:
    """Per-image entries of hook records that are per-prompt lists/tensors (e.g. detector scores)."""
    row = {}
    for name, value in records.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list) and j < len(value):
            row[name] = value[j]
    return row
