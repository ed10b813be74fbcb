"""GenEval detector backends: raw per-class detections for one image (the scorer thresholds them).

``hf-mask2former`` (``Mask2FormerDetector``): transformers' ``Mask2FormerForUniversalSegmentation`` (e.g.
``facebook/mask2former-swin-small-coco-instance``, detectron2-trained: same architecture as the reference's mmdet
checkpoint, not the same weights). Input and output follow mmdetection 2.x's Mask2Former test path, which the
reference uses (notes/geneval.md §3.3):

- resize keeping the aspect ratio to fit ``resize_long × resize_short`` (1333 × 800; ``size = int(side·s + 0.5)``),
  bilinear, rounded to uint8 like cv2; normalise with the processor's mean/std; zero-pad bottom/right to ×32;
- instance post-processing: class probabilities ``softmax(logits)[:, :-1]``, the top 100 (query, class) pairs;
  mask logits upsampled (bilinear) to the padded input, cropped to the resized image, upsampled to the original
  size; binary mask = logit > 0; score = class prob × mean sigmoid inside the mask; box = the mask's extent
  ``[x_min, y_min, x_max + 1, y_max + 1]`` (mmdet ``mask2bbox``; an empty mask gives a zero box).

``detections-file`` (``DetectionsFile``): one JSON line per image, ``{"image": "00012/samples/00003.png",
"detections": {"<class>": [{"box": [x1, y1, x2, y2], "score": s, "mask"?: RLE | PNG path, "color"?: colour}]}}``;
an image is matched by (prompt index, image index), so any zero-padding (``12/samples/3.png``) and any folder in
front of it (the reference evaluator writes full paths) name the same image.
Masks are COCO RLE (``{"size": [h, w], "counts": str | list}``, column-major) or a PNG path relative to the file's
folder (non-zero = object); they are decoded only when the image is scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from apexctl.errors import BadInput, read_text
from apexctl.eval.geneval.prompts import COLORS, class_names
from apexctl.eval.geneval.score import Detection

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
MAX_PER_IMAGE = 100  # mmdet Mask2Former test_cfg.max_per_image
PAD_DIVISOR = 32
# detector label spellings (detectron2 / VOC / HF configs) → GenEval's mmdet names
LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "cellphone": "cell phone",
    "hair dryer": "hair drier",
}

Raw = dict[str, list[Detection]]


# ---------------------------------------------------------------- COCO RLE


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (``counts`` as a list or the compressed string) → bool ``[h, w]``."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        counts = _counts_from_string(counts.decode() if isinstance(counts, bytes) else counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for n in counts:
        if value:
            flat[pos : pos + int(n)] = True
        pos += int(n)
        value = not value
    if pos != h * w:
        raise ValueError(f"RLE counts sum to {pos}, expected {h * w}")
    return flat.reshape((h, w), order="F")


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """bool ``[h, w]`` → COCO compressed RLE ``{"size": [h, w], "counts": str}`` (pycocotools' encoding)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # RLE starts with a run of zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(counts)}


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c  # pycocotools: delta to the count two back, from the 4th on
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if ch & 0x10 else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _counts_from_string(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


# ---------------------------------------------------------------- detections file


class DetectionsFile:
    """A validated detections file; ``raw(image_rel)`` gives one image's detections (masks decoded then)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"--detections {path}: no such file")
        self._lines: dict[tuple[int, int] | str, dict[str, list[dict[str, Any]]]] = {}
        names = set(class_names())
        for no, line in enumerate(read_text(self.path, "--detections").splitlines(), 1):
            if not line.strip():
                continue
            where = f"--detections {path} line {no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise BadInput(f'{where}: expected {{"image": "NNNNN/samples/K.png", "detections": {{...}}}}')
            dets = row.get("detections", {})
            if not isinstance(dets, dict):
                raise BadInput(f"{where}: 'detections' must map class names to lists")
            for cls, objs in dets.items():
                if cls not in names:
                    raise BadInput(f"{where}: unknown class {cls!r} (GenEval uses the 80 COCO names, e.g. 'tv remote')")
                if not isinstance(objs, list):
                    raise BadInput(f"{where}: detections of {cls!r} must be a list")
                for obj in objs:
                    self._check(obj, f"{where} ({cls})")
            key = _norm(row["image"])
            if key in self._lines:
                raise BadInput(f"{where}: image {row['image']} appears twice")
            self._lines[key] = dets

    @staticmethod
    def _check(obj: Any, where: str) -> None:
        box = obj.get("box") if isinstance(obj, dict) else None
        if not isinstance(box, list) or len(box) < 4 or not all(isinstance(v, int | float) for v in box[:4]):
            raise BadInput(f"{where}: each detection needs 'box': [x1, y1, x2, y2]")
        if not isinstance(obj.get("score"), int | float):
            raise BadInput(f"{where}: each detection needs a numeric 'score'")
        color = obj.get("color")
        if color is not None and color not in COLORS:
            raise BadInput(f"{where}: color {color!r} is not one of {', '.join(COLORS)}")
        mask = obj.get("mask")
        if mask is not None and not isinstance(mask, str | dict):
            raise BadInput(f"{where}: 'mask' must be a COCO RLE object or a PNG path")

    def has(self, image_rel: str) -> bool:
        return _norm(image_rel) in self._lines

    def colors_complete(self, image_rel: str, classes: list[str]) -> bool:
        """True if every detection of ``classes`` in this image carries its own colour (no CLIP needed)."""
        dets = self._lines.get(_norm(image_rel), {})
        return all(o.get("color") is not None for c in classes for o in dets.get(c, []))

    def raw(self, image_rel: str) -> Raw:
        dets = self._lines[_norm(image_rel)]
        return {cls: [self._detection(o, image_rel) for o in objs] for cls, objs in dets.items()}

    def _detection(self, obj: dict[str, Any], image_rel: str) -> Detection:
        mask = obj.get("mask")
        try:
            if isinstance(mask, dict):
                mask = rle_decode(mask)
            elif isinstance(mask, str):
                mask = np.asarray(Image.open(self.path.parent / mask).convert("L")) > 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"--detections {self.path}: bad mask for {image_rel} ({exc})") from None
        return Detection(box=obj["box"], score=obj["score"], mask=mask, color=obj.get("color"))


_IMAGE_PATH = re.compile(r"(?:^|/)(\d+)/samples/(\d+)\.png$")


def _norm(rel: str) -> tuple[int, int] | str:
    """The image a path names: (prompt index, image index) for any ``…/<digits>/samples/<digits>.png`` (the
    reference evaluator reads any zero-padding, and any folder above), else the path itself."""
    path = Path(rel).as_posix()
    m = _IMAGE_PATH.search(path)
    return (int(m[1]), int(m[2])) if m else path.lstrip("./")


# ---------------------------------------------------------------- hf-mask2former


def _label_map(id2label: Mapping[int, str]) -> list[str]:
    """The detector's label ids → GenEval class names (aliases, ``_``→space; ``LABEL_i`` → index order)."""
    names = class_names()
    labels = [str(id2label[i]) for i in range(len(id2label))]
    if all(lab == f"LABEL_{i}" for i, lab in enumerate(labels)) and len(labels) == len(names):
        return list(names)
    mapped = []
    for lab in labels:
        key = lab.strip().lower().replace("_", " ").replace("-", " ")
        mapped.append(LABEL_ALIASES.get(key, LABEL_ALIASES.get(key.replace(" ", ""), key)))
    missing = [n for n in names if n not in mapped]
    if missing:
        raise BadInput(
            f"the detector's labels do not cover GenEval's 80 COCO classes (missing: {', '.join(missing[:8])}"
            f"{'…' if len(missing) > 8 else ''}); use a COCO instance-segmentation model such as {DEFAULT_DETECTOR}"
        )
    return mapped


class Mask2FormerDetector:
    """transformers Mask2Former with mmdet's test-time pre/post-processing (module docstring)."""

    def __init__(
        self,
        source: str | Path,
        *,
        device: str | torch.device | None = None,
        resize_long: int = 1333,
        resize_short: int = 800,
    ) -> None:
        def missing(why: str) -> BadInput:
            return BadInput(
                f"--detector {source}: {why}; download {DEFAULT_DETECTOR} (e.g. `hf download {DEFAULT_DETECTOR} "
                "--local-dir DIR`) and pass --detector DIR, or score a --detections FILE from any detector"
            )

        p = Path(source)
        if p.exists() and not (p / "config.json").is_file():
            raise missing("not a model folder (no config.json)")
        if not p.exists() and (str(source).startswith((".", "/", "~")) or str(source).count("/") != 1):
            raise missing("no such folder")
        from transformers import Mask2FormerForUniversalSegmentation

        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(str(source))
        except (OSError, ValueError) as exc:
            raise missing(f"cannot load Mask2Former ({type(exc).__name__})") from None
        self.classes = _label_map(model.config.id2label)
        self.mean, self.std = _norm_stats(source)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.resize_long, self.resize_short = resize_long, resize_short
        self.source = str(source)

    def _input(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised, padded ``[1, 3, Hp, Wp]`` and the resized (unpadded) size (mmdet LSJ test pipeline)."""
        w, h = image.size
        scale = min(self.resize_long / max(h, w), self.resize_short / min(h, w))
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        if (nh, nw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255)  # cv2 resizes uint8 images to uint8
        x = (x / 255.0 - self.mean) / self.std
        ph, pw = -(-nh // PAD_DIVISOR) * PAD_DIVISOR, -(-nw // PAD_DIVISOR) * PAD_DIVISOR
        x = torch.nn.functional.pad(x, (0, pw - nw, 0, ph - nh), value=0.0)
        return x, (nh, nw)

    @torch.no_grad()
    def __call__(self, image: Image.Image, min_score: float = 0.0) -> Raw:
        """Detections with score > ``min_score`` (the scorer's own threshold, so nothing it keeps is lost)."""
        w, h = image.size
        x, (nh, nw) = self._input(image)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(self.device, dtype))
        cls_logits = out.class_queries_logits[0].float()  # [Q, K+1]
        mask_logits = out.masks_queries_logits[0].float()  # [Q, h/4, w/4]
        num_classes = cls_logits.shape[-1] - 1
        scores = cls_logits.softmax(-1)[:, :-1]
        top_scores, top = scores.flatten().topk(min(MAX_PER_IMAGE, scores.numel()), sorted=False)
        labels, queries = top % num_classes, top // num_classes
        m = mask_logits[queries][None]
        m = torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
        m = m[..., :nh, :nw]
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0]
        binary = m > 0
        mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        det_scores = top_scores * mask_scores
        raw: Raw = {}
        for i in torch.nonzero(det_scores > min_score).flatten().tolist():
            mk = binary[i]
            xs, ys = torch.nonzero(mk.any(0)).flatten(), torch.nonzero(mk.any(1)).flatten()
            box = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1] if len(xs) and len(ys) else [0, 0, 0, 0]
            det = Detection(box=[float(v) for v in box], score=float(det_scores[i]), mask=mk.cpu().numpy())
            raw.setdefault(self.classes[int(labels[i])], []).append(det)
        return raw


def _norm_stats(source: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std from the model's ``preprocessor_config.json`` (ImageNet's, as mmdet and detectron2 use, without)."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = Path(source) / "preprocessor_config.json"
    if not cfg.is_file():
        try:
            from huggingface_hub import hf_hub_download

            cfg = Path(hf_hub_download(str(source), "preprocessor_config.json"))
        except Exception:  # noqa: BLE001 - no processor file: keep the defaults
            cfg = Path("/nonexistent")
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
