"""Line charts as inline SVG, drawn on the server from a workspace's metric points.

No chart library and no script: a few <polyline>s with axes and labels. Colours and
strokes come from classes in den.css (the page's CSP allows no inline style).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 14, 30  # room for the axes' labels
X_TICKS = 4
Y_TICKS = 4


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[datetime, float]]


def nice_max(value: float) -> float:
    """The axis top: ``value`` rounded up to 1, 2, 2.5 or 5 times a power of ten."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1.0, 2.0, 2.5, 5.0):
        if value <= m * power:
            return float(m * power)
    return float(10 * power)


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def line_chart(
    title: str,
    series: Sequence[Series],
    start: datetime,
    end: datetime,
    fmt: Callable[[float], str],
    chart_id: str,
) -> Markup:
    """An SVG chart of ``series`` between ``start`` and ``end``; "no samples yet" when
    there is nothing to draw."""
    if not any(s.points for s in series):
        return Markup('<p class="no-samples">{}: no samples yet</p>').format(title)
    span = max((end - start).total_seconds(), 1.0)
    top = nice_max(max(v for s in series for _, v in s.points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        frac = min(max((at - start).total_seconds() / span, 0.0), 1.0)
        return LEFT + frac * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - min(max(v / top, 0.0), 1.0) * plot_h

    title_id = f"{chart_id}-title"
    out = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{escape(title_id)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
    ]
    for i in range(Y_TICKS + 1):
        value = top * i / Y_TICKS
        yy = y(value)
        out.append(
            f'<line class="grid" x1="{LEFT}" y1="{yy:.1f}" x2="{WIDTH - RIGHT}" y2="{yy:.1f}"/>'
        )
        out.append(
            f'<text class="tick" x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
    for i in range(X_TICKS + 1):
        at = start + timedelta(seconds=span * i / X_TICKS)
        xx = x(at)
        anchor = "start" if i == 0 else "end" if i == X_TICKS else "middle"
        out.append(
            f'<text class="tick" x="{xx:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
            f"{at:%H:%M}</text>"
        )
    bottom = TOP + plot_h
    out.append(f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}"/>')
    out.append(f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}"/>')
    for n, s in enumerate(series, start=1):
        pts = [(x(at), y(v)) for at, v in s.points]
        if len(pts) == 1:  # one sample: a dot, a line needs two
            px, py = pts[0]
            out.append(f'<circle class="series s{n}" cx="{px:.1f}" cy="{py:.1f}" r="3"/>')
        else:
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            out.append(f'<polyline class="series s{n}" fill="none" points="{coords}"/>')
        if len(series) > 1:  # a legend says which line is which
            lx = LEFT + 10 + (n - 1) * 110
            out.append(f'<rect class="key s{n}" x="{lx}" y="{TOP + 2}" width="12" height="4"/>')
            out.append(f'<text class="legend" x="{lx + 16}" y="{TOP + 8}">{escape(s.label)}</text>')
    out.append("</svg>")
    return Markup("\n".join(out))


# -- the units of den's metrics -----------------------------------------------------------------


def cores(v: float) -> str:
    return _num(v)


def mib(v: float) -> str:
    return f"{_num(v)} MiB"


def rate(v: float) -> str:
    """Bytes per second, in the largest unit under 1024."""
    for unit in ("B/s", "KiB/s", "MiB/s"):
        if v < 1024:
            return f"{_num(v)} {unit}"
        v /= 1024
    return f"{_num(v)} GiB/s"
