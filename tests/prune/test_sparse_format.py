import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import slimkit as sk
from slimkit import io, prune
from slimkit.core.record import last_record
from slimkit.formats import sparse as sf
from slimkit.io import artifact
from slimkit.prune import sparse_linear
from slimkit.prune.sparse_linear import MIN_WEIGHTS, SparseLinear, crossover_for, sparse_is_faster


def _sparse(shape: tuple[int, ...], sparsity: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen).to(dtype)
    drop = torch.randperm(t.numel(), generator=gen)[: round(sparsity * t.numel())]
    t.view(-1)[drop] = 0
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("fmt", sf.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_encode_decode_is_bit_identical(fmt, dtype):
    for shape in ((300,), (64, 48), (16, 8, 3, 3)):
        t = _sparse(shape, 0.8, dtype)
        t.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype)  # kept as values
        parts = sf.encode(t, fmt)
        back = sf.decode(parts, {"format": fmt, "shape": list(shape), "dtype": str(dtype)[6:]})
        assert back.dtype == dtype and back.shape == t.shape
        assert torch.equal(_bits(back), _bits(t))


def test_the_smaller_format_is_chosen_and_small_or_dense_tensors_stay_dense():
    assert sf.choose(_sparse((512, 512), 0.9)) == "bitmask"  # 1/32 + 0.10 of dense vs 0.15
    assert sf.choose(_sparse((512, 512), 0.99)) == "csr"  # 0.015 vs 0.041
    assert sf.choose(_sparse((512, 512), 0.1)) is None
    assert sf.choose(_sparse((16, 16), 0.99)) is None  # below MIN_NUMEL
    assert sf.choose(torch.zeros(4096, dtype=torch.int64)) is None  # integer tensors are not touched
    sizes = sf.encoded_bytes(1000, 100, 4, (10, 100))
    assert sizes == {"dense": 4000, "bitmask": 125 + 400, "csr": 11 * 4 + 100 * (2 + 4)}


def _pruned(amount: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256))
    return sk.apply(model, prune.Magnitude(amount=amount))


@pytest.mark.parametrize("amount, max_ratio", [(0.9, 0.15), (0.99, 0.03)])
def test_pruned_artifact_really_shrinks_and_reloads_bit_identically(tmp_path, amount, max_ratio):
    model = _pruned(amount)
    dense = sk.save(model, tmp_path / "dense", sparse=False)
    small = sk.save(model, tmp_path / "small")
    ratio = io.artifact_bytes(small) / io.artifact_bytes(dense)
    assert ratio <= max_ratio
    meta = io.read_meta(small)
    assert set(meta["sparse"]) == {"0.weight", "2.weight"}  # biases are dense: stored as they are
    assert {n: e["format"] for n, e in meta["sparse"].items()} == {n: sf.choose(model.state_dict()[n])
                                                                   for n in meta["sparse"]}
    back = sk.load(small, model=nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256)))
    for name, t in model.state_dict().items():
        assert torch.equal(_bits(back.state_dict()[name]), _bits(t)), name
    assert torch.equal(io.load_state(small / io.WEIGHTS)["0.weight"], model[0].weight)  # the file alone decodes


def test_dense_models_are_saved_exactly_as_before(tmp_path):
    path = sk.save(nn.Linear(256, 256), tmp_path / "m")
    assert "sparse" not in io.read_meta(path)
    assert set(load_file(str(path / io.WEIGHTS))) == {"weight", "bias"}


def test_corrupt_or_mismatched_sparse_tensors_get_clear_errors(tmp_path):
    path = sk.save(_pruned(0.99), tmp_path / "m")
    file = path / io.WEIGHTS
    stored = load_file(str(file))
    table = json.loads(artifact._header_metadata(file)[artifact.SPARSE_KEY])

    def rewrite(parts: dict, meta: dict | None) -> None:
        save_file(parts, str(file), metadata=None if meta is None else {artifact.SPARSE_KEY: json.dumps(meta)})

    bad_col = dict(stored, **{"0.weight::col": stored["0.weight::col"] + 600})
    rewrite(bad_col, table)
    with pytest.raises(sk.SlimkitError, match=r"sparse tensor 0.weight in .* is corrupt \(column index"):
        io.load_state(file)  # the file alone: the artifact's checksum would catch the edit first
    short = dict(stored, **{"0.weight::values": stored["0.weight::values"][:-1]})
    rewrite(short, table)
    with pytest.raises(sk.SlimkitError, match="is corrupt"):
        io.load_state(file)
    rewrite(stored, None)
    with pytest.raises(sk.SlimkitError, match="have no description in the metadata"):
        io.load_state(file)
    rewrite({k: v for k, v in stored.items() if not k.startswith("2.weight")}, table)
    with pytest.raises(sk.SlimkitError, match="2.weight is described but not stored"):
        io.load_state(file)
    wrong_dtype = dict(table, **{"0.weight": dict(table["0.weight"], dtype="float16")})
    rewrite(stored, wrong_dtype)
    with pytest.raises(sk.SlimkitError, match="values missing or of the wrong dtype") as info:
        io.load_state(file)
    assert "\n" not in str(info.value)
    bitmask = sk.save(_pruned(0.9), tmp_path / "b")
    parts = load_file(str(bitmask / io.WEIGHTS))
    parts["0.weight::mask"] = parts["0.weight::mask"] ^ 1  # flip one bit per byte: counts disagree
    save_file(parts, str(bitmask / io.WEIGHTS), metadata=artifact._header_metadata(path / io.WEIGHTS) and
              {artifact.SPARSE_KEY: json.dumps(io.read_meta(bitmask)["sparse"])})
    with pytest.raises(sk.SlimkitError, match="bitmask marks"):
        io.load_state(bitmask / io.WEIGHTS)


def test_sparse_linear_matches_dense():
    dense = _pruned(0.95)[0]
    x = torch.randn(3, 7, 512)  # (batch, tokens, in)
    sparse = SparseLinear.from_dense(dense)
    err = (sparse(x) - dense(x)).abs().max().item()
    assert sparse(x).shape == (3, 7, 1024) and err < 1e-5
    no_bias = nn.Linear(512, 64, bias=False)
    assert (SparseLinear.from_dense(no_bias)(x[0]) - no_bias(x[0])).abs().max().item() < 1e-5
    assert sparse.sparsity == pytest.approx(float((dense.weight == 0).float().mean()), abs=1e-3)


def test_sparsify_follows_the_measured_rule_and_the_artifact_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8))
    model = sk.apply(model, prune.Magnitude(amount=0.99, scope="layer", targets=("0", "4")))
    assert model[0].weight.numel() >= MIN_WEIGHTS
    x = torch.randn(32, 1024)
    ref = model(x)
    fast = prune.sparsify(sk.apply(model, []), batch=32)
    assert last_record(fast).converted == ["0"]  # "2" is dense, "4" is too small to have been measured
    assert "below the smallest measured layer" in last_record(fast).decisions["4"]
    assert (fast(x) - ref).abs().max().item() < 1e-5
    assert sparse_is_faster(model[0], 32)[0] and not sparse_is_faster(model[2], 32)[0]
    assert crossover_for(32, threads=2) <= 0.99  # the measured rule this test relies on
    path = sk.save(fast, tmp_path / "m")
    assert io.read_meta(path)["modules"]["0"]["class"] == "prune.SparseLinear"
    back = sk.load(path, model=nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                             nn.Linear(1024, 8)))
    assert isinstance(back[0], SparseLinear) and torch.equal(back(x), fast(x))


def test_the_rule_uses_the_nearest_measured_batch_and_thread_count(monkeypatch):
    monkeypatch.setattr(sparse_linear, "CROSSOVER", {1: {1: 0.7, 32: 0.8, 256: None}, 2: {1: 0.9, 32: 0.95, 256: None}})
    assert crossover_for(1, threads=1) == 0.7 and crossover_for(4, threads=2) == 0.9
    assert crossover_for(12, threads=2) == 0.95 and crossover_for(100, threads=8) is None
    layer = nn.Linear(1024, 1024)
    with torch.no_grad():
        layer.weight[:, 40:] = 0  # 96% zeros
    assert sparse_is_faster(layer, 1)[0] and not sparse_is_faster(layer, 1000)[0]
    with pytest.raises(sk.SlimkitError, match="batch=0"):
        crossover_for(0)
