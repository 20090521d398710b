"""A self-contained HTML report (tables + inline PNG plots) written atomically next to its JSON.

Given the run's models (:meth:`Report.describe_run`), the report names layers with their types,
shows the kernels of the runtime the model ran on, and adds what pruning left of each layer when
no step's section showed it; written into a run directory, it ends with the commands to load,
export and replay the result (``report.next_steps``).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io as _io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.atomic import atomic_write
from slimkit.report.metric_change import METRIC_CHANGE, change_text
from slimkit.report.next_steps import next_steps
from slimkit.report.pruned_view import LayerShape, layer_types, pruned_layers, widths_figure
from slimkit.report.readable_axes import make_readable

_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666}
pre{background:#f6f6f6;padding:6px 8px;overflow-x:auto}"""
#: Headings that already show widths or sparsity (a pruning step's own section); the view is then not repeated.
_PRUNE_HEADINGS = ("width", "sparsity")
#: A first column holding module names ("layer", "attention", "folded into"...), whose types are added.
_LAYER_COLUMN = re.compile(r"layer|attention|folded|module", re.IGNORECASE)


@dataclasses.dataclass
class Report:
    """Sections of tables, plots and notes; ``write(dir)`` emits ``report.json`` and ``report.html``."""

    title: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    _parts: list[str] = dataclasses.field(default_factory=list)
    #: module name -> class name: layer names in tables and plots are shown with their types
    layer_types: dict[str, str] = dataclasses.field(default_factory=dict)
    runtime: str = "torch"
    #: module name -> the runtime's kernel (ONNX Runtime op type) when the model ran outside torch
    runtime_kernels: dict[str, str] | None = None
    _pruned: list[LayerShape] = dataclasses.field(default_factory=list)
    _headings: list[str] = dataclasses.field(default_factory=list)
    _profile: tuple[str, list[Any]] | None = None  # (candidate, breakdown rows), shown near the end

    def describe_run(self, before: Any, after: Any, runtime: str = "torch",
                     kernels: dict[str, str] | None = None) -> None:
        """The original and final models (layer types, pruned widths) and the runtime the final one ran on,
        with its per-layer kernels (``OrtModel.layer_kernels``) when that is not torch."""
        self.layer_types = layer_types(before, after)
        self._pruned = pruned_layers(before, after) if before is not None and after is not None else []
        self.runtime = runtime
        self.runtime_kernels = dict(kernels) if kernels is not None and runtime != "torch" else None
        if self.runtime_kernels is not None:
            self.data["layer_kernels"] = {"runtime": runtime, "layers": self.runtime_kernels}

    def layer_profile(self, candidate: str, rows: Sequence[Any], top: int = 15) -> None:
        """Where ``candidate``'s time goes (``measure.LayerRow`` rows, a transformer's by block part), shown
        after the sections of the steps: the ``top`` rows by time and one bar plot of the shares."""
        self._profile = (candidate, sorted(rows, key=lambda r: -r.time_share)[:top])

    def label(self, name: str) -> str:
        """``'3'`` -> ``'3 (Conv2d)'`` for a module of the described models; anything else unchanged."""
        kind = self.layer_types.get(name) if isinstance(name, str) else None
        return f"{name} ({kind})" if kind else name

    def heading(self, text: str) -> None:
        self._headings.append(text)
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self._parts.append(f"<p class='note'>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Rows under ``header``; a first column of layers gets their types (unless a column says the type),
        a ``kernel`` column names the kernels of the runtime the model ran on."""
        header, rows = list(header), [list(row) for row in rows]
        if rows and header and _LAYER_COLUMN.search(str(header[0])) and "type" not in header:
            for row in rows:
                row[0] = self.label(row[0])
        if METRIC_CHANGE in header:  # signed, as the console prints it
            col = header.index(METRIC_CHANGE)
            for row in rows:
                row[col] = change_text(row[col]) if isinstance(row[col], (int, float)) else row[col]
        if "kernel" in header and self.runtime_kernels is not None:
            col = header.index("kernel")
            header[col] = f"kernel on {self.runtime}"
            for row, name in zip(rows, (r[0] for r in rows)):
                layer = name.split(" (")[0] if isinstance(name, str) else name
                row[col] = self.runtime_kernels.get(layer, "float (kept out of the integer graph)")
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self._parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def histogram(self, title: str, series: dict[str, Sequence[float]], xlabel: str, bins: int = 80) -> None:
        """Histograms (log counts) on shared bins, drawn as outlines so that none hides another,
        e.g. the quantization error of the worst layers."""
        plt = pyplot_or_none()
        if plt is None:
            self.note(f"[plot '{title}' skipped: matplotlib is not installed; pip install 'slimkit[report]']")
            return
        fig = histogram_figure(plt, title, {self.label(name): v for name, v in series.items()}, xlabel, bins)
        self._figure(fig, title)

    def bar_plot(self, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], xlabel: str) -> None:
        """Horizontal grouped bars, one group per label (e.g. per-layer share of MACs/params/time)."""
        plt = pyplot_or_none()
        if plt is None:
            self.note(f"[plot '{title}' skipped: matplotlib is not installed; pip install 'slimkit[report]']")
            return
        labels = [self.label(name) for name in labels]
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
        make_readable(fig)  # tick labels that overlap are thinned, rotated or relabelled
        fig.tight_layout()
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self._parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,"
                           f"{base64.b64encode(buf.getvalue()).decode()}'>")

    def html(self, out_dir: str | os.PathLike[str] | None = None) -> str:
        """The page; with ``out_dir`` (the run directory) it ends with the commands for what to do next."""
        tail = Report(self.title, layer_types=self.layer_types)
        if self._profile is not None:
            tail._per_layer(*self._profile)
        if self._pruned and not any(w in h.lower() for h in self._headings for w in _PRUNE_HEADINGS):
            tail.pruning_view(self._pruned)
        steps = (next_steps(Path(out_dir), self.data.get("task"), _onnx_note(self.data), search="search" in self.data)
                 if out_dir else [])
        top = ""
        if steps:
            top = "<p class='note'><a href='#next-steps'>Next steps</a>: load, export and replay this result.</p>"
            tail._parts.append("<h2 id='next-steps'>Next steps</h2>")
            tail._parts += [f"<p>{html.escape(what)}:</p><pre>{html.escape(cmd)}</pre>" for what, cmd in steps]
        return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style><h1>{html.escape(self.title)}</h1>{top}"
                + "\n".join(self._parts + tail._parts))

    def _per_layer(self, candidate: str, rows: list[Any]) -> None:
        self.heading(f"Where the time goes: {candidate}, per layer")
        self.table(["layer", "type", "time ms", "time %", "MACs %", "params %"],
                   [[r.name, r.kind, r.time_ms, 100 * r.time_share, 100 * r.macs_share, 100 * r.params_share]
                    for r in rows])
        self.note("From forward hooks, median of a few runs on the torch model; a transformer is shown per block part "
                  "(attention, MLP, norm, rest), the embeddings and the head. (other): time in no layer's code.")
        labels = [r.name if r.kind == "-" else f"{r.name} ({r.kind})" for r in rows]
        self.bar_plot("share of the time per layer", labels,
                      {"time %": [100 * r.time_share for r in rows]}, "% of the forward pass")

    def pruning_view(self, rows: Sequence[LayerShape]) -> None:
        """Output width kept and zero weights per pruned layer: a table and one bar plot."""
        self.heading("Pruned widths and sparsity per layer")
        self.table(["layer", "type", "width before", "width after", "width kept", "sparsity"],
                   [[r.name, r.kind, r.width_before, r.width_after, r.kept, r.sparsity] for r in rows])
        plt = pyplot_or_none()
        if plt is None:
            self.note("[plot skipped: matplotlib is not installed; pip install 'slimkit[report]']")
            return
        self._figure(widths_figure(list(rows), plt), "pruned widths and sparsity")

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``report.json`` and ``report.html`` atomically; returns the HTML path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "report.json", json.dumps(self.data, indent=2, default=str))
        _atomic_write(out / "report.html", self.html(out))
        return out / "report.html"


def histogram_figure(plt: Any, title: str, series: dict[str, Sequence[float]], xlabel: str, bins: int) -> Any:
    """One figure of outlined histograms on bins shared by every series (log counts)."""
    import numpy as np  # numpy comes with torch

    values = {name: np.asarray(list(v), dtype=float) for name, v in series.items()}
    values = {name: v[np.isfinite(v)] for name, v in values.items()}
    pooled = np.concatenate(list(values.values()) or [np.zeros(1)])
    edges = np.histogram_bin_edges(pooled if pooled.size else np.zeros(1), bins=bins)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for k, (name, v) in enumerate(values.items()):
        ax.hist(v, bins=edges, histtype="step", linewidth=1.6, label=name, log=True,
                linestyle=("-", "--", "-.", ":")[k % 4])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def pyplot_or_none() -> Any:
    """matplotlib's pyplot on the Agg canvas, or None where matplotlib (the ``report`` extra) is missing."""
    try:
        import matplotlib  # optional (matplotlib, extra 'report'): imported when used

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional (matplotlib, extra 'report'): imported when used
    except ImportError:
        return None
    return plt


def _onnx_note(data: dict[str, Any]) -> str | None:
    """Why the run kept no ONNX file, when its data says so (``"none: <reason>"``)."""
    onnx = data.get("onnx")
    return onnx[len("none: "):] if isinstance(onnx, str) and onnx.startswith("none: ") else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _atomic_write(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))
