"""Early exits on ONNX Runtime: one session per stage (a block and its exit head), routing in between.

Eager PyTorch spends much of a small CNN's time outside the convolutions (NCHW max-pooling,
per-op dispatch), which makes the cheap first block relatively expensive and the saving of
an early exit small. ONNX Runtime fuses Conv+BN+ReLU and runs the whole block in its blocked
layout, so the same exits save a larger share. Each stage returns its features and its exit's
logits; only the rows that are not confident go on to the next stage, exactly as in
:meth:`EarlyExit.forward`. Compare against the full model on the same runtime
(``slimkit.runtime.build(model, "onnxruntime", ...)``), never against eager PyTorch.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkit.architecture.exit_model import EarlyExit
from slimkit.core.errors import SlimkitError
from slimkit.measure.latency import interleaved_samples
from slimkit.runtime.ort import build_ort


class _Stage(nn.Module):
    """``block`` then its exit ``head``: (B, ...) -> (features, logits)."""

    def __init__(self, block: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.block, self.head = block, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(x)
        return features, self.head(features)


class OrtEarlyExit:
    """Runs like ``model`` (``(B, ...) -> (B, classes)``, ``last_exits`` set) on ONNX Runtime sessions.

    Thresholds start as ``model``'s; :func:`slimkit.architecture.calibrate` can calibrate this runner
    directly (on its own ONNX Runtime outputs, the ones that are served), and :meth:`exit_costs`
    gives the measured cost of each exit for a latency-aware calibration.
    """

    def __init__(self, model: EarlyExit, example: torch.Tensor, *, threads: int | None = None) -> None:

        model = model.eval()
        self.num_exits = model.num_exits
        self.last_exits: torch.Tensor | None = None
        self.set_thresholds(model.thresholds.tolist())
        self._work = tempfile.TemporaryDirectory(prefix="slimkit-exits-")
        self.stages: list[Any] = []
        x = example
        with torch.no_grad():
            for i, block in enumerate(model.blocks):
                # eval() first: the exporter restores the wrapper's training flag on the shared blocks
                module = (_Stage(block, model.heads[i]) if i < len(model.heads) else block).eval()
                stage = build_ort(module, (x,), threads=threads, workdir=Path(self._work.name) / f"stage{i}")
                stage.session = _quiet_session(stage.path, stage.threads)
                self.stages.append(stage)
                x = block(x)
        self._names = [s.session.get_inputs()[0].name for s in self.stages]

    def eval(self) -> "OrtEarlyExit":
        return self

    def set_thresholds(self, values: Sequence[float]) -> None:
        if len(values) != self.num_exits - 1 or any(not 0.0 <= v <= 1.0 for v in values):
            raise SlimkitError(f"thresholds {list(values)} for {self.num_exits - 1} early exits",
                               "give one max-softmax confidence in [0, 1] per exit except the last")
        self.thresholds = torch.tensor([float(v) for v in values])
        # confidence > t  <=>  max logit - logsumexp > log t: compared in log space, no softmax needed
        self._log_t = [math.log(t) if t > 0 else -math.inf for t in self.thresholds.tolist()]

    def _run(self, i: int, h: np.ndarray) -> list[np.ndarray]:
        return self.stages[i].session.run(None, {self._names[i]: h})

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (calibration)."""
        h, out = x.detach().cpu().contiguous().numpy(), []
        for i in range(len(self.stages)):
            outputs = self._run(i, h)
            h = outputs[0]
            out.append(torch.from_numpy(outputs[-1]))
        return out

    def exit_costs(self, x: torch.Tensor, rounds: int = 5) -> list[float]:
        """Measured ms per sample to leave at each exit (every stage up to it, heads included):
        the medians over ``rounds`` alternating passes of every stage on the batch ``x``."""

        inputs, h = [], x.detach().cpu().contiguous().numpy()
        for i in range(len(self.stages)):
            inputs.append(h)
            h = self._run(i, h)[0]
        samples = interleaved_samples({i: (lambda i=i: self._run(i, inputs[i])) for i in range(len(self.stages))},
                                      rounds=rounds, min_time_s=0.0, warmup=1)  # one call per stage per round
        stage_ms = np.array([np.median(samples[i]) for i in range(len(self.stages))]) / x.shape[0]
        return np.cumsum(stage_ms).tolist()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.detach().cpu().contiguous().numpy()  # (B, ...)
        batch = h.shape[0]
        rows = np.arange(batch)  # original sample of every row still running
        exits = np.full(batch, self.num_exits - 1, dtype=np.int64)
        out: np.ndarray | None = None
        for i in range(len(self.stages)):
            outputs = self._run(i, h)
            if i == len(self.stages) - 1:  # the final exit takes every remaining sample
                out = outputs[0] if out is None else _put(out, rows, outputs[0])
                break
            h, logits = outputs  # (b, ...), (b, classes)
            top = logits.max(-1, keepdims=True)
            log_conf = -np.log(np.exp(logits - top).sum(-1))  # log max-softmax, (b,)
            leave = log_conf > self._log_t[i]  # a threshold of 1.0 (log 0) never fires
            if not leave.any():
                continue
            if out is None:
                out = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
            out[rows[leave]] = logits[leave]
            exits[rows[leave]] = i
            stay = ~leave
            rows, h = rows[stay], h[stay]
            if rows.size == 0:
                break
        self.last_exits = torch.from_numpy(exits)
        return torch.from_numpy(out)


def _quiet_session(path: Path, threads: int) -> Any:
    """A session whose idle worker threads sleep instead of spinning.

    Every session owns a thread pool; after a run its workers spin for a while waiting for more
    work. With one session per stage, the spinning workers of the stage that just ran compete with
    the next stage's for the same cores: on 2 cores and 2 threads the routed eval pass measured
    0.80x the full model with spinning and 2.52x without (one interleaved run, same thresholds).
    """
    import onnxruntime as ort  # optional (onnxruntime, extra 'onnx'): imported when used

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _put(out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out[rows] = values
    return out


def build_exits(model: EarlyExit, example: Sequence[torch.Tensor] | torch.Tensor, backend: str = "onnxruntime", *,
                threads: int | None = None) -> Any:
    """A runnable early-exit model: ``"onnxruntime"`` (:class:`OrtEarlyExit`) or ``"torch"`` (the model)."""
    x = example[0] if isinstance(example, (tuple, list)) else example
    if backend == "torch":
        return model.eval()
    if backend != "onnxruntime":
        raise SlimkitError(f"early-exit backend {backend!r} is not known", "use 'torch' or 'onnxruntime'")
    return OrtEarlyExit(model, x, threads=threads)
