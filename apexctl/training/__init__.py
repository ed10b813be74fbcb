"""Training on accelerate (docs/design.md §6): one process, or DDP / FSDP through ``accelerate launch``.

One concern per module:

- :mod:`~apexctl.training.session`: builds a :class:`~apexctl.training.session.Session` from a recipe (the only
  module that imports the models, the data, LoRA and the export) and writes the result at the end;
- :mod:`~apexctl.training.objectives`: the recipe's objective as a ``(net, x, cond) -> LossOut`` callable;
- :mod:`~apexctl.training.step`: one optimizer step (micro-batches, backward, clip, AdamW, EMA, non-finite skips);
- :mod:`~apexctl.training.closures`: the reference F_ref and the separate critic F_φ handed to ``apex``;
- :mod:`~apexctl.training.optim`: the optimizer and the LR schedule;
- :mod:`~apexctl.training.hardware`: the Accelerator, the world-size checks and the few collectives;
- :mod:`~apexctl.training.checkpoint` (+ :mod:`~apexctl.training.lock`, :mod:`~apexctl.training.fsdp`): what an
  exact resume needs, written atomically, pruned atomically, read back newest-loadable-first;
- :mod:`~apexctl.training.metrics`: ``metrics.jsonl`` and ``run.json`` (wall time);
- :mod:`~apexctl.training.trackers`: tensorboard, wandb, mlflow or trackio through accelerate's trackers;
- :mod:`~apexctl.training.grids`: the fixed-seed sample grids;
- :mod:`~apexctl.training.loop`: :func:`~apexctl.training.loop.train`, which strings them together.
"""
