"""Architectural efficiency: BatchNorm folding and compilation, early exits, gated (cascaded) models."""

from __future__ import annotations

from slimkit.architecture.early_exit import EarlyExitConfig, attach_exits, exit_loss
from slimkit.architecture.encoder_exit import (
                                               EncoderClassifier,
                                               attach_encoder_exits,
                                               encoder_classifier,
                                               exit_features,
                                               fit_heads,
)
from slimkit.architecture.exit_model import EarlyExit, default_exits
from slimkit.architecture.fuse import Fuse, FuseRecord, compare_runtimes, compiled, inductor_available
from slimkit.architecture.gating import Cascade
from slimkit.architecture.routing import (
                                               Routed,
                                               calibrate,
                                               choose_exit_set,
                                               choose_thresholds,
                                               evaluate_routed,
                                               latency_over,
                                               simulate,
)
from slimkit.graph.batchnorm import find_pairs, fold_batchnorm

__all__ = [
    "Cascade", "EarlyExit", "FuseRecord", "EarlyExitConfig", "EncoderClassifier", "Fuse", "Routed", "attach_encoder_exits",
    "attach_exits", "calibrate", "choose_exit_set", "choose_thresholds", "compare_runtimes", "compiled", "default_exits",
    "encoder_classifier", "evaluate_routed", "exit_features", "exit_loss", "find_pairs", "fit_heads",
    "fold_batchnorm", "inductor_available", "latency_over", "simulate",
]
