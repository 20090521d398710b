"""Numerical precision techniques. Import a config and pass it to ``slimkit.apply``.

``Int8`` (dynamic or static activations) and ``WeightOnly`` (int8 / int4) turn layers into
``QuantLinear`` / ``QuantConv2d`` holding packed integer weights (and embedding tables into
int8-row ``QuantEmbedding``); ``Float16`` / ``BFloat16``
cast the whole model.
"""

from slimkit.quantize import ptq  # noqa: F401  (registers the PTQ handlers)
from slimkit.quantize.calibrate import collect, compute_range
from slimkit.quantize.cast import BFloat16, Float16
from slimkit.quantize.configs import Int8, WeightOnly
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.quantize.layer_error import LayerError, layer_errors
from slimkit.quantize.half import HalfConv2d, HalfLinear
from slimkit.quantize.mixed import Mixed
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.extreme import Binary, Ternary
from slimkit.quantize.gptq import gptq_int4
from slimkit.quantize.qat import QAT

__all__ = ["Binary", "HalfConv2d", "HalfLinear", "Mixed", "QAT", "Ternary", "BFloat16", "Float16", "Int8", "LayerError", "QuantConv2d", "QuantEmbedding", "QuantLinear", "WeightOnly", "collect",
           "compute_range", "gptq_int4", "layer_errors"]
