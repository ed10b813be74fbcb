"""Training curves as inline SVG line charts (no plotting dependency; crisp at any zoom, text stays searchable).

A chart shows one metric against the step: the logged values as a faint line and, when there are more than 20
points, an exponential moving average ``s_i = α·s_{i−1} + (1 − α)·y_i`` (α = 0.9, debiased by ``1 − α^i`` as in
TensorBoard) as the solid line. Axis ticks are "nice" numbers (1, 2 or 5 × 10^k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

SMOOTH = 0.9
WIDTH, HEIGHT = 420, 240
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 26, 30  # plot-area margins (px)
COLOR = "#1f6fb4"


def nice_ticks(lo: float, hi: float, n: int = 5, outward: bool = False) -> list[float]:
    """About ``n`` round tick values inside [lo, hi], or from just below ``lo`` to just above ``hi`` (``outward``)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:  # a constant series (e.g. a fixed lr): a small band around it
        d = abs(lo) * 0.05 or 1.0
        lo, hi = lo - d, hi + d
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = (math.floor if outward else math.ceil)(lo / step - 1e-9) * step
    last = (math.ceil if outward else math.floor)(hi / step + 1e-9) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)]


def ema(values: Sequence[float], alpha: float = SMOOTH) -> list[float]:
    """Debiased exponential moving average (see the module docstring)."""
    out, s = [], 0.0
    for i, v in enumerate(values, 1):
        s = alpha * s + (1 - alpha) * v
        out.append(s / (1 - alpha**i))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


def line_chart(steps: Sequence[float], values: Sequence[float], title: str) -> str:
    """An SVG chart of ``values`` against ``steps`` (non-finite points are dropped); '' when nothing is left."""
    pts = [(float(x), float(y)) for x, y in zip(steps, values, strict=True) if math.isfinite(y) and math.isfinite(x)]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:  # a single logged step: give the axis some width
        x1 = x0 + 1
    yt = nice_ticks(min(ys), max(ys), outward=True)  # the y axis spans whole ticks
    y0, y1 = yt[0], yt[-1]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    def poly(yv: Sequence[float], style: str) -> str:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, yv, strict=True))
        return f'<polyline fill="none" {style} points="{coords}"/>'

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="10">',
        f"<title>{escape(title)}</title>",
        f'<text x="{WIDTH / 2}" y="15" text-anchor="middle" font-size="12" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in yt:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{py(t) + 3:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in nice_ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 3}" text-anchor="middle">step</text>')
    if len(pts) > 20:
        parts.append(poly(ys, f'stroke="{COLOR}" stroke-opacity="0.25" stroke-width="1"'))
        parts.append(poly(ema(ys), f'stroke="{COLOR}" stroke-width="1.8"'))
    else:
        parts.append(poly(ys, f'stroke="{COLOR}" stroke-width="1.8"'))
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{COLOR}"/>' for x, y in pts]
    parts.append("</svg>")
    return "\n".join(parts)


PALETTE = ("#1f6fb4", "#d6452b", "#2c9a48", "#8a4fbf", "#e08e0b", "#555555", "#17a2b8", "#b5179e")


def series_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str = "",
    log_x: bool = False,
) -> str:
    """Several named (x, y) series with markers and a legend, e.g. accuracy against sampling steps per method.

    ``log_x`` spaces x by log2 (1, 2, 4 … 50 steps). Non-finite points are dropped; '' when nothing is left."""
    clean = {
        name: [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        for name, (xs, ys) in series.items()
    }
    clean = {k: sorted(v) for k, v in clean.items() if v}
    if not clean:
        return ""
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    xs = sorted({x for pts in clean.values() for x, _ in pts})
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = fx(xs[0]), fx(xs[-1])
    if x1 <= x0:
        x1 = x0 + 1
    yt = nice_ticks(min(ys), max(ys), outward=True)
    y0, y1 = yt[0], yt[-1]
    width, legend_w = WIDTH + 60, 150
    pw, ph = width - LEFT - RIGHT - legend_w, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (fx(x) - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
        f'viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="10">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT + pw / 2}" y="15" text-anchor="middle" font-size="12" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in yt:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{py(t) + 3:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for x in xs if log_x else nice_ticks(xs[0], xs[-1]):
        parts.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_fmt(x)}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 3}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        parts.append(
            f'<text x="12" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {TOP + ph / 2})">'
            f"{escape(ylabel)}</text>"
        )
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        ly = TOP + 8 + 14 * i
        lx = LEFT + pw + 10
        parts.append(f'<line x1="{lx}" x2="{lx + 16}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{lx + 20}" y="{ly + 3}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
