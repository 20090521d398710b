"""A self-contained HTML report (tables + inline PNG plots) written atomically next to its JSON."""

from __future__ import annotations

import base64
import dataclasses
import html
import io as _io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.atomic import atomic_write

_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666}"""


@dataclasses.dataclass
class Report:
    """Sections of tables, plots and notes; ``write(dir)`` emits ``report.json`` and ``report.html``."""

    title: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    _parts: list[str] = dataclasses.field(default_factory=list)

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self._parts.append(f"<p class='note'>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self._parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def histogram(self, title: str, series: dict[str, Sequence[float]], xlabel: str, bins: int = 80) -> None:
        """Overlaid histograms (log counts), e.g. quantization error of the worst layers."""
        plt = pyplot_or_none()
        if plt is None:
            self.note(f"[plot '{title}' skipped: matplotlib is not installed; pip install 'slimkit[report]']")
            return
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for name, values in series.items():
            ax.hist(list(values), bins=bins, alpha=0.5, label=name, log=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count (log)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        self._figure(fig, title)

    def bar_plot(self, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], xlabel: str) -> None:
        """Horizontal grouped bars, one group per label (e.g. per-layer share of MACs/params/time)."""
        plt = pyplot_or_none()
        if plt is None:
            self.note(f"[plot '{title}' skipped: matplotlib is not installed; pip install 'slimkit[report]']")
            return
        n = len(labels)
        fig, ax = plt.subplots(figsize=(8, 0.35 * n * max(1, len(series)) / 1.5 + 1.2))
        height = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            ax.barh([i + k * height for i in range(n)], values, height=height, label=name)
        ax.set_yticks([i + height * (len(series) - 1) / 2 for i in range(n)], labels=list(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        self._figure(fig, title)

    def pre(self, text: str) -> None:
        """Preformatted text, e.g. a recipe's YAML."""
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def image(self, path: str | os.PathLike[str], title: str) -> None:
        """Embed a PNG written by another plotter (inline, so the page stays self-contained)."""
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self._parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")

    def figure(self, fig: Any, title: str) -> None:
        """Embed a matplotlib figure (and close it)."""
        self._figure(fig, title)

    def _figure(self, fig: Any, title: str) -> None:
        import matplotlib.pyplot as plt  # optional (matplotlib, extra 'report'): imported when used

        fig.tight_layout()
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self._parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,"
                           f"{base64.b64encode(buf.getvalue()).decode()}'>")

    def html(self) -> str:
        return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style><h1>{html.escape(self.title)}</h1>" + "\n".join(self._parts))

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``report.json`` and ``report.html`` atomically; returns the HTML path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "report.json", json.dumps(self.data, indent=2, default=str))
        _atomic_write(out / "report.html", self.html())
        return out / "report.html"


def pyplot_or_none() -> Any:
    """matplotlib's pyplot on the Agg canvas, or None where matplotlib (the ``report`` extra) is missing."""
    try:
        import matplotlib  # optional (matplotlib, extra 'report'): imported when used

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional (matplotlib, extra 'report'): imported when used
    except ImportError:
        return None
    return plt


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _atomic_write(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))
