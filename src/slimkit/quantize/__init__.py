"""Numerical precision: post-training int8 / weight-only int8 and int4 (GPTQ), fp16 / bf16 casts,
quantization-aware training, sensitivity-driven mixed precision, binary and ternary weights.

Each technique is one module (``int8``, ``weight_only``, ``cast``, ``qat``, ``mixed``, ``extreme``);
the layers they produce (``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``, half and bit-packed
layers) are stored with packed integer weights and run on real integer kernels.
"""

from slimkit.quantize.adaround import AdaRound, AdaRoundRecord
from slimkit.quantize.bias_correction import BiasCorrection, BiasCorrectionRecord
from slimkit.quantize.cast import BFloat16, Float16
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.quantize.equalization import CrossLayerEqualization, EqualizationRecord
from slimkit.quantize.extreme import Binary, Ternary
from slimkit.quantize.gptq import gptq_int4
from slimkit.quantize.half import HalfConv2d, HalfLinear
from slimkit.quantize.int8 import Int8
from slimkit.quantize.layer_error import LayerError, layer_errors
from slimkit.quantize.mixed import Mixed
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.qat import QAT
from slimkit.quantize.record import MixedRecord, QuantRecord, TrainedQuantRecord
from slimkit.quantize.smoothquant import SmoothQuant, SmoothQuantRecord
from slimkit.quantize.weight_only import WeightOnly

__all__ = ["AdaRound", "AdaRoundRecord", "BFloat16", "BiasCorrection", "BiasCorrectionRecord", "Binary",
           "CrossLayerEqualization", "EqualizationRecord", "Float16", "HalfConv2d", "HalfLinear", "Int8", "LayerError",
           "Mixed", "MixedRecord", "QAT", "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantRecord", "SmoothQuant",
           "SmoothQuantRecord", "Ternary", "TrainedQuantRecord",
           "WeightOnly", "gptq_int4", "layer_errors"]
