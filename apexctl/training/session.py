"""A training session: everything one run holds, built from the recipe in a fixed RNG order, and the result it
writes at the end. The only module of the training package that imports the models, the data, LoRA and the export.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from apexctl.atomic import write_text
from apexctl.data.cache import LatentCache, PairSampler
from apexctl.engine.ema import EMA
from apexctl.engine.gan import Gan, GanHead
from apexctl.engine.objectives import Net
from apexctl.engine.shift import ConditionShift
from apexctl.engine.target_time import TargetTimeEmbedding
from apexctl.errors import BadInput
from apexctl.export import write_export
from apexctl.lora import adapters_disabled, check_lora_formats, make_trainable
from apexctl.recipe import Recipe
from apexctl.training.checkpoint import keep_base_out
from apexctl.training.closures import CriticState, make_critic, make_critic_forward, make_gan_features, make_reference
from apexctl.training.grids import sample_rows
from apexctl.training.hardware import broadcast_from_rank0, check_world
from apexctl.training.objectives import build_objective
from apexctl.training.offload import install_block_offload
from apexctl.training.optim import make_optimizer, make_schedule
from apexctl.training.state import Session, StepCounter


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output.dir)


def _make_shift(recipe: Recipe, backbone, acc) -> ConditionShift:
    s = recipe.method.shift
    dim = (backbone.condition_dim() if s.site == "projection" else backbone.embed_dim) if s.mode == "diag" else None
    shift = ConditionShift(a=s.a, b=s.b, mode=s.mode, learnable=s.learnable, site=s.site, dim=dim)
    if s.site == "projection" and s.mode == "scalar" and backbone.projection_cancels_scalar_bias:
        if s.b != 0.0 or s.learnable:
            acc.print(
                f"warning: method.shift.b has no effect at site 'projection' on {backbone.family} (the text stream is "
                "read through LayerNorms, which remove a constant bias"
                + ("; a learnable b gets no gradient" if s.learnable else "")
                + "); use method.shift.site: embeddings for a bias that changes the condition"
            )
    return shift


def require_packages(recipe: Recipe) -> None:
    """Exit 2 naming the package to install when the quantised base's library is missing (before any run folder)."""
    from apexctl.models.quantize import require

    require(recipe.model.quantize)


def setup(recipe: Recipe, acc) -> Session:
    """Model (+ LoRA), shift, optimizer, schedule, EMA, objective and data, in a fixed RNG order."""
    from accelerate.utils import set_seed

    from apexctl.data.prepare import cache_identity
    from apexctl.models import load_for_recipe, resolve_model_path
    from apexctl.models.quantize import quantize_backbone

    hw, tr, m = recipe.hardware, recipe.train, recipe.method
    global_batch = check_world(recipe, acc.num_processes)
    # rank r draws its noise and times from seed + r (rank 0: seed, as a single process); the model weights are the
    # same on every rank (loaded, or LoRA-initialised on each rank and broadcast from rank 0 by DDP)
    set_seed(tr.seed, device_specific=True)

    require_packages(recipe)  # also when setup is called alone (tests, notebooks): exit 2 before anything loads
    model_dir = resolve_model_path(recipe.model.path)
    # the codec is needed only for sample grids, and only on rank 0 (training reads latents from the cache)
    want_codec = tr.sample_every is not None and acc.is_main_process
    backbone = load_for_recipe(recipe.model, model_dir, load_text_encoder=False, load_codec=want_codec)
    cache = LatentCache.open(recipe.data.cache_dir)
    cache.check(cache_identity(recipe, model_dir, backbone.family))

    lora = recipe.model.lora
    transformer = backbone.transformer
    if lora is not None:
        check_lora_formats(backbone, recipe.output.lora_formats)
    # before the adapter: peft then wraps the quantised layers; the one quantised base serves the student, the EMA
    # adapter, the base reference (adapters off) and a separate critic (make_critic shares frozen parameters)
    quantized = quantize_backbone(backbone, recipe.model.quantize, device=acc.device)
    if quantized is not None:
        acc.print(quantized.describe())
    make_trainable(backbone, lora)
    transformer.train()
    if hw.gradient_checkpointing:
        if not hasattr(transformer, "enable_gradient_checkpointing"):
            raise BadInput(
                f"hardware.gradient_checkpointing: {type(transformer).__name__} does not support it; set it to false"
            )
        transformer.enable_gradient_checkpointing()
    shift = _make_shift(recipe, backbone, acc)
    fsdp = hw.strategy == "fsdp"
    # hardware.offload_base (recipe-validated: LoRA, not FSDP/quantised/separate critic): the blocks' frozen base
    # stays in CPU memory, streamed per forward; parked while the model moves to the device below
    offload = install_block_offload(transformer, acc.device) if hw.offload_base else None
    if fsdp:  # shard before the optimizer exists: it steps the sharded (DTensor) parameters
        from apexctl.training import fsdp as fsdp_mod

        mp = {"bf16": torch.bfloat16}.get(acc.mixed_precision) if acc.device.type == "cuda" else None
        # sharding moves each block's shards to the device (or keeps them on the CPU with hardware.offload): the
        # whole denoiser is never on one device; the rest of the backbone (e.g. the codec on rank 0) moves after
        fsdp_mod.shard(transformer, mixed_precision=mp, offload=hw.offload)
        for child in backbone.children():
            if child is not transformer:
                child.to(acc.device)
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": params, "lr": tr.lr}]
    if m.shift.learnable:
        groups.append({"params": list(shift.parameters()), "lr": tr.lr * m.shift.lr_scale, "weight_decay": 0.0})
    critic, critic_named = None, []
    if m.critic == "separate":  # recipe-validated: apex, not FSDP; same optimizer and steps (lr: method.critic_lr)
        critic = make_critic(transformer)
        critic_named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad]
        groups.append({"params": [p for _, p in critic_named], "lr": m.critic_lr or tr.lr})
    tt_embed = None
    if getattr(m, "target_time", "none") == "embed":  # apex_full's target-time input: trained, never exported
        tt_embed = TargetTimeEmbedding(backbone.time_embedding_dim())
        groups.append({"params": list(tt_embed.parameters()), "lr": tr.lr, "weight_decay": 0.0})
    head = None
    if getattr(m, "gan_weight", 0.0) > 0:  # DMD2's GAN head on the critic's features (trained with the critic)
        with torch.random.fork_rng(devices=[]):  # its own init RNG: the other draws match a run without it
            torch.manual_seed(tr.seed)
            head = GanHead(backbone.feature_dim())
        groups.append({"params": list(head.parameters()), "lr": m.gan_lr or tr.lr, "weight_decay": 0.0})
    opt = make_optimizer(recipe, groups)
    sched = make_schedule(recipe, opt)
    if quantized is not None:  # rebuilt at every start: out of DDP's broadcast and of checkpoints (the adapter only)
        keep_base_out(acc, transformer)
    if fsdp:  # not through acc.prepare (it would wrap the model in DDP); checkpoints go through fsdp.OptimizerState
        wrapped = transformer
        shift.to(acc.device)
    else:
        with offload.parked() if offload is not None else nullcontext():
            wrapped, opt = acc.prepare(transformer, opt)
            backbone.to(acc.device)
        backbone.set_forward_module(wrapped)
        shift.to(acc.device)
        if tt_embed is not None:  # initialised from each rank's own RNG stream: rank 0's everywhere
            tt_embed.to(acc.device)
            broadcast_from_rank0(acc, tt_embed)
        if head is not None:
            head.to(acc.device)
        if critic is not None:  # equal to the model as prepared (DDP broadcast rank 0's weights, e.g. a LoRA init)
            critic.to(acc.device)
            with torch.no_grad():
                for (cn, c), (n, p) in zip(critic_named, named, strict=True):
                    assert cn == n, (cn, n)
                    c.copy_(p)
    # reference = base with full tuning: the starting weights, frozen (taken before any step and before a resume
    # loads the trained ones, so a resumed run has the same base without storing it in the checkpoint)
    base = None
    if "base" in m.references and lora is None:
        base = {n: p.detach().clone() for n, p in named}

    ema_decay = recipe.ema_decay  # train.ema_decay, or the reference EMA of method.reference: ema
    ema_device = "cpu" if hw.ema_on_cpu else None  # hardware.ema_on_cpu: shadow in CPU memory, updated there
    ema = EMA(named, ema_decay, warmup=tr.ema_warmup, device=ema_device) if ema_decay is not None else None
    net = Net(backbone, shift, tt_embed)
    adapters_off = partial(adapters_disabled, transformer)
    refs = {k: make_reference(k, backbone, transformer, net, ema, wrapped, base, adapters_off) for k in m.references}
    critic_forward = make_critic_forward(backbone, critic, wrapped) if critic else None
    gan = Gan(make_gan_features(backbone, transformer, wrapped, net, critic), head) if head is not None else None
    objective = build_objective(
        recipe,
        refs[m.reference],
        critic_forward,
        refs[m.target_reference] if m.objective == "apex_full" else None,
        gan,
    )

    sampler = PairSampler(len(cache), seed=tr.seed, cond_dropout=recipe.data.cond_dropout, buckets=cache.pair_buckets)
    # the objective takes the unconditional rows: a guided reference, or apex_full's CFG-enhanced target
    guided_ref = (m.objective in ("apex", "apex_full") and m.reference_guidance > 1.0) or (
        m.objective == "apex_full" and m.enhance_ratio != 0.0
    )
    empty = cache.prompt_index("") if (recipe.data.cond_dropout > 0 or guided_ref) else None
    warm = None
    if getattr(m, "warm_start_steps", 0) > 0:  # the regression warm start's pairs (their own checkpointed order)
        warm = _warm_start_pairs(recipe, cache, model_dir, backbone.family)
    counter = StepCounter()
    # the registration order is the checkpoint layout (custom_checkpoint_I.pkl): append, never reorder
    for obj in (sched, sampler, counter, shift) + ((ema,) if ema is not None else ()):
        acc.register_for_checkpointing(obj)
    if critic is not None:
        acc.register_for_checkpointing(CriticState(critic_named))
    if tt_embed is not None:
        acc.register_for_checkpointing(tt_embed)
    if warm is not None:
        acc.register_for_checkpointing(warm.sampler)
    if head is not None:
        acc.register_for_checkpointing(head)
    if fsdp:  # the optimizer state, gathered; the weights go to model.safetensors in save_checkpoint
        holder = torch.nn.ModuleDict({"transformer": transformer, "shift": shift})
        acc.register_for_checkpointing(fsdp_mod.OptimizerState(holder, opt))
    sess = Session(
        recipe=recipe,
        acc=acc,
        run=run_dir(recipe),
        model_dir=model_dir,
        backbone=backbone,
        transformer=transformer,
        wrapped=wrapped,
        shift=shift,
        opt=opt,
        sched=sched,
        ema=ema,
        net=net,
        objective=objective,
        cache=cache,
        sampler=sampler,
        counter=counter,
        params=params,
        empty=empty,
        guided_ref=guided_ref,
        global_batch=global_batch,
        critic=critic,
        critic_params=[p for _, p in critic_named],
        aux_params=[p for mod in (tt_embed, head) if mod is not None for p in mod.parameters()],
        critic_forward=critic_forward,
        warm_start=warm,
    )
    if tr.sample_every is not None:
        sess.sample_rows = sample_rows(tr.sample_prompts, cache)
    return sess


def _warm_start_pairs(recipe: Recipe, cache: LatentCache, model_dir: Path, family: str):
    """The warm start's pair cache (``method.warm_start_cache``, else the training cache), from the same model
    (family and fingerprint, as the training cache's manifest checks), with its own data order."""
    from apexctl.data.cache import MANIFEST
    from apexctl.data.prepare import cache_identity
    from apexctl.training.warm_start import WarmStartPairs

    m = recipe.method
    root = Path(m.warm_start_cache or recipe.data.cache_dir)
    key = "method.warm_start_cache" if m.warm_start_cache else "method.warm_start_steps (data.cache_dir)"
    pairs = cache
    if root.resolve() != cache.root.resolve():
        if not (root / MANIFEST).is_file():
            raise BadInput(f"{key}: {root} is not a prepared cache (no {MANIFEST}); run `apexctl prepare` for it")
        pairs = LatentCache.open(root)
        ident = cache_identity(recipe, model_dir, family)
        pairs.check({k: ident[k] for k in ("family", "model_fingerprint")})
    sampler = PairSampler(len(pairs), seed=recipe.train.seed, buckets=pairs.pair_buckets)
    return WarmStartPairs(pairs, sampler, cache.latent_shape, key)


def export(sess: Session) -> None:
    """LoRA runs: the adapter (diffusers format) to ``lora/``; full runs: a complete model folder to ``model/``.
    With an EMA, ``train.export`` picks which weights go there. Rank 0 writes."""
    recipe, tr = sess.recipe, sess.recipe.train
    backbone = sess.backbone
    if recipe.hardware.strategy == "fsdp":
        backbone = _gathered_backbone(sess)  # every rank takes part in the gather; rank 0 gets the model
    if not sess.main:
        return
    name = "lora" if recipe.model.lora is not None else "model"
    run, ema = sess.run, sess.ema

    def write(folder: Path) -> None:
        write_export(backbone, recipe, folder, sess.model_dir)

    if ema is None or tr.export == "live":
        write(run / name)
    else:
        if tr.export == "both":
            write(run / f"{name}-live")
        with ema.swapped():
            write(run / name)
    if sess.shift.learnable:
        write_text(run / "shift.json", json.dumps({"a": sess.shift.a.tolist(), "b": sess.shift.b.tolist()}))


def _gathered_backbone(sess: Session):
    """FSDP: the full state dict gathered to rank 0 (torch's full_state_dict, CPU) and loaded into a fresh CPU copy
    of the denoiser (plus the LoRA), which the export then writes. Other ranks return None."""
    from apexctl.models import load_for_recipe
    from apexctl.training import fsdp

    state = fsdp.full_model_state(sess.transformer)
    if not sess.main:
        return None
    recipe = sess.recipe
    bb = load_for_recipe(recipe.model, sess.model_dir, load_text_encoder=False, load_codec=False)
    make_trainable(bb, recipe.model.lora)
    bb.transformer.load_state_dict(state, strict=True)
    return bb
