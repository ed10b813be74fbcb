"""``model.quantize`` / ``data.synthesize.quantize``: a quantised frozen base (docs/quantization.md).

The denoiser's frozen ``nn.Linear`` weights are stored in 8 or 4 bits and dequantised inside each matmul
(weight-only: activations, the fp32 adapter, its optimizer state and the EMA keep their precision). The base is
quantised once, right after it loads in ``model.dtype`` and before the adapter is attached, so peft wraps the
quantised layers (torchao's ``TorchaoLoraLinear``, bitsandbytes' ``Linear4bit`` LoRA) and one quantised copy serves
the student, the EMA adapter, the base reference (adapters off) and a separate LoRA critic. Quantising is
deterministic (the same weights give the same bytes), which is what lets a checkpoint leave the base out and a
resume rebuild it from the model folder (training/checkpoint.py).

Schemes (symmetric, per output row ``r`` unless said; ``q`` the stored code, ``s`` a stored fp32/bf16 scale):

- ``int8``: torchao ``Int8WeightOnlyConfig``: ``w ≈ s_r · q``, ``q ∈ int8``, ``s_r = max_j |w_rj| / 127``.
- ``fp8``:  torchao ``Float8WeightOnlyConfig``: ``w ≈ s_r · q``, ``q ∈ float8_e4m3fn``, ``s_r = max_j |w_rj|/448``.
- ``nf4``:  bitsandbytes ``Linear4bit`` (QLoRA's NormalFloat4, double-quantised absmax): blocks of 64 consecutive
  weights, ``w ≈ absmax_b · NF4[q]``, ``q`` 4 bits.

Which layers (:func:`quantizable`): the ``nn.Linear`` layers inside the denoiser's top-level ``nn.ModuleList`` s —
its transformer blocks (Qwen-Image's ``transformer_blocks``, FLUX's double and single blocks, Z-Image's refiners and
layers), which hold nearly all the weights: 99.8% of Qwen-Image's 20B parameters, 99.4% of FLUX.1-dev's, 99.1% of
SD3.5 Medium's, 99.8% of Z-Image's, but 50% of SANA's, whose feed-forward layers are 1×1 convolutions (neither library
quantises a convolution). The patch / time / text embedders (the text projection is the shift's condition site) and
the output projection stay in the compute dtype: they are small and the first and last thing every token goes
through. nf4 further skips a layer with
``in_features % 64 != 0`` or ``out_features % 32 != 0`` (bitsandbytes' 64-weight blocks and its 4-bit kernels);
int8 and fp8 take any shape.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from apexctl.errors import BadInput

SCHEMES = ("none", "int8", "fp8", "nf4")
#: the pip package of each scheme
PACKAGES = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
#: nf4: bitsandbytes quantises blocks of this many consecutive weights (one absmax each)
NF4_BLOCK = 64
#: stored bytes per quantised weight, scales and quantisation state included (measured on a 3072×12288 bf16 layer;
#: the unquantised weight takes 2 in bf16 / fp16, 4 in fp32), for memory estimates
BYTES_PER_WEIGHT = {"int8": 1.002, "fp8": 1.001, "nf4": 0.516}
#: weights dequantised at a time in the backward through a torchao layer (row blocks of W: a few MB transient)
DEQUANT_CHUNK = 2**22


@dataclass
class Quantized:
    """What :func:`quantize_denoiser` did: the layers it quantised, those it left (name → why), weight bytes."""

    scheme: str
    dtype: torch.dtype
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0  # the quantised layers' weights in the compute dtype
    bytes_after: int = 0  # the same layers' stored codes and scales
    bytes_total: int = 0  # every parameter of the denoiser before quantising

    def describe(self) -> str:
        """One line for the run's log."""
        share = self.bytes_before / max(self.bytes_total, 1)
        line = (
            f"model.quantize {self.scheme}: {len(self.layers)} Linear layers of the transformer blocks "
            f"({share:.1%} of the denoiser's weights), {self.bytes_before / 2**20:.1f} → "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )
        if self.skipped:
            first = next(iter(self.skipped.items()))
            line += (
                f"; {len(self.skipped)} left in {str(self.dtype).removeprefix('torch.')} (e.g. {first[0]}: {first[1]})"
            )
        return line


#: loggers that only speak while a quantisation library is imported: one warning per CUDA extension a CPU-only
#: build cannot load (torchao), one per Enum it registers (torch), one about its tensor classes (diffusers), one
#: about an optional CPU kernel package (bitsandbytes, on CPUs with AVX512-BF16). transformers, diffusers and peft
#: import both libraries themselves whenever they are installed, so this noise would reach every command's output.
IMPORT_NOISE = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "bitsandbytes.backends.cpu.ops",
)


def silence_import_noise() -> None:
    """Raise :data:`IMPORT_NOISE`'s loggers to ERROR (called when apexctl.models is imported, before any model
    library is)."""
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def _installed(package: str) -> bool:
    """Whether ``package`` imports (ImportError: it is not installed; any other error is :func:`require`'s)."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    except Exception:  # installed but broken: reported with the failure by require()
        return True
    return True


def require(scheme: str, key: str = "model.quantize") -> None:
    """BadInput (exit 2, one line naming ``key`` and the pip package) when the library of ``scheme`` is missing or
    lacks what it needs; nothing for ``none``."""
    if scheme == "none":
        return
    if scheme not in PACKAGES:
        raise BadInput(f"{key} = {scheme!r}: expected one of {', '.join(SCHEMES)}")
    package = PACKAGES[scheme]
    if not _installed(package):
        raise BadInput(
            f"{key} = '{scheme}' needs the {package} package, which is not installed: pip install {package} "
            "(or pip install 'apexctl[quant]')"
        )
    try:
        _library(scheme)
    except Exception as exc:  # an old or broken install: missing names, a wrong keyword, a failing extension
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BadInput(
            f"{key} = '{scheme}': the installed {package} does not provide it ({type(exc).__name__}: {first}); "
            f"pip install -U {package}"
        ) from None


def _library(scheme: str):
    """The scheme's entry point: a torchao config, or bitsandbytes' ``(Linear4bit, Params4bit)``."""
    if scheme == "nf4":
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit, bnb.nn.Params4bit
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: the default rewrites torch._inductor's global config as a side effect
    return (Int8WeightOnlyConfig if scheme == "int8" else Float8WeightOnlyConfig)(set_inductor_config=False)


def block_linears(transformer: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """``(name, parent, attribute, layer)`` of every plain ``nn.Linear`` under a top-level ``nn.ModuleList`` of the
    denoiser (its transformer blocks), in module order."""
    out = []
    for top, child in transformer.named_children():
        if not isinstance(child, nn.ModuleList):
            continue
        for name, parent in child.named_modules(prefix=top):
            for attr, layer in parent.named_children():
                # exactly nn.Linear with a plain weight: not an adapter layer, nor a quantised one (bitsandbytes'
                # are Linear subclasses, torchao's hold a tensor subclass)
                if type(layer) is nn.Linear and type(layer.weight) is nn.Parameter:
                    out.append((f"{name}.{attr}", parent, attr, layer))
    return out


def quantizable(scheme: str, layer: nn.Linear) -> str | None:
    """None when ``scheme`` can store ``layer`` (one of :func:`block_linears`), else why not."""
    if scheme == "nf4" and (layer.in_features % NF4_BLOCK or layer.out_features % 32):
        shape = f"{layer.in_features}→{layer.out_features}"
        return f"nf4 needs in_features % {NF4_BLOCK} == 0 and out_features % 32 == 0 ({shape})"
    return None


def inner_tensors(t: torch.Tensor | None) -> list[torch.Tensor]:
    """The plain tensors that hold a weight's bytes: the tensor itself, a torchao tensor subclass's inner tensors,
    or a bitsandbytes 4-bit parameter's packed codes + its quantisation state's absmax, code book and offset
    (nested states of a double-quantised absmax included)."""
    if t is None:
        return []
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return [x for n in names for x in inner_tensors(getattr(t, n))]
    out = [t]
    state = getattr(t, "quant_state", None)
    while state is not None:
        out += [x for k in ("absmax", "code", "offset") for x in inner_tensors(getattr(state, k, None))]
        state = getattr(state, "state2", None)
    return out


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Storage bytes of a weight, quantised or not (:func:`inner_tensors`)."""
    return sum(x.numel() * x.element_size() for x in inner_tensors(t))


def quantize_denoiser(
    transformer: nn.Module, scheme: str, dtype: torch.dtype, device: torch.device | str | None = None
) -> Quantized:
    """Cast ``transformer`` to ``dtype`` (the compute dtype: the quantised layers dequantise to it), then quantise
    its :func:`block_linears` that ``scheme`` can store, in place, each moved to ``device`` first (the GPU quantises
    far faster than a CPU, and the bf16 layers then never need to fit on it together; None: where they are).
    Refuses a denoiser that already has an adapter: the adapter goes on top of the quantised layers, never under."""
    if getattr(transformer, "peft_config", None):
        raise ValueError("quantize the base before the LoRA adapter is attached")
    if any(p.is_floating_point() and p.dtype != dtype for p in transformer.parameters()):
        transformer.to(dtype)  # first: .to(dtype) afterwards would leave the quantised weights as they are
    done = Quantized(scheme, dtype, bytes_total=sum(tensor_bytes(p) for p in transformer.parameters()))
    chosen = []
    for name, parent, attr, layer in block_linears(transformer):
        reason = quantizable(scheme, layer)
        if reason is not None:
            done.skipped[name] = reason
            continue
        chosen.append((name, parent, attr, layer))
        done.bytes_before += tensor_bytes(layer.weight)
    if scheme == "nf4":
        _to_nf4([(parent, attr, layer) for _, parent, attr, layer in chosen], dtype, device)
    else:
        _to_torchao(transformer, [layer for *_, layer in chosen], _library(scheme), device, in_blocks=scheme == "fp8")
    for name, parent, attr, _ in chosen:
        done.layers.append(name)
        done.bytes_after += tensor_bytes(getattr(parent, attr).weight)
    transformer.requires_grad_(False)
    return done


class _FrozenLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` for a frozen torchao-quantised ``W``; backward ``∂L/∂x = ∂L/∂y · W`` with ``W`` dequantised
    again, a block of rows at a time (``DEQUANT_CHUNK`` weights), summed in fp32. torchao's own linear dequantises ``W`` inside autograd, so autograd would keep the
    dequantised copy of every layer for backward: the bf16 weights again, on top of the 8-bit ones (measured: the
    saved bytes of a step 2.4× the bf16 base's without checkpointing, one block's bf16 weights at the peak with
    it). Here nothing is saved but a reference to the module (its weight is state, not an activation, and so
    also escapes saved-tensor hooks such as hardware.offload_activations)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FrozenQuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer.linear(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # row blocks of W: torchao's dequantize() goes through fp32 (5× the layer's bf16 bytes at once, measured)
        w = ctx.layer.weight
        rows = max(1, DEQUANT_CHUNK // w.shape[1])
        g = grad.reshape(-1, grad.shape[-1])
        out = torch.zeros(g.shape[0], w.shape[1], dtype=torch.float32, device=grad.device)
        for r in range(0, w.shape[0], rows):
            part = w[r : r + rows].dequantize()
            out += g[:, r : r + rows].to(part.dtype) @ part
        return out.reshape(*grad.shape[:-1], w.shape[1]).to(grad.dtype), None


class FrozenQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` holding a frozen torchao-quantised weight, differentiable in its input only
    (:class:`_FrozenLinear`): what ``model.quantize: int8 | fp8`` turns the block Linears into.

    ``in_blocks``: the forward dequantises ``W`` a block of rows at a time too (``y[:, rows] = x W[rows]ᵀ + b[rows]``)
    instead of torchao's linear — set for ``fp8``, whose weight-only linear dequantises the whole layer through fp32
    (measured on CPU: 5× the layer's bf16 bytes at once, and 1.3× slower than the blocks); torchao's int8 linear
    holds 1.1× and is 2.3× faster than the blocks there, so int8 keeps it."""

    in_blocks: bool = False

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b``."""
        if not self.in_blocks:
            return nn.functional.linear(x, self.weight, self.bias)
        w, b = self.weight, self.bias
        rows = max(1, DEQUANT_CHUNK // w.shape[1])
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        for r in range(0, w.shape[0], rows):
            out[:, r : r + rows] = nn.functional.linear(
                flat, w[r : r + rows].dequantize(), b[r : r + rows] if b is not None else None
            )
        return out.reshape(*x.shape[:-1], w.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and x.is_floating_point():
            # what autocast does to a linear's input; torchao's weight takes F.linear before autocast sees it, so
            # an fp32 input (a LayerNorm's, under autocast) would otherwise run the matmul in fp32 against an fp32
            # dequantised weight (measured on CPU: 3× the layer's bf16 bytes at the peak, and an fp32 output)
            x = x.to(torch.get_autocast_dtype(kind))
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.linear(x)
        return _FrozenLinear.apply(x, self)


def _to_torchao(transformer: nn.Module, layers: list[nn.Linear], config, device, *, in_blocks: bool = False) -> None:
    from torchao.quantization import quantize_

    ids = {id(m) for m in layers}
    quantize_(transformer, config, filter_fn=lambda module, fqn: id(module) in ids, device=device)
    for layer in layers:  # quantize_ swaps the weight in place: the module is the same object
        layer.__class__ = FrozenQuantizedLinear
        layer.in_blocks = in_blocks


def _to_nf4(layers: list[tuple[nn.Module, str, nn.Linear]], dtype: torch.dtype, device) -> None:
    """Each layer swapped for a ``Linear4bit`` computing in ``dtype`` (diffusers' ``BitsAndBytesConfig`` refuses
    CPU-only machines, so the swap is done here, as its replace does)."""
    linear4bit, params4bit = _library("nf4")
    for parent, attr, lin in layers:
        new = linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=dtype,
            quant_type="nf4",
            device="meta",
        )
        weight = params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK)
        new.weight = weight.to(device or lin.weight.device)  # Params4bit quantises on its first move to a device
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.to(new.weight.device), requires_grad=False)
        # on a CPU with AVX512-BF16, an eval-mode forward would repack the weight in place for its fast kernel
        # (changing the stored bytes, and asserting on layers narrower than 32 rows): keep one layout
        new.support_avx512bf16_for_cpu = False
        setattr(parent, attr, new)


def quantize_backbone(
    backbone, scheme: str, *, key: str = "model.quantize", device: torch.device | str | None = None
) -> Quantized | None:
    """Quantise ``backbone``'s denoiser in place with ``scheme`` (None for ``none``; the quantised layers on
    ``device``) and record its compute dtype (the dtype it was loaded in: the quantised weights no longer tell it).
    BadInput for a missing library."""
    if scheme == "none":
        return None
    require(scheme, key)
    dtype = backbone.compute_dtype
    done = quantize_denoiser(backbone.transformer, scheme, dtype, device)
    backbone.set_compute_dtype(dtype)
    backbone.quantization = scheme
    return done
