"""The search report renders in a real headless Chromium: the numbers are in the DOM and the plots drew."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import slimkit as sk
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
