"""Loading a local pipeline folder: the folder checks, the supported pipeline classes
(:data:`SUPPORTED_PIPELINES`) and :func:`load_pipeline`, with one clear error for a bad folder or
file or an unsupported pipeline class. :func:`diffmem.models.adapter.load_adapter` wraps the loaded
pipeline in the adapter of its family."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.models.schedulers import _resolve_scheduler
from diffmem.runtime.errors import ModelLoadError

#: ``model_index.json`` ``_class_name`` -> family, for the pipeline classes diffmem supports.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
}
_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
             "scheduler"),
    "ddpm": ("unet", "scheduler"),
}


def _unsupported(name: object) -> ModelLoadError:
    return ModelLoadError(
        f"unsupported pipeline class {name!r}; diffmem supports StableDiffusionPipeline "
        "(SD 1.x/2.x), StableDiffusionXLPipeline (SDXL) and DDPMPipeline / DDIMPipeline "
        "(pixel-space UNet2DModel)")


def pipeline_family(path: str | Path) -> str:
    """``"sd"``, ``"sdxl"`` or ``"ddpm"`` from a folder's ``model_index.json`` (its ``_class_name``, else its
    components); any other pipeline: :class:`~diffmem.runtime.errors.ModelLoadError` naming what is
    supported."""
    path = Path(path)
    _check_folder(path)
    spec = json.loads((path / "model_index.json").read_text())
    name = spec.get("_class_name")
    if name in SUPPORTED_PIPELINES:
        family = SUPPORTED_PIPELINES[name]
    elif name is None:
        family = ("sdxl" if "text_encoder_2" in spec else "sd" if "text_encoder" in spec
                  else "ddpm")
    else:
        raise _unsupported(name)
    missing = [c for c in _COMPONENTS[family] if c not in spec or not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is not a complete {name or 'Stable Diffusion'} folder: "
                             f"missing {missing}")
    return family


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path} holds no diffusers pipeline (model_index.json is missing); point to a folder "
            "saved with StableDiffusionPipeline.save_pretrained, or run `diffmem testbed path`")
    try:
        spec = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index} is not valid JSON: {e}") from e
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{index} is not a diffusers model index (a JSON object)")


def load_pipeline(path: str | Path, *, scheduler: str | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a local SD 1.x/2.x, SDXL or DDPM pipeline folder, with one clear error for a bad folder or
    file or an unsupported pipeline class."""
    path = Path(path)
    family = pipeline_family(path)
    kwargs: dict = {}
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline as cls
    elif family == "ddpm":
        from diffusers import DDPMPipeline as cls
    else:
        from diffusers import StableDiffusionPipeline as cls

        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # diffusers/safetensors raise many types for a corrupt file
        raise ModelLoadError(f"could not load the pipeline in {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = _resolve_scheduler(pipe.scheduler, scheduler)
    if device is not None:
        pipe.to(device)
    return pipe


class _quiet_loading:
    """diffmem shows its own progress: no "Loading pipeline components" / "Loading weights" bars
    (the libraries' progress-bar switches are restored afterwards)."""

    def __enter__(self) -> None:
        from diffusers.utils import logging as dlog

        self._d = dlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()
        try:
            from transformers.utils import logging as tlog

            self._t = tlog.is_progress_bar_enabled()
            tlog.disable_progress_bar()
        except ImportError:  # pragma: no cover
            self._t = None

    def __exit__(self, *exc) -> None:
        from diffusers.utils import logging as dlog

        if self._d:
            dlog.enable_progress_bar()
        if self._t:
            from transformers.utils import logging as tlog

            tlog.enable_progress_bar()
