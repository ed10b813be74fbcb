"""Hub-free tiny model builds for tests and the embedded digits default (notes/cpu-and-tiny-models.md).

``build_tiny_qwen_image(out, preset=...)`` builds random stock components in code and saves them through the same
``save_pretrained`` as a real model; the same seed and settings give the same weights. ``resolve_model_path("tiny:...")``
builds once into a cache folder keyed by the settings.

Presets:
- ``test``:   the notes' recommended tiny pipeline: f4 ``AutoencoderKLQwenImage`` (z=4), 2-layer transformer
              (``in_channels=16, out_channels=4``), text hidden 16. Loads in the stock ``QwenImagePipeline``.
- ``digits``: pixel codec (1 channel, 8×8 images → latents (1, 8, 8)), transformer ``patch_size=2, in_channels=4,
              out_channels=1``, text hidden 32. Sizes are overridable (``num_layers``, ``num_attention_heads``,
              ``attention_head_dim``, ``text_hidden``, ``text_layers``).
- ``scenes``: pixel codec with space-to-depth 2 (3 channels, 16×16 RGB → latents (12, 8, 8), so the 2×2-packed
              transformer still sees 16 tokens), ``in_channels=48, out_channels=12``, tokenizer also trained on the
              scenes prompts (``apexctl.data.scenes.vocabulary_corpus``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import parse_qsl

from apexctl.errors import BadInput
from apexctl.models.base import MODEL_MARKER

#: bump when a preset's construction changes, so cached builds are rebuilt
TINY_VERSION = 1

_SIZES = ("num_layers", "num_attention_heads", "attention_head_dim", "text_hidden", "text_layers")
PRESETS: dict[str, dict[str, int]] = {
    "test": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "text_hidden": 16, "text_layers": 2},
    "digits": {
        "num_layers": 3,
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "text_hidden": 32,
        "text_layers": 2,
    },
    "scenes": {
        "num_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "text_hidden": 32,
        "text_layers": 2,
    },
}
# Qwen-Image's own scheduler config (resolution-dependent shift, terminal sigma 0.02), so the tiny models exercise
# the same schedule code as the 20B one.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Even (frame, height, width) RoPE split summing to ``head_dim``, about 1/4 : 3/8 : 3/8 like the real model."""
    if head_dim % 2 or head_dim < 6:
        raise BadInput(f"attention_head_dim={head_dim}: must be even and >= 6")
    a = max(2, head_dim // 4 // 2 * 2)
    b = max(2, (head_dim - a) // 2 // 2 * 2)
    return a, b, head_dim - a - b


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's multimodal RoPE sections (sum = head_dim / 2), in the real model's proportions."""
    half = head_dim // 2
    a = max(1, half // 4)
    b = (half - a) // 2
    return [a, b, half - a - b]


#: tiny builds of the other families (one builder each, no size overrides): preset → "module:function"
OTHER_FAMILIES = {
    "sd3": "apexctl.models.tiny_sd3:build_tiny_sd3",
    "sana": "apexctl.models.tiny_sana:build_tiny_sana",
    "flux": "apexctl.models.tiny_flux:build_tiny_flux",
    "z_image": "apexctl.models.tiny_z_image:build_tiny_z_image",
}


def _build(preset: str, out: Path, seed: int, overrides: dict[str, int]) -> None:
    if preset in OTHER_FAMILIES:
        import importlib

        module, fn = OTHER_FAMILIES[preset].split(":")
        getattr(importlib.import_module(module), fn)(out, seed=seed)
    else:
        build_tiny_qwen_image(out, preset=preset, seed=seed, **overrides)


def _sizes(preset: str, overrides: dict) -> dict[str, int]:
    if preset in OTHER_FAMILIES:
        if overrides:
            raise BadInput(f"tiny:{preset} takes no size settings (only seed)")
        return {}
    if preset not in PRESETS:
        raise BadInput(f"tiny preset {preset!r} is unknown (allowed: {', '.join([*PRESETS, *OTHER_FAMILIES])})")
    unknown = sorted(set(overrides) - set(_SIZES))
    if unknown:
        raise BadInput(f"tiny:{preset}: unknown setting {unknown[0]!r} (allowed: {', '.join(_SIZES)}, seed)")
    sizes = {**PRESETS[preset], **{k: int(v) for k, v in overrides.items()}}
    if sizes["text_hidden"] % 2 or sizes["text_hidden"] < 8:
        raise BadInput(f"tiny:{preset}: text_hidden={sizes['text_hidden']} must be even and >= 8")
    return sizes


def build_tiny_qwen_image(out_dir: str | Path, *, preset: str = "test", seed: int = 0, **sizes: int) -> Path:
    """Build the tiny Qwen-Image model ``preset`` (with size overrides) from ``seed`` and save it to ``out_dir``.

    Deterministic: the same (preset, seed, sizes) gives identical files. The global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from apexctl.models.base import PixelCodec
    from apexctl.models.qwen_image import QwenImageBackbone
    from apexctl.models.tiny_parts import save_tiny, seeded
    from apexctl.models.tokenizers import qwen2_tokenizer

    s = _sizes(preset, sizes)
    if preset == "scenes":
        from apexctl.data.scenes import vocabulary_corpus

        tok = qwen2_tokenizer(vocabulary_corpus())
    else:
        tok = qwen2_tokenizer()
    with seeded(seed):
        if preset == "test":
            codec = AutoencoderKLQwenImage(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 1, 2],
                num_res_blocks=1,
                temperal_downsample=[False, True],
                # non-trivial statistics, so tests see the normalisation
                latents_mean=[0.1, -0.2, 0.3, 0.0],
                latents_std=[0.5, 1.5, 1.0, 2.0],
            )
            latent_channels = 4
        elif preset == "scenes":
            codec = PixelCodec(channels=3, patch=2)
            latent_channels = codec.latent_channels
        else:
            codec = PixelCodec(channels=1)
            latent_channels = 1
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,  # 2×2 packing
            out_channels=latent_channels,
            num_layers=s["num_layers"],
            attention_head_dim=s["attention_head_dim"],
            num_attention_heads=s["num_attention_heads"],
            joint_attention_dim=s["text_hidden"],
            axes_dims_rope=rope_axes(s["attention_head_dim"]),
        )
        hidden, heads = s["text_hidden"], 2
        # token ids must exist in the tiny vocabulary, inside text_config too (else transformers warns)
        ids = {"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    hidden_size=hidden,
                    intermediate_size=2 * hidden,
                    num_hidden_layers=s["text_layers"],
                    num_attention_heads=heads,
                    num_key_value_heads=heads,
                    vocab_size=len(tok),
                    rope_theta=1e6,
                    rope_scaling={
                        "mrope_section": _mrope_section(hidden // heads),
                        "rope_type": "default",
                        "type": "default",
                    },
                    **ids,
                ),
                vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
                vocab_size=len(tok),
                **ids,
            )
        )
    return save_tiny(
        QwenImageBackbone, out_dir, transformer, QWEN_IMAGE_SCHEDULER, codec, text_encoder=text_encoder, tokenizer=tok
    )


def apexctl_home() -> Path:
    return Path(os.environ.get("APEXCTL_HOME") or Path.home() / ".cache" / "apexctl")


def _parse_value(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise BadInput(f"tiny spec: setting value {v!r} is not an integer") from None


def parse_tiny_spec(spec: str) -> tuple[str, int, dict[str, int]]:
    """``tiny:<preset>[?key=value&...]`` → (preset, seed, size overrides). Validates keys and values."""
    body = spec[len("tiny:") :]
    preset, _, query = body.partition("?")
    settings = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))}
    seed = settings.pop("seed", 0)
    _sizes(preset, settings)
    return preset, seed, settings


def resolve_model_path(spec: str) -> str:
    """``tiny:<preset>[?k=v&...]`` → a cached build folder ``$APEXCTL_HOME/tiny/<preset>-<hash>``; anything else as is.

    Built once; concurrent builders are safe (each builds into its own temp folder, the first rename wins).
    """
    if not spec.startswith("tiny:"):
        return spec
    try:
        preset, seed, overrides = parse_tiny_spec(spec)
    except ValueError as e:  # parse_qsl's strict parsing
        raise BadInput(f"tiny spec {spec!r}: {e}") from None
    key = json.dumps(
        {"preset": preset, "seed": seed, "sizes": _sizes(preset, overrides), "version": TINY_VERSION}, sort_keys=True
    )
    root = apexctl_home() / "tiny"
    dest = root / f"{preset}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (dest / MODEL_MARKER).is_file():
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(preset, tmp, seed, overrides)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MODEL_MARKER).is_file():
                raise
            # another process finished first: its build is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
