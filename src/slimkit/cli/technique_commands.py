"""The technique commands: ``quantize``, ``prune``, ``distill``, ``factorize`` and ``apply``.

Each turns its options into a recipe (presets and configs come from the technique registry) and
runs it through :func:`slimkit.pipeline.run.run_recipe`: the saved artifact's recipe always
replays to the saved model. ``apply`` reaches every registered technique:
``slimkit apply --step "quantize.QAT bits=4 weight_only=true" --task mnist``.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
import yaml

from slimkit.cli.app import _friendly, app
from slimkit.cli.out_guard import OVERWRITE
from slimkit.cli.run_summary import JSON, technique_summary
from slimkit.cli.task_options import DATA, DEFAULT_TASK, INPUT_SHAPE, METRIC, MODEL, TASK, WEIGHTS, load_task, task_spec
from slimkit.core.errors import SlimkitError

if TYPE_CHECKING:
    from slimkit.core.config import BaseConfig
    from slimkit.core.task import Task

# The techniques, the pipeline and torch are imported inside the command bodies (fast --help).
PRUNE_METHODS = ("channels", "magnitude", "nm")
FACTORIZE_METHODS = ("svd", "tucker", "cp")
SCHEDULES = ("one-shot", "gradual")
#: Evaluations during a command's recovery fine-tuning (the best-scoring weights are kept).
RECOVERY_EVALS = 5
#: command -> the word its report's title uses
TITLES = {"quantize": "quantization", "prune": "pruning", "distill": "distillation", "factorize": "factorization"}


def family_presets(family: str) -> dict[str, BaseConfig]:
    from slimkit.core.registry import all_presets

    return {name: config for name, (tech, config) in all_presets().items() if tech.family == family}


def parse_step(text: str) -> BaseConfig:
    """``"quantize.QAT bits=4 weight_only=true"`` (or a preset name such as ``int8-dynamic``) -> a config.

    Values are read as YAML (``4``, ``true``, ``null``, ``[a, b]``); unknown types and options are
    the registry's one-line errors.
    """
    from slimkit.core.config import BaseConfig
    from slimkit.core.registry import all_presets, technique_named
    from slimkit.pipeline.comparison import with_options

    parts = shlex.split(text)
    if not parts:
        raise SlimkitError("an empty --step", "write --step 'family.Name key=value ...'")
    head, options = parts[0], key_values(parts[1:], "--step option", "--step 'prune.Magnitude amount=0.5'")
    presets = all_presets()
    if head in presets:
        return with_options(presets[head][1], head, **options)
    return BaseConfig.from_dict({"type": technique_named(head).name, **options})


def key_values(parts: list[str], what: str, example: str) -> dict[str, Any]:
    """``["amount=0.5", "targets=[a, b]"]`` -> options; values are read as YAML."""
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SlimkitError(f"{what} {part!r} is not key=value", f"write e.g. {example}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SlimkitError(f"{what} {part!r} has a value that cannot be read", "quote it, e.g. key='a b'") from None
    return options


#: Any field of the command's technique config, by its own name: the config is the one list of options.
SET = typer.Option(None, "--set", help="any option of the technique's config as KEY=VALUE, repeatable "
                   "(`slimkit techniques` lists each config's options)")
EXCLUDE = typer.Option(None, help="comma-separated layer names (or one regex) to leave as they are, "
                       "e.g. the layer the report flags")


def layer_names(text: str | None) -> tuple[str, ...] | str | None:
    """``--exclude a,b`` -> ("a", "b"); a single regex stays a string."""
    if not text:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return names[0] if len(names) == 1 and any(c in names[0] for c in "*+?[(|\\") else names


def with_sets(cfg: BaseConfig, label: str, sets: list[str] | None) -> BaseConfig:
    """``cfg`` with the ``--set KEY=VALUE`` options applied (unknown keys name the config's options)."""
    from slimkit.pipeline.comparison import with_options

    return with_options(cfg, label, **key_values(sets or [], "--set", "--set group_size=64")) if sets else cfg


def _run(command: str, task: Task, steps: list[BaseConfig], out: Path, *, spec: str, as_json: bool,
         threads: int | None = None, **kwargs: Any) -> Optional[dict[str, Any]]:
    """Run the recipe; with ``--json``, the summary for stdout (the console line's numbers)."""
    from slimkit.core.progress import progress_shown
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.run import run_recipe

    title = f"slimkit {TITLES[command]} — {task.name}"
    with progress_shown(True):  # every long step of the command says what it is doing
        result = run_recipe(task, Recipe(steps=steps, task=spec), out, title=title, threads=threads, **kwargs)
    return technique_summary(command, task.name, result) if as_json else None


def _needs_training(task: Task, what: str, labels: bool = True) -> None:
    if not task.train or (labels and task.loss is None):
        raise SlimkitError(f"task {task.name!r} has no training data{' (train and loss)' if labels else ''} "
                           f"to {what} on", "give the Task train batches and a loss, or leave out the training step")


@app.command()
@_friendly
def quantize(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
             data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
             config: str = typer.Option("int8-dynamic", help="a quantization preset (slimkit techniques lists them)"),
             calibration: Optional[str] = typer.Option(None, help="static int8: minmax, percentile, entropy, mse"),
             percentile: Optional[float] = typer.Option(None, help="percentile for --calibration percentile"),
             granularity: Optional[str] = typer.Option(None, help="int8 weights: per_channel or per_tensor"),
             group_size: Optional[int] = typer.Option(None, help="weight-only: 0 (per channel), 32, 64, 128"),
             backend: Optional[str] = typer.Option(None, help="auto, onnxruntime or torch"),
             max_drop: Optional[float] = typer.Option(None, help="accuracy control: largest metric drop allowed"),
             embedding_bits: Optional[int] = typer.Option(None, help="embedding tables: 8 (default) or 4"),
             method: Optional[str] = typer.Option(None, help="w4 rounding: rtn (default) or gptq (calibrated)"),
             exclude: Optional[str] = EXCLUDE, sets: Optional[list[str]] = SET,
             threads: Optional[int] = typer.Option(None, help="threads to pin while timing"),
             out: Path = typer.Option(Path("runs/quantize"), help="output directory"),
            overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict[str, Any]]:
    """Quantize a task's model, run it on real integer kernels, measure it and write a report."""
    from slimkit.pipeline.comparison import with_options

    presets = family_presets("quantize")
    if config not in presets:
        raise SlimkitError(f"unknown quantization config {config!r}", f"use one of {', '.join(presets)}")
    cfg = with_options(presets[config], config, calibration=calibration, percentile=percentile,
                       granularity=granularity, group_size=group_size, backend=backend, max_drop=max_drop,
                       embedding_bits=embedding_bits, method=method, exclude=layer_names(exclude))
    cfg = with_sets(cfg, config, sets)
    t, spec = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    return _run("quantize", t, [cfg], out, spec=spec, as_json=as_json, threads=threads, label=config, compute=False)


@app.command()
@_friendly
def prune(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
          data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
          method: str = typer.Option("channels", help="channels (structured), magnitude (unstructured), nm"),
          amount: Optional[float] = typer.Option(None, help="fraction to remove: channels per group, or weights"),
          macs_ratio: Optional[float] = typer.Option(None, help="channels: MACs to keep, e.g. 0.5 (overrides amount)"),
          importance: Optional[str] = typer.Option(None, help="channels: l1, l2, bn_scale, taylor, random"),
          round_to: Optional[int] = typer.Option(None, help="channels: keep widths multiples of this, e.g. 8"),
          scope: Optional[str] = typer.Option(None, help="channels: layer or global; magnitude: global or layer"),
          allocation: Optional[str] = typer.Option(
              None, help="channels: uniform, macs (widths where MACs are cheap) or latency (per-layer times measured here)"),
          latency_batch: Optional[int] = typer.Option(None, help="channels, allocation latency: batch to time layers at"),
          reconstruct: Optional[bool] = typer.Option(None, "--reconstruct/--no-reconstruct",
                                                     help="channels: refit layers that lost inputs on calibration data"),
          n: Optional[int] = typer.Option(None, help="nm: weights kept per group (default 2)"),
          m: Optional[int] = typer.Option(None, help="nm: group size (default 4)"),
          nm_method: Optional[str] = typer.Option(None, help="nm: magnitude (default) or sparsegpt (calibrated)"),
          exclude: Optional[str] = EXCLUDE, sets: Optional[list[str]] = SET,
          schedule: str = typer.Option("one-shot", help="one-shot, or gradual (magnitude, cubic over fine-tuning)"),
          finetune_steps: int = typer.Option(0, help="fine-tuning steps after pruning, pruned weights kept out"),
          lr: Optional[float] = typer.Option(None, help="peak fine-tuning learning rate (default 1e-3)"),
          threads: Optional[int] = typer.Option(None, help="threads to pin while fine-tuning and timing"),
          out: Path = typer.Option(Path("runs/prune"), help="output directory"),
            overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict[str, Any]]:
    """Prune a task's model, fine-tune it, measure it against the original and write a report."""
    from slimkit.pipeline.comparison import with_options
    from slimkit.prune import NM, Channels, Gradual, Magnitude
    from slimkit.train.recover import Finetune

    if method not in PRUNE_METHODS:
        raise SlimkitError(f"unknown pruning method {method!r}", f"use one of {', '.join(PRUNE_METHODS)}")
    if nm_method is not None and method != "nm":
        raise SlimkitError(f"--nm-method does not apply to {method}", "use it with --method nm")
    if schedule not in SCHEDULES:
        raise SlimkitError(f"unknown schedule {schedule!r}", f"use one of {', '.join(SCHEDULES)}")
    if finetune_steps < 0:
        raise SlimkitError(f"finetune_steps={finetune_steps} is negative", "use 0 (no fine-tuning) or more")
    base = {"channels": Channels(), "magnitude": Magnitude(), "nm": NM()}[method]
    cfg = with_options(base, method, amount=amount, macs_ratio=macs_ratio, importance=importance,
                       round_to=round_to, scope=scope, allocation=allocation, latency_batch=latency_batch,
                       reconstruct=reconstruct, n=n, m=m, method=nm_method, exclude=layer_names(exclude))
    cfg = with_sets(cfg, method, sets)
    if schedule == "gradual":
        if not isinstance(cfg, Magnitude):
            raise SlimkitError(f"the gradual schedule applies to magnitude pruning, not {cfg.type_name}",
                               "use --method magnitude, or --schedule one-shot")
        steps: list[BaseConfig] = [Gradual(amount=cfg.amount, steps=finetune_steps, lr=lr or 1e-3, scope=cfg.scope,
                                           targets=cfg.targets, exclude=cfg.exclude)]
    else:
        steps = [cfg] + ([Finetune(steps=finetune_steps, lr=lr or 1e-3, evals=RECOVERY_EVALS)] if finetune_steps else [])
    t, spec = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    if finetune_steps:
        _needs_training(t, "fine-tune")
    return _run("prune", t, steps, out, spec=spec, as_json=as_json, threads=threads,
                label=f"pruned ({cfg.type_name})")


def student_steps(spec: str) -> list[BaseConfig]:
    """``self`` (the model itself), ``layers:N`` (an encoder keeping N blocks) or an artifact directory:
    its recipe when it has one (the student is then rebuilt from the task's model), else the artifact
    itself (``distill.StudentArtifact``, checked by its weights' digest)."""
    from slimkit import io
    from slimkit.core.config import BaseConfig
    from slimkit.distill.student import Student, StudentArtifact

    if spec == "self":
        return []
    if spec.startswith("layers:"):
        try:
            return [Student(layers=int(spec.split(":", 1)[1]))]
        except ValueError:
            raise SlimkitError(f"--student {spec!r}: N is not a number", "use e.g. --student layers:3") from None
    if not Path(spec).is_dir():
        raise SlimkitError(f"--student {spec!r} is not 'self', 'layers:N' or an artifact directory",
                           "pass a directory written by slimkit (e.g. runs/prune/model)")
    steps = [BaseConfig.from_dict(s) for s in io.read_meta(spec).get("recipe") or []]
    return steps or [StudentArtifact.of(spec)]


def parse_features(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"s1:t1,s2:t2"`` -> ``(("s1", "t1"), ("s2", "t2"))``; ``"4"`` pairs a layer with itself."""
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        s, _, t = part.strip().partition(":")
        if not s:
            raise SlimkitError(f"--features entry {part!r} is empty", "write student_layer:teacher_layer,...")
        pairs.append((s, t or s))
    return tuple(pairs)


@app.command()
@_friendly
def distill(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
            data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
            student: str = typer.Option("self", help="self, layers:N (encoder keeping N blocks) or an artifact dir"),
            steps: int = typer.Option(200, help="distillation steps"),
            lr: float = typer.Option(1e-3, help="peak learning rate (about 3e-5 for pre-trained transformers)"),
            temperature: float = typer.Option(4.0, help="softmax temperature of the logit KD loss"),
            alpha: float = typer.Option(0.5, help="weight of the KD loss against the hard-label loss"),
            features: Optional[str] = typer.Option(None, help="feature KD pairs student:teacher,... (module names)"),
            relational: float = typer.Option(0.0, help="weight of the relational (Gram matrix) loss"),
            compare: bool = typer.Option(True, help="also fine-tune the student on labels alone, same budget"),
            threads: Optional[int] = typer.Option(None, help="threads to pin while training and timing"),
            out: Path = typer.Option(Path("runs/distill"), help="output directory"),
            overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict[str, Any]]:
    """Distill a task's model into a student, compare with plain fine-tuning, write a report."""
    from slimkit.distill.distiller import Distill
    from slimkit.pipeline.recipe import Recipe

    cfg = Distill(steps=steps, lr=lr, temperature=temperature, alpha=alpha, features=parse_features(features),
                  relational=relational)
    before = student_steps(student)
    t, spec = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    controls = {}
    if compare and t.loss is not None:  # the same student, seed and budget on the hard labels alone
        plain = dataclasses.replace(cfg, alpha=0.0, features=(), relational=0.0, output="logits")
        controls[f"fine-tuned {steps} steps"] = Recipe(steps=before + [plain], task=spec)
    return _run("distill", t, before + [cfg], out, spec=spec, as_json=as_json, threads=threads,
                label=f"distilled {steps} steps", controls=controls, intermediate=bool(before))


@app.command()
@_friendly
def factorize(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
              data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
              method: str = typer.Option("tucker", help="svd, tucker or cp (Linear/1x1 layers always get SVD)"),
              ratio: float = typer.Option(0.3, help="fraction of each factorized layer's parameters kept"),
              energy: Optional[float] = typer.Option(None, help="svd: keep this fraction of singular-value energy"),
              sensitivity: bool = typer.Option(False, help="spread ranks by measured sensitivity"),
              targets: Optional[str] = typer.Option(None, help="all, all-linear or a regex of layer names"),
              exclude: Optional[str] = typer.Option(None, help="comma-separated layer names to leave whole"),
              rank_multiple: Optional[int] = typer.Option(None, help="round every rank to a multiple of this "
                                                          "(e.g. 8: kernels run faster on aligned widths)"),
              sets: Optional[list[str]] = SET,
              finetune_steps: int = typer.Option(0, help="recovery steps after factorizing"),
              distill: bool = typer.Option(False, "--distill", help="recover by distilling from the original"),
              lr: Optional[float] = typer.Option(None, help="peak recovery learning rate (default 1e-3)"),
              threads: Optional[int] = typer.Option(None, help="threads to pin while training and timing"),
              out: Path = typer.Option(Path("runs/factorize"), help="output directory"),
            overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict[str, Any]]:
    """Factorize a task's model (SVD, Tucker-2, CP), recover, measure against the original, report."""
    from slimkit.core.config import BaseConfig
    from slimkit.distill.distiller import Distill
    from slimkit.factorize import CP, SVD, Tucker
    from slimkit.factorize.layers import chosen_layers
    from slimkit.pipeline.comparison import with_options
    from slimkit.train.recover import Finetune

    if method not in FACTORIZE_METHODS:
        raise SlimkitError(f"unknown factorization method {method!r}", f"use one of {', '.join(FACTORIZE_METHODS)}")
    if method != "svd" and energy is not None:
        raise SlimkitError(f"--energy chooses SVD ranks, not {method} ranks", "use --method svd")
    if finetune_steps < 0:
        raise SlimkitError(f"finetune_steps={finetune_steps} is negative", "use 0 (no recovery) or more")
    names = tuple(n.strip() for n in exclude.split(",") if n.strip()) if exclude else ()
    allocation = "sensitivity" if sensitivity else "uniform"
    if method == "svd":
        cfg: BaseConfig = SVD(rank_ratio=ratio, energy=energy, allocation=allocation, targets=targets or "all",
                              exclude=names)
    else:
        cfg = (Tucker if method == "tucker" else CP)(ratio=ratio, allocation=allocation, targets=targets or "all",
                                                      exclude=names)
    cfg = with_sets(with_options(cfg, method, rank_multiple=rank_multiple), method, sets)
    t, spec = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    chosen_layers(t.model, cfg.targets, cfg.exclude, cfg.type_name)  # bad names fail before any work
    steps = [cfg]
    if finetune_steps:
        _needs_training(t, "recover", labels=not distill)
        if not distill and t.loss is None:
            raise SlimkitError(f"task {t.name!r} has no labels to fine-tune on", "add --distill (needs no labels)")
        steps.append(Distill(steps=finetune_steps, lr=lr or 1e-3, alpha=0.5) if distill
                     else Finetune(steps=finetune_steps, lr=lr or 1e-3))
    return _run("factorize", t, steps, out, spec=spec, as_json=as_json, threads=threads,
                label=f"factorized ({cfg.type_name})", intermediate=len(steps) > 1)


@app.command("apply")
@_friendly
def apply_steps(recipe: Optional[Path] = typer.Argument(None, help="recipe.yaml written by slimkit (or give --step)"),
                step: Optional[list[str]] = typer.Option(None, "--step",
                                                         help="a step 'family.Name key=value ...' or a preset; repeat"),
                task: Optional[str] = typer.Option(None, help="task (default: the recipe's when built in; a recipe "
                                                   "naming package.module:function needs it given here)"),
                model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS, data: Optional[str] = DATA,
                input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
                seed: int = typer.Option(0, help="seed of a recipe given by --step"),
                threads: Optional[int] = typer.Option(None, help="threads to pin while training and timing"),
                out: Path = typer.Option(Path("runs/apply"), help="output directory"),
            overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict[str, Any]]:
    """Apply a recipe file, or steps of any registered technique, to a task's model; measure, save, report."""
    from slimkit import zoo
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.run import run_recipe

    if (recipe is None) == (not step):
        raise SlimkitError("give either a recipe file or --step options", "e.g. slimkit apply --step int8-dynamic")
    given = task_spec(task, None, model, weights, data, input_shape, metric)
    if recipe is not None:
        r = Recipe.load(recipe)
        spec = zoo.trusted_spec(r.task, given, f"recipe {recipe}")  # a file names a task; it never chooses code
    elif given is None:
        raise SlimkitError("--step needs a task to apply to", "pass --task or --model")
    else:
        r, spec = Recipe(steps=[parse_step(s) for s in step or []], task=given, seed=seed), given
    r = dataclasses.replace(r, task=spec)
    t = zoo.load(spec)
    result = run_recipe(t, r, out, title=f"slimkit apply — {t.name}", threads=threads)
    return technique_summary("apply", t.name, result) if as_json else None
