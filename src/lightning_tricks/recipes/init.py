"""Weight initialisation schemes (LeCun, Glorot, He, orthogonal) and zero-init of residual branches.

Variances for a layer with fan-in ``n_in`` and fan-out ``n_out`` (computed like ``torch.nn.init``, i.e.
including the kernel size for convolutions): LeCun ``1/n_in``, Glorot ``2/(n_in + n_out)``, He ``2/n_in``
(``mode="fan_in"``) or ``2/n_out`` (``mode="fan_out"``). Uniform variants draw from ``U(-b, b)`` with
``b = sqrt(3 * Var)`` so they have the same variance.

Example::

    from lightning_tricks.recipes.init import InitConfig, initialize

    initialize(model, InitConfig(scheme="he_normal", mode="fan_out", zero_init_residual=True))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_tricks.recipes.models.layers import NORM_LAYER_TYPES

INIT_SCHEMES: tuple[str, ...] = (
    "default",
    "lecun_normal",
    "lecun_uniform",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "orthogonal",
    "small_normal",
)
INIT_MODES: tuple[str, ...] = ("fan_in", "fan_out")


@dataclass(frozen=True)
class InitConfig:
    """How to initialise a model.

    Args:
        scheme: ``default`` (leave the framework's init untouched), ``lecun_normal``, ``lecun_uniform``,
            ``glorot_normal``, ``glorot_uniform``, ``he_normal``, ``he_uniform``, ``orthogonal`` or
            ``small_normal`` (the lectures' "small random numbers" ``N(0, std^2)``, whatever the fan-in;
            fine for small nets, activations vanish in deep ones).
        std: Standard deviation of ``small_normal``, ``> 0``; ``None`` means 0.01. Only for ``small_normal``.
        mode: ``fan_in`` or ``fan_out``; used by the He schemes (LeCun is fan-in by definition).
        zero_bias: Zero the biases of re-initialised Conv/Linear layers (ignored with ``default``).
        zero_init_residual: Zero the weight (gamma) of the last norm layer of every residual branch, so each
            residual block starts as the identity (Goyal et al., 2017).

    Example::

        InitConfig(scheme="he_normal", mode="fan_out")
    """

    scheme: str = "default"
    mode: str = "fan_in"
    zero_bias: bool = True
    zero_init_residual: bool = False
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in INIT_SCHEMES:
            raise ValueError(
                f"init.scheme={self.scheme!r} is unknown; valid schemes: {', '.join(INIT_SCHEMES)}"
            )
        if self.mode not in INIT_MODES:
            raise ValueError(f"init.mode must be 'fan_in' or 'fan_out', got {self.mode!r}")
        if self.std is not None and self.scheme != "small_normal":
            raise ValueError(
                f"init.std={self.std} only applies to init.scheme='small_normal', not {self.scheme!r}"
            )
        if self.std is not None and not (isinstance(self.std, (int, float)) and 0 < self.std < float("inf")):
            raise ValueError(f"init.std must be a finite number > 0, got {self.std!r}; e.g. 0.01")


def _weight_initializer(scheme: str, mode: str, std: float | None = None) -> Callable[[Tensor], Tensor]:
    # nonlinearity="linear" gives gain 1, i.e. the LeCun variance 1/fan_in.
    initializers: dict[str, Callable[[Tensor], Tensor]] = {
        "lecun_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear"),
        "lecun_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="linear"),
        "glorot_normal": nn.init.xavier_normal_,
        "glorot_uniform": nn.init.xavier_uniform_,
        "he_normal": lambda w: nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu"),
        "he_uniform": lambda w: nn.init.kaiming_uniform_(w, mode=mode, nonlinearity="relu"),
        "orthogonal": nn.init.orthogonal_,
        "small_normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01 if std is None else std),
    }
    return initializers[scheme]


def _residual_last_norms(model: nn.Module) -> tuple[int, list[nn.Module]]:
    """Number of residual blocks found and the last norm layer of each (where it has one)."""
    blocks = 0
    norms: list[nn.Module] = []
    for module in model.modules():
        if hasattr(module, "last_norm"):
            norm = module.last_norm
        elif isinstance(module, BasicBlock):
            norm = module.bn2
        elif isinstance(module, Bottleneck):
            norm = module.bn3
        else:
            continue
        blocks += 1
        if norm is not None:
            norms.append(norm)
    return blocks, norms


def initialize(model: nn.Module, config: InitConfig) -> nn.Module:
    """Initialise ``model`` in place and return it.

    Conv (``nn.Conv*d``, ``nn.ConvTranspose*d``) and ``nn.Linear`` weights get ``config.scheme`` and zero
    biases (``zero_bias``); affine norm layers get weight 1 and bias 0. With ``scheme="default"`` all of
    that is skipped. Then ``zero_init_residual`` zeroes the last norm weight of each residual branch: every
    module with a ``last_norm`` attribute, and torchvision's ``BasicBlock.bn2`` / ``Bottleneck.bn3``.

    Args:
        model: The model to initialise.
        config: Initialisation configuration.

    Returns:
        ``model``.

    Raises:
        ValueError: If ``zero_init_residual`` is set but the model has no residual branch ending in a norm.

    Example::

        model = initialize(create_model("resnet20", num_classes=10), InitConfig("he_normal"))
    """
    if config.scheme != "default":
        init_weight = _weight_initializer(config.scheme, config.mode, config.std)
        for module in model.modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                if isinstance(module.weight, nn.parameter.UninitializedParameter):
                    raise ValueError(
                        f"{type(module).__name__} is lazy: run a forward pass before initialize()"
                    )
                init_weight(module.weight)
                if config.zero_bias and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, NORM_LAYER_TYPES):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
    if config.zero_init_residual:
        blocks, norms = _residual_last_norms(model)
        zeroed = [n for n in norms if getattr(n, "weight", None) is not None]
        if not zeroed:
            found = f"{blocks} residual blocks but none ends in an affine norm layer" if blocks else "none"
            raise ValueError(
                "init.zero_init_residual=True needs residual blocks exposing `last_norm` (or torchvision "
                f"BasicBlock/Bottleneck); this model has {found}. Set init.zero_init_residual=False."
            )
        for norm in zeroed:
            nn.init.zeros_(norm.weight)
    return model
