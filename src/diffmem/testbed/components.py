"""The testbed's Stable-Diffusion-format components, built from configs (no downloads).

The tokenizer is the real CLIP BPE tokenizer, built from the vocabulary file that open-clip-torch
ships. The text encoder, VAE and UNet are small versions of the SD 1.x classes, so that the testbed
loads with ``StableDiffusionPipeline.from_pretrained`` and every diffmem method runs on it unchanged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from diffmem.runtime.errors import DiffmemError

MAX_LENGTH = 77  # CLIP context length, as in SD 1.x / 2.x

#: Small CLIP text encoder: 49408-token vocabulary like SD, a narrow, shallow transformer.
TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 48,
}

#: 64x64 RGB <-> 8x8x4 latents (8x downsampling, as in SD).
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}

#: UNet on 8x8 latents with cross-attention at 8x8 and 4x4 (and in the mid block).
UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [48, 96],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": 4,  # diffusers: number of heads for SD-style UNets
    "norm_num_groups": 16,
}

#: DDIM with SD's noise schedule; the testbed's default sampler.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def clip_bpe_file() -> Path:
    """Path of the CLIP BPE merges file shipped by open-clip-torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DiffmemError(
            "open-clip-torch is not installed; it ships the CLIP BPE vocabulary diffmem's tokenizer "
            "needs. Install it with `pip install --no-deps open-clip-torch`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise DiffmemError(f"open-clip-torch is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-entry vocabulary and its BPE merges, as OpenAI's tokenizer builds them."""
    with gzip.open(clip_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(out: str | Path, *, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, configs) loadable by transformers.

    ``pad_token="<|endoftext|>"`` gives SD 1.x padding; ``pad_token="!"`` gives SD 2.x padding (id 0).
    """
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    import transformers

    files = {"vocab": str(out / "vocab.json"), "merges": str(out / "merges.txt")}
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x: the slow tokenizer's file names
        files = {"vocab_file": files["vocab"], "merges_file": files["merges"]}
    tok = CLIPTokenizer(**files, pad_token=pad_token, model_max_length=MAX_LENGTH)
    tok.save_pretrained(out)
    return out


def build_components(seed: int = 0, *, latent_channels: int = 4,
                     vae_channels: tuple[int, ...] = (16, 32, 64, 64)) -> dict:
    """Randomly initialised testbed components (text encoder, VAE, UNet, scheduler); the first
    testbed's by default, the graded testbed's with 8 latent channels and a wider VAE."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    vae = AutoencoderKL(**{**VAE_CONFIG, "latent_channels": latent_channels,
                           "block_out_channels": list(vae_channels)})
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": latent_channels,
                                   "out_channels": latent_channels})
    sched = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    scheduler = DDIMScheduler(**sched)
    return {"text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


#: Key prefix transformers gives ``CLIPTextModel`` weights (its ``text_model`` submodule).
TEXT_MODEL_PREFIX = "text_model."


def make_portable(folder: str | Path) -> Path:
    """Rewrite a saved SD pipeline folder into the layout every supported library version loads,
    without changing a number (transformers >= 4.44, diffusers >= 0.30, see pyproject.toml):

    - text encoder weights keyed ``text_model.*`` (transformers 5 saves ``CLIPTextModel`` weights
      without the prefix; transformers 4.x then initialises the encoder randomly, with only a
      warning);
    - ``tokenizer.json`` merges as ``"a b"`` strings (tokenizers < 0.20 cannot parse the
      ``["a", "b"]`` pairs newer versions write; newer ones read both);
    - the tokenizer declared as ``CLIPTokenizerFast`` in ``model_index.json`` (transformers 4.x's
      ``CLIPTokenizer`` is the slow one and needs vocab.json + merges.txt; in transformers 5 both
      names are the same tokenizer).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = folder / "text_encoder" / "model.safetensors"
    if weights.is_file():
        with safe_open(weights, "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            if not all(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
                tensors = {(k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k):
                           f.get_tensor(k) for k in keys}
                save_file(tensors, weights, metadata={"format": "pt", **meta})
    tok = folder / "tokenizer" / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        merges = data.get("model", {}).get("merges")
        if merges and not isinstance(merges[0], str):
            data["model"]["merges"] = [" ".join(m) for m in merges]
            tok.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                           encoding="utf-8")
    index = folder / "model_index.json"
    if index.is_file():
        spec = json.loads(index.read_text(encoding="utf-8"))
        if spec.get("tokenizer") == ["transformers", "CLIPTokenizer"] and tok.is_file():
            spec["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
            index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
