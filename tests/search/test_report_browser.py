"""Reports render in a real headless Chromium: the numbers and next steps are in the DOM, the plots drew,
and the plots' tick labels are apart (matplotlib's text extents, before the page is written)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.task import Task
from slimkit.prune.channels import Channels
from slimkit.report import Report
from slimkit.report.html import pyplot_or_none
from slimkit.report.readable_axes import overlapping_tick_labels
from slimkit.search.optimize import optimize

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
#: Appended to a copy of the page: once loaded, every image says how wide it decoded (0 = broken).
PROBE = ("<script>window.addEventListener('load', () => document.querySelectorAll('img').forEach("
         "i => i.setAttribute('data-drawn', String(i.naturalWidth))));</script>")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed: `make test` installs Debian's chromium package")
    return found


def _browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _drawn_widths(text: str) -> list[int]:
    return [int(w) for w in re.findall(r'data-drawn="(\d+)"', text)]


def _screenshot_colors(page: Path, tmp_path: Path) -> list[tuple[int, tuple[int, int, int]]]:
    shot = tmp_path / "page.png"
    run = _browse(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-1500:]
    from PIL import Image

    return Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or []


@pytest.mark.slow
def test_report_page_with_axes_pruning_and_next_steps(tmp_path):
    """A report page built from a pruned model: readable axes, the widths view and the next steps, in Chromium."""
    _chromium()
    plt = pyplot_or_none()
    if plt is None:
        pytest.skip("matplotlib (the report extra) is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    task = Task(name="digits", model=model, example=(torch.randn(4, 16),), metric=None, eval=None)
    before = copy.deepcopy(model)
    pruned = Channels(amount=0.5, round_to=None).apply_to(model, task)
    out = tmp_path / "run"
    sk.save(pruned, out / "model")
    (out / "recipe.yaml").write_text("steps: []\n")

    r = Report("report page", data={"task": "digits"})
    r.describe_run(before, pruned)
    fig, ax = plt.subplots(figsize=(6, 3))  # the Pareto panel's artifact-MB axis: a log axis under a decade
    ax.scatter([0.012, 0.03, 0.05, 0.09, 0.1664], [0.90, 0.95, 0.97, 0.99, 0.997])
    ax.set_xscale("log")
    ax.set_xlabel("artifact MB")
    r.figure(fig, "candidates")
    assert overlapping_tick_labels(fig) == []
    r.histogram("output error", {"0": torch.randn(500).tolist(), "2": (2 * torch.randn(500)).tolist()}, "error")
    page = tmp_path / "probe.html"
    page.write_text(r.write(out).read_text() + PROBE)

    dom = _browse(page, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-1500:]
    text = dom.stdout
    assert "Pruned widths and sparsity per layer" in text and "<td>0</td><td>Linear</td><td>32</td><td>16</td>" in text
    assert f'slimkit.load("{out}/model")' in text.replace("&quot;", '"')
    assert f"slimkit apply {out}/recipe.yaml --task digits" in text
    widths = _drawn_widths(text)
    assert len(widths) == text.count("<img") == 3 and min(widths) > 100  # every plot decoded
    colors = _screenshot_colors(page, tmp_path)
    assert len(colors) > 200                                             # not a blank page
    assert sum(n for n, (r_, g, b) in colors if b > 150 and r_ < 90 and 90 < g < 150) > 500  # the plots drew


@pytest.mark.slow
def test_report_renders_numbers_and_plots(digits_task, tmp_path, one_thread):
    base_mb = sk.profile(digits_task.model, digits_task.example).artifact_bytes / 1e6
    target = sk.Target(max_size_mb=base_mb * 0.4, max_drop=0.03, threads=1)
    result = optimize(digits_task, target, trials=4, out=tmp_path / "run", technique_names=["magnitude", "int8"],
                      progress=False)
    assert result.best is not None, result.hints
    data = json.loads((tmp_path / "run" / "report.json").read_text())

    page = tmp_path / "probe.html"
    page.write_text((tmp_path / "run" / "report.html").read_text() + PROBE)
    dom = _browse(page, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-1500:]
    text = dom.stdout
    # the table holds the numbers the JSON twin holds
    best = data["search"]["best"]
    assert f"#{best['number']}" in text or str(best["number"]) in text
    for value in (result.baseline.score, result.best.measured.score):
        assert f"{value:.4f}" in text
    assert "Pareto front" in text and "Environment" in text and "Int8" in text
    for why in (best["measured"].get("runtime_skipped") or {}).values():  # layers the runtime kept in float
        assert why in text
    assert "max_size_mb: " in text                                     # the saved recipe, target included
    assert "<th>metric change</th>" in text and "Next steps" in text
    run_dir = tmp_path / "run"
    assert f'slimkit.load("{run_dir}/best")' in text.replace("&quot;", '"')
    assert f"slimkit apply {run_dir}/recipe.yaml --task digits" in text and f"slimkit report {run_dir}" in text
    if any(step["type"].startswith("prune.") for step in best["recipe"]):   # pruned: its sparsity is shown
        assert "Sparsity of the best model per layer" in text or "Pruned widths and sparsity" in text
    widths = [int(w) for w in re.findall(r'data-drawn="(\d+)"', text)]
    images = text.count("<img")
    assert images >= 3 and len(widths) == images and min(widths) > 100   # every plot decoded

    shot = tmp_path / "page.png"
    run = _browse(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-1500:]
    from PIL import Image

    pixels = Image.open(shot).convert("RGB")
    colors = pixels.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 200                                            # not a blank page
    plot_blue = sum(n for n, (r, g, b) in colors if b > 150 and r < 90 and 90 < g < 150)  # matplotlib's first colour
    assert plot_blue > 500                                              # the plots drew on screen
