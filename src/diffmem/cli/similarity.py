"""Command-line parsing of the replication commands; each calls one library function.

    diffmem index build SOURCE|testbed|testbed-graded --out INDEX [--kind sscd|pixel] [--engine local|ray]
    diffmem eval replication IMAGES --index INDEX --out report.json [--grid report.html]
"""

from __future__ import annotations

import argparse

from diffmem.cli.args import BATCH, LOWPASS, THRESHOLD, OutDir, OutFile
from diffmem.runtime.jsonio import dumps
from diffmem.testbed import spec_of


def _cmd_index_build(a: argparse.Namespace) -> int:
    pixel_index = a.kind == "pixel" or a.source.startswith("testbed-ddpm") or (
        a.kind is None and a.source in ("testbed", "testbed-graded"))
    if a.lowpass is not None and pixel_index:
        from diffmem.runtime.errors import ConfigError

        raise ConfigError("--lowpass applies to SSCD indexes only (add --kind sscd; a "
                          "testbed-ddpm index is a pixel index)")
    if a.source in ("testbed-ddpm", "testbed-ddpm-class"):  # one training set, both models
        from diffmem.testbed.ddpm_eval import build_ddpm_index

        index = build_ddpm_index(a.out)
        print(f"indexed {len(index)} pixel-testbed training images (pixel, 32x32) into {a.out}")
        return 0
    if a.source in ("testbed", "testbed-graded"):
        from diffmem.models.adapter import load_adapter
        from diffmem.testbed.index import build_testbed_index

        adapter = load_adapter(a.source)
        kind = a.kind or "pixel"
        if kind == "pixel":  # the testbed criterion: tiled L2 to the VAE rendering
            index = build_testbed_index(a.out, kind=kind, spec=spec_of(adapter),
                                        rendered_by=adapter)
            print(f"indexed {len(index)} testbed training images (as the testbed VAE renders "
                  f"them, pixel) into {a.out}")
            return 0
        from diffmem.similarity.sscd import SSCD

        embedder = SSCD(lowpass=a.lowpass or adapter.profile.sscd_lowpass)
        index = build_testbed_index(a.out, kind=kind, spec=spec_of(adapter), embedder=embedder)
        print(f"indexed {len(index)} testbed training images (the originals, {embedder}) into "
              f"{a.out}")
        return 0
    embedder = None
    if a.lowpass is not None:
        from diffmem.similarity.sscd import SSCD

        embedder = SSCD(lowpass=a.lowpass)
    if a.engine == "ray":
        from diffmem.scale.index_build import build_index_sharded

        report = build_index_sharded(a.source, a.out, kind=a.kind or "sscd",
                                     batch_size=a.batch_size, shard_size=a.shard_size,
                                     image_column=a.image_column,
                                     caption_column=a.caption_column, id_column=a.id_column,
                                     workers=a.workers, threads=a.threads, address=a.address,
                                     progress=True, embedder=embedder)
    else:
        from diffmem.similarity.index_ingest import build_index_from_source

        report = build_index_from_source(a.source, a.out, kind=a.kind or "sscd",
                                         batch_size=a.batch_size, image_column=a.image_column,
                                         caption_column=a.caption_column, id_column=a.id_column,
                                         progress=True, embedder=embedder)
    print(f"indexed {report.count} images into {report.out}; skipped {len(report.skipped)} "
          f"unreadable file(s)" + (f" (listed in {report.out / 'skipped.json'})"
                                   if report.skipped else ""))
    return 0


def _cmd_eval_replication(a: argparse.Namespace) -> int:
    from diffmem.similarity.report import eval_replication

    report = eval_replication(a.images, a.index, a.out, grid_html=a.grid,
                              threshold=a.threshold, batch_size=a.batch_size)
    print(dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    return 0


def register(commands: argparse._SubParsersAction, eval_commands: argparse._SubParsersAction
             ) -> None:
    """Add ``index build`` and ``eval replication``."""
    idx = commands.add_parser("index", help="training-set index").add_subparsers(
        dest="index_command", required=True)
    b = idx.add_parser("build", help="index a folder (x.png + x.txt), a Parquet table, or "
                                     "'testbed'")
    b.add_argument("source", help="image folder (x.png + x.txt), Parquet table, or a shipped "
                                  "testbed: 'testbed', 'testbed-graded', 'testbed-ddpm' (its "
                                  "pixel index, also of testbed-ddpm-class)")
    b.add_argument("--out", type=OutDir(), required=True, help="index folder")
    b.add_argument("--kind", choices=("sscd", "pixel"), default=None,
                   help="sscd (default) or pixel (tiled L2; default for a testbed)")
    b.add_argument("--lowpass", type=LOWPASS, default=None, metavar="PX",
                   help="sscd: resize images to PX x PX before SSCD's resize (for images of "
                        "about 64 px, whose pixel noise SSCD reads as content; a testbed: its "
                        "profile's, 32 for testbed-graded)")
    b.add_argument("--batch-size", type=BATCH, default=64, help="images per embedding batch")
    b.add_argument("--image-column", default="image", help="Parquet column of the images")
    b.add_argument("--caption-column", default="caption", help="Parquet column of the captions")
    b.add_argument("--id-column", default=None,
                   help="Parquet column of item ids (default: the row number)")
    b.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: embed shards on Ray workers and merge them (docs/scan.md)")
    b.add_argument("--address", default=None, help="Ray cluster to join (default: a local one)")
    b.add_argument("--workers", type=int, default=1, help="Ray embedding actors")
    b.add_argument("--threads", type=int, default=1, help="CPU threads per Ray worker")
    b.add_argument("--shard-size", type=int, default=1024, help="images per Ray task")
    b.set_defaults(func=_cmd_index_build)

    r = eval_commands.add_parser("replication", help="replication of generated images")
    r.add_argument("images", help="folder of generated images")
    r.add_argument("--index", required=True, help="index folder (diffmem index build)")
    r.add_argument("--out", type=OutFile(".json"), required=True, help="report JSON")
    r.add_argument("--grid", type=OutFile(".html", ".htm"), default=None,
                   help="HTML report: each generation with its prompt, its nearest training "
                        "image, the score and the verdict")
    r.add_argument("--threshold", type=THRESHOLD, default=None,
                   help="copy threshold (default: 0.5 for SSCD cosine, the testbed's "
                        "REPLICATION_THRESHOLD 0.15 for tiled L2)")
    r.add_argument("--batch-size", type=BATCH, default=32, help="images per search batch")
    r.set_defaults(func=_cmd_eval_replication)
