"""apexctl's FID Inception-v3 against torchmetrics' default FID network (torch-fidelity's), with the same weights file.

    pip install torch-fidelity          # only for this check; apexctl itself does not need it
    python bench/fid_equivalence.py --inception ~/weights/pt_inception-2015-12-05-6726825d.pth

Loads FILE into both networks (torch-fidelity loads it strictly, so this also proves the file format), feeds the
same uint8 images (odd sizes, so the resize is exercised) to both, and prints the largest feature difference and
FID(a, b) from ``FrechetInceptionDistance(feature=2048)`` vs ``FrechetInceptionDistance(feature=<ours>)``.
Without ``--inception`` it uses random weights with calibrated BatchNorm statistics (tests/fid_util.py).

torch-fidelity's package ``__init__`` imports torchvision for dataset helpers the Inception extractor never
uses; when torchvision is absent an inert placeholder module is registered so the extractor can be imported.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class _Inert:
    def __init__(self, *a, **k) -> None:
        pass

    def __call__(self, *a, **k):
        return _Inert()

    def __getattr__(self, name: str):
        return _Inert()

    def __mro_entries__(self, bases):
        return (object,)


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inception", type=Path, help="FID Inception weights (default: random, calibrated)")
    ap.add_argument("--images", type=int, default=6, help="images per set")
    ap.add_argument("--out", type=Path, help="write the result as JSON")
    args = ap.parse_args()

    if importlib.util.find_spec("torch_fidelity") is None:
        sys.exit("this check compares against torch-fidelity's network: pip install torch-fidelity")
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    from torchmetrics.image.fid import FrechetInceptionDistance

    from apexctl.eval.fid.inception import load_fid_inception

    weights = args.inception
    if weights is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from fid_util import build_fid_weights

        tmp = tempfile.TemporaryDirectory(prefix="fid-eq-")  # removed at exit: the file is 96 MB
        weights = build_fid_weights(Path(tmp.name))
    ours = load_fid_inception(weights, device="cpu")
    ref = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (args.images, 3, 40, 56), dtype=torch.uint8, generator=g)
    b = (a.float() * 0.7 + 30).to(torch.uint8)  # darker, lower contrast: a shifted set
    t0 = time.perf_counter()
    with torch.no_grad():
        fa_ref, fa_ours = ref.inception(a), ours(a)
    diff = float((fa_ref - fa_ours).abs().max())
    ref.update(a, real=True)
    ref.update(b, real=False)
    mine = FrechetInceptionDistance(feature=ours, normalize=False)
    mine.update(a, real=True)
    mine.update(b, real=False)
    result = {
        "weights": str(args.inception) if args.inception else "random, calibrated (tests/fid_util.py)",
        "images": args.images,
        "feature_max_abs_diff": diff,
        "feature_mean_abs": float(fa_ref.abs().mean()),
        "fid_torchmetrics_default": float(ref.compute()),
        "fid_apexctl_network": float(mine.compute()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    ratio = result["fid_apexctl_network"] / result["fid_torchmetrics_default"]
    print(f"{'':28}{'torchmetrics default':>22}{'apexctl':>14}{'ratio':>8}")
    print(
        f"{'FID(a, b)':28}{result['fid_torchmetrics_default']:>22.6g}{result['fid_apexctl_network']:>14.6g}"
        f"{ratio:>8.4f}"
    )
    print(f"largest feature difference {diff:.3g} (mean |feature| {result['feature_mean_abs']:.3g})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
