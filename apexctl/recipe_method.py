"""The recipe's ``method`` section: one strict, typed section per objective, chosen by ``method.objective``.

The YAML stays flat (``method: {objective: apex, fm_t_max: 0.9, ...}``); :data:`MethodSpec` is a pydantic union
discriminated on ``objective`` (``apex_full`` when left out). Each section holds only its own objective's keys, takes
every knob default from that objective's engine dataclass (:mod:`apexctl.engine.config`, the one source of
defaults) and builds the engine config directly (:meth:`ApexMethod.config` etc.).

Another objective's key under ``method`` is refused (:func:`flat_method`), except in what an older apexctl wrote:
its ``RUN/recipe.yaml`` listed every key of every objective (:data:`FLAT_DEFAULTS`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apexctl.engine.config import ApexConfig, ApexFullConfig, ApexPaperConfig, FlowMatchingConfig, TimeSampler

_TS, _FM, _APEX, _PAPER = TimeSampler(), FlowMatchingConfig(), ApexConfig(), ApexPaperConfig()
_FULL = ApexFullConfig()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Refused(ValueError):
    """A cross-key check failed; ``path`` is the key at fault (``--set`` of that key gets the blame)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class TimeSpec(_Strict):
    """p(t): the knobs of :class:`~apexctl.engine.config.TimeSampler` but ``t_max`` (the objective sets it)."""

    kind: Literal["uniform", "logit_normal", "beta"] = _TS.kind
    logit_mean: float = _TS.logit_mean
    logit_std: float = Field(_TS.logit_std, gt=0)
    beta_a: float = Field(_TS.beta_a, gt=0)
    beta_b: float = Field(_TS.beta_b, gt=0)
    one_step_prob: float = Field(_TS.one_step_prob, ge=0.0, le=1.0)

    @classmethod
    def of(cls, sampler: TimeSampler) -> TimeSpec:
        return cls(**{k: getattr(sampler, k) for k in cls.model_fields})

    def sampler(self, t_max: float) -> TimeSampler:
        return TimeSampler(**self.model_dump(), t_max=t_max)


def _engine_config(section: BaseModel, cls: type, **samplers: Any) -> Any:
    """The engine dataclass ``cls`` from ``section``: every field read from the section key of the same name, except
    the time samplers, which are built from their time sections and given here."""
    return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if f.name not in samplers}, **samplers)


def _time(sampler: TimeSampler) -> Any:
    return Field(default_factory=lambda: TimeSpec.of(sampler))


class ShiftSpec(_Strict):
    a: float = -1.0
    b: float = 0.0
    mode: Literal["scalar", "diag"] = "scalar"
    learnable: bool = False
    site: Literal["projection", "embeddings"] = "projection"
    lr_scale: float = Field(1.0, gt=0, description="learning-rate multiplier for a learnable a, b")


class _NoReference:
    """What the trainer asks of every objective, for those without the key: no reference, no separate critic."""

    @property
    def reference(self) -> Literal["self"]:
        return "self"

    @property
    def critic(self) -> Literal["shifted"]:
        return "shifted"

    @property
    def references(self) -> set[str]:
        return {"self"}


#: the trainer-side stabilisers of ``apex`` and ``apex_full`` (read by the step loop, not the loss functions)
WarmStartSteps = Annotated[
    int,
    Field(
        ge=0,
        description="the first N steps regress the one-step map on the teacher's (noise, sample) pairs of a "
        "synthesised cache: ‖F(z, 1, c) − (z − x)‖² (DMD2's regression warm start; needs recorded seeds)",
    ),
]
WarmStartCache = Annotated[
    str | None,
    Field(description="the synthesised cache of the warm start (default: data.cache_dir, which must have seeds)"),
]
RectifyWarmup = Annotated[
    int,
    Field(
        ge=0,
        description="critic warm-up: the generator's adversarial weight (rectify_weight) ramps linearly from 0 over "
        "N steps after the warm start",
    ),
]
GanLr = Annotated[
    float | None,
    Field(
        gt=0.0,
        description="learning rate of the GAN head, a fresh module (null: train.lr; Adam's steps do not scale with "
        "gan_weight, so a small train.lr leaves the head at chance)",
    ),
]


class _Schedules:
    """What the step loop asks of ``apex`` / ``apex_full`` (their ``warm_start_steps`` and ``rectify_warmup``)."""

    def rectify_scale(self, step: int) -> float:
        """The ramp factor of the rectify weight at optimizer step ``step`` (0-based)."""
        if self.rectify_warmup <= 0:
            return 1.0
        return min(1.0, max(0.0, (step - self.warm_start_steps) / self.rectify_warmup))


class FlowMatchingMethod(_NoReference, _Strict):
    """``flow_matching`` (docs/design.md §5.4): L = ‖F(x_t, t, c) − (z − x)‖²."""

    objective: Literal["flow_matching"] = "flow_matching"
    time: TimeSpec = _time(_FM.time)

    @property
    def shift(self) -> ShiftSpec:
        """No condition shift is applied; the trainer's (unused) one is the default, so every run's checkpoint
        holds the same objects."""
        return ShiftSpec()

    def config(self) -> FlowMatchingConfig:
        return FlowMatchingConfig(time=self.time.sampler(_FM.time.t_max))


class ApexMethod(_Schedules, _Strict):
    """``apex`` (docs/design.md §5.2): the shifted branch as the model's own critic."""

    objective: Literal["apex"] = "apex"
    time: TimeSpec = _time(_APEX.fm_time)
    shift: ShiftSpec = ShiftSpec()
    critic_time: TimeSpec = _time(_APEX.critic_time)
    fm_t_max: float = Field(_APEX.fm_time.t_max, gt=0.0, le=1.0)
    fm_weight: float = Field(_APEX.fm_weight, ge=0.0)
    fake_weight: float = Field(_APEX.fake_weight, ge=0.0, description="λ_p")
    rectify_weight: float = Field(_APEX.rectify_weight, ge=0.0, description="μ")
    delta_clip: float | None = Field(_APEX.delta_clip, gt=0.0, description="δ; null = no clamp")
    reference: Literal["self", "ema", "base"] = Field(
        "self",
        description="F_ref in Δ: self (live, no grad) | ema | base (the starting model: LoRA adapters off, or a "
        "frozen copy of the initial weights for full tuning)",
    )
    reference_guidance: float = Field(
        _APEX.reference_guidance, ge=1.0, description="CFG scale of the reference in Δ (needs '' in the cache)"
    )
    critic: Literal["shifted", "separate"] = Field(
        "shifted",
        description="what plays the fake score in L_fake and Δ: shifted = F(u, s, c_fake) (APEX) | separate = a second "
        "copy of the denoiser trained by L_fake with the real condition (DMD2-style baseline; training only)",
    )
    normalize_delta: bool = Field(
        _APEX.normalize_delta,
        description="DMD2's per-sample normalised generator gradient: Δ ← s·Δ / mean|u − s·F_ref − x̂| (then clipped)",
    )
    critic_updates: int = Field(
        1, ge=1, description="two time scales: the critic trains every step, the generator every N-th (DMD2: 5)"
    )
    critic_lr: float | None = Field(None, gt=0.0, description="separate critic: its own learning rate (train.lr)")
    critic_max_grad_norm: float | None = Field(
        None, gt=0.0, description="separate critic: its own gradient clip (null: clipped with the generator)"
    )
    gan_weight: float = Field(
        _APEX.gan_weight,
        ge=0.0,
        description="DMD2's GAN term: a head on the critic's middle-block features tells noisy real latents from "
        "noisy one-step samples; the generator gets the non-saturating loss through them (0 = off)",
    )
    generator_steps: int = Field(
        _APEX.generator_steps,
        ge=1,
        description="N > 1: generator rows also train at τ ∈ {(N−1)/N, …, 1/N} on the student's re-noised samples "
        "(sample with sample.method: few, sample.steps: N)",
    )
    warm_start_steps: WarmStartSteps = 0
    warm_start_cache: WarmStartCache = None
    rectify_warmup: RectifyWarmup = 0
    gan_lr: GanLr = None

    @property
    def references(self) -> set[str]:
        """The reference kinds the trainer must build (``ema`` needs an EMA, ``base`` a frozen start)."""
        return {self.reference}

    @model_validator(mode="after")
    def _separate_has_no_shift(self) -> ApexMethod:
        for key in ("critic_lr", "critic_max_grad_norm"):
            if getattr(self, key) is not None and self.critic != "separate":
                raise Refused(
                    f"method.{key}",
                    f"method.{key} = {getattr(self, key)!r} configures a separate critic, and method.critic = "
                    f"'{self.critic}'; set method.critic = 'separate' or remove method.{key}",
                )
        if self.critic == "separate":
            default = ShiftSpec()
            for key in ShiftSpec.model_fields:
                if getattr(self.shift, key) != getattr(default, key):
                    raise Refused(
                        f"method.shift.{key}",
                        f"method.shift.{key} = {getattr(self.shift, key)!r}: method.critic = 'separate' does not use "
                        "the condition shift (the critic reads the real condition); remove method.shift",
                    )
        return self

    def config(self) -> ApexConfig:
        return _engine_config(
            self,
            ApexConfig,
            fm_time=self.time.sampler(self.fm_t_max),
            critic_time=self.critic_time.sampler(_APEX.critic_time.t_max),
        )


class ApexPaperMethod(_NoReference, _Strict):
    """``apex_paper`` (docs/design.md §5.3): the paper's L_fake + L_mix as written."""

    objective: Literal["apex_paper"] = "apex_paper"
    time: TimeSpec = _time(_PAPER.time)
    shift: ShiftSpec = ShiftSpec()
    fake_weight: float = Field(_PAPER.fake_weight, ge=0.0, description="λ_p")
    mix_weight: float = Field(_PAPER.mix_weight, ge=0.0, description="λ_e")
    lambda_mix: float = Field(_PAPER.lambda_mix, ge=0.0, le=1.0)
    fake_grad: bool = _PAPER.fake_grad
    fake_noise: Literal["fresh", "shared"] = _PAPER.fake_noise
    weighting: Literal["paper", "uniform"] = _PAPER.weighting
    weight_max: float = Field(_PAPER.weight_max, gt=0.0)

    def config(self) -> ApexPaperConfig:
        return _engine_config(self, ApexPaperConfig, time=self.time.sampler(_PAPER.time.t_max))


_REFERENCES = Literal["self", "ema", "base"]


class ApexFullMethod(_Schedules, _Strict):
    """``apex_full`` (docs/design.md §5.6): the released objective (TwinFlow's groups, RCGM, Barron, time
    weighting) with the condition shift marking the fake branch."""

    objective: Literal["apex_full"] = "apex_full"
    time: TimeSpec = _time(_FULL.time)
    t_max: float = Field(_FULL.time.t_max, gt=0.0, le=1.0, description="cap of t on the mul / any / adv rows")
    shift: ShiftSpec = ShiftSpec()
    groups: tuple[float, float, float, float] = Field(
        _FULL.groups, description="shares of the batch: e2e (one-step map), mul (flow matching), any (jumps), adv"
    )
    full_batch: bool = Field(_FULL.full_batch, description="every group on the whole batch (4× the rows)")
    consistency_ratio: float = Field(_FULL.consistency_ratio, ge=0.0, le=1.0)
    mul_gap: float = Field(_FULL.mul_gap, ge=0.0, le=1.0)
    estimate_order: int = Field(_FULL.estimate_order, ge=0, le=8, description="RCGM rollout sub-steps; 0 = none")
    rcgm_dt: float = Field(_FULL.rcgm_dt, gt=0.0, lt=1.0)
    rcgm_clip: float = Field(_FULL.rcgm_clip, gt=0.0)
    enhance_ratio: float = Field(_FULL.enhance_ratio, description="CFG-enhanced target r (needs '' in the cache)")
    enhance_range: tuple[float, float] = _FULL.enhance_range
    loss: Literal["barron", "l2"] = _FULL.loss
    barron_alpha: float = _FULL.barron_alpha
    barron_c: float = Field(_FULL.barron_c, gt=0.0)
    time_weighting: bool = _FULL.time_weighting
    rectify_weight: float = Field(_FULL.rectify_weight, ge=0.0, description="dmc")
    rectify_clip: float = Field(_FULL.rectify_clip, gt=0.0)
    reference_guidance: float = Field(_FULL.reference_guidance, ge=1.0, description="CFG of the real score in Δ")
    fake_time: Literal["shift", "signed"] = _FULL.fake_time
    reference: _REFERENCES = Field(
        "base", description="the real score F_R of the rectify term: self | ema | base (the frozen teacher)"
    )
    target_reference: _REFERENCES = Field(
        "self", description="F_T of the RCGM rollouts and the enhanced target: self | ema | base"
    )
    critic_updates: int = Field(
        1, ge=1, description="two time scales: the adv rows train every step, the whole objective every N-th"
    )
    gan_weight: float = Field(
        _FULL.gan_weight, ge=0.0, description="DMD2's GAN term on the e2e rows (see apex; 0 = off)"
    )
    target_time: Literal["none", "embed"] = Field(
        "embed",
        description="embed: a trained target-time embedder e(tt) (e(0) = 0) added to the time embedding in "
        "training; the export is the stock module (exact at tt = 0, how the one/few-step samplers call it)",
    )
    warm_start_steps: WarmStartSteps = 0
    warm_start_cache: WarmStartCache = None
    rectify_warmup: RectifyWarmup = 0
    gan_lr: GanLr = None

    @property
    def critic(self) -> Literal["shifted"]:
        return "shifted"

    @property
    def references(self) -> set[str]:
        return {self.reference, self.target_reference}

    @model_validator(mode="after")
    def _some_group(self) -> ApexFullMethod:
        if sum(self.groups) <= 0 or min(self.groups) < 0:
            raise Refused("method.groups", f"method.groups = {list(self.groups)}: shares must be ≥ 0, one > 0")
        return self

    def config(self) -> ApexFullConfig:
        return _engine_config(self, ApexFullConfig, time=self.time.sampler(self.t_max))


MethodSpec = Annotated[
    ApexMethod | ApexFullMethod | ApexPaperMethod | FlowMatchingMethod, Field(discriminator="objective")
]
#: ``method.objective`` when a recipe leaves it out (the winner of docs/evidence.md §6)
DEFAULT_OBJECTIVE = "apex_full"
SECTIONS: dict[str, type[_Strict]] = {
    "apex": ApexMethod,
    "apex_full": ApexFullMethod,
    "apex_paper": ApexPaperMethod,
    "flow_matching": FlowMatchingMethod,
}

#: Legacy: what ``Recipe.dump()`` wrote under ``method`` before the typed sections — every key of every objective,
#: these values when left at their defaults. Frozen (it records an old file format, it is not a source of defaults).
_T0 = {"kind": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "beta_a": 1.0, "beta_b": 1.0, "one_step_prob": 0.0}
FLAT_DEFAULTS: dict[str, Any] = {
    "time": _T0,
    "shift": {"a": -1.0, "b": 0.0, "mode": "scalar", "learnable": False, "site": "projection", "lr_scale": 1.0},
    "critic_time": _T0,
    "fm_t_max": 0.9,
    "fm_weight": 1.0,
    "fake_weight": 1.0,
    "rectify_weight": 0.5,
    "delta_clip": 1.0,
    "reference": "self",
    "reference_guidance": 1.0,
    "critic": "shifted",
    "generator_steps": 1,
    "mix_weight": 1.0,
    "lambda_mix": 0.5,
    "fake_grad": True,
    "fake_noise": "fresh",
    "weighting": "paper",
    "weight_max": 10.0,
}


def _same(value: Any, old: Any) -> bool:
    if isinstance(old, dict):
        return isinstance(value, dict) and all(k in old and _same(v, old[k]) for k, v in value.items())
    return isinstance(value, bool) == isinstance(old, bool) and value == old


def owners(key: str) -> list[str]:
    """The objectives whose section has ``key``."""
    return [name for name, section in SECTIONS.items() if key in section.model_fields]


def flat_method(method: dict) -> dict:
    """The ``method`` mapping of a recipe file, checked: ``objective`` filled in (:data:`DEFAULT_OBJECTIVE`), and a key of another
    objective refused with one line naming the key and the objectives it belongs to.

    Legacy shim: an old ``RUN/recipe.yaml`` lists every objective's keys (:data:`FLAT_DEFAULTS`). A key of another
    objective is dropped when it holds the old default, or when the section lists every old key (a whole old dump:
    that run's trainer ignored the key, so dropping it loads the run as it was trained).
    """
    objective = method.get("objective", DEFAULT_OBJECTIVE)
    section = SECTIONS.get(objective) if isinstance(objective, str) else None
    if section is None:
        return method  # pydantic names the allowed objectives
    old_dump = set(FLAT_DEFAULTS) <= set(method)
    out: dict[str, Any] = {"objective": objective}
    for key, value in method.items():
        belongs = owners(key)
        if key in section.model_fields or not belongs:
            out[key] = value  # an unknown key stays for pydantic, whose message lists the allowed ones
        elif not (old_dump or (key in FLAT_DEFAULTS and _same(value, FLAT_DEFAULTS[key]))):
            where = " or ".join(f"'{o}'" for o in belongs)
            raise Refused(
                f"method.{key}",
                f"method.{key} = {value!r} is a key of method.objective {where}, not '{objective}': remove it "
                f"(allowed here: {', '.join(section.model_fields)})",
            )
    return out


def switch_objective(method: dict, file_keys: set[str], set_keys: set[str]) -> None:
    """``--set method.objective=X`` replaced the file's objective: drop the file's keys that X has not (they were
    the old objective's settings). Keys given with ``--set`` stay, and are checked like any other."""
    objective = method.get("objective", DEFAULT_OBJECTIVE)
    section = SECTIONS.get(objective) if isinstance(objective, str) else None
    if section is None:  # an unknown objective: the union reports it
        return
    for key in list(method):
        if key in file_keys and key not in set_keys and key not in section.model_fields:
            del method[key]
