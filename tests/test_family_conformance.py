"""What every family adapter must satisfy against its stock diffusers pipeline, on the hub-free tiny builds
(docs/design.md §3-§4): one test per property, parametrised over the five families.

- the folder loads in the stock pipeline, with a ``model_index.json`` naming the classes we hold;
- ``encode_prompts`` equals the stock ``encode_prompt`` (padding, mask, pooled rows) and concatenates back;
- our Euler sampler on ``teacher_sigmas`` equals the stock pipeline's output for the same latents, with and without
  CFG, and ``decode_latents`` its decoded image; ``teacher_sigmas`` is the pipeline's schedule and leaves ours alone;
- the codec's normalisation inverts to the raw codec latents;
- the condition site is the family's text projection and sees one row per sample;
- ``save_pretrained`` round-trips a trained transformer and hard-links the frozen parts;
- a LoRA export reloads to the same velocity, in our adapter and in the stock pipeline.

What only one family does (tokenizers, packing, Z-Image's reversed time, SANA's negative prompts and schedulers,
FLUX dev's embedded guidance, SD3 without T5, Qwen-Image's pixel codec) is tested in ``tests/test_<family>.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from apexctl.lora import WEIGHT_NAME
from apexctl.models import FAMILIES, detect_family, load_backbone, resolve_model_path
from apexctl.models.base import Cond
from apexctl.models.components import FROZEN_ROLES
from apexctl.models.mmdit import pack_latents, unpack_latents

#: a tuple: ZImagePipeline rewrites the prompt list it is given in place, so each call gets a fresh list
PROMPTS = ("a red fox", "a handwritten digit seven in the snow")


def _negative(guidance: float, n: int) -> list[str] | None:
    return [""] * n if guidance > 1 else None


def _padded(rows: list[torch.Tensor]) -> Cond:
    """Per-prompt ``[L_i, D]`` rows → right-padded ``Cond`` with its mask."""
    from torch.nn.utils.rnn import pad_sequence

    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
    return Cond(pad_sequence(rows, batch_first=True), mask)


class Stock:
    """How one family's stock pipeline is driven, and what its tiny build encodes to (defaults: no packing, an
    ``AutoencoderKL`` scaled and shifted)."""

    spec = ""
    #: transformer attribute of the condition site; latents of a 32×32 image
    site, latents_32 = "", (4, 16, 16)
    #: ``Cond.embeds`` width, ``Cond.pooled`` width, tokens of every row (None: right-padded to the longest)
    embed_dim, pooled_dim, tokens = 16, None, None

    def folder(self, root: Path) -> Path:
        return Path(resolve_model_path(self.spec))

    def call(self, guidance: float, n: int) -> dict:
        """The pipeline's arguments for our guidance scale ``u + s(c − u)`` on ``n`` prompts."""
        return {"guidance_scale": guidance, "negative_prompt": _negative(guidance, n)}

    def to_pipe(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def from_pipe(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, pipe, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def raw_latents(self, codec: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return codec.encode(images).latent_dist.mode()

    def denormalise(self, cfg, lat: torch.Tensor) -> torch.Tensor:
        return lat / cfg.scaling_factor + cfg.shift_factor

    def site_tokens(self, length: int) -> int:
        return length


class Packed(Stock):
    """A pipeline whose latents are 2×2 patches as tokens (Qwen-Image, FLUX)."""

    def to_pipe(self, z):
        return pack_latents(z)

    def from_pipe(self, x, z):
        return unpack_latents(x, *z.shape[-2:])


class QwenImage(Packed):
    spec, site, latents_32 = "tiny:test", "txt_in", (4, 8, 8)

    def call(self, guidance: float, n: int) -> dict:
        return {"true_cfg_scale": guidance, "negative_prompt": _negative(guidance, n)}

    def encode(self, pipe, prompts):
        return Cond(*pipe.encode_prompt(prompts, device="cpu"))

    def raw_latents(self, codec, images):
        return codec.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]  # a video VAE: one frame

    def denormalise(self, cfg, lat):
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
        return lat * std + mean


class Digits(QwenImage):
    """The embedded default (pixel codec, no stock pipeline folder): only for the save round trip."""

    spec = "tiny:digits"


class Sana(Stock):
    spec, site, tokens = "tiny:sana", "caption_projection", 300

    def call(self, guidance, n):
        return {"guidance_scale": guidance, "use_resolution_binning": False}  # the negative prompt defaults to ""

    def encode(self, pipe, prompts):
        """Positive prompts with the default complex human instruction, the final "" as the negative prompt."""
        from apexctl.models.sana import default_complex_human_instruction

        assert prompts[-1] == ""
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompts[:-1],
            do_classifier_free_guidance=True,
            negative_prompt="",
            device="cpu",
            complex_human_instruction=default_complex_human_instruction(),
        )
        return Cond(torch.cat([embeds, neg[:1]]), torch.cat([mask, neg_mask[:1]]))

    def raw_latents(self, codec, images):
        return codec.encode(images).latent

    def denormalise(self, cfg, lat):
        return lat / cfg.scaling_factor


class SD3(Stock):
    spec, site, latents_32 = "tiny:sd3", "context_embedder", (4, 8, 8)
    embed_dim, pooled_dim, tokens = 48, 32, 77 + 256

    def encode(self, pipe, prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
        return Cond(embeds, pooled=pooled)


class Flux(Packed):
    spec, site = "tiny:flux", "context_embedder"
    embed_dim, pooled_dim, tokens = 32, 16, 512
    #: the pipeline's ``guidance_scale`` is the distilled guidance input of dev models (schnell ignores it)
    embedded = 0.0

    def call(self, guidance, n):
        return {"true_cfg_scale": guidance, "guidance_scale": self.embedded, "negative_prompt": _negative(guidance, n)}

    def encode(self, pipe, prompts):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
        return Cond(embeds, pooled=pooled)


class FluxDev(Flux):
    """Guidance-distilled (dynamic shifting, ``embedded_guidance`` 3.5 as an input): only for the Euler parity."""

    embedded = 3.5

    def folder(self, root):
        from apexctl.models.tiny_flux import build_tiny_flux

        return build_tiny_flux(root / "flux_dev", guidance_embeds=True)


class ZImage(Stock):
    spec, site = "tiny:z_image", "cap_embedder"

    def call(self, guidance, n):
        """Its rule is ``c + g(c − u)`` (CFG on for g > 0): our scale s is its ``guidance_scale`` s − 1."""
        return {"guidance_scale": guidance - 1.0, "negative_prompt": _negative(guidance, n)}

    def encode(self, pipe, prompts):
        assert prompts[-1] == ""
        pos, neg = pipe.encode_prompt(prompts[:-1], device="cpu", do_classifier_free_guidance=True)
        return _padded(pos + neg[:1])  # each prompt's valid tokens only

    def site_tokens(self, length):
        return length + (-length) % 32  # the transformer pads captions to a multiple of 32


STOCK: dict[str, Stock] = {
    "qwen_image": QwenImage(),
    "sana": Sana(),
    "sd3": SD3(),
    "flux": Flux(),
    "z_image": ZImage(),
    "flux_dev": FluxDev(),
    "digits": Digits(),
}
assert set(FAMILIES) <= set(STOCK)


class Zoo:
    """The tiny builds, their backbones and stock pipelines, built once per module."""

    def __init__(self, root: Path) -> None:
        self.root, self._folders, self._backbones, self._pipes = root, {}, {}, {}

    def folder(self, name: str) -> Path:
        if name not in self._folders:
            self._folders[name] = STOCK[name].folder(self.root)
        return self._folders[name]

    def backbone(self, name: str):
        if name not in self._backbones:
            self._backbones[name] = load_backbone(str(self.folder(name)))
        return self._backbones[name]

    def pipe(self, name: str, fresh: bool = False):
        from diffusers import DiffusionPipeline

        if fresh or name not in self._pipes:
            pipe = DiffusionPipeline.from_pretrained(str(self.folder(name)))
            pipe.set_progress_bar_config(disable=True)
            if fresh:
                return pipe
            self._pipes[name] = pipe
        return self._pipes[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEXCTL_HOME", str(tmp_path_factory.getbasetemp() / "home"))  # shared with the other tiny tests
        yield Zoo(tmp_path_factory.mktemp("zoo"))


def _x(bb, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *bb.latent_shape(size, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_in_the_stock_pipeline(zoo, family):
    folder, bb, pipe = zoo.folder(family), zoo.backbone(family), zoo.pipe(family)
    assert type(bb) is FAMILIES[family] and detect_family(folder) == family
    assert json.loads((folder / "apexctl_model.json").read_text()) == {"family": family}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == bb.pipeline_class == type(pipe).__name__
    for part in bb.components:  # the index names the classes we loaded (tokenizers aside: fast/slow aliases)
        if part.role != "tokenizer":
            assert index[part.name] == [part.library, type(getattr(bb, part.attr)).__name__], part.name
    assert (
        type(pipe.scheduler) is type(bb.scheduler) and type(bb.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    )
    assert bb.latent_shape(32, 32) == STOCK[family].latents_32


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_equals_the_pipeline(zoo, family):
    bb, stock = zoo.backbone(family), STOCK[family]
    ours = bb.encode_prompts([*PROMPTS, ""])
    with torch.no_grad():
        ref = stock.encode(zoo.pipe(family), [*PROMPTS, ""])
    assert torch.equal(ours.embeds, ref.embeds)
    assert ours.mask.dtype == torch.long
    if ref.mask is None:  # no attention mask in this family: every token attends, padding included
        assert torch.equal(ours.mask, torch.ones(ours.embeds.shape[:2], dtype=torch.long))
    else:
        assert torch.equal(ours.mask, ref.mask.long())
        assert ours.mask[2].sum() < ours.mask[1].sum()  # right padding present
    assert (ours.pooled is None) == (ref.pooled is None)
    if ref.pooled is not None:
        assert torch.equal(ours.pooled, ref.pooled) and ours.pooled.shape == (3, bb.pooled_dim)
    assert (
        ours.embeds.shape[-1] == bb.embed_dim == stock.embed_dim and getattr(bb, "pooled_dim", None) == stock.pooled_dim
    )
    if stock.tokens is not None:
        assert ours.embeds.shape[1] == stock.tokens
    both = Cond.cat([ours[0], ours[1:]])  # split and concatenated back, pooled rows kept
    assert torch.equal(both.embeds, ours.embeds) and torch.equal(both.mask, ours.mask)
    assert (both.pooled is None) == (ours.pooled is None) and (
        ours.pooled is None or torch.equal(both.pooled, ours.pooled)
    )


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("name", [*FAMILIES, "flux_dev"])
def test_euler_equals_the_stock_pipeline(zoo, name, guidance):
    from apexctl.engine.sampler import euler

    bb, pipe, stock = zoo.backbone(name), zoo.pipe(name), STOCK[name]
    z = _x(bb, 0)
    cond = bb.encode_prompts(list(PROMPTS))
    uncond = bb.encode_prompts([""] * len(PROMPTS)) if guidance > 1 else None
    ours = euler(bb, z, cond, steps=4, uncond=uncond, guidance_scale=guidance)

    def stock_run(output_type: str) -> torch.Tensor:  # fresh latents each time: a pipeline may step them in place
        kwargs = dict(num_inference_steps=4, height=32, width=32, latents=stock.to_pipe(z.clone()))
        return pipe(list(PROMPTS), **kwargs, **stock.call(guidance, len(PROMPTS)), output_type=output_type).images

    ref = stock_run("latent")
    assert ref.shape == stock.to_pipe(ours).shape
    torch.testing.assert_close(ours, stock.from_pipe(ref, z), atol=1e-4, rtol=0)
    assert (ours - z).abs().max() > 0.1  # the sampler actually moved
    torch.testing.assert_close(bb.teacher_sigmas(4, tuple(z.shape[1:])), pipe.scheduler.sigmas.float(), atol=0, rtol=0)

    image = stock_run("pt")
    with torch.no_grad():
        decoded = bb.decode_latents(ours)
    torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1), image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_sigmas_are_the_pipeline_schedule_and_stateless(zoo, family):
    bb, pipe = zoo.backbone(family), zoo.pipe(family)
    pipe(
        prompt="a red fox", num_inference_steps=3, height=64, width=32, output_type="latent", **STOCK[family].call(1, 1)
    )
    sig = bb.teacher_sigmas(3, bb.latent_shape(64, 32))  # not square: the shift may depend on the token count
    torch.testing.assert_close(sig, pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 4
    assert len(bb.scheduler.sigmas) == bb.scheduler.config.num_train_timesteps  # our scheduler is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_codec_normalisation_inverts_to_the_raw_latents(zoo, family):
    bb, stock = zoo.backbone(family), STOCK[family]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        lat = bb.encode_images(images)
        raw = stock.raw_latents(bb.codec, images)
        out = bb.decode_latents(lat)
    assert lat.shape == (2, *bb.latent_shape(32, 32))
    torch.testing.assert_close(stock.denormalise(bb.codec.config, lat), raw)
    assert (lat - raw).abs().max() > 1e-2  # a non-trivial normalisation (else the check above proves nothing)
    assert out.shape == images.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_condition_site_sees_one_row_per_sample(zoo, family):
    bb, stock = zoo.backbone(family), STOCK[family]
    site = bb.condition_site()
    assert site is getattr(bb.transformer, stock.site)
    cond = bb.encode_prompts(list(PROMPTS))
    seen = []
    handle = site.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            bb.velocity(_x(bb, 3), torch.tensor([0.5, 0.5]), cond)
    finally:
        handle.remove()
    cfg = bb.transformer.config
    width = cfg.get("dim") or cfg.num_attention_heads * cfg.attention_head_dim  # the DiT's width
    assert seen == [torch.Size([2, stock.site_tokens(cond.embeds.shape[1]), width])]
    assert bb.condition_dim() == width


@pytest.mark.parametrize("name", [*FAMILIES, "digits"])
def test_save_pretrained_round_trip_links_frozen_parts(zoo, name, tmp_path):
    bb, source = zoo.backbone(name), zoo.folder(name)
    out = tmp_path / "copy"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")  # an existing folder is replaced as a whole
    bias = next(p for n, p in bb.condition_site().named_parameters() if n.endswith("bias"))
    trained = bias.detach().clone()
    x, t = _x(bb, 2), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        bias.add_(0.5)  # a "trained" transformer
    try:
        bb.save_pretrained(out, source=source)
        again = load_backbone(str(out))
        with torch.no_grad():
            assert torch.equal(
                again.velocity(x, t, again.encode_prompts(list(PROMPTS))),
                bb.velocity(x, t, bb.encode_prompts(list(PROMPTS))),
            )
    finally:
        with torch.no_grad():
            bias.copy_(trained)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "apexctl_model.json").read_text()) == {"family": bb.family}
    assert (out / "model_index.json").is_file() == (source / "model_index.json").is_file()
    if (out / "model_index.json").is_file():
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == bb.pipeline_class
    frozen = [p.name for p in bb.components if p.role in FROZEN_ROLES and (source / p.name).is_dir()]
    assert "text_encoder" in frozen and "tokenizer" in frozen
    for name_ in frozen:
        for f in (source / name_).rglob("*"):
            if f.is_file():  # hard-linked, not copied
                assert os.stat(out / f.relative_to(source)).st_ino == os.stat(f).st_ino, f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_linear_layers(zoo, family):
    bb = zoo.backbone(family)
    linears = [n for n, m in bb.transformer.named_modules() if isinstance(m, nn.Linear)]
    for target in bb.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in linears), target


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_reloads_here_and_in_the_stock_pipeline(zoo, family, tmp_path):
    from peft import LoraConfig

    cls, folder, plain = FAMILIES[family], zoo.folder(family), zoo.backbone(family)
    bb = cls.from_pretrained(folder)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=bb.lora_targets)
    bb.transformer.add_adapter(config)
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    bb.save_lora(tmp_path / "lora")
    fresh = cls.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    cond = bb.encode_prompts(list(PROMPTS))
    x, t = _x(bb, 4), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = bb.velocity(x, t, cond)
        assert torch.equal(fresh.velocity(x, t, cond), v)
        assert (plain.velocity(x, t, cond) - v).abs().max() > 1e-3  # the adapter does something
    pipe = zoo.pipe(family, fresh=True)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=WEIGHT_NAME)
    via_pipe = cls(pipe.transformer, pipe.scheduler, codec_config=dict(plain.codec_config))
    with torch.no_grad():
        torch.testing.assert_close(via_pipe.velocity(x, t, cond), v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_target_time_input_is_the_stock_module_at_tt_zero(zoo, family):
    """apex_full's target-time embedder: supported where the family has one time-embedding module (not SANA);
    e(0) = 0 whatever its weights, so tt = 0 is the stock module exactly; tt > 0 changes the velocity."""
    from apexctl.engine.objectives import Net
    from apexctl.engine.shift import ConditionShift
    from apexctl.engine.target_time import TargetTimeEmbedding
    from apexctl.errors import BadInput

    bb = zoo.backbone(family)
    if family == "sana":
        with pytest.raises(BadInput, match="not supported for the sana family"):
            bb.time_embedding_site()
        return
    emb = TargetTimeEmbedding(bb.time_embedding_dim())
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_(0, 0.5)
    net = Net(bb, ConditionShift(), emb)
    cond = bb.encode_prompts(list(PROMPTS))
    x, t = _x(bb, 3), torch.tensor([0.7, 0.4])
    with torch.no_grad():
        stock = bb.velocity(x, t, cond)
        torch.testing.assert_close(net(x, t, cond, tt=torch.zeros(2)), stock, rtol=0, atol=0)
        assert not torch.allclose(net(x, t, cond, tt=t), stock, atol=1e-5)


#: per family: the denoiser's block list the GAN features come from, where a block's output holds the image stream
#: (a tuple index, None: the output itself, "prefix": the first N tokens of a unified sequence) and the image's
#: patch side in latent cells (None: the transformer config's ``patch_size``)
FEATURE_STREAM: dict[str, tuple[str, int | str | None, int | None]] = {
    "qwen_image": ("transformer_blocks", 1, 2),  # packed 2×2 by the adapter
    "flux": ("transformer_blocks", 1, 2),
    "sd3": ("transformer_blocks", 1, None),
    "sana": ("transformer_blocks", None, None),
    "z_image": ("layers", "prefix", 2),  # [image, caption] per row in the stock mode
}


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_site_is_the_middle_blocks_image_stream(zoo, family):
    """The GAN head's features: the middle block's image tokens [B, N_image, D], equal to that block's own
    image-stream output when it is called again on the inputs it saw."""
    bb = zoo.backbone(family)
    blocks_name, stream, patch = FEATURE_STREAM[family]
    blocks = getattr(bb.transformer, blocks_name)
    site, extract = bb.feature_site()
    assert site is blocks[len(blocks) // 2]
    x, t, cond = _x(bb, 5), torch.tensor([0.8, 0.3]), bb.encode_prompts(list(PROMPTS))
    seen, features = [], []
    handles = [
        site.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args, kwargs)), with_kwargs=True),
        site.register_forward_hook(lambda mod, inp, out: features.append(extract(out))),
    ]
    try:
        with torch.no_grad():
            bb.velocity(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(features) == 1
    (args, kwargs), (feat,) = seen[0], features
    with torch.no_grad():
        out = site(*args, **kwargs)  # the block on its own inputs, read by the table above
    cfg = bb.transformer.config
    p = patch or int(cfg.patch_size)
    n_image = (x.shape[-2] // p) * (x.shape[-1] // p)
    if stream == "prefix":
        assert out.shape[1] > n_image  # the unified sequence is longer: the slice matters
        ref = out[:, :n_image]
    else:
        ref = out if stream is None else out[stream]
    width = cfg.get("dim") or cfg.num_attention_heads * cfg.attention_head_dim
    assert feat.shape == (len(PROMPTS), n_image, width) and bb.feature_dim() == width
    assert torch.equal(feat, ref)
