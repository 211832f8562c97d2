"""``diffmem generate``: the command (its parser lives in :func:`diffmem.cli.build_parser`)."""

from __future__ import annotations

import argparse
import sys

from diffmem.runtime.errors import ConfigError, DiffmemError


def _cmd_generate(a: argparse.Namespace) -> int:
    from diffmem.generate import (
        GenerationWriter,
        build_guard,
        build_hooks,
        check_hook_names,
        generate,
        image_jobs,
        score_separately,
        separate_detection,
    )
    from diffmem.models.adapter import load_adapter

    prompts = list(a.prompts)
    if a.prompts_file is not None:
        from diffmem.detect.prompts import read_prompts

        prompts += read_prompts(a.prompts_file)
    prompts += [f"class:{n}" for n in a.class_label or ()]
    prompts += [""] * (a.num_images or 0)
    if not prompts:
        raise ConfigError("no prompts: give them as arguments or with --prompts-file FILE (a "
                          "DDPM model: --class-label N or --num-images N)")
    if a.guidance_scale is None:
        a.guidance_scale = _default_guidance(a.model)
    texts, seeds = image_jobs(prompts, a.seed, a.images_per_prompt)
    check_hook_names(detect=a.detect, mitigate=a.mitigate)  # before the model loads
    # scores that match `diffmem detect`: in the run when its schedule is the detector's, else
    # scored apart with the detector's own settings on the same initial noise
    apart = separate_detection(a.detect, num_inference_steps=a.sampling_steps,
                               guidance_scale=a.guidance_scale, scheduler=a.scheduler)
    if apart and a.images_per_prompt is not None:
        raise ConfigError(f"--detect {a.detect} with --images-per-prompt needs the detector's own "
                          "schedule (50 steps, guidance 7.5, the default scheduler)")
    adapter = load_adapter(a.model, scheduler=a.scheduler)
    if apart:
        print(f"diffmem: note: {apart}", file=sys.stderr)
    if _uses_index(a):  # --index, else the index `diffmem calibrate --index` stored
        from diffmem.cli._index import command_index

        a.index = command_index(a, adapter)[0].index
    guard = build_guard(a.mitigate, adapter=adapter, index=a.index, threshold=a.threshold,
                        seed=a.seed)
    hooks = build_hooks(detect=None if apart else a.detect,
                        mitigate=None if guard is not None else a.mitigate, adapter=adapter,
                        index=a.index, threshold=a.threshold, seed=a.seed,
                        num_inference_steps=a.sampling_steps, guidance_scale=a.guidance_scale)
    extra = score_separately(a.detect, adapter, prompts, seed=a.seed) if apart else None
    with GenerationWriter(a.out, texts, seeds=seeds, extra=extra) as writer:
        generate(prompts, model=adapter, seed=a.seed, steps=a.sampling_steps,
                 guidance_scale=a.guidance_scale, hooks=hooks, batch_size=a.batch_size,
                 images_per_prompt=a.images_per_prompt, guard=guard, on_result=writer.add)
    scores = "".join(f" and {h.name} records" for h in hooks) + (
        f" and {a.detect} scores" if apart else "") + (" and guard verdicts" if guard else "")
    print(f"wrote {writer.count} image(s){scores} to {a.out}")
    return 0


def _default_guidance(model: str) -> float:
    """7.5, or 1 for a pixel-space DDPM folder (read from its model_index.json, not loaded)."""
    from diffmem.models.loading import pipeline_family
    from diffmem.models.profile import named_model
    from diffmem.runtime.defaults import SAMPLING

    try:
        ddpm = pipeline_family(named_model(model) or model) == "ddpm"
    except DiffmemError:  # load_adapter says what is wrong with the folder
        ddpm = False
    return 1.0 if ddpm else SAMPLING.guidance_scale


def _uses_index(a: argparse.Namespace) -> bool:
    """Whether the run uses a training index: the guard (``auto``), AMG, or a detector that
    needs one."""
    from diffmem.detect.registry import DETECTORS
    from diffmem.mitigate import parse_spec

    names = {name for name, _ in parse_spec(a.mitigate)} if a.mitigate else set()
    return bool(names & {"auto", "amg"}) or (
        a.detect is not None and bool(DETECTORS.get(a.detect)[0].needs_index))
