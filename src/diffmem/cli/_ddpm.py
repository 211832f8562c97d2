"""The pixel testbed's commands: ``diffmem testbed train --ddpm [--class-conditional]`` and
``diffmem testbed ddpm-eval`` (copy rates and the quality proxy, plain or mitigated)."""

from __future__ import annotations

import argparse

from diffmem.runtime.jsonio import dumps


def cmd_train(a: argparse.Namespace) -> int:
    """Train (resumable) the unconditional or class-conditional pixel testbed; ``--install``
    copies it into the package as ``testbed-ddpm`` / ``testbed-ddpm-class``."""
    import shutil

    from diffmem.models.profile import MODELS
    from diffmem.runtime.interrupts import kept
    from diffmem.testbed.ddpm import DDPMSpec, train_ddpm

    given = {"steps": a.unet_steps, "batch_size": a.batch_size, "seed": a.seed}
    spec = DDPMSpec(class_conditional=a.class_conditional,
                    **{k: v for k, v in given.items() if v is not None})
    kept(f"the training checkpoints in {a.out} (rerun the same command to resume)")
    target = train_ddpm(a.out, spec)
    print(f"trained {spec.name} pipeline: {target}")
    if a.install:
        dest = MODELS.get(spec.name)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(target, dest)
        print(f"installed into {dest}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from diffmem.similarity.index import load_index
    from diffmem.testbed.ddpm_eval import build_ddpm_index, measure

    index = load_index(a.index, what="ddpm-eval") if a.index else build_ddpm_index()
    summary = measure(a.model, index, n=a.images, steps=a.sampling_steps, mitigate=a.mitigate,
                      scheduler=a.scheduler, guidance_scale=a.guidance_scale, out=a.labels)
    print(dumps(summary, indent=2))
    return 0


def register(tb) -> None:
    """Add ``testbed ddpm-eval`` to the ``testbed`` command group."""
    from diffmem.cli.args import COUNT, GUIDANCE, SAMPLING_STEPS, OutFile

    e = tb.add_parser("ddpm-eval", help="pixel testbed: copy rate of duplicated items and the "
                                        "quality proxy, plain or with --mitigate")
    e.add_argument("model", nargs="?", default="testbed-ddpm",
                   help="the pixel testbed: testbed-ddpm, testbed-ddpm-class or its folder")
    e.add_argument("--index", default=None, help="its index (default: built in memory)")
    e.add_argument("--images", type=COUNT, default=96, help="generations (image i: seed i)")
    e.add_argument("--sampling-steps", type=SAMPLING_STEPS, default=50,
                   help="length of the denoising schedule")
    e.add_argument("--mitigate", default=None, metavar="SPEC", help="e.g. amg")
    e.add_argument("--guidance-scale", type=GUIDANCE, default=None,
                   help="class guidance of the class-conditional model (default 1: none)")
    e.add_argument("--scheduler", default=None, help="ddim, ddpm, ... (default: the pipeline's)")
    e.add_argument("--labels", type=OutFile(".jsonl"), default=None,
                   help="write the labels by generation (one JSON line per image)")
    e.set_defaults(func=cmd_eval)
