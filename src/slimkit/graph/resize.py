"""Give a freshly built model the layer widths of a structurally pruned state dict.

A pruned artifact stores the original builder (the architecture) plus smaller tensors. Loading
builds the original and then shrinks each layer to the saved shapes, updating the attributes the
layers' forward passes read (``in_channels``, ``groups``, ``normalized_shape``, head counts...).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from slimkit.graph.attention import attention_blocks, sync_head_counts


def conform(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize ``model``'s parameters and buffers to the shapes in ``state``; returns the resized names."""
    blocks = attention_blocks(model)
    depthwise = {id(m) for m in model.modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels}
    resized = []
    for mod_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for key, tensor in list(slots.items()):
                full = f"{mod_name}.{key}" if mod_name else key
                if tensor is None or full not in state or tuple(state[full].shape) == tuple(tensor.shape):
                    continue
                fresh = torch.zeros(state[full].shape, dtype=tensor.dtype, device=tensor.device)
                slots[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) if kind == "_parameters" else fresh
                resized.append(full)
        _sync_attributes(module, id(module) in depthwise)
    sync_head_counts(blocks)
    return resized


def _sync_attributes(module: nn.Module, depthwise: bool) -> None:
    """Make a layer's shape attributes agree with its (possibly resized) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_ch, in_per_group = module.weight.shape[:2]
        if depthwise:
            module.groups = out_ch
        module.out_channels = out_ch
        module.in_channels = in_per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.RNNBase):  # (G*H, In) / (G*H, H) gate matrices of the first layer
        module.input_size, module.hidden_size = module.weight_ih_l0.shape[1], module.weight_hh_l0.shape[1]
        module._init_flat_weights()  # the flat weight list still points at the tensors before resizing
    elif isinstance(module, nn.RNNCellBase):
        module.input_size, module.hidden_size = module.weight_ih.shape[1], module.weight_hh.shape[1]
