"""Architectural efficiency: BatchNorm folding and compilation, early exits, gated (cascaded) models."""

from __future__ import annotations

from slimkit.architecture.compile import compare_runtimes, compiled, inductor_available
from slimkit.architecture.early_exit import EarlyExit, EarlyExitConfig, attach_exits, default_exits, exit_loss
from slimkit.architecture.fuse import Fuse, find_pairs, fold_batchnorm
from slimkit.architecture.gating import Cascade
from slimkit.architecture.routing import Routed, calibrate, choose_thresholds, evaluate_routed, latency_over, simulate

__all__ = [
    "Cascade", "EarlyExit", "EarlyExitConfig", "Fuse", "Routed", "attach_exits", "calibrate", "choose_thresholds",
    "compare_runtimes", "compiled", "default_exits", "evaluate_routed", "exit_loss", "find_pairs", "fold_batchnorm",
    "inductor_available", "latency_over", "simulate",
]
