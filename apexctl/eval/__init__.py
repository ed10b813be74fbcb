"""Evaluation, one subpackage per protocol: geneval, fid, clip, the toy judges (digits, scenes), report; the image sets they share (docs/design.md §8)."""
