"""diffmem: find, explain, measure and stop training-data memorization in text-to-image diffusion
models built with Hugging Face diffusers."""

from __future__ import annotations

from diffmem.runtime.version import __version__

#: public name -> module; imported on first use so that ``import diffmem`` (and the command line's
#: start-up) does not pay for torch and diffusers until they are needed
_LAZY = {
    "Hook": "diffmem.core.sampling",
    "Run": "diffmem.core.sampling",
    "SampleResult": "diffmem.core.sampling",
    "Step": "diffmem.core.sampling",
    "sample": "diffmem.core.sampling",
    "seeded_generators": "diffmem.core.sampling",
    "ModelAdapter": "diffmem.models.adapter",
    "load_adapter": "diffmem.models.adapter",
    "load_pipeline": "diffmem.models.adapter",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffmem' has no attribute {name!r}")


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
