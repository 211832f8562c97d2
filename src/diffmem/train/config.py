"""The options of ``diffmem train`` (:class:`FinetuneConfig`), in a module without torch: the
command-line parser reads its defaults (see :func:`diffmem.cli._load_extension`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffmem.runtime.errors import ConfigError
from diffmem.train.captions import CaptionAugment


@dataclass
class FinetuneConfig:
    """Options of ``diffmem train`` (CLI flags of the same names)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`) after the warmup
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    train_text_encoder: bool = False
    caption_dropout: float = 0.1  # empty caption, keeps classifier-free guidance's branch trained
    checkpoint_every: int = 250
    log_every: int = 10
    ema_decay: float = 0.0  # 0: no EMA
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    seed: int = 0
    # mitigations (see diffmem.train.captions / filters / data)
    augment: CaptionAugment = field(default_factory=CaptionAugment)
    gn: float = 0.0  # Somepalli GN: lambda of the text-embedding noise
    magnitude_filter: float | None = None  # Wen: threshold (reference 2)
    entropy_filter: float | None = None  # Ren: threshold
    entropy_direction: str = "low"
    entropy_layers: list[str] | None = None
    loss_filter: float | None = None  # diffmem: ratio to the band median loss (0.5)
    screen_captions: float | str | None = None  # ratio to the median; "auto": calibrated at step 0
    screen_absolute: bool = False  # screen_captions in the detector's units instead
    screen_every: int = 50
    screen_generations: int = 4
    dedup: str | None = None  # pixel | sscd
    dedup_threshold: float | None = None
    dedup_keep: int = 1
    # data source columns (JSONL / Parquet)
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = CaptionAugment(**self.augment)
        self.augment.caption_dropout = self.caption_dropout
        self.augment.__post_init__()
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, not "
                              f"{self.mixed_precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.gn < 0:
            raise ConfigError(f"gn lambda must be >= 0, got {self.gn}")
        if self.loss_filter is not None and not 0 < self.loss_filter < 1:
            raise ConfigError(f"loss_filter ratio must be in (0, 1), got {self.loss_filter}")
        if self.screen_captions is not None and self.screen_captions != "auto" and not (
                isinstance(self.screen_captions, (int, float))
                and math.isfinite(self.screen_captions) and self.screen_captions > 0):
            raise ConfigError(f"screen_captions threshold must be 'auto' or a finite number > 0, "
                              f"got {self.screen_captions}")
        if self.screen_captions == "auto" and self.screen_absolute:
            raise ConfigError("screen_absolute needs a screen_captions threshold, not 'auto'")
        if self.screen_every < 1:
            raise ConfigError(f"screen_every must be >= 1, got {self.screen_every}")

    def mitigations(self) -> list[str]:
        """Names of the active mitigations, for logs and reports."""
        a = self.augment
        out = [name for name, on in (("mc", a.mc), ("rc", a.p_rc), ("rt", a.p_rt),
                                     ("cwr", a.p_cwr), ("gn", self.gn)) if on]
        if self.magnitude_filter is not None:
            out.append("magnitude_filter")
        if self.entropy_filter is not None:
            out.append("entropy_filter")
        if self.loss_filter is not None:
            out.append("loss_filter")
        if self.screen_captions is not None:
            out.append("screen_captions")
        if self.dedup:
            out.append("dedup")
        return out
