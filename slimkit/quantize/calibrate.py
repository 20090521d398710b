"""Calibration for post-training quantization: observe activations once, then choose their ranges.

Running the calibration set through the model is the expensive part; choosing a range from the
statistics is cheap. So ``collect`` passes over the data once, and ``compute_range`` can then try
minmax, percentile, entropy and MSE on the same observers (NNCF's habit of sharing statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimkit.errors import SlimkitError

METHODS = ("minmax", "percentile", "entropy", "mse")
#: Smallest scale handed out, the floor torch.ao observers use: a zero range must not divide by zero.
_EPS = float(torch.finfo(torch.float32).eps)


class Observer:
    """Running min, max, count, exact-zero count and a histogram of one activation tensor.

    The histogram covers [-R, R) with ``bins`` bins per side (``2 * bins`` in all; the default
    2048 gives the 2048-bin |x| histogram TensorRT calibrates on). Why it is built this way:

    - zero is a bin edge, so folding the two sides gives the |x| histogram exactly;
    - ``R`` and ``bins`` are powers of two, so ``x * bins / R`` is exact in floating point and
      each value lands in its mathematically correct bin (bin j holds [j*w, (j+1)*w), w = R/bins);
    - R is the smallest power of two strictly above max|x|. When a batch reaches R, R doubles and
      adjacent bin pairs merge. Pairs are aligned at zero, so each new bin is exactly the sum of
      two old ones: the counts equal a one-shot histogram over the final range, in a single pass.
      R < 2 * max|x| always, so the data spans at least half of the bins.
    """

    def __init__(self, name: str = "", bins: int = 2048) -> None:
        if bins < 2 or bins & (bins - 1):
            raise SlimkitError(f"observer bins={bins} is not a power of two >= 2", "use e.g. 2048")
        self.name = name
        self.bins = bins
        self.count = 0
        self.zeros = 0  # exactly-zero values: representable in every int grid, so they cost no error
        self.min = math.inf
        self.max = -math.inf
        self.hist = np.zeros(2 * bins, dtype=np.int64)  # (2*bins,) counts over [-R, R)
        self._exp: int | None = None  # R = 2**_exp; None until a nonzero value is seen

    @property
    def range(self) -> float:
        """R, the histogram's half-width (0.0 while only zeros were seen)."""
        return 0.0 if self._exp is None else math.ldexp(1.0, self._exp)

    @property
    def width(self) -> float:
        """Width of one bin."""
        return self.range / self.bins

    @property
    def amax(self) -> float:
        """max|x| over everything observed."""
        return max(-self.min, self.max)

    def edges(self) -> np.ndarray:
        """Bin edges, ``(2*bins + 1,)``, exact binary fractions."""
        return np.arange(-self.bins, self.bins + 1) * self.width

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x|, ``(bins,)``: bin m holds |x| in [m*w, (m+1)*w] (negatives closed above)."""
        return self.hist[self.bins:] + self.hist[:self.bins][::-1]

    def check(self) -> None:
        """Raise a clear error if no data reached this observer."""
        if self.count == 0:
            raise SlimkitError(f"no calibration data reached {self.name!r}",
                               "check that this module runs in the model's forward on the calibration batches")

    def update(self, x: Tensor) -> None:
        """Add one batch of values (any shape) to the statistics."""
        x = x.detach().flatten()  # (N,)
        x = x if x.dtype == torch.float64 else x.float()
        if x.numel() == 0:
            return
        lo, hi = (v.item() for v in torch.aminmax(x))  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SlimkitError(f"calibration data for {self.name!r} contains NaN or Inf",
                               "check the calibration batches and the layers before it for overflow")
        self.count += x.numel()
        self.zeros += int((x == 0).sum())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(-lo, hi)
        if amax == 0:
            self.hist[self.bins] += x.numel()  # zeros fall in bin [0, w) whatever R becomes
            return
        self._grow(math.frexp(amax)[1])  # 2**(e-1) <= amax < 2**e
        idx = torch.floor(x * (self.bins / self.range)).long() + self.bins  # (N,) in [0, 2*bins)
        self.hist += torch.bincount(idx, minlength=2 * self.bins).cpu().numpy()

    def _grow(self, exp: int) -> None:
        """Make R at least 2**exp by doubling it, merging bin pairs so counts stay exact."""
        if self._exp is None:
            self._exp = exp
        quarter = self.bins // 2
        while self._exp < exp:
            pairs = self.hist.reshape(self.bins, 2).sum(axis=1)  # (bins,) old pairs, aligned at zero
            self.hist = np.zeros_like(self.hist)
            self.hist[quarter:quarter + self.bins] = pairs  # old [-R, R) is the middle of new [-2R, 2R)
            self._exp += 1


def collect(model: nn.Module, module_names: list[str], batches: Iterable[tuple[Tensor, ...]], *,
            which: str = "input", progress: bool = False) -> dict[str, Observer]:
    """Observe the first tensor input (or the output) of each named module over all batches, once.

    Runs ``model(*batch)`` for every batch in eval mode under ``torch.inference_mode`` and returns
    one ``Observer`` per name. Hooks are removed and the model's train/eval mode restored even when
    a batch fails.
    """
    if which not in ("input", "output"):
        raise SlimkitError(f"unknown which={which!r}", "use 'input' or 'output'")
    if not module_names:
        raise SlimkitError("no modules to calibrate", "pass names from model.named_modules()")
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise SlimkitError(f"model has no module named {missing[0]!r}", "use names from model.named_modules()")
    observers = {name: Observer(name) for name in module_names}
    handles = []
    was_training = model.training
    try:
        for name, obs in observers.items():
            if which == "input":
                handles.append(modules[name].register_forward_pre_hook(_input_hook(obs)))
            else:
                handles.append(modules[name].register_forward_hook(_output_hook(obs)))
        model.eval()
        seen = _run(model, batches, progress)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise SlimkitError("calibration set is empty", "give the task calibration batches")
    return observers


def _first_tensor(values: Any) -> Tensor | None:
    if isinstance(values, Tensor):
        return values
    if isinstance(values, (tuple, list)):
        return next((v for v in values if isinstance(v, Tensor)), None)
    return None


def _input_hook(obs: Observer) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        x = _first_tensor(args)
        if x is None:
            raise SlimkitError(f"module {obs.name!r} got no positional tensor input", "calibrate its output instead")
        obs.update(x)
    return hook


def _output_hook(obs: Observer) -> Callable[[nn.Module, tuple, Any], None]:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        y = _first_tensor(output)
        if y is None:
            raise SlimkitError(f"module {obs.name!r} returned no tensor", "calibrate its input instead")
        obs.update(y)
    return hook


def _run(model: nn.Module, batches: Iterable[tuple[Tensor, ...]], progress: bool) -> int:
    """Run every batch through ``model``; returns how many ran. Torch errors become one-line errors."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    seen = 0
    with _progress_bar(progress, total) as advance, torch.inference_mode():
        for batch in batches:
            args = (batch,) if isinstance(batch, Tensor) else tuple(batch)
            args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
            try:
                model(*args)
            except SlimkitError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure inside the user's model
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise SlimkitError(f"model failed on calibration batch {seen}: {type(err).__name__}: {first}",
                                   "check that each batch is a tuple of the model's positional inputs") from err
            seen += 1
            advance()
    return seen


@contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[], None]]:
    """A rich progress bar over calibration batches, or a no-op (tests, non-interactive runs)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
        task = bar.add_task("calibrating", total=total)
        yield lambda: bar.advance(task)


def compute_range(obs: Observer, method: str, *, percentile: float = 99.99, symmetric: bool = True,
                  bits: int = 8) -> tuple[float, float]:
    """The (lo, hi) clipping range for ``obs`` by ``method``; symmetric ranges are (-t, t).

    Asymmetric entropy and MSE use one threshold t for both sides, clipped to the observed
    [min, max] (so post-ReLU data gets [0, t]); asymmetric percentile cuts (100 - percentile)%
    from each tail separately.
    """
    if method not in METHODS:
        raise SlimkitError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise SlimkitError(f"percentile={percentile} is outside (0, 100]", "use e.g. 99.99")
    if not 2 <= bits <= 16:
        raise SlimkitError(f"bits={bits} is outside 2..16", "use 8 for int8")
    obs.check()
    amax = obs.amax
    if method == "minmax" or amax == 0:
        return (-amax, amax) if symmetric else (obs.min, obs.max)
    if method == "mse":
        return _mse_range(obs, bits, symmetric)
    if method == "percentile" and not symmetric:
        lo = _quantile(obs.hist, -obs.range, obs.width, 1 - percentile / 100)
        hi = _quantile(obs.hist, -obs.range, obs.width, percentile / 100)
        return float(max(lo, obs.min)), float(min(hi, obs.max))
    if method == "percentile":
        t = _quantile(obs.abs_hist(), 0.0, obs.width, percentile / 100)
    else:
        t = _entropy_threshold(obs, bits)
    t = float(min(t, amax))
    return (-t, t) if symmetric else (max(-t, obs.min), min(t, obs.max))


def _quantile(hist: np.ndarray, first_edge: float, width: float, q: float) -> float:
    """The value below which a fraction ``q`` of the counts lie, linear inside a bin."""
    cdf = np.cumsum(hist)  # (n,)
    target = q * cdf[-1]
    k = min(int(np.searchsorted(cdf, target)), len(hist) - 1)
    frac = (target - (cdf[k] - hist[k])) / hist[k] if hist[k] else 0.0
    return first_edge + (k + frac) * width


def _entropy_threshold(obs: Observer, bits: int) -> float:
    """TensorRT's threshold: the |x| clip whose 2**(bits-1)-level quantization keeps KL(P||Q) least.

    P is the |x| histogram cut at the candidate with the clipped outliers folded into its last bin;
    Q is the cut histogram merged into as many groups as levels and spread back evenly over the
    non-empty bins. Exact zeros are left out: TensorRT's ``hist[0] = hist[1]`` approximates that.
    """
    hist = obs.abs_hist().astype(np.float64)  # (B,)
    hist[0] -= obs.zeros
    levels = 2 ** (bits - 1)
    stop = int(np.flatnonzero(hist)[-1]) + 1  # candidates end at the last non-empty bin
    if stop <= levels:
        return stop * obs.width
    tail = np.append(np.cumsum(hist[::-1])[::-1], 0.0)  # (B+1,) tail[i] = hist[i:].sum()
    best_kl, best_i = math.inf, stop
    for i in range(levels, stop + 1):
        cut = hist[:i]  # (i,)
        p = cut.copy()
        p[-1] += tail[i]
        group = np.arange(i) * levels // i  # (i,) which quantized level each bin falls into
        sums = np.bincount(group, weights=cut, minlength=levels)  # (levels,)
        nonempty = np.bincount(group, weights=cut > 0, minlength=levels)  # (levels,)
        q = np.where(cut > 0, sums[group] / np.maximum(nonempty[group], 1), 0.0)  # (i,)
        kl = _kl(p, q)
        if kl <= best_kl:  # ties go to the wider threshold, as in TensorRT
            best_kl, best_i = kl, i
    return best_i * obs.width


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalized histograms; infinite where q misses mass that p has."""
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    p, q = p[mask] / p.sum(), q[mask] / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _mse_range(obs: Observer, bits: int, symmetric: bool) -> tuple[float, float]:
    """The range with the least expected squared error: rounding (s²/12) inside, clipping outside.

    Candidates are thresholds t at every bin edge below max|x|, and max|x| itself; the error of
    each is estimated from the histogram with prefix sums, so all candidates cost O(bins).
    """
    b, w = obs.bins, obs.width
    n = obs.hist.astype(np.float64)  # (2B,)
    n[b] -= obs.zeros  # exact zeros are exact after quantization
    c = (np.arange(-b, b) + 0.5) * w  # (2B,) bin centres
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(n * c**k)]) for k in range(3))  # (2B+1,) prefix sums
    t = np.append(np.arange(1, math.ceil(obs.amax / w)) * w, obs.amax)  # (K,) candidate thresholds
    if symmetric:
        lo, hi = -t, t
        step = t / (2 ** (bits - 1) - 1)  # (K,)
    else:
        lo, hi = np.maximum(-t, obs.min), np.minimum(t, obs.max)
        step = (np.maximum(hi, 0) - np.minimum(lo, 0)) / (2**bits - 1)
    a = np.searchsorted(c, lo, side="left")  # (K,) bins [0, a) are clipped up to lo
    z = np.searchsorted(c, hi, side="right")  # (K,) bins [z, 2B) are clipped down to hi
    below = p2[a] - 2 * lo * p1[a] + lo**2 * p0[a] + p0[a] * w**2 / 12
    n_above = p0[-1] - p0[z]
    above = (p2[-1] - p2[z]) - 2 * hi * (p1[-1] - p1[z]) + hi**2 * n_above + n_above * w**2 / 12
    inside = (p0[z] - p0[a]) * step**2 / 12
    k = int(np.argmin(below + above + inside))
    return float(lo[k]), float(hi[k])


def scale_zero_point(lo: float, hi: float, bits: int = 8, symmetric: bool = True) -> tuple[float, int]:
    """Scale and zero point mapping [lo, hi] onto the integer grid.

    Symmetric: signed -(2**(bits-1)-1) .. 2**(bits-1)-1 (±127 for int8), zero point 0, so the
    grid stays symmetric and int8 kernels can skip zero-point terms. Asymmetric: unsigned
    0 .. 2**bits-1 (0..255), the range widened to include 0 so that zero (padding, ReLU) is exact.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SlimkitError(f"quantization range ({lo}, {hi}) is not finite", "calibrate on finite data")
    if lo > hi:
        raise SlimkitError(f"quantization range ({lo}, {hi}) has lo > hi", "pass (min, max)")
    if symmetric:
        return max(max(-lo, hi) / (2 ** (bits - 1) - 1), _EPS), 0
    qmax = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, _EPS)
    return scale, int(min(max(round(-lo / scale), 0), qmax))
