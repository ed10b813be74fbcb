"""CLIP: the model wrapper, CLIP score, and the ``eval clip-score`` run."""
