import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import yaml

import slimkit as sk
from slimkit.core.config import BaseConfig, registered_configs, technique

ALL_CONFIGS = sorted(registered_configs().items())


@pytest.mark.parametrize("name,cls", ALL_CONFIGS, ids=[n for n, _ in ALL_CONFIGS])
def test_every_registered_config_round_trips_json_and_yaml(name, cls):
    config = cls()
    data = config.to_dict()
    assert data["type"] == name and data["version"] == cls.version
    assert BaseConfig.from_dict(json.loads(json.dumps(data))) == config
    assert BaseConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == config
    assert cls.from_json(config.to_json()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.anything = 1  # configs are frozen: a recipe cannot change under a running technique


def test_at_least_the_cast_configs_are_registered():
    assert {"quantize.Float16", "quantize.BFloat16"} <= set(registered_configs())


@technique("test.Scale", stage="prune")
@dataclasses.dataclass(frozen=True)
class Scale(BaseConfig):
    factor: float = 2.0
    layers: tuple[str, ...] = ()

    def apply_to(self, model: nn.Module, task) -> nn.Module:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.factor)
        return model


def test_tuple_fields_survive_the_round_trip():
    c = Scale(factor=3.0, layers=("a", "b"))
    assert BaseConfig.from_dict(json.loads(c.to_json())) == c


def test_apply_copies_unless_inplace():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    out = sk.apply(model, Scale(factor=2.0))
    assert torch.equal(model.weight, before)
    assert torch.allclose(out.weight, 2 * before)
    out2 = sk.apply(model, [Scale(factor=2.0), Scale(factor=3.0)], inplace=True)
    assert out2 is model
    assert torch.allclose(model.weight, 6 * before)


@pytest.mark.parametrize("data,message", [
    ({"type": "nope.Nothing"}, "unknown technique type 'nope.Nothing'"),
    ({"type": "test.Scale", "version": 99}, "version 99 is not supported"),
    ({"type": "test.Scale", "bogus": 1}, "unknown option(s) bogus"),
    (["not", "a", "dict"], "config must be a mapping"),
])
def test_invalid_configs_get_one_line_errors(data, message):
    with pytest.raises(sk.SlimkitError) as info:
        BaseConfig.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_json_and_non_config_inputs():
    with pytest.raises(sk.SlimkitError, match="not valid JSON"):
        BaseConfig.from_json("{type: ")
    with pytest.raises(sk.SlimkitError, match="not a technique config"):
        sk.apply(nn.Linear(2, 2), [{"type": "test.Scale"}])
