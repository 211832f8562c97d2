"""The service's request and response bodies (pydantic models, shown in ``/openapi.json``).

The request models depend on the server's limits, so :func:`request_models` makes them from a
:class:`~diffmem.server.config.ServerConfig`; the response models are fixed.
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from diffmem.server.config import ServerConfig


class DetectResult(BaseModel):
    prompt: str
    score: float = Field(description="first-step noise magnitude (Wen et al. 2024, eq. 4)")
    threshold: float
    flagged: bool = Field(description="score > threshold")
    tokens: int = Field(description="prompt tokens (BOS/EOS not counted)")
    truncated: bool = Field(description="the prompt was cut to the text encoder's context")


class DetectResponse(BaseModel):
    threshold: float
    results: list[DetectResult]


class Word(BaseModel):
    text: str
    score: float = Field(description="share of the attribution (all words sum to 1)")
    span: list[int] | None = Field(description="[start, end) in the prompt, when known")
    trigger: bool = Field(description="flagged prompt and at least half the top word's share")


class Suggestion(BaseModel):
    prompt: str
    label: str
    action: str
    words: list[str]
    replacement: str | None
    score: float
    clears: bool | None


class ExplainResponse(BaseModel):
    prompt: str
    score: float
    threshold: float
    flagged: bool
    truncated: bool
    words: list[Word]
    suggestions: list[Suggestion]


class Nearest(BaseModel):
    id: str | None = None
    caption: str | None = None
    score: float | None = None
    criterion: str | None = None
    higher_is_better: bool | None = None
    copy_threshold: float | None = None
    is_copy: bool | None = None
    png: str | None = Field(default=None, description="the training image, base64 PNG")


class GeneratedImage(BaseModel):
    png: str = Field(description="base64 PNG")
    nearest: Nearest | None = Field(default=None, description="nearest training image "
                                                              "(only when the server has --index)")
    records: dict | None = Field(default=None, description="what each mitigation did")


class Detection(BaseModel):
    score: float
    flagged: bool


class GenerateResponse(BaseModel):
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    mitigate: str
    threshold: float
    truncated: bool
    detection: Detection = Field(description="the prompt's score and flag as /v1/detect gives "
                                             "them")
    images: dict[str, GeneratedImage] = Field(description="'plain' and/or 'mitigated'")


class ErrorResponse(BaseModel):
    error: str = Field(description="one-line reason")


def request_models(cfg: ServerConfig, mitigations: list[str]):
    """The request bodies of ``/v1/detect``, ``/v1/explain`` and ``/v1/generate``, whose limits
    come from ``cfg`` (and whose ``mitigate`` description lists ``mitigations``)."""
    Prompt = Annotated[str, StringConstraints(max_length=cfg.max_prompt_chars)]
    OnePrompt = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_prompt_chars)]

    class DetectRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompts: list[Prompt] = Field(min_length=1, max_length=cfg.max_prompts,
                                      description=f"1 to {cfg.max_prompts} prompts")

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: OnePrompt
        top_k: int = Field(default=5, ge=1, le=10,
                           description="words to edit, alone and the top 2..k together")

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: OnePrompt
        mitigate: Annotated[str, StringConstraints(max_length=200)] = Field(
            default="auto", description="'none', 'auto' (gated by the calibrated threshold), or "
            f"NAME[:STRENGTH][,NAME...] of {', '.join(mitigations)}")
        compare: bool = Field(default=True, description="also return the plain image "
                                                        "(same seed) beside the mitigated one")
        seed: int = Field(default=0, ge=0, le=2**31 - 1)
        steps: int = Field(default=min(50, cfg.max_steps), ge=1, le=cfg.max_steps)
        guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)

    return DetectRequest, ExplainRequest, GenerateRequest
