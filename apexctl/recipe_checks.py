"""The recipe's cross-section checks: settings valid alone but not together (each refused with one line that names
the key and what to set instead). Called by ``Recipe``'s validator; ``Refused`` becomes exit 2 with the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apexctl.recipe_method import Refused

if TYPE_CHECKING:
    from apexctl.recipe import Recipe


def check_combinations(r: Recipe) -> None:
    """Raise :class:`Refused` (one line, naming the key) for the first combination that cannot work."""
    m, hw = r.method, r.hardware
    fsdp = hw.strategy == "fsdp"
    _check_quantize(r, fsdp)
    _check_offload(r, fsdp)
    if hw.offload and not fsdp:
        raise Refused(
            "hardware.offload",
            f"hardware.offload = true offloads FSDP shards to the CPU, and hardware.strategy = '{hw.strategy}' "
            "does not shard; set hardware.strategy = 'fsdp' or hardware.offload = false",
        )
    if "base" in m.references and r.model.lora is None and fsdp:
        raise Refused(
            "method.reference",
            "method.reference = 'base' with full tuning keeps a frozen copy of the starting weights, which "
            "hardware.strategy = 'fsdp' would have to shard; use model.lora (base = adapters off), strategy "
            "'ddp', or another method.reference",
        )
    if m.objective == "apex_full" and not m.full_batch:
        groups = sum(1 for share in m.groups if share > 0)
        if r.train.micro_batch < groups:
            raise Refused(
                "train.micro_batch",
                f"train.micro_batch = {r.train.micro_batch}: method.objective = 'apex_full' splits each "
                f"micro-batch into {groups} row groups (method.groups), so it needs at least {groups} rows; "
                "raise train.micro_batch or set method.full_batch = true",
            )
    if getattr(m, "target_time", "none") == "embed" and fsdp:
        raise Refused(
            "method.target_time",
            "method.target_time = 'embed' is not supported with hardware.strategy = 'fsdp' (the embedder is not "
            "sharded); use strategy 'ddp', or method.target_time = 'none'",
        )
    if getattr(m, "gan_weight", 0.0) > 0 and fsdp:
        raise Refused(
            "method.gan_weight",
            f"method.gan_weight = {m.gan_weight}: the GAN term is not supported with hardware.strategy = 'fsdp' "
            "(its head is not sharded and its critic pass runs on detached weights); use strategy 'ddp', or "
            "method.gan_weight = 0",
        )
    if m.critic == "separate" and fsdp:
        raise Refused(
            "method.critic",
            "method.critic = 'separate' is not supported with hardware.strategy = 'fsdp' (the critic copy "
            "is not sharded); use strategy 'ddp', or method.critic = 'shifted'",
        )


def _check_quantize(r: Recipe, fsdp: bool) -> None:
    """``model.quantize`` quantises a frozen base: it needs one (a LoRA run) and a base that is not sharded."""
    q = r.model.quantize
    if q == "none":
        return
    if r.model.lora is None:
        raise Refused(
            "model.quantize",
            f"model.quantize = '{q}' quantises the frozen base under a LoRA, and a full fine-tune (no model.lora) "
            "trains every weight; set model.lora, or model.quantize = 'none'",
        )
    if fsdp:
        raise Refused(
            "model.quantize",
            f"model.quantize = '{q}' is not supported with hardware.strategy = 'fsdp' (it shards plain weights, "
            "not quantised ones); use strategy 'ddp' (each process holds the quantised base), or "
            "model.quantize = 'none'",
        )


def _check_offload(r: Recipe, fsdp: bool) -> None:
    """The one-GPU offloads of ``hardware``: each where it works, refused (one line) where it cannot."""
    hw = r.hardware
    if hw.offload_activations and fsdp:
        raise Refused(
            "hardware.offload_activations",
            "hardware.offload_activations = true is not supported with hardware.strategy = 'fsdp' yet; use "
            "hardware.offload (FSDP's own CPU offload), or strategy 'ddp'",
        )
    if hw.ema_on_cpu:
        if fsdp:
            raise Refused(
                "hardware.ema_on_cpu",
                "hardware.ema_on_cpu = true: hardware.strategy = 'fsdp' keeps no EMA (the shadow would be "
                "sharded); use strategy 'ddp', or hardware.ema_on_cpu = false",
            )
        if r.ema_decay is None:
            raise Refused(
                "hardware.ema_on_cpu",
                "hardware.ema_on_cpu = true but this run keeps no EMA (train.ema_decay is null and "
                "method.reference is not 'ema'); set train.ema_decay, or hardware.ema_on_cpu = false",
            )
    if hw.offload_base:
        _check_offload_base(r, fsdp)


def _check_offload_base(r: Recipe, fsdp: bool) -> None:
    hw, why = r.hardware, None
    if r.model.lora is None:
        why = (
            "streams the frozen base under a LoRA, and a full fine-tune (no model.lora) trains every weight "
            "(its optimizer needs them on the device); set model.lora"
        )
    elif fsdp:
        why = "is not supported with hardware.strategy = 'fsdp' (it shards the blocks instead); use strategy 'ddp'"
    elif r.model.quantize != "none":
        why = (
            f"with model.quantize = '{r.model.quantize}' is not supported yet (moving quantised weights "
            "between devices per forward is untested); use model.quantize = 'none'"
        )
    elif r.method.critic == "separate":
        why = "with method.critic = 'separate' is not supported yet (the critic copy has no hooks); use 'shifted'"
    elif not hw.gradient_checkpointing:
        why = (
            "needs hardware.gradient_checkpointing = true (without it backward keeps every block's streamed "
            "weights on the device, so nothing is saved)"
        )
    if why is not None:
        raise Refused("hardware.offload_base", f"hardware.offload_base = true {why}, or hardware.offload_base = false")
