"""Pieces the hub-free tiny builds share (notes/cpu-and-tiny-models.md §2-§3): seeded construction, the tiny
CLIP / T5 text encoders and ``AutoencoderKL``, and the save step. Each builder still creates its modules in its own
fixed order inside ``seeded``, so the same seed gives the same files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global RNG seeded with ``seed`` inside the block and restored after it (a build leaves it untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_text_config(tok: Any, hidden: int, **extra: Any) -> Any:
    """A 2-layer, 2-head ``CLIPTextConfig`` of width ``hidden`` for the deterministic CLIP tokenizer ``tok``.

    ``eos_token_id`` is the real one (not 2), so the pooled output is read at the first eos token (not the legacy
    argmax); padding is eos, as in the hub CLIP tokenizers."""
    from transformers import CLIPTextConfig

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        **extra,
    )


def t5_encoder(tok: Any, d_model: int) -> Any:
    """A random 2-layer ``T5EncoderModel`` of width ``d_model`` for the deterministic T5 tokenizer ``tok``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def kl_vae(
    block_out_channels: Sequence[int], *, scaling_factor: float, shift_factor: float, quant_conv: bool = False
) -> Any:
    """A random ``AutoencoderKL`` with 4 latent channels, one block per width (``f = 2 ** (len − 1)``), for 32×32
    images, normalised by ``scaling_factor`` / ``shift_factor``; ``quant_conv``: with the (post-)quant convolutions."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    convs = {} if quant_conv else {"use_quant_conv": False, "use_post_quant_conv": False}
    # AutoencoderKL's defaults do the rest: RGB in and out, 4 latent channels, one layer per block, 32 px samples
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    return AutoencoderKL(
        **blocks,
        block_out_channels=list(block_out_channels),
        norm_num_groups=8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **convs,
    )


def save_tiny(family: type, out_dir: str | Path, transformer: Any, scheduler: dict, codec: Any, **text: Any) -> Path:
    """Assemble ``family(transformer, FlowMatchEulerDiscreteScheduler(**scheduler), codec=codec, **text)`` (its
    constructor puts the frozen parts in eval mode: no dropout) and save it to ``out_dir`` through the same
    ``save_pretrained`` as a real model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    backbone = family(transformer, FlowMatchEulerDiscreteScheduler(**scheduler), codec=codec, **text)
    out = Path(out_dir)
    backbone.save_pretrained(out)
    return out
