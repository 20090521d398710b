from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.calibrate.ranges import METHODS, Observer, collect, compute_range, scale_zero_point
from slimkit.core.errors import SlimkitError


def _observe(x: torch.Tensor, bins: int = 2048, batches: int = 10) -> Observer:
    obs = Observer("t", bins=bins)
    for chunk in x.split(len(x) // batches):
        obs.update(chunk)
    return obs


def _fake_quant_mse(x: np.ndarray, t: float, bits: int) -> float:
    """Symmetric quantize-dequantize of the raw samples at threshold t: the ground truth for MSE.
    NumPy, single-threaded: torch's two threads stall on a loaded two-core machine."""
    qmax = 2 ** (bits - 1) - 1
    s = t / qmax
    return float(np.mean((x - np.clip(np.round(x / s), -qmax, qmax) * s) ** 2))


@pytest.fixture(scope="module")
def gauss_outliers():
    """200k samples of N(0,1) with ten planted outliers at ±50, as float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    x[torch.randperm(len(x), generator=g)[:10]] = torch.tensor([50.0, -50.0] * 5)
    return x


@pytest.fixture(scope="module")
def gauss_obs(gauss_outliers):
    return _observe(gauss_outliers)


def test_gaussian_with_outliers_ranges(gauss_obs):
    assert compute_range(gauss_obs, "minmax") == (-50.0, 50.0)
    assert compute_range(gauss_obs, "minmax", symmetric=False) == (-50.0, 50.0)
    lo, hi = compute_range(gauss_obs, "percentile")  # 10 outliers are 0.005% of the data
    assert lo == -hi and 3.8 < hi < 4.4  # |N(0,1)| quantile 0.99995 is 4.06
    lo, hi = compute_range(gauss_obs, "percentile", symmetric=False)
    assert -4.2 < lo < -3.4 and 3.4 < hi < 4.2  # each tail cut at 0.01%: N(0,1) quantile 3.72
    lo, hi = compute_range(gauss_obs, "entropy")
    assert lo == -hi and 3.0 < hi < 6.0
    assert 2.3 < compute_range(gauss_obs, "mse", bits=4)[1] < 3.0  # N(0,1) at 15 levels: about 2.6
    # At 8 bits MSE rightly keeps the outliers: clipping ten values of 50 to ~4 costs
    # 10 * 46² / 200k ≈ 0.1 per element, keeping them costs (50/127)² / 12 ≈ 0.013 in rounding.
    assert 40.0 < compute_range(gauss_obs, "mse", bits=8)[1] <= 50.0
    assert all(isinstance(v, float) for m in METHODS for v in compute_range(gauss_obs, m))


def test_growing_histogram_equals_one_shot_histogram():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5000, generator=g) * 4.0**k for k in range(5)]  # R doubles on most batches
    batches[0][:3] = torch.tensor([1.0, 0.0, -0.0])  # exact power of two (strictly below R) and zeros
    batches[2][:2] = torch.tensor([-2.0**-20, 3e-39])  # tiny and subnormal values
    obs = Observer("t", bins=256)
    ranges = []
    for b in batches:
        obs.update(b)
        ranges.append(obs.range)
    x = torch.cat(batches).double().numpy()
    amax = np.abs(x).max()
    assert ranges == sorted(ranges) and ranges[-1] > ranges[0]
    assert obs.range / 2 <= amax < obs.range and np.log2(obs.range).is_integer()
    expected, edges = np.histogram(x, bins=2 * obs.bins, range=(-obs.range, obs.range))
    np.testing.assert_array_equal(obs.hist, expected)
    np.testing.assert_array_equal(obs.edges(), edges)
    assert (obs.min, obs.max) == (x.min(), x.max())
    assert obs.count == x.size == obs.hist.sum()
    assert obs.zeros == int((x == 0).sum()) >= 2
    np.testing.assert_array_equal(obs.abs_hist(), np.histogram(np.abs(x), bins=256, range=(0, obs.range))[0])


def test_default_observer_has_2048_bins_per_side():
    obs = Observer()
    obs.update(torch.tensor([0.3, -0.2]))
    assert obs.hist.shape == (4096,) and obs.abs_hist().shape == (2048,) and obs.range == 0.5


def _reference_entropy_bin(hist: np.ndarray, levels: int = 128) -> int:
    """Straightforward port of NVIDIA pytorch-quantization's ``_compute_amax_entropy`` (TensorRT's
    algorithm) over an |x| histogram, minus its ``bins[0] = bins[1]`` zero-spike tweak."""
    divergences = []
    for i in range(levels, len(hist) + 1):
        space = np.linspace(0, i, num=levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[hist[:i] == 0] = -1
        density = np.zeros(levels)
        for idx, d in enumerate(digitized):
            if d != -1:
                density[d] += hist[idx]
        for key, n in Counter(digitized).items():
            if key != -1:
                density[key] /= n
        q = np.array([density[d] if d != -1 else 0.0 for d in digitized])
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        divergences.append(np.inf if np.any(q[mask] == 0) else np.sum(p[mask] * np.log(p[mask] / q[mask])))
    divergences = np.array(divergences)
    return len(divergences) - 1 - int(np.argmin(divergences[::-1])) + levels


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_entropy_matches_tensorrt_reference(dist):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100_000, generator=g)
    if dist == "laplace":
        x = torch.log(torch.rand(100_000, generator=g)) * torch.sign(x)  # (N,) Laplace(0, 1)
    obs = _observe(x, bins=512)
    hist = obs.abs_hist()
    hist = hist[: np.flatnonzero(hist)[-1] + 1]  # TensorRT's histogram ends at max|x|
    expected = _reference_entropy_bin(hist) * obs.width
    assert abs(compute_range(obs, "entropy")[1] - expected) <= obs.width


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_threshold_is_near_brute_force_optimum(gauss_outliers, gauss_obs, bits):
    t, x = compute_range(gauss_obs, "mse", bits=bits)[1], gauss_outliers.double().numpy()
    candidates = np.geomspace(1.0, 50.0, 300)
    best = min(_fake_quant_mse(x, c, bits) for c in candidates)
    assert _fake_quant_mse(x, t, bits) <= 1.02 * best


def test_uniform_data_thresholds_reach_the_max():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(3)) * 2 - 1
    obs = _observe(x)
    for method in ("percentile", "entropy", "mse"):
        lo, hi = compute_range(obs, method)
        assert lo == -hi and 0.98 * obs.amax <= hi <= obs.amax, method


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_collect_observes_named_module_inputs_and_outputs():
    model = _mlp().train()
    batches = [(torch.randn(32, 8),) for _ in range(4)]
    obs = collect(model, ["0", "2"], batches)
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for (x,) in batches])  # (128, 16) post-ReLU
    assert obs["2"].min >= 0 and (obs["2"].min, obs["2"].max) == (hidden.min().item(), hidden.max().item())
    inputs = torch.cat([x for (x,) in batches])
    assert (obs["0"].min, obs["0"].max) == (inputs.min().item(), inputs.max().item())
    assert obs["2"].count == hidden.numel() and obs["2"].zeros == int((hidden == 0).sum())
    for method in METHODS:
        lo, hi = compute_range(obs["2"], method, symmetric=False)
        assert lo == 0.0 < hi <= hidden.max().item()
    assert model.training  # mode restored
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())

    out = collect(model, ["0"], batches, which="output", progress=True)["0"]
    with torch.no_grad():
        first = torch.cat([model[0](x) for (x,) in batches])
    assert (out.min, out.max) == (first.min().item(), first.max().item())


def test_hooks_are_removed_when_a_batch_fails():
    model = _mlp()
    batches = [(torch.randn(4, 8),), (torch.randn(4, 3),)]  # second batch has the wrong width
    with pytest.raises(SlimkitError, match="calibration batch 1"):
        collect(model, ["0", "2"], batches)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_non_finite_calibration_data_names_the_module():
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(SlimkitError, match="'0'.*NaN or Inf") as err:
        collect(_mlp(), ["0", "2"], [(x,)])
    assert "\n" not in str(err.value) and err.value.hint
    with pytest.raises(SlimkitError, match="'act'"):
        Observer("act").update(torch.tensor([1.0, float("inf")]))


def test_bad_calibration_requests_give_clear_errors():
    with pytest.raises(SlimkitError, match="calibration set is empty") as err:
        collect(_mlp(), ["0"], [])
    assert err.value.hint == "give the task calibration batches"
    with pytest.raises(SlimkitError, match="calibration set is empty"):
        collect(_mlp(), ["0"], iter(()))
    with pytest.raises(SlimkitError, match="no module named 'fc9'"):
        collect(_mlp(), ["fc9"], [(torch.randn(2, 8),)])
    with pytest.raises(SlimkitError, match="no calibration data reached 'lonely'"):
        compute_range(Observer("lonely"), "minmax")
    obs = Observer("t")
    obs.update(torch.randn(100))
    with pytest.raises(SlimkitError, match="use one of minmax, percentile, entropy, mse"):
        compute_range(obs, "kl")
    with pytest.raises(SlimkitError, match="power of two"):
        Observer(bins=1000)


def test_all_zero_data_gives_a_zero_range():
    obs = Observer("z")
    obs.update(torch.zeros(10))
    assert obs.range == 0.0 and obs.zeros == 10
    assert all(compute_range(obs, m) == (0.0, 0.0) for m in METHODS)
    assert scale_zero_point(0.0, 0.0) == (torch.finfo(torch.float32).eps, 0)
    obs.update(torch.tensor([0.0, 3.0]))  # zeros seen before the first nonzero stay counted
    assert obs.range == 4.0 and obs.hist[obs.bins] == 11 and obs.hist.sum() == 12


def test_scale_zero_point_against_hand_computation():
    assert scale_zero_point(-2.0, 3.0) == (3.0 / 127, 0)
    assert scale_zero_point(-2.0, 3.0, bits=4) == (3.0 / 7, 0)
    assert scale_zero_point(-1.0, 3.0, symmetric=False) == (4.0 / 255, 64)  # 1 / (4/255) = 63.75
    assert scale_zero_point(0.5, 2.0, symmetric=False) == (2.0 / 255, 0)  # widened to include 0
    assert scale_zero_point(-3.0, -1.0, symmetric=False) == (3.0 / 255, 255)
    with pytest.raises(SlimkitError, match="not finite"):
        scale_zero_point(float("-inf"), 1.0)
    with pytest.raises(SlimkitError, match="lo > hi"):
        scale_zero_point(1.0, -1.0)
