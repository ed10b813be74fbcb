"""Inference: prompts → images, for every command and bench that draws them.

The contract: **one seed per image, images independent of batching.** Image i is drawn from its own generator,
seeded by ``seeds[i]`` (its first draw is the initial noise, later draws the few-step sampler's re-noising), so it
depends only on the model, its prompt, its seed and the settings — never on the batch size, the batch it lands in
or the other prompts. Guided sampling broadcasts the negative prompt's one row to the batch with every field
(``Cond.expand``).

- :mod:`~apexctl.inference.settings`: ``resolve_sample_settings`` → ``SampleSettings``, the one meaning of a
  recipe's ``sample`` section (and of ``method: auto``) for ``sample``, ``eval *`` and the benches.
- :mod:`~apexctl.inference.generate`: ``seeded_noise``, ``generate_latents``, ``generate_images``.
- :mod:`~apexctl.inference.models`: which model and recipe a command samples (runs, model folders, LoRAs).
- :mod:`~apexctl.inference.sample`: the ``apexctl sample`` command body.
"""

from apexctl.inference.generate import generate_images, generate_latents, image_generators, seeded_noise
from apexctl.inference.models import (
    Loaded,
    load_sampling_model,
    load_trained,
    locate,
    newest_run,
    resolve_model,
    run_recipe,
)
from apexctl.inference.settings import (
    ModelInfo,
    SampleSettings,
    is_distilled,
    model_info,
    resolve_method,
    resolve_sample_settings,
    teacher_settings,
)

__all__ = [
    "Loaded",
    "ModelInfo",
    "SampleSettings",
    "generate_images",
    "generate_latents",
    "image_generators",
    "is_distilled",
    "load_sampling_model",
    "load_trained",
    "locate",
    "model_info",
    "newest_run",
    "resolve_method",
    "resolve_model",
    "resolve_sample_settings",
    "run_recipe",
    "seeded_noise",
    "teacher_settings",
]
