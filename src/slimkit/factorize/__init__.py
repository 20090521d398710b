"""Low-rank (SVD) and tensor (Tucker-2, CP) factorization: layers replaced by smaller sequences."""

from __future__ import annotations

from slimkit.factorize.cp import CP, cp_als, cp_conv, cp_reconstruct
from slimkit.factorize.layers import FactorizeRecord
from slimkit.factorize.modules import CPConv2d, LowRankConv2d, LowRankLinear, TuckerConv2d
from slimkit.factorize.svd import SVD, low_rank, rank_for_energy, rank_for_ratio, truncated_svd
from slimkit.factorize.tucker import Tucker, tucker2, tucker2_reconstruct, tucker_conv

__all__ = ["CP", "CPConv2d", "FactorizeRecord", "LowRankConv2d", "LowRankLinear", "SVD", "Tucker", "TuckerConv2d",
           "cp_als", "cp_conv", "cp_reconstruct", "low_rank", "rank_for_energy", "rank_for_ratio", "truncated_svd",
           "tucker2", "tucker2_reconstruct", "tucker_conv"]
