"""torchvision ImageNet architectures with local-file transfer learning and layer freezing.

Weights are never downloaded: pass ``weights_path``, a ``state_dict`` saved with ``torch.save``
(for example ``torch.save(torchvision.models.resnet18(weights="DEFAULT").state_dict(), path)``
on a machine with internet access). The ImageNet classifier is replaced when ``num_classes``
differs from the file's head, and the first convolution is adapted when ``in_channels != 3``.

Example::

    from lightning_tricks.recipes.models import create_model

    probe = create_model(
        "resnet18", num_classes=10, weights_path="resnet18.pt", freeze="backbone"
    )
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_tricks.recipes.models.layers import (
    CONV_NORMS,
    check_choice,
    check_probability,
    make_classifier,
    make_norm,
)
from lightning_tricks.recipes.models.registry import register_variant

FREEZE_MODES: tuple[str, ...] = ("none", "backbone", "stages")


@dataclass(frozen=True)
class _Arch:
    builder: Callable[..., nn.Module]
    stem: str  # dotted path of the first convolution
    head: str  # dotted path of the final nn.Linear
    stages: Callable[[nn.Module], list[nn.Module]]  # trainable units from input to output, head excluded
    takes_dropout: bool  # the builder has its own pre-classifier dropout


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def _mobilenet_stages(model: nn.Module) -> list[nn.Module]:
    # Inverted-residual blocks, the last 1x1 conv, then the pre-logits Linear + Hardswish + Dropout.
    return [*model.features[1:], model.classifier[:3]]


_ARCHS: dict[str, _Arch] = {
    "resnet18": _Arch(torchvision.models.resnet18, "conv1", "fc", _resnet_stages, False),
    "resnet34": _Arch(torchvision.models.resnet34, "conv1", "fc", _resnet_stages, False),
    "resnet50": _Arch(torchvision.models.resnet50, "conv1", "fc", _resnet_stages, False),
    "mobilenet_v3_small": _Arch(
        torchvision.models.mobilenet_v3_small, "features.0.0", "classifier.3", _mobilenet_stages, True
    ),
}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def load_state_dict_file(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``state_dict`` saved with ``torch.save`` (tensors only, ``weights_only=True``).

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {str(weights_path)!r} does not exist or is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights_path {str(weights_path)!r} does not hold a state_dict")
    return state


def adapt_input_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Copy of ``conv`` taking ``in_channels`` inputs, keeping pretrained filters meaningful.

    One channel gets the sum of the RGB filters (a grey image = equal RGB); other counts repeat
    the filters cyclically and rescale by ``3 / in_channels`` so activations keep their scale.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    weight = conv.weight.detach()
    old_in = weight.shape[1]
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            reps = math.ceil(in_channels / old_in)
            new.weight.copy_(weight.repeat(1, reps, 1, 1)[:, :in_channels] * (old_in / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    return new


def freeze_layers(model: nn.Module, head: nn.Module, stages: list[nn.Module], freeze: str, k: int) -> None:
    """Set ``requires_grad`` for ``freeze`` = ``"none"``, ``"backbone"`` or ``"stages"`` (last ``k``)."""
    if freeze == "none":
        return
    model.requires_grad_(False)
    if freeze == "stages":
        for stage in stages[len(stages) - k :]:
            stage.requires_grad_(True)
    head.requires_grad_(True)


def build_torchvision_model(
    arch_name: str,
    num_classes: int,
    in_channels: int = 3,
    weights_path: str | None = None,
    freeze: str = "none",
    trainable_stages: int = 1,
    norm: str = "batch",
    dropout: float = 0.0,
    drop_connect: float = 0.0,
) -> nn.Module:
    """Build a torchvision model, optionally from local weights, then freeze part of it.

    Args:
        arch_name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"mobilenet_v3_small"``.
        num_classes: number of output logits; the file's head is replaced if it differs.
        in_channels: image channels; the stem convolution is adapted if not 3.
        weights_path: local ``state_dict`` file, or ``None`` for random init. Never downloads.
        freeze: ``"none"``; ``"backbone"`` (only the classifier trains: a linear probe); or
            ``"stages"`` (the last ``trainable_stages`` stages and the classifier train).
            Frozen norm layers still update running statistics in training mode.
        trainable_stages: number of final stages left trainable with ``freeze="stages"``
            (ResNets: 1 = layer4, 2 = layer3 + layer4, ...).
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``; only ``"batch"`` with weights.
        dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
    """
    arch = _ARCHS[arch_name]
    check_choice("norm", norm, CONV_NORMS)
    check_choice("freeze", freeze, FREEZE_MODES)
    check_probability("dropout", dropout)
    check_probability("drop_connect", drop_connect)

    kwargs: dict = {"weights": None}
    if norm != "batch":
        kwargs["norm_layer"] = partial(make_norm, norm)
    if arch.takes_dropout:
        kwargs["dropout"] = dropout

    state = None
    head_classes = num_classes
    if weights_path is not None:
        if norm != "batch":
            raise ValueError(f"norm={norm!r} cannot load weights_path trained with norm='batch'")
        state = load_state_dict_file(weights_path)
        head_key = f"{arch.head}.weight"
        if head_key not in state:
            raise ValueError(
                f"weights_path {weights_path!r} has no {head_key!r}: not a {arch_name} state_dict"
            )
        head_classes = state[head_key].shape[0]

    model = arch.builder(num_classes=head_classes, **kwargs)
    if state is not None:
        from lightning_tricks.recipes.pretrained import check_fits

        check_fits(model.state_dict(), state, f"weights_path {weights_path!r}", arch_name, skip=set())
        model.load_state_dict(state)
        if head_classes != num_classes:
            rank_zero_warn(
                f"weights_path {weights_path!r}: its classifier has {head_classes} classes, the model "
                f"{num_classes}; the classifier is re-initialised, the rest is loaded"
            )

    if in_channels != 3:
        _set_submodule(model, arch.stem, adapt_input_conv(model.get_submodule(arch.stem), in_channels))

    head = model.get_submodule(arch.head)
    if head.out_features != num_classes or drop_connect > 0:
        new_head = make_classifier(head.in_features, num_classes, drop_connect)
        if head.out_features == num_classes:
            new_head.load_state_dict(head.state_dict())
        _set_submodule(model, arch.head, new_head)
        head = new_head

    if dropout > 0 and not arch.takes_dropout:
        # ResNet flattens right after avgpool, so element-wise dropout here acts on the classifier input
        # while keeping ``fc`` a plain Linear with the usual state_dict keys.
        model.avgpool = nn.Sequential(model.avgpool, nn.Dropout(dropout))

    stages = arch.stages(model)
    if freeze == "stages" and not 1 <= trainable_stages <= len(stages):
        raise ValueError(
            f"trainable_stages must be in [1, {len(stages)}] for {arch_name}, got {trainable_stages}"
        )
    freeze_layers(model, head, stages, freeze, trainable_stages)
    return model


for _name in _ARCHS:
    register_variant(
        _name,
        build_torchvision_model,
        arch_name=_name,
        input_sizes=(32, 224),
        doc=f"""torchvision ``{_name}``; see :func:`build_torchvision_model` for the arguments.

    Example::

        create_model("{_name}", num_classes=10, weights_path="{_name}.pt", freeze="stages")
    """,
    )
