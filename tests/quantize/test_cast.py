import pytest
import torch

import slimkit as sk
from slimkit import io
from tests.conftest import sqnr_db


@pytest.mark.parametrize("config,dtype,min_sqnr", [
    (sk.quantize.Float16(), torch.float16, 50.0),
    (sk.quantize.BFloat16(), torch.bfloat16, 30.0),
    (sk.quantize.Float16(keep_norms_fp32=True), torch.float16, 50.0),
])
def test_cast_keeps_outputs_close_halves_bytes_and_accuracy(digits_task, tmp_path, config, dtype, min_sqnr):
    model = digits_task.model
    half = sk.apply(model, config, digits_task)
    assert next(model.parameters()).dtype == torch.float32  # caller's model untouched
    assert half[0].weight.dtype == dtype
    x = torch.cat([b[0][0] for b in digits_task.eval])
    with torch.inference_mode():
        ref, out = model(x), half(x)
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) >= min_sqnr
    assert abs(digits_task.evaluate(half)["score"] - digits_task.evaluate()["score"]) <= 0.005
    full = io.artifact_bytes(sk.save(model, tmp_path / "fp32"))
    small = io.artifact_bytes(sk.save(half, tmp_path / "half"))
    ratio = full / small
    if config.keep_norms_fp32:
        assert 1.8 < ratio < 2.0
    else:
        assert 1.9 < ratio < 2.0  # the int64 BN counters and the header stay as they are
