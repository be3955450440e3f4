"""Layers and argument checks shared by the zoo architectures.

Example::

    from lightning_tricks.recipes.models.layers import DropConnectLinear, make_norm

    norm = make_norm("group", 64)  # GroupNorm(16, 64)
    head = DropConnectLinear(64, 10, p=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DropBlock2d, DropBlock3d, StochasticDepth, drop_block2d

CONV_NORMS: tuple[str, ...] = ("batch", "group", "layer", "none")
"""Normalisation choices for convolutional feature maps."""


ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid")
"""Nonlinearities selectable in the MLP and the small CNN."""


def make_activation(name: str) -> nn.Module:
    """The nonlinearity called ``name`` (:data:`ACTIVATIONS`; torch's default parameters, in-place ReLU).

    Example::

        make_activation("leaky_relu")  # LeakyReLU(negative_slope=0.01)
    """
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU(inplace=True)
    return {
        "leaky_relu": nn.LeakyReLU,
        "elu": nn.ELU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }[name]()


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise ``ValueError`` naming ``name``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_probability(name: str, p: float) -> float:
    """Return ``p`` if ``0 <= p < 1``; otherwise raise ``ValueError`` naming ``name``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1; got {p}")
    return float(p)


def group_norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Number of GroupNorm groups for ``channels``: up to 32 (Wu & He 2018), at least 4 channels each.

    Starts from ``gcd(channels, max_groups)`` and halves while groups would hold fewer than
    ``min_group_size`` channels, so 16 channels get 4 groups and 256 channels get 32.
    """
    groups = math.gcd(channels, max_groups)
    while groups > 1 and channels // groups < min_group_size:
        groups //= 2
    return groups


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``(N, C, H, W)`` feature maps.

    Args:
        norm: ``"batch"`` (BatchNorm2d), ``"group"`` (GroupNorm, see :func:`group_norm_groups`),
            ``"layer"`` (GroupNorm with one group, i.e. LayerNorm over C, H, W) or ``"none"``
            (``nn.Identity``).
        channels: number of feature channels.

    Example::

        make_norm("layer", 32)  # GroupNorm(1, 32)
    """
    check_choice("norm", norm, CONV_NORMS)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


#: Normalization layers: exempt from weight decay and L1/L2 penalties, initialised to the identity.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an actual normalisation layer (not an ``nn.Identity`` stand-in)."""
    return isinstance(module, NORM_LAYER_TYPES)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class DropConnectLinear(nn.Linear):
    """Linear layer with DropConnect (Wan et al., 2013): drops *weights* instead of activations.

    In training mode every forward pass samples a fresh Bernoulli(1 - p) mask over the weight
    matrix and rescales the kept weights by ``1 / (1 - p)``, so the expected weight equals the
    plain weight. The bias is not dropped. In eval mode the layer is a plain ``nn.Linear``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        p: probability of dropping each weight, ``0 <= p < 1``.

    Example::

        head = DropConnectLinear(512, 10, p=0.5)
        logits = head(torch.randn(8, 512))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.p = check_probability("drop_connect", p)

    def sample_weight(self) -> torch.Tensor:
        """The weight used by the next forward pass: masked and rescaled in training mode."""
        return drop_connect_weight(self.weight, self.p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sample_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def drop_connect_weight(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``weight`` with each entry dropped with probability ``p`` and the rest scaled by ``1 / (1 - p)``
    in training; ``weight`` itself otherwise."""
    if not training or p == 0.0:
        return weight
    mask = torch.empty_like(weight).bernoulli_(1.0 - p)
    return weight * mask / (1.0 - p)


class DropConnectConv2d(nn.Conv2d):
    """``nn.Conv2d`` with DropConnect on its kernel (a fresh mask per forward pass in training), as
    :class:`DropConnectLinear`; only ``padding_mode="zeros"``.

    Example::

        conv = DropConnectConv2d(16, 32, 3, padding=1, p=0.2)
    """

    def __init__(self, *args: Any, p: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(
                f"DropConnectConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}"
            )
        self.p = check_probability("drop_connect", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = drop_connect_weight(self.weight, self.p, self.training)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


#: Layers whose drop probability ``p`` is regularisation (torch's common dropout base is private):
#: dropout, DropConnect, and torchvision's stochastic depth (DropPath) and DropBlock, each of which
#: is the identity at ``p = 0``.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    DropConnectLinear,
    DropConnectConv2d,
    StochasticDepth,
    DropBlock2d,
    DropBlock3d,
)


@contextmanager
def dropout_disabled(model: nn.Module) -> Iterator[None]:
    """Set ``p = 0`` on every dropout, DropConnect, DropPath and DropBlock layer of ``model``
    (:data:`DROPOUT_TYPES`) for the duration; the original probabilities are restored afterwards,
    also on error. In training mode the model is then deterministic (up to batch statistics).

    Example::

        with dropout_disabled(model):
            loss = F.cross_entropy(model(x), y)
    """
    dropping = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    saved_p = [m.p for m in dropping]
    try:
        for m in dropping:
            m.p = 0.0
        yield
    finally:
        for m, p in zip(dropping, saved_p, strict=True):
            m.p = p


def _with_drop_connect(layer: nn.Module, p: float) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new: nn.Module = DropConnectLinear(layer.in_features, layer.out_features, layer.bias is not None, p=p)
    else:
        new = DropConnectConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            p=p,
        )
    new.load_state_dict(layer.state_dict())
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)


def apply_drop_connect(model: nn.Module, p: float, layers: str | Sequence[str] = "all") -> list[str]:
    """Put DropConnect with rate ``p`` on linear and conv layers of ``model``; return their names.

    ``layers`` is ``"all"`` (every ``nn.Linear``/``nn.Conv2d``) or module names, each selecting that
    layer or every linear/conv layer below it (``["layer3", "classifier"]``). Layers are replaced by
    :class:`DropConnectLinear`/:class:`DropConnectConv2d` with the same weights and parameter names, so
    checkpoints and initialisation see the same ``weight``/``bias``; layers that already drop connections
    get the new rate.

    Raises:
        ValueError: ``p`` outside ``(0, 1)``, a name that is no module of ``model``, or a selection
            without any linear/conv layer.

    Example::

        net = create_model("resnet20", num_classes=10)
        apply_drop_connect(net, 0.1, ["layer3"])
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop_connect must satisfy 0 < drop_connect < 1 to apply it to layers; got {p}")
    prefixes = None if layers == "all" else [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    unknown = [name for name in prefixes or [] if name not in modules]
    if unknown:
        top = ", ".join(name for name in modules if name and "." not in name)
        raise ValueError(f"drop_connect_layers names no module {unknown}; top-level modules: {top}")
    chosen = [
        name
        for name, m in modules.items()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and (prefixes is None or any(name == q or name.startswith(q + ".") for q in prefixes))
    ]
    if not chosen:
        raise ValueError(f"drop_connect_layers={layers!r} selects no nn.Linear or nn.Conv2d layer")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        layer = modules[name]
        if isinstance(layer, (DropConnectLinear, DropConnectConv2d)):
            layer.p = p
        else:
            setattr(modules[parent_name], attr, _with_drop_connect(layer, p))
    return chosen


def drop_path_rates(drop_path: float, num_blocks: int) -> list[float]:
    """Stochastic depth's linear decay rule (Huang et al. 2016): block ``l`` of ``L`` (1-based, input to
    output) drops its residual branch with probability ``drop_path * l / L``, the last one with ``drop_path``.

    Example::

        drop_path_rates(0.5, 4)  # [0.125, 0.25, 0.375, 0.5]
    """
    check_probability("drop_path", drop_path)
    return [drop_path * (i + 1) / num_blocks for i in range(num_blocks)]


def make_drop_path(p: float) -> nn.Module:
    """DropPath for one residual branch: torchvision's ``StochasticDepth(p, "row")`` (each sample's branch
    is zeroed with probability ``p`` and kept ones scaled by ``1 / (1 - p)`` in training; identity at
    eval), or ``nn.Identity`` for ``p = 0``."""
    return StochasticDepth(p, "row") if p > 0 else nn.Identity()


class FittingDropBlock2d(DropBlock2d):
    """torchvision's ``DropBlock2d`` whose block shrinks to the largest odd side that fits the feature map.

    torchvision clips the block to the map's side and then refuses an even result, so a 3x3 block
    fails on the 2x2 maps of small images (digits, or progressive resizing's early sizes).

    Example::

        FittingDropBlock2d(0.1, 3).train()(torch.randn(2, 8, 2, 2))  # drops 1x1 blocks here
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        side = min(self.block_size, *input.shape[-2:])
        side -= 1 - side % 2  # an even side becomes the odd one below it
        return drop_block2d(input, self.p, side, self.inplace, self.eps, self.training)


def make_drop_block(p: float, block_size: int) -> nn.Module:
    """torchvision's ``DropBlock2d(p, block_size)`` (Ghiasi et al. 2018; as :class:`FittingDropBlock2d`, whose
    block fits small maps), or ``nn.Identity`` for ``p = 0``.

    Raises ``ValueError`` naming ``drop_block``/``drop_block_size`` when out of range.
    """
    check_probability("drop_block", p)
    odd = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size % 2 == 1
    if not odd or block_size < 1:
        # torchvision's drop_block2d refuses even sizes, but only in the first training forward
        raise ValueError(f"drop_block_size must be an odd integer >= 1 (e.g. 3, 5, 7); got {block_size!r}")
    return FittingDropBlock2d(p, block_size) if p > 0 else nn.Identity()


def make_classifier(in_features: int, num_classes: int, drop_connect: float = 0.0) -> nn.Linear:
    """Final linear layer: ``nn.Linear``, or :class:`DropConnectLinear` when ``drop_connect > 0``."""
    check_probability("drop_connect", drop_connect)
    if drop_connect > 0.0:
        return DropConnectLinear(in_features, num_classes, p=drop_connect)
    return nn.Linear(in_features, num_classes)


def pooled_classifier_head(
    in_features: int, num_classes: int, dropout: float = 0.0, drop_connect: float = 0.0
) -> tuple[nn.Sequential, nn.Dropout, nn.Linear]:
    """Global average pool + flatten, dropout, and the final linear layer of a convolutional net.

    Returned as three modules so models keep them as ``pool``, ``dropout`` and ``classifier``.

    Example::

        self.pool, self.dropout, self.classifier = pooled_classifier_head(64, 10, dropout=0.2)
    """
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return pool, nn.Dropout(dropout), make_classifier(in_features, num_classes, drop_connect)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The final linear classifier of a zoo model (``model.classifier``, ``model.fc``, or the last Linear).

    Useful for linear probes and for giving the head its own learning rate.

    Example::

        model = create_model("resnet20", num_classes=10)
        head = get_classifier(model)
        head.out_features  # 10
    """
    for attr in ("classifier", "fc"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


def kaiming_init(model: nn.Module) -> None:
    """He et al. (2015) normal init for convolutions (fan-out, ReLU gain); norms to weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm(m):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
