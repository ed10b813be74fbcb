"""Evaluation: the digits judge (`digits`), and GenEval / FID / CLIP score for real models (DESIGN §8)."""
