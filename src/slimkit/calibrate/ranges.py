"""Calibration for post-training quantization: observe activations once, then choose their ranges.

Running the calibration set through the model is the expensive part; choosing a range from the
statistics is cheap. So ``collect`` passes over the data once, and ``compute_range`` can then try
minmax, percentile, entropy and MSE on the same observers (NNCF's habit of sharing statistics).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import each

METHODS = ("minmax", "percentile", "entropy", "mse")
_EPS = float(torch.finfo(torch.float32).eps)  # least scale, as in torch.ao observers: zero ranges stay finite


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
        self.min, self.max = math.inf, -math.inf
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
        x = x.detach().flatten().to(torch.float64 if x.dtype == torch.float64 else torch.float32)  # (N,)
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
        for part in x.split(1 << 20):  # a million values at a time: a whole batch's int64 indices are 2x its size
            idx = torch.floor(part * (self.bins / self.range)).long() + self.bins  # (n,) in [0, 2*bins)
            self.hist += torch.bincount(idx, minlength=2 * self.bins).cpu().numpy()

    def _grow(self, exp: int) -> None:
        """Make R at least 2**exp by doubling it, merging bin pairs so counts stay exact."""
        if self._exp is None:
            self._exp = exp
        while self._exp < exp:
            pairs = self.hist.reshape(self.bins, 2).sum(axis=1)  # (bins,) old pairs, aligned at zero
            self.hist = np.zeros_like(self.hist)
            self.hist[self.bins // 2:3 * self.bins // 2] = pairs  # old [-R, R) is the middle of new [-2R, 2R)
            self._exp += 1


def collect(model: nn.Module, module_names: list[str], batches: Iterable[tuple[Tensor, ...]], *,
            which: str = "input", progress: bool = False) -> dict[str, Observer]:
    """Observe the first tensor input (or the output) of each named module over all batches, once.

    Runs ``model(*batch)`` (tensors moved to the model's device) for every batch in eval mode under
    ``torch.inference_mode`` and returns one ``Observer`` per name. Hooks are removed and the
    model's train/eval mode restored even when a batch fails.
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
            m, hook = modules[name], _hook(obs, which)
            handles.append(m.register_forward_pre_hook(hook) if which == "input" else m.register_forward_hook(hook))
        model.eval()
        batches = each(batches, "calibrating", enabled=progress)
        device = next(iter(model.parameters()), torch.empty(0)).device
        seen = 0
        with torch.inference_mode():
            for batch in batches:
                args = (batch,) if isinstance(batch, Tensor) else tuple(batch)
                try:
                    model(*(a.to(device) if isinstance(a, Tensor) else a for a in args))
                except SlimkitError:
                    raise
                except Exception as err:  # noqa: BLE001 - torch errors from deep inside become one line
                    first = (str(err).strip().splitlines() or [""])[0]
                    raise SlimkitError(f"model failed on calibration batch {seen}: {type(err).__name__}: {first}",
                                       "check that each batch is a tuple of the model's positional inputs") from err
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise SlimkitError("calibration set is empty", "give the task calibration batches")
    return observers


@contextlib.contextmanager
def observer_hooks(modules: dict[str, nn.Module], which: str = "input") -> Iterator[dict[str, Observer]]:
    """One ``Observer`` per named module, fed its first tensor input (or output) while the ``with``
    body runs forwards: ``collect`` on any part of a model (e.g. one block at a time)."""
    observers = {name: Observer(name) for name in modules}
    handles = []
    try:
        for name, m in modules.items():
            hook = _hook(observers[name], which)
            handles.append(m.register_forward_pre_hook(hook) if which == "input" else m.register_forward_hook(hook))
        yield observers
    finally:
        for handle in handles:
            handle.remove()


def _hook(obs: Observer, which: str) -> Callable[..., None]:
    """A hook feeding ``obs`` the first tensor among a module's positional inputs, or its outputs."""
    def hook(module: nn.Module, args: tuple, output: Any = None) -> None:  # pre-hooks get no output
        values = args if which == "input" else output
        values = values if isinstance(values, (tuple, list)) else (values,)
        x = next((v for v in values if isinstance(v, Tensor)), None)
        if x is None:
            other = "output" if which == "input" else "input"
            raise SlimkitError(f"module {obs.name!r} has no tensor {which}", f"use which={other!r}")
        obs.update(x)
    return hook


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
        lo, hi = _quantiles(obs, (1 - percentile / 100, percentile / 100), absolute=False)
        return max(lo, obs.min), min(hi, obs.max)
    if method == "percentile":
        t = _quantiles(obs, (percentile / 100,), absolute=True)[0]
    else:
        t = _entropy_threshold(obs, bits)
    t = float(min(t, amax))
    return (-t, t) if symmetric else (max(-t, obs.min), min(t, obs.max))


def _quantiles(obs: Observer, qs: tuple[float, ...], absolute: bool) -> list[float]:
    """Values below which fractions ``qs`` of x (or of |x|) lie, linear inside a bin.

    Exact zeros get a zero-width bin of their own: post-ReLU zeros are a point mass, and spreading
    them over [0, w) would put a quantile inside that bin.
    """
    hist, edges, k = (obs.abs_hist(), obs.edges()[obs.bins:], 0) if absolute else (obs.hist, obs.edges(), obs.bins)
    edges = np.insert(edges, k, 0.0)  # (n+2,)
    counts = np.insert(hist, k, obs.zeros).astype(np.float64)  # (n+1,)
    counts[k + 1] -= obs.zeros
    cdf = np.cumsum(counts)  # (n+1,)
    target = np.asarray(qs) * cdf[-1]  # (Q,)
    j = np.minimum(np.searchsorted(cdf, target), len(counts) - 1)  # (Q,) bin holding each quantile
    frac = np.where(counts[j] > 0, (target - cdf[j] + counts[j]) / np.maximum(counts[j], 1), 0.0)
    return [float(v) for v in edges[j] + frac * (edges[j + 1] - edges[j])]


def _entropy_threshold(obs: Observer, bits: int) -> float:
    """TensorRT's threshold: the |x| clip whose 2**(bits-1)-level quantization keeps KL(P||Q) least.

    P: the |x| histogram cut at candidate bin i (i >= 2**(bits-1): t >= R/16 at 8 bits, 2048 bins),
    clipped outliers folded into its last bin. Q: the cut merged into as many groups as levels, spread
    back evenly over its non-empty bins. Exact zeros are left out (TensorRT's hist[0] = hist[1] hack).
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
        mask = p > 0
        if np.any(q[mask] == 0):  # Q misses mass that P has: KL is infinite
            continue
        p, q = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float(np.sum(p * np.log(p / q)))
        if kl <= best_kl:  # ties go to the wider threshold, as in TensorRT
            best_kl, best_i = kl, i
    return best_i * obs.width


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
    below = p2[a] - 2 * lo * p1[a] + (lo**2 + w**2 / 12) * p0[a]  # sum of (c - lo)², + in-bin spread
    above = (p2[-1] - p2[z]) - 2 * hi * (p1[-1] - p1[z]) + (hi**2 + w**2 / 12) * (p0[-1] - p0[z])
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
