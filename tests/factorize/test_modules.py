"""Factorized models save and reload through slimkit.io with identical outputs and smaller artifacts."""

import pytest
import torch

import slimkit as sk
from slimkit.factorize import CP, SVD, Tucker
from slimkit.prune import Channels


@pytest.mark.parametrize("config", [SVD(rank_ratio=0.3, targets="all"), Tucker(ratio=0.3), CP(ratio=0.3, iters=20)],
                         ids=["svd", "tucker", "cp"])
def test_factorized_artifact_reloads_with_identical_outputs(tmp_path, mnist_task, config):
    model = sk.apply(mnist_task.model, config)
    path = sk.save(model, tmp_path / "m", recipe=[config.to_dict()])
    loaded = sk.load(path)
    x = torch.cat([b[0] for b in mnist_task.calib[:2]])  # (128, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    original = sk.save(mnist_task.model, tmp_path / "orig")
    assert sk.io.artifact_bytes(path) < 0.45 * sk.io.artifact_bytes(original)


def test_pruned_then_factorized_artifact_reloads(tmp_path, digits_task):
    pruned = sk.apply(digits_task.model, Channels(amount=0.5), digits_task)
    model = sk.apply(pruned, SVD(rank_ratio=0.4, targets="all"))
    loaded = sk.load(sk.save(model, tmp_path / "m"))
    x = torch.cat([b[0] for b in digits_task.calib])
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
