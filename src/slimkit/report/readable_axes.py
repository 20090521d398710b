"""Tick labels that do not run into each other, checked with the renderer's own text extents.

A log axis spanning less than a decade labels its minor ticks (``2x10^-2 3x10^-2 ...``), and at
report sizes those labels overlap into one unreadable string; long layer names do the same on a
category axis. Every figure of a report goes through :func:`make_readable` before it is saved:
whatever still overlaps after plain numbers on 1-2-5 ticks (log), short numbers and fewer ticks
(linear) and rotation (x) is thinned to every k-th label.
"""

from __future__ import annotations

from typing import Any

#: Pixels two label boxes may share before they count as overlapping (anti-aliased edges touch).
SLACK_PX = 1.0


def overlapping_tick_labels(fig: Any) -> list[tuple[str, str]]:
    """Pairs of visible tick labels (same axis) whose drawn boxes overlap, as their texts."""
    renderer = _laid_out(fig)
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            pairs += [(a, b) for a, b, _ in _overlaps(axis, renderer)]
    return pairs


def make_readable(fig: Any) -> None:
    """Change each axis whose tick labels overlap until none do (see the module docstring)."""
    from matplotlib.ticker import (  # optional: report extra
        EngFormatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter)

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    renderer = _laid_out(fig)
    crowded = [(ax, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) if _overlaps(axis, renderer)]
    for ax, axis in crowded:
        if any(t.get_text().strip() for t in axis.get_ticklabels(minor=True)):
            axis.set_minor_formatter(NullFormatter())
            renderer = _laid_out(fig)
        if axis.get_scale() == "log":  # plain numbers on 1-2-5 ticks, else on the decades
            for subs in ((1.0, 2.0, 5.0), (1.0,)):
                axis.set_major_locator(LogLocator(base=10, subs=subs))
                axis.set_major_formatter(plain)
                renderer = _laid_out(fig)
                if not _overlaps(axis, renderer):
                    break
        elif axis.get_scale() == "linear" and not _is_category(axis):
            for formatter in (None, EngFormatter(sep="")):  # as given, then short: 4000000 -> 4M
                if formatter is not None and _overlaps(axis, renderer):
                    axis.set_major_formatter(formatter)
                    renderer = _laid_out(fig)
                for bins in (6, 4, 3):
                    if not _overlaps(axis, renderer):
                        break
                    axis.set_major_locator(MaxNLocator(nbins=bins))
                    renderer = _laid_out(fig)
        for angle in (40, 90):
            if not (_overlaps(axis, renderer) and axis is ax.xaxis):
                break
            for label in axis.get_ticklabels():
                label.set_rotation(angle)
                label.set_horizontalalignment("right" if angle < 90 else "center")
            renderer = _laid_out(fig)
        _thin(axis, renderer)


def _thin(axis: Any, renderer: Any) -> None:
    """Show every k-th label, k the smallest that leaves no two shown labels overlapping (positions do not
    move when labels are hidden, so no new layout is needed)."""
    labels = shown_tick_labels(axis)
    boxes = [t.get_window_extent(renderer) for t in labels]
    if not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
        return
    for step in range(2, max(len(labels), 2) + 1):
        kept = boxes[::step]
        if not any(_overlap(a, b) for i, a in enumerate(kept) for b in kept[i + 1:]):
            break
    for i, label in enumerate(labels):
        label.set_visible(i % step == 0)


def _laid_out(fig: Any) -> Any:
    """Lay ``fig`` out (ticks placed, no pixels drawn) and return a renderer to measure text with
    (a closed figure gets an Agg canvas again)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: report extra

        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def shown_tick_labels(axis: Any) -> list[Any]:
    """The tick labels a reader sees on ``axis`` (visible, not empty, inside the view), in axis order."""
    along = 0 if axis.axis_name == "x" else 1
    low, high = sorted(axis.get_view_interval())
    labels = [t for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
              if t.get_visible() and t.get_text().strip() and low <= t.get_position()[along] <= high]
    return sorted(labels, key=lambda t: t.get_position()[along])


def _overlaps(axis: Any, renderer: Any) -> list[tuple[str, str, Any]]:
    labels = shown_tick_labels(axis)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [(a, b, None) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if _overlap(box_a, box_b)]


def _overlap(box_a: Any, box_b: Any) -> bool:
    w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)  # shared width, px
    h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)  # shared height, px
    return w > SLACK_PX and h > SLACK_PX


def _is_category(axis: Any) -> bool:
    """A bar plot's axis of names: its ticks are fixed positions; thinning, not a new locator, applies."""
    from matplotlib.ticker import FixedLocator  # optional: report extra

    return isinstance(axis.get_major_locator(), FixedLocator)
