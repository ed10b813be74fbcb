"""GenEval colour classification: CLIP zero-shot over the 10 colours on each object's masked crop (notes/geneval.md
§3.4; reference ``color_classification`` + clip_benchmark ``zero_shot_classifier`` / ``run_classification``).

- Crop (``masked_crop``): ``Image.composite(image, #999 canvas, mask)`` keeps the object's pixels and paints the rest
  grey (``bgcolor="original"`` keeps the image; no mask → the whole image), then ``crop(box)`` with the box
  rounded as PIL rounds it (at least one pixel wide and tall) when ``crop == "1"``.
- Classifier weights per class name (cached): for each colour c the three templates
  ``"a photo of a {c} {class}"``, ``"a photo of a {c}-colored {class}"``, ``"a photo of a {c} object"`` are
  embedded, each L2-normalised, averaged and re-normalised.
- Colour = argmax of ``normalize(image embedding) @ weights`` (the reference's ×100 logit scale and fp16 autocast
  do not change the argmax except at near-ties; we compute in the CLIP's own dtype, fp32 by default).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from apexctl.errors import BadInput
from apexctl.eval.clip.model import Clip, embed_images, embed_texts
from apexctl.eval.geneval.prompts import COLORS
from apexctl.eval.geneval.score import Detection

TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")


def masked_crop(image: Image.Image, det: Detection, bgcolor: str = "#999", crop: str = "1") -> Image.Image:
    """The reference's ``ImageCrops.__getitem__`` before the CLIP transform."""
    image = image.convert("RGB")
    blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
    out = image
    if det.mask is not None:
        mask = np.asarray(det.mask, dtype=bool)
        if mask.shape != image.size[::-1]:
            raise BadInput(f"mask of shape {mask.shape} does not match the image ({image.size[1]}, {image.size[0]})")
        out = Image.composite(image, blank, Image.fromarray(mask))
    if crop == "1":
        # PIL rounds the float box; a box thinner than a pixel (external detectors) would crash the CLIP transform,
        # so it keeps at least one pixel (the reference never meets one: mmdet boxes come from non-empty masks)
        x0, y0, x1, y1 = (round(float(v)) for v in det.box[:4])
        out = out.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    return out


class ClipColors:
    """Zero-shot colour classifier on a loaded CLIP; call ``classify(image, objects, classname)``."""

    def __init__(self, clip: Clip, bgcolor: str = "#999", crop: str = "1") -> None:
        self.clip, self.bgcolor, self.crop = clip, bgcolor, crop
        self._weights: dict[str, torch.Tensor] = {}

    def weights(self, classname: str) -> torch.Tensor:
        """``[D, 10]`` zero-shot weights for ``classname`` (cached)."""
        if classname not in self._weights:
            texts = [t.format(c=c, classname=classname) for c in COLORS for t in TEMPLATES]
            emb = embed_texts(self.clip, texts).reshape(len(COLORS), len(TEMPLATES), -1)
            w = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)
            self._weights[classname] = w.T.contiguous()
        return self._weights[classname]

    def classify(self, image: Image.Image, objects: list[Detection], classname: str) -> list[str]:
        """One colour name per object, from its masked crop."""
        if not objects:
            return []
        crops = [masked_crop(image, d, self.bgcolor, self.crop) for d in objects]
        logits = 100.0 * embed_images(self.clip, crops) @ self.weights(classname)
        return [COLORS[int(i)] for i in logits.argmax(dim=1)]
