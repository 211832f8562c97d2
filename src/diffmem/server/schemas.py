"""The service's request and response bodies (pydantic models, shown in ``/openapi.json``).

The request models depend on the server's limits, so :func:`request_models` makes them from a
:class:`~diffmem.server.config.ServerConfig`; the response models are fixed.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from diffmem.server.config import ServerConfig


class Estimate(BaseModel):
    score: float = Field(description="first-step noise magnitude (Wen et al. 2024, eq. 4)")
    threshold: float
    flagged: bool = Field(description="score > threshold (a fast estimate, not the verdict)")


class GenerationVerdict(BaseModel):
    source: str = Field(description="'generation'")
    copies: bool = Field(description="the closest preview crosses the copy criterion")
    margin: float = Field(description="preview replication's score; > 0 copies")
    similarity: float = Field(description="the closest preview's similarity or distance")
    criterion: str
    copy_threshold: float
    higher_is_better: bool
    nearest_id: str
    nearest_caption: str
    seed: int
    generations: int
    steps: int
    criterion_text: str
    method: str
    preview_png: str | None = Field(default=None, description="the closest preview, base64 PNG")
    nearest_png: str | None = Field(default=None,
                                    description="its nearest training image, base64 PNG")


class VerdictFields(BaseModel):
    source: str = Field(description="'generation' (previews searched in the training index) or "
                                     "'first_step_estimate' (no index, or asked for)")
    estimate: Estimate
    verdict: GenerationVerdict | None = None
    note: str | None = Field(default=None, description="what an index would add (estimates)")


class DetectResult(VerdictFields):
    prompt: str
    score: float = Field(description="first-step noise magnitude (the estimate's score)")
    threshold: float
    flagged: bool = Field(description="the decision: the verdict by generation when source is "
                                      "'generation', else score > threshold")
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


class ExplainResponse(VerdictFields):
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
    verdict: dict | None = Field(default=None, description=(
        "mitigate=auto (the guard): status clean / mitigated / unresolved, method, what flagged "
        "it and when, tries, nearest training image and similarity, whether it was verified"))


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
        verdict: Literal["auto", "estimate", "generation"] = Field(
            default="auto", description="'auto': by generation when the server has an index, "
            "else the first-step estimate; 'estimate': the first-step estimate only (fast); "
            "'generation': by generation (422 without an index)")
        evidence: bool = Field(default=False, description="with a verdict by generation, the "
                               "closest preview and its nearest training image as base64 PNG")

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
