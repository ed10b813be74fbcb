"""GenEval (djghosh13/geneval) as the reference scores it: prompts and metadata (``data/``, MIT), generation layout,
detector backends, per-image scoring rules, CLIP colour classification, the per-task report and the run."""
