"""``apexctl merge-lora``: base + LoRA → a plain model folder, merged in fp32 and checked before it is kept.

Parity: the merged denoiser's velocity on a fixed random input must equal base + adapter within ``tolerance``
(max |Δ| relative to max |v|), measured in fp32 before the final cast; otherwise exit 1 and nothing is left
under ``--out``. The folder is written to a temporary sibling and renamed only after the check.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apexctl.errors import ApexError, BadInput
from apexctl.lora import WEIGHT_NAME, check_lora_file
from apexctl.recipe import torch_dtype

DTYPES = ("fp32", "bf16", "fp16")


def resolve_lora(lora: Path, base: str | None) -> tuple[Path, str]:
    """(LoRA folder, base model) from a run folder (its recipe names the base) or a LoRA folder + ``--base``;
    the LoRA file is checked here, before the base model loads."""
    folder, base = _resolve(lora, base)
    check_lora_file(folder / WEIGHT_NAME)
    return folder, base


def _resolve(lora: Path, base: str | None) -> tuple[Path, str]:
    if (lora / "lora" / WEIGHT_NAME).is_file():  # a run folder
        if base is None:
            from apexctl.recipe import load_recipe

            rec = lora / "recipe.yaml"
            if not rec.is_file():
                raise BadInput(f"{lora}: no recipe.yaml to take the base model from; pass --base")
            base = load_recipe(rec).model.path
        return lora / "lora", base
    if (lora / WEIGHT_NAME).is_file():
        if base is None:
            raise BadInput(f"{lora}: a bare LoRA folder needs --base MODEL")
        return lora, base
    raise BadInput(f"--lora {lora}: neither a run folder with lora/ nor a folder with {WEIGHT_NAME}")


@torch.no_grad()
def merge_lora(
    lora: Path,
    out: Path,
    *,
    base: str | None = None,
    dtype: str = "fp32",
    tolerance: float = 1e-4,
    one_step_scheduler: bool = True,
) -> dict:
    """Merge and save; returns a summary (paths, dtype, measured parity error)."""
    from apexctl.models import load_backbone, resolve_model_path

    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    folder, base = resolve_lora(lora, base)
    base_dir = resolve_model_path(base)
    bb = load_backbone(base_dir, dtype=torch.float32)
    bb.load_lora(folder)
    x = torch.randn(2, *bb.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 0.5])
    cond = bb.encode_prompts(["a photo", "a red fox in the snow"])
    v_adapter = bb.velocity(x, t, cond)
    bb.transformer.fuse_lora(lora_scale=1.0)
    bb.transformer.unload_lora()
    v_merged = bb.velocity(x, t, cond)
    err = float((v_merged - v_adapter).abs().max() / v_adapter.abs().max().clamp_min(1e-12))
    if not err <= tolerance:
        raise ApexError(
            f"merge parity failed: max relative difference {err:.2e} > {tolerance:.0e}; nothing written to {out}"
        )
    if one_step_scheduler and bb.scheduler.config.get("shift_terminal"):
        # diffusers' terminal stretch is NaN at num_inference_steps=1; a one-step model must not carry it
        bb.scheduler = type(bb.scheduler).from_config(bb.scheduler.config, shift_terminal=None)
    bb.transformer.to(torch_dtype(dtype))
    bb.save_pretrained(out, source=base_dir)  # temp folder + rename: a failed write leaves no partial --out
    return {"base": str(base_dir), "lora": str(folder), "out": str(out), "dtype": dtype, "parity_rel_err": err}
