"""The ``diffmem`` command line. Each command parses, calls one library function, and prints.

Errors from bad input (:class:`diffmem.errors.DiffmemError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence

from diffmem import __version__
from diffmem.errors import DiffmemError

# ------------------------------------------------------------------------------------- commands


def _cmd_generate(a: argparse.Namespace) -> int:
    from diffmem.generate import build_hooks, check_hook_names, generate, save_results
    from diffmem.models.adapter import load_adapter

    check_hook_names(detect=a.detect, mitigate=a.mitigate)  # before the model loads
    adapter = load_adapter(a.model, scheduler=a.scheduler)
    hooks = build_hooks(detect=a.detect, mitigate=a.mitigate, adapter=adapter, index=a.index,
                        threshold=a.threshold, seed=a.seed, num_inference_steps=a.steps,
                        guidance_scale=a.guidance_scale)
    results = generate(a.prompts, model=adapter, seed=a.seed, steps=a.steps,
                       guidance_scale=a.guidance_scale, hooks=hooks)
    paths = save_results(a.prompts, results, a.out, seed=a.seed)
    scores = "".join(f" and {h.name} records" for h in hooks)
    print(f"wrote {len(paths)} image(s){scores} to {a.out}")
    return 0


def _cmd_testbed_train(a: argparse.Namespace) -> int:
    from diffmem.testbed.train import TrainConfig, install_pipeline, train_testbed

    given = {"vae_steps": a.vae_steps, "unet_steps": a.unet_steps, "batch_size": a.batch_size}
    cfg = TrainConfig(seed=a.seed, **{k: v for k, v in given.items() if v is not None})
    from diffmem.testbed.data import TestbedSpec

    rare = {} if a.rare_words is None else {"n_rare_words": a.rare_words}
    target = train_testbed(a.out, cfg, TestbedSpec(seed=a.seed, **rare))
    print(f"trained testbed pipeline: {target}")
    if a.install:
        print(f"installed into {install_pipeline(target)}")
    return 0


def _cmd_testbed_verify(a: argparse.Namespace) -> int:
    from diffmem.testbed.verify import verify_testbed

    report = verify_testbed(a.model, out=a.out, seeds=a.seeds, steps=a.steps,
                            guidance_scale=a.guidance_scale, with_sscd=not a.no_sscd)
    summary = {k: v for k, v in report.items() if k != "prompts"}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_testbed_path(a: argparse.Namespace) -> int:
    from diffmem.testbed import testbed_path

    print(testbed_path())
    return 0


def _cmd_testbed_prompts(a: argparse.Namespace) -> int:
    from diffmem.models.adapter import load_adapter
    from diffmem.testbed import shipped_testbed_spec
    from diffmem.testbed.data import build_testbed, write_prompts

    spec = (shipped_testbed_spec() if a.model is None
            else load_adapter(a.model).require_testbed_spec("testbed prompts"))
    if a.set == "broad":
        from diffmem.testbed.broad import write_broad_prompts

        path = write_broad_prompts(a.out, spec)
        print(f"wrote the broad prompt set (build fields; labels: `diffmem testbed label`) "
              f"to {path}")
        return 0
    path = write_prompts(build_testbed(spec), a.out)
    print(f"wrote labelled prompts to {path}")
    return 0


def _cmd_testbed_label(a: argparse.Namespace) -> int:
    from diffmem.testbed.broad import label_broad_set

    path = label_broad_set(a.out, a.model, seeds=a.seeds, steps=a.steps,
                           guidance_scale=a.guidance_scale, batch_size=a.batch_size)
    print(f"wrote generation labels to {path}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from diffmem.demo import run_demo

    run_demo(a.model, a.out)
    return 0


# ------------------------------------------------------------------------------------- parser


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="testbed",
                   help="pipeline folder (SD 1.x/2.x) or 'testbed' (default)")


def _add_sampling(p: argparse.ArgumentParser, steps: int = 50) -> None:
    p.add_argument("--steps", type=int, default=steps, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ...")


def build_parser() -> argparse.ArgumentParser:
    from diffmem.detect.registry import DETECTORS

    parser = argparse.ArgumentParser(
        prog="diffmem",
        description="Detect, explain, measure and mitigate memorization in diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job on the testbed: detect, explain, measure")
    d.add_argument("--out", default="demo_out")
    _add_model(d)
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("generate", help="generate images (one per prompt)")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--out", default="generations", help="output folder")
    g.add_argument("--seed", type=int, default=0)
    _add_model(g)
    _add_sampling(g)
    g.add_argument("--detect", default=None, metavar="NAME",
                   help=f"also score each prompt with this detector ({', '.join(DETECTORS)}; "
                        "written to generations.jsonl, no extra UNet calls)")
    g.add_argument("--mitigate", default=None, metavar="SPEC",
                   help="inference-time mitigation: NAME[:STRENGTH][,NAME...] of wen, ren, amg, rt, "
                        "rn, cwr, gni, delay, xt, reanchor; 'auto' gates them (alone: the default "
                        "method) by the first step's noise magnitude; see docs/mitigation.md")
    g.add_argument("--index", default=None, help="training-set index folder (needed by amg)")
    g.add_argument("--threshold", type=float, default=None,
                   help="first-step noise-magnitude threshold of auto / wen (default: calibrated "
                        "on the testbed's held-out prompts; required for other models)")
    g.set_defaults(func=_cmd_generate)

    tb = sub.add_parser("testbed", help="the built-in testbed model").add_subparsers(
        dest="testbed_command", required=True)
    t = tb.add_parser("train", help="train the testbed pipeline (resumable)")
    t.add_argument("--out", required=True, help="run folder; rerun to resume")
    t.add_argument("--seed", type=int, default=0)
    # defaults (None) come from TrainConfig, the one place they are set
    t.add_argument("--vae-steps", type=int, help="default: TrainConfig.vae_steps")
    t.add_argument("--unet-steps", type=int, help="default: TrainConfig.unet_steps")
    t.add_argument("--batch-size", type=int, help="default: TrainConfig.batch_size")
    t.add_argument("--rare-words", type=int,
                   help="generic captions also carry words of a vocabulary of this size "
                        "(default: TestbedSpec.n_rare_words; 0: none)")
    t.add_argument("--install", action="store_true",
                   help="copy the trained pipeline into the package as the shipped testbed")
    t.set_defaults(func=_cmd_testbed_train)
    v = tb.add_parser("verify", help="measure replication rates of the testbed's prompts")
    v.add_argument("--out", required=True, help="report JSON")
    v.add_argument("--seeds", type=int, default=4)
    v.add_argument("--no-sscd", action="store_true", help="skip the SSCD side metric")
    _add_model(v)
    _add_sampling(v)
    v.set_defaults(func=_cmd_testbed_verify)
    pth = tb.add_parser("path", help="print the shipped testbed pipeline folder")
    pth.set_defaults(func=_cmd_testbed_path)
    pr = tb.add_parser("prompts", help="write the labelled testbed prompts (JSONL)")
    pr.add_argument("--out", default="testbed_prompts.jsonl")
    pr.add_argument("--model", default=None, help="testbed pipeline whose data spec to use")
    pr.add_argument("--set", choices=("designed", "broad"), default="designed",
                    help="designed: the 92 prompts labelled by construction; broad: the "
                         "rule-built set that `diffmem testbed label` labels by generation")
    pr.set_defaults(func=_cmd_testbed_prompts)
    lb = tb.add_parser("label", help="label the broad prompt set by generation (resumable)")
    lb.add_argument("--out", required=True, help="labels JSONL; rerun to resume (the shipped "
                    "file is src/diffmem/testbed/broad_labels.jsonl)")
    lb.add_argument("--seeds", type=int, default=4, help="generations per prompt")
    lb.add_argument("--batch-size", type=int, default=32)
    _add_model(lb)
    _add_sampling(lb)
    lb.set_defaults(func=_cmd_testbed_label)

    ev = sub.add_parser("eval", help="evaluate a method on labelled data").add_subparsers(
        dest="eval_command", required=True)
    for module in _EXTENSIONS:
        importlib.import_module(module).register(sub, ev)
    return parser


#: Modules with a ``register(commands, eval_commands)`` function adding their subcommands; each
#: feature package keeps its own argument parsing next to its code.
_EXTENSIONS: list[str] = [
    "diffmem.detect.cli",
    "diffmem.explain.cli",
    "diffmem.eval.cli",
    "diffmem.similarity.cli",
    "diffmem.mitigate.cli",
    "diffmem.scale.cli",
    "diffmem.train.cli",
    "diffmem.server.cli",
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except DiffmemError as e:
        print(f"diffmem: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"diffmem: error: {e.filename or e}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffmem: interrupted (finished work is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
