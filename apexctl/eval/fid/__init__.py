"""Fréchet Inception Distance: the Inception feature extractor, the Fréchet distance, and the ``eval fid`` run."""
