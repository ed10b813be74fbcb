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


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Storage bytes of a weight: a plain tensor, a torchao tensor subclass (its inner tensors), or a bitsandbytes
    4-bit parameter (packed codes + its quantisation state's absmax and code book, nested ones included)."""
    if t is None:
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax + code, then the nested state of a double-quantised absmax
        n += sum(tensor_bytes(getattr(state, k, None)) for k in ("absmax", "code", "offset"))
        state = getattr(state, "state2", None)
    return n


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
        _to_torchao(transformer, [layer for *_, layer in chosen], _library(scheme), device)
    for name, parent, attr, _ in chosen:
        done.layers.append(name)
        done.bytes_after += tensor_bytes(getattr(parent, attr).weight)
    transformer.requires_grad_(False)
    return done


def _to_torchao(transformer: nn.Module, layers: list[nn.Linear], config, device) -> None:
    from torchao.quantization import quantize_

    ids = {id(m) for m in layers}
    quantize_(transformer, config, filter_fn=lambda module, fqn: id(module) in ids, device=device)


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
