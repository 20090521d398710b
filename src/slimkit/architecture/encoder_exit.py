"""Early exits on a transformer encoder classifier (BERT family, e.g. MiniLM + a linear head).

Sentence-level labels such as polarity are often readable from the middle layers already, so a
sentence the exit after layer 2 is sure about need not run layers 3-6. The encoder is cut into
stages that pass ``(hidden, mask)`` along: the stem embeds the tokens, every stage runs some of
the layers, each early exit mean-pools (masked, L2-normalised, as the classifier itself pools)
and applies a linear head. :class:`~slimkit.architecture.exit_model.EarlyExit` routes per
sample, and every stage first drops the padding columns no remaining sentence needs: after the
confident short sentences leave, the rest of the batch gets narrower as well as shorter.

Heads are fitted on the frozen encoder by logistic regression (:func:`fit_heads`) or, like CNN
exits, with the fine-tuning loop and :func:`~slimkit.architecture.early_exit.exit_loss`.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.architecture.exit_model import EarlyExit
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import build_registered, builder, builder_of
from slimkit.graph.blocks import block_list


class EncoderClassifier(nn.Module):
    """A sentence encoder (``(ids, mask) -> (B, C)`` pooled embeddings) and a linear head on them."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # (B, T) x2
        return self.head(self.encoder(input_ids, attention_mask))  # (B, classes)


def encoder_classifier(encoder: nn.Module, features: np.ndarray | torch.Tensor, labels: Sequence[int],
                       c: float = 1.0) -> EncoderClassifier:
    """``encoder`` plus a logistic-regression head fitted on its ``features`` (N, C) for ``labels``."""
    head = _logistic_head(np.asarray(features, dtype=np.float64), np.asarray(labels), c)
    model = EncoderClassifier(encoder, head).eval()
    spec = builder_of(encoder)
    if spec is not None:
        model.slimkit_builder = ("encoder_classifier", {"encoder": spec[0], "encoder_kwargs": spec[1],
                                                        "dim": head.in_features, "classes": head.out_features})
    return model


@builder("encoder_classifier")
def build_encoder_classifier(encoder: str, encoder_kwargs: dict[str, Any], dim: int, classes: int) -> EncoderClassifier:
    return EncoderClassifier(build_registered(encoder, encoder_kwargs, what="encoder classifier artifact"), nn.Linear(dim, classes)).eval()


def _logistic_head(x: np.ndarray, y: np.ndarray, c: float) -> nn.Linear:
    """``nn.Linear`` with the weights of ``LogisticRegression(C=c)`` on (N, C) features; two classes
    become two logits (0, w·x+b), which give the same softmax as the regression's sigmoid."""
    from sklearn.linear_model import LogisticRegression  # optional (sklearn, extra 'zoo'): imported when used

    classes = int(y.max()) + 1
    if classes < 2 or len(np.unique(y)) < 2:
        raise SlimkitError(f"labels hold a single class ({np.unique(y).tolist()})", "fit heads on data with every class")
    fit = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    linear = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        if classes == 2:
            linear.weight.copy_(torch.tensor(np.stack([np.zeros(x.shape[1]), fit.coef_[0]]), dtype=torch.float32))
            linear.bias.copy_(torch.tensor([0.0, fit.intercept_[0]], dtype=torch.float32))
        else:
            linear.weight.copy_(torch.tensor(fit.coef_, dtype=torch.float32))
            linear.bias.copy_(torch.tensor(fit.intercept_, dtype=torch.float32))
    return linear


class EncoderStem(nn.Module):
    """Token, position and segment embeddings: ``(ids, mask) -> (hidden (B, T, C), mask (B, T))``."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = state
        return self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids)), mask


class EncoderLayers(nn.Module):
    """Some consecutive encoder layers on ``(hidden, mask)``, after trimming padding nobody needs."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, mask = state  # (B, T, C), (B, T)
        width = int(mask.sum(1).max()) if mask.numel() else 0
        if 0 < width < mask.shape[1] and not bool(mask[:, width:].any()):  # right padding only
            h, mask = h[:, :width], mask[:, :width]
        additive = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min  # (B, 1, 1, T)
        for layer in self.layers:
            out = layer(h, attention_mask=additive)
            h = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
        return h, mask


class PooledHead(nn.Module):
    """Masked mean over tokens, L2 normalisation, then ``linear``: ``(hidden, mask) -> (B, classes)``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.linear(pooled(state))


def pooled(state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``(hidden (B, T, C), mask (B, T)) -> (B, C)``, as sentence-transformers pools and normalises."""
    h, mask = state
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def _base_model(encoder: nn.Module) -> nn.Module:
    """The module that owns both the embeddings and the layer list (a ``BertModel``)."""
    parent, _ = block_list(encoder)
    for module in encoder.modules():
        if hasattr(module, "embeddings") and any(m is parent for m in module.modules()):
            return module
    raise SlimkitError(f"{type(encoder).__name__} has encoder layers but no embeddings module next to them",
                       "early exits on transformers need a BERT-style model (embeddings + encoder.layer)")


def attach_encoder_exits(model: EncoderClassifier, example: Sequence[torch.Tensor], after: Sequence[int] = (),
                         *, seed: int = 0, freeze_backbone: bool = True, tolerance: float = 1e-4) -> EarlyExit:
    """Exits after the encoder layers at ``after`` (default: one exit, after half of the layers).

    The staged model is checked against ``model`` on ``example`` (``(ids, mask)``) with every exit
    closed: an encoder whose layers do not take BERT's ``(hidden, attention_mask=additive)`` call
    is refused rather than silently computing something else.
    """
    if not isinstance(model, EncoderClassifier):
        raise SlimkitError(f"transformer early exits need an EncoderClassifier, got {type(model).__name__}",
                           "wrap the encoder and its linear head in slimkit.architecture.EncoderClassifier")
    model = copy.deepcopy(model).eval()  # the exits share nothing with the caller's model
    base = _base_model(model.encoder)
    parent, attr = block_list(base)
    layers = list(getattr(parent, attr))
    after = sorted(set(after or [len(layers) // 2 - 1]))
    if not after or after[0] < 0 or after[-1] >= len(layers) - 1:
        raise SlimkitError(f"exit positions {list(after)} do not split a {len(layers)}-layer encoder",
                           f"give layer indices between 0 and {len(layers) - 2}")
    cuts = [0, *(i + 1 for i in after), len(layers)]
    stages: list[nn.Module] = [EncoderLayers(layers[a:b]) for a, b in zip(cuts, cuts[1:])]
    stages[0] = nn.Sequential(EncoderStem(base.embeddings), stages[0])
    stages[-1] = nn.Sequential(stages[-1], PooledHead(model.head))
    torch.manual_seed(seed)
    classes, dim = model.head.out_features, model.head.in_features
    heads = [PooledHead(nn.Linear(dim, classes)) for _ in after]
    ee = EarlyExit(stages, heads, freeze_backbone=freeze_backbone).eval()
    with torch.no_grad():
        staged, whole = ee.exit_logits(*example)[-1], model(*example)
    if not torch.allclose(staged, whole, atol=tolerance, rtol=0):
        raise SlimkitError(f"the staged encoder differs from {type(model.encoder).__name__} by "
                           f"{(staged - whole).abs().max().item():.2e}",
                           "its layers do not follow BERT's calling convention; exits are supported on BERT-style encoders")
    spec = builder_of(model)
    if spec is not None:
        ee.slimkit_builder = ("encoder_early_exit", {"classifier": spec[0], "classifier_kwargs": spec[1],
                                                     "after": list(after)})
    return ee


@builder("encoder_early_exit")
def build_encoder_early_exit(classifier: str, classifier_kwargs: dict[str, Any], after: list[int]) -> EarlyExit:
    """The untrained staged model an artifact names; ``slimkit.load`` fills weights and thresholds."""
    model = build_registered(classifier, classifier_kwargs, what="encoder early-exit artifact")
    ids = torch.ones(1, 4, dtype=torch.long)  # (1, T): only shapes matter here
    return attach_encoder_exits(model, (ids, torch.ones_like(ids)), after, tolerance=float("inf"))


@torch.no_grad()  # not inference_mode: heads may be fitted on these with autograd
def exit_features(ee: EarlyExit, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Pooled features every exit sees, ``E x (N, C)``, over batches of ``(ids, mask)`` (no routing)."""
    per_exit: list[list[torch.Tensor]] = [[] for _ in ee.blocks]
    for inputs in batches:
        x: Any = tuple(inputs)
        for i, block in enumerate(ee.blocks):
            if i == len(ee.blocks) - 1:  # the final stage ends in the classifier's own head
                x = block[0](x)
            else:
                x = block(x)
            per_exit[i].append(pooled(x))
    return [torch.cat(f) for f in per_exit]


def fit_heads(ee: EarlyExit, features: Sequence[torch.Tensor], labels: Sequence[int], c: float = 1.0) -> EarlyExit:
    """Fit every early head by logistic regression on its exit's pooled ``features`` (frozen encoder)."""
    if len(features) < len(ee.heads):
        raise SlimkitError(f"{len(features)} feature sets for {len(ee.heads)} exit heads", "pass exit_features(...)")
    y = np.asarray(labels)
    for head, x in zip(ee.heads, features):
        head.linear = _logistic_head(x.double().numpy(), y, c)
    return ee
