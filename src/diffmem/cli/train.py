"""Command-line parsing of ``diffmem train`` and ``diffmem eval training``.

    diffmem train --model PATH|testbed --data SOURCE --out DIR [--steps N] [--batch-size B]
                  [--lr LR] [--train-text-encoder] [--ema DECAY] [--mixed-precision no|fp16|bf16]
                  [--checkpoint-every N] [--mc] [--rc [P]] [--rt [P]] [--cwr [P]] [--gn [LAMBDA]]
                  [--magnitude-filter [T]] [--entropy-filter T] [--loss-filter [R]]
                  [--screen-captions [R]]
                  [--dedup [pixel|sscd]]
    diffmem eval training --out DIR [--methods plain,dedup,...] [--steps N]
"""

from __future__ import annotations

import argparse
import json

from diffmem.cli.args import add_model


def _ratio_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}") \
            from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}")
    return value


def _cmd_train(a: argparse.Namespace) -> int:
    from diffmem.train.captions import CaptionAugment
    from diffmem.train.trainer import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
        lr_schedule=a.lr_schedule, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
        train_text_encoder=a.train_text_encoder, caption_dropout=a.caption_dropout,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, ema_decay=a.ema,
        mixed_precision=a.mixed_precision, seed=a.seed,
        augment=CaptionAugment(mc=a.mc, p_rc=a.rc or 0.0, rc_tokens=a.rc_tokens,
                               p_rt=a.rt or 0.0, rt_tokens=a.rt_tokens, p_cwr=a.cwr or 0.0,
                               cwr_words=a.cwr_words),
        gn=a.gn or 0.0, magnitude_filter=a.magnitude_filter, entropy_filter=a.entropy_filter,
        loss_filter=a.loss_filter,
        screen_captions=a.screen_captions, screen_absolute=a.screen_absolute,
        screen_every=a.screen_every,
        entropy_direction=a.entropy_direction, entropy_layers=a.entropy_layers,
        dedup=a.dedup, dedup_threshold=a.dedup_threshold, dedup_keep=a.dedup_keep,
        image_column=a.image_column, caption_column=a.caption_column, id_column=a.id_column)
    target = finetune(a.model, a.data, a.out, cfg, progress=not a.quiet)
    summary = json.loads((target.parent / "train_log.json").read_text())
    print(json.dumps(summary, indent=2))
    print(f"fine-tuned pipeline: {target}")
    return 0


def _counts(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (integers >= 1), for ``--planted-copies``."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return counts


def _cmd_eval_training(a: argparse.Namespace) -> int:
    from diffmem.train.bench import run_benchmark

    report = run_benchmark(a.out, model=a.model, planted_copies=a.planted_copies,
                           methods=a.methods.split(",") if a.methods else None,
                           steps=a.steps, seeds=a.seeds, heldout_seeds=a.heldout_seeds)
    print(json.dumps(report["table"], indent=2))
    if "dose" in report:
        print(report["dose"])
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``train`` and ``eval training``."""
    from diffmem.train.config import FinetuneConfig

    d = FinetuneConfig()
    t = commands.add_parser(
        "train", help="fine-tune an SD 1.x/2.x pipeline (or the testbed) with training-time "
                      "memorization mitigations; rerun the same command to resume")
    add_model(t)
    t.add_argument("--data", required=True,
                   help="image-caption source: folder (x.png + x.txt), .jsonl or .parquet")
    t.add_argument("--out", required=True, help="run folder (pipeline/, checkpoints, logs)")
    t.add_argument("--train-steps", dest="steps", type=int, default=d.steps,
                   help="optimizer steps of the fine-tune")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate (AdamW)")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up steps")
    t.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "cosine"),
                   help="after the warmup: constant, or cosine decay to 0 at --steps")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="gradient clipping norm")
    t.add_argument("--train-text-encoder", action="store_true", help="also fine-tune it")
    t.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                   help="probability of the empty caption (classifier-free guidance)")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (a rerun resumes from the last)")
    t.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    t.add_argument("--ema", type=float, default=d.ema_decay, metavar="DECAY",
                   help="EMA of the weights with this decay (e.g. 0.999); the pipeline gets them")
    t.add_argument("--mixed-precision", default=d.mixed_precision, choices=("no", "fp16", "bf16"),
                   help="accelerate mixed precision")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of data order, noise and timesteps")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    g = t.add_argument_group("mitigations (compose freely; docs/training.md)")
    g.add_argument("--mc", action="store_true",
                   help="Somepalli MC: one of the image's captions drawn each time")
    g.add_argument("--rc", type=float, nargs="?", const=0.1, metavar="P",
                   help="Somepalli RC: replace the caption by random tokens with prob. P (0.1)")
    g.add_argument("--rc-tokens", type=int, default=4, help="random tokens of an RC caption")
    g.add_argument("--rt", type=float, nargs="?", const=0.1, metavar="P",
                   help="Somepalli RT: insert random tokens with prob. P (0.1)")
    g.add_argument("--rt-tokens", type=int, default=2, help="random tokens RT adds")
    g.add_argument("--cwr", type=float, nargs="?", const=0.1, metavar="P",
                   help="Somepalli CWR: repeat caption words with prob. P (0.1)")
    g.add_argument("--cwr-words", type=int, default=2, help="caption words CWR repeats")
    g.add_argument("--gn", type=float, nargs="?", const=0.1, metavar="LAMBDA",
                   help="Somepalli GN: add LAMBDA * N(0, 1) to the text embedding (0.1)")
    g.add_argument("--magnitude-filter", type=float, nargs="?", const=2.0, metavar="T",
                   help="Wen: drop samples whose normalised noise magnitude is >= T (2)")
    g.add_argument("--loss-filter", type=float, nargs="?", const=0.5, metavar="R",
                   help="drop the samples of a caption whose recent losses are below R x the "
                        "median loss at their timesteps (0.5): the model already predicts it "
                        "far better than the rest of the data (no extra UNet call)")
    g.add_argument("--screen-captions", type=_ratio_or_auto, nargs="?", const="auto",
                   default=None, metavar="R",
                   help="drop samples whose caption the first-step detector flags: noise "
                        "magnitude above R x the median over the training captions, rescored "
                        "every --screen-every steps; without R: calibrated at step 0 (99th "
                        "percentile over the median)")
    g.add_argument("--screen-absolute", action="store_true",
                   help="--screen-captions R in the detector's units (as `diffmem detect "
                        "--threshold`) instead of a ratio to the median")
    g.add_argument("--screen-every", type=int, default=d.screen_every, metavar="N",
                   help="steps between caption screenings")
    g.add_argument("--entropy-filter", type=float, default=None, metavar="T",
                   help="Ren (paper, no reference code): drop samples whose cross-attention "
                        "entropy is below T (--entropy-direction high: above)")
    g.add_argument("--entropy-direction", default="low", choices=("low", "high"),
                   help="which side of the entropy threshold is dropped")
    g.add_argument("--entropy-layers", nargs="+", default=None,
                   help="cross-attention layer patterns (default: the detector's layer)")
    g.add_argument("--dedup", nargs="?", const="pixel", choices=("pixel", "sscd"),
                   help="drop near-duplicate images before training (criterion; default pixel)")
    g.add_argument("--dedup-threshold", type=float, default=None,
                   help="pixel: tiled L2 below (0.1); sscd: cosine above (0.5)")
    g.add_argument("--dedup-keep", type=int, default=1, help="images kept per group")
    s = t.add_argument_group("data source columns (.jsonl / .parquet)")
    s.add_argument("--image-column", default="image", help="column of the images")
    s.add_argument("--caption-column", default="caption", help="column of the captions")
    s.add_argument("--id-column", default=None, help="column of item ids (default: row number)")
    t.set_defaults(func=_cmd_train)

    e = eval_commands.add_parser(
        "training", help="planted-duplicates benchmark of the training-time mitigations on the "
                         "testbed (resumable; docs/training.md)")
    e.add_argument("--out", required=True, help="benchmark folder (rerun to resume)")
    add_model(e, testbed_only=True)  # the testbed to fine-tune
    e.add_argument("--planted-copies", type=_counts, default=None, metavar="N,N,...",
                   help="one count per planted image, e.g. 1,2,4,8,16,32,64: the planted "
                        "memorization rate per count and method (dose-response; default: 4 "
                        "images x 50 copies)")
    e.add_argument("--methods", default=None,
                   help="comma-separated subset of the benchmark's runs (default: all)")
    e.add_argument("--train-steps", dest="steps", type=int, default=None,
                   help="fine-tuning steps per run")
    e.add_argument("--seeds", type=int, default=4, help="generations per planted caption")
    e.add_argument("--heldout-seeds", type=int, default=2, help="generations per held-out prompt")
    e.set_defaults(func=_cmd_eval_training)
