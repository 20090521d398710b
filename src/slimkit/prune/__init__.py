"""Pruning: unstructured magnitude, structured channels/heads with dependency groups, N:M, gradual
schedules and lottery tickets."""

from __future__ import annotations

from slimkit.prune.channels import Channels
from slimkit.prune.gradual import Gradual
from slimkit.prune.lottery import Lottery, Ticket, find_ticket, reinit_like
from slimkit.prune.magnitude import Magnitude, magnitude_masks
from slimkit.prune.nm import NM, is_nm, nm_mask, sparsegpt_nm, to_semi_structured
from slimkit.prune.plots import sparsity_heatmap, sparsity_trend
from slimkit.prune.record import ChannelRecord, SparsityRecord
from slimkit.prune.schedule import CubicPruner, cubic_sparsity, gradual, one_shot
from slimkit.prune.sparse_linear import SparseLinear, sparsify
from slimkit.train.masks import apply_masks, global_sparsity, layer_sparsity, masked, masks_from_zeros

__all__ = ["ChannelRecord", "Channels", "CubicPruner", "Gradual", "Lottery", "Magnitude", "NM", "SparseLinear",
           "SparsityRecord", "Ticket", "apply_masks", "cubic_sparsity", "find_ticket", "global_sparsity", "gradual",
           "is_nm", "layer_sparsity", "magnitude_masks", "masked", "masks_from_zeros", "nm_mask", "one_shot",
           "reinit_like", "sparsegpt_nm", "sparsify", "sparsity_heatmap", "sparsity_trend", "to_semi_structured"]
