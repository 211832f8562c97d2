"""Defaults shared by the library and the command-line parsers, in a module that imports only the
standard library (the parsers run without torch; see :func:`diffmem.cli._load_extension`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings every function, class and command-line option defaults to (Stable
    Diffusion's own: ``StableDiffusionPipeline``'s 50 steps, guidance scale 7.5, DDIM eta 0).
    Settings that deliberately differ (e.g. the 20-step preview of ``preview_replication``) keep
    their own values."""

    steps: int = 50  # num_inference_steps: length of the denoising schedule
    guidance_scale: float = 7.5  # classifier-free guidance scale
    eta: float = 0.0  # DDIM eta (schedulers that take one)


#: The one instance: ``def f(..., guidance_scale: float = SAMPLING.guidance_scale)``.
SAMPLING = SamplingDefaults()

#: The detector ``diffmem detect`` and ``diffmem eval detection`` use unless told otherwise, chosen
#: on the dev split of the testbed's broad generation-labelled set (docs/detection.md): Sharpness at
#: the first step over 4 generations (its own defaults). The one-step option stays
#: ``noise_magnitude`` (1 step, 1 generation: the cost floor, what the mitigation gate uses).
DEFAULT_DETECTOR = "sharpness"

#: The default when the training set's index is given (``--index``): a 20-step preview
#: generation per seed, searched in the index (chosen on the broad set, docs/detection.md).
DEFAULT_INDEX_DETECTOR = "preview_replication"

#: The fixed budget and settings of ``diffmem eval recovery`` (:mod:`diffmem.eval.recovery`;
#: docs/training.md, "Recovery check"): Adam on the text embedding, ``iterations`` steps at ``lr``,
#: a judging generation every ``check_every`` steps, ``seeds`` generations per item and check.
RECOVERY = {"iterations": 200, "lr": 1e-2, "check_every": 25, "seeds": 2, "start_prompt": "",
            "seed": 0}
