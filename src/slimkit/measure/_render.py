"""Console rendering of a Profile with rich: a summary table and the heaviest layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from slimkit.measure.speed_ratio import MAX_CV, MAX_TAIL

if TYPE_CHECKING:
    from slimkit.measure.profile import Profile


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units, named as such)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """``1_920_000 -> '1.92 M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def render_profile(p: Profile, top: int = 10) -> Group:
    summary = Table(title=f"profile of {escape(p.model)}", show_header=False, title_justify="left")
    summary.add_column("measure", style="bold")
    summary.add_column("value")
    nonzero_pct = 100.0 * p.params_nonzero / p.params_total if p.params_total else 0.0
    lat = p.latency
    summary.add_row("inputs", escape(", ".join(p.inputs)))
    summary.add_row("device", f"{p.device}, {p.threads} thread(s), torch {p.torch_version}")
    per_param = p.artifact_bytes / p.params_total if p.params_total else 0.0
    summary.add_row("parameters", f"{p.params_total:,} ({p.params_nonzero:,} nonzero, {nonzero_pct:.1f}%; quantized "
                    "weights counted as the weights they stand for)")
    summary.add_row("artifact size", f"{human_bytes(p.artifact_bytes)} ({p.artifact_bytes:,} bytes on disk, "
                    f"{per_param:.2f} bytes/param)")
    summary.add_row("MACs", f"{human_count(p.macs)} ({human_count(p.flops)} FLOPs; matmuls, convs and attention "
                    "only: elementwise ops excluded)")
    noisy = " [yellow](noisy: other work on this machine)[/]" if lat.cv > MAX_CV or lat.p95_ms > MAX_TAIL * lat.p50_ms else ""
    summary.add_row("latency", f"p50 {lat.p50_ms:.3f} ms, p95 {lat.p95_ms:.3f} ms, cv {lat.cv:.2f}, {lat.runs} runs"
                    + noisy)
    summary.add_row("peak memory", human_bytes(p.peak_memory_bytes) + (
        " (a floor: oneDNN/BLAS scratch outside torch's allocator is not seen)" if p.device == "cpu" else ""))
    if p.roofline:  # CUDA: what the run achieved against the device's measured peaks
        r = p.roofline
        summary.add_row("roofline", f"{r['achieved_tflops']:.3g} TFLOP/s, {r['achieved_gbps']:.4g} GB/s: "
                        f"{100 * r['fraction_of_limit']:.1f}% of the {r['bound']}-bound limit (peaks "
                        f"{r['peak_tflops']:.4g} TFLOP/s, {r['peak_gbps']:.4g} GB/s, measured on this device)")
    summary.add_row("energy (estimate)", f"{p.energy_mj_estimate:.4g} mJ per inference")
    summary.add_row("", f"[dim]{escape(p.energy_note)}[/dim]")

    layers = Table(title=f"top {min(top, len(p.layers))} of {len(p.layers)} layers", title_justify="left")
    for col in ("layer", "type"):
        layers.add_column(col, overflow="fold")
    for col in ("params", "MACs", "time ms", "time%", "MACs%", "params%"):
        layers.add_column(col, justify="right", no_wrap=True)
    if p.roofline:
        for col in ("TFLOP/s", "GB/s (weights)", "% roofline"):
            layers.add_column(col, justify="right", no_wrap=True)
    for row in p.layers[:top]:
        cells = [escape(row.name or "(model)"), escape(row.kind), f"{row.params:,}", human_count(row.macs),
                 f"{row.time_ms:.3f}", f"{100 * row.time_share:.1f}", f"{100 * row.macs_share:.1f}",
                 f"{100 * row.params_share:.1f}"]
        layers.add_row(*cells, *(layer_roofline(p, row) if p.roofline else []))
    return Group(summary, layers)


def layer_roofline(p: Profile, row: Any) -> list[str]:
    """A layer's achieved TFLOP/s, GB/s of its weights (bytes in the model's own storage width) and the
    share of the device's roofline limit that time reaches."""
    r, ms = p.roofline or {}, row.time_ms
    if ms <= 0:
        return ["-", "-", "-"]
    flops, nbytes = 2.0 * row.macs, row.params * p.artifact_bytes / max(p.params_total, 1)
    limit_ms = max(flops / (r["peak_tflops"] * 1e9), nbytes / (r["peak_gbps"] * 1e6))
    return [f"{flops / ms / 1e9:.3g}", f"{nbytes / ms / 1e6:.4g}", f"{100 * limit_ms / ms:.1f}"]
