"""Step budget of the planted-duplicates benchmark: planted memorization of a plain fine-tune of
the shipped testbed after growing numbers of steps (the run folder is resumed: only ``steps``
grows), 4 generations per planted caption, testbed criterion (tiled L2 < 0.15 to the planted
image's VAE round trip).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/train_budget.py runs/calib plain 50,100,200,300,400 \
        '{"lr_schedule": "constant"}'

The last argument (JSON) overrides fields of ``diffmem.train.bench.TRAIN``.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.models.adapter import load_adapter
from diffmem.similarity.pixel import tiled_l2, to_tensor
from diffmem.testbed.verify import vae_roundtrip
from diffmem.train import bench
from diffmem.train.trainer import finetune

out, name = Path(sys.argv[1]), sys.argv[2]
steps_list = [int(s) for s in sys.argv[3].split(",")]
over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
man = bench.build_planted_set(out / "data")
for steps in steps_list:
    cfg = bench.method_config("plain", over, steps)
    t0 = time.time()
    tgt = finetune("testbed", out / "data" / "data.jsonl", out / name, cfg, progress=False)
    ad = load_adapter(tgt)
    orig = to_tensor(np.stack([np.asarray(Image.open(out / "data" / p["image"]))
                               for p in man["planted"]]))
    refs = vae_roundtrip(ad, orig)
    gen = bench._generate(ad, [p["caption"] for p in man["planted"]], 4)
    d = tiled_l2(gen, refs.repeat_interleave(4, 0))
    log = json.loads((out / name / "train_log.json").read_text())
    print(json.dumps({"steps": steps, "rate": float((d < 0.15).float().mean()),
                      "d": [round(float(x), 3) for x in d],
                      "sec_train": log["seconds_training"], "wall": round(time.time() - t0, 1)}),
          flush=True)
