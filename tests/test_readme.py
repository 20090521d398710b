"""The README runs as written: its Python blocks execute in a fresh process, and every ``slimkit``
command line in README.md and docs/ parses against the real command-line interface."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from typer.main import get_command

from slimkit.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def command_lines(page: Path) -> list[str]:
    """``slimkit ...`` lines of the page's plain and shell code blocks, comments cut."""
    lines = []
    for lang in ("", "bash", "sh", "console"):
        for body in blocks(page, lang):
            for line in body.splitlines():
                line = re.sub(r"\s+#\s.*$", "", line.strip()).removeprefix("$ ")
                if line.startswith("slimkit "):
                    lines.append(line)
    return lines


LINES = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in command_lines(page)]


def test_the_pages_show_command_lines_at_all():
    assert len(LINES) >= 60 and sum(page == "README.md" for page, _ in LINES) >= 15


@pytest.mark.parametrize("page,line", LINES, ids=[f"{p}:{line[:60]}" for p, line in LINES])
def test_every_documented_command_line_parses(page: str, line: str):
    """Option names, choices and value types as the real CLI reads them (nothing runs)."""
    group = get_command(app)
    words = shlex.split(line.split(" | ")[0])[1:]
    # "..." stands for options shown elsewhere on the page; shell redirections are not options
    words = [w for w in words if w != "..." and not re.match(r"\d?>", w)]
    before = {opt: p for p in group.params for opt in p.opts}  # options before the command (--nproc 2)
    while words and words[0] in before:
        words = words[1 if before[words[0]].is_flag else 2:]
    name, *rest = words
    with click.Context(group, info_name="slimkit") as ctx:
        command = group.get_command(ctx, name)
        assert command is not None, f"{page}: no command {name!r} in {line!r}"
        try:
            command.make_context(name, rest, parent=ctx)
        except click.UsageError as err:
            pytest.fail(f"{page}: {line!r} does not parse: {err.format_message()}")


PYTHON = [(page.relative_to(ROOT).as_posix(), i, body) for page in PAGES for i, body in enumerate(blocks(page, "python"))]


@pytest.mark.parametrize("page,index,body", PYTHON, ids=[f"{p}:{i}" for p, i, _ in PYTHON])
def test_every_documented_python_block_compiles_and_names_real_slimkit_attributes(page: str, index: int, body: str):
    import importlib

    import slimkit

    compile(body, f"{page} block {index}", "exec")
    for dotted in re.findall(r"\bsk\.((?:[a-z_]+\.)*[A-Za-z_0-9]+)", body):  # sk.quantize.Int8, sk.apply, ...
        parts, obj = dotted.split("."), slimkit
        for part in parts:
            if not hasattr(obj, part):  # a subpackage not imported yet
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            else:
                obj = getattr(obj, part)


def run_block(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_own_task_block_trains_the_model_it_defines(tmp_path):
    own = next(b for b in blocks(ROOT / "README.md", "python") if "def make_task" in b)
    before, after = map(float, run_block(own, tmp_path).split()[-3::2])
    assert before < 0.5 and after >= 0.8  # a learnable toy task: argmax of the first four features


@pytest.mark.slow
def test_readme_python_block_runs_in_a_fresh_process(tmp_path):
    quickstart = next(b for b in blocks(ROOT / "README.md", "python") if "sk.zoo.load" in b)
    out = run_block(quickstart, tmp_path)
    assert "params" in out.lower()
    assert (tmp_path / "runs/digits/recipe.yaml").is_file() and (tmp_path / "runs/digits/mine").is_dir()


def readme_section_lines(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    return [line for lang, body in FENCE.findall(section) if lang == "" for line in command_lines_of(body)]


def command_lines_of(body: str) -> list[str]:
    return [re.sub(r"\s+#\s.*$", "", line.strip()) for line in body.splitlines() if line.startswith("slimkit ")]


#: Lines naming a server or files of the reader's own: their options are checked above, not run here.
TEMPLATE = re.compile(r"postgresql://USER|my-hf-model|my_pkg|net\.safetensors|some-inputs")


@pytest.mark.slow
def test_readme_command_line_section_runs_top_to_bottom(tmp_path, monkeypatch):
    """Each line of "Command line", as written, in order, in one fresh directory (later lines use earlier
    lines' output); every line must exit 0 and the files the README promises must be there. The lines run
    in this process through the real command group, which the installed ``slimkit`` script runs (checked
    first: a process startup per line would cost more than half a minute)."""
    from typer.testing import CliRunner

    script = subprocess.run([str(Path(sys.executable).parent / "slimkit"), "--version"], capture_output=True, text=True,
                            timeout=120)
    assert script.returncode == 0 and script.stdout.startswith("slimkit "), script.stdout + script.stderr

    lines = readme_section_lines("Command line")
    runnable = [line for line in lines if not TEMPLATE.search(line)]
    assert len(runnable) >= 12 and len(lines) - len(runnable) == 1
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    for line in runnable:
        done = CliRunner().invoke(app, shlex.split(line)[1:])
        assert done.exit_code == 0, f"{line}\n{done.output[-1500:]}\n{done.exception!r}"
        assert torch.get_num_threads() == threads, f"{line} left torch on another thread count"
    for promised in ("runs/digits/best", "runs/digits/recipe.yaml", "runs/digits/report.html", "runs/qat/model",
                     "runs/gradual/recipe.yaml", "runs/apply/model", "digits.onnx", "digits.onnx.json"):
        assert (tmp_path / promised).exists(), promised
