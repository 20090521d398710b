"""A recipe: the chosen pipeline as YAML, replayable — same recipe, same seed, same weights.

    slimkit: 0.1.0
    task: mnist
    seed: 0
    backend: auto
    target: {max_size_mb: 0.05, max_drop: 0.01, device: cpu, ...}
    steps:
      - {type: prune.Channels, version: 1, macs_ratio: 0.4, ...}
      - {type: train.Finetune, version: 1, steps: 200, ...}
      - {type: quantize.WeightOnly, version: 1, bits: 4, group_size: 32, ...}

Every step is a registered technique config; an unknown type or option is a one-line error
that names it. Replaying sets the seed before applying, so stochastic steps repeat exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import yaml

from slimkit.core.atomic import atomic_write
from slimkit.core.config import BaseConfig, apply
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.core.versions import __version__


_EXAMPLES = {"task": "mnist", "backend": "auto", "target": "{max_size_mb: 0.05}"}


@dataclasses.dataclass
class Recipe:
    steps: list[BaseConfig]
    task: str
    seed: int = 0
    backend: str = "auto"
    target: dict[str, Any] | None = None

    @classmethod
    def from_steps(cls, steps: Sequence[dict[str, Any] | BaseConfig], **kwargs: Any) -> "Recipe":
        configs = [s if isinstance(s, BaseConfig) else BaseConfig.from_dict(s) for s in steps]
        return cls(steps=configs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"slimkit": __version__, "task": self.task, "seed": self.seed, "backend": self.backend,
                "target": self.target, "steps": [c.to_dict() for c in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise SlimkitError(f"recipe is not valid YAML{at}", "fix the file, or write it anew with slimkit optimize") \
                from None
        except RecursionError:
            raise SlimkitError("recipe is nested too deeply to be a recipe", "give the recipe.yaml slimkit wrote") \
                from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise SlimkitError("recipe has no 'steps' list", "a recipe is a mapping with task, seed and steps: [...]")
        unknown = sorted(set(data) - {"slimkit", "task", "seed", "backend", "target", "steps"})
        if unknown:
            raise SlimkitError(f"recipe has unknown key(s) {', '.join(unknown)}",
                               "allowed: slimkit, task, seed, backend, target, steps")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise SlimkitError(f"recipe seed {seed!r} is not a whole number in [0, 2**32)", "use e.g. 0")
        for key, kind, what in (("task", str, "a task name"), ("backend", str, "a runtime name"),
                                ("target", dict, "a mapping of limits")):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise SlimkitError(f"recipe {key} {data[key]!r} is not {what}",
                                   f"write {key}: as {what}, e.g. {_EXAMPLES[key]}")
        for i, step in enumerate(data["steps"]):
            if not isinstance(step, dict) or "type" not in step:
                raise SlimkitError(f"recipe step {i + 1} has no 'type'", "each step is 'type: family.Name' plus options")
        return cls.from_steps(data["steps"], task=data.get("task") or "", seed=seed,
                              backend=data.get("backend") or "auto", target=data.get("target"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        text = self.to_yaml().encode()
        return atomic_write(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise SlimkitError(f"recipe {path} {what}", "give the recipe.yaml a search wrote")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise SlimkitError(f"recipe {path} is not a text file (not UTF-8)",
                               "give the recipe.yaml slimkit wrote, not a model or a pickle") from None
        except OSError as exc:
            raise SlimkitError(f"recipe {path} cannot be read ({exc.strerror or exc})", "check the file") from None
        if "\0" in text:
            raise SlimkitError(f"recipe {path} is not a text file (it holds NUL bytes)",
                               "give the recipe.yaml slimkit wrote, not a model or a pickle")
        return cls.from_yaml(text)

    def replay(self, task: Task) -> nn.Module:
        """Apply the steps to ``task.model`` (left untouched) with the recipe's seed."""
        return self.replay_steps(task)[-1]

    def replay_steps(self, task: Task, *, announce: Callable[[str], None] | None = None) -> list[nn.Module]:
        """The model after each step (``[0]`` is the original): same weights as :meth:`replay`, and
        the float model a quantization step started from, which its error report compares against.
        ``announce`` gets one line as each step starts and ends (long steps are never silent)."""
        torch.manual_seed(self.seed)
        models = [task.model]
        for i, step in enumerate(self.steps, 1):
            start = time.monotonic()
            if announce:
                announce(f"step {i}/{len(self.steps)} {step.type_name}: started")
            models.append(apply(models[-1], step, task))
            if announce:
                announce(f"step {i}/{len(self.steps)} {step.type_name}: done in {time.monotonic() - start:.1f} s")
        return models
