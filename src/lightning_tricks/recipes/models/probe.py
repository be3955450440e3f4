"""The lectures' linear classifier on features of several stages of a frozen network (multi-stage probe).

A backbone from the zoo (any registered name or ``timm/<name>``, optionally with local weights) is frozen
and always run in eval mode; the outputs of the named stages are taken with torchvision's
``create_feature_extractor``, global-average pooled (feature maps over space, token sequences over
tokens), concatenated, and fed to one trainable ``nn.Linear`` (``classifier``).

Example::

    from lightning_tricks.recipes.models import create_model

    probe = create_model(
        "linear_probe", num_classes=10, backbone="resnet20", stages=["layer2", "layer3"],
        backbone_pretrained="resnet20.pt",
    )
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from lightning_tricks.recipes.layer_groups import stage_names
from lightning_tricks.recipes.models.registry import create_model, get_model_entry, register_model
from lightning_tricks.recipes.models.timm_models import is_timm_name


def pooled(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> mean over space; ``(B, N, C)`` -> mean over tokens; ``(B, C)`` as is."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if features.ndim == 3:
        return features.mean(dim=1)
    return features.flatten(1)


def default_stages(net: nn.Module) -> list[str]:
    """The top-level blocks between stem and classifier: children with parameters and sub-modules, the
    first (stem) and the last (classifier) left out (ResNet-18: ``layer1`` ... ``layer4``); else all but
    the last."""
    names = stage_names(net)
    children = dict(net.named_children())
    blocks = [n for n in names[1:-1] if any(True for _ in children[n].children())]
    return blocks or names[:-1]


class MultiStageLinearProbe(nn.Module):
    """Frozen ``backbone``'s pooled stage outputs, concatenated, into a trainable linear ``classifier``.

    Args:
        backbone: the network to probe; its weights are frozen and it stays in eval mode.
        stages: names of its modules whose outputs are features (``print(backbone)`` shows them).
        num_classes: classes of the linear classifier.
        in_channels: image channels (for the shape probe that sizes the classifier).
        input_size: side of the square image the shape probe uses.
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: list[str],
        num_classes: int,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        modules = dict(backbone.named_modules())
        unknown = [s for s in stages if not s or s not in modules]
        if not stages or unknown:
            raise ValueError(
                f"model_kwargs.stages={list(stages)!r}: {unknown or 'empty'} not module(s) of the backbone; "
                f"its stages are {', '.join(stage_names(backbone))} (any module name of print(backbone))"
            )
        backbone.requires_grad_(False)
        self.stages = list(stages)
        self.backbone = create_feature_extractor(backbone, return_nodes={s: s for s in self.stages})
        with torch.no_grad():
            width = self.features(torch.zeros(1, in_channels, input_size, input_size)).shape[1]
        self.classifier = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled outputs of the stages, in the order of ``stages``; the backbone always runs in
        eval mode (BatchNorm statistics and dropout of a frozen network never change), whatever its flag."""
        mode = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                outputs = self.backbone(images)
        finally:
            self.backbone.train(mode)
        return torch.cat([pooled(outputs[s]) for s in self.stages], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


@register_model("linear_probe", input_sizes=(8, 32))
def linear_probe(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet20",
    stages: list[str] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    backbone_pretrained: str | None = None,
    input_size: int = 32,
) -> MultiStageLinearProbe:
    """Multi-stage linear probe (:class:`MultiStageLinearProbe`) on the zoo model ``backbone``.

    Args:
        backbone: zoo name of the probed network (``resnet20``, ``timm/resnet18``...).
        stages: module names whose pooled outputs are the features; ``None`` for :func:`default_stages`.
        backbone_kwargs: ``create_model`` arguments of the backbone.
        backbone_pretrained: local weights file of the backbone (its own classifier is ignored).
        input_size: image side used once to size the classifier.
    """
    from lightning_tricks.recipes.pretrained import load_pretrained

    kwargs = dict(backbone_kwargs or {})
    if (
        not is_timm_name(backbone)
        and "input_size" in inspect.signature(get_model_entry(backbone).factory).parameters
    ):
        kwargs.setdefault("input_size", input_size)  # models sized by their input (mlp)
    net = create_model(backbone, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if backbone_pretrained is not None:
        load_pretrained(net, backbone_pretrained, key="model_kwargs.backbone_pretrained")
    if stages is None:
        stages = default_stages(net)
    return MultiStageLinearProbe(net, list(stages), num_classes, in_channels, input_size)
