"""Loss curves as server-side SVG: no chart library, no JavaScript.

`loss_chart` draws one job's train and eval loss (the job page); `overlay_chart` draws one
curve per run on shared axes (the Compare page). Both return plot coordinates for a template.
"""

import math

WIDTH, HEIGHT = 640, 240
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP, MARGIN_RIGHT = 48, 28, 12, 12
# More points than the plot is wide only makes the page heavier, and it is sent every 2 s while jobs run.
MAX_POINTS_PER_LINE = 500
# Series colours come from CSS classes series-0 … series-7 (static/tunedeck.css).
SERIES_COLOURS = 8


def _ticks(low, high, count=4):
    if high == low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def _finite(points):
    return [(x, y) for x, y in points if x is not None and y is not None and math.isfinite(y)]


def _thinned(points):
    """At most MAX_POINTS_PER_LINE points, evenly spread, the last one always kept."""
    if len(points) <= MAX_POINTS_PER_LINE:
        return points
    stride = math.ceil(len(points) / MAX_POINTS_PER_LINE)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else kept + [points[-1]]


def _compact(number):
    """An axis label: 950, 12k, 1.5M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= size:
            return f"{number / size:.3g}{suffix}"
    return f"{number:.0f}"


class _Axes:
    """Scales from data to SVG coordinates, x from 0 to the largest x, y over the range of the values."""

    def __init__(self, points, x_label=lambda x: f"{x:.0f}"):
        self.max_x = max(x for x, _ in points) or 1
        self.low = min(y for _, y in points)
        self.high = max(y for _, y in points)
        if self.high - self.low < 1e-9:
            self.low, self.high = self.low - 0.5, self.high + 0.5
        self.plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
        self.plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
        self.x_label = x_label

    def x(self, value):
        return MARGIN_LEFT + self.plot_w * value / self.max_x

    def y(self, value):
        return MARGIN_TOP + self.plot_h * (1 - (value - self.low) / (self.high - self.low))

    def polyline(self, points):
        return " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in _thinned(points))

    def markers(self, points):
        return [{"x": f"{self.x(x):.1f}", "y": f"{self.y(y):.1f}"} for x, y in _thinned(points)]

    def frame(self):
        return {
            "width": WIDTH,
            "height": HEIGHT,
            "y_ticks": [{"y": f"{self.y(v):.1f}", "label": f"{v:.3g}"} for v in _ticks(self.low, self.high)],
            "x_ticks": [{"x": f"{self.x(v):.1f}", "label": self.x_label(v)} for v in _ticks(0, self.max_x)],
            "plot_left": MARGIN_LEFT,
            "plot_right": WIDTH - MARGIN_RIGHT,
            "plot_bottom": HEIGHT - MARGIN_BOTTOM,
        }


def loss_chart(metrics):
    """Plot coordinates for train and eval loss by step; None when there is nothing to draw."""
    train = _finite((m.step, m.train_loss) for m in metrics)
    evals = _finite((m.step, m.eval_loss) for m in metrics)
    if not train and not evals:
        return None
    axes = _Axes(train + evals)
    return axes.frame() | {
        "train": axes.polyline(train),
        "eval": axes.polyline(evals),
        "eval_points": axes.markers(evals),
        "last_train": train[-1][1] if train else None,
    }


def overlay_chart(series, markers=False):
    """One line per run on shared axes: `series` is [(name, [(x, y), ...]), ...] in legend order.

    A run keeps its colour class (series-N, by its place in `series`) even when another run has
    no points, so the table's column keys and every chart agree. None when no run has a point.
    Markers (a dot per point) suit sparse curves such as eval loss, measured a few times a run.
    """
    series = [(index, name, _finite(points)) for index, (name, points) in enumerate(series)]
    drawn = [(index, name, points) for index, name, points in series if points]
    if not drawn:
        return None
    axes = _Axes([point for _, _, points in drawn for point in points], x_label=_compact)
    return axes.frame() | {
        "series": [
            {
                "name": name,
                "colour": f"series-{index % SERIES_COLOURS}",
                "points": axes.polyline(points),
                "markers": axes.markers(points) if markers else [],
            }
            for index, name, points in drawn
        ],
    }
