"""Tick labels that do not run into each other, checked with the renderer's own text extents.

A log axis spanning less than a decade labels its minor ticks (``2x10^-2 3x10^-2 ...``), and at
report sizes those labels overlap into one unreadable string; long layer names do the same on a
category axis. Every figure of a report goes through :func:`make_readable` before it is saved:
whatever still overlaps after plain-number labels, fewer ticks and rotation is thinned.
"""

from __future__ import annotations

from typing import Any

#: Pixels two label boxes may share before they count as overlapping (anti-aliased edges touch).
SLACK_PX = 1.0


def overlapping_tick_labels(fig: Any) -> list[tuple[str, str]]:
    """Pairs of visible tick labels (same axis) whose drawn boxes overlap, as their texts."""
    renderer = _drawn(fig)
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            pairs += _overlaps(axis, renderer)
    return pairs


def make_readable(fig: Any) -> None:
    """Change each axis whose tick labels overlap until none do (see the module docstring)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # optional: report extra

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not _still_overlaps(fig, axis):
                continue
            axis.set_minor_formatter(NullFormatter())
            if axis.get_scale() == "log":
                for subs in ((1.0, 2.0, 5.0), (1.0,)):
                    axis.set_major_locator(LogLocator(base=10, subs=subs))
                    axis.set_major_formatter(plain)
                    if not _still_overlaps(fig, axis):
                        break
            elif axis.get_scale() == "linear" and not _is_category(axis):
                for bins in (6, 4, 3):
                    if not _still_overlaps(fig, axis):
                        break
                    axis.set_major_locator(MaxNLocator(nbins=bins))
            if _still_overlaps(fig, axis) and axis is ax.xaxis:
                for label in axis.get_ticklabels():
                    label.set_rotation(30)
                    label.set_horizontalalignment("right")
            step = 2
            while _still_overlaps(fig, axis) and step <= 64:
                for i, label in enumerate(axis.get_ticklabels()):
                    label.set_visible(i % step == 0)
                step *= 2


def _still_overlaps(fig: Any, axis: Any) -> bool:
    return bool(_overlaps(axis, _drawn(fig)))


def _drawn(fig: Any) -> Any:
    """Draw ``fig`` and return its renderer (a closed figure gets an Agg canvas again)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: report extra

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlaps(axis: Any, renderer: Any) -> list[tuple[str, str]]:
    labels = [t for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
              if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    found = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)  # shared width, px
            h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)  # shared height, px
            if w > SLACK_PX and h > SLACK_PX:
                found.append((a, b))
    return found


def _is_category(axis: Any) -> bool:
    """A bar plot's axis of names: its ticks are fixed positions; thinning, not a new locator, applies."""
    from matplotlib.ticker import FixedLocator  # optional: report extra

    return isinstance(axis.get_major_locator(), FixedLocator)
