"""diffmem: find, explain, measure and stop training-data memorization in text-to-image diffusion
models built with Hugging Face diffusers."""

from __future__ import annotations

__version__ = "0.1.0"

from diffmem.core.sampling import Hook, Run, SampleResult, Step, sample, seeded_generators
from diffmem.models.adapter import ModelAdapter, load_adapter, load_pipeline

__all__ = [
    "Hook",
    "ModelAdapter",
    "Run",
    "SampleResult",
    "Step",
    "__version__",
    "load_adapter",
    "load_pipeline",
    "sample",
    "seeded_generators",
]
