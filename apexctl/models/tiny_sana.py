"""Hub-free, deterministic tiny SANA build for tests (notes/cpu-and-tiny-models.md §2-§3).

``build_tiny_sana(out)`` builds random stock components in code — ``Gemma2Model`` text encoder, a Metaspace-BPE
``GemmaTokenizer`` trained on a fixed corpus, an f2 ``AutoencoderDC`` and a 2-layer ``SanaTransformer2DModel`` — and
saves them through ``SanaBackbone.save_pretrained``, so the folder loads in the stock ``SanaPipeline`` too. 32×32 images
→ latents ``(4, 16, 16)``. The scheduler is ``FlowMatchEulerDiscreteScheduler`` with SANA's ``flow_shift = 3`` as a
static shift (the stock ``SanaPipeline`` accepts it; the hub SANA models ship ``DPMSolverMultistepScheduler``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from apexctl.models.tiny_parts import save_tiny, seeded

if TYPE_CHECKING:
    from transformers import GemmaTokenizer

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
TEXT_HIDDEN = 16
#: SANA 1024px's flow_shift, used as FlowMatchEulerDiscreteScheduler's static shift
SANA_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def sana_chi_lines() -> list[str]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction`` (read from the installed diffusers)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def sana_corpus() -> list[str]:
    from apexctl.models.tokenizers import DIGIT_PHRASES, DIGIT_WORDS, GENERAL_CAPTIONS

    digits = [f"{p} {w}" for p in DIGIT_PHRASES for w in DIGIT_WORDS]
    return [
        *sana_chi_lines(),
        "\n".join(sana_chi_lines()) + "a red fox",
        "a handwritten digit seven",
        *DIGIT_PHRASES,
        " ".join(DIGIT_WORDS),
        *digits,
        *GENERAL_CAPTIONS,
    ]


def gemma_tokenizer() -> GemmaTokenizer:
    """A Metaspace BPE ``GemmaTokenizer`` trained on ``sana_corpus()`` (deterministic across processes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=65536, special_tokens=list(GEMMA_SPECIALS), show_progress=False)
    tok.train_from_iterator(sana_corpus(), trainer)
    m = json.loads(tok.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    out = GemmaTokenizer(vocab=m["vocab"], merges=merges, add_bos_token=True)  # as the hub Gemma tokenizer
    out.padding_side = "right"  # SanaPipeline sets it too
    return out


def build_tiny_sana(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny SANA model from ``seed`` into ``out_dir``; the global torch RNG is left untouched."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from apexctl.models.sana import SanaBackbone

    tok = gemma_tokenizer()
    with seeded(seed):
        codec = AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            upsample_block_type="interpolate",
            downsample_block_type="conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
        transformer = SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=TEXT_HIDDEN,
            sample_size=16,
        )
        text_encoder = Gemma2Model(
            Gemma2Config(
                head_dim=16,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=32,
                num_attention_heads=2,
                num_hidden_layers=1,
                num_key_value_heads=2,
                vocab_size=len(tok),
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                attn_implementation="eager",
            )
        ).eval()
    return save_tiny(
        SanaBackbone, out_dir, transformer, SANA_SCHEDULER, codec, text_encoder=text_encoder, tokenizer=tok
    )
