"""Schedulers by name: the short names accepted wherever a scheduler is chosen (``--scheduler``) and
their resolution to a diffusers scheduler configured like a pipeline's own."""

from __future__ import annotations

from diffmem.runtime.errors import ConfigError
from diffmem.runtime.registry import Registry

#: Short names accepted wherever a scheduler is chosen (``--scheduler``), mapped to diffusers classes.
SCHEDULERS: Registry[str] = Registry("scheduler", {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
})


def _resolve_scheduler(base, scheduler: str | object | None):
    """``scheduler`` by short or class name, configured like the scheduler ``base``."""
    if scheduler is None:
        return base
    if not isinstance(scheduler, str):
        return scheduler
    import diffusers

    name = SCHEDULERS.get(scheduler, scheduler)
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        known = ", ".join(sorted(SCHEDULERS))
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of: {known} "
                          "(or a diffusers scheduler class name)")
    return cls.from_config(base.config)
