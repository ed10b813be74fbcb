"""Training memory of the real architectures, measured: state bytes and activation bytes per block (issue 15).

    .venv/bin/python bench/memory.py [--families qwen_image,flux_dev,...] [--quick] [--estimate] [--out bench/results]

For each shipped published config (``apexctl/models/configs/``) the transformer is built at FULL width with its
block count cut to 1 and 2 (FLUX: double and single stream blocks apart; SD3.5: joint and dual-attention blocks
apart), random weights, in the recipe's model dtype, with the recipe's trainable setup (LoRA adapter or fp32
master weights), shift, target-time input and references, exactly as ``apexctl distill`` builds them. One real
training step of each objective (``flow_matching``, ``apex``, ``apex_full``) runs with and without gradient
checkpointing under bf16 autocast on synthetic latents and prompt embeddings of the real shapes, at the recipe's
resolution and at a second one. Measured per step:

- state: the bytes of the real tensors after the AdamW step (frozen and trained weights, gradients, optimizer
  states, EMA shadow, a full-tuning reference copy), summed from the tensors themselves;
- ``peak``: the peak of live allocations during forward + backward above the state (CUDA: max_memory_allocated;
  CPU: the allocator's running total recorded by torch.profiler with profile_memory). This is the per-block
  figure: it holds everything the step allocates — the tensors autograd saves, the block inputs gradient
  checkpointing keeps (outside autograd's saved-tensor hooks), autocast's bf16 copies of fp32 master weights, the
  block recomputed during backward and the no-grad passes' temporaries;
- ``saved``: the bytes autograd saves for backward (saved_tensors_hooks, distinct storages, parameters excluded),
  a lower bound and cross-check (checkpointed blocks hide their internals from it);
- ``after_forward``: live bytes when backward starts.

Per block = (2-block − 1-block); the rest (embedders, final layer, refiners, the loss) is the 1-block run minus its
blocks. Activations scale with rows × tokens (tokens = image + text): the table stores bytes per row per token, fitted
at the recipe resolution, and the second resolution checks that extrapolation. Results append to
``memory.jsonl`` (resumable: configurations already measured are skipped); ``memory.md`` is the table and
``--table`` writes ``apexctl/models/configs/activations.json``. CPU time: ``--estimate`` prints each
configuration's estimated seconds from one timed forward per architecture before anything long runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("flow_matching", "apex", "apex_full")
#: rows per step: apex_full needs 4, one per group of the recipes' 1:1:1:1 split (recipe validation refuses fewer)
BATCH = {"flow_matching": 1, "apex": 1, "apex_full": 4}


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one instance per architecture
class Arch:
    """One shipped published config and how its depth is cut for the measurement.

    ``variants``: config overrides of each measured depth; ``blocks_in``: how many blocks of each kind each variant
    has (SD3.5's last, ``context_pre_only`` block and everything outside the blocks are the rest); ``kinds``: block
    kind → (the variant with one more of it, the variant without it, how many the published model has); ``base``:
    the variant the rest is read from: it holds a block of every kind, so the largest per-block transient (the
    block recomputed in backward under checkpointing, the biggest for FLUX's single-stream blocks) is in it;
    ``deep``: variants measured only for the depth check (one block more than the others).
    ``text_tokens``: prompt tokens the blocks see at the recipe resolution (the cache's padded length, or a typical
    prompt for the masked families); ``second`` and ``low``: (resolution, text tokens) of the other two points
    (fewer text tokens at ``low``: the line is in image + text tokens). ``home_all``: every objective and setting
    at the recipe resolution (else the recipe's own configuration only: the 1024² models, whose other
    configurations are fitted on ``low`` and ``second``). ``text_in_tokens``: text tokens pass through the blocks
    like image tokens (joint attention; SANA reads them by cross-attention only, so its tokens are image tokens and
    its fixed 300 text tokens sit in the per-step term)."""

    name: str
    family: str
    recipe: str
    text_tokens: int
    second: tuple[int, int]
    low: tuple[int, int]
    variants: dict[str, dict]
    blocks_in: dict[str, dict[str, int]]
    kinds: dict[str, tuple[str, str, int]]
    base: str
    deep: tuple[str, ...] = ()
    home_all: bool = True
    text_in_tokens: bool = True

    @property
    def measured(self) -> list[str]:
        """The variants every configuration measures (the ``deep`` ones only the depth check)."""
        return [v for v in self.variants if v not in self.deep]


def _stack(key: str, kind: str, count: int, **arch) -> dict:
    """Variants of a stack of one block kind: 1, 2 and (depth check) 3 blocks."""
    return {
        "variants": {"a": {key: 1}, "b": {key: 2}, "d": {key: 3}},
        "blocks_in": {"a": {kind: 1}, "b": {kind: 2}, "d": {kind: 3}},
        "kinds": {kind: ("b", "a", count)},
        "base": "b",
        "deep": ("d",),
        **arch,
    }


def _flux() -> dict:
    n = {"a": (1, 0), "b": (2, 0), "c": (1, 1), "d": (2, 1)}
    return {
        "variants": {v: {"num_layers": d, "num_single_layers": s} for v, (d, s) in n.items()},
        "blocks_in": {v: {"double": d, "single": s} for v, (d, s) in n.items()},
        "kinds": {"double": ("b", "a", 19), "single": ("c", "a", 38)},
        "base": "c",
        "deep": ("d",),
        "home_all": False,
    }


def _sd3() -> dict:
    # [blocks before the last], each dual-attention (its index in dual_attention_layers) or joint
    n = {"a": [], "b": ["joint"], "c": ["dual"], "d": ["dual", "joint"]}
    return {
        "variants": {
            v: {"num_layers": len(ks) + 1, "dual_attention_layers": [i for i, k in enumerate(ks) if k == "dual"]}
            for v, ks in n.items()
        },
        "blocks_in": {v: {k: ks.count(k) for k in ("joint", "dual")} for v, ks in n.items()},
        "kinds": {"joint": ("b", "a", 10), "dual": ("c", "a", 13)},
        "base": "c",
        "deep": ("d",),
        "home_all": False,
    }


def _z_image() -> dict:
    # a "refiner" is one noise-refiner and one context-refiner layer (the model has n_refiner_layers = 2 of each)
    n = {"a": (1, 0), "b": (2, 0), "c": (1, 1), "d": (2, 1)}
    return {
        "variants": {v: {"n_layers": m, "n_refiner_layers": r} for v, (m, r) in n.items()},
        "blocks_in": {v: {"layer": m, "refiner": r} for v, (m, r) in n.items()},
        "kinds": {"layer": ("b", "a", 30), "refiner": ("c", "a", 2)},
        "base": "c",
        "deep": ("d",),
        "home_all": False,
    }


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("qwen_image", "qwen_image", "qwen_lora.yaml", 256, (256, 256), (64, 16),
             **_stack("num_layers", "block", 60)),
        Arch("flux_dev", "flux", "flux_dev_lora.yaml", 512, (384, 128), (64, 16), **_flux()),
        Arch("sd3.5_medium", "sd3", "sd3.5_medium_lora.yaml", 333, (384, 333), (64, 16), **_sd3()),
        Arch("sana_1600m", "sana", "sana_1.6b.yaml", 300, (1024, 300), (128, 300),
             **_stack("num_layers", "block", 20, text_in_tokens=False)),
        Arch("sana_600m", "sana", "sana_0.6b.yaml", 300, (1024, 300), (128, 300),
             **_stack("num_layers", "block", 28, text_in_tokens=False)),
        Arch("z_image", "z_image", "z_image_lora.yaml", 256, (256, 256), (128, 32), **_z_image()),
    )
}  # fmt: skip
#: --families also takes the family names
ALIASES = {"flux": ["flux_dev"], "sd3": ["sd3.5_medium"], "sana": ["sana_1600m", "sana_600m"]}


# ---- building ------------------------------------------------------------------------------------------------
def published(name: str) -> dict:
    """The shipped published config ``apexctl/models/configs/<name>.json`` (``transformer``, ``vae``, …)."""
    from apexctl.memory_plan import shipped_configs

    return shipped_configs()[name]


def build_backbone(family: str, tcfg: dict, vae: dict, device: torch.device | str, dtype: torch.dtype):
    """The family's Backbone around a randomly initialised ``tcfg`` transformer built directly on ``device`` in
    ``dtype`` (no text encoder, no codec: ``vae`` gives the latent shapes)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from apexctl.models import FAMILIES

    kwargs = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the model dtype directly: an fp32 build would need twice the memory
    try:
        with torch.device(device):
            transformer = getattr(diffusers, tcfg["_class_name"])(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    codec = {k: v for k, v in vae.items() if not k.startswith("_")}
    return FAMILIES[family](transformer, FlowMatchEulerDiscreteScheduler(), codec_config=codec)


def synthetic_cond(bb, batch: int, text_tokens: int, device, dtype: torch.dtype):
    """Random prompt embeddings of the family's real shapes (all tokens valid; pooled CLIP vector where it has one)."""
    from apexctl.engine.cond import Cond

    embeds = torch.randn(batch, text_tokens, bb.embed_dim, device=device, dtype=dtype)
    pooled = torch.randn(batch, bb.pooled_dim, device=device, dtype=dtype) if hasattr(bb, "pooled_dim") else None
    return Cond(embeds, torch.ones(batch, text_tokens, dtype=torch.long, device=device), pooled)


@dataclass
class Parts:
    """What one training step needs, built from the recipe as ``apexctl.training.session.setup`` builds it."""

    net: object
    objective: Callable
    trained: list[torch.nn.Parameter]
    extra: dict
    base: dict[str, torch.Tensor] | None
    ema: object | None


def training_parts(recipe, bb, uncond) -> Parts:
    """LoRA or fp32 masters (``make_trainable``), the condition shift, the target-time input, the references
    (``self``, the LoRA base with adapters off, or a frozen copy for full tuning) and the objective."""
    from apexctl.engine.ema import EMA
    from apexctl.engine.objectives import Net
    from apexctl.engine.shift import ConditionShift
    from apexctl.engine.target_time import TargetTimeEmbedding
    from apexctl.lora import adapters_disabled, make_trainable
    from apexctl.training.closures import make_reference
    from apexctl.training.objectives import build_objective

    m, lora, device = recipe.method, recipe.model.lora, bb.device
    tr = bb.transformer
    make_trainable(bb, lora)
    tr.train()
    shift = getattr(m, "shift", None)
    shift = ConditionShift(a=shift.a, b=shift.b, site=shift.site) if shift is not None else ConditionShift()
    named = [(n, p) for n, p in tr.named_parameters() if p.requires_grad]
    trained = [p for _, p in named]
    tt = None
    if getattr(m, "target_time", "none") == "embed":
        tt = TargetTimeEmbedding(bb.time_embedding_dim()).to(device)
        trained += list(tt.parameters())
    base = {n: p.detach().clone() for n, p in named} if ("base" in m.references and lora is None) else None
    ema = EMA(named, recipe.ema_decay) if recipe.ema_decay is not None else None
    net = Net(bb, shift.to(device), tt)
    off = partial(adapters_disabled, tr)
    refs = {k: make_reference(k, bb, tr, net, ema, tr, base, off) for k in m.references}
    target = refs[m.target_reference] if m.objective == "apex_full" else None
    objective = build_objective(recipe, refs[m.reference] if m.objective != "flow_matching" else None, None, target)
    guided = (m.objective in ("apex", "apex_full") and m.reference_guidance > 1.0) or (
        m.objective == "apex_full" and m.enhance_ratio != 0.0
    )
    return Parts(net, objective, trained, {"uncond": uncond} if guided else {}, base, ema)


# ---- measuring -----------------------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    """Stored bytes of ``tensors`` (a quantised weight: its codes and scales, not its logical size)."""
    from apexctl.models.quantize import tensor_bytes as stored

    return sum(stored(t) for t in tensors)


def state_bytes(model: torch.nn.Module, parts: Parts, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the real tensors a run holds between steps: frozen / trained weights, gradients, optimizer states
    (every tensor in ``opt.state``, AdamW's step counters included), EMA shadow, full-tuning reference copy."""
    trained_ids = {id(p) for p in parts.trained}
    params = list(model.parameters())
    return {
        "frozen": tensor_bytes(p for p in params if id(p) not in trained_ids),
        "trained": tensor_bytes(parts.trained),
        "grads": tensor_bytes(p.grad for p in parts.trained),
        "optimizer": tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
        "ema": tensor_bytes(parts.ema.shadow) if parts.ema is not None else 0,
        "base_copy": tensor_bytes(parts.base.values()) if parts.base is not None else 0,
    }


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward while active (parameters excluded: they are
    state, not activations). A saved view keeps its whole storage alive, so a storage counts once, in full."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        from apexctl.models.quantize import inner_tensors

        self._inner = inner_tensors  # a quantised weight saved for backward is its inner tensors
        self.exclude = {x.untyped_storage().data_ptr() for t in exclude for x in inner_tensors(t)}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        for x in self._inner(t):
            s = x.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.exclude and ptr != 0:
                self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    @contextmanager
    def active(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


class PeakMeter:
    """Peak and current live bytes allocated inside the block, above what was live when it started.

    CUDA: ``max_memory_allocated``. CPU: torch.profiler with ``profile_memory`` records every allocation and free
    of the CPU allocator with its running total (``total_allocated``, counting allocations made while profiling);
    its maximum is the peak. ``mark()`` records the live bytes at that moment (e.g. when backward starts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.marks: dict[str, int] = {}
        self._mark_ns: dict[str, int] = {}

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.marks[name] = torch.cuda.memory_allocated() - self._start
        else:
            self._mark_ns[name] = time.time_ns()

    @contextmanager
    def measuring(self) -> Iterator[PeakMeter]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            yield self
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield self
        events = sorted(_cpu_allocations(prof))
        if not events:
            return
        # the running total is process-wide and keeps bytes freed after an earlier profile ended: take it relative
        # to its value just before this block's first event
        start = events[0][1] - events[0][2]
        self.peak = max(total for _, total, _ in events) - start
        for name, ns in self._mark_ns.items():
            self.marks[name] = next((total for t, total, _ in reversed(events) if t <= ns), start) - start


def _cpu_allocations(prof) -> list[tuple[int, int, int]]:
    """(time in ns since the epoch, allocator running total after it, bytes: + allocated, − freed) of every CPU
    allocation event the profiler kept."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        f = e.extra_fields if e.tag == _EventType.Allocation else None
        if f is not None and str(f.device).startswith("cpu"):
            out.append((e.start_time_ns, int(f.total_allocated), int(f.alloc_size)))
        stack.extend(e.children)
    return out


def measure_step(bb, parts: Parts, x: torch.Tensor, cond, opt: torch.optim.Optimizer) -> dict:
    """One training step (objective → backward → AdamW), as ``training/step.py`` runs it under bf16 autocast.

    Gradients are allocated (zeros) before the step, as they stay between steps with ``zero_grad(set_to_none=
    False)``, so the peak above the start counts activations and temporaries only. Returns the bytes measured and
    the seconds of each phase."""
    device = x.device
    for p in parts.trained:
        p.grad = torch.zeros_like(p)
    saved = SavedTensors(list(bb.transformer.parameters()) + parts.trained)
    meter = PeakMeter(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with meter.measuring(), torch.autocast(device.type, dtype=torch.bfloat16):
        with saved.active():
            out = parts.objective(parts.net, x, cond, **parts.extra)
        meter.mark("after_forward")
        t1 = time.perf_counter()
        out.loss.backward()
    t2 = time.perf_counter()
    opt_meter = PeakMeter(device)
    with opt_meter.measuring():
        opt.step()
    if parts.ema is not None:
        parts.ema.update()
    return {
        "peak": meter.peak,
        "after_forward": meter.marks["after_forward"],
        "saved": saved.bytes,
        "optimizer_step_peak": opt_meter.peak,
        "loss_finite": bool(torch.isfinite(out.loss.detach()).item()),
        "seconds": {"forward": t1 - t0, "backward": t2 - t1, "optimizer": time.perf_counter() - t2},
    }


@dataclass(frozen=True)
class Config:
    """One measured step: ``arch`` cut to ``variant``'s depth, ``batch`` rows at ``resolution`` with ``text`` tokens."""

    arch: Arch
    variant: str
    resolution: int
    text: int
    objective: str
    gc: bool
    batch: int
    quantize: str = "none"  # model.quantize of the frozen base (a LoRA recipe's)

    def key(self, device: str) -> tuple:
        return (self.arch.name, self.variant, self.resolution, self.text, self.objective, self.gc, self.batch, device,
                self.quantize)  # fmt: skip

    def label(self) -> str:
        """The configuration in one line for the progress output."""
        q = f" {self.quantize}" if self.quantize != "none" else ""
        return (
            f"{self.arch.name} {self.variant} {self.resolution} {self.text} {self.objective} {self.gc} {self.batch}{q}"
        )


_KEY = ("arch", "variant", "resolution", "text_tokens", "objective", "gc", "batch", "device", "quantize")


def _row_key(row: dict) -> tuple:
    return tuple(row.get(k, "none") if k == "quantize" else row[k] for k in _KEY)  # rows before --quantize: none


def tokens(arch: Arch, resolution: int, text: int) -> int:
    """The token count the table is linear in: image tokens + text tokens (Z-Image pads each to its multiple of
    32); image tokens only where ``text_in_tokens`` is false."""
    from apexctl.memory_plan import pixels_per_token, sequence_tokens

    cfg = published(arch.name)
    image = (resolution // pixels_per_token(cfg["transformer"], cfg["vae"])) ** 2
    text = sequence_tokens(cfg["transformer"], text) if arch.text_in_tokens else 0
    return sequence_tokens(cfg["transformer"], image) + text


def reduced_config(arch: Arch, variant: str) -> dict:
    """The published transformer config at full width with the variant's block counts."""
    return {**published(arch.name)["transformer"], **arch.variants[variant]}


def measure(c: Config, device: torch.device) -> dict:
    """One row of memory.jsonl: a fresh model of the variant's depth, one training step of the objective."""
    from apexctl.recipe import load_recipe

    arch = c.arch
    from apexctl.models.quantize import quantize_backbone

    recipe = load_recipe(ROOT / "recipes" / arch.recipe, [f"method.objective={c.objective}",
                                                          f"model.quantize={c.quantize}"])  # fmt: skip
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb = build_backbone(arch.family, reduced_config(arch, c.variant), published(arch.name)["vae"], device,
                        recipe.model.torch_dtype)  # fmt: skip
    quantize_backbone(bb, c.quantize)  # before the adapter, as apexctl distill does (None for none)
    if c.gc:
        bb.transformer.enable_gradient_checkpointing()
    x = torch.randn(c.batch, *bb.latent_shape(c.resolution, c.resolution), device=device)
    cond = synthetic_cond(bb, c.batch, c.text, device, torch.bfloat16)
    uncond = synthetic_cond(bb, c.batch, c.text, device, torch.bfloat16)
    parts = training_parts(recipe, bb, uncond)
    tr = recipe.train
    opt = torch.optim.AdamW(parts.trained, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    build_s = time.perf_counter() - t0
    step = measure_step(bb, parts, x, cond, opt)
    return {
        **dict(zip(_KEY, c.key(device.type), strict=True)),
        "family": arch.family,
        "recipe": f"recipes/{arch.recipe}",
        "config": arch.variants[c.variant],
        "tokens": tokens(arch, c.resolution, c.text),
        "trained": "lora" if recipe.model.lora is not None else "full",
        "parameters": sum(p.numel() for p in bb.transformer.parameters()),
        "trainable": sum(p.numel() for p in parts.trained),
        "state": state_bytes(bb.transformer, parts, opt),
        **{k: v for k, v in step.items() if k != "seconds"},
        "seconds": {"build": build_s, **step["seconds"]},
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


# ---- the plan of a run -----------------------------------------------------------------------------------------
def _home(arch: Arch):
    from apexctl.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / arch.recipe)


def points(arch: Arch) -> dict[str, tuple[int, int]]:
    """The measured (resolution, text tokens): ``low`` (cheap), ``home`` (the recipe's), ``second``."""
    return {"low": arch.low, "home": (_home(arch).data.resolution, arch.text_tokens), "second": arch.second}


def configurations(names: list[str], quick: bool, quantize: tuple[str, ...] = ()) -> list[Config]:
    """What to measure, cheapest first. Every objective × checkpointing on/off at ``low`` and ``second``; at
    ``home`` all of them where ``home_all`` (else the recipe's own objective and setting); at ``low`` flow matching
    on 4 rows (the batch check); at ``second`` the ``deep`` variants for flow matching and apex_full (the depth
    check). ``quick``: the recipe's objective and setting only, no checks. ``quantize``: also the ``quick``
    configurations with each of these ``model.quantize`` bases (compared with the bf16 base's in memory.md)."""
    out: list[Config] = []
    for name in names:
        arch, r = ARCHS[name], _home(ARCHS[name])
        for scheme in quantize:
            for res, text in sorted(points(arch).values(), key=lambda point: tokens(arch, *point)):
                out += [Config(arch, v, res, text, r.method.objective, r.hardware.gradient_checkpointing,
                               BATCH[r.method.objective], scheme) for v in arch.measured]  # fmt: skip
    for name in names:
        arch, r = ARCHS[name], _home(ARCHS[name])
        own = [(r.method.objective, r.hardware.gradient_checkpointing)]
        every = own if quick else [(o, gc) for o in OBJECTIVES for gc in (True, False)]
        for label, (res, text) in sorted(points(arch).items(), key=lambda kv: tokens(arch, *kv[1])):
            combos = own if (label == "home" and not arch.home_all) else every
            for objective, gc in combos:
                out += [Config(arch, v, res, text, objective, gc, BATCH[objective]) for v in arch.measured]
            if quick:
                continue
            if label == "low":
                out += [
                    Config(arch, v, res, text, "flow_matching", gc, 4) for gc in (True, False) for v in arch.measured
                ]
            if label == "second":
                out += [Config(arch, v, res, text, o, gc, BATCH[o]) for o in ("flow_matching", "apex_full")
                        for gc in (True, False) for v in arch.deep]  # fmt: skip
    return out


#: forwards-equivalent of one step per row, relative to one no-grad forward (backward ≈ 2 forwards, recompute 1):
#: flow_matching 1 + 2; apex: 2 rows (generator + FM) + 1 critic with gradient, 2 reference rows without; apex_full
#: (4 rows): 4 with gradient and ≈ 14 rows of no-grad passes (adv samples, enhanced target, RCGM rollouts, rectify)
_COST = {("flow_matching", False): 3, ("flow_matching", True): 4, ("apex", False): 11, ("apex", True): 14,
         ("apex_full", False): 6.5, ("apex_full", True): 7.5}  # fmt: skip


def estimate(configs: list[Config], device: torch.device) -> dict[Config, float]:
    """Seconds per configuration: the build and one no-grad forward of each (arch, variant, resolution, text)
    timed, times the objective's forward-equivalents per row, times the rows."""
    timed: dict[tuple, tuple[float, float]] = {}
    out = {}
    for c in configs:
        k = (c.arch.name, c.variant, c.resolution, c.text)
        if k not in timed:
            t0 = time.perf_counter()
            bb = build_backbone(c.arch.family, reduced_config(c.arch, c.variant), published(c.arch.name)["vae"],
                                device, _home(c.arch).model.torch_dtype)  # fmt: skip
            build = time.perf_counter() - t0
            x = torch.randn(1, *bb.latent_shape(c.resolution, c.resolution), device=device)
            cond = synthetic_cond(bb, 1, c.text, device, torch.bfloat16)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                bb.velocity(x, torch.ones(1, device=device), cond)  # warm-up
                t0 = time.perf_counter()
                bb.velocity(x, torch.ones(1, device=device), cond)
            timed[k] = (time.perf_counter() - t0, build)
            del bb
        forward, build = timed[k]
        out[c] = build + forward * _COST[(c.objective, c.gc)] * c.batch
    return out


# ---- fitting ---------------------------------------------------------------------------------------------------
def split(arch: Arch, variants: dict[str, dict]) -> dict[str, float]:
    """Bytes of one block of each kind and of the rest (the step's rows).

    A block's bytes are the live bytes it adds when backward starts (``after_forward``: what the step keeps per
    block — saved activations, or under checkpointing the block's input — and autocast's copies of its trained
    weights). The rest is the ``base`` variant's peak minus its blocks: everything that does not repeat per block,
    the backward's transients included (the recomputed block, gradient buffers), which the peak holds once."""
    per = {k: variants[w]["after_forward"] - variants[wo]["after_forward"] for k, (w, wo, _) in arch.kinds.items()}
    held = arch.blocks_in[arch.base]
    return {**per, "rest": variants[arch.base]["peak"] - sum(n * per[k] for k, n in held.items())}


def full_total(arch: Arch, parts: dict[str, float], blocks: dict[str, int] | None = None) -> float:
    """Peak bytes of a model with ``blocks`` of each kind (default: the published model's): rest + Σ n × per kind."""
    blocks = blocks if blocks is not None else {k: n for k, (_, _, n) in arch.kinds.items()}
    return parts["rest"] + sum(n * parts[k] for k, n in blocks.items())


def _parts(arch: Arch, s: dict) -> dict[str, float]:
    """A split as the plan uses it: the mean block over the published model's blocks (``block_count``) and the rest
    holding everything else, so blocks × mean + rest is the model's total."""
    from apexctl.memory_plan import block_count

    blocks = block_count(published(arch.name)["transformer"])
    mean = sum(n * s[k] for k, (_, _, n) in arch.kinds.items()) / sum(n for _, _, n in arch.kinds.values())
    return {"per_block": mean, "rest": full_total(arch, s) - blocks * mean, "blocks": blocks}


def line(p0: tuple[int, dict], p1: tuple[int, dict], arch: Arch, rows: int) -> dict:
    """The two-point line through (tokens, split) at ``rows`` rows, per part: bytes = fixed + rows·N·per_token.

    The slope is per row (activations are per row); the intercept is taken as per step, independent of the rows:
    what does not grow with tokens is mostly autocast's bf16 copies of the trained fp32 weights (the batch check
    measures how well that holds)."""
    (n0, s0), (n1, s1) = p0, p1
    q0, q1 = _parts(arch, s0), _parts(arch, s1)
    out: dict = {"blocks": q0["blocks"]}
    for part in ("per_block", "rest"):
        slope = (q1[part] - q0[part]) / (n1 - n0)
        out[part] = {"bytes_per_row_token": slope / rows, "fixed_bytes": q1[part] - slope * n1}
    return out


def predict(model: dict, rows: int, n: int) -> float:
    """acts = blocks × (fixed + rows·N·per_token) + rest's fixed + rows·N·rest per_token."""
    pb, rest = model["per_block"], model["rest"]
    return model["blocks"] * (pb["fixed_bytes"] + rows * n * pb["bytes_per_row_token"]) + (
        rest["fixed_bytes"] + rows * n * rest["bytes_per_row_token"]
    )


def fit(rows: list[dict], quantize: str = "none") -> dict[str, dict]:
    """The activation table of the ``quantize`` base's rows: per arch, objective and checkpointing, the line
    through the two measured points with the most tokens (the recipe's resolution is one of them where it was
    measured), with its checks:

    - ``extrapolation``: the line through the two smaller points, extrapolated to the largest, against its
      measurement (where three points were measured);
    - ``batch``: flow matching on 4 rows at ``low`` against 1 row + 3 × the line's per-row bytes;
    - ``depth``: the peak of a variant one block deeper (at ``second``) against rest + its blocks × per block.
    """
    by: dict[tuple, dict[str, dict]] = {}
    for r in (r for r in rows if r.get("quantize", "none") == quantize):
        key = (r["arch"], r["objective"], r["gc"], r["batch"], r["resolution"], r["text_tokens"])
        by.setdefault(key, {})[r["variant"]] = r
    table: dict[str, dict] = {}
    for name, arch in ARCHS.items():
        pts = points(arch)
        for objective in OBJECTIVES:
            b = BATCH[objective]
            for gc in (True, False):
                got = {}
                for label, (res, text) in pts.items():
                    v = by.get((name, objective, gc, b, res, text), {})
                    if set(arch.measured) <= set(v):
                        got[label] = (tokens(arch, res, text), split(arch, v), v[arch.base])
                if len(got) < 2:
                    continue
                order = sorted(got, key=lambda k: got[k][0])
                model = line(got[order[-2]][:2], got[order[-1]][:2], arch, b)
                checks = {}
                if len(order) == 3:
                    low_line = line(got[order[0]][:2], got[order[1]][:2], arch, b)
                    n, top = got[order[2]][0], order[2]
                    checks["extrapolation"] = _check(low_line, b, n, full_total(arch, got[top][1]), pts[top])
                v4 = by.get((name, objective, gc, 4, *pts["low"]), {}) if b == 1 and "low" in got else {}
                if set(arch.measured) <= set(v4):
                    n = got["low"][0]
                    per_row = model["blocks"] * model["per_block"]["bytes_per_row_token"]
                    per_row += model["rest"]["bytes_per_row_token"]
                    c = _check(model, 4, n, full_total(arch, split(arch, v4)), pts["low"])
                    c["predicted"] = full_total(arch, got["low"][1]) + 3 * n * per_row
                    checks["batch"] = {**c, "error": c["predicted"] / c["measured"] - 1}
                deep = by.get((name, objective, gc, b, *pts["second"]), {})
                for d in (d for d in arch.deep if d in deep and "second" in got):
                    predicted = full_total(arch, got["second"][1], arch.blocks_in[d])
                    checks["depth"] = {"variant": d, "blocks": arch.blocks_in[d], "resolution": pts["second"][0],
                                       "measured": deep[d]["peak"], "predicted": predicted,
                                       "error": predicted / deep[d]["peak"] - 1}  # fmt: skip
                a0 = got[order[0]][2]
                entry = table.setdefault(name, {"family": arch.family, "recipe": a0["recipe"], "trained": a0["trained"],
                                                "resolution": pts["home"][0], "text_tokens": arch.text_tokens,
                                                "tokens": "image + text" if arch.text_in_tokens else "image",
                                                "objectives": {}})  # fmt: skip
                entry["objectives"].setdefault(objective, {})["checkpointing" if gc else "none"] = {
                    **model,
                    "rows_measured": b,
                    "fit": [
                        {"resolution": pts[k][0], "text_tokens": pts[k][1], "tokens": got[k][0]} for k in order[-2:]
                    ],
                    "checks": checks,
                }
    return table


def with_quantized(table: dict, rows: list[dict]) -> dict:
    """``table`` (the bf16 base's fit) with each measured quantised base's own fit under its entry's
    ``quantized[scheme]`` (the same ``{objective: {checkpointing: line}}`` shape), for ``--dry-run`` with
    ``model.quantize``."""
    for scheme in sorted({r.get("quantize", "none") for r in rows} - {"none"}):
        for name, e in fit(rows, scheme).items():
            if name in table:
                table[name].setdefault("quantized", {})[scheme] = e["objectives"]
    return table


def _check(model: dict, rows: int, n: int, measured: float, point: tuple[int, int]) -> dict:
    predicted = predict(model, rows, n)
    return {"resolution": point[0], "text_tokens": point[1], "tokens": n, "rows": rows, "measured": measured,
            "predicted": predicted, "error": predicted / measured - 1}  # fmt: skip


# ---- reports ---------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(rows: list[dict], table: dict, meta: dict) -> str:
    """memory.md: the fitted table with its checks, then every measured step."""
    lines = [
        "# Training memory of the real architectures (`bench/memory.py`)",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['device']}, torch {meta['torch']}, diffusers "
        f"{meta['diffusers']}, {meta['threads']} thread(s)); `{meta['command']}`: {len(rows)} steps, "
        f"{meta['steps_s'] / 60:.1f} min of building and stepping in all ({meta['this_run_s'] / 60:.1f} min in "
        "this invocation, which measured what was missing). Full width, random weights, block counts cut to 1 and "
        "2 (3 for the depth check); bf16 autocast; peak = live allocations during forward + backward above the "
        "state (CPU: torch.profiler's allocator total).",
        "",
        "acts = blocks × (fixed + rows × tokens × per token) + rest (fixed + rows × tokens × per token). "
        '"at recipe": the recipe\'s micro-batch and resolution (apex_full: one row per group needs 4 rows).',
        "",
        "| model | trained | objective | ckpt | fit on (res², tokens) | per block: B per row-token | fixed MiB "
        "| rest: B per row-token | fixed MiB | at recipe GiB | checks (predicted vs measured) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in table.items():
        r = _home(ARCHS[name])
        n = tokens(ARCHS[name], r.data.resolution, e["text_tokens"])
        for objective, slots in e["objectives"].items():
            for ck, m in slots.items():
                pb, rest = m["per_block"], m["rest"]
                fits = ", ".join(f"{f['resolution']}² {f['tokens']}" for f in m["fit"])
                checks = "; ".join(_check_text(k, c) for k, c in m["checks"].items())
                lines.append(
                    f"| {name} | {e['trained']} | {objective} | {'on' if ck == 'checkpointing' else 'off'} | {fits} | "
                    f"{pb['bytes_per_row_token']:,.0f} | {_mib(pb['fixed_bytes'])} | "
                    f"{rest['bytes_per_row_token']:,.0f} | {_mib(rest['fixed_bytes'])} | {_gib(predict(m, r.train.micro_batch, n))} | {checks or '–'} |"
                )
    lines += quantized_section(rows, table)
    lines += ["", "## Every measured step", "",
              "| model | variant | res | text | objective | ckpt | rows | tokens | peak MiB | after fwd MiB | saved MiB "
              "| opt step MiB | frozen MiB | trained MiB | grads MiB | optimizer MiB | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        st = r["state"]
        lines.append(
            f"| {r['arch']} | {r['variant']} {json.dumps(r['config'])} | {r['resolution']} | {r['text_tokens']} | "
            f"{r['objective']} | {'on' if r['gc'] else 'off'} | {r['batch']} | {r['tokens']} | {_mib(r['peak'])} | "
            f"{_mib(r['after_forward'])} | {_mib(r['saved'])} | {_mib(r['optimizer_step_peak'])} | "
            f"{_mib(st['frozen'])} | {_mib(st['trained'])} | {_mib(st['grads'])} | {_mib(st['optimizer'])} | "
            f"{sum(r['seconds'].values()):.1f} |"
        )
    return "\n".join(lines) + "\n"


def quantized_section(rows: list[dict], table: dict) -> list[str]:
    """memory.md's comparison of quantised bases (``--quantize``) with the bf16 base: per block, the frozen weights'
    stored bytes and the activations (live bytes when backward starts), each step's peak, and each scheme's fitted
    activations at the recipe's micro-batch and resolution (``table``: :func:`with_quantized`'s)."""
    base = {_row_key(r)[:-1]: r for r in rows if r.get("quantize", "none") == "none"}
    quantized = [r for r in rows if r.get("quantize", "none") != "none" and _row_key(r)[:-1] in base]
    if not quantized:
        return []
    lines = ["", "## Quantised frozen base (`--quantize`)", "",
             "Each step with a quantised base beside the same step with the recipe's bf16 base (`model.quantize`; "
             "weights dequantised inside each matmul). Per block: the 2-block variant minus the 1-block one.", "",
             "| model | base | res | text | objective | ckpt | rows | frozen per block MiB | vs bf16 | activations "
             "per block MiB | vs bf16 | peak (2 blocks) MiB | vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {_row_key(r): r for r in quantized}
    for r in quantized:
        arch = ARCHS[r["arch"]]
        w, wo, _ = next(iter(arch.kinds.values()))
        if r["variant"] != w:
            continue
        k = _row_key(r)
        other = by.get((*k[:1], wo, *k[2:]))
        if other is None:
            continue
        b, bo = base[k[:-1]], base[(*k[:1], wo, *k[2:-1])]
        frozen, frozen_b = (x["state"]["frozen"] - y["state"]["frozen"] for x, y in ((r, other), (b, bo)))
        acts, acts_b = (x["after_forward"] - y["after_forward"] for x, y in ((r, other), (b, bo)))
        lines.append(
            f"| {r['arch']} | {r['quantize']} | {r['resolution']} | {r['text_tokens']} | {r['objective']} | "
            f"{'on' if r['gc'] else 'off'} | {r['batch']} | {_mib(frozen)} | {frozen / frozen_b:.3f}× | "
            f"{_mib(acts)} | {acts / acts_b:.3f}× | {_mib(r['peak'])} | {r['peak'] / b['peak']:.3f}× |"
        )
    lines += ["", "Fitted activations at the recipe's micro-batch and resolution (the dry run's line, from the "
              "quantised steps):", "", "| model | base | objective | ckpt | at recipe GiB | bf16 base GiB | vs bf16 |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for scheme in sorted({r["quantize"] for r in quantized}):
        for name, e in table.items():
            r = _home(ARCHS[name])
            n = tokens(ARCHS[name], r.data.resolution, e["text_tokens"])
            for objective, slots in e.get("quantized", {}).get(scheme, {}).items():
                for ck, m in slots.items():
                    ref = table.get(name, {}).get("objectives", {}).get(objective, {}).get(ck)
                    if ref is None:
                        continue
                    q, bf = predict(m, r.train.micro_batch, n), predict(ref, r.train.micro_batch, n)
                    lines.append(f"| {name} | {scheme} | {objective} | {'on' if ck == 'checkpointing' else 'off'} | "
                                 f"{_gib(q)} | {_gib(bf)} | {q / bf:.3f}× |")  # fmt: skip
    return lines


def _check_text(kind: str, c: dict) -> str:
    where = (
        f"{c['variant']} {c['blocks']} at {c['resolution']}²"
        if kind == "depth"
        else f"{c['resolution']}² {c['tokens']} tok × {c['rows']}"
    )
    return f"{kind}: {where}: {_gib(c['predicted'])} vs {_gib(c['measured'])} GiB ({100 * c['error']:+.1f}%)"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shipped_table(table: dict, meta: dict) -> dict:
    """The small table apexctl/memory_plan.py reads, with the measurement's provenance."""
    return {
        "_comment": "Activation bytes measured by bench/memory.py on the published architectures (full width, 1 and 2 "
        "blocks, random weights, one real training step under bf16 autocast; peak live allocations during forward "
        "+ backward above the state). apexctl distill --dry-run: acts = blocks x (fixed + rows x tokens x "
        "per_token) + rest (fixed + rows x tokens x per_token), tokens = image + text_tokens. 'none' / "
        "'checkpointing': gradient checkpointing off / on. 'checks': the fit's predictions against measurements "
        "it was not fitted on. See docs/performance.md.",
        "_provenance": meta,
        **table,
    }


def _meta(wall: float, device: torch.device) -> dict:
    import diffusers

    from apexctl.machine import cpu_model

    return {
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(),
        "device": device.type,
        "date": datetime.date.today().isoformat(),
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "this_run_s": wall,
        "metric": "per block: live bytes when backward starts; rest: the peak",
    }


def _names(spec: str | None) -> list[str]:
    if not spec:
        return list(ARCHS)
    out: list[str] = []
    for s in spec.split(","):
        for n in ALIASES.get(s.strip(), [s.strip()]):
            if n not in ARCHS:
                raise SystemExit(f"--families: unknown {n!r} (allowed: {', '.join([*ARCHS, *ALIASES])})")
            out.append(n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=None, help=f"comma-separated: {', '.join([*ARCHS, *ALIASES])}")
    ap.add_argument("--quick", action="store_true", help="the recipe's objective and checkpointing only")
    ap.add_argument("--estimate", action="store_true", help="print the estimated seconds per configuration and stop")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--table", type=Path, default=None, help="also write the shipped table (activations.json) here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize", default="", help="comma-separated model.quantize schemes (int8, fp8, nf4): also "
                    "the --quick configurations on a quantised base, compared with bf16 in memory.md")  # fmt: skip
    args = ap.parse_args(argv)
    from apexctl.errors import BadInput
    from apexctl.models.quantize import SCHEMES, require

    schemes = tuple(q.strip() for q in args.quantize.split(",") if q.strip())
    for q in schemes:
        if q not in SCHEMES[1:]:
            raise SystemExit(f"--quantize: unknown {q!r} (allowed: {', '.join(SCHEMES[1:])})")
        try:
            require(q, "--quantize")
        except BadInput as exc:
            raise SystemExit(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    jsonl = args.out / "memory.jsonl"
    done = {_row_key(r) for r in read_rows(jsonl)}
    configs = configurations(_names(args.families), args.quick, schemes)
    todo = [c for c in configs if c.key(device.type) not in done]
    if args.estimate:
        est = estimate(todo, device)
        for c, sec in est.items():
            print(f"{c.label():<70} ≈ {sec:6.1f} s")
        print(f"{len(est)} steps to measure ({len(configs) - len(todo)} done): ≈ {sum(est.values()) / 60:.1f} min")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, c in enumerate(todo, 1):
        row = measure(c, device)
        with jsonl.open("a") as f:  # one line per configuration as it comes: a killed run resumes from here
            f.write(json.dumps(row) + "\n")
        print(f"[{i}/{len(todo)}] {c.label()}: peak {_mib(row['peak'])} MiB, "
              f"{sum(row['seconds'].values()):.1f} s", flush=True)  # fmt: skip
    rows = [r for r in read_rows(jsonl) if r["device"] == device.type]
    table = with_quantized(fit(rows), rows)
    meta = {**_meta(time.perf_counter() - t0, device), "steps_s": sum(sum(r["seconds"].values()) for r in rows)}
    from apexctl.atomic import write_text

    write_text(args.out / "memory.md", markdown(rows, table, meta))
    if args.table:
        write_text(args.table, json.dumps(shipped_table(table, meta), indent=1) + "\n")


if __name__ == "__main__":
    main()
