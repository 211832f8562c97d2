"""Command-line parsing of ``diffmem scan`` (calls :func:`diffmem.scale.scan.scan`).

    diffmem scan PROMPTS --out DIR [--engine local|ray] [--address ADDR] [--workers N]
                 [--detector NAME ...] [--threshold T | --threshold-from CLEAN]
                 [--index IDX | --no-index] [--explain]
"""

from __future__ import annotations

import argparse
import json

from diffmem.cli._index import add_index_options, command_index
from diffmem.cli.args import GENERATIONS, SAMPLING_STEPS, add_model
from diffmem.runtime.defaults import SAMPLING


def _cmd_scan(a: argparse.Namespace) -> int:
    from diffmem.scale.scan import ScanConfig, scan

    # --index, else the index `diffmem calibrate --index` stored (one line says so)
    choice = command_index(a, a.model, scheduler=a.scheduler)[0]
    config = ScanConfig(model=a.model, detectors=a.detector, engine=a.engine, address=a.address,
                        workers=a.workers, threads=a.threads, shard_size=a.shard_size,
                        prompt_column=a.prompt_column, id_column=a.id_column,
                        threshold=a.threshold, threshold_from=a.threshold_from, fpr=a.fpr,
                        explain=a.explain, steps=a.steps, generations=a.generations,
                        num_inference_steps=a.sampling_steps,
                        guidance_scale=a.guidance_scale, scheduler=a.scheduler,
                        batch_size=a.batch_size, seed=a.seed, progress=not a.no_progress,
                        index=choice.index, index_origin=choice.origin,
                        preview_generations=a.preview_generations,
                        preview_steps=a.preview_steps)
    summary = scan(a.prompts, a.out, config)
    print(json.dumps(summary, indent=2))
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``scan``."""
    s = commands.add_parser("scan", help="score a prompt log of any size into sharded Parquet "
                                         "(resumable; local or on Ray)")
    s.add_argument("prompts", help=".txt (one per line), .jsonl, .parquet, or a folder of them")
    s.add_argument("--out", required=True, help="scan folder (shards, manifest, summary)")
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: one model actor per worker")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (default: start a small local one)")
    s.add_argument("--workers", type=int, default=1, help="Ray model actors (default 1)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker, local and Ray alike (default 1: the same "
                        "reduction order everywhere, so local and Ray scores are identical)")
    s.add_argument("--detector", nargs="+", default=["noise_magnitude"],
                   help="one or more of: {detectors} (default noise_magnitude)")
    s.add_argument("--shard-size", type=int, default=1024, help="prompts per shard file")
    s.add_argument("--prompt-column", default=None,
                   help="JSONL/Parquet prompt column (default: 'prompt' or 'caption')")
    s.add_argument("--id-column", default=None,
                   help="JSONL/Parquet column of prompt ids (default: position in the stream)")
    s.add_argument("--threshold", type=float, default=None,
                   help="decision threshold of the (single) detector")
    s.add_argument("--threshold-from", default=None,
                   help="clean prompts to calibrate each detector's threshold on (without it: the "
                        "testbed's held-out prompts, or what `diffmem calibrate` stored)")
    s.add_argument("--fpr", type=float, default=0.01, help="target FPR of --threshold-from")
    add_index_options(s, "the training set's index (`diffmem index build`): each prompt's "
                         "decision is the verdict by generation (--preview-generations previews of "
                         "--preview-steps steps searched in it); the detectors' scores stay as the "
                         "fast first estimate (column 'estimate'). Without it the decision is "
                         "that estimate")
    s.add_argument("--preview-generations", type=GENERATIONS, default=4,
                   help="previews per prompt of the verdict by generation (with an index)")
    s.add_argument("--preview-steps", type=SAMPLING_STEPS, default=20,
                   help="schedule length of each preview (with an index)")
    s.add_argument("--explain", action="store_true",
                   help="top words of each flagged prompt (token attribution)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--steps", default=None,
                   help="denoising steps scored (default: the detector's own)")
    s.add_argument("--generations", type=int, default=1, help="initial noises per prompt")
    add_model(s)
    s.add_argument("--sampling-steps", type=int, default=SAMPLING.steps,
                   help="length of the denoising schedule")
    s.add_argument("--guidance-scale", type=float, default=SAMPLING.guidance_scale,
                   help="classifier-free guidance scale")
    s.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ...")
    s.add_argument("--batch-size", type=int, default=16, help="prompts x generations per UNet call")
    s.add_argument("--seed", type=int, default=0, help="generation g uses seed SEED+g")
    s.set_defaults(func=_cmd_scan)
