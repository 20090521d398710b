"""Hardware-aware NAS for CNN and transformer-encoder families: search spaces, weight-sharing supernet, latency table, search."""

from __future__ import annotations

from slimkit.nas.arch_search import Evaluation, SupernetEvaluator, TrainEvaluator, best_feasible, evolve, optuna_search
from slimkit.nas.cnn import CNN, CNNArch, CNNSpace, arch_of, build, build_cnn, param_count
from slimkit.nas.encoder import ArchRecord, Encoder, EncoderArch, EncoderSpace, subnet
from slimkit.nas.encoder_search import EncoderEvaluator, LatencyModel
from slimkit.nas.predictor import LatencyPredictor, layer_keys, measure_arch, measure_archs
from slimkit.nas.supernet import SuperCNN, conv_slice, recalibrate_bn, train_supernet

__all__ = [
    "ArchRecord", "CNN", "CNNArch", "CNNSpace", "Encoder", "EncoderArch", "EncoderEvaluator", "EncoderSpace", "Evaluation",
    "LatencyModel", "subnet", "LatencyPredictor", "SuperCNN", "SupernetEvaluator", "TrainEvaluator", "arch_of",
    "best_feasible", "build", "build_cnn", "conv_slice", "evolve", "layer_keys", "measure_arch", "measure_archs", "optuna_search",
    "param_count", "recalibrate_bn", "train_supernet",
]
