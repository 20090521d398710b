"""``slimkit.optimize``: search technique pipelines against a target with real measurements in the loop.

Each trial picks at most one technique per stage (prune -> factorize -> recover -> quantize ...),
their knobs, applies them in order, measures the result cheapest-first (bytes, then latency, then
the metric) and records the constraint vector (Optuna's convention: <= 0 fits). The search is
multi-objective over (metric drop, MB, ms) with constraint-aware samplers, so it also yields the
Pareto front; the *best* is the feasible candidate with the best metric. It never ends silently:
when nothing fits, the result carries the closest candidates, each limit's margin and a hint.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from slimkit import zoo
from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import CHANGES_WEIGHTS, STAGES, SearchContext, Technique, searchable
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.search.budget import TimeBudget, finish_reserve, sensitivity_layers, sized_extra
from slimkit.search.evaluate import Measurer, RuntimeMeasurer, TrialMeasurement, failure_reason
from slimkit.search.faults import fault_point
from slimkit.search.interrupt import stop_on_signals, stopped
from slimkit.search.finish import finish, records_from_study
from slimkit.search.incumbent import INCUMBENT_DIR, Incumbent
from slimkit.search.latency_check import latency_constraint
from slimkit.search.pareto import TrialRecord, objectives
from slimkit.search.refine import step_closest
from slimkit.search.result import OptimizeResult
from slimkit.search.seeding import initial_guesses, layer_sensitivity_for
from slimkit.search.study import create_study, finished, load_study, open_storage, storage_url, study_state
from slimkit.search.trial_loop import run_trials
from slimkit.search.trial_progress import TrialProgress

log = logging.getLogger("slimkit.search")

STRATEGIES = ("auto", "tpe", "nsga2")


def suggest_pipeline(trial: Any, ctx: SearchContext, techs: Sequence[Technique]) -> list[BaseConfig]:
    """At most one technique per stage, in stage order; recovery only after something changed the weights."""
    configs: list[BaseConfig] = []
    too_slow = ctx.extra.get("too_slow", {})  # search name -> why it would not fit a trial on this model
    changed = False
    picked = 0
    for stage in STAGES:
        options = [t for t in techs if t.stage == stage and t.applies(ctx) and t.search not in too_slow]
        if not options or (stage == "recover" and not changed):
            continue
        if stage != "recover" and ctx.max_techniques is not None and picked >= ctx.max_techniques:
            break
        choice = trial.suggest_categorical(f"stage.{stage}", ["none"] + [t.search for t in options])
        if choice == "none":
            continue
        config = next(t for t in options if t.search == choice).suggest(trial, ctx)
        if config is not None:  # a list: steps that go together (CLE, static int8, bias correction)
            configs.extend(config if isinstance(config, list) else [config])
            changed = changed or stage in CHANGES_WEIGHTS
            picked += stage != "recover"
    return configs


def make_sampler(strategy: str, seed: int, trials: int) -> Any:
    """TPE with constraints (good at few trials) or NSGA-II (a broad front with many trials)."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    if strategy not in STRATEGIES:
        raise SlimkitError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "nsga2" if trials >= 200 else "tpe"
    # Optuna 5 reads constraints the objective stored with trial.set_constraint; older ones need the function.
    legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": _constraints}
    if strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, trials // 5)), **legacy)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=max(3, min(10, trials // 4)), constant_liar=True, **legacy)


def _constraints(frozen: Any) -> list[float]:
    return list(frozen.user_attrs.get("constraints", [1e9]))


def _finite(values: Sequence[float]) -> list[float]:
    return [1e9 if v != v or v > 1e9 else float(v) for v in values]


def make_objective(ctx: SearchContext, techs: Sequence[Technique], measure: Measurer, records: list[TrialRecord],
                   incumbent: Incumbent | None = None) -> Callable[[Any], tuple[float, float, float]]:
    """The trial: suggest a pipeline, measure it, store what was measured. A pipeline that fails
    anywhere (knobs, a technique, the runtime, the metric, a NaN) is stored with its reason and
    counts as infeasible; the search goes on. A feasible trial's model is handed to ``incumbent``,
    which saves it once the trial is stored finished if it is the best so far."""
    target: Target = ctx.target

    def objective(trial: Any) -> tuple[float, float, float]:
        try:
            configs = suggest_pipeline(trial, ctx, techs)
        except Exception as exc:  # noqa: BLE001 - e.g. a knob combination a config refuses: infeasible, not a crash
            configs, measured = [], TrialMeasurement(error=failure_reason("choosing the pipeline", exc))
            model = None
        else:
            earlier = _same_pipeline_measured(trial)
            measured, model = (earlier, None) if earlier is not None else measured_model(measure, configs)
        recipe = [c.to_dict() for c in configs]
        constraints = _finite([1e9] * len(target.names())) if measured.error else latency_constraint(
            target, _finite(target.constraints(measured.measurement())), measured.latency_check)
        if not constraints:  # no limit at all: everything fits
            constraints = [0.0]
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("measured", measured.to_dict())
        trial.set_user_attr("constraints", constraints)
        if hasattr(trial, "set_constraint"):
            for key, value in zip(target.names() or ["none"], constraints):
                trial.set_constraint(key, value)
        fault_point("trial measured", trial.number)
        record = TrialRecord(trial.number, recipe, measured, constraints, dict(trial.params))
        records.append(record)
        if incumbent is not None:
            incumbent.hold(trial.number, model, getattr(measure, "before_last", None), record)
        return tuple(_finite(objectives(measured)))  # type: ignore[return-value]

    return objective


def measure_safely(measure: Measurer, configs: Sequence[BaseConfig], **kw: Any) -> TrialMeasurement:
    """``measure(configs)`` that never raises (a caller's own measurer may) and never stores NaN."""
    return measured_model(measure, configs, **kw)[0]


def measured_model(measure: Measurer, configs: Sequence[BaseConfig], **kw: Any) -> tuple[TrialMeasurement, Any]:
    """:func:`measure_safely`, and the model measured (None when the measurer gives none, or it failed)."""
    try:
        out = measure(configs, **kw)
        measured, model = out[0], (out[1] if len(out) > 1 else None)
    except Exception as exc:  # noqa: BLE001 - one candidate's failure is recorded, not fatal
        log.exception("measuring %s failed", [c.type_name for c in configs])
        return TrialMeasurement(error=failure_reason("measuring", exc)), None
    nan = [k for k in ("score", "drop", "size_mb", "latency_ms", "memory_mb") if _is_nan(getattr(measured, k))]
    if nan and not measured.error:
        measured.error = f"measuring: {', '.join(nan)} came out NaN"
    for key in nan:
        setattr(measured, key, None)
    return measured, None if measured.error else model


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _same_pipeline_measured(trial: Any) -> TrialMeasurement | None:
    """The measurement of an earlier finished trial with exactly these parameters: samplers repeat
    themselves once a small space is explored, and a repeat would only spend budget re-measuring."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and "measured" in t.user_attrs:
            trial.set_user_attr("repeat_of", t.number)
            return TrialMeasurement(**t.user_attrs["measured"])
    return None


def context_for(task: Task, target: Target, baseline: TrialMeasurement, sensitivity: dict[str, float],
                extra: dict[str, Any] | None = None, max_techniques: int | None = None) -> SearchContext:
    return SearchContext(task=task, target=target,
                         baseline={"size_mb": baseline.size_mb or 0.0, "latency_ms": baseline.latency_ms or 0.0,
                                   "score": baseline.score or 0.0, "params": float(baseline.params or 0)},
                         sensitivity=sensitivity, trainable=bool(task.train) and task.loss is not None,
                         max_techniques=max_techniques, extra=dict(extra or {}))


def optimize(task: Task | str, target: Target, *, trials: int = 30, time_budget: float | None = None,
             strategy: str = "auto", storage: str | None = None, study: str | None = None, seed: int = 0,
             out: str | Path | None = None, resume: bool = False, technique_names: Sequence[str] | None = None,
             measurer: Measurer | None = None, sensitivity: bool | None = None, backend: str = "auto",
             extra: dict[str, Any] | None = None, progress: bool = True, task_spec: str | None = None,
             report: bool = True, enqueue: Sequence[dict[str, Any]] = (),
             max_techniques: int | None = None, budget_start: float | None = None) -> OptimizeResult:
    """Search pipelines for ``task`` under ``target``; see the module docstring.

    ``time_budget`` is in seconds. ``storage`` is a database URL (default: SQLite in ``out``) and
    ``study`` its name there; other machines join with :func:`slimkit.search.work`. ``resume``
    continues a killed run. ``enqueue``: parameter sets to try first (e.g. a previous run's
    trials), before the informed guesses and the sampler. ``max_techniques=1`` searches single
    techniques only (each with its own knobs and, where it changes weights, recovery training).
    ``budget_start``: the ``time.monotonic()`` the budget counts from (a command's start; default now).
    """

    if isinstance(task, str):
        task_spec, task = task, zoo.load(task)
    if not isinstance(target, Target):
        raise SlimkitError(f"target is {type(target).__name__}, not a slimkit.Target", "pass sk.Target(...)")
    if not isinstance(trials, int) or trials < 1:
        raise SlimkitError(f"trials={trials!r} is invalid", "use a positive number of trials")
    if max_techniques is not None and (not isinstance(max_techniques, int) or max_techniques < 1):
        raise SlimkitError(f"max_techniques={max_techniques!r} is invalid", "use 1 or more, or leave it out")
    budget = TimeBudget(time_budget, budget_start)
    asked = target  # relative latency limits still relative: trials are re-timed against the original
    phases: dict[str, float] = {}
    out_dir = Path(out) if out is not None else Path("runs") / f"optimize-{task.name}"
    url = storage_url(out_dir, storage)
    name = study or f"slimkit-{task.name}"
    techs = searchable(list(technique_names) if technique_names else None)
    measure = measurer or RuntimeMeasurer(task, target, backend=backend, seed=seed)

    db = open_storage(url)
    state = study_state(db, name)
    if state == "ready" and not resume:
        raise SlimkitError(f"study {name!r} already exists in this storage",
                           "pass --resume to continue it, or choose another --out / --study")
    if resume and state != "ready":
        log.warning("study %r was not stored yet when its run stopped: starting it", name)
    go_on = f"continue with the same command plus --resume (run directory {out_dir}, study {name})"
    st = None
    with stop_on_signals():
        try:
            if state == "ready" and resume:
                st = load_study(db, name, make_sampler(strategy, seed, trials))
                attrs = st.user_attrs
                baseline = TrialMeasurement(**attrs["baseline"])
                sens = dict(attrs.get("sensitivity", {}))
                extra = {**attrs.get("extra", {}), **dict(extra or {})}
                target = target.with_original_latency(baseline.latency_ms or 0.0)  # a relative limit, in ms
                ctx = context_for(task, target, baseline, sens, extra, max_techniques)
                for key, value in _incumbent_attrs(out_dir, attrs).items():
                    st.set_user_attr(key, value)  # a study of an older slimkit, or resumed in another --out
                attrs = st.user_attrs
            else:
                baseline, sens, extra = _start(task, measure, budget, techs, trials, sensitivity, measurer, extra,
                                               phases)
                target = target.with_original_latency(baseline.latency_ms or 0.0)  # a relative limit, in ms
                ctx = context_for(task, target, baseline, sens, extra, max_techniques)
                attrs = {"task": task_spec or task.name, "target": target.to_dict(),
                         "asked_target": asked.to_dict(),
                         "techniques": [t.search for t in techs], "trials": trials, "seed": seed, "backend": backend,
                         "sensitivity": sens, "extra": extra, "strategy": strategy,
                         "max_techniques": max_techniques, **_incumbent_attrs(out_dir, {}),
                         "baseline": baseline.to_dict()}
                st = create_study(db, name, make_sampler(strategy, seed, trials), attrs, queue=enqueue,
                                  guesses=_first_guesses(ctx, techs))
            if isinstance(measure, RuntimeMeasurer):
                measure.baseline_score, measure.target = baseline.score, target
                measure.asked = Target(**attrs.get("asked_target", asked.to_dict()))
            records: list[TrialRecord] = []
            keeper = Incumbent(Path(attrs["incumbent"]), attrs["run"], task.name)
            objective = make_objective(ctx, techs, measure, records, keeper)
            lap = time.monotonic()
            with TrialProgress(trials, finished(st), enabled=progress, baseline_score=baseline.score) as bar:

                def after_trial(trial: Any) -> None:
                    bar.update(trial, saved=keeper.after_trial(trial))
                    step_closest(st, target, records_from_study(st))

                done = run_trials(st, objective, trials, budget=budget, reserve_s=finish_reserve(baseline.seconds, report),
                                  on_trial=after_trial)
                bar.say(f"search stopped: {done.reason}; writing best/, the recipe and the report")
            phases["trials"] = time.monotonic() - lap
            fault_point("trials done")
            return finish(st, task, target, baseline, sens, name, url, out_dir, budget.start, seed=seed,
                          backend=backend, report=report, phases=phases, incumbent=keeper, stopped=done.reason,
                          say=bar.say if progress else None)
        except KeyboardInterrupt as exc:
            kept = "" if st is None else _kept_so_far(st)
            raise stopped(exc, 0 if st is None else finished(st), trials, go_on + kept) from None


def _incumbent_attrs(out_dir: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """Where every process of the study saves the best so far, and the token that tells this study's from
    another's; only what ``attrs`` (a stored study's settings) lacks or names differently."""
    want = {"run": attrs.get("run") or secrets.token_hex(8), "incumbent": str(out_dir.resolve() / INCUMBENT_DIR)}
    return {k: v for k, v in want.items() if attrs.get(k) != v}


def _kept_so_far(study: Any) -> str:
    """Where the best finished trial so far is saved, for the line a stopped search prints."""
    try:
        attrs = study.user_attrs
    except Exception:  # noqa: BLE001 - the storage may be what failed; the stop line must still be said
        return ""
    if "incumbent" not in attrs:
        return ""
    info = Incumbent(Path(attrs["incumbent"]), attrs.get("run", ""), "").stored()
    return "" if info is None else f"; the best so far (trial {info['trial']}) is saved in {attrs['incumbent']}"


def _start(task: Task, measure: Measurer, budget: TimeBudget, techs: Sequence[Technique], trials: int,
           sensitivity: bool | None, measurer: Measurer | None, extra: dict[str, Any] | None,
           phases: dict[str, float]) -> tuple[TrialMeasurement, dict[str, float], dict[str, Any]]:
    """What a new study stores before its first trial: the original measured, per-layer sensitivity,
    training and reconstruction lengths sized to this model and budget."""
    lap = time.monotonic()
    baseline = measure_safely(measure, [], early_stop=False)
    if baseline.error or baseline.score is None:
        raise SlimkitError(f"the original model could not be measured ({baseline.error or 'no metric'})",
                           "the search compares every candidate with it: fix the model or the task's metric")
    baseline.drop = 0.0
    fault_point("baseline measured")
    phases["measuring the original"], lap = time.monotonic() - lap, time.monotonic()
    want_sens = sensitivity if sensitivity is not None else measurer is None
    metric_s = (baseline.timings or {}).get("metric", baseline.seconds)
    sens = _sensitivity(task, sensitivity_layers(metric_s, budget)) if want_sens else {}
    phases["per-layer sensitivity"], lap = time.monotonic() - lap, time.monotonic()
    sized = sized_extra(task, techs, dict(extra or {}), budget, trials)
    phases["sizing training and reconstruction"] = time.monotonic() - lap
    return baseline, sens, sized


def _sensitivity(task: Task, layers: int) -> dict[str, float]:
    if layers < 1:
        log.info("per-layer sensitivity skipped: one metric run does not fit its share of the time")
        return {}
    try:
        return layer_sensitivity_for(task, max_layers=layers)
    except Exception as exc:  # noqa: BLE001 - a help to the search, not needed by it
        log.warning("per-layer sensitivity skipped: %s", failure_reason("probing layers", exc))
        return {}


def _first_guesses(ctx: SearchContext, techs: Sequence[Technique]) -> list[dict[str, Any]]:
    """The informed first trials; a technique whose checks fail on this model leaves the sampler to start."""
    try:
        return list(initial_guesses(ctx, list(techs)))
    except Exception as exc:  # noqa: BLE001 - a help to the search, not needed by it
        log.warning("no informed first guesses: %s", failure_reason("choosing them", exc))
        return []
