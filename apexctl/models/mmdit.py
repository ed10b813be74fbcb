"""What the dual-stream (MMDiT) families share: the joint-attention LoRA targets (Qwen-Image, SD3, FLUX), 2×2 token
packing (Qwen-Image, FLUX) and pooled text read by ``context_embedder`` (SD3, FLUX)."""

from __future__ import annotations

import torch
from torch import nn

from apexctl.models.base import Cond

#: the projections of diffusers' joint (dual-stream) attention, named alike in Qwen-Image, SD3 and FLUX
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]``: 2×2 patches as tokens, the layout of ``QwenImagePipeline`` and
    ``FluxPipeline._pack_latents`` (both adapters re-export it)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"2x2 packing needs even latent height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latents ``h × w``: ``[B, (h/2)(w/2), 4C]`` → ``[B, C, h, w]``."""
    b, _, d = x.shape
    x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


class PooledText:
    """Mixin for SD3 and FLUX: the text is a token sequence, read by ``transformer.context_embedder`` with no
    attention mask (every token attends, the tokenizers' padding included, as in the pipelines), plus a pooled CLIP
    vector ``Cond.pooled``."""

    transformer: nn.Module

    @staticmethod
    def _all_tokens(embeds: torch.Tensor, pooled: torch.Tensor) -> Cond:
        """``Cond(embeds, mask = ones, pooled)``: the mask only records that every token counts."""
        return Cond(
            embeds=embeds, mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device), pooled=pooled
        )

    def _pooled(self, cond: Cond) -> torch.Tensor:
        if cond.pooled is None:
            raise ValueError(f"{type(self).__name__} needs pooled text embeddings (Cond.pooled), got None")
        return cond.pooled

    def condition_site(self) -> nn.Module:
        """``transformer.context_embedder``: the DiT's projection of the text embeddings to its width."""
        return self.transformer.context_embedder

    @property
    def embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)
