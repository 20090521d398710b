"""Pruning: unstructured magnitude, structured channels/heads with dependency groups, N:M, schedules."""

from __future__ import annotations

from slimkit.prune.channels import Channels
from slimkit.prune.lottery import Ticket, find_ticket, reinit_like
from slimkit.prune.magnitude import Magnitude, magnitude_masks
from slimkit.prune.masks import apply_masks, global_sparsity, layer_sparsity, masked, masks_from_zeros
from slimkit.prune.nm import NM, is_nm, nm_mask, sparsegpt_nm, to_semi_structured
from slimkit.prune.schedule import CubicPruner, cubic_sparsity, gradual, one_shot
from slimkit.prune.sparse_linear import SparseLinear, sparsify
from slimkit.prune.plots import sparsity_heatmap, sparsity_trend
