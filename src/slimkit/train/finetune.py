"""Fine-tune a (pruned, quantized, distilled) model on its task: the loop every technique reuses.

Defaults are chosen for *recovery* fine-tuning of an already trained model: AdamW at a modest
peak rate, short linear warmup (the optimizer's moment estimates start empty, and a full-rate
first step can undo what compression kept), cosine decay to zero, gradient clipping. Same seed,
same data, same thread count -> the same weights, also across a kill and a resume: the
checkpoint holds everything the next step depends on (model, optimizer, schedule, shuffle
position, torch RNG, best weights so far).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar
from slimkit.core.task import Inputs, Task, describe_batch
from slimkit.train._batches import BatchStream
from slimkit.train import data_parallel
from slimkit.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from slimkit.train.recompute import recomputing

#: ``loss(model, inputs, labels) -> scalar tensor``; replaces ``task.loss(model(*inputs), labels)``.
LossFn = Callable[[nn.Module, Inputs, Any], torch.Tensor]
#: ``after_step(model, step)`` runs after every optimizer step (``step`` counts from 1). When it also
#: has ``state_dict()`` / ``load_state_dict(state)`` (a pruning schedule's masks), checkpoints hold
#: that state too, so a resumed run continues exactly.
AfterStep = Callable[[nn.Module, int], None]

#: Where training applied by a recipe checkpoints (set by :func:`checkpointing`): directory, steps
#: between checkpoints, and how many runs have started in it (each run gets its own subdirectory).
_CHECKPOINTS: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("slimkit_checkpoints", default=None)
#: Optimizer steps between checkpoints inside :func:`checkpointing` when a run sets none.
CHECKPOINT_EVERY = 25


@contextlib.contextmanager
def checkpointing(directory: str | os.PathLike[str], every: int = CHECKPOINT_EVERY) -> Any:
    """Training inside this block (a recipe's fine-tuning, distillation, QAT steps) checkpoints into
    ``directory`` every ``every`` steps and resumes from a checkpoint already there; a killed run,
    started again the same way, continues where it stopped. The n-th training run in the block uses
    ``directory/run<n>``, so a step that trains several times (lottery rounds) keeps them apart."""
    token = _CHECKPOINTS.set([Path(directory), int(every), 0])
    try:
        yield Path(directory)
    finally:
        _CHECKPOINTS.reset(token)


@dataclasses.dataclass
class TrainResult:
    steps: int                       # optimizer steps taken in total (including before a resume)
    losses: list[float]              # training loss of every step
    evals: list[tuple[int, float]]   # (step, task score) of every evaluation
    best_step: int | None            # step of the best score (None without evaluation)
    best_score: float | None
    stopped_early: bool              # patience ran out before ``steps``
    restored_best: bool              # the model holds the best-scoring weights, not the last ones
    resumed_from: int | None         # step of the checkpoint this run continued from
    seconds: float                   # wall time of this call


class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:  # step = optimizer steps taken so far
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finetune(model: nn.Module, task: Task, *, steps: int, lr: float = 1e-3, weight_decay: float = 0.01,
             warmup: float = 0.05, clip_norm: float | None = 1.0, seed: int = 0, loss: LossFn | None = None,
             checkpoint_dir: str | os.PathLike[str] | None = None, checkpoint_every: int = 0,
             resume: bool | None = None, eval_every: int = 0, patience: int = 0, restore_best: bool = True,
             progress: bool = True, after_step: AfterStep | None = None,
             params: Iterable[nn.Parameter] | None = None, label: str | None = None,
             recompute: bool = False) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimizer steps on ``task.train``.

    - ``lr`` is the peak AdamW rate (1e-3 suits small CNNs; use ~2e-5..5e-5 for pre-trained
      transformers); ``weight_decay`` applies to matrices/kernels only, never to biases or norms.
    - ``params``: train only these (default: every parameter that requires grad).
    - ``checkpoint_dir``/``checkpoint_every``: an atomic checkpoint every N steps and at the end;
      ``resume=None`` continues from an existing checkpoint, ``True`` requires one, ``False``
      starts over.
    - ``eval_every``/``patience``: score with ``task.evaluate`` every N steps (and at the end);
      stop after ``patience`` evaluations without improvement; with ``restore_best`` the model
      ends with the best-scoring weights. A pruning schedule that raises sparsity in
      ``after_step`` should pass ``restore_best=False`` (earlier, denser weights would win).
    - ``recompute``: keep only the inputs of the model's repeated blocks during the forward and
      recompute the rest in the backward (``train.recompute``): less activation memory, more time.
    - Under ``torchrun`` with several processes it trains data-parallel (``train.data_parallel``):
      each rank takes its slice of every global batch; only rank 0 writes checkpoints.
    - The optimizer does not keep zeroed weights at zero: prune through a mask (a parametrization,
      ``torch.nn.utils.prune``) or re-apply it in ``after_step``.
    """
    if steps < 1:
        raise SlimkitError(f"finetune: steps={steps}", "ask for at least 1 step")
    if checkpoint_every and checkpoint_dir is None:
        raise SlimkitError("finetune: checkpoint_every is set but checkpoint_dir is not", "give checkpoint_dir")
    if loss is None and task.loss is None:
        raise SlimkitError(f"task {task.name!r} has no training loss",
                           "pass loss=fn(model, inputs, labels) or give the Task a loss")
    label = label or f"fine-tuning {task.name}"
    scoped = _CHECKPOINTS.get()
    if checkpoint_dir is None and scoped is not None:
        checkpoint_dir, checkpoint_every = scoped[0] / f"run{scoped[2]}", checkpoint_every or scoped[1]
        scoped[2] += 1
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if resume and (path is None or not path.is_file()):
        raise SlimkitError(f"{label}: resume=True but there is no checkpoint"
                           f"{'' if path is None else ' at ' + str(path)}", "start with resume=None")
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SlimkitError(f"{label}: no trainable parameters", "pass params= or unfreeze some parameters")
    config = {"steps": steps, "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "clip_norm": clip_norm,
              "seed": seed, "eval_every": eval_every, "patience": patience,
              "trainable": [list(p.shape) for p in trainable]}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices), recomputing(model, recompute):
        torch.manual_seed(seed)
        dp = data_parallel.session(model, trainable)
        run = _Run(model, task, trainable, config, loss, after_step, path, label, dp)
        found = path is not None and path.is_file() and resume is not False
        if dp is not None:  # rank 0 decides: only its file system has to hold the checkpoint
            found = dp.from_main(found)
        if found:
            run.load(path)
        shown = progress_bar(progress) if data_parallel.is_main_process() else contextlib.nullcontext(None)
        with shown as bar:
            bar_id = bar.add_task(label, total=steps, completed=run.step, info="") if bar else None
            while run.step < steps and not run.stopped_early:
                value = run.train_step()
                if checkpoint_every and run.step % checkpoint_every == 0:
                    run.save()
                if bar:
                    bar.update(bar_id, advance=1, info=f"loss {value:.4f}")
        if path is not None and run.saved_step != run.step:
            run.save()
    restored = run.finish(restore_best)
    return TrainResult(steps=run.step, losses=run.losses, evals=run.evals, best_step=run.best_step,
                       best_score=run.best_score, stopped_early=run.stopped_early, restored_best=restored,
                       resumed_from=run.resumed_from, seconds=round(time.perf_counter() - start, 3))


class _Run:
    """The state of one fine-tuning run: what a checkpoint saves and a resume restores."""

    def __init__(self, model: nn.Module, task: Task, trainable: list[nn.Parameter], config: dict[str, Any],
                 loss: LossFn | None, after_step: AfterStep | None, path: Path | None, label: str,
                 dp: data_parallel.DataParallel | None = None) -> None:
        self.model, self.task, self.trainable, self.config = model, task, trainable, config
        self.dp = dp
        self.forward_model = model if dp is None else dp.module  # DDP all-reduces the gradients
        self.loss, self.after_step, self.path, self.label = loss, after_step, path, label
        self.batches = BatchStream(task.train, config["seed"], task.name)
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        groups = [{"params": g, "weight_decay": wd} for g, wd in
                  ((decay, config["weight_decay"]), (no_decay, 0.0)) if g]
        self.opt = torch.optim.AdamW(groups, lr=config["lr"])
        warm = math.ceil(config["warmup"] * config["steps"]) if config["warmup"] > 0 else 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, WarmupCosine(config["steps"], warm))
        self.device = trainable[0].device
        self.step = 0
        self.losses: list[float] = []
        self.evals: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.resumed_from: int | None = None
        self.saved_step = -1

    # ------------------------------------------------------------------ training
    def train_step(self) -> float:
        inputs, labels = self.batches.next()
        if self.dp is not None:
            inputs, labels = self.dp.shard(inputs, labels)
        inputs = tuple(_to(x, self.device) for x in inputs)
        labels = _to(labels, self.device)
        self.model.train()
        if self.loss is not None:
            value = self.loss(self.forward_model, inputs, labels)
        else:
            if labels is None:
                got = describe_batch(self.task.train[0]) if isinstance(self.task.train, (list, tuple)) else "?"
                raise SlimkitError(f"task {self.task.name!r}: training batch 0 is {got}, which carries no labels: "
                                   "labelled batches are ((inputs...,), labels), e.g. ((x,), y)",
                                   "wrap the inputs in a tuple: train=[((x,), y) for x, y in batches]; or pass "
                                   "loss=fn(model, inputs, labels) that needs none (e.g. distillation)")
            value = self.task.loss(self.forward_model(*inputs), labels)
        shown = float(value.item()) if self.dp is None else self.dp.mean(value)  # the global batch's loss
        if not math.isfinite(shown):
            raise SlimkitError(f"{self.label}: loss became {shown} at step {self.step + 1}",
                               f"lower lr (now {self.config['lr']:g}) or check the model for NaN/inf weights")
        self.model.zero_grad(set_to_none=True)
        value.backward()
        if self.dp is not None:
            self.dp.sync_extra_grads()
        if self.config["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config["clip_norm"])
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.losses.append(shown)
        if self.after_step is not None:
            self.after_step(self.model, self.step)
        every = self.config["eval_every"]
        if every and (self.step % every == 0 or self.step == self.config["steps"]):
            self.evaluate()
        return self.losses[-1]

    def evaluate(self) -> None:
        score = self.task.evaluate(self.model)["score"]
        self.model.train()
        self.evals.append((self.step, score))
        better = self.best_score is None or (score > self.best_score if self.task.higher_is_better
                                              else score < self.best_score)
        if better:
            self.best_step, self.best_score, self.bad_evals = self.step, score, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
            if self.config["patience"] and self.bad_evals >= self.config["patience"]:
                self.stopped_early = True

    def finish(self, restore_best: bool) -> bool:
        """Leave the model in eval mode with the best weights when asked; True if they were restored."""
        restored = restore_best and self.best_state is not None and self.best_step != self.step
        if restored:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return restored

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        assert self.path is not None
        if self.dp is not None and self.dp.rank != 0:  # rank 0 writes; the others hold the same state
            self.saved_step = self.step
            return
        state = {
            "step": self.step, "config": self.config, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "batches": self.batches.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if _uses_cuda(self.model) else [],
            "losses": self.losses, "evals": [list(e) for e in self.evals], "best_step": self.best_step,
            "best_score": self.best_score, "best_state": self.best_state, "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
            "after_step": self.after_step.state_dict() if hasattr(self.after_step, "state_dict") else None,
        }
        save_checkpoint(state, self.path)
        self.saved_step = self.step

    def load(self, path: Path) -> None:
        state = load_checkpoint(path) if self.dp is None or self.dp.rank == 0 else None
        if self.dp is not None:  # rank 0 read it; every rank continues from the same state
            state = self.dp.from_main(state)
        if state.get("config") != self.config:
            changed = sorted(k for k in self.config if state.get("config", {}).get(k) != self.config[k])
            raise SlimkitError(f"{self.label}: checkpoint {path} was written with different settings "
                               f"({', '.join(changed) or 'format'})",
                               "use the same settings to resume, or resume=False to start over")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise SlimkitError(f"{self.label}: checkpoint {path} does not fit this model "
                               f"({str(e).splitlines()[0]})", "resume=False to start over") from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = self.resumed_from = self.saved_step = int(state["step"])
        self.losses = list(state["losses"])
        self.evals = [(int(s), float(v)) for s, v in state["evals"]]
        self.best_step, self.best_score = state["best_step"], state["best_score"]
        self.best_state = state["best_state"]
        self.bad_evals, self.stopped_early = int(state["bad_evals"]), bool(state["stopped_early"])
        if state.get("after_step") is not None and hasattr(self.after_step, "load_state_dict"):
            self.after_step.load_state_dict(state["after_step"])


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _uses_cuda(model: nn.Module) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())
