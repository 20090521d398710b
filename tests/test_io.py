import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit import io
from slimkit.zoo.digits import build_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model().eval()


def test_round_trip_is_bit_identical_and_rebuilt_from_the_builder(tmp_path):
    model = _model()
    x = torch.randn(5, 1, 8, 8)
    path = sk.save(model, tmp_path / "m", recipe=[{"type": "quantize.Float16", "version": 1}])
    loaded = sk.load(path)  # no model given: rebuilt by the registered builder named in slimkit.json
    assert type(loaded) is type(model)
    assert torch.equal(loaded(x), model(x))
    meta = io.read_meta(path)
    assert meta["builder"] == {"name": "digits_cnn", "kwargs": {"width": 16, "classes": 10}}
    assert meta["recipe"][0]["type"] == "quantize.Float16"
    assert meta["versions"]["torch"] == torch.__version__


def test_artifact_bytes_are_the_bytes_on_disk(tmp_path):
    model = _model()
    path = sk.save(model, tmp_path / "m")
    on_disk = sum(os.path.getsize(p) for p in path.iterdir())
    assert io.artifact_bytes(path) == on_disk
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    weights = (path / io.WEIGHTS).stat().st_size
    assert tensor_bytes < weights < tensor_bytes + 8192  # header is small, data is exact
    half = sk.save(sk.apply(model, sk.quantize.Float16()), tmp_path / "h")
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())
    assert weights - (half / io.WEIGHTS).stat().st_size == pytest.approx(float_bytes / 2, rel=0.01)


def test_save_replaces_an_existing_artifact_and_leaves_no_temp_files(tmp_path):
    sk.save(nn.Linear(4, 4), tmp_path / "m")
    sk.save(nn.Linear(4, 8), tmp_path / "m")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[:2] == [".m.lock", os.readlink(tmp_path / "m")] and names[2] == "m"
    assert io.load_state(tmp_path / "m")["weight"].shape == (8, 4)


def test_a_failing_save_leaves_nothing_behind(tmp_path, monkeypatch):
    from slimkit.io import artifact

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_bytes", boom)
    with pytest.raises(OSError):
        sk.save(nn.Linear(2, 2), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]  # the lock file stays: deleting one is racy


class _Payload:
    """A pickle that writes a file when unpickled: what a malicious checkpoint does."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, evil)
    with pytest.raises(sk.SlimkitError) as info:
        io.read_torch_file(evil)
    assert "holds code, not just weights" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"  # a bare pickle (not a torch zip) with the same payload
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(sk.SlimkitError):
        io.read_torch_file(raw)
    assert not marker.exists()


def test_plain_state_dict_checkpoints_are_read(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    state = io.read_torch_file(tmp_path / "ok.pth")
    fresh = build_model()
    io.load_into(fresh, state)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model(x))


def test_corrupt_and_truncated_files_get_one_line_errors(tmp_path):
    path = sk.save(_model(), tmp_path / "m")
    weights = path / io.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(sk.SlimkitError, match="corrupt or truncated") as info:
        sk.load(path)
    assert "\n" not in str(info.value)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(sk.SlimkitError, match="corrupt or truncated"):
        io.load_state(path)
    torch.save(_model().state_dict(), tmp_path / "ck.pt")
    (tmp_path / "ck.pt").write_bytes((tmp_path / "ck.pt").read_bytes()[:300])
    with pytest.raises(sk.SlimkitError, match="corrupt or truncated"):
        io.read_torch_file(tmp_path / "ck.pt")
    (path / io.META).write_text("{not json")
    with pytest.raises(sk.SlimkitError, match="slimkit.json is corrupt"):
        sk.load(path)


def test_artifact_cannot_name_arbitrary_code_as_its_builder(tmp_path):
    path = sk.save(_model(), tmp_path / "m")
    meta = json.loads((path / io.META).read_text())
    meta["builder"] = {"name": "os:system", "kwargs": {"command": f"touch {tmp_path}/ran"}}
    (path / io.META).write_text(json.dumps(meta))
    with pytest.raises(sk.SlimkitError, match="unknown model builder 'os:system'"):
        sk.load(path)
    assert not (tmp_path / "ran").exists()


def test_shape_mismatch_missing_keys_and_nan_weights(tmp_path):
    path = sk.save(_model(), tmp_path / "m")
    with pytest.raises(sk.SlimkitError, match=r"has shape .* model expects"):
        sk.load(path, model=build_model(width=8))
    with pytest.raises(sk.SlimkitError, match="missing 1 tensor"):
        io.load_into(nn.Linear(2, 2), {"weight": torch.zeros(2, 2)})
    bad = nn.Linear(2, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    nan_path = sk.save(bad, tmp_path / "nan")
    with pytest.raises(sk.SlimkitError, match="weight contains NaN"):
        sk.load(nan_path, model=nn.Linear(2, 2))


def test_loading_something_that_is_not_an_artifact(tmp_path):
    with pytest.raises(sk.SlimkitError, match="not a slimkit artifact"):
        sk.load(tmp_path)
    zipfile.ZipFile(tmp_path / "z.pt", "w").close()
    with pytest.raises(sk.SlimkitError):
        io.read_torch_file(tmp_path / "z.pt")
