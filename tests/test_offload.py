"""``hardware.offload_activations`` / ``ema_on_cpu`` / ``offload_base``: exact (bit-identical runs and resume on the
CPU, where nothing moves), installed where they should act (hook counters), placed on the other device type when
there is one (``meta`` stands in for the GPU), and refused where they cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_util import digits_recipe, fails, ok, prepared_home
from safetensors.torch import load_file
from torch import nn

from apexctl.engine.ema import EMA
from apexctl.training import offload

ALL = {"offload_activations": True, "ema_on_cpu": True, "offload_base": True}


def _recipe(tmp: Path, name: str, hardware: dict | None = None, **sections) -> Path:
    """A 4-step LoRA ``apex`` run with the EMA reference, grad_accum 2, gradient checkpointing, checkpoints at 2."""
    base = {
        "model": {"lora": {"rank": 4, "alpha": 4.0, "init": "gaussian"}},
        "data": {"limit": 64},
        "method": {"reference": "ema"},
        "train": {
            "steps": 4,
            "grad_accum": 2,
            "ema_decay": 0.9,
            "checkpoint_every": 2,
            "keep_last": 5,
            "export": "both",
        },
        "hardware": {"gradient_checkpointing": True, **(hardware or {})},
    }
    merged = {k: base.get(k, {}) | sections.get(k, {}) for k in base.keys() | sections.keys()}
    return digits_recipe(tmp, name, **merged)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, "offload", _recipe)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _lora(run: Path, folder: str = "lora") -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / "pytorch_lora_weights.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(home):
    """The plain run, and the run with all three offloads under spies: (contexts entered, tensors packed by them)
    per step, the block hooks' calls and, after setup, where the trained / frozen / EMA tensors are."""
    from apexctl.training import loop, step

    ok(["distill", _recipe(home, "plain"), "-q"])
    seen: dict = {"entered": 0, "packed": 0, "enter": 0, "leave": 0}
    real_ctx, real_setup, real_pack = step.activations_on_cpu, loop.setup, offload.pack_to_cpu

    def ctx(device):
        seen["entered"] += 1
        return real_ctx(device)

    def pack(t, pin):
        seen["packed"] += 1
        return real_pack(t, pin)

    def setup(recipe, acc):
        sess = real_setup(recipe, acc)
        off = getattr(sess.transformer, offload.ATTR)
        seen["sess"], seen["off"] = sess, off
        for i in range(len(off.blocks)):
            off.blocks[i].register_forward_pre_hook(lambda *a: seen.__setitem__("enter", seen["enter"] + 1))
        return sess

    mp = pytest.MonkeyPatch()
    mp.setattr(step, "activations_on_cpu", ctx)
    mp.setattr(offload, "pack_to_cpu", pack)
    mp.setattr(loop, "setup", setup)
    try:
        ok(["distill", _recipe(home, "all", ALL), "-q"])
    finally:
        mp.undo()
    return home / "plain", home / "all", seen


def test_offloads_give_the_same_losses_and_weights(runs):
    """On the CPU each offload moves nothing: losses, the live and the EMA adapter are bit-identical."""
    plain, off, _ = runs
    assert _losses(off) == _losses(plain) and len(_losses(off)) == 4
    assert _same(_lora(off), _lora(plain)) and _same(_lora(off, "lora-live"), _lora(plain, "lora-live"))
    assert not _same(_lora(off), _lora(off, "lora-live"))  # the EMA is not the live adapter: both compared


def test_the_activation_hooks_wrap_every_micro_batch(runs):
    _, _, seen = runs
    assert seen["entered"] == 4 * 2  # steps × grad_accum
    assert seen["packed"] > 0  # the forward's saved tensors went through the pack hook


def test_block_hooks_and_placement(runs):
    _, _, seen = runs
    sess, off = seen["sess"], seen["off"]
    blocks = offload.transformer_blocks(sess.transformer)
    assert blocks and off.blocks == blocks
    assert all(len(b._forward_pre_hooks) >= 1 and len(b._forward_hooks) >= 1 for b in blocks)
    frozen = [f.master for fs in off.frozen for f in fs]
    assert frozen and all(not t.requires_grad and t.device.type == "cpu" for t in frozen)
    assert not any(t.requires_grad for t in frozen)  # no adapter weight is streamed
    # every block ran in each forward and in each recomputation (gradient checkpointing), and nothing is left in
    assert seen["enter"] > 4 * 2 * len(blocks) and off.resident == set()
    assert sess.ema.device == torch.device("cpu") and all(s.device.type == "cpu" for s in sess.ema.shadow)


def test_resume_with_the_offloads_is_bit_exact(home, runs):
    _, full, _ = runs
    part = _recipe(home, "part", ALL)
    ok(["distill", part, "--until", "2", "-q"])
    ok(["distill", part, "--resume", "auto", "-q"])
    assert _losses(home / "part") == _losses(full)
    assert _same(_lora(home / "part"), _lora(full)) and _same(
        _lora(home / "part", "lora-live"), _lora(full, "lora-live")
    )


# ---- placement on another device type (meta stands in for the GPU) ----------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4).requires_grad_(False)
        self.adapter = nn.Linear(4, 4, bias=False)
        self.register_buffer("scale", torch.ones(4))
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(self.base.weight.device.type + "/" + self.scale.device.type)
        return self.base(x) * self.scale + self.adapter(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def test_block_offload_streams_the_frozen_weights_and_nothing_else():
    net = _Net()
    masters = [b.base.weight for b in net.blocks]
    off = offload.install_block_offload(net, "meta")
    with off.parked():
        net.to("meta")
    assert all(b.base.weight is m and m.device.type == "cpu" for b, m in zip(net.blocks, masters, strict=True))
    assert all(b.adapter.weight.device.type == "meta" for b in net.blocks) and net.out.weight.device.type == "meta"
    net(torch.zeros(2, 4, device="meta")).sum().backward()
    # inside its forward each block's frozen weight and buffer were on the device; after it, the CPU masters again
    assert all(b.seen == ["meta/meta"] for b in net.blocks)
    assert all(b.base.weight is m and b.scale.device.type == "cpu" for b, m in zip(net.blocks, masters, strict=True))
    assert all(b.adapter.weight.grad is not None and b.adapter.weight.grad.device.type == "meta" for b in net.blocks)
    # a recomputation that stops early leaves its block in: the next block's pre-hook (or evict_all) drops it
    off._enter(0, net.blocks[0], ())
    assert net.blocks[0].base.weight.device.type == "meta" and off.resident == {0}
    off._enter(1, net.blocks[1], ())
    assert net.blocks[0].base.weight is masters[0] and off.resident == {1}
    offload.evict_all(net)
    assert net.blocks[1].base.weight is masters[1] and off.resident == set()


def test_ema_shadow_lives_on_its_own_device():
    lin = nn.Linear(3, 2)
    ema = EMA(list(lin.named_parameters()), 0.5, device="meta")
    assert all(s.device.type == "meta" for s in ema.shadow)
    ema.update()
    assert all(s.device.type == "meta" for s in ema.shadow)
    ema.load_state_dict({"decay": 0.5, "shadow": [torch.zeros(2, 3), torch.zeros(2)]})
    assert all(s.device.type == "meta" and s.dtype == torch.float32 for s in ema.shadow)
    # the same values on an explicit CPU shadow as beside the parameters; the reference gets the param's dtype
    bf = nn.Linear(3, 2).to(torch.bfloat16)
    a, b = EMA(list(bf.named_parameters()), 0.9), EMA(list(bf.named_parameters()), 0.9, device="cpu")
    for _ in range(3):
        with torch.no_grad():
            bf.weight.add_(1.0)
        a.update(), b.update()
    assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow, strict=True))
    assert all(v.dtype == torch.bfloat16 for v in b.shadow_dict().values())


def test_the_pack_hook_keeps_parameters_and_cpu_tensors():
    p, t = nn.Parameter(torch.ones(2)), torch.ones(2)
    assert offload.pack_to_cpu(p, False) is p and offload.pack_to_cpu(t, False) is t
    assert offload.unpack_from_cpu(t, False) is t
    assert offload.unpack_from_cpu((torch.device("cpu"), t), False) is t


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_offloads_are_refused_where_they_cannot_work(home):
    def one_line(path: Path, *needles: str) -> None:
        out = fails(["distill", path, "--dry-run"])
        assert len(out.strip().splitlines()) == 1 and all(n in out for n in needles), out

    fsdp = {"strategy": "fsdp", "processes": 2}
    one_line(_recipe(home, "r1", {"offload_base": True}, model={"lora": None}), "offload_base", "full fine-tune")
    one_line(
        _recipe(home, "r2", {"offload_base": True, **fsdp}, train={"ema_decay": None}, method={"reference": "self"}),
        "offload_base",
        "fsdp",
    )
    one_line(
        _recipe(home, "r3", {"offload_base": True}, model={"quantize": "int8"}),
        "offload_base",
        "int8",
        "not supported yet",
    )
    one_line(_recipe(home, "r4", {"offload_base": True}, method={"critic": "separate"}), "offload_base", "separate")
    one_line(_recipe(home, "r5", {"offload_base": True, "gradient_checkpointing": False}), "gradient_checkpointing")
    one_line(_recipe(home, "r6", {"ema_on_cpu": True, **fsdp}), "ema_on_cpu", "fsdp")
    one_line(
        _recipe(home, "r7", {"ema_on_cpu": True}, train={"ema_decay": None}, method={"reference": "self"}),
        "ema_on_cpu",
        "no EMA",
    )
    one_line(_recipe(home, "r8", {"offload_activations": True, **fsdp}), "offload_activations", "fsdp")
