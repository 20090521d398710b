"""Tiny random-weight models of every HF transformers vision and encoder family that runs here."""

from __future__ import annotations

import torch
import torch.nn as nn

FAMILIES = ["resnet", "convnext", "mobilenet_v1", "mobilenet_v2", "efficientnet", "regnet", "vit", "swin",
            "bert", "distilbert"]


def tiny(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(model in eval mode, example inputs); seeded so every run builds the same weights."""
    import transformers as T

    torch.manual_seed(0)
    image, small = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)
    builders = {
        "resnet": lambda: (T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), image),
        "convnext": lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), image),
        "mobilenet_v1": lambda: (T.MobileNetV1ForImageClassification(T.MobileNetV1Config(
            depth_multiplier=0.25, num_labels=10, image_size=64)), image),
        "mobilenet_v2": lambda: (T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.35, num_labels=10, image_size=64)), image),
        "efficientnet": lambda: (T.EfficientNetForImageClassification(T.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.25, image_size=64, num_labels=10, hidden_dim=320)), image),
        "regnet": lambda: (T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8,
            num_labels=10)), image),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=10)), small),
        "swin": lambda: (T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
            num_labels=10)), small),
        "bert": lambda: (T.BertForSequenceClassification(T.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=3)), torch.randint(0, 100, (2, 16))),
        "distilbert": lambda: (T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128, num_labels=3)),
            torch.randint(0, 100, (2, 16))),
    }
    model, x = builders[name]()
    return model.eval(), (x,)
