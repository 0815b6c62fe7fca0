"""Loss curves as server-side SVG: no chart library, no JavaScript."""

import math

WIDTH, HEIGHT = 640, 240
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP, MARGIN_RIGHT = 48, 28, 12, 12


def _ticks(low, high, count=4):
    if high == low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def loss_chart(metrics):
    """Plot coordinates for train and eval loss by step; None when there is nothing to draw."""
    train = [(m.step, m.train_loss) for m in metrics if m.train_loss is not None and math.isfinite(m.train_loss)]
    evals = [(m.step, m.eval_loss) for m in metrics if m.eval_loss is not None and math.isfinite(m.eval_loss)]
    points = train + evals
    if not points:
        return None
    max_step = max(step for step, _ in points) or 1
    low = min(loss for _, loss in points)
    high = max(loss for _, loss in points)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(step):
        return MARGIN_LEFT + plot_w * step / max_step

    def y(loss):
        return MARGIN_TOP + plot_h * (1 - (loss - low) / (high - low))

    def polyline(series):
        return " ".join(f"{x(step):.1f},{y(loss):.1f}" for step, loss in series)

    return {
        "width": WIDTH,
        "height": HEIGHT,
        "train": polyline(train),
        "eval": polyline(evals),
        "eval_points": [{"x": f"{x(s):.1f}", "y": f"{y(v):.1f}"} for s, v in evals],
        "y_ticks": [{"y": f"{y(v):.1f}", "label": f"{v:.3g}"} for v in _ticks(low, high)],
        "x_ticks": [{"x": f"{x(v):.1f}", "label": f"{v:.0f}"} for v in _ticks(0, max_step)],
        "plot_left": MARGIN_LEFT,
        "plot_right": WIDTH - MARGIN_RIGHT,
        "plot_bottom": HEIGHT - MARGIN_BOTTOM,
        "last_train": train[-1][1] if train else None,
    }
