"""Generation through diffmem's sampling core (the function behind ``diffmem generate``), with the
hooks a run is given by name (:func:`build_hooks`: ``--detect NAME``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from diffmem.core.sampling import Hook, SampleResult, sample, seeded_generators
from diffmem.models.adapter import ModelAdapter, load_adapter
from diffmem.runtime.defaults import SAMPLING
from diffmem.runtime.errors import PromptError


def check_hook_names(*, detect: str | None = None, mitigate: str | None = None) -> None:
    """One clear error for an unknown detector or a bad mitigation spec, before any work."""
    if detect is not None:
        from diffmem.detect.registry import DETECTORS

        DETECTORS.get(detect)
    if mitigate is not None:
        from diffmem.mitigate import parse_spec

        parse_spec(mitigate)


def build_hooks(*, detect: str | None = None, mitigate: str | None = None,
                adapter: ModelAdapter | None = None, index=None, threshold: float | None = None,
                seed: int = 0, num_inference_steps: int = SAMPLING.steps,
                guidance_scale: float = SAMPLING.guidance_scale) -> list[Hook]:
    """The hooks of a generation run, made from registry names; the one place names become hooks.

    ``mitigate``: a spec of :mod:`diffmem.mitigate` (``"ren"``, ``"ren:1.5,amg"``, ``"auto"``);
    needs ``adapter`` (and ``index`` for AMG, ``threshold`` for models other than the testbed).
    What each method did to each prompt lands in ``result.records["mitigation.NAME"]``.
    ``detect``: a detector of :data:`diffmem.detect.registry.DETECTORS` (``noise_magnitude`` or
    ``noise-magnitude``, ...), configured for a run of ``num_inference_steps`` at
    ``guidance_scale``; its per-prompt scores land in ``result.records[hook.name]``
    (``preview_replication`` checks the run's own final images against ``index``).
    """
    hooks: list[Hook] = []
    if mitigate is not None:
        from diffmem.mitigate import MitigationContext, build_mitigations
        from diffmem.runtime.errors import ConfigError

        if adapter is None:
            raise ConfigError("build_hooks(mitigate=...) needs the adapter")
        index = _load_index(index)
        hooks.extend(build_mitigations(mitigate, MitigationContext(
            adapter, threshold=threshold, index=index, seed=seed)))
    if detect is not None:
        from diffmem.detect.registry import make_detector

        hooks.append(make_detector(detect, index=_load_index(index),
                                   num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale))
    return hooks


def build_guard(mitigate: str | None, *, adapter: ModelAdapter, index=None,
                threshold: float | None = None, seed: int = 0):
    """The closed-loop :class:`~diffmem.mitigate.guard.Guard` when ``mitigate`` names ``auto``
    (alone: the default ladder; ``auto,ren:1.5``: those methods first), else ``None`` (the spec's
    methods run as hooks, :func:`build_hooks`)."""
    if mitigate is None:
        return None
    from diffmem.mitigate import parse_spec

    parsed = parse_spec(mitigate)
    if not any(name == "auto" for name, _ in parsed):
        return None
    from diffmem.mitigate.registry import refuse_text_only

    refuse_text_only(mitigate, adapter)
    from diffmem.mitigate.guard import guard_for_spec
    from diffmem.mitigate.registry import MitigationContext

    index = _load_index(index)
    context = MitigationContext(adapter, threshold=threshold, index=index, seed=seed)
    return guard_for_spec(mitigate, adapter, index=index, threshold=threshold, context=context)


def image_jobs(prompts: Sequence[str], seed: int = 0, images_per_prompt: int | None = None
               ) -> tuple[list[str], list[int]]:
    """The (prompt, seed) of every image: without ``images_per_prompt`` one image per prompt, prompt
    ``i`` with seed ``seed + i``; with it, ``images_per_prompt`` images of every prompt, image ``j``
    with seed ``seed + j`` (the convention of the evaluation harnesses)."""
    prompts = list(prompts)
    if images_per_prompt is None:
        return prompts, [seed + i for i in range(len(prompts))]
    if images_per_prompt < 1:
        raise PromptError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    return ([p for p in prompts for _ in range(images_per_prompt)],
            [seed + j for _ in prompts for j in range(images_per_prompt)])


def _load_index(index):
    from diffmem.similarity.index import load_index

    return load_index(index, what="generate")


def generate(prompts: Sequence[str], *, model: str | Path | ModelAdapter = "testbed",
             seed: int = 0, steps: int = SAMPLING.steps,
             guidance_scale: float | None = None,
             scheduler: str | None = None, hooks: Sequence[Hook] = (),
             batch_size: int = 16, images_per_prompt: int | None = None, guard=None,
             on_result: Callable[[int, SampleResult], None] | None = None) -> list[SampleResult]:
    """Generate images: one per prompt (prompt ``i`` with generator seed ``seed + i``), or
    ``images_per_prompt`` per prompt (image ``j`` of every prompt with seed ``seed + j``).

    ``guidance_scale``: default the model's (7.5; 1 for a pixel-space DDPM, whose prompts are
    class labels, ``"class:N"``, or ignored when it is unconditional). ``guard``
    (:func:`build_guard`): every batch goes through the closed-loop guard; its result
    carries one verdict per image in ``records["verdict"]``. Returns one result per batch of
    ``batch_size`` images; ``on_result(k, result)`` is called after each batch (``k``: index of its
    first image), e.g. to write it at once.
    """
    from diffmem.runtime.progress import progress

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    import warnings

    from diffmem.models.adapter import TruncationWarning, quiet_truncation

    adapter = load_adapter(model, scheduler=scheduler)
    if guidance_scale is None:
        guidance_scale = adapter.default_guidance_scale
    with quiet_truncation():  # one warning for the run, not one per batch
        truncated = adapter.tokenize(prompts).truncated
    if any(truncated):
        warnings.warn(f"{sum(truncated)} of {len(prompts)} prompt(s) exceed the text encoder's "
                      f"{adapter.max_length} tokens and were truncated (generations.jsonl: "
                      "'truncated')", TruncationWarning, stacklevel=2)
    texts, seeds = image_jobs(prompts, seed, images_per_prompt)
    if guard is not None and images_per_prompt:  # a prompt's images in one call: the guard
        batch_size = max(images_per_prompt,  # compares them with each other
                         batch_size - batch_size % images_per_prompt)
    results = []
    with quiet_truncation(), progress(len(texts), "generate", unit="img") as bar:
        for k in range(0, len(texts), batch_size):
            chunk, chunk_seeds = texts[k : k + batch_size], seeds[k : k + batch_size]
            if guard is not None:  # a GuardResult: images, truncated, records["verdict"]
                res = guard.generate(chunk, chunk_seeds, num_inference_steps=steps,
                                     guidance_scale=guidance_scale)
            else:
                gens = seeded_generators(chunk_seeds, adapter.device)
                res = sample(adapter, chunk, num_inference_steps=steps,
                             guidance_scale=guidance_scale, generator=gens, hooks=hooks)
            results.append(res)
            if on_result is not None:
                on_result(k, res)
            bar.update(len(chunk))
    return results


def separate_detection(detect: str | None, *, num_inference_steps: int, guidance_scale: float,
                       scheduler: str | None) -> str | None:
    """Why ``generate --detect`` must score apart from the run (a one-line note), or ``None`` when
    the run's schedule is the detector's own and its scores come free from the run.

    A detector's score depends on the schedule (the first step of a 5-step DDIM schedule is
    t = 801, of a 50-step one t = 981), so scores are only comparable with ``diffmem detect`` and
    its calibrated thresholds when taken with the detector's settings."""
    if detect is None:
        return None
    from diffmem.detect.registry import DETECTORS, make_detector

    if DETECTORS.get(detect)[0].needs_index:
        return None  # it checks the run's own final images, whatever the schedule
    det = make_detector(detect)
    mine = (det.num_inference_steps, det.guidance_scale, det.scheduler)
    run = (num_inference_steps, guidance_scale, scheduler)
    if mine == run:
        return None
    return (f"--detect {detect}: this run's schedule ({num_inference_steps} steps, guidance "
            f"{guidance_scale:g}, scheduler {scheduler or 'default'}) is not the detector's "
            f"({mine[0]} steps, guidance {mine[1]:g}, scheduler {mine[2] or 'default'}); scoring "
            "apart with the detector's settings on each image's initial noise")


def score_separately(detect: str, adapter: ModelAdapter, prompts: Sequence[str], *,
                     seed: int = 0) -> dict[str, list[float]]:
    """Scores of ``detect`` with its own settings, prompt ``i`` on the initial noise of seed
    ``seed + i`` (the generation's), as ``{detector name: [score per prompt]}``."""
    from diffmem.detect.registry import make_detector

    det = make_detector(detect, seed=seed, seed_mode="per-prompt")
    return {det.name: [float(s) for s in det.score(adapter, list(prompts))]}


class GenerationWriter:
    """Writes a generation run as it goes: ``out/NNNN.png`` per image and one line per image of
    ``out/generations.jsonl`` (prompt, seed, file, truncated, per-prompt records, ``extra``
    columns). What was written stays valid after an interruption."""

    def __init__(self, out: str | Path, prompts: Sequence[str], *, seed: int = 0,
                 seeds: Sequence[int] | None = None,
                 extra: dict[str, list] | None = None) -> None:
        self.out = Path(out)
        self.prompts = list(prompts)
        self.seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        self.extra = extra or {}
        self.count = 0
        self.paths: list[Path] = []
        self._file = None

    def __enter__(self) -> GenerationWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = (self.out / "generations.jsonl").open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def add(self, k: int, res: SampleResult) -> None:
        from diffmem.runtime.interrupts import kept
        from diffmem.runtime.jsonio import dumps

        for j, img in enumerate(res.pil()):
            i = k + j
            path = self.out / f"{i:04d}.png"
            img.save(path)
            self.paths.append(path)
            row = {"prompt": self.prompts[i], "seed": self.seeds[i], "file": path.name,
                   "truncated": res.truncated[j]}
            row.update(_records_row(res.records, j))
            row.update({name: values[i] for name, values in self.extra.items()})
            self._file.write(dumps(row) + "\n")
            self.count += 1
        self._file.flush()
        kept(f"{self.count} of {len(self.prompts)} images with their generations.jsonl lines "
             f"in {self.out}", key=f"generate:{self.out}")


def save_results(prompts: Sequence[str], results: Sequence[SampleResult], out: str | Path,
                 *, seed: int = 0) -> list[Path]:
    """Write ``out/NNNN.png`` per image and ``out/generations.jsonl`` (prompt, seed, file, records)."""
    with GenerationWriter(out, prompts, seed=seed) as writer:
        k = 0
        for res in results:
            writer.add(k, res)
            k += len(res.truncated)
    return writer.paths


def _records_row(records: dict, j: int) -> dict:
    """Per-image entries of hook records that are per-prompt lists/tensors (e.g. detector scores)."""
    row = {}
    for name, value in records.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list) and j < len(value):
            row[name] = value[j]
    return row
